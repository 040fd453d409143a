//! Watches: an etcd watch turned into a [`crate::WatchStream`] that survives its member.
//!
//! The stream remembers the first revision it has not received. When its member fails (the
//! connection drops, or etcd cancels the watch because the member lost its leader), it moves
//! to a healthy member and watches again from that revision: etcd never splits one revision
//! across watch responses, so the resumed stream has no gap and no repeat. It ends with
//! [`StoreError::Compacted`] when etcd says the history it needs is gone, and with
//! [`StoreError::Unavailable`] when no member serves it for the failover timeout. A synced
//! watch ([`open_synced`]) also marks where its replay of history ends.

use std::collections::VecDeque;
use std::sync::Arc;

use etcd_client::{EventType, WatchOptions, WatchResponse};
use tokio::time::Instant;

use super::members::{Failure, Members};
use super::{PROBE_KEY, key_value, revision_from, watch_options};
use futures_util::StreamExt;

use crate::{
    Event, EventKind, Result, Revision, StoreError, SyncedWatchStream, WatchItem, WatchStream,
};

struct Cursor {
    members: Arc<Members>,
    /// The watched range `[key, end)`.
    key: Vec<u8>,
    end: Vec<u8>,
    /// The first revision not yet received.
    next: Revision,
    pending: VecDeque<WatchItem>,
    stream: Option<etcd_client::WatchStream>,
    /// `stream` covers every key (the replay of a synced watch), not only the range: its
    /// events outside the range are dropped.
    wide: bool,
    /// While a synced watch replays: the revision to mark [`WatchItem::Synced`] at.
    replay_until: Option<Revision>,
    /// The member `stream` is on.
    member: usize,
    /// When the stream started failing without delivering anything since.
    failing_since: Option<Instant>,
    done: bool,
}

/// Watches `[key, end)` for every change after `after`.
pub(super) async fn open(
    members: Arc<Members>,
    key: Vec<u8>,
    end: Vec<u8>,
    after: Revision,
) -> Result<WatchStream> {
    let items = open_synced(members, key, end, after, None).await?;
    Ok(Box::pin(items.filter_map(|item| {
        std::future::ready(match item {
            Ok(WatchItem::Event(event)) => Some(Ok(event)),
            Ok(WatchItem::Synced(_)) => None,
            Err(err) => Some(Err(err)),
        })
    })))
}

/// [`open`], marking [`WatchItem::Synced`] at `synced_at` (the store's revision at the call).
///
/// etcd says nothing when a watch from the past has caught up if none of the events it
/// replayed were in its range (and its requested progress notifications are not ordered
/// with the events before 3.4.24/3.5.8), so until then the stream watches every key and
/// drops the rest: every etcd revision after its first changed some key, so the events of
/// revision `synced_at` arrive, and etcd never splits a revision across responses. Once past
/// it, the stream is replaced by one on the range alone, from the next revision.
pub(super) async fn open_synced(
    members: Arc<Members>,
    key: Vec<u8>,
    end: Vec<u8>,
    after: Revision,
    synced_at: Option<Revision>,
) -> Result<SyncedWatchStream> {
    let mut cursor = Cursor {
        members,
        key,
        end,
        next: after + 1,
        pending: VecDeque::new(),
        stream: None,
        wide: false,
        replay_until: None,
        member: 0,
        failing_since: None,
        done: false,
    };
    match synced_at {
        // Nothing to replay (etcd's revision 1 is its empty initial state).
        Some(at) if after >= at || at <= 1 => cursor.pending.push_back(WatchItem::Synced(at)),
        at => cursor.replay_until = at,
    }
    cursor.connect().await?;
    Ok(Box::pin(futures_util::stream::unfold(
        cursor,
        Cursor::next_item,
    )))
}

impl Cursor {
    async fn connect(&mut self) -> Result<()> {
        let wide = self.replay_until.is_some();
        let (key, end) = match wide {
            true => (vec![0], vec![0]),
            false => (self.key.clone(), self.end.clone()),
        };
        let options = watch_options(&end, self.next)?;
        let (member, stream) = self
            .members
            .read_at("watch", move |mut member| {
                let (key, options) = (key.clone(), options.clone());
                async move { member.watch.watch(key, Some(options)).await }
            })
            .await
            .map_err(|f| f.into_store_error("watch"))?;
        self.member = member;
        self.stream = Some(stream);
        self.wide = wide;
        Ok(())
    }

    /// Whether `key` is in the watched range.
    fn covers(&self, key: &str) -> bool {
        let key = key.as_bytes();
        let from_start = self.key.as_slice() == [0];
        let to_end = self.end.as_slice() == [0];
        (from_start || key >= self.key.as_slice()) && (to_end || key < self.end.as_slice())
    }

    /// The replay is over: marks it, and the wide stream gives way to one on the range.
    fn end_replay(&mut self, at: Revision) {
        self.replay_until = None;
        self.pending.push_back(WatchItem::Synced(at));
    }

    async fn next_item(mut self) -> Option<(Result<WatchItem>, Self)> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some((Ok(item), self));
            }
            if self.done {
                return None;
            }
            if self.stream.is_none()
                && let Err(error) = self.connect().await
            {
                return self.end_with(error);
            }
            let Some(stream) = self.stream.as_mut() else {
                continue;
            };
            let why = match stream.message().await {
                Ok(Some(response)) => match self.take(&response) {
                    Ok(None) => {
                        if self.wide && self.replay_until.is_none() {
                            // Past the replay: watch the range alone from the next revision.
                            self.stream = None;
                        }
                        continue;
                    }
                    Ok(Some(why)) => why,
                    Err(error) => return self.end_with(error),
                },
                Ok(None) => "watch stream closed".to_owned(),
                Err(error) => error.to_string(),
            };
            self.stream = None;
            let since = *self.failing_since.get_or_insert_with(Instant::now);
            let deadline = since + self.members.failover_timeout();
            if Instant::now() >= deadline {
                let error = StoreError::Unavailable(format!(
                    "watch from revision {}: {why}, for {:?}",
                    self.next,
                    self.members.failover_timeout()
                ));
                return self.end_with(error);
            }
            tracing::debug!(error = %why, next = self.next, "etcd watch lost, resuming");
            let failed = format!("watch: {why}");
            if let Err(failure) = self.members.fail_over(self.member, &failed, deadline).await {
                return self.end_with(failure.into_store_error("watch"));
            }
        }
    }

    /// Queues the events of one response. `Ok(Some(why))` when etcd canceled the watch for a
    /// reason a resume may cure (its member lost its leader).
    fn take(&mut self, response: &WatchResponse) -> Result<Option<String>> {
        if response.compact_revision() > 0 {
            return Err(StoreError::Compacted {
                requested: self.next - 1,
                compacted: revision_from(response.compact_revision())?,
            });
        }
        if response.canceled() {
            return Ok(Some(format!(
                "etcd canceled the watch: {}",
                response.cancel_reason()
            )));
        }
        for event in response.events() {
            let event = convert(event)?;
            self.next = event.revision() + 1;
            if let Some(at) = self.replay_until
                && event.revision() > at
            {
                self.end_replay(at);
            }
            if self.wide && !self.covers(&event.kv.key) {
                continue;
            }
            self.pending.push_back(WatchItem::Event(event));
        }
        // The whole of revision `at` has arrived (etcd never splits one across responses).
        if let Some(at) = self.replay_until
            && self.next > at
        {
            self.end_replay(at);
        }
        if !response.events().is_empty() {
            self.failing_since = None;
        }
        Ok(None)
    }

    fn end_with(mut self, error: StoreError) -> Option<(Result<WatchItem>, Self)> {
        self.done = true;
        self.stream = None;
        Some((Err(error), self))
    }
}

fn convert(event: &etcd_client::Event) -> Result<Event> {
    let kv = event
        .kv()
        .ok_or_else(|| StoreError::Backend("etcd watch event without a key".into()))?;
    let kind = match event.event_type() {
        EventType::Put => EventKind::Put,
        EventType::Delete => EventKind::Delete,
    };
    Ok(Event {
        kind,
        kv: key_value(kv)?,
        prev: event.prev_kv().map(key_value).transpose()?,
    })
}

/// The revision etcd's history was compacted at, as etcd reports it to a watch from a
/// revision before it. Only called once a read has shown that history is compacted, so the
/// answer comes (etcd checks unsynced watchers every 100 ms).
pub(super) async fn compacted_revision(members: &Members) -> Result<Revision> {
    let (_, mut stream) = members
        .read_at("read compaction", |mut member| async move {
            let options = WatchOptions::new().with_start_revision(1);
            member.watch.watch(PROBE_KEY, Some(options)).await
        })
        .await
        .map_err(|f| f.into_store_error("read compaction"))?;
    let limit = members.request_timeout();
    let deadline = Instant::now() + limit;
    loop {
        let response = tokio::time::timeout_at(deadline, stream.message()).await;
        let failure = match response {
            Ok(Ok(Some(response))) if response.compact_revision() > 0 => {
                return revision_from(response.compact_revision());
            }
            Ok(Ok(Some(response))) if !response.canceled() => continue,
            Ok(Ok(Some(response))) => format!("watch canceled: {}", response.cancel_reason()),
            Ok(Ok(None)) => "watch closed".to_owned(),
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {limit:?}"),
        };
        return Err(Failure::Unavailable(failure).into_store_error("read compaction"));
    }
}
