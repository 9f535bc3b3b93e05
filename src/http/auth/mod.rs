//! Bearer authentication: `Authorization` header → verified [`Identity`].
//!
//! The decoding key and validation rules are built once, at start, into an
//! [`Authenticator`]; the request path only borrows them. Tokens minted by the platform's
//! Node code (`jwt.sign({ userId, email }, secret)`) carry no `exp`, so no registered claim is
//! required unless `JWT_REQUIRE_EXP` says so; `exp` and `nbf` are still checked when present.

use std::collections::HashSet;
use std::fmt;

use hyper::header::HeaderMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, Validation};
use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::config::{ConfigError, JwtConfig};

pub use jsonwebtoken::Algorithm;

mod bearer;
mod claims;

pub use bearer::bearer_token;
pub use claims::mint_token;
use claims::{identity_from, IdentityClaims};

/// Tokens longer than this are refused unparsed: no legitimate platform token comes close,
/// and base64-decoding megabytes of attacker input is a cheap denial of service.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Who the token says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub email: String,
}

/// Why a request was not authenticated; each maps to one of the contract's answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    NoToken,
    #[error("token is invalid or expired")]
    InvalidToken,
    #[error("token payload lacks a usable userId or email")]
    InvalidPayload,
}

/// One key a token may be verified with.
struct VerificationKey {
    kid: Option<String>,
    /// The one algorithm a JWK is declared for (its `alg`); `None` for any of its family.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

/// Verifies bearer tokens with keys and rules prepared once (RFC 8725): an explicit
/// algorithm allowlist, a key chosen by the token's algorithm family (so an HMAC token is
/// never checked against a public key, nor the reverse) and `kid`, and no unknown `crit`.
pub struct Authenticator {
    keys: Vec<VerificationKey>,
    /// One prepared validation per allowed algorithm.
    validations: Vec<(Algorithm, Validation)>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("keys", &self.keys.len())
            .field(
                "algorithms",
                &self.validations.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The JOSE header fields the service looks at before verifying.
#[derive(Deserialize)]
struct JoseHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    /// Any critical extension: none is understood here, so any makes the token invalid.
    #[serde(default)]
    crit: Option<IgnoredAny>,
}

impl Authenticator {
    /// Builds the keys and validations; a key that cannot be used is a [`ConfigError`].
    pub fn new(config: &JwtConfig) -> Result<Self, ConfigError> {
        let mut keys = Vec::new();
        for secret in [&config.secret, &config.previous_secret]
            .into_iter()
            .flatten()
        {
            if secret.as_bytes().len() < 32 {
                tracing::warn!(
                    "a JWT secret is shorter than 32 bytes; HS256 wants at least 32 (RFC 7518)"
                );
            }
            keys.push(VerificationKey {
                kid: None,
                alg: None,
                key: DecodingKey::from_secret(secret.as_bytes()),
            });
        }
        if let Some(file) = &config.public_key {
            keys.push(VerificationKey {
                kid: None,
                alg: None,
                key: public_key_from_pem(&file.contents, &config.algorithms).ok_or_else(|| {
                    ConfigError::new(
                        "JWT_PUBLIC_KEY_FILE",
                        format!(
                            "{} is not a PEM public key for {:?}",
                            file.path, config.algorithms
                        ),
                    )
                })?,
            });
        }
        if let Some(file) = &config.jwks {
            let set: jsonwebtoken::jwk::JwkSet =
                serde_json::from_slice(&file.contents).map_err(|e| {
                    ConfigError::new("JWT_JWKS_FILE", format!("{} is not a JWKS: {e}", file.path))
                })?;
            let mut usable = 0;
            for jwk in &set.keys {
                let Some(alg) = jwk_signing_use(jwk) else {
                    tracing::warn!(
                        kid = jwk.common.key_id.as_deref().unwrap_or("-"),
                        "a key in JWT_JWKS_FILE is not for verifying signatures (its use, key_ops or alg); it is ignored"
                    );
                    continue;
                };
                usable += 1;
                let key = DecodingKey::from_jwk(jwk).map_err(|e| {
                    ConfigError::new(
                        "JWT_JWKS_FILE",
                        format!("a key in {} cannot be used: {e}", file.path),
                    )
                })?;
                keys.push(VerificationKey {
                    kid: jwk.common.key_id.clone(),
                    alg,
                    key,
                });
            }
            if usable == 0 {
                return Err(ConfigError::new(
                    "JWT_JWKS_FILE",
                    format!("{} has no key for verifying signatures", file.path),
                ));
            }
        }
        let validations = config
            .algorithms
            .iter()
            .map(|&alg| {
                let mut v = Validation::new(alg);
                v.required_spec_claims = HashSet::new();
                if config.require_exp {
                    v.required_spec_claims.insert("exp".to_string());
                }
                v.validate_exp = true;
                v.validate_nbf = true;
                v.leeway = config.leeway_secs;
                if let Some(issuer) = &config.issuer {
                    v.set_issuer(&[issuer]);
                    v.required_spec_claims.insert("iss".to_string());
                }
                if config.audience.is_empty() {
                    // The platform's tokens name no audience; one that does is not refused for it.
                    v.validate_aud = false;
                } else {
                    v.set_audience(&config.audience);
                    v.required_spec_claims.insert("aud".to_string());
                }
                (alg, v)
            })
            .collect();
        Ok(Self { keys, validations })
    }

    /// Authenticates a request by its headers.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Identity, AuthError> {
        self.verify(bearer_token(headers)?)
    }

    /// Verifies one compact JWS and extracts the identity claims.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::InvalidToken);
        }
        let header = read_header(token).ok_or(AuthError::InvalidToken)?;
        if header.crit.is_some() || !payload_is_shallow(token) {
            return Err(AuthError::InvalidToken);
        }
        // An unknown name ("none" included) does not parse; a known one must be allowed.
        let alg: Algorithm = header.alg.parse().map_err(|_| AuthError::InvalidToken)?;
        let (_, validation) = self
            .validations
            .iter()
            .find(|(a, _)| *a == alg)
            .ok_or(AuthError::InvalidToken)?;
        // A `kid` narrows the keys to that one; without a `kid`, every key of the token's
        // family is tried (a JWKS during a key rollover holds several).
        let candidates = self.keys.iter().filter(|k| {
            k.key.family() == alg.family()
                && k.alg.is_none_or(|declared| declared == alg)
                && match (&header.kid, &k.kid) {
                    (Some(wanted), Some(kid)) => wanted == kid,
                    _ => true,
                }
        });
        for candidate in candidates {
            match jsonwebtoken::decode::<IdentityClaims>(token, &candidate.key, validation) {
                Ok(data) => return identity_from(data.claims),
                // Another key (the previous secret, another kid) may have signed it; a key
                // this token cannot be checked with (wrong size or curve) is no reason to
                // stop before the others were tried.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::InvalidSignature
                            | ErrorKind::InvalidRsaKey(_)
                            | ErrorKind::InvalidEcdsaKey
                            | ErrorKind::InvalidEddsaKey
                            | ErrorKind::InvalidKeyFormat
                    ) =>
                {
                    continue
                }
                // The signature matched but the token is expired, malformed, …
                Err(_) => return Err(AuthError::InvalidToken),
            }
        }
        Err(AuthError::InvalidToken)
    }
}

/// Whether a JWK may verify signatures, and for which algorithm (RFC 7517 §4.2–4.4): a key
/// whose `use` is not `sig`, whose `key_ops` lack `verify`, or whose `alg` is not a JWS
/// algorithm (e.g. `RSA-OAEP`) is for something else and never verifies a token.
/// `Some(None)`: usable with any algorithm of its family; `None`: not usable.
fn jwk_signing_use(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Option<Algorithm>> {
    use jsonwebtoken::jwk::{KeyOperations, PublicKeyUse};
    let common = &jwk.common;
    if common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return None;
    }
    if common
        .key_operations
        .as_ref()
        .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
    {
        return None;
    }
    match &common.key_algorithm {
        None => Some(None),
        Some(declared) => declared.to_string().parse::<Algorithm>().ok().map(Some),
    }
}

fn read_header(token: &str) -> Option<JoseHeader> {
    use base64::Engine as _;
    let encoded = token.split('.').next()?;
    // A JOSE header of a usable token is small; a huge one is an attack, not a token.
    if encoded.len() > 1024 {
        return None;
    }
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .ok()?;
    serde_json::from_slice(&json).ok()
}

/// Claims nested deeper than this are refused as malformed: no identity needs them.
const MAX_CLAIMS_DEPTH: usize = 16;

/// True when the payload's JSON nests no deeper than [`MAX_CLAIMS_DEPTH`] (a byte scan
/// that skips strings; the JSON itself is parsed later, after the signature is checked).
///
/// Not serde_json's job, though it has a recursion limit: claims we do not read are
/// skipped as `IgnoredAny`, and serde_json skips a value without counting its depth, so a
/// 300-deep unknown claim would parse (`hostile.rs`, "deeply nested claims").
fn payload_is_shallow(token: &str) -> bool {
    use base64::Engine as _;
    let Some(encoded) = token.split('.').nth(1) else {
        return false;
    };
    let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded) else {
        return false;
    };
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in &json {
        match (in_string, escaped, b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_string = false,
            (true, false, _) => {}
            (false, _, b'"') => in_string = true,
            (false, _, b'[' | b'{') => {
                depth += 1;
                if depth > MAX_CLAIMS_DEPTH {
                    return false;
                }
            }
            (false, _, b']' | b'}') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

fn public_key_from_pem(pem: &[u8], algorithms: &[Algorithm]) -> Option<DecodingKey> {
    use jsonwebtoken::AlgorithmFamily as F;
    algorithms.iter().find_map(|a| match a.family() {
        F::Rsa => DecodingKey::from_rsa_pem(pem).ok(),
        F::Ec => DecodingKey::from_ec_pem(pem).ok(),
        F::Ed => DecodingKey::from_ed_pem(pem).ok(),
        F::Hmac => None,
    })
}

#[cfg(test)]
mod tests;
