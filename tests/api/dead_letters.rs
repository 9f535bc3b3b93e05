//! The dead-letter commands against a real `redis-server`: fields that are not UTF-8 kept
//! byte for byte, and a replay that goes on past a letter it cannot put back.

use base64::Engine as _;
use serde_json::{json, Value};

use crate::helpers::*;

const INGRESS: &str = "stream:ensure-user";
const DEAD: &str = "stream:ensure-user:dead";
/// A field whose name and value are not UTF-8 (the value has a NUL too).
const ODD_NAME: &[u8] = b"\xffname";
const ODD_VALUE: &[u8] = b"\xfe\x00v";

/// Settings for the one-shot commands: only the queue's Redis is ever used (no
/// `JWT_SECRET`: they never verify a token).
fn cli_vars(queue: &RedisServer) -> Vec<(String, String)> {
    vec![
        ("REDIS_URL".to_string(), queue.url()),
        (
            "PATH".to_string(),
            std::env::var("PATH").unwrap_or_default(),
        ),
    ]
}

/// Writes a dead letter as a worker would, with these fields first, under `id` (`*`: a
/// new one); returns its id.
async fn add_letter(
    queue: &RedisServer,
    dead: &str,
    id: &str,
    fields: &[(&[u8], &[u8])],
) -> String {
    let mut conn = queue.conn().await;
    let mut cmd = redis::cmd("XADD");
    cmd.arg(dead).arg(id);
    for (name, value) in fields {
        cmd.arg(*name).arg(*value);
    }
    cmd.arg("dead_reason")
        .arg("refused by the test")
        .arg("dead_deliveries")
        .arg(1)
        .arg("dead_original_id")
        .arg("1-0");
    cmd.query_async(&mut conn).await.unwrap()
}

async fn add_good_letter(queue: &RedisServer, dead: &str, id: &str, user_id: &str) -> String {
    add_letter(
        queue,
        dead,
        id,
        &[
            (b"request_id", format!("r-{user_id}").as_bytes()),
            (b"user_id", user_id.as_bytes()),
            (b"email", format!("{user_id}@example.com").as_bytes()),
            (b"reply_to", b"listener-long-gone"),
            (b"enqueued_at", b"1700000000000"),
        ],
    )
    .await
}

fn stdout_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn dead_letters_keep_fields_that_are_not_utf8_through_list_and_replay() {
    let queue = RedisServer::start().await;
    add_good_letter(&queue, DEAD, "*", "first").await;
    let odd_id = add_letter(
        &queue,
        DEAD,
        "*",
        &[(ODD_NAME, ODD_VALUE), (b"user_id", b"odd")],
    )
    .await;
    add_good_letter(&queue, DEAD, "*", "last").await;
    let vars = cli_vars(&queue);

    let listed = run_cli(&["dead-letters", "list", "--json"], &vars);
    let letters: Vec<Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 3, "{listed}");
    let odd = letters.iter().find(|l| l["id"] == odd_id.as_str()).unwrap();
    assert_eq!(odd["stream"], INGRESS);
    let b64 = |b: &[u8]| json!({ "base64": base64::engine::general_purpose::STANDARD.encode(b) });
    assert_eq!(odd["fields"][0], json!([b64(ODD_NAME), b64(ODD_VALUE)]));
    assert_eq!(odd["fields"][1], json!(["user_id", "odd"]));
    assert_eq!(
        odd["fields"][2],
        json!(["dead_reason", "refused by the test"])
    );

    let replayed = run_cli(&["dead-letters", "replay", "--all"], &vars);
    assert!(replayed.contains("3 of 3 replayed"), "{replayed}");

    let ingress = queue.entries(INGRESS).await;
    assert_eq!(ingress.len(), 3);
    assert_eq!(
        ingress[1].fields,
        Some(vec![
            (ODD_NAME.to_vec(), ODD_VALUE.to_vec()),
            (b"user_id".to_vec(), b"odd".to_vec()),
        ]),
        "the replayed entry has the original fields, byte for byte, and no dead_ ones"
    );
    assert_eq!(ingress[0].field("user_id"), Some(&b"first"[..]));
    assert_eq!(
        ingress[0].field("reply_to"),
        Some(&b""[..]),
        "nobody waits for a replay"
    );
    assert!(queue.entries(DEAD).await.is_empty());
}

#[tokio::test]
async fn replay_goes_on_past_a_letter_it_cannot_replay_names_it_and_fails() {
    // Two shards, so one ingress stream can be broken while the other still works; ids are
    // per stream, and a letter on each shard has the same one.
    let queue = RedisServer::start().await;
    let broken = "stream:ensure-user:{0}";
    let working = "stream:ensure-user:{1}";
    let stuck = add_good_letter(&queue, &format!("{broken}:dead"), "7-0", "stuck").await;
    add_good_letter(&queue, &format!("{working}:dead"), "7-0", "one").await;
    add_good_letter(&queue, &format!("{working}:dead"), "*", "two").await;
    let mut conn = queue.conn().await;
    let _: () = redis::cmd("SET")
        .arg(broken)
        .arg("not a stream")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut vars = cli_vars(&queue);
    set(&mut vars, "ENSURE_SHARDS", "2");

    let output = run_cli_output(&["dead-letters", "replay", "--all"], &vars);

    let stdout = stdout_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("2 of 3 replayed"), "{stdout}");
    let failure = stdout
        .lines()
        .find(|l| l.starts_with(&format!("not replayed {stuck} on {broken}:dead: ")))
        .unwrap_or_else(|| panic!("the failed letter is named: {stdout}"));
    assert!(failure.contains("WRONGTYPE"), "{failure}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("1 dead letter(s) not replayed"),
        "{output:?}"
    );
    assert_eq!(queue.entries(working).await.len(), 2);
    assert!(queue.entries(&format!("{working}:dead")).await.is_empty());
    let still_dead = queue.entries(&format!("{broken}:dead")).await;
    assert_eq!(still_dead.len(), 1, "a failed replay keeps its letter");
    assert_eq!(still_dead[0].id, stuck);

    // After the repair it goes back; an id that is not a dead letter is a failure too.
    let _: () = redis::cmd("DEL")
        .arg(broken)
        .query_async(&mut conn)
        .await
        .unwrap();
    let replayed = run_cli(&["dead-letters", "replay", &stuck], &vars);
    assert!(replayed.contains("1 of 1 replayed"), "{replayed}");
    assert_eq!(queue.entries(broken).await.len(), 1);
    let missing = run_cli_output(&["dead-letters", "replay", &stuck], &vars);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stdout_of(&missing).contains(&format!("not replayed {stuck}: no such dead letter")),
        "{missing:?}"
    );
}

#[tokio::test]
async fn dead_letters_of_an_earlier_shard_layout_are_listed_and_replayed() {
    let queue = RedisServer::start().await;
    // A letter written under one shard; the tools now run with three.
    add_good_letter(&queue, DEAD, "*", "from-one-shard").await;
    let mut vars = cli_vars(&queue);
    set(&mut vars, "ENSURE_SHARDS", "3");

    let listed = run_cli(&["dead-letters", "list", "--json"], &vars);
    let letter: Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    assert_eq!(letter["stream"], INGRESS);

    run_cli(&["dead-letters", "replay", "--all"], &vars);
    assert_eq!(
        queue.entries(INGRESS).await.len(),
        1,
        "back on its own stream"
    );
    assert!(queue.entries(DEAD).await.is_empty());
}
