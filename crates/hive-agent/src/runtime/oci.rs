//! Driving an OCI runtime binary (runc, or crun) through its command line: run (detached),
//! kill, exec, delete, state. Synchronous on purpose: the per-container supervisor (a small
//! single-threaded process) uses it, and the agent calls it from blocking tasks.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Which runtime, and where it keeps its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OciRuntime {
    pub kind: RuntimeKind,
    pub binary: PathBuf,
    /// The runtime's `--root` (its own state directory).
    pub root: PathBuf,
    /// Longest any one runtime call may take before it is killed and reported.
    pub timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// runc: works on these hosts' hybrid cgroup layout as is.
    Runc,
    /// crun: refuses the hybrid layout unless the cgroup2 mount is hidden, so every call runs
    /// in a private mount namespace with `/sys/fs/cgroup/unified` unmounted ([`hide_cgroup2`]).
    Crun,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Runc => "runc",
            RuntimeKind::Crun => "crun",
        }
    }
}

impl std::str::FromStr for RuntimeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "runc" => Ok(RuntimeKind::Runc),
            "crun" => Ok(RuntimeKind::Crun),
            other => Err(format!(
                "unknown OCI runtime kind {other:?}: expected runc or crun"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{op} container {id}: start {binary}: {source}")]
    Spawn {
        op: &'static str,
        id: String,
        binary: String,
        source: std::io::Error,
    },
    #[error("{op} container {id}: {binary} failed ({status}): {message}")]
    Failed {
        op: &'static str,
        id: String,
        binary: String,
        status: String,
        message: String,
    },
    #[error("{op} container {id}: {binary} did not finish within {timeout:?} (killed)")]
    Timeout {
        op: &'static str,
        id: String,
        binary: String,
        timeout: Duration,
    },
    #[error("state of container {id}: unreadable output: {message}")]
    BadState { id: String, message: String },
}

/// `name` found in a directory of `PATH` (an executable file), or `name` as given when it
/// is a path already or found nowhere.
fn in_path(name: PathBuf) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    if name.components().count() != 1 || name.is_absolute() {
        return name;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(&name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or(name)
}

/// What `runtime state` says.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct RuntimeState {
    pub id: String,
    /// created, running, stopped, paused.
    pub status: String,
    #[serde(default)]
    pub pid: i64,
}

/// Standard streams of a container's process.
#[derive(Debug)]
pub struct CreateIo {
    pub stdout: Stdio,
    pub stderr: Stdio,
}

impl OciRuntime {
    /// A runtime by `binary`: a path, or a name looked up in `PATH` once, here (left as it
    /// is when not found, so the first call names it in its error). Each call then starts
    /// the program directly, not after trying every directory of `PATH` in turn.
    pub fn new(kind: RuntimeKind, binary: impl Into<PathBuf>, root: impl Into<PathBuf>) -> Self {
        Self {
            kind,
            binary: in_path(binary.into()),
            root: root.into(),
            timeout: Duration::from_secs(30),
        }
    }

    fn command(&self, log: Option<&Path>) -> Command {
        let mut c = Command::new(&self.binary);
        if self.kind == RuntimeKind::Crun {
            hide_cgroup2(&mut c);
        }
        c.arg("--root").arg(&self.root);
        if let Some(log) = log {
            c.arg("--log").arg(log).arg("--log-format").arg("json");
        }
        c.stdin(Stdio::null());
        c
    }

    fn binary_name(&self) -> String {
        self.binary.display().to_string()
    }

    /// Waits for `child` until the timeout, killing it past that. Woken by the child's pidfd
    /// the moment it exits (a start waits for `run` on its critical path; polling every
    /// millisecond cost half of one on average).
    fn wait(&self, op: &'static str, id: &str, child: &mut Child) -> Result<ExitStatus, OciError> {
        let deadline = Instant::now() + self.timeout;
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_child(child),
            rustix::process::PidfdFlags::empty(),
        )
        .ok();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(OciError::Timeout {
                        op,
                        id: id.to_owned(),
                        binary: self.binary_name(),
                        timeout: self.timeout,
                    });
                }
                Ok(None) => match &pidfd {
                    Some(fd) => {
                        use rustix::event::{PollFd, PollFlags, Timespec, poll};
                        let left = deadline.saturating_duration_since(Instant::now());
                        let left = Timespec::try_from(left).unwrap_or(Timespec {
                            tv_sec: 1,
                            tv_nsec: 0,
                        });
                        // Readable once the child has exited; EINTR and the rest loop.
                        let _ = poll(&mut [PollFd::new(fd, PollFlags::IN)], Some(&left));
                    }
                    None => std::thread::sleep(Duration::from_millis(1)),
                },
                Err(source) => {
                    return Err(OciError::Spawn {
                        op,
                        id: id.to_owned(),
                        binary: self.binary_name(),
                        source,
                    });
                }
            }
        }
    }

    fn spawn(&self, op: &'static str, id: &str, c: &mut Command) -> Result<Child, OciError> {
        c.spawn().map_err(|source| OciError::Spawn {
            op,
            id: id.to_owned(),
            binary: self.binary_name(),
            source,
        })
    }

    fn failed(&self, op: &'static str, id: &str, status: ExitStatus, message: String) -> OciError {
        OciError::Failed {
            op,
            id: id.to_owned(),
            binary: self.binary_name(),
            status: status.to_string(),
            message: message.trim().replace('\n', " "),
        }
    }

    /// Runs `c` to completion within the timeout; Ok(stdout) on success, its stderr in the
    /// error otherwise. Both streams are drained by threads so a chatty runtime never blocks.
    fn run(&self, op: &'static str, id: &str, mut c: Command) -> Result<Vec<u8>, OciError> {
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = self.spawn(op, id, &mut c)?;
        let drain = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out = drain(
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let err = drain(
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let status = self.wait(op, id, &mut child)?;
        let out = out.join().unwrap_or_default();
        let err = err.join().unwrap_or_default();
        if status.success() {
            Ok(out)
        } else {
            Err(self.failed(op, id, status, String::from_utf8_lossy(&err).into_owned()))
        }
    }

    /// `run --detach`: sets the container up (namespaces, cgroup, mounts) and starts its
    /// process in one call, writing the init's pid to `pid_file` and returning once it runs;
    /// the init is then re-parented to the caller's subreaper. One runtime program start
    /// instead of two (`create`, then `start`). The container's stdout and stderr are `io`;
    /// the runtime's own messages go to `log` (JSON lines).
    pub fn run_detached(
        &self,
        id: &str,
        bundle: &Path,
        pid_file: &Path,
        io: CreateIo,
        log: &Path,
    ) -> Result<(), OciError> {
        let mut c = self.command(Some(log));
        c.arg("run")
            .arg("--detach")
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(pid_file)
            .arg(id);
        c.stdout(io.stdout).stderr(io.stderr);
        let mut child = self.spawn("run", id, &mut c)?;
        let status = self.wait("run", id, &mut child)?;
        if status.success() {
            Ok(())
        } else {
            let message =
                last_log_error(log).unwrap_or_else(|| "no message in the runtime log".into());
            Err(self.failed("run", id, status, message))
        }
    }

    /// Sends `signal` (a name like `TERM` or a number) to the container's init (or, with
    /// `all`, every process in it).
    pub fn kill(&self, id: &str, signal: &str, all: bool) -> Result<(), OciError> {
        let mut c = self.command(None);
        c.arg("kill");
        if all {
            c.arg("--all");
        }
        c.arg(id).arg(signal);
        self.run("kill", id, c).map(drop)
    }

    /// The command that runs `args` inside the running container, in the foreground: its
    /// stdio are the process's (with `tty`, the runtime's stdin must be a terminal it can
    /// mirror into the container's), its exit status the process's.
    pub fn exec_command(&self, id: &str, args: &[String], tty: bool) -> Command {
        let mut c = self.command(None);
        c.arg("exec");
        if tty {
            c.arg("--tty");
        }
        c.arg(id).args(args);
        c
    }

    /// [`Self::exec_command`] for a process described by an OCI process spec file
    /// (`--process`): what a terminal process needs, as its size from the start.
    pub fn exec_process_command(&self, id: &str, process: &Path) -> Command {
        let mut c = self.command(None);
        c.arg("exec").arg("--process").arg(process).arg(id);
        c
    }

    /// [`Self::exec_process_command`] that hands the terminal it makes for the process (its
    /// master) to whoever listens on `socket` (`--console-socket`), still in the foreground:
    /// the command's exit status is the process's. crun only: runc takes a console socket
    /// only when it detaches.
    pub fn exec_console_command(&self, id: &str, process: &Path, socket: &Path) -> Command {
        let mut c = self.command(None);
        c.arg("exec")
            .arg("--process")
            .arg(process)
            .arg("--console-socket")
            .arg(socket)
            .arg(id);
        c
    }

    /// Removes the container (its cgroup and runtime state). `force` kills it first.
    pub fn delete(&self, id: &str, force: bool) -> Result<(), OciError> {
        let mut c = self.command(None);
        c.arg("delete");
        if force {
            c.arg("--force");
        }
        c.arg(id);
        self.run("delete", id, c).map(drop)
    }

    /// The runtime's view of the container; None if it does not know it.
    pub fn state(&self, id: &str) -> Result<Option<RuntimeState>, OciError> {
        if !self.root.join(id).exists() {
            return Ok(None);
        }
        let mut c = self.command(None);
        c.arg("state").arg(id);
        match self.run("state", id, c) {
            Ok(out) => serde_json::from_slice(&out)
                .map(Some)
                .map_err(|e| OciError::BadState {
                    id: id.to_owned(),
                    message: e.to_string(),
                }),
            Err(OciError::Failed { message, .. })
                if message.contains("does not exist") || message.contains("not exist") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// Where the hybrid hosts mount their cgroup2 hierarchy, which crun must not see.
const UNIFIED: &std::ffi::CStr = c"/sys/fs/cgroup/unified";

/// Makes `cmd` run in a mount namespace of its own in which the cgroup2 mount of a hybrid
/// layout is hidden: crun 1.8 refuses that layout, and manages the v1 hierarchies once the
/// unified mount is out of sight. The child does it between fork and exec (unshare, make
/// every mount private so nothing propagates back, lazy unmount), which costs a fraction of a
/// millisecond, where the `unshare -m … sh -c 'umount …; exec crun …'` wrapper it replaces
/// cost two more program starts (~7 ms under load) on every call. On a host without that
/// mount the unmount fails and is ignored: crun then sees what the host has.
pub fn hide_cgroup2(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only makes the unshare,
    // mount and umount2 system calls with static C strings and null pointers: nothing is
    // allocated or locked, so it is async-signal-safe even when the parent has threads.
    unsafe {
        cmd.pre_exec(|| {
            use nix::libc;
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            libc::umount2(UNIFIED.as_ptr(), libc::MNT_DETACH);
            Ok(())
        });
    }
}

/// The last error message a runtime wrote to its JSON log.
fn last_log_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().rev().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        let level = v.get("level").and_then(|x| x.as_str()).unwrap_or("");
        (level == "error" || level == "fatal").then(|| {
            v.get("msg")
                .and_then(|m| m.as_str())
                .unwrap_or("")
                .to_owned()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtime_name_is_looked_up_in_path_once() {
        let sh = in_path("sh".into());
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        for as_given in ["./runc", "/opt/crun", "no-such-runtime-here"] {
            assert_eq!(in_path(as_given.into()), PathBuf::from(as_given));
        }
        let rt = OciRuntime::new(RuntimeKind::Runc, "sh", "/nonexistent");
        assert_eq!(rt.binary, sh);
    }
}
