//! The token's claims: which ones make an [`Identity`] (held to [`crate::identity`]'s
//! limits, as the importer is), and minting a token the way the platform does.

use std::fmt;

use jsonwebtoken::{EncodingKey, Header};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::{Algorithm, AuthError, Identity};
use crate::identity::check_identity;

pub(super) fn identity_from(claims: IdentityClaims) -> Result<Identity, AuthError> {
    let (Some(user_id), Some(email)) = (claims.user_id.0, claims.email.0) else {
        return Err(AuthError::InvalidPayload);
    };
    check_identity(&user_id, &email).map_err(|_| AuthError::InvalidPayload)?;
    Ok(Identity { user_id, email })
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
