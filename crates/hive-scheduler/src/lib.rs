//! Where instances go, and in which order tenants are served — the scheduler's logic without
//! any I/O, so the control loop, the tests and the benchmark run the same code.
//!
//! - [`Cluster`] holds what the scheduler knows of the nodes (capacity, what is placed, which
//!   tenant a node is bound to) and places one request at a time: filters (ready, schedulable,
//!   tenant-exclusive, label selector, resources fit), then scores (least allocated, balanced,
//!   spread of a service's replicas, preference for the tenant's own nodes).
//! - Unplaceable requests get an [`Unschedulable`] that counts every node's reason ("0/40
//!   nodes: 25 bound to another tenant, 15 insufficient memory").
//! - [`FairQueue`] keeps one queue per tenant and serves tenants by weighted round robin
//!   (deficit round robin with unit costs), highest priority first within a tenant, so one
//!   tenant's burst cannot delay another's single request.
//! - [`PoolReturn`] times how long each node the scheduler bound from the pool has been
//!   empty (no instance placed, no container its agent still holds), so the loop returns
//!   it to the pool after a grace.

mod cluster;
mod pool;
mod queue;

pub use cluster::{Cluster, NodeInfo, Placement, Reason, Request, Resources, Unschedulable};
pub use pool::{Occupancy, PoolReturn};
pub use queue::FairQueue;
