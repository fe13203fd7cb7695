//! Docker runtimes through the Engine API (bollard): `docker` (runc),
//! `gvisor` (runsc) and `kata` (kata-runtime), one [`DockerRuntime`] each,
//! told apart by the OCI runtime name dockerd runs the container with.
//!
//! Owns: the container a sandbox is (its hardened `HostConfig`, its labels),
//! exec through the Engine API with timeouts that kill the exec's whole
//! process tree, the host directory bind-mounted as `/workspace` (file
//! operations go through it, confined by [`crate::confine`]), adoption of
//! labelled containers after a worker restart, and removal of everything a
//! failed start left behind (a failed runsc start leaves shim and sandbox
//! processes running).
//!
//! Does not own: whether to spawn (the worker agent decides), image builds.
//!
//! Hardened defaults (every one from [`DockerOptions`]): all capabilities
//! dropped, `no-new-privileges`, dockerd's default seccomp profile (never
//! turned off), a PID limit, memory (no swap) and CPU limits from the spawn
//! request, a non-root user (`1000:1000`), network `none`, optionally a
//! read-only root filesystem (with a `tmpfs` `/tmp`); `/workspace` is always
//! writable.
//!
//! Layout: `<state_dir>/<sandbox_id>/root/workspace` on the host is
//! `/workspace` in the container; the container is named
//! `stacyvm-[<instance>-]<sandbox_id>` and labelled `stacyvm.managed`,
//! `stacyvm.runtime`, `stacyvm.instance`, `stacyvm.sandbox`,
//! `stacyvm.generation`, `stacyvm.image` and `stacyvm.label.<key>` for the
//! spawn's own labels, which is all a restarted worker needs to adopt it.
//!
//! File operations accept only paths in `/workspace` (the rest of the
//! container's filesystem belongs to the image); commands see every path.
//!
//! Exec: every command runs under `/bin/sh` (argv mode as
//! `sh -c 'exec "$0" "$@"' cmd args…`: no shell parsing of the arguments,
//! and a missing program is exit code 127 as on the other runtimes) with a
//! marker variable `STACYVM_EXEC_ID` in its environment. Docker has no API to
//! kill an exec, so a timeout or a dropped stream kills, from a second exec,
//! every process in the container whose environment holds that marker. Images
//! therefore need `/bin/sh`, `tr`, `grep` and `kill` (busybox has them).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::mock::files;
use crate::process::{OUTPUT_CAP, STREAM_CAPACITY};
use crate::{
    ByteReader, ExecChunk, ExecMode, ExecOutput, ExecSpec, FileInfo, Runtime, RuntimeError,
    RuntimeSandbox, RuntimeState, SpawnSpec, WORKSPACE, confine, shell_line,
};

const LABEL_MANAGED: &str = "stacyvm.managed";
const LABEL_RUNTIME: &str = "stacyvm.runtime";
const LABEL_INSTANCE: &str = "stacyvm.instance";
const LABEL_SANDBOX: &str = "stacyvm.sandbox";
const LABEL_GENERATION: &str = "stacyvm.generation";
const LABEL_IMAGE: &str = "stacyvm.image";
const LABEL_USER_PREFIX: &str = "stacyvm.label.";
const EXEC_MARKER: &str = "STACYVM_EXEC_ID";
/// The container's main process: it only has to stay alive.
const KEEPER: &str = "while :; do sleep 3600; done";
/// Kills every process whose environment holds `STACYVM_EXEC_ID=$1`.
const KILL_SCRIPT: &str = "for p in /proc/[0-9]*; do \
     if tr '\\0' '\\n' < \"$p/environ\" 2>/dev/null | grep -qx \"STACYVM_EXEC_ID=$1\"; then \
     kill -9 \"${p#/proc/}\" 2>/dev/null; fi; done; exit 0";
/// How long a call to dockerd may take before it is abandoned.
const API_TIMEOUT_SECS: u64 = 60;
/// A health check gives up after this long.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// After killing a timed-out exec, how long its output stream may take to end.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// When a spawn names an image the host does not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Pull it (progress goes to the log).
    #[default]
    Missing,
    /// Refuse the spawn (hosts without a registry; tests).
    Never,
}

/// Everything a [`DockerRuntime`] is configured with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerOptions {
    /// The name the spawn API selects it by: `docker`, `gvisor` or `kata`.
    pub name: String,
    /// dockerd's OCI runtime: `runc`, `runsc` or `kata-runtime`.
    pub oci_runtime: String,
    /// `unix:///var/run/docker.sock` or a path; [`DockerOptions::new`] takes `DOCKER_HOST`.
    pub socket: String,
    /// Host directory holding each sandbox's `/workspace`.
    pub state_dir: PathBuf,
    /// Tells apart several workers on one host (container names and labels).
    pub instance: String,
    /// `uid:gid` every process in the container runs as.
    pub user: String,
    pub readonly_rootfs: bool,
    pub pids_limit: i64,
    /// Docker network mode; `none` unless policy allows another.
    pub network: String,
    pub pull: PullPolicy,
}

impl DockerOptions {
    /// Defaults for one of the names `docker`, `gvisor`, `kata`; `None` for others.
    pub fn new(name: &str, state_dir: impl Into<PathBuf>) -> Option<DockerOptions> {
        let oci_runtime = match name {
            "docker" => "runc",
            "gvisor" => "runsc",
            "kata" => "kata-runtime",
            _ => return None,
        };
        Some(DockerOptions {
            name: name.to_string(),
            oci_runtime: oci_runtime.to_string(),
            socket: std::env::var("DOCKER_HOST")
                .ok()
                .filter(|h| h.starts_with("unix://"))
                .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string()),
            state_dir: state_dir.into(),
            instance: String::new(),
            user: "1000:1000".to_string(),
            readonly_rootfs: false,
            pids_limit: 512,
            network: "none".to_string(),
            pull: PullPolicy::Missing,
        })
    }
}

/// A sandbox runtime on dockerd. See the module docs.
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
    opts: DockerOptions,
    uid: u32,
    gid: u32,
}

impl DockerRuntime {
    /// Connects (lazily: nothing is sent until the first call) and
    /// negotiates the API version (Debian's dockerd 20.10 speaks 1.41).
    pub async fn connect(opts: DockerOptions) -> Result<DockerRuntime, RuntimeError> {
        let (uid, gid) = parse_user(&opts.user)?;
        let state_dir = std::path::absolute(&opts.state_dir)
            .map_err(|e| RuntimeError::Internal(format!("docker state directory: {e}")))?;
        std::fs::create_dir_all(&state_dir).map_err(|e| {
            RuntimeError::Unavailable(format!(
                "cannot create state directory {}: {e}",
                state_dir.display()
            ))
        })?;
        let docker =
            Docker::connect_with_unix(&opts.socket, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
                .map_err(|e| {
                    RuntimeError::Unavailable(format!("docker socket {}: {e}", opts.socket))
                })?;
        let docker =
            match tokio::time::timeout(HEALTH_TIMEOUT, docker.clone().negotiate_version()).await {
                Ok(Ok(d)) => d,
                // Unreachable now: keep the client; health() reports it.
                _ => docker,
            };
        Ok(DockerRuntime {
            docker,
            opts: DockerOptions { state_dir, ..opts },
            uid,
            gid,
        })
    }

    /// Whether `image` is on this host (no pull is tried). Errors when
    /// dockerd does not answer within the health timeout.
    pub async fn has_image(&self, image: &str) -> Result<bool, RuntimeError> {
        match tokio::time::timeout(HEALTH_TIMEOUT, self.docker.inspect_image(image)).await {
            Err(_) => Err(RuntimeError::Unavailable("dockerd does not answer".into())),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) if status_of(&e) == Some(404) => Ok(false),
            Ok(Err(e)) => Err(api_err(&format!("image {image}"), e)),
        }
    }

    /// The Engine API client (tests use it to act behind the runtime's back).
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    /// `stacyvm-[<instance>-]<sandbox_id>`.
    pub fn container_name(&self, sandbox_id: &str) -> String {
        if self.opts.instance.is_empty() {
            format!("stacyvm-{sandbox_id}")
        } else {
            format!("stacyvm-{}-{sandbox_id}", self.opts.instance)
        }
    }

    fn sandbox_dir(&self, sandbox_id: &str) -> PathBuf {
        self.opts.state_dir.join(sandbox_id)
    }

    /// The host directory standing for the container's `/` in file
    /// operations; only its `workspace/` exists.
    fn files_root(&self, sandbox_id: &str) -> PathBuf {
        self.sandbox_dir(sandbox_id).join("root")
    }

    async fn inspect(
        &self,
        sandbox_id: &str,
    ) -> Result<bollard::models::ContainerInspectResponse, RuntimeError> {
        crate::mock::validate_id(sandbox_id)?;
        self.docker
            .inspect_container(
                &self.container_name(sandbox_id),
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
            .map_err(|e| api_err(&format!("sandbox {sandbox_id}"), e))
    }

    fn describe(
        &self,
        labels: &HashMap<String, String>,
        id: &str,
        running: bool,
    ) -> RuntimeSandbox {
        RuntimeSandbox {
            sandbox_id: labels
                .get(LABEL_SANDBOX)
                .cloned()
                .unwrap_or_else(|| id.to_string()),
            runtime_id: id.to_string(),
            state: if running {
                RuntimeState::Running
            } else {
                RuntimeState::Stopped
            },
            image: labels.get(LABEL_IMAGE).cloned().unwrap_or_default(),
            labels: labels
                .iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix(LABEL_USER_PREFIX)
                        .map(|k| (k.to_string(), v.clone()))
                })
                .collect(),
            generation: labels
                .get(LABEL_GENERATION)
                .and_then(|g| g.parse().ok())
                .unwrap_or(0),
        }
    }

    /// The sandbox, which must exist and run; the host root of its files.
    async fn running(&self, sandbox_id: &str) -> Result<String, RuntimeError> {
        let c = self.inspect(sandbox_id).await?;
        if !c.state.and_then(|s| s.running).unwrap_or(false) {
            return Err(RuntimeError::Invalid("sandbox is not running".into()));
        }
        Ok(c.id.unwrap_or_default())
    }

    /// Files exist only while the container does.
    async fn files(&self, sandbox_id: &str, path: &str) -> Result<PathBuf, RuntimeError> {
        workspace_only(path)?;
        self.inspect(sandbox_id).await?;
        Ok(self.files_root(sandbox_id))
    }

    async fn ensure_image(&self, image: &str) -> Result<(), RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) => return Err(api_err(&format!("image {image}"), e)),
        }
        if self.opts.pull == PullPolicy::Never {
            return Err(RuntimeError::Invalid(format!(
                "image {image} is not on this host and pulling is off \
                 (`stacyvm image import ROOTFS.tar --tag {image}` adds it)"
            )));
        }
        tracing::info!(image, "pulling image");
        let opts = CreateImageOptionsBuilder::default()
            .from_image(image)
            .build();
        let mut progress = self.docker.create_image(Some(opts), None, None);
        let mut last = Instant::now();
        while let Some(item) = progress.next().await {
            match item {
                Ok(info) => {
                    if last.elapsed() >= Duration::from_secs(2) {
                        last = Instant::now();
                        tracing::info!(
                            image,
                            status = info.status.as_deref().unwrap_or(""),
                            current = info.progress_detail.as_ref().and_then(|p| p.current),
                            total = info.progress_detail.as_ref().and_then(|p| p.total),
                            "pulling image"
                        );
                    }
                }
                Err(e) => {
                    return Err(RuntimeError::Invalid(format!(
                        "image {image} is not on this host and cannot be pulled: {}",
                        short(&e.to_string())
                    )));
                }
            }
        }
        tracing::info!(image, "image pulled");
        Ok(())
    }

    /// Removes the container (if any), whatever a failed runsc start left
    /// running, and the sandbox directory.
    async fn remove_everything(&self, sandbox_id: &str, container_id: Option<&str>) {
        let opts = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        let name = self.container_name(sandbox_id);
        if let Err(e) = self.docker.remove_container(&name, Some(opts)).await
            && status_of(&e) != Some(404)
        {
            tracing::warn!(sandbox_id, error = %short(&e.to_string()), "removing container");
        }
        if let Some(id) = container_id.filter(|id| id.len() >= 12) {
            reap_leftovers(id).await;
        }
        let _ = std::fs::remove_dir_all(self.sandbox_dir(sandbox_id));
    }

    async fn start(&self, spec: &SpawnSpec, workspace: &Path) -> Result<String, RuntimeError> {
        let id = spec.sandbox_id.as_str();
        let mut labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_RUNTIME.to_string(), self.opts.name.clone()),
            (LABEL_INSTANCE.to_string(), self.opts.instance.clone()),
            (LABEL_SANDBOX.to_string(), id.to_string()),
            (LABEL_GENERATION.to_string(), spec.generation.to_string()),
            (LABEL_IMAGE.to_string(), spec.image.clone()),
        ]);
        for (k, v) in &spec.labels {
            labels.insert(format!("{LABEL_USER_PREFIX}{k}"), v.clone());
        }
        let mut env: Vec<String> = vec![format!("SANDBOX_ID={id}")];
        env.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
        let mut host = HostConfig {
            binds: Some(vec![format!("{}:{WORKSPACE}:rw", workspace.display())]),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            pids_limit: Some(self.opts.pids_limit),
            network_mode: Some(self.opts.network.clone()),
            runtime: Some(self.opts.oci_runtime.clone()),
            readonly_rootfs: Some(self.opts.readonly_rootfs),
            ..HostConfig::default()
        };
        if self.opts.readonly_rootfs {
            host.tmpfs = Some(HashMap::from([(
                "/tmp".to_string(),
                "rw,nosuid,nodev,size=64m".to_string(),
            )]));
        }
        if spec.memory_mb > 0 {
            let bytes = spec.memory_mb.saturating_mul(1024 * 1024);
            host.memory = Some(bytes);
            host.memory_swap = Some(bytes);
        }
        if spec.vcpus > 0 {
            host.nano_cpus = Some(spec.vcpus.saturating_mul(1_000_000_000));
        }
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            entrypoint: Some(vec!["/bin/sh".into(), "-c".into(), KEEPER.into()]),
            cmd: Some(vec![]),
            env: Some(env),
            labels: Some(labels),
            user: Some(self.opts.user.clone()),
            working_dir: Some(WORKSPACE.into()),
            network_disabled: Some(self.opts.network == "none"),
            host_config: Some(host),
            ..ContainerCreateBody::default()
        };
        let opts = CreateContainerOptionsBuilder::default()
            .name(&self.container_name(id))
            .build();
        let created = match self.docker.create_container(Some(opts), body).await {
            Ok(c) => c,
            Err(e) if status_of(&e) == Some(409) => {
                return Err(RuntimeError::AlreadyExists(format!("sandbox {id}")));
            }
            Err(e) => return Err(api_err(&format!("creating sandbox {id}"), e)),
        };
        if let Err(e) = self
            .docker
            .start_container(
                &created.id,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
        {
            self.remove_everything(id, Some(&created.id)).await;
            return Err(api_err(&format!("starting sandbox {id}"), e));
        }
        Ok(created.id)
    }

    /// Kills every process of the exec marked `marker` (see the module docs).
    async fn kill_exec(&self, container: &str, marker: &str) {
        let cfg = CreateExecOptions {
            cmd: Some(vec![
                "/bin/sh".to_string(),
                "-c".into(),
                KILL_SCRIPT.into(),
                "stacyvm-kill".into(),
                marker.to_string(),
            ]),
            user: Some(self.opts.user.clone()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..CreateExecOptions::default()
        };
        let run = async {
            let exec = self.docker.create_exec(container, cfg).await?;
            if let StartExecResults::Attached { mut output, .. } =
                self.docker.start_exec(&exec.id, None).await?
            {
                while output.next().await.is_some() {}
            }
            Ok::<(), bollard::errors::Error>(())
        };
        match tokio::time::timeout(KILL_GRACE, run).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %short(&e.to_string()), "killing an exec"),
            Err(_) => tracing::warn!("killing an exec timed out"),
        }
    }

    /// Checks and starts an exec; returns the container id, the exec id, its
    /// marker and its output stream.
    async fn start_exec(&self, sandbox_id: &str, spec: &ExecSpec) -> Result<Started, RuntimeError> {
        let container = self.running(sandbox_id).await?;
        if spec.command.trim().is_empty() {
            return Err(RuntimeError::Invalid("empty command".into()));
        }
        let workdir = self.workdir(sandbox_id, spec.workdir.as_deref())?;
        let marker = crate::testing::random_sandbox_id()[3..].to_string();
        let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.push(format!("{EXEC_MARKER}={marker}"));
        let cmd = match spec.mode {
            ExecMode::Shell => vec![
                "/bin/sh".to_string(),
                "-c".into(),
                shell_line(&spec.command, &spec.args),
            ],
            ExecMode::Argv => {
                let mut v = vec![
                    "/bin/sh".to_string(),
                    "-c".into(),
                    "exec \"$0\" \"$@\"".into(),
                    spec.command.clone(),
                ];
                v.extend(spec.args.iter().cloned());
                v
            }
        };
        let cfg = CreateExecOptions {
            cmd: Some(cmd),
            env: Some(env),
            user: Some(self.opts.user.clone()),
            working_dir: Some(workdir),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            attach_stdin: Some(false),
            tty: Some(false),
            ..CreateExecOptions::default()
        };
        let exec = self
            .docker
            .create_exec(&container, cfg)
            .await
            .map_err(|e| api_err(&format!("sandbox {sandbox_id}"), e))?;
        let opts = StartExecOptions {
            detach: false,
            tty: false,
            output_capacity: Some(64 * 1024),
        };
        match self.docker.start_exec(&exec.id, Some(opts)).await {
            Ok(StartExecResults::Attached { output, .. }) => Ok(Started {
                container,
                exec_id: exec.id,
                marker,
                output,
            }),
            Ok(StartExecResults::Detached) => {
                Err(RuntimeError::Internal("exec started detached".into()))
            }
            Err(e) => Err(api_err(&format!("sandbox {sandbox_id}"), e)),
        }
    }

    /// The exec's working directory in the container. Inside `/workspace` it
    /// is checked on the host (missing: `NotFound`; escaping: `InvalidPath`).
    fn workdir(&self, sandbox_id: &str, workdir: Option<&str>) -> Result<String, RuntimeError> {
        let workdir = workdir.unwrap_or(WORKSPACE);
        let root = self.files_root(sandbox_id);
        let host = confine(&root, workdir)?;
        let in_sandbox = crate::sandbox_path(&root, &host);
        if in_sandbox == WORKSPACE || in_sandbox.starts_with("/workspace/") {
            match std::fs::metadata(&host) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(RuntimeError::InvalidPath {
                        path: workdir.to_string(),
                        reason: "not a directory".into(),
                    });
                }
                Err(e) => return Err(files::fs_err(workdir, e)),
            }
        }
        Ok(in_sandbox)
    }

    /// The exit code of a finished exec (polling briefly while dockerd
    /// catches up with the stream's end).
    async fn exit_code(&self, exec_id: &str) -> i32 {
        for _ in 0..50 {
            match self.docker.inspect_exec(exec_id).await {
                Ok(r) if r.running != Some(true) => {
                    return r
                        .exit_code
                        .and_then(|c| i32::try_from(c).ok())
                        .unwrap_or(-1);
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(_) => return -1,
            }
        }
        -1
    }

    /// Gives ownership of `host` and its parents up to the workspace to the
    /// sandbox user when root owns them (files the API created).
    fn own(&self, sandbox_id: &str, path: &str) {
        let root = self.files_root(sandbox_id);
        let workspace = root.join("workspace");
        let Ok(host) = confine(&root, path) else {
            return;
        };
        let mut p = host.as_path();
        while p.starts_with(&workspace) && p != workspace {
            if let Ok(m) = std::fs::symlink_metadata(p)
                && std::os::unix::fs::MetadataExt::uid(&m) == 0
            {
                let _ = std::os::unix::fs::lchown(p, Some(self.uid), Some(self.gid));
            }
            match p.parent() {
                Some(parent) => p = parent,
                None => break,
            }
        }
    }
}

/// A started exec.
struct Started {
    container: String,
    exec_id: String,
    marker: String,
    output: std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>,
    >,
}

#[async_trait]
impl Runtime for DockerRuntime {
    fn name(&self) -> &str {
        &self.opts.name
    }

    async fn health(&self) -> Result<(), RuntimeError> {
        let info = tokio::time::timeout(HEALTH_TIMEOUT, self.docker.info())
            .await
            .map_err(|_| RuntimeError::Unavailable("dockerd does not answer".into()))?
            .map_err(|e| {
                RuntimeError::Unavailable(format!("dockerd: {}", short(&e.to_string())))
            })?;
        let registered = info
            .runtimes
            .as_ref()
            .is_some_and(|r| r.contains_key(&self.opts.oci_runtime));
        if !registered {
            return Err(RuntimeError::Unavailable(format!(
                "the OCI runtime {} is not registered with dockerd",
                self.opts.oci_runtime
            )));
        }
        Ok(())
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<RuntimeSandbox, RuntimeError> {
        crate::mock::validate_id(&spec.sandbox_id)?;
        if spec.image.trim().is_empty() {
            return Err(RuntimeError::Invalid("image is empty".into()));
        }
        self.ensure_image(&spec.image).await?;
        let id = spec.sandbox_id.as_str();
        let workspace = self.files_root(id).join("workspace");
        let existed = self.sandbox_dir(id).exists();
        std::fs::create_dir_all(&workspace)
            .map_err(|e| RuntimeError::Internal(format!("creating the workspace of {id}: {e}")))?;
        std::os::unix::fs::chown(&workspace, Some(self.uid), Some(self.gid))
            .map_err(|e| RuntimeError::Internal(format!("chown of the workspace of {id}: {e}")))?;
        match self.start(spec, &workspace).await {
            Ok(container) => Ok(RuntimeSandbox {
                sandbox_id: id.to_string(),
                runtime_id: container,
                state: RuntimeState::Running,
                image: spec.image.clone(),
                labels: spec.labels.clone(),
                generation: spec.generation,
            }),
            Err(e @ RuntimeError::AlreadyExists(_)) => Err(e),
            Err(e) => {
                if !existed {
                    let _ = std::fs::remove_dir_all(self.sandbox_dir(id));
                }
                Err(e)
            }
        }
    }

    async fn status(&self, sandbox_id: &str) -> Result<RuntimeSandbox, RuntimeError> {
        let c = self.inspect(sandbox_id).await?;
        let labels = c
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        let running = c.state.as_ref().and_then(|s| s.running).unwrap_or(false);
        Ok(self.describe(&labels, c.id.as_deref().unwrap_or_default(), running))
    }

    async fn list(&self) -> Result<Vec<RuntimeSandbox>, RuntimeError> {
        let filters = HashMap::from([(
            "label",
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_RUNTIME}={}", self.opts.name),
                format!("{LABEL_INSTANCE}={}", self.opts.instance),
            ],
        )]);
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(|e| api_err("listing containers", e))?;
        let mut out: Vec<RuntimeSandbox> = containers
            .into_iter()
            .map(|c| {
                let running = matches!(
                    c.state,
                    Some(bollard::models::ContainerSummaryStateEnum::RUNNING)
                );
                self.describe(
                    &c.labels.unwrap_or_default(),
                    c.id.as_deref().unwrap_or_default(),
                    running,
                )
            })
            .collect();
        out.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
        Ok(out)
    }

    async fn destroy(&self, sandbox_id: &str) -> Result<(), RuntimeError> {
        let c = match self.inspect(sandbox_id).await {
            Ok(c) => c,
            Err(e @ RuntimeError::NotFound(_)) => {
                // A directory without a container: a half-finished destroy.
                let _ = std::fs::remove_dir_all(self.sandbox_dir(sandbox_id));
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        self.remove_everything(sandbox_id, c.id.as_deref()).await;
        Ok(())
    }

    async fn exec(&self, sandbox_id: &str, spec: &ExecSpec) -> Result<ExecOutput, RuntimeError> {
        let started_at = Instant::now();
        let mut started = self.start_exec(sandbox_id, spec).await?;
        let deadline = spec.timeout.map(|t| tokio::time::Instant::now() + t);
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut timed_out = false;
        loop {
            let next = match deadline {
                Some(at) => match tokio::time::timeout_at(at, started.output.next()).await {
                    Ok(item) => item,
                    Err(_) => {
                        timed_out = true;
                        break;
                    }
                },
                None => started.output.next().await,
            };
            match next {
                Some(Ok(LogOutput::StdOut { message })) => append_capped(&mut stdout, &message),
                Some(Ok(LogOutput::StdErr { message })) => append_capped(&mut stderr, &message),
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %short(&e.to_string()), "exec output ended");
                    break;
                }
                None => break,
            }
        }
        if timed_out {
            self.kill_exec(&started.container, &started.marker).await;
            // Output the killed processes still had in flight.
            let _ = tokio::time::timeout(KILL_GRACE, async {
                while let Some(Ok(item)) = started.output.next().await {
                    match item {
                        LogOutput::StdOut { message } => append_capped(&mut stdout, &message),
                        LogOutput::StdErr { message } => append_capped(&mut stderr, &message),
                        _ => {}
                    }
                }
            })
            .await;
        }
        let exit_code = if timed_out {
            -1
        } else {
            self.exit_code(&started.exec_id).await
        };
        Ok(ExecOutput {
            exit_code,
            stdout,
            stderr,
            timed_out,
            duration_ms: u64::try_from(started_at.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }

    async fn exec_stream(
        &self,
        sandbox_id: &str,
        spec: &ExecSpec,
    ) -> Result<mpsc::Receiver<ExecChunk>, RuntimeError> {
        let started_at = Instant::now();
        let mut started = self.start_exec(sandbox_id, spec).await?;
        let deadline = spec.timeout.map(|t| tokio::time::Instant::now() + t);
        let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
        let this = self.clone();
        tokio::spawn(async move {
            let sleep_until = |at: Option<tokio::time::Instant>| async move {
                match at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let mut timed_out = false;
            loop {
                tokio::select! {
                    item = started.output.next() => {
                        let chunk = match item {
                            Some(Ok(LogOutput::StdOut { message })) => ExecChunk::Stdout(message),
                            Some(Ok(LogOutput::StdErr { message })) => ExecChunk::Stderr(message),
                            Some(Ok(_)) => continue,
                            Some(Err(_)) | None => break,
                        };
                        tokio::select! {
                            sent = tx.send(chunk) => if sent.is_err() {
                                this.kill_exec(&started.container, &started.marker).await;
                                return;
                            },
                            _ = sleep_until(deadline) => { timed_out = true; break; }
                        }
                    }
                    _ = tx.closed() => {
                        this.kill_exec(&started.container, &started.marker).await;
                        return;
                    }
                    _ = sleep_until(deadline) => { timed_out = true; break; }
                }
            }
            let exit_code = if timed_out {
                this.kill_exec(&started.container, &started.marker).await;
                -1
            } else {
                this.exit_code(&started.exec_id).await
            };
            let _ = tx
                .send(ExecChunk::Exit {
                    exit_code,
                    timed_out,
                    duration_ms: u64::try_from(started_at.elapsed().as_millis())
                        .unwrap_or(u64::MAX),
                })
                .await;
        });
        Ok(rx)
    }

    async fn write_file(
        &self,
        sandbox_id: &str,
        path: &str,
        mode: u32,
        body: ByteReader,
    ) -> Result<u64, RuntimeError> {
        let root = self.files(sandbox_id, path).await?;
        let n = files::write(&root, path, mode, body).await?;
        self.own(sandbox_id, path);
        Ok(n)
    }

    async fn read_file(
        &self,
        sandbox_id: &str,
        path: &str,
    ) -> Result<(u64, ByteReader), RuntimeError> {
        files::read(&self.files(sandbox_id, path).await?, path).await
    }

    async fn list_files(
        &self,
        sandbox_id: &str,
        path: &str,
    ) -> Result<Vec<FileInfo>, RuntimeError> {
        let root = self.files(sandbox_id, path).await?;
        let path = path.to_string();
        files::blocking(move || files::list(&root, &path)).await
    }

    async fn stat(&self, sandbox_id: &str, path: &str) -> Result<FileInfo, RuntimeError> {
        files::stat(&self.files(sandbox_id, path).await?, path)
    }

    async fn glob(&self, sandbox_id: &str, pattern: &str) -> Result<Vec<String>, RuntimeError> {
        let root = self.files(sandbox_id, pattern).await?;
        let pattern = pattern.to_string();
        files::blocking(move || files::glob(&root, &pattern)).await
    }

    async fn rename(&self, sandbox_id: &str, from: &str, to: &str) -> Result<(), RuntimeError> {
        workspace_only(to)?;
        files::rename(&self.files(sandbox_id, from).await?, from, to)?;
        self.own(sandbox_id, to);
        Ok(())
    }

    async fn chmod(&self, sandbox_id: &str, path: &str, mode: u32) -> Result<(), RuntimeError> {
        files::chmod(&self.files(sandbox_id, path).await?, path, mode)
    }

    async fn remove(
        &self,
        sandbox_id: &str,
        path: &str,
        recursive: bool,
    ) -> Result<(), RuntimeError> {
        let root = self.files(sandbox_id, path).await?;
        let path = path.to_string();
        files::blocking(move || files::remove(&root, &path, recursive)).await
    }

    async fn logs(&self, sandbox_id: &str, lines: usize) -> Result<Vec<String>, RuntimeError> {
        self.inspect(sandbox_id).await?;
        let opts = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .tail(&lines.to_string())
            .build();
        let mut stream = self
            .docker
            .logs(&self.container_name(sandbox_id), Some(opts));
        let mut text = Vec::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(out) => text.extend_from_slice(&out.into_bytes()),
                Err(e) => return Err(api_err(&format!("sandbox {sandbox_id}"), e)),
            }
        }
        let text = String::from_utf8_lossy(&text);
        let all: Vec<&str> = text.lines().collect();
        let skip = all.len().saturating_sub(lines);
        Ok(all[skip..].iter().map(|l| l.to_string()).collect())
    }
}

impl DockerRuntime {
    /// Sends SIGKILL to the container's main process (tests: a sandbox
    /// dying behind the runtime's back).
    pub async fn kill_main(&self, sandbox_id: &str) -> Result<(), RuntimeError> {
        let opts = KillContainerOptionsBuilder::default()
            .signal("SIGKILL")
            .build();
        self.docker
            .kill_container(&self.container_name(sandbox_id), Some(opts))
            .await
            .map_err(|e| api_err(&format!("sandbox {sandbox_id}"), e))
    }

    /// `docker import`: makes image `tag` from a root filesystem tarball.
    pub async fn import_rootfs(&self, tarball: Bytes, tag: &str) -> Result<(), RuntimeError> {
        let (repo, version) = split_tag(tag);
        let opts = CreateImageOptionsBuilder::default()
            .from_src("-")
            .repo(repo)
            .tag(version)
            .build();
        let mut progress =
            self.docker
                .create_image(Some(opts), Some(bollard::body_full(tarball)), None);
        while let Some(item) = progress.next().await {
            item.map_err(|e| api_err(&format!("importing {tag}"), e))?;
        }
        self.docker
            .inspect_image(tag)
            .await
            .map_err(|e| api_err(&format!("image {tag} after the import"), e))?;
        Ok(())
    }
}

/// `repo[:tag]` → (`repo`, `tag` or `latest`); a `:` in a registry host
/// (`host:5000/repo`) is not a tag.
pub fn split_tag(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') && !repo.is_empty() => (repo, tag),
        _ => (image, "latest"),
    }
}

/// Refuses in-sandbox paths outside `/workspace` (files of runtimes whose
/// root filesystem belongs to an image). Relative paths are in `/workspace`.
pub(crate) fn workspace_only(path: &str) -> Result<(), RuntimeError> {
    // `/` itself reaches the file layer, which refuses to remove it and
    // lists only `/workspace` in it.
    if !path.starts_with('/') || path == "/" || path == WORKSPACE || path.starts_with("/workspace/")
    {
        return Ok(());
    }
    Err(RuntimeError::InvalidPath {
        path: path.to_string(),
        reason: "file operations are limited to /workspace on this runtime".into(),
    })
}

fn parse_user(user: &str) -> Result<(u32, u32), RuntimeError> {
    let bad = || {
        RuntimeError::Invalid(format!(
            "docker user {user:?} must be numeric uid:gid (for example 1000:1000)"
        ))
    };
    let (u, g) = user.split_once(':').unwrap_or((user, user));
    Ok((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?))
}

fn append_capped(buf: &mut Vec<u8>, data: &[u8]) {
    let room = OUTPUT_CAP.saturating_sub(buf.len());
    buf.extend_from_slice(&data[..data.len().min(room)]);
}

fn status_of(e: &bollard::errors::Error) -> Option<u16> {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// First line, bounded: dockerd messages can be long.
fn short(s: &str) -> String {
    let line = s.lines().next().unwrap_or("");
    line.chars().take(300).collect()
}

/// Maps an Engine API error about `what` to a runtime error.
fn api_err(what: &str, e: bollard::errors::Error) -> RuntimeError {
    use bollard::errors::Error as E;
    match &e {
        E::DockerResponseServerError {
            status_code,
            message,
        } => match status_code {
            404 => RuntimeError::NotFound(what.to_string()),
            409 => RuntimeError::Invalid(format!("{what}: {}", short(message))),
            400 => RuntimeError::Invalid(format!("{what}: {}", short(message))),
            _ => RuntimeError::Internal(format!("{what}: dockerd: {}", short(message))),
        },
        E::RequestTimeoutError => {
            RuntimeError::Unavailable(format!("{what}: dockerd did not answer in time"))
        }
        // Cannot reach the daemon (stopped, restarting, socket gone): the
        // sandbox's fate is unknown, never "not found".
        E::IOError { .. }
        | E::HyperResponseError { .. }
        | E::HyperLegacyError { .. }
        | E::SocketNotFoundError(_) => RuntimeError::Unavailable(format!(
            "{what}: dockerd is not reachable: {}",
            short(&e.to_string())
        )),
        _ => RuntimeError::Internal(format!("{what}: {}", short(&e.to_string()))),
    }
}

/// Kills the host processes a container left behind (runsc sandbox and
/// gofer, containerd shims): processes whose command line names the
/// container's full id. Only ever processes started for this container.
async fn reap_leftovers(container_id: &str) {
    let needle = container_id.as_bytes().to_vec();
    for attempt in 0..10 {
        let pids: Vec<u32> = match std::fs::read_dir("/proc") {
            Ok(entries) => entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle.as_slice()))
                })
                .collect(),
            Err(_) => return,
        };
        if pids.is_empty() {
            return;
        }
        // The shim exits by itself once dockerd removed the container; give
        // it a moment before killing.
        if attempt >= 3 {
            tracing::warn!(container = %&container_id[..12], ?pids, "killing processes a container left behind");
            crate::process::kill_pids(&pids);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        for (image, want) in [
            ("busybox", ("busybox", "latest")),
            ("busybox:1.36", ("busybox", "1.36")),
            ("stacyvm-test/busybox:1", ("stacyvm-test/busybox", "1")),
            ("host:5000/repo", ("host:5000/repo", "latest")),
            ("host:5000/repo:v2", ("host:5000/repo", "v2")),
        ] {
            assert_eq!(split_tag(image), want, "{image}");
        }
    }

    #[test]
    fn workspace_paths() {
        for ok in ["a.txt", "/workspace", "/workspace/a", "dir/b"] {
            assert!(workspace_only(ok).is_ok(), "{ok}");
        }
        for bad in ["/etc/passwd", "/workspacex/a", "/tmp", "//etc"] {
            assert!(workspace_only(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn users() {
        assert_eq!(parse_user("1000:1000").ok(), Some((1000, 1000)));
        assert_eq!(parse_user("0").ok(), Some((0, 0)));
        assert!(parse_user("sandbox").is_err());
    }
}
