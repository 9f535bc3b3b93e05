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
    Token {
        #[arg(long)]
        user_id: String,
        #[arg(long)]
        email: String,
        /// Seconds until the token expires; without it the token has no `exp`, like the
        /// platform's own.
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Inspect and re-queue dead letters.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// A reference Engine: reads ENGINE_STREAM as the real one does, answers on
    /// ENGINE_REPLY_STREAM.
    EngineStub {
        /// Drop this many replies first (to exercise ENGINE_CONFIRM=ack).
        #[arg(long, default_value_t = 0)]
        drop_replies: u64,
        /// Read the Engine stream from its start instead of its end.
        #[arg(long)]
        from_start: bool,
        /// Reply as the platform's older Engine does: `{"function","message"}` only, without
        /// `requestId` or `correlationId`.
        #[arg(long)]
        without_ids: bool,
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
        #[arg(long, value_parser = parse_duration_ms)]
        older_than: Option<u64>,
    },
}

/// Parses `90s`, `15m`, `12h`, `7d` (or a bare number of seconds) into milliseconds.
pub fn parse_duration_ms(raw: &str) -> Result<u64, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration like 30s, 15m, 12h or 7d"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{raw:?} has an unknown unit (use s, m, h or d)")),
    };
    Ok(n.saturating_mul(secs).saturating_mul(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("90"), Ok(90_000));
        assert_eq!(parse_duration_ms("15m"), Ok(900_000));
        assert_eq!(parse_duration_ms("7d"), Ok(604_800_000));
        assert!(parse_duration_ms("soon").is_err());
        assert!(parse_duration_ms("5y").is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
