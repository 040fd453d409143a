//! Node proxy tokens: how an agent knows that a request for a container's logs or an exec
//! in it comes from the API server, which already checked the caller's tenant and role.
//!
//! The server signs a short-lived token naming one node, one container and one operation
//! with its Ed25519 key; the agent verifies it with the server's public key (read from
//! `GET /api/v1/proxy-key`). A node therefore holds nothing that would let it act on
//! another node, and a token lifted from one request opens nothing else for long.
//!
//! Format: `base64url(claims JSON) "." base64url(signature over the first part)`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How long a token is valid.
pub const TOKEN_TTL_SECS: i64 = 60;

/// What a token allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyOp {
    Logs,
    Exec,
}

/// The signed statement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyClaims {
    pub node: String,
    /// The container id (the instance's uid).
    pub container: String,
    pub op: ProxyOp,
    /// Expiry, Unix seconds.
    pub exp: i64,
}

/// The server's public key, as `GET /api/v1/proxy-key` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProxyKey {
    /// Always `ed25519`.
    pub algorithm: String,
    /// The raw 32-byte public key, base64url without padding.
    pub public_key: String,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyTokenError {
    #[error("malformed proxy token")]
    Malformed,
    #[error("proxy token signature does not verify")]
    BadSignature,
    #[error("proxy token expired")]
    Expired,
    #[error("proxy token is for {what} {got:?}, not {want:?}")]
    Mismatch {
        what: &'static str,
        got: String,
        want: String,
    },
    #[error("invalid proxy key: {0}")]
    Key(String),
}

/// The server's signing key.
pub struct ProxySigner {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for ProxySigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxySigner")
            .field("public_key", &self.public_key().public_key)
            .finish()
    }
}

impl ProxySigner {
    /// A new key, as PKCS#8 bytes to keep.
    pub fn generate() -> Result<Vec<u8>, ProxyTokenError> {
        let rng = ring::rand::SystemRandom::new();
        Ed25519KeyPair::generate_pkcs8(&rng)
            .map(|d| d.as_ref().to_vec())
            .map_err(|e| ProxyTokenError::Key(e.to_string()))
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<Self, ProxyTokenError> {
        Ed25519KeyPair::from_pkcs8(der)
            .map(|pair| Self { pair })
            .map_err(|e| ProxyTokenError::Key(e.to_string()))
    }

    pub fn public_key(&self) -> ProxyKey {
        ProxyKey {
            algorithm: "ed25519".into(),
            public_key: B64.encode(self.pair.public_key().as_ref()),
        }
    }

    pub fn sign(&self, claims: &ProxyClaims) -> String {
        let body = B64.encode(serde_json::to_vec(claims).unwrap_or_default());
        let sig = self.pair.sign(body.as_bytes());
        format!("{body}.{}", B64.encode(sig.as_ref()))
    }
}

/// Checks a token against the server's public key, for `node`, `container` and `op`, at
/// Unix time `now`.
pub fn verify(
    key: &ProxyKey,
    token: &str,
    node: &str,
    container: &str,
    op: ProxyOp,
    now: i64,
) -> Result<ProxyClaims, ProxyTokenError> {
    if key.algorithm != "ed25519" {
        return Err(ProxyTokenError::Key(format!(
            "algorithm {:?} is not ed25519",
            key.algorithm
        )));
    }
    let public = B64
        .decode(&key.public_key)
        .map_err(|e| ProxyTokenError::Key(e.to_string()))?;
    let (body, sig) = token.split_once('.').ok_or(ProxyTokenError::Malformed)?;
    let sig = B64.decode(sig).map_err(|_| ProxyTokenError::Malformed)?;
    UnparsedPublicKey::new(&ED25519, &public)
        .verify(body.as_bytes(), &sig)
        .map_err(|_| ProxyTokenError::BadSignature)?;
    let raw = B64.decode(body).map_err(|_| ProxyTokenError::Malformed)?;
    let claims: ProxyClaims =
        serde_json::from_slice(&raw).map_err(|_| ProxyTokenError::Malformed)?;
    if claims.exp < now {
        return Err(ProxyTokenError::Expired);
    }
    let mismatch = |what, got: &str, want: &str| ProxyTokenError::Mismatch {
        what,
        got: got.to_owned(),
        want: want.to_owned(),
    };
    if claims.node != node {
        return Err(mismatch("node", &claims.node, node));
    }
    if claims.container != container {
        return Err(mismatch("container", &claims.container, container));
    }
    if claims.op != op {
        return Err(mismatch(
            "operation",
            &format!("{:?}", claims.op),
            &format!("{op:?}"),
        ));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> ProxyClaims {
        ProxyClaims {
            node: "n1".into(),
            container: "c1".into(),
            op: ProxyOp::Logs,
            exp,
        }
    }

    #[test]
    fn a_signed_token_verifies_only_for_what_it_names() {
        let signer = ProxySigner::from_pkcs8(&ProxySigner::generate().unwrap()).unwrap();
        let key = signer.public_key();
        let t = signer.sign(&claims(100));
        assert_eq!(
            verify(&key, &t, "n1", "c1", ProxyOp::Logs, 50).unwrap(),
            claims(100)
        );
        assert_eq!(
            verify(&key, &t, "n1", "c1", ProxyOp::Logs, 101),
            Err(ProxyTokenError::Expired)
        );
        for (node, container, op) in [
            ("n2", "c1", ProxyOp::Logs),
            ("n1", "c2", ProxyOp::Logs),
            ("n1", "c1", ProxyOp::Exec),
        ] {
            assert!(matches!(
                verify(&key, &t, node, container, op, 50),
                Err(ProxyTokenError::Mismatch { .. })
            ));
        }
    }

    #[test]
    fn forged_and_garbled_tokens_are_refused() {
        let signer = ProxySigner::from_pkcs8(&ProxySigner::generate().unwrap()).unwrap();
        let other = ProxySigner::from_pkcs8(&ProxySigner::generate().unwrap()).unwrap();
        let key = signer.public_key();
        let forged = other.sign(&claims(100));
        assert_eq!(
            verify(&key, &forged, "n1", "c1", ProxyOp::Logs, 50),
            Err(ProxyTokenError::BadSignature)
        );
        // A body swapped under a valid signature.
        let good = signer.sign(&claims(100));
        let (_, sig) = good.split_once('.').unwrap();
        let body = B64.encode(serde_json::to_vec(&claims(i64::MAX)).unwrap());
        assert_eq!(
            verify(
                &key,
                &format!("{body}.{sig}"),
                "n1",
                "c1",
                ProxyOp::Logs,
                50
            ),
            Err(ProxyTokenError::BadSignature)
        );
        for bad in ["", "abc", "a.b.c", "!!.??"] {
            assert!(verify(&key, bad, "n1", "c1", ProxyOp::Logs, 50).is_err());
        }
        let wrong_alg = ProxyKey {
            algorithm: "rsa".into(),
            ..key
        };
        assert!(matches!(
            verify(&wrong_alg, &good, "n1", "c1", ProxyOp::Logs, 50),
            Err(ProxyTokenError::Key(_))
        ));
    }
}
