//! Schema migrations: the versions this binary carries (embedded from
//! `migrations/<driver>/NNNN_name.sql`), the pure planning rule, and the error
//! type. The runner itself sits with the shared SQL (`sql.rs`) so both drivers
//! use one implementation.
//!
//! Rules: versions apply in order, each in its own transaction together with its
//! `schema_migrations` row (version, name, SHA-256 checksum). A database whose
//! applied migration has a different checksum, or that has a version this binary
//! does not know, is refused. Re-running applies nothing. On Postgres the runner
//! holds an advisory lock so concurrent replicas cannot race; on SQLite each
//! migration transaction begins `IMMEDIATE` and re-checks its version.

use sha2::{Digest, Sha256};

/// One schema version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

impl Migration {
    /// Hex SHA-256 of the SQL text, recorded when the version is applied.
    pub fn checksum(&self) -> String {
        hex::encode(Sha256::digest(self.sql.as_bytes()))
    }
}

/// A row of `schema_migrations`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedMigration {
    pub version: i64,
    pub checksum: String,
}

macro_rules! embed {
    ($dir:literal: $($version:literal => $file:literal),+ $(,)?) => {
        &[$(Migration {
            version: $version,
            name: $file,
            sql: include_str!(concat!("../../migrations/", $dir, "/", $file, ".sql")),
        }),+]
    };
}

/// SQLite migrations, in order.
pub const SQLITE: &[Migration] = embed!("sqlite":
    1 => "0001_sandboxes",
    2 => "0002_workers_leases",
    3 => "0003_tenancy",
    4 => "0004_audit_identity_raft",
    5 => "0005_cluster",
    6 => "0006_enrollment",
    7 => "0007_incarnations",
);

/// Postgres migrations, in order; the same versions as [`SQLITE`].
pub const POSTGRES: &[Migration] = embed!("postgres":
    1 => "0001_sandboxes",
    2 => "0002_workers_leases",
    3 => "0003_tenancy",
    4 => "0004_audit_identity_raft",
    5 => "0005_cluster",
    6 => "0006_enrollment",
    7 => "0007_incarnations",
);

/// Why migrating failed. Messages say what to do next and never carry a DSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "the database is at schema version {database_version}, newer than this binary \
         (which knows versions up to {binary_version}); run the stacyvm release that \
         migrated it, or restore a backup taken before the upgrade"
    )]
    NewerDatabase {
        database_version: i64,
        binary_version: i64,
    },
    #[error(
        "schema version {version} ({name}) in the database differs from the one in this \
         binary (checksum mismatch); it was migrated by a different build: run that build \
         or restore a backup"
    )]
    ChecksumMismatch { version: i64, name: String },
    #[error(
        "the database records schema version {version}, which this binary does not have; \
         it was migrated by a different build"
    )]
    UnknownVersion { version: i64 },
    #[error("migration {version} ({name}) failed and was rolled back: {reason}")]
    Failed {
        version: i64,
        name: String,
        reason: String,
    },
    #[error("cannot migrate: {0}")]
    Unavailable(String),
}

/// Decides which of `binary`'s migrations to apply to a database that has
/// `applied`, or why the database must be refused.
pub fn plan<'m>(
    binary: &'m [Migration],
    applied: &[AppliedMigration],
) -> Result<Vec<&'m Migration>, MigrateError> {
    let newest = binary.iter().map(|m| m.version).max().unwrap_or(0);
    if let Some(top) = applied.iter().map(|a| a.version).max()
        && top > newest
    {
        return Err(MigrateError::NewerDatabase {
            database_version: top,
            binary_version: newest,
        });
    }
    for a in applied {
        match binary.iter().find(|m| m.version == a.version) {
            None => return Err(MigrateError::UnknownVersion { version: a.version }),
            Some(m) if m.checksum() != a.checksum => {
                return Err(MigrateError::ChecksumMismatch {
                    version: m.version,
                    name: m.name.to_owned(),
                });
            }
            Some(_) => {}
        }
    }
    let mut pending: Vec<&Migration> = binary
        .iter()
        .filter(|m| !applied.iter().any(|a| a.version == m.version))
        .collect();
    pending.sort_by_key(|m| m.version);
    Ok(pending)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Migration = Migration {
        version: 1,
        name: "a",
        sql: "CREATE TABLE a (x INT);",
    };
    const B: Migration = Migration {
        version: 2,
        name: "b",
        sql: "CREATE TABLE b (x INT);",
    };

    fn applied(m: &Migration) -> AppliedMigration {
        AppliedMigration {
            version: m.version,
            checksum: m.checksum(),
        }
    }

    #[test]
    fn plan_table() {
        let bin = [A, B];
        let cases: Vec<(&str, Vec<AppliedMigration>, Result<Vec<i64>, &str>)> = vec![
            (
                "fresh database gets everything in order",
                vec![],
                Ok(vec![1, 2]),
            ),
            (
                "partly migrated gets the rest",
                vec![applied(&A)],
                Ok(vec![2]),
            ),
            (
                "fully migrated is a no-op",
                vec![applied(&A), applied(&B)],
                Ok(vec![]),
            ),
            (
                "newer database is refused",
                vec![
                    applied(&A),
                    applied(&B),
                    AppliedMigration {
                        version: 3,
                        checksum: "x".into(),
                    },
                ],
                Err("newer"),
            ),
            (
                "edited migration is refused",
                vec![AppliedMigration {
                    version: 1,
                    checksum: "0000".into(),
                }],
                Err("checksum"),
            ),
        ];
        for (name, have, want) in cases {
            let got = plan(&bin, &have).map(|p| p.iter().map(|m| m.version).collect::<Vec<_>>());
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "{name}"),
                (
                    Err(MigrateError::NewerDatabase {
                        database_version: 3,
                        binary_version: 2,
                    }),
                    Err("newer"),
                ) => {}
                (Err(MigrateError::ChecksumMismatch { version: 1, .. }), Err("checksum")) => {}
                (g, w) => panic!("{name}: got {g:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn unknown_older_version_is_refused() {
        let have = vec![AppliedMigration {
            version: 1,
            checksum: A.checksum(),
        }];
        let err = plan(&[B], &have).expect_err("version 1 is unknown to a binary with only 2");
        assert_eq!(err, MigrateError::UnknownVersion { version: 1 });
    }

    #[test]
    fn newer_database_message_says_what_to_do() {
        let msg = MigrateError::NewerDatabase {
            database_version: 9,
            binary_version: 4,
        }
        .to_string();
        assert!(
            msg.contains("version 9") && msg.contains("up to 4") && msg.contains("restore"),
            "{msg}"
        );
    }
}
