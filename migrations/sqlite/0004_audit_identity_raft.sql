-- Admin and operation audit, revoked worker-token IDs, and the Raft bookkeeping row.
CREATE TABLE admin_audit (
    id          INTEGER PRIMARY KEY NOT NULL,
    actor       TEXT    NOT NULL DEFAULT '',
    method      TEXT    NOT NULL DEFAULT '',
    path        TEXT    NOT NULL DEFAULT '',
    status      INTEGER NOT NULL DEFAULT 0,
    duration_ms INTEGER NOT NULL DEFAULT 0,
    request_id  TEXT    NOT NULL DEFAULT '',
    remote_addr TEXT    NOT NULL DEFAULT '',
    user_agent  TEXT    NOT NULL DEFAULT '',
    tenant_id   TEXT    NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL
);
CREATE INDEX admin_audit_created ON admin_audit (created_at DESC, id DESC);
CREATE INDEX admin_audit_actor   ON admin_audit (actor);

CREATE TABLE operation_audit (
    id          INTEGER PRIMARY KEY NOT NULL,
    actor       TEXT    NOT NULL DEFAULT '',
    action      TEXT    NOT NULL,
    sandbox_id  TEXT    NOT NULL DEFAULT '',
    resource    TEXT    NOT NULL DEFAULT '',
    runtime     TEXT    NOT NULL DEFAULT '',
    status      TEXT    NOT NULL DEFAULT 'success' CHECK (status IN ('success','failure')),
    detail      TEXT    NOT NULL DEFAULT '',
    tenant_id   TEXT    NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL
);
CREATE INDEX operation_audit_created ON operation_audit (created_at DESC, id DESC);
CREATE INDEX operation_audit_sandbox ON operation_audit (sandbox_id);

-- A revoked signed worker token, by its `jti`. Rows whose expires_at has passed can
-- be pruned: the token would be refused as expired anyway.
CREATE TABLE revoked_worker_tokens (
    jti         TEXT    PRIMARY KEY NOT NULL,
    reason      TEXT    NOT NULL DEFAULT '',
    revoked_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);

-- Exactly one row: the last Raft log index applied to this store, in the same
-- transaction as the entry's effects, and the last applied membership (opaque to
-- the store; the raft crate owns its encoding).
CREATE TABLE raft_state (
    id            INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    applied_index INTEGER NOT NULL DEFAULT 0 CHECK (applied_index >= 0),
    applied_log   TEXT    NOT NULL DEFAULT '',
    membership    TEXT    NOT NULL DEFAULT ''
);
INSERT INTO raft_state (id, applied_index, applied_log, membership) VALUES (1, 0, '', '');
