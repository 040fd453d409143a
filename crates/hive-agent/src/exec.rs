//! One exec session: a process started in a running container by the OCI runtime's `exec`,
//! its stdio carried as [`Frame`]s over the upgraded connection the API server passed on.
//!
//! Without a terminal the process gets three pipes (stdout and stderr stay apart). With one,
//! the process is described by a process spec file (`--process`) that carries the
//! terminal's size, so its terminal has that size from the start where the runtime applies it
//! before the process runs, and the terminal is carried one of two ways:
//! - runc runs in the foreground on a pseudo-terminal the agent allocates (its controlling
//!   terminal): it gives the process a terminal of its own and copies between the two, and a
//!   size set on ours reaches it as SIGWINCH (runc takes a console socket only with
//!   `--detach`, and then nobody could wait for the exit code);
//! - crun, in the foreground too, hands the master of the terminal it made for the process to
//!   the agent over a console socket, and the agent copies and resizes it directly.
//!
//! Output newlines are made `\r\n`, once ([`Newlines`]). When the client goes away, the
//! process gets SIGHUP, like a closed terminal.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use hive_client::exec::{Frame, read_frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::runtime::{OciRuntime, RuntimeKind};

/// What to run.
#[derive(Clone, Debug)]
pub struct ExecRequest {
    pub container: String,
    /// The container's bundle (its `config.json` holds the process a terminal exec starts
    /// from).
    pub bundle: PathBuf,
    pub command: Vec<String>,
    pub tty: bool,
}

/// Exit code of a process from its wait status (128 + signal when killed).
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

/// Runs the session to its end over `io`.
pub async fn session<IO>(io: IO, runtime: OciRuntime, req: ExecRequest)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let (tx, mut rx) = mpsc::channel::<Frame>(16);
    let writer = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            let last = matches!(f, Frame::Exit(_) | Frame::Error(_));
            if wr.write_all(&f.encode()).await.is_err() {
                break;
            }
            if last {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let result = if req.tty {
        run_tty(&mut rd, &tx, &runtime, &req).await
    } else {
        run_pipes(&mut rd, &tx, &runtime, &req).await
    };
    let last = match result {
        Ok(code) => Frame::Exit(code),
        Err(message) => Frame::Error(message),
    };
    let _ = tx.send(last).await;
    drop(tx);
    let _ = writer.await;
}

/// Copies `src` into frames made by `frame` until end of file.
async fn pump(mut src: impl AsyncRead + Unpin, tx: mpsc::Sender<Frame>, frame: fn(Bytes) -> Frame) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match src.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .send(frame(Bytes::copy_from_slice(&buf[..n])))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    }
}

/// Newlines of a terminal exec's output, made what a terminal shows: `\r\n`, once.
///
/// The runtime clears ONLCR on the container's terminal when it receives it, while the
/// process may already be writing: what it wrote before comes as `\r\n`, what after as a
/// bare `\n` (about one exec in seven when four run at once, here). Its own copy to our
/// terminal then translates nothing (see [`open_pty`]), so every bare `\n` becomes `\r\n`
/// here, and one that already follows a `\r` stays as it is, even across reads.
#[derive(Debug, Default)]
struct Newlines {
    /// The last byte passed on was `\r`.
    after_cr: bool,
}

impl Newlines {
    fn apply(&mut self, input: &[u8]) -> Bytes {
        let mut out = Vec::with_capacity(input.len() + input.len() / 16);
        for &b in input {
            if b == b'\n' && !self.after_cr {
                out.push(b'\r');
            }
            out.push(b);
            self.after_cr = b == b'\r';
        }
        Bytes::from(out)
    }
}

/// [`pump`] for a terminal's output, its newlines made `\r\n` ([`Newlines`]).
async fn pump_terminal(mut src: impl AsyncRead + Unpin, tx: mpsc::Sender<Frame>) {
    let mut buf = vec![0u8; 32 * 1024];
    let mut newlines = Newlines::default();
    loop {
        match src.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .send(Frame::Stdout(newlines.apply(&buf[..n])))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    }
}

fn hang_up(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // The runtime's exec forwards signals to the process it started.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        );
    }
}

/// The client's next frame; None once the client is gone (or sent nonsense): the caller
/// hangs up on the process then.
async fn next_frame<R: AsyncRead + Unpin>(rd: &mut R) -> Option<Frame> {
    read_frame(rd).await.ok().flatten()
}

/// The exit code of `child`, feeding it input meanwhile.
async fn wait(
    child: &mut tokio::process::Child,
    input: impl Future<Output = ()>,
) -> Result<i32, String> {
    let status = tokio::select! {
        s = child.wait() => s,
        () = input => child.wait().await,
    }
    .map_err(|e| format!("wait for exec: {e}"))?;
    Ok(exit_code(status))
}

async fn run_pipes<R: AsyncRead + Unpin>(
    rd: &mut R,
    tx: &mpsc::Sender<Frame>,
    runtime: &OciRuntime,
    req: &ExecRequest,
) -> Result<i32, String> {
    let mut cmd =
        tokio::process::Command::from(runtime.exec_command(&req.container, &req.command, false));
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("start {}: {e}", runtime.binary.display()))?;
    let pid = child.id();
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        hang_up(pid);
        return Err("exec: the process has no output pipes".into());
    };
    let out = tokio::spawn(pump(stdout, tx.clone(), Frame::Stdout));
    let err = tokio::spawn(pump(stderr, tx.clone(), Frame::Stderr));
    let mut stdin = child.stdin.take();
    let input = async {
        loop {
            let Some(f) = next_frame(rd).await else {
                hang_up(pid);
                break;
            };
            match f {
                Frame::Stdin(b) => {
                    if let Some(s) = stdin.as_mut()
                        && s.write_all(&b).await.is_err()
                    {
                        stdin = None;
                    }
                }
                Frame::StdinEof => stdin = None,
                _ => {}
            }
        }
    };
    let code = wait(&mut child, input).await?;
    let _ = out.await;
    let _ = err.await;
    Ok(code)
}

/// The size a terminal starts with, until the client sends its own: (columns, rows).
const INITIAL_SIZE: (u16, u16) = (80, 24);

/// An exec's process spec file, removed when dropped.
struct ProcessFile(PathBuf);

impl Drop for ProcessFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes the OCI process spec of a terminal exec beside the container's bundle: the
/// container's own process (user, environment, working directory, capabilities, limits:
/// what the runtime's `exec ARGS` starts from too) running `command`, on a terminal of
/// `cols` × `rows` from the start. Without the size the process may start on a 0×0 terminal
/// (the runtime sizes it only once the process runs), and one that asks at once fails:
/// busybox `stty size` said `standard input: No child processes`, a stale errno after a
/// successful ioctl that answered 0 rows.
fn process_file(req: &ExecRequest, cols: u16, rows: u16) -> Result<ProcessFile, String> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let config = req.bundle.join("config.json");
    let spec: serde_json::Value = std::fs::read(&config)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| format!("read {}: {e}", config.display()))?;
    let mut process = match spec.get("process") {
        Some(p @ serde_json::Value::Object(_)) => p.clone(),
        _ => return Err(format!("{}: no process", config.display())),
    };
    process["args"] = serde_json::json!(req.command);
    process["terminal"] = true.into();
    process["consoleSize"] = serde_json::json!({ "height": rows, "width": cols });
    let dir = req.bundle.parent().unwrap_or(&req.bundle);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("exec-{}-{n}.json", std::process::id()));
    std::fs::write(&path, process.to_string())
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok(ProcessFile(path))
}

async fn run_tty<R: AsyncRead + Unpin>(
    rd: &mut R,
    tx: &mpsc::Sender<Frame>,
    runtime: &OciRuntime,
    req: &ExecRequest,
) -> Result<i32, String> {
    let (cols, rows) = INITIAL_SIZE;
    // Kept until the process has exited (the runtime reads it as it starts).
    let process = process_file(req, cols, rows)?;
    let (mut child, master, hang_up) = match runtime.kind {
        RuntimeKind::Runc => on_our_terminal(runtime, req, &process.0, cols, rows)?,
        RuntimeKind::Crun => on_its_terminal(runtime, req, &process.0, cols, rows).await?,
    };
    let master_w = master.try_clone().map_err(|e| format!("terminal: {e}"))?;
    let reader = tokio::fs::File::from_std(std::fs::File::from(master));
    let mut writer = tokio::fs::File::from_std(std::fs::File::from(master_w));
    let out = tokio::spawn(pump_terminal(reader, tx.clone()));
    let input = async {
        loop {
            let Some(f) = next_frame(rd).await else {
                hang_up.send(&writer);
                break;
            };
            match f {
                Frame::Stdin(b) => {
                    let _ = writer.write_all(&b).await;
                }
                // End of input on a terminal is its EOF character (^D).
                Frame::StdinEof => {
                    let _ = writer.write_all(&[4]).await;
                }
                Frame::Resize { cols, rows } => {
                    use std::os::fd::AsFd;
                    let _ = rustix::termios::tcsetwinsize(writer.as_fd(), winsize(cols, rows));
                }
                _ => {}
            }
        }
    };
    let code = wait(&mut child, input).await?;
    drop(process);
    // The master reads EIO once nothing holds the slave any more; what was written before
    // is still delivered.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), out).await;
    Ok(code)
}

/// How a terminal exec is hung up on when its client goes away.
enum HangUp {
    /// SIGHUP to the runtime, which forwards it to the process (runc in the foreground).
    Runtime(Option<u32>),
    /// SIGHUP to the terminal's foreground process group, as a closed terminal does (the
    /// process's terminal is the one whose master we hold).
    Terminal,
}

impl HangUp {
    fn send(&self, master: &tokio::fs::File) {
        match self {
            HangUp::Runtime(pid) => hang_up(*pid),
            HangUp::Terminal => {
                use std::os::fd::AsFd;
                // Never a group of 1 (that would be every process): the container's are
                // never init's.
                if let Ok(pgrp) = rustix::termios::tcgetpgrp(master.as_fd())
                    && pgrp.as_raw_nonzero().get() > 1
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(-pgrp.as_raw_nonzero().get()),
                        nix::sys::signal::Signal::SIGHUP,
                    );
                }
            }
        }
    }
}

/// runc: the runtime runs in the foreground on a pseudo-terminal of ours (its controlling
/// terminal) and copies between it and the container's; a size set on ours reaches it as
/// SIGWINCH. Returns the runtime's process and our terminal's master.
fn on_our_terminal(
    runtime: &OciRuntime,
    req: &ExecRequest,
    process: &Path,
    cols: u16,
    rows: u16,
) -> Result<(tokio::process::Child, OwnedFd, HangUp), String> {
    let (master, slave) = open_pty(cols, rows).map_err(|e| format!("allocate a terminal: {e}"))?;
    let mut cmd = runtime.exec_process_command(&req.container, process);
    let stdio = |f: &OwnedFd| f.try_clone().map(Stdio::from);
    cmd.stdin(stdio(&slave).map_err(|e| e.to_string())?)
        .stdout(stdio(&slave).map_err(|e| e.to_string())?)
        .stderr(stdio(&slave).map_err(|e| e.to_string())?);
    // SAFETY: between fork and exec the child only makes async-signal-safe system calls
    // (setsid, ioctl) on descriptors it already holds; it allocates nothing.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            // Stdin (the slave) becomes the runtime's controlling terminal, so a size set on
            // the master reaches it as SIGWINCH and it resizes the container's terminal.
            rustix::process::ioctl_tiocsctty(std::io::stdin())?;
            Ok(())
        });
    }
    let child = tokio::process::Command::from(cmd)
        .spawn()
        .map_err(|e| format!("start {}: {e}", runtime.binary.display()))?;
    drop(slave);
    let pid = child.id();
    Ok((child, master, HangUp::Runtime(pid)))
}

/// Longest wait for the runtime to hand over the container's terminal.
const CONSOLE_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a terminal the runtime sent before it exited may take to be received.
const AFTER_EXIT: std::time::Duration = std::time::Duration::from_millis(500);

/// crun: the runtime hands the master of the terminal it made in the container to us over a
/// console socket and stays in the foreground until the process exits; we copy to and from
/// that master ourselves. (crun 1.8 copying itself, like runc, mixed its own red error lines
/// into the session under load.) Returns the runtime's process and the container
/// terminal's master.
async fn on_its_terminal(
    runtime: &OciRuntime,
    req: &ExecRequest,
    process: &Path,
    cols: u16,
    rows: u16,
) -> Result<(tokio::process::Child, OwnedFd, HangUp), String> {
    let socket = ConsoleSocket::bind(process)?;
    let mut cmd = runtime.exec_console_command(&req.container, process, &socket.path);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = tokio::process::Command::from(cmd)
        .spawn()
        .map_err(|e| format!("start {}: {e}", runtime.binary.display()))?;
    let stderr = child.stderr.take();
    let errors = tokio::spawn(async move {
        let mut text = String::new();
        if let Some(mut e) = stderr {
            let _ = e.read_to_string(&mut text).await;
        }
        text
    });
    // A short process may be done, and crun with it, before we took its terminal: what it
    // wrote waits in the terminal, and its connection in the socket's backlog.
    let received = tokio::select! {
        biased;
        m = socket.receive() => Some(m),
        _ = child.wait() => None,
        () = tokio::time::sleep(CONSOLE_WITHIN) => {
            let _ = child.kill().await;
            return Err(format!(
                "{} did not hand over the terminal within {CONSOLE_WITHIN:?}",
                runtime.binary.display()
            ));
        }
    };
    let received = match received {
        Some(m) => m,
        None => match tokio::time::timeout(AFTER_EXIT, socket.receive()).await {
            Ok(m) => m,
            Err(_) => {
                let status = child
                    .wait()
                    .await
                    .map_err(|e| format!("wait for exec: {e}"))?;
                let text = errors.await.unwrap_or_default();
                return Err(format!("exec failed ({status}): {}", text.trim()));
            }
        },
    };
    let master = match received {
        Ok(m) => m,
        Err(e) => {
            let _ = child.kill().await;
            return Err(e);
        }
    };
    // crun sizes it too, from the process spec, but only after the process may have
    // started: whichever comes first narrows the time it runs on a 0×0 terminal.
    let _ = rustix::termios::tcsetwinsize(&master, winsize(cols, rows));
    Ok((child, master, HangUp::Terminal))
}

/// A listening console socket beside an exec's process file, removed when dropped.
struct ConsoleSocket {
    path: PathBuf,
    listener: tokio::net::UnixListener,
}

impl ConsoleSocket {
    /// Binds `<process file>.sock`.
    fn bind(process: &Path) -> Result<Self, String> {
        let path = process.with_extension("sock");
        let listener = tokio::net::UnixListener::bind(&path)
            .map_err(|e| format!("console socket {}: {e}", path.display()))?;
        Ok(Self { path, listener })
    }

    /// The one descriptor the runtime sends (SCM_RIGHTS) on its connection.
    async fn receive(&self) -> Result<OwnedFd, String> {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        use std::os::fd::{AsRawFd, FromRawFd};
        let (stream, _) = self
            .listener
            .accept()
            .await
            .map_err(|e| format!("console socket: {e}"))?;
        loop {
            stream
                .readable()
                .await
                .map_err(|e| format!("console socket: {e}"))?;
            let got = stream.try_io(tokio::io::Interest::READABLE, || {
                let mut buf = [0u8; 256];
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
                let msg = recvmsg::<()>(
                    stream.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(std::io::Error::from)?;
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(std::io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(r) = c {
                        fds.extend(r);
                    }
                }
                Ok((msg.bytes, fds))
            });
            match got {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(format!("console socket: {e}")),
                Ok((_, fds)) => {
                    let mut fds = fds.into_iter().map(|fd| {
                        // SAFETY: the kernel just installed this descriptor in our table for
                        // this message (SCM_RIGHTS); nothing else owns it.
                        unsafe { OwnedFd::from_raw_fd(fd) }
                    });
                    return match (fds.next(), fds.next()) {
                        (Some(master), None) => Ok(master),
                        (None, _) => {
                            Err("the runtime closed the console socket without a terminal".into())
                        }
                        (Some(_), Some(_)) => Err(
                            "the runtime sent more than one descriptor on the console socket"
                                .into(),
                        ),
                    };
                }
            }
        }
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A new pseudo-terminal of `cols` × `rows`: (master, slave).
fn open_pty(cols: u16, rows: u16) -> std::io::Result<(OwnedFd, OwnedFd)> {
    use rustix::fs::{Mode, OFlags};
    use rustix::pty::OpenptFlags;
    let master =
        rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    // Raw: this terminal only carries bytes between the client and the container's own
    // terminal (which echoes and edits lines); it must not echo or translate them again.
    // Without ONLCR too: the runtime turns output processing (OPOST) back on when it takes
    // this terminal as its own (keeping the other output flags), and a newline the container's
    // terminal had already turned into `\r\n` came out as `\r\r\n` (see [`Newlines`]).
    let mut t = rustix::termios::tcgetattr(&slave)?;
    t.make_raw();
    t.output_modes.remove(rustix::termios::OutputModes::ONLCR);
    rustix::termios::tcsetattr(&slave, rustix::termios::OptionalActions::Now, &t)?;
    rustix::termios::tcsetwinsize(&master, winsize(cols, rows))?;
    Ok((master, slave))
}

fn winsize(cols: u16, rows: u16) -> rustix::termios::Winsize {
    rustix::termios::Winsize {
        ws_col: cols,
        ws_row: rows,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_newlines_become_crlf_once_even_across_reads() {
        let mut n = Newlines::default();
        assert_eq!(&n.apply(b"24 80\n")[..], b"24 80\r\n");
        assert_eq!(&n.apply(b"a\r\nb\n\n")[..], b"a\r\nb\r\n\r\n");
        // A `\r` at the end of one read, its `\n` at the start of the next.
        assert_eq!(&n.apply(b"c\r")[..], b"c\r");
        assert_eq!(&n.apply(b"\nd")[..], b"\nd");
        assert_eq!(&n.apply(b"\n")[..], b"\r\n");
        // Carriage returns alone (a progress line) pass as they are.
        assert_eq!(&n.apply(b"50%\r60%\r")[..], b"50%\r60%\r");
        assert_eq!(&n.apply(b"")[..], b"");
    }
}
