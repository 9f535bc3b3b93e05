//! Who owns a pending entry, and finishing entries only while owning them.
//!
//! A consumer that read an entry owns it in the group's pending list until it acknowledges
//! it, or until another consumer re-claims it after `CLAIM_IDLE_MS` of idleness. A consumer
//! that is still working on an entry (retrying a step through a long outage) keeps it by
//! refreshing its idle time ([`Lease::refresh`], `XCLAIM … JUSTID` to itself, which does not
//! count as a delivery), so re-claiming takes only entries whose consumer stopped
//! refreshing: it crashed, or is stuck.
//!
//! Both the refresh and [`finish`] check ownership and act in one Lua script, so a consumer
//! that lost an entry can neither steal it back nor write a status, an outcome or a dead
//! letter for it: whatever it did, the entry's new owner decides how it ends.

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};

use crate::connection::{entry_id_numbers, RedisConn};

/// Refreshes the idle time of the given entries that `consumer` still owns; returns those.
const REFRESH: &str = r#"
local owned = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  if #redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2]) > 0 then
    owned[#owned + 1] = id
  end
end
if #owned > 0 then
  local args = {KEYS[1], ARGV[1], ARGV[2], 0}
  for _, id in ipairs(owned) do args[#args + 1] = id end
  args[#args + 1] = 'JUSTID'
  redis.call('XCLAIM', unpack(args))
end
return owned
"#;

/// Finishes the entries `consumer` still owns: writes each one's dead letter and status
/// record, forgets its failure history, acknowledges and deletes it. Returns the ids it
/// did NOT finish (another consumer owns them now), usually none. KEYS: stream, dead
/// stream, failure hash, then one record key per entry that has a record. ARGV: group,
/// consumer, record TTL, the lowest and highest id of the batch, then per entry: id,
/// has-record (0/1), record JSON, number of dead-letter fields (0: not dead), then those
/// fields' names and values.
///
/// Ownership is one `XPENDING` over the batch's id range for this consumer, not one per
/// entry; acknowledgement, deletion and the failure-history cleanup are one command each
/// for the whole batch, and the cleanup is skipped when no entry of the stream has a
/// failure history. A drain spends most of Redis's time in this script, and Lua pays for
/// every `redis.call` (issue 17: 14 µs of Redis per entry before, measured with
/// `INFO commandstats`).
const FINISH: &str = r#"
local stream, dead, failures = KEYS[1], KEYS[2], KEYS[3]
local group, consumer, ttl = ARGV[1], ARGV[2], ARGV[3]
local entries = 0
local a = 6
while a <= #ARGV do
  entries = entries + 1
  a = a + 4 + 2 * tonumber(ARGV[a + 3])
end
-- This consumer's pending entries in the batch's range. It holds the batch and little
-- else, so a reply as long as the limit may have cut some off: those are checked alone.
local limit = entries + 64
local owned, pending = {}, redis.call('XPENDING', stream, group, ARGV[4], ARGV[5], limit, consumer)
for i = 1, #pending do owned[pending[i][1]] = true end
local cut = #pending >= limit
local finished, lost = {}, {}
local k = 4
a = 6
while a <= #ARGV do
  local id, has_record, n = ARGV[a], ARGV[a + 1] == '1', tonumber(ARGV[a + 3])
  local first = a + 4
  local record_key = nil
  if has_record then
    record_key = KEYS[k]
    k = k + 1
  end
  local mine = owned[id]
  if not mine and cut then
    mine = #redis.call('XPENDING', stream, group, id, id, 1, consumer) > 0
  end
  if mine then
    if n > 0 then
      local args = {dead, '*'}
      for i = first, first + 2 * n - 1 do args[#args + 1] = ARGV[i] end
      redis.call('XADD', unpack(args))
    end
    if has_record then
      redis.call('SET', record_key, ARGV[a + 2], 'EX', ttl)
    end
    finished[#finished + 1] = id
  else
    lost[#lost + 1] = id
  end
  a = first + 2 * n
end
local history = redis.call('EXISTS', failures) == 1
-- unpack takes a few thousand values at most: batches are cut into chunks.
for i = 1, #finished, 1000 do
  local j = math.min(i + 999, #finished)
  redis.call('XACK', stream, group, unpack(finished, i, j))
  redis.call('XDEL', stream, unpack(finished, i, j))
  if history then
    local fields = {}
    for x = i, j do
      fields[#fields + 1] = finished[x] .. ':first'
      fields[#fields + 1] = finished[x] .. ':last'
    end
    redis.call('HDEL', failures, unpack(fields))
  end
end
return lost
"#;

/// The entries one consumer is working on, on one stream, and which of them it lost.
pub struct Lease {
    pub stream: String,
    pub group: String,
    pub consumer: String,
    ids: Vec<String>,
    lost: Mutex<HashSet<String>>,
    /// Entries handed to [`finish`]: acknowledged (or found taken) by its script, so a
    /// refresh that no longer finds them pending says nothing about another consumer.
    finishing: Mutex<HashSet<String>>,
}

impl Lease {
    pub fn new(stream: &str, group: &str, consumer: &str, ids: Vec<String>) -> Self {
        Self {
            stream: stream.to_string(),
            group: group.to_string(),
            consumer: consumer.to_string(),
            ids,
            lost: Mutex::default(),
            finishing: Mutex::default(),
        }
    }

    /// Keeps the entries this consumer still owns; marks the others lost (another consumer
    /// re-claimed them), so no more work is done for them here.
    pub async fn refresh(&self, conn: &RedisConn) -> redis::RedisResult<()> {
        let held: Vec<&String> = {
            let lost = self.lock();
            self.ids.iter().filter(|id| !lost.contains(*id)).collect()
        };
        if held.is_empty() {
            return Ok(());
        }
        let mut conn = conn.clone();
        static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(REFRESH));
        let owned: Vec<String> = SCRIPT
            .key(&self.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(&held)
            .invoke_async(&mut conn)
            .await?;
        let owned: HashSet<&str> = owned.iter().map(String::as_str).collect();
        let finishing = self.finishing.lock().unwrap_or_else(|e| e.into_inner());
        let mut lost = self.lock();
        for id in held {
            // Not pending because finished here (the finish confirming on replicas, say):
            // not lost. Whether a finishing entry was taken, the finish itself tells.
            if finishing.contains(id) {
                continue;
            }
            if !owned.contains(id.as_str()) && lost.insert(id.clone()) {
                metrics::counter!(crate::telemetry::LEASE_LOST).increment(1);
                tracing::warn!(entry_id = %id, stream = %self.stream, consumer = %self.consumer, "entry re-claimed by another consumer; leaving it to them");
            }
        }
        Ok(())
    }

    /// Whether another consumer took `id` over.
    pub fn is_lost(&self, id: &str) -> bool {
        self.lock().contains(id)
    }

    /// Notes that these entries are being finished: from now on only the finish says
    /// whether another consumer took them.
    pub fn mark_finishing<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut finishing = self.finishing.lock().unwrap_or_else(|e| e.into_inner());
        finishing.extend(ids.into_iter().map(str::to_string));
    }

    /// Marks entries as no longer this consumer's (e.g. a finish found them taken).
    pub fn mark_lost<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut lost = self.lock();
        for id in ids {
            if lost.insert(id.to_string()) {
                metrics::counter!(crate::telemetry::LEASE_LOST).increment(1);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How one entry ends: its status record (when it decoded into a request) and, when it
/// died, the dead letter's fields.
pub struct Ending<'a> {
    pub entry_id: &'a str,
    /// `(record key, record JSON)`.
    pub record: Option<(String, String)>,
    /// The dead letter's fields; empty when the entry is done.
    pub dead_letter: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Finishes the entries of `lease` that its consumer still owns (see [`FINISH`]); returns
/// the ids finished. One script, so a dead letter is never written without the ack, nor
/// an ack without its dead letter.
pub async fn finish(
    conn: &RedisConn,
    lease: &Lease,
    ttl_secs: u64,
    endings: &[Ending<'_>],
) -> redis::RedisResult<HashSet<String>> {
    static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(FINISH));
    let ids = || endings.iter().map(|e| e.entry_id);
    let order = |id: &&str| entry_id_numbers(id).unwrap_or_default();
    let (Some(lowest), Some(highest)) = (ids().min_by_key(order), ids().max_by_key(order)) else {
        return Ok(HashSet::new());
    };
    let mut invocation = SCRIPT.key(&lease.stream);
    invocation
        .key(super::dead_stream(&lease.stream))
        .key(super::status::StatusKeys::failures_key(&lease.stream))
        .arg(&lease.group)
        .arg(&lease.consumer)
        .arg(ttl_secs)
        .arg(lowest)
        .arg(highest);
    for ending in endings {
        invocation.arg(ending.entry_id);
        match &ending.record {
            Some((key, json)) => {
                invocation.key(key).arg(1).arg(json);
            }
            None => {
                invocation.arg(0).arg("");
            }
        }
        invocation.arg(ending.dead_letter.len());
        for (name, value) in &ending.dead_letter {
            invocation.arg(name.as_slice()).arg(value.as_slice());
        }
    }
    let mut conn = conn.clone();
    let lost: HashSet<String> = invocation.invoke_async(&mut conn).await?;
    Ok(ids()
        .filter(|id| !lost.contains(*id))
        .map(str::to_string)
        .collect())
}
