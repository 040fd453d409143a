//! Image references (`[registry/]repository[:tag][@digest]`), parsed the way docker and
//! podman read them: a first component with a `.` or `:` or equal to `localhost` is a registry
//! host; otherwise the image lives on Docker Hub (`library/` added for one-part names).
//!
//! Pure parsing, no I/O.

use std::fmt;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid image reference {reference:?}: {reason}")]
pub struct ReferenceError {
    pub reference: String,
    pub reason: &'static str,
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host (and port) as written, e.g. `127.0.0.1:5000` or `docker.io`.
    pub registry: String,
    /// Repository path inside the registry, e.g. `acme/web`.
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<hex>`.
    pub digest: Option<String>,
}

const DOCKER_HUB: &str = "docker.io";

impl Reference {
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        Self::parse_on(s, None)
    }

    /// Parses `repository[:tag][@digest]` as a repository of `registry` (host and port): the
    /// first component is never taken for a host (`hive push` names repositories of the
    /// server's own registry so).
    pub fn parse_repository(registry: &str, s: &str) -> Result<Self, ReferenceError> {
        Self::parse_on(s, Some(registry))
    }

    fn parse_on(s: &str, on: Option<&str>) -> Result<Self, ReferenceError> {
        let err = |reason| ReferenceError {
            reference: s.to_owned(),
            reason,
        };
        if s.is_empty() || s.len() > 4096 {
            return Err(err("empty or too long"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| err("only sha256 digests are supported"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                    return Err(err("digest must be sha256: and 64 lowercase hex digits"));
                }
                (r, Some(d.to_owned()))
            }
            None => (s, None),
        };
        // A tag is after the last ':' that comes after the last '/' (a port has a '/' after it).
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(rest[i + 1..].to_owned())),
            _ => (rest, None),
        };
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
                && !t.starts_with(['.', '-']);
            if !ok {
                return Err(err("invalid tag"));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            _ if let Some(on) = on => (on.to_owned(), name.to_owned()),
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), path.to_owned())
            }
            _ => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        let repository = if on.is_none() && registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.as_bytes()[0].is_ascii_alphanumeric()
        };
        if repository.is_empty() || !repository.split('/').all(component_ok) {
            return Err(err("invalid repository name"));
        }
        if registry.is_empty()
            || !registry
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        {
            return Err(err("invalid registry host"));
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_owned())
        } else {
            tag
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What to ask the registry's manifest endpoint for: the digest when pinned.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The host to connect to (Docker Hub's API is not served on `docker.io`).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        let r = Reference::parse("busybox").expect("parse");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/busybox");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.api_host(), "registry-1.docker.io");

        let r = Reference::parse("127.0.0.1:5000/acme/web:v1").expect("parse");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "acme/web");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.to_string(), "127.0.0.1:5000/acme/web:v1");

        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("localhost/x@{d}")).expect("parse");
        assert_eq!(r.tag, None);
        assert_eq!(r.manifest_ref(), d);

        let r = Reference::parse("localhost:5000/x").expect("parse");
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.manifest_ref(), "latest");
    }

    #[test]
    fn parses_repositories_of_a_known_registry() {
        let r = Reference::parse_repository("hive", "acme/web:v1").expect("parse");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("hive", "acme/web")
        );
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.api_host(), "hive");
        // A first component that looks like a host is still a repository component.
        let r = Reference::parse_repository("127.0.0.1:7080", "localhost/a/b").expect("parse");
        assert_eq!(r.repository, "localhost/a/b");
        assert_eq!(r.to_string(), "127.0.0.1:7080/localhost/a/b:latest");
        let d = format!("sha256:{}", "b".repeat(64));
        let r = Reference::parse_repository("h:1", &format!("acme/x@{d}")).expect("parse");
        assert_eq!((r.tag, r.digest.as_deref()), (None, Some(d.as_str())));
        // No library/ for one-part names: only Docker Hub has that rule.
        let r = Reference::parse_repository("h:1", "web").expect("parse");
        assert_eq!(r.repository, "web");
        for bad in ["127.0.0.1:7080/acme/x", "Acme/x", "acme/x:", "acme//x", ""] {
            assert!(
                Reference::parse_repository("h:1", bad).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn refuses_bad_references() {
        for bad in [
            "",
            "UPPER/case",
            "reg.io/../etc",
            "reg.io/a:bad tag",
            "x@sha256:short",
            "x@md5:0123",
            "reg.io/",
            "reg.io/a//b",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
