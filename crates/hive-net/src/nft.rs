//! The node's nftables table (family `bridge`) and the per-port anti-spoofing chains.
//!
//! Builds JSON batches with the `nftables` crate's types and applies each through one run
//! of `nft -j -f -` (as netavark does), so every change is one atomic kernel transaction.
//! Owns nothing but the table named after the node's prefix.
//!
//! Layout (see docs/networking.md):
//! ```text
//! table bridge <prefix>
//!   map in_ports  { type ifname : verdict }      host veth -> jump <port>_in
//!   map out_ports { type ifname : verdict }      (egress L4 rules: later)
//!   chain ports_in  { hook prerouting priority -300; policy accept; iifname vmap @in_ports }
//!   chain ports_out { hook forward priority 0;      policy accept; oifname vmap @out_ports }
//!   chain <port>_in  : MAC/ARP/IPv4 source checks; ether type {ip, arp} accept; drop
//!                      (later: jump <port>_pps first, meta priority set before the accept)
//! ```

use std::borrow::Cow;
use std::fs::File;
use std::net::Ipv4Addr;
use std::process::Stdio;

use nftables::expr::{
    Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, SetItem, Verdict,
};
use nftables::schema::{Chain, FlushObject, NfCmd, NfListObject, NfObject, Rule, Table};
use nftables::stmt::{
    AnonymousCounter, Counter, JumpTarget, Match, Operator, Statement, VerdictMap,
};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::NetError;
use crate::names::Names;
use crate::netns;

pub(crate) const IN_PORTS: &str = "in_ports";
pub(crate) const OUT_PORTS: &str = "out_ports";
const PORTS_IN: &str = "ports_in";
const PORTS_OUT: &str = "ports_out";
/// Before bridge FDB learning and before anything else in the bridge prerouting hook, so
/// spoofed frames never poison the FDB.
const PORTS_IN_PRIORITY: i32 = -300;

/// Rule comments double as counter names when reading a port's drop counters.
pub(crate) const C_L2: &str = "l2-spoof";
pub(crate) const C_ARP: &str = "arp-spoof";
pub(crate) const C_IP: &str = "ip-spoof";
pub(crate) const C_OTHER: &str = "other-ethertype";

/// One atomic batch of nft commands.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    items: Vec<Item>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Item {
    Typed(NfObject<'static>),
    /// Objects the crate's schema cannot express (a map of type `ifname : verdict`).
    Raw(Value),
}

impl Batch {
    fn cmd(&mut self, c: NfCmd<'static>) -> &mut Self {
        self.items.push(Item::Typed(NfObject::CmdObject(c)));
        self
    }

    fn raw(&mut self, v: Value) -> &mut Self {
        self.items.push(Item::Raw(v));
        self
    }

    pub(crate) fn extend(&mut self, other: Batch) {
        self.items.extend(other.items);
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

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn counter() -> Statement<'static> {
    Statement::Counter(Counter::Anonymous(Some(AnonymousCounter::default())))
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
    NfListObject::Rule(Rule {
        family: NfFamily::Bridge,
        table: table.to_owned().into(),
        chain: chain.to_owned().into(),
        expr: expr.into(),
        comment: comment.map(|c| c.to_owned().into()),
        ..Rule::default()
    })
}

fn map_decl(table: &str, name: &str) -> Value {
    json!({"add": {"map": {"family": "bridge", "table": table, "name": name, "type": "ifname", "map": "verdict"}}})
}

fn port_element(table: &str, port: &str) -> NfListObject<'static> {
    let verdict = Expression::Verdict(Verdict::Jump(JumpTarget {
        target: Names::chain_in(port).into(),
    }));
    NfListObject::Element(nftables::schema::Element {
        family: NfFamily::Bridge,
        table: table.to_owned().into(),
        name: IN_PORTS.into(),
        elem: vec![Expression::List(vec![s(port), verdict])].into(),
    })
}

/// The node table with its dispatch maps and base chains. Idempotent: the base chains are
/// flushed and refilled in the same transaction, so no packet sees them empty.
pub(crate) fn table_batch(table: &str) -> Batch {
    let mut b = Batch::default();
    b.cmd(NfCmd::Add(NfListObject::Table(Table {
        family: NfFamily::Bridge,
        name: table.to_owned().into(),
        handle: None,
    })));
    b.raw(map_decl(table, IN_PORTS))
        .raw(map_decl(table, OUT_PORTS));
    for (name, hook, prio, key, map) in [
        (
            PORTS_IN,
            NfHook::Prerouting,
            PORTS_IN_PRIORITY,
            MetaKey::Iifname,
            IN_PORTS,
        ),
        (PORTS_OUT, NfHook::Forward, 0, MetaKey::Oifname, OUT_PORTS),
    ] {
        b.cmd(NfCmd::Add(NfListObject::Chain(base_chain(
            table, name, hook, prio,
        ))));
        b.cmd(NfCmd::Flush(FlushObject::Chain(chain(table, name))));
        let vmap = Statement::VerdictMap(VerdictMap {
            key: Expression::Named(NamedExpression::Meta(Meta { key })),
            data: s(format!("@{map}")),
        });
        b.cmd(NfCmd::Add(rule(table, name, None, vec![vmap])));
    }
    b
}

pub(crate) fn delete_table_batch(table: &str) -> Batch {
    let mut b = Batch::default();
    b.cmd(NfCmd::Delete(NfListObject::Table(Table {
        family: NfFamily::Bridge,
        name: table.to_owned().into(),
        handle: None,
    })));
    b
}

fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Installs (or atomically rewrites) one port's chains and its `in_ports` element. The
/// element is added last in the same transaction, so the port is never dispatched to a
/// half-filled chain; the `_pps` and `_qos` chains keep whatever later slices put there.
pub(crate) fn port_batch(table: &str, port: &str, mac: [u8; 6], ip: Ipv4Addr) -> Batch {
    let cin = Names::chain_in(port);
    let mac = mac_str(mac);
    let ip = ip.to_string();
    let mut b = Batch::default();
    b.cmd(NfCmd::Add(NfListObject::Chain(chain(table, &cin))));
    b.cmd(NfCmd::Flush(FlushObject::Chain(chain(table, &cin))));
    let drop = || Statement::Drop(None);
    // Slots for later slices, in this order: a `jump <port>_pps` (small-frame PPS limit)
    // before the checks, a `meta priority set` (QoS class) after them. They are added by
    // rewriting this chain in one transaction; empty sub-chains now would only triple the
    // chain count, and nft's cache load (hence every port change) grows with it.
    let rules: Vec<(Option<&str>, Vec<Statement<'static>>)> = vec![
        (
            Some(C_L2),
            vec![
                matches(payload("ether", "saddr"), Operator::NEQ, s(&mac)),
                counter(),
                drop(),
            ],
        ),
        (
            Some(C_ARP),
            vec![
                matches(payload("arp", "saddr ether"), Operator::NEQ, s(&mac)),
                counter(),
                drop(),
            ],
        ),
        (
            Some(C_ARP),
            vec![
                matches(payload("arp", "saddr ip"), Operator::NEQ, s(&ip)),
                counter(),
                drop(),
            ],
        ),
        (
            Some(C_IP),
            vec![
                matches(payload("ip", "saddr"), Operator::NEQ, s(&ip)),
                counter(),
                drop(),
            ],
        ),
        (
            None,
            vec![
                matches(
                    payload("ether", "type"),
                    Operator::EQ,
                    Expression::Named(NamedExpression::Set(vec![
                        SetItem::Element(s("ip")),
                        SetItem::Element(s("arp")),
                    ])),
                ),
                Statement::Accept(None),
            ],
        ),
        (Some(C_OTHER), vec![counter(), drop()]),
    ];
    for (comment, expr) in rules {
        b.cmd(NfCmd::Add(rule(table, &cin, comment, expr)));
    }
    b.cmd(NfCmd::Add(port_element(table, port)));
    b
}

/// Removes one port's element and chains. Idempotent without a lookup: each object is
/// first added (a no-op when present) and then deleted, all in one transaction.
pub(crate) fn port_delete_batch(table: &str, port: &str) -> Batch {
    let cin = Names::chain_in(port);
    let mut b = Batch::default();
    b.cmd(NfCmd::Add(NfListObject::Chain(chain(table, &cin))));
    b.cmd(NfCmd::Add(port_element(table, port)));
    b.cmd(NfCmd::Delete(port_element(table, port)));
    b.cmd(NfCmd::Flush(FlushObject::Chain(chain(table, &cin))));
    b.cmd(NfCmd::Delete(NfListObject::Chain(chain(table, &cin))));
    b
}

/// Runs `nft` in the node's namespace.
async fn run(
    ns: &File,
    op: &str,
    args: &[&str],
    stdin: Option<Vec<u8>>,
) -> Result<Vec<u8>, NetError> {
    let mut cmd = tokio::process::Command::new("nft");
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    netns::enter_in_child(&mut cmd, ns);
    let mut child = cmd.spawn().map_err(|e| NetError::Nft {
        op: op.to_owned(),
        detail: if e.kind() == std::io::ErrorKind::NotFound {
            "the nft binary is not in PATH (install nftables)".to_owned()
        } else {
            format!("spawn nft: {e}")
        },
    })?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(&data)
            .await
            .map_err(|e| NetError::io(format!("nft {op}: write batch"), e))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| NetError::io(format!("nft {op}: wait"), e))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(NetError::Nft {
            op: op.to_owned(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

pub(crate) async fn apply(ns: &File, op: &str, batch: &Batch) -> Result<(), NetError> {
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

pub(crate) async fn table_exists(ns: &File, table: &str) -> Result<bool, NetError> {
    // `list tables` avoids dumping every rule of a table with thousands of ports.
    let tables = list(ns, &["tables", "bridge"]).await?.unwrap_or_default();
    Ok(tables
        .iter()
        .any(|o| o["table"]["name"].as_str() == Some(table)))
}

/// Drop counters of one port's `_in` chain, summed by rule comment.
pub(crate) async fn port_counters(
    ns: &File,
    table: &str,
    port: &str,
) -> Result<Option<[u64; 4]>, NetError> {
    let Some(objs) = list(ns, &["chain", "bridge", table, &Names::chain_in(port)]).await? else {
        return Ok(None);
    };
    let mut c = [0u64; 4];
    for o in &objs {
        let r = &o["rule"];
        let idx = match r["comment"].as_str() {
            Some(C_L2) => 0,
            Some(C_ARP) => 1,
            Some(C_IP) => 2,
            Some(C_OTHER) => 3,
            _ => continue,
        };
        for e in r["expr"].as_array().into_iter().flatten() {
            if let Some(p) = e["counter"]["packets"].as_u64() {
                c[idx] += p;
            }
        }
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
    fn port_batch_installs_checks_before_dispatch() {
        let b = port_batch(
            "hive",
            "hivep0123456789",
            [2, 0, 0, 0, 0, 1],
            Ipv4Addr::new(10, 0, 0, 1),
        );
        let j: Value = serde_json::from_slice(&b.to_json().unwrap()).unwrap();
        let cmds = j["nftables"].as_array().unwrap();
        // The verdict-map element comes last: never a dispatch into a half-built chain.
        let last = &cmds[cmds.len() - 1]["add"]["element"];
        assert_eq!(last["name"], IN_PORTS);
        assert_eq!(last["elem"][0][0], "hivep0123456789");
        assert_eq!(last["elem"][0][1]["jump"]["target"], "hivep0123456789_in");
        let text = j.to_string();
        assert!(text.contains(r#""right":"02:00:00:00:00:01""#));
        assert!(text.contains(r#""right":"10.0.0.1""#));
        assert!(text.contains(r#""field":"saddr ether""#));
        assert_eq!(text.matches(r#""drop":null"#).count(), 5);
    }

    #[test]
    fn delete_batch_is_add_then_delete() {
        let b = port_delete_batch("hive", "hivep0123456789");
        let j: Value = serde_json::from_slice(&b.to_json().unwrap()).unwrap();
        let cmds = j["nftables"].as_array().unwrap();
        let first_delete = cmds.iter().position(|c| c.get("delete").is_some()).unwrap();
        assert!(cmds[..first_delete].iter().all(|c| c.get("add").is_some()));
        assert_eq!(cmds.iter().filter(|c| c.get("delete").is_some()).count(), 2);
    }

    #[test]
    fn table_batch_declares_verdict_maps() {
        let j: Value = serde_json::from_slice(&table_batch("hive").to_json().unwrap()).unwrap();
        let text = j.to_string();
        assert!(text.contains(r#""map":"verdict""#));
        assert!(text.contains(r#""data":"@in_ports""#));
        assert!(text.contains(r#""hook":"prerouting""#));
    }
}
