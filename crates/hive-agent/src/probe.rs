//! Health checks of running containers (readiness and liveness) and their resource use.
//!
//! Each probe of a running container is a task of its own that runs its check every period
//! and reports each outcome to the sync loop, which keeps the streaks and decides: readiness
//! sets the instance's `ready`, a liveness failure stops the container (its restart policy
//! does the rest). Checks run where the container is:
//!
//! - `exec`: the command through the OCI runtime (`runc exec`), killed at the timeout;
//! - `tcp` and `http`: a connection opened from inside the container's network namespace
//!   (`/proc/<pid>/ns/net`, entered by a short-lived thread of its own, so no pooled thread
//!   ever changes namespace) to the instance's address, or to 127.0.0.1 without one. HTTP
//!   is one `GET` over that connection through hyper; 200 to 399 passes.
//!
//! Usage comes from the container's cgroups (v1 controllers, else the unified hierarchy).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use hive_api::probe::Check;
use hive_api::{Probe, ResourceUsage};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::runtime::OciRuntime;

/// Which probe an outcome is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Readiness,
    Liveness,
}

/// One check's outcome, for container `id` as started with `pid`.
#[derive(Debug)]
pub struct Outcome {
    pub id: String,
    pub pid: i32,
    pub kind: Kind,
    pub result: Result<(), String>,
}

/// Where a container's checks run.
#[derive(Clone, Debug)]
pub struct Target {
    pub runtime: OciRuntime,
    pub id: String,
    pub pid: i32,
    /// The instance's address, or none (then 127.0.0.1 in its namespace).
    pub ip: Option<Ipv4Addr>,
}

/// The probes of one running container and what they concluded so far.
#[derive(Debug)]
pub struct Probes {
    pid: i32,
    tasks: Vec<JoinHandle<()>>,
    readiness: Option<Probe>,
    liveness: Option<Probe>,
    ready: bool,
    /// Passes and failures in a row, per kind.
    streak: HashMap<Kind, (u32, u32)>,
    /// The last failure's message of the readiness probe.
    pub unready_because: String,
    /// Set once liveness failed its threshold.
    pub dead_because: Option<String>,
}

impl Drop for Probes {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Probes {
    /// Starts the probes of a container (none: a container without probes is ready).
    pub fn start(
        target: Target,
        readiness: Option<Probe>,
        liveness: Option<Probe>,
        tx: &mpsc::UnboundedSender<Outcome>,
    ) -> Self {
        let mut tasks = Vec::new();
        for (kind, probe) in [(Kind::Readiness, &readiness), (Kind::Liveness, &liveness)] {
            if let Some(p) = probe {
                tasks.push(tokio::spawn(run(
                    target.clone(),
                    kind,
                    p.clone(),
                    tx.clone(),
                )));
            }
        }
        Self {
            pid: target.pid,
            tasks,
            ready: readiness.is_none(),
            readiness,
            liveness,
            streak: HashMap::new(),
            unready_because: String::new(),
            dead_because: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn ready(&self) -> bool {
        self.ready
    }

    /// Counts an outcome into the streaks; true when it changed a conclusion.
    pub fn record(&mut self, kind: Kind, result: Result<(), String>) -> bool {
        let probe = match kind {
            Kind::Readiness => self.readiness.as_ref(),
            Kind::Liveness => self.liveness.as_ref(),
        };
        let Some(probe) = probe else { return false };
        let (passes, fails) = self.streak.entry(kind).or_default();
        match &result {
            Ok(()) => {
                *passes += 1;
                *fails = 0;
            }
            Err(_) => {
                *fails += 1;
                *passes = 0;
            }
        }
        let (passes, fails) = (*passes, *fails);
        match (kind, result) {
            (Kind::Readiness, Ok(())) if !self.ready && passes >= probe.success_threshold() => {
                self.ready = true;
                self.unready_because.clear();
                true
            }
            (Kind::Readiness, Err(e)) => {
                let changed = self.ready && fails >= probe.failure_threshold();
                if changed {
                    self.ready = false;
                }
                if !self.ready {
                    self.unready_because = format!("readiness probe failed: {e}");
                }
                changed
            }
            (Kind::Liveness, Err(e))
                if self.dead_because.is_none() && fails >= probe.failure_threshold() =>
            {
                self.dead_because =
                    Some(format!("liveness probe failed {fails} times in a row: {e}"));
                true
            }
            _ => false,
        }
    }
}

/// Runs one probe forever: first after the initial delay, then every period.
async fn run(target: Target, kind: Kind, probe: Probe, tx: mpsc::UnboundedSender<Outcome>) {
    let period = Duration::from_secs(probe.period_secs().into());
    let timeout = Duration::from_secs(probe.timeout_secs().into());
    tokio::time::sleep(Duration::from_secs(probe.initial_delay_secs().into())).await;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(check) = probe.check() else { return };
        let result = match tokio::time::timeout(timeout, check_once(&target, check, timeout)).await
        {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {} s", timeout.as_secs())),
        };
        let outcome = Outcome {
            id: target.id.clone(),
            pid: target.pid,
            kind,
            result,
        };
        if tx.send(outcome).is_err() {
            return;
        }
    }
}

async fn check_once(t: &Target, check: Check<'_>, timeout: Duration) -> Result<(), String> {
    let ip = IpAddr::V4(t.ip.unwrap_or(Ipv4Addr::LOCALHOST));
    match check {
        Check::Exec(cmd) => {
            let mut c = tokio::process::Command::from(t.runtime.exec_command(&t.id, cmd, false));
            c.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            let out = c
                .output()
                .await
                .map_err(|e| format!("run {}: {e}", t.runtime.binary.display()))?;
            if out.status.success() {
                return Ok(());
            }
            let err = String::from_utf8_lossy(&out.stderr);
            let err: String = err.trim().chars().take(200).collect();
            Err(match out.status.code() {
                Some(c) => format!("{:?} exited with {c}: {err}", cmd.join(" ")),
                None => format!("{:?} was killed: {err}", cmd.join(" ")),
            })
        }
        Check::Tcp { port } => {
            connect_in(netns_of(t.pid), SocketAddr::new(ip, port), timeout).await?;
            Ok(())
        }
        Check::Http { port, path } => {
            let addr = SocketAddr::new(ip, port);
            let stream = connect_in(netns_of(t.pid), addr, timeout).await?;
            http_get(stream, addr, path).await
        }
    }
}

fn netns_of(pid: i32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

/// Connects to `addr` from inside the network namespace at `netns`. The socket is made by a
/// thread of its own that enters the namespace and ends with the connection; the socket
/// stays in that namespace.
async fn connect_in(
    netns: PathBuf,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("hive-probe".into())
        .spawn(move || {
            let _ = tx.send(connect_blocking(&netns, addr, timeout));
        })
        .map_err(|e| format!("probe thread: {e}"))?;
    let stream = rx
        .await
        .map_err(|_| "probe thread ended without an answer".to_owned())??;
    stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(stream))
        .map_err(|e| format!("connect {addr}: {e}"))
}

fn connect_blocking(
    netns: &Path,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<std::net::TcpStream, String> {
    let ns = std::fs::File::open(netns).map_err(|e| format!("open {}: {e}", netns.display()))?;
    // This thread is the probe's own and ends right after: entering the namespace changes
    // nothing for any other thread.
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("enter the network namespace of the container: {e}"))?;
    std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))
}

async fn http_get(
    stream: tokio::net::TcpStream,
    addr: SocketAddr,
    path: &str,
) -> Result<(), String> {
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut send, conn) = hyper::client::conn::http1::handshake::<_, String>(io)
        .await
        .map_err(|e| format!("http {addr}: {e}"))?;
    let driver = tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, "hive-probe")
        .body(String::new())
        .map_err(|e| format!("http request {path}: {e}"))?;
    let resp = send.send_request(req).await;
    driver.abort();
    let status = resp
        .map_err(|e| format!("GET http://{addr}{path}: {e}"))?
        .status();
    if (200..400).contains(&status.as_u16()) {
        Ok(())
    } else {
        Err(format!("GET http://{addr}{path} answered {status}"))
    }
}

/// The resource use of the container in cgroup `cgroups_path` (`/hive/<tenant>/<name>`).
pub fn usage(cgroups_path: &Path) -> Option<ResourceUsage> {
    let rel = cgroups_path.strip_prefix("/").unwrap_or(cgroups_path);
    let root = Path::new("/sys/fs/cgroup");
    let read = |p: PathBuf| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let stat = |p: PathBuf, key: &str| -> Option<u64> {
        std::fs::read_to_string(p).ok()?.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
    };
    let v1 = root.join("memory").join(rel);
    if v1.is_dir() {
        let mem = read(v1.join("memory.usage_in_bytes"))?;
        let inactive = stat(v1.join("memory.stat"), "total_inactive_file").unwrap_or(0);
        return Some(ResourceUsage {
            cpu_nanos: read(root.join("cpuacct").join(rel).join("cpuacct.usage")).unwrap_or(0),
            memory_bytes: mem.saturating_sub(inactive),
            pids: read(root.join("pids").join(rel).join("pids.current")).unwrap_or(0),
        });
    }
    let v2 = root.join(rel);
    let mem = read(v2.join("memory.current"))?;
    let inactive = stat(v2.join("memory.stat"), "inactive_file").unwrap_or(0);
    Some(ResourceUsage {
        cpu_nanos: stat(v2.join("cpu.stat"), "usage_usec").unwrap_or(0) * 1000,
        memory_bytes: mem.saturating_sub(inactive),
        pids: read(v2.join("pids.current")).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probes(readiness: Option<Probe>, liveness: Option<Probe>) -> Probes {
        Probes {
            pid: 1,
            tasks: Vec::new(),
            ready: readiness.is_none(),
            readiness,
            liveness,
            streak: HashMap::new(),
            unready_because: String::new(),
            dead_because: None,
        }
    }

    fn tcp(fail: u32, pass: u32) -> Probe {
        Probe {
            tcp: Some(hive_api::probe::TcpCheck { port: 80 }),
            failure_threshold: Some(fail),
            success_threshold: Some(pass),
            ..Default::default()
        }
    }

    #[test]
    fn readiness_follows_its_thresholds() {
        let mut p = probes(Some(tcp(2, 2)), None);
        assert!(!p.ready(), "not ready before the first pass");
        assert!(!p.record(Kind::Readiness, Ok(())));
        assert!(
            p.record(Kind::Readiness, Ok(())),
            "two passes make it ready"
        );
        assert!(p.ready());
        assert!(!p.record(Kind::Readiness, Err("refused".into())));
        assert!(p.ready(), "one failure is below the threshold");
        assert!(p.record(Kind::Readiness, Err("refused".into())));
        assert!(!p.ready());
        assert_eq!(p.unready_because, "readiness probe failed: refused");
        assert!(
            !p.record(Kind::Liveness, Err("x".into())),
            "no liveness probe"
        );
        assert!(probes(None, None).ready(), "no readiness probe: ready");
    }

    #[test]
    fn liveness_fails_once_at_its_threshold() {
        let mut p = probes(None, Some(tcp(3, 1)));
        for _ in 0..2 {
            assert!(!p.record(Kind::Liveness, Err("timeout".into())));
        }
        assert!(
            !p.record(Kind::Liveness, Ok(())),
            "a pass resets the streak"
        );
        for _ in 0..2 {
            assert!(!p.record(Kind::Liveness, Err("timeout".into())));
        }
        assert!(p.record(Kind::Liveness, Err("timeout".into())));
        assert_eq!(
            p.dead_because.as_deref(),
            Some("liveness probe failed 3 times in a row: timeout")
        );
        assert!(
            !p.record(Kind::Liveness, Err("timeout".into())),
            "decided once"
        );
    }

    #[tokio::test]
    async fn tcp_and_http_checks_reach_a_listener_in_this_namespace() {
        // Our own network namespace stands in for a container's.
        let pid = std::process::id() as i32;
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = server.accept().await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let status = if req.starts_with("GET /ok ") {
                    "204 No Content"
                } else {
                    "503 Busy"
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let t = Target {
            runtime: OciRuntime::new(crate::runtime::RuntimeKind::Runc, "runc", "/nonexistent"),
            id: "x".into(),
            pid,
            ip: None,
        };
        let second = Duration::from_secs(1);
        assert_eq!(check_once(&t, Check::Tcp { port }, second).await, Ok(()));
        assert_eq!(
            check_once(&t, Check::Http { port, path: "/ok" }, second).await,
            Ok(())
        );
        let e = check_once(&t, Check::Http { port, path: "/no" }, second)
            .await
            .unwrap_err();
        assert!(e.contains("503"), "{e}");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let free = closed.local_addr().unwrap().port();
        drop(closed);
        let e = check_once(&t, Check::Tcp { port: free }, second)
            .await
            .unwrap_err();
        assert!(e.contains("refused"), "{e}");
    }
}
