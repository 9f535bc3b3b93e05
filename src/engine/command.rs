//! `EngineCommand`: the one-field wire format the Engine reads.
//!
//! The Engine joins all field values of an entry and parses the result as JSON, so an
//! entry carries exactly one field, `message`, whose value is the whole JSON command. The
//! key order below is the order the Engine team documented; serde keeps it.

use serde::Serialize;

/// The name of the single field of an Engine command entry.
pub const MESSAGE_FIELD: &str = "message";

/// `createUser` for one user, as the Engine consumes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EngineCommand {
    function: &'static str,
    #[serde(rename = "userId")]
    pub user_id: String,
    #[serde(rename = "userEmail")]
    pub user_email: String,
    #[serde(rename = "requestId")]
    pub request_id: String,
}

impl EngineCommand {
    pub fn create_user(user_id: String, user_email: String, request_id: String) -> Self {
        Self {
            function: "createUser",
            user_id,
            user_email,
            request_id,
        }
    }

    /// The value of the `message` field.
    pub fn to_message(&self) -> String {
        // Serialising four strings into JSON cannot fail.
        serde_json::to_string(self).expect("a command of strings always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_byte_exact() {
        let c = EngineCommand::create_user("u\"1".into(), "a@x".into(), "r1".into());
        assert_eq!(
            c.to_message(),
            r#"{"function":"createUser","userId":"u\"1","userEmail":"a@x","requestId":"r1"}"#
        );
    }
}
