//! What each command line command does; `main` only parses and calls [`run`].

use std::process::ExitCode;

use crate::app::{Application, Mode};
use crate::cli::{Cli, Command, DeadLetterCommand, ImportFormat, UsersCommand};
use crate::config::{Config, EngineSettings, StoreSettings};
use crate::connection::{self, RawEntry};
use crate::http::auth::mint_token;
use crate::queue;
use crate::queue::dead_letters::{letter_json, DeadLetters};
use crate::shutdown::shutdown_signal;
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
        Command::Users(command) => users(command).await,
        Command::EngineStub {
            drop_replies,
            from_start,
            legacy,
        } => engine_stub(drop_replies, from_start, legacy).await,
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
    // Before anything answers: a SIGTERM during the start is a graceful shutdown too.
    let stop = shutdown_signal();
    let app = Application::build(config, mode).await?;
    app.run_until_stopped(stop).await
}

async fn engine_stub(drop_replies: u64, from_start: bool, legacy: bool) -> anyhow::Result<()> {
    // The stub needs only the Engine's side of the settings; no token secret.
    let url = std::env::var("ENGINE_REDIS_URL")
        .or_else(|_| std::env::var("REDIS_URL"))
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let var =
        |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
    telemetry::init_logging(crate::config::LogFormat::Text);
    let conn = connection::connect(&url, std::time::Duration::from_secs(3))?;
    let shutdown = stop_on_signal()?;
    crate::engine::stub::run(
        conn,
        crate::engine::stub::StubSettings {
            engine_stream: var("ENGINE_STREAM", "stream:exness"),
            reply_stream: var("ENGINE_REPLY_STREAM", "stream:exnessReceive"),
            drop_replies,
            from_start,
            without_ids: legacy,
            reads_from_dollar: legacy,
        },
        shutdown,
    )
    .await
}

/// `users import` and `users resync-engine`. Both read only the settings they use: they
/// never verify a token, so they start without `JWT_SECRET`.
async fn users(command: UsersCommand) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::Write as _;

    use crate::store::{import, source, Store, StoreOptions};
    use crate::worker::resync::{self, ResyncOptions};

    let settings = StoreSettings::from_env()?;
    // Retries are logged (a store or Redis that is down); the results go to stdout.
    telemetry::init_logging(crate::config::LogFormat::Text);
    let stop = stop_on_signal()?;
    match command {
        UsersCommand::Import {
            path,
            format,
            from_postgres,
            query,
        } => {
            let (batches, unit) = match (from_postgres, query, path) {
                (Some(url), Some(query), _) => {
                    (source::read_query(url, query, import::BATCH), "row")
                }
                (_, _, Some(path)) => {
                    let format = format.map(|f| match f {
                        ImportFormat::Csv => source::Format::Csv,
                        ImportFormat::Jsonl => source::Format::JsonLines,
                    });
                    let input: Box<dyn std::io::Read + Send> = if path == "-" {
                        Box::new(std::io::stdin())
                    } else {
                        Box::new(
                            std::fs::File::open(&path)
                                .with_context(|| format!("cannot open {path}"))?,
                        )
                    };
                    let input = std::io::BufReader::with_capacity(64 * 1024, input);
                    (source::read_lines(input, format, import::BATCH)?, "line")
                }
                _ => anyhow::bail!("name a file to import (or -), or --from-postgres with --query"),
            };
            let store = Store::open(
                settings.database_url.as_deref(),
                &settings.database_path,
                StoreOptions::of_command(&settings),
            )
            .await?;
            let before = store.count().await?;
            let mut out = std::io::stdout();
            let report = import::import(
                &store,
                batches,
                import::Reporting {
                    unit,
                    out: &mut out,
                    progress: &mut std::io::stderr(),
                },
                &stop,
            )
            .await?;
            let after = store.count().await?;
            // What the counts cannot say: how many rows are new (a user "stored" by a
            // re-run was already there). Other writers may add rows meanwhile.
            println!("users in the store: {before} before, {after} after");
            println!("{report}");
            out.flush()?;
        }
        UsersCommand::ResyncEngine { rate, after } => {
            let engine = EngineSettings::from_env()?;
            let store = Store::open(
                settings.database_url.as_deref(),
                &settings.database_path,
                StoreOptions::of_command(&settings),
            )
            .await?;
            let conn = connection::connect_via(
                &engine.engine_redis_url,
                engine.engine_redis_sentinel.as_ref(),
                std::time::Duration::from_secs(5),
            )?;
            let publisher = crate::engine::EnginePublisher::new(
                conn,
                engine.engine_stream,
                std::time::Duration::from_secs(10),
            );
            let report = resync::resync(
                &store,
                &publisher,
                ResyncOptions { after, rate },
                &stop,
                &mut std::io::stderr(),
            )
            .await?;
            if let Some(last) = &report.last {
                eprintln!("… last user {last}");
            }
            println!("published {} createUser", report.published);
            if report.interrupted {
                anyhow::bail!(
                    "interrupted before the end{}",
                    resync::resume_hint(&report.last)
                );
            }
        }
    }
    Ok(())
}

/// A token cancelled by SIGINT or SIGTERM. The handlers are installed before this returns
/// ([`shutdown_signal`]), not when a task first runs: a signal that comes early must stop
/// the work between two batches, never kill the process in the middle of one.
fn stop_on_signal() -> anyhow::Result<tokio_util::sync::CancellationToken> {
    let stop = tokio_util::sync::CancellationToken::new();
    let stopping = stop.clone();
    let signalled = shutdown_signal();
    tokio::spawn(async move {
        signalled.await;
        stopping.cancel();
    });
    Ok(stop)
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
    let topology = queue::QueueTopology::of(&config);
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
