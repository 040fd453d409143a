//! Background upkeep: compacting store history, deleting old events, forgetting idle rate
//! limit buckets. Every step is best-effort and logged; none blocks requests.

use chrono::Utc;
use hive_api::{Event, Tenant};
use hive_store::Op;

use crate::keys;
use crate::resources::{decode, list_all};
use crate::state::AppState;

/// Runs forever at the configured interval.
pub async fn run(st: AppState) {
    let mut tick = tokio::time::interval(st.config.housekeeping_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        once(&st).await;
    }
}

pub async fn once(st: &AppState) {
    st.limiter.prune();
    let purged = st.registry.storage.purge_expired_uploads().await;
    if purged > 0 {
        tracing::debug!(purged, "expired registry uploads");
    }
    if let Err(e) = compact(st).await {
        tracing::warn!(error = %e, "compaction");
    }
    if let Err(e) = expire_events(st).await {
        tracing::warn!(error = %e, "event expiry");
    }
}

async fn compact(st: &AppState) -> Result<(), hive_store::StoreError> {
    let current = st.store.current_revision().await?;
    let target = current.saturating_sub(st.config.keep_revisions);
    if target > st.store.compacted_revision().await? {
        st.store.compact(target).await?;
        tracing::debug!(revision = target, "compacted store history");
    }
    Ok(())
}

async fn expire_events(st: &AppState) -> Result<(), crate::error::ApiError> {
    let retention =
        chrono::Duration::from_std(st.config.event_retention).unwrap_or(chrono::Duration::hours(1));
    let cutoff = Utc::now() - retention;
    for tkv in list_all(st, &keys::collection::<Tenant>(None)).await? {
        let tenant: Tenant = decode(&tkv)?;
        let mut ops = Vec::new();
        for kv in list_all(st, &keys::collection::<Event>(Some(&tenant.name))).await? {
            let ev: Event = decode(&kv)?;
            // Names sort by time: stop at the first event still within retention.
            if ev.created_at.is_some_and(|t| t >= cutoff) {
                break;
            }
            ops.push(Op::Delete {
                key: kv.key,
                mod_revision: Some(kv.mod_revision),
            });
        }
        for chunk in ops.chunks(hive_store::MAX_TXN_OPS) {
            st.store.txn(chunk.to_vec()).await?;
        }
    }
    Ok(())
}
