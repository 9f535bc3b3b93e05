//! The token's claims: which ones make an [`Identity`], the limits on their values (shared
//! with the importer, so a user is held to the same rules however it arrives), and minting
//! a token the way the platform does.

use std::fmt;

use jsonwebtoken::{EncodingKey, Header};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::{Algorithm, AuthError, Identity};

/// Longest accepted `userId`, in bytes.
pub const MAX_USER_ID_BYTES: usize = 128;
/// Longest accepted `email`, in bytes (RFC 5321's path limit).
pub const MAX_EMAIL_BYTES: usize = 254;

pub(super) fn identity_from(claims: IdentityClaims) -> Result<Identity, AuthError> {
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

#[derive(Deserialize)]
pub(super) struct IdentityClaims {
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
