//! Controllers: loops that drive desired state into observed state. Each is an API client
//! like any other (it holds a platform token and talks HTTP to an API server), so one server
//! or five, one process or many, behave alike. The shape is kube-runtime's: list and watch
//! into a cache, a de-duplicating queue of keys, one reconcile per key at a time, and
//! reconcilers that are correct when they see an object twice or miss a state in between.

pub mod events;
pub mod nodes;
pub mod queue;
pub mod rollout;
pub mod scheduler;
pub mod services;

pub use nodes::NodeController;
pub use scheduler::{Placer, Scheduler};
pub use services::ServiceController;

use hive_api::EventType;
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
    let ev = events::new_event(
        note.type_,
        note.source,
        note.reason,
        note.kind,
        note.name,
        note.message,
    );
    events::create(client, tenant, &ev).await;
}
