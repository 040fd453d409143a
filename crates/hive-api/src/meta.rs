//! What every resource has in common: its identity fields, its scope, and list pages.
//!
//! Objects are flat JSON: `name`, `tenant`, `uid`, `revision`, `created_at`, `labels` sit
//! beside `spec` and `status`. The identity fields other than `name` and `labels` belong to
//! the server: it fills them on create, and on update `revision` is the precondition.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use utoipa::ToSchema;

use crate::validate::{self, ValidationError};

/// Where a resource lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Platform-wide (tenants, nodes): only the platform admin writes them.
    Cluster,
    /// Inside a tenant, under `/api/v1/tenants/{tenant}/…`.
    Tenant,
}

/// A kind of object the API serves with create, get, list, update, delete and watch.
pub trait Resource:
    Serialize + DeserializeOwned + ToSchema + Clone + std::fmt::Debug + Send + Sync + 'static
{
    /// Singular name in messages and events: "service".
    const KIND: &'static str;
    /// Path segment: "services".
    const PLURAL: &'static str;
    const SCOPE: Scope;

    fn name(&self) -> &str;
    fn uid(&self) -> &str;
    fn revision(&self) -> u64;
    fn set_revision(&mut self, revision: u64);
    fn labels(&self) -> &BTreeMap<String, String>;
    /// Sets the server-owned identity fields of a new object.
    fn init_system_fields(&mut self, tenant: Option<&str>, uid: String, created_at: DateTime<Utc>);
    /// Copies the server-owned identity fields from the stored object (an update may not
    /// change them).
    fn keep_system_fields(&mut self, stored: &Self);

    /// Keeps the stored status: users write specs, controllers and agents write status.
    fn keep_status(&mut self, stored: &Self);
    /// Keeps the stored spec (for status updates).
    fn keep_spec(&mut self, stored: &Self);

    /// Checks the user-writable fields (name, labels, spec).
    fn validate(&self) -> Result<(), ValidationError>;

    /// Checks the fields shared by all resources.
    fn validate_meta(&self) -> Result<(), ValidationError> {
        validate::name("name", self.name())?;
        validate::labels("labels", self.labels())
    }
}

/// Implements the identity accessors of [`Resource`] for a struct with the standard fields
/// (`name`, `tenant`, `uid`, `revision`, `created_at`, `labels`).
/// Implements the identity accessors of [`Resource`] for a struct with the standard fields
/// (`name`, `uid`, `revision`, `created_at`, `labels`, and `tenant` for tenant-scoped ones).
#[macro_export]
macro_rules! impl_object_meta {
    (tenant) => {
        $crate::impl_object_meta!(@common);
        fn init_system_fields(
            &mut self,
            tenant: Option<&str>,
            uid: String,
            created_at: chrono::DateTime<chrono::Utc>,
        ) {
            self.tenant = tenant.unwrap_or_default().to_owned();
            self.uid = uid;
            self.created_at = Some(created_at);
            self.revision = 0;
        }
        fn keep_system_fields(&mut self, stored: &Self) {
            self.tenant = stored.tenant.clone();
            self.uid = stored.uid.clone();
            self.created_at = stored.created_at;
        }
    };
    (cluster) => {
        $crate::impl_object_meta!(@common);
        fn init_system_fields(
            &mut self,
            _tenant: Option<&str>,
            uid: String,
            created_at: chrono::DateTime<chrono::Utc>,
        ) {
            self.uid = uid;
            self.created_at = Some(created_at);
            self.revision = 0;
        }
        fn keep_system_fields(&mut self, stored: &Self) {
            self.uid = stored.uid.clone();
            self.created_at = stored.created_at;
        }
    };
    (@common) => {
        fn name(&self) -> &str {
            &self.name
        }
        fn uid(&self) -> &str {
            &self.uid
        }
        fn revision(&self) -> u64 {
            self.revision
        }
        fn set_revision(&mut self, revision: u64) {
            self.revision = revision;
        }
        fn labels(&self) -> &std::collections::BTreeMap<String, String> {
            &self.labels
        }
    };
}

/// Implements [`Resource::keep_status`] and [`Resource::keep_spec`] for a struct with `spec`
/// and `status` fields (`none` for kinds that have neither).
#[macro_export]
macro_rules! impl_spec_status {
    () => {
        fn keep_status(&mut self, stored: &Self) {
            self.status = stored.status.clone();
        }
        fn keep_spec(&mut self, stored: &Self) {
            self.spec = stored.spec.clone();
        }
    };
    (none) => {
        fn keep_status(&mut self, _stored: &Self) {}
        fn keep_spec(&mut self, _stored: &Self) {}
    };
}

/// One page of a list, the store revision it was read at (watch from there to follow it),
/// and where the next page starts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct List<T> {
    pub items: Vec<T>,
    pub revision: u64,
    /// Pass as `continue` to get the next page; absent on the last page.
    #[serde(rename = "continue", default, skip_serializing_if = "Option::is_none")]
    pub continue_: Option<String>,
}
