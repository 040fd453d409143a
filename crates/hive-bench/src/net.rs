//! `hive-bench net`: the tenant-network data plane (`hive-net`) on a throwaway two-node
//! testbed (`hive_net::testbed`: two namespaces standing in for nodes, joined by an underlay
//! veth with 10.252.0.1/.2, a `NodeNet` in each), in one run, as root:
//!
//! - Throughput: iperf3 (one TCP stream, `--seconds` per run after a 1 s omitted warm-up),
//!   `--rounds` rounds each of an underlay run then an overlay run, so machine noise hits both.
//!   Floor: the underlay between the node namespaces directly (MTU 1500). Overlay: instance
//!   to instance across nodes through veth, bridge and VXLAN (MTU 1450). Medians of the
//!   rounds and their ratio. Every round measures both CPU placements (see [`Placement`]):
//!   each node on its own half of the CPUs (the headline ratio), and everything anywhere.
//! - Setup: `attach` and `detach` of `--instances` instances one by one on an empty node;
//!   `ensure_network` + `attach` of the first instance of a new network.
//! - Rule updates: with `--ports` instances attached on a node, adding one more port's
//!   rules (`refresh_port_rules` of a port that has none: its chain and verdict-map element)
//!   and removing them (`detach` of that key: no link or namespace to remove, only rules),
//!   `--changes` times each; the same on the empty node, to show how they scale; and a whole
//!   `attach` / `detach` at that size.
//!
//! Everything lives in namespaces of a per-run base and goes when the testbed drops, also on
//! an error or a panic; the run ends by checking nothing is left. Last line:
//! `overlay_ratio=… setup_p50_ms=… rule_update_ms=…` and more (`rule_update_ms` is the
//! slower of the add and remove p50s).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hive_net::testbed::{self, Testbed, ns_command};
use hive_net::{Attachment, Ipv4Subnet, NetworkDef, RemoteEndpoint};

use crate::images::need;
use crate::runtime::cpu_jiffies;

#[derive(Debug, clap::Args)]
pub struct NetArgs {
    /// iperf3 rounds, each an underlay run then an overlay run in both CPU placements.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seconds measured per iperf3 run (after 1 s omitted).
    #[arg(long, default_value_t = 5)]
    pub seconds: u32,
    /// Instances attached then detached one by one on an empty node.
    #[arg(long, default_value_t = 50)]
    pub instances: u32,
    /// Instances attached on the node while rule changes are timed.
    #[arg(long, default_value_t = 1000)]
    pub ports: u32,
    /// Rule changes (add, then remove) timed at each size.
    #[arg(long, default_value_t = 20)]
    pub changes: u32,
}

/// The underlay /24 of the testbed; addresses exist only in its namespaces.
const UNDERLAY: [u8; 3] = [10, 252, 0];
/// The network of the iperf3 pair.
const VNI_PAIR: u32 = 4301;
/// The network of the setup and rule measurements (a /16: `--ports` instances fit).
const VNI_BULK: u32 = 4302;
/// First VNI of the networks made for the `ensure_network` + `attach` figure.
const VNI_FRESH: u32 = 4400;
/// New networks timed from nothing.
const FRESH_NETWORKS: u32 = 10;

/// `10.<octet>.0.0/<len>`, gateway the last usable address.
fn network(vni: u32, octet: u8, prefix_len: u8) -> NetworkDef {
    let addr = Ipv4Addr::new(10, octet, 0, 0);
    let last = u32::from(addr) | (u32::MAX >> prefix_len);
    NetworkDef {
        vni,
        subnet: Ipv4Subnet::new(addr, prefix_len).expect("prefix length under 32"),
        gateway: Ipv4Addr::from(last - 1),
    }
}

/// Instance `i` of `net`: address `.1 + i`, a locally administered MAC from VNI and index.
fn port(net: &NetworkDef, i: u32) -> Attachment {
    Attachment {
        key: format!("n{}-{i}", net.vni),
        vni: net.vni,
        ip: Ipv4Addr::from(u32::from(net.subnet.addr) + 1 + i),
        prefix_len: net.subnet.prefix_len,
        mac: [
            0x02,
            0x48,
            net.vni as u8,
            (i >> 16) as u8,
            (i >> 8) as u8,
            i as u8,
        ],
        gateway: net.gateway,
        qos: Default::default(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// p50, p90 and max of a sample.
#[derive(Debug, Clone, Copy, Default)]
struct Dist {
    n: usize,
    p50: f64,
    p90: f64,
    max: f64,
}

impl Dist {
    fn of(mut v: Vec<f64>) -> Dist {
        if v.is_empty() {
            return Dist::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Dist {
            n: v.len(),
            p50: at(0.5),
            p90: at(0.9),
            max: v[v.len() - 1],
        }
    }
}

fn median(v: &[f64]) -> f64 {
    Dist::of(v.to_vec()).p50
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where the throughput runs' work goes on the host's CPUs.
///
/// Both nodes share this host's CPUs. Left to the scheduler, the receiving node's work runs
/// on the sending node's CPU (a veth delivers in its sender's softirq: the whole receive
/// path of the other node, up to the iperf3 server's socket) and the sender's work on the
/// receiver's (the server's ACKs are processed, and the next data sent, in the server's
/// softirq): neither happens between two hosts, and it flatters the path with the fewest
/// hops. `PerNode` gives each node its own half of the CPUs, as its own host would have: its
/// iperf3 pinned there (`taskset`) and the packets its underlay veth receives processed
/// there (RPS on the veth's receive queues), the way a NIC's interrupt is taken by the
/// receiving host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    PerNode,
    Shared,
}

impl Placement {
    const ALL: [Placement; 2] = [Placement::PerNode, Placement::Shared];

    fn name(self) -> &'static str {
        match self {
            Placement::PerNode => "each node on its own CPUs",
            Placement::Shared => "both nodes on all CPUs",
        }
    }

    /// The iperf3 server port of this placement (a server each, pinned or not).
    fn port(self) -> u16 {
        match self {
            Placement::PerNode => 5201,
            Placement::Shared => 5202,
        }
    }
}

/// The CPUs this process may run on, from `Cpus_allowed_list` of `/proc/self/status`
/// (`0-3,8,10-11`).
fn allowed_cpus() -> Result<Vec<u32>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .context("no Cpus_allowed_list in /proc/self/status")?;
    parse_cpu_list(list.trim())
}

fn parse_cpu_list(list: &str) -> Result<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (lo, hi): (u32, u32) = (lo.parse()?, hi.parse()?);
        if lo > hi || hi >= 1024 {
            bail!("CPU list {list:?}: range {part:?}");
        }
        cpus.extend(lo..=hi);
    }
    Ok(cpus)
}

/// `cpus` as a sysfs CPU mask: hex words of 32 CPUs, most significant first, comma-separated
/// (what `rps_cpus` takes).
fn cpu_mask(cpus: &[u32]) -> String {
    let words = cpus.iter().map(|c| c / 32 + 1).max().unwrap_or(1) as usize;
    let mut w = vec![0u32; words];
    for c in cpus {
        w[(c / 32) as usize] |= 1 << (c % 32);
    }
    w.iter()
        .rev()
        .map(|x| format!("{x:08x}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The CPUs of each node under `PerNode`: the first and the second half of `cpus`.
fn halves(cpus: &[u32]) -> Result<[Vec<u32>; 2]> {
    if cpus.len() < 2 {
        bail!("giving each node its own CPUs needs 2 CPUs, this process may use {cpus:?}");
    }
    let (a, b) = cpus.split_at(cpus.len() / 2);
    Ok([a.to_vec(), b.to_vec()])
}

fn cpu_list(cpus: &[u32]) -> String {
    cpus.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// `program` in namespace `ns`, pinned to `cpus` when there are some.
fn pinned(ns: &str, cpus: Option<&[u32]>, program: &str) -> std::process::Command {
    match cpus {
        Some(cpus) => {
            let mut c = ns_command(ns, "taskset");
            c.args(["-c", &cpu_list(cpus), program]);
            c
        }
        None => ns_command(ns, program),
    }
}

/// Steers what `dev` (in namespace `ns`) receives to `cpus` (RPS on all its receive queues);
/// no CPUs turns steering off (processed where it arrives).
fn steer(ns: &str, dev: &str, cpus: &[u32]) -> Result<()> {
    let mask = if cpus.is_empty() {
        "0".to_owned()
    } else {
        cpu_mask(cpus)
    };
    // `ip netns exec` mounts a sysfs of the namespace, where its devices are.
    let script =
        format!("for q in /sys/class/net/{dev}/queues/rx-*; do echo {mask} > $q/rps_cpus; done");
    let out = ns_command(ns, "sh").args(["-c", &script]).output()?;
    if !out.status.success() {
        bail!(
            "RPS of {dev} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Busy share (%) of `cpus` between two `cpu_jiffies` readings.
fn busy_pct(before: &[(u64, u64)], after: &[(u64, u64)], cpus: &[u32]) -> f64 {
    let (mut busy, mut all) = (0, 0);
    for &c in cpus {
        let (c, d) = (before.get(c as usize), after.get(c as usize));
        if let (Some(b), Some(a)) = (c, d) {
            busy += a.0.saturating_sub(b.0);
            all += a.1.saturating_sub(b.1);
        }
    }
    if all == 0 {
        0.0
    } else {
        100.0 * busy as f64 / all as f64
    }
}

/// An `iperf3 -s` in a namespace, killed (by its pid) when dropped. `ip netns exec` (and
/// `taskset`) exec iperf3 in place, so the child is iperf3 itself.
struct Iperf3Server(std::process::Child);

impl Iperf3Server {
    fn start(ns: &str, port: u16, cpus: Option<&[u32]>) -> Result<Iperf3Server> {
        let port = port.to_string();
        let child = pinned(ns, cpus, "iperf3")
            .args(["-s", "-p", &port])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("start iperf3 -s in {ns}"))?;
        let mut server = Iperf3Server(child);
        let t0 = Instant::now();
        loop {
            let out = ns_command(ns, "ss")
                .args(["-Hltn", "sport", "=", &format!(":{port}")])
                .output()?;
            if !out.stdout.is_empty() {
                return Ok(server);
            }
            if let Some(st) = server.0.try_wait()? {
                bail!("iperf3 -s in {ns} exited: {st}");
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("iperf3 -s in {ns} not listening after 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Iperf3Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One iperf3 TCP run from namespace `ns` to `dst`: received Gbit/s.
fn iperf3(ns: &str, dst: Ipv4Addr, port: u16, cpus: Option<&[u32]>, seconds: u32) -> Result<f64> {
    let out = pinned(ns, cpus, "iperf3")
        .args(["-c", &dst.to_string(), "-O", "1", "-J", "-p"])
        .arg(port.to_string())
        .arg("-t")
        .arg(seconds.to_string())
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("run iperf3 -c {dst} in {ns}"))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 -c {dst} in {ns}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3 -c {dst} in {ns}: {e}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 -c {dst} in {ns}: no end.sum_received"))?;
    Ok(bps / 1e9)
}

/// The file name of an instance's namespace, for `ip netns exec`.
fn ns_name(p: &hive_net::AttachedPort) -> Result<String> {
    p.netns_path
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .with_context(|| format!("netns path {}", p.netns_path.display()))
}

/// Throughput runs of one placement, Gbit/s.
#[derive(Debug, Default)]
struct Runs {
    underlay: Vec<f64>,
    overlay: Vec<f64>,
}

impl Runs {
    fn ratio(&self) -> f64 {
        median(&self.overlay) / median(&self.underlay)
    }
}

#[derive(Debug, Default)]
struct Figures {
    /// Per [`Placement::ALL`].
    runs: [Runs; 2],
    cpus: [Vec<u32>; 2],
    /// Under `PerNode`: busy % of each node's CPUs during its underlay and overlay runs.
    busy: [[Vec<f64>; 2]; 2],
    mtu: u32,
    /// ensure_network + attach of the iperf3 pair, the first port of each node.
    first_on_node: Vec<f64>,
    fresh: Dist,
    attach: Dist,
    detach: Dist,
    rule_add_empty: Dist,
    rule_del_empty: Dist,
    install_s: f64,
    rule_add: Dist,
    rule_del: Dist,
    attach_full: Dist,
    detach_full: Dist,
    teardown_s: f64,
}

/// Times `changes` rule additions and removals of ports that have no link or namespace.
async fn rule_changes(
    bed: &Testbed,
    net: &NetworkDef,
    from: u32,
    changes: u32,
) -> Result<(Dist, Dist)> {
    let node = &bed.nodes[0].net;
    let (mut add, mut del) = (Vec::new(), Vec::new());
    for i in from..from + changes {
        let a = port(net, i);
        let t0 = Instant::now();
        node.refresh_port_rules(&a)
            .await
            .with_context(|| format!("add rules of {}", a.key))?;
        add.push(ms(t0.elapsed()));
        let t0 = Instant::now();
        node.detach(&a.key)
            .await
            .with_context(|| format!("remove rules of {}", a.key))?;
        del.push(ms(t0.elapsed()));
    }
    Ok((Dist::of(add), Dist::of(del)))
}

async fn measure(bed: &Testbed, args: &NetArgs, f: &mut Figures) -> Result<()> {
    let (n1, n2) = (&bed.nodes[0], &bed.nodes[1]);
    f.mtu = n1.net.mtu();

    // The iperf3 pair: one instance per node, the first thing either node sets up.
    let pair = network(VNI_PAIR, 79, 24);
    let (a1, a2) = (port(&pair, 0), port(&pair, 1));
    let mut ports = Vec::new();
    for (node, a) in [(n1, &a1), (n2, &a2)] {
        let t0 = Instant::now();
        node.net.ensure_network(&pair).await?;
        ports.push(node.net.attach(a).await?);
        f.first_on_node.push(ms(t0.elapsed()));
    }
    let eps = [
        RemoteEndpoint {
            mac: a1.mac,
            ip: a1.ip,
            node_ip: n1.ip,
        },
        RemoteEndpoint {
            mac: a2.mac,
            ip: a2.ip,
            node_ip: n2.ip,
        },
    ];
    for node in [n1, n2] {
        node.net.set_remote_endpoints(VNI_PAIR, &eps).await?;
    }
    let (i1, i2) = (ns_name(&ports[0])?, ns_name(&ports[1])?);
    f.cpus = halves(&allowed_cpus()?)?;
    {
        let (c1, c2) = (&f.cpus[0][..], &f.cpus[1][..]);
        let _servers = [
            Iperf3Server::start(&n2.ns, Placement::PerNode.port(), Some(c2))?,
            Iperf3Server::start(&i2, Placement::PerNode.port(), Some(c2))?,
            Iperf3Server::start(&n2.ns, Placement::Shared.port(), None)?,
            Iperf3Server::start(&i2, Placement::Shared.port(), None)?,
        ];
        for r in 0..args.rounds {
            for (i, p) in Placement::ALL.into_iter().enumerate() {
                let (client, steered): (Option<&[u32]>, [&[u32]; 2]) = match p {
                    Placement::PerNode => (Some(c1), [c1, c2]),
                    Placement::Shared => (None, [&[], &[]]),
                };
                for (node, cpus) in [n1, n2].into_iter().zip(steered) {
                    steer(&node.ns, &node.dev, cpus)?;
                }
                let j0 = cpu_jiffies()?;
                let u = iperf3(&n1.ns, n2.ip, p.port(), client, args.seconds)?;
                let j1 = cpu_jiffies()?;
                let o = iperf3(&i1, a2.ip, p.port(), client, args.seconds)?;
                let j2 = cpu_jiffies()?;
                if p == Placement::PerNode {
                    for (node, cpus) in f.cpus.iter().enumerate() {
                        f.busy[node][0].push(busy_pct(&j0, &j1, cpus));
                        f.busy[node][1].push(busy_pct(&j1, &j2, cpus));
                    }
                }
                eprintln!(
                    "round {}, {}: underlay {u:.2} Gbit/s, overlay {o:.2} Gbit/s",
                    r + 1,
                    p.name()
                );
                f.runs[i].underlay.push(u);
                f.runs[i].overlay.push(o);
            }
        }
    }
    n1.net.detach(&a1.key).await?;
    n2.net.detach(&a2.key).await?;

    // Setup on an empty node (its network exists), after one warm-up.
    let bulk = network(VNI_BULK, 80, 16);
    let node = &n1.net;
    node.ensure_network(&bulk).await?;
    let warm = port(&bulk, 65_000);
    node.attach(&warm).await?;
    node.detach(&warm.key).await?;
    let (mut att, mut det) = (Vec::new(), Vec::new());
    for i in 0..args.instances {
        let a = port(&bulk, i);
        let t0 = Instant::now();
        node.attach(&a)
            .await
            .with_context(|| format!("attach {}", a.key))?;
        att.push(ms(t0.elapsed()));
    }
    for i in 0..args.instances {
        let a = port(&bulk, i);
        let t0 = Instant::now();
        node.detach(&a.key)
            .await
            .with_context(|| format!("detach {}", a.key))?;
        det.push(ms(t0.elapsed()));
    }
    f.attach = Dist::of(att);
    f.detach = Dist::of(det);

    // The whole path for the first instance of a network: bridge + VXLAN, then the port.
    let mut fresh = Vec::new();
    for j in 0..FRESH_NETWORKS {
        let net = network(VNI_FRESH + j, 81, 24);
        let a = port(&net, 0);
        let t0 = Instant::now();
        node.ensure_network(&net).await?;
        node.attach(&a).await?;
        fresh.push(ms(t0.elapsed()));
        node.detach(&a.key).await?;
        node.remove_network(net.vni).await?;
    }
    f.fresh = Dist::of(fresh);

    // Rule changes on the empty node, then with `ports` instances attached.
    (f.rule_add_empty, f.rule_del_empty) = rule_changes(bed, &bulk, 60_000, args.changes).await?;
    let t0 = Instant::now();
    for i in 0..args.ports {
        let a = port(&bulk, i);
        node.attach(&a)
            .await
            .with_context(|| format!("attach {}", a.key))?;
        if (i + 1) % 250 == 0 {
            eprintln!(
                "{} instances attached, {:.1} s",
                i + 1,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    f.install_s = t0.elapsed().as_secs_f64();
    (f.rule_add, f.rule_del) = rule_changes(bed, &bulk, 61_000, args.changes).await?;
    let (mut att, mut det) = (Vec::new(), Vec::new());
    for i in 62_000..62_000 + args.changes {
        let a = port(&bulk, i);
        let t0 = Instant::now();
        node.attach(&a).await?;
        att.push(ms(t0.elapsed()));
        let t0 = Instant::now();
        node.detach(&a.key).await?;
        det.push(ms(t0.elapsed()));
    }
    f.attach_full = Dist::of(att);
    f.detach_full = Dist::of(det);

    let t0 = Instant::now();
    for n in &bed.nodes {
        n.net.teardown_all().await?;
    }
    f.teardown_s = t0.elapsed().as_secs_f64();
    Ok(())
}

pub fn run(args: NetArgs) -> Result<()> {
    for t in ["ip", "nft", "ss", "iperf3"] {
        need(t)?;
    }
    let load_start = loadavg();
    eprintln!("hive-bench net: load {load_start}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut f = Figures::default();
    let base = rt.block_on(async {
        let bed = Testbed::new('b', UNDERLAY)
            .await
            .context("build the two-node testbed (root needed)")?;
        let base = bed.base.clone();
        // The testbed drops here whatever `measure` returns (and on a panic).
        measure(&bed, &args, &mut f).await.map(|()| base)
    })?;
    let left = testbed::leftovers(&base);
    let load_end = loadavg();

    let [own, shared] = &f.runs;
    let (under, over, ratio) = (median(&own.underlay), median(&own.overlay), own.ratio());
    println!(
        "hive-bench net: two node namespaces on one host, {} iperf3 rounds of {} s, {} instances, {} ports; load {load_start} at the start, {load_end} at the end",
        args.rounds, args.seconds, args.instances, args.ports
    );
    println!();
    let fmt_runs = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for (p, runs) in Placement::ALL.into_iter().zip(&f.runs) {
        let title = match p {
            Placement::PerNode => format!(
                "{} (node 1: {}; node 2: {})",
                p.name(),
                cpu_list(&f.cpus[0]),
                cpu_list(&f.cpus[1])
            ),
            Placement::Shared => p.name().to_owned(),
        };
        println!("TCP throughput, 1 stream (Gbit/s), {title}");
        println!(
            "  {:<56} {:>8.2}  {}",
            "floor: underlay, node ns to node ns (MTU 1500)",
            median(&runs.underlay),
            fmt_runs(&runs.underlay)
        );
        println!(
            "  {:<56} {:>8.2}  {}",
            format!("overlay: instance to instance over VXLAN (MTU {})", f.mtu),
            median(&runs.overlay),
            fmt_runs(&runs.overlay)
        );
        println!("  {:<56} {:>8.2}", "overlay / underlay", runs.ratio());
        if p == Placement::PerNode {
            let [b1, b2] = &f.busy;
            println!(
                "  busy CPU (median): node 1 {:.0} % underlay, {:.0} % overlay; node 2 {:.0} % underlay, {:.0} % overlay",
                median(&b1[0]),
                median(&b1[1]),
                median(&b2[0]),
                median(&b2[1])
            );
        }
    }
    println!();
    println!(
        "{:<58} {:>5} {:>8} {:>8} {:>8}",
        "operation (ms)", "n", "p50", "p90", "max"
    );
    let row = |name: &str, d: Dist| {
        println!(
            "{name:<58} {:>5} {:>8.2} {:>8.2} {:>8.2}",
            d.n, d.p50, d.p90, d.max
        );
    };
    row(
        "ensure_network + attach, first port of a node",
        Dist::of(f.first_on_node.clone()),
    );
    row("ensure_network + attach, new network", f.fresh);
    row("attach, empty node", f.attach);
    row("detach, empty node", f.detach);
    row("add one port's rules, empty node", f.rule_add_empty);
    row("remove one port's rules, empty node", f.rule_del_empty);
    let at = args.ports;
    row(&format!("add one port's rules, {at} instances"), f.rule_add);
    row(
        &format!("remove one port's rules, {at} instances"),
        f.rule_del,
    );
    row(&format!("attach, {at} instances"), f.attach_full);
    row(&format!("detach, {at} instances"), f.detach_full);
    println!();
    println!(
        "{at} instances attached in {:.1} s; teardown_all of both nodes {:.1} s; left behind: {}",
        f.install_s,
        f.teardown_s,
        if left.is_empty() {
            "nothing".to_owned()
        } else {
            left.join(", ")
        }
    );
    let rule_update = f.rule_add.p50.max(f.rule_del.p50);
    let load1 = |s: &str| s.split_whitespace().next().unwrap_or("?").to_owned();
    println!(
        "overlay_ratio={ratio:.3} setup_p50_ms={:.2} rule_update_ms={rule_update:.2} underlay_gbps={under:.2} overlay_gbps={over:.2} overlay_ratio_shared_cpus={:.3} underlay_shared_gbps={:.2} overlay_shared_gbps={:.2} sender_cpu_pct={:.0} receiver_cpu_pct={:.0} setup_p90_ms={:.2} detach_p50_ms={:.2} first_setup_p50_ms={:.2} rule_add_ms={:.2} rule_del_ms={:.2} rule_add_empty_ms={:.2} rule_del_empty_ms={:.2} attach_at_ports_p50_ms={:.2} detach_at_ports_p50_ms={:.2} ports={at} clean={} load1_start={} load1_end={}",
        f.attach.p50,
        shared.ratio(),
        median(&shared.underlay),
        median(&shared.overlay),
        median(&f.busy[0][1]),
        median(&f.busy[1][1]),
        f.attach.p90,
        f.detach.p50,
        f.fresh.p50,
        f.rule_add.p50,
        f.rule_del.p50,
        f.rule_add_empty.p50,
        f.rule_del_empty.p50,
        f.attach_full.p50,
        f.detach_full.p50,
        left.is_empty(),
        load1(&load_start),
        load1(&load_end),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_masks_and_halves() {
        assert_eq!(parse_cpu_list("0-1").unwrap(), [0, 1]);
        assert_eq!(parse_cpu_list("0,2-3,8").unwrap(), [0, 2, 3, 8]);
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert_eq!(cpu_mask(&[0]), "00000001");
        assert_eq!(cpu_mask(&[1]), "00000002");
        assert_eq!(cpu_mask(&[2, 3, 33]), "00000002,0000000c");
        assert_eq!(halves(&[0, 1]).unwrap(), [vec![0], vec![1]]);
        assert_eq!(halves(&[0, 1, 2]).unwrap(), [vec![0], vec![1, 2]]);
        assert!(halves(&[5]).is_err());
    }
}
