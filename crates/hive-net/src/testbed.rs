//! A throwaway two-node topology on one host, for integration tests and benchmarks (root,
//! `ip` from iproute2): two network namespaces stand in for nodes, joined by an underlay
//! veth, each with its own [`NodeNet`] (a distinct prefix, `node_netns` pointing at it).
//!
//! Every name starts with a per-run base (`<lead>` + 3 hex digits): node namespaces
//! `<base>n1`, `<base>n2`, underlay devices `<base>u1`, `<base>u2`, NodeNet prefixes `<base>a`,
//! `<base>b`. Addresses exist only inside the namespaces it creates, never in the caller's.
//! Dropping a [`Testbed`] deletes every namespace file of its base (instance namespaces
//! too), which deletes their links and nft tables: also when a test panics.
//!
//! It drives the data plane only through `NodeNet`'s public API and the `ip` / `nft` binaries,
//! so it stays out of the crate's internals; an agent never uses it.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{NetError, NodeNet, NodeNetConfig};

/// Where `ip netns` (and the testbed's NodeNets) keep namespace files.
pub const NETNS_DIR: &str = "/run/netns";

/// Why the testbed could not be built or inspected.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// A command failed or could not be started.
    #[error("{cmd}: {detail}")]
    Command { cmd: String, detail: String },
    /// A node's `NodeNet` did not open.
    #[error("open the node net of {ns}: {source}")]
    Open {
        ns: String,
        #[source]
        source: NetError,
    },
}

/// Runs `cmd`; its stdout if it exits with 0, else its stderr in the error.
pub fn output_ok(cmd: &mut Command) -> Result<String, TestbedError> {
    let name = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|e| TestbedError::Command {
        cmd: name.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(TestbedError::Command {
            cmd: name,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `program` run inside the named namespace (a file in [`NETNS_DIR`]), via `ip netns exec`.
pub fn ns_command(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

fn ip(args: &[&str]) -> Result<String, TestbedError> {
    output_ok(Command::new("ip").args(args))
}

fn ip_in(ns: &str, args: &[&str]) -> Result<String, TestbedError> {
    output_ok(ns_command(ns, "ip").args(args))
}

/// `lead` + 3 hex digits, distinct per process and per call (and random enough that
/// concurrent runs on one host do not meet). `lead` is a lower-case letter.
pub fn unique_base(lead: char) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mix = std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(nanos)
        .wrapping_add(N.fetch_add(1, Ordering::Relaxed).wrapping_mul(40_503));
    format!("{lead}{:03x}", mix & 0xfff)
}

/// One stand-in node.
#[derive(Debug)]
pub struct Node {
    /// This node's NodeNet prefix: the nodes share a host (and `/run/netns`), like two
    /// agents would.
    pub prefix: String,
    /// The node's namespace, a file in [`NETNS_DIR`].
    pub ns: String,
    /// The node's end of the underlay veth.
    pub dev: String,
    /// Its address on the underlay (the VTEP).
    pub ip: Ipv4Addr,
    pub net: NodeNet,
}

/// Two nodes on one underlay /24; see the module comment for the names.
#[derive(Debug)]
pub struct Testbed {
    pub base: String,
    pub nodes: Vec<Node>,
    /// The link capacity every node's `NodeNet` is opened with.
    pub link_bps: u64,
}

impl Testbed {
    /// Builds the topology: node namespaces with `lo` up, the underlay veth between them
    /// with `<underlay>.1/24` and `<underlay>.2/24`, and a `NodeNet` in each. `lead` starts
    /// the base (tests use `t`, benchmarks `b`). What was made before a failure is removed.
    pub async fn new(lead: char, underlay: [u8; 3]) -> Result<Testbed, TestbedError> {
        Self::with_link(
            lead,
            underlay,
            NodeNetConfig::new(Ipv4Addr::UNSPECIFIED, "").link_bps,
        )
        .await
    }

    /// [`Testbed::new`] with nodes whose links carry `link_bps` (what bandwidth guarantees
    /// are shares of).
    pub async fn with_link(
        lead: char,
        underlay: [u8; 3],
        link_bps: u64,
    ) -> Result<Testbed, TestbedError> {
        let base = unique_base(lead);
        // Made first, so that a failure below drops (and cleans) what exists so far.
        let mut bed = Testbed {
            base: base.clone(),
            nodes: Vec::new(),
            link_bps,
        };
        let ns: Vec<String> = (1..=2).map(|i| format!("{base}n{i}")).collect();
        let dev: Vec<String> = (1..=2).map(|i| format!("{base}u{i}")).collect();
        for n in &ns {
            ip(&["netns", "add", n])?;
            ip_in(n, &["link", "set", "lo", "up"])?;
        }
        ip(&[
            "link", "add", &dev[0], "netns", &ns[0], "type", "veth", "peer", "name", &dev[1],
            "netns", &ns[1],
        ])?;
        for i in 0..2 {
            let addr = Ipv4Addr::new(underlay[0], underlay[1], underlay[2], i as u8 + 1);
            ip_in(
                &ns[i],
                &["addr", "add", &format!("{addr}/24"), "dev", &dev[i]],
            )?;
            ip_in(&ns[i], &["link", "set", &dev[i], "up"])?;
            let prefix = format!("{base}{}", ["a", "b"][i]);
            let net = open(&prefix, &ns[i], addr, &dev[i], link_bps).await?;
            bed.nodes.push(Node {
                prefix,
                ns: ns[i].clone(),
                dev: dev[i].clone(),
                ip: addr,
                net,
            });
        }
        Ok(bed)
    }

    /// The namespace name (in [`NETNS_DIR`]) of an instance, on whichever node has it.
    pub fn inst_ns(&self, key: &str) -> Option<String> {
        self.nodes
            .iter()
            .map(|n| format!("{}-{key}", n.prefix))
            .find(|name| Path::new(NETNS_DIR).join(name).exists())
    }

    /// Reopens node `i`'s NodeNet, as a restarted agent would.
    pub async fn reopen(&mut self, i: usize) -> Result<(), TestbedError> {
        let n = &self.nodes[i];
        let net = open(&n.prefix, &n.ns, n.ip, &n.dev, self.link_bps).await?;
        self.nodes[i].net = net;
        Ok(())
    }

    /// Links in node `i`'s namespace whose name starts with its prefix (the underlay's
    /// does not).
    pub fn our_links(&self, i: usize) -> Result<Vec<String>, TestbedError> {
        let n = &self.nodes[i];
        let out = ip_in(&n.ns, &["-o", "link", "show"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_owned())
            .filter(|name| name.starts_with(&n.prefix))
            .collect())
    }

    /// Instance namespace files of node `i`.
    pub fn our_netns(&self, i: usize) -> Vec<String> {
        netns_files(&format!("{}-", self.nodes[i].prefix))
    }

    /// Node `i`'s nft table as `nft list` prints it; `None` if there is none.
    pub fn nft_table(&self, i: usize) -> Option<String> {
        let n = &self.nodes[i];
        output_ok(ns_command(&n.ns, "nft").args(["list", "table", "bridge", &n.prefix])).ok()
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // Deleting a namespace deletes its links and nft tables; instance namespaces too.
        let mut names = netns_files(&self.base);
        names.sort();
        for n in names {
            let _ = ip(&["netns", "del", &n]);
        }
    }
}

async fn open(
    prefix: &str,
    ns: &str,
    underlay_ip: Ipv4Addr,
    dev: &str,
    link_bps: u64,
) -> Result<NodeNet, TestbedError> {
    let mut cfg = NodeNetConfig::new(underlay_ip, dev);
    cfg.prefix = prefix.to_owned();
    cfg.link_bps = link_bps;
    cfg.node_netns = Some(PathBuf::from(NETNS_DIR).join(ns));
    NodeNet::open(cfg)
        .await
        .map_err(|source| TestbedError::Open {
            ns: ns.to_owned(),
            source,
        })
}

/// Namespace files in [`NETNS_DIR`] whose name starts with `start`.
fn netns_files(start: &str) -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|n| n.starts_with(start))
                .collect()
        })
        .unwrap_or_default()
}

/// What a dropped testbed of `base` left on the host: namespace files, mounts under
/// [`NETNS_DIR`] and links in the caller's namespace whose names start with `base`. Empty when
/// the teardown was complete.
pub fn leftovers(base: &str) -> Vec<String> {
    let mut left: Vec<String> = netns_files(base)
        .into_iter()
        .map(|n| format!("netns file {n}"))
        .collect();
    let under = format!("{NETNS_DIR}/{base}");
    if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
        left.extend(
            info.lines()
                .filter_map(|l| l.split_whitespace().nth(4))
                .filter(|m| m.starts_with(&under))
                .map(|m| format!("mount {m}")),
        );
    }
    if let Ok(out) = ip(&["-o", "link", "show"]) {
        left.extend(
            out.lines()
                .filter_map(|l| l.split(": ").nth(1))
                .map(|name| name.split('@').next().unwrap_or(name))
                .filter(|name| name.starts_with(base))
                .map(|name| format!("link {name}")),
        );
    }
    left
}
