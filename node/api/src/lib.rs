//! StacyVM wire types, shared by the replicas, the worker agent, the typed
//! client and the CLI.
//!
//! Owns: JSON shapes of the REST API (`/api/v1/...`), the worker heartbeat and
//! the worker RPC, and the small validators every edge applies the same way
//! (IDs, durations, file modes). Requests reject unknown fields.
//!
//! Does not own: behaviour. Field names follow the earlier StacyVM API
//! (`provider` is accepted as an alias of `runtime`, `sb-` sandbox IDs, Go
//! duration strings such as `"30m"`), so existing clients keep working.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The error body every API and RPC failure carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    #[serde(default)]
    pub request_id: String,
}

/// Stable error codes (the earlier API's codes plus the cluster ones).
pub mod codes {
    pub const BAD_REQUEST: &str = "BAD_REQUEST";
    pub const NOT_FOUND: &str = "NOT_FOUND";
    pub const CONFLICT: &str = "CONFLICT";
    pub const UNAUTHORIZED: &str = "UNAUTHORIZED";
    pub const FORBIDDEN: &str = "FORBIDDEN";
    pub const TIMEOUT: &str = "TIMEOUT";
    pub const RESOURCE_LIMIT: &str = "RESOURCE_LIMIT";
    pub const UNAVAILABLE: &str = "UNAVAILABLE";
    pub const INTERNAL_ERROR: &str = "INTERNAL_ERROR";
    /// The sandbox's disk is full (HTTP 507); the write left nothing behind.
    pub const NO_SPACE: &str = "NO_SPACE";
    pub const NO_LEADER: &str = "NO_LEADER";
    /// No online worker offers the runtime with free capacity.
    pub const NO_ELIGIBLE_WORKER: &str = "NO_ELIGIBLE_WORKER";
    /// No worker in the cluster offers this runtime at all.
    pub const UNKNOWN_RUNTIME: &str = "UNKNOWN_RUNTIME";
    /// A path holds `..`, NUL, or leaves the sandbox.
    pub const INVALID_PATH: &str = "INVALID_PATH";
    /// The sandbox is destroyed, lost or otherwise not running.
    pub const SANDBOX_NOT_RUNNING: &str = "SANDBOX_NOT_RUNNING";
    /// The owning worker did not answer (it may have died mid-call).
    pub const WORKER_UNAVAILABLE: &str = "WORKER_UNAVAILABLE";
    /// A worker refused a call carrying an older lease generation.
    pub const STALE_GENERATION: &str = "STALE_GENERATION";
    /// This replica is not the leader (worker-facing routes only).
    pub const NOT_LEADER: &str = "NOT_LEADER";
}

// ---------------------------------------------------------------- sandboxes

/// `POST /api/v1/sandboxes`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    #[serde(default)]
    pub image: String,
    /// `mock`, `docker`, `gvisor`, ... (`provider` in the earlier API).
    #[serde(default, alias = "provider")]
    pub runtime: String,
    #[serde(default)]
    pub memory_mb: Option<i64>,
    #[serde(default)]
    pub vcpus: Option<i64>,
    /// Go duration (`"30m"`) or whole seconds.
    #[serde(default)]
    pub ttl: Option<DurationValue>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub owner_id: String,
    #[serde(default)]
    pub tenant_id: String,
    /// Spawn from this template (its image, runtime, sizes, env, setup).
    #[serde(default)]
    pub template: String,
    /// Only `none` (or empty) is supported by the mock runtime.
    #[serde(default)]
    pub network_mode: String,
}

/// A duration on the wire: a Go duration string or a number of seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DurationValue {
    Seconds(u64),
    Text(String),
}

impl DurationValue {
    pub fn parse(&self) -> Result<Duration, String> {
        match self {
            DurationValue::Seconds(s) => Ok(Duration::from_secs(*s)),
            DurationValue::Text(t) => parse_duration(t),
        }
    }
}

/// A sandbox as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    pub id: String,
    pub state: String,
    pub runtime: String,
    /// Same as `runtime` (the earlier API's name).
    pub provider: String,
    pub image: String,
    pub memory_mb: i64,
    pub vcpus: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vm_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub worker_id: String,
    /// Fencing generation of the lease the sandbox runs under (0: none).
    #[serde(default)]
    pub generation: i64,
    pub created_at: String,
    pub updated_at: String,
    pub expires_at: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// `POST /api/v1/sandboxes/{id}/extend`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendRequest {
    pub ttl: DurationValue,
}

/// `POST /api/v1/sandboxes/{id}/exec` (and the first WebSocket frame).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// `shell` (default) or `argv`.
    #[serde(default)]
    pub mode: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub workdir: String,
    #[serde(default)]
    pub timeout: Option<DurationValue>,
    /// Answer as NDJSON chunks ending in an exit line.
    #[serde(default)]
    pub stream: bool,
}

/// A finished exec.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    /// Go duration string (`"12ms"`), as the earlier API.
    pub duration: String,
    pub duration_ms: u64,
    #[serde(default)]
    pub timed_out: bool,
}

/// One NDJSON line (and WebSocket text frame) of a streamed exec. Output lines
/// carry `stream` + `data`; the last line carries `exit_code` (or `error`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStreamLine {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timed_out: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// A failure that ended the stream early (`{code, message}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// WebSocket only: `"done"` on the final frame.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// A file or directory in a sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub path: String,
    pub size: u64,
    /// Octal permission string, e.g. `"0644"`.
    pub mode: String,
    pub is_dir: bool,
    pub mod_time: String,
}

/// `POST /api/v1/sandboxes/{id}/files` (the earlier JSON upload; UTF-8 text only).
/// Binary content goes through `PUT .../files?path=` with a raw body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFileRequest {
    pub path: String,
    pub content: String,
    #[serde(default)]
    pub mode: Option<FileMode>,
}

/// `POST .../files/move`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    pub old_path: String,
    pub new_path: String,
}

/// `POST .../files/chmod`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChmodRequest {
    pub path: String,
    pub mode: FileMode,
}

/// A permission mode: an octal string (`"0755"`, `"755"`) or a number (`493`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FileMode {
    Number(u32),
    Octal(String),
}

impl FileMode {
    pub fn bits(&self) -> Result<u32, String> {
        let bits = match self {
            FileMode::Number(n) => *n,
            FileMode::Octal(s) => {
                let t = s.trim_start_matches("0o");
                u32::from_str_radix(t, 8).map_err(|_| format!("mode {s:?} is not octal"))?
            }
        };
        if bits > 0o7777 {
            return Err(format!("mode {bits:o} is out of range"));
        }
        Ok(bits)
    }
}

/// Formats permission bits the way [`FileInfo::mode`] shows them.
pub fn mode_string(bits: u32) -> String {
    format!("{:04o}", bits & 0o7777)
}

/// A plain `{"status": "..."}` acknowledgement (earlier API shape).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    pub status: String,
}

// ---------------------------------------------------------------- templates, quotas

/// A template as the API shows and accepts it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub name: String,
    #[serde(default)]
    pub version: i64,
    pub image: String,
    #[serde(default)]
    pub description: String,
    #[serde(default, alias = "provider")]
    pub runtime: String,
    /// Shell commands run in order right after spawn; a failure fails the spawn.
    #[serde(default)]
    pub setup: Vec<String>,
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub memory_mb: i64,
    #[serde(default, alias = "vcpus")]
    pub cpu_cores: i64,
    #[serde(default)]
    pub ttl_seconds: i64,
    #[serde(default, skip_deserializing)]
    pub created_at: String,
    #[serde(default, skip_deserializing)]
    pub updated_at: String,
}

/// `POST /api/v1/templates/{name}/spawn`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpawnRequest {
    #[serde(default, alias = "provider")]
    pub runtime: String,
    #[serde(default)]
    pub ttl: Option<DurationValue>,
    #[serde(default)]
    pub owner_id: String,
}

/// `PUT /api/v1/quotas/{owner}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaRequest {
    #[serde(default)]
    pub max_sandboxes: i64,
    #[serde(default)]
    pub max_ttl: Option<DurationValue>,
    #[serde(default)]
    pub max_exec_timeout: Option<DurationValue>,
}

/// An owner quota (durations as Go strings, `"0s"` = unset).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    pub owner_id: String,
    pub max_sandboxes: i64,
    pub max_ttl: String,
    pub max_exec_timeout: String,
    pub created_at: String,
    pub updated_at: String,
}

// ---------------------------------------------------------------- workers

/// A worker as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    pub id: String,
    pub hostname: String,
    /// `online`, `stale`, `offline` or `draining`, as the leader sees it now.
    pub status: String,
    pub runtimes: Vec<String>,
    /// Same as `runtimes` (the earlier API's name).
    pub providers: Vec<String>,
    pub capabilities: Vec<String>,
    pub capacity: BTreeMap<String, i64>,
    pub rpc_url: String,
    pub active_sandboxes: i64,
    pub last_heartbeat: String,
    pub created_at: String,
    pub updated_at: String,
    pub stale: bool,
}

/// A lease a worker holds, as it reports it in a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldLease {
    pub resource_id: String,
    pub generation: i64,
}

/// `POST /api/v1/worker/{id}/heartbeat`: registration, liveness and one batched
/// renewal of every lease the worker holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    #[serde(default)]
    pub hostname: String,
    /// `online` or `draining`.
    #[serde(default)]
    pub status: String,
    /// Runtimes whose health check passed on this host.
    #[serde(default, alias = "providers")]
    pub runtimes: Vec<String>,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub capacity: BTreeMap<String, i64>,
    /// Base URL of the worker's RPC server.
    #[serde(default)]
    pub rpc_url: String,
    #[serde(default)]
    pub leases: Vec<HeldLease>,
}

/// The leader's answer to a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    pub worker: Worker,
    /// Leases renewed until now + `lease_ttl_ms`.
    pub renewed: Vec<HeldLease>,
    /// Leases this worker no longer holds: stop those sandboxes.
    pub lost: Vec<HeldLease>,
    pub lease_ttl_ms: i64,
    pub heartbeat_interval_ms: i64,
    /// This worker's RPC verification keys (hex), active first; sent only to
    /// a worker whose credential is bound to its ID.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rpc_keys: Vec<String>,
    /// Revoked token IDs the worker must refuse on RPC.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_token_ids: Vec<String>,
}

// ---------------------------------------------------------------- worker RPC

/// Header carrying the lease generation on every RPC about a sandbox.
pub const GENERATION_HEADER: &str = "x-stacyvm-generation";
/// Header naming the worker an RPC is meant for.
pub const WORKER_ID_HEADER: &str = "x-worker-id";

/// `POST {rpc_url}/rpc/v1/sandboxes`: start a sandbox under a lease.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpcSpawn {
    pub sandbox_id: String,
    pub image: String,
    pub runtime: String,
    pub memory_mb: i64,
    pub vcpus: i64,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub generation: i64,
    /// Lease TTL in milliseconds, so the worker knows when to fence itself.
    pub lease_ttl_ms: i64,
}

/// A sandbox as a worker reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcSandbox {
    pub sandbox_id: String,
    pub runtime: String,
    pub runtime_id: String,
    /// `running` or `stopped`.
    pub state: String,
    pub generation: i64,
}

/// `POST {rpc_url}/rpc/v1/sandboxes/{id}/exec`: `ExecRequest` fields, minus
/// `stream` (the route decides).
pub type RpcExec = ExecRequest;

// ---------------------------------------------------------------- worker identity

/// `POST /api/v1/admin/worker-tokens` (admin only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueTokenRequest {
    pub worker_id: String,
    /// At most 15 minutes; default 5 minutes.
    #[serde(default)]
    pub ttl: Option<DurationValue>,
    /// Default: `worker:heartbeat` and `worker:lease`.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// `worker:control-plane` (default) or `worker:rpc`.
    #[serde(default)]
    pub audience: String,
}

/// A freshly issued signed worker token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedToken {
    pub token: String,
    pub token_id: String,
    pub worker_id: String,
    pub audience: String,
    pub scopes: Vec<String>,
    pub issued_at: String,
    pub expires_at: String,
}

/// `POST /api/v1/admin/worker-tokens/revoke` (admin only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeTokenRequest {
    /// The token's `jti`.
    pub token_id: String,
    #[serde(default)]
    pub reason: String,
}

/// `POST /api/v1/admin/worker-enrollments` (admin only): a single-use,
/// short-lived enrollment secret for one worker.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentRequest {
    pub worker_id: String,
    /// At most one hour; default ten minutes.
    #[serde(default)]
    pub ttl: Option<DurationValue>,
}

/// The enrollment secret (shown once; the cluster keeps only its hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentIssued {
    pub enroll_token: String,
    pub worker_id: String,
    pub expires_at: String,
}

/// `POST /api/v1/worker/{id}/enroll`: exchange the secret, once, for a
/// per-worker credential.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub enroll_token: String,
}

/// The worker's credential (shown once; the cluster keeps only its hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollReply {
    pub worker_id: String,
    pub worker_token: String,
}

/// Prefix of enrollment secrets.
pub const ENROLL_PREFIX: &str = "stacyvm-enroll-v1.";
/// Prefix of enrolled worker credentials.
pub const CREDENTIAL_PREFIX: &str = "stacyvm-wcred-v1.";

// ---------------------------------------------------------------- events

/// One event of `GET /api/v1/events`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// `evt-<raft index>-<n>`: the same on every replica, so `Last-Event-ID`
    /// replay works against any of them.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox_id: String,
    pub timestamp: String,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

// ---------------------------------------------------------------- validators

/// Why a value was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// Parses a Go-style duration (`"1h30m"`, `"500ms"`, `"45s"`) or bare seconds (`"90"`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total: u128 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("invalid duration {s:?}"));
        }
        let n: u128 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid duration {s:?}"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_ms: u128 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            other => return Err(format!("invalid duration {s:?}: unknown unit {other:?}")),
        };
        rest = &rest[unit_len..];
        total = total.saturating_add(n.saturating_mul(unit_ms));
    }
    if total > u128::from(u64::MAX / 2) {
        return Err(format!("duration {s:?} is too large"));
    }
    Ok(Duration::from_millis(
        u64::try_from(total).unwrap_or(u64::MAX),
    ))
}

/// Formats a duration the Go way (`"1h2m3s"`, `"250ms"`, `"0s"`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let frac = ms % 1000;
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if frac > 0 {
        out.push_str(&format!("{s}.{frac:03}s"));
    } else {
        out.push_str(&format!("{s}s"));
    }
    out
}

/// A sandbox ID: `sb-` followed by 8 to 32 lowercase hex digits.
pub fn check_sandbox_id(id: &str) -> Result<(), Invalid> {
    let ok = id.strip_prefix("sb-").is_some_and(|h| {
        (8..=32).contains(&h.len())
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(())
    } else {
        Err(Invalid(format!(
            "sandbox id {id:?} is not sb- followed by 8 to 32 hex digits"
        )))
    }
}

/// A worker, owner or template name: 1–128 chars of `[A-Za-z0-9._@:-]`.
pub fn check_name(what: &str, v: &str) -> Result<(), Invalid> {
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@:-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Invalid(format!(
            "{what} {v:?} must be 1 to 128 characters of letters, digits, '.', '_', '@', ':' or '-'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = [
            ("30s", 30_000),
            ("5m", 300_000),
            ("1h30m", 5_400_000),
            ("250ms", 250),
            ("90", 90_000),
            ("1m30s", 90_000),
        ];
        for (s, ms) in ok {
            assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
        }
        for bad in [
            "",
            "-1s",
            "1x",
            "m",
            "1.5s",
            "1h 2m",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(format_duration(Duration::from_millis(3_723_000)), "1h2m3s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_millis(1_500)), "1.500s");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn ids_and_names() {
        assert!(check_sandbox_id("sb-0123abcd").is_ok());
        assert!(check_sandbox_id("sb-0123abcdef01").is_ok());
        for bad in ["sb-", "sb-XYZ12345", "0123abcd", "sb-0123abc", "sb-../../x"] {
            assert!(check_sandbox_id(bad).is_err(), "{bad}");
        }
        assert!(check_name("worker id", "worker-a").is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_name("worker id", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_reject_unknown_fields_and_accept_aliases() {
        let r: SpawnRequest =
            serde_json::from_str(r#"{"image":"busybox","provider":"mock","ttl":"5m"}"#)
                .expect("spawn request");
        assert_eq!(r.runtime, "mock");
        assert_eq!(r.ttl.map(|t| t.parse()), Some(Ok(Duration::from_secs(300))));
        assert!(serde_json::from_str::<SpawnRequest>(r#"{"image":"x","imag":"y"}"#).is_err());
        assert!(serde_json::from_str::<ExecRequest>(r#"{"command":"ls","shell":true}"#).is_err());
        assert_eq!(FileMode::Octal("0755".into()).bits(), Ok(0o755));
        assert_eq!(FileMode::Number(0o644).bits(), Ok(0o644));
        assert!(FileMode::Octal("9".into()).bits().is_err());
    }
}
