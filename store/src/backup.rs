//! SQLite backup, verification and restore (`stacyvm db backup|restore`).
//!
//! A backup is `VACUUM INTO` a temporary file next to the target, which SQLite
//! makes from one consistent read snapshot while the database stays online; the
//! copy is integrity-checked and its schema compared with this binary's before
//! it is renamed into place, so a failed backup never leaves a partial file
//! under the requested name. A restore checks the backup the same way first,
//! keeps the current database (and its WAL) as `<db>.pre-restore-<UTC stamp>`,
//! then swaps the backup in with fsync and a rename. The service must be
//! stopped for a restore; the CLI demands `--yes` for that reason.
//!
//! Postgres backups are `pg_dump`'s job and are not handled here.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, Row, SqliteConnection};

use crate::migrate::{self, AppliedMigration, MigrateError};

/// Why a backup, verification or restore did not happen.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0} already exists; pass --force to overwrite it")]
    Exists(PathBuf),
    #[error("no database at {0}")]
    SourceMissing(PathBuf),
    #[error("{path} is not a usable StacyVM database: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path} is a database of a newer StacyVM ({source}); restore it with that release")]
    Newer { path: PathBuf, source: MigrateError },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("SQLite failed on {path}: {detail}")]
    Sqlite { path: PathBuf, detail: String },
}

/// What a verified database file holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub path: PathBuf,
    /// Highest applied schema version.
    pub schema_version: i64,
    pub size_bytes: u64,
}

/// Result of a restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    pub from: Verified,
    /// Where the database that was replaced now lives (None if there was none).
    pub previous: Option<PathBuf>,
}

fn io_err<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> BackupError + 'p {
    move |source| BackupError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn sqlite_err(path: &Path) -> impl Fn(sqlx::Error) -> BackupError + '_ {
    move |e| BackupError::Sqlite {
        path: path.to_owned(),
        detail: crate::error::describe_transport(&e),
    }
}

async fn open_read_only(path: &Path) -> Result<SqliteConnection, BackupError> {
    if !path.is_file() {
        return Err(BackupError::SourceMissing(path.to_owned()));
    }
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .create_if_missing(false);
    SqliteConnection::connect_with(&opts)
        .await
        .map_err(|e| BackupError::Corrupt {
            path: path.to_owned(),
            detail: crate::error::describe_transport(&e),
        })
}

/// Checks that `path` is an intact StacyVM SQLite database this binary can run.
pub async fn verify(path: &Path) -> Result<Verified, BackupError> {
    let mut conn = open_read_only(path).await?;
    let corrupt = |detail: String| BackupError::Corrupt {
        path: path.to_owned(),
        detail,
    };
    let rows = sqlx::query("PRAGMA integrity_check")
        .fetch_all(&mut conn)
        .await
        .map_err(|e| corrupt(crate::error::describe_transport(&e)))?;
    let first: Option<String> = rows.first().and_then(|r| r.try_get(0).ok());
    if first.as_deref() != Some("ok") {
        let problems: Vec<String> = rows
            .iter()
            .filter_map(|r| r.try_get(0).ok())
            .take(3)
            .collect();
        return Err(corrupt(format!(
            "integrity check failed: {}",
            problems.join("; ")
        )));
    }
    let applied = sqlx::query("SELECT version, checksum FROM schema_migrations ORDER BY version")
        .fetch_all(&mut conn)
        .await
        .map_err(|_| corrupt("it has no schema_migrations table".into()))?
        .iter()
        .map(|r| {
            Ok(AppliedMigration {
                version: r.try_get(0)?,
                checksum: r.try_get(1)?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(|e| corrupt(e.to_string()))?;
    match migrate::plan(migrate::SQLITE, &applied) {
        Ok(_) => {}
        Err(e @ MigrateError::NewerDatabase { .. }) => {
            return Err(BackupError::Newer {
                path: path.to_owned(),
                source: e,
            });
        }
        Err(e) => return Err(corrupt(e.to_string())),
    }
    conn.close().await.ok();
    let size_bytes = fs::metadata(path).map_err(io_err("stat", path))?.len();
    let schema_version = applied.iter().map(|a| a.version).max().unwrap_or(0);
    Ok(Verified {
        path: path.to_owned(),
        schema_version,
        size_bytes,
    })
}

fn temp_beside(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{tag}-{:08x}", rand::random::<u32>()))
}

fn sync_dir(path: &Path) -> Result<(), BackupError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory of", path))
}

#[cfg(unix)]
fn restrict(path: &Path) -> Result<(), BackupError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err("chmod", path))
}

fn same_file(a: &Path, b: &Path) -> bool {
    matches!((fs::canonicalize(a), fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
}

/// Writes a consistent single-file copy of `db` (WAL content included) to `out`.
async fn vacuum_into(db: &Path, out: &Path) -> Result<(), BackupError> {
    let mut conn = open_read_only(db).await?;
    let made = sqlx::query("VACUUM INTO $1")
        .bind(out.to_string_lossy().into_owned())
        .execute(&mut conn)
        .await
        .map(|_| ())
        .map_err(sqlite_err(db));
    conn.close().await.ok();
    made
}

/// Makes a consistent online copy of the database at `db` in `out`, verified.
pub async fn backup(db: &Path, out: &Path, force: bool) -> Result<Verified, BackupError> {
    if out.exists() && (!force || same_file(db, out)) {
        return Err(BackupError::Exists(out.to_owned()));
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    }
    let tmp = temp_beside(out, "partial");
    let made = vacuum_into(db, &tmp).await;
    let finish = async {
        made?;
        restrict(&tmp)?;
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io_err("sync", &tmp))?;
        verify(&tmp).await?;
        fs::rename(&tmp, out).map_err(io_err("rename backup into", out))?;
        sync_dir(out)?;
        verify(out).await
    };
    let result = finish.await;
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Replaces the database at `db` with the verified backup `from`, keeping the
/// current one as `<db>.pre-restore-<UTC stamp>`. The server must be stopped.
pub async fn restore(from: &Path, db: &Path) -> Result<Restored, BackupError> {
    // Copy the backup (with any WAL it has) into one file beside the target and
    // check that copy: what gets swapped in is exactly what was verified.
    let tmp = temp_beside(db, "restore");
    let staged = async {
        verify(from).await?;
        vacuum_into(from, &tmp).await?;
        restrict(&tmp)?;
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io_err("sync", &tmp))?;
        verify(&tmp).await
    };
    let checked = match staged.await {
        Ok(v) => Verified {
            path: from.to_owned(),
            ..v
        },
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let keep_current = async {
        if !db.exists() {
            if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
            }
            return Ok(None);
        }
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
        let keep = db.with_file_name(format!(
            "{}.pre-restore-{stamp}",
            db.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        // A consistent single-file copy when the current database is readable;
        // otherwise the raw files, WAL included, so nothing is lost either way.
        if vacuum_into(db, &keep).await.is_err() {
            fs::copy(db, &keep).map_err(io_err("keep a copy of", db))?;
            for suffix in ["-wal", "-shm"] {
                let side = PathBuf::from(format!("{}{suffix}", db.display()));
                if side.exists() {
                    let kept = PathBuf::from(format!("{}{suffix}", keep.display()));
                    fs::copy(&side, kept).map_err(io_err("keep a copy of", &side))?;
                }
            }
        }
        Ok(Some(keep))
    };
    let previous = match keep_current.await {
        Ok(p) => p,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let swap = async {
        // The old WAL belongs to the old database: it must not replay into the new one.
        for suffix in ["-wal", "-shm"] {
            let side = PathBuf::from(format!("{}{suffix}", db.display()));
            match fs::remove_file(&side) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &side)(e)),
            }
        }
        fs::rename(&tmp, db).map_err(io_err("move restored database to", db))?;
        sync_dir(db)
    };
    if let Err(e) = swap.await {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(Restored {
        from: checked,
        previous,
    })
}
