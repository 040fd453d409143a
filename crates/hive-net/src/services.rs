//! Virtual addresses of services, balanced on the client's side: inside every instance's
//! network namespace, an nftables table (family `ip`, named after the node's prefix) DNATs
//! new connections to a VIP over the service's backends.
//!
//! ```text
//! table ip <prefix> {
//!   set vips     { type ipv4_addr }                               # every VIP
//!   # per backend count K that some VIP has:
//!   set ports_K  { type ipv4_addr . inet_proto . inet_service }  # vip . proto . port
//!   map be_K     { type ipv4_addr . mark : ipv4_addr }            # vip . 0 … K-1 → backend
//!   chain nat_out   { type nat hook output priority -100;
//!                     ip daddr . meta l4proto . th dport @ports_K
//!                       dnat to ip daddr . numgen random mod K map @be_K   # one rule per K
//!   }
//!   chain guard_out { type filter hook output priority filter;
//!                     ip daddr @vips meta l4proto tcp reject with tcp reset; ip daddr @vips reject }
//! }
//! ```
//! (A VIP without backends is only in `vips`.)
//!
//! A service's change is elements only: no set, chain or jump is made for a VIP, so a
//! transaction costs the same however many services the table holds (the kernel checks a
//! table's whole chain graph at each commit that adds a jump, and finds a new set's name by
//! walking all of them: a chain and map per VIP made every change O(services), in each of
//! the O(instances) namespaces of the network). Only a backend count no VIP had before adds
//! a rule (the rules of `nat_out` are then written again).
//!
//! Balancing on the client's side needs no hairpin and no SNAT: the backend sees the
//! client's own address and replies straight to it, and conntrack (in the client's
//! namespace) undoes the translation. A VIP without backends, or a port the service does
//! not have, is refused at once (a TCP reset, else ICMP port unreachable) instead of
//! timing out on an address nobody answers ARP for: the filter chain runs after the DNAT,
//! so only what was not translated still goes to a VIP.
//!
//! Each change is one nf_tables netlink transaction ([`crate::nfnl`]) sent on a socket made
//! in the namespace (by a thread entering it, or with a spare namespace), no `nft` program:
//! a node re-routes every local instance of a network when one of its services changes, and
//! `nft` (a process, which reads the table before it writes) made that O(instances ×
//! services) per change. The last routes applied to each namespace are remembered, so a
//! change writes only the VIPs that differ; a namespace whose table is unknown (this
//! process has not written it yet, or a change failed) is rewritten whole (the table
//! deleted and made again in the same transaction). The table goes with the namespace.
//! This module knows addresses and ports, never services or tenants.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use crate::nfnl::{
    self, Base, BaseChain, CmpOp, ElemData, Expr, Hook, MetaKey, Rule, TYPE_INET_PROTOCOL,
    TYPE_INET_SERVICE, TYPE_IPADDR, TYPE_MARK,
};
use crate::{NetError, NodeNet, Protocol, names, netns};

/// Most backends of one VIP (a map of that many elements is still one small rule).
pub const MAX_BACKENDS: usize = 4096;

const VIPS: &str = "vips";
const NAT_OUT: &str = "nat_out";
const GUARD_OUT: &str = "guard_out";

/// A concatenation's type id: its parts' ids, 6 bits each.
const TYPE_VIP_PROTO_PORT: u32 =
    (((TYPE_IPADDR << 6) | TYPE_INET_PROTOCOL) << 6) | TYPE_INET_SERVICE;
/// `ipv4_addr . mark`: a VIP and a backend's slot (`mark`: nft's 4-byte integer type).
const TYPE_VIP_SLOT: u32 = (TYPE_IPADDR << 6) | TYPE_MARK;

/// One VIP as the instances of a network reach it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRoute {
    pub vip: Ipv4Addr,
    /// The ports the VIP forwards (to the same port of a backend).
    pub ports: Vec<(Protocol, u16)>,
    /// The backends' addresses; none: connections to the VIP are refused.
    pub backends: Vec<Ipv4Addr>,
}

/// Per instance namespace (by key): a nf_tables socket made inside it, through which its
/// VIP table and its security-group table are written, and the routes last written
/// (`None`: unknown, the next change rewrites the VIP table whole). Each namespace's entry
/// is held while it is written.
#[derive(Debug, Default)]
pub(crate) struct Tables {
    by_key: std::sync::Mutex<HashMap<String, Slot>>,
}

type Slot = Arc<tokio::sync::Mutex<Option<Table>>>;

/// One namespace's socket, and its VIP table as this process last wrote it.
#[derive(Debug)]
pub(crate) struct Table {
    /// The namespace the socket is in (device, inode): a namespace made again under the same
    /// name is another one.
    ns_id: (u64, u64),
    pub(crate) sock: nfnl::NfSocket,
    last: Option<Vec<ServiceRoute>>,
}

impl Tables {
    fn slot(&self, key: &str) -> Slot {
        let mut m = self.by_key.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(key.to_owned()).or_default().clone()
    }

    /// Keeps `sock`, made inside namespace `ns` ahead, as the socket of `key`'s VIP table
    /// (dropped if the namespace cannot be told: the table's first write makes its own).
    pub(crate) async fn keep(&self, key: &str, ns: &std::fs::File, sock: nfnl::NfSocket) {
        if let Ok(ns_id) = ns_id(ns) {
            *self.slot(key).lock().await = Some(Table {
                ns_id,
                sock,
                last: None,
            });
        }
    }

    /// Forgets a namespace (it is gone) and closes its socket.
    pub(crate) fn remove(&self, key: &str) {
        let mut m = self.by_key.lock().unwrap_or_else(|e| e.into_inner());
        m.remove(key);
    }
}

fn ns_id(ns: &std::fs::File) -> Result<(u64, u64), NetError> {
    use std::os::unix::fs::MetadataExt;
    let m = ns
        .metadata()
        .map_err(|e| NetError::io("stat network namespace", e))?;
    Ok((m.dev(), m.ino()))
}

fn proto_str(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// The `services` key of `vip . proto . port`: each part in its own 4-byte register,
/// zero-padded as the kernel leaves a register after a shorter load.
fn service_key(vip: Ipv4Addr, proto: Protocol, port: u16) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&vip.octets());
    k[4] = proto.number();
    k[8..10].copy_from_slice(&port.to_be_bytes());
    k
}

/// The set of `vip . proto . port` of the VIPs with `k` backends.
fn ports_set(k: usize) -> String {
    format!("ports_{k}")
}

/// The map of `vip . slot` → backend of the VIPs with `k` backends.
fn backends_map(k: usize) -> String {
    format!("be_{k}")
}

/// The key of `vip`'s backend number `slot` in its [`backends_map`]: the address, then the
/// slot as `numgen` leaves it in the next register (host order).
fn slot_key(vip: Ipv4Addr, slot: u32) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&vip.octets());
    k[4..].copy_from_slice(&slot.to_ne_bytes());
    k
}

fn load_daddr(reg: u32) -> Expr {
    Expr::PayloadTo {
        base: Base::Network,
        offset: 16,
        len: 4,
        reg,
    }
}

/// The backend counts of `routes` (VIPs without backends have none).
fn classes(routes: &[ServiceRoute]) -> BTreeSet<usize> {
    routes
        .iter()
        .map(|r| r.backends.len())
        .filter(|k| *k > 0)
        .collect()
}

/// `nat_out`'s rule for the VIPs with `k` backends: `ip daddr . meta l4proto . th dport
/// @ports_k dnat to ip daddr . numgen random mod k map @be_k`. Its registers start after
/// register 1, where the backend's address goes for the DNAT.
fn class_rule(k: usize) -> Rule {
    let r = nfnl::NFT_REG32_00 + 4;
    Rule {
        comment: None,
        exprs: vec![
            load_daddr(r),
            Expr::MetaTo {
                key: MetaKey::L4Proto,
                reg: r + 1,
            },
            Expr::PayloadTo {
                base: Base::Transport,
                offset: 2,
                len: 2,
                reg: r + 2,
            },
            Expr::Lookup {
                set: ports_set(k),
                reg: r,
                dreg: None,
            },
            Expr::NumgenRandom {
                modulus: k as u32,
                reg: r + 1,
            },
            Expr::Lookup {
                set: backends_map(k),
                reg: r,
                dreg: Some(nfnl::NFT_REG_1),
            },
            Expr::Dnat,
        ],
    }
}

/// The sets of the VIPs with `k` backends.
fn add_class(b: &mut nfnl::Batch, k: usize) {
    b.add_set(
        &ports_set(k),
        nfnl::SetSpec {
            key_type: TYPE_VIP_PROTO_PORT,
            key_len: 12,
            values: nfnl::SetValues::None,
        },
    )
    .add_set(
        &backends_map(k),
        nfnl::SetSpec {
            key_type: TYPE_VIP_SLOT,
            key_len: 8,
            values: nfnl::SetValues::Data {
                data_type: TYPE_IPADDR,
                len: 4,
            },
        },
    );
}

/// Writes the whole table for `routes` (none: no table), replacing what is there.
fn full(b: &mut nfnl::Batch, routes: &[ServiceRoute]) {
    // Declaring the table first makes the delete succeed whether or not it exists.
    b.add_table().del_table();
    if routes.is_empty() {
        return;
    }
    b.add_table().add_set(
        VIPS,
        nfnl::SetSpec {
            key_type: TYPE_IPADDR,
            key_len: 4,
            values: nfnl::SetValues::None,
        },
    );
    let classes = classes(routes);
    for &k in &classes {
        add_class(b, k);
    }
    b.add_base_chain(NAT_OUT, BaseChain::accepting(Hook::Output, -100, "nat"));
    for &k in &classes {
        b.add_rule(NAT_OUT, &class_rule(k));
    }
    b.add_base_chain(GUARD_OUT, BaseChain::accepting(Hook::Output, 0, "filter"));
    let to_vip = || {
        vec![
            load_daddr(1),
            Expr::Lookup {
                set: VIPS.into(),
                reg: 1,
                dreg: None,
            },
        ]
    };
    let mut tcp = to_vip();
    tcp.extend([
        Expr::MetaTo {
            key: MetaKey::L4Proto,
            reg: 1,
        },
        Expr::Cmp {
            op: CmpOp::Eq,
            data: vec![Protocol::Tcp.number()],
        },
        Expr::RejectTcpReset,
    ]);
    let mut other = to_vip();
    other.push(Expr::RejectPortUnreachable);
    b.add_rule(
        GUARD_OUT,
        &Rule {
            comment: None,
            exprs: tcp,
        },
    )
    .add_rule(
        GUARD_OUT,
        &Rule {
            comment: None,
            exprs: other,
        },
    );
    for r in routes {
        b.add_elem(VIPS, &r.vip.to_string(), &r.vip.octets(), None);
        add_members(b, r);
    }
}

/// Writes what differs between `old` and `new` (both sorted, one route per VIP, both
/// non-empty: the table exists before and after): a changed VIP's elements go and its new
/// ones come; `nat_out`'s rules are written again only if the backend counts in use change.
fn diff(b: &mut nfnl::Batch, old: &[ServiceRoute], new: &[ServiceRoute]) {
    let old_by: BTreeMap<Ipv4Addr, &ServiceRoute> = old.iter().map(|r| (r.vip, r)).collect();
    let new_by: BTreeMap<Ipv4Addr, &ServiceRoute> = new.iter().map(|r| (r.vip, r)).collect();
    // Removals first: a changed VIP's elements go before its new ones come.
    for (vip, o) in &old_by {
        match new_by.get(vip) {
            None => {
                remove_members(b, o);
                b.del_elem(VIPS, &vip.to_string(), &vip.octets());
            }
            Some(n) if n != o => remove_members(b, o),
            Some(_) => {}
        }
    }
    let (was, is) = (classes(old), classes(new));
    if was != is {
        for &k in is.difference(&was) {
            add_class(b, k);
        }
        b.flush_chain(NAT_OUT);
        for &k in &is {
            b.add_rule(NAT_OUT, &class_rule(k));
        }
        // Unused once the rules that looked them up are gone.
        for &k in was.difference(&is) {
            b.del_set(&ports_set(k)).del_set(&backends_map(k));
        }
    }
    for (vip, n) in &new_by {
        match old_by.get(vip) {
            None => {
                b.add_elem(VIPS, &vip.to_string(), &vip.octets(), None);
                add_members(b, n);
            }
            Some(o) if o != n => add_members(b, n),
            Some(_) => {}
        }
    }
}

fn elem_label(vip: Ipv4Addr, p: Protocol, port: u16) -> String {
    format!("{vip} . {} . {port}", proto_str(p))
}

/// A VIP's ports and backends in the sets of its backend count (none: nothing).
fn add_members(b: &mut nfnl::Batch, r: &ServiceRoute) {
    let k = r.backends.len();
    if k == 0 {
        return;
    }
    let (ports, map) = (ports_set(k), backends_map(k));
    for &(p, port) in &r.ports {
        b.add_elem(
            &ports,
            &elem_label(r.vip, p, port),
            &service_key(r.vip, p, port),
            None,
        );
    }
    for (i, ip) in r.backends.iter().enumerate() {
        let i = i as u32;
        b.add_elem(
            &map,
            &format!("{} . {i} : {ip}", r.vip),
            &slot_key(r.vip, i),
            Some(&ElemData::Value(ip.octets().to_vec())),
        );
    }
}

/// Undoes [`add_members`].
fn remove_members(b: &mut nfnl::Batch, r: &ServiceRoute) {
    let k = r.backends.len();
    if k == 0 {
        return;
    }
    let (ports, map) = (ports_set(k), backends_map(k));
    for &(p, port) in &r.ports {
        b.del_elem(
            &ports,
            &elem_label(r.vip, p, port),
            &service_key(r.vip, p, port),
        );
    }
    for i in 0..k as u32 {
        b.del_elem(&map, &format!("{} . {i}", r.vip), &slot_key(r.vip, i));
    }
}

fn validate(key: &str, routes: &[ServiceRoute]) -> Result<(), NetError> {
    let mut vips = HashSet::new();
    for r in routes {
        let bad = |why: String| Err(NetError::invalid("service route", format!("{key}: {why}")));
        if !vips.insert(r.vip) {
            return bad(format!("vip {} listed twice", r.vip));
        }
        if r.vip.is_unspecified() || r.vip.is_loopback() || r.vip.is_multicast() {
            return bad(format!("{} cannot be a vip", r.vip));
        }
        if r.backends.len() > MAX_BACKENDS {
            return bad(format!(
                "vip {} has {} backends, at most {MAX_BACKENDS}",
                r.vip,
                r.backends.len()
            ));
        }
        if r.ports.iter().any(|(_, p)| *p == 0) {
            return bad(format!("vip {} has port 0", r.vip));
        }
    }
    Ok(())
}

/// Sorted, each route's ports and backends sorted and deduplicated: one form per meaning,
/// so that comparing with the last routes written is exact.
fn normalized(routes: &[ServiceRoute]) -> Vec<ServiceRoute> {
    let mut out: Vec<ServiceRoute> = routes
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.ports.sort();
            r.ports.dedup();
            r.backends.sort();
            r.backends.dedup();
            r
        })
        .collect();
    out.sort();
    out
}

impl NodeNet {
    /// Instance `key`'s entry: the nf_tables socket inside its namespace (made there once
    /// by a thread that enters it; writes through it need no thread in there), held until
    /// the guard is dropped. Fails if the instance has no namespace here.
    pub(crate) async fn ns_tables(
        &self,
        key: &str,
        op: &str,
    ) -> Result<tokio::sync::OwnedMappedMutexGuard<Option<Table>, Table>, NetError> {
        self.ns_tables_in(key, &self.names.netns(key), op).await
    }

    /// The entry `slot` for the namespace file `netns` of the netns directory (an
    /// instance's, or a router's: a socket kept open, since closing an nf_tables socket
    /// right after a transaction that deleted anything waits out an RCU grace period, 5–8 ms
    /// here). Dropped with [`Tables::remove`].
    pub(crate) async fn ns_tables_in(
        &self,
        slot: &str,
        netns: &str,
        op: &str,
    ) -> Result<tokio::sync::OwnedMappedMutexGuard<Option<Table>, Table>, NetError> {
        let path = self.cfg.netns_dir.join(netns);
        let ns = netns::open(&path)?;
        let mut slot = self.services.slot(slot).lock_owned().await;
        let id = ns_id(&ns)?;
        if slot.as_ref().is_none_or(|t| t.ns_id != id) {
            let sock = netns::run_in(&ns, op, nfnl::NfSocket::new).await?;
            *slot = Some(Table {
                ns_id: id,
                sock,
                last: None,
            });
        }
        tokio::sync::OwnedMutexGuard::try_map(slot, Option::as_mut)
            .map_err(|_| NetError::io(op.to_owned(), std::io::Error::other("no socket")))
    }

    /// Makes the VIP table inside instance `key`'s namespace exactly `routes` (one
    /// transaction; none removes the table). Idempotent; the table goes with the namespace
    /// ([`NodeNet::detach`]). Fails if the instance has no namespace here.
    pub async fn set_service_routes(
        &self,
        key: &str,
        routes: &[ServiceRoute],
    ) -> Result<(), NetError> {
        names::validate_key(key)?;
        validate(key, routes)?;
        let routes = normalized(routes);
        let op = format!("service routes of {key}");
        let mut t = self.ns_tables(key, &op).await?;
        let name = self.names.table();
        let mut batch = nfnl::Batch::of(nfnl::Family::Ip, name);
        let incremental = match t.last.as_deref() {
            Some(old) if old == routes => return Ok(()),
            Some(old) if !old.is_empty() && !routes.is_empty() => {
                diff(&mut batch, old, &routes);
                true
            }
            _ => {
                full(&mut batch, &routes);
                false
            }
        };
        t.last = None;
        let mut result = t.sock.apply(&op, &batch);
        if result.is_err() && incremental {
            // The table is not what this process last wrote (changed by hand, say):
            // rewrite it whole.
            let mut batch = nfnl::Batch::of(nfnl::Family::Ip, name);
            full(&mut batch, &routes);
            result = t.sock.apply(&op, &batch);
        }
        if result.is_ok() {
            t.last = Some(routes);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn route(vip: &str, ports: &[(Protocol, u16)], backends: &[&str]) -> ServiceRoute {
        ServiceRoute {
            vip: ip(vip),
            ports: ports.to_vec(),
            backends: backends.iter().map(|b| ip(b)).collect(),
        }
    }

    fn ops(f: impl FnOnce(&mut nfnl::Batch)) -> Vec<String> {
        let mut b = nfnl::Batch::of(nfnl::Family::Ip, "hive");
        f(&mut b);
        b.ops().into_iter().map(str::to_owned).collect()
    }

    const TCP80: (Protocol, u16) = (Protocol::Tcp, 80);
    const UDP53: (Protocol, u16) = (Protocol::Udp, 53);

    #[test]
    fn a_full_write_replaces_the_table_with_sets_and_a_rule_per_backend_count() {
        let routes = normalized(&[
            route("10.88.0.3", &[(Protocol::Tcp, 5432)], &[]),
            route("10.88.0.2", &[UDP53, TCP80], &["10.88.0.9", "10.88.0.5"]),
            route("10.88.0.4", &[TCP80], &["10.88.0.7"]),
        ]);
        let got = ops(|b| full(b, &routes));
        let expected = [
            "add table",
            "delete table",
            "add table",
            "add set vips",
            "add set ports_1",
            "add set be_1",
            "add set ports_2",
            "add set be_2",
            "add nat chain nat_out",
            "add rule (no comment) to chain nat_out",
            "add rule (no comment) to chain nat_out",
            "add filter chain guard_out",
            "add rule (no comment) to chain guard_out",
            "add rule (no comment) to chain guard_out",
            "add element 10.88.0.2 to vips",
            "add element 10.88.0.2 . tcp . 80 to ports_2",
            "add element 10.88.0.2 . udp . 53 to ports_2",
            // Backends sorted: the same routes always make the same table.
            "add element 10.88.0.2 . 0 : 10.88.0.5 to be_2",
            "add element 10.88.0.2 . 1 : 10.88.0.9 to be_2",
            // No backends: only the VIP, so the guard refuses it.
            "add element 10.88.0.3 to vips",
            "add element 10.88.0.4 to vips",
            "add element 10.88.0.4 . tcp . 80 to ports_1",
            "add element 10.88.0.4 . 0 : 10.88.0.7 to be_1",
        ];
        assert_eq!(got, expected);
        assert_eq!(ops(|b| full(b, &[])), ["add table", "delete table"]);
    }

    #[test]
    fn a_change_writes_only_the_elements_of_the_vips_that_differ() {
        let a = route("10.88.0.2", &[TCP80], &["10.88.0.5"]);
        let b = route("10.88.0.3", &[TCP80], &["10.88.0.6"]);
        let old = normalized(&[a.clone(), b.clone()]);
        // A third service: only its VIP is added.
        let c = route("10.88.0.4", &[TCP80], &[]);
        let new = normalized(&[a.clone(), b.clone(), c.clone()]);
        assert_eq!(
            ops(|bt| diff(bt, &old, &new)),
            ["add element 10.88.0.4 to vips"]
        );
        // Its first backend: elements of the class that exists, no set, chain or rule.
        let c1 = route("10.88.0.4", &[TCP80], &["10.88.0.8"]);
        let with_c1 = normalized(&[a.clone(), b.clone(), c1.clone()]);
        assert_eq!(
            ops(|bt| diff(bt, &new, &with_c1)),
            [
                "add element 10.88.0.4 . tcp . 80 to ports_1",
                "add element 10.88.0.4 . 0 : 10.88.0.8 to be_1",
            ]
        );
        // b gains a backend and a port (a count no VIP had: its class is made and the
        // rules written again), a loses its backends, c goes.
        let b2 = route("10.88.0.3", &[TCP80, UDP53], &["10.88.0.6", "10.88.0.7"]);
        let a2 = route("10.88.0.2", &[TCP80], &[]);
        let newer = normalized(&[a2, b2]);
        assert_eq!(
            ops(|bt| diff(bt, &new, &newer)),
            [
                "delete element 10.88.0.2 . tcp . 80 from ports_1",
                "delete element 10.88.0.2 . 0 from be_1",
                "delete element 10.88.0.3 . tcp . 80 from ports_1",
                "delete element 10.88.0.3 . 0 from be_1",
                "delete element 10.88.0.4 from vips",
                "add set ports_2",
                "add set be_2",
                "flush chain nat_out",
                "add rule (no comment) to chain nat_out",
                "delete set ports_1",
                "delete set be_1",
                "add element 10.88.0.3 . tcp . 80 to ports_2",
                "add element 10.88.0.3 . udp . 53 to ports_2",
                "add element 10.88.0.3 . 0 : 10.88.0.6 to be_2",
                "add element 10.88.0.3 . 1 : 10.88.0.7 to be_2",
            ]
        );
        // The same routes: nothing.
        assert!(ops(|bt| diff(bt, &newer, &newer)).is_empty());
    }

    #[test]
    fn keys_are_register_padded() {
        assert_eq!(
            service_key(ip("10.88.0.2"), Protocol::Udp, 53),
            [10, 88, 0, 2, 17, 0, 0, 0, 0, 53, 0, 0]
        );
        let mut slot = [10, 88, 0, 2, 0, 0, 0, 0];
        slot[4..].copy_from_slice(&3u32.to_ne_bytes());
        assert_eq!(slot_key(ip("10.88.0.2"), 3), slot);
    }

    #[test]
    fn bad_routes_are_refused() {
        let r = |vip: &str, port: u16| ServiceRoute {
            vip: ip(vip),
            ports: vec![(Protocol::Tcp, port)],
            backends: vec![ip("10.0.0.9")],
        };
        assert!(validate("k", &[r("10.0.0.2", 80), r("10.0.0.3", 80)]).is_ok());
        assert!(validate("k", &[r("10.0.0.2", 80), r("10.0.0.2", 81)]).is_err());
        assert!(validate("k", &[r("127.0.0.1", 80)]).is_err());
        assert!(validate("k", &[r("10.0.0.2", 0)]).is_err());
    }
}
