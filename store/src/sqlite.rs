//! The SQLite driver: one database file per replica, WAL journal, foreign keys
//! on, a busy timeout, and `BEGIN IMMEDIATE` for every write transaction so a
//! transaction that reads before it writes can never fail to upgrade its lock.
//!
//! `synchronous = NORMAL`: in WAL mode a crash of the process loses nothing; a
//! power cut may lose the last transactions, which the Raft log (fsynced before
//! any write is acknowledged) replays.

use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{SqliteConnection, SqlitePool};

use crate::{OpenError, StoreConfig, StoreDriver};

/// How long a writer waits for the lock before `Unavailable`.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const BOOKKEEPING_DDL: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (\
     version INTEGER PRIMARY KEY NOT NULL, name TEXT NOT NULL, checksum TEXT NOT NULL, \
     applied_at INTEGER NOT NULL)";

/// The system of record in a SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

/// Connection options every SQLite connection of ours uses.
pub(crate) fn connect_options(path: &std::path::Path, create: bool) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(create)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(BUSY_TIMEOUT)
}

impl SqliteStore {
    const DRIVER: StoreDriver = StoreDriver::Sqlite;

    /// Opens (creating if missing) and migrates the database at `config.path`.
    pub async fn open(config: &StoreConfig) -> Result<Self, OpenError> {
        config.validate()?;
        let path = config.path.as_deref().unwrap_or(std::path::Path::new(""));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| OpenError::Connect {
                driver: "sqlite",
                reason: format!("cannot create directory {}: {e}", dir.display()),
            })?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(config.max_connections.unwrap_or(4).max(1))
            .acquire_timeout(BUSY_TIMEOUT * 2)
            .connect_with(connect_options(path, true))
            .await
            .map_err(|e| OpenError::Connect {
                driver: "sqlite",
                reason: format!(
                    "{}: {}",
                    path.display(),
                    crate::error::describe_transport(&e)
                ),
            })?;
        let mut conn = pool.acquire().await.map_err(|e| OpenError::Connect {
            driver: "sqlite",
            reason: crate::error::describe_transport(&e),
        })?;
        run_migrations(&mut conn, crate::migrate::SQLITE, BOOKKEEPING_DDL).await?;
        drop(conn);
        Ok(SqliteStore { pool })
    }

    /// The underlying pool (backups and tests).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

crate::sql::sql_store!(
    store = SqliteStore,
    db = sqlx::Sqlite,
    conn = SqliteConnection,
    begin = "BEGIN IMMEDIATE",
    // A deferred transaction reads one WAL snapshot from its first read on.
    begin_read = "BEGIN",
    for_update = "",
);
