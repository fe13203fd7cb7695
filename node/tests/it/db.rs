//! `stacyvm db …` driven through the built binary: backup, restore, refusals.

use std::path::Path;
use std::process::{Command, Output};

fn stacyvm(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stacyvm"))
        .args(args)
        .current_dir(cwd)
        .env_remove("STACYVM_DATABASE_PATH")
        .env_remove("STACYVM_DATABASE_DSN")
        .env_remove("STACYVM_DATABASE_DRIVER")
        .output()
        .expect("run stacyvm")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[track_caller]
fn assert_code(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "exit code; output:\n{}",
        text(o)
    );
}

/// Puts a recognisable row in the database through the store API.
async fn mark(db: &Path, tenant: &str) {
    let store = stacyvm_store::open(&stacyvm_store::StoreConfig::sqlite(db))
        .await
        .expect("open");
    let t = stacyvm_store::Tenant {
        id: tenant.into(),
        name: tenant.into(),
        owner_id: String::new(),
        settings: "{}".into(),
        created_at: stacyvm_store::Ts(1),
        updated_at: stacyvm_store::Ts(1),
    };
    store
        .execute(&stacyvm_store::Mutation::CreateTenant(t))
        .await
        .expect("write");
    store.close().await;
}

async fn tenants(db: &Path) -> Vec<String> {
    let store = stacyvm_store::open(&stacyvm_store::StoreConfig::sqlite(db))
        .await
        .expect("open");
    let ids = store
        .list_tenants()
        .await
        .expect("list")
        .into_iter()
        .map(|t| t.id)
        .collect();
    store.close().await;
    ids
}

#[tokio::test]
async fn backup_then_restore_round_trip_with_refusals() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let migrate = stacyvm(&["db", "migrate"], d);
    assert_code(&migrate, 0);
    assert!(
        text(&migrate).contains("schema version"),
        "{}",
        text(&migrate)
    );
    let db = d.join("stacyvm-data/stacyvm.db");
    mark(&db, "before-backup").await;

    let out = stacyvm(&["db", "backup", "snap.db"], d);
    assert_code(&out, 0);
    assert!(text(&out).contains("integrity ok"));
    // Refuses to overwrite without --force, and overwrites with it.
    assert_code(&stacyvm(&["db", "backup", "snap.db"], d), 3);
    assert_code(&stacyvm(&["db", "backup", "snap.db", "--force"], d), 0);

    mark(&db, "after-backup").await;
    assert_eq!(tenants(&db).await.len(), 2);

    // Restore needs --yes and changes nothing without it.
    assert_code(&stacyvm(&["db", "restore", "snap.db"], d), 3);
    assert_eq!(tenants(&db).await.len(), 2);
    let restored = stacyvm(&["db", "restore", "snap.db", "--yes"], d);
    assert_code(&restored, 0);
    assert_eq!(
        tenants(&db).await,
        ["before-backup"],
        "restored to the backup's contents"
    );
    let kept: Vec<_> = std::fs::read_dir(d.join("stacyvm-data"))
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.starts_with("stacyvm.db.pre-restore-") && !n.ends_with("-wal") && !n.ends_with("-shm")
        })
        .collect();
    assert_eq!(kept.len(), 1, "the replaced database is kept: {kept:?}");
    assert_eq!(
        tenants(&d.join("stacyvm-data").join(&kept[0])).await.len(),
        2,
        "kept copy is the old database"
    );
}

#[tokio::test]
async fn corrupt_or_foreign_backups_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    assert_code(&stacyvm(&["db", "migrate"], d), 0);
    let db = d.join("stacyvm-data/stacyvm.db");
    mark(&db, "precious").await;
    let before = std::fs::read(&db).expect("read db");

    std::fs::write(
        d.join("garbage.db"),
        b"this is not a database at all, just bytes",
    )
    .expect("write");
    let o = stacyvm(&["db", "restore", "garbage.db", "--yes"], d);
    assert_code(&o, 3);
    assert!(
        text(&o).contains("not a usable StacyVM database"),
        "{}",
        text(&o)
    );

    // A valid SQLite file without our schema.
    let foreign = d.join("foreign.db");
    {
        use sqlx::Connection;
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&foreign)
            .create_if_missing(true);
        let mut c = sqlx::SqliteConnection::connect_with(&opts)
            .await
            .expect("create");
        sqlx::query("CREATE TABLE t (x)")
            .execute(&mut c)
            .await
            .expect("table");
        c.close().await.expect("close");
    }
    assert_code(&stacyvm(&["db", "restore", "foreign.db", "--yes"], d), 3);

    // A truncated copy of a real backup.
    assert_code(&stacyvm(&["db", "backup", "good.db"], d), 0);
    let good = std::fs::read(d.join("good.db")).expect("read backup");
    std::fs::write(d.join("truncated.db"), &good[..good.len() / 2]).expect("write");
    assert_code(&stacyvm(&["db", "restore", "truncated.db", "--yes"], d), 3);

    assert_code(&stacyvm(&["db", "restore", "missing.db", "--yes"], d), 2);
    assert_eq!(
        std::fs::read(&db).expect("read db"),
        before,
        "refused restores leave the database untouched"
    );
    assert_eq!(tenants(&db).await, ["precious"]);
}

#[test]
fn bad_database_settings_are_usage_errors_without_secrets() {
    let dir = tempfile::tempdir().expect("tmp");
    let o = stacyvm(
        &[
            "db",
            "status",
            "--driver",
            "postgres",
            "--dsn",
            "postgres://u:s3cret@/x",
        ],
        dir.path(),
    );
    assert_code(&o, 2);
    assert!(!text(&o).contains("s3cret"), "{}", text(&o));
    let o = stacyvm(&["db", "status", "--driver", "postgres"], dir.path());
    assert_code(&o, 2);
    assert!(text(&o).contains("needs a DSN"), "{}", text(&o));
    let o = stacyvm(&["db", "status", "--driver", "mongodb"], dir.path());
    assert_code(&o, 2);
    let o = stacyvm(
        &[
            "db",
            "status",
            "--driver",
            "postgres",
            "--dsn",
            "postgres://u:s3cret@127.0.0.1:1/x",
        ],
        dir.path(),
    );
    assert_code(&o, 1);
    assert!(!text(&o).contains("s3cret"), "{}", text(&o));
}
