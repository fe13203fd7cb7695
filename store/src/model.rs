//! The records the system of record holds, one struct per table, plus the small
//! enums stored as constrained TEXT columns.
//!
//! Every timestamp is a [`Ts`] chosen by the caller (in a cluster: the Raft
//! leader), never read from a database clock, so applying the same mutation on
//! any replica writes the same bytes. Validation here is structural (lengths,
//! required fields, ranges); policy decisions live with the control plane.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::StoreError;

/// Longest ID (sandbox, worker, tenant, resource, ...) the store accepts.
pub const MAX_ID_LEN: usize = 128;
/// Longest free-text field (paths, commands, descriptions) the store accepts.
pub const MAX_TEXT_LEN: usize = 64 * 1024;
/// Longest captured exec output kept per stream.
pub const MAX_OUTPUT_LEN: usize = 1024 * 1024;
/// Longest operation-audit detail.
pub const MAX_DETAIL_LEN: usize = 2048;

/// A point in time: microseconds since the Unix epoch, UTC.
///
/// Microseconds because Postgres `TIMESTAMPTZ` keeps exactly that, so a value
/// round-trips unchanged through both drivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Ts(pub i64);

impl Ts {
    /// The current wall-clock time, truncated to microseconds.
    pub fn now() -> Self {
        Ts(chrono::Utc::now().timestamp_micros())
    }

    /// Microseconds since the Unix epoch.
    pub fn micros(self) -> i64 {
        self.0
    }

    /// This time plus `ms` milliseconds (saturating).
    pub fn plus_millis(self, ms: i64) -> Self {
        Ts(self.0.saturating_add(ms.saturating_mul(1000)))
    }

    /// This time minus `ms` milliseconds (saturating).
    pub fn minus_millis(self, ms: i64) -> Self {
        Ts(self.0.saturating_sub(ms.saturating_mul(1000)))
    }

    /// The same instant as a chrono value, `None` outside chrono's range.
    pub fn to_chrono(self) -> Option<chrono::DateTime<chrono::Utc>> {
        chrono::DateTime::from_timestamp_micros(self.0)
    }
}

/// Earliest and latest instants every driver can store (years 1 to 9999).
pub const TS_MIN: Ts = Ts(-62_135_596_800_000_000);
pub const TS_MAX: Ts = Ts(253_402_300_799_999_999);

pub(crate) fn check_ts(kind: &str, ts: Ts) -> Result<(), StoreError> {
    if ts < TS_MIN || ts > TS_MAX {
        return Err(StoreError::Invalid(format!(
            "{kind} {} µs is outside the years 1 to 9999",
            ts.0
        )));
    }
    Ok(())
}

impl fmt::Display for Ts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_chrono() {
            Some(t) => write!(
                f,
                "{}",
                t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            ),
            None => write!(f, "{}us", self.0),
        }
    }
}

/// Declares a string-backed enum stored as a CHECK-constrained TEXT column.
macro_rules! text_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stored and wire spelling.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = StoreError;
            fn from_str(s: &str) -> Result<Self, StoreError> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(StoreError::Invalid(format!(
                        "unknown {} {other:?}; expected one of: {}",
                        stringify!($name),
                        [$($text),+].join(", ")
                    ))),
                }
            }
        }
    };
}

text_enum!(
    /// Lifecycle state of a sandbox. `Destroyed` is the soft-delete marker;
    /// `Lost` means its worker went offline while it was running.
    SandboxState {
        Creating => "creating",
        Running => "running",
        Idle => "idle",
        Unhealthy => "unhealthy",
        Expired => "expired",
        Destroyed => "destroyed",
        Error => "error",
        Lost => "lost",
    }
);

text_enum!(
    /// A worker's liveness as the control plane sees it.
    WorkerStatus {
        Online => "online",
        Stale => "stale",
        Offline => "offline",
        Draining => "draining",
    }
);

text_enum!(
    /// A tenant member's role.
    MemberRole {
        Viewer => "viewer",
        Operator => "operator",
        Admin => "admin",
    }
);

text_enum!(
    /// What a policy matches against.
    PolicyResource {
        Image => "image",
        Runtime => "runtime",
        Network => "network",
    }
);

text_enum!(
    /// What a matching policy decides.
    PolicyEffect {
        Allow => "allow",
        Deny => "deny",
    }
);

text_enum!(
    /// Outcome recorded in the operation audit.
    AuditStatus {
        Success => "success",
        Failure => "failure",
    }
);

pub(crate) fn check_id(kind: &str, id: &str) -> Result<(), StoreError> {
    if id.is_empty() {
        return Err(StoreError::Invalid(format!("{kind} must not be empty")));
    }
    if id.len() > MAX_ID_LEN {
        return Err(StoreError::Invalid(format!(
            "{kind} is {} bytes long; the limit is {MAX_ID_LEN}",
            id.len()
        )));
    }
    check_len(kind, id, MAX_ID_LEN)?;
    if id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(StoreError::Invalid(format!(
            "{kind} {id:?} contains whitespace or control characters"
        )));
    }
    Ok(())
}

pub(crate) fn check_len(kind: &str, value: &str, max: usize) -> Result<(), StoreError> {
    // Postgres TEXT cannot hold NUL; refusing it everywhere keeps drivers identical.
    if value.contains('\0') {
        return Err(StoreError::Invalid(format!("{kind} contains a NUL byte")));
    }
    if value.len() > max {
        return Err(StoreError::Invalid(format!(
            "{kind} is {} bytes long; the limit is {max}",
            value.len()
        )));
    }
    Ok(())
}

fn check_non_negative(kind: &str, value: i64) -> Result<(), StoreError> {
    if value < 0 {
        return Err(StoreError::Invalid(format!(
            "{kind} must not be negative (got {value})"
        )));
    }
    Ok(())
}

/// A sandbox record. Destroyed sandboxes stay in the table (soft delete) so their
/// history can be read; listings leave them out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    pub id: String,
    pub state: SandboxState,
    pub runtime: String,
    pub image: String,
    pub memory_mb: i64,
    pub vcpus: i64,
    pub owner_id: String,
    pub tenant_id: String,
    /// Worker that owns it; empty until placed.
    pub worker_id: String,
    /// The runtime's own handle (container ID, VM ID, directory).
    pub runtime_id: String,
    pub metadata: BTreeMap<String, String>,
    pub created_at: Ts,
    pub updated_at: Ts,
    pub expires_at: Ts,
}

impl Sandbox {
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        check_id("sandbox id", &self.id)?;
        check_id("sandbox runtime", &self.runtime)?;
        check_len("sandbox image", &self.image, MAX_TEXT_LEN)?;
        check_non_negative("memory_mb", self.memory_mb)?;
        check_non_negative("vcpus", self.vcpus)?;
        for (kind, t) in [
            ("created_at", self.created_at),
            ("updated_at", self.updated_at),
            ("expires_at", self.expires_at),
        ] {
            check_ts(kind, t)?;
        }
        for (kind, v) in [
            ("owner id", &self.owner_id),
            ("tenant id", &self.tenant_id),
            ("worker id", &self.worker_id),
            ("runtime id", &self.runtime_id),
        ] {
            check_len(kind, v, MAX_ID_LEN)?;
        }
        for (k, v) in &self.metadata {
            check_len("metadata key", k, MAX_ID_LEN)?;
            check_len("metadata value", v, MAX_TEXT_LEN)?;
        }
        let meta: usize = self.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        if meta > MAX_TEXT_LEN {
            return Err(StoreError::Invalid(format!(
                "sandbox metadata is {meta} bytes; the limit is {MAX_TEXT_LEN}"
            )));
        }
        Ok(())
    }
}

/// Which sandboxes a listing returns. Destroyed sandboxes are never listed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SandboxFilter {
    pub owner_id: Option<String>,
    pub tenant_id: Option<String>,
    pub worker_id: Option<String>,
    pub state: Option<SandboxState>,
    /// At most this many rows (default 100, at most 1000).
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

/// One finished exec, as recorded for `GET /sandboxes/{id}/logs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecLog {
    /// Assigned by the store (the next free ID) when 0 on insert.
    pub id: i64,
    pub sandbox_id: String,
    pub command: String,
    pub exit_code: i64,
    pub stdout: String,
    pub stderr: String,
    pub duration_ms: i64,
    pub created_at: Ts,
}

impl ExecLog {
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        check_id("sandbox id", &self.sandbox_id)?;
        check_len("command", &self.command, MAX_TEXT_LEN)?;
        check_len("stdout", &self.stdout, MAX_OUTPUT_LEN)?;
        check_len("stderr", &self.stderr, MAX_OUTPUT_LEN)?;
        check_non_negative("duration_ms", self.duration_ms)
    }
}

/// A registered worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    pub id: String,
    pub hostname: String,
    pub status: WorkerStatus,
    pub rpc_url: String,
    pub runtimes: Vec<String>,
    pub capabilities: Vec<String>,
    pub capacity: BTreeMap<String, i64>,
    pub last_heartbeat: Ts,
    /// Kept from the first save; later saves leave it unchanged.
    pub created_at: Ts,
    pub updated_at: Ts,
}

impl Worker {
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        check_id("worker id", &self.id)?;
        check_len("hostname", &self.hostname, MAX_ID_LEN * 2)?;
        check_len("rpc_url", &self.rpc_url, 2048)?;
        for r in self.runtimes.iter().chain(&self.capabilities) {
            check_id("runtime or capability name", r)?;
        }
        Ok(())
    }
}

/// Ownership of a resource (a sandbox) by a holder (a worker), with a fencing
/// generation that only ever increases for that resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub resource_id: String,
    pub resource_type: String,
    pub holder_id: String,
    pub generation: i64,
    pub granted_at: Ts,
    pub expires_at: Ts,
    pub updated_at: Ts,
}

/// A tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub owner_id: String,
    /// Opaque JSON text chosen by the API layer.
    pub settings: String,
    pub created_at: Ts,
    pub updated_at: Ts,
}

impl Tenant {
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        check_id("tenant id", &self.id)?;
        if self.name.trim().is_empty() {
            return Err(StoreError::Invalid("tenant name must not be empty".into()));
        }
        check_len("tenant name", &self.name, MAX_ID_LEN * 2)?;
        check_len("tenant owner id", &self.owner_id, MAX_ID_LEN)?;
        check_len("tenant settings", &self.settings, MAX_TEXT_LEN)
    }
}

/// A user's role in a tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantMember {
    pub tenant_id: String,
    pub user_id: String,
    pub role: MemberRole,
    pub created_at: Ts,
    pub updated_at: Ts,
}

impl TenantMember {
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        check_id("tenant id", &self.tenant_id)?;
        check_id("user id", &self.user_id)
    }
}

/// An allow or deny rule. `tenant_id: None` is a global policy that applies to
/// every tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub id: String,
    pub tenant_id: Option<String>,
    pub resource_type: PolicyResource,
    pub effect: PolicyEffect,
    pub pattern: String,
    pub priority: i64,
    pub created_at: Ts,
    pub updated_at: Ts,
}

impl Policy {
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        check_id("policy id", &self.id)?;
        if let Some(t) = &self.tenant_id {
            check_id("tenant id", t)?;
        }
        if self.pattern.is_empty() {
            return Err(StoreError::Invalid(
                "policy pattern must not be empty".into(),
            ));
        }
        check_len("policy pattern", &self.pattern, MAX_ID_LEN * 4)
    }
}

/// Per-owner limits; 0 means "no override".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerQuota {
    pub owner_id: String,
    pub max_sandboxes: i64,
    pub max_ttl_seconds: i64,
    pub max_exec_timeout_seconds: i64,
    /// Kept from the first save.
    pub created_at: Ts,
    pub updated_at: Ts,
}

impl OwnerQuota {
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        check_id("owner id", &self.owner_id)?;
        check_non_negative("max_sandboxes", self.max_sandboxes)?;
        check_non_negative("max_ttl_seconds", self.max_ttl_seconds)?;
        check_non_negative("max_exec_timeout_seconds", self.max_exec_timeout_seconds)
    }
}

/// A named spawn recipe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    pub name: String,
    pub version: i64,
    pub image: String,
    pub description: String,
    pub runtime: String,
    pub setup: Vec<String>,
    pub allowed_hosts: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub memory_mb: i64,
    pub vcpus: i64,
    pub ttl_seconds: i64,
    pub created_at: Ts,
    pub updated_at: Ts,
}

impl Template {
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        check_id("template name", &self.name)?;
        if self.image.is_empty() {
            return Err(StoreError::Invalid(
                "template image must not be empty".into(),
            ));
        }
        check_len("template image", &self.image, MAX_TEXT_LEN)?;
        check_len("template description", &self.description, MAX_TEXT_LEN)?;
        check_non_negative("memory_mb", self.memory_mb)?;
        check_non_negative("vcpus", self.vcpus)?;
        check_non_negative("ttl_seconds", self.ttl_seconds)?;
        let setup: usize = self.setup.iter().map(String::len).sum();
        if setup > MAX_TEXT_LEN {
            return Err(StoreError::Invalid(format!(
                "template setup is {setup} bytes; the limit is {MAX_TEXT_LEN}"
            )));
        }
        Ok(())
    }
}

/// One admin-route request that passed authentication.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminAudit {
    /// Assigned by the store (the next free ID) when 0 on insert.
    pub id: i64,
    pub actor: String,
    pub method: String,
    pub path: String,
    pub status: i64,
    pub duration_ms: i64,
    pub request_id: String,
    pub remote_addr: String,
    pub user_agent: String,
    pub tenant_id: String,
    pub created_at: Ts,
}

impl AdminAudit {
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        check_len("path", &self.path, 4096)?;
        check_len("user agent", &self.user_agent, 1024)?;
        check_len("actor", &self.actor, MAX_ID_LEN * 2)
    }
}

/// Which admin-audit rows to list (newest first).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdminAuditFilter {
    /// Default 100, at most 500.
    pub limit: Option<i64>,
    pub actor: Option<String>,
    pub method: Option<String>,
    pub status: Option<i64>,
    /// Rows whose path starts with this prefix.
    pub path_prefix: Option<String>,
    pub tenant_id: Option<String>,
    pub since: Option<Ts>,
}

/// One sandbox operation (spawn, destroy, exec, file access).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationAudit {
    /// Assigned by the store (the next free ID) when 0 on insert.
    pub id: i64,
    pub actor: String,
    pub action: String,
    pub sandbox_id: String,
    pub resource: String,
    pub runtime: String,
    pub status: AuditStatus,
    pub detail: String,
    pub tenant_id: String,
    pub created_at: Ts,
}

impl OperationAudit {
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        check_id("audit action", &self.action)?;
        check_len("resource", &self.resource, 4096)?;
        check_len("detail", &self.detail, MAX_DETAIL_LEN)
    }
}

/// Which operation-audit rows to list (newest first).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OperationAuditFilter {
    /// Default 100, at most 500.
    pub limit: Option<i64>,
    pub actor: Option<String>,
    pub action: Option<String>,
    pub sandbox_id: Option<String>,
    pub status: Option<AuditStatus>,
    pub tenant_id: Option<String>,
    pub since: Option<Ts>,
}

/// A revoked signed worker token, by `jti`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedToken {
    pub jti: String,
    pub reason: String,
    pub revoked_at: Ts,
    /// When the token would have expired anyway; after it the row can be pruned.
    pub expires_at: Ts,
}

impl RevokedToken {
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        check_id("token id (jti)", &self.jti)?;
        check_len("revocation reason", &self.reason, 1024)
    }
}

/// Length of a stored secret hash: hex SHA-256.
pub const SECRET_HASH_LEN: usize = 64;

/// Checks that `hash` is a hex SHA-256 digest (64 lowercase hex characters), so
/// a secret passed by mistake instead of its hash is refused.
pub(crate) fn check_secret_hash(kind: &str, hash: &str) -> Result<(), StoreError> {
    if hash.is_empty() {
        return Err(StoreError::Invalid(format!("{kind} must not be empty")));
    }
    if hash.len() != SECRET_HASH_LEN
        || !hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        // Never echo the value: it may be a secret passed by mistake.
        return Err(StoreError::Invalid(format!(
            "{kind} must be a hex SHA-256 digest ({SECRET_HASH_LEN} lowercase hex characters)"
        )));
    }
    Ok(())
}

/// How a secret hash appears in error messages: a short prefix, enough to tell
/// rows apart without spreading whole verifiers through logs.
pub(crate) fn hash_label(hash: &str) -> String {
    match hash.get(..12) {
        Some(prefix) if hash.len() > 12 => format!("{prefix}…"),
        _ => hash.to_owned(),
    }
}

/// A single-use worker enrollment secret, by the hex SHA-256 of the secret.
/// Consuming it (for `worker_id`, before `expires_at`) records `used_at` and
/// gives the worker a [`WorkerCredential`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    /// Hex SHA-256 of the enrollment secret (64 lowercase hex characters).
    pub token_hash: String,
    /// The only worker that may consume it.
    pub worker_id: String,
    pub created_at: Ts,
    /// It may be consumed only while `now < expires_at`; after it the row can
    /// be pruned.
    pub expires_at: Ts,
    /// When it was consumed; `None` while unused.
    pub used_at: Option<Ts>,
}

impl Enrollment {
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        check_secret_hash("enrollment token hash", &self.token_hash)?;
        check_id("worker id", &self.worker_id)?;
        check_ts("created_at", self.created_at)?;
        check_ts("expires_at", self.expires_at)?;
        if let Some(used) = self.used_at {
            check_ts("used_at", used)?;
        }
        if self.expires_at <= self.created_at {
            return Err(StoreError::Invalid(format!(
                "enrollment expires_at ({}) must be after created_at ({})",
                self.expires_at, self.created_at
            )));
        }
        Ok(())
    }
}

/// The credential a worker obtained by enrolling, by the hex SHA-256 of the
/// credential secret. One per worker; enrolling again replaces the hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerCredential {
    pub worker_id: String,
    /// Hex SHA-256 of the credential secret (64 lowercase hex characters).
    pub token_hash: String,
    /// Kept from the first enrollment; later ones leave it unchanged.
    pub created_at: Ts,
    pub updated_at: Ts,
}

impl WorkerCredential {
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        check_id("worker id", &self.worker_id)?;
        check_secret_hash("worker credential hash", &self.token_hash)?;
        check_ts("created_at", self.created_at)?;
        check_ts("updated_at", self.updated_at)
    }
}

/// The Raft bookkeeping row: what this store has applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftState {
    /// Highest log index whose effects are in this store (0 = none).
    pub applied_index: u64,
    /// The applied log ID in the raft crate's encoding (empty = none).
    pub applied_log: String,
    /// The last applied membership in the raft crate's encoding (empty = none).
    pub membership: String,
}

/// Where a batch sits in the Raft log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedLog {
    /// Log index; must be greater than the stored applied index to apply.
    pub index: u64,
    /// The log ID in the raft crate's encoding, stored verbatim.
    pub log_id: String,
}

pub(crate) fn clamp_limit(limit: Option<i64>, default: i64, max: i64) -> i64 {
    limit.unwrap_or(default).clamp(1, max)
}

/// Every row of every table plus the Raft bookkeeping: the logical snapshot a
/// replica ships to another. Built from one consistent read; installed in one
/// transaction that replaces every table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreSnapshot {
    pub raft: RaftState,
    pub sandboxes: Vec<Sandbox>,
    pub exec_logs: Vec<ExecLog>,
    pub workers: Vec<Worker>,
    pub leases: Vec<Lease>,
    /// `(resource_id, last_generation)`: the fencing counters, kept forever.
    pub lease_generations: Vec<(String, i64)>,
    pub tenants: Vec<Tenant>,
    pub members: Vec<TenantMember>,
    pub policies: Vec<Policy>,
    pub quotas: Vec<OwnerQuota>,
    pub templates: Vec<Template>,
    pub admin_audit: Vec<AdminAudit>,
    pub operation_audit: Vec<OperationAudit>,
    pub revoked_tokens: Vec<RevokedToken>,
    /// `(node_id, removed_at)` of replicas that left the cluster.
    pub removed_nodes: Vec<(i64, Ts)>,
    /// Enrollment secrets (hashed), used ones included, by token hash.
    pub enrollments: Vec<Enrollment>,
    /// Enrolled worker credentials (hashed), by worker ID.
    pub worker_credentials: Vec<WorkerCredential>,
    /// `(node_id, incarnation, boot_id, updated_at)`: each replica's newest start.
    #[serde(default)]
    pub incarnations: Vec<(i64, i64, String, Ts)>,
}
