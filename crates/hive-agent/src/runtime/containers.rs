//! The agent's side of running containers: write a bundle, start its supervisor, read how it
//! is doing, stop it with a grace period, remove it. All state lives on disk under the
//! containers root, so a restarted agent finds every container again ([`Containers::list`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::cgroups;
use super::oci::{OciError, OciRuntime, RuntimeKind};
use super::shim::{self, Exited, ShimConfig, Started};

/// How to run `hive shim` (the agent passes the path of its own binary).
#[derive(Clone, Debug)]
pub struct ShimCommand {
    pub program: PathBuf,
    /// Arguments before the config, e.g. `["shim"]`.
    pub args: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("container {id}: {op} {path}: {source}")]
    Io {
        id: String,
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("container {id}: {message}")]
    Start { id: String, message: String },
    #[error("container {id}: the supervisor did not answer within {0:?}", .timeout)]
    ShimTimeout { id: String, timeout: Duration },
    #[error(transparent)]
    Runtime(#[from] OciError),
    #[error("container {id}: did not exit within {waited:?} of SIGKILL")]
    Unkillable { id: String, waited: Duration },
    #[error("container {id}: invalid id (1 to 64 of a-z, 0-9, '-', '_', '.')")]
    BadId { id: String },
}

/// What a container is doing, from its supervisor's records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContainerState {
    /// Running, supervised.
    Running(Started),
    /// Exited; `started` is None when it never ran.
    Exited {
        started: Option<Started>,
        exit: Exited,
    },
    /// Records say it started but neither it nor its supervisor is alive and no exit was
    /// recorded (the host rebooted, or someone killed the supervisor).
    Lost(Started),
    /// Nothing recorded.
    Unknown,
}

/// The file in a container's directory that says which runtime made it.
const RUNTIME_RECORD: &str = "runtime.json";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuntimeRecord {
    kind: RuntimeKind,
    binary: PathBuf,
    root: PathBuf,
}

/// The runtime that made container `id` (directory `dir`): recorded there at its start (the
/// node's runtime, `node`, may have changed since, and one runtime cannot stop another's
/// containers). A container made before runtimes were recorded is told by the state its
/// runtime keeps under the node's runtime root (runc's `state.json`, crun's `status`); one
/// with neither gets `node`.
pub fn runtime_of_container(dir: &Path, id: &str, node: &OciRuntime) -> OciRuntime {
    if let Some(r) = shim::read_json::<RuntimeRecord>(dir, RUNTIME_RECORD) {
        let mut rt = OciRuntime::new(r.kind, r.binary, r.root);
        rt.timeout = node.timeout;
        return rt;
    }
    let state = node.root.join(id);
    let kind = if state.join("state.json").exists() {
        RuntimeKind::Runc
    } else if state.join("status").exists() {
        RuntimeKind::Crun
    } else {
        return node.clone();
    };
    if kind == node.kind {
        return node.clone();
    }
    let mut rt = OciRuntime::new(kind, kind.as_str(), &node.root);
    rt.timeout = node.timeout;
    rt
}

/// All containers of one node.
#[derive(Clone, Debug)]
pub struct Containers {
    pub runtime: OciRuntime,
    pub shim: ShimCommand,
    /// One directory per container: bundle, supervisor records (and its logs, unless
    /// [`Containers::with_logs`] put them elsewhere).
    pub root: PathBuf,
    /// One directory per container for its logs (`root` unless set apart).
    logs: PathBuf,
    pub log_max_bytes: u64,
    pub log_keep: usize,
    pub start_timeout: Duration,
    /// Starts hold it shared while the runtime makes cgroups; removals hold it alone while
    /// they prune empty parent cgroups, so a prune never takes a parent from under a start.
    parents: std::sync::Arc<tokio::sync::RwLock<()>>,
    /// A supervisor spawned ahead (`hive shim -`), waiting on its stdin for the next start's
    /// configuration; replaced after each start that takes it.
    spare: std::sync::Arc<std::sync::Mutex<Option<tokio::process::Child>>>,
}

/// The niceness a spare supervisor's program starts at: its start (loading the `hive`
/// binary, copying the runtime's, forking the supervisor) comes right after a container's,
/// while that start's status is reported, and must not take a CPU from that. The supervisor
/// it forks sets itself back to 0 before it waits for its configuration
/// ([`shim::main`]).
const SPARE_NICE: i32 = 19;

/// Sets `child`'s niceness. Best effort: a child gone already has nothing to slow down.
fn renice(child: &tokio::process::Child, nice: i32) {
    if let Some(pid) = child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32))
    {
        let _ = rustix::process::setpriority_process(Some(pid), nice);
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id != "."
        && id != ".."
        && id.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

/// Longest a [`Containers::wait`] waits on a process before it reads the container's records
/// again (a pid reused by another process after its end must not hold it for good).
pub(crate) const WAIT_RECHECK: Duration = Duration::from_millis(500);

/// Whether process `pid` lives: it exists and is no zombie (one is gone for every purpose
/// here; its parent reaps it).
pub(crate) fn alive(pid: i32) -> bool {
    if pid <= 0 || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
        return false;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
}

/// The process whose end tells that a running container `s` ended: its supervisor while it
/// lives (it records the exit before it ends), else its init.
pub(crate) fn watched_pid(s: &Started) -> i32 {
    if alive(s.shim_pid) { s.shim_pid } else { s.pid }
}

/// Returns once process `pid` has ended: at once if it cannot be watched (gone already).
/// A pidfd turns readable when its process ends.
pub(crate) async fn ended(pid: i32) {
    let fd = rustix::process::Pid::from_raw(pid)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::NONBLOCK).ok())
        .and_then(|fd| {
            // SAFETY: `fd` is an open pidfd owned by the AsyncFd from here on; nothing else
            // closes or replaces it while the AsyncFd holds it.
            unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            }
            .ok()
        });
    if let Some(fd) = fd {
        let _ = fd.readable().await;
    }
}

/// What the supervisor `child` (its configuration given) answers: `Ok(Ok(()))` as soon as
/// its first line says the container started (its process, whose exit is of no more
/// interest, is reaped in the background: the start does not wait for it to exit), else
/// `Ok(Err(what it wrote to stderr))` once it has exited.
async fn answer_of(mut child: tokio::process::Child) -> std::io::Result<Result<(), String>> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut line = String::new();
    if let Some(stdout) = child.stdout.take() {
        tokio::io::BufReader::new(stdout)
            .read_line(&mut line)
            .await?;
    }
    if line.starts_with("ok ") {
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        return Ok(Ok(()));
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr).await?;
    }
    let status = child.wait().await?;
    let message = match stderr.trim() {
        "" => format!("the supervisor exited ({status}) without saying why"),
        m => m.to_owned(),
    };
    Ok(Err(message))
}

impl Containers {
    pub fn new(runtime: OciRuntime, shim: ShimCommand, root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        Self {
            runtime,
            shim,
            logs: root.clone(),
            root,
            log_max_bytes: 10 << 20,
            log_keep: 2,
            start_timeout: Duration::from_secs(60),
            parents: Default::default(),
            spare: Default::default(),
        }
    }

    /// A supervisor waiting for its configuration on stdin (dropped: killed, and it exits
    /// anyway once its stdin ends). A spare (`ahead`) copies the runtime's program while it
    /// waits ([`shim::sealed_copy`]); one spawned for a start at hand does not wait for that.
    fn spawn_supervisor(&self, ahead: bool) -> std::io::Result<tokio::process::Child> {
        use std::process::Stdio;
        let mut cmd = tokio::process::Command::new(&self.shim.program);
        cmd.args(&self.shim.args).arg(shim::FROM_STDIN);
        if ahead {
            cmd.arg(&self.runtime.binary);
        }
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        if ahead {
            renice(&child, SPARE_NICE);
        }
        Ok(child)
    }

    /// Spawns the spare supervisor if there is none (after a start took it, or before the
    /// first start), so the next start does not wait for a program to load.
    pub fn prepare_supervisor(&self) {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if spare.is_none() {
            *spare = self.spawn_supervisor(true).ok();
        }
    }

    /// Hands `config` to the spare supervisor (or to a new one when there is none, or the
    /// spare is gone) and waits for its answer: `Ok` once it says the container started,
    /// else what it said went wrong.
    async fn supervise(&self, id: &str, config: &str) -> Result<(), ContainerError> {
        use tokio::io::AsyncWriteExt;
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut child = None;
        for candidate in [spare, None] {
            let mut c = match candidate {
                Some(c) => c,
                None => {
                    self.spawn_supervisor(false)
                        .map_err(self.io(id, "run", &self.shim.program))?
                }
            };
            let Some(mut stdin) = c.stdin.take() else {
                continue;
            };
            // A spare that died meanwhile (killed by hand, say) has a closed pipe: take
            // another.
            if stdin.write_all(config.as_bytes()).await.is_ok() && stdin.shutdown().await.is_ok() {
                child = Some(c);
                break;
            }
        }
        let child = child.ok_or_else(|| ContainerError::Start {
            id: id.to_owned(),
            message: "the supervisor did not take its configuration".into(),
        })?;
        let answer = tokio::time::timeout(self.start_timeout, answer_of(child))
            .await
            .map_err(|_| ContainerError::ShimTimeout {
                id: id.to_owned(),
                timeout: self.start_timeout,
            })?
            .map_err(self.io(id, "run", &self.shim.program));
        // The next spare is the caller's to spawn ([`Self::prepare_supervisor`]), once
        // this start is reported: beside its status write, loading a program slows it.
        answer?.map_err(|message| ContainerError::Start {
            id: id.to_owned(),
            message,
        })
    }

    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Keeps the containers' logs in their own directories under `logs` (one each, made at
    /// the first line a container writes) rather than in their state directories: those go on
    /// a tmpfs, logs may be large.
    pub fn with_logs(mut self, logs: impl Into<PathBuf>) -> Self {
        self.logs = logs.into();
        self
    }

    /// The directory of container `id`'s logs: its own under the logs root, or its state
    /// directory for one started before logs were set apart (its supervisor writes there).
    pub fn log_dir(&self, id: &str) -> PathBuf {
        let own = self.dir(id);
        if self.logs != self.root && !own.join(shim::LOG).exists() {
            return self.logs.join(id);
        }
        own
    }

    pub fn log_path(&self, id: &str) -> PathBuf {
        self.log_dir(id).join(shim::LOG)
    }

    /// The runtime that made container `id` ([`runtime_of_container`]).
    pub fn runtime_of(&self, id: &str) -> OciRuntime {
        runtime_of_container(&self.dir(id), id, &self.runtime)
    }

    fn io(
        &self,
        id: &str,
        op: &'static str,
        path: &Path,
    ) -> impl FnOnce(std::io::Error) -> ContainerError {
        let (id, path) = (id.to_owned(), path.to_owned());
        move |source| ContainerError::Io {
            id,
            op,
            path,
            source,
        }
    }

    /// Writes the bundle (`config.json`, root at `spec.root.path`) and starts the container
    /// under a new supervisor. Returns once it runs (its init's pid).
    pub async fn start(
        &self,
        id: &str,
        spec: &Spec,
        cgroups_path: &Path,
    ) -> Result<Started, ContainerError> {
        if !valid_id(id) {
            return Err(ContainerError::BadId { id: id.to_owned() });
        }
        let dir = self.dir(id);
        let bundle = dir.join("bundle");
        fs::create_dir_all(&bundle).map_err(self.io(id, "create", &bundle))?;
        let config = bundle.join("config.json");
        let json = serde_json::to_vec(spec).map_err(|e| ContainerError::Start {
            id: id.to_owned(),
            message: format!("encode spec: {e}"),
        })?;
        fs::write(&config, json).map_err(self.io(id, "write", &config))?;
        for stale in [shim::STARTED, shim::EXITED, shim::PID_FILE] {
            let _ = fs::remove_file(dir.join(stale));
        }
        // Which runtime makes it, before it exists: stopping, exec and removal use the same.
        let record = RuntimeRecord {
            kind: self.runtime.kind,
            binary: self.runtime.binary.clone(),
            root: self.runtime.root.clone(),
        };
        let path = dir.join(RUNTIME_RECORD);
        let json = serde_json::to_vec(&record).map_err(|e| ContainerError::Start {
            id: id.to_owned(),
            message: format!("encode the runtime record: {e}"),
        })?;
        fs::write(&path, json).map_err(self.io(id, "write", &path))?;
        let cfg = ShimConfig {
            id: id.to_owned(),
            bundle,
            state_dir: dir.clone(),
            log_dir: Some(self.logs.join(id)),
            runtime_kind: self.runtime.kind.as_str().into(),
            runtime_binary: self.runtime.binary.clone(),
            runtime_root: self.runtime.root.clone(),
            cgroups_path: cgroups_path.to_owned(),
            log_max_bytes: self.log_max_bytes,
            log_keep: self.log_keep,
        };
        let cfg = serde_json::to_string(&cfg).map_err(|e| ContainerError::Start {
            id: id.to_owned(),
            message: e.to_string(),
        })?;
        let _parents = self.parents.read().await;
        self.supervise(id, &cfg).await?;
        shim::read_json::<Started>(&dir, shim::STARTED).ok_or_else(|| ContainerError::Start {
            id: id.to_owned(),
            message: format!(
                "the supervisor reported a start but {} is missing",
                shim::STARTED
            ),
        })
    }

    /// The container's state from its supervisor's records and the liveness of its processes.
    pub fn state(&self, id: &str) -> ContainerState {
        let dir = self.dir(id);
        let started: Option<Started> = shim::read_json(&dir, shim::STARTED);
        if let Some(exit) = shim::read_json::<Exited>(&dir, shim::EXITED) {
            return ContainerState::Exited { started, exit };
        }
        match started {
            Some(s) if alive(s.pid) || alive(s.shim_pid) => ContainerState::Running(s),
            Some(s) => ContainerState::Lost(s),
            None => ContainerState::Unknown,
        }
    }

    /// Waits until the container has exited or `timeout` passed. While it runs, the wait is
    /// on its supervisor's end (which records the exit first; its init's if the supervisor
    /// was killed), looked at again at least every [`WAIT_RECHECK`]; otherwise (an exit not
    /// recorded yet) its records are read again after a short pause, longer each time.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Option<Exited> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            let next = match self.state(id) {
                ContainerState::Exited { exit, .. } => return Some(exit),
                _ if Instant::now() >= deadline => return None,
                ContainerState::Running(s) => {
                    let _ = tokio::time::timeout_at(
                        deadline.min(Instant::now() + WAIT_RECHECK),
                        ended(watched_pid(&s)),
                    )
                    .await;
                    continue;
                }
                ContainerState::Lost(_) | ContainerState::Unknown => pause,
            };
            tokio::time::sleep_until(deadline.min(Instant::now() + next)).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Sends `signal` to the init, waits up to `grace`, then kills everything in the container
    /// and waits for the supervisor to record the exit.
    pub async fn stop(
        &self,
        id: &str,
        signal: &str,
        grace: Duration,
    ) -> Result<Exited, ContainerError> {
        if let ContainerState::Exited { exit, .. } = self.state(id) {
            return Ok(exit);
        }
        let runtime = self.runtime_of(id);
        let rt = runtime.clone();
        let (i, s) = (id.to_owned(), signal.to_owned());
        // A container that exits meanwhile makes kill fail: the wait below settles it.
        let _ = tokio::task::spawn_blocking(move || rt.kill(&i, &s, false)).await;
        if let Some(exit) = self.wait(id, grace).await {
            return Ok(exit);
        }
        let rt = runtime;
        let i = id.to_owned();
        let _ = tokio::task::spawn_blocking(move || rt.kill(&i, "KILL", true)).await;
        let waited = Duration::from_secs(10);
        self.wait(id, waited)
            .await
            .ok_or(ContainerError::Unkillable {
                id: id.to_owned(),
                waited,
            })
    }

    /// The signal that stops this container gracefully: the image's, kept in its bundle.
    pub fn stop_signal(&self, id: &str) -> String {
        fs::read(self.dir(id).join("bundle/config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Spec>(&b).ok())
            .and_then(|s| {
                s.annotations()
                    .as_ref()
                    .and_then(|a| a.get(super::spec::STOP_SIGNAL_ANNOTATION).cloned())
            })
            .map(|s| super::spec::stop_signal(&s))
            .unwrap_or_else(|| "TERM".to_owned())
    }

    /// Removes the container from the runtime (killing it if needed) and deletes its
    /// directory (bundle, records, logs). Idempotent. A container the runtime never finished
    /// making (its start was cut short: it has state the runtime does not recognise) is
    /// removed all the same: what runs in its cgroup is killed, the cgroup and the state go.
    pub async fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let cgroup = self.cgroup_of(id);
        // The runtime keeps a directory per container it knows: no directory, nothing to do.
        let runtime = self.runtime_of(id);
        if runtime.root.join(id).exists() {
            let rt = runtime.clone();
            let i = id.to_owned();
            // After a failure: whether the runtime recognises the container at all.
            let (deleted, known) = tokio::task::spawn_blocking(move || match rt.delete(&i, true) {
                Ok(()) => (Ok(()), true),
                Err(e) => (Err(e), !matches!(rt.state(&i), Ok(None))),
            })
            .await
            .map_err(|e| ContainerError::Start {
                id: id.to_owned(),
                message: e.to_string(),
            })?;
            match deleted {
                Ok(()) => {}
                // Gone meanwhile (deleted by someone else): the state we want.
                Err(_) if !runtime.root.join(id).exists() => {}
                // Half made: the runtime does not know it, its directory is only files.
                Err(_) if !known => {
                    let state = runtime.root.join(id);
                    fs::remove_dir_all(&state).map_err(self.io(id, "remove", &state))?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(cg) = cgroup {
            // Normally the runtime removed it; a container it never finished making may still
            // have processes (its init waiting to start) and the cgroup.
            let pids = cgroups::procs(&cg);
            for pid in &pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _alone = self.parents.write().await;
            let cg2 = cg.clone();
            let (_, failed) =
                tokio::task::spawn_blocking(move || cgroups::remove(&cg2, Duration::from_secs(2)))
                    .await
                    .map_err(|e| ContainerError::Start {
                        id: id.to_owned(),
                        message: e.to_string(),
                    })?;
            if let Some((path, source)) = failed.into_iter().next() {
                return Err(ContainerError::Io {
                    id: id.to_owned(),
                    op: "remove cgroup",
                    path,
                    source,
                });
            }
        }
        // Its logs first: a directory left without its state would be an orphan's.
        let logs = self.logs.join(id);
        for dir in [logs, self.dir(id)] {
            match fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ContainerError::Io {
                        id: id.to_owned(),
                        op: "remove",
                        path: dir,
                        source: e,
                    });
                }
            }
        }
        Ok(())
    }

    /// Removes the log directories of containers that have no state directory (their state
    /// went with the tmpfs at a reboot, or a removal was cut short); returns their ids.
    pub fn clear_orphan_logs(&self) -> Vec<String> {
        if self.logs == self.root {
            return Vec::new();
        }
        let mut out = Vec::new();
        for e in fs::read_dir(&self.logs).into_iter().flatten().flatten() {
            let Ok(id) = e.file_name().into_string() else {
                continue;
            };
            if !valid_id(&id) || self.dir(&id).exists() {
                continue;
            }
            match fs::remove_dir_all(e.path()) {
                Ok(()) => out.push(id),
                Err(err) => tracing::warn!(container = %id, error = %err, "remove orphan logs"),
            }
        }
        out
    }

    /// The cgroup path in the container's bundle.
    fn cgroup_of(&self, id: &str) -> Option<PathBuf> {
        fs::read(self.dir(id).join("bundle/config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Spec>(&b).ok())
            .and_then(|s| s.linux().as_ref().and_then(|l| l.cgroups_path().clone()))
    }

    /// What starts cut short left (an agent, or a supervisor, killed midway), for a starting
    /// agent to remove before it acts: containers that never ran (no start record) and whose
    /// supervisor is not running (one still at work finishes the start, and the container
    /// is adopted), and the runtime's containers that have no directory here (no agent could
    /// ever adopt them). Containers that ran are left alone. Returns the ids found.
    pub fn unfinished(&self) -> Vec<String> {
        let have = self.list();
        let mut out: Vec<String> = have
            .iter()
            .filter(|id| matches!(self.state(id), ContainerState::Unknown))
            .filter(|id| supervisor_of(id).is_none())
            .cloned()
            .collect();
        out.extend(
            fs::read_dir(&self.runtime.root)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|id| valid_id(id) && !have.contains(id)),
        );
        out.sort();
        out
    }

    /// The tenant container `id` belongs to, from the cgroup path of its bundle
    /// (`/hive/<tenant>/<instance>`); None without a readable bundle (a container without
    /// one was never handed to the runtime, so no process of it runs).
    pub fn tenant_of(&self, id: &str) -> Option<String> {
        let raw = fs::read(self.dir(id).join("bundle/config.json")).ok()?;
        let spec = serde_json::from_slice::<Spec>(&raw).ok()?;
        let path = spec.linux().as_ref()?.cgroups_path().clone()?;
        tenant_of_cgroup(&path)
    }

    /// Every container with a directory here (for re-adoption after an agent restart).
    pub fn list(&self) -> Vec<String> {
        let mut ids: Vec<String> = fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|id| valid_id(id))
            .collect();
        ids.sort();
        ids
    }
}

/// The tenant in a container's cgroup path, `/hive/<tenant>/<instance>`.
fn tenant_of_cgroup(path: &Path) -> Option<String> {
    let mut parts = path.strip_prefix("/").unwrap_or(path).iter();
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(t), Some(_), None) if h == "hive" => t.to_str().map(str::to_owned),
        _ => None,
    }
}

/// The pid of a running supervisor (`hive shim`) of container `id`, if any.
pub(crate) fn supervisor_of(id: &str) -> Option<i32> {
    fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| is_supervisor_of(*pid, id))
}

/// Whether `pid` is the supervisor of container `id` (a pid read from a file may have been
/// reused by anything since): its command line is `… shim {config naming id}`, or `… shim -`
/// (its configuration came on stdin) and it works in `id`'s directory (it enters it once it
/// has its configuration). A spare still waiting for its configuration is nobody's.
pub(crate) fn is_supervisor_of(pid: i32, id: &str) -> bool {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut args = cmdline.split(|b| *b == 0);
    if !args.any(|a| a == b"shim") {
        return false;
    }
    match args.next() {
        Some(a) if a == shim::FROM_STDIN.as_bytes() => fs::read_link(format!("/proc/{pid}/cwd"))
            .is_ok_and(|cwd| cwd.file_name().is_some_and(|n| n == id)),
        Some(config) => serde_json::from_slice::<ShimConfig>(config).is_ok_and(|c| c.id == id),
        None => false,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_tenant_is_read_from_the_cgroup_path() {
        assert_eq!(
            tenant_of_cgroup(Path::new("/hive/red/web-1")).as_deref(),
            Some("red")
        );
        assert_eq!(
            tenant_of_cgroup(Path::new("hive/blue/api")).as_deref(),
            Some("blue")
        );
        for other in ["/hive/red", "/other/red/web", "/hive/red/web/x", "/"] {
            assert_eq!(tenant_of_cgroup(Path::new(other)), None, "{other}");
        }
    }

    /// Containers under `root` whose runtime and supervisor are never run.
    pub(crate) fn unrun(root: &Path) -> Containers {
        let rt = OciRuntime::new(RuntimeKind::Crun, "crun", root.join("runtime"));
        let shim = ShimCommand {
            program: "/bin/false".into(),
            args: vec![],
        };
        Containers::new(rt, shim, root.join("containers"))
    }

    /// Records container `id` as started with `pid` as both its init and its supervisor.
    pub(crate) fn record_started(c: &Containers, id: &str, pid: i32) {
        let dir = c.dir(id);
        std::fs::create_dir_all(&dir).unwrap();
        let s = Started {
            pid,
            shim_pid: pid,
            started_at: chrono::Utc::now(),
        };
        shim::write_json(&dir, shim::STARTED, &s, false).unwrap();
    }

    #[tokio::test]
    async fn a_wait_ends_with_the_supervisor_and_times_out_while_it_lives() {
        let dir = tempfile::tempdir().unwrap();
        let c = unrun(dir.path());
        // A stand-in supervisor: a process that records the exit, then ends.
        let mut child = std::process::Command::new("sleep")
            .arg("1000")
            .spawn()
            .unwrap();
        record_started(&c, "c1", child.id() as i32);
        let cdir = c.dir("c1");

        let t0 = std::time::Instant::now();
        assert!(c.wait("c1", Duration::from_millis(300)).await.is_none());
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
            "{waited:?}"
        );

        let (c, cdir2) = (std::sync::Arc::new(c), cdir.clone());
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.wait("c1", Duration::from_secs(20)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "the container still runs");
        let exit = Exited {
            exit_code: 143,
            signal: Some(15),
            oom_killed: false,
            finished_at: chrono::Utc::now(),
        };
        shim::write_json(&cdir2, shim::EXITED, &exit, true).unwrap();
        // The records are not polled: the wait is on the process (a supervisor ends right
        // after it records the exit).
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!waiter.is_finished(), "woken by the process's end only");
        let t0 = std::time::Instant::now();
        child.kill().unwrap();
        child.wait().unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the wait ends with the supervisor")
            .unwrap();
        assert_eq!(got, Some(exit));
        // Woken by the process's end, not by the 500 ms re-read.
        assert!(t0.elapsed() < WAIT_RECHECK, "{:?}", t0.elapsed());
    }

    #[test]
    fn ids_cannot_escape_the_root() {
        for bad in ["", ".", "..", "a/b", "A", "x".repeat(65).as_str(), "a b"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        for good in ["web-1", "acme.web-1.0", "c_1"] {
            assert!(valid_id(good));
        }
    }
}
