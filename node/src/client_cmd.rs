//! Client commands: `stacyvm spawn | exec | ls | get | kill | cp | workers`.
//!
//! Owns: flag parsing for these commands and printing (`--output table|json`).
//! Requests go through [`stacyvm_client::Client`], which fails over between
//! the replicas named in `--server` (comma-separated). Errors become exit
//! codes once, through [`CliError`]; `exec` exits with the command's own exit
//! code.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::{Args, Subcommand};
use futures::StreamExt;
use stacyvm_api::{DurationValue, ExecRequest, SpawnRequest};
use stacyvm_client::{Client, ClientError};
use tokio::io::AsyncWriteExt;

use crate::cli::CliError;

/// Every replica `stacyvm dev` starts, so client commands survive a leader kill.
pub const DEV_SERVERS: &str = "http://127.0.0.1:7423,http://127.0.0.1:7424,http://127.0.0.1:7425";

/// Where and how client commands talk to the cluster.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Replica API URLs, comma-separated; calls fail over between them.
    #[arg(long, env = "STACYVM_SERVER", default_value = DEV_SERVERS, global = true)]
    pub server: String,
    /// API key, sent as X-API-Key (never printed).
    #[arg(long, env = "STACYVM_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// Output format: table or json.
    #[arg(long, default_value = "table", global = true)]
    pub output: String,
}

impl ClientArgs {
    fn client(&self, timeout: Duration) -> Result<Client, CliError> {
        if !matches!(self.output.as_str(), "table" | "json") {
            return Err(CliError::Usage(format!(
                "--output {:?}: use table or json",
                self.output
            )));
        }
        Client::new(&self.server, self.api_key.clone(), timeout)
            .map_err(|e| CliError::Usage(e.to_string()))
    }

    fn json(&self) -> bool {
        self.output == "json"
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        match &e {
            ClientError::Config(_) => CliError::Usage(e.to_string()),
            ClientError::Api { status, .. } if (400..500).contains(status) => {
                CliError::Refused(e.to_string())
            }
            _ => CliError::Failed(e.to_string()),
        }
    }
}

#[derive(Debug, Args)]
pub struct SpawnArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Image to run.
    #[arg(long, default_value = "busybox")]
    pub image: String,
    /// Runtime (mock, docker, gvisor, proot...); the cluster default when omitted.
    #[arg(long)]
    pub runtime: Option<String>,
    /// Time to live, e.g. 30m.
    #[arg(long)]
    pub ttl: Option<String>,
    #[arg(long)]
    pub memory_mb: Option<i64>,
    #[arg(long)]
    pub vcpus: Option<i64>,
    /// Environment variable for every exec, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    #[arg(long)]
    pub owner: Option<String>,
    /// Spawn from a template.
    #[arg(long)]
    pub template: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub id: String,
    /// One argument: a shell command line. Several: a program and its
    /// arguments, run without a shell.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
    /// Stream output as it comes.
    #[arg(long)]
    pub stream: bool,
    #[arg(long)]
    pub timeout: Option<String>,
    #[arg(long)]
    pub workdir: Option<String>,
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub state: Option<String>,
    #[arg(long)]
    pub owner: Option<String>,
    #[arg(long)]
    pub worker: Option<String>,
    #[arg(long, default_value_t = 100)]
    pub limit: i64,
}

#[derive(Debug, Args)]
pub struct IdArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(required = true)]
    pub ids: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Source: a local path, `-` (stdin), or SANDBOX:PATH.
    pub src: String,
    /// Destination: a local path, `-` (stdout), or SANDBOX:PATH.
    pub dst: String,
}

#[derive(Debug, Args)]
pub struct WorkersArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub action: Option<WorkerAction>,
}

#[derive(Debug, Subcommand)]
pub enum WorkerAction {
    /// Stop placing sandboxes on a worker (its sandboxes keep running).
    Drain { id: String },
    /// Place sandboxes on a drained worker again.
    Undrain { id: String },
    /// Remove a worker record (refused while it is alive with sandboxes).
    Remove { id: String },
}

fn env_map(pairs: &[String]) -> Result<BTreeMap<String, String>, CliError> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| CliError::Usage(format!("--env {p:?}: expected KEY=VALUE")))
        })
        .collect()
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn sandbox_table(rows: &[stacyvm_api::Sandbox]) {
    println!(
        "{:<18} {:<10} {:<8} {:<12} {:<14} EXPIRES",
        "ID", "STATE", "RUNTIME", "IMAGE", "WORKER"
    );
    for s in rows {
        println!(
            "{:<18} {:<10} {:<8} {:<12} {:<14} {}",
            s.id, s.state, s.runtime, s.image, s.worker_id, s.expires_at
        );
    }
}

pub async fn spawn(a: SpawnArgs) -> Result<(), CliError> {
    let c = a.client.client(Duration::from_secs(180))?;
    let req = SpawnRequest {
        image: if a.template.is_some() && a.image == "busybox" {
            String::new()
        } else {
            a.image.clone()
        },
        runtime: a.runtime.clone().unwrap_or_default(),
        memory_mb: a.memory_mb,
        vcpus: a.vcpus,
        ttl: a.ttl.clone().map(DurationValue::Text),
        env: env_map(&a.env)?,
        owner_id: a.owner.clone().unwrap_or_default(),
        template: a.template.clone().unwrap_or_default(),
        ..Default::default()
    };
    let sb = c.spawn(&req).await?;
    if a.client.json() {
        print_json(&sb);
    } else {
        println!("{}", sb.id);
    }
    Ok(())
}

pub async fn exec(a: ExecArgs) -> Result<(), CliError> {
    let c = a.client.client(Duration::from_secs(3600))?;
    let (command, args, mode) = match a.command.as_slice() {
        [one] => (one.clone(), Vec::new(), "shell"),
        [first, rest @ ..] => (first.clone(), rest.to_vec(), "argv"),
        [] => return Err(CliError::Usage("a command is required".into())),
    };
    let req = ExecRequest {
        command,
        args,
        mode: mode.into(),
        env: env_map(&a.env)?,
        workdir: a.workdir.clone().unwrap_or_default(),
        timeout: a.timeout.clone().map(DurationValue::Text),
        stream: a.stream,
    };
    let code = if a.stream {
        let mut lines = Box::pin(c.exec_stream(&a.id, &req).await?);
        let mut code = None;
        let mut out = tokio::io::stdout();
        let mut err = tokio::io::stderr();
        while let Some(line) = lines.next().await {
            let line = line?;
            if a.client.json() {
                println!("{}", serde_json::to_string(&line).unwrap_or_default());
            }
            if let Some(e) = &line.error {
                return Err(CliError::Failed(format!("{}: {}", e.code, e.message)));
            }
            if let (Some(s), Some(d)) = (&line.stream, &line.data)
                && !a.client.json()
            {
                let w: &mut (dyn tokio::io::AsyncWrite + Unpin) =
                    if s == "stderr" { &mut err } else { &mut out };
                let _ = w.write_all(d.as_bytes()).await;
                let _ = w.flush().await;
            }
            if line.exit_code.is_some() {
                code = line.exit_code;
            }
        }
        code.ok_or_else(|| CliError::Failed("the stream ended without an exit code".into()))?
    } else {
        let r = c.exec(&a.id, &req).await?;
        if a.client.json() {
            print_json(&r);
        } else {
            print!("{}", r.stdout);
            eprint!("{}", r.stderr);
        }
        r.exit_code
    };
    if code != 0 {
        std::process::exit(code.clamp(1, 255));
    }
    Ok(())
}

pub async fn ls(a: LsArgs) -> Result<(), CliError> {
    let c = a.client.client(Duration::from_secs(30))?;
    let mut q = vec![format!("limit={}", a.limit)];
    for (k, v) in [
        ("state", &a.state),
        ("owner_id", &a.owner),
        ("worker_id", &a.worker),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={}", stacyvm_client::enc(v)));
        }
    }
    let rows = c.list(&q.join("&")).await?;
    if a.client.json() {
        print_json(&rows);
    } else {
        sandbox_table(&rows);
    }
    Ok(())
}

pub async fn get(a: IdArgs) -> Result<(), CliError> {
    let c = a.client.client(Duration::from_secs(30))?;
    let mut rows = Vec::new();
    for id in &a.ids {
        rows.push(c.get(id).await?);
    }
    if a.client.json() {
        print_json(&rows);
    } else {
        sandbox_table(&rows);
    }
    Ok(())
}

pub async fn kill(a: IdArgs) -> Result<(), CliError> {
    let c = a.client.client(Duration::from_secs(60))?;
    let mut failed = None;
    for id in &a.ids {
        match c.destroy(id).await {
            Ok(_) => println!("{id} destroyed"),
            Err(e) => {
                eprintln!("{id}: {e}");
                failed = Some(CliError::from(e));
            }
        }
    }
    failed.map_or(Ok(()), Err)
}

fn remote(spec: &str) -> Option<(&str, &str)> {
    let (id, path) = spec.split_once(':')?;
    (id.starts_with("sb-") && !path.is_empty()).then_some((id, path))
}

pub async fn cp(a: CpArgs) -> Result<(), CliError> {
    let c = a.client.client(Duration::from_secs(3600))?;
    match (remote(&a.src), remote(&a.dst)) {
        (None, Some((id, path))) => {
            let src = a.src.clone();
            let body = move || -> reqwest::Body {
                if src == "-" {
                    reqwest::Body::wrap_stream(
                        tokio_util::io::ReaderStream::new(tokio::io::stdin()),
                    )
                } else {
                    match std::fs::File::open(&src) {
                        Ok(f) => reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(
                            tokio::fs::File::from_std(f),
                        )),
                        Err(_) => reqwest::Body::from(Vec::new()),
                    }
                }
            };
            if a.src != "-" {
                std::fs::metadata(&a.src)
                    .map_err(|e| CliError::Usage(format!("{}: {e}", a.src)))?;
            }
            c.upload(id, path, body, None).await?;
            eprintln!("copied {} to {id}:{path}", a.src);
        }
        (Some((id, path)), None) => {
            let resp = c.download(id, path).await?;
            let mut stream = resp.bytes_stream();
            let mut out: Box<dyn tokio::io::AsyncWrite + Unpin> = if a.dst == "-" {
                Box::new(tokio::io::stdout())
            } else {
                Box::new(
                    tokio::fs::File::create(&a.dst)
                        .await
                        .map_err(|e| CliError::Failed(format!("{}: {e}", a.dst)))?,
                )
            };
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| CliError::Failed(format!("download broke: {e}")))?;
                out.write_all(&chunk)
                    .await
                    .map_err(|e| CliError::Failed(e.to_string()))?;
            }
            out.flush()
                .await
                .map_err(|e| CliError::Failed(e.to_string()))?;
        }
        _ => {
            return Err(CliError::Usage(
                "exactly one of SRC and DST must be SANDBOX:PATH (e.g. sb-0123abcd:/workspace/f)"
                    .into(),
            ));
        }
    }
    Ok(())
}

pub async fn workers(a: WorkersArgs) -> Result<(), CliError> {
    let c = a.client.client(Duration::from_secs(30))?;
    let rows = match &a.action {
        None => c.workers().await?,
        Some(WorkerAction::Drain { id }) => vec![c.worker_action(id, "drain").await?],
        Some(WorkerAction::Undrain { id }) => vec![c.worker_action(id, "undrain").await?],
        Some(WorkerAction::Remove { id }) => {
            c.send(
                reqwest::Method::DELETE,
                &format!("/api/v1/workers/{id}"),
                || None,
                None,
            )
            .await
            .map(|r| async { stacyvm_client::check(r).await })?
            .await?;
            println!("worker {id} removed");
            return Ok(());
        }
    };
    if a.client.json() {
        print_json(&rows);
    } else {
        println!(
            "{:<14} {:<9} {:<8} {:<14} {:<26} RPC",
            "ID", "STATUS", "ACTIVE", "RUNTIMES", "LAST HEARTBEAT"
        );
        for w in rows {
            println!(
                "{:<14} {:<9} {:<8} {:<14} {:<26} {}",
                w.id,
                w.status,
                w.active_sandboxes,
                w.runtimes.join(","),
                w.last_heartbeat,
                w.rpc_url
            );
        }
    }
    Ok(())
}

/// `stacyvm worker enroll-token`: asks the cluster for an enrollment secret
/// and writes it to `--out` (0600); the secret is never printed.
pub async fn enroll_token(a: crate::agent::EnrollTokenArgs) -> Result<(), CliError> {
    let c = a.client.client(Duration::from_secs(30))?;
    let req = stacyvm_api::EnrollmentRequest {
        worker_id: a.worker.clone(),
        ttl: Some(DurationValue::Text(a.ttl.clone())),
    };
    let body = serde_json::to_vec(&req).map_err(|e| CliError::Failed(e.to_string()))?;
    let resp = c
        .send(
            reqwest::Method::POST,
            "/api/v1/admin/worker-enrollments",
            || Some(reqwest::Body::from(body.clone())),
            Some("application/json"),
        )
        .await?;
    let resp = stacyvm_client::check(resp).await?;
    let issued: stacyvm_api::EnrollmentIssued = resp
        .json()
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    crate::agent::write_private(&a.out, &issued.enroll_token)?;
    println!(
        "enrollment secret for {} written to {} (single use, expires {})",
        issued.worker_id,
        a.out.display(),
        issued.expires_at
    );
    Ok(())
}
