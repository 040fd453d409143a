//! Watches: an etcd watch turned into a [`crate::WatchStream`] that survives its member.
//!
//! The stream remembers the first revision it has not received. When its member fails (the
//! connection drops, or etcd cancels the watch because the member lost its leader), it moves
//! to a healthy member and watches again from that revision: etcd never splits one revision
//! across watch responses, so the resumed stream has no gap and no repeat. It ends with
//! [`StoreError::Compacted`] when etcd says the history it needs is gone, and with
//! [`StoreError::Unavailable`] when no member serves it for the failover timeout.

use std::collections::VecDeque;
use std::sync::Arc;

use etcd_client::{EventType, WatchOptions, WatchResponse};
use tokio::time::Instant;

use super::members::{Failure, Members};
use super::{PROBE_KEY, key_value, revision_from, watch_options};
use crate::{Event, EventKind, Result, Revision, StoreError, WatchStream};

struct Cursor {
    members: Arc<Members>,
    key: Vec<u8>,
    end: Vec<u8>,
    /// The first revision not yet received.
    next: Revision,
    pending: VecDeque<Event>,
    stream: Option<etcd_client::WatchStream>,
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
    let mut cursor = Cursor {
        members,
        key,
        end,
        next: after + 1,
        pending: VecDeque::new(),
        stream: None,
        member: 0,
        failing_since: None,
        done: false,
    };
    cursor.connect().await?;
    Ok(Box::pin(futures_util::stream::unfold(
        cursor,
        Cursor::next_item,
    )))
}

impl Cursor {
    async fn connect(&mut self) -> Result<()> {
        let options = watch_options(&self.end, self.next)?;
        let key = self.key.clone();
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
        Ok(())
    }

    async fn next_item(mut self) -> Option<(Result<Event>, Self)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some((Ok(event), self));
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
                    Ok(None) => continue,
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
            self.pending.push_back(event);
        }
        if !response.events().is_empty() {
            self.failing_since = None;
        }
        Ok(None)
    }

    fn end_with(mut self, error: StoreError) -> Option<(Result<Event>, Self)> {
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
