//! The Firecracker runtime: one microVM per sandbox, driven through the
//! real `firecracker` binary's API socket, with commands and files going
//! through a guest agent over vsock.
//!
//! Owns: the per-sandbox directory (`<state_dir>/<sandbox_id>/`: `meta.json`,
//! `api.sock`, `vsock.sock`, `firecracker.log`, a private copy of the image's
//! root drive), the VMM's lifecycle ([`Vmm`]: machine config, boot source,
//! drives, vsock, start, pause, resume, stop), the guest-agent protocol
//! ([`agent`]) and how a VM is brought up ([`Launcher`]).
//!
//! Does not own: the guest's kernel and root filesystem (images are files the
//! operator provides: `runtimes.firecracker.images.<name>` = kernel + rootfs),
//! nor what runs inside the guest beyond the agent protocol.
//!
//! Platform gate: a guest needs hardware KVM. Where `/dev/kvm` is PVM
//! (`/sys/module/kvm_pvm`), which cannot run stock guest kernels, the real
//! launcher's health check says so and the worker does not advertise the
//! runtime. The VMM API lifecycle still runs for real there (tests), and the
//! agent path is covered by [`InProcessGuest`], a launcher whose "guest" is
//! an in-process agent over the same vsock socket protocol.
//!
//! Jailing: each VMM runs in its own directory and process group with only
//! that directory's files configured. The `jailer` binary (chroot, cgroups,
//! uid drop) is not used yet.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::{
    ByteReader, ExecChunk, ExecOutput, ExecSpec, FileInfo, Runtime, RuntimeError, RuntimeSandbox,
    RuntimeState, SpawnSpec,
};

const META: &str = "meta.json";
const API_SOCK: &str = "api.sock";
const VSOCK_SOCK: &str = "vsock.sock";
/// The vsock port the guest agent listens on.
pub const AGENT_PORT: u32 = 52;
/// Bound on one API call to the VMM.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on connecting to the guest agent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What `meta.json` records about a sandbox's VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmMeta {
    pub sandbox_id: String,
    pub image: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub generation: i64,
    /// The VMM process (0: none).
    pub pid: u32,
    pub created_at: String,
}

/// Brings a sandbox's VM up and down. [`FirecrackerVmm`] runs the real
/// binary; [`InProcessGuest`] stands in for a booted guest in tests.
#[async_trait]
pub trait Launcher: Send + Sync + std::fmt::Debug + 'static {
    async fn health(&self) -> Result<(), RuntimeError>;
    /// Starts the VM in `dir` and returns the pid recorded for it; the guest
    /// agent must answer on `dir/vsock.sock` afterwards.
    async fn boot(&self, dir: &Path, spec: &SpawnSpec) -> Result<u32, RuntimeError>;
    fn alive(&self, dir: &Path, meta: &VmMeta) -> bool;
    async fn kill(&self, dir: &Path, meta: &VmMeta);
}

/// Sandboxes as microVMs. See the module docs.
#[derive(Debug, Clone)]
pub struct FirecrackerRuntime {
    state_dir: PathBuf,
    launcher: Arc<dyn Launcher>,
    boot_timeout: Duration,
}

impl FirecrackerRuntime {
    pub fn new(
        state_dir: impl Into<PathBuf>,
        launcher: Arc<dyn Launcher>,
    ) -> Result<FirecrackerRuntime, RuntimeError> {
        let state_dir = std::path::absolute(state_dir.into())
            .map_err(|e| RuntimeError::Internal(format!("firecracker state directory: {e}")))?;
        std::fs::create_dir_all(&state_dir).map_err(|e| {
            RuntimeError::Unavailable(format!(
                "cannot create state directory {}: {e}",
                state_dir.display()
            ))
        })?;
        Ok(FirecrackerRuntime {
            state_dir,
            launcher,
            boot_timeout: Duration::from_secs(30),
        })
    }

    fn dir(&self, sandbox_id: &str) -> PathBuf {
        self.state_dir.join(sandbox_id)
    }

    fn load(&self, sandbox_id: &str) -> Result<(PathBuf, VmMeta), RuntimeError> {
        crate::mock::validate_id(sandbox_id)?;
        let dir = self.dir(sandbox_id);
        let meta = read_meta(&dir)?;
        Ok((dir, meta))
    }

    fn describe(&self, meta: &VmMeta, state: RuntimeState) -> RuntimeSandbox {
        RuntimeSandbox {
            sandbox_id: meta.sandbox_id.clone(),
            runtime_id: format!("firecracker:{}", meta.pid),
            state,
            image: meta.image.clone(),
            labels: meta.labels.clone(),
            generation: meta.generation,
        }
    }

    /// The agent of a running sandbox.
    fn agent(&self, sandbox_id: &str) -> Result<agent::Client, RuntimeError> {
        let (dir, meta) = self.load(sandbox_id)?;
        if !self.launcher.alive(&dir, &meta) {
            return Err(RuntimeError::Invalid("sandbox is not running".into()));
        }
        Ok(agent::Client::new(dir.join(VSOCK_SOCK)))
    }

    /// The agent of an existing sandbox, for file operations (any state the
    /// agent can still answer in).
    fn files_agent(&self, sandbox_id: &str) -> Result<agent::Client, RuntimeError> {
        let (dir, _) = self.load(sandbox_id)?;
        Ok(agent::Client::new(dir.join(VSOCK_SOCK)))
    }

    async fn start(&self, dir: &Path, spec: &SpawnSpec) -> Result<VmMeta, RuntimeError> {
        let mut meta = VmMeta {
            sandbox_id: spec.sandbox_id.clone(),
            image: spec.image.clone(),
            labels: spec.labels.clone(),
            generation: spec.generation,
            pid: 0,
            created_at: crate::mock::rfc3339(SystemTime::now()),
        };
        write_meta(dir, &meta)?;
        meta.pid = self.launcher.boot(dir, spec).await?;
        write_meta(dir, &meta)?;
        // The guest is up once its agent answers.
        let client = agent::Client::new(dir.join(VSOCK_SOCK));
        let deadline = Instant::now() + self.boot_timeout;
        loop {
            match client.call(&agent::Request::Ping {}).await {
                Ok(_) => return Ok(meta),
                Err(e) if Instant::now() >= deadline => {
                    return Err(RuntimeError::Unavailable(format!(
                        "the guest agent did not answer within {:?}: {e}",
                        self.boot_timeout
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

#[async_trait]
impl Runtime for FirecrackerRuntime {
    fn name(&self) -> &str {
        "firecracker"
    }

    async fn health(&self) -> Result<(), RuntimeError> {
        self.launcher.health().await
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<RuntimeSandbox, RuntimeError> {
        crate::mock::validate_id(&spec.sandbox_id)?;
        if spec.image.trim().is_empty() {
            return Err(RuntimeError::Invalid("image is empty".into()));
        }
        let id = spec.sandbox_id.as_str();
        let dir = self.dir(id);
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
            Ok(meta) => Ok(self.describe(&meta, RuntimeState::Running)),
            Err(e) => {
                if let Ok(meta) = read_meta(&dir) {
                    self.launcher.kill(&dir, &meta).await;
                }
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    async fn status(&self, sandbox_id: &str) -> Result<RuntimeSandbox, RuntimeError> {
        let (dir, meta) = self.load(sandbox_id)?;
        let state = if self.launcher.alive(&dir, &meta) {
            RuntimeState::Running
        } else {
            RuntimeState::Stopped
        };
        Ok(self.describe(&meta, state))
    }

    async fn list(&self) -> Result<Vec<RuntimeSandbox>, RuntimeError> {
        let entries = std::fs::read_dir(&self.state_dir)
            .map_err(|e| RuntimeError::Internal(format!("listing sandboxes: {e}")))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let dir = entry.path();
            let Ok(meta) = read_meta(&dir) else {
                continue;
            };
            // A spawn still booting has no pid yet.
            if meta.pid == 0 {
                continue;
            }
            let state = if self.launcher.alive(&dir, &meta) {
                RuntimeState::Running
            } else {
                RuntimeState::Stopped
            };
            out.push(self.describe(&meta, state));
        }
        out.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
        Ok(out)
    }

    async fn destroy(&self, sandbox_id: &str) -> Result<(), RuntimeError> {
        let (dir, meta) = self.load(sandbox_id)?;
        if self.launcher.alive(&dir, &meta) {
            // A clean guest shutdown first, briefly; then the VMM goes.
            let client = agent::Client::new(dir.join(VSOCK_SOCK));
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                client.call(&agent::Request::Shutdown {}),
            )
            .await;
        }
        self.launcher.kill(&dir, &meta).await;
        std::fs::remove_dir_all(&dir)
            .map_err(|e| RuntimeError::Internal(format!("removing sandbox {sandbox_id}: {e}")))
    }

    async fn exec(&self, sandbox_id: &str, spec: &ExecSpec) -> Result<ExecOutput, RuntimeError> {
        check_exec(spec)?;
        let rx = self.agent(sandbox_id)?.exec_stream(spec).await?;
        Ok(collect(rx).await)
    }

    async fn exec_stream(
        &self,
        sandbox_id: &str,
        spec: &ExecSpec,
    ) -> Result<mpsc::Receiver<ExecChunk>, RuntimeError> {
        check_exec(spec)?;
        self.agent(sandbox_id)?.exec_stream(spec).await
    }

    async fn write_file(
        &self,
        sandbox_id: &str,
        path: &str,
        mode: u32,
        body: ByteReader,
    ) -> Result<u64, RuntimeError> {
        self.files_agent(sandbox_id)?
            .write_file(path, mode, body)
            .await
    }

    async fn read_file(
        &self,
        sandbox_id: &str,
        path: &str,
    ) -> Result<(u64, ByteReader), RuntimeError> {
        self.files_agent(sandbox_id)?.read_file(path).await
    }

    async fn list_files(
        &self,
        sandbox_id: &str,
        path: &str,
    ) -> Result<Vec<FileInfo>, RuntimeError> {
        let req = agent::Request::ListFiles { path: path.into() };
        decode(self.files_agent(sandbox_id)?.call(&req).await?)
    }

    async fn stat(&self, sandbox_id: &str, path: &str) -> Result<FileInfo, RuntimeError> {
        let req = agent::Request::Stat { path: path.into() };
        decode(self.files_agent(sandbox_id)?.call(&req).await?)
    }

    async fn glob(&self, sandbox_id: &str, pattern: &str) -> Result<Vec<String>, RuntimeError> {
        let req = agent::Request::Glob {
            pattern: pattern.into(),
        };
        decode(self.files_agent(sandbox_id)?.call(&req).await?)
    }

    async fn rename(&self, sandbox_id: &str, from: &str, to: &str) -> Result<(), RuntimeError> {
        let req = agent::Request::Rename {
            from: from.into(),
            to: to.into(),
        };
        self.files_agent(sandbox_id)?.call(&req).await.map(|_| ())
    }

    async fn chmod(&self, sandbox_id: &str, path: &str, mode: u32) -> Result<(), RuntimeError> {
        let req = agent::Request::Chmod {
            path: path.into(),
            mode,
        };
        self.files_agent(sandbox_id)?.call(&req).await.map(|_| ())
    }

    async fn remove(
        &self,
        sandbox_id: &str,
        path: &str,
        recursive: bool,
    ) -> Result<(), RuntimeError> {
        let req = agent::Request::Remove {
            path: path.into(),
            recursive,
        };
        self.files_agent(sandbox_id)?.call(&req).await.map(|_| ())
    }

    async fn logs(&self, sandbox_id: &str, lines: usize) -> Result<Vec<String>, RuntimeError> {
        let (dir, _) = self.load(sandbox_id)?;
        let text = std::fs::read_to_string(dir.join("firecracker.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let skip = all.len().saturating_sub(lines);
        Ok(all[skip..].iter().map(|l| l.to_string()).collect())
    }
}

fn check_exec(spec: &ExecSpec) -> Result<(), RuntimeError> {
    if spec.command.trim().is_empty() {
        return Err(RuntimeError::Invalid("empty command".into()));
    }
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, RuntimeError> {
    serde_json::from_value(v)
        .map_err(|e| RuntimeError::Internal(format!("bad reply from the guest agent: {e}")))
}

/// Collects a streamed exec into an [`ExecOutput`] (each stream capped).
async fn collect(mut rx: mpsc::Receiver<ExecChunk>) -> ExecOutput {
    let mut out = ExecOutput {
        exit_code: -1,
        ..ExecOutput::default()
    };
    let cap = crate::process::OUTPUT_CAP;
    while let Some(chunk) = rx.recv().await {
        match chunk {
            ExecChunk::Stdout(b) => {
                let room = cap.saturating_sub(out.stdout.len());
                out.stdout.extend_from_slice(&b[..b.len().min(room)]);
            }
            ExecChunk::Stderr(b) => {
                let room = cap.saturating_sub(out.stderr.len());
                out.stderr.extend_from_slice(&b[..b.len().min(room)]);
            }
            ExecChunk::Exit {
                exit_code,
                timed_out,
                duration_ms,
            } => {
                out.exit_code = exit_code;
                out.timed_out = timed_out;
                out.duration_ms = duration_ms;
            }
        }
    }
    out
}

fn read_meta(dir: &Path) -> Result<VmMeta, RuntimeError> {
    let id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match std::fs::read(dir.join(META)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| RuntimeError::Internal(format!("corrupt metadata of {id}: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(RuntimeError::NotFound(format!("sandbox {id}")))
        }
        Err(e) => Err(RuntimeError::Internal(format!(
            "reading {id} metadata: {e}"
        ))),
    }
}

fn write_meta(dir: &Path, meta: &VmMeta) -> Result<(), RuntimeError> {
    let body = serde_json::to_vec_pretty(meta)
        .map_err(|e| RuntimeError::Internal(format!("encoding metadata: {e}")))?;
    let tmp = dir.join(".meta.tmp");
    std::fs::write(&tmp, body)
        .and_then(|()| std::fs::rename(&tmp, dir.join(META)))
        .map_err(|e| RuntimeError::Internal(format!("writing metadata: {e}")))
}

// ---------------------------------------------------------------- the VMM

/// Machine settings for one microVM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    pub vcpus: i64,
    pub memory_mib: i64,
    pub kernel: PathBuf,
    pub boot_args: String,
    pub rootfs: PathBuf,
    pub rootfs_read_only: bool,
    /// Guest context id of the vsock device (≥ 3).
    pub guest_cid: u32,
}

/// One running `firecracker` process and its API socket.
#[derive(Debug)]
pub struct Vmm {
    pid: u32,
    api_sock: PathBuf,
    child: tokio::process::Child,
}

impl Vmm {
    /// Starts `binary --api-sock DIR/api.sock --id ID` in its own process
    /// group with `dir` as its working directory (log: `firecracker.log`)
    /// and waits until the API answers.
    pub async fn launch(binary: &Path, dir: &Path, id: &str) -> Result<Vmm, RuntimeError> {
        let api_sock = dir.join(API_SOCK);
        let log = std::fs::File::create(dir.join("firecracker.log"))
            .map_err(|e| RuntimeError::Internal(format!("firecracker log: {e}")))?;
        let log2 = log
            .try_clone()
            .map_err(|e| RuntimeError::Internal(format!("firecracker log: {e}")))?;
        let child = tokio::process::Command::new(binary)
            .arg("--api-sock")
            .arg(&api_sock)
            .args(["--id", id, "--level", "Warning"])
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| {
                RuntimeError::Unavailable(format!("cannot start {}: {e}", binary.display()))
            })?;
        let pid = child
            .id()
            .ok_or_else(|| RuntimeError::Internal("firecracker has no pid".into()))?;
        let vmm = Vmm {
            pid,
            api_sock,
            child,
        };
        let deadline = Instant::now() + API_TIMEOUT;
        loop {
            match vmm.get("/").await {
                Ok(_) => return Ok(vmm),
                Err(e) if Instant::now() >= deadline => {
                    vmm.stop().await;
                    return Err(e);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `GET path`, the JSON body on 2xx.
    pub async fn get(&self, path: &str) -> Result<serde_json::Value, RuntimeError> {
        let (status, body) = api::request(&self.api_sock, "GET", path, None).await?;
        if !(200..300).contains(&status) {
            return Err(api::fault(status, &body));
        }
        serde_json::from_str(&body)
            .map_err(|e| RuntimeError::Internal(format!("firecracker GET {path}: {e}")))
    }

    /// `PUT`/`PATCH` with a JSON body; `Invalid` with Firecracker's
    /// `fault_message` on a 4xx.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> Result<(), RuntimeError> {
        let (status, reply) = api::request(&self.api_sock, method, path, Some(&body)).await?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(api::fault(status, &reply))
        }
    }

    /// Machine config, boot source, root drive and vsock (`DIR/vsock.sock`).
    pub async fn configure(&self, cfg: &MachineConfig) -> Result<(), RuntimeError> {
        self.send(
            "PUT",
            "/machine-config",
            serde_json::json!({"vcpu_count": cfg.vcpus, "mem_size_mib": cfg.memory_mib}),
        )
        .await?;
        self.send(
            "PUT",
            "/boot-source",
            serde_json::json!({"kernel_image_path": cfg.kernel, "boot_args": cfg.boot_args}),
        )
        .await?;
        self.send(
            "PUT",
            "/drives/rootfs",
            serde_json::json!({
                "drive_id": "rootfs",
                "path_on_host": cfg.rootfs,
                "is_root_device": true,
                "is_read_only": cfg.rootfs_read_only,
            }),
        )
        .await?;
        let uds = self
            .api_sock
            .parent()
            .map(|d| d.join(VSOCK_SOCK))
            .unwrap_or_else(|| PathBuf::from(VSOCK_SOCK));
        self.send(
            "PUT",
            "/vsock",
            serde_json::json!({"guest_cid": cfg.guest_cid, "uds_path": uds}),
        )
        .await
    }

    pub async fn start(&self) -> Result<(), RuntimeError> {
        self.send(
            "PUT",
            "/actions",
            serde_json::json!({"action_type": "InstanceStart"}),
        )
        .await
    }

    pub async fn pause(&self) -> Result<(), RuntimeError> {
        self.send("PATCH", "/vm", serde_json::json!({"state": "Paused"}))
            .await
    }

    pub async fn resume(&self) -> Result<(), RuntimeError> {
        self.send("PATCH", "/vm", serde_json::json!({"state": "Resumed"}))
            .await
    }

    /// Kills the VMM's process group and reaps it.
    pub async fn stop(mut self) {
        crate::process::kill_group(self.pid);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = std::fs::remove_file(&self.api_sock);
    }

    /// Leaves the process running (it outlives this handle; a reaper task
    /// collects its exit status).
    pub fn detach(self) -> u32 {
        let Vmm { pid, mut child, .. } = self;
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        pid
    }
}

/// Images for [`FirecrackerVmm`]: a kernel and a root drive each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirecrackerImage {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
}

/// The real launcher: a `firecracker` process per sandbox.
#[derive(Clone, Debug)]
pub struct FirecrackerVmm {
    pub binary: PathBuf,
    pub images: BTreeMap<String, FirecrackerImage>,
}

/// Why guests cannot boot on this host, if they cannot.
pub fn guest_boot_gate() -> Option<String> {
    if std::fs::metadata("/sys/module/kvm_pvm").is_ok() {
        return Some(
            "guest boot is platform-gated: /dev/kvm is PVM (kvm_pvm), which cannot run stock \
             guest kernels"
                .into(),
        );
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("guest boot needs /dev/kvm: {e}")),
    }
}

#[async_trait]
impl Launcher for FirecrackerVmm {
    async fn health(&self) -> Result<(), RuntimeError> {
        let out = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::process::Command::new(&self.binary)
                .arg("--version")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| RuntimeError::Unavailable("firecracker --version hung".into()))?
        .map_err(|e| {
            RuntimeError::Unavailable(format!("cannot run {}: {e}", self.binary.display()))
        })?;
        if !out.status.success() {
            return Err(RuntimeError::Unavailable(
                "firecracker --version failed".into(),
            ));
        }
        if let Some(why) = guest_boot_gate() {
            return Err(RuntimeError::Unavailable(why));
        }
        if self.images.is_empty() {
            return Err(RuntimeError::Unavailable(
                "no firecracker images configured (kernel + rootfs)".into(),
            ));
        }
        Ok(())
    }

    async fn boot(&self, dir: &Path, spec: &SpawnSpec) -> Result<u32, RuntimeError> {
        let image = self.images.get(&spec.image).ok_or_else(|| {
            RuntimeError::Invalid(format!(
                "image {:?} is not configured for firecracker",
                spec.image
            ))
        })?;
        // A private, writable copy of the root drive.
        let rootfs = dir.join("rootfs.ext4");
        std::fs::copy(&image.rootfs, &rootfs)
            .map_err(|e| RuntimeError::Invalid(format!("root drive of {}: {e}", spec.image)))?;
        let vmm = Vmm::launch(&self.binary, dir, &spec.sandbox_id).await?;
        let cfg = MachineConfig {
            vcpus: spec.vcpus.max(1),
            memory_mib: if spec.memory_mb > 0 {
                spec.memory_mb
            } else {
                256
            },
            kernel: image.kernel.clone(),
            boot_args: "console=ttyS0 reboot=k panic=1 pci=off".into(),
            rootfs,
            rootfs_read_only: false,
            guest_cid: 3,
        };
        let configured = async {
            vmm.configure(&cfg).await?;
            vmm.start().await
        };
        match configured.await {
            Ok(()) => Ok(vmm.detach()),
            Err(e) => {
                vmm.stop().await;
                Err(e)
            }
        }
    }

    fn alive(&self, _dir: &Path, meta: &VmMeta) -> bool {
        pid_runs(meta.pid, &meta.sandbox_id)
    }

    async fn kill(&self, _dir: &Path, meta: &VmMeta) {
        if pid_runs(meta.pid, &meta.sandbox_id) {
            crate::process::kill_group(meta.pid);
            for _ in 0..100 {
                if !pid_runs(meta.pid, &meta.sandbox_id) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Is `pid` alive (not a zombie) with `needle` on its command line?
fn pid_runs(pid: u32, needle: &str) -> bool {
    if pid <= 1 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    if matches!(state, None | Some('Z' | 'X' | 'x')) {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == needle.as_bytes()))
}

/// A launcher whose guest is an in-process agent on the sandbox's vsock
/// socket, serving a mock runtime: the whole host side (VM directory,
/// Firecracker's vsock handshake, the agent protocol) runs for real without
/// a VM. For tests and hosts without KVM; never advertised by a worker.
#[derive(Debug, Default)]
pub struct InProcessGuest {
    guests: std::sync::Mutex<BTreeMap<PathBuf, GuestHandle>>,
}

#[derive(Debug)]
struct GuestHandle {
    runtime: Arc<crate::mock::MockRuntime>,
    task: tokio::task::JoinHandle<()>,
}

impl InProcessGuest {
    fn guest(&self, dir: &Path) -> Option<Arc<crate::mock::MockRuntime>> {
        self.guests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(dir)
            .map(|g| g.runtime.clone())
    }

    /// The guest's keeper pid (the "VM process"), for tests that kill it.
    pub fn keeper_pid(&self, dir: &Path, sandbox_id: &str) -> Option<u32> {
        let meta = std::fs::read(dir.join("guest").join(sandbox_id).join("meta.json")).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&meta).ok()?;
        v["keeper_pid"].as_u64().and_then(|p| u32::try_from(p).ok())
    }
}

#[async_trait]
impl Launcher for InProcessGuest {
    async fn health(&self) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn boot(&self, dir: &Path, spec: &SpawnSpec) -> Result<u32, RuntimeError> {
        let runtime = Arc::new(crate::mock::MockRuntime::with_event_log(
            dir.join("guest"),
            None,
        )?);
        let guest_spec = SpawnSpec {
            image: spec.image.clone(),
            ..spec.clone()
        };
        runtime.spawn(&guest_spec).await?;
        let listener = tokio::net::UnixListener::bind(dir.join(VSOCK_SOCK))
            .map_err(|e| RuntimeError::Internal(format!("guest vsock: {e}")))?;
        let (rt, id) = (runtime.clone(), spec.sandbox_id.clone());
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (rt, id) = (rt.clone(), id.clone());
                tokio::spawn(async move {
                    let _ = agent::serve_vsock(conn, rt, &id).await;
                });
            }
        });
        self.guests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(dir.to_path_buf(), GuestHandle { runtime, task });
        Ok(std::process::id())
    }

    fn alive(&self, dir: &Path, meta: &VmMeta) -> bool {
        let Some(guest) = self.guest(dir) else {
            return false;
        };
        // The guest's keeper stands for the VM.
        let keeper = self.keeper_pid(dir, &meta.sandbox_id);
        keeper.is_some_and(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                !matches!(
                    s.rsplit_once(") ").and_then(|(_, r)| r.chars().next()),
                    None | Some('Z' | 'X')
                )
            })
        }) && guest.state_dir().exists()
    }

    async fn kill(&self, dir: &Path, meta: &VmMeta) {
        let handle = self
            .guests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(dir);
        if let Some(h) = handle {
            h.task.abort();
            let _ = h.runtime.destroy(&meta.sandbox_id).await;
        }
    }
}

// ---------------------------------------------------------- the API socket

/// A minimal HTTP/1.1 client for Firecracker's API socket (one request per
/// connection, bounded by [`API_TIMEOUT`] and a 1 MiB reply).
pub mod api {
    use super::*;

    const MAX_REPLY: usize = 1 << 20;

    pub async fn request(
        sock: &Path,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, String), RuntimeError> {
        tokio::time::timeout(API_TIMEOUT, exchange(sock, method, path, body))
            .await
            .map_err(|_| {
                RuntimeError::Unavailable(format!("firecracker API {method} {path} timed out"))
            })?
    }

    async fn exchange(
        sock: &Path,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, String), RuntimeError> {
        let io = |e: std::io::Error| {
            RuntimeError::Unavailable(format!("firecracker API {method} {path}: {e}"))
        };
        let mut stream = UnixStream::connect(sock).await.map_err(io)?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.map_err(io)?;
        stream.write_all(body.as_bytes()).await.map_err(io)?;
        let mut reader = tokio::io::BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line).await.map_err(io)?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                RuntimeError::Internal(format!("firecracker API: bad status line {status_line:?}"))
            })?;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await.map_err(io)? == 0 || line.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.trim().eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        if length > MAX_REPLY {
            return Err(RuntimeError::Internal(
                "firecracker API reply too large".into(),
            ));
        }
        let mut buf = vec![0u8; length];
        reader.read_exact(&mut buf).await.map_err(io)?;
        Ok((status, String::from_utf8_lossy(&buf).into_owned()))
    }

    /// Firecracker's `{"fault_message": …}` as an error.
    pub fn fault(status: u16, body: &str) -> RuntimeError {
        let msg = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["fault_message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| body.chars().take(300).collect());
        if (400..500).contains(&status) {
            RuntimeError::Invalid(format!("firecracker: {msg}"))
        } else {
            RuntimeError::Internal(format!("firecracker ({status}): {msg}"))
        }
    }
}

// ------------------------------------------------------- the guest agent

/// The guest-agent protocol over vsock.
///
/// The host connects to the VM's vsock Unix socket, writes
/// `CONNECT <AGENT_PORT>\n` and reads `OK <port>\n` (Firecracker's
/// host-initiated handshake). Then frames, each a big-endian `u32` length,
/// one kind byte and at most [`MAX_FRAME`] bytes of payload:
/// `0` JSON, `1` stdout, `2` stderr, `3` file data, `4` end of data.
///
/// One request per connection: the host sends a JSON [`Request`] (file
/// uploads follow it with data frames and an end frame); the agent answers
/// with a JSON [`Reply`] (exec: output frames first, then `exit`; downloads:
/// `ok` with the size, then data frames and an end frame). An exec whose
/// connection closes is killed with its process tree.
pub mod agent {
    use super::*;
    use tokio::io::{AsyncRead, AsyncWrite};

    pub const MAX_FRAME: usize = 1 << 20;
    pub const JSON: u8 = 0;
    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
    pub const DATA: u8 = 3;
    pub const END: u8 = 4;

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
    pub enum Request {
        // Unit variants of an internally tagged enum ignore extra fields
        // (serde's `deny_unknown_fields` does not reach them): `{}` does.
        Ping {},
        Exec { spec: ExecSpec },
        WriteFile { path: String, mode: u32 },
        ReadFile { path: String },
        ListFiles { path: String },
        Stat { path: String },
        Glob { pattern: String },
        Rename { from: String, to: String },
        Chmod { path: String, mode: u32 },
        Remove { path: String, recursive: bool },
        Shutdown {},
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case", deny_unknown_fields)]
    pub enum Reply {
        Ok(serde_json::Value),
        Exit {
            exit_code: i32,
            timed_out: bool,
            duration_ms: u64,
        },
        Error(RuntimeError),
    }

    fn io_err(e: std::io::Error) -> RuntimeError {
        RuntimeError::Unavailable(format!("guest agent: {e}"))
    }

    pub async fn write_frame<W: AsyncWrite + Unpin>(
        w: &mut W,
        kind: u8,
        payload: &[u8],
    ) -> std::io::Result<()> {
        if payload.len() > MAX_FRAME {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "frame too large",
            ));
        }
        let len = u32::try_from(payload.len() + 1).unwrap_or(u32::MAX);
        let mut buf = Vec::with_capacity(payload.len() + 5);
        buf.extend_from_slice(&len.to_be_bytes());
        buf.push(kind);
        buf.extend_from_slice(payload);
        w.write_all(&buf).await
    }

    /// The next frame; `None` at a clean end of stream.
    pub async fn read_frame<R: AsyncRead + Unpin>(
        r: &mut R,
    ) -> std::io::Result<Option<(u8, Vec<u8>)>> {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > MAX_FRAME + 1 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad frame length {len}"),
            ));
        }
        let mut buf = vec![0u8; len];
        r.read_exact(&mut buf).await?;
        let kind = buf.remove(0);
        Ok(Some((kind, buf)))
    }

    async fn write_json<W: AsyncWrite + Unpin, T: Serialize>(
        w: &mut W,
        v: &T,
    ) -> std::io::Result<()> {
        let body = serde_json::to_vec(v)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        write_frame(w, JSON, &body).await
    }

    /// The host side: one connection per request.
    #[derive(Clone, Debug)]
    pub struct Client {
        uds: PathBuf,
    }

    impl Client {
        pub fn new(uds: PathBuf) -> Client {
            Client { uds }
        }

        /// Connects through Firecracker's vsock handshake.
        pub async fn connect(&self) -> Result<UnixStream, RuntimeError> {
            let go = async {
                let mut s = UnixStream::connect(&self.uds).await?;
                s.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())
                    .await?;
                let mut line = Vec::new();
                loop {
                    let mut b = [0u8; 1];
                    if s.read(&mut b).await? == 0 || line.len() > 64 {
                        break;
                    }
                    if b[0] == b'\n' {
                        break;
                    }
                    line.push(b[0]);
                }
                Ok::<_, std::io::Error>((s, line))
            };
            let (s, line) = tokio::time::timeout(CONNECT_TIMEOUT, go)
                .await
                .map_err(|_| RuntimeError::Unavailable("guest agent: connect timed out".into()))?
                .map_err(io_err)?;
            if !line.starts_with(b"OK ") {
                return Err(RuntimeError::Unavailable(format!(
                    "guest agent refused the connection: {:?}",
                    String::from_utf8_lossy(&line)
                )));
            }
            Ok(s)
        }

        async fn reply(s: &mut UnixStream) -> Result<serde_json::Value, RuntimeError> {
            match read_frame(s).await.map_err(io_err)? {
                Some((JSON, body)) => match serde_json::from_slice::<Reply>(&body) {
                    Ok(Reply::Ok(v)) => Ok(v),
                    Ok(Reply::Error(e)) => Err(e),
                    Ok(other) => Err(RuntimeError::Internal(format!(
                        "guest agent: unexpected reply {other:?}"
                    ))),
                    Err(e) => Err(RuntimeError::Internal(format!("guest agent: {e}"))),
                },
                Some((kind, _)) => Err(RuntimeError::Internal(format!(
                    "guest agent: unexpected frame kind {kind}"
                ))),
                None => Err(RuntimeError::Unavailable(
                    "guest agent closed the connection".into(),
                )),
            }
        }

        /// A request answered by one JSON reply.
        pub async fn call(&self, req: &Request) -> Result<serde_json::Value, RuntimeError> {
            let mut s = self.connect().await?;
            write_json(&mut s, req).await.map_err(io_err)?;
            Self::reply(&mut s).await
        }

        pub async fn exec_stream(
            &self,
            spec: &ExecSpec,
        ) -> Result<mpsc::Receiver<ExecChunk>, RuntimeError> {
            let mut s = self.connect().await?;
            write_json(&mut s, &Request::Exec { spec: spec.clone() })
                .await
                .map_err(io_err)?;
            // The first frame tells whether the command started.
            let first = read_frame(&mut s).await.map_err(io_err)?;
            let (tx, rx) = mpsc::channel(crate::process::STREAM_CAPACITY);
            let first = match first {
                Some((JSON, body)) => match serde_json::from_slice::<Reply>(&body) {
                    Ok(Reply::Error(e)) => return Err(e),
                    Ok(r) => Some((JSON, serde_json::to_vec(&r).unwrap_or_default())),
                    Err(e) => return Err(RuntimeError::Internal(format!("guest agent: {e}"))),
                },
                other => other,
            };
            tokio::spawn(async move {
                let mut next = first;
                loop {
                    let chunk = match next {
                        Some((STDOUT, b)) => ExecChunk::Stdout(b.into()),
                        Some((STDERR, b)) => ExecChunk::Stderr(b.into()),
                        Some((JSON, body)) => {
                            if let Ok(Reply::Exit {
                                exit_code,
                                timed_out,
                                duration_ms,
                            }) = serde_json::from_slice(&body)
                            {
                                let _ = tx
                                    .send(ExecChunk::Exit {
                                        exit_code,
                                        timed_out,
                                        duration_ms,
                                    })
                                    .await;
                            }
                            return;
                        }
                        _ => {
                            // The agent went away mid-command.
                            let _ = tx
                                .send(ExecChunk::Exit {
                                    exit_code: -1,
                                    timed_out: false,
                                    duration_ms: 0,
                                })
                                .await;
                            return;
                        }
                    };
                    tokio::select! {
                        sent = tx.send(chunk) => if sent.is_err() { return; },
                        // Dropping the receiver drops the connection, which
                        // kills the command in the guest.
                        _ = tx.closed() => return,
                    }
                    // Waiting for the next frame must also notice a dropped
                    // receiver: a quiet command would otherwise run on.
                    next = tokio::select! {
                        f = read_frame(&mut s) => f.unwrap_or_default(),
                        _ = tx.closed() => return,
                    };
                }
            });
            Ok(rx)
        }

        pub async fn write_file(
            &self,
            path: &str,
            mode: u32,
            mut body: ByteReader,
        ) -> Result<u64, RuntimeError> {
            let mut s = self.connect().await?;
            write_json(
                &mut s,
                &Request::WriteFile {
                    path: path.into(),
                    mode,
                },
            )
            .await
            .map_err(io_err)?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = body
                    .read(&mut buf)
                    .await
                    .map_err(|e| RuntimeError::Internal(format!("reading the upload: {e}")))?;
                if n == 0 {
                    break;
                }
                if let Err(e) = write_frame(&mut s, DATA, &buf[..n]).await {
                    return Err(Self::refusal_or(&mut s, e).await);
                }
            }
            if let Err(e) = write_frame(&mut s, END, &[]).await {
                return Err(Self::refusal_or(&mut s, e).await);
            }
            decode(Self::reply(&mut s).await?)
        }

        /// The agent refuses a bad upload (a path outside the workspace) as
        /// soon as it reads the request, then hangs up while the host is
        /// still sending: its reply, not the broken pipe, is the answer.
        async fn refusal_or(s: &mut UnixStream, e: std::io::Error) -> RuntimeError {
            match Self::reply(s).await {
                Err(
                    refused @ (RuntimeError::InvalidPath { .. }
                    | RuntimeError::NotFound(_)
                    | RuntimeError::Invalid(_)),
                ) => refused,
                _ => io_err(e),
            }
        }

        pub async fn read_file(&self, path: &str) -> Result<(u64, ByteReader), RuntimeError> {
            let mut s = self.connect().await?;
            write_json(&mut s, &Request::ReadFile { path: path.into() })
                .await
                .map_err(io_err)?;
            let size: u64 = decode(Self::reply(&mut s).await?)?;
            let (mut tx, rx) = tokio::io::duplex(256 * 1024);
            tokio::spawn(async move {
                while let Ok(Some((DATA, b))) = read_frame(&mut s).await {
                    if tx.write_all(&b).await.is_err() {
                        return;
                    }
                }
            });
            Ok((size, Box::pin(rx)))
        }
    }

    /// The guest side of one vsock connection from the host: answers the
    /// handshake, then one request against `rt`'s sandbox `id`.
    pub async fn serve_vsock<S>(mut conn: S, rt: Arc<dyn Runtime>, id: &str) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut line = Vec::new();
        loop {
            let mut b = [0u8; 1];
            if conn.read(&mut b).await? == 0 || line.len() > 64 {
                return Ok(());
            }
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
        }
        if !line.starts_with(b"CONNECT ") {
            return Ok(());
        }
        conn.write_all(b"OK 1073741824\n").await?;
        serve(conn, rt, id).await
    }

    fn value<T: Serialize>(v: Result<T, RuntimeError>) -> Result<serde_json::Value, RuntimeError> {
        v.and_then(|x| serde_json::to_value(x).map_err(|e| RuntimeError::Internal(e.to_string())))
    }

    /// The agent: one request on `conn`, carried out on `rt`'s sandbox `id`
    /// (inside a real guest, a host-directory runtime over the guest's `/`).
    pub async fn serve<S>(conn: S, rt: Arc<dyn Runtime>, id: &str) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut r, mut w) = tokio::io::split(conn);
        let req = match read_frame(&mut r).await? {
            Some((JSON, body)) => match serde_json::from_slice::<Request>(&body) {
                Ok(req) => req,
                Err(e) => {
                    let err = RuntimeError::Invalid(format!("bad request: {e}"));
                    return write_json(&mut w, &Reply::Error(err)).await;
                }
            },
            _ => return Ok(()),
        };
        let answer = |r: Result<serde_json::Value, RuntimeError>| match r {
            Ok(v) => Reply::Ok(v),
            Err(e) => Reply::Error(e),
        };
        match req {
            Request::Ping {} => write_json(&mut w, &Reply::Ok("pong".into())).await,
            Request::Shutdown {} => write_json(&mut w, &Reply::Ok(serde_json::Value::Null)).await,
            Request::Exec { spec } => {
                let mut rx = match rt.exec_stream(id, &spec).await {
                    Ok(rx) => rx,
                    Err(e) => return write_json(&mut w, &Reply::Error(e)).await,
                };
                loop {
                    let mut probe = [0u8; 1];
                    tokio::select! {
                        chunk = rx.recv() => match chunk {
                            Some(ExecChunk::Stdout(b)) => write_frame(&mut w, STDOUT, &b).await?,
                            Some(ExecChunk::Stderr(b)) => write_frame(&mut w, STDERR, &b).await?,
                            Some(ExecChunk::Exit { exit_code, timed_out, duration_ms }) => {
                                return write_json(&mut w, &Reply::Exit { exit_code, timed_out, duration_ms }).await;
                            }
                            None => return Ok(()),
                        },
                        // The host hung up (or sent anything): drop the
                        // receiver, which kills the command's tree.
                        _ = r.read(&mut probe) => return Ok(()),
                    }
                }
            }
            Request::WriteFile { path, mode } => {
                let (mut tx, rx) = tokio::io::duplex(256 * 1024);
                let pump = async move {
                    while let Ok(Some((kind, b))) = read_frame(&mut r).await {
                        match kind {
                            DATA => {
                                if tx.write_all(&b).await.is_err() {
                                    break;
                                }
                            }
                            _ => break,
                        }
                    }
                    drop(tx);
                };
                let (written, ()) =
                    tokio::join!(rt.write_file(id, &path, mode, Box::pin(rx)), pump);
                write_json(&mut w, &answer(value(written))).await
            }
            Request::ReadFile { path } => match rt.read_file(id, &path).await {
                Ok((size, mut body)) => {
                    write_json(&mut w, &Reply::Ok(size.into())).await?;
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = body.read(&mut buf).await?;
                        if n == 0 {
                            break;
                        }
                        write_frame(&mut w, DATA, &buf[..n]).await?;
                    }
                    write_frame(&mut w, END, &[]).await
                }
                Err(e) => write_json(&mut w, &Reply::Error(e)).await,
            },
            Request::ListFiles { path } => {
                write_json(&mut w, &answer(value(rt.list_files(id, &path).await))).await
            }
            Request::Stat { path } => {
                write_json(&mut w, &answer(value(rt.stat(id, &path).await))).await
            }
            Request::Glob { pattern } => {
                write_json(&mut w, &answer(value(rt.glob(id, &pattern).await))).await
            }
            Request::Rename { from, to } => {
                write_json(&mut w, &answer(value(rt.rename(id, &from, &to).await))).await
            }
            Request::Chmod { path, mode } => {
                write_json(&mut w, &answer(value(rt.chmod(id, &path, mode).await))).await
            }
            Request::Remove { path, recursive } => {
                write_json(
                    &mut w,
                    &answer(value(rt.remove(id, &path, recursive).await)),
                )
                .await
            }
        }
    }
}
