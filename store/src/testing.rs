//! The store contract suite: one list of named cases that every driver must
//! pass, and the fixtures that give each case a fresh database.
//!
//! Run it for a driver with [`store_contract_suite!`](crate::store_contract_suite):
//! one `#[tokio::test]` per case, so test output names every case on every
//! driver. SQLite always runs (a temp file per case). Postgres runs when
//! `STACYVM_POSTGRES_TEST_DSN` points at a server where the user may create
//! databases: each case gets its own database, dropped afterwards. Without the
//! DSN the Postgres cases print a loud SKIP, except under `CI=true`, where a
//! missing DSN fails them.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

use futures::FutureExt;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

use crate::{PgStore, SqliteStore, Store, StoreConfig, StoreDriver};

/// Environment variable naming the Postgres server the live tests use.
pub const POSTGRES_DSN_ENV: &str = "STACYVM_POSTGRES_TEST_DSN";

/// True when running under CI (`CI=true`), where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Admin connection options for the live Postgres tests: `None` (after a loud
/// SKIP line) when no DSN is set outside CI; a panic under CI.
pub fn postgres_admin(what: &str) -> Option<PgConnectOptions> {
    match std::env::var(POSTGRES_DSN_ENV) {
        Ok(dsn) if !dsn.trim().is_empty() => Some(
            PgConnectOptions::from_str(&dsn)
                .unwrap_or_else(|_| panic!("{POSTGRES_DSN_ENV} is not a valid Postgres DSN")),
        ),
        _ if in_ci() => panic!(
            "{what} needs live Postgres and CI=true forbids skipping: set {POSTGRES_DSN_ENV} \
             (scripts/test.sh starts a throwaway server and sets it)"
        ),
        _ => {
            eprintln!("SKIP {what}: {POSTGRES_DSN_ENV} is not set (scripts/test.sh sets it)");
            None
        }
    }
}

#[derive(Debug)]
enum Source {
    Sqlite {
        path: PathBuf,
        _dir: tempfile::TempDir,
    },
    Postgres {
        admin: PgConnectOptions,
        name: String,
    },
}

/// A fresh, migrated database for one test, and a way to open more handles on
/// the same database (as replicas sharing it would).
#[derive(Debug, Clone)]
pub struct TestDb {
    pub store: Arc<dyn Store>,
    source: Arc<Source>,
}

impl TestDb {
    /// A new SQLite database in a temp directory.
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("stacyvm.db");
        let store = SqliteStore::open(&StoreConfig::sqlite(&path))
            .await
            .expect("open sqlite");
        TestDb {
            store: Arc::new(store),
            source: Arc::new(Source::Sqlite { path, _dir: dir }),
        }
    }

    /// A new database on the live Postgres server, or `None` when skipped.
    pub async fn postgres(what: &str) -> Option<TestDb> {
        let admin = postgres_admin(what)?;
        let name = format!("stacyvm_t_{:016x}", rand::random::<u64>());
        let mut conn = PgConnection::connect_with(&admin)
            .await
            .expect("connect to test Postgres");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        conn.close().await.ok();
        let store = PgStore::open_with(admin.clone().database(&name), 20)
            .await
            .expect("open postgres test database");
        Some(TestDb {
            store: Arc::new(store),
            source: Arc::new(Source::Postgres { admin, name }),
        })
    }

    /// A fresh database for `driver`, or `None` when skipped.
    pub async fn fresh(driver: StoreDriver, what: &str) -> Option<TestDb> {
        match driver {
            StoreDriver::Sqlite => Some(TestDb::sqlite().await),
            StoreDriver::Postgres => TestDb::postgres(what).await,
        }
    }

    /// Another independent handle (its own pool, migrated again) on this database.
    pub async fn reopen(&self) -> Arc<dyn Store> {
        self.reopen_with(4).await
    }

    /// Like [`reopen`](Self::reopen), with a pool of `max_connections`.
    pub async fn reopen_with(&self, max_connections: u32) -> Arc<dyn Store> {
        match &*self.source {
            Source::Sqlite { path, .. } => {
                let cfg = StoreConfig {
                    max_connections: Some(max_connections),
                    ..StoreConfig::sqlite(path)
                };
                Arc::new(SqliteStore::open(&cfg).await.expect("reopen sqlite"))
            }
            Source::Postgres { admin, name } => Arc::new(
                PgStore::open_with(admin.clone().database(name), max_connections)
                    .await
                    .expect("reopen postgres"),
            ),
        }
    }

    /// Connection options for this database when it is on Postgres.
    pub fn pg_options(&self) -> Option<PgConnectOptions> {
        match &*self.source {
            Source::Postgres { admin, name } => Some(admin.clone().database(name)),
            Source::Sqlite { .. } => None,
        }
    }

    /// Closes the store and drops a Postgres test database.
    pub async fn cleanup(self) {
        self.store.close().await;
        if let Source::Postgres { admin, name } = &*self.source
            && let Ok(mut conn) = PgConnection::connect_with(admin).await
        {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut conn)
            .await;
        }
    }
}

/// A boxed contract case.
pub type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs one case on a fresh database of `driver`, cleaning up even if it panics.
pub async fn run_case(driver: StoreDriver, name: &str, case: fn(TestDb) -> CaseFuture) {
    let what = format!("store contract case {name} on {driver}");
    let Some(db) = TestDb::fresh(driver, &what).await else {
        return;
    };
    eprintln!("RUN {what}");
    let result = std::panic::AssertUnwindSafe(case(db.clone()))
        .catch_unwind()
        .await;
    db.cleanup().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Expands to one `#[tokio::test]` per contract case for `$driver`
/// (a [`StoreDriver`] expression).
#[macro_export]
macro_rules! store_contract_suite {
    ($driver:expr) => {
        $crate::store_contract_suite!(@cases $driver;
            sandboxes_crud,
            sandbox_listing_filters_and_paging,
            exec_logs,
            workers,
            leases_basic,
            leases_expired_takeover,
            leases_generations_survive_release,
            leases_renew_rules,
            audits_filters_and_retention,
            quotas,
            templates,
            tenants_members_policies,
            revoked_token_ids,
            enrollments,
            unique_and_foreign_key_violations_are_conflicts,
            invalid_input_is_refused,
            exactly_once_apply,
            shared_database_applies_each_entry_once,
            aborted_transaction_leaves_nothing,
            snapshot_export_and_install,
        );
    };
    (@cases $driver:expr; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::testing::run_case($driver, stringify!($case), |db| {
                    Box::pin($crate::testing::cases::$case(db))
                })
                .await;
            }
        )+
    };
}

/// The contract cases. Each takes a fresh database.
pub mod cases {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use super::TestDb;
    use crate::*;

    /// A fixed base time so cases never depend on the wall clock.
    pub const T0: Ts = Ts(1_700_000_000_000_000);

    fn at(ms: i64) -> Ts {
        T0.plus_millis(ms)
    }

    pub fn sandbox(id: &str, owner: &str, created_ms: i64) -> Sandbox {
        Sandbox {
            id: id.into(),
            state: SandboxState::Creating,
            runtime: "mock".into(),
            image: "busybox:latest".into(),
            memory_mb: 256,
            vcpus: 1,
            owner_id: owner.into(),
            tenant_id: "".into(),
            worker_id: "w1".into(),
            runtime_id: "".into(),
            metadata: BTreeMap::from([
                ("purpose".into(), "test".into()),
                ("ünï".into(), "cödé".into()),
            ]),
            created_at: at(created_ms),
            updated_at: at(created_ms),
            expires_at: at(created_ms + 60_000),
        }
    }

    pub fn worker(id: &str) -> Worker {
        Worker {
            id: id.into(),
            hostname: format!("{id}.local"),
            status: WorkerStatus::Online,
            rpc_url: format!("http://127.0.0.1:9000/{id}"),
            runtimes: vec!["mock".into(), "docker".into()],
            capabilities: vec!["exec".into()],
            capacity: BTreeMap::from([("sandboxes".into(), 10)]),
            last_heartbeat: T0,
            created_at: T0,
            updated_at: T0,
        }
    }

    pub fn acquire(rid: &str, holder: &str, ttl_ms: i64, now: Ts) -> AcquireLease {
        AcquireLease {
            resource_id: rid.into(),
            resource_type: "sandbox".into(),
            holder_id: holder.into(),
            ttl_ms,
            now,
        }
    }

    fn tenant(id: &str) -> Tenant {
        Tenant {
            id: id.into(),
            name: format!("Tenant {id}"),
            owner_id: "alice".into(),
            settings: r#"{"tier":"gold"}"#.into(),
            created_at: T0,
            updated_at: T0,
        }
    }

    fn member(tenant: &str, user: &str, role: MemberRole) -> TenantMember {
        TenantMember {
            tenant_id: tenant.into(),
            user_id: user.into(),
            role,
            created_at: T0,
            updated_at: T0,
        }
    }

    fn policy(id: &str, tenant: Option<&str>, priority: i64) -> Policy {
        Policy {
            id: id.into(),
            tenant_id: tenant.map(Into::into),
            resource_type: PolicyResource::Image,
            effect: PolicyEffect::Deny,
            pattern: "evil/*".into(),
            priority,
            created_at: T0,
            updated_at: T0,
        }
    }

    fn template(name: &str) -> Template {
        Template {
            name: name.into(),
            version: 1,
            image: "python:3.12".into(),
            description: "python sandbox".into(),
            runtime: "docker".into(),
            setup: vec!["pip install numpy".into()],
            allowed_hosts: vec!["pypi.org".into()],
            env: BTreeMap::from([("LANG".into(), "C.UTF-8".into())]),
            memory_mb: 1024,
            vcpus: 2,
            ttl_seconds: 600,
            created_at: T0,
            updated_at: T0,
        }
    }

    fn admin_audit(actor: &str, status: i64, path: &str, ms: i64) -> AdminAudit {
        AdminAudit {
            id: 0,
            actor: actor.into(),
            method: "POST".into(),
            path: path.into(),
            status,
            duration_ms: 3,
            request_id: format!("req-{ms}"),
            remote_addr: "127.0.0.1".into(),
            user_agent: "test".into(),
            tenant_id: "t1".into(),
            created_at: at(ms),
        }
    }

    fn op_audit(action: &str, sandbox: &str, status: AuditStatus, ms: i64) -> OperationAudit {
        OperationAudit {
            id: 0,
            actor: "alice".into(),
            action: action.into(),
            sandbox_id: sandbox.into(),
            resource: "echo hi".into(),
            runtime: "mock".into(),
            status,
            detail: "exit=0".into(),
            tenant_id: "".into(),
            created_at: at(ms),
        }
    }

    async fn exec(s: &dyn Store, m: Mutation) -> Result<MutationOutput, StoreError> {
        s.execute(&m).await
    }

    async fn ok(s: &dyn Store, m: Mutation) -> MutationOutput {
        let desc = format!("{m:?}");
        s.execute(&m)
            .await
            .unwrap_or_else(|e| panic!("{desc} failed: {e}"))
    }

    #[track_caller]
    fn assert_conflict<T: std::fmt::Debug>(r: Result<T, StoreError>, what: &str) -> String {
        match r {
            Err(StoreError::Conflict { reason, .. }) => reason,
            other => panic!("{what}: expected Conflict, got {other:?}"),
        }
    }

    #[track_caller]
    fn assert_not_found<T: std::fmt::Debug>(r: Result<T, StoreError>, what: &str) {
        assert!(
            matches!(r, Err(StoreError::NotFound { .. })),
            "{what}: expected NotFound, got {r:?}"
        );
    }

    #[track_caller]
    fn assert_invalid<T: std::fmt::Debug>(r: Result<T, StoreError>, what: &str) {
        assert!(
            matches!(r, Err(StoreError::Invalid(_))),
            "{what}: expected Invalid, got {r:?}"
        );
    }

    pub async fn sandboxes_crud(db: TestDb) {
        let s = &*db.store;
        let a = sandbox("sb-aaaa0001", "alice", 0);
        let b = sandbox("sb-bbbb0002", "bob", 10);
        ok(s, Mutation::CreateSandbox(a.clone())).await;
        ok(s, Mutation::CreateSandbox(b.clone())).await;
        assert_eq!(
            s.get_sandbox(&a.id).await.unwrap(),
            a,
            "round trip keeps every field"
        );
        assert_conflict(
            exec(s, Mutation::CreateSandbox(a.clone())).await,
            "duplicate sandbox",
        );

        let all = s.list_sandboxes(&SandboxFilter::default()).await.unwrap();
        assert_eq!(
            all.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
            [&b.id, &a.id],
            "newest first"
        );
        let alice = SandboxFilter {
            owner_id: Some("alice".into()),
            ..Default::default()
        };
        assert_eq!(s.list_sandboxes(&alice).await.unwrap(), vec![a.clone()]);
        assert_eq!(s.count_active_sandboxes(None).await.unwrap(), 2);
        assert_eq!(s.count_active_sandboxes(Some("bob")).await.unwrap(), 1);

        ok(
            s,
            Mutation::SetSandboxState {
                id: a.id.clone(),
                state: SandboxState::Running,
                at: at(5),
            },
        )
        .await;
        ok(
            s,
            Mutation::SetSandboxPlacement {
                id: a.id.clone(),
                worker_id: "w2".into(),
                runtime_id: "ctr-1".into(),
                at: at(6),
            },
        )
        .await;
        let got = s.get_sandbox(&a.id).await.unwrap();
        assert_eq!(
            (got.state, got.worker_id.as_str(), got.runtime_id.as_str()),
            (SandboxState::Running, "w2", "ctr-1")
        );
        assert_eq!(got.updated_at, at(6));

        // Expiry moved into the past makes it show up as expired.
        assert!(
            s.list_expired_sandboxes(at(1_000))
                .await
                .unwrap()
                .is_empty()
        );
        ok(
            s,
            Mutation::SetSandboxExpiry {
                id: a.id.clone(),
                expires_at: at(500),
                at: at(7),
            },
        )
        .await;
        let expired = s.list_expired_sandboxes(at(1_000)).await.unwrap();
        assert_eq!(
            expired.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
            [a.id.as_str()]
        );

        // Soft delete: gone from listings and counts, still readable.
        ok(
            s,
            Mutation::DestroySandbox {
                id: a.id.clone(),
                at: at(8),
            },
        )
        .await;
        assert_eq!(
            s.get_sandbox(&a.id).await.unwrap().state,
            SandboxState::Destroyed
        );
        assert_eq!(
            s.list_sandboxes(&SandboxFilter::default()).await.unwrap(),
            vec![b.clone()]
        );
        assert!(
            s.list_expired_sandboxes(at(1_000_000))
                .await
                .unwrap()
                .iter()
                .all(|x| x.id != a.id)
        );
        assert_eq!(s.count_active_sandboxes(None).await.unwrap(), 1);
        ok(
            s,
            Mutation::DestroySandbox {
                id: a.id.clone(),
                at: at(9),
            },
        )
        .await;
        assert_conflict(
            exec(
                s,
                Mutation::SetSandboxState {
                    id: a.id.clone(),
                    state: SandboxState::Running,
                    at: at(9),
                },
            )
            .await,
            "state change on a destroyed sandbox",
        );
        assert_conflict(
            exec(
                s,
                Mutation::SetSandboxExpiry {
                    id: a.id.clone(),
                    expires_at: at(99_999),
                    at: at(9),
                },
            )
            .await,
            "extend a destroyed sandbox",
        );
        assert_not_found(s.get_sandbox("sb-missing").await, "get missing");
        assert_not_found(
            exec(
                s,
                Mutation::DestroySandbox {
                    id: "sb-missing".into(),
                    at: T0,
                },
            )
            .await,
            "destroy missing",
        );
    }

    pub async fn sandbox_listing_filters_and_paging(db: TestDb) {
        let s = &*db.store;
        for i in 0..5 {
            let mut sb = sandbox(
                &format!("sb-{i:08}"),
                if i % 2 == 0 { "even" } else { "odd" },
                i * 10,
            );
            sb.tenant_id = format!("t{}", i % 2);
            sb.worker_id = format!("w{}", i % 3);
            ok(s, Mutation::CreateSandbox(sb)).await;
        }
        let ids = |v: Vec<Sandbox>| v.into_iter().map(|x| x.id).collect::<Vec<_>>();
        let page = SandboxFilter {
            limit: Some(2),
            offset: Some(1),
            ..Default::default()
        };
        assert_eq!(
            ids(s.list_sandboxes(&page).await.unwrap()),
            ["sb-00000003", "sb-00000002"]
        );
        let t1 = SandboxFilter {
            tenant_id: Some("t1".into()),
            ..Default::default()
        };
        assert_eq!(
            ids(s.list_sandboxes(&t1).await.unwrap()),
            ["sb-00000003", "sb-00000001"]
        );
        let w0 = SandboxFilter {
            worker_id: Some("w0".into()),
            ..Default::default()
        };
        assert_eq!(
            ids(s.list_sandboxes(&w0).await.unwrap()),
            ["sb-00000003", "sb-00000000"]
        );
        ok(
            s,
            Mutation::SetSandboxState {
                id: "sb-00000004".into(),
                state: SandboxState::Running,
                at: T0,
            },
        )
        .await;
        let running = SandboxFilter {
            state: Some(SandboxState::Running),
            ..Default::default()
        };
        assert_eq!(
            ids(s.list_sandboxes(&running).await.unwrap()),
            ["sb-00000004"]
        );
        let even_w1 = SandboxFilter {
            owner_id: Some("even".into()),
            worker_id: Some("w1".into()),
            ..Default::default()
        };
        assert_eq!(
            ids(s.list_sandboxes(&even_w1).await.unwrap()),
            ["sb-00000004"]
        );
    }

    pub async fn exec_logs(db: TestDb) {
        let s = &*db.store;
        ok(
            s,
            Mutation::CreateSandbox(sandbox("sb-logs0001", "alice", 0)),
        )
        .await;
        let log = |cmd: &str, ms: i64| ExecLog {
            id: 0,
            sandbox_id: "sb-logs0001".into(),
            command: cmd.into(),
            exit_code: 3,
            stdout: "out\n".into(),
            stderr: "err\n".into(),
            duration_ms: 12,
            created_at: at(ms),
        };
        let MutationOutput::Id(first) = ok(s, Mutation::AppendExecLog(log("echo 1", 0))).await
        else {
            panic!("append returns an id")
        };
        let MutationOutput::Id(second) = ok(s, Mutation::AppendExecLog(log("echo 2", 100))).await
        else {
            panic!("append returns an id")
        };
        assert!(second > first, "ids increase");
        let logs = s.list_exec_logs("sb-logs0001", None).await.unwrap();
        assert_eq!(logs.len(), 2);
        assert_eq!(
            logs[0],
            ExecLog {
                id: second,
                ..log("echo 2", 100)
            },
            "newest first, round trip"
        );
        assert_eq!(
            s.list_exec_logs("sb-logs0001", Some(1))
                .await
                .unwrap()
                .len(),
            1
        );
        let mut orphan = log("x", 0);
        orphan.sandbox_id = "sb-nosuch".into();
        assert_conflict(
            exec(s, Mutation::AppendExecLog(orphan)).await,
            "exec log for an unknown sandbox",
        );
        assert_eq!(
            ok(s, Mutation::DeleteExecLogsBefore { before: at(50) }).await,
            MutationOutput::Count(1)
        );
        assert_eq!(
            s.list_exec_logs("sb-logs0001", None).await.unwrap().len(),
            1
        );
    }

    pub async fn workers(db: TestDb) {
        let s = &*db.store;
        ok(s, Mutation::PutWorker(worker("w2"))).await;
        ok(s, Mutation::PutWorker(worker("w1"))).await;
        assert_eq!(s.get_worker("w1").await.unwrap(), worker("w1"));
        let mut again = worker("w1");
        again.status = WorkerStatus::Draining;
        again.capacity.insert("sandboxes".into(), 3);
        again.created_at = at(999);
        again.updated_at = at(1000);
        ok(s, Mutation::PutWorker(again.clone())).await;
        let got = s.get_worker("w1").await.unwrap();
        assert_eq!(got.created_at, T0, "created_at is kept from the first save");
        assert_eq!(
            (got.status, got.capacity["sandboxes"], got.updated_at),
            (WorkerStatus::Draining, 3, at(1000))
        );
        let ids: Vec<_> = s
            .list_workers()
            .await
            .unwrap()
            .into_iter()
            .map(|w| w.id)
            .collect();
        assert_eq!(ids, ["w1", "w2"]);
        ok(
            s,
            Mutation::SetWorkerStatus {
                id: "w2".into(),
                status: WorkerStatus::Offline,
                at: at(5),
            },
        )
        .await;
        assert_eq!(
            s.get_worker("w2").await.unwrap().status,
            WorkerStatus::Offline
        );
        ok(s, Mutation::DeleteWorker { id: "w2".into() }).await;
        assert_not_found(s.get_worker("w2").await, "deleted worker");
        assert_not_found(
            exec(s, Mutation::DeleteWorker { id: "w2".into() }).await,
            "delete twice",
        );
        assert_not_found(
            exec(
                s,
                Mutation::SetWorkerStatus {
                    id: "nope".into(),
                    status: WorkerStatus::Online,
                    at: T0,
                },
            )
            .await,
            "status of missing worker",
        );
    }

    pub async fn leases_basic(db: TestDb) {
        let s = &*db.store;
        let l1 = s
            .acquire_lease(acquire("sb-1", "w1", 10_000, T0))
            .await
            .unwrap();
        assert_eq!(
            (l1.generation, l1.holder_id.as_str(), l1.expires_at),
            (1, "w1", at(10_000))
        );
        let reason = assert_conflict(
            s.acquire_lease(acquire("sb-1", "w2", 10_000, at(1))).await,
            "other holder",
        );
        assert!(reason.contains("w1"), "conflict names the holder: {reason}");
        let renewed = s
            .renew_lease(RenewLease {
                resource_id: "sb-1".into(),
                holder_id: "w1".into(),
                generation: 1,
                ttl_ms: 20_000,
                now: at(5_000),
            })
            .await
            .unwrap();
        assert_eq!(
            (renewed.generation, renewed.expires_at),
            (1, at(25_000)),
            "renew extends the same grant"
        );
        assert_eq!(s.get_lease("sb-1").await.unwrap(), renewed);
        assert_conflict(
            s.release_lease("sb-1", "w2").await,
            "release by a non-holder",
        );
        s.acquire_lease(acquire("sb-2", "w2", 10_000, T0))
            .await
            .unwrap();
        assert_eq!(s.list_leases(None).await.unwrap().len(), 2);
        let w2: Vec<_> = s
            .list_leases(Some("w2"))
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.resource_id)
            .collect();
        assert_eq!(w2, ["sb-2"]);
        s.release_lease("sb-1", "w1").await.unwrap();
        assert_not_found(s.get_lease("sb-1").await, "released lease");
        assert_not_found(s.release_lease("sb-1", "w1").await, "release twice");
        // The same holder re-acquiring bumps the generation.
        let again = s
            .acquire_lease(acquire("sb-2", "w2", 10_000, at(1)))
            .await
            .unwrap();
        assert_eq!(again.generation, 2);
    }

    pub async fn leases_expired_takeover(db: TestDb) {
        let s = &*db.store;
        let first = s
            .acquire_lease(acquire("sb-x", "w1", 1_000, T0))
            .await
            .unwrap();
        assert_conflict(
            s.acquire_lease(acquire("sb-x", "w2", 1_000, at(999))).await,
            "1 ms before expiry",
        );
        let taken = s
            .acquire_lease(acquire("sb-x", "w2", 1_000, at(1_000)))
            .await
            .unwrap();
        assert_eq!(taken.holder_id, "w2");
        assert!(
            taken.generation > first.generation,
            "takeover gets a higher generation"
        );
        // The old holder can no longer renew or release it.
        assert_conflict(
            s.renew_lease(RenewLease {
                resource_id: "sb-x".into(),
                holder_id: "w1".into(),
                generation: first.generation,
                ttl_ms: 1_000,
                now: at(1_001),
            })
            .await,
            "old holder renews",
        );
        assert_conflict(s.release_lease("sb-x", "w1").await, "old holder releases");
    }

    pub async fn leases_generations_survive_release(db: TestDb) {
        let s = &*db.store;
        let mut last = 0;
        for (i, holder) in ["w1", "w1", "w2", "w3"].into_iter().enumerate() {
            let l = s
                .acquire_lease(acquire("sb-g", holder, 1_000, at(i as i64)))
                .await
                .unwrap();
            assert_eq!(l.generation, last + 1, "grant {i} by {holder}");
            last = l.generation;
            s.release_lease("sb-g", holder).await.unwrap();
        }
        assert_eq!(s.lease_generation("sb-g").await.unwrap(), 4);
        ok(
            s,
            Mutation::AcquireLease(acquire("sb-g", "w9", 1_000, at(10))),
        )
        .await;
        ok(
            s,
            Mutation::RevokeLease {
                resource_id: "sb-g".into(),
            },
        )
        .await;
        assert_not_found(
            exec(
                s,
                Mutation::RevokeLease {
                    resource_id: "sb-g".into(),
                },
            )
            .await,
            "revoke twice",
        );
        assert_eq!(
            s.acquire_lease(acquire("sb-g", "w1", 1_000, at(11)))
                .await
                .unwrap()
                .generation,
            6
        );
        assert_eq!(s.lease_generation("sb-never").await.unwrap(), 0);
    }

    pub async fn leases_renew_rules(db: TestDb) {
        let s = &*db.store;
        let l = s
            .acquire_lease(acquire("sb-r", "w1", 1_000, T0))
            .await
            .unwrap();
        let renew = |generation: i64, ttl_ms: i64, now: Ts| RenewLease {
            resource_id: "sb-r".into(),
            holder_id: "w1".into(),
            generation,
            ttl_ms,
            now,
        };
        assert_conflict(
            s.renew_lease(renew(l.generation + 1, 1_000, at(1))).await,
            "wrong generation",
        );
        let capped = s
            .renew_lease(renew(l.generation, i64::MAX, at(1)))
            .await
            .unwrap();
        assert_eq!(
            capped.expires_at,
            at(1).plus_millis(lease::MAX_LEASE_TTL_MS),
            "ttl is capped"
        );
        assert_invalid(
            s.renew_lease(renew(l.generation, 0, at(2))).await,
            "zero ttl",
        );
        assert_conflict(
            s.renew_lease(renew(l.generation, 1_000, capped.expires_at))
                .await,
            "renew at the expiry instant",
        );
        assert_not_found(
            s.renew_lease(RenewLease {
                resource_id: "sb-none".into(),
                ..renew(1, 1_000, at(1))
            })
            .await,
            "renew a lease that does not exist",
        );
        assert_invalid(
            s.acquire_lease(acquire("sb-r2", "w1", -1, T0)).await,
            "negative ttl",
        );
        assert_invalid(
            s.acquire_lease(acquire("", "w1", 1_000, T0)).await,
            "empty resource",
        );
        assert_invalid(
            s.acquire_lease(acquire("sb-r2", "", 1_000, T0)).await,
            "empty holder",
        );
        assert_not_found(s.get_lease("sb-r2").await, "refused acquires leave no row");
    }

    pub async fn audits_filters_and_retention(db: TestDb) {
        let s = &*db.store;
        ok(
            s,
            Mutation::AppendAdminAudit(admin_audit("alice", 200, "/api/v1/admin/tenants", 0)),
        )
        .await;
        ok(
            s,
            Mutation::AppendAdminAudit(admin_audit(
                "alice",
                403,
                "/api/v1/admin/worker-tokens",
                10,
            )),
        )
        .await;
        ok(
            s,
            Mutation::AppendAdminAudit(admin_audit("bob", 200, "/api/v1/admin/tenants/t1", 20)),
        )
        .await;
        let by =
            |actor: Option<&str>, status: Option<i64>, prefix: Option<&str>| AdminAuditFilter {
                actor: actor.map(Into::into),
                status,
                path_prefix: prefix.map(Into::into),
                ..Default::default()
            };
        let rows = s
            .list_admin_audit(&by(Some("alice"), Some(200), None))
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].path, "/api/v1/admin/tenants");
        assert!(rows[0].id > 0);
        let tenants = s
            .list_admin_audit(&by(None, None, Some("/api/v1/admin/tenants")))
            .await
            .unwrap();
        assert_eq!(
            tenants.iter().map(|r| r.actor.as_str()).collect::<Vec<_>>(),
            ["bob", "alice"],
            "newest first"
        );
        let since = AdminAuditFilter {
            since: Some(at(10)),
            ..Default::default()
        };
        assert_eq!(s.list_admin_audit(&since).await.unwrap().len(), 2);
        let one = AdminAuditFilter {
            limit: Some(1),
            ..Default::default()
        };
        assert_eq!(s.list_admin_audit(&one).await.unwrap()[0].actor, "bob");
        assert_eq!(
            ok(s, Mutation::DeleteAdminAuditBefore { before: at(10) }).await,
            MutationOutput::Count(1)
        );
        assert_eq!(
            s.list_admin_audit(&AdminAuditFilter::default())
                .await
                .unwrap()
                .len(),
            2
        );

        ok(
            s,
            Mutation::AppendOperationAudit(op_audit("exec", "sb-1", AuditStatus::Success, 0)),
        )
        .await;
        ok(
            s,
            Mutation::AppendOperationAudit(op_audit("exec", "sb-2", AuditStatus::Failure, 10)),
        )
        .await;
        ok(
            s,
            Mutation::AppendOperationAudit(op_audit(
                "sandbox.destroy",
                "sb-1",
                AuditStatus::Success,
                20,
            )),
        )
        .await;
        let f = OperationAuditFilter {
            sandbox_id: Some("sb-1".into()),
            ..Default::default()
        };
        let rows = s.list_operation_audit(&f).await.unwrap();
        assert_eq!(
            rows.iter().map(|r| r.action.as_str()).collect::<Vec<_>>(),
            ["sandbox.destroy", "exec"]
        );
        let failed = OperationAuditFilter {
            status: Some(AuditStatus::Failure),
            action: Some("exec".into()),
            ..Default::default()
        };
        let rows = s.list_operation_audit(&failed).await.unwrap();
        assert_eq!((rows.len(), rows[0].sandbox_id.as_str()), (1, "sb-2"));
        assert_eq!(
            ok(s, Mutation::DeleteOperationAuditBefore { before: at(15) }).await,
            MutationOutput::Count(2)
        );
    }

    pub async fn quotas(db: TestDb) {
        let s = &*db.store;
        let q = |owner: &str, max: i64, ms: i64| OwnerQuota {
            owner_id: owner.into(),
            max_sandboxes: max,
            max_ttl_seconds: 3600,
            max_exec_timeout_seconds: 60,
            created_at: at(ms),
            updated_at: at(ms),
        };
        ok(s, Mutation::PutQuota(q("bob", 5, 0))).await;
        ok(s, Mutation::PutQuota(q("alice", 2, 0))).await;
        ok(s, Mutation::PutQuota(q("alice", 9, 50))).await;
        let got = s.get_quota("alice").await.unwrap();
        assert_eq!(
            (got.max_sandboxes, got.created_at, got.updated_at),
            (9, T0, at(50)),
            "upsert overwrites, keeps created_at"
        );
        let owners: Vec<_> = s
            .list_quotas()
            .await
            .unwrap()
            .into_iter()
            .map(|q| q.owner_id)
            .collect();
        assert_eq!(owners, ["alice", "bob"]);
        ok(
            s,
            Mutation::DeleteQuota {
                owner_id: "alice".into(),
            },
        )
        .await;
        assert_not_found(s.get_quota("alice").await, "deleted quota");
        assert_not_found(
            exec(
                s,
                Mutation::DeleteQuota {
                    owner_id: "alice".into(),
                },
            )
            .await,
            "delete twice",
        );
        assert_invalid(
            exec(s, Mutation::PutQuota(q("carol", -1, 0))).await,
            "negative quota",
        );
    }

    pub async fn templates(db: TestDb) {
        let s = &*db.store;
        ok(s, Mutation::CreateTemplate(template("py"))).await;
        assert_eq!(s.get_template("py").await.unwrap(), template("py"));
        assert_conflict(
            exec(s, Mutation::CreateTemplate(template("py"))).await,
            "duplicate template",
        );
        let mut v2 = template("py");
        v2.version = 2;
        v2.setup.push("pip install pandas".into());
        v2.updated_at = at(10);
        ok(s, Mutation::UpdateTemplate(v2.clone())).await;
        assert_eq!(s.get_template("py").await.unwrap(), v2);
        ok(s, Mutation::CreateTemplate(template("node"))).await;
        let names: Vec<_> = s
            .list_templates()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["node", "py"]);
        ok(s, Mutation::DeleteTemplate { name: "py".into() }).await;
        assert_not_found(s.get_template("py").await, "deleted template");
        assert_not_found(
            exec(s, Mutation::UpdateTemplate(template("py"))).await,
            "update a missing template",
        );
    }

    pub async fn tenants_members_policies(db: TestDb) {
        let s = &*db.store;
        ok(s, Mutation::CreateTenant(tenant("t1"))).await;
        ok(
            s,
            Mutation::CreateTenant(Tenant {
                created_at: at(5),
                ..tenant("t2")
            }),
        )
        .await;
        assert_eq!(s.get_tenant("t1").await.unwrap(), tenant("t1"));
        let ids: Vec<_> = s
            .list_tenants()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, ["t2", "t1"], "newest first");
        let renamed = Tenant {
            name: "Renamed".into(),
            updated_at: at(9),
            ..tenant("t1")
        };
        ok(s, Mutation::UpdateTenant(renamed.clone())).await;
        assert_eq!(s.get_tenant("t1").await.unwrap(), renamed);
        assert_not_found(
            exec(s, Mutation::UpdateTenant(tenant("t9"))).await,
            "update a missing tenant",
        );

        ok(
            s,
            Mutation::PutMember(member("t1", "alice", MemberRole::Viewer)),
        )
        .await;
        ok(
            s,
            Mutation::PutMember(member("t1", "alice", MemberRole::Admin)),
        )
        .await;
        ok(
            s,
            Mutation::PutMember(member("t1", "bob", MemberRole::Operator)),
        )
        .await;
        assert_eq!(
            s.get_member("t1", "alice").await.unwrap().role,
            MemberRole::Admin,
            "upsert changes the role"
        );
        assert_eq!(s.list_members("t1").await.unwrap().len(), 2);
        ok(
            s,
            Mutation::DeleteMember {
                tenant_id: "t1".into(),
                user_id: "bob".into(),
            },
        )
        .await;
        assert_not_found(s.get_member("t1", "bob").await, "deleted member");
        assert_conflict(
            exec(
                s,
                Mutation::PutMember(member("t9", "x", MemberRole::Viewer)),
            )
            .await,
            "member of a missing tenant",
        );

        ok(s, Mutation::CreatePolicy(policy("pol-global", None, 20))).await;
        ok(s, Mutation::CreatePolicy(policy("pol-t1", Some("t1"), 5))).await;
        ok(s, Mutation::CreatePolicy(policy("pol-t2", Some("t2"), 1))).await;
        let for_t1: Vec<_> = s
            .list_policies(Some("t1"), None)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(
            for_t1,
            ["pol-t1", "pol-global"],
            "tenant + global, by priority"
        );
        let globals: Vec<_> = s
            .list_policies(None, None)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(globals, ["pol-global"]);
        assert!(
            s.list_policies(Some("t1"), Some(PolicyResource::Network))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            s.get_policy("pol-t1").await.unwrap(),
            policy("pol-t1", Some("t1"), 5)
        );
        ok(
            s,
            Mutation::DeletePolicy {
                id: "pol-t2".into(),
            },
        )
        .await;
        assert_not_found(s.get_policy("pol-t2").await, "deleted policy");

        // Deleting a tenant takes its members and policies with it; globals stay.
        ok(s, Mutation::DeleteTenant { id: "t1".into() }).await;
        assert_not_found(s.get_tenant("t1").await, "deleted tenant");
        assert!(
            s.list_members("t1").await.unwrap().is_empty(),
            "members cascade"
        );
        assert_not_found(s.get_policy("pol-t1").await, "tenant policy cascades");
        assert_eq!(s.get_policy("pol-global").await.unwrap().id, "pol-global");
        assert_not_found(
            exec(s, Mutation::DeleteTenant { id: "t1".into() }).await,
            "delete twice",
        );
    }

    pub async fn revoked_token_ids(db: TestDb) {
        let s = &*db.store;
        // Removed replica IDs live beside revoked token IDs: both are never-again lists.
        assert!(!s.is_node_removed(3).await.unwrap());
        ok(s, Mutation::RecordRemovedNode { node_id: 3, at: T0 }).await;
        ok(
            s,
            Mutation::RecordRemovedNode {
                node_id: 3,
                at: at(1),
            },
        )
        .await;
        assert!(s.is_node_removed(3).await.unwrap());
        assert_invalid(
            exec(s, Mutation::RecordRemovedNode { node_id: 0, at: T0 }).await,
            "node id 0",
        );
        // Incarnations only move forward; the same start may be recorded twice.
        let inc = |n: i64, boot: &str| Mutation::RecordIncarnation {
            node_id: 2,
            incarnation: n,
            boot_id: boot.into(),
            at: T0,
        };
        ok(s, inc(1, "boot-a")).await;
        ok(s, inc(1, "boot-a")).await;
        ok(s, inc(3, "boot-b")).await;
        assert_conflict(
            exec(s, inc(3, "boot-c")).await,
            "same incarnation, other boot",
        );
        assert_conflict(exec(s, inc(2, "boot-d")).await, "older incarnation");
        ok(s, inc(4, "boot-e")).await;
        let snap = s.export_snapshot().await.unwrap();
        assert_eq!(snap.incarnations.len(), 1);
        assert_eq!(snap.incarnations[0].1, 4);
        assert_invalid(exec(s, inc(0, "boot-f")).await, "incarnation 0");
        let r = |jti: &str, exp_ms: i64| RevokedToken {
            jti: jti.into(),
            reason: "leaked".into(),
            revoked_at: T0,
            expires_at: at(exp_ms),
        };
        assert!(!s.is_token_revoked("jti-1").await.unwrap());
        ok(s, Mutation::RevokeToken(r("jti-1", 1_000))).await;
        ok(s, Mutation::RevokeToken(r("jti-1", 1_000))).await;
        ok(s, Mutation::RevokeToken(r("jti-2", 9_000))).await;
        assert!(s.is_token_revoked("jti-1").await.unwrap());
        assert_eq!(
            s.list_revoked_tokens().await.unwrap().len(),
            2,
            "revoking twice is idempotent"
        );
        assert_eq!(
            ok(s, Mutation::PruneRevokedTokens { now: at(1_000) }).await,
            MutationOutput::Count(1)
        );
        assert!(!s.is_token_revoked("jti-1").await.unwrap());
        assert!(s.is_token_revoked("jti-2").await.unwrap());
    }

    /// Hex SHA-256 of `secret`: what the store keeps instead of a secret.
    pub fn secret_hash(secret: &str) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(secret.as_bytes()))
    }

    /// An unused enrollment of `secret` for `worker_id`, created at T0 and
    /// expiring `expires_ms` after it.
    pub fn enrollment(secret: &str, worker_id: &str, expires_ms: i64) -> Enrollment {
        Enrollment {
            token_hash: secret_hash(secret),
            worker_id: worker_id.into(),
            created_at: T0,
            expires_at: at(expires_ms),
            used_at: None,
        }
    }

    /// Consume `secret`'s enrollment as `worker_id`, receiving `credential`.
    pub fn consume(secret: &str, worker_id: &str, credential: &str, now: Ts) -> Mutation {
        Mutation::ConsumeEnrollment {
            token_hash: secret_hash(secret),
            worker_id: worker_id.into(),
            credential_hash: secret_hash(credential),
            now,
        }
    }

    pub async fn enrollments(db: TestDb) {
        let s = &*db.store;
        let e1 = enrollment("enroll-1", "w1", 10_000);
        ok(s, Mutation::CreateEnrollment(e1.clone())).await;
        assert_eq!(s.get_enrollment(&e1.token_hash).await.unwrap(), e1);
        assert_conflict(
            exec(s, Mutation::CreateEnrollment(e1.clone())).await,
            "same hash twice",
        );
        assert_not_found(s.get_worker_credential("w1").await, "before enrolling");

        // Consuming it gives the worker its credential, in the same mutation.
        assert_eq!(
            ok(s, consume("enroll-1", "w1", "cred-1", at(1))).await,
            MutationOutput::Done
        );
        assert_eq!(
            s.get_enrollment(&e1.token_hash).await.unwrap().used_at,
            Some(at(1))
        );
        let cred = WorkerCredential {
            worker_id: "w1".into(),
            token_hash: secret_hash("cred-1"),
            created_at: at(1),
            updated_at: at(1),
        };
        assert_eq!(s.get_worker_credential("w1").await.unwrap(), cred);

        // Single use: a second consumption is refused and changes nothing.
        assert_eq!(
            assert_conflict(
                exec(s, consume("enroll-1", "w1", "cred-x", at(2))).await,
                "second use",
            ),
            "already used"
        );
        // Used wins over expired: the first reason checked is use.
        assert_eq!(
            assert_conflict(
                exec(s, consume("enroll-1", "w1", "cred-x", at(20_000))).await,
                "second use after expiry",
            ),
            "already used"
        );
        assert_eq!(s.get_worker_credential("w1").await.unwrap(), cred);

        // Expired: expires_at <= now.
        ok(
            s,
            Mutation::CreateEnrollment(enrollment("enroll-2", "w1", 1_000)),
        )
        .await;
        assert_eq!(
            assert_conflict(
                exec(s, consume("enroll-2", "w1", "cred-x", at(1_000))).await,
                "expired at exactly expires_at",
            ),
            "expired"
        );
        assert_eq!(
            s.get_enrollment(&secret_hash("enroll-2"))
                .await
                .unwrap()
                .used_at,
            None,
            "a refused consumption leaves the enrollment unused"
        );

        // Issued for another worker.
        ok(
            s,
            Mutation::CreateEnrollment(enrollment("enroll-3", "w2", 10_000)),
        )
        .await;
        assert_eq!(
            assert_conflict(
                exec(s, consume("enroll-3", "w1", "cred-x", at(2))).await,
                "wrong worker",
            ),
            "issued for another worker"
        );
        assert_eq!(s.get_worker_credential("w1").await.unwrap(), cred);

        // Unknown hash.
        let unknown = exec(s, consume("never-issued", "w1", "cred-x", at(2))).await;
        assert!(
            matches!(&unknown, Err(StoreError::NotFound { entity, .. }) if entity == "enrollment"),
            "unknown enrollment: {unknown:?}"
        );
        assert_not_found(
            s.get_enrollment(&secret_hash("never-issued")).await,
            "get unknown",
        );

        // Atomic: when a later member fails, the consumption is undone too.
        assert_not_found(
            exec(
                s,
                Mutation::Atomic(vec![
                    consume("enroll-3", "w2", "cred-2", at(3)),
                    Mutation::DeleteWorkerCredential {
                        worker_id: "w-none".into(),
                    },
                ]),
            )
            .await,
            "group with a missing credential",
        );
        assert_eq!(
            s.get_enrollment(&secret_hash("enroll-3"))
                .await
                .unwrap()
                .used_at,
            None
        );
        assert_not_found(
            s.get_worker_credential("w2").await,
            "credential from the failed group",
        );
        ok(s, consume("enroll-3", "w2", "cred-2", at(3))).await;

        // Enrolling again replaces the hash and keeps created_at.
        ok(
            s,
            Mutation::CreateEnrollment(enrollment("enroll-4", "w1", 10_000)),
        )
        .await;
        ok(s, consume("enroll-4", "w1", "cred-1b", at(5))).await;
        assert_eq!(
            s.get_worker_credential("w1").await.unwrap(),
            WorkerCredential {
                token_hash: secret_hash("cred-1b"),
                updated_at: at(5),
                ..cred.clone()
            }
        );

        // Only hashes are stored: anything but a hex SHA-256 is refused.
        let bad_hashes = [
            String::new(),
            "not-a-hash".to_owned(),
            secret_hash("x").to_uppercase(),
            format!("{}0", secret_hash("x")),
        ];
        for bad in &bad_hashes {
            assert_invalid(
                exec(
                    s,
                    Mutation::CreateEnrollment(Enrollment {
                        token_hash: bad.clone(),
                        ..enrollment("x", "w1", 1)
                    }),
                )
                .await,
                "enrollment with a bad hash",
            );
            assert_invalid(
                exec(
                    s,
                    Mutation::ConsumeEnrollment {
                        token_hash: secret_hash("enroll-2"),
                        worker_id: "w1".into(),
                        credential_hash: bad.clone(),
                        now: at(1),
                    },
                )
                .await,
                "credential with a bad hash",
            );
        }
        assert_invalid(
            exec(s, Mutation::CreateEnrollment(enrollment("x", "", 1))).await,
            "empty worker id",
        );
        assert_invalid(
            exec(s, Mutation::CreateEnrollment(enrollment("x", "w1", 0))).await,
            "expires when created",
        );
        assert_invalid(
            exec(
                s,
                Mutation::DeleteWorkerCredential {
                    worker_id: "".into(),
                },
            )
            .await,
            "empty worker id",
        );
        assert_invalid(
            exec(s, consume("enroll-2", "w1", "c", Ts(i64::MAX))).await,
            "now beyond year 9999",
        );

        // The snapshot carries both tables, used_at included.
        let snap = s.export_snapshot().await.unwrap();
        let mut want: Vec<Enrollment> = Vec::new();
        for secret in ["enroll-1", "enroll-2", "enroll-3", "enroll-4"] {
            want.push(s.get_enrollment(&secret_hash(secret)).await.unwrap());
        }
        want.sort_by(|a, b| a.token_hash.cmp(&b.token_hash));
        assert_eq!(snap.enrollments, want, "ordered by token hash");
        assert_eq!(
            snap.worker_credentials,
            vec![
                s.get_worker_credential("w1").await.unwrap(),
                s.get_worker_credential("w2").await.unwrap(),
            ]
        );

        // Delete a credential.
        ok(
            s,
            Mutation::DeleteWorkerCredential {
                worker_id: "w1".into(),
            },
        )
        .await;
        assert_not_found(s.get_worker_credential("w1").await, "deleted credential");
        assert_not_found(
            exec(
                s,
                Mutation::DeleteWorkerCredential {
                    worker_id: "w1".into(),
                },
            )
            .await,
            "delete twice",
        );

        // Prune: strictly before `before`, used or not.
        assert_eq!(
            ok(s, Mutation::PruneEnrollments { before: at(1_000) }).await,
            MutationOutput::Count(0),
            "expires_at == before is kept"
        );
        assert_eq!(
            ok(s, Mutation::PruneEnrollments { before: at(1_001) }).await,
            MutationOutput::Count(1)
        );
        assert_not_found(
            s.get_enrollment(&secret_hash("enroll-2")).await,
            "pruned enrollment",
        );
        assert_not_found(
            exec(s, consume("enroll-2", "w1", "cred-x", at(2))).await,
            "consuming a pruned enrollment",
        );
        assert_eq!(
            ok(s, Mutation::PruneEnrollments { before: at(10_001) }).await,
            MutationOutput::Count(3),
            "used ones go too"
        );

        // Installing the snapshot brings both tables back exactly.
        s.install_snapshot(&snap).await.unwrap();
        assert_eq!(s.export_snapshot().await.unwrap(), snap);
        assert_eq!(
            s.get_worker_credential("w1").await.unwrap().token_hash,
            secret_hash("cred-1b")
        );
        assert_eq!(
            assert_conflict(
                exec(s, consume("enroll-1", "w1", "cred-x", at(6))).await,
                "restored used enrollment",
            ),
            "already used"
        );
        // An enrollment unused in the snapshot can still be consumed once.
        ok(s, consume("enroll-2", "w1", "cred-1c", at(6))).await;
        assert_eq!(
            s.get_worker_credential("w1").await.unwrap().token_hash,
            secret_hash("cred-1c")
        );

        // Another database on the same driver becomes identical.
        if db.pg_options().is_none() {
            let other = TestDb::sqlite().await;
            other.store.install_snapshot(&snap).await.unwrap();
            assert_eq!(other.store.export_snapshot().await.unwrap(), snap);
            other.cleanup().await;
        }
    }

    pub async fn unique_and_foreign_key_violations_are_conflicts(db: TestDb) {
        let s = &*db.store;
        ok(s, Mutation::CreateSandbox(sandbox("sb-dup00001", "a", 0))).await;
        assert_conflict(
            exec(s, Mutation::CreateSandbox(sandbox("sb-dup00001", "b", 1))).await,
            "sandbox",
        );
        ok(s, Mutation::CreateTenant(tenant("t-dup"))).await;
        assert_conflict(
            exec(s, Mutation::CreateTenant(tenant("t-dup"))).await,
            "tenant",
        );
        ok(s, Mutation::CreatePolicy(policy("pol-dup", None, 1))).await;
        assert_conflict(
            exec(s, Mutation::CreatePolicy(policy("pol-dup", None, 1))).await,
            "policy",
        );
        ok(s, Mutation::CreateTemplate(template("tpl-dup"))).await;
        assert_conflict(
            exec(s, Mutation::CreateTemplate(template("tpl-dup"))).await,
            "template",
        );
        assert_conflict(
            exec(
                s,
                Mutation::CreatePolicy(policy("pol-fk", Some("t-none"), 1)),
            )
            .await,
            "policy FK",
        );
    }

    pub async fn invalid_input_is_refused(db: TestDb) {
        let s = &*db.store;
        assert_invalid(
            exec(s, Mutation::CreateSandbox(sandbox("", "a", 0))).await,
            "empty sandbox id",
        );
        assert_invalid(
            exec(s, Mutation::CreateSandbox(sandbox("sb with space", "a", 0))).await,
            "id with space",
        );
        assert_invalid(
            exec(
                s,
                Mutation::CreateSandbox(sandbox(&"x".repeat(200), "a", 0)),
            )
            .await,
            "long id",
        );
        let mut neg = sandbox("sb-neg00001", "a", 0);
        neg.memory_mb = -1;
        assert_invalid(
            exec(s, Mutation::CreateSandbox(neg)).await,
            "negative memory",
        );
        assert_invalid(
            exec(
                s,
                Mutation::CreateTenant(Tenant {
                    name: " ".into(),
                    ..tenant("t-x")
                }),
            )
            .await,
            "blank tenant name",
        );
        assert_invalid(
            exec(
                s,
                Mutation::CreateTemplate(Template {
                    image: "".into(),
                    ..template("tpl-x")
                }),
            )
            .await,
            "template without image",
        );
        assert_invalid(
            exec(
                s,
                Mutation::CreatePolicy(Policy {
                    pattern: "".into(),
                    ..policy("pol-x", None, 1)
                }),
            )
            .await,
            "empty pattern",
        );
        let mut nul = sandbox("sb-nul00001", "a", 0);
        nul.image = "busy\0box".into();
        assert_invalid(
            exec(s, Mutation::CreateSandbox(nul)).await,
            "NUL byte (Postgres TEXT cannot hold it)",
        );
        let mut far = sandbox("sb-far00001", "a", 0);
        far.expires_at = Ts(i64::MAX);
        assert_invalid(
            exec(s, Mutation::CreateSandbox(far)).await,
            "expiry beyond year 9999",
        );
        assert_invalid(
            s.acquire_lease(acquire("sb-far", "w1", 1_000, Ts(i64::MAX)))
                .await,
            "lease now out of range",
        );
        assert!("bogus".parse::<SandboxState>().is_err());
        assert!(
            s.list_sandboxes(&SandboxFilter::default())
                .await
                .unwrap()
                .is_empty(),
            "nothing was written"
        );
    }

    pub async fn exactly_once_apply(db: TestDb) {
        let s = &*db.store;
        assert_eq!(s.raft_state().await.unwrap(), RaftState::default());
        let at_index = |i: u64| AppliedLog {
            index: i,
            log_id: format!("{{\"term\":1,\"index\":{i}}}"),
        };
        let batch = vec![
            Mutation::CreateSandbox(sandbox("sb-raft0001", "a", 0)),
            Mutation::AcquireLease(acquire("sb-raft0001", "w1", 5_000, T0)),
            Mutation::SetMembership {
                membership: "{\"voters\":[1,2,3]}".into(),
            },
        ];
        let BatchOutcome::Applied(outs) = s.apply_batch(&at_index(1), &batch).await.unwrap() else {
            panic!("index 1 is new")
        };
        assert!(outs.iter().all(Result::is_ok), "{outs:?}");
        let state = s.raft_state().await.unwrap();
        assert_eq!(
            (state.applied_index, state.membership.as_str()),
            (1, "{\"voters\":[1,2,3]}")
        );
        assert_eq!(state.applied_log, at_index(1).log_id);

        // Replaying the same entry changes nothing.
        let replay = vec![Mutation::AcquireLease(acquire(
            "sb-raft0001",
            "w1",
            5_000,
            at(1),
        ))];
        assert_eq!(
            s.apply_batch(&at_index(1), &replay).await.unwrap(),
            BatchOutcome::Skipped { applied_index: 1 }
        );
        assert_eq!(
            s.get_lease("sb-raft0001").await.unwrap().generation,
            1,
            "replay did not re-grant"
        );

        // A deterministic failure is an outcome, not an abort: the index advances.
        let mixed = vec![
            Mutation::AcquireLease(acquire("sb-raft0001", "w2", 5_000, at(1))),
            Mutation::CreateSandbox(sandbox("sb-raft0002", "a", 1)),
        ];
        let BatchOutcome::Applied(outs) = s.apply_batch(&at_index(2), &mixed).await.unwrap() else {
            panic!("index 2 is new")
        };
        assert!(
            matches!(outs[0], Err(StoreError::Conflict { .. })),
            "{outs:?}"
        );
        assert!(outs[1].is_ok());
        assert_eq!(s.raft_state().await.unwrap().applied_index, 2);
        assert!(s.get_sandbox("sb-raft0002").await.is_ok());
        // An empty entry (e.g. a blank leader entry) still advances the index.
        assert!(
            matches!(s.apply_batch(&at_index(3), &[]).await.unwrap(), BatchOutcome::Applied(v) if v.is_empty())
        );
        for old in [3, 2, 1] {
            assert_eq!(
                s.apply_batch(&at_index(old), &replay).await.unwrap(),
                BatchOutcome::Skipped { applied_index: 3 }
            );
        }
        // Several entries in one transaction: old ones skipped, new ones applied
        // in order, the index ending at the last.
        let entries = vec![
            (
                at_index(2),
                vec![Mutation::CreateSandbox(sandbox("sb-raft0099", "a", 9))],
            ),
            (
                at_index(4),
                vec![Mutation::CreateSandbox(sandbox("sb-raft0004", "a", 4))],
            ),
            (
                at_index(5),
                vec![Mutation::CreateSandbox(sandbox("sb-raft0004", "a", 4))],
            ),
        ];
        let outs = s.apply_entries(&entries).await.unwrap();
        assert_eq!(outs[0], BatchOutcome::Skipped { applied_index: 3 });
        assert!(
            matches!(&outs[1], BatchOutcome::Applied(r) if r[0].is_ok()),
            "{outs:?}"
        );
        assert!(
            matches!(&outs[2], BatchOutcome::Applied(r) if matches!(r[0], Err(StoreError::Conflict { .. }))),
            "{outs:?}"
        );
        assert_not_found(s.get_sandbox("sb-raft0099").await, "skipped entry");
        let state = s.raft_state().await.unwrap();
        assert_eq!(
            (state.applied_index, state.applied_log),
            (5, at_index(5).log_id)
        );
        assert!(s.apply_entries(&[]).await.unwrap().is_empty());
        // Indexes move forward even across a jump (as after a snapshot).
        assert!(matches!(
            s.apply_batch(&at_index(9), &[]).await.unwrap(),
            BatchOutcome::Applied(_)
        ));
        assert_eq!(
            s.apply_batch(&at_index(5), &replay).await.unwrap(),
            BatchOutcome::Skipped { applied_index: 9 }
        );
        assert_eq!(s.raft_state().await.unwrap().applied_index, 9);
    }

    pub async fn shared_database_applies_each_entry_once(db: TestDb) {
        // Several replicas sharing one database race to apply the same entries.
        let handles = [db.store.clone(), db.reopen().await, db.reopen().await];
        let mut tasks = Vec::new();
        for (n, h) in handles.iter().enumerate() {
            let h = h.clone();
            tasks.push(tokio::spawn(async move {
                let mut applied = 0;
                for i in 1..=20u64 {
                    let m = vec![Mutation::AppendAdminAudit(admin_audit(
                        &format!("replica-{n}"),
                        200,
                        &format!("/entry/{i}"),
                        i as i64,
                    ))];
                    let at = AppliedLog {
                        index: i,
                        log_id: format!("log-{i}"),
                    };
                    if let BatchOutcome::Applied(_) = h.apply_batch(&at, &m).await.unwrap() {
                        applied += 1;
                    }
                }
                applied
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        assert_eq!(
            total, 20,
            "each of the 20 entries applied exactly once across replicas"
        );
        let rows = db
            .store
            .list_admin_audit(&AdminAuditFilter {
                limit: Some(500),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut paths: Vec<_> = rows.into_iter().map(|r| r.path).collect();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), 20, "one row per entry, no duplicates");
        assert_eq!(db.store.raft_state().await.unwrap().applied_index, 20);
        for h in &handles[1..] {
            h.close().await;
        }
    }

    pub async fn aborted_transaction_leaves_nothing(db: TestDb) {
        let s = &*db.store;
        // The second member refers to a tenant that does not exist: the group fails
        // and the tenant created by the first member must not remain.
        let group = Mutation::Atomic(vec![
            Mutation::CreateTenant(tenant("t-atomic")),
            Mutation::PutMember(member("t-atomic", "alice", MemberRole::Admin)),
            Mutation::PutMember(member("t-none", "bob", MemberRole::Admin)),
        ]);
        assert_conflict(
            exec(s, group.clone()).await,
            "atomic group with a bad member",
        );
        assert_not_found(
            s.get_tenant("t-atomic").await,
            "tenant from the failed group",
        );
        assert!(s.list_members("t-atomic").await.unwrap().is_empty());

        // Inside a Raft batch: the failed group leaves nothing, its neighbours stay.
        let batch = vec![
            Mutation::CreateSandbox(sandbox("sb-keep0001", "a", 0)),
            group,
            Mutation::AcquireLease(acquire("sb-keep0001", "w1", 1_000, T0)),
        ];
        let at1 = AppliedLog {
            index: 1,
            log_id: "1".into(),
        };
        let BatchOutcome::Applied(outs) = s.apply_batch(&at1, &batch).await.unwrap() else {
            panic!("new index")
        };
        assert!(
            outs[0].is_ok() && outs[1].is_err() && outs[2].is_ok(),
            "{outs:?}"
        );
        assert_not_found(
            s.get_tenant("t-atomic").await,
            "tenant from the failed group in a batch",
        );
        assert!(s.get_sandbox("sb-keep0001").await.is_ok());
        assert_eq!(s.get_lease("sb-keep0001").await.unwrap().generation, 1);

        // A successful group reports every output.
        let good = Mutation::Atomic(vec![
            Mutation::CreateTenant(tenant("t-ok")),
            Mutation::PutMember(member("t-ok", "alice", MemberRole::Admin)),
        ]);
        assert_eq!(
            ok(s, good).await,
            MutationOutput::Many(vec![MutationOutput::Done, MutationOutput::Done])
        );
    }

    pub async fn snapshot_export_and_install(db: TestDb) {
        let s = &*db.store;
        // A bit of everything, through a Raft batch so the bookkeeping is set.
        let batch = vec![
            Mutation::CreateSandbox(sandbox("sb-snap0001", "alice", 0)),
            Mutation::AppendExecLog(ExecLog {
                id: 0,
                sandbox_id: "sb-snap0001".into(),
                command: "echo hi".into(),
                exit_code: 0,
                stdout: "hi\n".into(),
                stderr: String::new(),
                duration_ms: 1,
                created_at: T0,
            }),
            Mutation::PutWorker(worker("w1")),
            Mutation::AcquireLease(acquire("sb-snap0001", "w1", 5_000, T0)),
            Mutation::AcquireLease(acquire("sb-gone", "w1", 5_000, T0)),
            Mutation::ReleaseLease {
                resource_id: "sb-gone".into(),
                holder_id: "w1".into(),
            },
            Mutation::CreateTenant(tenant("t1")),
            Mutation::PutMember(member("t1", "alice", MemberRole::Admin)),
            Mutation::CreatePolicy(policy("pol-1", Some("t1"), 1)),
            Mutation::CreatePolicy(policy("pol-g", None, 2)),
            Mutation::PutQuota(OwnerQuota {
                owner_id: "alice".into(),
                max_sandboxes: 3,
                max_ttl_seconds: 60,
                max_exec_timeout_seconds: 10,
                created_at: T0,
                updated_at: T0,
            }),
            Mutation::CreateTemplate(template("py")),
            Mutation::AppendAdminAudit(admin_audit("root", 200, "/api/v1/admin/x", 0)),
            Mutation::AppendOperationAudit(op_audit(
                "exec",
                "sb-snap0001",
                AuditStatus::Success,
                0,
            )),
            Mutation::RevokeToken(RevokedToken {
                jti: "j1".into(),
                reason: "r".into(),
                revoked_at: T0,
                expires_at: at(9),
            }),
            Mutation::SetMembership {
                membership: "members-v1".into(),
            },
        ];
        let BatchOutcome::Applied(outs) = s
            .apply_batch(
                &AppliedLog {
                    index: 1,
                    log_id: "log-1".into(),
                },
                &batch,
            )
            .await
            .unwrap()
        else {
            panic!("new index")
        };
        assert!(outs.iter().all(Result::is_ok), "{outs:?}");
        let snap = s.export_snapshot().await.unwrap();
        assert_eq!(snap.raft.applied_index, 1);
        assert_eq!(
            snap.lease_generations,
            vec![("sb-gone".to_string(), 1), ("sb-snap0001".to_string(), 1)]
        );
        assert_eq!(
            (
                snap.sandboxes.len(),
                snap.exec_logs.len(),
                snap.leases.len()
            ),
            (1, 1, 1)
        );

        // Diverge: more rows, fewer rows, a later index.
        let later = vec![
            Mutation::CreateSandbox(sandbox("sb-extra001", "bob", 5)),
            Mutation::DeleteTenant { id: "t1".into() },
            Mutation::AcquireLease(acquire("sb-gone", "w2", 5_000, at(1))),
        ];
        s.apply_batch(
            &AppliedLog {
                index: 2,
                log_id: "log-2".into(),
            },
            &later,
        )
        .await
        .unwrap();
        assert_ne!(s.export_snapshot().await.unwrap(), snap);

        // Installing replaces everything, bookkeeping included.
        s.install_snapshot(&snap).await.unwrap();
        assert_eq!(
            s.export_snapshot().await.unwrap(),
            snap,
            "install then export is the identity"
        );
        assert_eq!(s.raft_state().await.unwrap().applied_index, 1);
        assert_not_found(
            s.get_sandbox("sb-extra001").await,
            "row added after the snapshot",
        );
        assert_eq!(
            s.get_member("t1", "alice").await.unwrap().role,
            MemberRole::Admin
        );
        // Generations survive: the next grant continues above the snapshot's counter.
        assert_eq!(
            s.acquire_lease(acquire("sb-gone", "w3", 5_000, at(2)))
                .await
                .unwrap()
                .generation,
            2
        );
        // New log rows continue after the restored IDs.
        let MutationOutput::Id(id) = ok(
            s,
            Mutation::AppendAdminAudit(admin_audit("root", 200, "/x", 5)),
        )
        .await
        else {
            panic!("id")
        };
        assert_eq!(id, snap.admin_audit[0].id + 1);

        // Another database on the same driver becomes identical.
        let other = match db.pg_options() {
            Some(_) => None,
            None => Some(TestDb::sqlite().await),
        };
        if let Some(other) = other {
            other.store.install_snapshot(&snap).await.unwrap();
            assert_eq!(other.store.export_snapshot().await.unwrap(), snap);
            other.cleanup().await;
        }
    }
}
