//! [`Mutation`]: every change the system of record accepts, as plain data.
//!
//! This is the write vocabulary the Raft layer replicates: a committed log entry
//! carries mutations, and each replica applies them with
//! [`Store::apply_batch`](crate::Store::apply_batch). Every input that could
//! differ between replicas (IDs, timestamps, "now" for leases) is a field chosen
//! by the proposer, so applying a mutation is deterministic.
//!
//! Durable encodings: the raft crate serialises these with a version tag. Add
//! new variants at the end and never change the meaning of an existing one.

use serde::{Deserialize, Serialize};

use crate::StoreError;
use crate::lease::{AcquireLease, RenewLease};
use crate::model::*;

/// One change to the system of record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mutation {
    /// Insert a sandbox; `Conflict` if the ID exists (destroyed ones included).
    CreateSandbox(Sandbox),
    /// Set a sandbox's state. `Conflict` if it is already destroyed.
    SetSandboxState {
        id: String,
        state: SandboxState,
        at: Ts,
    },
    /// Set where a sandbox runs. `Conflict` if it is destroyed.
    SetSandboxPlacement {
        id: String,
        worker_id: String,
        runtime_id: String,
        at: Ts,
    },
    /// Move a sandbox's expiry. `Conflict` if it is destroyed.
    SetSandboxExpiry {
        id: String,
        expires_at: Ts,
        at: Ts,
    },
    /// Soft delete: the row stays with state `destroyed`. Idempotent.
    DestroySandbox {
        id: String,
        at: Ts,
    },
    /// Record a finished exec; outputs [`MutationOutput::Id`].
    AppendExecLog(ExecLog),
    /// Delete exec logs created before `before`; outputs [`MutationOutput::Count`].
    DeleteExecLogsBefore {
        before: Ts,
    },

    /// Insert or update a worker; `created_at` is kept from the first save.
    PutWorker(Worker),
    /// Change a worker's status.
    SetWorkerStatus {
        id: String,
        status: WorkerStatus,
        at: Ts,
    },
    /// Remove a worker record.
    DeleteWorker {
        id: String,
    },

    /// Take a lease; outputs [`MutationOutput::Lease`].
    AcquireLease(AcquireLease),
    /// Extend a held lease; outputs [`MutationOutput::Lease`].
    RenewLease(RenewLease),
    /// Give up a lease; only its holder may.
    ReleaseLease {
        resource_id: String,
        holder_id: String,
    },
    /// Remove a lease whoever holds it (operator or leader decision, e.g. the
    /// holder went offline). The generation counter is kept.
    RevokeLease {
        resource_id: String,
    },

    CreateTenant(Tenant),
    /// Update name, owner and settings of an existing tenant.
    UpdateTenant(Tenant),
    /// Delete a tenant, its members and its policies.
    DeleteTenant {
        id: String,
    },
    /// Insert or update a member's role (`created_at` kept).
    PutMember(TenantMember),
    DeleteMember {
        tenant_id: String,
        user_id: String,
    },
    CreatePolicy(Policy),
    DeletePolicy {
        id: String,
    },

    /// Insert or update an owner quota (`created_at` kept).
    PutQuota(OwnerQuota),
    DeleteQuota {
        owner_id: String,
    },

    /// Insert a template; `Conflict` if the name exists.
    CreateTemplate(Template),
    /// Replace an existing template (`created_at` kept).
    UpdateTemplate(Template),
    DeleteTemplate {
        name: String,
    },

    /// Outputs [`MutationOutput::Id`].
    AppendAdminAudit(AdminAudit),
    /// Outputs [`MutationOutput::Count`].
    DeleteAdminAuditBefore {
        before: Ts,
    },
    /// Outputs [`MutationOutput::Id`].
    AppendOperationAudit(OperationAudit),
    /// Outputs [`MutationOutput::Count`].
    DeleteOperationAuditBefore {
        before: Ts,
    },

    /// Revoke a signed worker token by `jti` (idempotent).
    RevokeToken(RevokedToken),
    /// Forget revocations whose token has expired by `now`; outputs a count.
    PruneRevokedTokens {
        now: Ts,
    },

    /// Record the Raft membership (opaque text owned by the raft crate).
    SetMembership {
        membership: String,
    },

    /// Apply all of these or none: the first failure undoes the ones before it.
    Atomic(Vec<Mutation>),

    /// Record that replica `node_id` left the cluster; the ID is never reused.
    /// Idempotent.
    RecordRemovedNode {
        node_id: i64,
        at: Ts,
    },

    /// Record a single-use enrollment secret (by its hash); `Conflict` if that
    /// hash exists.
    CreateEnrollment(Enrollment),
    /// Exchange an enrollment for a worker credential, atomically: the
    /// enrollment's `used_at` becomes `now` and `worker_id`'s credential becomes
    /// `credential_hash` (`created_at` kept if it had one, `updated_at = now`).
    /// `NotFound` (entity "enrollment") if there is no such hash; `Conflict`
    /// with reason "already used", "expired" (`expires_at <= now`) or "issued
    /// for another worker", checked in that order. Of racing consumers of one
    /// enrollment exactly one succeeds.
    ConsumeEnrollment {
        token_hash: String,
        worker_id: String,
        credential_hash: String,
        now: Ts,
    },
    /// Remove a worker's credential; `NotFound` if it has none.
    DeleteWorkerCredential {
        worker_id: String,
    },
    /// Delete enrollments (used or not) whose `expires_at` is before `before`;
    /// outputs [`MutationOutput::Count`].
    PruneEnrollments {
        before: Ts,
    },
    /// Record that replica `node_id` started as `incarnation` (boot `boot_id`).
    /// `Conflict` with reason "stale incarnation" unless `incarnation` is above
    /// the recorded one, or equal to it with the same `boot_id` (a retry).
    RecordIncarnation {
        node_id: i64,
        incarnation: i64,
        boot_id: String,
        at: Ts,
    },
}

/// What a successful mutation produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MutationOutput {
    Done,
    /// Row ID assigned by the store.
    Id(i64),
    /// Rows affected.
    Count(u64),
    Lease(Lease),
    /// Outputs of an [`Mutation::Atomic`] group, in order.
    Many(Vec<MutationOutput>),
}

impl Mutation {
    /// Structural validation, before any I/O.
    pub fn validate(&self) -> Result<(), StoreError> {
        match self {
            Mutation::CreateSandbox(s) => s.validate(),
            Mutation::SetSandboxExpiry { id, expires_at, .. } => {
                check_id("sandbox id", id)?;
                check_ts("expires_at", *expires_at)
            }
            Mutation::SetSandboxState { id, .. } | Mutation::DestroySandbox { id, .. } => {
                check_id("sandbox id", id)
            }
            Mutation::SetSandboxPlacement {
                id,
                worker_id,
                runtime_id,
                ..
            } => {
                check_id("sandbox id", id)?;
                check_len("worker id", worker_id, MAX_ID_LEN)?;
                check_len("runtime id", runtime_id, MAX_ID_LEN)
            }
            Mutation::AppendExecLog(l) => l.validate(),
            Mutation::PutWorker(w) => w.validate(),
            Mutation::SetWorkerStatus { id, .. } | Mutation::DeleteWorker { id } => {
                check_id("worker id", id)
            }
            // Lease requests are validated by the pure decision functions.
            Mutation::AcquireLease(_) | Mutation::RenewLease(_) => Ok(()),
            Mutation::ReleaseLease {
                resource_id,
                holder_id,
            } => {
                check_id("lease resource id", resource_id)?;
                check_id("lease holder id", holder_id)
            }
            Mutation::RevokeLease { resource_id } => check_id("lease resource id", resource_id),
            Mutation::CreateTenant(t) | Mutation::UpdateTenant(t) => t.validate(),
            Mutation::DeleteTenant { id } => check_id("tenant id", id),
            Mutation::PutMember(m) => m.validate(),
            Mutation::DeleteMember { tenant_id, user_id } => {
                check_id("tenant id", tenant_id)?;
                check_id("user id", user_id)
            }
            Mutation::CreatePolicy(p) => p.validate(),
            Mutation::DeletePolicy { id } => check_id("policy id", id),
            Mutation::PutQuota(q) => q.validate(),
            Mutation::DeleteQuota { owner_id } => check_id("owner id", owner_id),
            Mutation::CreateTemplate(t) | Mutation::UpdateTemplate(t) => t.validate(),
            Mutation::DeleteTemplate { name } => check_id("template name", name),
            Mutation::AppendAdminAudit(a) => a.validate(),
            Mutation::AppendOperationAudit(a) => a.validate(),
            Mutation::RevokeToken(r) => r.validate(),
            Mutation::SetMembership { membership } => {
                check_len("membership", membership, MAX_TEXT_LEN)
            }
            Mutation::Atomic(all) => all.iter().try_for_each(Mutation::validate),
            Mutation::RecordRemovedNode { node_id, .. } if *node_id < 1 => Err(
                StoreError::Invalid(format!("node id must be at least 1 (got {node_id})")),
            ),
            Mutation::RecordRemovedNode { .. } => Ok(()),
            Mutation::RecordIncarnation {
                node_id,
                incarnation,
                boot_id,
                ..
            } => {
                if *node_id < 1 || *incarnation < 1 {
                    return Err(StoreError::Invalid(format!(
                        "node id and incarnation must be at least 1 (got {node_id}, {incarnation})"
                    )));
                }
                check_id("boot id", boot_id)
            }
            Mutation::CreateEnrollment(e) => e.validate(),
            Mutation::ConsumeEnrollment {
                token_hash,
                worker_id,
                credential_hash,
                now,
            } => {
                check_secret_hash("enrollment token hash", token_hash)?;
                check_id("worker id", worker_id)?;
                check_secret_hash("worker credential hash", credential_hash)?;
                check_ts("now", *now)
            }
            Mutation::DeleteWorkerCredential { worker_id } => check_id("worker id", worker_id),
            Mutation::PruneEnrollments { before } => check_ts("before", *before),
            Mutation::DeleteExecLogsBefore { .. }
            | Mutation::DeleteAdminAuditBefore { .. }
            | Mutation::DeleteOperationAuditBefore { .. }
            | Mutation::PruneRevokedTokens { .. } => Ok(()),
        }
    }
}

/// The result of [`Store::apply_batch`](crate::Store::apply_batch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchOutcome {
    /// The store had already applied this index (or a later one); nothing ran.
    Skipped { applied_index: u64 },
    /// Every mutation ran; each has its own deterministic outcome, and the
    /// applied index advanced in the same transaction.
    Applied(Vec<Result<MutationOutput, StoreError>>),
}
