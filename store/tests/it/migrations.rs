//! Migration files, the migrator's refusals, and DSN handling.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use sqlx::Row;
use stacyvm_store::migrate::{self, MigrateError};
use stacyvm_store::testing::{TestDb, postgres_admin};
use stacyvm_store::{OpenError, SqliteStore, StoreConfig, StoreDriver};

fn migration_files(driver: &str) -> BTreeMap<i64, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migrations")
        .join(driver);
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".sql"))
        .map(|n| {
            let version: i64 = n[..4]
                .parse()
                .unwrap_or_else(|_| panic!("{n}: name must start with NNNN_"));
            (version, n.trim_end_matches(".sql").to_owned())
        })
        .collect()
}

#[test]
fn drivers_carry_the_same_versions_and_the_binary_embeds_them_all() {
    let sqlite = migration_files("sqlite");
    let postgres = migration_files("postgres");
    assert_eq!(
        sqlite, postgres,
        "migrations/sqlite and migrations/postgres must have the same NNNN_name files"
    );
    for (list, files) in [(migrate::SQLITE, &sqlite), (migrate::POSTGRES, &postgres)] {
        let embedded: BTreeMap<i64, String> = list
            .iter()
            .map(|m| (m.version, m.name.to_owned()))
            .collect();
        assert_eq!(
            &embedded, files,
            "migrate.rs must embed every migration file"
        );
    }
    let versions: Vec<i64> = sqlite.keys().copied().collect();
    assert_eq!(
        versions,
        (1..=versions.len() as i64).collect::<Vec<_>>(),
        "versions are 1..N without gaps"
    );
}

#[test]
fn postgres_migrations_use_postgres_types() {
    for m in migrate::POSTGRES {
        // Comments may mention anything; check the statements only.
        let sql: String = m
            .sql
            .lines()
            .map(|l| l.split("--").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n")
            .to_ascii_uppercase();
        for banned in [
            "AUTOINCREMENT",
            "DATETIME",
            "DATETIME('NOW')",
            " INTEGER",
            " INT ",
            "IF NOT EXISTS",
        ] {
            assert!(
                !sql.contains(banned),
                "{}: SQLite token {banned:?} in a Postgres migration",
                m.name
            );
        }
        // Every timestamp column is TIMESTAMPTZ.
        for line in sql.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let [col, ty, ..] = words.as_slice()
                && (col.ends_with("_AT") || *col == "LAST_HEARTBEAT")
                && !line.trim_start().starts_with("--")
            {
                assert_eq!(
                    *ty, "TIMESTAMPTZ",
                    "{}: column {col} must be TIMESTAMPTZ",
                    m.name
                );
            }
        }
    }
    let all: String = migrate::POSTGRES.iter().map(|m| m.sql).collect();
    for needed in [
        "TIMESTAMPTZ",
        "BIGINT",
        "DEFAULT now()",
        "COLLATE \"C\"",
        "CREATE TABLE ",
    ] {
        assert!(
            all.contains(needed),
            "Postgres migrations should use {needed}"
        );
    }
}

async fn sqlite_tables(db: &sqlx::SqlitePool) -> BTreeMap<String, BTreeSet<String>> {
    let tables = sqlx::query(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
    )
    .fetch_all(db)
    .await
    .expect("list tables");
    let mut out = BTreeMap::new();
    for t in tables {
        let name: String = t.get(0);
        let cols = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT name FROM pragma_table_info('{name}')"
        )))
        .fetch_all(db)
        .await
        .expect("columns");
        out.insert(name, cols.iter().map(|c| c.get::<String, _>(0)).collect());
    }
    out
}

#[tokio::test]
async fn both_drivers_create_the_same_tables_and_columns() {
    let lite = TestDb::sqlite().await;
    let dir = tempfile::tempdir().expect("tmp");
    let store = SqliteStore::open(&StoreConfig::sqlite(dir.path().join("x.db")))
        .await
        .expect("open");
    let sqlite = sqlite_tables(store.pool()).await;
    for t in [
        "sandboxes",
        "exec_logs",
        "workers",
        "leases",
        "lease_generations",
        "tenants",
        "tenant_members",
        "policies",
        "owner_quotas",
        "templates",
        "admin_audit",
        "operation_audit",
        "revoked_worker_tokens",
        "raft_state",
        "removed_nodes",
        "worker_enrollments",
        "worker_credentials",
        "schema_migrations",
    ] {
        assert!(sqlite.contains_key(t), "table {t} missing on SQLite");
    }
    lite.cleanup().await;
    let Some(pg) = TestDb::postgres("schema parity with Postgres").await else {
        return;
    };
    let rows = sqlx::query(
        "SELECT table_name::text, column_name::text FROM information_schema.columns WHERE table_schema = 'public'",
    )
    .fetch_all(&sqlx::PgPool::connect_with(pg.pg_options().expect("postgres")).await.expect("connect"))
    .await
    .expect("pg columns");
    let mut postgres: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in rows {
        postgres.entry(r.get(0)).or_default().insert(r.get(1));
    }
    assert_eq!(
        sqlite, postgres,
        "tables and columns must match across drivers"
    );
    pg.cleanup().await;
}

#[tokio::test]
async fn sqlite_rerun_is_a_noop_and_tampering_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = StoreConfig::sqlite(dir.path().join("db.sqlite"));
    let store = SqliteStore::open(&cfg).await.expect("first open");
    drop(
        SqliteStore::open(&cfg)
            .await
            .expect("second open is a no-op"),
    );
    let count: i64 = sqlx::query("SELECT COUNT(*) FROM schema_migrations")
        .fetch_one(store.pool())
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        count,
        migrate::SQLITE.len() as i64,
        "every version recorded once"
    );

    // A migration edited after it was applied is refused.
    sqlx::query("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 2")
        .execute(store.pool())
        .await
        .expect("tamper");
    match SqliteStore::open(&cfg).await {
        Err(OpenError::Migrate(MigrateError::ChecksumMismatch { version: 2, .. })) => {}
        other => panic!("expected a checksum refusal, got {other:?}"),
    }
    let good = migrate::SQLITE[1].checksum();
    sqlx::query("UPDATE schema_migrations SET checksum = $1 WHERE version = 2")
        .bind(good)
        .execute(store.pool())
        .await
        .expect("restore checksum");

    // A database migrated by a newer binary is refused with a clear message.
    sqlx::query("INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES (99, 'future', 'x', 0)")
        .execute(store.pool())
        .await
        .expect("future version");
    let err = SqliteStore::open(&cfg).await.expect_err("newer database");
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            OpenError::Migrate(MigrateError::NewerDatabase {
                database_version: 99,
                ..
            })
        ),
        "{msg}"
    );
    assert!(msg.contains("newer than this binary"), "{msg}");
}

#[tokio::test]
async fn postgres_migration_rehearsal_concurrent_migrators_and_rerun() {
    let Some(admin) = postgres_admin("Postgres migration rehearsal") else {
        return;
    };
    use sqlx::Connection;
    let name = format!("stacyvm_mig_{:08x}", rand_u32());
    let mut conn = sqlx::PgConnection::connect_with(&admin)
        .await
        .expect("admin");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create");
    let opts = admin.clone().database(&name);

    // Four replicas migrate the empty database at once, then one re-runs.
    let racers: Vec<_> = (0..4)
        .map(|_| {
            let o = opts.clone();
            tokio::spawn(async move { stacyvm_store::PgStore::open_with(o, 2).await.map(|_| ()) })
        })
        .collect();
    for r in racers {
        r.await
            .expect("join")
            .expect("every concurrent migrator succeeds");
    }
    let store = stacyvm_store::PgStore::open_with(opts.clone(), 2)
        .await
        .expect("re-run");
    let rows = sqlx::query(
        "SELECT version, COUNT(*) FROM schema_migrations GROUP BY version ORDER BY version",
    )
    .fetch_all(store.pool())
    .await
    .expect("versions");
    let got: Vec<(i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let want: Vec<(i64, i64)> = migrate::POSTGRES.iter().map(|m| (m.version, 1)).collect();
    assert_eq!(got, want, "every version recorded exactly once");

    sqlx::query(
        "INSERT INTO schema_migrations (version, name, checksum) VALUES (42, 'future', 'x')",
    )
    .execute(store.pool())
    .await
    .expect("future");
    let err = stacyvm_store::PgStore::open_with(opts, 1)
        .await
        .expect_err("newer database");
    assert!(
        matches!(
            err,
            OpenError::Migrate(MigrateError::NewerDatabase {
                database_version: 42,
                ..
            })
        ),
        "{err}"
    );
    store.pool().close().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {name} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await
    .expect("drop");
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(7)
}

#[tokio::test]
async fn bad_configuration_gets_clear_errors_without_secrets() {
    let cases = [
        ("not a url at all", "not a URL"),
        ("mysql://u:hunter2@127.0.0.1/db", "scheme \"mysql\""),
        ("postgres://u:hunter2@/db", "empty host"),
    ];
    for (dsn, want) in cases {
        let err = stacyvm_store::open(&StoreConfig::postgres(dsn))
            .await
            .expect_err(dsn);
        let msg = err.to_string();
        assert!(matches!(err, OpenError::Config(_)), "{dsn}: {msg}");
        assert!(msg.contains(want), "{dsn}: {msg}");
        assert!(!msg.contains("hunter2"), "password leaked: {msg}");
    }
    // Nothing listens on port 1: a connect error, quickly, with no password.
    let started = std::time::Instant::now();
    let err = stacyvm_store::open(&StoreConfig::postgres(
        "postgres://u:hunter2@127.0.0.1:1/db",
    ))
    .await
    .expect_err("unreachable");
    assert!(
        matches!(
            err,
            OpenError::Connect {
                driver: "postgres",
                ..
            }
        ),
        "{err}"
    );
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "bounded wait"
    );

    let no_path = StoreConfig {
        driver: StoreDriver::Sqlite,
        ..Default::default()
    };
    assert!(matches!(no_path.validate(), Err(OpenError::Config(_))));
    assert!("oracle".parse::<StoreDriver>().is_err());
    assert_eq!(
        "PostgreSQL".parse::<StoreDriver>().ok(),
        Some(StoreDriver::Postgres)
    );
    let shown = format!("{:?}", StoreConfig::postgres("postgres://u:hunter2@h/db"));
    assert!(
        !shown.contains("hunter2") && shown.contains("***"),
        "{shown}"
    );
}
