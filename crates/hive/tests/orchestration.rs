//! End to end on one machine (root): `hive server` and `hive agent` processes registered as
//! pool nodes (not `--shared`), each with its own data dir and sized with `--cpus 600m
//! --memory 1Gi`, and two tenants.
//!
//! - Red scales a service 0 → 10 → 3 while blue runs and grows its own; a monitor polls the
//!   API and the agents' container directories the whole time and records any node that holds
//!   two tenants' instances or containers.
//! - With a 1 s pool grace, a node whose last instance is deleted while its container ignores
//!   SIGTERM (so it stops only at the agent's 10 s stop grace) stays bound to its tenant as
//!   long as the container's process lives, and goes to the waiting tenant after.
//! - A node bound to one tenant runs no other tenant's instance, whoever writes the binding
//!   (the API server refuses, the agent refuses what slips between).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Nodes, TwoTenants, json, ok};
use serde_json::Value;

const NODES: usize = 3;

/// What every agent offers (`hive agent --cpus --memory`), whatever the host has.
const AGENT_SIZE: [&str; 4] = ["--cpus", "600m", "--memory", "1Gi"];
/// A sixth of the agents' 600m: 6 instances fit on a node, 7 do not.
const CPU_REQUEST: &str = "100m";

/// Runs until stopped, and stops at once on SIGTERM (a shell as pid 1 ignores it otherwise,
/// and waits for the kill after the stop grace).
const STOPS_AT_ONCE: &str = "trap 'exit 0' TERM; while :; do sleep 1; done";
/// Runs until killed: as pid 1 without a handler, the shell ignores SIGTERM, so a stop takes
/// the agent's whole stop grace (10 s) and ends with SIGKILL.
const IGNORES_SIGTERM: &str = "while :; do sleep 1; done";

fn instances(cfg: &Path, tenant: &str) -> Vec<Value> {
    json(cfg, &["--tenant", tenant, "instance", "ls"])
        .as_array()
        .unwrap()
        .clone()
}

/// The tenant and instance of every container an agent has (from the cgroup path in its
/// bundle, `/hive/<tenant>/<instance>`). A container being made or removed may have no
/// readable bundle: it is skipped, the next look sees it.
fn containers(agent_dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(agent_dir.join("containers"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(raw) = std::fs::read(e.path().join("bundle/config.json")) else {
            continue;
        };
        let Ok(spec) = serde_json::from_slice::<Value>(&raw) else {
            continue;
        };
        let path = spec["linux"]["cgroupsPath"].as_str().unwrap_or_default();
        let mut parts = path.trim_start_matches('/').split('/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("hive"), Some(t), Some(i)) => out.push((t.to_owned(), i.to_owned())),
            _ => panic!("container {:?}: cgroup path {path:?}", e.path()),
        }
    }
    out
}

/// What one look at the cluster found wrong: a node with two tenants' instances, an
/// instance on a node bound to another tenant, an agent running two tenants' containers, a
/// node that changed tenants (the pool grace is longer than the test, so none may).
#[derive(Default)]
struct Watch {
    /// The tenant each node was first seen serving.
    owner: BTreeMap<String, String>,
    rounds: usize,
    violations: Vec<String>,
}

impl Watch {
    fn look(&mut self, cfg: &Path, dir: &Path) {
        let nodes = json(cfg, &["node", "ls"]);
        let mut on: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for t in ["red", "blue"] {
            for i in instances(cfg, t) {
                if let Some(n) = i["spec"]["node"].as_str() {
                    on.entry(n.to_owned()).or_default().insert(t.to_owned());
                }
            }
        }
        for n in nodes.as_array().unwrap() {
            let name = n["name"].as_str().unwrap();
            if n["spec"]["shared"] == true {
                self.violations.push(format!("node {name} is shared"));
            }
            let tenants = on.remove(name).unwrap_or_default();
            if tenants.len() > 1 {
                self.violations
                    .push(format!("node {name} has instances of {tenants:?}"));
            }
            // The node's binding is written just after its first instance's: unbound with
            // an instance is a moment in between, bound to another tenant never.
            if let Some(bound) = n["spec"]["tenant"].as_str()
                && tenants.iter().any(|t| t != bound)
            {
                self.violations.push(format!(
                    "node {name} is bound to {bound} but has instances of {tenants:?}"
                ));
            }
            let i: usize = name.trim_start_matches('n').parse().unwrap();
            let held: BTreeSet<String> = containers(&dir.join(format!("n{i}")))
                .into_iter()
                .map(|(t, _)| t)
                .collect();
            if held.len() > 1 {
                self.violations
                    .push(format!("agent of node {name} runs containers of {held:?}"));
            }
            let bound = n["spec"]["tenant"].as_str().map(str::to_owned);
            let seen = tenants.iter().chain(&held).chain(bound.as_ref());
            for t in seen {
                let first = self.owner.entry(name.to_owned()).or_insert(t.clone());
                if first != t {
                    self.violations
                        .push(format!("node {name} served {first}, then {t}"));
                }
            }
        }
        if !on.is_empty() {
            self.violations
                .push(format!("instances on nodes that do not exist: {on:?}"));
        }
        self.rounds += 1;
    }
}

/// Polls [`Watch::look`] in a thread until stopped.
struct Monitor {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Watch>>,
}

impl Monitor {
    fn start(cfg: PathBuf, dir: PathBuf) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut w = Watch::default();
            while !flag.load(Ordering::SeqCst) {
                w.look(&cfg, &dir);
            }
            w
        });
        Monitor {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Watch {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One running instance: name, node, pid.
type Running = (String, String, u64);

/// The instances of `service`, and those of them that run (with a node and a pid).
fn service_instances(cfg: &Path, tenant: &str, service: &str) -> (Vec<Value>, Vec<Running>) {
    let all: Vec<Value> = instances(cfg, tenant)
        .into_iter()
        .filter(|i| i["spec"]["service"] == service)
        .collect();
    let running = all
        .iter()
        .filter(|i| i["status"]["phase"] == "running")
        .filter_map(|i| {
            Some((
                i["name"].as_str()?.to_owned(),
                i["spec"]["node"].as_str()?.to_owned(),
                i["status"]["pid"].as_u64()?,
            ))
        })
        .collect();
    (all, running)
}

/// Waits until `service` has exactly `n` instances and all run; returns them.
fn wait_running(cfg: &Path, tenant: &str, service: &str, n: usize, secs: u64) -> Vec<Running> {
    let t0 = Instant::now();
    loop {
        let (all, running) = service_instances(cfg, tenant, service);
        if all.len() == n && running.len() == n {
            return running;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "{tenant}/{service}: {} of {n} running after {secs} s ({} instances): {all:#?}",
            running.len(),
            all.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Each instance is a live process in its tenant's cgroup, running the service's command.
fn assert_real_processes(tenant: &str, running: &[Running]) {
    for (name, node, pid) in running {
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap_or_else(|e| panic!("{tenant}/{name} on {node}: pid {pid}: {e}"));
        assert!(
            cgroup.contains(&format!("/hive/{tenant}/{name}")),
            "{tenant}/{name}: pid {pid} is in {cgroup}"
        );
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            String::from_utf8_lossy(&cmdline).contains("trap"),
            "{tenant}/{name}: pid {pid} runs {:?}",
            String::from_utf8_lossy(&cmdline)
        );
    }
}

/// Instances per node.
fn per_node(running: &[Running]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (_, node, _) in running {
        *m.entry(node.clone()).or_default() += 1;
    }
    m
}

/// The containers of `tenant` on every agent, by node.
fn containers_of(dir: &Path, tenant: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for i in 1..=NODES {
        for (t, inst) in containers(&dir.join(format!("n{i}"))) {
            if t == tenant {
                m.entry(format!("n{i}")).or_default().insert(inst);
            }
        }
    }
    m
}

/// The node's binding as (`spec.tenant`, the scheduler's `hive.dev/pool-bound` label).
fn bindings(cfg: &Path) -> BTreeMap<String, (Option<String>, Option<String>)> {
    json(cfg, &["node", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let s = |v: &Value| v.as_str().map(str::to_owned);
            (
                n["name"].as_str().unwrap().to_owned(),
                (
                    s(&n["spec"]["tenant"]),
                    s(&n["labels"]["hive.dev/pool-bound"]),
                ),
            )
        })
        .collect()
}

/// Every node offers what its agent was sized to, whatever the host has.
fn assert_sized(cfg: &Path) {
    let nodes = json(cfg, &["node", "ls"]);
    for n in nodes.as_array().unwrap() {
        let (cap, alloc) = (&n["status"]["capacity"], &n["status"]["allocatable"]);
        assert_eq!(alloc["cpu_millis"], 600, "{n:#}");
        assert_eq!(alloc["memory_bytes"], 1u64 << 30, "{n:#}");
        assert!(cap["cpu_millis"].as_u64().unwrap() >= 600, "{n:#}");
        assert!(cap["memory_bytes"].as_u64().unwrap() >= 1 << 30, "{n:#}");
    }
}

fn create(cfg: &Path, host: &str, tenant: &str, service: &str, replicas: u32, script: &str) {
    let image = format!("{host}/{tenant}/busybox:test");
    let replicas = replicas.to_string();
    ok(
        cfg,
        &[
            "--tenant",
            tenant,
            "service",
            "create",
            service,
            "--image",
            &image,
            "--replicas",
            &replicas,
            "--cpu-request",
            CPU_REQUEST,
            "--memory-request",
            "32Mi",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
}

#[test]
fn scale_0_10_3_on_pool_nodes_while_another_tenant_runs_and_no_node_mixes_tenants() {
    let t_start = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    // The pool grace is longer than the test: a node a tenant emptied stays its own, so
    // the monitor may also insist that no node ever changes tenants.
    let tt = TwoTenants::start_with(
        dir.path(),
        NODES,
        Nodes::Pool,
        &["--pool-grace-secs", "600"],
        &AGENT_SIZE,
    );
    let (cfg, host, d) = (&tt.cfg, &tt.host, dir.path());
    let b = bindings(cfg);
    assert_eq!(b.len(), NODES, "{b:?}");
    assert!(b.values().all(|v| *v == (None, None)), "{b:?}");
    assert_sized(cfg);

    // Scale 0: a service and nothing else; no node taken from the pool.
    create(cfg, host, "red", "web", 0, STOPS_AT_ONCE);
    std::thread::sleep(Duration::from_secs(1));
    assert!(instances(cfg, "red").is_empty());
    assert!(bindings(cfg).values().all(|v| *v == (None, None)));

    let monitor = Monitor::start(cfg.clone(), d.to_owned());
    // 0 → 10 for red while blue starts 3 of its own.
    ok(cfg, &["--tenant", "red", "scale", "web", "10"]);
    create(cfg, host, "blue", "api", 3, STOPS_AT_ONCE);
    let red = wait_running(cfg, "red", "web", 10, 60);
    let blue = wait_running(cfg, "blue", "api", 3, 30);
    let t_ten = t_start.elapsed();
    assert_real_processes("red", &red);
    assert_real_processes("blue", &blue);
    // Red fills one node (6 fit) before it takes a second; blue has the third.
    let mut counts: Vec<usize> = per_node(&red).into_values().collect();
    counts.sort();
    assert_eq!(counts, [4, 6], "{red:?}");
    let blue_nodes: BTreeSet<String> = per_node(&blue).into_keys().collect();
    assert_eq!(blue_nodes.len(), 1, "{blue:?}");
    let blue_node = blue_nodes.into_iter().next().unwrap();
    let red_nodes: BTreeSet<String> = per_node(&red).into_keys().collect();
    assert!(!red_nodes.contains(&blue_node), "{red:?} {blue:?}");
    // The agents hold exactly these containers.
    let want: BTreeMap<String, BTreeSet<String>> =
        red.iter().fold(BTreeMap::new(), |mut m, (n, node, _)| {
            m.entry(node.clone()).or_default().insert(n.clone());
            m
        });
    assert_eq!(containers_of(d, "red"), want);
    common::until(10, "nodes bound to their tenants", || {
        bindings(cfg).iter().all(|(n, (t, label))| {
            let owner = if *n == blue_node { "blue" } else { "red" };
            t.as_deref() == Some(owner) && label.as_deref() == Some(owner)
        })
    });

    // 10 → 3 for red while blue grows to 8: blue's node takes 6, and red's nodes, though
    // they have room now, are red's: blue's last two wait, saying why.
    ok(cfg, &["--tenant", "red", "scale", "web", "3"]);
    ok(cfg, &["--tenant", "blue", "scale", "api", "8"]);
    let red3 = wait_running(cfg, "red", "web", 3, 30);
    assert_real_processes("red", &red3);
    let kept: BTreeSet<&String> = red3.iter().map(|r| &r.0).collect();
    let gone: Vec<&Running> = red.iter().filter(|r| !kept.contains(&r.0)).collect();
    assert_eq!(gone.len(), 7, "the 3 left are 3 of the 10: {red3:?}");
    common::until(20, "containers of scaled-down instances removed", || {
        let left = containers_of(d, "red");
        left.values().map(BTreeSet::len).sum::<usize>() == 3
            && left.values().flatten().all(|i| kept.contains(i))
            && gone
                .iter()
                .all(|(_, _, pid)| !Path::new(&format!("/proc/{pid}")).exists())
    });
    let t0 = Instant::now();
    let (blue8, waiting) = loop {
        let (all, running) = service_instances(cfg, "blue", "api");
        let waiting: Vec<&Value> = all
            .iter()
            .filter(|i| i["spec"]["node"].is_null() && i["status"]["reason"] == "Unschedulable")
            .collect();
        if all.len() == 8 && running.len() == 6 && waiting.len() == 2 {
            let msgs: Vec<String> = waiting
                .iter()
                .map(|i| i["status"]["message"].as_str().unwrap().to_owned())
                .collect();
            break (running, msgs);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "blue: {} running, {} waiting: {all:#?}",
            running.len(),
            waiting.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_real_processes("blue", &blue8);
    assert_eq!(
        per_node(&blue8).into_keys().collect::<Vec<_>>(),
        [blue_node.as_str()]
    );
    for m in &waiting {
        assert_eq!(
            m, "0/3 nodes available: 2 bound to another tenant, 1 insufficient cpu",
            "{waiting:?}"
        );
    }
    let watch = monitor.finish();
    assert!(
        watch.violations.is_empty(),
        "over {} looks: {:#?}",
        watch.rounds,
        watch.violations
    );
    assert!(watch.rounds >= 5, "only {} looks", watch.rounds);
    // Every node was seen serving its tenant.
    assert_eq!(watch.owner.len(), NODES, "{:?}", watch.owner);
    let t_done = t_start.elapsed();

    // Scaled to zero, every container goes; the agents' directories are empty.
    ok(cfg, &["--tenant", "red", "scale", "web", "0"]);
    ok(cfg, &["--tenant", "blue", "scale", "api", "0"]);
    common::until(30, "containers left after scaling to zero", || {
        (1..=NODES).all(|i| containers(&d.join(format!("n{i}"))).is_empty())
    });
    eprintln!(
        "10 + 3 running after {:.1} s; scaled down, checked after {:.1} s; {} looks; all \
         gone after {:.1} s",
        t_ten.as_secs_f64(),
        t_done.as_secs_f64(),
        watch.rounds,
        t_start.elapsed().as_secs_f64()
    );
    drop(tt);
}

/// Node `name` as the API shows it.
fn node(cfg: &Path, name: &str) -> Value {
    json(cfg, &["node", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no node {name}"))
        .clone()
}

fn alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_pool_node_goes_back_only_once_its_containers_are_gone() {
    let t_start = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    // One pool node and a grace far shorter than the agent's 10 s stop grace.
    let tt = TwoTenants::start_with(
        dir.path(),
        1,
        Nodes::Pool,
        &["--pool-grace-secs", "1"],
        &AGENT_SIZE,
    );
    let (cfg, host, d) = (&tt.cfg, &tt.host, dir.path());
    assert_sized(cfg);

    // Red takes the node with one container that ignores SIGTERM.
    create(cfg, host, "red", "slow", 1, IGNORES_SIGTERM);
    let red = wait_running(cfg, "red", "slow", 1, 60);
    let (name, on, pid) = red[0].clone();
    assert_eq!(on, "n1");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroup.contains(&format!("/hive/red/{name}")), "{cgroup}");
    common::until(10, "n1 bound to red, reporting red's container", || {
        let n = node(cfg, "n1");
        n["spec"]["tenant"] == "red"
            && n["labels"]["hive.dev/pool-bound"] == "red"
            && n["status"]["containers"] == serde_json::json!({"red": 1})
    });
    // Blue waits: the only node is red's.
    create(cfg, host, "blue", "api", 1, STOPS_AT_ONCE);
    common::until(10, "blue's instance waiting for a node", || {
        instances(cfg, "blue").iter().any(|i| {
            i["spec"]["node"].is_null()
                && i["status"]["message"] == "0/1 nodes available: 1 bound to another tenant"
        })
    });

    // Red's instance goes from the API at once; its container stops for 10 s. All that time
    // the node stays red's, and says it still holds red's container.
    ok(cfg, &["--tenant", "red", "scale", "slow", "0"]);
    let t_scaled = Instant::now();
    let mut looks_without_instance = 0;
    let mut reported_while_stopping = 0;
    while alive(pid) {
        let n = node(cfg, "n1");
        let red_left = instances(cfg, "red").len();
        let blue_on_n1 = instances(cfg, "blue")
            .iter()
            .any(|i| i["spec"]["node"] == "n1");
        // Read before the pid is checked again: what was seen, was seen while it lived.
        if !alive(pid) {
            break;
        }
        assert_eq!(
            n["spec"]["tenant"],
            "red",
            "n1 left red {:.1} s after the scale-down while red's pid {pid} lives: {n:#}",
            t_scaled.elapsed().as_secs_f64()
        );
        assert!(!blue_on_n1, "blue placed on n1 beside red's live pid {pid}");
        if red_left == 0 {
            looks_without_instance += 1;
            if n["status"]["containers"]["red"] == 1 {
                reported_while_stopping += 1;
            }
        }
        assert!(
            t_scaled.elapsed() < Duration::from_secs(30),
            "red's pid {pid} outlived the stop grace by far"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let t_dead = t_scaled.elapsed();
    // The container really ignored SIGTERM (else the test proves nothing): it lived until
    // the stop grace ran out, most of it with no instance in the API.
    assert!(
        t_dead >= Duration::from_secs(8),
        "red's pid died after {t_dead:?}"
    );
    assert!(
        looks_without_instance >= 5,
        "{looks_without_instance} looks without red's instance"
    );
    assert!(
        reported_while_stopping >= 5,
        "{reported_while_stopping} looks with red's container reported"
    );

    // Gone: the node reports nothing, goes back after the 1 s grace, and blue gets it.
    let t_died = Instant::now();
    let returned_after = loop {
        let n = node(cfg, "n1");
        if n["spec"]["tenant"] != "red" {
            break t_died.elapsed();
        }
        assert!(
            t_died.elapsed() < Duration::from_secs(15),
            "n1 still red's 15 s after red's container died: {n:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // The grace counts from the container's end, not from the instance's deletion (10 s
    // before); the scheduler's 2 s tick adds at most 2 s, the report a little more.
    assert!(
        returned_after >= Duration::from_millis(800),
        "returned {returned_after:?} after red's container died"
    );
    let blue = wait_running(cfg, "blue", "api", 1, 30);
    assert_eq!(blue[0].1, "n1");
    assert_real_processes("blue", &blue);
    common::until(
        10,
        "n1 bound to blue, holding only blue's container",
        || {
            let n = node(cfg, "n1");
            n["spec"]["tenant"] == "blue"
                && n["labels"]["hive.dev/pool-bound"] == "blue"
                && n["status"]["containers"] == serde_json::json!({"blue": 1})
        },
    );
    assert_eq!(
        containers(&d.join("n1"))
            .into_iter()
            .map(|(t, _)| t)
            .collect::<Vec<_>>(),
        ["blue"]
    );
    let returned: Vec<String> = json(cfg, &["--tenant", "red", "events"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == "NodeReturned")
        .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        returned,
        ["node n1 returned to the pool after 1 s without instances or containers"]
    );

    ok(cfg, &["--tenant", "blue", "scale", "api", "0"]);
    common::until(30, "containers left after scaling to zero", || {
        containers(&d.join("n1")).is_empty()
    });
    eprintln!(
        "red's container died {:.1} s after its instance was deleted; n1 returned {:.1} s \
         after that; {} looks while it stopped; whole test {:.1} s",
        t_dead.as_secs_f64(),
        returned_after.as_secs_f64(),
        looks_without_instance,
        t_start.elapsed().as_secs_f64()
    );
    drop(tt);
}

/// Tenant-exclusive nodes hold whoever writes: the API server refuses to bind an instance to
/// a node bound to another tenant (a platform admin's hand-made binding) and to bind a node
/// to a tenant while another tenant's container runs there (`hive node bind`); and when a
/// node's binding changes under an instance bound but not started (the one window those
/// checks leave: here an image that cannot be pulled), its agent does not start it and the
/// service controller replaces it. Neither the API's refusals nor the Event name the other
/// tenant.
#[test]
fn a_node_bound_to_a_tenant_runs_no_other_tenants_instance_whoever_binds_it() {
    let dir = tempfile::tempdir().unwrap();
    let tt = TwoTenants::start_with(dir.path(), 1, Nodes::Pool, &[], &AGENT_SIZE);
    let (cfg, host, d) = (&tt.cfg, &tt.host, dir.path());
    create(cfg, host, "red", "web", 1, STOPS_AT_ONCE);
    wait_running(cfg, "red", "web", 1, 60);
    common::until(10, "n1 bound to red", || {
        node(cfg, "n1")["spec"]["tenant"] == "red"
    });
    create(cfg, host, "blue", "api", 1, STOPS_AT_ONCE);
    common::until(10, "blue's instance waiting for a node", || {
        instances(cfg, "blue").iter().any(|i| {
            i["spec"]["node"].is_null()
                && i["status"]["message"] == "0/1 nodes available: 1 bound to another tenant"
        })
    });

    // Blue's instance bound to n1 by hand, as the platform admin: refused.
    let mut inst = instances(cfg, "blue")[0].clone();
    inst["spec"]["node"] = "n1".into();
    let name = inst["name"].as_str().unwrap().to_owned();
    let token = common::admin_token(&d.join("server"));
    let out = tt
        .cluster
        .hub
        .command("curl")
        .args([
            "-sS",
            "-w",
            "\n%{http_code}",
            "-X",
            "PUT",
            "-H",
            "content-type: application/json",
            "-H",
            &format!("authorization: Bearer {token}"),
            "--data-binary",
            &inst.to_string(),
            &format!("{}/api/v1/tenants/blue/instances/{name}", tt.server.url),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, status) = text.rsplit_once('\n').unwrap();
    assert_eq!(status, "409", "{text}");
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["code"], "node_taken", "{body}");
    assert!(!body["message"].as_str().unwrap().contains("red"), "{body}");
    assert!(instances(cfg, "blue")[0]["spec"]["node"].is_null());

    // n1 bound to blue by the operator while red's container runs there: refused.
    common::fails(
        cfg,
        &["node", "bind", "n1", "blue"],
        "still runs 1 container(s) of other tenants",
    );
    assert_eq!(node(cfg, "n1")["spec"]["tenant"], "red");

    // Red's web goes, a red instance whose image does not exist is bound to n1 (never
    // started: no container), and n1 is bound to blue under it.
    ok(cfg, &["--tenant", "red", "scale", "web", "0"]);
    let missing = format!("{host}/red/missing:test");
    ok(
        cfg,
        &[
            "--tenant",
            "red",
            "service",
            "create",
            "ghost",
            "--image",
            &missing,
            "--cpu-request",
            CPU_REQUEST,
            "--memory-request",
            "32Mi",
        ],
    );
    common::until(60, "red's ghost bound to n1, web's container gone", || {
        let n = node(cfg, "n1");
        n["status"]["containers"].get("red").is_none()
            && instances(cfg, "red")
                .iter()
                .any(|i| i["spec"]["node"] == "n1" && i["labels"]["hive.dev/service"] == "ghost")
    });
    let ghost = || {
        instances(cfg, "red")
            .into_iter()
            .find(|i| i["labels"]["hive.dev/service"] == "ghost")
            .expect("red's ghost")
    };
    let first = ghost()["name"].as_str().unwrap().to_owned();
    ok(cfg, &["node", "bind", "n1", "blue"]);
    let n1 = node(cfg, "n1");
    assert_eq!(n1["spec"]["tenant"], "blue");
    assert!(n1["labels"].get("hive.dev/pool-bound").is_none(), "{n1}");
    // The agent refuses it (status.reason NodeBoundToAnotherTenant, which the service
    // controller answers by replacing it): the replacement waits, unplaced, for a node.
    common::until(30, "red's ghost refused by n1 and replaced", || {
        let g = ghost();
        g["name"] != first.as_str()
            && g["spec"]["node"].is_null()
            && g["status"]["message"] == "0/1 nodes available: 1 bound to another tenant"
    });
    let events = json(cfg, &["--tenant", "red", "events"]);
    let refused = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["reason"] == "InstanceRefused")
        .unwrap_or_else(|| panic!("no InstanceRefused event: {events}"));
    let message = refused["message"].as_str().unwrap();
    assert!(
        message.contains(&first) && !message.contains("blue"),
        "{message}"
    );
    // Blue's waiting instance is placed on its node now, and runs.
    wait_running(cfg, "blue", "api", 1, 60);
    // And red never gets a container on n1.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        containers(&d.join("n1")).iter().all(|(t, _)| t != "red"),
        "{:?}",
        containers(&d.join("n1"))
    );
    assert_eq!(ghost()["status"]["phase"], "pending");
}
