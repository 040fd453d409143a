//! The two-node testbed (`hive_net::testbed`: node namespaces joined by an underlay veth,
//! each with its own `NodeNet`, removed on drop, also when a test fails) with test-style
//! accessors, and helpers to run tools inside instance namespaces.

#![allow(dead_code, unused_imports)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use hive_net::testbed::NETNS_DIR;
use hive_net::testbed::{Testbed, ns_command, output_ok};
use hive_net::{Attachment, NetworkDef, RemoteEndpoint};
const TOOLS: &[&str] = &[
    "ip", "bridge", "nft", "ping", "tcpdump", "arping", "tc", "iperf3",
];

/// Fails loudly (never a silent pass) when the test cannot run here.
pub fn require_root_and_tools() {
    assert!(
        nix_is_root(),
        "hive-net integration tests need root (network namespaces, links, nftables)"
    );
    for t in TOOLS {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "hive-net integration tests need `{t}` in PATH (scripts/deps.sh installs it)"
        );
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

pub fn run(cmd: &[&str]) -> Output {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

pub fn run_ok(cmd: &[&str]) -> String {
    output_ok(Command::new(cmd[0]).args(&cmd[1..])).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a command inside a named namespace (a file in /run/netns).
pub fn in_ns(ns: &str, cmd: &[&str]) -> Output {
    ns_command(ns, cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?} in {ns}: {e}"))
}

/// A server process in a namespace, killed (and reaped) when dropped, also when a test fails.
pub struct Server(pub Child);

impl Server {
    /// A TCP server in `ns` on port 80 answering every connection with `name` (busybox `nc`).
    pub fn start(ns: &str, name: &str) -> Server {
        let child = ns_command(ns, "busybox")
            .args(["nc", "-ll", "-p", "80", "-e", "echo", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start busybox nc (is busybox installed?)");
        Server(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn in_ns_ok(ns: &str, cmd: &[&str]) -> String {
    output_ok(ns_command(ns, cmd[0]).args(&cmd[1..])).unwrap_or_else(|e| panic!("{e}"))
}

/// Echo replies received out of `count` pings.
pub fn ping(ns: &str, dst: &str, count: u32, extra: &[&str]) -> u32 {
    let c = count.to_string();
    let mut cmd = vec!["ping", "-n", "-q", "-c", &c, "-i", "0.2", "-W", "1"];
    cmd.extend_from_slice(extra);
    cmd.push(dst);
    let out = in_ns(ns, &cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(',')
        .find_map(|part| {
            part.trim()
                .strip_suffix(" received")
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

pub fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A tcpdump of inbound frames on an interface inside a namespace.
pub struct Capture {
    child: Child,
    file: PathBuf,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Capture {
    pub fn start(ns: &str, iface: &str, filter: &str) -> Capture {
        let file =
            std::env::temp_dir().join(format!("hive-net-{ns}-{iface}-{}.pcap", std::process::id()));
        let mut args = vec![
            "netns",
            "exec",
            ns,
            "tcpdump",
            "--immediate-mode",
            "-i",
            iface,
            "-Q",
            "in",
            "-nn",
            "-U",
            "-w",
        ];
        let f = file.to_str().unwrap().to_owned();
        args.push(&f);
        args.extend(filter.split_whitespace());
        let child = Command::new("ip")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tcpdump");
        // tcpdump says "listening on" once its socket is attached: only then capture counts.
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut cap = Capture {
            child,
            file,
            log: log.clone(),
        };
        let stderr = cap.child.stderr.take().expect("tcpdump stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut r = std::io::BufReader::new(stderr);
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
                log.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("tcpdump did not start listening");
        cap
    }

    /// Source MACs of the captured frames (`tcpdump -e` prints the source first).
    pub fn stop_sources(self) -> Vec<String> {
        self.stop()
            .iter()
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
            .collect()
    }

    /// Stops the capture; returns the captured frames, one text line each.
    pub fn stop(mut self) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(300));
        let _ = nix_kill_int(self.child.id());
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(50));
        let out = run(&["tcpdump", "-r", self.file.to_str().unwrap(), "-nn", "-e"]);
        let _ = std::fs::remove_file(&self.file);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.is_empty())
            .collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
    }
}

fn nix_kill_int(pid: u32) -> std::io::Result<()> {
    let st = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()?;
    if st.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("kill failed"))
    }
}

/// The two-node testbed of `hive_net::testbed` (underlay 10.250.0.0/24, base `t…`), with
/// accessors that panic instead of returning errors.
pub struct Topo(Testbed);

impl Topo {
    pub async fn new() -> Topo {
        require_root_and_tools();
        Topo(
            Testbed::new('t', [10, 250, 0])
                .await
                .expect("build the two-node testbed"),
        )
    }

    /// With nodes whose links carry `link_bps`.
    pub async fn with_link(link_bps: u64) -> Topo {
        require_root_and_tools();
        Topo(
            Testbed::with_link('t', [10, 250, 0], link_bps)
                .await
                .expect("build the two-node testbed"),
        )
    }

    pub fn inst_ns(&self, key: &str) -> String {
        self.0
            .inst_ns(key)
            .unwrap_or_else(|| panic!("no namespace for instance {key}"))
    }

    pub async fn reopen(&mut self, i: usize) {
        self.0.reopen(i).await.expect("reopen node net");
    }

    pub fn our_links(&self, i: usize) -> Vec<String> {
        self.0.our_links(i).expect("list links of a node")
    }
}

impl std::ops::Deref for Topo {
    type Target = Testbed;

    fn deref(&self) -> &Testbed {
        &self.0
    }
}

/// Instance `idx` of tenant `tenant` (1 or 2) on node `node` (1 or 2).
pub fn inst(tenant: u8, node: u8, idx: u8, vni: u32) -> Attachment {
    let host = 10 * (node - 1) + idx;
    Attachment {
        key: format!("i{tenant}-{node}-{idx}"),
        vni,
        ip: Ipv4Addr::new(10, 77, 0, host),
        prefix_len: 24,
        mac: [0x02, 0, 0, tenant, node, idx],
        gateway: Ipv4Addr::new(10, 77, 0, 254),
        qos: Default::default(),
    }
}

pub fn network(vni: u32) -> NetworkDef {
    NetworkDef {
        vni,
        subnet: hive_net::Ipv4Subnet::new(Ipv4Addr::new(10, 77, 0, 0), 24).unwrap(),
        gateway: Ipv4Addr::new(10, 77, 0, 254),
    }
}

pub fn endpoint(a: &Attachment, node_ip: Ipv4Addr) -> RemoteEndpoint {
    RemoteEndpoint {
        mac: a.mac,
        ip: a.ip,
        node_ip,
    }
}

pub fn time<T>(t0: Instant, v: T) -> (T, Duration) {
    (v, t0.elapsed())
}
