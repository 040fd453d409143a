//! The diff behind `set_remote_endpoints`: desired remote endpoints of one network against
//! the VXLAN device's current FDB and neighbour entries. Pure; no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::link::{FdbSelf, VxlanState};
use crate::{NetError, RemoteEndpoint};

/// The changes that bring a VXLAN device to the desired state. Adds come before deletes
/// when applied, so a moving endpoint is never without an entry.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) add_self: Vec<FdbSelf>,
    pub(crate) del_self: Vec<FdbSelf>,
    pub(crate) add_master: Vec<[u8; 6]>,
    pub(crate) del_master: Vec<[u8; 6]>,
    pub(crate) set_neigh: Vec<(Ipv4Addr, [u8; 6])>,
    pub(crate) del_neigh: Vec<Ipv4Addr>,
}

impl Plan {
    pub(crate) fn is_empty(&self) -> bool {
        *self == Plan::default()
    }
}

/// Endpoints on `local` (this node) are skipped: they sit on the bridge itself.
pub(crate) fn plan(
    local: Ipv4Addr,
    endpoints: &[RemoteEndpoint],
    current: &VxlanState,
) -> Result<Plan, NetError> {
    let mut by_mac: BTreeMap<[u8; 6], Ipv4Addr> = BTreeMap::new();
    let mut by_ip: BTreeMap<Ipv4Addr, [u8; 6]> = BTreeMap::new();
    for e in endpoints.iter().filter(|e| e.node_ip != local) {
        if e.mac[0] & 1 == 1 || e.mac == [0; 6] {
            return Err(NetError::invalid(
                "remote endpoint",
                format!("{}: mac {:02x?} is not unicast", e.ip, e.mac),
            ));
        }
        if by_mac
            .insert(e.mac, e.node_ip)
            .is_some_and(|n| n != e.node_ip)
        {
            return Err(NetError::invalid(
                "remote endpoint",
                format!("mac {:02x?} listed on two nodes", e.mac),
            ));
        }
        if by_ip.insert(e.ip, e.mac).is_some_and(|m| m != e.mac) {
            return Err(NetError::invalid(
                "remote endpoint",
                format!("ip {} listed with two macs", e.ip),
            ));
        }
    }
    let mut want_self: BTreeSet<FdbSelf> = by_mac
        .iter()
        .map(|(mac, dst)| FdbSelf {
            mac: *mac,
            dst: *dst,
        })
        .collect();
    // Head-end replication: one all-zero entry per node that has endpoints of this network.
    want_self.extend(by_mac.values().map(|dst| FdbSelf {
        mac: [0; 6],
        dst: *dst,
    }));
    let have_self: BTreeSet<FdbSelf> = current.fdb_self.iter().copied().collect();
    let want_master: BTreeSet<[u8; 6]> = by_mac.keys().copied().collect();
    let have_master: BTreeSet<[u8; 6]> = current.fdb_master.iter().copied().collect();
    let have_neigh: BTreeMap<Ipv4Addr, [u8; 6]> = current.neigh.iter().copied().collect();

    Ok(Plan {
        add_self: want_self.difference(&have_self).copied().collect(),
        del_self: have_self
            .difference(&want_self)
            // A unicast MAC that moved is rewritten in place by the add (replace).
            .filter(|e| e.mac == [0; 6] || !by_mac.contains_key(&e.mac))
            .copied()
            .collect(),
        add_master: want_master.difference(&have_master).copied().collect(),
        del_master: have_master.difference(&want_master).copied().collect(),
        set_neigh: by_ip
            .iter()
            .filter(|(ip, mac)| have_neigh.get(ip) != Some(mac))
            .map(|(ip, mac)| (*ip, *mac))
            .collect(),
        del_neigh: have_neigh
            .keys()
            .filter(|ip| !by_ip.contains_key(ip))
            .copied()
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const N2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const N3: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);

    fn ep(last: u8, node: Ipv4Addr) -> RemoteEndpoint {
        RemoteEndpoint {
            mac: [2, 0, 0, 0, 0, last],
            ip: Ipv4Addr::new(10, 77, 0, last),
            node_ip: node,
        }
    }

    #[test]
    fn from_empty_adds_unicast_bum_bridge_and_neighbours_and_skips_local() {
        let p = plan(
            LOCAL,
            &[ep(2, N2), ep(3, N3), ep(4, N2), ep(9, LOCAL)],
            &VxlanState::default(),
        )
        .unwrap();
        assert_eq!(p.add_self.len(), 3 + 2); // three MACs, two remote nodes
        assert!(p.add_self.contains(&FdbSelf {
            mac: [0; 6],
            dst: N2
        }));
        assert!(p.add_self.contains(&FdbSelf {
            mac: [0; 6],
            dst: N3
        }));
        assert!(!p.add_self.iter().any(|e| e.dst == LOCAL));
        assert_eq!(p.add_master.len(), 3);
        assert_eq!(p.set_neigh.len(), 3);
        assert!(p.del_self.is_empty() && p.del_master.is_empty() && p.del_neigh.is_empty());
    }

    #[test]
    fn converged_state_is_a_no_op_and_changes_are_minimal() {
        let eps = [ep(2, N2), ep(3, N3)];
        let first = plan(LOCAL, &eps, &VxlanState::default()).unwrap();
        let state = VxlanState {
            fdb_self: first.add_self.clone(),
            fdb_master: first.add_master.clone(),
            neigh: first.set_neigh.clone(),
        };
        assert!(plan(LOCAL, &eps, &state).unwrap().is_empty());

        // ep 3 moves to N2, N3 has nothing left: its BUM entry goes, the MAC is replaced.
        let p = plan(LOCAL, &[ep(2, N2), ep(3, N2)], &state).unwrap();
        assert_eq!(
            p.add_self,
            vec![FdbSelf {
                mac: [2, 0, 0, 0, 0, 3],
                dst: N2
            }]
        );
        assert_eq!(
            p.del_self,
            vec![FdbSelf {
                mac: [0; 6],
                dst: N3
            }]
        );
        assert!(p.add_master.is_empty() && p.set_neigh.is_empty());

        // Everything removed.
        let p = plan(LOCAL, &[], &state).unwrap();
        assert_eq!(p.del_self.len(), 4);
        assert_eq!(p.del_master.len(), 2);
        assert_eq!(p.del_neigh.len(), 2);
    }

    #[test]
    fn contradictions_are_refused() {
        let mut dup_mac = ep(3, N3);
        dup_mac.mac = ep(2, N2).mac;
        assert!(plan(LOCAL, &[ep(2, N2), dup_mac], &VxlanState::default()).is_err());
        let mut dup_ip = ep(3, N3);
        dup_ip.ip = ep(2, N2).ip;
        assert!(plan(LOCAL, &[ep(2, N2), dup_ip], &VxlanState::default()).is_err());
        let mut mcast = ep(2, N2);
        mcast.mac[0] = 1;
        assert!(plan(LOCAL, &[mcast], &VxlanState::default()).is_err());
    }
}
