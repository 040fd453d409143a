//! Instances: one running copy of a service's container, placed on a node (the Pod
//! analogue). Controllers create them from services; agents write their status.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::meta::{Resource, Scope};
use crate::network::InstanceNetwork;
use crate::service::ContainerSpec;
use crate::validate::{self, ValidationError};

/// `status.reason` of an instance its node will not start because the node is bound to
/// another tenant (the node's binding changed after the instance's): the service
/// controller replaces it.
pub const REFUSED_BY_BOUND_NODE: &str = "NodeBoundToAnotherTenant";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    pub name: String,
    #[serde(default)]
    #[schema(read_only)]
    pub tenant: String,
    #[serde(default)]
    #[schema(read_only)]
    pub uid: String,
    #[serde(default)]
    pub revision: u64,
    #[serde(default)]
    #[schema(read_only)]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub spec: InstanceSpec,
    #[serde(default)]
    pub status: InstanceStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    /// The service this instance belongs to.
    pub service: String,
    /// The node it is placed on; absent while pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub template: ContainerSpec,
    /// The instance's place on its network: set by the server when it binds the instance
    /// to a node (ignored in what clients write).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<InstanceNetwork>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum InstancePhase {
    /// Not yet running: unscheduled, pulling, starting.
    #[default]
    Pending,
    Running,
    /// Exited with code 0 and will not be restarted.
    Succeeded,
    /// Exited non-zero (or could not start) and will not be restarted.
    Failed,
    /// The node stopped reporting.
    Unknown,
}

/// Written by the agent that runs the instance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceStatus {
    #[serde(default)]
    pub phase: InstancePhase,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub container_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// A one-word cause (`ImagePullFailed`, `OOMKilled`, `Unschedulable`…).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default)]
    pub ready: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ip: String,
    /// What the container uses, from its cgroups; refreshed by its node every 30 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<ResourceUsage>,
}

/// A container's resource use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceUsage {
    /// CPU time used since the container started, in nanoseconds.
    pub cpu_nanos: u64,
    /// Memory in use, without the page cache it could drop (the working set).
    pub memory_bytes: u64,
    /// Processes and threads.
    pub pids: u64,
}

impl Resource for Instance {
    const KIND: &'static str = "instance";
    const PLURAL: &'static str = "instances";
    const SCOPE: Scope = Scope::Tenant;
    crate::impl_object_meta!(tenant);

    crate::impl_spec_status!();

    fn validate(&self) -> Result<(), ValidationError> {
        self.validate_meta()?;
        validate::name("spec.service", &self.spec.service)?;
        if let Some(node) = &self.spec.node {
            validate::name("spec.node", node)?;
        }
        self.spec.template.validate("spec.template")?;
        for (f, v) in [
            ("status.container_id", &self.status.container_id),
            ("status.reason", &self.status.reason),
            ("status.ip", &self.status.ip),
        ] {
            validate::kernel_string(f, v, 256)?;
        }
        validate::kernel_string("status.message", &self.status.message, 4096)
    }
}
