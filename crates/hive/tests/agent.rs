//! End to end on one machine (root): `hive up` with its agent; an image built locally with
//! umoci from busybox-static and pushed with skopeo into Hive's own registry; a service that
//! runs it as a real container, reported Running with its pid; scaled to zero, the container,
//! its cgroup and its root filesystem are gone.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    Cleanup, Cluster, Up, admin_token, busybox_layout, json, ok, push_test_image, start_up_in,
    until,
};
use serde_json::Value;

fn instances(cfg: &Path) -> Vec<Value> {
    json(cfg, &["instance", "ls"]).as_array().unwrap().clone()
}

/// `hive up` in a temp dir with a busybox image pushed into its registry.
struct Setup {
    // Dropped in this order: the server first, then the leftovers, then the directory.
    up: Up,
    _cleanup: Cleanup,
    _dir: tempfile::TempDir,
    data: PathBuf,
    cfg: PathBuf,
    image: String,
}

fn setup() -> Setup {
    setup_with(&[])
}

/// [`setup`] with more arguments for `hive up`.
fn setup_with(extra: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("cli.json");
    let cleanup = Cleanup::of(&data);
    let up: Up = common::start_up_with(&common::Netns::new(), &data, &cfg, extra);
    let host = up.url.trim_start_matches("http://").to_owned();
    let token = admin_token(&data);
    let layout = busybox_layout(dir.path());
    let image = push_test_image(
        up.netns.as_ref().unwrap(),
        &layout,
        &host,
        &token,
        "default/busybox",
    );
    Setup {
        up,
        _cleanup: cleanup,
        image,
        _dir: dir,
        data,
        cfg,
    }
}

/// Waits for `what` about the instances of `service` to hold, up to `secs`.
fn wait_instance(cfg: &Path, service: &str, secs: u64, what: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let list = instances(cfg);
        if let Some(i) = list
            .iter()
            .find(|i| i["spec"]["service"] == service && what(i))
        {
            return i.clone();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "{service}: condition not met in {secs} s: {list:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_service_runs_as_a_real_container_and_scaling_to_zero_removes_it() {
    let s = setup();
    let (data, cfg, image) = (&s.data, &s.cfg, &s.image);
    // The node turned favordynmods on for the host's cgroup2 superblock (see
    // `cgroups::favor_dynamic_modifications`): starts no longer wait for RCU on migration.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let cgroup2 = mountinfo
        .lines()
        .find(|l| l.contains(" - cgroup2 "))
        .expect("a cgroup2 mount on this host");
    assert!(cgroup2.contains("favordynmods"), "{cgroup2}");
    let up_pid = u64::from(s.up.child.id());
    let spares_before = common::spare_supervisors(up_pid, None);
    ok(
        cfg,
        &[
            "service",
            "create",
            "web",
            "--image",
            image,
            "--",
            "sh",
            "-c",
            "echo hello from hive; exec sleep 1000",
        ],
    );

    let running = wait_instance(cfg, "web", 60, |i| i["status"]["phase"] == "running");
    assert_eq!(running["status"]["ready"], true, "{running:#}");
    let pid = running["status"]["pid"].as_u64().unwrap();
    let cmdline =
        std::fs::read(format!("/proc/{pid}/cmdline")).expect("the container's process exists");
    assert!(
        String::from_utf8_lossy(&cmdline).contains("sleep"),
        "{:?}",
        String::from_utf8_lossy(&cmdline)
    );
    let uid = running["uid"].as_str().unwrap();
    assert_eq!(running["status"]["container_id"], uid);
    // The start took the spare supervisor spawned ahead; once it was reported, the agent
    // spawned the next.
    until(10, "no new spare supervisor after the start", || {
        common::spare_supervisors(up_pid, None)
            .iter()
            .any(|p| !spares_before.contains(p))
    });
    // On the data dir's file system, apart from the container's state (on a tmpfs).
    let log = data.join("agent/logs").join(uid).join("container.log");
    until(10, &format!("no output in {}", log.display()), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("stdout F hello from hive")
    });
    // The same output through the API, by instance and by service.
    let name = running["name"].as_str().unwrap();
    assert_eq!(ok(cfg, &["logs", name]), "hello from hive\n");
    assert_eq!(
        ok(cfg, &["logs", "--tail", "1", "web"]),
        "hello from hive\n"
    );
    let stamped = ok(cfg, &["logs", "-t", "web"]);
    let (time, rest) = stamped.split_once(' ').unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(time).is_ok(),
        "{stamped}"
    );
    assert_eq!(rest, "hello from hive\n");

    // exec: output, stderr apart, the exit code passed on, stdin, a terminal.
    assert_eq!(
        ok(cfg, &["exec", name, "echo", "hi", "there"]),
        "hi there\n"
    );
    let out = common::hive(
        cfg,
        &["exec", "web", "sh", "-c", "echo out; echo err >&2; exit 42"],
    );
    assert_eq!(out.status.code(), Some(42));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    let mut child = common::hive_command(cfg)
        .args(["exec", "-i", "web", "sh", "-c", "tr a-z A-Z; echo done"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"piped through\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "PIPED THROUGH\ndone\n"
    );
    let tty = ok(cfg, &["exec", "-t", "web", "sh", "-c", "tty; stty size"]);
    assert_eq!(tty, "/dev/pts/0\r\n24 80\r\n");
    // Bad input: no such program, an instance that is not there.
    let out = common::hive(cfg, &["exec", "web", "/no/such/program"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        // runc says "no such file", crun "No such file".
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("no such file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::fails(cfg, &["exec", "web-nope1", "true"], "not found");

    ok(cfg, &["scale", "web", "0"]);
    let rootfs_dir = data
        .join("agent/images/instances")
        .to_string_lossy()
        .into_owned();
    let cgroup =
        Path::new("/sys/fs/cgroup/memory/hive/default/").join(running["name"].as_str().unwrap());
    let t0 = Instant::now();
    loop {
        let left = [
            ("instances", !instances(cfg).is_empty()),
            ("process", Path::new(&format!("/proc/{pid}")).exists()),
            ("container dir", log.exists()),
            (
                "rootfs mount",
                std::fs::read_to_string("/proc/mounts")
                    .unwrap()
                    .contains(&rootfs_dir),
            ),
            ("cgroup", cgroup.exists()),
        ];
        let left: Vec<&str> = left.iter().filter(|(_, l)| *l).map(|(w, _)| *w).collect();
        if left.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "scaled to zero, still there: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(s);
}

#[test]
fn run_logs_follow_restart_policies_and_rm() {
    let s = setup();
    let (cfg, image) = (&s.cfg, &s.image);

    // A one-shot command: `logs -f` streams it and ends when the container exits.
    let out = ok(
        cfg,
        &[
            "run",
            "--name",
            "count",
            "--restart",
            "never",
            image,
            "sh",
            "-c",
            "for i in 1 2 3 4 5; do echo n$i; sleep 0.3; done; echo bye >&2",
        ],
    );
    assert!(out.starts_with("count: instance count-"), "{out}");
    let t0 = Instant::now();
    let followed = ok(cfg, &["logs", "-f", "count"]);
    assert_eq!(followed, "n1\nn2\nn3\nn4\nn5\nbye\n");
    assert!(t0.elapsed() < Duration::from_secs(30));
    let done = wait_instance(cfg, "count", 30, |i| i["status"]["phase"] == "succeeded");
    assert_eq!(done["status"]["exit_code"], 0);
    assert_eq!(done["status"]["reason"], "Completed");

    // on-failure restarts a failing command with backoff and counts it; never does not.
    ok(
        cfg,
        &[
            "run",
            "--name",
            "flaky",
            "--restart",
            "on-failure",
            "-d",
            image,
            "sh",
            "-c",
            "echo try; exit 3",
        ],
    );
    ok(
        cfg,
        &[
            "run",
            "--name",
            "broken",
            "--restart",
            "never",
            "-d",
            image,
            "sh",
            "-c",
            "exit 7",
        ],
    );
    let flaky = wait_instance(cfg, "flaky", 60, |i| {
        i["status"]["restarts"].as_u64().unwrap_or(0) >= 2
    });
    assert_ne!(flaky["status"]["reason"], "RootfsFailed", "{flaky:#}");
    let broken = wait_instance(cfg, "broken", 30, |i| i["status"]["phase"] == "failed");
    assert_eq!(broken["status"]["exit_code"], 7);
    assert_eq!(broken["status"]["reason"], "Error");
    assert_eq!(broken["status"]["restarts"], 0);

    // Bad input: an image that is not there fails `run` with the agent's reason.
    let out = common::hive(
        cfg,
        &["run", "--name", "ghost", &format!("{image}-missing")],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ImagePullFailed"), "{err}");

    // Another tenant cannot read these logs, nor learn that they exist.
    ok(cfg, &["tenant", "create", "other"]);
    let created = json(
        cfg,
        &["--tenant", "other", "token", "create", "--role", "viewer"],
    );
    let token = created["token"].as_str().unwrap();
    let theirs = common::hive(
        cfg,
        &[
            "--server", &s.up.url, "--token", token, "--tenant", "default", "logs", "count",
        ],
    );
    assert_eq!(theirs.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&theirs.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&theirs.stderr)
    );

    // exec needs a member of the tenant: a viewer of another tenant learns nothing, a
    // viewer of this one is refused.
    let theirs = common::hive(
        cfg,
        &[
            "--server", &s.up.url, "--token", token, "--tenant", "default", "exec", "count", "true",
        ],
    );
    assert_eq!(theirs.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&theirs.stderr).contains("not found"));
    let viewer = json(cfg, &["token", "create", "--role", "viewer"]);
    let viewer = viewer["token"].as_str().unwrap();
    let refused = common::hive(
        cfg,
        &[
            "--server",
            &s.up.url,
            "--token",
            viewer,
            "--tenant",
            "default",
            "exec",
            flaky["name"].as_str().unwrap(),
            "true",
        ],
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("forbidden"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // rm deletes the services; the agent removes their containers.
    ok(cfg, &["rm", "count", "flaky", "broken", "ghost"]);
    assert!(instances(cfg).is_empty());
    let containers = s.data.join("agent/containers");
    until(30, "containers left after rm", || {
        std::fs::read_dir(&containers).unwrap().count() == 0
    });
    drop(s);
}

#[test]
fn containers_survive_a_kill_9_of_hive_up_and_are_adopted_again() {
    let mut s = setup();
    let (cfg, image) = (s.cfg.clone(), s.image.clone());
    ok(
        &cfg,
        &[
            "service",
            "create",
            "idle",
            "--image",
            &image,
            "--replicas",
            "20",
            "--memory",
            "16Mi",
            "--",
            "sleep",
            "1000",
        ],
    );
    let t0 = Instant::now();
    let before = loop {
        let list = instances(&cfg);
        let running: Vec<&Value> = list
            .iter()
            .filter(|i| i["status"]["phase"] == "running")
            .collect();
        if running.len() == 20 {
            break list;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{} of 20 running",
            running.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let pids = |list: &[Value]| -> std::collections::BTreeMap<String, u64> {
        list.iter()
            .map(|i| {
                (
                    i["name"].as_str().unwrap().to_owned(),
                    i["status"]["pid"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    let want = pids(&before);

    // kill -9 of the server and its agent; every container keeps running meanwhile.
    s.up.child.kill().unwrap();
    s.up.child.wait().unwrap();
    for pid in want.values() {
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} died"
        );
    }
    let ns = s.up.netns.clone().unwrap();
    s.up = start_up_in(&ns, &s.data, &cfg);
    // Let the new agent see everything a few times over.
    std::thread::sleep(Duration::from_secs(3));
    let after = instances(&cfg);
    assert_eq!(pids(&after), want, "containers were restarted or lost");
    for i in &after {
        assert_eq!(i["status"]["phase"], "running", "{i:#}");
        assert_eq!(i["status"]["restarts"], 0, "{i:#}");
    }
    for pid in want.values() {
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} died"
        );
    }
    // And the adopted containers are still under control: scaling down removes them.
    ok(&cfg, &["scale", "idle", "0"]);
    until(60, "adopted containers not stopped", || {
        !want
            .values()
            .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
    });
    drop(s);
}

#[test]
fn a_starting_agent_removes_what_unfinished_starts_left_and_keeps_what_it_adopts() {
    let mut s = setup();
    let (cfg, image, data) = (s.cfg.clone(), s.image.clone(), s.data.clone());
    ok(
        &cfg,
        &[
            "service", "create", "keep", "--image", &image, "--", "sleep", "1000",
        ],
    );
    let kept = wait_instance(&cfg, "keep", 60, |i| i["status"]["phase"] == "running");
    let pid = kept["status"]["pid"].as_u64().unwrap();
    let uid = kept["uid"].as_str().unwrap().to_owned();
    let kept_cgroup = format!("/hive/default/{}", kept["name"].as_str().unwrap());
    let agent = data.join("agent");
    let kept_rootfs = agent.join("images/instances").join(&uid).join("rootfs");
    s.up.child.kill().unwrap();
    s.up.child.wait().unwrap();

    // What a crash mid-start leaves. A root filesystem composed for a container whose
    // directory was never made (an overlay mount):
    let ghost = agent
        .join("images/instances")
        .join("0bad0000-0000-4000-8000-00000000000a");
    let lower = data.join("ghost-lower");
    for d in [
        &lower,
        &ghost.join("upper"),
        &ghost.join("work"),
        &ghost.join("rootfs"),
    ] {
        std::fs::create_dir_all(d).unwrap();
    }
    common::run(
        "mount",
        &[
            "-t",
            "overlay",
            "overlay",
            "-o",
            &format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                ghost.join("upper").display(),
                ghost.join("work").display()
            ),
            ghost.join("rootfs").to_str().unwrap(),
        ],
    );
    // A container the runtime never finished making: its bundle, no start record, the
    // runtime's directory without its state, its cgroup in every hierarchy with a process
    // in it (as runc's init waiting to be started would be).
    let half = "0bad0000-0000-4000-8000-00000000000b";
    let half_cgroup = format!("/hive/default/half-{}", s.up.netns.as_ref().unwrap().prefix);
    let bundle = agent.join("containers").join(half).join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let mut spec: Value = serde_json::from_slice(
        &std::fs::read(
            agent
                .join("containers")
                .join(&uid)
                .join("bundle/config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    spec["linux"]["cgroupsPath"] = Value::from(half_cgroup.clone());
    std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    std::fs::create_dir_all(agent.join("runtime").join(half)).unwrap();
    let mut waiting = common::Killed(
        std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap(),
    );
    let waiting_pid = waiting.0.id();
    for root in common::cgroup_roots() {
        let dir = root.join(half_cgroup.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        if root.ends_with("memory") || root.ends_with("pids") {
            std::fs::write(dir.join("cgroup.procs"), waiting_pid.to_string()).unwrap();
        }
    }
    assert!(common::cgroup_dirs(&half_cgroup).len() > 2);
    // The logs of a container whose state is gone (as a reboot empties the state's tmpfs).
    let orphan_logs = agent
        .join("logs")
        .join("0bad0000-0000-4000-8000-00000000000c");
    std::fs::create_dir_all(&orphan_logs).unwrap();
    std::fs::write(orphan_logs.join("container.log"), b"old\n").unwrap();

    // The restarted agent removes all of it before it acts, and keeps what ran.
    let ns = s.up.netns.clone().unwrap();
    s.up = start_up_in(&ns, &data, &cfg);
    let mounted = |p: &Path| common::mounts().iter().any(|(m, _)| m == p);
    until(
        20,
        "the leftovers of unfinished starts are still there",
        || {
            !mounted(&ghost.join("rootfs"))
                && !ghost.exists()
                && !agent.join("containers").join(half).exists()
                && !agent.join("runtime").join(half).exists()
                && !orphan_logs.exists()
                && common::cgroup_dirs(&half_cgroup).is_empty()
        },
    );
    let _ = waiting.0.wait();
    assert!(!common::alive(u64::from(waiting_pid)));
    assert!(common::alive(pid), "the adopted container was killed");
    assert!(
        mounted(&kept_rootfs),
        "the adopted container lost its rootfs"
    );
    assert!(common::cgroup_dirs(&kept_cgroup).len() > 2);
    std::thread::sleep(Duration::from_secs(2));
    let after = wait_instance(&cfg, "keep", 10, |i| i["status"]["phase"] == "running");
    assert_eq!(
        (
            after["status"]["pid"].as_u64(),
            after["status"]["restarts"].as_u64()
        ),
        (Some(pid), Some(0)),
        "{after:#}"
    );
    drop(s);
}

#[test]
fn three_agents_one_killed_its_instances_run_elsewhere_and_it_cleans_up_when_back() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cli.json");
    // Leftovers of every agent are removed whatever happens (declared first: dropped last).
    let _cleanup: Vec<Cleanup> = (1..=3)
        .map(|i| Cleanup {
            agent_dir: dir.path().join(format!("n{i}")),
        })
        .collect();
    let cluster = Cluster::new();
    let server = cluster.start_server(
        &dir.path().join("server"),
        dir.path(),
        &["--node-grace-secs", "6"],
    );
    let token = admin_token(&dir.path().join("server"));
    ok(
        &cfg,
        &[
            "login",
            "--server",
            &server.url,
            "--token",
            &token,
            "--tenant",
            "default",
        ],
    );
    ok(&cfg, &["tenant", "create", "default"]);
    let host = server.url.trim_start_matches("http://").to_owned();
    let layout = busybox_layout(dir.path());
    let image = push_test_image(&cluster.hub, &layout, &host, &token, "default/busybox");
    let mut agents: Vec<Up> = (1..=3)
        .map(|i| {
            cluster.start_agent(
                &server.url,
                &token,
                &format!("n{i}"),
                &dir.path().join(format!("n{i}")),
            )
        })
        .collect();
    ok(
        &cfg,
        &[
            "service",
            "create",
            "web",
            "--image",
            &image,
            "--replicas",
            "3",
            "--",
            "sleep",
            "1000",
        ],
    );
    let running_on = |cfg: &Path| -> Vec<(String, String)> {
        instances(cfg)
            .iter()
            .filter(|i| i["status"]["phase"] == "running")
            .map(|i| {
                (
                    i["name"].as_str().unwrap().to_owned(),
                    i["spec"]["node"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    };
    let t0 = Instant::now();
    let before = loop {
        let r = running_on(&cfg);
        let nodes: std::collections::BTreeSet<&String> = r.iter().map(|(_, n)| n).collect();
        if r.len() == 3 && nodes.len() == 3 {
            break r;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "not spread: {r:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let lost = before.iter().find(|(_, n)| n == "n1").unwrap().0.clone();

    // kill -9 of n1's agent: within the grace (6 s; agents renew every 5 s), a sweep and a
    // start, its instance runs elsewhere: under 10 s in all.
    agents[0].child.kill().unwrap();
    agents[0].child.wait().unwrap();
    let t0 = Instant::now();
    loop {
        let r = running_on(&cfg);
        if r.len() == 3 && r.iter().all(|(name, node)| *name != lost && node != "n1") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "not replaced in 10 s: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let events = ok(&cfg, &["events"]);
    assert!(
        events.contains("NodeLost") && events.contains(&lost),
        "{events}"
    );

    // n1's container still runs (its supervisor outlived the agent) until the agent is back
    // and finds its instance gone; then it removes it. The service stays at 3.
    let n1_containers = dir.path().join("n1/containers");
    assert_eq!(std::fs::read_dir(&n1_containers).unwrap().count(), 1);
    agents[0] = cluster.start_agent(&server.url, &token, "n1", &dir.path().join("n1"));
    until(30, "n1 kept the container of its replaced instance", || {
        std::fs::read_dir(&n1_containers).unwrap().count() == 0
    });
    assert_eq!(running_on(&cfg).len(), 3);
    ok(&cfg, &["scale", "web", "0"]);
    until(30, "containers left", || {
        (1..=3).all(|i| {
            std::fs::read_dir(dir.path().join(format!("n{i}/containers"))).map_or(0, |d| d.count())
                == 0
        })
    });
    drop(agents);
    drop(server);
}

#[test]
fn probes_decide_ready_restart_the_unhealthy_and_usage_is_reported() {
    let s = setup();
    // Ready only once it serves /ready, three seconds after it starts.
    let script = "sleep 3; mkdir -p /www; echo ok > /www/ready; \
                  exec busybox httpd -f -p 8080 -h /www";
    ok(
        &s.cfg,
        &[
            "run",
            "--name",
            "slow",
            "--readiness",
            "http:8080/ready",
            "--probe-every",
            "1",
            &s.image,
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let early = wait_instance(&s.cfg, "slow", 30, |i| i["status"]["phase"] == "running");
    assert_eq!(early["status"]["ready"], false, "{early:#}");
    let ready = wait_instance(&s.cfg, "slow", 30, |i| i["status"]["ready"] == true);
    assert_eq!(ready["status"]["reason"], Value::Null, "{ready:#}");
    // Usage from its cgroups.
    let usage = &ready["status"]["usage"];
    assert!(usage["memory_bytes"].as_u64().unwrap() > 0, "{usage}");
    assert!(usage["pids"].as_u64().unwrap() >= 1, "{usage}");
    assert!(usage["cpu_nanos"].as_u64().is_some(), "{usage}");

    // Alive for three seconds, then its liveness check fails twice: stopped (it exits on
    // SIGTERM) and, by its restart policy, started again.
    let script = "trap 'exit 1' TERM; busybox touch /tmp/alive; sleep 3; busybox rm /tmp/alive; \
                  while true; do sleep 1; done";
    ok(
        &s.cfg,
        &[
            "run",
            "--name",
            "flaky",
            "--liveness",
            "exec:busybox test -f /tmp/alive",
            "--probe-every",
            "1",
            "--probe-failures",
            "2",
            &s.image,
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let first = wait_instance(&s.cfg, "flaky", 30, |i| i["status"]["phase"] == "running");
    let restarted = wait_instance(&s.cfg, "flaky", 40, |i| {
        i["status"]["restarts"].as_u64() >= Some(1) && i["status"]["phase"] == "running"
    });
    assert_ne!(restarted["status"]["pid"], first["status"]["pid"]);
    ok(&s.cfg, &["rm", "slow", "flaky"]);
}

/// Polls a service from inside another container's network, the whole time, like a client
/// with client-side load balancing: before every request it reads the service's ready
/// instances from the API (there is no service address yet) and asks the next one.
struct Poller {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Result<String, String>>>>,
}

impl Poller {
    fn start(cfg: &Path, service: &str, from_pid: u64) -> Poller {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cfg, service, flag) = (cfg.to_owned(), service.to_owned(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut next = 0usize;
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                let ips: Vec<String> = instances(&cfg)
                    .iter()
                    .filter(|i| i["spec"]["service"] == service.as_str())
                    .filter(|i| i["status"]["ready"] == true)
                    .filter_map(|i| i["status"]["ip"].as_str().map(str::to_owned))
                    .filter(|ip| !ip.is_empty())
                    .collect();
                if ips.is_empty() {
                    seen.push(Err("no ready instance".to_owned()));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                next += 1;
                let ip = &ips[next % ips.len()];
                let out = std::process::Command::new("nsenter")
                    .args(["-t", &from_pid.to_string(), "-n", "--"])
                    .args(["curl", "-sS", "--max-time", "3"])
                    .arg(format!("http://{ip}:8080/"))
                    .output()
                    .expect("nsenter curl");
                let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                seen.push(if out.status.success() && body.starts_with("hello ") {
                    Ok(body)
                } else {
                    Err(format!(
                        "{ip}: {} {body}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ))
                });
            }
            seen
        });
        Poller {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops polling; every answer, in order.
    fn finish(mut self) -> Vec<Result<String, String>> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// The greeting part of an answer (`hello v2 from web-abcde` → `v2`).
fn version(body: &str) -> &str {
    body.split_whitespace().nth(1).unwrap_or_default()
}

fn assert_no_failures(what: &str, seen: &[Result<String, String>]) {
    let failed: Vec<&String> = seen.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        seen.len() >= 20,
        "{what}: only {} requests made",
        seen.len()
    );
    assert!(
        failed.is_empty(),
        "{what}: {} of {} requests failed: {failed:#?}",
        failed.len(),
        seen.len()
    );
    eprintln!("{what}: {} requests, none failed", seen.len());
}

#[test]
fn rolling_and_canary_updates_under_a_polling_client_fail_no_request() {
    let s = setup();
    let (cfg, image) = (&s.cfg, &s.image);
    // httpd answers `hello $GREETING from <instance>`. On SIGTERM it keeps serving 2 s
    // (clients that read the instance list just before it was deleted still get an
    // answer), as a pre-stop drain would.
    let script = "busybox mkdir -p /www && \
                  echo \"hello $GREETING from $(busybox hostname)\" >/www/index.html && \
                  { busybox httpd -f -p 8080 -h /www & p=$!; \
                    trap \"sleep 2; busybox kill $p; exit 0\" TERM; wait $p; }";
    ok(
        cfg,
        &[
            "service",
            "create",
            "web",
            "--image",
            image,
            "--replicas",
            "3",
            "-e",
            "GREETING=v1",
            // Ready once httpd answers: what the rollout waits for.
            "--readiness",
            "http:8080/",
            "--probe-every",
            "1",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    ok(
        cfg,
        &[
            "service", "create", "probe", "--image", image, "--", "sleep", "100000",
        ],
    );
    let probe = wait_instance(cfg, "probe", 60, |i| i["status"]["phase"] == "running");
    let probe_pid = probe["status"]["pid"].as_u64().unwrap();
    ok(cfg, &["rollout", "status", "web", "--timeout", "60"]);

    // Rolling update (3 replicas, 25%/25%: one extra at a time, none unavailable).
    let poll = Poller::start(cfg, "web", probe_pid);
    std::thread::sleep(Duration::from_secs(2));
    ok(cfg, &["service", "update", "web", "-e", "GREETING=v2"]);
    let status = ok(cfg, &["rollout", "status", "web", "--timeout", "90"]);
    assert!(status.contains("3 of 3 updated and ready"), "{status}");
    std::thread::sleep(Duration::from_secs(2));
    let seen = poll.finish();
    assert_no_failures("rolling update", &seen);
    let last: Vec<&str> = seen
        .iter()
        .rev()
        .take(5)
        .flatten()
        .map(|b| version(b))
        .collect();
    assert_eq!(last, ["v2"; 5], "{seen:#?}");
    assert!(seen.iter().flatten().any(|b| version(b) == "v1"));
    let svc = json(cfg, &["service", "get", "web"]);
    assert_eq!(svc["status"]["template_revision"], 2);
    let reasons: Vec<String> = json(cfg, &["events"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap().to_owned())
        .collect();
    for r in ["RolloutStep", "RolloutComplete"] {
        assert!(reasons.iter().any(|x| x == r), "{r} not in {reasons:?}");
    }

    // Canary of one, then rollback: the two instances that kept v2 stay.
    let poll = Poller::start(cfg, "web", probe_pid);
    ok(
        cfg,
        &[
            "service",
            "update",
            "web",
            "--canary",
            "1",
            "-e",
            "GREETING=v3",
        ],
    );
    let status = ok(cfg, &["rollout", "status", "web", "--timeout", "90"]);
    assert!(status.contains("canary: 1 of 3"), "{status}");
    std::thread::sleep(Duration::from_secs(3));
    let versions: Vec<String> = instances(cfg)
        .iter()
        .filter(|i| i["spec"]["service"] == "web")
        .map(|i| {
            i["labels"]["hive.dev/revision"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let mut sorted = versions.clone();
    sorted.sort();
    assert_eq!(sorted, ["2", "2", "3"], "{versions:?}");
    ok(cfg, &["rollout", "rollback", "web"]);
    ok(cfg, &["rollout", "status", "web", "--timeout", "90"]);
    std::thread::sleep(Duration::from_secs(2));
    let seen = poll.finish();
    assert_no_failures("canary and rollback", &seen);
    assert!(
        seen.iter().flatten().any(|b| version(b) == "v3"),
        "the canary answered"
    );
    let last: Vec<&str> = seen
        .iter()
        .rev()
        .take(5)
        .flatten()
        .map(|b| version(b))
        .collect();
    assert_eq!(last, ["v2"; 5], "{seen:#?}");

    // Canary again, promoted: every instance on v4.
    let poll = Poller::start(cfg, "web", probe_pid);
    ok(cfg, &["service", "update", "web", "-e", "GREETING=v4"]);
    ok(cfg, &["rollout", "status", "web", "--timeout", "90"]);
    ok(cfg, &["rollout", "promote", "web"]);
    let status = ok(cfg, &["rollout", "status", "web", "--timeout", "90"]);
    assert!(status.contains("3 of 3 updated and ready"), "{status}");
    std::thread::sleep(Duration::from_secs(2));
    let seen = poll.finish();
    assert_no_failures("canary and promote", &seen);
    let last: Vec<&str> = seen
        .iter()
        .rev()
        .take(5)
        .flatten()
        .map(|b| version(b))
        .collect();
    assert_eq!(last, ["v4"; 5], "{seen:#?}");

    // An image that does not exist: the rollout stalls, the service keeps serving, undo
    // restores.
    let poll = Poller::start(cfg, "web", probe_pid);
    let missing = image.replace("busybox:test", "nope:test");
    ok(
        cfg,
        &[
            "service",
            "update",
            "web",
            "--rolling",
            "1:0",
            "--image",
            &missing,
        ],
    );
    common::fails(
        cfg,
        &["rollout", "status", "web", "--timeout", "60"],
        "ImagePullFailed",
    );
    // Stalled, it stays put: three v4 instances serve, the one new instance waits.
    std::thread::sleep(Duration::from_secs(3));
    let web: Vec<Value> = instances(cfg)
        .into_iter()
        .filter(|i| i["spec"]["service"] == "web")
        .collect();
    let serving = web
        .iter()
        .filter(|i| i["status"]["ready"] == true && i["labels"]["hive.dev/revision"] == "5")
        .count();
    assert_eq!((web.len(), serving), (4, 3), "{web:#?}");
    ok(cfg, &["rollout", "undo", "web"]);
    ok(cfg, &["rollout", "status", "web", "--timeout", "60"]);
    std::thread::sleep(Duration::from_secs(1));
    let seen = poll.finish();
    assert_no_failures("stalled rollout and undo", &seen);
    let history = ok(cfg, &["rollout", "history", "web"]);
    assert!(history.contains("undo to revision 5"), "{history}");
    assert!(history.contains("rollback of revision 3 to 2"), "{history}");
    drop(s);
}

#[test]
fn unused_images_are_collected_under_the_budget_and_used_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("cli.json");
    let _cleanup = Cleanup::of(&data);
    // A budget of nothing, collected every second: only what runs may stay.
    let up = common::start_up_with(
        &common::Netns::new(),
        &data,
        &cfg,
        &["--image-budget", "0", "--image-gc-secs", "1"],
    );
    let host = up.url.trim_start_matches("http://").to_owned();
    let layout = busybox_layout(dir.path());
    let image = push_test_image(
        up.netns.as_ref().unwrap(),
        &layout,
        &host,
        &admin_token(&data),
        "default/busybox",
    );
    let layers = data.join("agent/images/layers");
    let count = |p: &Path| std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0);
    ok(
        &cfg,
        &["run", "--name", "keep", &image, "--", "sleep", "100000"],
    );
    wait_instance(&cfg, "keep", 30, |i| i["status"]["phase"] == "running");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        count(&layers) > 0,
        "a layer of a running instance was collected"
    );
    let running = wait_instance(&cfg, "keep", 5, |i| i["status"]["phase"] == "running");
    assert_eq!(running["status"]["restarts"], 0);
    ok(&cfg, &["rm", "keep"]);
    until(30, "the unused image collected", || {
        count(&layers) == 0 && count(&data.join("agent/images/images")) == 0
    });
    drop(up);
}

/// The saved instance cache of node `n1` for tenant `default`: its revision and the uids of
/// the instances bound to the node.
fn saved_cache(agent_dir: &Path) -> Option<(u64, Vec<String>)> {
    let bytes = std::fs::read(agent_dir.join("watch/tenants/default.json")).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    let bound = v["instances"]
        .as_array()?
        .iter()
        .filter(|i| i["spec"]["node"] == "n1")
        .map(|i| i["uid"].as_str().unwrap_or("").to_owned())
        .collect();
    Some((v["revision"].as_u64()?, bound))
}

/// How the agent's cache of tenant `default` started (`watch/catch-up.json`).
fn catch_up(agent_dir: &Path) -> Value {
    let path = agent_dir.join("watch/catch-up.json");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice::<Value>(&bytes).unwrap()["default"].clone()
}

#[test]
fn a_restarted_agent_catches_up_from_its_saved_revision() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cli.json");
    let agent_dir = dir.path().join("n1");
    // Leftovers are removed whatever happens (declared first: dropped last).
    let _cleanup = Cleanup {
        agent_dir: agent_dir.clone(),
    };
    let cluster = Cluster::new();
    // The node stays (its lease within the grace) while its agent is down.
    let server = cluster.start_server(
        &dir.path().join("server"),
        dir.path(),
        &["--node-grace-secs", "300"],
    );
    let token = admin_token(&dir.path().join("server"));
    let login = [
        "login",
        "--server",
        &server.url,
        "--token",
        &token,
        "--tenant",
        "default",
    ];
    ok(&cfg, &login);
    ok(&cfg, &["tenant", "create", "default"]);
    let host = server.url.trim_start_matches("http://").to_owned();
    let layout = busybox_layout(dir.path());
    let image = push_test_image(&cluster.hub, &layout, &host, &token, "default/busybox");
    let mut agent = cluster.start_agent(&server.url, &token, "n1", &agent_dir);
    for (name, replicas) in [("keep", "3"), ("gone", "1"), ("shrink", "2")] {
        ok(
            &cfg,
            &[
                "service",
                "create",
                name,
                "--image",
                &image,
                "--replicas",
                replicas,
                "--",
                "sleep",
                "1000",
            ],
        );
    }
    // service → name → pid of its running instances.
    let running = |cfg: &Path| -> std::collections::BTreeMap<String, (String, u64)> {
        instances(cfg)
            .iter()
            .filter(|i| i["status"]["phase"] == "running")
            .map(|i| {
                (
                    i["name"].as_str().unwrap().to_owned(),
                    (
                        i["spec"]["service"].as_str().unwrap().to_owned(),
                        i["status"]["pid"].as_u64().unwrap(),
                    ),
                )
            })
            .collect()
    };
    let t0 = Instant::now();
    let before = loop {
        let r = running(&cfg);
        if r.len() == 6 {
            break r;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{} of 6 running",
            r.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // A first start lists (nothing was saved); the cache is saved as its containers start.
    assert_eq!(
        catch_up(&agent_dir)["start"],
        "listed",
        "{}",
        catch_up(&agent_dir)
    );
    let (_, bound) = saved_cache(&agent_dir).expect("a saved instance cache");
    assert_eq!(bound.len(), 6, "{bound:?}");

    // kill -9 of the agent alone; meanwhile one service goes, one shrinks, one is added.
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    let (from, _) = saved_cache(&agent_dir).unwrap();
    ok(&cfg, &["rm", "gone"]);
    ok(&cfg, &["scale", "shrink", "1"]);
    ok(
        &cfg,
        &[
            "service", "create", "added", "--image", &image, "--", "sleep", "1000",
        ],
    );
    until(30, "the new instance not placed", || {
        instances(&cfg)
            .iter()
            .any(|i| i["spec"]["service"] == "added" && i["spec"]["node"] == "n1")
    });
    let wanted: Vec<String> = instances(&cfg)
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(wanted.len(), 5, "{wanted:?}");

    let t0 = Instant::now();
    agent = cluster.start_agent(&server.url, &token, "n1", &agent_dir);
    // The instances left run in the same containers; the deleted ones' are stopped; the
    // added one runs.
    let pid_alive = |pid: u64| Path::new(&format!("/proc/{pid}")).exists();
    let t_start = Instant::now();
    let after = loop {
        let r = running(&cfg);
        let stale_alive: Vec<u64> = before
            .iter()
            .filter(|(name, _)| !wanted.contains(name))
            .map(|(_, (_, pid))| *pid)
            .filter(|pid| pid_alive(*pid))
            .collect();
        if r.len() == 5 && r.keys().all(|n| wanted.contains(n)) && stale_alive.is_empty() {
            break r;
        }
        assert!(
            t_start.elapsed() < Duration::from_secs(60),
            "after the restart: running {r:?}, want {wanted:?}; deleted instances' pids \
             still alive: {stale_alive:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let caught_up_in = t0.elapsed();
    for (name, (service, pid)) in &after {
        if let Some((_, old)) = before.get(name) {
            assert_eq!(pid, old, "{name} of {service} was restarted");
        } else {
            assert_eq!(service, "added", "{name}");
        }
    }
    for i in instances(&cfg) {
        assert_eq!(i["status"]["restarts"], 0, "{i:#}");
    }
    // It resumed from the saved revision and read only what changed meanwhile: the deletes
    // of two instances, the new instance and its placement (status writes between the last
    // save and the kill may add a few).
    let report = catch_up(&agent_dir);
    assert_eq!(report["start"], "resumed", "{report}");
    assert_eq!(report["from"], from, "{report}");
    assert_eq!(report["caught_up"], true, "{report}");
    let changes = report["changes"].as_u64().unwrap();
    assert!(
        (3..=30).contains(&changes),
        "{changes} changes caught up: {report}"
    );
    eprintln!("resumed from revision {from}: {changes} changes, all running in {caught_up_in:?}");

    // A corrupt saved cache: the next start lists, and still adopts every container.
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    std::fs::write(
        agent_dir.join("watch/tenants/default.json"),
        b"{\"version\": 1, \"node",
    )
    .unwrap();
    agent = cluster.start_agent(&server.url, &token, "n1", &agent_dir);
    until(
        30,
        "no catch-up report after a start from a corrupt file",
        || catch_up(&agent_dir)["start"] == "listed",
    );
    assert_eq!(catch_up(&agent_dir)["reason"], "no saved state");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        running(&cfg),
        after,
        "containers changed after a listing start"
    );

    for s in ["keep", "shrink", "added"] {
        ok(&cfg, &["scale", s, "0"]);
    }
    let containers = agent_dir.join("containers");
    until(60, "containers left", || {
        std::fs::read_dir(&containers).map_or(0, |d| d.count()) == 0
    });
    drop(agent);
    drop(server);
}

/// A terminal exec's process asks for its size first thing, 48 times, 4 at once (the agent,
/// the runtime and the container busy meanwhile). Every session shows exactly what the
/// process wrote, each line ending in `\r\n` once, nothing of the runtime's own (crun's red
/// error lines once were), and exits with the process's code; nothing of the sessions stays.
/// With runc the process always has its size: the process spec carries it and runc applies
/// it before the process runs (it used to get one only at runc's first resize, after the
/// start: under load busybox `stty size` saw 0 rows and said `standard input: No child
/// processes`). crun 1.8 applies the same size only after the process may have started (the
/// process gets SIGWINCH then): those sessions are counted, not failed.
#[test]
fn a_terminal_exec_with_runc_has_its_size_and_crlf_newlines_from_the_start_even_under_load() {
    terminal_exec_under_load("runc");
}

#[test]
fn a_terminal_exec_with_crun_has_crlf_newlines_and_nothing_of_crun_even_under_load() {
    terminal_exec_under_load("crun");
}

/// A terminal exec whose client goes away is hung up on, like a closed terminal: its
/// process gets SIGHUP and ends (runc forwards it; with crun the agent signals the
/// terminal's foreground process group).
#[test]
fn a_terminal_exec_whose_client_goes_away_ends_its_process() {
    for (runtime, secs) in [("runc", "31337"), ("crun", "31338")] {
        let s = running_web(runtime);
        let cfg = &s.cfg;
        // The exec's `sleep`, found by its command line among the host's processes.
        let running = || {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .any(|c| c == format!("sleep\0{secs}\0").as_bytes())
        };
        let mut client = common::hive_command(cfg)
            .args(["exec", "-t", "web", "--", "sleep", secs])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        until(30, &format!("{runtime}: the exec's process runs"), running);
        client.kill().unwrap();
        client.wait().unwrap();
        until(
            30,
            &format!("{runtime}: the exec's process ended after its client went away"),
            || !running(),
        );
        ok(cfg, &["rm", "web"]);
    }
}

/// `hive up` with `runtime` and a service `web` whose one container runs.
fn running_web(runtime: &str) -> Setup {
    let s = setup_with(&["--runtime", runtime]);
    ok(
        &s.cfg,
        &[
            "service", "create", "web", "--image", &s.image, "--", "sleep", "1000",
        ],
    );
    wait_instance(&s.cfg, "web", 60, |i| i["status"]["phase"] == "running");
    s
}

fn terminal_exec_under_load(runtime: &str) {
    let s = running_web(runtime);
    let cfg = &s.cfg;
    // busybox `stty size` on a terminal of 0 rows.
    const SIZE_LATE: &str = "stty: standard input\r\ndone\r\n";
    let late = std::sync::atomic::AtomicUsize::new(0);
    let failures: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    (0..12)
                        .filter_map(|_| {
                            let out = common::hive(
                                cfg,
                                &["exec", "-t", "web", "sh", "-c", "stty size; echo done"],
                            );
                            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                            if runtime == "crun" && stdout == SIZE_LATE && out.status.success() {
                                late.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                return None;
                            }
                            // What a terminal shows: each line ends in `\r\n`, once.
                            (stdout != "24 80\r\ndone\r\n" || !out.status.success()).then(|| {
                                format!(
                                    "{:?}: {stdout:?} {:?}",
                                    out.status.code(),
                                    String::from_utf8_lossy(&out.stderr)
                                )
                            })
                        })
                        .collect::<Vec<String>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} of 48 failed: {failures:#?}",
        failures.len()
    );
    eprintln!(
        "{runtime}: {} of 48 sessions saw their size only after they started",
        late.into_inner()
    );
    // Nothing of the sessions is left in the container's directory.
    let uid = instances(cfg)[0]["uid"].as_str().unwrap().to_owned();
    let dir = s.data.join("agent/containers").join(uid);
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with("exec-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    ok(cfg, &["rm", "web"]);
    until(30, "containers left after rm", || {
        std::fs::read_dir(s.data.join("agent/containers"))
            .unwrap()
            .count()
            == 0
    });
}
