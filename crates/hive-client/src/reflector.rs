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

/// Puts `obj`, as this process just wrote it, into `store` (reflected from a watch), unless
/// the watch brought a newer version first: a write's answer and the watch's events race,
/// and a change someone made right after the write must not be hidden until the next event.
/// An object `created` by the write and not in the store yet was not seen yet; one updated
/// by it and gone from the store was deleted meanwhile, and is not put back.
pub async fn keep_written<R: Resource>(store: &Store<R>, obj: R, created: bool) {
    let mut objects = store.lock().await;
    let keep = match objects.get(obj.name()) {
        Some(seen) => seen.revision() < obj.revision(),
        None => created,
    };
    if keep {
        objects.insert(obj.name().to_owned(), obj);
    }
}

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
    let cursor = watch::channel(Cursor::default()).0;
    reflect_resumable(client, tenant, store, changed, synced, cursor, None).await
}

/// Where a reflector's store stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The store revision the contents are at (0 before the first list). Set while the
    /// store's lock is held: a reader that holds the lock reads a matching pair.
    pub revision: u64,
    /// How the contents were last filled.
    pub start: Start,
}

/// How a reflector's store was last filled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Start {
    /// Not yet.
    #[default]
    Pending,
    /// Listed whole at `revision`, because of `reason` (no saved state, a saved revision the
    /// server no longer has, a broken watch).
    Listed { revision: u64, reason: String },
    /// Loaded from a saved state at revision `from`, then caught up by watching from it:
    /// `changes` events up to `to` (the server's revision when it resumed) were applied.
    /// `caught_up` once they all were (the store counts as synced from then on).
    Resumed {
        from: u64,
        to: u64,
        changes: u64,
        caught_up: bool,
    },
}

/// A store's contents saved at a revision, to resume from instead of listing.
#[derive(Clone, Debug)]
pub struct Saved<R> {
    pub revision: u64,
    pub objects: Vec<R>,
}

/// The end of a resume's catch-up is the server's `BOOKMARK` at or past its revision at the
/// resume (sent as soon as the replay is over), or an event at or past it. Only a server
/// that never marks the end of its replay (one from before that bookmark) leaves this: once
/// no event has come for this long, the replayed history is taken to be over.
pub const CATCH_UP_QUIET: Duration = Duration::from_secs(2);

/// [`reflect_synced`], starting from `resume` when given: the saved objects go into the store
/// and the watch starts from their revision, so only what changed since is read. `synced` is
/// set once those changes are applied. A saved revision the server has compacted away (or has
/// not reached: another store) falls back to a list. `cursor` follows the store's revision and
/// says how it started.
pub async fn reflect_resumable<R: Resource>(
    client: Client,
    tenant: Option<String>,
    store: Store<R>,
    changed: mpsc::UnboundedSender<String>,
    synced: watch::Sender<bool>,
    cursor: watch::Sender<Cursor>,
    mut resume: Option<Saved<R>>,
) {
    let tenant_ref = tenant.as_deref();
    let tenant = tenant_ref.unwrap_or("-");
    let mut reason = "no saved state".to_owned();
    loop {
        // The server's revision when a resume began: events up to it are the catch-up.
        let mut catching_up: Option<u64> = None;
        let mut stream = if let Some(saved) = resume.take() {
            match open_resumed::<R>(&client, tenant_ref, saved.revision).await {
                Ok((stream, to)) => {
                    let mut s = store.lock().await;
                    let fresh: BTreeMap<String, R> = saved
                        .objects
                        .into_iter()
                        .map(|o| (o.name().to_owned(), o))
                        .collect();
                    let names: Vec<String> = s.keys().chain(fresh.keys()).cloned().collect();
                    *s = fresh;
                    cursor.send_replace(Cursor {
                        revision: saved.revision,
                        start: Start::Resumed {
                            from: saved.revision,
                            to,
                            changes: 0,
                            caught_up: false,
                        },
                    });
                    tracing::info!(%tenant, kind = R::KIND, from = saved.revision, to, "resuming the watch from a saved revision");
                    for n in names {
                        if changed.send(n).is_err() {
                            return;
                        }
                    }
                    drop(s);
                    if to == saved.revision {
                        caught_up(&cursor, &synced, tenant, R::KIND);
                    } else {
                        catching_up = Some(to);
                    }
                    stream
                }
                Err(why) => {
                    match why.code() {
                        Some(hive_api::ErrorCode::NotFound) => return, // the tenant is gone
                        // The server is away or busy: the saved revision may still do.
                        None | Some(hive_api::ErrorCode::Unavailable)
                            if !matches!(why, ResumeRefused::Behind { .. }) =>
                        {
                            tracing::warn!(%tenant, kind = R::KIND, error = %why, "resume the watch");
                            resume = Some(saved);
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                        _ => {}
                    }
                    tracing::info!(%tenant, kind = R::KIND, from = saved.revision, reason = %why, "cannot resume the watch: listing");
                    reason = why.to_string();
                    continue;
                }
            }
        } else {
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
                cursor.send_replace(Cursor {
                    revision: list.revision,
                    start: Start::Listed {
                        revision: list.revision,
                        reason: std::mem::take(&mut reason),
                    },
                });
                synced.send_replace(true);
                for n in names {
                    if changed.send(n).is_err() {
                        return;
                    }
                }
            }
            match client.watch::<R>(tenant_ref, Some(list.revision)).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%tenant, kind = R::KIND, error = %e, "watch");
                    reason = format!("watch: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        };
        loop {
            let item = match catching_up {
                None => stream.next().await,
                Some(_) => match tokio::time::timeout(CATCH_UP_QUIET, stream.next()).await {
                    Ok(item) => item,
                    Err(_) => {
                        // Quiet, and no mark: a server that does not send one.
                        tracing::info!(%tenant, kind = R::KIND, "no bookmark ended the catch-up; taking {CATCH_UP_QUIET:?} without events for its end");
                        catching_up = None;
                        caught_up(&cursor, &synced, tenant, R::KIND);
                        continue;
                    }
                },
            };
            let Some(Ok(ev)) = item else {
                reason = "the watch ended".into();
                break;
            };
            let (name, gone) = match (&ev.type_, &ev.object) {
                (WatchEventType::Added | WatchEventType::Modified, Some(o)) => {
                    (o.name().to_owned(), false)
                }
                (WatchEventType::Deleted, Some(o)) => (o.name().to_owned(), true),
                (WatchEventType::Error, _) => {
                    reason = match &ev.error {
                        Some(e) => format!("watch: {}", e.message),
                        None => "watch: error".into(),
                    };
                    break;
                }
                (WatchEventType::Bookmark, _) => {
                    // The server has sent every event up to it: the replay is over.
                    if catching_up.is_some_and(|to| ev.revision >= to) {
                        catching_up = None;
                        {
                            // Nothing changed up to it: the contents are at its revision.
                            let _s = store.lock().await;
                            cursor.send_modify(|c| c.revision = c.revision.max(ev.revision));
                        }
                        caught_up(&cursor, &synced, tenant, R::KIND);
                    }
                    continue;
                }
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
                cursor.send_modify(|c| {
                    c.revision = c.revision.max(ev.revision);
                    if let (Some(to), Start::Resumed { changes, .. }) = (catching_up, &mut c.start)
                        && ev.revision <= to
                    {
                        *changes += 1;
                    }
                });
            }
            if catching_up.is_some_and(|to| ev.revision >= to) {
                catching_up = None;
                caught_up(&cursor, &synced, tenant, R::KIND);
            }
            if changed.send(name).is_err() {
                return;
            }
        }
        // The stream ended (server restart, compaction, error): relist.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Opens a watch from `from`, after checking the server has reached it (a server behind a
/// saved revision holds another store); answers the stream and the server's revision.
async fn open_resumed<R: Resource>(
    client: &Client,
    tenant: Option<&str>,
    from: u64,
) -> Result<(crate::WatchStream<R>, u64), ResumeRefused> {
    // One object's page: its revision is the server's, at the price of one object.
    let now = client
        .list_page::<R>(tenant, Some(1), None)
        .await
        .map_err(ResumeRefused::Client)?
        .revision;
    if now < from {
        return Err(ResumeRefused::Behind { from, now });
    }
    let stream = client
        .watch::<R>(tenant, Some(from))
        .await
        .map_err(ResumeRefused::Client)?;
    Ok((stream, now))
}

/// Why a saved revision could not be resumed from.
#[derive(Debug, thiserror::Error)]
enum ResumeRefused {
    #[error("the server is at revision {now}, before the saved revision {from} (another store)")]
    Behind { from: u64, now: u64 },
    /// Compacted (`revision_compacted`), or the server could not be asked.
    #[error("resume from the saved revision: {0}")]
    Client(crate::ClientError),
}

impl ResumeRefused {
    fn code(&self) -> Option<hive_api::ErrorCode> {
        match self {
            ResumeRefused::Behind { .. } => None,
            ResumeRefused::Client(e) => e.code(),
        }
    }
}

/// A resumed store has caught up: it counts as synced.
fn caught_up(
    cursor: &watch::Sender<Cursor>,
    synced: &watch::Sender<bool>,
    tenant: &str,
    kind: &str,
) {
    cursor.send_modify(|c| {
        if let Start::Resumed {
            from,
            to,
            changes,
            caught_up,
        } = &mut c.start
        {
            *caught_up = true;
            tracing::info!(%tenant, kind, from = *from, to = *to, changes = *changes, "resumed from revision {from}, {changes} changes");
        }
    });
    synced.send_replace(true);
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

#[cfg(test)]
mod tests {
    use super::*;
    use hive_api::Service;

    fn at(name: &str, revision: u64) -> Service {
        let mut s = Service {
            name: name.into(),
            ..Default::default()
        };
        s.set_revision(revision);
        s
    }

    #[tokio::test]
    async fn a_written_object_never_hides_a_newer_one_nor_brings_back_a_deleted_one() {
        let store: Store<Service> = Arc::new(Mutex::new(BTreeMap::new()));
        store.lock().await.insert("web".into(), at("web", 5));
        keep_written(&store, at("web", 3), false).await;
        assert_eq!(
            store.lock().await["web"].revision(),
            5,
            "older than the watch's"
        );
        keep_written(&store, at("web", 7), false).await;
        assert_eq!(store.lock().await["web"].revision(), 7);
        keep_written(&store, at("db", 8), false).await;
        assert!(
            !store.lock().await.contains_key("db"),
            "updated, then deleted"
        );
        keep_written(&store, at("db", 9), true).await;
        assert_eq!(
            store.lock().await["db"].revision(),
            9,
            "created, not seen yet"
        );
    }
}
