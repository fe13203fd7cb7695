//! Command-line surface of `stacyvm` and the one place errors become exit codes.
//!
//! Exit codes (stable, documented in the README):
//! - 0: success;
//! - 1: the operation failed (database unreachable, I/O error);
//! - 2: usage error (bad flags or configuration; clap also uses 2);
//! - 3: refused for safety (would overwrite, needs `--yes`, corrupt or newer
//!   database); nothing was changed.

use std::path::PathBuf;

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
    /// Run a control-plane replica.
    Serve(crate::serve::ServeArgs),
    /// Inspect and change the cluster through any replica's API.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Make the cluster CA and node certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Operate on the system of record (migrate, status, backup, restore).
    #[command(subcommand)]
    Db(DbCommand),
    /// Run a worker agent: joins through any replica, follows the leader,
    /// runs sandboxes.
    Worker(crate::agent::WorkerArgs),
    /// A local HA cluster: three replicas and two workers on loopback.
    Dev(crate::dev::DevArgs),
    /// Check a configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Start a sandbox; prints its ID.
    Spawn(crate::client_cmd::SpawnArgs),
    /// Run a command in a sandbox; exits with the command's exit code.
    Exec(crate::client_cmd::ExecArgs),
    /// List sandboxes.
    Ls(crate::client_cmd::LsArgs),
    /// Show sandboxes.
    Get(crate::client_cmd::IdArgs),
    /// Destroy sandboxes.
    Kill(crate::client_cmd::IdArgs),
    /// Copy a file into or out of a sandbox (SANDBOX:PATH on one side).
    Cp(crate::client_cmd::CpArgs),
    /// List workers, or drain / undrain / remove one.
    Workers(crate::client_cmd::WorkersArgs),
    /// Local Docker images for hosts with no registry.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Make a Docker image from a root filesystem tarball (`docker import`)
    /// in the dockerd at DOCKER_HOST (or the default socket).
    Import {
        /// A tar of the root filesystem (e.g. `tar -C rootfs -c .`).
        rootfs: PathBuf,
        /// The image name to create, e.g. `busybox` or `myorg/tools:1`.
        #[arg(long)]
        tag: String,
    },
}

impl Command {
    /// Short-lived commands whose output may be piped (not servers).
    pub fn is_client(&self) -> bool {
        match self {
            Command::Serve(_) | Command::Dev(_) => false,
            Command::Worker(a) => a.command.is_some(),
            _ => true,
        }
    }
}

/// Where client commands send their requests.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Any replica's API address.
    #[arg(long, env = "STACYVM_SERVER", default_value = crate::client_cmd::DEV_SERVERS)]
    pub server: String,
    /// Output format: table or json.
    #[arg(long, default_value = "table")]
    pub output: String,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// This replica's view: state, term, leader, applied index, members.
    Status(ServerArgs),
    /// Voters, learners and addresses, as the leader sees them.
    Members(ServerArgs),
    /// Remove a replica from the cluster (its ID is never reused).
    Leave {
        id: u64,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Hand leadership to another voter.
    TransferLeader {
        id: u64,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create the cluster CA (ca.pem, ca-key.pem) in OUT.
    Init {
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a certificate from the CA.
    #[command(subcommand)]
    Issue(IssueCommand),
}

#[derive(Debug, Subcommand)]
pub enum IssueCommand {
    /// A replica certificate (SAN node-<ID>.stacyvm.internal).
    Node {
        #[arg(long)]
        id: u64,
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// A worker's RPC server certificate (SAN worker-<ID>.stacyvm.internal).
    Worker {
        #[arg(long)]
        id: String,
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// A control-plane client certificate for worker RPC (SANs
    /// client-<NAME>.stacyvm.internal and control-plane.stacyvm.internal).
    Client {
        #[arg(long)]
        name: String,
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a configuration for mistakes and production readiness; exits
    /// non-zero on any FAIL. Never prints a secret.
    Lint {
        /// The file (default: STACYVM_CONFIG).
        #[arg(long, env = "STACYVM_CONFIG")]
        file: Option<PathBuf>,
        /// Production findings fail instead of warning.
        #[arg(long)]
        production: bool,
        /// control-plane or worker.
        #[arg(long, default_value = "control-plane")]
        role: String,
    },
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
        Command::Serve(args) => crate::serve::serve(args).await,
        Command::Cluster(cmd) => run_cluster(cmd).await,
        Command::Certs(cmd) => run_certs(cmd),
        Command::Db(cmd) => run_db(cmd).await,
        Command::Worker(args) => crate::agent::run(args).await,
        Command::Dev(args) => crate::dev::run(args).await,
        Command::Image(ImageCommand::Import { rootfs, tag }) => {
            use stacyvm_runtimes::docker::{DockerOptions, DockerRuntime};
            let tarball = std::fs::read(&rootfs)
                .map_err(|e| CliError::Failed(format!("{}: {e}", rootfs.display())))?;
            let state = std::env::temp_dir().join("stacyvm-image-import");
            let opts = DockerOptions::new("docker", state)
                .ok_or_else(|| CliError::Failed("docker runtime unavailable".into()))?;
            let docker = DockerRuntime::connect(opts)
                .await
                .map_err(|e| CliError::Failed(format!("docker: {e}")))?;
            docker
                .import_rootfs(tarball.into(), &tag)
                .await
                .map_err(|e| CliError::Failed(e.to_string()))?;
            println!("{tag}");
            Ok(())
        }
        Command::Config(ConfigCommand::Lint {
            file,
            production,
            role,
        }) => {
            let role = match role.as_str() {
                "control-plane" => crate::lint::Role::ControlPlane,
                "worker" => crate::lint::Role::Worker,
                other => {
                    return Err(CliError::Usage(format!(
                        "--role {other:?}: use control-plane or worker"
                    )));
                }
            };
            let cfg = crate::config::FileConfig::load_optional(file.as_deref()).map_err(|e| {
                println!("[FAIL] config: {e}");
                CliError::Failed("the configuration does not load".into())
            })?;
            let findings =
                crate::lint::lint(&cfg, role, production, &|p| std::fs::read_to_string(p).ok());
            if crate::lint::print(&findings) {
                Ok(())
            } else {
                Err(CliError::Failed(
                    "the configuration has FAIL findings".into(),
                ))
            }
        }
        Command::Spawn(a) => crate::client_cmd::spawn(a).await,
        Command::Exec(a) => crate::client_cmd::exec(a).await,
        Command::Ls(a) => crate::client_cmd::ls(a).await,
        Command::Get(a) => crate::client_cmd::get(a).await,
        Command::Kill(a) => crate::client_cmd::kill(a).await,
        Command::Cp(a) => crate::client_cmd::cp(a).await,
        Command::Workers(a) => crate::client_cmd::workers(a).await,
    }
}

fn run_certs(cmd: CertsCommand) -> Result<(), CliError> {
    use stacyvm_raft::certs;
    let refuse = |e: certs::CertError| match e {
        certs::CertError::AlreadyExists { .. } => CliError::Refused(e.to_string()),
        other => CliError::Failed(other.to_string()),
    };
    match cmd {
        CertsCommand::Init { out } => {
            certs::init_ca(&out).map_err(refuse)?;
            println!(
                "cluster CA written to {} (keep ca-key.pem secret)",
                out.display()
            );
        }
        CertsCommand::Issue(IssueCommand::Node { id, ca, out }) => {
            if id == 0 {
                return Err(CliError::Usage("--id must be at least 1".into()));
            }
            certs::issue_node(&ca, id, &out).map_err(refuse)?;
            println!("node {id} certificate written to {}", out.display());
        }
        CertsCommand::Issue(IssueCommand::Worker { id, ca, out }) => {
            stacyvm_api::check_name("worker id", &id).map_err(|e| CliError::Usage(e.0))?;
            let (cert, _) = certs::issue_worker(&ca, &id, &out).map_err(refuse)?;
            println!("worker {id} certificate written to {}", cert.display());
        }
        CertsCommand::Issue(IssueCommand::Client { name, ca, out }) => {
            stacyvm_api::check_name("client name", &name).map_err(|e| CliError::Usage(e.0))?;
            let (cert, _) = certs::issue_client(&ca, &name, &out).map_err(refuse)?;
            println!("client {name} certificate written to {}", cert.display());
        }
    }
    Ok(())
}

async fn api_call(
    server: &ServerArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, CliError> {
    let client =
        stacyvm_client::Client::new(&server.server, None, std::time::Duration::from_secs(30))
            .map_err(|e| CliError::Usage(e.to_string()))?;
    let bytes = body.map(|b| b.to_string());
    let resp = client
        .send(
            method,
            path,
            || bytes.clone().map(reqwest::Body::from),
            bytes.as_ref().map(|_| "application/json"),
        )
        .await?;
    let resp = stacyvm_client::check(resp).await?;
    let text = resp.text().await.unwrap_or_default();
    if text.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(&text)
        .map_err(|e| CliError::Failed(format!("bad answer from {}: {e}", client.server())))
}

fn print_value(server: &ServerArgs, v: &serde_json::Value) {
    if server.output == "json" {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    if let Some(obj) = v.as_object() {
        for (k, val) in obj {
            let shown = match val {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("{k:<20} {shown}");
        }
    }
}

async fn run_cluster(cmd: ClusterCommand) -> Result<(), CliError> {
    use reqwest::Method;
    match cmd {
        ClusterCommand::Status(s) => {
            let v = api_call(&s, Method::GET, "/api/v1/cluster/status", None).await?;
            print_value(&s, &v);
        }
        ClusterCommand::Members(s) => {
            let v = api_call(&s, Method::GET, "/api/v1/cluster/members", None).await?;
            print_value(&s, &v);
        }
        ClusterCommand::Leave { id, server } => {
            api_call(
                &server,
                Method::POST,
                "/api/v1/cluster/leave",
                Some(serde_json::json!({ "id": id })),
            )
            .await?;
            println!("node {id} removed from the cluster");
        }
        ClusterCommand::TransferLeader { id, server } => {
            let body = Some(serde_json::json!({ "id": id }));
            api_call(
                &server,
                Method::POST,
                "/api/v1/cluster/transfer-leader",
                body,
            )
            .await?;
            println!("node {id} is now the leader");
        }
    }
    Ok(())
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
                println!("previous database kept at {}", prev.display());
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Clap checks flag definitions (unique names, valid references) only
    /// when a command is parsed in a debug build; check them all here.
    #[test]
    fn every_command_definition_is_valid() {
        super::Cli::command().debug_assert();
    }
}
