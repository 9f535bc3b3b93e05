//! HTML by hand: one escaping function every piece of data goes through, and the page
//! frame the console's pages share.
//!
//! No template engine and no front-end build: the pages are small, and one function that
//! escapes everything taken from Redis, the store or the request keeps them safe. Values
//! that are not UTF-8 are shown lossily (the CLI's `list --json` gives them byte for byte).

use std::fmt::Write as _;

/// Escapes text for an HTML element's content or a quoted attribute value.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes bytes that may not be UTF-8.
pub fn escape_bytes(bytes: &[u8]) -> String {
    escape(&String::from_utf8_lossy(bytes))
}

/// Percent-encodes a query-string value (RFC 3986 unreserved characters stay as they are).
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A duration in milliseconds as an operator reads it: `850 ms`, `12.3 s`, `4 min`, `2 h`.
pub fn age(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1_000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..=7_199_999 => format!("{} min", ms / 60_000),
        _ => format!("{} h", ms / 3_600_000),
    }
}

/// A Unix time in milliseconds as UTC, `2024-06-10 06:13:20 UTC`.
pub fn time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Which page a frame shows, for the navigation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Overview,
    DeadLetters,
    Requests,
    Login,
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d1d1f;background:#f6f7f9}\
header{background:#1f2937;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:center}\
header a{color:#cbd5e1;text-decoration:none}header a.on{color:#fff;font-weight:600}\
header .who{margin-left:auto;color:#9ca3af;font-size:12px}header form{margin:0}\
main{padding:16px 20px}h1{font-size:20px;margin:4px 0 12px}h2{font-size:16px;margin:20px 0 8px}\
table{border-collapse:collapse;background:#fff;margin-bottom:8px}\
th,td{border:1px solid #d1d5db;padding:4px 8px;text-align:left;vertical-align:top}\
th{background:#eef0f3}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.ok{color:#047857;font-weight:600}.bad{color:#b91c1c;font-weight:600}.warn{color:#b45309;font-weight:600}\
.done{background:#ecfdf5;border:1px solid #6ee7b7;padding:8px 12px;margin-bottom:12px}\
.err{background:#fef2f2;border:1px solid #fca5a5;padding:8px 12px;margin-bottom:12px}\
code,.f{font-family:ui-monospace,monospace;font-size:12px}.f{white-space:pre-wrap;word-break:break-all}\
.muted{color:#6b7280}button{cursor:pointer}form.inline{display:inline}";

/// The whole page: head, navigation, `body`. `who` says how the viewer got in; `logout`
/// shows the sign-out button (only a cookie session can sign out).
pub fn frame(page: Page, title: &str, who: &str, logout: Option<&str>, body: &str) -> String {
    let link = |p: Page, href: &str, text: &str| {
        let class = if p == page { " class=\"on\"" } else { "" };
        format!("<a href=\"{href}\"{class}>{text}</a>")
    };
    let refresh = if page == Page::Overview {
        // Progressive enhancement without script: the overview refreshes itself.
        "<meta http-equiv=\"refresh\" content=\"10\">"
    } else {
        ""
    };
    let logout = logout
        .map(|csrf| {
            format!(
                "<form method=\"post\" action=\"/console/logout\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button>Sign out</button></form>",
                escape(csrf)
            )
        })
        .unwrap_or_default();
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">{refresh}<title>{} · ensure-user console</title>\
         <style>{STYLE}</style></head><body><header><strong>ensure-user</strong>{}{}{}\
         <span class=\"who\">{}</span>{logout}</header><main>{body}</main></body></html>",
        escape(title),
        link(Page::Overview, "/console/", "Overview"),
        link(Page::DeadLetters, "/console/dead-letters", "Dead letters"),
        link(Page::Requests, "/console/requests", "Requests"),
        escape(who),
    )
}

/// A hidden CSRF field for a form.
pub fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        escape(csrf)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            escape(r#"<script>alert("x") & 'y'</script>"#),
            "&lt;script&gt;alert(&quot;x&quot;) &amp; &#39;y&#39;&lt;/script&gt;"
        );
        assert_eq!(
            escape("plain user-42@example.com"),
            "plain user-42@example.com"
        );
        assert_eq!(escape_bytes(b"\xff<"), "\u{fffd}&lt;");
    }

    #[test]
    fn formats_times_and_ages() {
        assert_eq!(time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(time(1_718_000_000_000), "2024-06-10 06:13:20 UTC");
        assert_eq!(age(850), "850 ms");
        assert_eq!(age(12_345), "12.3 s");
        assert_eq!(age(240_000), "4 min");
        assert_eq!(url_encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }

    proptest! {
        /// Whatever the text, its escaped form has no character that could open a tag,
        /// an entity other than ours, or close an attribute.
        #[test]
        fn escaped_text_cannot_break_out(text in ".*") {
            let escaped = escape(&text);
            prop_assert!(!escaped.contains(['<', '>', '"', '\'']));
            for (i, _) in escaped.match_indices('&') {
                let rest = &escaped[i..];
                prop_assert!(["&amp;", "&lt;", "&gt;", "&quot;", "&#39;"].iter().any(|e| rest.starts_with(e)));
            }
        }
    }
}
