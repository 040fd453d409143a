//! Hive's per-node data plane for tenant networks.
//!
//! One [`NodeNet`] per agent owns, in its node's network namespace: a bridge and a VXLAN
//! device per tenant network (VNI), a veth port and a named network namespace per
//! instance, the node's nftables table (family `bridge`) with one anti-spoofing chain per
//! port, and the static FDB / neighbour entries that tell each VXLAN device where remote
//! instances live. It knows nothing about services, tenants or the API: the agent hands it
//! VNIs, addresses and keys. Ports with a bandwidth get HTB classes ([`qos`]) and packet
//! rate limits. See `docs/networking.md` for the layout and the rules.
//!
//! Every operation is idempotent and converges from whatever a crash left behind; removal
//! is best effort and reports every failure ([`NetError::Multiple`]).

mod dns;
mod error;
mod firewall;
mod link;
mod names;
mod netns;
mod nfnl;
mod nft;
mod publish;
pub mod qos;
mod remote;
mod services;
pub mod testbed;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rtnetlink::Handle;

pub use dns::{DnsZone, RESOLVER_ADDR, SrvTarget};
pub use error::NetError;
pub use firewall::{Firewall, FwProtocol, FwRule};
pub use names::{MAX_PREFIX_LEN, MAX_VNI};
pub use publish::{Protocol, PublishedPort};
pub use qos::Qos;
pub use services::ServiceRoute;

/// VXLAN over IPv4 adds 50 bytes: outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8.
pub const VXLAN_OVERHEAD: u32 = 50;
/// The name of the instance's interface inside its namespace.
pub const CONTAINER_IFNAME: &str = "eth0";

/// Sysctls written in every instance namespace: a new namespace inherits the host's
/// defaults (or the kernel's), neither of which is what a tenant instance should get.
const CONTAINER_SYSCTLS: &[(&str, &str)] = &[
    // IPv4 only for now: no link-local addresses, RS, MLD or DAD noise on tenant bridges.
    ("net.ipv6.conf.all.disable_ipv6", "1"),
    ("net.ipv6.conf.default.disable_ipv6", "1"),
    ("net.ipv4.ip_forward", "0"),
    ("net.ipv4.conf.all.rp_filter", "1"),
    ("net.ipv4.conf.default.rp_filter", "1"),
    ("net.ipv4.conf.all.accept_redirects", "0"),
    ("net.ipv4.conf.default.accept_redirects", "0"),
    ("net.ipv4.conf.all.send_redirects", "0"),
    ("net.ipv4.conf.default.send_redirects", "0"),
    ("net.ipv4.conf.all.accept_source_route", "0"),
    ("net.ipv4.conf.default.accept_source_route", "0"),
    // Unprivileged ICMP echo sockets, as podman and docker allow inside containers.
    ("net.ipv4.ping_group_range", "0 2147483647"),
];

/// Sysctls of the node namespace. br_netfilter (built into these kernels) defaults to
/// passing bridged frames through the IP hooks and conntrack: a node `inet` forward policy
/// would then drop tenant traffic, and overlapping tenant subnets would share conntrack
/// entries. Bridged tenant traffic is filtered by our `bridge` table only.
const NODE_SYSCTLS: &[(&str, &str)] = &[
    ("net.bridge.bridge-nf-call-iptables", "0"),
    ("net.bridge.bridge-nf-call-ip6tables", "0"),
    ("net.bridge.bridge-nf-call-arptables", "0"),
];

/// How a node's data plane is set up.
#[derive(Debug, Clone)]
pub struct NodeNetConfig {
    /// This node's VTEP address (the VXLAN `local`, and what other nodes send to).
    pub underlay_ip: Ipv4Addr,
    /// The interface VXLAN packets leave by; its MTU bounds the overlay MTU.
    pub underlay_dev: String,
    /// Where instance namespaces are bind-mounted (like `ip netns`); default `/run/netns`.
    pub netns_dir: PathBuf,
    /// Prefix of every device, namespace and nft table name; 1..=6 of `[a-z0-9]`, starting
    /// with a letter. Default `hive`. Agents (or tests) sharing a host use distinct ones,
    /// none of which may be another's prefix followed by `b`, `x` or `p`.
    pub prefix: String,
    /// The node's network namespace. `None`: the namespace of the thread calling
    /// [`NodeNet::open`] (the host's, for an agent). Tests point it at a namespace that
    /// stands in for a node.
    pub node_netns: Option<PathBuf>,
    /// The underlay's capacity in bits/s: the HTB link class that guarantees are shares of.
    pub link_bps: u64,
}

impl NodeNetConfig {
    pub fn new(underlay_ip: Ipv4Addr, underlay_dev: impl Into<String>) -> Self {
        Self {
            underlay_ip,
            underlay_dev: underlay_dev.into(),
            netns_dir: PathBuf::from("/run/netns"),
            prefix: "hive".to_owned(),
            node_netns: None,
            link_bps: 10_000_000_000,
        }
    }
}

/// An IPv4 prefix, e.g. `10.77.0.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Subnet {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Subnet {
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Result<Self, NetError> {
        if prefix_len > 32 {
            return Err(NetError::invalid(
                "subnet",
                format!("{addr}/{prefix_len}: prefix over 32"),
            ));
        }
        Ok(Self { addr, prefix_len })
    }

    pub(crate) fn mask(self) -> u32 {
        if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix_len))
        }
    }

    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }
}

impl std::fmt::Display for Ipv4Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A tenant network as this node needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkDef {
    pub vni: u32,
    pub subnet: Ipv4Subnet,
    pub gateway: Ipv4Addr,
}

/// One instance's port on a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Unique per instance (its uid); names the namespace and, hashed, the host veth.
    pub key: String,
    pub vni: u32,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub mac: [u8; 6],
    pub gateway: Ipv4Addr,
    /// Its bandwidth and packet rate (none: unshaped, in the node's default class).
    pub qos: Qos,
}

/// What the runtime needs to start the instance in its network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedPort {
    /// For the OCI runtime spec's network namespace `path`.
    pub netns_path: PathBuf,
    /// The host side of the veth (the key of the port's nft chain).
    pub host_ifname: String,
    /// The namespace was made by this call (it holds nothing but the port: no nft table),
    /// rather than found (e.g. after an agent restart).
    pub created: bool,
}

/// An instance of the same network on another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteEndpoint {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    /// The VTEP (underlay address) of the node it runs on.
    pub node_ip: Ipv4Addr,
}

/// Packets dropped by one port's anti-spoofing chain since it was (re)installed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortCounters {
    /// Frames whose Ethernet source is not the port's MAC.
    pub l2_spoof: u64,
    /// ARP with a foreign sender MAC or sender IP.
    pub arp_spoof: u64,
    /// IPv4 with a foreign source address.
    pub ip_spoof: u64,
    /// Ethertypes other than IPv4 and ARP (IPv6 included, for now).
    pub other_ethertype: u64,
    /// Small frames over the port's packet rate limit.
    pub pps_limited: u64,
}

/// The node's tenant-network data plane. `Send + Sync`; share it behind an `Arc`.
///
/// Callers serialise operations on one key (one runner per instance); different keys and
/// networks may be worked on concurrently.
#[derive(Debug)]
pub struct NodeNet {
    cfg: NodeNetConfig,
    names: names::Names,
    mtu: u32,
    underlay_index: u32,
    node_ns: Arc<File>,
    handle: Handle,
    /// nf_tables netlink socket in the node's namespace: every per-port rule change.
    nf: nfnl::NfSocket,
    /// The underlay carries our HTB tree (made with the first shaped port).
    shaping: AtomicBool,
    /// The DNS resolver inside each instance namespace that has one.
    dns: dns::Resolvers,
    /// The VIP routes last written into each instance namespace.
    services: services::Tables,
    /// Namespaces made ahead for the next ports.
    spares: netns::Spares,
    /// The networks [`NodeNet::ensure_network`] last converged, and when.
    ensured: std::sync::Mutex<HashMap<u32, (NetworkDef, Instant)>>,
}

/// What of one prefix exists in a node's namespace: what [`NodeNet::teardown_all`] removes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owned {
    /// Ports, bridges, VXLAN devices and router links.
    pub links: Vec<String>,
    /// Files in the netns directory: instances' `{prefix}-{key}`, routers' `{prefix}_r{vni}`.
    pub netns: Vec<String>,
    /// nftables tables of the node's namespace, as `family name` (`bridge hive`).
    pub tables: Vec<String>,
}

impl Owned {
    pub fn is_empty(&self) -> bool {
        self.links.is_empty() && self.netns.is_empty() && self.tables.is_empty()
    }
}

impl NodeNet {
    /// Prepares the node: sysctls, the netns directory, the nft table. Idempotent.
    pub async fn open(cfg: NodeNetConfig) -> Result<NodeNet, NetError> {
        Self::open_as(cfg, true).await
    }

    /// Opens the node's data plane only to see or remove what its prefix left
    /// ([`NodeNet::owned`], [`NodeNet::teardown_all`]), changing nothing on the way: no
    /// sysctl, no table, no netns directory. A missing underlay device only means that no
    /// bandwidth classes are looked for.
    pub async fn open_existing(cfg: NodeNetConfig) -> Result<NodeNet, NetError> {
        Self::open_as(cfg, false).await
    }

    async fn open_as(cfg: NodeNetConfig, prepare: bool) -> Result<NodeNet, NetError> {
        let names = names::Names::new(&cfg.prefix)?;
        let node_ns = Arc::new(match &cfg.node_netns {
            Some(p) => netns::open(p)?,
            None => netns::current()?,
        });
        let (socket, nf) = netns::run_in(&node_ns, "node namespace setup", move || {
            for (k, v) in NODE_SYSCTLS.iter().filter(|_| prepare) {
                match netns::write_sysctl(k, v) {
                    // No br_netfilter in this kernel: nothing to turn off.
                    Err(e) if e.errno() == Some(nix::libc::ENOENT) => {}
                    r => r?,
                }
            }
            Ok((netns::netlink_socket()?, nfnl::NfSocket::new()?))
        })
        .await?;
        let handle = netns::handle_from_socket(socket)?;
        let underlay = link::get(&handle, &cfg.underlay_dev).await?;
        if !prepare {
            let (underlay_index, mtu) = underlay.map_or((0, 0), |u| (u.index, u.mtu));
            return Ok(NodeNet {
                mtu: mtu.saturating_sub(VXLAN_OVERHEAD),
                underlay_index,
                names,
                node_ns,
                handle,
                nf,
                cfg,
                shaping: AtomicBool::new(false),
                dns: dns::Resolvers::default(),
                services: services::Tables::default(),
                spares: netns::Spares::default(),
                ensured: Default::default(),
            });
        }
        let underlay = underlay.ok_or_else(|| {
            NetError::invalid(
                "underlay_dev",
                format!("{}: no such interface", cfg.underlay_dev),
            )
        })?;
        let mtu = underlay.mtu.saturating_sub(VXLAN_OVERHEAD);
        if mtu < 576 {
            return Err(NetError::invalid(
                "underlay_dev",
                format!(
                    "{}: mtu {} leaves {mtu} for the overlay",
                    cfg.underlay_dev, underlay.mtu
                ),
            ));
        }
        netns::prepare_dir(&cfg.netns_dir)?;
        nft::apply(&node_ns, "create table", &nft::table_batch(names.table())).await?;
        // Without tc, ports with a bandwidth fail to attach, saying why; the rest works.
        let shaping = match qos::port_classes(&node_ns, &cfg.underlay_dev).await {
            Ok(classes) => !classes.is_empty(),
            Err(e) => {
                tracing::warn!(error = %e, "bandwidth classes unavailable");
                false
            }
        };
        Ok(NodeNet {
            mtu,
            underlay_index: underlay.index,
            names,
            node_ns,
            handle,
            nf,
            cfg,
            shaping: AtomicBool::new(shaping),
            dns: dns::Resolvers::default(),
            services: services::Tables::default(),
            spares: netns::Spares::default(),
            ensured: Default::default(),
        })
    }

    /// The namespaces kept ready for the next ports (their inode numbers): none until
    /// [`NodeNet::refill_spares`] is called.
    pub fn spare_namespaces(&self) -> Vec<u64> {
        self.spares.ids()
    }

    /// The overlay MTU: bridges, VXLAN devices and both ends of every veth.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// Bridge + VXLAN device of a network, both up with the overlay MTU. Idempotent; a
    /// VXLAN device with other parameters (say, a changed underlay) is recreated.
    pub async fn ensure_network(&self, net: &NetworkDef) -> Result<(), NetError> {
        names::validate_vni(net.vni)?;
        if !net.subnet.contains(net.gateway) {
            return Err(NetError::invalid(
                "network",
                format!(
                    "vni {}: gateway {} outside {}",
                    net.vni, net.gateway, net.subnet
                ),
            ));
        }
        let h = &self.handle;
        let (br_name, vx_name) = (self.names.bridge(net.vni), self.names.vxlan(net.vni));
        let (br, vx) = tokio::join!(link::get(h, &br_name), link::get(h, &vx_name));
        let (br, mut vx) = (br?, vx?);
        let br = match br {
            Some(l) => l,
            None => {
                tolerate_exists(link::add_bridge(h, &br_name, self.mtu).await)?;
                self.must_get(&br_name).await?
            }
        };
        if br.mtu != self.mtu {
            link::set_mtu_controller(h, br.index, &br_name, self.mtu, None).await?;
        }
        if let Some(l) = &vx
            && !l.vxlan_matches(net.vni, self.cfg.underlay_ip, self.underlay_index)
        {
            tracing::info!(vxlan = %vx_name, "recreating vxlan device with changed parameters");
            link::del(h, l.index, &vx_name).await?;
            vx = None;
        }
        let vx = match vx {
            Some(l) => l,
            None => {
                tolerate_exists(
                    link::add_vxlan(
                        h,
                        &vx_name,
                        net.vni,
                        self.cfg.underlay_ip,
                        self.underlay_index,
                        self.mtu,
                        br.index,
                    )
                    .await,
                )?;
                self.must_get(&vx_name).await?
            }
        };
        if vx.mtu != self.mtu || vx.controller != Some(br.index) {
            link::set_mtu_controller(h, vx.index, &vx_name, self.mtu, Some(br.index)).await?;
        }
        self.disable_ipv6(vec![br_name.clone(), vx_name.clone()])
            .await?;
        if !br.up {
            link::set_up(h, br.index, &br_name).await?;
        }
        if !vx.up {
            link::set_up(h, vx.index, &vx_name).await?;
        }
        self.ensured_lock()
            .insert(net.vni, (net.clone(), Instant::now()));
        Ok(())
    }

    /// [`NodeNet::ensure_network`], unless this `NodeNet` converged the same network less
    /// than `fresh` ago: a burst of ports on one network reads its devices once, not at
    /// every port. A bridge removed behind its back meanwhile is not seen here; the port's
    /// [`NodeNet::attach`] then fails with [`NetError::NoNetwork`] ([`NodeNet::attach_on`]
    /// ensures it and attaches again).
    pub async fn ensure_network_within(
        &self,
        net: &NetworkDef,
        fresh: Duration,
    ) -> Result<(), NetError> {
        let recent = matches!(
            self.ensured_lock().get(&net.vni),
            Some((def, at)) if def == net && at.elapsed() < fresh
        );
        if recent {
            return Ok(());
        }
        self.ensure_network(net).await
    }

    /// The port of `a` on network `net`, the network converged first unless it was less
    /// than `fresh` ago ([`NodeNet::ensure_network_within`]); a bridge lost since is made
    /// again and the attach tried once more.
    pub async fn attach_on(
        &self,
        net: &NetworkDef,
        a: &Attachment,
        fresh: Duration,
    ) -> Result<AttachedPort, NetError> {
        self.ensure_network_within(net, fresh).await?;
        match self.attach(a).await {
            Err(NetError::NoNetwork { .. }) => {
                self.ensure_network(net).await?;
                self.attach(a).await
            }
            r => r,
        }
    }

    fn ensured_lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, (NetworkDef, Instant)>> {
        self.ensured.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deletes a network's VXLAN device and bridge (with their FDB and neighbour entries).
    /// Ports still on the bridge are not detached: detach them first.
    pub async fn remove_network(&self, vni: u32) -> Result<(), NetError> {
        names::validate_vni(vni)?;
        self.ensured_lock().remove(&vni);
        let mut errors = Vec::new();
        if let Err(e) = self.remove_router(vni).await {
            errors.push(e);
        }
        for name in [self.names.vxlan(vni), self.names.bridge(vni)] {
            if let Err(e) = link::del_by_name(&self.handle, &name).await {
                errors.push(e);
            }
        }
        NetError::collect(errors)
    }

    /// Connects an instance: anti-spoofing rules first, then its namespace, veth, addresses
    /// and route; the host side goes up last. Idempotent per key: after an agent restart it
    /// finds and converges the existing port instead of failing.
    pub async fn attach(&self, a: &Attachment) -> Result<AttachedPort, NetError> {
        self.validate_attachment(a)?;
        let h = &self.handle;
        let port = self.names.port(&a.key);
        let netns_path = self.cfg.netns_dir.join(self.names.netns(&a.key));
        let br_name = self.names.bridge(a.vni);
        let br = link::get(h, &br_name).await?.ok_or(NetError::NoNetwork {
            vni: a.vni,
            bridge: br_name,
        })?;

        // The rules go in first (one netlink transaction, well under a millisecond), so the
        // port never carries a frame without them. A port that exists already keeps its
        // class; a new one gets it once its veth (whose index names the class) exists.
        let existing = link::get(h, &port).await?;
        let class = match &existing {
            Some(l) if a.qos.shapes() => Some(qos::class_of(l.index)?),
            _ => None,
        };
        self.install_rules(a, &port, class)?;
        let ns = self.port_netns(&a.key, &netns_path).await;
        let created = ns.as_ref().is_ok_and(|n| n.created);
        let result = async {
            let ns = ns?;
            let host = self.converge_port(a, &port, existing, br.index, ns).await?;
            // Shaped before it carries a frame: classes, then the rules that use them.
            if a.qos.shapes() {
                self.shape(a, &port, host.index).await?;
            }
            if !host.up {
                link::set_up(h, host.index, &port).await?;
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => Ok(AttachedPort {
                netns_path,
                host_ifname: port,
                created,
            }),
            Err(e) => {
                // Undo only what this call started from nothing; never a live instance.
                if created && let Err(undo) = self.detach(&a.key).await {
                    tracing::warn!(key = %a.key, error = %undo, "undo failed attach");
                }
                Err(e)
            }
        }
    }

    /// Instance `key`'s namespace at `path`: the one there, else a spare named for it (its
    /// resolver's sockets kept for [`NodeNet::serve_dns`], its nf_tables socket for
    /// [`NodeNet::set_service_routes`]), else a new one.
    async fn port_netns(&self, key: &str, path: &Path) -> Result<netns::NamedNetns, NetError> {
        if !netns::is_nsfs(path)
            && let Some(spare) = self.spares.take()
        {
            let (named, inside) = spare.name(path)?;
            self.dns.keep_prebound(key, inside.dns);
            self.services.keep(key, &named.ns, inside.nft).await;
            return Ok(named);
        }
        netns::create_or_open(path.to_owned(), CONTAINER_SYSCTLS).await
    }

    /// Tops up the namespaces kept ready for the next ports ([`NodeNet::attach`] names one
    /// instead of making its own), in the background on the current tokio runtime. Making
    /// one is ~1 ms of CPU, mostly the kernel's, so call it when the node is quiet rather
    /// than beside a start (the agent does once its starts are over).
    pub fn refill_spares(&self) {
        let veth = netns::VethPlan {
            handle: self.handle.clone(),
            node_ns: self.node_ns.clone(),
            prefix: self.names.table().to_owned(),
            mtu: self.mtu,
        };
        self.spares.refill(CONTAINER_SYSCTLS, Some(veth));
    }

    /// Installs (or rewrites) the port's chain, classified into `class` if given.
    fn install_rules(
        &self,
        a: &Attachment,
        port: &str,
        class: Option<u32>,
    ) -> Result<(), NetError> {
        let shaping = nft::Shaping {
            pps: a.qos.pps,
            class,
        };
        let rules = nft::port_batch(self.names.table(), port, a.mac, a.ip, shaping);
        self.nf
            .apply(&format!("install rules of port {port}"), &rules)
    }

    /// The port's HTB classes (the uplink tree first, if this is the first shaped port)
    /// and the rule that classifies its frames.
    async fn shape(&self, a: &Attachment, port: &str, ifindex: u32) -> Result<(), NetError> {
        let class = qos::class_of(ifindex)?;
        let (uplink, link_bps) = (&self.cfg.underlay_dev, self.cfg.link_bps);
        qos::ensure_uplink(&self.node_ns, uplink, link_bps).await?;
        self.shaping.store(true, Ordering::Relaxed);
        qos::set_port(&self.node_ns, uplink, port, class, &a.qos, link_bps).await?;
        self.install_rules(a, port, Some(class))
    }

    /// The host side of the port, with everything but its state up.
    async fn converge_port(
        &self,
        a: &Attachment,
        port: &str,
        existing: Option<link::Link>,
        bridge: u32,
        mut ns: netns::NamedNetns,
    ) -> Result<link::Link, NetError> {
        let h = &self.handle;
        // A spare namespace's veth pair, made ahead: renamed onto the bridge, its container
        // side given the port's address below.
        let spare = match (&existing, ns.veth.take()) {
            (None, Some(v)) => {
                Some(link::rename_veth_onto(h, v.index, port, self.mtu, bridge).await?)
            }
            // A port whose namespace was gone: its veth leads elsewhere, and the spare's
            // goes, so that the namespace is as one made now would be.
            (Some(_), Some(v)) => {
                link::del(h, v.index, "a spare veth").await?;
                None
            }
            (_, None) => None,
        };
        let premade = spare.is_some();
        let host = match (existing, spare) {
            (_, Some(l)) => l,
            (Some(l), None) => {
                if l.controller != Some(bridge) || l.mtu != self.mtu {
                    link::set_mtu_controller(h, l.index, port, self.mtu, Some(bridge)).await?;
                }
                l
            }
            (None, None) => {
                let made = link::add_veth(
                    h,
                    port,
                    CONTAINER_IFNAME,
                    ns.ns.as_raw_fd(),
                    a.mac,
                    self.mtu,
                    bridge,
                )
                .await?;
                match made {
                    Some(l) => l,
                    None => self.must_get(port).await?,
                }
            }
        };
        // Inside the instance namespace, through a socket made there.
        let inner = netns::handle_from_socket(ns.socket)?;
        if !ns.lo_up {
            let lo = link::get(&inner, "lo")
                .await?
                .ok_or_else(|| NetError::invalid("netns", "no lo inside the instance namespace"))?;
            link::set_up(&inner, lo.index, "lo").await?;
        }
        let eth = link::get(&inner, CONTAINER_IFNAME).await?.ok_or_else(|| {
            NetError::invalid(
                "netns",
                format!("no {CONTAINER_IFNAME} inside the namespace of {}", a.key),
            )
        })?;
        if premade {
            link::set_address(&inner, eth.index, CONTAINER_IFNAME, a.mac).await?;
        }
        link::add_address(&inner, eth.index, a.ip, a.prefix_len, CONTAINER_IFNAME).await?;
        link::set_up(&inner, eth.index, CONTAINER_IFNAME).await?;
        link::replace_default_route(&inner, a.gateway, eth.index).await?;
        drop(inner);
        // A spare's host side has none since it was made (the setting follows the device
        // through its rename).
        if !premade {
            self.disable_ipv6(vec![port.to_owned()]).await?;
        }
        Ok(host)
    }

    /// Removes an instance's veth, rules and namespace. Best effort: tries every step and
    /// reports every failure; a missing piece is not one. The veth goes first, so the port
    /// never carries traffic without its rules.
    pub async fn detach(&self, key: &str) -> Result<(), NetError> {
        names::validate_key(key)?;
        let port = self.names.port(key);
        let mut errors = Vec::new();
        // Its resolver's sockets would keep the namespace alive.
        self.dns.remove(key);
        self.services.remove(key);
        let class = match link::get(&self.handle, &port).await {
            Ok(l) => l.and_then(|l| qos::class_of(l.index).ok()),
            Err(e) => {
                errors.push(e);
                None
            }
        };
        if let Err(e) = link::del_by_name(&self.handle, &port).await {
            errors.push(e);
        }
        if let Some(class) = class.filter(|_| self.shaping.load(Ordering::Relaxed))
            && let Err(e) = qos::remove_port(&self.node_ns, &self.cfg.underlay_dev, class).await
        {
            errors.push(e);
        }
        if let Err(e) = self.remove_port_rules(&[port]) {
            errors.push(e);
        }
        if let Err(e) = netns::remove(&self.cfg.netns_dir.join(self.names.netns(key))) {
            errors.push(e);
        }
        // A view written meanwhile (its writer opened the namespace before it went) may
        // have kept a socket or a resolver in it again: dropped now that none can be made.
        self.dns.remove(key);
        self.services.remove(key);
        NetError::collect(errors)
    }

    fn remove_port_rules(&self, ports: &[String]) -> Result<(), NetError> {
        // One transaction per ~64 KiB of messages: a batch must fit the socket's send
        // buffer, and each port's removal is self-contained.
        let mut errors = Vec::new();
        let mut chunk: Vec<&str> = Vec::new();
        let mut batch = nfnl::Batch::new(self.names.table());
        for (i, p) in ports.iter().enumerate() {
            nft::port_delete(&mut batch, p);
            chunk.push(p);
            if batch.len_bytes() > 64 * 1024 || i + 1 == ports.len() {
                let op = format!("remove rules of {}", chunk.join(" "));
                if let Err(e) = self.nf.apply(&op, &batch) {
                    errors.push(e);
                }
                chunk.clear();
                batch = nfnl::Batch::new(self.names.table());
            }
        }
        if errors.is_empty() {
            return Ok(());
        }
        // After teardown_all there is no table, hence nothing to remove.
        match self.nf.table_exists(self.names.table()) {
            Ok(false) => Ok(()),
            _ => NetError::collect(errors),
        }
    }

    /// Makes the network's VXLAN forwarding state exactly `endpoints` (instances of this
    /// network on other nodes): unicast FDB entries to their node, bridge entries towards
    /// the VXLAN port, neighbour entries for ARP suppression, and one all-zero FDB entry per
    /// node with endpoints, so broadcast reaches those nodes only. Endpoints whose node is
    /// this one are ignored. Adds come before removals; every failure is reported.
    pub async fn set_remote_endpoints(
        &self,
        vni: u32,
        endpoints: &[RemoteEndpoint],
    ) -> Result<(), NetError> {
        names::validate_vni(vni)?;
        let h = &self.handle;
        let vx_name = self.names.vxlan(vni);
        let vx = link::get(h, &vx_name).await?.ok_or(NetError::NoNetwork {
            vni,
            bridge: self.names.bridge(vni),
        })?;
        let current = link::vxlan_state(h, vx.index).await?;
        let plan = remote::plan(self.cfg.underlay_ip, endpoints, &current)?;
        if plan.is_empty() {
            return Ok(());
        }
        let mut errors = Vec::new();
        let mut note = |r: Result<(), NetError>| {
            if let Err(e) = r {
                errors.push(e);
            }
        };
        for e in &plan.add_self {
            note(link::add_fdb_self(h, vx.index, *e).await);
        }
        for m in &plan.add_master {
            note(link::add_fdb_master(h, vx.index, *m).await);
        }
        for (ip, mac) in &plan.set_neigh {
            note(link::set_neigh(h, vx.index, *ip, *mac).await);
        }
        for e in &plan.del_self {
            note(link::del_fdb_self(h, vx.index, *e).await);
        }
        for m in &plan.del_master {
            note(link::del_fdb_master(h, vx.index, *m).await);
        }
        for ip in &plan.del_neigh {
            note(link::del_neigh(h, vx.index, *ip).await);
        }
        NetError::collect(errors)
    }

    /// After an agent restart: removes every port, namespace, network and nft chain of
    /// this prefix whose key or VNI is not kept. Kept ones are left as they are; `attach`
    /// and `ensure_network` converge them.
    pub async fn reconcile(
        &self,
        keep_keys: &HashSet<String>,
        keep_vnis: &HashSet<u32>,
    ) -> Result<(), NetError> {
        self.ensured_lock().retain(|vni, _| keep_vnis.contains(vni));
        let keep_ports: HashSet<String> = keep_keys.iter().map(|k| self.names.port(k)).collect();
        let mut errors = Vec::new();
        let links = link::list(&self.handle).await?;
        // Routers of networks no longer kept (their links go with the rest below).
        for l in &links {
            if let Some(v) = self.parse_router_link(&l.name)
                && !keep_vnis.contains(&v)
                && l.name == self.transit_if(v)
                && let Err(e) = self.remove_router(v).await
            {
                errors.push(e);
            }
        }
        let stale = |l: &&link::Link| {
            (self.names.is_port(&l.name) && !keep_ports.contains(&l.name))
                || self
                    .parse_router_link(&l.name)
                    .is_some_and(|v| !keep_vnis.contains(&v))
                || self
                    .names
                    .parse_vxlan(&l.name)
                    .is_some_and(|v| !keep_vnis.contains(&v))
                || self
                    .names
                    .parse_bridge(&l.name)
                    .is_some_and(|v| !keep_vnis.contains(&v))
        };
        // Ports, then VXLAN devices, then bridges.
        let mut doomed: Vec<&link::Link> = links.iter().filter(stale).collect();
        doomed.sort_by_key(|l| {
            (
                !self.names.is_port(&l.name),
                self.names.parse_bridge(&l.name).is_some(),
            )
        });
        for l in doomed {
            if let Err(e) = link::del(&self.handle, l.index, &l.name).await {
                errors.push(e);
            }
        }
        // Classes of ports that are gone (a port's class is named by its veth's index). No
        // underlay device (opened to tear down after it went): no classes either.
        let live: HashSet<u32> = links
            .iter()
            .filter(|l| keep_ports.contains(&l.name))
            .filter_map(|l| qos::class_of(l.index).ok())
            .collect();
        let classes = match self.underlay_index {
            0 => Ok(Vec::new()),
            _ => qos::port_classes(&self.node_ns, &self.cfg.underlay_dev).await,
        };
        match classes {
            Ok(classes) => {
                for c in classes.into_iter().filter(|c| !live.contains(c)) {
                    if let Err(e) = qos::remove_port(&self.node_ns, &self.cfg.underlay_dev, c).await
                    {
                        errors.push(e);
                    }
                }
            }
            Err(e) => errors.push(e),
        }
        match nft::list_ports(&self.node_ns, &self.names).await {
            Ok(ports) => {
                let stale: Vec<String> = ports
                    .into_iter()
                    .filter(|p| !keep_ports.contains(p))
                    .collect();
                if !stale.is_empty()
                    && let Err(e) = self.remove_port_rules(&stale)
                {
                    errors.push(e);
                }
            }
            Err(e) => errors.push(e),
        }
        match netns::list_dir(&self.cfg.netns_dir) {
            Ok(files) => {
                for f in files {
                    let instance = self.names.parse_netns(&f);
                    let stale = instance.is_some_and(|k| !keep_keys.contains(k))
                        || self
                            .parse_router_netns(&f)
                            .is_some_and(|v| !keep_vnis.contains(&v));
                    if !stale {
                        continue;
                    }
                    // The sockets kept inside it go first: they hold the namespace.
                    self.services.remove(instance.unwrap_or(&f));
                    if let Err(e) = netns::remove(&self.cfg.netns_dir.join(&f)) {
                        errors.push(e);
                    }
                }
            }
            Err(e) => errors.push(e),
        }
        NetError::collect(errors)
    }

    /// What of this prefix exists: links, namespace files, tables of the node's namespace.
    pub async fn owned(&self) -> Result<Owned, NetError> {
        let mut links: Vec<String> = link::list(&self.handle)
            .await?
            .into_iter()
            .map(|l| l.name)
            .filter(|n| {
                self.names.is_port(n)
                    || self.names.parse_bridge(n).is_some()
                    || self.names.parse_vxlan(n).is_some()
                    || self.parse_router_link(n).is_some()
            })
            .collect();
        links.sort();
        let netns = netns::list_dir(&self.cfg.netns_dir)?
            .into_iter()
            .filter(|f| self.names.parse_netns(f).is_some() || self.parse_router_netns(f).is_some())
            .collect();
        let ours = [
            ("bridge", self.names.table().to_owned()),
            ("ip", self.node_pub_table()),
        ];
        let tables = nft::list_tables(&self.node_ns)
            .await?
            .into_iter()
            .filter(|(family, name)| ours.iter().any(|(f, n)| f == family && n == name))
            .map(|(family, name)| format!("{family} {name}"))
            .collect();
        Ok(Owned {
            links,
            netns,
            tables,
        })
    }

    /// Removes everything of this prefix, the nft table included (node sysctls stay).
    pub async fn teardown_all(&self) -> Result<(), NetError> {
        self.dns.clear();
        let mut errors = match self.reconcile(&HashSet::new(), &HashSet::new()).await {
            Ok(()) => Vec::new(),
            Err(NetError::Multiple(v)) => v,
            Err(e) => vec![e],
        };
        if let Err(e) = self.remove_node_pub_table() {
            errors.push(e);
        }
        if self.underlay_index != 0
            && let Err(e) = qos::remove_uplink(&self.node_ns, &self.cfg.underlay_dev).await
        {
            errors.push(e);
        }
        self.shaping.store(false, Ordering::Relaxed);
        match self.nf.table_exists(self.names.table()) {
            Ok(true) => {
                let b = nft::delete_table_batch(self.names.table());
                if let Err(e) = nft::apply(&self.node_ns, "delete table", &b).await {
                    errors.push(e);
                }
            }
            Ok(false) => {}
            Err(e) => errors.push(e),
        }
        NetError::collect(errors)
    }

    /// Makes what may reach instance `key` exactly `fw` (none: anything of its network, the
    /// default), in one transaction inside its namespace. The namespace must exist
    /// (`attach` made it); the rules go with it.
    pub async fn set_firewall(&self, key: &str, fw: Option<&Firewall>) -> Result<(), NetError> {
        names::validate_key(key)?;
        let table = format!("{}fw", self.cfg.prefix);
        let op = format!("security group rules of {key}");
        let t = self.ns_tables(key, &op).await?;
        t.sock.apply(&op, &firewall::batch(&table, fw))
    }

    /// The drop counters of a port's anti-spoofing chain; `None` if it has none.
    pub async fn port_counters(&self, key: &str) -> Result<Option<PortCounters>, NetError> {
        names::validate_key(key)?;
        let c = nft::port_counters(&self.nf, self.names.table(), &self.names.port(key))?;
        Ok(c.map(
            |[l2_spoof, arp_spoof, ip_spoof, other_ethertype, pps_limited]| PortCounters {
                l2_spoof,
                arp_spoof,
                ip_spoof,
                other_ethertype,
                pps_limited,
            },
        ))
    }

    /// Rewrites a port's anti-spoofing chain in one transaction (e.g. after its address
    /// changed) without touching links or the namespace.
    pub async fn refresh_port_rules(&self, a: &Attachment) -> Result<(), NetError> {
        self.validate_attachment(a)?;
        let port = self.names.port(&a.key);
        match link::get(&self.handle, &port).await? {
            Some(l) if a.qos.shapes() => self.shape(a, &port, l.index).await,
            _ => self.install_rules(a, &port, None),
        }
    }

    fn validate_attachment(&self, a: &Attachment) -> Result<(), NetError> {
        names::validate_key(&a.key)?;
        names::validate_vni(a.vni)?;
        let bad = |reason: String| {
            Err(NetError::invalid(
                "attachment",
                format!("{}: {reason}", a.key),
            ))
        };
        if a.mac[0] & 1 == 1 || a.mac == [0; 6] {
            return bad(format!("mac {:02x?} is not unicast", a.mac));
        }
        let subnet = Ipv4Subnet::new(a.ip, a.prefix_len)?;
        if a.prefix_len == 0 || a.prefix_len > 30 {
            return bad(format!("prefix length {} outside 1..=30", a.prefix_len));
        }
        if !subnet.contains(a.gateway) || a.gateway == a.ip {
            return bad(format!(
                "gateway {} unusable from {}/{}",
                a.gateway, a.ip, a.prefix_len
            ));
        }
        Ok(())
    }

    async fn must_get(&self, name: &str) -> Result<link::Link, NetError> {
        link::get(&self.handle, name)
            .await?
            .ok_or_else(|| NetError::Io {
                op: format!("link {name} vanished right after it was created"),
                source: std::io::Error::from_raw_os_error(nix::libc::ENODEV),
            })
    }

    async fn disable_ipv6(&self, devs: Vec<String>) -> Result<(), NetError> {
        netns::disable_ipv6(&self.node_ns, devs).await
    }
}

fn tolerate_exists(r: Result<(), NetError>) -> Result<(), NetError> {
    match r {
        Err(e) if link::is_exists(&e) => Ok(()),
        r => r,
    }
}
