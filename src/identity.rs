//! Who a user is: the limits every `userId` / `email` pair must meet, whichever way it
//! comes in (a token's claims, an imported line in `users import`). One rule, on the ground
//! floor, so an import can never store what the HTTP path would refuse.

/// Longest accepted `userId`, in bytes.
pub const MAX_USER_ID_BYTES: usize = 128;
/// Longest accepted `email`, in bytes (RFC 5321's path limit).
pub const MAX_EMAIL_BYTES: usize = 254;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
