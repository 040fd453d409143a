//! Hive's node agent: turns a host into a node that runs the instances placed on it.
//!
//! - [`image`]: pulls OCI images, unpacks each layer once into a content-addressed store, and
//!   composes instance root filesystems with overlayfs.
//! - [`runtime`]: writes OCI bundles and drives an OCI runtime through a per-container
//!   supervisor that outlives the agent.
//! - [`node`]: registers this host as a Node and keeps its lease fresh.
//! - [`sync`]: runs the instances placed on this node and reports their status.
//! - [`resume`]: the instance cache saved on disk, so a restarted agent catches up from its
//!   last revision instead of listing everything.
//! - [`probe`]: readiness and liveness checks of running containers, and their cgroup usage.
//! - [`network`]: gives each instance its port on its tenant network (through `hive-net`)
//!   and keeps every network's remote endpoints in step with the API.
//! - [`discovery`]: service VIPs balanced inside each instance's namespace, and its
//!   resolver of the tenant's names.
//! - [`datadir`]: the data dir's lock (held while the agent runs) and its node record.
//! - [`down`]: removes what a node made once its agent is gone (`hive down`).
//! - [`api`]: the agent's HTTP API for the server (container logs, [`exec`] sessions),
//!   checked with node proxy tokens.
//!
//! The agent talks to the control plane only through the API (`hive-client`), never to the
//! store.

pub mod api;
pub mod datadir;
pub mod discovery;
pub mod down;
pub mod exec;
pub mod image;
pub mod known;
pub mod network;
pub mod node;
pub mod probe;
pub mod resume;
pub mod runtime;
pub mod sync;
