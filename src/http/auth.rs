//! Bearer authentication: `Authorization` header → verified [`Identity`].
//!
//! The decoding key and validation rules are built once, at start, into an
//! [`Authenticator`]; the request path only borrows them. Tokens minted by the platform's
//! Node code (`jwt.sign({ userId, email }, secret)`) carry no `exp`, so no registered claim is
//! required unless `JWT_REQUIRE_EXP` says so; `exp` and `nbf` are still checked when present.

use std::collections::HashSet;
use std::fmt;

use hyper::header::{HeaderMap, AUTHORIZATION};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::config::JwtConfig;

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

/// Verifies bearer tokens with a key and rules prepared once.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(config: &JwtConfig) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.required_spec_claims = HashSet::new();
        if config.require_exp {
            validation.required_spec_claims.insert("exp".to_string());
        }
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = config.leeway_secs;
        // The platform's tokens name no audience; one that does is not refused for it.
        validation.validate_aud = false;
        Self {
            key: DecodingKey::from_secret(config.secret.as_bytes()),
            validation,
        }
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
        let data = jsonwebtoken::decode::<IdentityClaims>(token, &self.key, &self.validation)
            .map_err(|_| AuthError::InvalidToken)?;
        match (data.claims.user_id.0, data.claims.email.0) {
            (Some(user_id), Some(email)) if !user_id.is_empty() && !email.is_empty() => {
                Ok(Identity { user_id, email })
            }
            _ => Err(AuthError::InvalidPayload),
        }
    }
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
        Authenticator::new(&JwtConfig {
            secret: JwtSecret::new("secret"),
            leeway_secs: 60,
            require_exp: false,
        })
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
}
