//! Kernel object names derived from the node's prefix, a VNI or a port key.
//!
//! Owns the naming scheme and its inverse (used by reconcile to recognise what is ours);
//! touches nothing in the kernel. Interface names must fit `IFNAMSIZ - 1` = 15 bytes:
//!
//! | object | name | example (prefix `hive`) |
//! |---|---|---|
//! | bridge of a network | `{prefix}b{vni}` | `hiveb4097` |
//! | VXLAN device of a network | `{prefix}x{vni}` | `hivex4097` |
//! | host side of a port's veth | `{prefix}p{hash}` | `hivep0c1f9a2b7e` |
//! | port's network namespace (file in `netns_dir`) | `{prefix}-{key}` | `hive-7d3c…` |
//! | nftables table (family `bridge`) | `{prefix}` | `hive` |
//! | port chain | `{host ifname}_in` | `hivep0c1f9a2b7e_in` |
//!
//! `{hash}` is the FNV-1a 64 hash of the key in lower-case hex, cut to fill the 15 bytes:
//! 10 hex digits (40 bits) with the 4-byte default prefix, 8 with a 6-byte one. The hash is
//! stable across releases (no `DefaultHasher`), so a restarted agent finds its ports.

use crate::NetError;

/// Longest prefix: 6 bytes + `p` + 8 hex digits = 15.
pub const MAX_PREFIX_LEN: usize = 6;
/// Longest VNI (24 bits) in decimal is 8 digits: 6 + 1 + 8 = 15.
pub const MAX_VNI: u32 = (1 << 24) - 1;
const IFNAME_MAX: usize = 15;
const MAX_KEY_LEN: usize = 200;

/// Names for one node; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    prefix: String,
}

pub(crate) fn validate_prefix(prefix: &str) -> Result<(), NetError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix.starts_with(|c: char| c.is_ascii_lowercase())
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(NetError::invalid(
            "prefix",
            format!("{prefix:?}: want 1..={MAX_PREFIX_LEN} of [a-z0-9], starting with a letter"),
        ))
    }
}

/// A port key becomes part of a file name: keep it to a safe alphabet.
pub(crate) fn validate_key(key: &str) -> Result<(), NetError> {
    let ok = !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && !key.starts_with('.')
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(NetError::invalid(
            "port key",
            format!("{key:?}: want 1..={MAX_KEY_LEN} of [A-Za-z0-9._-], not starting with '.'"),
        ))
    }
}

pub(crate) fn validate_vni(vni: u32) -> Result<(), NetError> {
    if (1..=MAX_VNI).contains(&vni) {
        Ok(())
    } else {
        Err(NetError::invalid(
            "vni",
            format!("{vni}: want 1..={MAX_VNI}"),
        ))
    }
}

/// FNV-1a, 64 bit: tiny, stable and good enough to spread instance uids.
fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Names {
    pub(crate) fn new(prefix: &str) -> Result<Self, NetError> {
        validate_prefix(prefix)?;
        Ok(Self {
            prefix: prefix.to_owned(),
        })
    }

    pub(crate) fn table(&self) -> &str {
        &self.prefix
    }

    pub(crate) fn bridge(&self, vni: u32) -> String {
        format!("{}b{vni}", self.prefix)
    }

    pub(crate) fn vxlan(&self, vni: u32) -> String {
        format!("{}x{vni}", self.prefix)
    }

    fn hash_len(&self) -> usize {
        IFNAME_MAX - self.prefix.len() - 1
    }

    pub(crate) fn port(&self, key: &str) -> String {
        let hex = format!("{:016x}", fnv1a64(key.as_bytes()));
        format!("{}p{}", self.prefix, &hex[..self.hash_len()])
    }

    pub(crate) fn netns(&self, key: &str) -> String {
        format!("{}-{key}", self.prefix)
    }

    /// The key of a netns file name of ours.
    pub(crate) fn parse_netns<'a>(&self, file: &'a str) -> Option<&'a str> {
        let key = file.strip_prefix(&self.prefix)?.strip_prefix('-')?;
        validate_key(key).ok().map(|()| key)
    }

    /// Whether `ifname` is the host side of one of our ports.
    pub(crate) fn is_port(&self, ifname: &str) -> bool {
        ifname
            .strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix('p'))
            .is_some_and(|h| {
                h.len() == self.hash_len()
                    && h.chars()
                        .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
            })
    }

    fn parse_vni(&self, ifname: &str, kind: char) -> Option<u32> {
        let digits = ifname.strip_prefix(&self.prefix)?.strip_prefix(kind)?;
        if digits.is_empty()
            || !digits.chars().all(|c| c.is_ascii_digit())
            || digits.starts_with('0')
        {
            return None;
        }
        digits.parse().ok().filter(|v| validate_vni(*v).is_ok())
    }

    pub(crate) fn parse_bridge(&self, ifname: &str) -> Option<u32> {
        self.parse_vni(ifname, 'b')
    }

    pub(crate) fn parse_vxlan(&self, ifname: &str) -> Option<u32> {
        self.parse_vni(ifname, 'x')
    }

    pub(crate) fn chain_in(port: &str) -> String {
        format!("{port}_in")
    }

    /// The port (host ifname) a chain of ours belongs to.
    pub(crate) fn parse_port_chain<'a>(&self, chain: &'a str) -> Option<&'a str> {
        let port = chain.strip_suffix("_in")?;
        self.is_port(port).then_some(port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz_for_every_prefix_length() {
        for len in 1..=MAX_PREFIX_LEN {
            let prefix: String = "abcdef"[..len].to_owned();
            let n = Names::new(&prefix).unwrap();
            assert_eq!(n.port("some-instance-uid").len(), 15);
            assert!(n.bridge(MAX_VNI).len() <= 15);
            assert!(n.vxlan(MAX_VNI).len() <= 15);
            assert!(n.is_port(&n.port("x")));
        }
    }

    #[test]
    fn prefix_and_key_validation() {
        assert!(Names::new("hive").is_ok());
        assert!(Names::new("").is_err());
        assert!(Names::new("hive123").is_err());
        assert!(Names::new("Hive").is_err());
        assert!(Names::new("1ive").is_err());
        assert!(validate_key("3f2c1a-uid_1.x").is_ok());
        assert!(validate_key("../etc").is_err());
        assert!(validate_key("a/b").is_err());
        assert!(validate_key("").is_err());
        assert!(validate_vni(0).is_err());
        assert!(validate_vni(MAX_VNI + 1).is_err());
    }

    #[test]
    fn port_names_are_stable_and_distinct() {
        let n = Names::new("hive").unwrap();
        // Pinned: a restarted agent must derive the same names.
        assert_eq!(
            n.port("a"),
            format!("hivep{}", &format!("{:016x}", fnv1a64(b"a"))[..10])
        );
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(n.port("a"), n.port("b"));
    }

    #[test]
    fn parsing_recognises_only_our_names() {
        let n = Names::new("hive").unwrap();
        assert_eq!(n.parse_bridge("hiveb4097"), Some(4097));
        assert_eq!(n.parse_vxlan("hivex4097"), Some(4097));
        assert_eq!(n.parse_bridge("hivex4097"), None);
        assert_eq!(n.parse_bridge("hiveb04097"), None);
        assert_eq!(n.parse_bridge("hive2b4097"), None);
        assert_eq!(n.parse_bridge("hiveb"), None);
        assert_eq!(n.parse_bridge("hiveb99999999"), None);
        let p = n.port("uid-1");
        assert!(n.is_port(&p));
        assert!(!n.is_port("hivepp12345678"));
        assert!(!Names::new("hiv").unwrap().is_port(&p));
        assert_eq!(n.parse_port_chain(&Names::chain_in(&p)), Some(p.as_str()));
        assert_eq!(n.parse_port_chain("ports_in"), None);
        assert_eq!(n.parse_netns("hive-uid-1"), Some("uid-1"));
        assert_eq!(n.parse_netns("hive2-uid-1"), None);
        assert_eq!(n.parse_netns("other"), None);
    }
}
