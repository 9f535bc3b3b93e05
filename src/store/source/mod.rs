//! Where imported users come from: a file (or stdin) of CSV or JSON lines, or the rows of a
//! PostgreSQL query.
//!
//! Every record becomes a [`Record`]: a user to store, or the reason it cannot be, under its
//! line (or row) number. Nothing in the input stops the reading: a line that is not CSV,
//! not JSON, lacks a field or holds a value the HTTP path would refuse is reported and the
//! next one is read. Only an I/O error, a query PostgreSQL refuses, or a first line that
//! names no format ends it early.
//!
//! The sources run beside the import and hand it batches over a bounded channel, so the
//! next batch is read while the last one is stored, and memory stays at a few batches
//! however long the input is.

use std::io::BufRead;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio_postgres::types::FromSql as _;

use super::NewUser;
use crate::identity::check_identity;

mod lines;

pub use lines::{LineReader, MAX_LINE_BYTES};

/// Batches read ahead of the import.
const READ_AHEAD: usize = 4;

/// One record of the input: its line (or row) number, and the user or why it cannot be one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub number: u64,
    pub user: Result<NewUser, String>,
}

/// What the source hands the import: a batch of records, or the error that ended reading.
pub type Batches = mpsc::Receiver<anyhow::Result<Vec<Record>>>;

/// The format of a file of users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A `userId,email` header (the columns in either order), then one user per line;
    /// RFC 4180 quoting.
    Csv,
    /// One JSON object per line with string `userId` and `email` (other keys are ignored).
    JsonLines,
}

/// Reads `input` on a thread of its own (reading a file or stdin blocks), in batches of
/// `batch` records.
pub fn read_lines(
    input: impl BufRead + Send + 'static,
    format: Option<Format>,
    batch: usize,
) -> anyhow::Result<Batches> {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    std::thread::Builder::new()
        .name("import-reader".into())
        .spawn(move || {
            let mut reader = LineReader::new(input, format);
            let mut records = Vec::with_capacity(batch);
            loop {
                match reader.next_record() {
                    Ok(Some(record)) => {
                        records.push(record);
                        if records.len() < batch {
                            continue;
                        }
                    }
                    Ok(None) => {
                        if !records.is_empty() {
                            let _ = tx.blocking_send(Ok(records));
                        }
                        return;
                    }
                    Err(e) => {
                        if !records.is_empty() && tx.blocking_send(Ok(records)).is_err() {
                            return;
                        }
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
                // The import stopped (it failed): nothing is waiting for more.
                if tx
                    .blocking_send(Ok(std::mem::replace(
                        &mut records,
                        Vec::with_capacity(batch),
                    )))
                    .is_err()
                {
                    return;
                }
            }
        })
        .context("cannot start the import's reader thread")?;
    Ok(rx)
}

/// Runs `query` on the PostgreSQL at `url` and hands its rows over in batches of `batch`,
/// fetched through a portal (a cursor) so the result is never held whole, neither here
/// nor in the client. The query must return two text columns: the user id, then the email.
pub fn read_query(url: String, query: String, batch: usize) -> Batches {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    tokio::spawn(async move {
        if let Err(e) = query_rows(&url, &query, batch, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    rx
}

async fn query_rows(
    url: &str,
    query: &str,
    batch: usize,
    tx: &mpsc::Sender<anyhow::Result<Vec<Record>>>,
) -> anyhow::Result<()> {
    let (mut client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("cannot connect to the PostgreSQL of --from-postgres")?;
    // The connection's own failures surface as errors of the client's next call.
    tokio::spawn(connection);
    let transaction = client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .context("cannot start a read-only transaction on --from-postgres")?;
    let statement = transaction
        .prepare(query)
        .await
        .context("PostgreSQL refused the --query")?;
    check_columns(statement.columns())?;
    let portal = transaction
        .bind(&statement, &[])
        .await
        .context("PostgreSQL refused the --query")?;
    let fetch = i32::try_from(batch).unwrap_or(i32::MAX);
    let mut number = 0u64;
    loop {
        let rows = transaction
            .query_portal(&portal, fetch)
            .await
            .with_context(|| format!("cannot fetch the rows after row {number}"))?;
        let last = rows.len() < batch;
        let records: Vec<Record> = rows
            .iter()
            .map(|row| {
                number += 1;
                let value = |i: usize, name: &str| match row.try_get::<_, Option<String>>(i) {
                    Ok(Some(value)) => Ok(value),
                    Ok(None) => Err(format!("{name} is NULL")),
                    Err(e) => Err(format!("{name} cannot be read: {e}")),
                };
                let user = value(0, "userId").and_then(|user_id| {
                    let email = value(1, "email")?;
                    check_identity(&user_id, &email).map_err(|e| e.to_string())?;
                    Ok(NewUser::new(user_id, email))
                });
                Record { number, user }
            })
            .collect();
        if !records.is_empty() && tx.send(Ok(records)).await.is_err() {
            return Ok(()); // the import stopped
        }
        if last {
            return Ok(());
        }
    }
}

/// The query's result must be two text columns; anything else is named before a row is read.
fn check_columns(columns: &[tokio_postgres::Column]) -> anyhow::Result<()> {
    if columns.len() != 2 {
        anyhow::bail!(
            "the --query returns {} column(s); it must return two text columns, the user id \
             and the email (e.g. SELECT id, email FROM \"User\")",
            columns.len()
        );
    }
    for (i, column) in columns.iter().enumerate() {
        if !String::accepts(column.type_()) {
            anyhow::bail!(
                "column {} ({}) of the --query is {}, not text; cast it in the query, e.g. {}::text",
                i + 1,
                column.name(),
                column.type_(),
                column.name()
            );
        }
    }
    Ok(())
}
