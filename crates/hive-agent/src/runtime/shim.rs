//! The per-container supervisor ("shim"), like conmon or a containerd shim.
//!
//! `hive shim CONFIG` (or `hive shim -`, the configuration on stdin: see [`FROM_STDIN`])
//! forks: the child starts the container (one `runtime run --detach`: set up and started in
//! one call) and answers `ok <pid>` on the standard output it was started with; the parent
//! waits for the outcome and exits with it (an error's message on its standard error), so
//! the agent gets an answer and never has the long-lived process as its child. The child
//! detaches (new session), becomes the child subreaper (so the container's init, once its
//! runtime process exits, is re-parented to it), holds the container's stdout and stderr
//! pipes and copies them into the size-capped log, waits for the init to exit, and records
//! how it ended in `exit.json`.
//! Restarting or upgrading the agent therefore never touches a running container.
//!
//! This must run before any other thread exists in the process (it forks): the `hive`
//! binary dispatches `hive shim` before it starts its async runtime.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, pipe, setsid};
use serde::{Deserialize, Serialize};

use super::logs::{self, LogWriter, Stream};
use super::oci::{CreateIo, OciRuntime, RuntimeKind};

/// What the agent passes to `hive shim` (as one JSON argument).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShimConfig {
    pub id: String,
    pub bundle: PathBuf,
    /// This container's state directory (`started.json`, `exit.json`, logs unless
    /// `log_dir` is given).
    pub state_dir: PathBuf,
    /// Where its logs go (made at the first line it writes); none: its state directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_dir: Option<PathBuf>,
    pub runtime_kind: String,
    pub runtime_binary: PathBuf,
    pub runtime_root: PathBuf,
    /// The container's cgroup path (to tell an OOM kill from other deaths).
    pub cgroups_path: PathBuf,
    pub log_max_bytes: u64,
    pub log_keep: usize,
}

/// Written once the container runs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Started {
    pub pid: i32,
    pub shim_pid: i32,
    pub started_at: DateTime<Utc>,
}

/// Written when the container's init has exited.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Exited {
    /// The exit code, or 128 + the signal that killed it.
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default)]
    pub oom_killed: bool,
    pub finished_at: DateTime<Utc>,
}

pub const STARTED: &str = "started.json";
pub const EXITED: &str = "exit.json";
pub const LOG: &str = "container.log";
pub const RUNTIME_LOG: &str = "runtime.log";
pub const PID_FILE: &str = "container.pid";

/// Writes `value` as JSON to `dir/name` atomically (temp file, rename; fsynced when
/// `durable`). The start record is not fsynced: it only has to outlive the agent, not the
/// machine (after a power loss no container runs and the record is moot), and an fsync costs
/// every start milliseconds. The exit record is.
pub fn write_json<T: Serialize>(
    dir: &Path,
    name: &str,
    value: &T,
    durable: bool,
) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(value).map_err(std::io::Error::other)?)?;
    if durable {
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))
}

pub fn read_json<T: for<'de> Deserialize<'de>>(dir: &Path, name: &str) -> Option<T> {
    serde_json::from_slice(&fs::read(dir.join(name)).ok()?).ok()
}

/// The argument that makes `hive shim` read its configuration from standard input: the
/// agent spawns a supervisor ahead of the container it will start, so the program's start
/// (loading and relocating the `hive` binary, ~2 ms) is off the start's critical path, and
/// hands it the configuration when the container is to start.
pub const FROM_STDIN: &str = "-";

/// The `hive shim` entry point: `hive shim CONFIG`, or `hive shim - [RUNTIME]` with the
/// configuration on standard input (and, while it waits, `RUNTIME`'s program copied into a
/// sealed memfd to start the container from: see [`sealed_copy`]). Returns the process exit
/// code (of the parent: 0 when the container started; the child never returns from
/// supervision but by exiting). A spare whose standard input ends without a configuration
/// (its agent stopped or dropped it) exits with 0 and does nothing.
///
/// The supervisor (the child, in a session of its own and a subreaper, at niceness 0 however
/// niced its spare was started) is forked before the configuration is read: a spare has it
/// waiting, and a start pays neither the fork nor the rest of the setup. The parent only
/// relays the child's answer and exits.
pub fn main(arg: &str, runtime: Option<&Path>) -> i32 {
    // Made before the wait, off the start's path. Without it the runtime copies itself.
    let sealed = runtime.and_then(|r| sealed_copy(r).ok().map(|fd| (r.to_owned(), fd)));
    let (sync_r, sync_w) = match pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("shim: pipe: {e}");
            return 1;
        }
    };
    // SAFETY: `hive shim` runs before any other thread is started in this process (the binary
    // dispatches it before building its async runtime), so the child may run arbitrary code.
    match unsafe { fork() } {
        Err(e) => {
            eprintln!("shim: fork: {e}");
            1
        }
        Ok(ForkResult::Parent { .. }) => {
            drop(sync_w);
            let mut answer = String::new();
            let _ = File::from(sync_r).read_to_string(&mut answer);
            let answer = answer.trim();
            // The supervisor told the agent itself.
            if answer.starts_with("ok ") || answer == NO_CONFIG {
                0
            } else if answer.is_empty() {
                eprintln!("shim: the supervisor died before reporting");
                1
            } else {
                eprintln!("{answer}");
                1
            }
        }
        Ok(ForkResult::Child) => {
            drop(sync_r);
            let code = child(arg, sync_w, sealed);
            std::process::exit(code)
        }
    }
}

/// What the supervisor answers when its standard input ended without a configuration.
const NO_CONFIG: &str = "no configuration";

/// The supervisor: becomes one (own session, subreaper), then reads its configuration and
/// starts and supervises the container.
fn child(arg: &str, sync_w: OwnedFd, sealed: Option<(PathBuf, OwnedFd)>) -> i32 {
    let mut answer = Answer {
        parent: Some(File::from(sync_w)),
        agent: None,
    };
    // Close-on-exec: neither the runtime nor the container may hold the agent's pipe.
    match rustix::io::fcntl_dupfd_cloexec(std::io::stdout(), 3) {
        Ok(fd) => answer.agent = Some(File::from(fd)),
        Err(e) => {
            report(&mut answer, &format!("shim: copy the standard output: {e}"));
            return 1;
        }
    }
    // A spare's program started niced, off the CPUs a container's start needs; the
    // supervisor waits, starts its container and supervises it at niceness 0.
    if let Err(e) = rustix::process::setpriority_process(None, 0) {
        report(&mut answer, &format!("shim: reset its niceness: {e}"));
        return 1;
    }
    // Own session: a signal to the agent's process group never reaches the supervisor.
    let _ = setsid();
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes an integer argument and touches no memory.
    if unsafe { nix::libc::prctl(nix::libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        report(&mut answer, "shim: cannot become a subreaper");
        return 1;
    }
    let mut read = String::new();
    let config_json = if arg == FROM_STDIN {
        if let Err(e) = std::io::stdin().read_to_string(&mut read) {
            report(
                &mut answer,
                &format!("shim: read the config from stdin: {e}"),
            );
            return 2;
        }
        if read.is_empty() {
            report(&mut answer, NO_CONFIG);
            return 0;
        }
        read.as_str()
    } else {
        arg
    };
    let cfg: ShimConfig = match serde_json::from_str(config_json) {
        Ok(c) => c,
        Err(e) => {
            report(&mut answer, &format!("shim: bad config: {e}"));
            return 2;
        }
    };
    // In its container's directory: where `is_supervisor_of` finds it (its command line
    // names no container when the configuration came on stdin). A directory gone already
    // (the node was torn down meanwhile) is no container to start.
    if let Err(e) = std::env::set_current_dir(&cfg.state_dir) {
        report(
            &mut answer,
            &format!("shim {}: enter {}: {e}", cfg.id, cfg.state_dir.display()),
        );
        return 1;
    }
    // Only a copy of the program this configuration names.
    let sealed = sealed.and_then(|(r, fd)| (r == cfg.runtime_binary).then_some(fd));
    supervise(&cfg, answer, sealed)
}

/// Where the supervisor answers: the agent's pipe (a copy of the standard output it was
/// started with, kept past [`detach_stdio`]) gets a start's `ok <pid>` line straight, one
/// process wakeup sooner than through the parent; the parent gets every outcome and exits
/// with it.
struct Answer {
    parent: Option<File>,
    agent: Option<File>,
}

/// Answers `msg` (`ok <pid>\n` for a start, else why not) once; later calls do nothing.
/// The agent's copy is closed either way: after a failure the agent reads the end of it, and
/// then what the parent says.
fn report(answer: &mut Answer, msg: &str) {
    if let Some(mut f) = answer.agent.take()
        && msg.starts_with("ok ")
    {
        let _ = f.write_all(msg.as_bytes());
    }
    if let Some(mut f) = answer.parent.take() {
        let _ = f.write_all(msg.as_bytes());
    }
}

fn detach_stdio() {
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors with a valid open fd; no Rust object
            // owns fds 0-2 exclusively.
            unsafe {
                libc_dup2(null.as_raw_fd(), fd);
            }
        }
    }
}

/// `dup2` without pulling in another crate: nix's safe wrapper wants owned fds for 0-2.
unsafe fn libc_dup2(from: i32, to: i32) {
    // SAFETY: the caller passes valid descriptors; dup2 has no memory-safety preconditions.
    unsafe {
        nix::libc::dup2(from, to);
    }
}

fn supervise(cfg: &ShimConfig, mut answer: Answer, sealed: Option<OwnedFd>) -> i32 {
    detach_stdio();
    let fail = |answer: &mut Answer, msg: String| {
        report(answer, &msg);
        1
    };
    let kind: RuntimeKind = match cfg.runtime_kind.parse() {
        Ok(k) => k,
        Err(e) => return fail(&mut answer, format!("shim {}: {e}", cfg.id)),
    };
    let runtime = OciRuntime::new(kind, &cfg.runtime_binary, &cfg.runtime_root);
    let dir = &cfg.state_dir;
    // Opened at the first line the container writes: a start makes no file on the logs'
    // file system (many containers never write one).
    let log_dir = cfg.log_dir.as_deref().unwrap_or(dir);
    let writer = Arc::new(Mutex::new(LogWriter::new(
        &log_dir.join(LOG),
        cfg.log_max_bytes,
        cfg.log_keep,
    )));
    let (out_r, out_w) = match pipe() {
        Ok(p) => p,
        Err(e) => return fail(&mut answer, format!("shim {}: pipe: {e}", cfg.id)),
    };
    let (err_r, err_w) = match pipe() {
        Ok(p) => p,
        Err(e) => return fail(&mut answer, format!("shim {}: pipe: {e}", cfg.id)),
    };
    let pid_file = dir.join(PID_FILE);
    let io = CreateIo {
        stdout: Stdio::from(out_w),
        stderr: Stdio::from(err_w),
    };
    // Copying starts before the process runs so nothing it writes early is lost.
    let copiers: Vec<_> = [(out_r, Stream::Stdout), (err_r, Stream::Stderr)]
        .into_iter()
        .map(|(fd, stream)| {
            let w = writer.clone();
            std::thread::spawn(move || {
                let _ = logs::copy(File::from(fd), stream, &w);
            })
        })
        .collect();
    // Set up and started in one runtime call; `io` is the runtime's and the container's
    // only copy of the pipes' write ends, so the copiers end when the container's last
    // process does. From the sealed copy of the runtime if one was made (dropped right
    // after: it costs the program's size in memory while held).
    let run = match &sealed {
        Some(fd) => OciRuntime {
            binary: format!("/proc/self/fd/{}", fd.as_raw_fd()).into(),
            ..runtime.clone()
        },
        None => runtime.clone(),
    };
    let ran = run.run_detached(&cfg.id, &cfg.bundle, &pid_file, io, &dir.join(RUNTIME_LOG));
    drop(sealed);
    if let Err(e) = ran {
        let _ = runtime.delete(&cfg.id, true);
        return fail(&mut answer, e.to_string());
    }
    let pid: i32 = match fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        Some(p) => p,
        None => {
            let _ = runtime.kill(&cfg.id, "KILL", true);
            let _ = runtime.delete(&cfg.id, true);
            return fail(
                &mut answer,
                format!("shim {}: no pid in {}", cfg.id, pid_file.display()),
            );
        }
    };
    let started = Started {
        pid,
        shim_pid: std::process::id() as i32,
        started_at: Utc::now(),
    };
    if let Err(e) = write_json(dir, STARTED, &started, false) {
        let _ = runtime.kill(&cfg.id, "KILL", true);
        return fail(
            &mut answer,
            format!("shim {}: write {STARTED}: {e}", cfg.id),
        );
    }
    report(&mut answer, &format!("ok {pid}\n"));

    let (exit_code, signal) = wait_for(Pid::from_raw(pid));
    // The log pipes close when the last process holding them is gone; do not hang on a
    // straggler that escaped (it cannot: the pid namespace died with its init).
    for c in copiers {
        let _ = c.join();
    }
    let exited = Exited {
        exit_code,
        signal,
        oom_killed: oom_killed(&cfg.cgroups_path),
        finished_at: Utc::now(),
    };
    match write_json(dir, EXITED, &exited, true) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// The seals crun and runc look for on their own executable: with exactly these, a runtime
/// knows it runs from a copy nothing can write and does not make one.
const RUNTIME_SEALS: rustix::fs::SealFlags = rustix::fs::SealFlags::SEAL
    .union(rustix::fs::SealFlags::SHRINK)
    .union(rustix::fs::SealFlags::GROW)
    .union(rustix::fs::SealFlags::WRITE);

/// A sealed in-memory copy of the runtime's program, to execute instead of the file.
///
/// crun and runc never run a container from their binary on disk, which the container could
/// overwrite through `/proc/self/exe` (CVE-2019-5736): each `run` first makes a read-only
/// copy of itself (a bind mount and unmount, or a sealed memfd) and executes that again, a
/// second program start with its dynamic linking (~1.5 ms of a start here). Started from a
/// sealed memfd they skip it. The protection is the same (a sealed memfd cannot be written,
/// and the file on disk is not what runs); the copy costs one `sendfile` of the binary.
pub fn sealed_copy(binary: &Path) -> std::io::Result<OwnedFd> {
    use rustix::fs::MemfdFlags;
    let mut src = File::open(binary)?;
    let fd = rustix::fs::memfd_create(
        "hive-runtime",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    let mut copy = File::from(fd);
    let len = src.metadata()?.len();
    if std::io::copy(&mut src, &mut copy)? != len {
        return Err(std::io::Error::other(format!(
            "{}: changed while copied",
            binary.display()
        )));
    }
    rustix::fs::fcntl_add_seals(&copy, RUNTIME_SEALS)?;
    Ok(copy.into())
}

/// Reaps children until `pid` exits; its exit code (128 + signal when killed).
fn wait_for(pid: Pid) -> (i32, Option<i32>) {
    loop {
        match waitpid(None, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(p, code)) if p == pid => return (code, None),
            Ok(WaitStatus::Signaled(p, sig, _)) if p == pid => {
                return (128 + sig as i32, Some(sig as i32));
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            // No children left and we never saw it: it was reaped elsewhere or never ours.
            Err(_) => {
                if nix::sys::signal::kill(pid, None).is_err() {
                    return (-1, None);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Whether the memory cgroup recorded an OOM kill (cgroup v1 `memory.oom_control`).
fn oom_killed(cgroups_path: &Path) -> bool {
    let rel = cgroups_path.strip_prefix("/").unwrap_or(cgroups_path);
    let file = Path::new("/sys/fs/cgroup/memory")
        .join(rel)
        .join("memory.oom_control");
    fs::read_to_string(file)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .is_some_and(|n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The copy is the program, sealed exactly as the runtimes check, unwritable, and runs
    /// from its `/proc/self/fd` path (as the supervisor starts the runtime).
    #[test]
    fn the_sealed_copy_is_the_program_sealed_and_it_runs() {
        let program = Path::new("/bin/true");
        let fd = sealed_copy(program).expect("copy");
        assert_eq!(
            rustix::fs::fcntl_get_seals(&fd).expect("seals"),
            RUNTIME_SEALS
        );
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        assert_eq!(fs::read(&path).unwrap(), fs::read(program).unwrap());
        let mut f = File::from(fd.try_clone().unwrap());
        assert!(f.write_all(b"x").is_err(), "a sealed copy took a write");
        let status = std::process::Command::new(&path).status().expect("run");
        assert!(status.success(), "{status:?}");
        assert!(sealed_copy(Path::new("/nonexistent/runtime")).is_err());
    }
}
