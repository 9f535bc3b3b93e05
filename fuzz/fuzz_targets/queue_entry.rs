//! Fuzzes decoding what the queue's Redis answers: any RESP bytes parsed as an XREADGROUP
//! reply, and every entry in it decoded as an ensure request, must never panic.
#![no_main]

use ensure_user::queue::ingress::EnsureRequest;
use ensure_user::connection::parse_read_reply;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = redis::parse_redis_value(data) {
        for entry in parse_read_reply(&value) {
            let _ = EnsureRequest::decode(&entry);
        }
    }
});
