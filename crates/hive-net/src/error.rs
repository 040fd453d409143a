//! The crate's error type. Messages are lower case and name the object involved.

use std::fmt;

/// Everything that can go wrong in the data plane.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A caller-supplied value is unusable (bad prefix, key, VNI, address…).
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    /// `attach` or `set_remote_endpoints` named a VNI whose network is not set up here.
    #[error("network vni {vni} is not set up on this node (bridge {bridge} missing)")]
    NoNetwork { vni: u32, bridge: String },
    /// A netlink request failed.
    #[error("{op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// A system call or file operation failed.
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    /// The `nft` binary refused a batch or could not be run.
    #[error("nft {op}: {detail}")]
    Nft { op: String, detail: String },
    #[error("tc {op}: {detail}")]
    Tc { op: String, detail: String },
    /// Best-effort operations (detach, reconcile, teardown) report every failure.
    #[error("{}", Multi(.0))]
    Multiple(Vec<NetError>),
}

struct Multi<'a>(&'a [NetError]);

impl fmt::Display for Multi<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failures", self.0.len())?;
        for (i, e) in self.0.iter().enumerate() {
            write!(f, "{} {e}", if i == 0 { ":" } else { ";" })?;
        }
        Ok(())
    }
}

impl NetError {
    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            what,
            reason: reason.into(),
        }
    }

    pub(crate) fn io(op: impl Into<String>, source: impl Into<std::io::Error>) -> Self {
        Self::Io {
            op: op.into(),
            source: source.into(),
        }
    }

    pub(crate) fn netlink(op: impl Into<String>, source: rtnetlink::Error) -> Self {
        Self::Netlink {
            op: op.into(),
            source,
        }
    }

    /// The errno of a failed netlink or I/O operation, if that is what this is.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Netlink { source, .. } => netlink_errno(source),
            Self::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// Collapses a list of failures: none is `Ok`, one is itself, more are `Multiple`.
    pub(crate) fn collect(mut errors: Vec<NetError>) -> Result<(), NetError> {
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(Self::Multiple(errors)),
        }
    }
}

/// The positive errno carried by a netlink error reply.
pub(crate) fn netlink_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiple_lists_every_failure() {
        let e = NetError::collect(vec![
            NetError::invalid("a", "x"),
            NetError::invalid("b", "y"),
        ])
        .unwrap_err();
        assert_eq!(e.to_string(), "2 failures: invalid a: x; invalid b: y");
        assert!(NetError::collect(vec![]).is_ok());
        assert!(matches!(
            NetError::collect(vec![NetError::invalid("a", "x")]),
            Err(NetError::Invalid { .. })
        ));
    }
}
