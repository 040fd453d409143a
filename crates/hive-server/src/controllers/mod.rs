//! Controllers: loops that drive desired state into observed state. Each is an API client
//! like any other (it holds a platform token and talks HTTP to an API server), so one server
//! or five, one process or many, behave alike. The shape is kube-runtime's: list and watch
//! into a cache, a de-duplicating queue of keys, one reconcile per key at a time, and
//! reconcilers that are correct when they see an object twice or miss a state in between.

pub mod events;
pub mod nodes;
pub mod scheduler;
pub mod services;

pub use nodes::NodeController;
pub use scheduler::Scheduler;
pub use services::ServiceController;
