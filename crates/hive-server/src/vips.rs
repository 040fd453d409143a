//! Services' virtual addresses (`status.vip`): one address of the service's network per
//! service, claimed with the same keys as instances' addresses
//! (`/t/{tenant}/ipam/{network}/{ip}`, value: the service's uid) in the transaction of the
//! write that needs it, released in the service's delete transaction. Instances never get
//! it: the allocator sees the claim like any other held address.
//!
//! - Create: allocated if the network exists (else left empty).
//! - Spec update: kept; allocated if missing; moved (old claim released, new one taken) when
//!   `spec.template.network` changed.
//! - Status writes (the controller's) keep it: it is the server's field.
//! - A service without one (made before VIPs existed, or before its network) gets one when
//!   the service controller writes its spec back unchanged (see
//!   `controllers::services`), which passes through the update hook here.
//!
//! This module owns only the claim; balancing and DNS happen on the nodes.

use std::net::Ipv4Addr;

use bytes::Bytes;
use hive_api::{Network, Service};
use hive_store::Op;

use crate::error::ApiResult;
use crate::keys;
use crate::resources::{Hooked, decode};
use crate::state::AppState;

/// Takes an address of the service's network for `svc` (writing `status.vip`) and returns
/// the claim; with no such network (or one being deleted) nothing is taken.
async fn allocate(st: &AppState, tenant: &str, svc: &mut Service) -> ApiResult<Hooked> {
    svc.status.vip.clear();
    let name = svc.spec.template.network().to_owned();
    let net_key = keys::object::<Network>(Some(tenant), &name);
    let Some(kv) = st.store.get(&net_key).await?.kv else {
        return Ok(Hooked::default());
    };
    let net: Network = decode(&kv)?;
    if net.status.deleting {
        return Ok(Hooked::default());
    }
    let ip = st.ipam.allocate(st.store.as_ref(), tenant, &net).await?;
    let claim = keys::ip_claim(tenant, &name, ip);
    svc.status.vip = ip.to_string();
    Ok(Hooked {
        ops: vec![
            Op::Require {
                key: net_key,
                mod_revision: kv.mod_revision,
            },
            Op::Create {
                key: claim.clone(),
                value: Bytes::from(svc.uid.clone()),
            },
        ],
        retry_on: Some(claim),
        in_use_on: None,
    })
}

/// The delete of `stored`'s claim on its VIP, if it holds one.
async fn release(st: &AppState, tenant: &str, stored: &Service) -> ApiResult<Vec<Op>> {
    let Ok(ip) = stored.status.vip.parse::<Ipv4Addr>() else {
        return Ok(Vec::new());
    };
    let key = keys::ip_claim(tenant, stored.spec.template.network(), ip);
    Ok(match st.store.get(&key).await?.kv {
        Some(kv) if kv.value == stored.uid.as_bytes() => vec![Op::Delete {
            key,
            mod_revision: Some(kv.mod_revision),
        }],
        _ => Vec::new(),
    })
}

/// A new service gets its VIP in its create transaction.
pub async fn service_created(
    st: &AppState,
    tenant: Option<&str>,
    svc: &mut Service,
) -> ApiResult<Hooked> {
    match tenant {
        Some(t) => allocate(st, t, svc).await,
        None => Ok(Hooked::default()),
    }
}

/// A spec update keeps the VIP, gives one to a service that has none, and moves it when the
/// network changed.
pub async fn service_updated(
    st: &AppState,
    tenant: Option<&str>,
    stored: &Service,
    svc: &mut Service,
) -> ApiResult<Hooked> {
    let Some(t) = tenant else {
        return Ok(Hooked::default());
    };
    svc.status.vip = stored.status.vip.clone();
    let same_network = stored.spec.template.network() == svc.spec.template.network();
    if !svc.status.vip.is_empty() && same_network {
        return Ok(Hooked::default());
    }
    let released = if same_network {
        Vec::new()
    } else {
        release(st, t, stored).await?
    };
    let mut hooked = allocate(st, t, svc).await?;
    hooked.ops.extend(released);
    Ok(hooked)
}

/// Releases a deleted service's VIP, in the same transaction.
pub async fn service_deleted(
    st: &AppState,
    tenant: Option<&str>,
    stored: &Service,
) -> ApiResult<Hooked> {
    let ops = match tenant {
        Some(t) => release(st, t, stored).await?,
        None => Vec::new(),
    };
    Ok(Hooked {
        ops,
        ..Default::default()
    })
}
