//! `stacyvm-store`: the StacyVM system of record on SQLite or Postgres.
//!
//! Owns the schema (`migrations/`), the migrator, the [`Store`] trait with one
//! implementation per driver (chosen by [`StoreDriver`] from config), lease
//! arbitration rules ([`lease`]), exactly-once batch apply for the Raft state
//! machine ([`Store::apply_batch`]), SQLite backup and restore ([`backup`]), and
//! the contract suite every driver runs ([`testing`]).
//!
//! It does not know about Raft, HTTP or runtimes. Every write is a [`Mutation`];
//! reads are typed methods. "Now" is always an argument, never the database
//! clock, so replicas that apply the same mutations hold the same bytes.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;

pub mod backup;
mod error;
pub mod lease;
pub mod migrate;
pub mod model;
pub mod mutation;
mod postgres;
mod sql;
mod sqlite;
pub mod testing;
mod types;

pub use error::{OpenError, StoreError};
pub use lease::{AcquireLease, RenewLease};
pub use model::*;
pub use mutation::{BatchOutcome, Mutation, MutationOutput};
pub use postgres::{PgStore, redact_dsn};
pub use sqlite::SqliteStore;

/// Which database engine holds the record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum StoreDriver {
    /// Embedded SQLite file (the default).
    #[default]
    Sqlite,
    /// A Postgres server.
    Postgres,
}

impl StoreDriver {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreDriver::Sqlite => "sqlite",
            StoreDriver::Postgres => "postgres",
        }
    }
}

impl fmt::Display for StoreDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StoreDriver {
    type Err = OpenError;
    fn from_str(s: &str) -> Result<Self, OpenError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sqlite" | "sqlite3" => Ok(StoreDriver::Sqlite),
            "postgres" | "postgresql" | "pg" => Ok(StoreDriver::Postgres),
            other => Err(OpenError::Config(format!(
                "unknown database driver {other:?}; use \"sqlite\" or \"postgres\""
            ))),
        }
    }
}

/// Where the record lives. `path` is used by SQLite, `dsn` by Postgres.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StoreConfig {
    pub driver: StoreDriver,
    /// SQLite database file.
    pub path: Option<PathBuf>,
    /// Postgres connection string (`postgres://user:pass@host:port/db`).
    pub dsn: Option<String>,
    /// Pool size; defaults to 4 (SQLite) or 10 (Postgres).
    pub max_connections: Option<u32>,
}

impl fmt::Debug for StoreConfig {
    // The DSN may carry a password: show it redacted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("driver", &self.driver)
            .field("path", &self.path)
            .field("dsn", &self.dsn.as_deref().map(redact_dsn))
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

impl StoreConfig {
    /// A SQLite store at `path`.
    pub fn sqlite(path: impl Into<PathBuf>) -> Self {
        StoreConfig {
            driver: StoreDriver::Sqlite,
            path: Some(path.into()),
            ..Default::default()
        }
    }

    /// A Postgres store at `dsn`.
    pub fn postgres(dsn: impl Into<String>) -> Self {
        StoreConfig {
            driver: StoreDriver::Postgres,
            dsn: Some(dsn.into()),
            ..Default::default()
        }
    }

    /// Checks the fields the chosen driver needs, without connecting.
    pub fn validate(&self) -> Result<(), OpenError> {
        match self.driver {
            StoreDriver::Sqlite => match &self.path {
                Some(p) if !p.as_os_str().is_empty() => Ok(()),
                _ => Err(OpenError::Config(
                    "the sqlite driver needs a database path (database.path or --database)".into(),
                )),
            },
            StoreDriver::Postgres => match &self.dsn {
                Some(dsn) => postgres::parse_dsn(dsn).map(|_| ()),
                None => Err(OpenError::Config(
                    "the postgres driver needs a DSN (database.dsn, --dsn or STACYVM_DATABASE_DSN)"
                        .into(),
                )),
            },
        }
    }
}

/// Opens (creating if needed) and migrates the store `config` describes.
pub async fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, OpenError> {
    config.validate()?;
    Ok(match config.driver {
        StoreDriver::Sqlite => Arc::new(SqliteStore::open(config).await?),
        StoreDriver::Postgres => Arc::new(PgStore::open(config).await?),
    })
}

/// The system of record. Both drivers implement it identically; the contract
/// suite in [`testing`] is the proof.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    fn driver(&self) -> StoreDriver;
    /// Answers when the database does.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Closes the pool; later calls fail with `Unavailable`.
    async fn close(&self);

    /// Applies one mutation in its own transaction.
    async fn execute(&self, m: &Mutation) -> Result<MutationOutput, StoreError>;
    /// Applies a Raft log entry's mutations in one transaction that also advances
    /// the applied index to `at.index` (indexes only move forward; the Raft log
    /// supplies them in order). If the store has already applied `at.index`
    /// or later, nothing runs ([`BatchOutcome::Skipped`]); so with several
    /// replicas sharing one database, each entry takes effect exactly once.
    /// Deterministic failures are per-mutation outcomes; a database failure
    /// aborts the batch and leaves the applied index unchanged.
    async fn apply_batch(
        &self,
        at: &AppliedLog,
        mutations: &[Mutation],
    ) -> Result<BatchOutcome, StoreError>;
    /// Several consecutive Raft entries in one transaction: each entry is
    /// applied (or skipped, if the store already has it) exactly as
    /// [`apply_batch`](Store::apply_batch) would, and the applied index ends
    /// at the last new entry. One commit for many entries is what lets a
    /// busy leader keep up (see docs/benchmarks.md).
    async fn apply_entries(
        &self,
        entries: &[(AppliedLog, Vec<Mutation>)],
    ) -> Result<Vec<BatchOutcome>, StoreError>;
    async fn raft_state(&self) -> Result<RaftState, StoreError>;
    /// Every table, from one consistent read (the Raft snapshot's contents).
    async fn export_snapshot(&self) -> Result<StoreSnapshot, StoreError>;
    /// Replaces every table, and the Raft bookkeeping, with `snapshot` in one
    /// transaction.
    async fn install_snapshot(&self, snapshot: &StoreSnapshot) -> Result<(), StoreError>;

    /// A sandbox, destroyed ones included.
    async fn get_sandbox(&self, id: &str) -> Result<Sandbox, StoreError>;
    /// Sandboxes that are not destroyed, newest first.
    async fn list_sandboxes(&self, filter: &SandboxFilter) -> Result<Vec<Sandbox>, StoreError>;
    /// Sandboxes not destroyed whose expiry is before `before`.
    async fn list_expired_sandboxes(&self, before: Ts) -> Result<Vec<Sandbox>, StoreError>;
    /// Sandboxes not destroyed, optionally for one owner.
    async fn count_active_sandboxes(&self, owner_id: Option<&str>) -> Result<i64, StoreError>;
    /// Exec logs of a sandbox, newest first.
    async fn list_exec_logs(
        &self,
        sandbox_id: &str,
        limit: Option<i64>,
    ) -> Result<Vec<ExecLog>, StoreError>;

    async fn get_worker(&self, id: &str) -> Result<Worker, StoreError>;
    /// Workers by ID.
    async fn list_workers(&self) -> Result<Vec<Worker>, StoreError>;

    /// The lease row, even if expired (callers compare `expires_at` with their now).
    async fn get_lease(&self, resource_id: &str) -> Result<Lease, StoreError>;
    async fn list_leases(&self, holder_id: Option<&str>) -> Result<Vec<Lease>, StoreError>;
    /// The highest generation ever granted for the resource (0 = never).
    async fn lease_generation(&self, resource_id: &str) -> Result<i64, StoreError>;

    async fn get_tenant(&self, id: &str) -> Result<Tenant, StoreError>;
    /// Tenants, newest first.
    async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError>;
    async fn get_member(&self, tenant_id: &str, user_id: &str) -> Result<TenantMember, StoreError>;
    async fn list_members(&self, tenant_id: &str) -> Result<Vec<TenantMember>, StoreError>;
    async fn get_policy(&self, id: &str) -> Result<Policy, StoreError>;
    /// Global policies plus, when `tenant_id` is given, that tenant's; ordered by
    /// priority, then age.
    async fn list_policies(
        &self,
        tenant_id: Option<&str>,
        resource_type: Option<PolicyResource>,
    ) -> Result<Vec<Policy>, StoreError>;

    async fn get_quota(&self, owner_id: &str) -> Result<OwnerQuota, StoreError>;
    async fn list_quotas(&self) -> Result<Vec<OwnerQuota>, StoreError>;

    async fn get_template(&self, name: &str) -> Result<Template, StoreError>;
    async fn list_templates(&self) -> Result<Vec<Template>, StoreError>;

    async fn list_admin_audit(
        &self,
        filter: &AdminAuditFilter,
    ) -> Result<Vec<AdminAudit>, StoreError>;
    async fn list_operation_audit(
        &self,
        filter: &OperationAuditFilter,
    ) -> Result<Vec<OperationAudit>, StoreError>;

    async fn is_token_revoked(&self, jti: &str) -> Result<bool, StoreError>;
    async fn list_revoked_tokens(&self) -> Result<Vec<RevokedToken>, StoreError>;

    /// The enrollment with this secret hash, used or not, even if expired
    /// (callers compare `expires_at` with their now); `NotFound` when absent.
    async fn get_enrollment(&self, token_hash: &str) -> Result<Enrollment, StoreError>;
    /// The worker's enrolled credential; `NotFound` when it has none.
    async fn get_worker_credential(&self, worker_id: &str) -> Result<WorkerCredential, StoreError>;

    /// True when replica `node_id` was removed from the cluster.
    async fn is_node_removed(&self, node_id: i64) -> Result<bool, StoreError>;
}

/// Typed shorthands over [`Store::execute`] for the common mutations.
#[async_trait]
pub trait StoreExt: Store {
    /// Grants a lease (see [`lease`] for the rules).
    async fn acquire_lease(&self, req: AcquireLease) -> Result<Lease, StoreError> {
        expect_lease(self.execute(&Mutation::AcquireLease(req)).await?)
    }

    /// Extends a held lease.
    async fn renew_lease(&self, req: RenewLease) -> Result<Lease, StoreError> {
        expect_lease(self.execute(&Mutation::RenewLease(req)).await?)
    }

    /// Releases a lease held by `holder_id`.
    async fn release_lease(&self, resource_id: &str, holder_id: &str) -> Result<(), StoreError> {
        self.execute(&Mutation::ReleaseLease {
            resource_id: resource_id.into(),
            holder_id: holder_id.into(),
        })
        .await
        .map(|_| ())
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

fn expect_lease(out: MutationOutput) -> Result<Lease, StoreError> {
    match out {
        MutationOutput::Lease(l) => Ok(l),
        other => Err(StoreError::Unavailable(format!(
            "lease mutation returned {other:?}"
        ))),
    }
}
