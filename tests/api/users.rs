//! `users import` and `users resync-engine`, run as the built binary against a real SQLite
//! file or PostgreSQL schema and a real `redis-server`. None of them is given `JWT_SECRET`:
//! the operator commands must start without it.

use std::path::Path;
use std::time::{Duration, Instant};

use ensure_user::store::{NewUser, StoreOptions};

use crate::helpers::*;

const EMAIL_REASON: &str = "email is not an address (local@domain, at most 254 bytes, no spaces)";

/// Settings of a SQLite store at `db` (and nothing else).
fn sqlite_vars(db: &Path) -> Vec<(String, String)> {
    vec![("DATABASE_PATH".to_string(), db.display().to_string())]
}

fn pairs(rows: &[(&str, &str)]) -> Vec<(String, String)> {
    rows.iter()
        .map(|(id, email)| (id.to_string(), email.to_string()))
        .collect()
}

fn stdout(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[tokio::test]
async fn csv_import_lists_every_refused_line_and_a_rerun_adds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let csv = dir.path().join("users.csv");
    std::fs::write(
        &csv,
        "userId,email\r\n\
         u1,a@x.com\r\n\
         u2,b@x.com\r\n\
         u3,a@x.com\r\n\
         u4\r\n\
         \"u5,c@x.com\r\n\
         \r\n\
         u6,not-an-email\r\n\
         \"u,7\",\"d@x.com\"\r\n\
         u8,e@x.com,\r\n",
    )
    .unwrap();
    let vars = sqlite_vars(&db);
    let args = ["users", "import", csv.to_str().unwrap()];
    let listing = format!(
        "line 5: expected 2 fields (userId,email), found 1\n\
         line 6: a quoted field is not closed on its line\n\
         line 8: {EMAIL_REASON}\n\
         line 10: expected 2 fields (userId,email), found 3\n"
    );

    let first = run_cli(&args, &vars);
    assert_eq!(
        first,
        format!(
            "{listing}users in the store: 0 before, 3 after\n\
             imported 8: stored 3, resolved to owner 1, refused 4\n"
        )
    );
    let stored = pairs(&[("u,7", "d@x.com"), ("u1", "a@x.com"), ("u2", "b@x.com")]);
    assert_eq!(rows(&db), stored);

    // Again: the same users are stored (they are there), and no row is added.
    let again = run_cli(&args, &vars);
    assert_eq!(
        again,
        format!(
            "{listing}users in the store: 3 before, 3 after\n\
             imported 8: stored 3, resolved to owner 1, refused 4\n"
        )
    );
    assert_eq!(rows(&db), stored);
}

#[tokio::test]
async fn json_lines_import_reports_malformed_lines_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let file = dir.path().join("users.jsonl");
    std::fs::write(
        &file,
        concat!(
            r#"{"userId":"u1","email":"a@x.com","name":"kept out"}"#,
            "\n",
            r#"{"userId":"u2","email":"a@x.com"}"#,
            "\n\n",
            r#"{"userId":2,"email":"b@x.com"}"#,
            "\n",
            r#"{"userId":"u3"}"#,
            "\n",
            "{not json\n",
            r#"["u4","c@x.com"]"#,
            "\n",
            r#"{"userId":"u5","email":"e@x.com"}"#,
        ),
    )
    .unwrap();
    let out = run_cli(
        &["users", "import", file.to_str().unwrap()],
        &sqlite_vars(&db),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "line 4: userId is not a string");
    assert_eq!(lines[1], "line 5: email is missing");
    assert!(lines[2].starts_with("line 6: not JSON: "), "{out}");
    assert_eq!(lines[3], "line 7: not a JSON object");
    assert_eq!(lines[4], "users in the store: 0 before, 2 after");
    assert_eq!(
        lines[5], "imported 7: stored 2, resolved to owner 1, refused 4",
        "{out}"
    );
    assert_eq!(lines.len(), 6, "{out}");
    assert_eq!(rows(&db), pairs(&[("u1", "a@x.com"), ("u5", "e@x.com")]));
}

#[tokio::test]
async fn import_reads_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let vars = sqlite_vars(&db);
    let jsonl =
        b"{\"userId\":\"s1\",\"email\":\"s1@x.com\"}\n{\"userId\":\"s2\",\"email\":\"s2@x.com\"}\n";
    let out = stdout(&run_cli_with_stdin(&["users", "import", "-"], &vars, jsonl));
    assert_eq!(
        out,
        "users in the store: 0 before, 2 after\nimported 2: stored 2, resolved to owner 0, refused 0\n"
    );
    // CSV named by --format, without a header.
    let out = stdout(&run_cli_with_stdin(
        &["users", "import", "--format", "csv", "-"],
        &vars,
        b"s3,s3@x.com\ns4,s1@x.com\n",
    ));
    assert_eq!(
        out.lines().last(),
        Some("imported 2: stored 1, resolved to owner 1, refused 0")
    );
    assert_eq!(
        rows(&db),
        pairs(&[("s1", "s1@x.com"), ("s2", "s2@x.com"), ("s3", "s3@x.com")])
    );
    // A first line that names no format stops the import before anything is stored.
    let output = run_cli_with_stdin(&["users", "import", "-"], &vars, b"id;mail\ns5;s5@x.com\n");
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("--format"), "{err}");
    assert_eq!(rows(&db).len(), 3);
}

/// The platform's own table: `"User"` with `id` and `email`, 2,500 users (more than one
/// fetch of the cursor), one of them without an email and one whose email another id owns.
async fn platform_table(source: &TestDb) {
    source
        .client()
        .await
        .batch_execute(
            r#"CREATE TABLE "User" (id TEXT PRIMARY KEY, email TEXT, age INTEGER);
               INSERT INTO "User" (id, email)
                 SELECT 'p' || lpad(n::text, 5, '0'), 'p' || n || '@x.com' FROM generate_series(1, 2500) n;
               UPDATE "User" SET email = NULL WHERE id = 'p01500';
               UPDATE "User" SET email = 'p1@x.com' WHERE id = 'p02000';"#,
        )
        .await
        .unwrap();
}

async fn import_from_postgres_into(store_vars: Vec<(String, String)>, store: &TestDb) {
    let source = TestDb::postgres().await;
    platform_table(&source).await;
    let url = source.url().unwrap();
    let args = [
        "users",
        "import",
        "--from-postgres",
        url,
        "--query",
        r#"SELECT id, email FROM "User" ORDER BY id"#,
    ];
    let expected = "row 1500: email is NULL\n\
                    users in the store: 0 before, 2498 after\n\
                    imported 2500: stored 2498, resolved to owner 1, refused 1\n";
    let out = run_cli(&args, &store_vars);
    assert_eq!(out, expected);
    let rows = store.rows().await;
    assert_eq!(rows.len(), 2498);
    assert_eq!(rows[0], ("p00001".to_string(), "p1@x.com".to_string()));
    assert!(!rows.iter().any(|(id, _)| id == "p01500" || id == "p02000"));

    // Again: nothing added.
    let again = run_cli(&args, &store_vars);
    assert!(
        again.ends_with(
            "users in the store: 2498 before, 2498 after\n\
             imported 2500: stored 2498, resolved to owner 1, refused 1\n"
        ),
        "{again}"
    );
    assert_eq!(store.rows().await.len(), 2498);

    // A column that is not text is named before any row is read, with the cast to use.
    let output = run_cli_output(
        &[
            "users",
            "import",
            "--from-postgres",
            url,
            "--query",
            r#"SELECT id, age FROM "User""#,
        ],
        &store_vars,
    );
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains(
            "column 2 (age) of the --query is int4, not text; cast it in the query, e.g. age::text"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn import_from_a_postgres_table_into_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = TestDb::Sqlite(dir);
    let TestDb::Sqlite(dir) = &store else {
        unreachable!()
    };
    let vars = sqlite_vars(&dir.path().join("users.db"));
    import_from_postgres_into(vars, &store).await;
}

#[tokio::test]
async fn import_from_a_postgres_table_into_a_postgres_store() {
    let store = TestDb::postgres().await;
    let vars = vec![("DATABASE_URL".to_string(), store.url().unwrap().to_string())];
    import_from_postgres_into(vars, &store).await;
}

/// Pages in id order, from the start and after a key, in both stores.
#[tokio::test]
async fn stores_page_users_in_id_order() {
    for db in [TestDb::sqlite(), TestDb::postgres().await] {
        let store = db.open_with(StoreOptions::with_pool_size(2)).await;
        let users: Vec<NewUser> = ["u3", "u1", "u10", "u2", "u0"]
            .iter()
            .map(|id| NewUser::new(*id, format!("{id}@x.com")))
            .collect();
        store.upsert(users).await.unwrap();
        assert_eq!(store.count().await.unwrap(), 5);
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store.page_after(after.as_deref(), 2).await.unwrap();
            let Some(last) = page.last() else { break };
            after = Some(last.user_id.clone());
            seen.extend(page.into_iter().map(|u| (u.user_id, u.email)));
        }
        assert_eq!(
            seen,
            pairs(&[
                ("u0", "u0@x.com"),
                ("u1", "u1@x.com"),
                ("u10", "u10@x.com"),
                ("u2", "u2@x.com"),
                ("u3", "u3@x.com"),
            ]),
            "{}",
            store.name()
        );
    }
}

/// The request id of an Engine message, checked to be a fresh simple UUID.
fn request_id(message: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(message).unwrap();
    let id = value["requestId"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32, "{message}");
    assert!(id
        .chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    id
}

#[tokio::test]
async fn resync_publishes_the_stored_pairs_and_resumes_after_a_user() {
    let engine = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let mut vars = sqlite_vars(&db);
    let out = stdout(&run_cli_with_stdin(
        &["users", "import", "-"],
        &vars,
        b"userId,email\nu2,b@x.com\nu1,a@x.com\nu3,a@x.com\nu\"4,d@x.com\nu5,e@x.com\n",
    ));
    assert!(
        out.ends_with("imported 5: stored 3, resolved to owner 1, refused 1\n"),
        "{out}"
    );
    vars.push(("ENGINE_REDIS_URL".to_string(), engine.url()));

    let output = run_cli_output(&["users", "resync-engine"], &vars);
    assert_eq!(stdout(&output), "published 3 createUser\n");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("… last user u5"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let entries = engine.entries("stream:exness").await;
    let messages: Vec<String> = entries.iter().map(engine_message).collect();
    let expected: Vec<String> = [("u1", "a@x.com"), ("u2", "b@x.com"), ("u5", "e@x.com")]
        .iter()
        .zip(&messages)
        .map(|((id, email), message)| expected_command(id, email, &request_id(message)))
        .collect();
    assert_eq!(messages, expected);
    let mut ids: Vec<String> = messages.iter().map(|m| request_id(m)).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "every command has a request id of its own");

    // Resumed after u1: u2 and u5 again, with new request ids.
    let resumed = run_cli(&["users", "resync-engine", "--after", "u1"], &vars);
    assert_eq!(resumed, "published 2 createUser\n");
    let later: Vec<String> = engine.entries("stream:exness").await[3..]
        .iter()
        .map(engine_message)
        .collect();
    assert_eq!(
        later,
        vec![
            expected_command("u2", "b@x.com", &request_id(&later[0])),
            expected_command("u5", "e@x.com", &request_id(&later[1])),
        ]
    );
    assert!(!messages.contains(&later[0]));

    // Past the last user: nothing to publish.
    let done = run_cli(&["users", "resync-engine", "--after", "u5"], &vars);
    assert_eq!(done, "published 0 createUser\n");
    assert_eq!(engine.entries("stream:exness").await.len(), 5);
}

/// A SQLite store with five imported users `<prefix>0`…`<prefix>4`, an Engine Redis, and
/// the settings that point at both.
async fn five_users_stored(
    prefix: &str,
) -> (RedisServer, tempfile::TempDir, Vec<(String, String)>) {
    let engine = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut vars = sqlite_vars(&dir.path().join("users.db"));
    let csv: String = std::iter::once("userId,email\n".to_string())
        .chain((0..5).map(|i| format!("{prefix}{i},{prefix}{i}@x.com\n")))
        .collect();
    stdout(&run_cli_with_stdin(
        &["users", "import", "-"],
        &vars,
        csv.as_bytes(),
    ));
    vars.push(("ENGINE_REDIS_URL".to_string(), engine.url()));
    (engine, dir, vars)
}

#[tokio::test]
async fn resync_keeps_to_its_rate() {
    let (engine, _dir, mut vars) = five_users_stored("r").await;
    vars.push((
        "ENGINE_STREAM".to_string(),
        "stream:engine-of-test".to_string(),
    ));
    // Two per second: pages of two at 0 s, 1 s and 2 s. A lower bound only, never a sleep.
    let started = Instant::now();
    let out = run_cli(&["users", "resync-engine", "--rate", "2"], &vars);
    assert_eq!(out, "published 5 createUser\n");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(engine.entries("stream:engine-of-test").await.len(), 5);
}

#[tokio::test]
async fn an_interrupted_resync_says_where_to_resume_and_resuming_publishes_the_rest() {
    let (engine, _dir, vars) = five_users_stored("i").await;

    // One per second: after the first page it waits, and SIGINT ends the wait.
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_ensure-user"))
        .args(["users", "resync-engine", "--rate", "1"])
        .env_clear()
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually("the first createUser", || async {
        (!engine.entries("stream:exness").await.is_empty()).then_some(())
    })
    .await;
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(1), "interrupted is not finished");
    let published = engine.entries("stream:exness").await.len();
    assert!((1..5).contains(&published), "{published}");
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        format!("published {published} createUser\n")
    );
    let last = format!("i{}", published - 1);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains(&format!("resume with --after '{last}'")),
        "{stderr}"
    );

    let rest = run_cli(&["users", "resync-engine", "--after", &last], &vars);
    assert_eq!(rest, format!("published {} createUser\n", 5 - published));
    let users: Vec<String> = engine
        .entries("stream:exness")
        .await
        .iter()
        .map(|e| {
            let message: serde_json::Value = serde_json::from_str(&engine_message(e)).unwrap();
            message["userId"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(users, ["i0", "i1", "i2", "i3", "i4"]);
}

#[tokio::test]
async fn rows_the_database_refuses_are_listed_with_its_reason() {
    let db = TestDb::sqlite();
    let TestDb::Sqlite(dir) = &db else {
        unreachable!()
    };
    let vars = sqlite_vars(&dir.path().join("users.db"));
    // The first import creates the table the trigger goes on.
    stdout(&run_cli_with_stdin(
        &["users", "import", "-"],
        &vars,
        b"userId,email\n",
    ));
    db.refuse("bad").await;
    let out = stdout(&run_cli_with_stdin(
        &["users", "import", "-"],
        &vars,
        b"userId,email\ngood,g@x.com\nbad,b@x.com\n",
    ));
    assert_eq!(
        out,
        "line 3: SQLite refused the row: refused by the test\n\
         users in the store: 0 before, 1 after\n\
         imported 2: stored 1, resolved to owner 0, refused 1\n"
    );
}
