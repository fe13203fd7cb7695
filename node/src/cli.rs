//! Command-line surface of `stacyvm` and the one place errors become exit codes.
//!
//! Exit codes (stable, documented in the README):
//! - 0: success;
//! - 1: the operation failed (database unreachable, I/O error);
//! - 2: usage error (bad flags or configuration; clap also uses 2);
//! - 3: refused for safety (would overwrite, needs `--yes`, corrupt or newer
//!   database); nothing was changed.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use stacyvm_store::backup::{self, BackupError};
use stacyvm_store::migrate::MigrateError;
use stacyvm_store::{OpenError, StoreConfig, StoreDriver, redact_dsn};

/// Default SQLite database, relative to the working directory.
pub const DEFAULT_DATABASE: &str = "stacyvm-data/stacyvm.db";

#[derive(Debug, Parser)]
#[command(
    name = "stacyvm",
    version,
    about = "StacyVM: disposable sandboxes on a highly available control plane"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Operate on the system of record (migrate, status, backup, restore).
    #[command(subcommand)]
    Db(DbCommand),
}

/// Which database a command opens.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Database driver: sqlite or postgres.
    #[arg(long, env = "STACYVM_DATABASE_DRIVER", default_value = "sqlite")]
    pub driver: String,
    /// SQLite database file.
    #[arg(long, env = "STACYVM_DATABASE_PATH", default_value = DEFAULT_DATABASE)]
    pub database: PathBuf,
    /// Postgres DSN (postgres://USER:PASSWORD@HOST:PORT/DB). Never printed.
    #[arg(long, env = "STACYVM_DATABASE_DSN", hide_env_values = true)]
    pub dsn: Option<String>,
}

impl DatabaseArgs {
    fn config(&self) -> Result<StoreConfig, CliError> {
        let driver: StoreDriver = self
            .driver
            .parse()
            .map_err(|e: OpenError| CliError::Usage(e.to_string()))?;
        let cfg = StoreConfig {
            driver,
            path: Some(self.database.clone()),
            dsn: self.dsn.clone(),
            max_connections: Some(2),
        };
        cfg.validate().map_err(|e| CliError::Usage(e.to_string()))?;
        Ok(cfg)
    }

    fn describe(&self, cfg: &StoreConfig) -> String {
        match cfg.driver {
            StoreDriver::Sqlite => format!("sqlite {}", self.database.display()),
            StoreDriver::Postgres => format!(
                "postgres {}",
                redact_dsn(cfg.dsn.as_deref().unwrap_or_default())
            ),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Apply pending schema migrations and print the schema version.
    Migrate(DatabaseArgs),
    /// Print the schema version and the Raft applied index.
    /// (alias of migrate: opening a database always brings it up to date)
    #[command(hide = true)]
    Status(DatabaseArgs),
    /// Make a consistent online copy of the SQLite database, then check it.
    Backup {
        /// Where to write the backup.
        out: PathBuf,
        /// Overwrite OUT if it exists.
        #[arg(long)]
        force: bool,
        /// SQLite database file to back up.
        #[arg(long, env = "STACYVM_DATABASE_PATH", default_value = DEFAULT_DATABASE)]
        database: PathBuf,
    },
    /// Replace the SQLite database with a checked backup (stop the server first).
    Restore {
        /// Backup file to restore from.
        input: PathBuf,
        /// Confirm that the server is stopped and the database may be replaced.
        #[arg(long)]
        yes: bool,
        /// SQLite database file to replace.
        #[arg(long, env = "STACYVM_DATABASE_PATH", default_value = DEFAULT_DATABASE)]
        database: PathBuf,
    },
}

/// Documented process exit codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    Ok = 0,
    Failed = 1,
    Usage = 2,
    Refused = 3,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Usage(_) => ExitCode::Usage,
            CliError::Refused(_) => ExitCode::Refused,
            CliError::Failed(_) => ExitCode::Failed,
        }
    }
}

impl From<OpenError> for CliError {
    fn from(e: OpenError) -> Self {
        match &e {
            OpenError::Config(_) => CliError::Usage(e.to_string()),
            OpenError::Migrate(
                MigrateError::NewerDatabase { .. }
                | MigrateError::ChecksumMismatch { .. }
                | MigrateError::UnknownVersion { .. },
            ) => CliError::Refused(e.to_string()),
            _ => CliError::Failed(e.to_string()),
        }
    }
}

impl From<BackupError> for CliError {
    fn from(e: BackupError) -> Self {
        match &e {
            BackupError::Exists(_) | BackupError::Corrupt { .. } | BackupError::Newer { .. } => {
                CliError::Refused(e.to_string())
            }
            BackupError::SourceMissing(_) => CliError::Usage(e.to_string()),
            BackupError::Io { .. } | BackupError::Sqlite { .. } => CliError::Failed(e.to_string()),
        }
    }
}

/// Runs a parsed command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Db(cmd) => run_db(cmd).await,
    }
}

async fn run_db(cmd: DbCommand) -> Result<(), CliError> {
    match cmd {
        DbCommand::Migrate(args) | DbCommand::Status(args) => {
            let cfg = args.config()?;
            let store = stacyvm_store::open(&cfg).await?;
            let raft = store
                .raft_state()
                .await
                .map_err(|e| CliError::Failed(e.to_string()))?;
            let newest = match cfg.driver {
                StoreDriver::Sqlite => stacyvm_store::migrate::SQLITE,
                StoreDriver::Postgres => stacyvm_store::migrate::POSTGRES,
            }
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap_or(0);
            println!("database:       {}", args.describe(&cfg));
            println!("schema version: {newest} (up to date)");
            println!("applied index:  {}", raft.applied_index);
            store.close().await;
            Ok(())
        }
        DbCommand::Backup {
            out,
            force,
            database,
        } => {
            let v = backup::backup(&database, &out, force).await?;
            println!(
                "backup of {} written to {} ({} bytes, schema version {}, integrity ok)",
                database.display(),
                v.path.display(),
                v.size_bytes,
                v.schema_version
            );
            Ok(())
        }
        DbCommand::Restore {
            input,
            yes,
            database,
        } => {
            if !yes {
                return Err(CliError::Refused(format!(
                    "restore replaces {}: stop the server first, then pass --yes",
                    database.display()
                )));
            }
            let r = backup::restore(&input, &database).await?;
            println!(
                "restored {} from {} (schema version {}, integrity ok)",
                database.display(),
                r.from.path.display(),
                r.from.schema_version
            );
            if let Some(prev) = r.previous {
                println!("previous database kept at {}", display(&prev));
            }
            Ok(())
        }
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
