//! A two-node test topology: node namespaces joined by an underlay veth, each with its own
//! `NodeNet`, and helpers to run tools inside instance namespaces. Everything is named with
//! a per-run prefix and removed on drop, also when a test fails.

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hive_net::{Attachment, NetworkDef, NodeNet, NodeNetConfig, RemoteEndpoint};

pub const NETNS_DIR: &str = "/run/netns";
const TOOLS: &[&str] = &["ip", "bridge", "nft", "ping", "tcpdump", "arping"];

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

/// Unique per process and per call: `t` + 3 hex digits (each node appends a letter).
pub fn unique_prefix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mix = std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(nanos)
        .wrapping_add(N.fetch_add(1, Ordering::Relaxed).wrapping_mul(40_503));
    format!("t{:03x}", mix & 0xfff)
}

pub fn run(cmd: &[&str]) -> Output {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

pub fn run_ok(cmd: &[&str]) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command inside a named namespace (a file in /run/netns).
pub fn in_ns(ns: &str, cmd: &[&str]) -> Output {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(cmd);
    run(&full)
}

pub fn in_ns_ok(ns: &str, cmd: &[&str]) -> String {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(cmd);
    run_ok(&full)
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

pub struct Node {
    /// This node's NodeNet prefix: nodes of one test share a host, like two agents would.
    pub prefix: String,
    pub ns: String,
    pub dev: String,
    pub ip: Ipv4Addr,
    pub net: NodeNet,
}

/// Two node namespaces `<base>n1`, `<base>n2` on one underlay /24, with NodeNet prefixes
/// `<base>a` and `<base>b`.
pub struct Topo {
    pub base: String,
    pub nodes: Vec<Node>,
}

impl Topo {
    pub async fn new() -> Topo {
        require_root_and_tools();
        let base = unique_prefix();
        let mut topo = Topo {
            base: base.clone(),
            nodes: Vec::new(),
        };
        let ns: Vec<String> = (1..=2).map(|i| format!("{base}n{i}")).collect();
        let dev: Vec<String> = (1..=2).map(|i| format!("{base}u{i}")).collect();
        for n in &ns {
            run_ok(&["ip", "netns", "add", n]);
            in_ns_ok(n, &["ip", "link", "set", "lo", "up"]);
        }
        run_ok(&[
            "ip", "link", "add", &dev[0], "netns", &ns[0], "type", "veth", "peer", "name", &dev[1],
            "netns", &ns[1],
        ]);
        for i in 0..2 {
            let ip = Ipv4Addr::new(10, 250, 0, i as u8 + 1);
            in_ns_ok(
                &ns[i],
                &["ip", "addr", "add", &format!("{ip}/24"), "dev", &dev[i]],
            );
            in_ns_ok(&ns[i], &["ip", "link", "set", &dev[i], "up"]);
            let prefix = format!("{base}{}", ["a", "b"][i]);
            let mut cfg = NodeNetConfig::new(ip, dev[i].clone());
            cfg.prefix = prefix.clone();
            cfg.node_netns = Some(PathBuf::from(NETNS_DIR).join(&ns[i]));
            let net = NodeNet::open(cfg).await.expect("open node net");
            topo.nodes.push(Node {
                prefix,
                ns: ns[i].clone(),
                dev: dev[i].clone(),
                ip,
                net,
            });
        }
        topo
    }

    /// The namespace name (in /run/netns) of an instance, on whichever node has it.
    pub fn inst_ns(&self, key: &str) -> String {
        self.nodes
            .iter()
            .map(|n| format!("{}-{key}", n.prefix))
            .find(|name| std::path::Path::new(NETNS_DIR).join(name).exists())
            .unwrap_or_else(|| panic!("no namespace for instance {key}"))
    }

    /// Reopens node `i`'s NodeNet, as a restarted agent would.
    pub async fn reopen(&mut self, i: usize) {
        let n = &self.nodes[i];
        let mut cfg = NodeNetConfig::new(n.ip, n.dev.clone());
        cfg.prefix = n.prefix.clone();
        cfg.node_netns = Some(PathBuf::from(NETNS_DIR).join(&n.ns));
        self.nodes[i].net = NodeNet::open(cfg).await.expect("reopen node net");
    }

    /// Links in a node namespace whose name starts with the prefix (minus the underlay).
    pub fn our_links(&self, i: usize) -> Vec<String> {
        let out = in_ns_ok(&self.nodes[i].ns, &["ip", "-o", "link", "show"]);
        out.lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .filter(|n| n.starts_with(&self.nodes[i].prefix))
            .collect()
    }

    /// Instance namespace files of node `i`.
    pub fn our_netns(&self, i: usize) -> Vec<String> {
        let mine = format!("{}-", self.nodes[i].prefix);
        std::fs::read_dir(NETNS_DIR)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .filter(|n| n.starts_with(&mine))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn nft_table(&self, i: usize) -> Option<String> {
        let out = in_ns(
            &self.nodes[i].ns,
            &["nft", "list", "table", "bridge", &self.nodes[i].prefix],
        );
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        // Deleting a namespace deletes its links and nft tables; instance namespaces too.
        let mut names: Vec<String> = std::fs::read_dir(NETNS_DIR)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .filter(|n| n.starts_with(&self.base))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        for n in names {
            let _ = run(&["ip", "netns", "del", &n]);
        }
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
