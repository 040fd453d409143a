//! Security groups on the node: a stateful input filter inside an instance's own network
//! namespace.
//!
//! The port chains of the node's `bridge` table are stateless (this kernel has no
//! conntrack for the bridge family), so they cannot tell a reply from a new connection. The
//! instance's namespace has full conntrack, and only its owner (no `CAP_NET_ADMIN` inside
//! the container) can change it: its `inet` table accepts replies of the instance's own
//! connections, loopback, its published ports, and what its groups' rules allow; it drops
//! the rest. Each change rewrites the table in one `nft` transaction (added, deleted and
//! declared again), so the instance never runs without rules nor with half of them.

use std::fmt::Write as _;
use std::fs::File;

use crate::{Ipv4Subnet, NetError, Protocol, netns};

/// Which protocol a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FwProtocol {
    Tcp,
    Udp,
    Icmp,
    Any,
}

/// One allow rule with its sources resolved to addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwRule {
    pub protocol: FwProtocol,
    /// Port range (tcp and udp only; none: every port).
    pub ports: Option<(u16, u16)>,
    /// Allowed sources; empty: the rule allows nothing (a group without instances).
    pub sources: Vec<Ipv4Subnet>,
}

/// What may reach an instance in one or more security groups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Firewall {
    /// Its published ports (reachable from anyone the node lets through).
    pub published: Vec<(Protocol, u16)>,
    pub rules: Vec<FwRule>,
}

/// The `nft -f` script that makes table `inet <table>` exactly `fw` (none: no table).
pub(crate) fn script(table: &str, fw: Option<&Firewall>) -> String {
    let mut s = format!("add table inet {table}\ndelete table inet {table}\n");
    let Some(fw) = fw else {
        return s;
    };
    let _ = writeln!(s, "table inet {table} {{");
    s.push_str("  chain input {\n    type filter hook input priority filter; policy drop;\n");
    s.push_str("    ct state established,related accept\n    ct state invalid drop\n");
    s.push_str("    iif \"lo\" accept\n");
    for (p, port) in &fw.published {
        let _ = writeln!(s, "    meta l4proto {} th dport {port} accept", p.as_str());
    }
    for r in &fw.rules {
        if r.sources.is_empty() {
            continue;
        }
        let sources: Vec<String> = r.sources.iter().map(|c| c.to_string()).collect();
        let mut line = format!("    ip saddr {{ {} }}", sources.join(", "));
        match (r.protocol, r.ports) {
            (FwProtocol::Any, _) => {}
            (FwProtocol::Icmp, _) => line.push_str(" meta l4proto icmp"),
            (p, ports) => {
                let name = if p == FwProtocol::Udp { "udp" } else { "tcp" };
                let _ = write!(line, " meta l4proto {name}");
                match ports {
                    Some((a, b)) if a == b => {
                        let _ = write!(line, " th dport {a}");
                    }
                    Some((a, b)) => {
                        let _ = write!(line, " th dport {a}-{b}");
                    }
                    None => {}
                }
            }
        }
        line.push_str(" accept\n");
        s.push_str(&line);
    }
    s.push_str("    counter drop\n  }\n}\n");
    s
}

/// Applies `fw` (none: removes the table) inside the namespace `ns`.
pub(crate) async fn apply(ns: &File, table: &str, fw: Option<&Firewall>) -> Result<(), NetError> {
    let text = script(table, fw);
    netns::run_program(ns, "nft", "nftables", &["-f", "-"], Some(text.into_bytes()))
        .await
        .map(drop)
        .map_err(|detail| NetError::Nft {
            op: "set the security group rules of an instance".into(),
            detail,
        })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn net(a: [u8; 4], len: u8) -> Ipv4Subnet {
        Ipv4Subnet::new(Ipv4Addr::from(a), len).unwrap()
    }

    #[test]
    fn replies_loopback_published_ports_then_rules_then_drop() {
        let fw = Firewall {
            published: vec![(Protocol::Tcp, 8080)],
            rules: vec![
                FwRule {
                    protocol: FwProtocol::Tcp,
                    ports: Some((80, 80)),
                    sources: vec![net([10, 88, 0, 3], 32), net([10, 1, 0, 0], 16)],
                },
                FwRule {
                    protocol: FwProtocol::Udp,
                    ports: Some((5000, 5010)),
                    sources: vec![net([0, 0, 0, 0], 0)],
                },
                FwRule {
                    protocol: FwProtocol::Icmp,
                    ports: None,
                    sources: vec![net([10, 88, 0, 0], 16)],
                },
                // A group with no instances allows nothing.
                FwRule {
                    protocol: FwProtocol::Any,
                    ports: None,
                    sources: vec![],
                },
            ],
        };
        let s = script("hivefw", Some(&fw));
        let lines: Vec<&str> = s.lines().map(str::trim).collect();
        assert_eq!(
            lines[..2],
            ["add table inet hivefw", "delete table inet hivefw"],
            "replaced in one transaction"
        );
        let body = &lines[lines
            .iter()
            .position(|l| l.starts_with("ct state established"))
            .unwrap()..];
        assert_eq!(
            body,
            [
                "ct state established,related accept",
                "ct state invalid drop",
                "iif \"lo\" accept",
                "meta l4proto tcp th dport 8080 accept",
                "ip saddr { 10.88.0.3/32, 10.1.0.0/16 } meta l4proto tcp th dport 80 accept",
                "ip saddr { 0.0.0.0/0 } meta l4proto udp th dport 5000-5010 accept",
                "ip saddr { 10.88.0.0/16 } meta l4proto icmp accept",
                "counter drop",
                "}",
                "}",
            ]
        );
        assert!(s.contains("policy drop"));
        assert_eq!(
            script("hivefw", None),
            "add table inet hivefw\ndelete table inet hivefw\n"
        );
    }
}
