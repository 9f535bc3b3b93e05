//! The console over HTTP (reqwest): its numbers against Redis's own, access control (the
//! admin token, the sign-in cookie, a refused start off loopback without a token), the CSRF
//! token on every POST, and the request lookup. The browser drives it in `console_browser`.

use reqwest::StatusCode;

use crate::helpers::*;

const STREAM: &str = "stream:ensure-user";
const ADMIN_TOKEN: &str = "console-test-token-0123456789";

/// The console's URL of an app.
pub fn console_url(app: &TestApp, path: &str) -> String {
    format!(
        "http://{}{path}",
        app.admin_address.expect("the console runs")
    )
}

/// The CSRF token a console page embeds in its forms.
pub fn csrf_of(page: &str) -> String {
    page.split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no CSRF field in:\n{page}"))
        .to_string()
}

/// The text of a console page, fetched with the admin token.
async fn page_text(client: &reqwest::Client, url: &str) -> String {
    text_of(client.get(url).bearer_auth(ADMIN_TOKEN)).await
}

fn cell(page: &str, stream: &str, field: &str) -> u64 {
    let row = page
        .split(&format!("<tr data-stream=\"{stream}\">"))
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .unwrap_or_else(|| panic!("no row for {stream} in:\n{page}"));
    row.split(&format!("data-field=\"{field}\">"))
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {row}"))
}

async fn redis_u64(queue: &RedisServer, args: &[&str]) -> u64 {
    let mut conn = queue.conn().await;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await.unwrap()
}

/// Writes a dead letter as a worker would.
pub async fn add_dead_letter(queue: &RedisServer, user_id: &str) -> String {
    let mut conn = queue.conn().await;
    redis::cmd("XADD")
        .arg(format!("{STREAM}:dead"))
        .arg("*")
        .arg("request_id")
        .arg(format!("r-{user_id}"))
        .arg("user_id")
        .arg(user_id)
        .arg("email")
        .arg(format!("{user_id}@example.com"))
        .arg("reply_to")
        .arg("")
        .arg("enqueued_at")
        .arg("1700000000000")
        .arg("dead_reason")
        .arg("refused: <b>by the test</b>")
        .arg("dead_deliveries")
        .arg(1)
        .arg("dead_first_failed_at")
        .arg("1700000000000")
        .arg("dead_last_failed_at")
        .arg("1700000001000")
        .arg("dead_original_id")
        .arg("1-0")
        .query_async(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_overview_shows_what_redis_has() {
    // A listener alone: what it queues stays on the stream until a consumer reads it.
    let app = spawn_app_in(ensure_user::Mode::Listen, |v| set(v, "ENSURE_WAIT_MS", "0")).await;
    for i in 0..5 {
        let response = app
            .ensure(&token(&format!("u{i}"), &format!("u{i}@example.com")))
            .await;
        assert_eq!(response.status(), 202);
    }
    // A consumer that reads two entries and never acknowledges them: "stuck".
    let mut conn = app.queue.conn().await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("ensure-workers")
        .arg("stuck-consumer")
        .arg("COUNT")
        .arg(2)
        .arg("STREAMS")
        .arg(STREAM)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    add_dead_letter(&app.queue, "dead-one").await;

    let page = reqwest::get(console_url(&app, "/console/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        cell(&page, STREAM, "backlog"),
        redis_u64(&app.queue, &["XLEN", STREAM]).await
    );
    assert_eq!(cell(&page, STREAM, "backlog"), 5);
    assert_eq!(cell(&page, STREAM, "pending"), 2);
    assert_eq!(cell(&page, STREAM, "lag"), 3);
    assert_eq!(
        cell(&page, STREAM, "dead"),
        redis_u64(&app.queue, &["XLEN", "stream:ensure-user:dead"]).await
    );
    assert!(
        page.contains("<code>stuck-consumer</code></td><td class=\"n\">2</td>"),
        "{page}"
    );
    assert!(
        page.contains("data-dependency=\"queue_redis\">up<"),
        "{page}"
    );
    assert!(page.contains("id=\"dead-total\">1<"), "{page}");
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_post_without_the_csrf_token_is_refused() {
    let app = spawn_app().await;
    let id = add_dead_letter(&app.queue, "kept").await;
    let client = reqwest::Client::new();
    let key = format!("{id}@{STREAM}");
    for body in [
        format!("one={key}"),
        format!("one={key}&csrf=not-the-token"),
    ] {
        let response = client
            .post(console_url(&app, "/console/dead-letters/replay"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
    }
    let purge = client
        .post(console_url(&app, "/console/dead-letters/purge"))
        .body("older_than=0s")
        .send()
        .await
        .unwrap();
    assert_eq!(purge.status(), StatusCode::FORBIDDEN);
    assert_eq!(app.queue.entries("stream:ensure-user:dead").await.len(), 1);

    // With the page's token the same replay goes through, and the page says what it did.
    let page = text_of(client.get(console_url(&app, "/console/dead-letters"))).await;
    let csrf = csrf_of(&page);
    let response = client
        .post(console_url(&app, "/console/dead-letters/replay"))
        .body(format!("csrf={csrf}&one={}", key.replace(':', "%3A")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let done = response.text().await.unwrap();
    assert!(
        done.contains(&format!("replayed {id} on {STREAM} as ")),
        "{done}"
    );
    assert!(done.contains("1 of 1 replayed"), "{done}");
    eventually("the replayed user to be stored", || async {
        app.rows().iter().any(|(u, _)| u == "kept").then_some(())
    })
    .await;
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn with_a_token_nothing_is_shown_without_it() {
    let app = spawn_app_with(|v| {
        set(v, "ADMIN_ADDR", "0.0.0.0:0");
        set(v, "ADMIN_TOKEN", ADMIN_TOKEN);
    })
    .await;
    let port = app.admin_address.unwrap().port();
    // Bound to every address; reached here through 127.0.0.1 (with a token the Host does
    // not matter, the token does).
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    for path in [
        "/console/",
        "/console/dead-letters",
        "/console/requests?q=x",
    ] {
        let response = client.get(url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
        assert!(response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
        let body = response.text().await.unwrap();
        assert!(
            body.contains("Sign in") && !body.contains("Ingress streams"),
            "{body}"
        );
    }
    let wrong = client
        .get(url("/console/"))
        .bearer_auth("console-test-token-wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let right = client
        .get(url("/console/"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), StatusCode::OK);

    // The sign-in form: a wrong token is refused, the right one sets the session cookie.
    let form = client.get(url("/console/login")).send().await.unwrap();
    let csrf = csrf_of(&form.text().await.unwrap());
    // The sign-in form, shown to anyone, never carries the actions' CSRF token.
    let inside = page_text(&client, &url("/console/dead-letters")).await;
    assert_ne!(csrf, csrf_of(&inside));
    let refused = client
        .post(url("/console/login"))
        .body(format!("csrf={csrf}&token=nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let signed_in = client
        .post(url("/console/login"))
        .body(format!("csrf={csrf}&token={ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), StatusCode::SEE_OTHER);
    let cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains(ADMIN_TOKEN),
        "the cookie must not hold the token"
    );
    let session = cookie.split(';').next().unwrap();
    let page = client
        .get(url("/console/"))
        .header("cookie", session)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.unwrap().contains("Ingress streams"));
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn off_loopback_without_a_token_the_process_refuses_to_start() {
    let stack = Stack::start().await;
    let mut vars = stack.vars.clone();
    set(&mut vars, "ADMIN_ADDR", "0.0.0.0:0");
    let output = run_cli_output(&["serve"], &vars);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("configuration error: ADMIN_TOKEN: must be set"),
        "{stderr}"
    );
}

#[tokio::test]
async fn without_a_token_only_loopback_names_are_answered() {
    let app = spawn_app().await;
    let response = reqwest::Client::new()
        .get(console_url(&app, "/console/"))
        .header("host", "attacker.example:9101")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_request_is_found_with_its_row_and_history() {
    let app = spawn_app_with(|v| set(v, "ENSURE_WAIT_MS", "0")).await;
    let response = app.ensure(&token("looked-up", "looked@example.com")).await;
    assert_eq!(response.status(), 202);
    let body: serde_json::Value = response.json().await.unwrap();
    let request_id = body["requestId"].as_str().unwrap().to_string();
    eventually("the row", || async {
        app.rows()
            .iter()
            .any(|(u, _)| u == "looked-up")
            .then_some(())
    })
    .await;
    let page = eventually("the record to be done", || async {
        let page = reqwest::get(console_url(
            &app,
            &format!("/console/requests?q={request_id}"),
        ))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
        page.contains("<strong>done</strong>").then_some(page)
    })
    .await;
    assert!(
        page.contains("<code>looked-up</code></td><td><code>looked@example.com</code>"),
        "{page}"
    );
    assert!(page.contains("Not on the queue"), "{page}");
    assert!(page.contains("No dead letter."), "{page}");
    // By email too.
    let by_email = reqwest::get(console_url(
        &app,
        "/console/requests?q=looked%40example.com",
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert!(by_email.contains("<code>looked-up</code>"), "{by_email}");
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn every_action_is_logged_with_who_did_it_and_logs_to_a_file_have_no_colours() {
    let stack = Stack::start().await;
    let port = free_port();
    let mut vars = stack.vars.clone();
    set(&mut vars, "ADMIN_ADDR", &format!("127.0.0.1:{port}"));
    set(&mut vars, "ADMIN_TOKEN", ADMIN_TOKEN);
    let process = Process::spawn(&["serve"], &vars).await;
    let id = add_dead_letter(&stack.queue, "logged").await;
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}/console");
    let page = page_text(&client, &format!("{base}/dead-letters")).await;
    let replay = client
        .post(format!("{base}/dead-letters/replay"))
        .bearer_auth(ADMIN_TOKEN)
        .body(format!("csrf={}&one={id}%40{STREAM}", csrf_of(&page)))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), StatusCode::OK);
    let (_, logs) = process.terminate_with_logs().await;
    let line = logs
        .lines()
        .find(|l| l.contains("console action"))
        .unwrap_or_else(|| panic!("no action logged:\n{logs}"));
    assert!(line.contains("who=\"admin token (Bearer)\""), "{line}");
    assert!(line.contains("peer=127.0.0.1:"), "{line}");
    assert!(line.contains("action=\"replay\""), "{line}");
    assert!(
        line.contains(&format!("replayed {id} on {STREAM} as ")),
        "{line}"
    );
    // Written to a file, not a terminal: no colour codes.
    assert!(!logs.contains('\u{1b}'), "{logs}");
}
