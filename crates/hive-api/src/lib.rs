//! Hive's API types: the resources, their validation, the error body and its stable codes,
//! and their OpenAPI schemas.
//!
//! This crate does no I/O, so the server, the CLI, the agent and the tests share one
//! definition of every object. Request bodies reject unknown fields; every object validates
//! with messages that name the offending field.

pub mod error;
pub mod event;
pub mod image;
pub mod instance;
pub mod meta;
pub mod network;
pub mod node;
pub mod probe;
pub mod proxy;
pub mod rollout;
pub mod secgroup;
pub mod service;
pub mod tenant;
pub mod token;
pub mod validate;
pub mod watch;

pub use error::{ApiErrorBody, ErrorCode};
pub use event::{Event, EventType, ObjectRef};
pub use image::{ImageList, ImageRepository, ImageTag, ImageUpdate, RegistryGcReport};
pub use instance::{
    Instance, InstancePhase, InstanceSpec, InstanceStatus, REFUSED_BY_BOUND_NODE, ResourceUsage,
};
pub use meta::{List, Resource, Scope};
pub use network::{InstanceNetwork, Ipv4Cidr, Network, NetworkSpec, NetworkStatus};
pub use node::{
    MAX_LISTENING_PORTS, Node, NodeCapacity, NodePort, NodeSpec, NodeStatus, POOL_BOUND_LABEL,
};
pub use probe::Probe;
pub use proxy::{ProxyClaims, ProxyKey, ProxyOp, ProxySigner};
pub use rollout::{
    Amount, CanaryUpdate, RollingUpdate, RolloutAction, RolloutPhase, RolloutStatus, Strategy,
    TemplateRevision,
};
pub use secgroup::{RuleProtocol, SecurityGroup, SecurityGroupSpec, SecurityRule};
pub use service::{
    Bandwidth, ContainerSpec, EnvVar, MAX_PRIORITY, PortSpec, Protocol, PullPolicy,
    ResourceAmounts, Resources, RestartPolicy, Service, ServiceSpec, ServiceStatus,
};
pub use tenant::{
    MAX_SCHEDULING_WEIGHT, SCHEDULING_WEIGHT_LABEL, Tenant, TenantQuota, scheduling_weight,
};
pub use token::{ApiToken, CreatedToken, Role, TokenCreate, WhoAmI};
pub use validate::ValidationError;
pub use watch::{WatchEvent, WatchEventType};

/// The API's path prefix.
pub const API_PREFIX: &str = "/api/v1";
