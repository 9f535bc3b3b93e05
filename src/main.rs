//! The `ensure-user` binary: parse the command line, load the settings, run the command.

use std::process::ExitCode;

use clap::FromArgMatches as _;
use ensure_user::cli::Cli;

/// mimalloc instead of glibc's malloc: a request's allocations are made on one worker
/// thread and often freed on another (a span on the export thread, a batch's rows on the
/// SQLite writer), which glibc serialises on its arena locks. Measured in bench/run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // A .env in the working folder is read when present; the real environment wins. Only
    // that folder: `dotenvy::dotenv()` would also take one from any parent folder, settings
    // (a secret, a database) that nobody meant for this process.
    if let Err(e) = dotenvy::from_path(".env") {
        if !e.not_found() {
            eprintln!("configuration error: .env: {e}");
            return ExitCode::from(2);
        }
    }
    // Through `cli::command()`: its `--help` lists the settings.
    let cli = match Cli::from_arg_matches(&ensure_user::cli::command().get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(ensure_user::commands::run(cli))
}
