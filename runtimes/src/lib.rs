//! Sandbox runtimes behind one contract.
//!
//! Owns: the [`Runtime`] trait every backend implements, the wire-neutral
//! types it speaks ([`SpawnSpec`], [`ExecSpec`], [`ExecChunk`], [`FileInfo`]),
//! the one error enum [`RuntimeError`], path confinement ([`confine`]), and the
//! contract suite every backend runs ([`testing`]).
//!
//! Does not own: leases, placement or fencing (the worker agent in
//! `stacyvm-node` decides *whether* to call a runtime; a runtime only does
//! what it is told), nor any network I/O.
//!
//! Paths given to a runtime are paths *inside* the sandbox (`/workspace/a.txt`
//! or relative to the exec workdir). Every backend resolves them through
//! [`confine`], which refuses `..` components, NUL bytes and symlinks that
//! lead outside the sandbox.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

pub mod docker;
pub mod firecracker;
pub mod mock;
mod process;
pub mod proot;
pub mod sys;
pub mod testing;

/// The default working directory of every sandbox.
pub const WORKSPACE: &str = "/workspace";

/// What to start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnSpec {
    /// `sb-…`: the control plane's ID; runtimes label their resources with it.
    pub sandbox_id: String,
    pub image: String,
    pub memory_mb: i64,
    pub vcpus: i64,
    /// Base environment of every exec in this sandbox.
    pub env: BTreeMap<String, String>,
    /// Labels kept with the sandbox so a restarted worker can adopt it.
    pub labels: BTreeMap<String, String>,
    /// Lease generation the sandbox was started under (evidence and adoption).
    pub generation: i64,
}

/// A sandbox as the runtime knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeSandbox {
    pub sandbox_id: String,
    /// The runtime's own handle (container ID, directory name...).
    pub runtime_id: String,
    pub state: RuntimeState,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    pub generation: i64,
}

/// Liveness as the runtime sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeState {
    Running,
    /// The sandbox exists but its main process is gone.
    Stopped,
}

/// How `command` is run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecMode {
    /// `sh -c "<command> <args single-quoted>"`.
    #[default]
    Shell,
    /// `command` is the program, `args` its arguments; no shell.
    Argv,
}

/// One command to run in a sandbox.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    pub command: String,
    pub args: Vec<String>,
    pub mode: ExecMode,
    /// Merged over the sandbox's base environment.
    pub env: BTreeMap<String, String>,
    /// In-sandbox directory; [`WORKSPACE`] when `None`.
    pub workdir: Option<String>,
    /// On expiry the whole process tree is killed and the result says so.
    pub timeout: Option<Duration>,
}

/// The outcome of a finished exec.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    /// The process's exit code; `-1` when it was killed by a signal or the timeout.
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub timed_out: bool,
    pub duration_ms: u64,
}

/// One piece of a streamed exec; the last item is always [`ExecChunk::Exit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecChunk {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit {
        exit_code: i32,
        timed_out: bool,
        duration_ms: u64,
    },
}

/// A file or directory inside a sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// In-sandbox absolute path.
    pub path: String,
    pub size: u64,
    /// Permission bits (`0o644`).
    pub mode: u32,
    pub is_dir: bool,
    /// RFC 3339.
    pub mod_time: String,
}

/// A byte stream handed to or from a runtime (file bodies).
pub type ByteReader = Pin<Box<dyn AsyncRead + Send>>;

/// Why a runtime call failed. Codes are stable; messages never hold secrets.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum RuntimeError {
    /// The sandbox (or the file) does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A path leaves the sandbox, holds `..` or NUL, or is otherwise unusable.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath { path: String, reason: String },
    /// A well-formed request this runtime cannot honour (bad image, bad mode).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The sandbox already exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The runtime itself is not usable on this host (daemon down, binary missing).
    #[error("runtime unavailable: {0}")]
    Unavailable(String),
    /// The sandbox's disk (or its quota) is full; nothing partial is kept.
    #[error("no space left: {0}")]
    NoSpace(String),
    /// Anything else (I/O errors, runtime bugs).
    #[error("runtime failure: {0}")]
    Internal(String),
}

impl RuntimeError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            RuntimeError::NotFound(_) => "NOT_FOUND",
            RuntimeError::InvalidPath { .. } => "INVALID_PATH",
            RuntimeError::Invalid(_) => "BAD_REQUEST",
            RuntimeError::AlreadyExists(_) => "CONFLICT",
            RuntimeError::Unavailable(_) => "UNAVAILABLE",
            RuntimeError::NoSpace(_) => "NO_SPACE",
            RuntimeError::Internal(_) => "INTERNAL_ERROR",
        }
    }

    pub(crate) fn io(what: &str, e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::NotFound {
            RuntimeError::NotFound(what.to_string())
        } else {
            RuntimeError::Internal(format!("{what}: {e}"))
        }
    }
}

/// One sandbox backend. Every method is safe to call concurrently; every
/// implementation runs the [`testing`] contract suite.
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Short name the spawn API selects it by (`mock`, `docker`, `gvisor`...).
    fn name(&self) -> &str;

    /// Can this host run sandboxes with this runtime right now?
    async fn health(&self) -> Result<(), RuntimeError>;

    /// Starts a sandbox; `AlreadyExists` if `sandbox_id` runs here already.
    async fn spawn(&self, spec: &SpawnSpec) -> Result<RuntimeSandbox, RuntimeError>;

    /// Current state; `NotFound` once destroyed.
    async fn status(&self, sandbox_id: &str) -> Result<RuntimeSandbox, RuntimeError>;

    /// Every sandbox this runtime holds on this host (for adoption after a restart).
    async fn list(&self) -> Result<Vec<RuntimeSandbox>, RuntimeError>;

    /// Stops and removes everything of the sandbox. `NotFound` if already gone.
    async fn destroy(&self, sandbox_id: &str) -> Result<(), RuntimeError>;

    /// Runs a command to completion (or its timeout).
    async fn exec(&self, sandbox_id: &str, spec: &ExecSpec) -> Result<ExecOutput, RuntimeError>;

    /// Runs a command, streaming its output; the channel ends with [`ExecChunk::Exit`].
    /// Dropping the receiver kills the process tree.
    async fn exec_stream(
        &self,
        sandbox_id: &str,
        spec: &ExecSpec,
    ) -> Result<mpsc::Receiver<ExecChunk>, RuntimeError>;

    /// Writes `body` to `path` (parents created), then sets `mode`. Returns bytes written.
    async fn write_file(
        &self,
        sandbox_id: &str,
        path: &str,
        mode: u32,
        body: ByteReader,
    ) -> Result<u64, RuntimeError>;

    /// Opens `path` for reading; returns its size and a stream of its bytes.
    async fn read_file(
        &self,
        sandbox_id: &str,
        path: &str,
    ) -> Result<(u64, ByteReader), RuntimeError>;

    /// Entries of a directory, sorted by path.
    async fn list_files(&self, sandbox_id: &str, path: &str)
    -> Result<Vec<FileInfo>, RuntimeError>;

    async fn stat(&self, sandbox_id: &str, path: &str) -> Result<FileInfo, RuntimeError>;

    /// In-sandbox paths matching a glob pattern (`*` does not cross `/`), sorted.
    async fn glob(&self, sandbox_id: &str, pattern: &str) -> Result<Vec<String>, RuntimeError>;

    async fn rename(&self, sandbox_id: &str, from: &str, to: &str) -> Result<(), RuntimeError>;

    async fn chmod(&self, sandbox_id: &str, path: &str, mode: u32) -> Result<(), RuntimeError>;

    /// Removes a file, or a directory (`recursive` required when not empty).
    async fn remove(
        &self,
        sandbox_id: &str,
        path: &str,
        recursive: bool,
    ) -> Result<(), RuntimeError>;

    /// The last `lines` lines of the sandbox's own log.
    async fn logs(&self, sandbox_id: &str, lines: usize) -> Result<Vec<String>, RuntimeError>;
}

/// Resolves an in-sandbox path against `root` (the sandbox's filesystem root
/// on the host). Relative paths are taken from [`WORKSPACE`].
///
/// Refuses NUL bytes and any `..` component outright (never normalised away),
/// and, for paths that exist, a symlink chain resolving outside `root`.
pub fn confine(root: &Path, path: &str) -> Result<PathBuf, RuntimeError> {
    let bad = |reason: &str| RuntimeError::InvalidPath {
        path: path.to_string(),
        reason: reason.to_string(),
    };
    if path.is_empty() {
        return Err(bad("empty path"));
    }
    if path.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    if path.len() > 4096 {
        return Err(bad("longer than 4096 bytes"));
    }
    let in_sandbox = if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        Path::new(WORKSPACE).join(path)
    };
    let mut out = root.to_path_buf();
    for c in in_sandbox.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(p) => out.push(p),
            Component::ParentDir => return Err(bad("`..` is not allowed")),
            Component::Prefix(_) => return Err(bad("not a unix path")),
        }
    }
    // Symlinks: the deepest existing ancestor must resolve inside the root.
    let root_real = std::fs::canonicalize(root).map_err(|e| RuntimeError::io("sandbox root", e))?;
    let mut probe = out.as_path();
    loop {
        match std::fs::canonicalize(probe) {
            Ok(real) => {
                if !real.starts_with(&root_real) {
                    return Err(bad("resolves outside the sandbox"));
                }
                break;
            }
            Err(_) => match probe.parent() {
                Some(p) if p.starts_with(root) => probe = p,
                _ => break,
            },
        }
    }
    Ok(out)
}

/// The in-sandbox form of a host path under `root` (`/` + relative part).
pub fn sandbox_path(root: &Path, host: &Path) -> String {
    match host.strip_prefix(root) {
        Ok(rel) if rel.as_os_str().is_empty() => "/".to_string(),
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => host.display().to_string(),
    }
}

/// Quotes `args` for `sh -c` (single quotes, embedded quotes escaped).
pub fn shell_line(command: &str, args: &[String]) -> String {
    let mut line = command.to_string();
    for a in args {
        line.push(' ');
        line.push('\'');
        line.push_str(&a.replace('\'', "'\\''"));
        line.push('\'');
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confine_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("workspace")).expect("mkdir");
        std::os::unix::fs::symlink("/etc", root.join("workspace/out")).expect("symlink");
        std::os::unix::fs::symlink(root.join("workspace"), root.join("in")).expect("symlink");
        let cases: &[(&str, Option<&str>)] = &[
            ("/workspace/a.txt", Some("workspace/a.txt")),
            ("a.txt", Some("workspace/a.txt")),
            ("/", Some("")),
            ("/in/x", Some("in/x")),
            ("../etc/passwd", None),
            ("/workspace/../../etc", None),
            ("/workspace/out/passwd", None),
            ("/workspace/out", None),
            ("a\0b", None),
            ("", None),
        ];
        for (input, want) in cases {
            let got = confine(root, input);
            match want {
                Some(rel) => assert_eq!(
                    got.as_ref().ok(),
                    Some(&root.join(rel)),
                    "{input:?} -> {got:?}"
                ),
                None => assert!(
                    matches!(got, Err(RuntimeError::InvalidPath { .. })),
                    "{input:?} -> {got:?}"
                ),
            }
        }
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(
            shell_line("echo", &["a b".into(), "it's".into()]),
            "echo 'a b' 'it'\\''s'"
        );
    }
}
