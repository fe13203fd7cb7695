//! The mock runtime: every sandbox is a host directory and its commands are
//! ordinary host processes.
//!
//! Owns: the on-disk layout of a host-directory sandbox, its keeper process
//! (the sandbox's "main process"), its log, the chaos evidence log, and the
//! host file operations ([`files`]) that the Docker runtimes share. The PRoot
//! runtime ([`crate::proot`]) is this same runtime with its commands run
//! under `proot` in an image's root filesystem (`Jail::Proot`).
//!
//! Layout, one directory per sandbox under the state directory:
//!
//! ```text
//! <state_dir>/<sandbox_id>/
//!     meta.json     sandbox_id, image, labels, generation, env, keeper_pid, keeperless, created_at
//!     sandbox.log   lines the runtime appends: started, one per exec, stopped
//!     stopped       marker: the stop's evidence is written
//!     root/         the sandbox filesystem; root/workspace is /workspace
//! ```
//!
//! Everything the runtime knows lives in that directory, so a new
//! [`MockRuntime`] on the same state directory (a restarted worker) adopts
//! every sandbox through [`Runtime::list`].
//!
//! The keeper is `sh -c 'while :; do sleep 3600; done' stacyvm-mock-keeper <id>`
//! in its own process group: a sandbox is Running while that exact process is
//! alive (its `/proc/<pid>/cmdline` names the sandbox, which detects pid reuse).
//!
//! Lite sandboxes: when `STACYVM_MOCK_KEEPER` is `0` (read once, in
//! [`MockRuntime::new`]; or [`MockOptions::keeper`] = `false`), a spawn starts
//! no keeper and records `keeperless: true` (and `keeper_pid: 0`) in
//! `meta.json`. Such a sandbox is Running while its directory and metadata
//! exist and no stop was recorded; it stops only when destroyed. Execs and
//! file operations work as usual (execs are real host processes). The choice
//! is recorded per sandbox, so a runtime restarted with the other setting
//! still judges every sandbox it adopts correctly. Meant for load tests that
//! need many live sandboxes without two host processes each; the default
//! (any other value, or unset) keeps the keeper.
//!
//! **The mock is not a security boundary.** Commands run as the host user with
//! the host's filesystem and network; only their working directory is inside
//! the sandbox. The file APIs are confined to `root/` through [`confine`];
//! `exec` is not jailed. Use it for tests and development only.
//!
//! Evidence log: when `STACYVM_MOCK_EVENT_LOG` names a file (read once, in
//! [`MockRuntime::new`]), one JSON line is appended per sandbox start and stop:
//! `{"event":"start"|"stop","sandbox_id":…,"worker_id":…,"generation":…,"mono_ns":…,"pid":…}`.
//! A start is written before the keeper starts and a stop after it is known
//! dead, so each start..stop interval covers the sandbox's real lifetime. A
//! stop is written at least once: a worker killed between writing it and
//! marking it written writes it again after its restart.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::process::{self, OUTPUT_CAP};
use crate::{
    ByteReader, ExecChunk, ExecMode, ExecOutput, ExecSpec, FileInfo, Runtime, RuntimeError,
    RuntimeSandbox, RuntimeState, SpawnSpec, WORKSPACE, confine, shell_line,
};

/// The `argv[0]` of every keeper's script; `/proc/<pid>/cmdline` carries it.
pub const KEEPER_TAG: &str = "stacyvm-mock-keeper";

/// Environment variable naming the evidence log read by [`MockRuntime::new`].
pub const EVENT_LOG_ENV: &str = "STACYVM_MOCK_EVENT_LOG";

/// Environment variable read by [`MockRuntime::new`]: `0` starts sandboxes
/// without a keeper process (lite sandboxes, see the module docs).
pub const KEEPER_ENV: &str = "STACYVM_MOCK_KEEPER";

/// `PATH` of every command run in a mock sandbox.
pub const SANDBOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const KEEPER_SCRIPT: &str = "while :; do sleep 3600; done";
const META: &str = "meta.json";
const LOG: &str = "sandbox.log";
const STOPPED: &str = "stopped";
/// How long (in 10 ms steps) a destroy waits for a spawn of the same
/// sandbox in progress in this process: 30 s.
const SPAWN_WAIT_STEPS: u32 = 3_000;
const ROOT: &str = "root";
const MAX_ID_LEN: usize = 128;

/// Sandboxes as host directories and host processes. See the module docs.
#[derive(Debug, Clone)]
pub struct MockRuntime {
    state_dir: PathBuf,
    event_log: Option<PathBuf>,
    keeper: bool,
    jail: Jail,
    /// Sandboxes this instance is starting right now: their metadata may
    /// still name no keeper. Any other sandbox without a keeper PID was
    /// being started by a worker that died mid-spawn (see `observe`).
    spawning: Arc<Mutex<HashSet<String>>>,
}

/// How a host-directory sandbox runs its commands.
#[derive(Debug, Clone)]
pub(crate) enum Jail {
    /// Plain host processes: the mock.
    Host,
    /// Under PRoot, in the image's root filesystem (see [`crate::proot`]).
    Proot(crate::proot::ProotOptions),
}

/// How a [`MockRuntime`] behaves; [`MockOptions::default`] is an evidence log
/// off and the keeper on, [`MockOptions::from_env`] what [`MockRuntime::new`] uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockOptions {
    /// Append one JSON line per sandbox start and stop to this file.
    pub event_log: Option<PathBuf>,
    /// Start a keeper process per sandbox (`false`: lite sandboxes, Running
    /// while their directory exists).
    pub keeper: bool,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            event_log: None,
            keeper: true,
        }
    }
}

impl MockOptions {
    /// `STACYVM_MOCK_EVENT_LOG` (a non-empty path) and `STACYVM_MOCK_KEEPER`
    /// (`0` turns the keeper off; anything else, or unset, keeps it).
    pub fn from_env() -> Self {
        MockOptions {
            event_log: std::env::var_os(EVENT_LOG_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            keeper: !matches!(std::env::var(KEEPER_ENV), Ok(v) if v.trim() == "0"),
        }
    }
}

/// What `meta.json` holds. Fields are only ever added, with defaults, so a
/// newer worker adopts sandboxes an older one started.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    sandbox_id: String,
    image: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    generation: i64,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    memory_mb: i64,
    #[serde(default)]
    vcpus: i64,
    keeper_pid: u32,
    /// Started without a keeper: Running until destroyed (older metadata
    /// lacks the field, and always had a keeper).
    #[serde(default)]
    keeperless: bool,
    created_at: String,
}

impl MockRuntime {
    /// A mock runtime keeping its sandboxes under `state_dir` (created if
    /// missing), with the evidence log named by `STACYVM_MOCK_EVENT_LOG` and
    /// the keeper turned off when `STACYVM_MOCK_KEEPER` is `0`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Result<Self, RuntimeError> {
        Self::with_options(state_dir, MockOptions::from_env())
    }

    /// Like [`new`](Self::new), with the evidence log given explicitly
    /// (`None`: no evidence log) and the keeper on, whatever the environment says.
    pub fn with_event_log(
        state_dir: impl Into<PathBuf>,
        event_log: Option<PathBuf>,
    ) -> Result<Self, RuntimeError> {
        Self::with_options(
            state_dir,
            MockOptions {
                event_log,
                ..MockOptions::default()
            },
        )
    }

    /// Like [`new`](Self::new), with every option given explicitly instead
    /// of read from the environment.
    pub fn with_options(
        state_dir: impl Into<PathBuf>,
        options: MockOptions,
    ) -> Result<Self, RuntimeError> {
        let MockOptions { event_log, keeper } = options;
        let state_dir = std::path::absolute(state_dir.into())
            .map_err(|e| RuntimeError::Internal(format!("mock state directory: {e}")))?;
        std::fs::create_dir_all(&state_dir).map_err(|e| {
            RuntimeError::Unavailable(format!(
                "cannot create mock state directory {}: {e}",
                state_dir.display()
            ))
        })?;
        Ok(MockRuntime {
            state_dir,
            event_log,
            keeper,
            jail: Jail::Host,
            spawning: Arc::default(),
        })
    }

    /// The same runtime running its commands in `jail`.
    pub(crate) fn jailed(mut self, jail: Jail) -> Self {
        self.jail = jail;
        self
    }

    /// The directory holding every sandbox.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The host directory of one sandbox (which may not exist).
    pub fn sandbox_dir(&self, sandbox_id: &str) -> PathBuf {
        self.state_dir.join(sandbox_id)
    }

    /// The host directory that is `/` inside the sandbox.
    fn root_of(dir: &Path) -> PathBuf {
        dir.join(ROOT)
    }

    /// The sandbox's directory and metadata; `NotFound` when either is gone.
    fn load(&self, sandbox_id: &str) -> Result<(PathBuf, Meta), RuntimeError> {
        validate_id(sandbox_id)?;
        let dir = self.sandbox_dir(sandbox_id);
        let meta = read_meta(&dir)?;
        Ok((dir, meta))
    }

    /// Running or Stopped, recording the stop the first time it is seen. A
    /// keeperless sandbox runs until its stop is recorded (by destroy).
    fn observe(&self, dir: &Path, meta: &Meta) -> RuntimeState {
        if meta.keeperless {
            return if dir.join(STOPPED).exists() {
                RuntimeState::Stopped
            } else {
                RuntimeState::Running
            };
        }
        if meta.keeper_pid == 0 {
            if lk(&self.spawning).contains(&meta.sandbox_id) {
                return RuntimeState::Running;
            }
            // Its worker died between recording the start and recording
            // the keeper: the keeper may run unrecorded. Find it (and any
            // child) by the sandbox root in its environment and stop it.
            process::kill_pids(&pids_with_root(&Self::root_of(dir)));
            self.record_stop(dir, meta);
            return RuntimeState::Stopped;
        }
        if keeper_alive(meta.keeper_pid, &meta.sandbox_id) {
            RuntimeState::Running
        } else {
            self.record_stop(dir, meta);
            RuntimeState::Stopped
        }
    }

    /// Writes the stop (log line and evidence event) at least once per
    /// sandbox: the `stopped` marker is created only after the evidence is
    /// written, so a worker killed in between, or an evidence log that
    /// could not be written, leaves the stop to be written again by the
    /// next observer. (Marking first lost the stop for good when the worker
    /// died between the two; the evidence checker ignores a repeated stop.)
    fn record_stop(&self, dir: &Path, meta: &Meta) {
        if dir.join(STOPPED).exists() {
            tracing::debug!(sandbox = %meta.sandbox_id, "stop already recorded");
            return;
        }
        append_log(dir, "stopped");
        if !self.event("stop", meta) {
            return;
        }
        if let Err(e) = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(STOPPED))
        {
            tracing::debug!(sandbox = %meta.sandbox_id, error = %e, "cannot mark the stop recorded");
        }
    }

    /// Appends one evidence line; `false` only when a configured evidence
    /// log could not be written.
    fn event(&self, event: &str, meta: &Meta) -> bool {
        let Some(path) = &self.event_log else {
            return true;
        };
        let line = serde_json::json!({
            "event": event,
            "sandbox_id": meta.sandbox_id,
            "worker_id": meta.labels.get("worker_id").map(String::as_str).unwrap_or(""),
            "generation": meta.generation,
            "mono_ns": crate::sys::monotonic_ns(),
            "pid": std::process::id(),
        });
        match append_line(path, &line.to_string()) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "cannot write mock event log");
                false
            }
        }
    }

    fn describe(&self, dir: &Path, meta: &Meta, state: RuntimeState) -> RuntimeSandbox {
        RuntimeSandbox {
            sandbox_id: meta.sandbox_id.clone(),
            runtime_id: dir.display().to_string(),
            state,
            image: meta.image.clone(),
            labels: meta.labels.clone(),
            generation: meta.generation,
        }
    }

    /// The sandbox's root directory, for file operations on `path` (any
    /// state). A jailed sandbox's root filesystem is its image's: only
    /// `/workspace` is the sandbox's own.
    fn files_root(&self, sandbox_id: &str, path: &str) -> Result<PathBuf, RuntimeError> {
        if let Jail::Proot(_) = self.jail {
            crate::docker::workspace_only(path)?;
        }
        let (dir, _) = self.load(sandbox_id)?;
        Ok(Self::root_of(&dir))
    }

    /// Checks the sandbox runs and builds the host command for `spec`.
    fn prepare_exec(
        &self,
        sandbox_id: &str,
        spec: &ExecSpec,
    ) -> Result<tokio::process::Command, RuntimeError> {
        let (dir, meta) = self.load(sandbox_id)?;
        if self.observe(&dir, &meta) != RuntimeState::Running {
            return Err(RuntimeError::Invalid("sandbox is not running".into()));
        }
        if spec.command.trim().is_empty() {
            return Err(RuntimeError::Invalid("empty command".into()));
        }
        let root = Self::root_of(&dir);
        let workdir = spec.workdir.as_deref().unwrap_or(WORKSPACE);
        let cwd = confine(&root, workdir)?;
        match std::fs::metadata(&cwd) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(RuntimeError::InvalidPath {
                    path: workdir.to_string(),
                    reason: "not a directory".into(),
                });
            }
            Err(e) => return Err(files::fs_err(workdir, e)),
        }

        let mut env = BTreeMap::from([
            ("PATH".to_string(), SANDBOX_PATH.to_string()),
            (
                "HOME".to_string(),
                root.join("workspace").display().to_string(),
            ),
            ("SANDBOX_ID".to_string(), meta.sandbox_id.clone()),
            (
                "STACYVM_SANDBOX_ROOT".to_string(),
                root.display().to_string(),
            ),
        ]);
        env.extend(meta.env.clone());
        env.extend(spec.env.clone());

        if let Jail::Proot(p) = &self.jail {
            append_log(
                &dir,
                &format!("exec {:?} {:?} {:?}", spec.mode, spec.command, spec.args),
            );
            let workdir = crate::sandbox_path(&root, &cwd);
            let mut cmd = p.command(&meta.image, &root.join("workspace"), &workdir, spec)?;
            if !meta.env.contains_key("HOME") && !spec.env.contains_key("HOME") {
                env.insert("HOME".into(), WORKSPACE.into());
            }
            cmd.env_clear()
                .envs(env)
                .current_dir(root.join("workspace"));
            return Ok(cmd);
        }
        let mut cmd = match spec.mode {
            ExecMode::Shell => {
                let line = shell_line(&spec.command, &spec.args);
                append_log(&dir, &format!("exec sh -c {line:?}"));
                let mut cmd = tokio::process::Command::new("sh");
                cmd.arg("-c").arg(line);
                cmd
            }
            ExecMode::Argv => {
                append_log(
                    &dir,
                    &format!("exec argv {:?} {:?}", spec.command, spec.args),
                );
                let mut cmd = tokio::process::Command::new(&spec.command);
                cmd.args(&spec.args);
                cmd
            }
        };
        cmd.env_clear().envs(env).current_dir(cwd);
        Ok(cmd)
    }
}

#[async_trait]
impl Runtime for MockRuntime {
    fn name(&self) -> &str {
        match self.jail {
            Jail::Host => "mock",
            Jail::Proot(_) => "proot",
        }
    }

    async fn health(&self) -> Result<(), RuntimeError> {
        match std::fs::metadata(&self.state_dir) {
            Ok(m) if m.is_dir() => {}
            _ => {
                return Err(RuntimeError::Unavailable(format!(
                    "mock state directory {} is missing",
                    self.state_dir.display()
                )));
            }
        }
        // Liveness checks read /proc; without it every sandbox would look stopped.
        if std::fs::metadata("/proc/self/stat").is_err() {
            return Err(RuntimeError::Unavailable("/proc is not mounted".into()));
        }
        if let Jail::Proot(p) = &self.jail {
            p.health().await?;
        }
        Ok(())
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<RuntimeSandbox, RuntimeError> {
        validate_id(&spec.sandbox_id)?;
        if spec.image.trim().is_empty() {
            return Err(RuntimeError::Invalid("image is empty".into()));
        }
        if let Jail::Proot(p) = &self.jail {
            p.rootfs(&spec.image)?;
        }
        let id = spec.sandbox_id.as_str();
        let dir = self.sandbox_dir(id);
        // In the set of spawns in progress before the directory exists (a
        // destroy that sees the directory waits for the spawn), and until
        // the spawn is over, however it ends (even cancelled).
        let Some(_spawning) = Spawning::enter(&self.spawning, id) else {
            return Err(RuntimeError::AlreadyExists(format!("sandbox {id}")));
        };
        // `create_dir` (not `_all`) is the atomic claim on the id.
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(RuntimeError::AlreadyExists(format!("sandbox {id}")));
            }
            Err(e) => {
                return Err(RuntimeError::Internal(format!(
                    "creating sandbox {id}: {e}"
                )));
            }
        }
        match self.start(&dir, spec).await {
            Ok(sandbox) => Ok(sandbox),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    async fn status(&self, sandbox_id: &str) -> Result<RuntimeSandbox, RuntimeError> {
        let (dir, meta) = self.load(sandbox_id)?;
        let state = self.observe(&dir, &meta);
        Ok(self.describe(&dir, &meta, state))
    }

    async fn list(&self) -> Result<Vec<RuntimeSandbox>, RuntimeError> {
        let entries = std::fs::read_dir(&self.state_dir)
            .map_err(|e| RuntimeError::Internal(format!("listing mock sandboxes: {e}")))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let dir = entry.path();
            // A directory without metadata is a spawn or destroy in progress.
            let Ok(meta) = read_meta(&dir) else {
                continue;
            };
            let state = self.observe(&dir, &meta);
            out.push(self.describe(&dir, &meta, state));
        }
        out.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
        Ok(out)
    }

    async fn destroy(&self, sandbox_id: &str) -> Result<(), RuntimeError> {
        validate_id(sandbox_id)?;
        // A destroy that overtakes its own spawn (the caller gave up on a
        // slow spawn) waits for it: stopping a half-started sandbox could
        // miss the keeper it is about to start and leave it running.
        for _ in 0..SPAWN_WAIT_STEPS {
            if !lk(&self.spawning).contains(sandbox_id) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let dir = self.sandbox_dir(sandbox_id);
        if std::fs::symlink_metadata(&dir).is_err() {
            return Err(RuntimeError::NotFound(format!("sandbox {sandbox_id}")));
        }
        let meta = match read_meta(&dir) {
            Ok(m) => Some(m),
            Err(e) => {
                // Its stop cannot reach the evidence log without metadata.
                tracing::warn!(sandbox = sandbox_id, error = %e, "destroying a mock sandbox without readable metadata");
                None
            }
        };
        if let Some(meta) = &meta
            && keeper_alive(meta.keeper_pid, sandbox_id)
        {
            process::kill_group(meta.keeper_pid);
        }
        // Execs run in groups of their own; they carry the sandbox root in
        // their environment, which finds them even after a worker restart.
        let root = Self::root_of(&dir);
        process::kill_pids(&pids_with_root(&root));
        if let Some(meta) = &meta {
            wait_keeper_gone(meta).await;
            self.record_stop(&dir, meta);
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(RuntimeError::NotFound(format!("sandbox {sandbox_id}")))
            }
            Err(e) => Err(RuntimeError::Internal(format!(
                "removing sandbox {sandbox_id}: {e}"
            ))),
        }
    }

    async fn exec(&self, sandbox_id: &str, spec: &ExecSpec) -> Result<ExecOutput, RuntimeError> {
        let cmd = self.prepare_exec(sandbox_id, spec)?;
        process::run_to_end(cmd, spec.timeout, OUTPUT_CAP).await
    }

    async fn exec_stream(
        &self,
        sandbox_id: &str,
        spec: &ExecSpec,
    ) -> Result<mpsc::Receiver<ExecChunk>, RuntimeError> {
        let cmd = self.prepare_exec(sandbox_id, spec)?;
        process::run_streaming(cmd, spec.timeout)
    }

    async fn write_file(
        &self,
        sandbox_id: &str,
        path: &str,
        mode: u32,
        body: ByteReader,
    ) -> Result<u64, RuntimeError> {
        files::write(&self.files_root(sandbox_id, path)?, path, mode, body).await
    }

    async fn read_file(
        &self,
        sandbox_id: &str,
        path: &str,
    ) -> Result<(u64, ByteReader), RuntimeError> {
        files::read(&self.files_root(sandbox_id, path)?, path).await
    }

    async fn list_files(
        &self,
        sandbox_id: &str,
        path: &str,
    ) -> Result<Vec<FileInfo>, RuntimeError> {
        let root = self.files_root(sandbox_id, path)?;
        let path = path.to_string();
        files::blocking(move || files::list(&root, &path)).await
    }

    async fn stat(&self, sandbox_id: &str, path: &str) -> Result<FileInfo, RuntimeError> {
        files::stat(&self.files_root(sandbox_id, path)?, path)
    }

    async fn glob(&self, sandbox_id: &str, pattern: &str) -> Result<Vec<String>, RuntimeError> {
        let root = self.files_root(sandbox_id, pattern)?;
        let pattern = pattern.to_string();
        files::blocking(move || files::glob(&root, &pattern)).await
    }

    async fn rename(&self, sandbox_id: &str, from: &str, to: &str) -> Result<(), RuntimeError> {
        files::rename(
            &self
                .files_root(sandbox_id, to)
                .and(self.files_root(sandbox_id, from))?,
            from,
            to,
        )
    }

    async fn chmod(&self, sandbox_id: &str, path: &str, mode: u32) -> Result<(), RuntimeError> {
        files::chmod(&self.files_root(sandbox_id, path)?, path, mode)
    }

    async fn remove(
        &self,
        sandbox_id: &str,
        path: &str,
        recursive: bool,
    ) -> Result<(), RuntimeError> {
        let root = self.files_root(sandbox_id, path)?;
        let path = path.to_string();
        files::blocking(move || files::remove(&root, &path, recursive)).await
    }

    async fn logs(&self, sandbox_id: &str, lines: usize) -> Result<Vec<String>, RuntimeError> {
        let (dir, _) = self.load(sandbox_id)?;
        let text = match std::fs::read_to_string(dir.join(LOG)) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(RuntimeError::Internal(format!("reading sandbox log: {e}"))),
        };
        let all: Vec<&str> = text.lines().collect();
        let skip = all.len().saturating_sub(lines);
        Ok(all[skip..].iter().map(|l| l.to_string()).collect())
    }
}

impl MockRuntime {
    /// Everything of a spawn after the directory is claimed; the caller
    /// removes the directory if this fails.
    async fn start(&self, dir: &Path, spec: &SpawnSpec) -> Result<RuntimeSandbox, RuntimeError> {
        let id = spec.sandbox_id.as_str();
        let root = Self::root_of(dir);
        let workspace = root.join("workspace");
        std::fs::create_dir_all(&workspace)
            .map_err(|e| RuntimeError::Internal(format!("creating sandbox root: {e}")))?;

        let mut meta = Meta {
            sandbox_id: id.to_string(),
            image: spec.image.clone(),
            labels: spec.labels.clone(),
            generation: spec.generation,
            env: spec.env.clone(),
            memory_mb: spec.memory_mb,
            vcpus: spec.vcpus,
            keeper_pid: 0,
            keeperless: !self.keeper,
            created_at: rfc3339(SystemTime::now()),
        };
        // Metadata first (no keeper yet), so a worker that dies from here on
        // leaves a sandbox its successor finds, stops and reports (`observe`);
        // then the start is evidence before the keeper exists, so the
        // recorded interval never starts after the sandbox did.
        write_meta(dir, &meta)?;
        self.event("start", &meta);
        if meta.keeperless {
            // Running from the moment its metadata (already final) exists.
            append_log(dir, &format!("started image={} (no keeper)", meta.image));
            return Ok(self.describe(dir, &meta, RuntimeState::Running));
        }
        let keeper = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(KEEPER_SCRIPT)
            .arg(KEEPER_TAG)
            .arg(id)
            .env_clear()
            .env("PATH", SANDBOX_PATH)
            .env("SANDBOX_ID", id)
            .env("STACYVM_SANDBOX_ROOT", &root)
            .current_dir(&workspace)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(false)
            .spawn();
        let mut keeper = match keeper {
            Ok(child) => child,
            Err(e) => {
                self.event("stop", &meta);
                return Err(RuntimeError::Unavailable(format!(
                    "cannot start the keeper process: {e}"
                )));
            }
        };
        let Some(pid) = keeper.id() else {
            self.event("stop", &meta);
            return Err(RuntimeError::Internal("keeper has no pid".into()));
        };
        // Reap the keeper whenever it dies so it never lingers as a zombie
        // (after a worker restart, init reaps it instead).
        tokio::spawn(async move {
            let _ = keeper.wait().await;
        });
        meta.keeper_pid = pid;

        if let Err(e) = write_meta(dir, &meta) {
            process::kill_group(pid);
            self.event("stop", &meta);
            return Err(e);
        }
        append_log(dir, &format!("started image={}", meta.image));
        Ok(self.describe(dir, &meta, RuntimeState::Running))
    }
}

pub(crate) fn validate_id(id: &str) -> Result<(), RuntimeError> {
    if id.is_empty() {
        return Err(RuntimeError::Invalid("sandbox id is empty".into()));
    }
    if id.len() > MAX_ID_LEN {
        return Err(RuntimeError::Invalid(format!(
            "sandbox id is longer than {MAX_ID_LEN} bytes"
        )));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        || id == "."
        || id == ".."
    {
        return Err(RuntimeError::Invalid(format!(
            "sandbox id {id:?} may only hold A-Z a-z 0-9 . _ -"
        )));
    }
    Ok(())
}

fn read_meta(dir: &Path) -> Result<Meta, RuntimeError> {
    let id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bytes = match std::fs::read(dir.join(META)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RuntimeError::NotFound(format!("sandbox {id}")));
        }
        Err(e) => {
            return Err(RuntimeError::Internal(format!(
                "reading {id} metadata: {e}"
            )));
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| RuntimeError::Internal(format!("corrupt metadata of sandbox {id}: {e}")))
}

/// Writes `meta.json` through a temp file and a rename: readers see the old
/// or the new file, never half of one.
fn write_meta(dir: &Path, meta: &Meta) -> Result<(), RuntimeError> {
    let fail = |e: &dyn std::fmt::Display| RuntimeError::Internal(format!("writing metadata: {e}"));
    let body = serde_json::to_vec_pretty(meta).map_err(|e| fail(&e))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".meta-")
        .tempfile_in(dir)
        .map_err(|e| fail(&e))?;
    tmp.write_all(&body).map_err(|e| fail(&e))?;
    tmp.persist(dir.join(META)).map_err(|e| fail(&e.error))?;
    Ok(())
}

/// Appends one timestamped line to the sandbox's log; failures are logged
/// and otherwise ignored (the log is informational).
fn append_log(dir: &Path, text: &str) {
    let line = format!(
        "{} {}",
        rfc3339(SystemTime::now()),
        text.replace('\n', "\\n")
    );
    if let Err(e) = append_line(&dir.join(LOG), &line) {
        tracing::debug!(error = %e, dir = %dir.display(), "cannot append to sandbox log");
    }
}

/// One `write` of `line` + newline to a file opened with `O_APPEND`, so
/// concurrent writers (other workers on the same host) never interleave.
fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(&buf)
}

/// Membership of one sandbox in the set of spawns in progress, for as long
/// as the guard lives.
struct Spawning<'a> {
    set: &'a Mutex<HashSet<String>>,
    id: &'a str,
}

impl<'a> Spawning<'a> {
    /// `None` when a spawn of `id` is already in progress.
    fn enter(set: &'a Mutex<HashSet<String>>, id: &'a str) -> Option<Self> {
        lk(set)
            .insert(id.to_string())
            .then_some(Spawning { set, id })
    }
}

impl Drop for Spawning<'_> {
    fn drop(&mut self) {
        lk(self.set).remove(self.id);
    }
}

/// A poisoned lock still guards a plain set: take it.
fn lk<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Is `pid` this sandbox's keeper, alive (not a zombie)? The command line
/// check makes a reused pid count as dead.
fn keeper_alive(pid: u32, sandbox_id: &str) -> bool {
    if pid <= 1 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the last `)`: the command name may itself hold `)`.
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    if matches!(state, None | Some('Z' | 'X' | 'x')) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == KEEPER_TAG.as_bytes() && w[1] == sandbox_id.as_bytes())
}

/// After a kill, waits (briefly, bounded) for the keeper to be gone so the
/// stop evidence is written after the sandbox really stopped.
async fn wait_keeper_gone(meta: &Meta) {
    for _ in 0..100 {
        if !keeper_alive(meta.keeper_pid, &meta.sandbox_id) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tracing::warn!(
        sandbox_id = %meta.sandbox_id,
        pid = meta.keeper_pid,
        "mock keeper still alive 2 s after SIGKILL"
    );
}

/// Processes whose environment names `root` as their sandbox root: every
/// exec of the sandbox and its descendants (unless they rewrote their
/// environment; the mock is not a jail).
fn pids_with_root(root: &Path) -> Vec<u32> {
    let mut needle = b"STACYVM_SANDBOX_ROOT=".to_vec();
    needle.extend_from_slice(root.as_os_str().as_bytes());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(environ) = std::fs::read(entry.path().join("environ"))
            && environ.split(|b| *b == 0).any(|v| v == needle.as_slice())
        {
            pids.push(pid);
        }
    }
    pids
}

/// RFC 3339 in UTC with whole seconds (`2024-05-01T12:00:00Z`); times
/// before 1970 are clamped to the epoch.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// File operations on a sandbox whose filesystem is a host directory (`root`).
/// Every in-sandbox path goes through [`confine`]; errors use the caller's
/// in-sandbox path, never the host path.
pub(crate) mod files {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use tokio::io::AsyncWriteExt;

    use super::rfc3339;
    use crate::{ByteReader, FileInfo, RuntimeError, WORKSPACE, confine, sandbox_path};

    /// Most matches a glob returns: a pattern like `/**` must not walk forever.
    const GLOB_LIMIT: usize = 100_000;

    /// Runs blocking filesystem work off the async threads.
    pub(crate) async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> Result<T, RuntimeError> + Send + 'static,
    ) -> Result<T, RuntimeError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| RuntimeError::Internal(format!("file task failed: {e}")))?
    }

    /// Maps an I/O error on in-sandbox `path` to the runtime's error codes.
    pub(crate) fn fs_err(path: &str, e: std::io::Error) -> RuntimeError {
        use std::io::ErrorKind as K;
        let invalid_path = |reason: &str| RuntimeError::InvalidPath {
            path: path.to_string(),
            reason: reason.to_string(),
        };
        match e.kind() {
            K::NotFound => RuntimeError::NotFound(path.to_string()),
            K::NotADirectory => invalid_path("a parent is not a directory"),
            K::IsADirectory => invalid_path("is a directory"),
            K::DirectoryNotEmpty => RuntimeError::Invalid(format!(
                "{path} is a directory that is not empty (remove it recursively)"
            )),
            K::PermissionDenied => RuntimeError::Invalid(format!("{path}: permission denied")),
            K::AlreadyExists => RuntimeError::AlreadyExists(path.to_string()),
            K::StorageFull | K::QuotaExceeded | K::FileTooLarge => {
                RuntimeError::NoSpace(format!("{path}: {e}"))
            }
            _ => RuntimeError::Internal(format!("{path}: {e}")),
        }
    }

    fn mode_bits(meta: &std::fs::Metadata) -> u32 {
        meta.permissions().mode() & 0o7777
    }

    fn info(root: &Path, host: &Path, meta: &std::fs::Metadata) -> FileInfo {
        FileInfo {
            path: sandbox_path(root, host),
            size: meta.len(),
            mode: mode_bits(meta),
            is_dir: meta.is_dir(),
            mod_time: meta
                .modified()
                .map(rfc3339)
                .unwrap_or_else(|_| rfc3339(std::time::UNIX_EPOCH)),
        }
    }

    /// Refuses operations on `/` and `/workspace` themselves.
    fn refuse_top(root: &Path, host: &Path, path: &str, what: &str) -> Result<(), RuntimeError> {
        if host == root || host == root.join(WORKSPACE.trim_start_matches('/')) {
            return Err(RuntimeError::Invalid(format!("cannot {what} {path}")));
        }
        Ok(())
    }

    /// Streams `body` into a temp file next to `path`, sets its mode (`0`
    /// means `0o644`) and renames it into place: readers never see half a
    /// file, and a symlink at `path` is replaced rather than followed.
    pub(crate) async fn write(
        root: &Path,
        path: &str,
        mode: u32,
        body: ByteReader,
    ) -> Result<u64, RuntimeError> {
        let host = confine(root, path)?;
        refuse_top(root, &host, path, "overwrite")?;
        let mode = if mode == 0 { 0o644 } else { mode & 0o7777 };
        let parent = host
            .parent()
            .ok_or_else(|| RuntimeError::InvalidPath {
                path: path.to_string(),
                reason: "has no parent directory".into(),
            })?
            .to_path_buf();
        let (file, tmp_path) = {
            let (path, parent) = (path.to_string(), parent.clone());
            blocking(move || {
                std::fs::create_dir_all(&parent).map_err(|e| fs_err(&path, e))?;
                let tmp = tempfile::Builder::new()
                    .prefix(".stacyvm-write-")
                    .tempfile_in(&parent)
                    .map_err(|e| fs_err(&path, e))?;
                Ok(tmp.into_parts())
            })
            .await?
        };
        let mut file = tokio::fs::File::from_std(file);
        let mut body = tokio::io::BufReader::with_capacity(1 << 20, body);
        // On any failure the temporary file is removed (TempPath's drop):
        // a full disk leaves no partial file behind.
        let written = tokio::io::copy_buf(&mut body, &mut file)
            .await
            .map_err(|e| fs_err(path, e))?;
        file.flush().await.map_err(|e| fs_err(path, e))?;
        file.sync_all().await.map_err(|e| fs_err(path, e))?;
        drop(file);
        // Check again right before the rename: a symlink may have appeared.
        let host = confine(root, path)?;
        if std::fs::metadata(&host).is_ok_and(|m| m.is_dir()) {
            return Err(RuntimeError::InvalidPath {
                path: path.to_string(),
                reason: "is a directory".into(),
            });
        }
        std::fs::set_permissions(&tmp_path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| fs_err(path, e))?;
        tmp_path.persist(&host).map_err(|e| fs_err(path, e.error))?;
        Ok(written)
    }

    pub(crate) async fn read(root: &Path, path: &str) -> Result<(u64, ByteReader), RuntimeError> {
        let host = confine(root, path)?;
        let file = tokio::fs::File::open(&host)
            .await
            .map_err(|e| fs_err(path, e))?;
        let meta = file.metadata().await.map_err(|e| fs_err(path, e))?;
        if meta.is_dir() {
            return Err(RuntimeError::InvalidPath {
                path: path.to_string(),
                reason: "is a directory".into(),
            });
        }
        Ok((meta.len(), Box::pin(file)))
    }

    /// Entries of a directory (symlinks described as links, not followed),
    /// sorted by path.
    pub(crate) fn list(root: &Path, path: &str) -> Result<Vec<FileInfo>, RuntimeError> {
        let host = confine(root, path)?;
        let meta = std::fs::metadata(&host).map_err(|e| fs_err(path, e))?;
        if !meta.is_dir() {
            return Err(RuntimeError::Invalid(format!("{path} is not a directory")));
        }
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&host).map_err(|e| fs_err(path, e))? {
            let entry = entry.map_err(|e| fs_err(path, e))?;
            // An entry removed between readdir and lstat is simply skipped.
            if let Ok(meta) = std::fs::symlink_metadata(entry.path()) {
                out.push(info(root, &entry.path(), &meta));
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    pub(crate) fn stat(root: &Path, path: &str) -> Result<FileInfo, RuntimeError> {
        let host = confine(root, path)?;
        // Follows symlinks (confine checked they stay inside); a dangling
        // link is described as itself.
        let meta = std::fs::metadata(&host)
            .or_else(|_| std::fs::symlink_metadata(&host))
            .map_err(|e| fs_err(path, e))?;
        Ok(info(root, &host, &meta))
    }

    /// Matches `pattern` (confined like a path; `*` does not cross `/`) and
    /// drops every match whose real path is outside the sandbox.
    pub(crate) fn glob(root: &Path, pattern: &str) -> Result<Vec<String>, RuntimeError> {
        let host = confine(root, pattern)?;
        let rel = host
            .strip_prefix(root)
            .map_err(|_| RuntimeError::Internal("confined pattern left the root".into()))?;
        let (Some(root_str), Some(rel_str)) = (root.to_str(), rel.to_str()) else {
            return Err(RuntimeError::Invalid(
                "glob needs UTF-8 paths on this runtime".into(),
            ));
        };
        // The root is matched literally, whatever characters its host path holds.
        let full = format!("{}/{}", glob::Pattern::escape(root_str), rel_str);
        let root_real = std::fs::canonicalize(root).map_err(|e| fs_err("/", e))?;
        let options = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        let matches = glob::glob_with(&full, options)
            .map_err(|e| RuntimeError::Invalid(format!("bad glob pattern {pattern:?}: {e}")))?;
        let mut out = Vec::new();
        for found in matches.flatten() {
            if out.len() >= GLOB_LIMIT {
                return Err(RuntimeError::Invalid(format!(
                    "glob {pattern:?} matches more than {GLOB_LIMIT} paths"
                )));
            }
            if std::fs::canonicalize(&found).is_ok_and(|real| real.starts_with(&root_real)) {
                out.push(sandbox_path(root, &found));
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Renames `from` to `to` (parents of `to` created); both confined.
    pub(crate) fn rename(root: &Path, from: &str, to: &str) -> Result<(), RuntimeError> {
        let src = confine(root, from)?;
        let dst = confine(root, to)?;
        refuse_top(root, &src, from, "rename")?;
        refuse_top(root, &dst, to, "replace")?;
        std::fs::symlink_metadata(&src).map_err(|e| fs_err(from, e))?;
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(|e| fs_err(to, e))?;
        }
        std::fs::rename(&src, &dst).map_err(|e| fs_err(to, e))
    }

    pub(crate) fn chmod(root: &Path, path: &str, mode: u32) -> Result<(), RuntimeError> {
        let host = confine(root, path)?;
        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(mode & 0o7777))
            .map_err(|e| fs_err(path, e))
    }

    /// Removes a file or symlink, an empty directory, or (with `recursive`)
    /// a whole tree. `/` and `/workspace` themselves are refused.
    pub(crate) fn remove(root: &Path, path: &str, recursive: bool) -> Result<(), RuntimeError> {
        let host = confine(root, path)?;
        refuse_top(root, &host, path, "remove")?;
        let meta = std::fs::symlink_metadata(&host).map_err(|e| fs_err(path, e))?;
        let result = if !meta.is_dir() {
            std::fs::remove_file(&host)
        } else if recursive {
            std::fs::remove_dir_all(&host)
        } else {
            std::fs::remove_dir(&host)
        };
        result.map_err(|e| fs_err(path, e))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        let at = |s: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(at(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn sandbox_ids() {
        for ok in ["sb-1", "a.b_c-D", &"x".repeat(128)] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "../x", "a b", "é", &"x".repeat(129)] {
            assert!(
                matches!(validate_id(bad), Err(RuntimeError::Invalid(_))),
                "{bad}"
            );
        }
    }
}
