//! Tenant networks in the API: subnets checked against the tenant's other networks, VNIs
//! claimed platform-wide, and address management (IPAM) for instances.
//!
//! Every claim is a key written in the same transaction as the change that needs it, so the
//! store, not this process, decides who holds what:
//! - a network's VNI: `/platform/vnis/{vni}`, created with the network (a random VNI; a
//!   clash with a concurrent create retries with another);
//! - an instance's address: `/t/{tenant}/ipam/{network}/{ip}`, created when the instance is
//!   bound to a node and deleted with the instance, so an address is never handed out while
//!   an instance holds it. Allocation is next-fit from a cursor that only moves forward (an
//!   address just released is the last to be given again) over a bitmap of the held
//!   addresses, reloaded from the claims whenever the cursor wraps: several API servers
//!   allocate at once, each skipping the addresses it sees claimed (through its watch cache)
//!   past its own bitmap, and a clash (another server took the address meanwhile) retries.
//!
//! A network is deleted in two steps so that no instance is placed on it meanwhile: it is
//! marked `deleting` (placements read the network and require its revision, so one in
//! flight fails), then deleted only if no address of it is held.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use axum::extract::{Path, State};
use axum::{Extension, Json};
use bytes::Bytes;
use chrono::Utc;
use hive_api::network::{
    DEFAULT_NETWORK, DEFAULT_SUBNET, MAX_NETWORKS_PER_TENANT, VNI_MAX, VNI_MIN, mac_for,
};
use hive_api::{
    ErrorCode, Instance, InstanceNetwork, Ipv4Cidr, Network, NetworkSpec, Resource, Role, Tenant,
};
use hive_store::{KeyValue, Op, Store, StoreError};
use rand::Rng;
use tokio::sync::Mutex;

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::keys;
use crate::resources::{self, Hooked, decode, encode, load_tenant};
use crate::state::AppState;

/// The allocator's memory of which addresses are held, per network.
#[derive(Debug, Default)]
pub struct Ipam {
    /// By `tenant/network-uid` (a network deleted and created again starts afresh).
    pools: Mutex<HashMap<String, Pool>>,
    /// Several servers allocate from the same networks: each starts at a random address, and
    /// moves to another random one when it finds its next address taken, so that servers do
    /// not chase each other's cursors from conflict to conflict. One server alone hands out
    /// addresses in order.
    spread: bool,
}

#[derive(Debug)]
struct Pool {
    subnet: Ipv4Cidr,
    gateway: Ipv4Addr,
    /// One bit per address of the subnet: held (or reserved).
    used: Vec<u64>,
    /// Where the next search starts.
    cursor: u32,
}

impl Pool {
    fn new(subnet: Ipv4Cidr, gateway: Ipv4Addr) -> Self {
        let words = subnet.size().div_ceil(64) as usize;
        let mut p = Self {
            subnet,
            gateway,
            used: vec![0; words],
            cursor: 0,
        };
        p.reserve();
        p
    }

    /// Network, broadcast and gateway addresses are never handed out.
    fn reserve(&mut self) {
        let last = (self.subnet.size() - 1) as u32;
        self.set(0);
        self.set(last);
        if let Some(g) = self.subnet.offset(self.gateway) {
            self.set(g);
        }
    }

    fn set(&mut self, off: u32) {
        self.used[(off / 64) as usize] |= 1 << (off % 64);
    }

    #[cfg(test)]
    fn is_set(&self, off: u32) -> bool {
        self.used[(off / 64) as usize] & (1 << (off % 64)) != 0
    }

    /// Replaces what is held with the claims read from the store.
    fn load(&mut self, claims: &[KeyValue], prefix: &str) {
        self.used.iter_mut().for_each(|w| *w = 0);
        self.reserve();
        for kv in claims {
            if let Some(off) = kv
                .key
                .strip_prefix(prefix)
                .and_then(|ip| ip.parse().ok())
                .and_then(|ip| self.subnet.offset(ip))
            {
                self.set(off);
            }
        }
    }

    /// Moves the cursor to a random address.
    fn jump(&mut self) {
        self.cursor = rand::rng().random_range(0..self.subnet.size()) as u32;
    }

    /// The first free address at or after the cursor, marked held; None past the end.
    fn next_free(&mut self) -> Option<Ipv4Addr> {
        let size = self.subnet.size();
        let mut off = u64::from(self.cursor);
        while off < size {
            let word = self.used[(off / 64) as usize];
            if word == u64::MAX {
                off = (off / 64 + 1) * 64;
                continue;
            }
            if word & (1 << (off % 64)) == 0 {
                let o = off as u32;
                self.set(o);
                self.cursor = o + 1;
                return self.subnet.nth(o);
            }
            off += 1;
        }
        None
    }
}

impl Ipam {
    /// An allocator for a server that shares its store with others (`spread`) or not.
    pub fn new(spread: bool) -> Self {
        Self {
            pools: Mutex::default(),
            spread,
        }
    }

    /// Picks a free address of `net` (in `tenant`) and marks it held here; the caller claims
    /// it in the store. Fails with `address_exhausted` when every address is held.
    pub(crate) async fn allocate(
        &self,
        store: &dyn Store,
        tenant: &str,
        net: &Network,
    ) -> ApiResult<Ipv4Addr> {
        let (subnet, gateway) = net.spec.parse("spec")?;
        let id = format!("{tenant}/{}", net.uid);
        let prefix = keys::ip_claims(tenant, &net.name);
        let mut pools = self.pools.lock().await;
        if !pools.contains_key(&id) {
            let mut pool = Pool::new(subnet, gateway);
            pool.load(&resources::list_all_in(store, &prefix).await?, &prefix);
            if self.spread {
                pool.jump();
            }
            pools.insert(id.clone(), pool);
        }
        let pool = pools.get_mut(&id).expect("inserted above");
        let mut skipped = 0u32;
        loop {
            let next = match pool.next_free() {
                Some(ip) => Some(ip),
                None => {
                    // Wrapped: start over with what the store holds now (addresses were
                    // released, possibly by other servers).
                    pool.load(&resources::list_all_in(store, &prefix).await?, &prefix);
                    pool.cursor = 0;
                    pool.next_free()
                }
            };
            let Some(ip) = next else {
                return Err(ApiError::new(
                    ErrorCode::AddressExhausted,
                    format!(
                        "network {:?} of tenant {tenant:?} has no free address: all of {subnet} \
                         is held",
                        net.name
                    ),
                ));
            };
            // Other servers allocate from the same addresses: skip what they claimed as far
            // as this server's (watch-cached) view goes.
            if store
                .get(&keys::ip_claim(tenant, &net.name, ip))
                .await?
                .kv
                .is_none()
            {
                return Ok(ip);
            }
            if self.spread {
                pool.jump();
            }
            skipped += 1;
            if skipped.is_multiple_of(64) {
                // Far behind the others: take in everything they hold at once.
                pool.load(&resources::list_all_in(store, &prefix).await?, &prefix);
            }
        }
    }

    /// Forgets the pools of a tenant's network (deleted).
    async fn forget(&self, tenant: &str, uid: &str) {
        self.pools.lock().await.remove(&format!("{tenant}/{uid}"));
    }
}

fn random_vni() -> u32 {
    rand::rng().random_range(VNI_MIN..=VNI_MAX)
}

/// Fills a new network's status (VNI, gateway) and returns the claim on its VNI.
fn claim_vni(tenant: &str, net: &mut Network) -> ApiResult<(Op, String)> {
    let (_, gateway) = net.spec.parse("spec")?;
    net.status = Default::default();
    net.status.vni = random_vni();
    net.status.gateway = gateway.to_string();
    let key = keys::vni(net.status.vni);
    let op = Op::Create {
        key: key.clone(),
        value: Bytes::from(format!("{tenant}/{}", net.name)),
    };
    Ok((op, key))
}

/// The networks of `tenant`.
async fn tenant_networks(store: &dyn Store, tenant: &str) -> ApiResult<Vec<Network>> {
    resources::list_all_in(store, &keys::collection::<Network>(Some(tenant)))
        .await?
        .iter()
        .map(decode::<Network>)
        .collect()
}

/// The writes that create a new tenant's default network, in the tenant's transaction.
pub async fn tenant_created(_st: &AppState, tenant: &mut Tenant) -> ApiResult<Hooked> {
    default_network_ops(&tenant.name)
}

fn default_network_ops(tenant: &str) -> ApiResult<Hooked> {
    let mut net = Network {
        name: DEFAULT_NETWORK.into(),
        spec: NetworkSpec {
            subnet: DEFAULT_SUBNET.into(),
            gateway: None,
        },
        ..Default::default()
    };
    net.init_system_fields(Some(tenant), uuid::Uuid::new_v4().to_string(), Utc::now());
    let (claim, key) = claim_vni(tenant, &mut net)?;
    Ok(Hooked {
        ops: vec![
            Op::Create {
                key: keys::object::<Network>(Some(tenant), DEFAULT_NETWORK),
                value: encode(&net)?,
            },
            claim,
        ],
        retry_on: Some(key),
        in_use_on: None,
    })
}

/// Gives every tenant that has none (made before networks existed) its default network.
pub async fn ensure_default_networks(store: &dyn Store) -> Result<(), StoreError> {
    for kv in resources::list_all_in(store, &keys::collection::<Tenant>(None))
        .await
        .map_err(|e| StoreError::Backend(e.message))?
    {
        let Ok(tenant) = decode::<Tenant>(&kv) else {
            continue;
        };
        let key = keys::object::<Network>(Some(&tenant.name), DEFAULT_NETWORK);
        if store.get(&key).await?.kv.is_some() {
            continue;
        }
        for _ in 0..resources::HOOK_ATTEMPTS {
            let hooked =
                default_network_ops(&tenant.name).map_err(|e| StoreError::Backend(e.message))?;
            let mut ops = vec![Op::Require {
                key: kv.key.clone(),
                mod_revision: kv.mod_revision,
            }];
            ops.extend(hooked.ops);
            match store.txn(ops).await {
                Ok(_) => {
                    tracing::info!(tenant = %tenant.name, "created the tenant's default network");
                    break;
                }
                Err(StoreError::Conflict { key, .. }) if Some(&key) == hooked.retry_on.as_ref() => {
                    continue;
                }
                // Gone or created meanwhile: nothing to do.
                Err(StoreError::Conflict { .. }) => break,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// The deletes of a deleted tenant's VNI claims, for the tenant's transaction.
pub async fn tenant_deleted(st: &AppState, tenant: &str) -> ApiResult<Vec<Op>> {
    Ok(tenant_networks(st.store.as_ref(), tenant)
        .await?
        .iter()
        .filter(|n| n.status.vni != 0)
        .map(|n| Op::Delete {
            key: keys::vni(n.status.vni),
            mod_revision: None,
        })
        .collect())
}

/// A new network: within the tenant's limit, not overlapping its other networks, with a VNI
/// of its own.
pub async fn network_created(
    st: &AppState,
    tenant: Option<&str>,
    net: &mut Network,
) -> ApiResult<Hooked> {
    let tenant = tenant.unwrap_or_default();
    let (subnet, _) = net.spec.parse("spec")?;
    let lock = keys::network_lock(tenant);
    let held = st.store.get(&lock).await?.kv;
    let others = tenant_networks(st.store.as_ref(), tenant).await?;
    if others.len() >= MAX_NETWORKS_PER_TENANT {
        return Err(ApiError::invalid(format!(
            "tenant {tenant:?} has {} networks, at most {MAX_NETWORKS_PER_TENANT} allowed",
            others.len()
        )));
    }
    for o in &others {
        if let Ok(s) = o.spec.subnet.parse::<Ipv4Cidr>()
            && s.overlaps(&subnet)
            && o.name != net.name
        {
            return Err(ApiError::invalid(format!(
                "spec.subnet: {subnet} overlaps {s} of network {:?}",
                o.name
            )));
        }
    }
    let (claim, key) = claim_vni(tenant, net)?;
    let lock_op = match held {
        Some(kv) => Op::Update {
            key: lock,
            value: kv.value,
            mod_revision: kv.mod_revision,
        },
        None => Op::Create {
            key: lock,
            value: Bytes::new(),
        },
    };
    Ok(Hooked {
        ops: vec![lock_op, claim],
        retry_on: Some(key),
        in_use_on: None,
    })
}

/// A network's subnet and gateway are fixed: addresses were handed out from them.
pub fn network_updated(stored: &Network, net: &mut Network) -> ApiResult<Hooked> {
    if stored.spec != net.spec {
        return Err(ApiError::invalid(
            "spec: a network's subnet and gateway cannot change (create another network)",
        ));
    }
    Ok(Hooked::default())
}

/// Places a bound instance on its network: reads the network, takes an address (the fixed
/// one asked for, or a free one), and returns the claim.
async fn attach(st: &AppState, tenant: &str, inst: &mut Instance) -> ApiResult<Hooked> {
    let name = inst.spec.template.network().to_owned();
    let net_key = keys::object::<Network>(Some(tenant), &name);
    let kv = st
        .store
        .get(&net_key)
        .await?
        .kv
        .ok_or_else(|| ApiError::not_found("network", &name, Some(tenant)))?;
    let net: Network = decode(&kv)?;
    if net.status.deleting {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!("network {name:?} of tenant {tenant:?} is being deleted"),
        ));
    }
    let (subnet, gateway) = net.spec.parse("spec")?;
    let (ip, fixed) = match &inst.spec.template.ip {
        Some(ip) => {
            let ip: Ipv4Addr = ip.parse().map_err(|_| {
                ApiError::invalid(format!("spec.template.ip: {ip:?} is not an IPv4 address"))
            })?;
            if !subnet.contains(ip)
                || ip == subnet.network()
                || ip == subnet.broadcast()
                || ip == gateway
            {
                return Err(ApiError::invalid(format!(
                    "spec.template.ip: {ip} is not an instance address of network {name:?} \
                     ({subnet}, gateway {gateway})"
                )));
            }
            (ip, true)
        }
        None => (
            st.ipam.allocate(st.store.as_ref(), tenant, &net).await?,
            false,
        ),
    };
    let claim = keys::ip_claim(tenant, &name, ip);
    inst.spec.network = Some(InstanceNetwork {
        name,
        vni: net.status.vni,
        ip: ip.to_string(),
        prefix_len: subnet.prefix_len(),
        gateway: gateway.to_string(),
        mac: mac_for(ip),
    });
    Ok(Hooked {
        ops: vec![
            Op::Require {
                key: net_key,
                mod_revision: kv.mod_revision,
            },
            Op::Create {
                key: claim.clone(),
                value: Bytes::from(inst.uid.clone()),
            },
        ],
        retry_on: (!fixed).then(|| claim.clone()),
        in_use_on: fixed.then_some(claim),
    })
}

/// What clients write never sets the network place; an instance created already bound gets
/// one.
pub async fn instance_created(
    st: &AppState,
    tenant: Option<&str>,
    inst: &mut Instance,
) -> ApiResult<Hooked> {
    inst.spec.network = None;
    match (tenant, &inst.spec.node) {
        (Some(t), Some(_)) => attach(st, t, inst).await,
        _ => Ok(Hooked::default()),
    }
}

/// The network place, once given, stays; binding to a node gives one.
pub async fn instance_updated(
    st: &AppState,
    tenant: Option<&str>,
    stored: &Instance,
    inst: &mut Instance,
) -> ApiResult<Hooked> {
    inst.spec.network = stored.spec.network.clone();
    match (tenant, &inst.spec.node, &inst.spec.network) {
        (Some(t), Some(_), None) => attach(st, t, inst).await,
        _ => Ok(Hooked::default()),
    }
}

/// Releases a deleted instance's address, in the same transaction.
pub async fn instance_deleted(
    st: &AppState,
    tenant: Option<&str>,
    stored: &Instance,
) -> ApiResult<Hooked> {
    let (Some(t), Some(n)) = (tenant, &stored.spec.network) else {
        return Ok(Hooked::default());
    };
    let Ok(ip) = n.ip.parse::<Ipv4Addr>() else {
        return Ok(Hooked::default());
    };
    let key = keys::ip_claim(t, &n.name, ip);
    let ops = match st.store.get(&key).await?.kv {
        Some(kv) if kv.value == stored.uid.as_bytes() => vec![Op::Delete {
            key,
            mod_revision: Some(kv.mod_revision),
        }],
        _ => Vec::new(),
    };
    Ok(Hooked {
        ops,
        ..Default::default()
    })
}

/// `DELETE /api/v1/tenants/{tenant}/networks/{name}`: refused for `default` and for a network
/// whose addresses are held; otherwise marked deleting, checked again, deleted with its VNI
/// claim.
pub async fn delete(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(params): Path<HashMap<String, String>>,
) -> ApiResult<Json<Network>> {
    let target = resources::Target::of::<Network>(params);
    let tenant = target.tenant.clone().unwrap_or_default();
    let guard = load_tenant(&st, &p, &tenant).await?;
    p.require(Role::TenantAdmin, "delete networks")?;
    let name = target.name();
    let key = keys::object::<Network>(Some(&tenant), name);
    let kv = st
        .store
        .get(&key)
        .await?
        .kv
        .ok_or_else(|| ApiError::not_found("network", name, Some(&tenant)))?;
    let mut net: Network = decode(&kv)?;
    if name == DEFAULT_NETWORK {
        return Err(ApiError::invalid(format!(
            "the {DEFAULT_NETWORK:?} network cannot be deleted (it goes with the tenant)"
        )));
    }
    let store_err = |e| ApiError::from_store(e, "network", name, Some(&tenant));
    let mut marked = kv.mod_revision;
    if !net.status.deleting {
        net.status.deleting = true;
        marked = st
            .store
            .txn(vec![
                guard.require(),
                Op::Update {
                    key: key.clone(),
                    value: encode(&net)?,
                    mod_revision: kv.mod_revision,
                },
            ])
            .await
            .map_err(store_err)?
            .revision;
    }
    let held = resources::list_all_in(st.store.as_ref(), &keys::ip_claims(&tenant, name)).await?;
    if let Some(first) = held.first() {
        net.status.deleting = false;
        let _ = st
            .store
            .txn(vec![Op::Update {
                key: key.clone(),
                value: encode(&net)?,
                mod_revision: marked,
            }])
            .await;
        let ip = first.key.rsplit('/').next().unwrap_or_default();
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "network {name:?} is in use: {} address(es) held (e.g. {ip} by instance uid {})",
                held.len(),
                String::from_utf8_lossy(&first.value)
            ),
        ));
    }
    let mut ops = vec![Op::Delete {
        key,
        mod_revision: Some(marked),
    }];
    if net.status.vni != 0 {
        ops.push(Op::Delete {
            key: keys::vni(net.status.vni),
            mod_revision: None,
        });
    }
    st.store.txn(ops).await.map_err(store_err)?;
    st.ipam.forget(&tenant, &net.uid).await;
    net.set_revision(marked);
    Ok(Json(net))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(subnet: &str) -> Pool {
        let s: Ipv4Cidr = subnet.parse().unwrap();
        Pool::new(s, s.first_host())
    }

    #[test]
    fn next_fit_skips_reserved_and_held_then_ends() {
        let mut p = pool("10.0.0.0/29");
        let got: Vec<Ipv4Addr> = std::iter::from_fn(|| p.next_free()).collect();
        // .0 network, .1 gateway, .7 broadcast are never given.
        let want: Vec<Ipv4Addr> = (2..=6).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn load_marks_claims_and_ignores_junk() {
        let mut p = pool("10.0.0.0/24");
        let prefix = "/t/a/ipam/default/";
        let kv = |k: &str| KeyValue {
            key: format!("{prefix}{k}"),
            value: Bytes::new(),
            create_revision: 1,
            mod_revision: 1,
        };
        p.load(
            &[kv("10.0.0.2"), kv("10.0.0.3"), kv("junk"), kv("10.9.9.9")],
            prefix,
        );
        assert_eq!(p.next_free(), Some(Ipv4Addr::new(10, 0, 0, 4)));
        assert!(p.is_set(2) && p.is_set(3) && p.is_set(4) && !p.is_set(5));
    }

    #[test]
    fn large_pools_skip_full_words() {
        let mut p = pool("10.0.0.0/16");
        for w in p.used.iter_mut().take(100) {
            *w = u64::MAX;
        }
        assert_eq!(p.next_free(), Some(Ipv4Addr::new(10, 0, 25, 0)));
    }
}
