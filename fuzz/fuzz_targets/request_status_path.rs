//! Fuzzes the request-status route's path parsing: any path must give a request id made
//! only of the characters a Redis key part may take here, or none, never a panic.
#![no_main]

use ensure_user::http::routes::request_id_of;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = String::from_utf8_lossy(data);
    for candidate in [
        path.to_string(),
        format!("/api/v1/auth/ensure-user/requests/{path}"),
    ] {
        if let Some(id) = request_id_of(&candidate) {
            assert!(id.len() <= 64);
            assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        }
    }
});
