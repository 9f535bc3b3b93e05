//! What a PostgreSQL error means for a batch: worth retrying, a conflict to run again, or
//! a refusal, and its wording.

use crate::store::StoreError;

/// Connection trouble, serialisation failures, deadlocks, a server shutting down or out
/// of resources: the same batch may succeed later.
pub(super) fn is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true, // no SQLSTATE: the connection itself failed
        Some(code) => {
            let c = code.code();
            c.starts_with("08")
                || c.starts_with("53")
                || c.starts_with("57")
                || c == "40001"
                || c == "40P01"
        }
    }
}

/// A deadlock or serialisation failure: another transaction won; run it again.
pub(super) fn is_conflict(e: &tokio_postgres::Error) -> bool {
    matches!(e.code().map(|c| c.code()), Some("40001" | "40P01"))
}

pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

pub(super) fn classify(e: tokio_postgres::Error) -> StoreError {
    if is_transient(&e) {
        StoreError::Transient(describe(&e))
    } else {
        StoreError::Fatal(describe(&e))
    }
}

pub(super) fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Transient(format!("no PostgreSQL connection: {e}"))
}
