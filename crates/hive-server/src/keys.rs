//! Where objects live in the store. Every tenant-owned key sits under `/t/{tenant}/`, so a
//! tenant's deletion is one prefix delete and no tenant's prefix contains another's (names
//! are DNS labels, the `/` after them ends the prefix).

use hive_api::{Resource, Scope};

/// The key of object `name` of kind `R` (tenant is ignored for cluster-scoped kinds).
pub fn object<R: Resource>(tenant: Option<&str>, name: &str) -> String {
    format!("{}{name}", collection::<R>(tenant))
}

/// The prefix under which all objects of kind `R` (in `tenant`) live.
pub fn collection<R: Resource>(tenant: Option<&str>) -> String {
    match R::SCOPE {
        Scope::Cluster => format!("/{}/", R::PLURAL),
        Scope::Tenant => format!("/t/{}/{}/", tenant.unwrap_or_default(), R::PLURAL),
    }
}

/// Everything a tenant owns.
pub fn tenant_prefix(tenant: &str) -> String {
    format!("/t/{tenant}/")
}

/// A token record, found by the SHA-256 of the secret (hex).
pub fn auth(hash_hex: &str) -> String {
    format!("/auth/{hash_hex}")
}

/// The listing entry of a token: in its tenant, or among the platform's tokens.
pub fn token_index(tenant: Option<&str>, id: &str) -> String {
    format!("{}{id}", token_index_prefix(tenant))
}

pub fn token_index_prefix(tenant: Option<&str>) -> String {
    match tenant {
        Some(t) => format!("/t/{t}/tokens/"),
        None => "/platform/tokens/".to_owned(),
    }
}

/// The claim on a VNI: one network of the whole platform holds it (value: `tenant/network`).
pub fn vni(vni: u32) -> String {
    format!("/platform/vnis/{vni}")
}

/// The claims on a network's addresses, one key per held address (value: instance uid).
pub fn ip_claims(tenant: &str, network: &str) -> String {
    format!("/t/{tenant}/ipam/{network}/")
}

pub fn ip_claim(tenant: &str, network: &str, ip: std::net::Ipv4Addr) -> String {
    format!("{}{ip}", ip_claims(tenant, network))
}

/// Changed by every create of a network in the tenant, so that two creates checking for
/// overlapping subnets at once cannot both succeed.
pub fn network_lock(tenant: &str) -> String {
    format!("/t/{tenant}/network-lock")
}

/// Set once the platform admin exists.
pub const BOOTSTRAP: &str = "/platform/bootstrap";

/// The Ed25519 key (PKCS#8) that signs node proxy tokens.
pub const PROXY_KEY: &str = "/platform/proxy-key";

#[cfg(test)]
mod tests {
    use super::*;
    use hive_api::{Node, Service, Tenant};

    #[test]
    fn layout() {
        assert_eq!(
            object::<Service>(Some("acme"), "web"),
            "/t/acme/services/web"
        );
        assert_eq!(object::<Node>(None, "n1"), "/nodes/n1");
        assert_eq!(object::<Tenant>(None, "acme"), "/tenants/acme");
        assert!(object::<Service>(Some("acme"), "x").starts_with(&tenant_prefix("acme")));
        assert!(!object::<Service>(Some("acme2"), "x").starts_with(&tenant_prefix("acme")));
        assert_eq!(token_index(Some("acme"), "ab"), "/t/acme/tokens/ab");
        assert_eq!(token_index(None, "ab"), "/platform/tokens/ab");
    }
}
