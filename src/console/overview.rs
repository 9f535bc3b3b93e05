//! The overview page: per ingress stream its backlog, pending entries, lag and oldest
//! pending entry; its consumers with their pending count and idle time; dead letters;
//! what this process accepted, completed and dead-lettered lately; dependency health as
//! `/readyz` sees it.
//!
//! Read from Redis when the page is asked for (a few commands per stream), never cached:
//! the numbers an operator compares with `redis-cli` are the ones Redis has now.

use std::fmt::Write as _;
use std::time::Duration;

use redis::Value;

use super::html::{self, escape};
use super::Console;
use crate::clock::now_millis;
use crate::connection::RedisConn;
use crate::queue;
use crate::telemetry::rates::{self, Event};

/// One ingress stream as Redis has it now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamView {
    pub stream: String,
    /// From an earlier shard layout, still being drained.
    pub earlier: bool,
    /// Entries on the stream (every one unfinished: finished entries are deleted).
    pub backlog: u64,
    /// Delivered to a consumer and not yet acknowledged.
    pub pending: u64,
    /// Not yet delivered to any consumer; `None` when Redis cannot tell.
    pub lag: Option<u64>,
    /// Age of the oldest pending entry, from its id (when it was queued).
    pub oldest_pending_ms: Option<u64>,
    pub dead_letters: u64,
    pub consumers: Vec<ConsumerView>,
}

/// One consumer of the group on a stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerView {
    pub name: String,
    pub pending: u64,
    /// Since its last read or claim.
    pub idle_ms: u64,
}

/// Every ingress stream of the queue: this layout's shards, then earlier ones.
pub async fn streams(console: &Console) -> redis::RedisResult<Vec<StreamView>> {
    let mut views = Vec::new();
    for (stream, earlier) in console.streams().await? {
        views.push(stream_view(&console.queue, &stream, &console.group, earlier).await?);
    }
    Ok(views)
}

async fn stream_view(
    conn: &RedisConn,
    stream: &str,
    group: &str,
    earlier: bool,
) -> redis::RedisResult<StreamView> {
    let mut c = conn.clone();
    let backlog: u64 = redis::cmd("XLEN").arg(stream).query_async(&mut c).await?;
    let dead_letters: u64 = redis::cmd("XLEN")
        .arg(queue::dead_stream(stream))
        .query_async(&mut c)
        .await?;
    let mut view = StreamView {
        stream: stream.to_string(),
        earlier,
        backlog,
        dead_letters,
        ..StreamView::default()
    };
    if backlog == 0 && earlier {
        return Ok(view);
    }
    // A stream without the group (nothing created it yet) has nothing pending.
    let groups: Value = match redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(&mut c)
        .await
    {
        Ok(v) => v,
        // `ERR no such key`: the stream does not exist yet.
        Err(e) if e.code().is_some() => return Ok(view),
        Err(e) => return Err(e),
    };
    let Some(info) = as_list(&groups)
        .iter()
        .map(pairs)
        .find(|g| text(g, "name").as_deref() == Some(group))
    else {
        view.lag = Some(backlog);
        return Ok(view);
    };
    view.pending = number(&info, "pending").unwrap_or(0);
    view.lag = number(&info, "lag");
    if view.pending > 0 {
        // XPENDING's summary: [count, smallest id, greatest id, [[consumer, count]…]].
        let summary: Value = redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .query_async(&mut c)
            .await?;
        if let Some(smallest) = as_list(&summary)
            .get(1)
            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
        {
            view.oldest_pending_ms = smallest
                .split('-')
                .next()
                .and_then(|ms| ms.parse::<u64>().ok())
                .map(|ms| now_millis().saturating_sub(ms));
        }
    }
    let consumers: Value = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg(group)
        .query_async(&mut c)
        .await?;
    view.consumers = as_list(&consumers)
        .iter()
        .map(|c| {
            let fields = pairs(c);
            ConsumerView {
                name: text(&fields, "name").unwrap_or_default(),
                pending: number(&fields, "pending").unwrap_or(0),
                idle_ms: number(&fields, "idle").unwrap_or(0),
            }
        })
        .collect();
    Ok(view)
}

fn as_list(value: &Value) -> &[Value] {
    match value {
        Value::Array(items) | Value::Set(items) => items,
        _ => &[],
    }
}

/// The name-value pairs of an `XINFO` answer, flat array (RESP2) or map (RESP3).
fn pairs(value: &Value) -> Vec<(String, Value)> {
    match value {
        Value::Array(flat) => flat
            .chunks(2)
            .filter_map(|kv| {
                Some((
                    redis::from_redis_value_ref::<String>(&kv[0]).ok()?,
                    kv.get(1)?.clone(),
                ))
            })
            .collect(),
        Value::Map(map) => map
            .iter()
            .filter_map(|(k, v)| Some((redis::from_redis_value_ref::<String>(k).ok()?, v.clone())))
            .collect(),
        _ => Vec::new(),
    }
}

fn field<'a>(fields: &'a [(String, Value)], name: &str) -> Option<&'a Value> {
    fields.iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

fn text(fields: &[(String, Value)], name: &str) -> Option<String> {
    redis::from_redis_value_ref(field(fields, name)?).ok()
}

fn number(fields: &[(String, Value)], name: &str) -> Option<u64> {
    redis::from_redis_value_ref(field(fields, name)?).ok()
}

/// The overview's HTML body.
pub async fn render(console: &Console) -> String {
    let mut body = String::from("<h1>Overview</h1>");
    let _ = write!(
        body,
        "<p class=\"muted\">This process: <code>{}</code> · queue Redis <code>{}</code> · group <code>{}</code> · refreshes every 10 s</p>",
        escape(console.mode),
        escape(&console.redis_url),
        escape(&console.group)
    );

    body.push_str("<h2>Dependencies (as /readyz sees them)</h2><table id=\"dependencies\"><tr><th>dependency</th><th>state</th></tr>");
    let failing = console.api.readiness.failing_as_sampled();
    for dependency in console.api.readiness.dependencies() {
        let name = console.api.readiness.name(dependency);
        let (class, state) = if failing.contains(&name) {
            ("bad", "failing")
        } else {
            ("ok", "up")
        };
        let _ = write!(
            body,
            "<tr><td>{}</td><td class=\"{class}\" data-dependency=\"{}\">{state}</td></tr>",
            escape(name),
            escape(name)
        );
    }
    body.push_str("</table>");

    body.push_str("<h2>Ingress streams</h2>");
    match tokio::time::timeout(Duration::from_secs(3), streams(console)).await {
        Ok(Ok(views)) => render_streams(&mut body, &views, console.claim_idle_ms),
        Ok(Err(e)) => {
            let _ = write!(
                body,
                "<p class=\"err\">The queue's Redis answered with an error: {}</p>",
                escape(&e.to_string())
            );
        }
        Err(_) => {
            body.push_str("<p class=\"err\">The queue's Redis did not answer within 3 s.</p>")
        }
    }

    let window = rates::process().window();
    body.push_str("<h2>This process, lately</h2><table id=\"rates\"><tr><th></th><th>last minute</th><th>last hour</th></tr>");
    for (event, name) in [
        (
            Event::Accepted,
            "accepted (queued requests answered 200, 202 or 500)",
        ),
        (
            Event::Completed,
            "completed (stored, published, acknowledged)",
        ),
        (Event::Failed, "failed (moved to the dead letters)"),
    ] {
        let _ = write!(
            body,
            "<tr><td>{name}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            window.minute(event),
            window.hour(event)
        );
    }
    body.push_str("</table><p class=\"muted\">Counted by this process since it started, in 10-second buckets (the last minute is the last 50–60 s). Other processes of the queue count their own; Prometheus has the totals.</p>");
    body
}

fn render_streams(body: &mut String, views: &[StreamView], claim_idle_ms: u64) {
    body.push_str("<table id=\"streams\"><tr><th>stream</th><th>backlog</th><th>pending</th><th>lag</th><th>oldest pending</th><th>dead letters</th><th>consumers</th></tr>");
    for v in views {
        let earlier = if v.earlier {
            " <span class=\"muted\">(earlier layout, draining)</span>"
        } else {
            ""
        };
        let _ = write!(
            body,
            "<tr data-stream=\"{s}\"><td><code>{s}</code>{earlier}</td><td class=\"n\" data-field=\"backlog\">{}</td><td class=\"n\" data-field=\"pending\">{}</td><td class=\"n\" data-field=\"lag\">{}</td><td class=\"n\">{}</td><td class=\"n\" data-field=\"dead\">{}</td><td class=\"n\">{}</td></tr>",
            v.backlog,
            v.pending,
            v.lag.map_or("?".to_string(), |l| l.to_string()),
            v.oldest_pending_ms.map_or("—".to_string(), html::age),
            v.dead_letters,
            v.consumers.len(),
            s = escape(&v.stream),
        );
    }
    body.push_str("</table>");
    let total_dead: u64 = views.iter().map(|v| v.dead_letters).sum();
    let _ = write!(
        body,
        "<p>Dead letters: <strong id=\"dead-total\">{total_dead}</strong> — <a href=\"/console/dead-letters\">see them</a></p>"
    );

    body.push_str("<h2>Consumers</h2><table id=\"consumers\"><tr><th>stream</th><th>consumer</th><th>pending</th><th>idle</th><th></th></tr>");
    let mut any = false;
    for v in views {
        for c in &v.consumers {
            any = true;
            // Idle past CLAIM_IDLE_MS with entries pending: crashed or stuck; its entries
            // are about to be (or are being) taken over by a live consumer.
            let flag = if c.pending > 0 && c.idle_ms >= claim_idle_ms {
                "<span class=\"bad\">stuck?</span>"
            } else if c.pending == 0 && c.idle_ms >= 3_600_000 {
                "<span class=\"muted\">gone?</span>"
            } else {
                ""
            };
            let _ = write!(
                body,
                "<tr><td><code>{}</code></td><td><code>{}</code></td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{flag}</td></tr>",
                escape(&v.stream),
                escape(&c.name),
                c.pending,
                html::age(c.idle_ms)
            );
        }
    }
    if !any {
        body.push_str("<tr><td colspan=\"5\" class=\"muted\">no consumer has read yet</td></tr>");
    }
    body.push_str("</table>");
}
