//! The operator's console: server-rendered HTML on `ADMIN_ADDR` (default `127.0.0.1:9101`,
//! `off` to disable), served by every process, that works without JavaScript.
//!
//! - [`overview`]: streams, consumers, dead letters, recent rates, dependency health;
//! - [`dead_letters`]: the dead letters, and replay / purge as POST forms;
//! - [`requests`]: one request or user looked up everywhere it can be;
//! - [`access`]: the admin token, the login cookie and the CSRF token;
//! - [`html`], [`form`]: escaping and page frame, form decoding;
//! - [`rates`]: what this process accepted, completed and dead-lettered lately.
//!
//! Every action (sign-in, replay, purge) is logged with who did it and what it did.

pub mod access;
pub mod dead_letters;
pub mod form;
pub mod html;
pub mod overview;
pub mod requests;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, CACHE_CONTROL, CONTENT_TYPE, LOCATION, SET_COOKIE, WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};

use self::access::{Access, Refusal, Viewer, SESSION_COOKIE};
use self::form::Form;
use self::html::{escape, Page};
use crate::connection::RedisConn;
use crate::http::responses::HttpResponse;
use crate::http::routes::ApiState;
use crate::queue::status::StatusKeys;
use crate::queue::{layout, QueueTopology};
use crate::store::Store;

/// Form bodies larger than this are refused; the console's are a few hundred bytes.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// What the console reads and acts on.
pub struct Console {
    /// Readiness as `/readyz` sees it.
    pub api: Arc<ApiState>,
    pub queue: RedisConn,
    pub topology: QueueTopology,
    pub group: String,
    /// `None` in `listen` mode: that process opens no store.
    pub store: Option<Store>,
    pub status: StatusKeys,
    pub access: Access,
    /// `CLAIM_IDLE_MS`: a consumer idle this long with entries pending looks stuck.
    pub claim_idle_ms: u64,
    /// `serve`, `listen` or `work`.
    pub mode: &'static str,
    /// The queue's Redis, for the page (its password, if any, left out).
    pub redis_url: String,
}

impl Console {
    /// This layout's shard streams, then those of earlier layouts still holding entries or
    /// dead letters (`true`).
    pub async fn streams(&self) -> redis::RedisResult<Vec<(String, bool)>> {
        let mut all: Vec<(String, bool)> = self
            .topology
            .shards
            .iter()
            .map(|s| (s.clone(), false))
            .collect();
        let earlier = layout::earlier_streams(
            &self.queue,
            &self.topology.ensure_stream,
            &self.topology.shards,
        )
        .await?;
        all.extend(earlier.into_iter().map(|e| (e.stream, true)));
        Ok(all)
    }
}

/// A Redis URL without its password, for showing.
pub fn redacted_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// Answers one console request; never fails (every error is a page).
pub async fn handle(
    console: Arc<Console>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> HttpResponse {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if path == "/" || path == "/console" {
        return redirect("/console/");
    }
    if !path.starts_with("/console/") {
        return page(
            StatusCode::NOT_FOUND,
            "<h1>Not found</h1><p><a href=\"/console/\">The console</a></p>",
        );
    }
    if path == "/console/login" {
        return login(&console, req, peer).await;
    }
    let viewer = match console.access.admit(req.headers()) {
        Ok(v) => v,
        Err(Refusal::ForeignHost) => {
            tracing::warn!(peer = %peer, "console: refused a request whose Host is not a loopback name");
            return page(
                StatusCode::FORBIDDEN,
                "<h1>Forbidden</h1><p>Without ADMIN_TOKEN the console answers only requests addressed to a loopback name (127.0.0.1, localhost, [::1]).</p>",
            );
        }
        Err(Refusal::NoToken) => return login_page(&console, StatusCode::UNAUTHORIZED, None),
    };
    let logout = (viewer == Viewer::Session).then(|| console.access.csrf().to_string());
    let frame = |p: Page, title: &str, body: &str| {
        html::frame(p, title, viewer.name(), logout.as_deref(), body)
    };
    match (method, path.as_str()) {
        (Method::GET, "/console/") => ok(frame(
            Page::Overview,
            "Overview",
            &overview::render(&console).await,
        )),
        (Method::GET, "/console/dead-letters") => ok(frame(
            Page::DeadLetters,
            "Dead letters",
            &dead_letters::render(&console, None).await,
        )),
        (Method::GET, "/console/requests") => {
            let query = Form::parse(req.uri().query().unwrap_or("").as_bytes());
            let q = query.get("q").unwrap_or("").to_string();
            ok(frame(
                Page::Requests,
                "Requests",
                &requests::render(&console, &q).await,
            ))
        }
        (
            Method::POST,
            "/console/dead-letters/replay" | "/console/dead-letters/purge" | "/console/logout",
        ) => {
            let form = match read_form(req).await {
                Ok(f) => f,
                Err(r) => return r,
            };
            if !console.access.csrf_matches(form.get("csrf")) {
                tracing::warn!(who = viewer.name(), peer = %peer, path = %path, "console: refused a POST without the CSRF token");
                return page(
                    StatusCode::FORBIDDEN,
                    "<h1>Refused</h1><p>The form's CSRF token is missing or stale (the process restarted?). Reload the page and try again.</p>",
                );
            }
            let done = match path.as_str() {
                "/console/logout" => {
                    tracing::info!(who = viewer.name(), peer = %peer, "console: signed out");
                    let mut r = redirect("/console/login");
                    set_cookie(&mut r, &format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/console; Max-Age=0"));
                    return r;
                }
                "/console/dead-letters/purge" => {
                    let older_than = form.get("older_than").unwrap_or("");
                    let done = dead_letters::purge(&console, older_than).await;
                    tracing::info!(who = viewer.name(), peer = %peer, action = "purge", older_than, result = %done.lines.join("; "), "console action");
                    done
                }
                _ => {
                    let (keys, all) = match (form.get("one"), form.get("all")) {
                        (Some(one), _) => (vec![one], false),
                        (None, Some(_)) => (Vec::new(), true),
                        (None, None) => (form.all("id"), false),
                    };
                    let done = dead_letters::replay(&console, &keys, all).await;
                    tracing::info!(who = viewer.name(), peer = %peer, action = "replay", all, ids = %keys.join(","), result = %done.lines.join("; "), "console action");
                    done
                }
            };
            let status = if done.failed {
                StatusCode::CONFLICT
            } else {
                StatusCode::OK
            };
            let body = frame(
                Page::DeadLetters,
                "Dead letters",
                &dead_letters::render(&console, Some(&done)).await,
            );
            let mut r = ok(body);
            *r.status_mut() = status;
            r
        }
        (_, "/console/" | "/console/dead-letters" | "/console/requests") => {
            method_not_allowed("GET")
        }
        (_, "/console/dead-letters/replay" | "/console/dead-letters/purge" | "/console/logout") => {
            method_not_allowed("POST")
        }
        _ => page(
            StatusCode::NOT_FOUND,
            "<h1>Not found</h1><p><a href=\"/console/\">The console</a></p>",
        ),
    }
}

/// `GET /console/login`: the form; `POST`: checks the token, sets the session cookie.
async fn login(console: &Console, req: Request<Incoming>, peer: SocketAddr) -> HttpResponse {
    if !console.access.requires_token() {
        return redirect("/console/");
    }
    match *req.method() {
        Method::GET => login_page(console, StatusCode::OK, None),
        Method::POST => {
            let form = match read_form(req).await {
                Ok(f) => f,
                Err(r) => return r,
            };
            if !console.access.login_csrf_matches(form.get("csrf")) {
                return login_page(
                    console,
                    StatusCode::FORBIDDEN,
                    Some("The form was stale; try again."),
                );
            }
            let token = form.get("token").unwrap_or("").trim();
            if !console.access.token_matches(token.as_bytes()) {
                tracing::warn!(peer = %peer, "console: sign-in with a wrong admin token");
                return login_page(
                    console,
                    StatusCode::UNAUTHORIZED,
                    Some("That is not the admin token."),
                );
            }
            tracing::info!(peer = %peer, "console: signed in with the admin token");
            let mut r = redirect("/console/");
            set_cookie(
                &mut r,
                &format!(
                    "{SESSION_COOKIE}={}; HttpOnly; SameSite=Strict; Path=/console; Max-Age=43200",
                    console.access.session()
                ),
            );
            r
        }
        _ => method_not_allowed("GET, POST"),
    }
}

fn login_page(console: &Console, status: StatusCode, problem: Option<&str>) -> HttpResponse {
    let problem = problem
        .map(|p| format!("<p class=\"err\">{}</p>", escape(p)))
        .unwrap_or_default();
    let body = format!(
        "<h1>Sign in</h1>{problem}<p>The console needs the admin token (<code>ADMIN_TOKEN</code>), here or as <code>Authorization: Bearer</code>.</p>\
         <form method=\"post\" action=\"/console/login\">{}<label>Admin token <input type=\"password\" name=\"token\" autocomplete=\"current-password\" autofocus></label> <button>Sign in</button></form>",
        html::csrf_field(console.access.login_csrf())
    );
    let mut r = page(status, &body);
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"ensure-user console\""),
        );
    }
    r
}

async fn read_form(req: Request<Incoming>) -> Result<Form, HttpResponse> {
    match Limited::new(req.into_body(), MAX_FORM_BYTES)
        .collect()
        .await
    {
        Ok(body) => Ok(Form::parse(&body.to_bytes())),
        Err(_) => Err(page(
            StatusCode::PAYLOAD_TOO_LARGE,
            "<h1>Too large</h1><p>The form's body could not be read or is over 64 KiB.</p>",
        )),
    }
}

/// A page outside the navigation (errors, sign-in).
fn page(status: StatusCode, body: &str) -> HttpResponse {
    let mut r = ok(html::frame(
        Page::Login,
        "ensure-user console",
        "",
        None,
        body,
    ));
    *r.status_mut() = status;
    r
}

fn ok(html: String) -> HttpResponse {
    let mut r = Response::new(Full::new(Bytes::from(html)));
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // No script at all, no framing (clickjacking), forms only to the console itself.
    h.insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    r
}

fn redirect(to: &'static str) -> HttpResponse {
    let mut r = ok(String::new());
    *r.status_mut() = StatusCode::SEE_OTHER;
    r.headers_mut()
        .insert(LOCATION, HeaderValue::from_static(to));
    r
}

fn set_cookie(r: &mut HttpResponse, cookie: &str) {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        r.headers_mut().insert(SET_COOKIE, v);
    }
}

fn method_not_allowed(allow: &'static str) -> HttpResponse {
    let mut r = page(
        StatusCode::METHOD_NOT_ALLOWED,
        "<h1>Method not allowed</h1>",
    );
    r.headers_mut()
        .insert(hyper::header::ALLOW, HeaderValue::from_static(allow));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redacted_url("redis://:secret@redis:6379/0"),
            "redis://…@redis:6379/0"
        );
        assert_eq!(
            redacted_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
