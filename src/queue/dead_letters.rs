//! Dead letters: entries that can never succeed, kept on `<ENSURE_STREAM>:dead`.
//!
//! A dead letter keeps the original entry's fields byte for byte (names too, UTF-8 or not),
//! plus why it died, so an operator can read it, repair what was wrong, and replay it.
//! Writing a dead letter and acknowledging the original happen in one script
//! ([`super::lease::finish`]); replaying and
//! removing it happen in one script: a crash in between can neither lose the entry nor
//! double it, and a replay that Redis refuses leaves the letter where it was.

use super::status::FailureHistory;
use crate::clock::now_millis;
use crate::connection::{RawEntry, RedisConn};

/// Fields a dead letter adds to the original entry's.
pub mod fields {
    pub const REASON: &str = "dead_reason";
    pub const DELIVERIES: &str = "dead_deliveries";
    pub const FIRST_FAILED_AT: &str = "dead_first_failed_at";
    pub const LAST_FAILED_AT: &str = "dead_last_failed_at";
    pub const ORIGINAL_ID: &str = "dead_original_id";
}

/// What every field a dead letter adds starts with; replays and re-deaths drop them.
const DEAD_PREFIX: &[u8] = b"dead_";

/// Replays one dead letter, all or nothing. KEYS[1] is the ingress stream, KEYS[2] its
/// dead-letter stream, ARGV[1] the letter's id and ARGV[2..] the fields to put back.
///
/// A script rather than a MULTI: inside a MULTI a command that fails at EXEC time (XADD
/// onto a key that is not a stream: WRONGTYPE) does not stop the XDEL after it, and the
/// letter would be deleted without having been replayed. A script stops at the first
/// error, before anything was written. Checking that the letter is still there, in the
/// same atomic step, also makes two operators replaying at once put it back only once.
const REPLAY_SCRIPT: &str = r"
if #redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1]) == 0 then
  return false
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
redis.call('XDEL', KEYS[2], ARGV[1])
return id
";

/// One entry that failed for good.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub entry: RawEntry,
    pub reason: String,
    pub first_failed_at_ms: u64,
    pub last_failed_at_ms: u64,
}

impl DeadLetter {
    /// A dead letter for `entry`; the failure history, when known, dates its first failure.
    pub fn new(entry: RawEntry, reason: String, history: Option<&FailureHistory>) -> Self {
        let now = now_millis();
        Self {
            entry,
            reason,
            first_failed_at_ms: history.map_or(now, |h| h.first_at_ms),
            last_failed_at_ms: now,
        }
    }

    /// The dead letter's fields: the original entry's, byte for byte, then why it died.
    pub fn fields(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut all: Vec<(Vec<u8>, Vec<u8>)> = self
            .entry
            .fields
            .iter()
            .flatten()
            .filter(|(name, _)| !name.starts_with(DEAD_PREFIX))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        for (name, value) in [
            (fields::REASON, self.reason.clone()),
            (fields::DELIVERIES, self.entry.deliveries.to_string()),
            (fields::FIRST_FAILED_AT, self.first_failed_at_ms.to_string()),
            (fields::LAST_FAILED_AT, self.last_failed_at_ms.to_string()),
            (fields::ORIGINAL_ID, self.entry.id.clone()),
        ] {
            all.push((name.as_bytes().to_vec(), value.into_bytes()));
        }
        all
    }
}

/// The fields a dead letter goes back onto its ingress stream with: the original entry's,
/// byte for byte, without the `dead_*` ones, and with an empty `reply_to`.
pub fn replay_fields(letter: &RawEntry) -> Vec<(&[u8], &[u8])> {
    letter
        .fields
        .iter()
        .flatten()
        .filter(|(name, _)| !name.starts_with(DEAD_PREFIX))
        .map(|(name, value)| {
            // The listener that waited is long gone; nobody waits for a replay.
            if name.as_slice() == super::ingress::fields::REPLY_TO.as_bytes() {
                (name.as_slice(), &b""[..])
            } else {
                (name.as_slice(), value.as_slice())
            }
        })
        .collect()
}

/// Operator tools over the dead-letter streams (one per ingress shard).
pub struct DeadLetters {
    conn: RedisConn,
    shards: Vec<String>,
}

impl DeadLetters {
    pub fn new(conn: RedisConn, shards: Vec<String>) -> Self {
        Self { conn, shards }
    }

    /// Every dead letter with the ingress stream it belongs to, oldest first per shard.
    pub async fn list(&self) -> redis::RedisResult<Vec<(String, RawEntry)>> {
        let mut all = Vec::new();
        for stream in &self.shards {
            let mut conn = self.conn.clone();
            let value: redis::Value = redis::cmd("XRANGE")
                .arg(super::dead_stream(stream))
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await?;
            all.extend(
                crate::connection::parse_entries(&value)
                    .into_iter()
                    .map(|e| (stream.clone(), e)),
            );
        }
        Ok(all)
    }

    /// Puts the dead letter with this id back on its ingress stream and removes it,
    /// atomically. Returns the new ingress id, or `None` when no dead letter has that id
    /// (any more). Ids are per stream: with several shards, the first shard's letter wins.
    /// On an error nothing was written: the letter is still a dead letter.
    pub async fn replay(&self, id: &str) -> redis::RedisResult<Option<String>> {
        for stream in &self.shards {
            let mut conn = self.conn.clone();
            let value: redis::Value = redis::cmd("XRANGE")
                .arg(super::dead_stream(stream))
                .arg(id)
                .arg(id)
                .query_async(&mut conn)
                .await?;
            if let Some(letter) = crate::connection::parse_entries(&value).into_iter().next() {
                return self.replay_letter(stream, &letter).await;
            }
        }
        Ok(None)
    }

    /// Puts one listed dead letter of ingress stream `stream` back and removes it,
    /// atomically; as [`DeadLetters::replay`], without looking it up by id first.
    pub async fn replay_letter(
        &self,
        stream: &str,
        letter: &RawEntry,
    ) -> redis::RedisResult<Option<String>> {
        let script = redis::Script::new(REPLAY_SCRIPT);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(stream)
            .key(super::dead_stream(stream))
            .arg(&letter.id);
        for (name, value) in replay_fields(letter) {
            invocation.arg(name).arg(value);
        }
        let mut conn = self.conn.clone();
        invocation.invoke_async(&mut conn).await
    }

    /// Removes dead letters older than `min_age_ms` (all when `None`); returns how many.
    pub async fn purge(&self, min_age_ms: Option<u64>) -> redis::RedisResult<u64> {
        let mut removed = 0;
        for stream in &self.shards {
            let dead = super::dead_stream(stream);
            let mut conn = self.conn.clone();
            removed += match min_age_ms {
                None => {
                    let (len, _): (u64, ()) = redis::pipe()
                        .atomic()
                        .cmd("XLEN")
                        .arg(&dead)
                        .cmd("DEL")
                        .arg(&dead)
                        .query_async(&mut conn)
                        .await?;
                    len
                }
                Some(age) => {
                    let min_id = now_millis().saturating_sub(age);
                    redis::cmd("XTRIM")
                        .arg(&dead)
                        .arg("MINID")
                        .arg(min_id)
                        .query_async::<u64>(&mut conn)
                        .await?
                }
            };
        }
        Ok(removed)
    }
}

/// A name or value as JSON: the string when it is UTF-8, else `{"base64": …}`, so bytes
/// that are not text are shown exactly rather than replaced.
fn bytes_json(bytes: &[u8]) -> serde_json::Value {
    use base64::Engine as _;
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::Value::String(text.to_owned()),
        Err(_) => serde_json::json!({
            "base64": base64::engine::general_purpose::STANDARD.encode(bytes)
        }),
    }
}

/// One dead letter as a JSON line. Fields are `[name, value]` pairs in stream order, not
/// an object: names need not be UTF-8 (nor unique), and an object key can only be text.
/// What `dead-letters list --json` prints; public for the `dead_letter` fuzz target.
pub fn letter_json(stream: &str, letter: &RawEntry) -> String {
    let fields: Vec<serde_json::Value> = letter
        .fields
        .iter()
        .flatten()
        .map(|(k, v)| serde_json::Value::Array(vec![bytes_json(k), bytes_json(v)]))
        .collect();
    serde_json::json!({ "id": letter.id, "stream": stream, "fields": fields }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_replay_drops_the_dead_fields_and_the_waiting_listener() {
        let letter = RawEntry {
            id: "1-0".into(),
            fields: Some(vec![
                (b"user_id".to_vec(), b"u1".to_vec()),
                (b"reply_to".to_vec(), b"listener-7".to_vec()),
                (b"\xffodd".to_vec(), b"\x00v".to_vec()),
                (b"dead_reason".to_vec(), b"why".to_vec()),
            ]),
            deliveries: 1,
        };
        assert_eq!(
            replay_fields(&letter),
            vec![
                (&b"user_id"[..], &b"u1"[..]),
                (&b"reply_to"[..], &b""[..]),
                (&b"\xffodd"[..], &b"\x00v"[..]),
            ]
        );
    }

    proptest! {
        /// Any RESP reply read as a dead-letter stream decodes, lists and replays without
        /// a panic: what an operator's command does with whatever the stream holds.
        #[test]
        fn any_reply_decodes_as_dead_letters(raw in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(value) = redis::parse_redis_value(&raw) {
                for letter in crate::connection::parse_entries(&value) {
                    let _ = replay_fields(&letter);
                    let _ = letter_json("stream:ensure-user", &letter);
                    let _ = letter.field(fields::REASON);
                    let _ = letter.id_millis();
                }
            }
        }
    }
}
