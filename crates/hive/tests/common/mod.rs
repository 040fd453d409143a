//! Helpers shared by the end-to-end tests: a `hive up` child process and CLI calls.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const HIVE: &str = env!("CARGO_BIN_EXE_hive");

/// A network namespace made for one test (a node's host network, with its own loopback),
/// and the prefix of what agents make in it. Dropped: the namespaces of its containers
/// (files under /run/netns with the prefix) and then the namespace itself, with every link
/// in it, are deleted.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    /// The `--net-prefix` of the agent that runs in it.
    pub prefix: String,
}

static NETNS_SEQ: AtomicU32 = AtomicU32::new(0);

/// A prefix no other test run uses at the same time: 1 to 6 of a-z0-9.
pub fn unique_prefix() -> String {
    let n = NETNS_SEQ.fetch_add(1, Ordering::Relaxed);
    let x = (std::process::id().wrapping_mul(31).wrapping_add(n * 7919)) & 0xfffff;
    format!("t{x:05x}")
}

impl Netns {
    pub fn new() -> Arc<Netns> {
        let prefix = unique_prefix();
        let name = format!("hive-test-{prefix}");
        let out = Command::new("ip").args(["netns", "add", &name]).output();
        assert!(
            out.as_ref().is_ok_and(|o| o.status.success()),
            "ip netns add {name} (iproute2 needed): {out:?}"
        );
        let ns = Arc::new(Netns { name, prefix });
        ns.exec(["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `program` to be run inside the namespace (network only: mounts stay the host's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs a command inside; fails the test if it fails.
    pub fn exec<const N: usize>(&self, argv: [&str; N]) -> String {
        let out = self.command(argv[0]).args(&argv[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{argv:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove_netns_files(&self.prefix);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Unmounts and removes the files of the network namespaces an agent with `prefix` made
/// (instances' `{prefix}-…`, routers' `{prefix}_…`).
pub fn remove_netns_files(prefix: &str) {
    let (instance, router) = (format!("{prefix}-"), format!("{prefix}_"));
    for e in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let f = e.file_name().to_string_lossy().into_owned();
        if f.starts_with(&instance) || f.starts_with(&router) {
            let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The file beside a test's CLI configs naming the namespace its server runs in.
fn netns_note(config: &Path) -> PathBuf {
    config
        .parent()
        .unwrap_or(Path::new("."))
        .join("hive-test-netns")
}

/// The `hive` command for a CLI config: inside the namespace of the test's server.
pub fn hive_command(config: &Path) -> Command {
    let mut cmd = match std::fs::read_to_string(netns_note(config)) {
        Ok(name) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{}", name.trim()))
                .arg("--")
                .arg(HIVE);
            c
        }
        Err(_) => Command::new(HIVE),
    };
    cmd.env("HIVE_CONFIG", config);
    cmd
}

/// A running `hive up`, killed (by PID) when dropped (its namespace stays while any test
/// code holds it).
pub struct Up {
    pub child: Child,
    pub url: String,
    pub netns: Option<Arc<Netns>>,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `hive up` in a network namespace of its own, its CLI config in `config` (CLI calls through
/// [`hive`] with a config in the same directory run in that namespace too).
pub fn start_up(data: &Path, config: &Path) -> Up {
    start_up_in(&Netns::new(), data, config)
}

/// `hive up` in `ns` (again, after a kill: the namespace keeps its tenant networks).
pub fn start_up_in(ns: &Arc<Netns>, data: &Path, config: &Path) -> Up {
    start_up_with(ns, data, config, &[])
}

/// [`start_up_in`] with more arguments for `hive up`.
pub fn start_up_with(ns: &Arc<Netns>, data: &Path, config: &Path, extra: &[&str]) -> Up {
    std::fs::write(netns_note(config), &ns.name).unwrap();
    let mut cmd = ns.command(HIVE);
    cmd.args(["up", "--login", "--listen", "127.0.0.1:0", "--net-prefix"])
        .arg(&ns.prefix)
        .arg("--data-dir")
        .arg(data)
        .args(extra)
        .env("HIVE_CONFIG", config);
    let mut up = start_until(cmd, "hive up: API at ");
    up.netns = Some(ns.clone());
    up
}

/// Several nodes on one machine: a hub namespace holding the underlay (a bridge,
/// 10.251.0.254/24, where the server listens) and one namespace per node, joined to the hub
/// by a veth (`ul` in the node, 10.251.0.N/24). Addresses live only in these namespaces.
pub struct Cluster {
    pub hub: Arc<Netns>,
    nodes: std::sync::Mutex<Vec<(String, Arc<Netns>)>>,
}

pub const HUB_IP: &str = "10.251.0.254";

impl Cluster {
    pub fn new() -> Cluster {
        let hub = Netns::new();
        hub.exec(["ip", "link", "add", "br0", "type", "bridge"]);
        hub.exec(["ip", "addr", "add", &format!("{HUB_IP}/24"), "dev", "br0"]);
        hub.exec(["ip", "link", "set", "br0", "up"]);
        Cluster {
            hub,
            nodes: Default::default(),
        }
    }

    /// The namespace of node `name` (made on first use, with its underlay address).
    pub fn node(&self, name: &str) -> (Arc<Netns>, String) {
        let mut nodes = self.nodes.lock().unwrap();
        if let Some(i) = nodes.iter().position(|(n, _)| n == name) {
            return (nodes[i].1.clone(), format!("10.251.0.{}", i + 1));
        }
        let ns = Netns::new();
        let ip = format!("10.251.0.{}", nodes.len() + 1);
        let hub_end = format!("u{}", ns.prefix);
        let out = Command::new("ip")
            .args([
                "link", "add", "ul", "netns", &ns.name, "type", "veth", "peer", "name",
            ])
            .args([&hub_end, "netns", &self.hub.name])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.hub
            .exec(["ip", "link", "set", &hub_end, "master", "br0", "up"]);
        ns.exec(["ip", "addr", "add", &format!("{ip}/24"), "dev", "ul"]);
        ns.exec(["ip", "link", "set", "ul", "up"]);
        nodes.push((name.to_owned(), ns.clone()));
        (ns, ip)
    }

    /// `hive server` (controllers included, no node) in the hub, with `extra` arguments;
    /// CLI configs in `cli_dir` reach it.
    pub fn start_server(&self, data: &Path, cli_dir: &Path, extra: &[&str]) -> Up {
        std::fs::create_dir_all(cli_dir).unwrap();
        std::fs::write(cli_dir.join("hive-test-netns"), &self.hub.name).unwrap();
        let mut cmd = self.hub.command(HIVE);
        cmd.args(["server", "--listen", &format!("{HUB_IP}:0"), "--data-dir"])
            .arg(data)
            .args(extra);
        let mut up = start_until(cmd, "hive server: API at ");
        up.netns = Some(self.hub.clone());
        up
    }

    /// `hive agent` for node `name` in its namespace, with its own data dir, registered
    /// with `server`, running every tenant's instances (`--shared`).
    pub fn start_agent(&self, server: &str, token: &str, name: &str, data: &Path) -> Up {
        self.start_agent_as(Nodes::Shared, server, token, name, data, &[])
    }

    /// [`Cluster::start_agent`], registered as a shared or a pool node, with `extra`
    /// arguments (e.g. `--cpus`).
    pub fn start_agent_as(
        &self,
        kind: Nodes,
        server: &str,
        token: &str,
        name: &str,
        data: &Path,
        extra: &[&str],
    ) -> Up {
        let (ns, ip) = self.node(name);
        let mut cmd = ns.command(HIVE);
        cmd.arg("agent");
        if kind == Nodes::Shared {
            cmd.arg("--shared");
        }
        cmd.args(["--listen", &format!("{ip}:0"), "--name", name])
            .args(["--server", server, "--token", token, "--data-dir"])
            .arg(data)
            .args([
                "--underlay-ip",
                &ip,
                "--underlay-dev",
                "ul",
                "--net-prefix",
                &ns.prefix,
            ])
            .args(extra)
            .env("HIVE_CONFIG", data.join("no-cli-config.json"));
        let mut up = start_until(cmd, "hive agent: node ");
        up.netns = Some(ns);
        up
    }
}

/// Spawns `cmd` and waits for the stderr line starting with `marker`, whose next word is the
/// URL it serves at.
pub fn start_until(mut cmd: Command, marker: &str) -> Up {
    let child = cmd
        .env("HIVE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hive");
    // From here on the guard kills and reaps the child on every path, panics included.
    let mut up = Up {
        child,
        url: String::new(),
        netns: None,
    };
    let stderr = up.child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            if let Some(rest) = line.strip_prefix(marker) {
                up.url = rest.split_whitespace().next().unwrap().to_owned();
                // Keep draining so the child never blocks on a full pipe.
                std::thread::spawn(move || while rx.recv().is_ok() {});
                return up;
            }
            seen.push(line);
        }
        if let Ok(Some(status)) = up.child.try_wait() {
            panic!("{marker}: hive exited with {status}: {}", seen.join("\n"));
        }
    }
    panic!(
        "hive did not report {marker:?} in 30 s: {}",
        seen.join("\n")
    );
}

pub fn hive(config: &Path, args: &[&str]) -> Output {
    hive_command(config)
        .args(args)
        .env_remove("HIVE_SERVER")
        .env_remove("HIVE_TOKEN")
        .env_remove("HIVE_TENANT")
        .stdin(Stdio::null())
        .output()
        .expect("run hive")
}

pub fn ok(config: &Path, args: &[&str]) -> String {
    let out = hive(config, args);
    assert!(
        out.status.success(),
        "hive {}: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn json(config: &Path, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    serde_json::from_str(&ok(config, &a)).unwrap()
}

pub fn fails(config: &Path, args: &[&str], expect: &str) {
    let out = hive(config, args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "hive {} should fail",
        args.join(" ")
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: ") && err.contains(expect), "{err}");
}

pub fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Polls `done` every 100 ms until it holds; fails with `what` after `secs` seconds.
/// Whether link `name` is the host side of a spare namespace's veth pair of a node with
/// `prefix` (`{prefix}s{n}`): made ahead while the agent runs, gone with it.
pub fn is_spare_veth(prefix: &str, name: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('s'))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

pub fn until(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn run(cmd: &str, args: &[&str]) {
    run_cmd(Command::new(cmd), cmd, args)
}

/// `cmd` inside network namespace `ns`.
pub fn run_in(ns: &Netns, cmd: &str, args: &[&str]) {
    run_cmd(ns.command(cmd), cmd, args)
}

pub fn run_cmd(mut command: Command, cmd: &str, args: &[&str]) {
    let out = command
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (install it: scripts/deps.sh)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An OCI layout with image `test`: busybox-static and a few applets, one layer.
pub fn busybox_layout(dir: &Path) -> PathBuf {
    let layout = dir.join("oci");
    let l = layout.to_str().unwrap();
    let image = format!("{l}:test");
    run("umoci", &["init", "--layout", l]);
    run("umoci", &["new", "--image", &image]);
    run(
        "umoci",
        &[
            "config",
            "--image",
            &image,
            "--config.cmd",
            "/bin/sh",
            "--architecture",
            "amd64",
            "--os",
            "linux",
        ],
    );
    let bundle = dir.join("bundle");
    run(
        "umoci",
        &["unpack", "--image", &image, bundle.to_str().unwrap()],
    );
    let bin = bundle.join("rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static installed");
    for a in ["sh", "echo", "sleep"] {
        std::os::unix::fs::symlink("busybox", bin.join(a)).unwrap();
    }
    run(
        "umoci",
        &["repack", "--image", &image, bundle.to_str().unwrap()],
    );
    layout
}

/// Removes whatever the agent left if the test failed half way: containers, mounts (the
/// runtime's tmpfs outlives a killed agent), supervisors.
pub struct Cleanup {
    pub agent_dir: PathBuf,
}

impl Cleanup {
    /// For the agent of a `hive up` whose data dir is `data`.
    pub fn of(data: &Path) -> Cleanup {
        Cleanup {
            agent_dir: data.join("agent"),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // `hive down` removes what the stopped node left, by the runtime that made each
        // container (supervisors, containers, cgroups, mounts, its network prefix's state).
        if self.agent_dir.exists() {
            match Command::new(HIVE)
                .arg("down")
                .arg("--data-dir")
                .arg(&self.agent_dir)
                .output()
            {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "hive down --data-dir {}: {}{}",
                    self.agent_dir.display(),
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("hive down: {e}"),
            }
        }
        // What it could not unmount is at least detached.
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let dir = self.agent_dir.to_string_lossy().into_owned();
        for m in mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&dir))
        {
            let _ = Command::new("umount").args(["-l", m]).output();
        }
    }
}

/// The platform admin's token a server wrote into its data dir.
pub fn admin_token(data: &Path) -> String {
    std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_owned()
}

/// Pushes the OCI layout's `test` image into the registry at `host` (from inside `ns`, where
/// the server listens) as `{host}/{repo}:test`; returns that reference.
pub fn push_test_image(ns: &Netns, layout: &Path, host: &str, token: &str, repo: &str) -> String {
    let image = format!("{host}/{repo}:test");
    run_in(
        ns,
        "skopeo",
        &[
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            &format!("hive:{token}"),
            &format!("oci:{}:test", layout.display()),
            &format!("docker://{image}"),
        ],
    );
    image
}

/// `hive server` in a [`Cluster`]'s hub with `nodes` agents (`n1`…), tenants `red` and `blue`
/// each with the busybox test image pushed, and a CLI config (`cfg`) logged in as the
/// platform admin. Dropped in field order: agents, server, leftovers, namespaces.
pub struct TwoTenants {
    pub agents: Vec<Up>,
    pub server: Up,
    _cleanup: Vec<Cleanup>,
    pub cluster: Cluster,
    pub cfg: PathBuf,
    /// `host:port` of the server (and its registry).
    pub host: String,
}

/// How agents register: every tenant's instances on every node (`--shared`), or pool nodes
/// the scheduler binds to one tenant at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nodes {
    Shared,
    Pool,
}

impl TwoTenants {
    pub fn start(dir: &Path, nodes: usize) -> TwoTenants {
        Self::start_with(dir, nodes, Nodes::Shared, &[], &[])
    }

    /// [`TwoTenants::start`] with agents of `kind`, and more arguments for `hive server` and
    /// for every `hive agent`.
    pub fn start_with(
        dir: &Path,
        nodes: usize,
        kind: Nodes,
        server_args: &[&str],
        agent_args: &[&str],
    ) -> TwoTenants {
        let cfg = dir.join("cli.json");
        let cleanup: Vec<Cleanup> = (1..=nodes)
            .map(|i| Cleanup {
                agent_dir: dir.join(format!("n{i}")),
            })
            .collect();
        let cluster = Cluster::new();
        let server = cluster.start_server(&dir.join("server"), dir, server_args);
        let token = admin_token(&dir.join("server"));
        ok(&cfg, &["login", "--server", &server.url, "--token", &token]);
        let host = server.url.trim_start_matches("http://").to_owned();
        let layout = busybox_layout(dir);
        for t in ["red", "blue"] {
            ok(&cfg, &["tenant", "create", t]);
            push_test_image(
                &cluster.hub,
                &layout,
                &host,
                &token,
                &format!("{t}/busybox"),
            );
        }
        let agents = (1..=nodes)
            .map(|i| {
                cluster.start_agent_as(
                    kind,
                    &server.url,
                    &token,
                    &format!("n{i}"),
                    &dir.join(format!("n{i}")),
                    agent_args,
                )
            })
            .collect();
        TwoTenants {
            agents,
            server,
            _cleanup: cleanup,
            cluster,
            cfg,
            host,
        }
    }
}

/// Mount points (and file system types) of this process's mount namespace.
pub fn mounts() -> Vec<(PathBuf, String)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (before, after) = l.split_once(" - ")?;
            Some((
                PathBuf::from(before.split(' ').nth(4)?),
                after.split(' ').next()?.to_owned(),
            ))
        })
        .collect()
}

/// The root of every cgroup hierarchy mounted here.
pub fn cgroup_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = mounts()
        .into_iter()
        .filter(|(_, t)| t == "cgroup" || t == "cgroup2")
        .map(|(p, _)| p)
        .collect();
    roots.sort();
    roots.dedup();
    roots
}

/// Every directory of cgroup `path` (`/hive/<tenant>/<instance>`) in every hierarchy.
pub fn cgroup_dirs(path: &str) -> Vec<PathBuf> {
    cgroup_roots()
        .into_iter()
        .map(|r| r.join(path.trim_start_matches('/')))
        .filter(|d| d.is_dir())
        .collect()
}

/// Field `n` of process `pid`'s `/proc/PID/stat`, counted after its command name (0: its
/// state, 1: its parent, 16: its niceness); None when the process is gone.
pub fn stat_field(pid: u64, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let field = stat.rsplit_once(')')?.1.split_whitespace().nth(n)?;
    Some(field.to_owned())
}

/// The parent of process `pid`; None when it is gone.
pub fn parent_of(pid: u64) -> Option<u64> {
    stat_field(pid, 1)?.parse().ok()
}

/// The children of process `parent` that are spare supervisors (`hive shim - RUNTIME`,
/// waiting for a start), for `runtime` only if given.
pub fn spare_supervisors(parent: u64, runtime: Option<&Path>) -> Vec<u64> {
    const SPARE: &[u8] = b"\0shim\0-\0";
    let of_runtime = runtime.map(|r| {
        let mut tail = SPARE.to_vec();
        tail.extend_from_slice(r.as_os_str().as_encoded_bytes());
        tail.push(0);
        tail
    });
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let spare = match &of_runtime {
                Some(tail) => cmdline.ends_with(tail),
                None => cmdline.windows(SPARE.len()).any(|w| w == SPARE),
            };
            spare && parent_of(*pid) == Some(parent)
        })
        .collect()
}

/// Alive and not a zombie.
pub fn alive(pid: u64) -> bool {
    stat_field(pid, 0).is_some_and(|state| state != "Z")
}

/// A child process killed (by pid) and reaped when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
