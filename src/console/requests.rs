//! The request page: "why was user X not created?" answered in one place. Looks a request
//! id or a user id (or an email) up in the status records, the store, the ingress streams
//! (queued or pending, with the consumer and deliveries), the dead letters and the failure
//! history.

use std::fmt::Write as _;

use super::html::{self, escape, escape_bytes};
use super::Console;
use crate::clock::now_millis;
use crate::connection::{self, RawEntry};
use crate::queue::dead_letters::fields as dead;
use crate::queue::ingress::fields as entry;

/// Entries read per stream when looking for a user's: a backlog larger than this is only
/// searched at its head (the oldest entries), and the page says so.
const SCANNED: usize = 10_000;

/// An entry that matched, where it is.
struct Found {
    stream: String,
    entry: RawEntry,
    /// `(consumer, idle ms, deliveries)` when delivered and unacknowledged.
    pending: Option<(String, u64, u64)>,
}

fn matches(e: &RawEntry, q: &str) -> bool {
    [entry::REQUEST_ID, entry::USER_ID, entry::EMAIL]
        .iter()
        .any(|f| e.field(f) == Some(q.as_bytes()))
}

/// The page for a lookup of `q` (empty: the form alone).
pub async fn render(console: &Console, q: &str) -> String {
    let q = q.trim();
    let mut body = String::from("<h1>Requests</h1>");
    let _ = write!(
        body,
        "<form method=\"get\" action=\"/console/requests\"><label>Request id, user id or email <input name=\"q\" value=\"{}\" size=\"40\" autofocus></label> <button>Look up</button></form>",
        escape(q)
    );
    if q.is_empty() {
        return body;
    }
    let streams = match console.streams().await {
        Ok(s) => s,
        Err(e) => {
            let _ = write!(
                body,
                "<p class=\"err\">The queue's Redis answered: {}</p>",
                escape(&e.to_string())
            );
            return body;
        }
    };

    // Status record: the request id's, on whichever shard it was queued.
    body.push_str("<h2>Status record</h2>");
    let mut users: Vec<String> = vec![q.to_string()];
    let mut record_found = false;
    for (stream, _) in &streams {
        match console.status.fetch(&console.queue, stream, q).await {
            Ok(Some(record)) => {
                record_found = true;
                let _ = write!(
                    body,
                    "<table id=\"record\"><tr><th>request</th><td><code>{}</code></td></tr><tr><th>state</th><td><strong>{}</strong></td></tr>\
                     <tr><th>token's user</th><td><code>{}</code></td></tr><tr><th>stored as user</th><td><code>{}</code></td></tr>\
                     <tr><th>reason</th><td>{}</td></tr><tr><th>last error</th><td>{}</td></tr><tr><th>stream</th><td><code>{}</code></td></tr></table>",
                    escape(&record.request_id),
                    escape(&format!("{:?}", record.state).to_lowercase()),
                    escape(&record.owner),
                    escape(record.user_id.as_deref().unwrap_or("—")),
                    escape(record.reason.as_deref().unwrap_or("—")),
                    escape(record.last_error.as_deref().unwrap_or("—")),
                    escape(stream),
                );
                users.push(record.owner.clone());
                users.extend(record.user_id.clone());
            }
            Ok(None) => {}
            Err(e) => {
                let _ = write!(body, "<p class=\"err\">{}</p>", escape(&e.to_string()));
            }
        }
    }
    if !record_found {
        let _ = write!(
            body,
            "<p class=\"muted\">No status record for <code>{}</code> (not a request id, or older than OUTCOME_TTL_SECS; records are written only for requests answered 202 and by workers).</p>",
            escape(q)
        );
    }
    users.sort();
    users.dedup();

    // The stored row: the store's canonical pair.
    body.push_str("<h2>Stored row</h2>");
    match &console.store {
        None => body.push_str("<p class=\"muted\">This process runs no workers and has no store open; look it up on a <code>work</code> or <code>serve</code> process's console.</p>"),
        Some(store) => {
            let mut rows = Vec::new();
            let mut error = None;
            for user in &users {
                match store.find(user).await {
                    Ok(found) => rows.extend(found),
                    Err(e) => error = Some(e.to_string()),
                }
            }
            rows.sort_by(|a, b| a.user_id.cmp(&b.user_id));
            rows.dedup();
            if let Some(e) = error {
                let _ = write!(body, "<p class=\"err\">The store failed: {}</p>", escape(&e));
            }
            if rows.is_empty() {
                let _ = write!(body, "<p id=\"row\" class=\"warn\">No row in {} for {}.</p>", store.name(), escape(&users.join(", ")));
            } else {
                body.push_str("<table id=\"row\"><tr><th>user id (canonical)</th><th>email</th></tr>");
                for row in &rows {
                    let _ = write!(body, "<tr><td><code>{}</code></td><td><code>{}</code></td></tr>", escape(&row.user_id), escape(&row.email));
                }
                body.push_str("</table>");
            }
        }
    }

    // On the ingress streams: queued, or pending with a consumer.
    body.push_str("<h2>On the queue</h2>");
    let mut found = Vec::new();
    let mut truncated = Vec::new();
    for (stream, _) in &streams {
        let mut conn = console.queue.clone();
        let value: redis::Value = match redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(SCANNED)
            .query_async(&mut conn)
            .await
        {
            Ok(v) => v,
            Err(e) => {
                let _ = write!(body, "<p class=\"err\">{}</p>", escape(&e.to_string()));
                continue;
            }
        };
        let entries = connection::parse_entries(&value);
        if entries.len() >= SCANNED {
            truncated.push(stream.clone());
        }
        for e in entries {
            if users.iter().any(|u| matches(&e, u)) {
                let pending = pending_of(console, stream, &e.id).await;
                found.push(Found {
                    stream: stream.clone(),
                    entry: e,
                    pending,
                });
            }
        }
    }
    if found.is_empty() {
        body.push_str("<p id=\"queue\" class=\"muted\">Not on the queue (never queued, or finished: finished entries are deleted).</p>");
    } else {
        body.push_str("<table id=\"queue\"><tr><th>entry</th><th>stream</th><th>request</th><th>user</th><th>state</th><th>failure history</th></tr>");
        for f in &found {
            let state = match &f.pending {
                Some((consumer, idle, deliveries)) => format!(
                    "pending at {consumer}, idle {}, delivered {deliveries} time(s)",
                    html::age(*idle)
                ),
                None => "queued, not yet delivered".to_string(),
            };
            let history = history(console, &f.stream, &f.entry.id).await;
            let _ = write!(
                body,
                "<tr><td><code>{}</code></td><td><code>{}</code></td><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td>{history}</td></tr>",
                escape(&f.entry.id),
                escape(&f.stream),
                f.entry.field(entry::REQUEST_ID).map(escape_bytes).unwrap_or_default(),
                f.entry.field(entry::USER_ID).map(escape_bytes).unwrap_or_default(),
                escape(&state),
            );
        }
        body.push_str("</table>");
    }
    if !truncated.is_empty() {
        let _ = write!(
            body,
            "<p class=\"warn\">Only the oldest {SCANNED} entries of {} were searched.</p>",
            escape(&truncated.join(", "))
        );
    }

    // Dead letters.
    body.push_str("<h2>Dead letters</h2>");
    let tools = crate::queue::dead_letters::DeadLetters::new(
        console.queue.clone(),
        streams.iter().map(|(s, _)| s.clone()).collect(),
    );
    match tools.list().await {
        Ok(letters) => {
            let mine: Vec<_> = letters
                .into_iter()
                .filter(|(_, l)| users.iter().any(|u| matches(l, u)))
                .collect();
            if mine.is_empty() {
                body.push_str("<p id=\"dead\" class=\"muted\">No dead letter.</p>");
            } else {
                body.push_str("<table id=\"dead\"><tr><th>dead letter</th><th>stream</th><th>request</th><th>reason</th><th>deliveries</th><th>first / last failure</th></tr>");
                let now = now_millis();
                for (stream, l) in &mine {
                    let when = |name| {
                        l.field(name)
                            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
                            .map_or("—".to_string(), |ms| {
                                format!(
                                    "{} ({} ago)",
                                    html::time(ms),
                                    html::age(now.saturating_sub(ms))
                                )
                            })
                    };
                    let _ = write!(
                        body,
                        "<tr><td><code>{}</code> <a href=\"/console/dead-letters\">replay…</a></td><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td class=\"n\">{}</td><td>{}<br>{}</td></tr>",
                        escape(&l.id),
                        escape(stream),
                        l.field(entry::REQUEST_ID).map(escape_bytes).unwrap_or_default(),
                        l.field(dead::REASON).map(escape_bytes).unwrap_or_default(),
                        l.field(dead::DELIVERIES).map(escape_bytes).unwrap_or_default(),
                        escape(&when(dead::FIRST_FAILED_AT)),
                        escape(&when(dead::LAST_FAILED_AT)),
                    );
                }
                body.push_str("</table>");
            }
        }
        Err(e) => {
            let _ = write!(body, "<p class=\"err\">{}</p>", escape(&e.to_string()));
        }
    }
    body
}

/// The consumer, idle time and deliveries of a pending entry; `None` when not delivered.
async fn pending_of(console: &Console, stream: &str, id: &str) -> Option<(String, u64, u64)> {
    let mut conn = console.queue.clone();
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(&console.group)
        .arg(id)
        .arg(id)
        .arg(1)
        .query_async(&mut conn)
        .await
        .ok()?;
    rows.into_iter()
        .next()
        .map(|(_, consumer, idle, n)| (consumer, idle, n))
}

async fn history(console: &Console, stream: &str, id: &str) -> String {
    match console.status.failure_of(&console.queue, stream, id).await {
        Some(h) => format!(
            "first failed {}, last {}: {}",
            escape(&html::time(h.first_at_ms)),
            escape(&html::time(h.last_at_ms)),
            escape(&h.last_error)
        ),
        None => "<span class=\"muted\">no failure</span>".to_string(),
    }
}
