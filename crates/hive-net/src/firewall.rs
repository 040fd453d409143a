//! Security groups on the node: a stateful input filter inside an instance's own network
//! namespace.
//!
//! The port chains of the node's `bridge` table are stateless (this kernel has no
//! conntrack for the bridge family), so they cannot tell a reply from a new connection. The
//! instance's namespace has full conntrack, and only its owner (no `CAP_NET_ADMIN` inside
//! the container) can change it: its `inet` table accepts replies of the instance's own
//! connections, loopback, its published ports, and what its groups' rules allow; it drops
//! the rest. Each change rewrites the table in one nf_tables transaction over netlink
//! (added, deleted and declared again), through the socket the node keeps inside that
//! namespace, so the instance never runs without rules nor with half of them, and no
//! program is started (an `nft` process per instance and change used to: 10+ ms each, for
//! every instance whose rules name a group whose members changed).

use crate::nfnl::{Base, BaseChain, Batch, CmpOp, Expr, Family, Hook, MetaKey, Rule, Verdict};
use crate::{Ipv4Subnet, Protocol};

/// The table's only chain.
const INPUT: &str = "input";
/// `ct state` bits (host order).
const CT_INVALID: u32 = 1;
const CT_ESTABLISHED_RELATED: u32 = 2 | 4;
pub(crate) const CT_NEW: u32 = 8;
/// The loopback interface's index, in every network namespace.
const LO_IFINDEX: u32 = 1;
const NFPROTO_IPV4: u8 = 2;
const IPPROTO_ICMP: u8 = 1;

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

/// The transaction that makes table `inet <table>` exactly `fw` (none: no table).
pub(crate) fn batch(table: &str, fw: Option<&Firewall>) -> Batch {
    let mut b = Batch::of(Family::Inet, table);
    b.add_table().del_table();
    let Some(fw) = fw else {
        return b;
    };
    b.add_table().add_base_chain(
        INPUT,
        BaseChain {
            hook: Hook::Input,
            priority: 0,
            kind: "filter",
            drop_by_default: true,
        },
    );
    for rule in rules(fw) {
        b.add_rule(INPUT, &rule);
    }
    b
}

/// `ct state` & `bits` != 0.
pub(crate) fn ct_state_any(bits: u32) -> Vec<Expr> {
    vec![
        Expr::CtState,
        Expr::Bitwise {
            mask: bits.to_ne_bytes().to_vec(),
            xor: vec![0; 4],
        },
        Expr::Cmp {
            op: CmpOp::Neq,
            data: vec![0; 4],
        },
    ]
}

pub(crate) fn l4proto_is(number: u8) -> Vec<Expr> {
    vec![
        Expr::Meta(MetaKey::L4Proto),
        Expr::Cmp {
            op: CmpOp::Eq,
            data: vec![number],
        },
    ]
}

/// The transport header's destination port (`th dport`) in `from..=to`.
fn dport_in(from: u16, to: u16) -> Vec<Expr> {
    let mut e = vec![Expr::Payload {
        base: Base::Transport,
        offset: 2,
        len: 2,
    }];
    if from == to {
        e.push(Expr::Cmp {
            op: CmpOp::Eq,
            data: from.to_be_bytes().to_vec(),
        });
    } else {
        e.push(Expr::Cmp {
            op: CmpOp::Gte,
            data: from.to_be_bytes().to_vec(),
        });
        e.push(Expr::Cmp {
            op: CmpOp::Lte,
            data: to.to_be_bytes().to_vec(),
        });
    }
    e
}

/// An IPv4 packet from `net` (`ip saddr net`, which `nft` guards with `meta nfproto ipv4`
/// in an `inet` table).
fn from_subnet(net: Ipv4Subnet) -> Vec<Expr> {
    let mask = net.mask();
    let mut e = vec![
        Expr::Meta(MetaKey::NfProto),
        Expr::Cmp {
            op: CmpOp::Eq,
            data: vec![NFPROTO_IPV4],
        },
        Expr::Payload {
            base: Base::Network,
            offset: 12,
            len: 4,
        },
    ];
    if mask != u32::MAX {
        e.push(Expr::Bitwise {
            mask: mask.to_be_bytes().to_vec(),
            xor: vec![0; 4],
        });
    }
    e.push(Expr::Cmp {
        op: CmpOp::Eq,
        data: (u32::from(net.addr) & mask).to_be_bytes().to_vec(),
    });
    e
}

/// The chain's rules in order: replies, invalid, loopback, published ports, each rule's
/// sources (one rule per source), then a counted drop.
fn rules(fw: &Firewall) -> Vec<Rule> {
    let rule = |comment, exprs: Vec<Expr>| Rule { comment, exprs };
    let with = |mut e: Vec<Expr>, v: Verdict| {
        e.push(Expr::Verdict(v));
        e
    };
    let mut out = vec![
        rule(
            Some("replies"),
            with(ct_state_any(CT_ESTABLISHED_RELATED), Verdict::Accept),
        ),
        rule(
            Some("invalid"),
            with(ct_state_any(CT_INVALID), Verdict::Drop),
        ),
        rule(
            Some("loopback"),
            with(
                vec![
                    Expr::Meta(MetaKey::Iif),
                    Expr::Cmp {
                        op: CmpOp::Eq,
                        data: LO_IFINDEX.to_ne_bytes().to_vec(),
                    },
                ],
                Verdict::Accept,
            ),
        ),
    ];
    for (p, port) in &fw.published {
        let mut e = l4proto_is(p.number());
        e.extend(dport_in(*port, *port));
        out.push(rule(Some("published"), with(e, Verdict::Accept)));
    }
    for r in &fw.rules {
        let what: Vec<Expr> = match (r.protocol, r.ports) {
            (FwProtocol::Any, _) => vec![],
            (FwProtocol::Icmp, _) => l4proto_is(IPPROTO_ICMP),
            (p, ports) => {
                let proto = if p == FwProtocol::Udp {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                };
                let mut e = l4proto_is(proto.number());
                if let Some((from, to)) = ports {
                    e.extend(dport_in(from, to));
                }
                e
            }
        };
        for source in &r.sources {
            let mut e = from_subnet(*source);
            e.extend(what.iter().cloned());
            out.push(rule(Some("allowed"), with(e, Verdict::Accept)));
        }
    }
    out.push(rule(
        Some("dropped"),
        vec![Expr::Counter, Expr::Verdict(Verdict::Drop)],
    ));
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn net(a: [u8; 4], len: u8) -> Ipv4Subnet {
        Ipv4Subnet::new(Ipv4Addr::from(a), len).unwrap()
    }

    #[test]
    fn replies_loopback_published_ports_then_each_source_then_drop() {
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
        assert_eq!(
            batch("hivefw", Some(&fw)).ops(),
            [
                "add table",
                "delete table",
                "add table",
                "add filter chain input",
                "add rule replies to chain input",
                "add rule invalid to chain input",
                "add rule loopback to chain input",
                "add rule published to chain input",
                // tcp/80 from two sources, udp from anywhere, icmp from one.
                "add rule allowed to chain input",
                "add rule allowed to chain input",
                "add rule allowed to chain input",
                "add rule allowed to chain input",
                "add rule dropped to chain input",
            ],
            "replaced in one transaction"
        );
        assert_eq!(batch("hivefw", None).ops(), ["add table", "delete table"]);
        let r = rules(&fw);
        // A /32 is compared whole, a /16 masked first; /0 matches every IPv4 source.
        let tcp80_host = &r[4].exprs;
        assert!(!tcp80_host.iter().any(|e| matches!(e, Expr::Bitwise { .. })));
        assert!(tcp80_host.contains(&Expr::Cmp {
            op: CmpOp::Eq,
            data: vec![10, 88, 0, 3]
        }));
        assert!(r[5].exprs.contains(&Expr::Bitwise {
            mask: vec![255, 255, 0, 0],
            xor: vec![0; 4]
        }));
        // A port range is two comparisons of the big-endian port.
        let udp = &r[6].exprs;
        assert!(udp.contains(&Expr::Cmp {
            op: CmpOp::Gte,
            data: 5000u16.to_be_bytes().to_vec()
        }));
        assert!(udp.contains(&Expr::Cmp {
            op: CmpOp::Lte,
            data: 5010u16.to_be_bytes().to_vec()
        }));
        assert_eq!(
            r.last().unwrap().exprs.last(),
            Some(&Expr::Verdict(Verdict::Drop))
        );
    }
}
