//! Virtual addresses of services, balanced on the client's side: inside every instance's
//! network namespace, an nftables table (family `ip`, named after the node's prefix) DNATs
//! new connections to a VIP over the service's backends.
//!
//! ```text
//! table ip <prefix> {
//!   map services { type ipv4_addr . inet_proto . inet_service : verdict; }  # vip . proto . port → goto svc_N
//!   set vips     { type ipv4_addr; }                                        # every VIP
//!   chain nat_out   { type nat hook output priority -100; ip daddr . meta l4proto . th dport vmap @services }
//!   chain guard_out { type filter hook output priority filter;
//!                     ip daddr @vips meta l4proto tcp reject with tcp reset; ip daddr @vips reject }
//!   chain svc_N     { dnat to numgen random mod K map { 0 : ip0, 1 : ip1, … } }
//! }
//! ```
//!
//! Balancing on the client's side needs no hairpin and no SNAT: the backend sees the
//! client's own address and replies straight to it, and conntrack (in the client's
//! namespace) undoes the translation. A VIP without backends, or a port the service does
//! not have, is refused at once (a TCP reset, else ICMP port unreachable) instead of
//! timing out on an address nobody answers ARP for: the filter chain runs after the DNAT,
//! so only what was not translated still goes to a VIP.
//!
//! The whole table is rewritten in one `nft -f` transaction per change, run in the
//! namespace; it goes with the namespace. This module knows addresses and ports, never
//! services or tenants.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use crate::{NetError, NodeNet, Protocol, names, netns};

/// Most backends of one VIP (a map of that many elements is still one small rule).
pub const MAX_BACKENDS: usize = 4096;

/// One VIP as the instances of a network reach it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRoute {
    pub vip: Ipv4Addr,
    /// The ports the VIP forwards (to the same port of a backend).
    pub ports: Vec<(Protocol, u16)>,
    /// The backends' addresses; none: connections to the VIP are refused.
    pub backends: Vec<Ipv4Addr>,
}

/// The `nft -f` text that makes table `table` exactly `routes` (deletes it for none).
pub(crate) fn table_text(table: &str, routes: &[ServiceRoute]) -> String {
    // Declaring the table first makes the delete succeed whether or not it exists.
    let mut t = format!("table ip {table} {{}}\ndelete table ip {table}\n");
    if routes.is_empty() {
        return t;
    }
    let mut elements = Vec::new();
    for (i, r) in routes.iter().enumerate() {
        if r.backends.is_empty() {
            continue;
        }
        for (proto, port) in &r.ports {
            elements.push(format!(
                "{} . {} . {port} : goto svc_{i}",
                r.vip,
                proto_str(*proto)
            ));
        }
    }
    let vips: Vec<String> = routes.iter().map(|r| r.vip.to_string()).collect();
    let _ = writeln!(t, "table ip {table} {{");
    let _ = write!(
        t,
        "  map services {{ type ipv4_addr . inet_proto . inet_service : verdict;"
    );
    if !elements.is_empty() {
        let _ = write!(t, " elements = {{ {} }}", elements.join(", "));
    }
    let _ = writeln!(t, " }}");
    let _ = writeln!(
        t,
        "  set vips {{ type ipv4_addr; elements = {{ {} }} }}",
        vips.join(", ")
    );
    let _ = writeln!(
        t,
        "  chain nat_out {{\n    type nat hook output priority -100; policy accept;\n    \
         ip daddr . meta l4proto . th dport vmap @services\n  }}"
    );
    let _ = writeln!(
        t,
        "  chain guard_out {{\n    type filter hook output priority filter; policy accept;\n    \
         ip daddr @vips meta l4proto tcp reject with tcp reset\n    ip daddr @vips reject\n  }}"
    );
    for (i, r) in routes.iter().enumerate() {
        if r.backends.is_empty() {
            continue;
        }
        let map: Vec<String> = r
            .backends
            .iter()
            .enumerate()
            .map(|(n, ip)| format!("{n} : {ip}"))
            .collect();
        let _ = writeln!(
            t,
            "  chain svc_{i} {{\n    dnat to numgen random mod {} map {{ {} }}\n  }}",
            r.backends.len(),
            map.join(", ")
        );
    }
    t.push_str("}\n");
    t
}

fn proto_str(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
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

impl NodeNet {
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
        let path = self.cfg.netns_dir.join(self.names.netns(key));
        let ns = netns::open(&path)?;
        let text = table_text(self.names.table(), routes);
        crate::nft::run(
            &ns,
            &format!("service routes of {key}"),
            &["-f", "-"],
            Some(text.into_bytes()),
        )
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn routes_become_one_table_with_a_chain_per_vip() {
        let routes = [
            ServiceRoute {
                vip: ip("10.88.0.2"),
                ports: vec![(Protocol::Tcp, 80), (Protocol::Udp, 53)],
                backends: vec![ip("10.88.0.5"), ip("10.88.0.9")],
            },
            ServiceRoute {
                vip: ip("10.88.0.3"),
                ports: vec![(Protocol::Tcp, 5432)],
                backends: vec![],
            },
        ];
        let t = table_text("hive", &routes);
        assert!(t.starts_with("table ip hive {}\ndelete table ip hive\ntable ip hive {\n"));
        assert!(t.contains(
            "elements = { 10.88.0.2 . tcp . 80 : goto svc_0, 10.88.0.2 . udp . 53 : goto svc_0 }"
        ));
        assert!(t.contains("set vips { type ipv4_addr; elements = { 10.88.0.2, 10.88.0.3 } }"));
        assert!(
            t.contains("chain svc_0 {\n    dnat to numgen random mod 2 map { 0 : 10.88.0.5, 1 : 10.88.0.9 }\n  }")
        );
        // No backends: no chain and no map element, so the guard refuses it.
        assert!(!t.contains("svc_1"));
        assert!(t.contains("ip daddr @vips meta l4proto tcp reject with tcp reset"));
        assert_eq!(t.matches('{').count(), t.matches('}').count());
    }

    #[test]
    fn no_routes_removes_the_table() {
        assert_eq!(
            table_text("hv1", &[]),
            "table ip hv1 {}\ndelete table ip hv1\n"
        );
    }

    #[test]
    fn a_vip_with_no_backends_has_an_empty_map() {
        let t = table_text(
            "hive",
            &[ServiceRoute {
                vip: ip("10.1.0.2"),
                ports: vec![(Protocol::Tcp, 80)],
                backends: vec![],
            }],
        );
        assert!(
            t.contains("map services { type ipv4_addr . inet_proto . inet_service : verdict; }")
        );
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
