//! The `Authorization` header: exactly one, with the `Bearer` scheme.

use hyper::header::{HeaderMap, AUTHORIZATION};

use super::AuthError;

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
