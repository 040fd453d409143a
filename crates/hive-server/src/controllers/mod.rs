//! Controllers: loops that drive desired state into observed state. Each is an API client
//! like any other (it holds a platform token and talks HTTP to an API server), so one server
//! or five, one process or many, behave alike. The shape is kube-runtime's: list and watch
//! into a cache, a de-duplicating queue of keys, one reconcile per key at a time, and
//! reconcilers that are correct when they see an object twice or miss a state in between.

pub mod nodes;
pub mod rollout;
pub mod scheduler;
pub mod services;

pub use nodes::NodeController;
pub use scheduler::Scheduler;
pub use services::ServiceController;

use chrono::Utc;
use hive_api::{Event, EventType, ObjectRef};
use hive_client::Client;

/// An Event a controller records.
#[derive(Debug)]
pub struct Note<'a> {
    pub type_: EventType,
    /// The controller (`service-controller`, `node-controller`).
    pub source: &'a str,
    pub reason: &'a str,
    pub kind: &'a str,
    pub name: &'a str,
    pub message: String,
}

/// Records an Event in `tenant` from a controller. Best effort: an event that cannot be
/// written is logged, never a reason to stop.
pub async fn record(client: &Client, tenant: &str, note: Note<'_>) {
    let millis = Utc::now().timestamp_millis().max(0) as u64;
    let ev = Event {
        name: format!("{:016x}-{:04x}", millis << 16, rand::random::<u16>()),
        type_: note.type_,
        reason: note.reason.to_owned(),
        object: ObjectRef {
            kind: note.kind.to_owned(),
            name: note.name.to_owned(),
        },
        message: note.message.chars().take(4000).collect(),
        source: note.source.to_owned(),
        ..Default::default()
    };
    if let Err(e) = client.create(Some(tenant), &ev).await {
        tracing::warn!(%tenant, reason = %note.reason, error = %e, "record event");
    }
}
