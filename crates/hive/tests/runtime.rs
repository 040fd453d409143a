//! Real containers (root): busybox from Debian's busybox-static, runc, and the `hive shim`
//! supervisor. Every test removes the containers, cgroups and processes it made, even when
//! it fails (the fixture's Drop).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hive_agent::runtime::shim::{self, Started};
use hive_agent::runtime::spec::{self, ContainerConfig, ImageProcess, Limits, ProcessOverride};
use hive_agent::runtime::{ContainerState, Containers, OciRuntime, RuntimeKind, ShimCommand};

const HIVE: &str = env!("CARGO_BIN_EXE_hive");
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "true", "false", "hostname", "id", "ls", "grep", "tail", "head",
    "wc", "seq",
];

static SEQ: AtomicUsize = AtomicUsize::new(0);

struct Fixture {
    // Held for its Drop: removes the rootfs, bundles and records after the containers.
    _dir: tempfile::TempDir,
    rootfs: PathBuf,
    containers: Containers,
    ids: Vec<String>,
}

impl Fixture {
    fn new() -> Self {
        let version = Command::new("runc").arg("--version").output();
        assert!(
            version.map(|o| o.status.success()).unwrap_or(false),
            "runc is missing: install it (scripts/deps.sh does)"
        );
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "busybox is missing: install busybox-static (scripts/deps.sh does)"
        );
        let dir = tempfile::Builder::new()
            .prefix("hive-rt-")
            .tempdir()
            .unwrap();
        let rootfs = dir.path().join("rootfs");
        for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "root"] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        std::fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
        }
        std::fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
        )
        .unwrap();
        std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
        let runtime = OciRuntime::new(RuntimeKind::Runc, "runc", dir.path().join("runc"));
        let shim = ShimCommand {
            program: HIVE.into(),
            args: vec!["shim".into()],
        };
        let containers = Containers::new(runtime, shim, dir.path().join("containers"));
        Self {
            _dir: dir,
            rootfs,
            containers,
            ids: Vec::new(),
        }
    }

    fn id(&mut self) -> String {
        let id = format!(
            "t{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        self.ids.push(id.clone());
        id
    }

    fn cgroup(id: &str) -> PathBuf {
        PathBuf::from(format!("/hive-test-{id}"))
    }

    /// Starts `args` as a new container with `limits`.
    async fn run(&mut self, args: &[&str], limits: Limits) -> (String, Started) {
        let containers = self.containers.clone();
        self.run_on(&containers, args, limits).await
    }

    /// [`Fixture::run`] through `containers` (a handle with another runtime, say).
    async fn run_on(
        &mut self,
        containers: &Containers,
        args: &[&str],
        limits: Limits,
    ) -> (String, Started) {
        let id = self.id();
        let cfg = ContainerConfig {
            id: id.clone(),
            hostname: format!("h-{id}"),
            rootfs: self.rootfs.clone(),
            image: ImageProcess::default(),
            overrides: ProcessOverride {
                command: args.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            limits,
            cgroups_path: Self::cgroup(&id),
            netns: None,
        };
        let spec = spec::build(&cfg).unwrap();
        let started = containers
            .start(&id, &spec, &cfg.cgroups_path)
            .await
            .expect("start container");
        (id, started)
    }

    fn log(&self, id: &str) -> String {
        std::fs::read_to_string(self.containers.log_path(id)).unwrap_or_default()
    }

    /// The container's output lines (content only, partial records joined).
    fn lines(&self, id: &str) -> Vec<String> {
        self.log(id).lines().filter_map(shim_content).collect()
    }
}

fn shim_content(line: &str) -> Option<String> {
    hive_agent::runtime::logs::parse(line.as_bytes()).map(|r| {
        format!(
            "{} {}",
            String::from_utf8_lossy(r.stream),
            String::from_utf8_lossy(r.content)
        )
    })
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for id in &self.ids {
            if let Some(s) = shim::read_json::<Started>(&self.containers.dir(id), shim::STARTED) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(s.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = Command::new("runc")
                .arg("--root")
                .arg(&self.containers.runtime.root)
                .args(["delete", "--force", id])
                .output();
            for ctl in [
                "memory", "cpu", "cpuacct", "pids", "blkio", "devices", "freezer", "cpuset",
                "systemd",
            ] {
                let _ = std::fs::remove_dir(
                    Path::new("/sys/fs/cgroup")
                        .join(ctl)
                        .join(format!("hive-test-{id}")),
                );
            }
        }
    }
}

fn cgroup_exists(id: &str) -> bool {
    ["memory", "pids", "cpu"].iter().any(|c| {
        Path::new("/sys/fs/cgroup")
            .join(c)
            .join(format!("hive-test-{id}"))
            .exists()
    })
}

#[tokio::test]
async fn runs_a_container_records_output_and_exit_and_cleans_up() {
    let mut f = Fixture::new();
    let (id, started) = f
        .run(
            &["sh", "-c", "echo hello; echo oops >&2; hostname; exit 3"],
            Limits::default(),
        )
        .await;
    assert!(started.pid > 1);
    let exit = f
        .containers
        .wait(&id, Duration::from_secs(20))
        .await
        .expect("exits");
    assert_eq!(
        (exit.exit_code, exit.signal, exit.oom_killed),
        (3, None, false)
    );
    let lines = f.lines(&id);
    assert!(lines.contains(&"stdout hello".to_string()), "{lines:?}");
    assert!(lines.contains(&"stderr oops".to_string()), "{lines:?}");
    assert!(lines.contains(&format!("stdout h-{id}")), "{lines:?}");
    assert!(matches!(
        f.containers.state(&id),
        ContainerState::Exited { .. }
    ));
    assert_eq!(f.containers.list(), vec![id.clone()]);
    f.containers.remove(&id).await.unwrap();
    assert!(!cgroup_exists(&id), "cgroup left behind");
    assert!(!f.containers.dir(&id).exists());
    assert!(
        !f.containers.runtime.root.join(&id).exists(),
        "runtime state left behind"
    );
    assert!(f.containers.list().is_empty());
    f.containers
        .remove(&id)
        .await
        .expect("remove is idempotent");
}

#[tokio::test]
async fn limits_and_confinement_are_visible_inside() {
    let mut f = Fixture::new();
    let limits = Limits {
        cpu_millis: Some(500),
        cpu_request_millis: Some(250),
        memory_bytes: Some(64 << 20),
        pids: Some(50),
    };
    let script = "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/pids/pids.max \
                  /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.shares; \
                  grep -E '^(Seccomp|NoNewPrivs|CapBnd):' /proc/self/status; ls /sys/class/net; echo pid=$$";
    let (id, _) = f.run(&["sh", "-c", script], limits).await;
    let exit = f
        .containers
        .wait(&id, Duration::from_secs(20))
        .await
        .expect("exits");
    assert_eq!(exit.exit_code, 0, "{}", f.log(&id));
    let out: Vec<String> = f
        .lines(&id)
        .into_iter()
        .filter_map(|l| l.strip_prefix("stdout ").map(str::to_owned))
        .collect();
    assert_eq!(&out[..4], ["67108864", "50", "50000", "256"], "{out:?}");
    let status: Vec<String> = out
        .iter()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert!(status.contains(&"Seccomp: 2".to_string()), "{status:?}");
    assert!(status.contains(&"NoNewPrivs: 1".to_string()), "{status:?}");
    // Docker's default capability set, nothing more.
    assert!(
        status.contains(&"CapBnd: 00000000a80425fb".to_string()),
        "{status:?}"
    );
    // Own network namespace (only loopback) and own pid namespace (the shell is pid 1).
    assert!(
        out.contains(&"lo".to_string()) && !out.iter().any(|l| l.starts_with("eth")),
        "{out:?}"
    );
    assert!(out.contains(&"pid=1".to_string()), "{out:?}");
    f.containers.remove(&id).await.unwrap();
}

#[tokio::test]
async fn the_supervisor_outlives_its_starter_and_stop_honours_the_grace_period() {
    let mut f = Fixture::new();
    let (id, started) = f
        .run(
            &[
                "sh",
                "-c",
                "trap 'echo got TERM; exit 0' TERM; echo up; while true; do sleep 0.1; done",
            ],
            Limits::default(),
        )
        .await;
    // The supervisor is not our child: an agent restart leaves it (and the container) alone.
    let ppid = common::parent_of(started.shim_pid as u64).expect("supervisor alive");
    assert_ne!(ppid, u64::from(std::process::id()));
    // A new handle (a restarted agent) finds the same container, same pid.
    let again = Containers::new(
        f.containers.runtime.clone(),
        f.containers.shim.clone(),
        f.containers.root.clone(),
    );
    assert_eq!(again.list(), vec![id.clone()]);
    match again.state(&id) {
        ContainerState::Running(s) => assert_eq!(s, started),
        other => panic!("expected running, got {other:?}"),
    }
    // Wait until the trap is installed (it prints "up" after).
    let t0 = Instant::now();
    while !f.lines(&id).contains(&"stdout up".to_string()) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "container never printed up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let exit = again
        .stop(&id, "TERM", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!((exit.exit_code, exit.signal), (0, None));
    assert!(f.lines(&id).contains(&"stdout got TERM".to_string()));

    // One that ignores SIGTERM is killed when the grace period ends.
    let (stubborn, _) = f
        .run(
            &[
                "sh",
                "-c",
                "trap '' TERM; echo up; while true; do sleep 1; done",
            ],
            Limits::default(),
        )
        .await;
    let t0 = Instant::now();
    while !f.lines(&stubborn).contains(&"stdout up".to_string()) {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t0 = Instant::now();
    let exit = f
        .containers
        .stop(&stubborn, "TERM", Duration::from_millis(500))
        .await
        .unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(500));
    assert_eq!((exit.exit_code, exit.signal), (137, Some(9)));
    f.containers.remove(&id).await.unwrap();
    f.containers.remove(&stubborn).await.unwrap();
}

/// The niceness of process `pid`.
fn nice_of(pid: u64) -> i64 {
    common::stat_field(pid, 16).unwrap().parse().unwrap()
}

/// The spare supervisors once there is one (within 10 s). Polled: a program just spawned
/// shows its command line only once the kernel has set up its new memory, a moment after
/// `spawn` returned.
async fn a_spare_supervisor(runtime: &Path) -> Vec<u64> {
    let t0 = Instant::now();
    loop {
        let now = common::spare_supervisors(std::process::id().into(), Some(runtime));
        if !now.is_empty() {
            return now;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no spare supervisor"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A start hands its configuration to the supervisor spawned ahead of it (that one is gone
/// once it answered) and spawns none itself: the next is spawned when asked (the agent asks
/// once the start is reported); a spare whose stdin ends without a configuration exits
/// quietly and does nothing.
#[tokio::test]
async fn a_start_takes_the_supervisor_spawned_ahead_and_the_next_is_spawned_when_asked() {
    let mut f = Fixture::new();
    // runc under a path of this test's own, so that the spares of the tests running beside
    // it in this process (all children of it) are not counted as this one's.
    let runc = f.rootfs.with_file_name("runc-of-this-test");
    std::os::unix::fs::symlink("/usr/sbin/runc", &runc).unwrap();
    let c = &f.containers;
    let containers = Containers::new(
        OciRuntime::new(RuntimeKind::Runc, &runc, c.runtime.root.clone()),
        c.shim.clone(),
        c.root.clone(),
    );
    containers.prepare_supervisor();
    let ahead = a_spare_supervisor(&runc).await;
    assert_eq!(ahead.len(), 1, "one spare: {ahead:?}");
    assert_eq!(nice_of(ahead[0]), 19, "a spare's program starts niced");
    let (id, started) = f
        .run_on(&containers, &["sleep", "100"], Limits::default())
        .await;
    assert!(matches!(containers.state(&id), ContainerState::Running(_)));
    // Its supervisor and its container are not.
    assert_eq!(nice_of(started.shim_pid as u64), 0, "the supervisor");
    assert_eq!(nice_of(started.pid as u64), 0, "the container's init");
    // The spare forked the container's supervisor and exits after its answer (reaped in the
    // background: the start does not wait for that).
    let t0 = Instant::now();
    while std::path::Path::new(&format!("/proc/{}", ahead[0])).exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the spare did not exit"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_ne!(started.shim_pid as u64, ahead[0]);
    let none = common::spare_supervisors(std::process::id().into(), Some(&runc));
    assert!(none.is_empty(), "the start spawned a spare: {none:?}");
    containers.prepare_supervisor();
    let next = a_spare_supervisor(&runc).await;
    assert_eq!(next.len(), 1, "{next:?}");
    assert_ne!(next[0], ahead[0]);
    containers
        .stop(&id, "KILL", Duration::from_secs(5))
        .await
        .unwrap();
    containers.remove(&id).await.unwrap();
    drop(containers);

    for args in [
        &["shim", shim::FROM_STDIN][..],
        &["shim", shim::FROM_STDIN, "/usr/sbin/runc"],
        &["shim", shim::FROM_STDIN, "/nonexistent/runtime"],
    ] {
        let out = Command::new(HIVE)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
    }
}

/// The same node's containers with the agent's runtime set to `kind` (same directories and
/// runtime root, as after `hive agent --runtime` changed).
fn with_runtime(c: &Containers, kind: RuntimeKind) -> Containers {
    let rt = OciRuntime::new(kind, kind.as_str(), c.runtime.root.clone());
    Containers::new(rt, c.shim.clone(), c.root.clone())
}

#[tokio::test]
async fn a_container_is_stopped_and_removed_by_the_runtime_that_made_it() {
    let mut f = Fixture::new();
    let (by_runc, _) = f
        .run(&["sh", "-c", "echo up; sleep 1000"], Limits::default())
        .await;
    // The node switched to crun: what runc made is still runc's to stop and delete.
    let crun = with_runtime(&f.containers, RuntimeKind::Crun);
    assert_eq!(crun.runtime_of(&by_runc).kind, RuntimeKind::Runc);
    // One made before runtimes were recorded is told by runc's own state.
    std::fs::remove_file(crun.dir(&by_runc).join("runtime.json")).unwrap();
    assert_eq!(crun.runtime_of(&by_runc).kind, RuntimeKind::Runc);
    let exit = crun
        .stop(&by_runc, "KILL", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(exit.signal, Some(9));
    crun.remove(&by_runc).await.unwrap();
    assert!(!crun.runtime.root.join(&by_runc).exists(), "runc's state");
    assert!(!cgroup_exists(&by_runc));

    // And the other way: made by crun, stopped and removed by a node back on runc.
    let (id, _) = f.run_on(&crun, &["sleep", "1000"], Limits::default()).await;
    let runc = with_runtime(&f.containers, RuntimeKind::Runc);
    assert_eq!(runc.runtime_of(&id).kind, RuntimeKind::Crun);
    let exit = runc
        .stop(&id, "KILL", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(exit.signal, Some(9));
    runc.remove(&id).await.unwrap();
    assert!(!runc.runtime.root.join(&id).exists(), "crun's state");
    assert!(!cgroup_exists(&id));
}

#[tokio::test]
async fn an_oom_kill_is_reported_as_such() {
    let mut f = Fixture::new();
    let limits = Limits {
        memory_bytes: Some(16 << 20),
        ..Default::default()
    };
    // `tail` of an endless line buffers it whole: memory grows until the limit.
    let (id, _) = f.run(&["tail", "/dev/zero"], limits).await;
    let exit = f
        .containers
        .wait(&id, Duration::from_secs(30))
        .await
        .expect("killed");
    assert_eq!(
        (exit.exit_code, exit.signal, exit.oom_killed),
        (137, Some(9), true)
    );
    f.containers.remove(&id).await.unwrap();
    assert!(!cgroup_exists(&id));
}

#[tokio::test]
async fn a_command_missing_from_the_image_fails_with_a_clear_error_and_leaks_nothing() {
    let mut f = Fixture::new();
    let id = f.id();
    let cfg = ContainerConfig {
        id: id.clone(),
        hostname: "x".into(),
        rootfs: f.rootfs.clone(),
        image: ImageProcess::default(),
        overrides: ProcessOverride {
            command: vec!["/bin/does-not-exist".into()],
            ..Default::default()
        },
        limits: Limits::default(),
        cgroups_path: Fixture::cgroup(&id),
        netns: None,
    };
    let spec = spec::build(&cfg).unwrap();
    let err = f
        .containers
        .start(&id, &spec, &cfg.cgroups_path)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&id) && err.contains("does-not-exist"), "{err}");
    assert!(
        !f.containers.runtime.root.join(&id).exists(),
        "runtime state left behind"
    );
    assert!(!cgroup_exists(&id), "cgroup left behind");
    f.containers.remove(&id).await.unwrap();
}
