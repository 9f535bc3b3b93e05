//! The built binary: split deployment, bad settings, SIGTERM.

use std::process::{Command, Stdio};

use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn listen_and_work_as_separate_processes_answer_200() {
    let Stack {
        queue: _queue,
        engine,
        db,
        vars,
        dir: _dir,
    } = Stack::start().await;
    let listener = Process::spawn(&["listen"], &vars).await;
    let worker = Process::spawn(&["work"], &vars).await;
    let client = reqwest::Client::new();

    for i in 0..5 {
        let response = client
            .post(format!("http://{}{ENSURE_PATH}", listener.address))
            .bearer_auth(token(
                &format!("split-{i}"),
                &format!("split-{i}@example.com"),
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "request {i}");
        let json: Value = response.json().await.unwrap();
        assert_eq!(json["userId"], format!("split-{i}"));
    }

    assert_eq!(rows(&db).len(), 5);
    assert_eq!(engine.entries("stream:exness").await.len(), 5);
    // The worker process serves readiness for its own dependencies.
    let ready = client
        .get(format!("http://{}/readyz", worker.address))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert!(worker.terminate().await.success());
    assert!(listener.terminate().await.success());
}

#[tokio::test]
async fn bad_settings_stop_the_process_with_one_line() {
    let cases = [
        (
            vec![("JWT_SECRET", "s"), ("PORT", "eighty")],
            "configuration error: PORT: ",
        ),
        (
            vec![("JWT_SECRET", "s"), ("ENSURE_WAIT_MS", "soon")],
            "configuration error: ENSURE_WAIT_MS: ",
        ),
        (vec![], "configuration error: JWT_SECRET: "),
        (
            vec![
                ("JWT_SECRET", "s"),
                ("CORS_ALLOWED_ORIGINS", "https://app.example.com/login"),
            ],
            "configuration error: CORS_ALLOWED_ORIGINS: \"https://app.example.com/login\" is not an origin",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (vars, expected) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_ensure-user"))
            .arg("serve")
            .env_clear()
            .current_dir(dir.path())
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{vars:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with(expected), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[tokio::test]
async fn token_command_prints_a_token_the_service_accepts() {
    let output = Command::new(env!("CARGO_BIN_EXE_ensure-user"))
        .args([
            "token",
            "--user-id",
            "cli-user",
            "--email",
            "cli@example.com",
            "--ttl",
            "600",
        ])
        .env_clear()
        .env("JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(output.status.success());
    let token = String::from_utf8(output.stdout).unwrap().trim().to_string();
    let app = spawn_app().await;
    let response = app.ensure(&token).await;
    assert_eq!(response.status(), 200);
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn sigterm_stops_serve_with_exit_0() {
    let stack = Stack::start().await;
    let process = Process::spawn(&["serve"], &stack.vars).await;
    let status = process.terminate().await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn logs_never_carry_tokens_secrets_or_emails() {
    let mut stack = Stack::start().await;
    set(&mut stack.vars, "RUST_LOG", "debug");
    set(&mut stack.vars, "LOG_FORMAT", "json");
    let serve = Process::spawn(&["serve"], &stack.vars).await;
    let client = reqwest::Client::new();
    let url = format!("http://{}{ENSURE_PATH}", serve.address);
    let good = token("logged-user", "private.person@example.com");
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"userId": "x", "email": "forged.person@example.com"}),
        &jsonwebtoken::EncodingKey::from_secret(b"wrong"),
    )
    .unwrap();
    let no_email = token("no-email", "not-an-address");

    let ok: Value = client
        .post(&url)
        .bearer_auth(&good)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for t in [&forged, &no_email] {
        assert!(client
            .post(&url)
            .bearer_auth(t)
            .send()
            .await
            .unwrap()
            .status()
            .is_client_error());
    }
    let (status, logs) = serve.terminate_with_logs().await;
    assert!(status.success());

    // The log says who and which request, in JSON lines…
    let request_id = ok["requestId"].as_str().unwrap();
    assert!(logs.contains(request_id), "the request id is logged");
    assert!(logs.contains("logged-user"), "the user id is logged");
    assert!(
        logs.lines()
            .all(|l| l.is_empty() || serde_json::from_str::<Value>(l).is_ok()),
        "JSON lines"
    );
    // …and never a token (or any part of its signature), the secret, or an address.
    for secret in [good.as_str(), forged.as_str(), no_email.as_str(), SECRET] {
        assert!(!logs.contains(secret), "a secret leaked into the log");
        let signature = secret.rsplit('.').next().unwrap();
        assert!(!logs.contains(signature), "a signature leaked into the log");
    }
    for email in [
        "private.person@example.com",
        "forged.person@example.com",
        "not-an-address",
    ] {
        assert!(!logs.contains(email), "{email} leaked into the log");
    }
}

#[tokio::test]
async fn a_dotenv_is_read_from_the_working_folder_only() {
    let parent = tempfile::tempdir().unwrap();
    let work = parent.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::write(parent.path().join(".env"), format!("JWT_SECRET={SECRET}\n")).unwrap();
    let token_in_work = || {
        Command::new(env!("CARGO_BIN_EXE_ensure-user"))
            .args(["token", "--user-id", "u1", "--email", "u1@example.com"])
            .current_dir(&work)
            .env_clear()
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // The parent folder's .env is not this process's.
    let output = token_in_work();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("configuration error: JWT_SECRET: "),
        "{stderr}"
    );
    // The working folder's is.
    std::fs::write(work.join(".env"), format!("JWT_SECRET={SECRET}\n")).unwrap();
    let output = token_in_work();
    assert!(output.status.success(), "{output:?}");
}

#[tokio::test]
async fn operator_commands_start_without_the_token_secret() {
    let queue = RedisServer::start().await;
    let engine = RedisServer::start().await;
    let path = std::env::var("PATH").unwrap_or_default();
    let vars = vec![
        ("REDIS_URL".to_string(), queue.url()),
        ("ENGINE_REDIS_URL".to_string(), engine.url()),
        ("PATH".to_string(), path),
    ];
    for args in [
        &["dead-letters", "list"][..],
        &["dead-letters", "list", "--json"],
        &["dead-letters", "purge"],
        &["dead-letters", "replay", "--all"],
    ] {
        run_cli(args, &vars);
    }
    // The reference Engine runs until stopped: it has started when it answers a command.
    let mut stub = Command::new(env!("CARGO_BIN_EXE_ensure-user"))
        .args(["engine-stub", "--from-start"])
        .env_clear()
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut conn = engine.conn().await;
    let _: String = redis::cmd("XADD")
        .arg("stream:exness")
        .arg("*")
        .arg("message")
        .arg(expected_command("op-1", "op-1@example.com", "req-op-1"))
        .query_async(&mut conn)
        .await
        .unwrap();
    eventually("the engine stub to answer", || async {
        (!engine.entries("stream:exnessReceive").await.is_empty()).then_some(())
    })
    .await;
    let _ = stub.kill();
    let _ = stub.wait();
}
