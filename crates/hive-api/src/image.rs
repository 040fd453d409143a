//! The tenant's image registry as the API shows it: repositories with their tags, sizes and
//! visibility, the tenant's storage use against its quota, and what a garbage collection did.
//! Images themselves move through the registry's own API under `/v2/`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A tag and the manifest it points to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageTag {
    pub tag: String,
    /// `sha256:…` of the manifest.
    pub digest: String,
}

/// One repository of the tenant (`<tenant>/<name>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageRepository {
    /// The full repository name, `<tenant>/<name>`.
    pub name: String,
    /// Anyone may pull it, without credentials.
    pub public: bool,
    /// Sorted by tag.
    pub tags: Vec<ImageTag>,
    /// Manifests stored (tagged or not).
    pub manifests: u64,
    /// Bytes of the distinct blobs it links (layers, configs, manifests).
    pub size_bytes: u64,
}

/// The tenant's repositories and what they use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageList {
    pub items: Vec<ImageRepository>,
    /// Bytes of the distinct blobs of all the tenant's repositories: what the quota counts.
    pub usage_bytes: u64,
    /// The tenant's registry quota (`Tenant.quota.registry_bytes`); absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_bytes: Option<u64>,
}

/// A change to a repository.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageUpdate {
    /// Make the repository public (anyone may pull) or private (the tenant only).
    pub public: bool,
}

/// What one garbage collection of the registry did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RegistryGcReport {
    /// Layer links removed: no manifest of their repository used them and they were older
    /// than the grace period.
    pub unlinked: u64,
    /// Blobs deleted.
    pub deleted: u64,
    pub freed_bytes: u64,
    /// Blobs kept.
    pub kept: u64,
}
