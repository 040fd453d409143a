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
//!   and output (clients on the node itself);
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
        let (router_ns, transit) = self.ensure_router(net).await?;
        let mut rules = format!(
            "table ip {ROUTER_TABLE} {{}}\ndelete table ip {ROUTER_TABLE}\n\
             table ip {ROUTER_TABLE} {{\n\
             chain dnat_pre {{ type nat hook prerouting priority dstnat; policy accept;\n"
        );
        for p in ports {
            rules.push_str(&format!(
                "iifname \"{ROUTER_TRANSIT_IF}\" {proto} dport {np} dnat to {ip}:{port}\n",
                proto = p.protocol.as_str(),
                np = p.node_port,
                ip = p.ip,
                port = p.port
            ));
        }
        rules.push_str(&format!(
            "}}\nchain guard_forward {{ type filter hook forward priority filter; policy accept;\n\
             iifname \"{}\" oifname \"{ROUTER_TRANSIT_IF}\" ct state new counter drop\n}}\n}}\n",
            crate::CONTAINER_IFNAME
        ));
        nft_text(&router_ns, "router rules", &rules).await?;
        self.ensure_node_pub_table().await?;
        // The node's map: this router's elements become exactly `ports`.
        let table = self.node_pub_table();
        let current = self.node_map_elements().await?;
        let mut batch = String::new();
        for ((proto, node_port), to) in &current {
            let wanted = seen.contains_key(&(*proto, *node_port));
            if *to == transit && !wanted {
                batch.push_str(&format!(
                    "delete element ip {table} ports {{ {} . {node_port} }}\n",
                    proto.as_str()
                ));
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
                batch.push_str(&format!(
                    "add element ip {table} ports {{ {} . {node_port} : {transit} }}\n",
                    proto.as_str()
                ));
            }
        }
        if !batch.is_empty() {
            nft_text(&self.node_ns, "published ports", &batch).await?;
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
        // The node forwards what it translates to routers.
        netns::run_in(&self.node_ns, "node ip_forward", || {
            netns::write_sysctl("net.ipv4.ip_forward", "1")
        })
        .await?;
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
            match self.node_map_elements().await {
                Ok(current) => {
                    let table = self.node_pub_table();
                    let batch: String = current
                        .iter()
                        .filter(|(_, to)| **to == router_side)
                        .map(|((proto, port), _)| {
                            format!(
                                "delete element ip {table} ports {{ {} . {port} }}\n",
                                proto.as_str()
                            )
                        })
                        .collect();
                    if !batch.is_empty()
                        && let Err(e) = nft_text(&self.node_ns, "unpublish", &batch).await
                    {
                        errors.push(e);
                    }
                    // The last router gone: the node's table goes too.
                    let others = current.values().any(|to| *to != router_side);
                    if !others && let Err(e) = self.remove_node_pub_table().await {
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
        if let Err(e) = netns::remove(&self.cfg.netns_dir.join(self.router_netns(vni))) {
            errors.push(e);
        }
        NetError::collect(errors)
    }

    /// The node's table: the port map, the DNAT through it, and the filter that keeps
    /// routers from opening anything towards the node.
    async fn ensure_node_pub_table(&self) -> Result<(), NetError> {
        let table = self.node_pub_table();
        let ul = self.cfg.underlay_ip;
        let tp = format!("{}t*", self.names.table());
        let text = format!(
            "table ip {table} {{\n\
             map ports {{ type inet_proto . inet_service : ipv4_addr; }}\n\
             chain dnat_pre {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
             chain dnat_out {{ type nat hook output priority -100; policy accept; }}\n\
             chain guard_forward {{ type filter hook forward priority filter; policy accept; }}\n\
             chain guard_input {{ type filter hook input priority filter; policy accept; }}\n\
             }}\n\
             flush chain ip {table} dnat_pre\nflush chain ip {table} dnat_out\n\
             flush chain ip {table} guard_forward\nflush chain ip {table} guard_input\n\
             add rule ip {table} dnat_pre ip daddr {ul} dnat ip to meta l4proto . th dport map @ports\n\
             add rule ip {table} dnat_out ip daddr {ul} dnat ip to meta l4proto . th dport map @ports\n\
             add rule ip {table} guard_forward iifname \"{tp}\" ct state new counter drop\n\
             add rule ip {table} guard_input iifname \"{tp}\" ct state new counter drop\n"
        );
        nft_text(&self.node_ns, "published ports table", &text).await
    }

    /// The node map's elements: (protocol, node port) → router transit address.
    async fn node_map_elements(&self) -> Result<BTreeMap<(Protocol, u16), Ipv4Addr>, NetError> {
        let table = self.node_pub_table();
        let out = crate::nft::run(
            &self.node_ns,
            "list published ports",
            &["-j", "list", "map", "ip", &table, "ports"],
            None,
        )
        .await;
        let out = match out {
            Ok(o) => o,
            Err(NetError::Nft { detail, .. }) if detail.contains("No such file or directory") => {
                return Ok(BTreeMap::new());
            }
            Err(e) => return Err(e),
        };
        let v: serde_json::Value = serde_json::from_slice(&out).map_err(|e| NetError::Nft {
            op: "list published ports".into(),
            detail: format!("unparsable output: {e}"),
        })?;
        Ok(parse_map_elements(&v))
    }

    /// Removes the node's published-ports table (teardown).
    pub(crate) async fn remove_node_pub_table(&self) -> Result<(), NetError> {
        let table = self.node_pub_table();
        nft_text(
            &self.node_ns,
            "delete published ports table",
            &format!("table ip {table} {{}}\ndelete table ip {table}\n"),
        )
        .await
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

fn parse_map_elements(v: &serde_json::Value) -> BTreeMap<(Protocol, u16), Ipv4Addr> {
    let mut out = BTreeMap::new();
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    for item in items {
        let Some(elems) = item["map"]["elem"].as_array() else {
            continue;
        };
        for e in elems {
            // [ {"concat": ["tcp", 8080]}, "169.254.0.2" ]
            let (Some(key), Some(to)) = (e[0]["concat"].as_array(), e[1].as_str()) else {
                continue;
            };
            let proto = match key.first().and_then(|p| p.as_str()) {
                Some("tcp") => Protocol::Tcp,
                Some("udp") => Protocol::Udp,
                _ => continue,
            };
            let (Some(port), Ok(to)) = (key.get(1).and_then(|p| p.as_u64()), to.parse()) else {
                continue;
            };
            if let Ok(port) = u16::try_from(port) {
                out.insert((proto, port), to);
            }
        }
    }
    out
}

/// Applies nft's own syntax in `ns` (one transaction).
async fn nft_text(ns: &File, op: &str, text: &str) -> Result<(), NetError> {
    crate::nft::run(ns, op, &["-f", "-"], Some(text.as_bytes().to_vec()))
        .await
        .map(drop)
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
    fn map_elements_parse_from_nft_json() {
        let v = serde_json::json!({"nftables": [
            {"metainfo": {}},
            {"map": {"family": "ip", "name": "ports", "table": "tpub",
                "type": ["inet_proto", "inet_service"], "map": "ipv4_addr",
                "elem": [[{"concat": ["tcp", 8080]}, "169.254.0.2"],
                         [{"concat": ["udp", 53]}, "169.254.0.6"],
                         [{"concat": ["sctp", 1]}, "169.254.0.6"]]}}
        ]});
        let m = parse_map_elements(&v);
        assert_eq!(m.len(), 2);
        assert_eq!(m[&(Protocol::Tcp, 8080)], Ipv4Addr::new(169, 254, 0, 2));
        assert_eq!(m[&(Protocol::Udp, 53)], Ipv4Addr::new(169, 254, 0, 6));
    }
}
