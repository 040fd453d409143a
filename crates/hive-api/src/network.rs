//! Networks: a tenant's private layer-2 segments. Every tenant has a `default` network; it
//! may create more. Subnets may overlap between tenants (each network is its own VXLAN
//! segment with its own VNI), never within one tenant. The server allocates the VNI and each
//! instance's address (IPAM); agents build the data plane from what the instances carry.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::meta::{Resource, Scope};
use crate::validate::ValidationError;

/// Name of the network every tenant has and instances join unless told otherwise.
pub const DEFAULT_NETWORK: &str = "default";
/// Subnet of a tenant's default network.
pub const DEFAULT_SUBNET: &str = "10.88.0.0/16";
/// Shortest prefix a network may have: 2^20 addresses is plenty, and keeps the allocator's
/// bitmap at 128 KiB.
pub const MIN_PREFIX_LEN: u8 = 12;
/// Longest prefix: a /29 leaves 5 instance addresses (network, gateway, broadcast taken).
pub const MAX_PREFIX_LEN: u8 = 29;
/// Most networks one tenant may have.
pub const MAX_NETWORKS_PER_TENANT: usize = 16;
/// VNIs the server allocates from (24-bit VXLAN network identifiers; small ones are left to
/// whatever else might share the underlay).
pub const VNI_MIN: u32 = 4096;
pub const VNI_MAX: u32 = (1 << 24) - 1;

/// An IPv4 subnet in CIDR notation, with its host bits zero (`10.88.0.0/16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix_len: u8,
}

impl Ipv4Cidr {
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Result<Self, String> {
        if prefix_len > 32 {
            return Err(format!("prefix length {prefix_len} is more than 32"));
        }
        let c = Self { addr, prefix_len };
        if c.network() != addr {
            return Err(format!(
                "{addr}/{prefix_len} has host bits set (the network is {}/{prefix_len})",
                c.network()
            ));
        }
        Ok(c)
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0)
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }

    /// Number of addresses, network and broadcast included.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix_len))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }

    /// The address at `offset` from the network address.
    pub fn nth(&self, offset: u32) -> Option<Ipv4Addr> {
        (u64::from(offset) < self.size()).then(|| Ipv4Addr::from(u32::from(self.addr) + offset))
    }

    /// `ip`'s offset from the network address, if inside.
    pub fn offset(&self, ip: Ipv4Addr) -> Option<u32> {
        self.contains(ip)
            .then(|| u32::from(ip) - u32::from(self.addr))
    }

    /// The first host address: the default gateway.
    pub fn first_host(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) + 1)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not in CIDR notation (a.b.c.d/len)"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        // Only plain decimal: `u8::from_str` would take "+16".
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{p:?} is not a prefix length"));
        }
        let prefix_len: u8 = p
            .parse()
            .map_err(|_| format!("{p:?} is not a prefix length"))?;
        Self::new(addr, prefix_len)
    }
}

/// A MAC address derived from an instance's IP: locally administered, unicast, `02:48:` then
/// the four address bytes. Unique within a network because addresses are.
pub fn mac_for(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("02:48:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Network {
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
    pub spec: NetworkSpec,
    #[serde(default)]
    #[schema(read_only)]
    pub status: NetworkStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// IPv4 subnet, `a.b.c.d/len` with `len` from 12 to 29, host bits zero. Must not overlap
    /// another network of the same tenant; may overlap other tenants' networks.
    pub subnet: String,
    /// The gateway address instances route through; absent: the subnet's first address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

/// Set by the server when the network is created.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkStatus {
    /// The VXLAN network identifier, unique among all networks of the platform.
    #[serde(default)]
    pub vni: u32,
    /// The gateway in force.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway: String,
    /// Being deleted: no instance is placed on it any more.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
}

impl NetworkSpec {
    /// The subnet and the gateway in force, checked.
    pub fn parse(&self, field: &str) -> Result<(Ipv4Cidr, Ipv4Addr), ValidationError> {
        let subnet: Ipv4Cidr = self
            .subnet
            .parse()
            .map_err(|m: String| ValidationError::new(format!("{field}.subnet"), m))?;
        if !(MIN_PREFIX_LEN..=MAX_PREFIX_LEN).contains(&subnet.prefix_len()) {
            return Err(ValidationError::new(
                format!("{field}.subnet"),
                format!(
                    "{subnet}: the prefix length must be from {MIN_PREFIX_LEN} to \
                     {MAX_PREFIX_LEN} (a /{} is too {})",
                    subnet.prefix_len(),
                    if subnet.prefix_len() > MAX_PREFIX_LEN {
                        "small"
                    } else {
                        "large"
                    }
                ),
            ));
        }
        let gateway = match &self.gateway {
            None => subnet.first_host(),
            Some(g) => {
                let f = format!("{field}.gateway");
                let ip: Ipv4Addr = g.parse().map_err(|_| {
                    ValidationError::new(&f, format!("{g:?} is not an IPv4 address"))
                })?;
                if !subnet.contains(ip) || ip == subnet.network() || ip == subnet.broadcast() {
                    return Err(ValidationError::new(
                        f,
                        format!("{ip} is not a host address of {subnet}"),
                    ));
                }
                ip
            }
        };
        Ok((subnet, gateway))
    }
}

impl Resource for Network {
    const KIND: &'static str = "network";
    const PLURAL: &'static str = "networks";
    const SCOPE: Scope = Scope::Tenant;
    crate::impl_object_meta!(tenant);

    crate::impl_spec_status!();

    fn validate(&self) -> Result<(), ValidationError> {
        self.validate_meta()?;
        self.spec.parse("spec").map(|_| ())
    }
}

/// Where an instance sits on its network: set by the server when the instance is placed
/// (the address is allocated then and held until the instance is deleted).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceNetwork {
    /// The network's name in the tenant.
    pub name: String,
    pub vni: u32,
    pub ip: String,
    pub prefix_len: u8,
    pub gateway: String,
    pub mac: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(subnet: &str, gateway: Option<&str>) -> NetworkSpec {
        NetworkSpec {
            subnet: subnet.into(),
            gateway: gateway.map(Into::into),
        }
    }

    #[test]
    fn cidr_parses_and_refuses() {
        let c: Ipv4Cidr = "10.88.0.0/16".parse().unwrap();
        assert_eq!(c.size(), 65536);
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 88, 255, 255));
        assert!(c.contains(Ipv4Addr::new(10, 88, 3, 4)));
        assert!(!c.contains(Ipv4Addr::new(10, 89, 0, 0)));
        assert_eq!(c.offset(Ipv4Addr::new(10, 88, 1, 0)), Some(256));
        assert_eq!(c.nth(256), Some(Ipv4Addr::new(10, 88, 1, 0)));
        assert_eq!(c.nth(65536), None);
        for bad in [
            "10.88.0.0",
            "10.88.0.1/16",
            "10.88.0.0/33",
            "10.88.0.0/+6",
            "10.88.0.0/",
            "300.1.1.1/8",
            "10.88.0.0/016",
            "::1/64",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad} parsed");
        }
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
    }

    #[test]
    fn overlap() {
        let a: Ipv4Cidr = "10.0.0.0/16".parse().unwrap();
        let b: Ipv4Cidr = "10.0.5.0/24".parse().unwrap();
        let c: Ipv4Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
    }

    #[test]
    fn spec_checks_size_and_gateway() {
        let (s, g) = spec("10.1.0.0/24", None).parse("spec").unwrap();
        assert_eq!((s.prefix_len(), g), (24, Ipv4Addr::new(10, 1, 0, 1)));
        let e = spec("10.1.0.0/30", None).parse("spec").unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        let e = spec("10.0.0.0/8", None).parse("spec").unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
        let e = spec("10.1.0.0/24", Some("10.1.1.1"))
            .parse("spec")
            .unwrap_err();
        assert_eq!(e.field, "spec.gateway");
        let e = spec("10.1.0.0/24", Some("10.1.0.255"))
            .parse("spec")
            .unwrap_err();
        assert_eq!(e.field, "spec.gateway");
        let (_, g) = spec("10.1.0.0/24", Some("10.1.0.254"))
            .parse("spec")
            .unwrap();
        assert_eq!(g, Ipv4Addr::new(10, 1, 0, 254));
    }

    #[test]
    fn macs_are_local_unicast() {
        let m = mac_for(Ipv4Addr::new(10, 88, 0, 5));
        assert_eq!(m, "02:48:0a:58:00:05");
    }
}
