//! Errors of the store: [`StoreError`] for reads and mutations, [`OpenError`] for
//! opening and migrating a database.
//!
//! Driver errors are classified once, here, by their SQLSTATE / SQLite extended
//! code (through `sqlx`'s `ErrorKind`), never by message text. Messages never
//! contain a DSN or password.

use serde::{Deserialize, Serialize};

/// Why a store read or mutation failed.
///
/// `NotFound`, `Conflict` and `Invalid` are deterministic outcomes: every replica
/// applying the same mutation reaches the same one. `Unavailable` means the
/// database itself failed (I/O, connection, pool); the caller may retry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum StoreError {
    #[error("{entity} {id:?} not found")]
    NotFound { entity: String, id: String },
    #[error("{entity} {id:?}: {reason}")]
    Conflict {
        entity: String,
        id: String,
        reason: String,
    },
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    pub(crate) fn not_found(entity: &str, id: impl Into<String>) -> Self {
        StoreError::NotFound {
            entity: entity.into(),
            id: id.into(),
        }
    }

    pub(crate) fn conflict(entity: &str, id: impl Into<String>, reason: impl Into<String>) -> Self {
        StoreError::Conflict {
            entity: entity.into(),
            id: id.into(),
            reason: reason.into(),
        }
    }

    /// True for the outcomes every replica reaches identically (not `Unavailable`).
    pub fn is_deterministic(&self) -> bool {
        !matches!(self, StoreError::Unavailable(_))
    }

    /// Classifies a driver error for an operation on `entity` `id`.
    pub(crate) fn from_sqlx(err: sqlx::Error, entity: &str, id: &str) -> Self {
        use sqlx::error::ErrorKind;
        match &err {
            sqlx::Error::RowNotFound => StoreError::not_found(entity, id),
            sqlx::Error::Database(db) => match db.kind() {
                ErrorKind::UniqueViolation => StoreError::conflict(entity, id, "already exists"),
                ErrorKind::ForeignKeyViolation => StoreError::conflict(
                    entity,
                    id,
                    "refers to a record that does not exist, or is still referenced",
                ),
                ErrorKind::CheckViolation | ErrorKind::NotNullViolation => {
                    StoreError::Invalid(format!("{entity} {id:?} violates a schema constraint"))
                }
                // Postgres SQLSTATE class 22: data exceptions (bad encoding,
                // value out of range). The input is at fault, not the database.
                _ if db.code().is_some_and(|c| c.starts_with("22")) => StoreError::Invalid(
                    format!("{entity} {id:?} holds a value the database cannot store"),
                ),
                _ => StoreError::Unavailable(format!(
                    "database error {} on {entity} {id:?}",
                    db.code().unwrap_or_default()
                )),
            },
            sqlx::Error::Encode(e) => StoreError::Invalid(format!(
                "{entity} {id:?} holds a value the database cannot store: {e}"
            )),
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => StoreError::Unavailable(
                format!("stored {entity} {id:?} could not be decoded: {err}"),
            ),
            _ => StoreError::Unavailable(describe_transport(&err)),
        }
    }
}

/// A description of a connection-level failure that never includes the DSN.
pub(crate) fn describe_transport(err: &sqlx::Error) -> String {
    match err {
        sqlx::Error::PoolTimedOut => "timed out waiting for a database connection".into(),
        sqlx::Error::PoolClosed => "the connection pool is closed".into(),
        sqlx::Error::Io(e) => format!("I/O error talking to the database: {e}"),
        sqlx::Error::Tls(e) => format!("TLS error talking to the database: {e}"),
        sqlx::Error::Configuration(e) => format!("bad database configuration: {e}"),
        sqlx::Error::Database(db) => format!(
            "database refused the request ({}): {}",
            db.code().unwrap_or_default(),
            db.message()
        ),
        other => format!("database error: {other}"),
    }
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("bad database configuration: {0}")]
    Config(String),
    #[error("cannot connect to the {driver} database: {reason}")]
    Connect {
        driver: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Migrate(#[from] crate::migrate::MigrateError),
}
