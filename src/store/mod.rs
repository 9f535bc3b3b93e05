//! Where ensured users are kept: the `users` table.
//!
//! SQLite is the default (one file, one writer thread). The rules every store keeps:
//! ensuring the same user again adds no row, and an email that already belongs to another
//! user id resolves to that owner instead of moving or duplicating anything.

pub mod sqlite;

pub use sqlite::{SqliteStore, StoreError};

/// A user to make sure of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUser {
    pub user_id: String,
    pub email: String,
}

/// What the store made of one [`NewUser`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The user exists now; `canonical_id` owns the email (it differs from the requested id
    /// when the email already belonged to someone else).
    Stored { canonical_id: String },
    /// This row can never be stored (e.g. the database refuses its values).
    Refused { reason: String },
}
