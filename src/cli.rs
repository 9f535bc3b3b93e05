//! The command line: which part of the service to run, and the operator tools.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ensure-user",
    version,
    about = "Makes sure every signed-in user exists in the Engine and the database."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Listener and worker pool in one process (the default).
    Serve,
    /// The HTTP listener only.
    Listen,
    /// The worker pool only.
    Work,
    /// Print a token signed with JWT_SECRET, for trying the service.
    ///
    /// Settings: JWT_SECRET or JWT_SECRET_FILE (required; HS256).
    #[command(after_help = "Example:\n  \
        TOKEN=$(JWT_SECRET_FILE=./data/jwt-secret ensure-user token --user-id user-42 --email user42@example.com)")]
    Token {
        /// The token's `userId` claim: the platform's id of the user.
        #[arg(long, value_name = "ID")]
        user_id: String,
        /// The token's `email` claim.
        #[arg(long, value_name = "EMAIL")]
        email: String,
        /// Seconds until the token expires; without it the token has no `exp`, like the
        /// platform's own.
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Inspect and re-queue dead letters.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// Bring existing users in, and tell a restarted Engine about every stored user.
    #[command(subcommand)]
    Users(UsersCommand),
    /// A reference Engine: reads ENGINE_STREAM as the real one does, answers on
    /// ENGINE_REPLY_STREAM.
    ///
    /// Settings: ENGINE_REDIS_URL (default REDIS_URL, default redis://127.0.0.1:6379),
    /// ENGINE_STREAM (default stream:exness), ENGINE_REPLY_STREAM (default
    /// stream:exnessReceive).
    EngineStub {
        /// Drop this many replies first (to exercise ENGINE_CONFIRM=ack).
        #[arg(long, default_value_t = 0)]
        drop_replies: u64,
        /// Read the Engine stream from its start instead of its end.
        #[arg(long)]
        from_start: bool,
        /// Behave like the platform's older Engine: read with `XREAD … $` one entry at a
        /// time (missing what is published while it is busy or down), and reply with
        /// `{"function","message"}` only, without `requestId` or `correlationId`.
        #[arg(long)]
        legacy: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// Show every dead letter, oldest first.
    List {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back on the ingress stream.
    Replay {
        /// Dead-letter ids to replay.
        ids: Vec<String>,
        /// Replay every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Delete dead letters.
    Purge {
        /// Only those older than this, e.g. 30s, 15m, 12h, 7d.
        #[arg(long, value_parser = crate::clock::parse_age_ms)]
        older_than: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Store users from a file of CSV or JSON lines, or from a PostgreSQL query, by the
    /// workers' rules (an email owned by another id resolves to that owner). Prints each
    /// refused line with its number and reason, then
    /// `imported N: stored S, resolved to owner O, refused R`. Running it again adds nothing.
    ///
    /// Settings: DATABASE_PATH or DATABASE_URL (the store). No JWT_SECRET needed.
    #[command(after_help = "Examples:\n  \
        ensure-user users import users.csv          # header userId,email\n  \
        ensure-user users import - < users.jsonl    # {\"userId\":…,\"email\":…} per line\n  \
        ensure-user users import --from-postgres postgres://app@db/app \\\n      \
        --query 'SELECT id, email FROM \"User\"'")]
    Import {
        /// The file to read; `-` reads stdin.
        #[arg(
            required_unless_present = "from_postgres",
            conflicts_with = "from_postgres"
        )]
        path: Option<String>,
        /// The file's format; without it the first non-empty line decides (a `userId,email`
        /// header: CSV; `{`: JSON lines).
        #[arg(long, value_enum, conflicts_with = "from_postgres")]
        format: Option<ImportFormat>,
        /// Read the users from this PostgreSQL (postgres://…, no TLS) instead of a file.
        #[arg(long, value_name = "URL", requires = "query")]
        from_postgres: Option<String>,
        /// With --from-postgres: the query, returning two text columns, the user id then
        /// the email; cast other types in it (e.g. `SELECT id::text, email FROM "User"`).
        /// Rows are fetched in batches through a cursor, in one read-only transaction.
        #[arg(long, value_name = "SQL", requires = "from_postgres")]
        query: Option<String>,
    },
    /// Publish one createUser (the stored pair, a fresh request id) per stored user to
    /// ENGINE_STREAM, in user-id order, in pipelined pages: the step after an Engine
    /// restart. Prints progress (`… published N (R/s), last user X`) on stderr and then
    /// `published N createUser`. Safe to interrupt: resume with `--after` the last user
    /// printed (a page published twice is harmless, createUser is idempotent).
    ///
    /// Settings: DATABASE_PATH or DATABASE_URL, ENGINE_REDIS_URL (default REDIS_URL),
    /// ENGINE_STREAM. No JWT_SECRET needed.
    ResyncEngine {
        /// At most this many createUser per second.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        rate: Option<u32>,
        /// Start after this user id (the last one a previous run printed).
        #[arg(long, value_name = "USER_ID")]
        after: Option<String>,
    },
}

/// The command line, with the settings `serve`, `listen` and `work` read listed in their
/// `--help`: taken from the contract's settings table (docs/contract.md §6) when built, so
/// the help, the contract and the README cannot say different things.
pub fn command() -> clap::Command {
    use clap::CommandFactory as _;
    let settings = settings_help(include_str!("../docs/contract.md"));
    Cli::command()
        .after_help("Run `ensure-user COMMAND --help` for a command's settings and options; `serve --help` lists every setting.")
        .mut_subcommand("serve", |c| c.after_help(settings.clone()))
        .mut_subcommand("listen", |c| c.after_help(settings.clone()))
        .mut_subcommand("work", |c| c.after_help(settings.clone()))
        .mut_subcommand("dead-letters", |c| {
            c.after_help(DEAD_LETTER_SETTINGS)
                .mut_subcommand("list", |c| c.after_help(DEAD_LETTER_SETTINGS))
                .mut_subcommand("replay", |c| c.after_help(DEAD_LETTER_SETTINGS))
                .mut_subcommand("purge", |c| c.after_help(DEAD_LETTER_SETTINGS))
        })
}

/// What the dead-letter commands read.
const DEAD_LETTER_SETTINGS: &str = "Settings: REDIS_URL [default: redis://127.0.0.1:6379], \
    REDIS_CLUSTER [default: false], ENSURE_STREAM [default: stream:ensure-user], \
    ENSURE_SHARDS [default: 1]. No JWT_SECRET needed.";

/// The settings table of the contract's §6 as help text: `NAME  [default: …]`, then what
/// it does, grouped as in the contract.
pub fn settings_help(contract: &str) -> String {
    let section = contract
        .split("\n## 6. Settings")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .unwrap_or("");
    let mut out = String::from(
        "Settings (environment variables, or a .env in the working folder; docs/contract.md §6):",
    );
    for line in section.lines().filter(|l| l.starts_with("| ")) {
        let cells: Vec<String> = line
            .trim_matches('|')
            .split(" | ")
            .map(|c| c.trim().replace('`', ""))
            .collect();
        match cells.as_slice() {
            [name, ..] if name.starts_with("**") => {
                out.push_str(&format!("\n\n{}:", name.trim_matches('*')));
            }
            [name, default, meaning, ..] if name != "setting" && !name.starts_with("---") => {
                out.push_str(&format!(
                    "\n  {name}  [default: {default}]\n      {meaning}"
                ));
            }
            _ => {}
        }
    }
    out
}

/// The format of a file given to `users import`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportFormat {
    /// `userId,email` header (optional when named), RFC 4180 quoting.
    Csv,
    /// One JSON object per line, with string `userId` and `email`.
    Jsonl,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses() {
        command().debug_assert();
    }

    #[test]
    fn serve_help_lists_every_setting_with_its_default() {
        let help = command()
            .find_subcommand_mut("serve")
            .expect("serve")
            .render_long_help()
            .to_string();
        for expected in [
            "JWT_SECRET / JWT_SECRET_FILE",
            "LISTEN_ADDR  [default: 0.0.0.0:$PORT]",
            "ADMIN_ADDR  [default: 127.0.0.1:9101]",
            "REDIS_URL  [default: redis://127.0.0.1:6379]",
            "Workers:",
        ] {
            assert!(help.contains(expected), "{expected} missing from:\n{help}");
        }
        let replay = command()
            .find_subcommand_mut("dead-letters")
            .and_then(|d| d.find_subcommand_mut("replay"))
            .expect("dead-letters replay")
            .render_help()
            .to_string();
        assert!(
            replay.contains("REDIS_URL [default: redis://127.0.0.1:6379]"),
            "{replay}"
        );
    }
}
