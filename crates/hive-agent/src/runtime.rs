//! Container runtime: OCI bundles, the OCI runtime binary, per-container supervisors.
//!
//! [`spec`] turns an image's config and a service's container template into the OCI runtime
//! spec; [`Containers`] writes bundles and runs each container under its own supervisor
//! ([`shim`]), which outlives the agent, holds the container's output ([`logs`]) and records
//! its exit; [`oci`] drives runc or crun.

pub mod cgroups;
pub mod logs;
pub mod oci;
pub mod shim;
pub mod spec;

mod containers;

#[cfg(test)]
pub(crate) use containers::tests::{record_started, unrun};
pub use containers::{
    ContainerError, ContainerState, Containers, ShimCommand, runtime_of_container,
};
pub(crate) use containers::{alive, ended, is_supervisor_of, supervisor_of, watched_pid};
pub use oci::{OciRuntime, RuntimeKind};
