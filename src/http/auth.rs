//! Bearer authentication: `Authorization` header → verified [`Identity`].
//!
//! The decoding key and validation rules are built once, at start, into an
//! [`Authenticator`]; the request path only borrows them. Tokens minted by the platform's
//! Node code (`jwt.sign({ userId, email }, secret)`) carry no `exp`, so no registered claim is
//! required unless `JWT_REQUIRE_EXP` says so; `exp` and `nbf` are still checked when present.

use std::collections::HashSet;
use std::fmt;

use hyper::header::{HeaderMap, AUTHORIZATION};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, JwtConfig};

pub use jsonwebtoken::Algorithm;

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

/// Longest accepted `userId`, in bytes.
pub const MAX_USER_ID_BYTES: usize = 128;
/// Longest accepted `email`, in bytes (RFC 5321's path limit).
pub const MAX_EMAIL_BYTES: usize = 254;

fn identity_from(claims: IdentityClaims) -> Result<Identity, AuthError> {
    let (Some(user_id), Some(email)) = (claims.user_id.0, claims.email.0) else {
        return Err(AuthError::InvalidPayload);
    };
    check_identity(&user_id, &email).map_err(|_| AuthError::InvalidPayload)?;
    Ok(Identity { user_id, email })
}

/// Why a `userId` / `email` pair cannot be ensured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidIdentity {
    #[error("userId is empty")]
    EmptyUserId,
    #[error("userId is longer than {MAX_USER_ID_BYTES} bytes")]
    LongUserId,
    #[error("userId contains a control character")]
    ControlInUserId,
    #[error("email is not an address (local@domain, at most {MAX_EMAIL_BYTES} bytes, no spaces)")]
    NotAnEmail,
}

/// The limits every user id and email must meet, whichever way it comes in: a token's
/// claims here, an imported line in `users import` (one rule, so an import can never store
/// what the HTTP path would refuse).
pub fn check_identity(user_id: &str, email: &str) -> Result<(), InvalidIdentity> {
    if user_id.is_empty() {
        return Err(InvalidIdentity::EmptyUserId);
    }
    if user_id.len() > MAX_USER_ID_BYTES {
        return Err(InvalidIdentity::LongUserId);
    }
    if user_id.chars().any(char::is_control) {
        return Err(InvalidIdentity::ControlInUserId);
    }
    if !is_email(email) {
        return Err(InvalidIdentity::NotAnEmail);
    }
    Ok(())
}

/// A deliberately plain address check: `local@domain`, no spaces or control characters,
/// within RFC 5321's lengths. The platform has already verified the address; this only
/// keeps obvious garbage out of the database and the Engine.
pub fn is_email(email: &str) -> bool {
    if email.len() > MAX_EMAIL_BYTES || email.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return false;
    }
    let Some((local, domain)) = email.rsplit_once('@') else {
        return false;
    };
    !local.is_empty()
        && local.len() <= 64
        && !domain.is_empty()
        && domain.len() <= 253
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && domain.chars().all(|c| {
            c.is_alphanumeric() || c == '-' || c == '.' || c == '[' || c == ']' || c == ':'
        })
}

/// The credential of the single `Authorization: Bearer …` header.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthError::NoToken)?;
    if values.next().is_some() {
        // Two credentials: picking one would let a proxy and this service disagree on who
        // the caller is.
        return Err(AuthError::InvalidToken);
    }
    let value = value.to_str().map_err(|_| AuthError::InvalidToken)?.trim();
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::NoToken);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::NoToken);
    }
    Ok(token)
}

#[derive(Deserialize)]
struct IdentityClaims {
    #[serde(rename = "userId", default)]
    user_id: StringClaim,
    #[serde(default)]
    email: StringClaim,
}

/// A claim kept only when it is a JSON string; any other JSON type reads as absent, so a
/// wrongly typed claim is "Invalid token payload." rather than a malformed token.
#[derive(Default)]
struct StringClaim(Option<String>);

impl<'de> Deserialize<'de> for StringClaim {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StringOnly;
        impl<'de> Visitor<'de> for StringOnly {
            type Value = StringClaim;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StringClaim, E> {
                Ok(StringClaim(Some(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<StringClaim, E> {
                Ok(StringClaim(Some(v)))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<StringClaim, E> {
                Ok(StringClaim(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<StringClaim, E> {
                Ok(StringClaim(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<StringClaim, E> {
                Ok(StringClaim(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<StringClaim, E> {
                Ok(StringClaim(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<StringClaim, E> {
                Ok(StringClaim(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StringClaim, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(StringClaim(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StringClaim, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(StringClaim(None))
            }
        }
        deserializer.deserialize_any(StringOnly)
    }
}

#[derive(Serialize)]
struct MintedClaims<'a> {
    #[serde(rename = "userId")]
    user_id: &'a str,
    email: &'a str,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
}

/// Signs an HS256 token the way the platform does, optionally with an expiry.
pub fn mint_token(
    secret: &[u8],
    user_id: &str,
    email: &str,
    ttl_secs: Option<u64>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let iat = jsonwebtoken::get_current_timestamp();
    let claims = MintedClaims {
        user_id,
        email,
        iat,
        exp: ttl_secs.map(|ttl| iat + ttl),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::JwtSecret;
    use hyper::header::HeaderValue;

    fn auth() -> Authenticator {
        Authenticator::new(&JwtConfig::hs256("secret")).unwrap()
    }

    #[test]
    fn email_check() {
        for ok in [
            "a@x",
            "first.last@example.com",
            "u+tag@sub.example.co",
            "x@[127.0.0.1]",
        ] {
            assert!(is_email(ok), "{ok}");
        }
        let long_local = format!("{}@x.com", "a".repeat(65));
        let long = format!("a@{}.com", "b".repeat(250));
        for bad in [
            "",
            "plain",
            "@x.com",
            "a@",
            "a b@x.com",
            "a@x..com",
            "a@.x",
            "a\n@x.com",
            long_local.as_str(),
            long.as_str(),
        ] {
            assert!(!is_email(bad), "{bad:?}");
        }
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn scheme_is_case_insensitive_and_token_trimmed() {
        for v in ["Bearer abc", "bearer abc", "BEARER   abc  "] {
            assert_eq!(bearer_token(&headers(&[v])), Ok("abc"), "{v}");
        }
    }

    #[test]
    fn missing_or_foreign_credentials_are_no_token() {
        for v in ["Basic abc", "Bearer", "Bearer    ", "abc", ""] {
            assert_eq!(
                bearer_token(&headers(&[v])),
                Err(AuthError::NoToken),
                "{v:?}"
            );
        }
        assert_eq!(bearer_token(&HeaderMap::new()), Err(AuthError::NoToken));
    }

    #[test]
    fn two_authorization_headers_are_refused() {
        let h = headers(&["Bearer a", "Bearer b"]);
        assert_eq!(bearer_token(&h), Err(AuthError::InvalidToken));
    }

    #[test]
    fn minted_tokens_verify() {
        let token = mint_token(b"secret", "u1", "u1@example.com", Some(60)).unwrap();
        let id = auth().verify(&token).unwrap();
        assert_eq!(id.user_id, "u1");
        assert_eq!(id.email, "u1@example.com");
    }

    #[test]
    fn oversized_tokens_are_invalid() {
        let token = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(auth().verify(&token), Err(AuthError::InvalidToken));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever bytes arrive as `Authorization`, the answer is one of the contract's
            /// refusals or a verified identity, never a panic.
            #[test]
            fn any_authorization_header_is_answered(raw in proptest::collection::vec(any::<u8>(), 0..600)) {
                let mut headers = HeaderMap::new();
                if let Ok(value) = HeaderValue::from_bytes(&raw) {
                    headers.insert(AUTHORIZATION, value);
                }
                let _ = auth().authenticate(&headers);
            }

            /// Token-shaped garbage (three base64url-ish segments) never verifies.
            #[test]
            fn forged_tokens_never_verify(a in "[A-Za-z0-9_-]{0,200}", b in "[A-Za-z0-9_-]{0,400}", c in "[A-Za-z0-9_-]{0,100}") {
                let token = format!("{a}.{b}.{c}");
                prop_assert!(auth().verify(&token).is_err());
            }

            /// Every usable identity survives minting and verification unchanged.
            #[test]
            fn minted_identities_round_trip(user_id in "[a-zA-Z0-9_.:-]{1,128}", local in "[a-z0-9.+_-]{1,64}", domain in "[a-z0-9-]{1,30}\\.[a-z]{2,10}") {
                let email = format!("{local}@{domain}");
                let token = mint_token(b"secret", &user_id, &email, None).unwrap();
                let id = auth().verify(&token).unwrap();
                prop_assert_eq!(id.user_id, user_id);
                prop_assert_eq!(id.email, email);
            }
        }
    }

    mod keys {
        use super::*;
        use crate::config::KeyFile;
        use serde_json::json;

        const RSA_PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/rsa-private.pem");
        const RSA_PUBLIC: &[u8] = include_bytes!("../../tests/fixtures/rsa-public.pem");
        const EC_PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/ec-private.pem");
        const EC_PUBLIC: &[u8] = include_bytes!("../../tests/fixtures/ec-public.pem");
        const ED_PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/ed-private.pem");
        const ED_PUBLIC: &[u8] = include_bytes!("../../tests/fixtures/ed-public.pem");
        const JWKS: &[u8] = include_bytes!("../../tests/fixtures/jwks.json");

        fn config(algorithms: &[Algorithm]) -> JwtConfig {
            JwtConfig {
                secret: None,
                algorithms: algorithms.to_vec(),
                leeway_secs: 0,
                ..JwtConfig::hs256("unused")
            }
        }

        fn file(contents: &[u8]) -> Option<KeyFile> {
            Some(KeyFile {
                path: "fixture".into(),
                contents: contents.to_vec(),
            })
        }

        fn sign(header: Header, claims: serde_json::Value, key: &EncodingKey) -> String {
            jsonwebtoken::encode(&header, &claims, key).unwrap()
        }

        fn claims() -> serde_json::Value {
            json!({"userId": "u1", "email": "u1@example.com"})
        }

        #[test]
        fn public_key_algorithms_verify_with_their_key_files() {
            let cases: [(Algorithm, &[u8], EncodingKey); 3] = [
                (
                    Algorithm::RS256,
                    RSA_PUBLIC,
                    EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
                ),
                (
                    Algorithm::ES256,
                    EC_PUBLIC,
                    EncodingKey::from_ec_pem(EC_PRIVATE).unwrap(),
                ),
                (
                    Algorithm::EdDSA,
                    ED_PUBLIC,
                    EncodingKey::from_ed_pem(ED_PRIVATE).unwrap(),
                ),
            ];
            for (alg, public, private) in cases {
                let mut c = config(&[alg]);
                c.public_key = file(public);
                let auth = Authenticator::new(&c).unwrap();
                let token = sign(Header::new(alg), claims(), &private);
                assert_eq!(auth.verify(&token).unwrap().user_id, "u1", "{alg:?}");
            }
        }

        #[test]
        fn jwks_keys_are_chosen_by_kid() {
            let mut c = config(&[Algorithm::RS256]);
            c.jwks = file(JWKS);
            let auth = Authenticator::new(&c).unwrap();
            let key = EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap();
            let mut header = Header::new(Algorithm::RS256);
            header.kid = Some("rsa-1".into());
            assert!(auth.verify(&sign(header.clone(), claims(), &key)).is_ok());
            header.kid = Some("unknown".into());
            assert_eq!(
                auth.verify(&sign(header, claims(), &key)),
                Err(AuthError::InvalidToken)
            );
        }

        /// The fixture's RSA key as a JWK with these extra members.
        fn rsa_jwk(extra: serde_json::Value) -> serde_json::Value {
            let set: serde_json::Value = serde_json::from_slice(JWKS).unwrap();
            let mut key = set["keys"][0].clone();
            let key_map = key.as_object_mut().unwrap();
            key_map.remove("use");
            key_map.remove("alg");
            key_map.extend(extra.as_object().unwrap().clone());
            key
        }

        fn jwks_auth(keys: Vec<serde_json::Value>, algorithms: &[Algorithm]) -> Authenticator {
            let mut c = config(algorithms);
            c.jwks = file(&serde_json::to_vec(&json!({ "keys": keys })).unwrap());
            Authenticator::new(&c).unwrap()
        }

        fn rsa_token(alg: Algorithm, kid: Option<&str>) -> String {
            let mut header = Header::new(alg);
            header.kid = kid.map(Into::into);
            sign(
                header,
                claims(),
                &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
            )
        }

        #[test]
        fn a_jwks_key_verifies_only_for_its_alg_and_use() {
            let auth = jwks_auth(
                vec![
                    rsa_jwk(json!({"kid": "enc", "use": "enc"})),
                    rsa_jwk(json!({"kid": "wrap", "key_ops": ["wrapKey"]})),
                    rsa_jwk(json!({"kid": "oaep", "alg": "RSA-OAEP"})),
                    rsa_jwk(json!({"kid": "rs384", "use": "sig", "alg": "RS384"})),
                    rsa_jwk(json!({"kid": "any", "key_ops": ["verify"]})),
                ],
                &[Algorithm::RS256, Algorithm::RS384, Algorithm::PS256],
            );
            for kid in ["enc", "wrap", "oaep"] {
                assert_eq!(
                    auth.verify(&rsa_token(Algorithm::RS256, Some(kid))),
                    Err(AuthError::InvalidToken),
                    "{kid}"
                );
            }
            // Declared for RS384: that algorithm only, not RS256 nor PS256 with the same key.
            assert!(auth
                .verify(&rsa_token(Algorithm::RS384, Some("rs384")))
                .is_ok());
            for alg in [Algorithm::RS256, Algorithm::PS256] {
                assert_eq!(
                    auth.verify(&rsa_token(alg, Some("rs384"))),
                    Err(AuthError::InvalidToken),
                    "{alg:?}"
                );
            }
            // No `alg`: any algorithm of the key's family.
            for alg in [Algorithm::RS256, Algorithm::PS256] {
                assert!(auth.verify(&rsa_token(alg, Some("any"))).is_ok(), "{alg:?}");
            }
        }

        #[test]
        fn a_jwks_without_a_signing_key_is_a_configuration_error() {
            let mut c = config(&[Algorithm::RS256]);
            let set = json!({"keys": [rsa_jwk(json!({"use": "enc"}))]});
            c.jwks = file(&serde_json::to_vec(&set).unwrap());
            assert_eq!(Authenticator::new(&c).unwrap_err().setting, "JWT_JWKS_FILE");
        }

        #[test]
        fn without_a_kid_every_key_of_the_family_is_tried() {
            // A rollover: the old key first, the signing key second, both with a kid.
            let mut old = rsa_jwk(json!({"kid": "old", "use": "sig"}));
            let n = old["n"].as_str().unwrap().replacen('s', "t", 1);
            old["n"] = json!(n);
            let auth = jwks_auth(
                vec![old, rsa_jwk(json!({"kid": "new", "use": "sig"}))],
                &[Algorithm::RS256],
            );
            assert!(auth.verify(&rsa_token(Algorithm::RS256, None)).is_ok());
            // A kid still narrows the choice to its key.
            assert_eq!(
                auth.verify(&rsa_token(Algorithm::RS256, Some("old"))),
                Err(AuthError::InvalidToken)
            );
            // And a token no key signed is refused after all were tried.
            let forged = rsa_token(Algorithm::RS256, None);
            let mut tampered = forged.clone();
            tampered.replace_range(forged.len() - 4.., "AAAA");
            assert_eq!(auth.verify(&tampered), Err(AuthError::InvalidToken));
        }

        #[test]
        fn an_hmac_token_is_never_checked_against_a_public_key() {
            // The classic confusion: sign HS256 with the server's public key as the secret.
            let mut c = config(&[Algorithm::HS256, Algorithm::RS256]);
            c.secret = Some(JwtSecret::new("the-real-secret-that-is-long-enough!"));
            c.public_key = file(RSA_PUBLIC);
            let auth = Authenticator::new(&c).unwrap();
            let forged = sign(
                Header::new(Algorithm::HS256),
                claims(),
                &EncodingKey::from_secret(RSA_PUBLIC),
            );
            assert_eq!(auth.verify(&forged), Err(AuthError::InvalidToken));
            // And with only RS256 allowed, an HS256 token is refused outright.
            let mut rs_only = config(&[Algorithm::RS256]);
            rs_only.public_key = file(RSA_PUBLIC);
            let auth = Authenticator::new(&rs_only).unwrap();
            assert_eq!(auth.verify(&forged), Err(AuthError::InvalidToken));
        }

        #[test]
        fn the_previous_secret_is_still_accepted_during_rotation() {
            let mut c = config(&[Algorithm::HS256]);
            c.secret = Some(JwtSecret::new("new-secret-new-secret-new-secret!!"));
            c.previous_secret = Some(JwtSecret::new("old-secret-old-secret-old-secret!!"));
            let auth = Authenticator::new(&c).unwrap();
            for (secret, ok) in [
                ("new-secret-new-secret-new-secret!!", true),
                ("old-secret-old-secret-old-secret!!", true),
                ("older-secret-older-secret-older!!!", false),
            ] {
                let token = mint_token(secret.as_bytes(), "u1", "u1@example.com", None).unwrap();
                assert_eq!(auth.verify(&token).is_ok(), ok, "{secret}");
            }
        }

        #[test]
        fn issuer_and_audience_are_enforced_when_set() {
            let mut c = config(&[Algorithm::HS256]);
            c.secret = Some(JwtSecret::new("secret"));
            c.issuer = Some("https://auth.example".into());
            c.audience = vec!["ensure-user".into()];
            let auth = Authenticator::new(&c).unwrap();
            let key = EncodingKey::from_secret(b"secret");
            let with = |extra: serde_json::Value| {
                let mut claims = claims();
                claims
                    .as_object_mut()
                    .unwrap()
                    .extend(extra.as_object().unwrap().clone());
                sign(Header::new(Algorithm::HS256), claims, &key)
            };
            assert!(auth
                .verify(&with(
                    json!({"iss": "https://auth.example", "aud": "ensure-user"})
                ))
                .is_ok());
            for bad in [
                json!({"iss": "https://evil.example", "aud": "ensure-user"}),
                json!({"iss": "https://auth.example", "aud": "someone-else"}),
                json!({"aud": "ensure-user"}),
                json!({"iss": "https://auth.example"}),
            ] {
                assert_eq!(
                    auth.verify(&with(bad.clone())),
                    Err(AuthError::InvalidToken),
                    "{bad}"
                );
            }
        }

        #[test]
        fn unusable_key_files_are_configuration_errors() {
            let mut c = config(&[Algorithm::RS256]);
            c.public_key = file(b"not a pem");
            assert_eq!(
                Authenticator::new(&c).unwrap_err().setting,
                "JWT_PUBLIC_KEY_FILE"
            );
            let mut c = config(&[Algorithm::RS256]);
            c.jwks = file(b"{}");
            assert_eq!(Authenticator::new(&c).unwrap_err().setting, "JWT_JWKS_FILE");
        }
    }
}
