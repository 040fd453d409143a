//! The node's nftables table (family `bridge`) and the per-port anti-spoofing chains.
//!
//! Two paths, each change one atomic kernel transaction. The rare whole-table work (create,
//! delete, listing ports for reconcile) is JSON built with the `nftables` crate's types and
//! applied by one run of `nft -j -f -` (as netavark does). The per-port work (install,
//! rewrite, remove a port's chain and map element; read its counters) is a netlink batch
//! ([`crate::nfnl`]) on the node's long-lived socket: `nft` reloads the whole table before
//! each change, which made a port change O(ports). Owns nothing but the table named after
//! the node's prefix.
//!
//! Layout (see docs/networking.md):
//! ```text
//! table bridge <prefix>
//!   map in_ports  { type ifname : verdict }      host veth -> jump <port>_in
//!   map out_ports { type ifname : verdict }      (egress L4 rules: later)
//!   chain ports_in  { hook prerouting priority -300; policy accept; iifname vmap @in_ports }
//!   chain <port>_in  : MAC check; [small frames over the PPS limit: drop]; [meta priority
//!                      set 1:<class>]; IPv4 source check, ether type ip accept; ARP checks,
//!                      ether type arp accept; drop
//!                      (later: a <port>_out chain of L4 rules behind out_ports, dispatched
//!                      by a forward-hook chain that exists only from then on)
//! ```

use std::borrow::Cow;
use std::fs::File;
use std::net::Ipv4Addr;

use nftables::expr::{Expression, Meta, NamedExpression};
use nftables::schema::{
    Chain, FlushObject, NfCmd, NfListObject, NfObject, Rule as JsonRule, Table,
};
use nftables::stmt::{Statement, VerdictMap};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde::Serialize;
use serde_json::{Value, json};

use crate::NetError;
use crate::names::Names;
use crate::netns;
use crate::nfnl::{self, Base, CmpOp, Expr, MetaKey, Rule, Verdict};

pub(crate) const IN_PORTS: &str = "in_ports";
pub(crate) const OUT_PORTS: &str = "out_ports";
const PORTS_IN: &str = "ports_in";
/// The forward-hook chain of earlier versions (`oifname vmap @out_ports`), removed by `open`.
const LEGACY_PORTS_OUT: &str = "ports_out";
/// Before bridge FDB learning and before anything else in the bridge prerouting hook, so
/// spoofed frames never poison the FDB.
const PORTS_IN_PRIORITY: i32 = -300;

/// Rule comments double as counter names when reading a port's drop counters.
pub(crate) const C_L2: &str = "l2-spoof";
pub(crate) const C_ARP: &str = "arp-spoof";
pub(crate) const C_IP: &str = "ip-spoof";
pub(crate) const C_OTHER: &str = "other-ethertype";
pub(crate) const C_PPS: &str = "pps-limit";

/// Frames shorter than this count against a port's packet rate limit. Bulk TCP leaves in
/// GSO super-packets that `limit` counts as one: a limit on all frames would cut a stream
/// to a trickle, while small frames are exactly what a packet flood is made of.
pub(crate) const PPS_FRAME_BYTES: u32 = 256;

/// What a port's chain does besides anti-spoofing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Shaping {
    /// Small frames per second beyond which they are dropped.
    pub(crate) pps: Option<u64>,
    /// The HTB class (`major << 16 | minor`) the port's frames are classified into.
    pub(crate) class: Option<u32>,
}

/// One atomic batch of `nft` JSON commands (whole-table work only).
#[derive(Debug, Default)]
pub(crate) struct JsonBatch {
    items: Vec<Item>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Item {
    Typed(NfObject<'static>),
    /// Objects the crate's schema cannot express (a map of type `ifname : verdict`).
    Raw(Value),
}

impl JsonBatch {
    fn cmd(&mut self, c: NfCmd<'static>) -> &mut Self {
        self.items.push(Item::Typed(NfObject::CmdObject(c)));
        self
    }

    fn raw(&mut self, v: Value) -> &mut Self {
        self.items.push(Item::Raw(v));
        self
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn to_json(&self) -> Result<Vec<u8>, NetError> {
        serde_json::to_vec(&json!({ "nftables": &self.items })).map_err(|e| NetError::Nft {
            op: "encode batch".into(),
            detail: e.to_string(),
        })
    }
}

fn s(v: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(v.into()))
}

fn chain(table: &str, name: &str) -> Chain<'static> {
    Chain {
        family: NfFamily::Bridge,
        table: table.to_owned().into(),
        name: name.to_owned().into(),
        ..Chain::default()
    }
}

fn base_chain(table: &str, name: &str, hook: NfHook, prio: i32) -> Chain<'static> {
    Chain {
        _type: Some(NfChainType::Filter),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..chain(table, name)
    }
}

fn rule(
    table: &str,
    chain: &str,
    comment: Option<&str>,
    expr: Vec<Statement<'static>>,
) -> NfListObject<'static> {
    NfListObject::Rule(JsonRule {
        family: NfFamily::Bridge,
        table: table.to_owned().into(),
        chain: chain.to_owned().into(),
        expr: expr.into(),
        comment: comment.map(|c| c.to_owned().into()),
        ..JsonRule::default()
    })
}

fn map_decl(table: &str, name: &str) -> Value {
    json!({"add": {"map": {"family": "bridge", "table": table, "name": name, "type": "ifname", "map": "verdict"}}})
}

/// The node table with its dispatch maps and base chain. Idempotent: the base chain is
/// flushed and refilled in the same transaction, so no packet sees it empty.
///
/// There is no `ports_out` base chain (forward hook, `oifname vmap @out_ports`) until egress
/// rules exist: even empty it cost every bridged frame a hook, an `oifname` copy and a map
/// lookup (about a third of the table's per-packet cost, see docs/networking.md). One left
/// by an earlier version is removed here (added, flushed and deleted in this transaction, so
/// its absence is no error).
pub(crate) fn table_batch(table: &str) -> JsonBatch {
    let mut b = JsonBatch::default();
    b.cmd(NfCmd::Add(NfListObject::Table(Table {
        family: NfFamily::Bridge,
        name: table.to_owned().into(),
        handle: None,
    })));
    b.raw(map_decl(table, IN_PORTS))
        .raw(map_decl(table, OUT_PORTS));
    b.cmd(NfCmd::Add(NfListObject::Chain(base_chain(
        table,
        PORTS_IN,
        NfHook::Prerouting,
        PORTS_IN_PRIORITY,
    ))));
    b.cmd(NfCmd::Flush(FlushObject::Chain(chain(table, PORTS_IN))));
    let vmap = Statement::VerdictMap(VerdictMap {
        key: Expression::Named(NamedExpression::Meta(Meta {
            key: nftables::expr::MetaKey::Iifname,
        })),
        data: s(format!("@{IN_PORTS}")),
    });
    b.cmd(NfCmd::Add(rule(table, PORTS_IN, None, vec![vmap])));
    b.cmd(NfCmd::Add(NfListObject::Chain(base_chain(
        table,
        LEGACY_PORTS_OUT,
        NfHook::Forward,
        0,
    ))));
    b.cmd(NfCmd::Flush(FlushObject::Chain(chain(
        table,
        LEGACY_PORTS_OUT,
    ))));
    b.cmd(NfCmd::Delete(NfListObject::Chain(chain(
        table,
        LEGACY_PORTS_OUT,
    ))));
    b
}

pub(crate) fn delete_table_batch(table: &str) -> JsonBatch {
    let mut b = JsonBatch::default();
    b.cmd(NfCmd::Delete(NfListObject::Table(Table {
        family: NfFamily::Bridge,
        name: table.to_owned().into(),
        handle: None,
    })));
    b
}

/// Link-layer and network-header fields the port chain reads: (base, offset, length).
const ETHER_SADDR: (Base, u32, u32) = (Base::Link, 6, 6);
const ETHER_TYPE: (Base, u32, u32) = (Base::Link, 12, 2);
const ARP_SADDR_ETHER: (Base, u32, u32) = (Base::Network, 8, 6);
const ARP_SADDR_IP: (Base, u32, u32) = (Base::Network, 14, 4);
const IP_SADDR: (Base, u32, u32) = (Base::Network, 12, 4);
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const ETH_P_ARP: [u8; 2] = [0x08, 0x06];

fn load((base, offset, len): (Base, u32, u32)) -> Expr {
    Expr::Payload { base, offset, len }
}

fn cmp(op: CmpOp, data: &[u8]) -> Expr {
    Expr::Cmp {
        op,
        data: data.to_vec(),
    }
}

/// `<field> != <value> counter drop`, behind the dependency `nft` would add for the field.
fn spoof_check(
    comment: &'static str,
    dep: Vec<Expr>,
    field: (Base, u32, u32),
    value: &[u8],
) -> Rule {
    let mut exprs = dep;
    exprs.extend([
        load(field),
        cmp(CmpOp::Neq, value),
        Expr::Counter,
        Expr::Verdict(Verdict::Drop),
    ]);
    Rule {
        comment: Some(comment),
        exprs,
    }
}

/// The rules of one port, exactly what `nft` compiles these to:
/// ```text
/// ether saddr != <mac>                      counter drop comment "l2-spoof"
/// meta length < 256 limit rate over <pps>/second burst <pps/100+5> packets
///                                           counter drop comment "pps-limit"  (with pps)
/// meta priority set 1:<minor>                                                 (with a class)
/// arp saddr ether != <mac>                  counter drop comment "arp-spoof"
/// arp saddr ip != <ip>                      counter drop comment "arp-spoof"
/// ip saddr != <ip>                          counter drop comment "ip-spoof"
/// ether type ip accept
/// ether type arp accept
///                                           counter drop comment "other-ethertype"
/// ```
/// (`arp …` implies `ether type arp`, `ip …` implies `meta protocol ip`.)
pub(crate) fn port_rules(mac: [u8; 6], ip: Ipv4Addr, shaping: Shaping) -> Vec<Rule> {
    let is_arp = || vec![load(ETHER_TYPE), cmp(CmpOp::Eq, &ETH_P_ARP)];
    let is_ip = vec![Expr::Meta(MetaKey::Protocol), cmp(CmpOp::Eq, &ETH_P_IP)];
    let accept = |ty: &[u8]| Rule {
        comment: None,
        exprs: vec![
            load(ETHER_TYPE),
            cmp(CmpOp::Eq, ty),
            Expr::Verdict(Verdict::Accept),
        ],
    };
    // IPv4 first: nearly every frame is IPv4 and leaves after three rules (the ARP checks
    // cost two more payload loads and compares per frame when they came first).
    let mut rules = vec![spoof_check(C_L2, vec![], ETHER_SADDR, &mac)];
    if let Some(pps) = shaping.pps {
        rules.push(Rule {
            comment: Some(C_PPS),
            exprs: vec![
                Expr::Meta(MetaKey::Len),
                Expr::Hton32,
                cmp(CmpOp::Lt, &PPS_FRAME_BYTES.to_be_bytes()),
                Expr::LimitOver {
                    rate: pps,
                    burst: u32::try_from(pps / 100 + 5).unwrap_or(u32::MAX),
                },
                Expr::Counter,
                Expr::Verdict(Verdict::Drop),
            ],
        });
    }
    if let Some(class) = shaping.class {
        rules.push(Rule {
            comment: None,
            exprs: vec![
                Expr::Immediate(class.to_ne_bytes().to_vec()),
                Expr::MetaSet(MetaKey::Priority),
            ],
        });
    }
    rules.extend([
        spoof_check(C_IP, is_ip, IP_SADDR, &ip.octets()),
        accept(&ETH_P_IP),
        spoof_check(C_ARP, is_arp(), ARP_SADDR_ETHER, &mac),
        spoof_check(C_ARP, is_arp(), ARP_SADDR_IP, &ip.octets()),
        accept(&ETH_P_ARP),
        Rule {
            comment: Some(C_OTHER),
            exprs: vec![Expr::Counter, Expr::Verdict(Verdict::Drop)],
        },
    ]);
    rules
}

/// Installs (or atomically rewrites) one port's chain and its `in_ports` element. The
/// element is added last in the same transaction, so the port is never dispatched to a
/// half-filled chain.
/// (L4 rules will extend this one batch with a `<port>_out` chain and its `out_ports`
/// element, so a port stays one transaction.)
pub(crate) fn port_batch(
    table: &str,
    port: &str,
    mac: [u8; 6],
    ip: Ipv4Addr,
    shaping: Shaping,
) -> nfnl::Batch {
    let cin = Names::chain_in(port);
    let mut b = nfnl::Batch::new(table);
    b.add_chain(&cin).flush_chain(&cin);
    for r in port_rules(mac, ip, shaping) {
        b.add_rule(&cin, &r);
    }
    b.add_vmap_elem(IN_PORTS, port, &Verdict::Jump(cin));
    b
}

/// Appends the removal of one port's element and chain to `b`. Idempotent without a
/// lookup: each object is first added (a no-op when present) and then deleted, all in one
/// transaction.
pub(crate) fn port_delete(b: &mut nfnl::Batch, port: &str) {
    let cin = Names::chain_in(port);
    b.add_chain(&cin)
        .add_vmap_elem(IN_PORTS, port, &Verdict::Jump(cin.clone()))
        .del_ifname_elem(IN_PORTS, port)
        .flush_chain(&cin)
        .del_chain(&cin);
}

/// Runs `nft` in the node's namespace.
pub(crate) async fn run(
    ns: &File,
    op: &str,
    args: &[&str],
    stdin: Option<Vec<u8>>,
) -> Result<Vec<u8>, NetError> {
    netns::run_program(ns, "nft", "nftables", args, stdin)
        .await
        .map_err(|detail| NetError::Nft {
            op: op.to_owned(),
            detail,
        })
}

pub(crate) async fn apply(ns: &File, op: &str, batch: &JsonBatch) -> Result<(), NetError> {
    if batch.is_empty() {
        return Ok(());
    }
    run(ns, op, &["-j", "-f", "-"], Some(batch.to_json()?))
        .await
        .map(drop)
}

/// `nft -j list <what…>` parsed; `None` when the object does not exist.
async fn list(ns: &File, what: &[&str]) -> Result<Option<Vec<Value>>, NetError> {
    let mut args = vec!["-j", "list"];
    args.extend_from_slice(what);
    let op = format!("list {}", what.join(" "));
    match run(ns, &op, &args, None).await {
        Ok(out) => {
            let v: Value = serde_json::from_slice(&out).map_err(|e| NetError::Nft {
                op: op.clone(),
                detail: format!("unparsable output: {e}"),
            })?;
            Ok(Some(v["nftables"].as_array().cloned().unwrap_or_default()))
        }
        Err(NetError::Nft { detail, .. }) if detail.contains("No such file or directory") => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Every table of the namespace, as `(family, name)`.
pub(crate) async fn list_tables(ns: &File) -> Result<Vec<(String, String)>, NetError> {
    let items = list(ns, &["tables"]).await?.unwrap_or_default();
    Ok(items
        .iter()
        .filter_map(|i| {
            let t = &i["table"];
            Some((
                t["family"].as_str()?.to_owned(),
                t["name"].as_str()?.to_owned(),
            ))
        })
        .collect())
}

/// Drop counters of one port's `_in` chain, summed by rule comment.
pub(crate) fn port_counters(
    nf: &nfnl::NfSocket,
    table: &str,
    port: &str,
) -> Result<Option<[u64; 5]>, NetError> {
    let Some(rules) = nf.chain_counters(table, &Names::chain_in(port))? else {
        return Ok(None);
    };
    let mut c = [0u64; 5];
    for r in rules {
        let idx = match r.comment.as_deref() {
            Some(C_L2) => 0,
            Some(C_ARP) => 1,
            Some(C_IP) => 2,
            Some(C_OTHER) => 3,
            Some(C_PPS) => 4,
            _ => continue,
        };
        c[idx] += r.packets;
    }
    Ok(Some(c))
}

/// The ports of this table: chains named after a port, and keys of `in_ports`.
pub(crate) async fn list_ports(ns: &File, names: &Names) -> Result<Vec<String>, NetError> {
    let table = names.table();
    let mut ports = Vec::new();
    for o in list(ns, &["chains", "bridge"]).await?.unwrap_or_default() {
        let c = &o["chain"];
        if c["table"].as_str() == Some(table)
            && let Some(p) = c["name"].as_str().and_then(|n| names.parse_port_chain(n))
        {
            ports.push(p.to_owned());
        }
    }
    for o in list(ns, &["map", "bridge", table, IN_PORTS])
        .await?
        .unwrap_or_default()
    {
        for e in o["map"]["elem"].as_array().into_iter().flatten() {
            if let Some(k) = e[0].as_str() {
                ports.push(k.to_owned());
            }
        }
    }
    ports.sort();
    ports.dedup();
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_rules_check_mac_then_ip_then_arp() {
        let mac = [2, 0, 0, 0, 0, 1];
        let ip = Ipv4Addr::new(10, 0, 0, 1);
        let rules = port_rules(mac, ip, Shaping::default());
        let comments: Vec<Option<&str>> = rules.iter().map(|r| r.comment).collect();
        assert_eq!(
            comments,
            [
                Some(C_L2),
                Some(C_IP),
                None,
                Some(C_ARP),
                Some(C_ARP),
                None,
                Some(C_OTHER)
            ]
        );
        let drops = |r: &Rule| {
            r.exprs
                .ends_with(&[Expr::Counter, Expr::Verdict(Verdict::Drop)])
        };
        assert_eq!(rules.iter().filter(|r| drops(r)).count(), 5);
        assert!(rules[0].exprs.contains(&cmp(CmpOp::Neq, &mac)));
        assert!(rules[1].exprs.contains(&load(IP_SADDR)));
        assert!(rules[1].exprs.contains(&cmp(CmpOp::Neq, &[10, 0, 0, 1])));
        assert!(rules[3].exprs.contains(&load(ARP_SADDR_ETHER)));
        assert!(rules[3].exprs.contains(&cmp(CmpOp::Neq, &mac)));
        assert!(rules[4].exprs.contains(&cmp(CmpOp::Neq, &[10, 0, 0, 1])));
        // Every ARP or IPv4 field read is guarded by its protocol check first.
        assert_eq!(
            rules[1].exprs[..2],
            [Expr::Meta(MetaKey::Protocol), cmp(CmpOp::Eq, &ETH_P_IP)]
        );
        for r in &rules[3..5] {
            assert_eq!(r.exprs[..2], [load(ETHER_TYPE), cmp(CmpOp::Eq, &ETH_P_ARP)]);
        }
        // IPv4 is accepted only after its source check, ARP only after both of its.
        for (i, ty) in [(2, ETH_P_IP), (5, ETH_P_ARP)] {
            assert_eq!(
                rules[i].exprs,
                [
                    load(ETHER_TYPE),
                    cmp(CmpOp::Eq, &ty),
                    Expr::Verdict(Verdict::Accept)
                ]
            );
        }
    }

    #[test]
    fn shaping_comes_after_the_mac_check_and_before_any_accept() {
        let mac = [2, 0, 0, 0, 0, 1];
        let ip = Ipv4Addr::new(10, 0, 0, 1);
        let plain = port_rules(mac, ip, Shaping::default());
        let shaped = port_rules(
            mac,
            ip,
            Shaping {
                pps: Some(5000),
                class: Some(0x0001_0123),
            },
        );
        assert_eq!(shaped.len(), plain.len() + 2);
        assert_eq!(shaped[0], plain[0]);
        assert_eq!(shaped[3..], plain[1..]);
        assert_eq!(shaped[1].comment, Some(C_PPS));
        assert_eq!(
            shaped[1].exprs,
            [
                Expr::Meta(MetaKey::Len),
                Expr::Hton32,
                cmp(CmpOp::Lt, &[0, 0, 1, 0]),
                Expr::LimitOver {
                    rate: 5000,
                    burst: 55
                },
                Expr::Counter,
                Expr::Verdict(Verdict::Drop),
            ]
        );
        assert_eq!(
            shaped[2].exprs,
            [
                Expr::Immediate(0x0001_0123u32.to_ne_bytes().to_vec()),
                Expr::MetaSet(MetaKey::Priority)
            ]
        );
    }

    #[test]
    fn table_batch_declares_verdict_maps() {
        let j: Value = serde_json::from_slice(&table_batch("hive").to_json().unwrap()).unwrap();
        let text = j.to_string();
        assert!(text.contains(r#""map":"verdict""#));
        assert!(text.contains(r#""data":"@in_ports""#));
        assert!(text.contains(r#""hook":"prerouting""#));
        // The legacy forward-hook chain is only ever deleted (after an add, so its absence
        // is no error), last.
        let cmds = j["nftables"].as_array().unwrap();
        let last = cmds.last().unwrap();
        assert_eq!(last["delete"]["chain"]["name"], "ports_out", "{last}");
        assert_eq!(text.matches(r#""@out_ports""#).count(), 0);
    }
}
