//! Published ports: `node address:port` forwarded to an instance's port, the client's
//! source address preserved.
//!
//! Tenant subnets overlap, so the node itself never routes into a tenant network. Each
//! network with a published port on this node gets a small router namespace instead:
//!
//! ```text
//!  client ──▶ node (underlay ip:P) ──DNAT──▶ router tr0 (169.254.s.2) ──DNAT──▶ instance ip:port
//!             {prefix}t{vni} 169.254.s.1/30      router eth0 = the network's gateway
//! ```
//!
//! - the router's `eth0` sits on the network's bridge (host side `{prefix}g{vni}`) with the
//!   network's gateway address, so instances' default route leads to it and replies go back
//!   the way they came (conntrack undoes both translations);
//! - its `tr0` is a veth to the node (`{prefix}t{vni}`), a /30 from 169.254.0.0/17 chosen by
//!   the node (the lowest free one);
//! - the node's table `ip {prefix}pub` maps `protocol . port` to the router of the network
//!   publishing it (`dnat … map`: one lookup whatever the number of ports), in prerouting
//!   and output (clients on the node itself, which may also use 127.0.0.1: masqueraded to
//!   the transit leg, `route_localnet` on it);
//! - nothing new leaves a router towards the node: the router drops new connections from
//!   `eth0` to `tr0`, and the node drops new connections arriving on any `{prefix}t*` (its
//!   own addresses, other tenants' routers, the underlay). Replies pass.
//!
//! Rules are rewritten whole per change (a router's table in one transaction; the node's
//! map elements of that router): published ports change when instances start and stop, not
//! per packet.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use crate::firewall;
use crate::nfnl::{self, Base, BaseChain, CmpOp, Expr, Hook, MetaKey, Rule, Verdict};
use crate::{NetError, NetworkDef, NodeNet, link, netns};

/// Transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number (`meta l4proto`).
    pub(crate) fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One published port of an instance on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublishedPort {
    pub protocol: Protocol,
    /// The port on the node's underlay address.
    pub node_port: u16,
    /// The instance's address and port.
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// Router namespace sysctls: it forwards, IPv4 only.
const ROUTER_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv6.conf.all.disable_ipv6", "1"),
    ("net.ipv6.conf.default.disable_ipv6", "1"),
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv4.conf.all.rp_filter", "1"),
    ("net.ipv4.conf.default.rp_filter", "1"),
    ("net.ipv4.conf.all.send_redirects", "0"),
    ("net.ipv4.conf.default.send_redirects", "0"),
];

/// Transit /30s come from 169.254.0.0/17 (8192 of them; 169.254.169.254 stays clear).
const TRANSIT_BASE: u32 = u32::from_be_bytes([169, 254, 0, 0]);
const TRANSIT_SLOTS: u32 = 8192;
const ROUTER_TRANSIT_IF: &str = "tr0";
/// The largest MTU a veth takes (`ETH_MAX_MTU`).
const MAX_VETH_MTU: u32 = 65535;
const ROUTER_TABLE: &str = "hive";
/// The node's map from `protocol . node port` to a router's transit address.
const PORTS_MAP: &str = "ports";

fn transit_pair(slot: u32) -> (Ipv4Addr, Ipv4Addr) {
    let base = TRANSIT_BASE + slot * 4;
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

fn transit_slot(node_side: Ipv4Addr) -> Option<u32> {
    let a = u32::from(node_side);
    ((TRANSIT_BASE + 1..TRANSIT_BASE + TRANSIT_SLOTS * 4).contains(&a)
        && (a - TRANSIT_BASE) % 4 == 1)
        .then(|| (a - TRANSIT_BASE) / 4)
}

/// The MAC of a router's leg: `02:48:` and the gateway's address, like instances' MACs
/// (the gateway address is never an instance's).
fn gateway_mac(gw: Ipv4Addr) -> [u8; 6] {
    let o = gw.octets();
    [0x02, 0x48, o[0], o[1], o[2], o[3]]
}

impl NodeNet {
    pub(crate) fn node_pub_table(&self) -> String {
        format!("{}pub", self.names.table())
    }

    /// Makes the published ports of network `net` on this node exactly `ports`: with none,
    /// its router goes; with some, the router is made (or kept) and its rules and the node's
    /// map rewritten. A node port another network of this node publishes is refused.
    pub async fn set_published(
        &self,
        net: &NetworkDef,
        ports: &[PublishedPort],
    ) -> Result<(), NetError> {
        crate::names::validate_vni(net.vni)?;
        if ports.is_empty() {
            return self.remove_router(net.vni).await;
        }
        let mut seen = BTreeMap::new();
        for p in ports {
            if !net.subnet.contains(p.ip) || p.node_port == 0 || p.port == 0 {
                return Err(NetError::invalid(
                    "published port",
                    format!("{p:?} is not a port of an address of {}", net.subnet),
                ));
            }
            if seen.insert((p.protocol, p.node_port), p).is_some() {
                return Err(NetError::invalid(
                    "published port",
                    format!(
                        "{}/{} is published twice on network {}",
                        p.node_port,
                        p.protocol.as_str(),
                        net.vni
                    ),
                ));
            }
        }
        let (_, transit) = self.ensure_router(net).await?;
        let op = format!("router rules of network {}", net.vni);
        let router = self.router_netns(net.vni);
        self.ns_tables_in(&router, &router, &op)
            .await?
            .sock
            .apply(&op, &router_batch(ports))?;
        self.ensure_node_pub_table()?;
        // The node's map: this router's elements become exactly `ports`.
        let current = self.node_map_elements()?;
        let mut batch = nfnl::Batch::of(nfnl::Family::Ip, &self.node_pub_table());
        for ((proto, node_port), to) in &current {
            let wanted = seen.contains_key(&(*proto, *node_port));
            if *to == transit && !wanted {
                let label = format!("{} . {node_port}", proto.as_str());
                batch.del_elem(PORTS_MAP, &label, &map_key(*proto, *node_port));
            } else if *to != transit && wanted {
                return Err(NetError::invalid(
                    "published port",
                    format!(
                        "node port {node_port}/{} is published by another network on this node",
                        proto.as_str()
                    ),
                ));
            }
        }
        for (proto, node_port) in seen.keys() {
            if !current.contains_key(&(*proto, *node_port)) {
                let label = format!("{} . {node_port}", proto.as_str());
                let to = nfnl::ElemData::Value(transit.octets().to_vec());
                batch.add_elem(PORTS_MAP, &label, &map_key(*proto, *node_port), Some(&to));
            }
        }
        if !batch.is_empty() {
            self.nf.apply("published ports", &batch)?;
        }
        Ok(())
    }

    /// The router of network `vni` (namespace, both veths, addresses, route): made if
    /// missing. Returns its namespace and its transit address (the node's DNAT target).
    async fn ensure_router(&self, net: &NetworkDef) -> Result<(File, Ipv4Addr), NetError> {
        let h = &self.handle;
        let (leg, transit_if) = (self.router_leg(net.vni), self.transit_if(net.vni));
        let br_name = self.names.bridge(net.vni);
        // Published ports come with the network's first instance here; until its bridge
        // exists there is nothing to route to.
        let bridge = link::get(h, &br_name).await?.ok_or(NetError::NoNetwork {
            vni: net.vni,
            bridge: br_name,
        })?;
        let path = self.cfg.netns_dir.join(self.router_netns(net.vni));
        let ns = netns::create_or_open(path, ROUTER_SYSCTLS).await?;
        if link::get(h, &leg).await?.is_none() {
            link::add_veth(
                h,
                &leg,
                crate::CONTAINER_IFNAME,
                ns.ns.as_raw_fd(),
                gateway_mac(net.gateway),
                self.mtu,
                bridge.index,
            )
            .await?;
        }
        let slot = match link::get(h, &transit_if).await? {
            Some(l) => link::ipv4_addresses(h, Some(l.index))
                .await?
                .into_iter()
                .find_map(|(_, a)| transit_slot(a)),
            None => None,
        };
        let slot = match slot {
            Some(s) => s,
            None => {
                let used: Vec<u32> = link::ipv4_addresses(h, None)
                    .await?
                    .into_iter()
                    .filter_map(|(_, a)| transit_slot(a))
                    .collect();
                let free = (0..TRANSIT_SLOTS)
                    .find(|s| !used.contains(s))
                    .ok_or_else(|| {
                        NetError::invalid("router", "no free transit address in 169.254.0.0/17")
                    })?;
                if link::get(h, &transit_if).await?.is_none() {
                    link::add_veth_pair(
                        h,
                        &transit_if,
                        ROUTER_TRANSIT_IF,
                        ns.ns.as_raw_fd(),
                        // The underlay's MTU, within what a veth takes (loopback's 65536 is
                        // one more than that).
                        (self.mtu + crate::VXLAN_OVERHEAD).min(MAX_VETH_MTU),
                    )
                    .await?;
                }
                free
            }
        };
        let (node_side, router_side) = transit_pair(slot);
        // The node forwards what it translates to routers. Its own clients reach published
        // ports at 127.0.0.1 too: their packets leave by the transit leg with a loopback
        // source (masqueraded after routing) and the replies come back through it to
        // 127.0.0.1, which the kernel allows only where `route_localnet` is on.
        let localnet = format!("net.ipv4.conf.{transit_if}.route_localnet");
        netns::run_in(
            &self.node_ns,
            "node ip_forward and route_localnet",
            move || {
                netns::write_sysctl("net.ipv4.ip_forward", "1")?;
                netns::write_sysctl(&localnet, "1")
            },
        )
        .await?;
        let t = self.must_get(&transit_if).await?;
        link::add_address(h, t.index, node_side, 30, &transit_if).await?;
        link::set_up(h, t.index, &transit_if).await?;
        // Inside the router.
        let inner = netns::handle_from_socket(ns.socket)?;
        for (name, addr, len) in [
            ("lo", None, 0),
            (
                crate::CONTAINER_IFNAME,
                Some(net.gateway),
                net.subnet.prefix_len,
            ),
            (ROUTER_TRANSIT_IF, Some(router_side), 30),
        ] {
            let l = link::get(&inner, name).await?.ok_or_else(|| {
                NetError::invalid("router", format!("no {name} in the router of {}", net.vni))
            })?;
            if let Some(a) = addr {
                link::add_address(&inner, l.index, a, len, name).await?;
            }
            link::set_up(&inner, l.index, name).await?;
        }
        let tr = self.must_get_in(&inner, ROUTER_TRANSIT_IF).await?;
        link::replace_default_route(&inner, node_side, tr.index).await?;
        drop(inner);
        let l = self.must_get(&leg).await?;
        self.disable_ipv6(vec![leg.clone()]).await?;
        link::set_up(h, l.index, &leg).await?;
        Ok((ns.ns, router_side))
    }

    async fn must_get_in(&self, h: &rtnetlink::Handle, name: &str) -> Result<link::Link, NetError> {
        link::get(h, name)
            .await?
            .ok_or_else(|| NetError::invalid("router", format!("{name} vanished")))
    }

    /// Removes network `vni`'s router and its map elements (best effort, every failure).
    pub async fn remove_router(&self, vni: u32) -> Result<(), NetError> {
        let mut errors = Vec::new();
        let transit_if = self.transit_if(vni);
        let mut transit = None;
        match link::get(&self.handle, &transit_if).await {
            Ok(Some(l)) => match link::ipv4_addresses(&self.handle, Some(l.index)).await {
                Ok(a) => transit = a.into_iter().find_map(|(_, a)| transit_slot(a)),
                Err(e) => errors.push(e),
            },
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
        if let Some(slot) = transit {
            let (_, router_side) = transit_pair(slot);
            match self.node_map_elements() {
                Ok(current) => {
                    let mut batch = nfnl::Batch::of(nfnl::Family::Ip, &self.node_pub_table());
                    for ((proto, port), _) in current.iter().filter(|(_, to)| **to == router_side) {
                        let label = format!("{} . {port}", proto.as_str());
                        batch.del_elem(PORTS_MAP, &label, &map_key(*proto, *port));
                    }
                    if !batch.is_empty()
                        && let Err(e) = self.nf.apply("unpublish", &batch)
                    {
                        errors.push(e);
                    }
                    // The last router gone: the node's table goes too.
                    let others = current.values().any(|to| *to != router_side);
                    if !others && let Err(e) = self.remove_node_pub_table() {
                        errors.push(e);
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        for name in [transit_if, self.router_leg(vni)] {
            if let Err(e) = link::del_by_name(&self.handle, &name).await {
                errors.push(e);
            }
        }
        // Its socket first: it holds the namespace.
        self.services.remove(&self.router_netns(vni));
        if let Err(e) = netns::remove(&self.cfg.netns_dir.join(self.router_netns(vni))) {
            errors.push(e);
        }
        NetError::collect(errors)
    }

    /// The node's table: the port map, the DNAT through it, and the filter that keeps
    /// routers from opening anything towards the node (one transaction; the map's elements
    /// stay).
    fn ensure_node_pub_table(&self) -> Result<(), NetError> {
        let transit_prefix = format!("{}t", self.names.table());
        let batch = node_table_batch(
            &self.node_pub_table(),
            self.cfg.underlay_ip,
            &transit_prefix,
        );
        self.nf.apply("published ports table", &batch)
    }

    /// The node map's elements: (protocol, node port) → router transit address.
    fn node_map_elements(&self) -> Result<BTreeMap<(Protocol, u16), Ipv4Addr>, NetError> {
        let elems = self
            .nf
            .set_elements(nfnl::Family::Ip, &self.node_pub_table(), PORTS_MAP)?
            .unwrap_or_default();
        Ok(elems
            .iter()
            .filter_map(|(key, to)| {
                let to: [u8; 4] = to.as_deref()?.try_into().ok()?;
                Some((parse_map_key(key)?, Ipv4Addr::from(to)))
            })
            .collect())
    }

    /// Removes the node's published-ports table (teardown); none is no error.
    pub(crate) fn remove_node_pub_table(&self) -> Result<(), NetError> {
        let mut batch = nfnl::Batch::of(nfnl::Family::Ip, &self.node_pub_table());
        // Declared first, so that the delete succeeds whether or not it exists.
        batch.add_table().del_table();
        self.nf.apply("delete published ports table", &batch)
    }

    pub(crate) fn router_leg(&self, vni: u32) -> String {
        format!("{}g{vni}", self.names.table())
    }

    pub(crate) fn transit_if(&self, vni: u32) -> String {
        format!("{}t{vni}", self.names.table())
    }

    /// The router's namespace file: `_` never occurs in an instance key's file name
    /// (`{prefix}-{key}`), so the two never mix.
    pub(crate) fn router_netns(&self, vni: u32) -> String {
        format!("{}_r{vni}", self.names.table())
    }

    /// The VNI of a router namespace file of ours.
    pub(crate) fn parse_router_netns(&self, file: &str) -> Option<u32> {
        let digits = file.strip_prefix(self.names.table())?.strip_prefix("_r")?;
        (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse().ok())
            .flatten()
    }

    /// The VNI of a router link of ours (`{prefix}g{vni}` or `{prefix}t{vni}`).
    pub(crate) fn parse_router_link(&self, ifname: &str) -> Option<u32> {
        let rest = ifname.strip_prefix(self.names.table())?;
        let digits = rest.strip_prefix('g').or_else(|| rest.strip_prefix('t'))?;
        (!digits.is_empty()
            && !digits.starts_with('0')
            && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
    }
}

/// `meta key` (an interface name) equal to `name`.
fn ifname_is(key: MetaKey, name: &str) -> Vec<Expr> {
    vec![
        Expr::Meta(key),
        Expr::Cmp {
            op: CmpOp::Eq,
            data: nfnl::ifname_key(name).to_vec(),
        },
    ]
}

/// `meta key` (an interface name) starting with `prefix` (`iifname "prefix*"`).
fn ifname_starts(key: MetaKey, prefix: &str) -> Vec<Expr> {
    vec![
        Expr::Meta(key),
        Expr::Cmp {
            op: CmpOp::Eq,
            data: prefix.as_bytes().to_vec(),
        },
    ]
}

/// New connections (not replies) dropped, counted.
fn drop_new(mut exprs: Vec<Expr>) -> Rule {
    exprs.extend(firewall::ct_state_any(firewall::CT_NEW));
    exprs.extend([Expr::Counter, Expr::Verdict(Verdict::Drop)]);
    Rule {
        comment: None,
        exprs,
    }
}

/// The router's table, made anew: the DNAT of each published port arriving on its transit
/// leg to the instance's address and port, and the guard that lets no instance open a
/// connection towards the node.
fn router_batch(ports: &[PublishedPort]) -> nfnl::Batch {
    let mut b = nfnl::Batch::of(nfnl::Family::Ip, ROUTER_TABLE);
    // Declared first, so that the delete succeeds whether or not it exists.
    b.add_table().del_table().add_table();
    b.add_base_chain(
        "dnat_pre",
        BaseChain::accepting(Hook::Prerouting, -100, "nat"),
    );
    for p in ports {
        let mut exprs = ifname_is(MetaKey::IifName, ROUTER_TRANSIT_IF);
        exprs.extend(firewall::l4proto_is(p.protocol.number()));
        exprs.extend([
            Expr::Payload {
                base: Base::Transport,
                offset: 2,
                len: 2,
            },
            Expr::Cmp {
                op: CmpOp::Eq,
                data: p.node_port.to_be_bytes().to_vec(),
            },
            Expr::ImmediateTo {
                reg: 1,
                data: p.ip.octets().to_vec(),
            },
            Expr::ImmediateTo {
                reg: 2,
                data: p.port.to_be_bytes().to_vec(),
            },
            Expr::DnatPort,
        ]);
        b.add_rule(
            "dnat_pre",
            &Rule {
                comment: None,
                exprs,
            },
        );
    }
    b.add_base_chain(
        "guard_forward",
        BaseChain::accepting(Hook::Forward, 0, "filter"),
    );
    let mut from_instances = ifname_is(MetaKey::IifName, crate::CONTAINER_IFNAME);
    from_instances.extend(ifname_is(MetaKey::OifName, ROUTER_TRANSIT_IF));
    b.add_rule("guard_forward", &drop_new(from_instances));
    b
}

/// The node's table (created if missing, its chains rewritten, its map kept): `ip daddr
/// <underlay> dnat to meta l4proto . th dport map @ports` in prerouting and output, the same
/// for `127.0.0.1` in output (the node's own clients), whose loopback source is masqueraded
/// on the way out to a router (`oifname "<prefix>t*" ip saddr 127.0.0.0/8 masquerade`: a
/// router could not answer 127.0.0.1), and new connections from any router's transit leg
/// (`<prefix>t*`) dropped in forward and input.
fn node_table_batch(table: &str, underlay: Ipv4Addr, transit_prefix: &str) -> nfnl::Batch {
    let mut b = nfnl::Batch::of(nfnl::Family::Ip, table);
    b.add_table().add_set(
        PORTS_MAP,
        nfnl::SetSpec {
            key_type: nfnl::TYPE_PROTO_PORT,
            key_len: 8,
            values: nfnl::SetValues::Data {
                data_type: nfnl::TYPE_IPADDR,
                len: 4,
            },
        },
    );
    let chains = [
        (
            "dnat_pre",
            BaseChain::accepting(Hook::Prerouting, -100, "nat"),
        ),
        ("dnat_out", BaseChain::accepting(Hook::Output, -100, "nat")),
        (
            "guard_forward",
            BaseChain::accepting(Hook::Forward, 0, "filter"),
        ),
        (
            "guard_input",
            BaseChain::accepting(Hook::Input, 0, "filter"),
        ),
        (
            "snat_post",
            BaseChain::accepting(Hook::Postrouting, 100, "nat"),
        ),
    ];
    for (name, chain) in chains {
        b.add_base_chain(name, chain).flush_chain(name);
    }
    let dnat = dnat_to_map(underlay);
    b.add_rule("dnat_pre", &dnat)
        .add_rule("dnat_out", &dnat)
        .add_rule("dnat_out", &dnat_to_map(Ipv4Addr::LOCALHOST));
    let mut masq = ifname_starts(MetaKey::OifName, transit_prefix);
    masq.extend([
        // The first byte of the source: 127.0.0.0/8 (as `nft` writes it).
        Expr::Payload {
            base: Base::Network,
            offset: 12,
            len: 1,
        },
        Expr::Cmp {
            op: CmpOp::Eq,
            data: vec![127],
        },
        Expr::Masq,
    ]);
    b.add_rule(
        "snat_post",
        &Rule {
            comment: None,
            exprs: masq,
        },
    );
    let guard = drop_new(ifname_starts(MetaKey::IifName, transit_prefix));
    b.add_rule("guard_forward", &guard)
        .add_rule("guard_input", &guard);
    b
}

/// `ip daddr <daddr> dnat to meta l4proto . th dport map @ports`.
fn dnat_to_map(daddr: Ipv4Addr) -> Rule {
    let r0 = nfnl::NFT_REG32_00;
    Rule {
        comment: None,
        exprs: vec![
            Expr::Payload {
                base: Base::Network,
                offset: 16,
                len: 4,
            },
            Expr::Cmp {
                op: CmpOp::Eq,
                data: daddr.octets().to_vec(),
            },
            Expr::MetaTo {
                key: MetaKey::L4Proto,
                reg: r0,
            },
            Expr::PayloadTo {
                base: Base::Transport,
                offset: 2,
                len: 2,
                reg: r0 + 1,
            },
            Expr::Lookup {
                set: PORTS_MAP.into(),
                reg: r0,
                dreg: Some(1),
            },
            Expr::Dnat,
        ],
    }
}

/// The map's key: the protocol and the port, each in a 4-byte register of a concatenation.
fn map_key(proto: Protocol, port: u16) -> [u8; 8] {
    let p = port.to_be_bytes();
    [proto.number(), 0, 0, 0, p[0], p[1], 0, 0]
}

fn parse_map_key(key: &[u8]) -> Option<(Protocol, u16)> {
    let proto = match key.first()? {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        _ => return None,
    };
    Some((proto, u16::from_be_bytes([*key.get(4)?, *key.get(5)?])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transit_addresses_round_trip_and_stay_clear_of_metadata() {
        assert_eq!(
            transit_pair(0),
            (Ipv4Addr::new(169, 254, 0, 1), Ipv4Addr::new(169, 254, 0, 2))
        );
        let last = transit_pair(TRANSIT_SLOTS - 1);
        assert_eq!(last.1, Ipv4Addr::new(169, 254, 127, 254));
        for s in [0, 1, 77, TRANSIT_SLOTS - 1] {
            assert_eq!(transit_slot(transit_pair(s).0), Some(s));
            assert_eq!(transit_slot(transit_pair(s).1), None);
        }
        assert_eq!(transit_slot(Ipv4Addr::new(169, 254, 169, 253)), None);
        assert_eq!(transit_slot(Ipv4Addr::new(10, 0, 0, 1)), None);
    }

    #[test]
    fn map_keys_round_trip() {
        for (proto, port) in [
            (Protocol::Tcp, 8080),
            (Protocol::Udp, 53),
            (Protocol::Tcp, 65535),
        ] {
            assert_eq!(parse_map_key(&map_key(proto, port)), Some((proto, port)));
        }
        assert_eq!(map_key(Protocol::Tcp, 8080), [6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        assert_eq!(parse_map_key(&[132, 0, 0, 0, 0, 1, 0, 0]), None);
        assert_eq!(parse_map_key(&[6, 0]), None);
    }
}
