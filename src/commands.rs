//! What each command line command does; `main` only parses and calls [`run`].

use std::process::ExitCode;

use crate::app::{shutdown_signal, Application, Mode};
use crate::cli::{Cli, Command, DeadLetterCommand};
use crate::config::Config;
use crate::http::auth::mint_token;
use crate::queue::dead_letters::DeadLetters;
use crate::queue::{self, RawEntry};
use crate::telemetry;

/// Runs a command and turns its result into the process's exit code. Every failure is one
/// line on stderr: exit 2 for a bad setting, 1 for anything else.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(Mode::Serve).await,
        Command::Listen => serve(Mode::Listen).await,
        Command::Work => serve(Mode::Work).await,
        Command::Token {
            user_id,
            email,
            ttl,
        } => token(&user_id, &email, ttl),
        Command::DeadLetters(command) => dead_letters(command).await,
        Command::EngineStub {
            drop_replies,
            from_start,
            without_ids,
        } => engine_stub(drop_replies, from_start, without_ids).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<crate::config::ConfigError>() {
            Some(config) => {
                eprintln!("{config}");
                ExitCode::from(2)
            }
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn serve(mode: Mode) -> anyhow::Result<()> {
    let config = Config::from_env()?;
    telemetry::init_logging(config.log_format);
    let app = Application::build(config, mode).await?;
    app.run_until_stopped(shutdown_signal()).await
}

async fn engine_stub(drop_replies: u64, from_start: bool, without_ids: bool) -> anyhow::Result<()> {
    // The stub needs only the Engine's side of the settings; no token secret.
    let url = std::env::var("ENGINE_REDIS_URL")
        .or_else(|_| std::env::var("REDIS_URL"))
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let var =
        |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
    telemetry::init_logging(crate::config::LogFormat::Text);
    let conn = queue::connect(&url, std::time::Duration::from_secs(3))?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        stop.cancel();
    });
    crate::engine::stub::run(
        conn,
        crate::engine::stub::StubSettings {
            engine_stream: var("ENGINE_STREAM", "stream:exness"),
            reply_stream: var("ENGINE_REPLY_STREAM", "stream:exnessReceive"),
            drop_replies,
            from_start,
            without_ids,
        },
        shutdown,
    )
    .await
}

fn token(user_id: &str, email: &str, ttl: Option<u64>) -> anyhow::Result<()> {
    let jwt = Config::jwt_from_env()?;
    let secret = jwt.secret.ok_or_else(|| crate::config::ConfigError {
        setting: "JWT_SECRET",
        problem: "is not set; `token` signs with it".into(),
    })?;
    println!("{}", mint_token(secret.as_bytes(), user_id, email, ttl)?);
    Ok(())
}

async fn dead_letters(command: DeadLetterCommand) -> anyhow::Result<()> {
    // An operator's tool: it never verifies a token, so it does not need the secret.
    let config = Config::operator_from_env()?;
    let topology = config.queue_topology();
    let conn = queue::connect_queue(&topology, std::time::Duration::from_secs(5)).await?;
    // Dead letters of an earlier shard layout are still theirs to list, replay and purge.
    let mut shards = topology.shards.clone();
    let earlier = queue::layout::earlier_streams(&conn, &topology.ensure_stream, &shards).await?;
    shards.extend(earlier.into_iter().map(|s| s.stream));
    let tools = DeadLetters::new(conn, shards.clone());
    let streams = shards
        .iter()
        .map(|s| queue::dead_stream(s))
        .collect::<Vec<_>>()
        .join(", ");
    match command {
        DeadLetterCommand::List { json } => {
            let letters = tools.list().await?;
            if json {
                for (stream, letter) in &letters {
                    println!("{}", letter_json(stream, letter));
                }
            } else {
                print_table(&letters);
            }
            eprintln!("{} dead letter(s) on {streams}", letters.len());
        }
        DeadLetterCommand::Replay { ids, all } => {
            if !all && ids.is_empty() {
                anyhow::bail!("name the dead letters to replay, or pass --all");
            }
            // One letter that cannot be replayed must not keep the others from going back:
            // try each, name each failure, and fail the command only at the end.
            let mut outcomes = Vec::new();
            if all {
                // Each listed letter on its own stream: ids are per stream, so two shards
                // can hold letters with the same id, and a lookup by id would find one twice.
                for (stream, letter) in tools.list().await? {
                    let outcome = tools.replay_letter(&stream, &letter).await;
                    let name = format!("{} on {}", letter.id, queue::dead_stream(&stream));
                    outcomes.push((name, outcome));
                }
            } else {
                for id in ids {
                    let outcome = tools.replay(&id).await;
                    outcomes.push((id, outcome));
                }
            }
            let mut replayed = 0;
            for (name, outcome) in &outcomes {
                match outcome {
                    Ok(Some(new_id)) => {
                        replayed += 1;
                        println!("replayed {name} as {new_id}");
                    }
                    Ok(None) => println!("not replayed {name}: no such dead letter"),
                    Err(e) => println!("not replayed {name}: {e}"),
                }
            }
            println!("{replayed} of {} replayed", outcomes.len());
            if replayed < outcomes.len() {
                anyhow::bail!("{} dead letter(s) not replayed", outcomes.len() - replayed);
            }
        }
        DeadLetterCommand::Purge { older_than } => {
            let removed = tools.purge(older_than).await?;
            println!("purged {removed} dead letter(s) from {streams}");
        }
    }
    Ok(())
}

fn text(value: &[u8]) -> String {
    String::from_utf8_lossy(value).into_owned()
}

/// A name or value as JSON: the string when it is UTF-8, else `{"base64": …}`, so bytes
/// that are not text are shown exactly rather than replaced.
fn bytes_json(bytes: &[u8]) -> serde_json::Value {
    use base64::Engine as _;
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::Value::String(text.to_owned()),
        Err(_) => serde_json::json!({
            "base64": base64::engine::general_purpose::STANDARD.encode(bytes)
        }),
    }
}

/// One dead letter as a JSON line. Fields are `[name, value]` pairs in stream order, not
/// an object: names need not be UTF-8 (nor unique), and an object key can only be text.
/// Public for the `dead_letter` fuzz target.
pub fn letter_json(stream: &str, letter: &RawEntry) -> String {
    let fields: Vec<serde_json::Value> = letter
        .fields
        .iter()
        .flatten()
        .map(|(k, v)| serde_json::Value::Array(vec![bytes_json(k), bytes_json(v)]))
        .collect();
    serde_json::json!({ "id": letter.id, "stream": stream, "fields": fields }).to_string()
}

fn print_table(letters: &[(String, RawEntry)]) {
    println!("{:<20} {:<24} {:<10} REASON", "ID", "USER_ID", "DELIVERIES");
    for (_, letter) in letters {
        let field = |name| letter.field(name).map(text).unwrap_or_else(|| "-".into());
        println!(
            "{:<20} {:<24} {:<10} {}",
            letter.id,
            field(queue::ingress::fields::USER_ID),
            field(queue::dead_letters::fields::DELIVERIES),
            field(queue::dead_letters::fields::REASON),
        );
    }
}
