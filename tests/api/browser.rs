//! A real browser: headless Chromium loads a page from a second local origin whose script
//! runs the platform's two client snippets against the API, reads a 202's `Location` and
//! follows it; a page on an origin not on `CORS_ALLOWED_ORIGINS` is refused by the browser.
//!
//! How the test learns the page's result without sleeping: the page POSTs its result to
//! its own server, and holds its `load` event on an image that server only answers once
//! the result is in. `chromium --dump-dom` prints the DOM after `load` and exits, so when
//! the browser has exited the result is there, in the test's hands and in the DOM.
//!
//! Skipped, with a message, only when `chromium` is not installed and `CI` is not set; in
//! CI a missing browser fails (`scripts/install-deps` installs it).

use std::convert::Infallible;
use std::io::Write as _;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::watch;

use crate::helpers::*;

/// How long one page may take, browser start included.
const PAGE_DEADLINE: Duration = Duration::from_secs(20);

/// The platform's client snippets, as its web app runs them (only `API` is the page's).
const CLIENT_SNIPPETS: &str = r#"
async function recoverUserState(token) {
  const response = await fetch(`${API}/api/v1/auth/ensure-user`, {
    method: 'POST', headers: { 'Authorization': `Bearer ${token}`, 'Content-Type': 'application/json' }, body: JSON.stringify({}) });
  const data = await response.json();
  return data.success;
}
async function onboardNewUser(token) {
  const response = await fetch(`${API}/api/v1/auth/ensure-user`, {
    method: 'POST', headers: { 'Authorization': `Bearer ${token}`, 'Content-Type': 'application/json' } });
  return response.ok;
}
"#;

/// The page's own steps: both snippets, a request answered 202 whose `Location` it reads
/// and follows, and a `no-cors` probe that shows the API is reachable from the page.
const PAGE_SCRIPT: &str = r#"
async function queuedAndFollowed(token) {
  const response = await fetch(`${API_QUEUED}/api/v1/auth/ensure-user`, {
    method: 'POST', headers: { 'Authorization': `Bearer ${token}`, 'Content-Type': 'application/json' }, body: JSON.stringify({}) });
  const location = response.headers.get('Location');
  const data = await response.json();
  const status = await fetch(`${API_QUEUED}${location}`, { headers: { 'Authorization': `Bearer ${token}` } });
  const record = await status.json();
  return { status: response.status, location, requestId: data.requestId,
           statusAnswer: status.status, statusRequestId: record.requestId };
}
async function reachable() {
  // An opaque answer: the browser did reach the API (the page may not read it).
  const response = await fetch(`${API}/healthz`, { mode: 'no-cors' });
  return response.type;
}
async function step(name, run, result) {
  try { result[name] = await run(); }
  catch (e) { result[name] = { error: `${e.name}: ${e.message}` }; }
}
(async () => {
  const result = {};
  await step('recoverUserState', () => recoverUserState(TOKENS.recover), result);
  await step('onboardNewUser', () => onboardNewUser(TOKENS.onboard), result);
  await step('queued', () => queuedAndFollowed(TOKENS.queued), result);
  await step('reachable', reachable, result);
  const text = JSON.stringify(result);
  document.getElementById('result').textContent = text;
  await fetch('/result', { method: 'POST', body: text });
})();
"#;

fn page_html(api: &str, api_queued: &str, tokens: &Value) -> String {
    let js = |s: &str| serde_json::to_string(s).unwrap();
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>ensure-user from another origin</title></head>\
         <body><pre id=\"result\">running</pre><script>\nconst API = {};\nconst API_QUEUED = {};\nconst TOKENS = {};\n{CLIENT_SNIPPETS}{PAGE_SCRIPT}</script>\
         <img src=\"/hold.gif\" alt=\"\"></body></html>",
        js(api),
        js(api_queued),
        tokens
    )
}

/// A page's own origin: serves the page, takes its result, holds `load` until then.
struct PageServer {
    origin: String,
    result: watch::Receiver<Option<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl PageServer {
    /// A listener of its own, bound before the page is known (its origin goes in settings).
    async fn bind() -> tokio::net::TcpListener {
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
    }

    fn serve(listener: tokio::net::TcpListener, html: String) -> Self {
        let origin = format!("http://{}", listener.local_addr().unwrap());
        let html = Arc::new(html);
        let (sender, result) = watch::channel(None);
        let sender = Arc::new(sender);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (html, sender) = (Arc::clone(&html), Arc::clone(&sender));
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        page_answer(req, Arc::clone(&html), Arc::clone(&sender))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            origin,
            result,
            task,
        }
    }

    fn url(&self) -> String {
        format!("{}/page.html", self.origin)
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn page_answer(
    req: Request<Incoming>,
    html: Arc<String>,
    result: Arc<watch::Sender<Option<String>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/page.html") => (200, "text/html; charset=utf-8", html.as_bytes().to_vec()),
        ("POST", "/result") => {
            let body = req.into_body().collect().await.map(|b| b.to_bytes());
            let text = String::from_utf8_lossy(&body.unwrap_or_default()).into_owned();
            result.send_replace(Some(text));
            (204, "text/plain", Vec::new())
        }
        ("GET", "/hold.gif") => {
            // Answered (404: an image error also lets `load` fire) once the result is in.
            let mut seen = result.subscribe();
            let _ = tokio::time::timeout(PAGE_DEADLINE, seen.wait_for(Option::is_some)).await;
            (404, "text/plain", Vec::new())
        }
        _ => (404, "text/plain", Vec::new()),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    r.headers_mut()
        .insert("content-type", content_type.parse().unwrap());
    r.headers_mut()
        .insert("cache-control", "no-store".parse().unwrap());
    Ok(r)
}

/// What one headless Chromium run left: the DOM after `load`, and its log.
struct BrowserRun {
    dom: String,
    log: String,
}

/// Loads `url` in a fresh headless Chromium and returns once it has exited.
async fn load_in_chromium(chromium: &str, url: &str) -> BrowserRun {
    let profile = tempfile::tempdir().unwrap();
    let child = tokio::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            // Without these Chromium floods the (closed) network with its own requests.
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--enable-logging=stderr",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so its renderers can be stopped with it on a timeout.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .expect("chromium starts");
    let group = child.id().expect("a running child has a pid");
    match tokio::time::timeout(PAGE_DEADLINE, child.wait_with_output()).await {
        Ok(output) => {
            let output = output.unwrap();
            BrowserRun {
                dom: String::from_utf8_lossy(&output.stdout).into_owned(),
                log: String::from_utf8_lossy(&output.stderr).into_owned(),
            }
        }
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{group}")])
                .status();
            panic!("chromium did not finish {url} within {PAGE_DEADLINE:?}");
        }
    }
}

/// The page's result, checked to be the one its DOM shows.
fn page_result(page: &PageServer, run: &BrowserRun) -> Value {
    let posted = page.result.borrow().clone().unwrap_or_else(|| {
        panic!(
            "the page posted no result; DOM:\n{}\nchromium log (tail):\n{}",
            run.dom,
            tail(&run.log)
        )
    });
    let shown: Value = serde_json::from_str(
        run.dom
            .split("<pre id=\"result\">")
            .nth(1)
            .and_then(|rest| rest.split("</pre>").next())
            .unwrap_or_else(|| panic!("no result in the DOM:\n{}", run.dom)),
    )
    .unwrap();
    let posted: Value = serde_json::from_str(&posted).unwrap();
    assert_eq!(posted, shown, "the DOM and the posted result differ");
    posted
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Output the test harness does not capture: a skip must be seen, and the browser's
/// results belong in the CI log.
/// What the page reports from a listed origin: both platform calls succeeded, the queued
/// call got its 202 with a `Location` the page could read and follow, and the no-cors probe
/// got its opaque answer.
fn assert_every_step_worked(listed: &serde_json::Value) {
    assert_eq!(listed["recoverUserState"], true, "{listed}");
    assert_eq!(listed["onboardNewUser"], true, "{listed}");
    let queued = &listed["queued"];
    assert_eq!(queued["status"], 202, "{listed}");
    let request_id = queued["requestId"].as_str().expect("a request id");
    assert_eq!(
        queued["location"],
        format!("{ENSURE_PATH}/requests/{request_id}"),
        "{listed}"
    );
    assert_eq!(queued["statusAnswer"], 200, "{listed}");
    assert_eq!(queued["statusRequestId"], request_id, "{listed}");
    assert_eq!(listed["reachable"], "opaque", "{listed}");
}

/// Chromium's console line saying it refused the preflight's answer for `origin`.
fn cors_refusal<'a>(log: &'a str, origin: &str) -> &'a str {
    log.lines()
        .find(|l| {
            l.contains("blocked by CORS policy") && l.contains("preflight") && l.contains(origin)
        })
        .map(str::trim)
        .unwrap_or_else(|| panic!("no CORS refusal in chromium's log:\n{}", tail(log)))
}

/// The page's three tokens: users `<prefix>-recover`, `-onboard` and `-queued`, with the
/// emails `<local>@example.com` for the given locals.
fn page_tokens(prefix: &str, locals: [&str; 3]) -> serde_json::Value {
    let step = |i: usize, name: &str| {
        token(
            &format!("{prefix}-{name}"),
            &format!("{}@example.com", locals[i]),
        )
    };
    serde_json::json!({
        "recover": step(0, "recover"),
        "onboard": step(1, "onboard"),
        "queued": step(2, "queued"),
    })
}

fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[tokio::test]
async fn chromium_calls_the_api_from_a_listed_origin_and_is_refused_from_another() {
    let started = Instant::now();
    let Some(chromium) = chromium_or_skip("browser test") else {
        return;
    };

    // The page's port is known only once its server listens; the apps then list it.
    let listener = PageServer::bind().await;
    let page_origin = format!("http://{}", listener.local_addr().unwrap());
    let cors = |v: &mut Vec<(String, String)>| set(v, "CORS_ALLOWED_ORIGINS", &page_origin);
    let app = spawn_app_with(cors).await;
    let queued_app = spawn_app_with(|v| {
        cors(v);
        set(v, "ENSURE_WAIT_MS", "0");
    })
    .await;
    let api = format!("http://{}", app.address);
    let api_queued = format!("http://{}", queued_app.address);

    // The listed origin: every step works.
    let tokens = page_tokens("browser", ["recover", "onboard", "queued"]);
    let page = PageServer::serve(listener, page_html(&api, &api_queued, &tokens));
    let run = load_in_chromium(&chromium, &page.url()).await;
    let listed = page_result(&page, &run);
    let listed_took = started.elapsed();
    assert_every_step_worked(&listed);
    assert_eq!(
        app.rows(),
        [
            ("browser-onboard".into(), "onboard@example.com".into()),
            ("browser-recover".into(), "recover@example.com".into()),
        ]
    );
    eventually("the queued user's row", || async {
        (queued_app.rows() == [("browser-queued".into(), "queued@example.com".into())])
            .then_some(())
    })
    .await;

    // Another origin, not on the list: the browser refuses every answer.
    let tokens = page_tokens("stranger", ["s1", "s2", "s3"]);
    let stranger = PageServer::serve(
        PageServer::bind().await,
        page_html(&api, &api_queued, &tokens),
    );
    let run = load_in_chromium(&chromium, &stranger.url()).await;
    let blocked = page_result(&stranger, &run);
    for step in ["recoverUserState", "onboardNewUser", "queued"] {
        assert_eq!(
            blocked[step]["error"], "TypeError: Failed to fetch",
            "{step}: {blocked}"
        );
    }
    // Refused by the browser, not unanswered: the API is reachable from that page (a
    // `no-cors` request gets its opaque answer), the browser's console says it refused the
    // answer to the preflight (which had no Allow-Origin), and no POST was carried out.
    assert_eq!(blocked["reachable"], "opaque", "{blocked}");
    let cors_refusal = cors_refusal(&run.log, &stranger.origin);
    assert_eq!(app.rows().len(), 2);
    assert_eq!(queued_app.rows().len(), 1);

    say(&format!(
        "browser test: chromium at {chromium}\n  listed origin {page_origin}: {listed} ({:.1} s)\n  unlisted origin {}: {blocked}\n  chromium: {}\n  took {:.1} s",
        listed_took.as_secs_f64(),
        stranger.origin,
        cors_refusal,
        started.elapsed().as_secs_f64()
    ));
    app.shutdown().await.unwrap();
    queued_app.shutdown().await.unwrap();
}
