//! What each tenant's repositories hold, for the per-tenant storage quota: every blob the
//! tenant links (layers, configs, manifests) counted once however many of its repositories
//! link it, at the blob's size. Content shared with other tenants counts for each of them:
//! a tenant's usage never depends on what someone else pushed or deleted.
//!
//! Kept in memory per tenant and loaded from the links on disk on first use, so a restart
//! or a crash costs one scan of that tenant's links and nothing can drift for long: bulk
//! changes (a repository deleted, garbage collected links) simply forget the tenant's
//! figures, and the next push counts again.

use std::collections::HashMap;

use crate::error::{Code, RegistryError, Result};

/// One tenant's blobs: size and how many links point at each.
#[derive(Debug, Default)]
pub struct TenantUsage {
    blobs: HashMap<String, (u64, u32)>,
    bytes: u64,
}

impl TenantUsage {
    /// Bytes of the distinct blobs the tenant links.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// True when the tenant links blob `hex` anywhere (adding one more link costs nothing).
    pub fn holds(&self, hex: &str) -> bool {
        self.blobs.contains_key(hex)
    }

    /// One more link to blob `hex` of `size` bytes.
    pub fn add(&mut self, hex: &str, size: u64) {
        let e = self.blobs.entry(hex.to_owned()).or_insert((size, 0));
        if e.1 == 0 {
            self.bytes += size;
        }
        e.1 += 1;
    }

    /// One link to blob `hex` fewer.
    pub fn remove(&mut self, hex: &str) {
        if let Some(e) = self.blobs.get_mut(hex) {
            e.1 = e.1.saturating_sub(1);
            if e.1 == 0 {
                self.bytes = self.bytes.saturating_sub(e.0);
                self.blobs.remove(hex);
            }
        }
    }

    /// Refuses adding `size` bytes of blob `hex` when that would take the tenant over
    /// `quota` (a blob it already holds adds nothing).
    pub fn admit(&self, tenant: &str, hex: &str, size: u64, quota: Option<u64>) -> Result<()> {
        let Some(quota) = quota else {
            return Ok(());
        };
        if self.holds(hex) {
            return Ok(());
        }
        self.admit_bytes(tenant, size, quota)
    }

    /// Refuses `size` more bytes over `quota`.
    pub fn admit_bytes(&self, tenant: &str, size: u64, quota: u64) -> Result<()> {
        if self.bytes.saturating_add(size) > quota {
            return Err(quota_exceeded(tenant, self.bytes, size, quota));
        }
        Ok(())
    }
}

pub fn quota_exceeded(tenant: &str, used: u64, adding: u64, quota: u64) -> RegistryError {
    RegistryError::new(
        Code::Denied,
        format!(
            "tenant {tenant} would exceed its registry quota: {used} bytes used + {adding} \
             bytes > {quota} bytes (delete images or ask for a larger quota)"
        ),
    )
}

/// An upload grew past what the tenant could still store.
pub fn no_room(tenant: &str, room: u64) -> RegistryError {
    RegistryError::new(
        Code::Denied,
        format!(
            "tenant {tenant} would exceed its registry quota: this upload may hold at most \
             {room} bytes (delete images or ask for a larger quota)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_count_once_however_many_links() {
        let mut u = TenantUsage::default();
        u.add("a", 100);
        u.add("a", 100);
        u.add("b", 10);
        assert_eq!(u.bytes(), 110);
        u.remove("a");
        assert_eq!(u.bytes(), 110, "one link to a remains");
        u.remove("a");
        assert_eq!(u.bytes(), 10);
        u.remove("a");
        u.remove("zzz");
        assert_eq!(u.bytes(), 10, "removing what is not held changes nothing");
    }

    #[test]
    fn quota_admits_held_blobs_and_refuses_overflow() {
        let mut u = TenantUsage::default();
        u.add("a", 60);
        assert!(u.admit("t", "a", 60, Some(100)).is_ok(), "already held");
        assert!(u.admit("t", "b", 40, Some(100)).is_ok(), "exactly full");
        let e = u.admit("t", "b", 41, Some(100)).unwrap_err();
        assert_eq!(e.code, Code::Denied);
        assert!(e.message.contains("60 bytes used + 41 bytes > 100"), "{e}");
        assert!(u.admit("t", "b", u64::MAX, None).is_ok(), "no quota");
        assert!(u.admit_bytes("t", u64::MAX, 100).is_err(), "no overflow");
    }
}
