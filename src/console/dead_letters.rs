//! The dead-letter page: every letter with its fields, and the operator's actions on them
//! (replay one, replay the selected, replay all, purge older than), each a POST form with
//! the CSRF token, answered with the page and what the action did at its top.
//!
//! The actions are the CLI's (`queue::dead_letters`): a replay puts the letter back and
//! deletes it in one script, so a refused replay leaves it a dead letter.

use std::fmt::Write as _;

use super::html::{self, csrf_field, escape, escape_bytes};
use super::Console;
use crate::clock::now_millis;
use crate::connection::{self, RawEntry};
use crate::queue::dead_letters::{fields, DeadLetters};
use crate::queue::ingress::fields as entry;

/// Letters shown at most on one page; the CLI lists them all.
const SHOWN: usize = 500;

/// What an action did, line by line, for the top of the page and the log.
#[derive(Debug, Clone, Default)]
pub struct Done {
    pub lines: Vec<String>,
    pub failed: bool,
}

impl Done {
    fn line(&mut self, text: String) {
        self.lines.push(text);
    }
}

/// A letter's form value: `<id>@<stream>` (ids never hold an `@`; shards can share ids).
fn key(stream: &str, id: &str) -> String {
    format!("{id}@{stream}")
}

async fn tools(console: &Console) -> redis::RedisResult<(DeadLetters, Vec<String>)> {
    let streams: Vec<String> = console
        .streams()
        .await?
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    Ok((
        DeadLetters::new(console.queue.clone(), streams.clone()),
        streams,
    ))
}

/// Replays the letters named by `keys` (`<id>@<stream>`), or every letter with `all`.
pub async fn replay(console: &Console, keys: &[&str], all: bool) -> Done {
    let mut done = Done::default();
    let (tools, streams) = match tools(console).await {
        Ok(t) => t,
        Err(e) => {
            done.failed = true;
            done.line(format!("nothing replayed: the queue's Redis answered {e}"));
            return done;
        }
    };
    let targets: Vec<(String, Option<RawEntry>, String)> = if all {
        match tools.list().await {
            Ok(letters) => letters
                .into_iter()
                .map(|(stream, letter)| (stream, Some(letter.clone()), letter.id))
                .collect(),
            Err(e) => {
                done.failed = true;
                done.line(format!(
                    "nothing replayed: cannot list the dead letters: {e}"
                ));
                return done;
            }
        }
    } else {
        let mut targets = Vec::new();
        for key in keys {
            let Some((id, stream)) = key.split_once('@') else {
                done.failed = true;
                done.line(format!("not replayed {key}: not a dead letter's id"));
                continue;
            };
            if !streams.iter().any(|s| s == stream) {
                done.failed = true;
                done.line(format!(
                    "not replayed {id}: {stream} is not an ingress stream of this queue"
                ));
                continue;
            }
            targets.push((
                stream.to_string(),
                find(console, stream, id).await,
                id.to_string(),
            ));
        }
        targets
    };
    if targets.is_empty() && !done.failed {
        done.line("nothing to replay: no dead letter was selected".into());
    }
    let mut replayed = 0;
    for (stream, letter, id) in &targets {
        let Some(letter) = letter else {
            done.failed = true;
            done.line(format!(
                "not replayed {id} on {stream}: no such dead letter (any more)"
            ));
            continue;
        };
        match tools.replay_letter(stream, letter).await {
            Ok(Some(new_id)) => {
                replayed += 1;
                done.line(format!("replayed {id} on {stream} as {new_id}"));
            }
            Ok(None) => {
                done.failed = true;
                done.line(format!(
                    "not replayed {id} on {stream}: no such dead letter (any more)"
                ));
            }
            Err(e) => {
                done.failed = true;
                done.line(format!("not replayed {id} on {stream}: {e}"));
            }
        }
    }
    done.line(format!("{replayed} of {} replayed", targets.len()));
    done
}

async fn find(console: &Console, stream: &str, id: &str) -> Option<RawEntry> {
    let mut conn = console.queue.clone();
    let value: redis::Value = redis::cmd("XRANGE")
        .arg(crate::queue::dead_stream(stream))
        .arg(id)
        .arg(id)
        .query_async(&mut conn)
        .await
        .ok()?;
    connection::parse_entries(&value).into_iter().next()
}

/// Purges the letters older than `older_than` (`30s`, `15m`, `12h`, `7d`; `0s`: all).
pub async fn purge(console: &Console, older_than: &str) -> Done {
    let mut done = Done::default();
    let age = match crate::clock::parse_age_ms(older_than) {
        Ok(ms) => ms,
        Err(why) => {
            done.failed = true;
            done.line(format!("nothing purged: {why}"));
            return done;
        }
    };
    match tools(console).await {
        Ok((tools, _)) => match tools.purge(Some(age)).await {
            Ok(n) => done.line(format!(
                "purged {n} dead letter(s) older than {}",
                older_than.trim()
            )),
            Err(e) => {
                done.failed = true;
                done.line(format!("nothing purged: {e}"));
            }
        },
        Err(e) => {
            done.failed = true;
            done.line(format!("nothing purged: the queue's Redis answered {e}"));
        }
    }
    done
}

fn millis_field(letter: &RawEntry, name: &str) -> Option<u64> {
    std::str::from_utf8(letter.field(name)?).ok()?.parse().ok()
}

/// The page, with what an action did at its top.
pub async fn render(console: &Console, done: Option<&Done>) -> String {
    let mut body = String::from("<h1>Dead letters</h1>");
    if let Some(done) = done {
        let class = if done.failed { "err" } else { "done" };
        let _ = write!(body, "<div class=\"{class}\" id=\"done\">");
        for line in &done.lines {
            let _ = write!(body, "<div>{}</div>", escape(line));
        }
        body.push_str("</div>");
    }
    let letters = match tools(console).await {
        Ok((tools, _)) => tools.list().await,
        Err(e) => Err(e),
    };
    let letters = match letters {
        Ok(l) => l,
        Err(e) => {
            let _ = write!(
                body,
                "<p class=\"err\">Cannot read the dead letters: {}</p>",
                escape(&e.to_string())
            );
            return body;
        }
    };
    let csrf = console.access.csrf();
    let _ = write!(
        body,
        "<p><span id=\"dead-count\">{}</span> dead letter(s). A replay puts a letter back on its ingress stream (without its <code>dead_*</code> fields; nobody waits for its answer) and deletes it, atomically.</p>",
        letters.len()
    );
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/console/dead-letters/replay\" class=\"inline\">{}<input type=\"hidden\" name=\"all\" value=\"1\"><button id=\"replay-all\">Replay all</button></form> \
         <form method=\"post\" action=\"/console/dead-letters/purge\" class=\"inline\">{}<label>Purge older than <input name=\"older_than\" value=\"7d\" size=\"5\"></label> <button id=\"purge\">Purge</button></form>",
        csrf_field(csrf),
        csrf_field(csrf)
    );
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/console/dead-letters/replay\" id=\"letters\">{}\
         <table><tr><th></th><th>id</th><th>user</th><th>reason</th><th>deliveries</th><th>first failure</th><th>last failure</th><th>fields</th><th></th></tr>",
        csrf_field(csrf)
    );
    if letters.is_empty() {
        body.push_str("<tr><td colspan=\"9\" class=\"muted\">no dead letters</td></tr>");
    }
    let now = now_millis();
    for (stream, letter) in letters.iter().take(SHOWN) {
        let k = escape(&key(stream, &letter.id));
        let user = letter
            .field(entry::USER_ID)
            .map(escape_bytes)
            .unwrap_or_default();
        let reason = letter
            .field(fields::REASON)
            .map(escape_bytes)
            .unwrap_or_default();
        let deliveries = letter
            .field(fields::DELIVERIES)
            .map(escape_bytes)
            .unwrap_or_default();
        let when = |name| {
            millis_field(letter, name).map_or("—".to_string(), |ms| {
                format!(
                    "{} ({} ago)",
                    html::time(ms),
                    html::age(now.saturating_sub(ms))
                )
            })
        };
        let mut all_fields = String::new();
        for (name, value) in letter.fields.iter().flatten() {
            let _ = writeln!(all_fields, "{}={}", escape_bytes(name), escape_bytes(value));
        }
        let _ = write!(
            body,
            "<tr data-id=\"{id}\"><td><input type=\"checkbox\" name=\"id\" value=\"{k}\" aria-label=\"select {id}\"></td>\
             <td><code>{id}</code><div class=\"muted\">{}</div></td><td><code>{user}</code></td><td>{reason}</td><td class=\"n\">{deliveries}</td>\
             <td>{}</td><td>{}</td><td class=\"f\">{all_fields}</td>\
             <td><button name=\"one\" value=\"{k}\">Replay</button></td></tr>",
            escape(stream),
            when(fields::FIRST_FAILED_AT),
            when(fields::LAST_FAILED_AT),
            id = escape(&letter.id),
        );
    }
    body.push_str("</table>");
    if letters.len() > SHOWN {
        let _ = write!(
            body,
            "<p class=\"muted\">The first {SHOWN} of {} shown; <code>ensure-user dead-letters list</code> lists them all.</p>",
            letters.len()
        );
    }
    body.push_str("<button name=\"selected\" value=\"1\" id=\"replay-selected\">Replay selected</button></form>");
    body
}
