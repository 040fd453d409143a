//! A cache of one tenant's objects of one kind (or of a platform-scoped kind), kept by list +
//! watch, relisting when the watch breaks or its revision was compacted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use hive_api::{Resource, WatchEventType};
use tokio::sync::{Mutex, mpsc, watch};

use crate::Client;

/// Objects by name.
pub type Store<R> = Arc<Mutex<BTreeMap<String, R>>>;

/// Keeps `store` equal to the objects of kind `R` in `tenant` (None for platform-scoped
/// kinds); sends the name of every object that changed (and every name after a relist) to
/// `changed`. Returns when `changed` closes or the tenant is gone.
pub async fn reflect<R: Resource>(
    client: Client,
    tenant: Option<String>,
    store: Store<R>,
    changed: mpsc::UnboundedSender<String>,
) {
    reflect_synced(client, tenant, store, changed, watch::channel(false).0).await
}

/// [`reflect`], setting `synced` once the first complete list is in the store: until then
/// the store is partial, and acting on what it lacks (deleting, creating, placing) is wrong.
pub async fn reflect_synced<R: Resource>(
    client: Client,
    tenant: Option<String>,
    store: Store<R>,
    changed: mpsc::UnboundedSender<String>,
    synced: watch::Sender<bool>,
) {
    let tenant_ref = tenant.as_deref();
    let tenant = tenant_ref.unwrap_or("-");
    loop {
        let list = match client.list::<R>(tenant_ref).await {
            Ok(l) => l,
            Err(e) => {
                if e.code() == Some(hive_api::ErrorCode::NotFound) {
                    return; // the tenant is gone
                }
                tracing::warn!(%tenant, kind = R::KIND, error = %e, "list");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        {
            let mut s = store.lock().await;
            let fresh: BTreeMap<String, R> = list
                .items
                .into_iter()
                .map(|o| (o.name().to_owned(), o))
                .collect();
            let names: Vec<String> = s.keys().chain(fresh.keys()).cloned().collect();
            *s = fresh;
            synced.send_replace(true);
            for n in names {
                if changed.send(n).is_err() {
                    return;
                }
            }
        }
        let mut stream = match client.watch::<R>(tenant_ref, Some(list.revision)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%tenant, kind = R::KIND, error = %e, "watch");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(item) = stream.next().await {
            let Ok(ev) = item else { break };
            let (name, gone) = match (&ev.type_, &ev.object) {
                (WatchEventType::Added | WatchEventType::Modified, Some(o)) => {
                    (o.name().to_owned(), false)
                }
                (WatchEventType::Deleted, Some(o)) => (o.name().to_owned(), true),
                (WatchEventType::Error, _) => break,
                _ => continue,
            };
            {
                let mut s = store.lock().await;
                if gone {
                    s.remove(&name);
                } else if let Some(o) = ev.object {
                    // Never step back: our own writes may already be newer in the cache.
                    if s.get(&name)
                        .is_none_or(|cur| cur.revision() <= o.revision())
                    {
                        s.insert(name.clone(), o);
                    }
                }
            }
            if changed.send(name).is_err() {
                return;
            }
        }
        // The stream ended (server restart, compaction, error): relist.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends the names of all tenants now, then again whenever a tenant comes or goes. Needs a
/// platform token. Returns when `tx` closes.
pub async fn tenant_names(client: Client, tx: mpsc::UnboundedSender<Vec<String>>) {
    loop {
        let Ok(list) = client.list::<hive_api::Tenant>(None).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let mut live: Vec<String> = list.items.iter().map(|t| t.name.clone()).collect();
        if tx.send(live.clone()).is_err() {
            return;
        }
        let Ok(mut stream) = client
            .watch::<hive_api::Tenant>(None, Some(list.revision))
            .await
        else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        while let Some(Ok(ev)) = stream.next().await {
            match (ev.type_, ev.object) {
                (WatchEventType::Added, Some(t)) => live.push(t.name),
                (WatchEventType::Deleted, Some(t)) => live.retain(|n| *n != t.name),
                (WatchEventType::Error, _) => break,
                _ => continue,
            }
            if tx.send(live.clone()).is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
