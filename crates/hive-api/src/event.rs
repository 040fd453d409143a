//! Events: a tenant-visible record of what happened to its objects and why.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::meta::{Resource, Scope};
use crate::validate::{self, ValidationError};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Generated: sorts by time.
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
    #[serde(rename = "type", default)]
    pub type_: EventType,
    /// A one-word cause: `Created`, `Scaled`, `Updated`, `Deleted`, `Unschedulable`…
    pub reason: String,
    /// The object the event is about.
    pub object: ObjectRef,
    pub message: String,
    /// Which component reported it.
    pub source: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum EventType {
    #[default]
    Normal,
    Warning,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ObjectRef {
    pub kind: String,
    pub name: String,
}

impl Resource for Event {
    const KIND: &'static str = "event";
    const PLURAL: &'static str = "events";
    const SCOPE: Scope = Scope::Tenant;
    crate::impl_object_meta!(tenant);

    crate::impl_spec_status!(none);

    fn validate(&self) -> Result<(), ValidationError> {
        self.validate_meta()?;
        validate::kernel_string("reason", &self.reason, 128)?;
        validate::kernel_string("object.kind", &self.object.kind, 64)?;
        validate::name("object.name", &self.object.name)?;
        validate::kernel_string("message", &self.message, 4096)?;
        validate::kernel_string("source", &self.source, 128)
    }
}
