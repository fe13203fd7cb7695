//! `stacyvm worker`: the worker agent.
//!
//! Owns: registering with and heartbeating to whichever replica leads (found
//! through any bootstrap replica, followed across elections), one batched
//! lease renewal per heartbeat, fencing, the worker RPC server the control
//! plane calls (spawn, destroy, status, list, exec, exec stream, files, logs),
//! drain on SIGTERM, and adopting what its runtimes still run after a restart.
//!
//! Fencing, the safety rule: a worker runs a sandbox only while it holds that
//! sandbox's lease. (1) Every RPC about a sandbox carries the lease generation;
//! one older than the newest this worker has seen is refused
//! (`STALE_GENERATION`). (2) A lease counts as renewed from the moment the
//! heartbeat carrying it was *sent*; if it has not been renewed for
//! `lease_ttl − safety_margin`, the worker stops that sandbox itself, before
//! the leader could hand the lease to anyone else. (3) Leases the leader
//! reports lost are stopped at once.
//!
//! Does not own: placement or lease arbitration (the leader), or how a sandbox
//! runs (the `stacyvm-runtimes` backends).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use futures::StreamExt;
use serde::Deserialize;
use stacyvm_api::{
    self as wire, ErrorBody, ExecRequest, ExecResult, ExecStreamLine, GENERATION_HEADER,
    HeartbeatReply, HeartbeatRequest, RpcSandbox, RpcSpawn, StatusReply, WORKER_ID_HEADER, codes,
};
use stacyvm_runtimes::{
    ExecChunk, ExecMode, ExecSpec, Runtime, RuntimeError, RuntimeState, SpawnSpec,
};

use crate::cli::CliError;

/// `stacyvm worker` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum WorkerCommand {
    /// Signed worker tokens: issue, inspect, verify, rotation-plan.
    #[command(subcommand)]
    Token(crate::token_cmd::TokenCommand),
    /// Make a single-use enrollment secret for a worker (admin key needed);
    /// the worker exchanges it once for its credential (`--enroll-token-file`).
    EnrollToken(EnrollTokenArgs),
}

#[derive(Debug, Args)]
pub struct EnrollTokenArgs {
    #[command(flatten)]
    pub client: crate::client_cmd::ClientArgs,
    /// The worker it is for.
    #[arg(long)]
    pub worker: String,
    /// Lifetime (at most 1h).
    #[arg(long, default_value = "10m")]
    pub ttl: String,
    /// Where to write the secret (mode 0600); it is never printed.
    #[arg(long)]
    pub out: PathBuf,
}

/// Flags of `stacyvm worker`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct WorkerArgs {
    #[command(subcommand)]
    pub command: Option<WorkerCommand>,
    /// Credential towards the control plane: a per-worker or shared token, or
    /// a signed token (never printed).
    #[arg(
        long,
        env = "STACYVM_AUTH_WORKER_TOKEN",
        hide_env_values = true,
        conflicts_with = "worker_token_file"
    )]
    pub worker_token: Option<String>,
    /// File holding the credential, re-read whenever it changes (for
    /// externally rotated signed tokens).
    #[arg(long, env = "STACYVM_AUTH_WORKER_TOKEN_FILE")]
    pub worker_token_file: Option<PathBuf>,
    /// Enroll with this single-use secret (from `stacyvm worker enroll-token`)
    /// when the state directory holds no credential yet; the credential it
    /// yields is kept in `<state-dir>/worker-credential` (mode 0600).
    #[arg(long, env = "STACYVM_WORKER_ENROLL_TOKEN_FILE", conflicts_with_all = ["worker_token", "worker_token_file"])]
    pub enroll_token_file: Option<PathBuf>,
    /// Serve RPC over mutual TLS with this certificate (it must carry
    /// `worker-<id>.stacyvm.internal`: `stacyvm certs issue worker --id ID`).
    #[arg(long, requires_all = ["rpc_tls_key", "rpc_tls_client_ca"])]
    pub rpc_tls_cert: Option<PathBuf>,
    #[arg(long)]
    pub rpc_tls_key: Option<PathBuf>,
    /// CA of the control plane's client certificates (the cluster CA).
    #[arg(long)]
    pub rpc_tls_client_ca: Option<PathBuf>,
    /// Configuration file (YAML): the worker reads its `runtimes` section
    /// (`runtimes.proot.images.<name>: ROOTFS_DIR`, `runtimes.proot.binary`);
    /// flags win over it.
    #[arg(long, env = "STACYVM_CONFIG")]
    pub config: Option<PathBuf>,
    /// This worker's ID (default: the host name).
    #[arg(long, env = "STACYVM_WORKER_ID")]
    pub id: Option<String>,
    /// Replica API addresses to find the cluster through (HOST:PORT, comma-separated).
    #[arg(
        long,
        env = "STACYVM_BOOTSTRAP",
        value_delimiter = ',',
        required = true
    )]
    pub bootstrap: Vec<String>,
    /// Address the worker RPC server binds.
    #[arg(
        long,
        env = "STACYVM_WORKER_RPC_ADDR",
        default_value = "127.0.0.1:7430"
    )]
    pub rpc_addr: SocketAddr,
    /// URL the control plane calls (default: http://<rpc-addr>).
    #[arg(long, env = "STACYVM_WORKER_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Local IP the worker's calls to the control plane leave from
    /// (multi-homed hosts; the chaos harness tells workers apart by it).
    #[arg(long, env = "STACYVM_WORKER_SOURCE_IP")]
    pub source_ip: Option<std::net::IpAddr>,
    /// Runtimes to offer (each must pass its health check to be advertised).
    #[arg(
        long,
        env = "STACYVM_WORKER_RUNTIMES",
        value_delimiter = ',',
        default_value = "mock"
    )]
    pub runtimes: Vec<String>,
    /// Where runtimes keep per-sandbox state.
    #[arg(
        long,
        env = "STACYVM_WORKER_STATE_DIR",
        default_value = "stacyvm-worker"
    )]
    pub state_dir: PathBuf,
    /// Most sandboxes this worker runs at once (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    pub max_sandboxes: i64,
    /// Heartbeat interval until the leader says otherwise, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// The worker stops a sandbox whose lease it could not renew for
    /// lease_ttl minus this margin, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub safety_margin_ms: u64,
    /// After SIGTERM, wait this long (seconds) for the cluster to move or
    /// destroy the sandboxes before exiting.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout_s: u64,
    /// Destroy every local sandbox when exiting (used by `stacyvm dev`).
    #[arg(long)]
    pub destroy_on_exit: bool,
    #[command(flatten)]
    pub runtime_opts: RuntimeArgs,
}

/// Settings of the real runtimes (`docker`, `gvisor`, `kata`, `proot`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RuntimeArgs {
    /// A PRoot image: NAME=ROOTFS_DIR (repeatable; `runtimes.proot.images.<name>`).
    #[arg(
        long = "proot-image",
        value_name = "NAME=ROOTFS",
        env = "STACYVM_PROOT_IMAGES",
        value_delimiter = ','
    )]
    pub proot_images: Vec<String>,
    /// The `proot` binary (default: `proot` on PATH).
    #[arg(long, env = "STACYVM_PROOT_BIN")]
    pub proot_bin: Option<PathBuf>,
    /// uid:gid every process in a Docker sandbox runs as.
    #[arg(long, default_value = "1000:1000")]
    pub docker_user: String,
    /// Docker sandboxes get a read-only root filesystem (`/workspace` and a `/tmp` tmpfs stay writable).
    #[arg(long)]
    pub docker_readonly_rootfs: bool,
    /// PID limit of each Docker sandbox.
    #[arg(long, default_value_t = 512)]
    pub docker_pids_limit: i64,
    /// What a spawn of an image the host lacks does: `missing` pulls it, `never` refuses.
    #[arg(long, default_value = "missing", value_parser = ["missing", "never"])]
    pub docker_pull: String,
    /// `runtimes.proot` of the worker's `--config` file (flags win over it).
    #[arg(skip)]
    pub proot_config: crate::config::ProotSection,
}

impl RuntimeArgs {
    /// PRoot's settings: the config file's, with each `--proot-image` and
    /// `--proot-bin` overriding its counterpart.
    fn proot_options(&self) -> Result<stacyvm_runtimes::proot::ProotOptions, CliError> {
        let mut images: BTreeMap<String, PathBuf> = self
            .proot_config
            .images
            .iter()
            .map(|(image, dir)| (image.clone(), PathBuf::from(dir)))
            .collect();
        for spec in &self.proot_images {
            let Some((image, dir)) = spec.split_once('=') else {
                return Err(CliError::Usage(format!(
                    "--proot-image {spec:?}: expected NAME=ROOTFS_DIR"
                )));
            };
            images.insert(image.trim().to_string(), PathBuf::from(dir.trim()));
        }
        let binary = self
            .proot_bin
            .clone()
            .or_else(|| self.proot_config.binary.as_ref().map(PathBuf::from))
            .unwrap_or_default();
        Ok(stacyvm_runtimes::proot::ProotOptions { binary, images })
    }
}

/// A lease this worker holds.
#[derive(Clone, Debug)]
struct Held {
    generation: i64,
    runtime: String,
    /// When the lease was last known valid (heartbeat send time, or grant).
    renewed_at: Instant,
}

/// The agent's state, shared by the heartbeat loop and the RPC server.
pub struct Agent {
    pub id: String,
    runtimes: BTreeMap<String, Arc<dyn Runtime>>,
    held: Mutex<HashMap<String, Held>>,
    newest: Mutex<HashMap<String, i64>>,
    draining: AtomicBool,
    lease_ttl: Mutex<Duration>,
    safety_margin: Duration,
    max_sandboxes: i64,
    /// Its credential towards the control plane (static or signed; a file is
    /// re-read when it changes).
    credential: Option<Arc<crate::config::SecretSource>>,
    /// What its RPC server accepts (own static token, derived RPC keys from
    /// the leader, revoked token IDs).
    rpc_auth: Mutex<stacyvm_auth::RpcAuth>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("id", &self.id).finish()
    }
}

fn lk<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why an RPC failed; mapped to HTTP once, here.
#[derive(Debug)]
pub struct RpcError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl RpcError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        RpcError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<RuntimeError> for RpcError {
    fn from(e: RuntimeError) -> Self {
        let status = match e {
            RuntimeError::NotFound(_) => StatusCode::NOT_FOUND,
            RuntimeError::InvalidPath { .. } | RuntimeError::Invalid(_) => StatusCode::BAD_REQUEST,
            RuntimeError::AlreadyExists(_) => StatusCode::CONFLICT,
            RuntimeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            RuntimeError::NoSpace(_) => StatusCode::INSUFFICIENT_STORAGE,
            RuntimeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        RpcError::new(status, e.code(), e.to_string())
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code.to_string(),
            message: self.message,
            request_id: String::new(),
        };
        (self.status, Json(body)).into_response()
    }
}

type RpcResult<T> = Result<T, RpcError>;

impl Agent {
    /// Builds an agent over the given runtimes.
    pub fn new(
        id: String,
        runtimes: BTreeMap<String, Arc<dyn Runtime>>,
        safety_margin: Duration,
        max_sandboxes: i64,
    ) -> Arc<Self> {
        Arc::new(Agent {
            id,
            runtimes,
            held: Mutex::new(HashMap::new()),
            newest: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            lease_ttl: Mutex::new(Duration::from_secs(10)),
            safety_margin,
            max_sandboxes,
            credential: None,
            rpc_auth: Mutex::new(stacyvm_auth::RpcAuth::default()),
        })
    }

    /// Like [`Agent::new`], with a credential towards the control plane.
    pub fn with_credential(
        id: String,
        runtimes: BTreeMap<String, Arc<dyn Runtime>>,
        safety_margin: Duration,
        max_sandboxes: i64,
        credential: Option<crate::config::SecretSource>,
    ) -> Arc<Self> {
        let rpc_auth = stacyvm_auth::RpcAuth {
            worker_id: id.clone(),
            ..Default::default()
        };
        Arc::new(Agent {
            id,
            runtimes,
            held: Mutex::new(HashMap::new()),
            newest: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            lease_ttl: Mutex::new(Duration::from_secs(10)),
            safety_margin,
            max_sandboxes,
            credential: credential.map(Arc::new),
            rpc_auth: Mutex::new(rpc_auth),
        })
    }

    /// The credential to present now (`None`: none configured).
    fn current_credential(&self) -> Result<Option<String>, String> {
        match &self.credential {
            None => Ok(None),
            Some(src) => {
                let s = src.get().map_err(|e| e.to_string())?;
                let v = s.expose().to_string();
                // A static credential is also what the control plane may
                // present on RPC; a signed one is not (wrong audience), nor an
                // enrolled one (replicas know only its hash; they use signed
                // RPC tokens made from this worker's derived key).
                let mut ra = lk(&self.rpc_auth);
                ra.worker_id = self.id.clone();
                ra.static_token = (!v.starts_with(stacyvm_auth::token::PREFIX)
                    && !v.starts_with(wire::CREDENTIAL_PREFIX))
                .then(|| stacyvm_auth::Secret::new(v.clone()));
                Ok(Some(v))
            }
        }
    }

    /// Checks an RPC's credentials for `scope`. Open when the worker has no
    /// credential and was given no RPC keys (development).
    fn authorize(&self, headers: &HeaderMap, scope: &str) -> RpcResult<()> {
        let ra = lk(&self.rpc_auth).clone();
        if !ra.configured() {
            return Ok(());
        }
        let claimed = headers
            .get(WORKER_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let now = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        )
        .unwrap_or(0);
        // Either header may carry a valid credential: the signed RPC token
        // (Bearer) or the worker's own static token (X-Worker-Token).
        let bearer = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|a| a.strip_prefix("Bearer "));
        let stat = headers.get("x-worker-token").and_then(|v| v.to_str().ok());
        let mut last = stacyvm_auth::AuthError::Missing;
        for tok in [bearer, stat].into_iter().flatten() {
            match ra.authenticate(claimed, Some(tok), now, scope) {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
        let status = if last.is_forbidden() {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::UNAUTHORIZED
        };
        let code = if last.is_forbidden() {
            codes::FORBIDDEN
        } else {
            codes::UNAUTHORIZED
        };
        Err(RpcError::new(
            status,
            code,
            format!("{} ({})", last, last.reason()),
        ))
    }

    /// Runtimes whose health check passes now.
    pub async fn healthy_runtimes(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, rt) in &self.runtimes {
            match tokio::time::timeout(Duration::from_secs(5), rt.health()).await {
                Ok(Ok(())) => out.push(name.clone()),
                Ok(Err(e)) => {
                    tracing::warn!(runtime = %name, error = %e, "runtime failed its health check; not advertised")
                }
                Err(_) => {
                    tracing::warn!(runtime = %name, "runtime health check timed out; not advertised")
                }
            }
        }
        out
    }

    /// Adopts what the runtimes still run (after a restart): each sandbox is
    /// claimed with the generation it was started under; the leader's answer
    /// to the first heartbeat keeps or stops it.
    pub async fn adopt(&self) {
        for (name, rt) in &self.runtimes {
            match rt.list().await {
                Ok(list) => {
                    let mut held = lk(&self.held);
                    let mut newest = lk(&self.newest);
                    for s in list {
                        newest.insert(s.sandbox_id.clone(), s.generation);
                        held.insert(
                            s.sandbox_id.clone(),
                            Held {
                                generation: s.generation,
                                runtime: name.clone(),
                                renewed_at: Instant::now(),
                            },
                        );
                        tracing::info!(sandbox = %s.sandbox_id, generation = s.generation, "adopted a sandbox from before the restart");
                    }
                }
                Err(e) => {
                    tracing::warn!(runtime = %name, error = %e, "cannot list sandboxes for adoption")
                }
            }
        }
    }

    fn runtime(&self, name: &str) -> RpcResult<&Arc<dyn Runtime>> {
        self.runtimes.get(name).ok_or_else(|| {
            RpcError::new(
                StatusCode::NOT_FOUND,
                codes::UNKNOWN_RUNTIME,
                format!("runtime {name:?} is not offered by worker {}", self.id),
            )
        })
    }

    /// Checks the caller's worker ID and the sandbox's lease generation and
    /// returns the sandbox's runtime.
    fn admit(&self, headers: &HeaderMap, sandbox_id: &str) -> RpcResult<Arc<dyn Runtime>> {
        self.check_worker(headers)?;
        let generation = generation_of(headers)?;
        let newest = lk(&self.newest).get(sandbox_id).copied();
        if let Some(n) = newest
            && generation < n
        {
            return Err(RpcError::new(
                StatusCode::CONFLICT,
                codes::STALE_GENERATION,
                format!(
                    "generation {generation} is older than {n}, the newest this worker has seen for {sandbox_id}"
                ),
            ));
        }
        let held = lk(&self.held).get(sandbox_id).cloned();
        match held {
            Some(h) if h.generation == generation => Ok(self.runtime(&h.runtime)?.clone()),
            Some(h) => Err(RpcError::new(
                StatusCode::CONFLICT,
                codes::STALE_GENERATION,
                format!(
                    "sandbox {sandbox_id} runs here under generation {}, not {generation}",
                    h.generation
                ),
            )),
            None => Err(RpcError::new(
                StatusCode::NOT_FOUND,
                codes::NOT_FOUND,
                format!("sandbox {sandbox_id} does not run on worker {}", self.id),
            )),
        }
    }

    fn check_worker(&self, headers: &HeaderMap) -> RpcResult<()> {
        let named = headers
            .get(WORKER_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if named != self.id {
            return Err(RpcError::new(
                StatusCode::FORBIDDEN,
                codes::FORBIDDEN,
                format!("this is worker {:?}, not {named:?}", self.id),
            ));
        }
        Ok(())
    }

    /// Stops a sandbox locally and forgets its lease.
    async fn stop_local(&self, sandbox_id: &str, why: &str) {
        let held = lk(&self.held).remove(sandbox_id);
        if let Some(h) = held
            && let Some(rt) = self.runtimes.get(&h.runtime)
        {
            match rt.destroy(sandbox_id).await {
                Ok(()) => tracing::warn!(
                    sandbox = sandbox_id,
                    generation = h.generation,
                    why,
                    "stopped sandbox"
                ),
                Err(RuntimeError::NotFound(_)) => tracing::warn!(
                    sandbox = sandbox_id,
                    generation = h.generation,
                    why,
                    "sandbox to stop was already gone"
                ),
                Err(e) => {
                    tracing::error!(sandbox = sandbox_id, error = %e, "could not stop sandbox")
                }
            }
        }
    }

    /// Stops every sandbox whose lease has not been renewed for
    /// `lease_ttl − safety_margin`.
    pub async fn fence(&self) {
        let ttl = *lk(&self.lease_ttl);
        let limit = ttl.saturating_sub(self.safety_margin);
        let due: Vec<String> = lk(&self.held)
            .iter()
            .filter(|(_, h)| h.renewed_at.elapsed() >= limit)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            self.stop_local(&id, "lease not renewed in time (fenced)")
                .await;
        }
    }

    fn heartbeat_request(&self, rpc_url: &str, runtimes: &[String]) -> HeartbeatRequest {
        let leases = lk(&self.held)
            .iter()
            .map(|(id, h)| wire::HeldLease {
                resource_id: id.clone(),
                generation: h.generation,
            })
            .collect();
        let mut capacity = BTreeMap::new();
        capacity.insert("max_sandboxes".to_string(), self.max_sandboxes);
        HeartbeatRequest {
            hostname: hostname(),
            status: if self.draining.load(Ordering::SeqCst) {
                "draining".into()
            } else {
                "online".into()
            },
            runtimes: runtimes.to_vec(),
            capabilities: vec![
                "spawn".into(),
                "exec".into(),
                "exec_stream".into(),
                "files".into(),
                "logs".into(),
            ],
            capacity,
            rpc_url: rpc_url.to_string(),
            leases,
        }
    }

    /// Applies the leader's answer to a heartbeat sent at `sent`.
    async fn apply_reply(&self, reply: &HeartbeatReply, sent: Instant) {
        {
            let mut ra = lk(&self.rpc_auth);
            ra.worker_id = self.id.clone();
            let keys: Vec<Vec<u8>> = reply
                .rpc_keys
                .iter()
                .filter_map(|h| hex::decode(h).ok())
                .collect();
            if !keys.is_empty() {
                ra.rpc_keys = keys;
            }
            ra.revoked = reply.revoked_token_ids.iter().cloned().collect();
        }
        if reply.lease_ttl_ms > 0 {
            *lk(&self.lease_ttl) =
                Duration::from_millis(u64::try_from(reply.lease_ttl_ms).unwrap_or(10_000));
        }
        {
            let mut held = lk(&self.held);
            for r in &reply.renewed {
                if let Some(h) = held.get_mut(&r.resource_id)
                    && h.generation == r.generation
                    && h.renewed_at < sent
                {
                    h.renewed_at = sent;
                }
            }
        }
        for l in &reply.lost {
            let ours = lk(&self.held)
                .get(&l.resource_id)
                .is_some_and(|h| h.generation == l.generation);
            if ours {
                self.stop_local(
                    &l.resource_id,
                    "the leader says this worker no longer holds its lease",
                )
                .await;
            }
        }
    }

    // ------------------------------------------------------------ RPC handlers

    async fn spawn(&self, headers: &HeaderMap, req: RpcSpawn) -> RpcResult<RpcSandbox> {
        self.check_worker(headers)?;
        if self.draining.load(Ordering::SeqCst) {
            return Err(RpcError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::UNAVAILABLE,
                "worker is draining",
            ));
        }
        wire::check_sandbox_id(&req.sandbox_id)
            .map_err(|e| RpcError::new(StatusCode::BAD_REQUEST, codes::BAD_REQUEST, e.0))?;
        let generation = generation_of(headers)?;
        if generation != req.generation || generation <= 0 {
            return Err(RpcError::new(
                StatusCode::BAD_REQUEST,
                codes::BAD_REQUEST,
                "generation header and body disagree",
            ));
        }
        {
            let mut newest = lk(&self.newest);
            if let Some(n) = newest.get(&req.sandbox_id)
                && generation < *n
            {
                return Err(RpcError::new(
                    StatusCode::CONFLICT,
                    codes::STALE_GENERATION,
                    format!("generation {generation} is older than {n}"),
                ));
            }
            newest.insert(req.sandbox_id.clone(), generation);
        }
        let rt = self.runtime(&req.runtime)?.clone();
        if req.lease_ttl_ms > 0 {
            *lk(&self.lease_ttl) =
                Duration::from_millis(u64::try_from(req.lease_ttl_ms).unwrap_or(10_000));
        }
        let mut labels = BTreeMap::new();
        labels.insert("worker_id".to_string(), self.id.clone());
        let spec = SpawnSpec {
            sandbox_id: req.sandbox_id.clone(),
            image: req.image.clone(),
            memory_mb: req.memory_mb,
            vcpus: req.vcpus,
            env: req.env.clone(),
            labels,
            generation,
        };
        // Claim the lease before starting, so a heartbeat racing the start
        // renews it rather than leaving it to the fence.
        lk(&self.held).insert(
            req.sandbox_id.clone(),
            Held {
                generation,
                runtime: req.runtime.clone(),
                renewed_at: Instant::now(),
            },
        );
        match rt.spawn(&spec).await {
            Ok(s) => Ok(RpcSandbox {
                sandbox_id: s.sandbox_id,
                runtime: req.runtime,
                runtime_id: s.runtime_id,
                state: state_str(s.state).into(),
                generation,
            }),
            Err(e) => {
                lk(&self.held).remove(&req.sandbox_id);
                Err(e.into())
            }
        }
    }

    async fn destroy(&self, headers: &HeaderMap, id: &str) -> RpcResult<StatusReply> {
        let rt = self.admit(headers, id)?;
        lk(&self.held).remove(id);
        match rt.destroy(id).await {
            Ok(()) | Err(RuntimeError::NotFound(_)) => Ok(StatusReply {
                status: "destroyed".into(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    async fn status(&self, headers: &HeaderMap, id: &str) -> RpcResult<RpcSandbox> {
        self.check_worker(headers)?;
        let h = lk(&self.held).get(id).cloned();
        let Some(h) = h else {
            return Err(RpcError::new(
                StatusCode::NOT_FOUND,
                codes::NOT_FOUND,
                format!("sandbox {id} does not run here"),
            ));
        };
        let s = self.runtime(&h.runtime)?.status(id).await?;
        Ok(RpcSandbox {
            sandbox_id: s.sandbox_id,
            runtime: h.runtime,
            runtime_id: s.runtime_id,
            state: state_str(s.state).into(),
            generation: h.generation,
        })
    }

    async fn list(&self, headers: &HeaderMap) -> RpcResult<Vec<RpcSandbox>> {
        self.check_worker(headers)?;
        let held: Vec<(String, Held)> = lk(&self.held)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out = Vec::new();
        for (id, h) in held {
            let Some(rt) = self.runtimes.get(&h.runtime) else {
                continue;
            };
            match rt.status(&id).await {
                Ok(s) => out.push(RpcSandbox {
                    sandbox_id: id,
                    runtime: h.runtime,
                    runtime_id: s.runtime_id,
                    state: state_str(s.state).into(),
                    generation: h.generation,
                }),
                Err(RuntimeError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        out.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
        Ok(out)
    }
}

fn state_str(s: RuntimeState) -> &'static str {
    match s {
        RuntimeState::Running => "running",
        RuntimeState::Stopped => "stopped",
    }
}

fn generation_of(headers: &HeaderMap) -> RpcResult<i64> {
    headers
        .get(GENERATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
        .ok_or_else(|| {
            RpcError::new(
                StatusCode::BAD_REQUEST,
                codes::BAD_REQUEST,
                "missing or bad lease generation header",
            )
        })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Turns an API exec request into a runtime exec spec.
pub fn exec_spec(req: &ExecRequest) -> Result<ExecSpec, String> {
    let mode = match req.mode.as_str() {
        "" | "shell" => ExecMode::Shell,
        "argv" => ExecMode::Argv,
        other => return Err(format!("mode {other:?} must be \"shell\" or \"argv\"")),
    };
    if req.command.is_empty() {
        return Err("command is required".into());
    }
    if req.command.len() > 128 * 1024 || req.args.len() > 4096 {
        return Err("command or args too large".into());
    }
    let timeout = match &req.timeout {
        Some(t) => Some(t.parse()?),
        None => None,
    };
    Ok(ExecSpec {
        command: req.command.clone(),
        args: req.args.clone(),
        mode,
        env: req.env.clone(),
        workdir: if req.workdir.is_empty() {
            None
        } else {
            Some(req.workdir.clone())
        },
        timeout,
    })
}

fn bad(m: impl Into<String>) -> RpcError {
    RpcError::new(StatusCode::BAD_REQUEST, codes::BAD_REQUEST, m)
}

/// JSON body whose rejection answers in the RPC error format.
struct RpcJson<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for RpcJson<T> {
    type Rejection = RpcError;
    async fn from_request(req: Request, state: &S) -> Result<Self, RpcError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(RpcJson(v)),
            Err(rej) => Err(RpcError::new(
                rej.status(),
                codes::BAD_REQUEST,
                rej.body_text(),
            )),
        }
    }
}

type A = State<Arc<Agent>>;

async fn rpc_spawn(
    State(a): A,
    headers: HeaderMap,
    RpcJson(req): RpcJson<RpcSpawn>,
) -> RpcResult<Json<RpcSandbox>> {
    a.authorize(&headers, "worker:spawn")?;
    a.spawn(&headers, req).await.map(Json)
}
async fn rpc_list(State(a): A, headers: HeaderMap) -> RpcResult<Json<Vec<RpcSandbox>>> {
    a.authorize(&headers, "worker:status")?;
    a.list(&headers).await.map(Json)
}
async fn rpc_status(
    State(a): A,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> RpcResult<Json<RpcSandbox>> {
    a.authorize(&headers, "worker:status")?;
    a.status(&headers, &id).await.map(Json)
}
async fn rpc_destroy(
    State(a): A,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> RpcResult<Json<StatusReply>> {
    a.authorize(&headers, "worker:destroy")?;
    a.destroy(&headers, &id).await.map(Json)
}

async fn rpc_exec(
    State(a): A,
    headers: HeaderMap,
    Path(id): Path<String>,
    RpcJson(req): RpcJson<ExecRequest>,
) -> RpcResult<Json<ExecResult>> {
    a.authorize(&headers, "worker:exec")?;
    let rt = a.admit(&headers, &id)?;
    let spec = exec_spec(&req).map_err(bad)?;
    let out = rt.exec(&id, &spec).await?;
    Ok(Json(ExecResult {
        exit_code: out.exit_code,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        duration: wire::format_duration(Duration::from_millis(out.duration_ms)),
        duration_ms: out.duration_ms,
        timed_out: out.timed_out,
    }))
}

/// Serialises one NDJSON line.
pub fn ndjson(line: &ExecStreamLine) -> bytes::Bytes {
    let mut v = serde_json::to_vec(line).unwrap_or_default();
    v.push(b'\n');
    v.into()
}

async fn rpc_exec_stream(
    State(a): A,
    headers: HeaderMap,
    Path(id): Path<String>,
    RpcJson(req): RpcJson<ExecRequest>,
) -> RpcResult<Response> {
    a.authorize(&headers, "worker:exec")?;
    let rt = a.admit(&headers, &id)?;
    let spec = exec_spec(&req).map_err(bad)?;
    let rx = rt.exec_stream(&id, &spec).await?;
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|chunk| {
        let line = match chunk {
            ExecChunk::Stdout(b) => ExecStreamLine {
                stream: Some("stdout".into()),
                data: Some(String::from_utf8_lossy(&b).into_owned()),
                ..Default::default()
            },
            ExecChunk::Stderr(b) => ExecStreamLine {
                stream: Some("stderr".into()),
                data: Some(String::from_utf8_lossy(&b).into_owned()),
                ..Default::default()
            },
            ExecChunk::Exit {
                exit_code,
                timed_out,
                duration_ms,
            } => ExecStreamLine {
                exit_code: Some(exit_code),
                timed_out: Some(timed_out),
                duration_ms: Some(duration_ms),
                ..Default::default()
            },
        };
        Ok::<_, std::convert::Infallible>(ndjson(&line))
    });
    Ok((
        [
            ("content-type", "application/x-ndjson"),
            ("cache-control", "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileQuery {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    recursive: Option<bool>,
    #[serde(default)]
    pattern: Option<String>,
    #[serde(default)]
    lines: Option<usize>,
}

fn need_path(q: &FileQuery) -> RpcResult<String> {
    q.path
        .clone()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| bad("query parameter `path` is required"))
}

async fn rpc_file_put(
    State(a): A,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
    body: Body,
) -> RpcResult<Json<StatusReply>> {
    a.authorize(&headers, "worker:files")?;
    let rt = a.admit(&headers, &id)?;
    let path = need_path(&q)?;
    let mode = match &q.mode {
        Some(m) => wire::FileMode::Octal(m.clone()).bits().map_err(bad)?,
        None => 0o644,
    };
    let mut seen: usize = 0;
    let stream = body.into_data_stream().map(move |r| {
        let chunk = r.map_err(std::io::Error::other)?;
        seen += chunk.len();
        if seen > crate::api::MAX_UPLOAD {
            return Err(std::io::Error::other(format!(
                "upload is larger than {} bytes",
                crate::api::MAX_UPLOAD
            )));
        }
        Ok(chunk)
    });
    let reader = tokio_util::io::StreamReader::new(stream);
    rt.write_file(&id, &path, mode, Box::pin(reader)).await?;
    Ok(Json(StatusReply {
        status: "written".into(),
    }))
}

async fn rpc_file_get(
    State(a): A,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> RpcResult<Response> {
    a.authorize(&headers, "worker:files")?;
    let rt = a.admit(&headers, &id)?;
    let path = need_path(&q)?;
    let (size, reader) = rt.read_file(&id, &path).await?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(reader));
    Ok((
        [
            ("content-type", "application/octet-stream".to_string()),
            ("content-length", size.to_string()),
        ],
        body,
    )
        .into_response())
}

async fn rpc_file_delete(
    State(a): A,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> RpcResult<Json<StatusReply>> {
    a.authorize(&headers, "worker:files")?;
    let rt = a.admit(&headers, &id)?;
    rt.remove(&id, &need_path(&q)?, q.recursive.unwrap_or(false))
        .await?;
    Ok(Json(StatusReply {
        status: "deleted".into(),
    }))
}

fn info(f: stacyvm_runtimes::FileInfo) -> wire::FileInfo {
    wire::FileInfo {
        path: f.path,
        size: f.size,
        mode: wire::mode_string(f.mode),
        is_dir: f.is_dir,
        mod_time: f.mod_time,
    }
}

async fn rpc_file_list(
    State(a): A,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> RpcResult<Json<Vec<wire::FileInfo>>> {
    a.authorize(&headers, "worker:files")?;
    let rt = a.admit(&headers, &id)?;
    let path = q
        .path
        .clone()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".into());
    Ok(Json(
        rt.list_files(&id, &path)
            .await?
            .into_iter()
            .map(info)
            .collect(),
    ))
}

async fn rpc_file_stat(
    State(a): A,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> RpcResult<Json<wire::FileInfo>> {
    a.authorize(&headers, "worker:files")?;
    let rt = a.admit(&headers, &id)?;
    Ok(Json(info(rt.stat(&id, &need_path(&q)?).await?)))
}

async fn rpc_file_glob(
    State(a): A,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> RpcResult<Json<Vec<String>>> {
    a.authorize(&headers, "worker:files")?;
    let rt = a.admit(&headers, &id)?;
    let pattern = q
        .pattern
        .clone()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| bad("query parameter `pattern` is required"))?;
    Ok(Json(rt.glob(&id, &pattern).await?))
}

async fn rpc_file_move(
    State(a): A,
    headers: HeaderMap,
    Path(id): Path<String>,
    RpcJson(req): RpcJson<wire::MoveRequest>,
) -> RpcResult<Json<StatusReply>> {
    a.authorize(&headers, "worker:files")?;
    let rt = a.admit(&headers, &id)?;
    rt.rename(&id, &req.old_path, &req.new_path).await?;
    Ok(Json(StatusReply {
        status: "moved".into(),
    }))
}

async fn rpc_file_chmod(
    State(a): A,
    headers: HeaderMap,
    Path(id): Path<String>,
    RpcJson(req): RpcJson<wire::ChmodRequest>,
) -> RpcResult<Json<StatusReply>> {
    a.authorize(&headers, "worker:files")?;
    let rt = a.admit(&headers, &id)?;
    rt.chmod(&id, &req.path, req.mode.bits().map_err(bad)?)
        .await?;
    Ok(Json(StatusReply {
        status: "chmod applied".into(),
    }))
}

async fn rpc_logs(
    State(a): A,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> RpcResult<Json<Vec<String>>> {
    a.authorize(&headers, "worker:logs")?;
    let rt = a.admit(&headers, &id)?;
    Ok(Json(
        rt.logs(&id, q.lines.unwrap_or(100).min(10_000)).await?,
    ))
}

async fn rpc_health(State(a): A) -> Json<serde_json::Value> {
    Json(
        serde_json::json!({ "status": "ok", "worker_id": a.id, "draining": a.draining.load(Ordering::SeqCst) }),
    )
}

/// The worker RPC router.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/health", get(rpc_health))
        .route("/rpc/v1/sandboxes", post(rpc_spawn).get(rpc_list))
        .route(
            "/rpc/v1/sandboxes/{id}",
            get(rpc_status).delete(rpc_destroy),
        )
        .route("/rpc/v1/sandboxes/{id}/exec", post(rpc_exec))
        .route("/rpc/v1/sandboxes/{id}/exec/stream", post(rpc_exec_stream))
        .route(
            "/rpc/v1/sandboxes/{id}/files",
            get(rpc_file_get).put(rpc_file_put).delete(rpc_file_delete),
        )
        .route("/rpc/v1/sandboxes/{id}/files/list", get(rpc_file_list))
        .route("/rpc/v1/sandboxes/{id}/files/stat", get(rpc_file_stat))
        .route("/rpc/v1/sandboxes/{id}/files/glob", get(rpc_file_glob))
        .route("/rpc/v1/sandboxes/{id}/files/move", post(rpc_file_move))
        .route("/rpc/v1/sandboxes/{id}/files/chmod", post(rpc_file_chmod))
        .route("/rpc/v1/sandboxes/{id}/logs", get(rpc_logs))
        // File uploads stream; other bodies are small.
        .layer(DefaultBodyLimit::max(crate::api::MAX_UPLOAD))
        .with_state(agent)
}

/// Serves the worker RPC on `listener` until `shutdown` resolves: plain HTTP,
/// or mutual TLS when `tls` is given (see [`crate::rpc_tls`]).
pub async fn serve_rpc(
    listener: std::net::TcpListener,
    agent: Arc<Agent>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let app = router(agent);
    match tls {
        Some(cfg) => {
            let handle = axum_server::Handle::new();
            let h = handle.clone();
            tokio::spawn(async move {
                shutdown.await;
                h.graceful_shutdown(Some(Duration::from_secs(5)));
            });
            axum_server::from_tcp_rustls(
                listener,
                axum_server::tls_rustls::RustlsConfig::from_config(cfg),
            )?
            .handle(handle)
            .serve(app.into_make_service())
            .await
        }
        None => {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

/// Finds and follows the leader: heartbeats to it, re-attaching after an
/// election by asking any bootstrap replica who leads now.
#[derive(Debug)]
pub struct Attachment {
    http: reqwest::Client,
    bootstrap: Vec<String>,
    current: Option<String>,
    next: usize,
}

impl Attachment {
    pub fn new(
        bootstrap: Vec<String>,
        source_ip: Option<std::net::IpAddr>,
    ) -> Result<Self, reqwest::Error> {
        // Short: a paused or partitioned replica must not hold the worker
        // back from finding the new leader (re-attach within 2 s of an election).
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(300))
            .timeout(Duration::from_secs(1))
            .local_address(source_ip)
            .build()?;
        let bootstrap = bootstrap.into_iter().map(|b| base_url(&b)).collect();
        Ok(Attachment {
            http,
            bootstrap,
            current: None,
            next: 0,
        })
    }

    /// The replica heartbeats go to right now.
    pub fn current(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// Sends one heartbeat; returns the reply or why it failed. On a
    /// not-leader answer it follows the leader hint; on a transport failure it
    /// moves to the next bootstrap replica.
    pub async fn beat(
        &mut self,
        worker_id: &str,
        credential: Option<&str>,
        req: &HeartbeatRequest,
    ) -> Result<HeartbeatReply, String> {
        let base = match &self.current {
            Some(c) => c.clone(),
            None => {
                let b = self.bootstrap[self.next % self.bootstrap.len()].clone();
                self.next += 1;
                b
            }
        };
        let url = format!("{base}/api/v1/worker/{worker_id}/heartbeat");
        let mut b = self
            .http
            .post(&url)
            .header(WORKER_ID_HEADER, worker_id)
            .json(req);
        if let Some(c) = credential {
            b = b.header("x-worker-token", c);
        }
        let resp = match b.send().await {
            Ok(r) => r,
            Err(e) => {
                self.current = None;
                return Err(format!("{base}: {e}"));
            }
        };
        let status = resp.status();
        let leader = resp
            .headers()
            .get(crate::api::LEADER_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(base_url);
        if status.is_success() {
            self.current = Some(base);
            return resp
                .json()
                .await
                .map_err(|e| format!("bad heartbeat reply: {e}"));
        }
        let body: ErrorBody = resp.json().await.unwrap_or(ErrorBody {
            code: status.to_string(),
            message: String::new(),
            request_id: String::new(),
        });
        if body.code == codes::NOT_LEADER || body.code == codes::NO_LEADER {
            self.current = leader.filter(|l| *l != base);
        }
        Err(format!("{base}: {} {}", body.code, body.message))
    }
}

fn base_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.trim_end_matches('/').to_string()
    } else {
        format!("http://{addr}")
    }
}

/// Builds the runtimes named on the command line. `instance` (the worker
/// ID) keeps the containers of several workers on one host apart.
pub async fn build_runtimes(
    names: &[String],
    state_dir: &std::path::Path,
    instance: &str,
    opts: &RuntimeArgs,
) -> Result<BTreeMap<String, Arc<dyn Runtime>>, CliError> {
    use stacyvm_runtimes::docker::{DockerOptions, DockerRuntime, PullPolicy};
    use stacyvm_runtimes::mock::{MockOptions, MockRuntime};
    let mut out: BTreeMap<String, Arc<dyn Runtime>> = BTreeMap::new();
    for name in names {
        let failed =
            |e: stacyvm_runtimes::RuntimeError| CliError::Failed(format!("{name} runtime: {e}"));
        let rt: Arc<dyn Runtime> = match name.as_str() {
            "mock" => Arc::new(MockRuntime::new(state_dir.join("mock")).map_err(failed)?),
            "proot" => {
                let proot = opts.proot_options()?;
                Arc::new(
                    MockRuntime::proot(state_dir.join("proot"), MockOptions::from_env(), proot)
                        .map_err(failed)?,
                )
            }
            "docker" | "gvisor" | "kata" => {
                let mut o = DockerOptions::new(name, state_dir.join(name))
                    .ok_or_else(|| CliError::Usage(format!("unknown runtime {name:?}")))?;
                o.instance = instance.to_string();
                o.user = opts.docker_user.clone();
                o.readonly_rootfs = opts.docker_readonly_rootfs;
                o.pids_limit = opts.docker_pids_limit;
                o.pull = if opts.docker_pull == "never" {
                    PullPolicy::Never
                } else {
                    PullPolicy::Missing
                };
                Arc::new(DockerRuntime::connect(o).await.map_err(failed)?)
            }
            other => {
                return Err(CliError::Usage(format!(
                    "unknown runtime {other:?}; this build offers: mock, proot, docker, gvisor, kata"
                )));
            }
        };
        out.insert(name.clone(), rt);
    }
    Ok(out)
}

/// What the heartbeat loop should do next (from signals, or from a test).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Run,
    /// Refuse new sandboxes, report `draining`, exit once empty or timed out.
    Drain,
    /// Exit now.
    Stop,
}

/// Everything the heartbeat loop needs.
#[derive(Clone, Debug)]
pub struct LoopConfig {
    pub bootstrap: Vec<String>,
    /// Local IP heartbeats leave from (`--source-ip`).
    pub source_ip: Option<std::net::IpAddr>,
    pub rpc_url: String,
    pub advertised: Vec<String>,
    pub heartbeat: Duration,
    pub drain_timeout: Duration,
}

impl Agent {
    /// Heartbeats, follows the leader, fences; returns when `mode` says stop
    /// (or a drain finished).
    pub async fn heartbeat_loop(
        self: Arc<Self>,
        cfg: LoopConfig,
        mut mode: tokio::sync::watch::Receiver<Mode>,
    ) -> Result<(), String> {
        let mut attach =
            Attachment::new(cfg.bootstrap.clone(), cfg.source_ip).map_err(|e| e.to_string())?;
        let mut interval = cfg.heartbeat.max(Duration::from_millis(20));
        let mut drain_deadline: Option<Instant> = None;
        let mut attached = false;
        let mut next_beat = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next_beat) => {
                    let req = self.heartbeat_request(&cfg.rpc_url, &cfg.advertised);
                    let sent = Instant::now();
                    let cred = match self.current_credential() {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::error!(worker = %self.id, error = %e, "credential unusable; heartbeat not sent");
                            next_beat = tokio::time::Instant::now() + interval;
                            continue;
                        }
                    };
                    match attach.beat(&self.id, cred.as_deref(), &req).await {
                        Ok(reply) => {
                            if !attached {
                                tracing::info!(worker = %self.id, replica = attach.current().unwrap_or(""), "attached to the leader");
                                attached = true;
                            }
                            self.apply_reply(&reply, sent).await;
                            if reply.heartbeat_interval_ms > 0 {
                                interval = Duration::from_millis(u64::try_from(reply.heartbeat_interval_ms).unwrap_or(1000));
                            }
                            next_beat = tokio::time::Instant::now() + interval;
                        }
                        Err(e) => {
                            if attached {
                                tracing::warn!(worker = %self.id, error = %e, "heartbeat failed; looking for the leader");
                                attached = false;
                            } else {
                                tracing::debug!(worker = %self.id, error = %e, "heartbeat failed");
                            }
                            // Retry fast while re-attaching: an election takes well under a second.
                            next_beat = tokio::time::Instant::now() + (interval / 5).clamp(Duration::from_millis(20), Duration::from_millis(100));
                        }
                    }
                }
                changed = mode.changed() => {
                    let m = if changed.is_ok() { *mode.borrow() } else { Mode::Stop };
                    match m {
                        Mode::Stop => return Ok(()),
                        Mode::Drain if drain_deadline.is_none() => {
                            self.draining.store(true, Ordering::SeqCst);
                            drain_deadline = Some(Instant::now() + cfg.drain_timeout);
                            next_beat = tokio::time::Instant::now();
                        }
                        _ => {}
                    }
                }
            }
            if let Some(d) = drain_deadline
                && (Instant::now() >= d || lk(&self.held).is_empty())
            {
                // One last beat so the leader sees the final state.
                let req = self.heartbeat_request(&cfg.rpc_url, &cfg.advertised);
                let cred = self.current_credential().ok().flatten();
                let _ = attach.beat(&self.id, cred.as_deref(), &req).await;
                return Ok(());
            }
        }
    }

    /// Fences forever (see the module docs). Runs on its own task, apart from
    /// the heartbeat loop: a heartbeat stuck on a dead replica (up to its 1 s
    /// timeout) must never delay fencing.
    pub async fn fence_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            self.fence().await;
        }
    }

    /// Stops every local sandbox (exit with `--destroy-on-exit`).
    pub async fn stop_all(&self) {
        let ids: Vec<String> = lk(&self.held).keys().cloned().collect();
        for sid in ids {
            self.stop_local(&sid, "worker exiting").await;
        }
    }

    /// Sandboxes this worker runs, with their generations.
    pub fn held(&self) -> BTreeMap<String, i64> {
        lk(&self.held)
            .iter()
            .map(|(k, v)| (k.clone(), v.generation))
            .collect()
    }
}

/// The credential from an earlier enrollment, or a new one obtained with
/// `--enroll-token-file` (written to `<state-dir>/worker-credential`, 0600).
async fn enrolled_credential(
    args: &WorkerArgs,
    id: &str,
) -> Result<Option<crate::config::SecretSource>, CliError> {
    let path = args.state_dir.join("worker-credential");
    let as_source = |p: &std::path::Path| {
        crate::config::SecretSource::from_parts(None, Some(&p.display().to_string()))
    };
    if path.exists() {
        return Ok(as_source(&path));
    }
    let Some(f) = &args.enroll_token_file else {
        return Ok(None);
    };
    let secret =
        std::fs::read_to_string(f).map_err(|e| CliError::Usage(format!("{}: {e}", f.display())))?;
    let secret = secret.trim().to_string();
    std::fs::create_dir_all(&args.state_dir).map_err(|e| CliError::Failed(e.to_string()))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .local_address(args.source_ip)
        .build()
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let mut last = String::from("no bootstrap replica given");
    for b in &args.bootstrap {
        let url = format!("{}/api/v1/worker/{id}/enroll", base_url(b));
        match http
            .post(&url)
            .header(WORKER_ID_HEADER, id)
            .json(&wire::EnrollRequest {
                enroll_token: secret.clone(),
            })
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                let reply: wire::EnrollReply = r
                    .json()
                    .await
                    .map_err(|e| CliError::Failed(format!("bad enrollment answer: {e}")))?;
                write_private(&path, &reply.worker_token)?;
                eprintln!(
                    "worker {id}: enrolled; credential kept in {}",
                    path.display()
                );
                return Ok(as_source(&path));
            }
            Ok(r) => {
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                return Err(CliError::Refused(format!(
                    "enrollment refused: {} ({})",
                    body["message"].as_str().unwrap_or("refused"),
                    body["reason"].as_str().unwrap_or("")
                )));
            }
            Err(e) => last = format!("{b}: {e}"),
        }
    }
    Err(CliError::Failed(format!(
        "cannot reach any replica to enroll: {last}"
    )))
}

/// Writes a secret to a new file readable only by this user.
pub fn write_private(path: &std::path::Path, value: &str) -> Result<(), CliError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| CliError::Failed(format!("{}: {e}", path.display())))?;
    f.write_all(value.as_bytes())
        .map_err(|e| CliError::Failed(format!("{}: {e}", path.display())))
}

/// Runs `stacyvm worker` until SIGTERM (drain, then exit) or SIGINT (exit).
pub async fn run(mut args: WorkerArgs) -> Result<(), CliError> {
    match args.command {
        Some(WorkerCommand::Token(cmd)) => return crate::token_cmd::run(cmd),
        Some(WorkerCommand::EnrollToken(a)) => return crate::client_cmd::enroll_token(a).await,
        None => {}
    }
    let credential = match (&args.worker_token, &args.worker_token_file) {
        (Some(t), _) if !t.is_empty() => Some(crate::config::SecretSource::Inline(
            stacyvm_auth::Secret::new(t.clone()),
        )),
        (_, Some(f)) => {
            let src = crate::config::SecretSource::from_parts(None, Some(&f.display().to_string()));
            if let Some(s) = &src {
                s.get().map_err(|e| CliError::Usage(e.to_string()))?;
            }
            src
        }
        _ => None,
    };
    let id_for_enroll = args.id.clone().unwrap_or_else(hostname);
    let credential = match credential {
        Some(c) => Some(c),
        None => enrolled_credential(&args, &id_for_enroll).await?,
    };
    let id = args.id.clone().unwrap_or_else(hostname);
    wire::check_name("worker id", &id).map_err(|e| CliError::Usage(e.0))?;
    if args.bootstrap.is_empty() {
        return Err(CliError::Usage(
            "--bootstrap needs at least one replica address".into(),
        ));
    }
    std::fs::create_dir_all(&args.state_dir)
        .map_err(|e| CliError::Failed(format!("state dir {}: {e}", args.state_dir.display())))?;
    if let Some(path) = &args.config {
        let file =
            crate::config::FileConfig::load(path).map_err(|e| CliError::Usage(e.to_string()))?;
        args.runtime_opts.proot_config = file.runtimes.proot;
    }
    let runtimes = build_runtimes(&args.runtimes, &args.state_dir, &id, &args.runtime_opts).await?;
    let agent = Agent::with_credential(
        id.clone(),
        runtimes,
        Duration::from_millis(args.safety_margin_ms),
        args.max_sandboxes,
        credential,
    );
    agent.adopt().await;
    let advertised = agent.healthy_runtimes().await;
    if advertised.is_empty() {
        return Err(CliError::Failed(
            "no runtime passed its health check; nothing to offer".into(),
        ));
    }
    let tls = match (
        &args.rpc_tls_cert,
        &args.rpc_tls_key,
        &args.rpc_tls_client_ca,
    ) {
        (Some(c), Some(k), Some(ca)) => Some(
            crate::rpc_tls::server_config(&id, c, k, ca)
                .map_err(|e| CliError::Usage(e.to_string()))?,
        ),
        _ => None,
    };
    let listener = std::net::TcpListener::bind(args.rpc_addr).map_err(|e| {
        CliError::Failed(format!(
            "cannot bind the RPC address {}: {e}",
            args.rpc_addr
        ))
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let rpc_url = args
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{local}"));
    let server = tokio::spawn(serve_rpc(
        listener,
        agent.clone(),
        tls,
        std::future::pending(),
    ));
    eprintln!(
        "worker {id}: RPC on {rpc_url}, runtimes {advertised:?}, bootstrap {:?}",
        args.bootstrap
    );
    let (tx, rx) = tokio::sync::watch::channel(Mode::Run);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| CliError::Failed(e.to_string()))?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {
                eprintln!("worker: SIGTERM, draining (no new sandboxes)");
                let _ = tx.send(Mode::Drain);
                // A second signal stops at once.
                tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
                let _ = tx.send(Mode::Stop);
            }
            _ = int.recv() => { let _ = tx.send(Mode::Stop); }
        }
    });
    let cfg = LoopConfig {
        bootstrap: args.bootstrap.clone(),
        source_ip: args.source_ip,
        rpc_url,
        advertised,
        heartbeat: Duration::from_millis(args.heartbeat_ms),
        drain_timeout: Duration::from_secs(args.drain_timeout_s),
    };
    let fencer = tokio::spawn(agent.clone().fence_loop());
    let result = tokio::select! {
        r = agent.clone().heartbeat_loop(cfg, rx) => r.map_err(CliError::Failed),
        r = server => Err(CliError::Failed(format!("the RPC server stopped: {r:?}"))),
    };
    fencer.abort();
    if args.destroy_on_exit {
        agent.stop_all().await;
    }
    eprintln!("worker {id}: stopped");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_flags_win_over_the_config_file() {
        let file = crate::config::FileConfig::parse(
            "runtimes:\n  proot:\n    binary: /opt/proot\n    images:\n      busybox: /file/busybox\n      alpine: /file/alpine\n",
            "t",
        )
        .expect("parse");
        let images = |o: &stacyvm_runtimes::proot::ProotOptions| {
            o.images
                .iter()
                .map(|(k, v)| format!("{k}={}", v.display()))
                .collect::<Vec<_>>()
        };
        let flags = RuntimeArgs {
            proot_images: vec!["busybox=/flag/busybox".into()],
            proot_config: file.runtimes.proot.clone(),
            ..RuntimeArgs::default()
        };
        let merged = flags.proot_options().expect("options");
        assert_eq!(
            images(&merged),
            ["alpine=/file/alpine", "busybox=/flag/busybox"]
        );
        assert_eq!(merged.binary, PathBuf::from("/opt/proot"));
        let with_bin = RuntimeArgs {
            proot_bin: Some(PathBuf::from("/flag/proot")),
            proot_config: file.runtimes.proot.clone(),
            ..RuntimeArgs::default()
        }
        .proot_options()
        .expect("options");
        assert_eq!(with_bin.binary, PathBuf::from("/flag/proot"));
        assert_eq!(
            images(&with_bin),
            ["alpine=/file/alpine", "busybox=/file/busybox"]
        );
        let bad = RuntimeArgs {
            proot_images: vec!["busybox".into()],
            ..RuntimeArgs::default()
        };
        assert!(matches!(bad.proot_options(), Err(CliError::Usage(_))));
    }
}
