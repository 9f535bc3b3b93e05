//! Fuzzes decoding a dead-letter stream: any RESP bytes read as an XRANGE reply, and every
//! letter in it listed (table fields, JSON line) and prepared for replay, must never panic.
#![no_main]

use ensure_user::queue::dead_letters::letter_json;
use ensure_user::queue::dead_letters::{fields, replay_fields};
use ensure_user::connection::parse_entries;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = redis::parse_redis_value(data) {
        for letter in parse_entries(&value) {
            let replayed = replay_fields(&letter);
            assert!(replayed.iter().all(|(name, _)| !name.starts_with(b"dead_")));
            let _ = letter_json("stream:ensure-user", &letter);
            let _ = letter.field(fields::REASON);
            let _ = letter.id_millis();
        }
    }
});
