//! API tokens and the roles they carry.
//!
//! A token is 256 random bits, shown once when created; the server keeps only its SHA-256.
//! Each token acts for one user (its `name`) with one role, inside one tenant or, for the
//! platform admin, across all of them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::validate::{self, ValidationError};

/// What a token may do. Ordered: each role can do everything the ones below it can.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Read the tenant's objects.
    Viewer,
    /// Also create, change and delete the tenant's services.
    Member,
    /// Also manage the tenant's tokens.
    TenantAdmin,
    /// Everything, in every tenant, plus tenants and nodes.
    PlatformAdmin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Member => "member",
            Role::TenantAdmin => "tenant-admin",
            Role::PlatformAdmin => "platform-admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "member" => Ok(Role::Member),
            "tenant-admin" => Ok(Role::TenantAdmin),
            "platform-admin" => Ok(Role::PlatformAdmin),
            other => Err(format!(
                "unknown role {other:?}: expected viewer, member, tenant-admin or platform-admin"
            )),
        }
    }
}

/// A token as listed: everything but the secret.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApiToken {
    /// Public id (used to revoke it); not the secret.
    pub id: String,
    /// Who or what the token is for.
    pub name: String,
    /// The tenant the token acts in; absent for platform tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// The body of `POST /api/v1/tenants/{tenant}/tokens`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    /// Who or what the token is for (a DNS label).
    pub name: String,
    /// Defaults to `member`. Inside a tenant, at most the caller's own role; `platform-admin`
    /// only for platform tokens (which must have it).
    #[serde(default = "default_role")]
    pub role: Role,
    /// Lifetime in seconds; without it the token lasts until revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
}

fn default_role() -> Role {
    Role::Member
}

/// Longest token lifetime accepted: ten years.
pub const MAX_TOKEN_LIFETIME_SECS: u64 = 10 * 365 * 24 * 3600;

impl TokenCreate {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate::name("name", &self.name)?;
        if let Some(secs) = self.expires_in_secs
            && !(1..=MAX_TOKEN_LIFETIME_SECS).contains(&secs)
        {
            return Err(ValidationError::new(
                "expires_in_secs",
                format!("must be between 1 and {MAX_TOKEN_LIFETIME_SECS}"),
            ));
        }
        Ok(())
    }
}

/// The response to creating a token: the only time the secret is shown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    /// The secret. Send it as `Authorization: Bearer <token>`. It is not stored and cannot be
    /// shown again.
    pub token: String,
    #[serde(flatten)]
    pub info: ApiToken,
}

/// `GET /api/v1/whoami`: who the calling token is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    pub token_id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub role: Role,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_parse() {
        assert!(Role::Viewer < Role::Member && Role::Member < Role::TenantAdmin);
        assert!(Role::TenantAdmin < Role::PlatformAdmin);
        for r in [
            Role::Viewer,
            Role::Member,
            Role::TenantAdmin,
            Role::PlatformAdmin,
        ] {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{r}\""));
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn token_create_rules() {
        let t: TokenCreate = serde_json::from_str(r#"{"name":"ci"}"#).unwrap();
        assert_eq!(t.role, Role::Member);
        assert!(t.validate().is_ok());
        let t = TokenCreate {
            name: "No".into(),
            role: Role::Viewer,
            expires_in_secs: None,
        };
        assert_eq!(t.validate().unwrap_err().field, "name");
        let t = TokenCreate {
            name: "x".into(),
            role: Role::Viewer,
            expires_in_secs: Some(0),
        };
        assert_eq!(t.validate().unwrap_err().field, "expires_in_secs");
        assert!(serde_json::from_str::<TokenCreate>(r#"{"name":"x","admin":true}"#).is_err());
    }
}
