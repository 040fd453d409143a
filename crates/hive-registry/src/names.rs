//! The spec's grammars for repository names, tags and digests, and the parsing of a raw
//! `/v2/…` path into a route. Works on the undecoded path, so `%2f` or `..` never become
//! path separators: they simply fail the grammar.

use crate::error::{Code, RegistryError, Result};

/// Longest repository name accepted (the spec bounds name + host at 255).
pub const MAX_NAME: usize = 255;

/// A valid repository name `<tenant>/<name>[/<more>…]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repo(String);

impl Repo {
    pub fn parse(name: &str) -> Result<Self> {
        let invalid = |why: &str| {
            RegistryError::new(
                Code::NameInvalid,
                format!("invalid repository name {name:?}: {why}"),
            )
        };
        if name.len() > MAX_NAME {
            return Err(invalid("longer than 255 characters"));
        }
        let parts: Vec<&str> = name.split('/').collect();
        if parts.len() < 2 {
            return Err(invalid("must be <tenant>/<name>"));
        }
        if !parts.iter().all(|p| component_ok(p)) {
            return Err(invalid(
                "components must match [a-z0-9]+((.|_|__|-+)[a-z0-9]+)*",
            ));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The tenant owning the repository: its first component.
    pub fn tenant(&self) -> &str {
        self.0.split('/').next().unwrap_or_default()
    }
}

impl std::fmt::Display for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn component_ok(p: &str) -> bool {
    let b = p.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // a separator run: ".", "_", "__" or "-+", followed by an alphanumeric
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

/// `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`
pub fn tag_ok(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-')
}

/// A `sha256:` digest (the only algorithm this registry stores).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Self> {
        let hex = s.strip_prefix("sha256:").ok_or_else(|| {
            RegistryError::new(
                Code::DigestInvalid,
                format!("digest {s:?} is not sha256:<64 hex>"),
            )
        })?;
        if hex.len() != 64 || !hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(RegistryError::new(
                Code::DigestInvalid,
                format!("digest {s:?} is not sha256:<64 lower-case hex>"),
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn from_hex(hex: &str) -> Self {
        Self(format!("sha256:{hex}"))
    }

    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A manifest reference: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self> {
        if s.contains(':') {
            return Ok(Self::Digest(Digest::parse(s)?));
        }
        if tag_ok(s) {
            Ok(Self::Tag(s.to_owned()))
        } else {
            Err(RegistryError::new(
                Code::ManifestInvalid,
                format!("invalid tag {s:?}: must match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}"),
            ))
        }
    }
}

/// What a `/v2/<name>/…` path addresses.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    Blob(Digest),
    /// `None`: the upload collection (`POST …/blobs/uploads/`).
    Upload(Option<String>),
    Manifest(String),
    Tags,
    Referrers(Digest),
}

/// Splits the path after `/v2/` into the repository and what it addresses.
pub fn parse_path(rest: &str) -> Result<(Repo, Target)> {
    let unknown = || {
        RegistryError::new(
            Code::NameInvalid,
            format!("no registry route for /v2/{rest}"),
        )
    };
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok((Repo::parse(name)?, Target::Tags));
    }
    if let Some(name) = rest
        .strip_suffix("/blobs/uploads/")
        .or_else(|| rest.strip_suffix("/blobs/uploads"))
    {
        return Ok((Repo::parse(name)?, Target::Upload(None)));
    }
    if let Some(i) = rest.rfind("/blobs/uploads/") {
        let id = &rest[i + "/blobs/uploads/".len()..];
        if !id.is_empty()
            && id.len() <= 64
            && id.bytes().all(|c| c.is_ascii_hexdigit() || c == b'-')
        {
            return Ok((
                Repo::parse(&rest[..i])?,
                Target::Upload(Some(id.to_owned())),
            ));
        }
        return Err(RegistryError::new(
            Code::BlobUploadUnknown,
            format!("upload session {id:?} is unknown"),
        ));
    }
    for (marker, kind) in [("/blobs/", 0), ("/manifests/", 1), ("/referrers/", 2)] {
        if let Some(i) = rest.rfind(marker) {
            let name = &rest[..i];
            let tail = &rest[i + marker.len()..];
            let repo = Repo::parse(name)?;
            return Ok((
                repo,
                match kind {
                    0 => Target::Blob(Digest::parse(tail)?),
                    1 => Target::Manifest(tail.to_owned()),
                    _ => Target::Referrers(Digest::parse(tail)?),
                },
            ));
        }
    }
    Err(unknown())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_grammar() {
        for ok in [
            "a/b",
            "acme/web",
            "acme/team/app-1",
            "a0/b.c",
            "a/b__c",
            "a/b---c",
        ] {
            assert!(Repo::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "a", "A/b", "a/../b", "a/./b", "a//b", "a/b/", "/a/b", "a/b%2fc", "a/-b", "a/b-",
            "a/b___c", "a/b..c", "a/b_.c", "a/b c",
        ] {
            let e = Repo::parse(bad).unwrap_err();
            assert_eq!(e.code, Code::NameInvalid, "{bad}");
        }
        assert!(Repo::parse(&format!("a/{}", "b".repeat(300))).is_err());
        assert_eq!(Repo::parse("acme/x/y").unwrap().tenant(), "acme");
    }

    #[test]
    fn tags_and_digests() {
        assert!(tag_ok("latest") && tag_ok("_x") && tag_ok("v1.2-rc_3"));
        assert!(!tag_ok("") && !tag_ok(".x") && !tag_ok("-x") && !tag_ok(&"a".repeat(129)));
        assert!(!tag_ok("a/b") && !tag_ok("a%2f"));
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(Digest::parse(&d).unwrap().hex(), "a".repeat(64));
        for bad in [
            "sha256:abc",
            "sha512:00",
            "md5:x",
            &format!("sha256:{}", "A".repeat(64)),
        ] {
            assert_eq!(Digest::parse(bad).unwrap_err().code, Code::DigestInvalid);
        }
    }

    #[test]
    fn paths() {
        let d = format!("sha256:{}", "0".repeat(64));
        assert_eq!(
            parse_path(&format!("a/b/c/blobs/{d}")).unwrap(),
            (
                Repo::parse("a/b/c").unwrap(),
                Target::Blob(Digest::parse(&d).unwrap())
            )
        );
        assert_eq!(
            parse_path("a/b/blobs/uploads/").unwrap().1,
            Target::Upload(None)
        );
        assert_eq!(
            parse_path("a/b/blobs/uploads/abc-1").unwrap().1,
            Target::Upload(Some("abc-1".into()))
        );
        assert_eq!(parse_path("a/b/tags/list").unwrap().1, Target::Tags);
        assert_eq!(
            parse_path("a/b/manifests/latest").unwrap().1,
            Target::Manifest("latest".into())
        );
        assert!(parse_path("a/b/blobs/uploads/../../x").is_err());
        assert!(parse_path("a/%2e%2e/manifests/x").is_err());
        assert!(parse_path("a/b/nothing").is_err());
    }
}
