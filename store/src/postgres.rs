//! The Postgres driver. Each replica may have its own database, or all may share
//! one (then [`Store::apply_batch`](crate::Store::apply_batch)'s index check makes
//! every Raft entry take effect once). Migrations run under a session advisory
//! lock so replicas starting together cannot race. Row locks (`FOR UPDATE`)
//! serialise racing lease acquirers of one resource.
//!
//! DSNs carry passwords: nothing here prints one; use [`redact_dsn`] to show one.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};

use crate::{OpenError, StoreConfig, StoreDriver};

/// Advisory-lock key held while migrating ("stacyvm" in ASCII).
pub const MIGRATION_LOCK_KEY: i64 = 0x0073_7461_6379_766d;
/// Longest wait for a connection (and so for an unreachable server).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

const BOOKKEEPING_DDL: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (\
     version BIGINT PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL, \
     applied_at TIMESTAMPTZ NOT NULL DEFAULT now())";

/// The system of record in a Postgres database.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

/// `dsn` with any password replaced by `***`, for logs and messages.
pub fn redact_dsn(dsn: &str) -> String {
    match url::Url::parse(dsn) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            // sqlx also takes the password as a query parameter.
            let pairs: Vec<(String, String)> = u
                .query_pairs()
                .map(|(k, v)| {
                    let secret =
                        k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("sslpassword");
                    (
                        k.into_owned(),
                        if secret {
                            "***".to_owned()
                        } else {
                            v.into_owned()
                        },
                    )
                })
                .collect();
            if !pairs.is_empty() {
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => "<unparseable DSN>".to_owned(),
    }
}

/// Parses a DSN into connection options, with errors that name what to fix and
/// never echo the DSN.
pub(crate) fn parse_dsn(dsn: &str) -> Result<PgConnectOptions, OpenError> {
    let url = url::Url::parse(dsn).map_err(|e| {
        OpenError::Config(format!(
            "the Postgres DSN is not a URL ({e}); expected postgres://USER:PASSWORD@HOST:PORT/DATABASE"
        ))
    })?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(OpenError::Config(format!(
            "the Postgres DSN has scheme {:?}; expected postgres:// or postgresql://",
            url.scheme()
        )));
    }
    let has_host = url.host_str().is_some_and(|h| !h.is_empty())
        || url.query_pairs().any(|(k, _)| k == "host");
    if !has_host {
        return Err(OpenError::Config(
            "the Postgres DSN names no host; expected postgres://USER:PASSWORD@HOST:PORT/DATABASE"
                .into(),
        ));
    }
    PgConnectOptions::from_str(dsn).map_err(|e| {
        let why = match e {
            sqlx::Error::Configuration(inner) => inner.to_string(),
            _ => "unsupported option".to_owned(),
        };
        OpenError::Config(format!("the Postgres DSN is invalid: {why}"))
    })
}

impl PgStore {
    const DRIVER: StoreDriver = StoreDriver::Postgres;

    /// Connects and migrates (under the advisory lock).
    pub async fn open(config: &StoreConfig) -> Result<Self, OpenError> {
        config.validate()?;
        let opts = parse_dsn(config.dsn.as_deref().unwrap_or_default())?;
        Self::open_with(opts, config.max_connections.unwrap_or(10)).await
    }

    /// Connects with explicit options (tests create databases this way).
    pub async fn open_with(
        opts: PgConnectOptions,
        max_connections: u32,
    ) -> Result<Self, OpenError> {
        let connect_err = |e: sqlx::Error| OpenError::Connect {
            driver: "postgres",
            reason: crate::error::describe_transport(&e),
        };
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(opts)
            .await
            .map_err(connect_err)?;
        let mut conn = pool.acquire().await.map_err(connect_err)?;
        let lock_err = |e: sqlx::Error| {
            OpenError::Migrate(crate::migrate::MigrateError::Unavailable(format!(
                "cannot take the migration lock: {}",
                crate::error::describe_transport(&e)
            )))
        };
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(MIGRATION_LOCK_KEY)
            .execute(&mut *conn)
            .await
            .map_err(lock_err)?;
        let migrated = run_migrations(&mut conn, crate::migrate::POSTGRES, BOOKKEEPING_DDL).await;
        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(MIGRATION_LOCK_KEY)
            .execute(&mut *conn)
            .await;
        migrated?;
        if unlocked.is_err() {
            // The session lock dies with the connection; make sure it does.
            let _ = conn.detach();
        }
        Ok(PgStore { pool })
    }

    /// The underlying pool (tests and tools).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

crate::sql::sql_store!(
    store = PgStore,
    db = sqlx::Postgres,
    conn = PgConnection,
    begin = "BEGIN",
    begin_read = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    for_update = " FOR UPDATE",
);
