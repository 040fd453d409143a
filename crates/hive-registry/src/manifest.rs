//! Manifest parsing and validation: OCI image manifests and indexes, Docker schema 2
//! manifests and manifest lists. Only checks shape and references; storing is `storage`'s.

use serde::Deserialize;

use crate::error::{Code, RegistryError, Result};
use crate::names::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Largest manifest accepted (as distribution and the spec's recommendation).
pub const MAX_MANIFEST: usize = 4 << 20;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: Option<String>,
    digest: String,
    size: i64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
    manifests: Option<Vec<RawDescriptor>>,
    subject: Option<RawDescriptor>,
}

/// What a valid manifest refers to.
#[derive(Debug)]
pub struct Parsed {
    pub media_type: String,
    /// Blobs (config and layers) that must exist in the repository.
    pub blobs: Vec<Digest>,
    /// Manifests (of an index) that must exist in the repository.
    pub manifests: Vec<Digest>,
    pub subject: Option<Digest>,
    /// `artifactType`, or the config's media type for an image manifest.
    pub artifact_type: Option<String>,
}

pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_LIST
}

/// Validates `body` uploaded with `content_type` for `what` (repo:reference, for messages).
pub fn parse(body: &[u8], content_type: Option<&str>, what: &str) -> Result<Parsed> {
    let invalid =
        |why: String| RegistryError::new(Code::ManifestInvalid, format!("manifest {what}: {why}"));
    let raw: Raw =
        serde_json::from_slice(body).map_err(|e| invalid(format!("malformed json: {e}")))?;
    let media_type = match (raw.media_type.as_deref(), content_type) {
        (Some(m), Some(c)) if m != c => {
            return Err(invalid(format!(
                "mediaType {m} differs from Content-Type {c}"
            )));
        }
        (Some(m), _) => m.to_owned(),
        (None, Some(c)) => c.to_owned(),
        (None, None) => return Err(invalid("no mediaType and no Content-Type".into())),
    };
    if ![OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].contains(&media_type.as_str()) {
        return Err(invalid(format!("unsupported media type {media_type}")));
    }
    if raw.schema_version != Some(2) {
        return Err(invalid("schemaVersion must be 2".into()));
    }
    let descriptor = |d: &RawDescriptor, field: &str| -> Result<Digest> {
        if d.size < 0 {
            return Err(invalid(format!("{field}: negative size")));
        }
        if d.media_type.as_deref().is_none_or(str::is_empty) {
            return Err(invalid(format!("{field}: missing mediaType")));
        }
        Digest::parse(&d.digest).map_err(|e| invalid(format!("{field}: {}", e.message)))
    };
    let mut parsed = Parsed {
        media_type: media_type.clone(),
        blobs: Vec::new(),
        manifests: Vec::new(),
        subject: None,
        artifact_type: raw.artifact_type.clone(),
    };
    if let Some(s) = &raw.subject {
        parsed.subject = Some(descriptor(s, "subject")?);
    }
    if is_index(&media_type) {
        if raw.config.is_some() || raw.layers.is_some() {
            return Err(invalid("an index has no config or layers".into()));
        }
        let ms = raw
            .manifests
            .as_ref()
            .ok_or_else(|| invalid("index without manifests".into()))?;
        for (i, m) in ms.iter().enumerate() {
            parsed
                .manifests
                .push(descriptor(m, &format!("manifests[{i}]"))?);
        }
    } else {
        if raw.manifests.is_some() {
            return Err(invalid("an image manifest has no manifests".into()));
        }
        let config = raw
            .config
            .as_ref()
            .ok_or_else(|| invalid("missing config".into()))?;
        parsed.blobs.push(descriptor(config, "config")?);
        if parsed.artifact_type.is_none() {
            parsed.artifact_type = config.media_type.clone();
        }
        let layers = raw
            .layers
            .as_ref()
            .ok_or_else(|| invalid("missing layers".into()))?;
        for (i, l) in layers.iter().enumerate() {
            parsed.blobs.push(descriptor(l, &format!("layers[{i}]"))?);
        }
    }
    Ok(parsed)
}

/// The descriptor fields the referrers API lists for a stored manifest.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReferrerInfo {
    pub media_type: Option<String>,
    pub artifact_type: Option<String>,
    pub config: Option<ConfigType>,
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigType {
    pub media_type: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: char) -> String {
        format!("sha256:{}", n.to_string().repeat(64))
    }

    #[test]
    fn image_manifest() {
        let m = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d('a'), "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d('b'), "size": 3}]});
        let p = parse(m.to_string().as_bytes(), Some(OCI_MANIFEST), "t/x:1").unwrap();
        assert_eq!(p.blobs.len(), 2);
        assert_eq!(
            p.artifact_type.as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
    }

    #[test]
    fn invalid_manifests() {
        let cases = [
            ("not json", Some(OCI_MANIFEST)),
            (r#"{"schemaVersion":2}"#, Some("text/plain")),
            (
                r#"{"schemaVersion":1,"config":{},"layers":[]}"#,
                Some(OCI_MANIFEST),
            ),
            (r#"{"schemaVersion":2,"layers":[]}"#, Some(OCI_MANIFEST)),
            (
                r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#,
                Some(OCI_MANIFEST),
            ),
            (
                r#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:zz","size":1},"layers":[]}"#,
                Some(OCI_MANIFEST),
            ),
            (
                r#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:zz","size":1},"layers":[]}"#,
                None,
            ),
        ];
        for (body, ct) in cases {
            let e = parse(body.as_bytes(), ct, "t/x:1").unwrap_err();
            assert_eq!(e.code, Code::ManifestInvalid, "{body}");
            assert!(e.message.starts_with("manifest t/x:1: "), "{}", e.message);
        }
    }
}
