-- Admin and operation audit, revoked worker-token IDs, and the Raft bookkeeping row
-- (Postgres dialect of migrations/sqlite/0004).
CREATE TABLE admin_audit (
    id          BIGINT      PRIMARY KEY,
    actor       TEXT        NOT NULL DEFAULT '',
    method      TEXT        NOT NULL DEFAULT '',
    path        TEXT        NOT NULL DEFAULT '',
    status      BIGINT      NOT NULL DEFAULT 0,
    duration_ms BIGINT      NOT NULL DEFAULT 0,
    request_id  TEXT        NOT NULL DEFAULT '',
    remote_addr TEXT        NOT NULL DEFAULT '',
    user_agent  TEXT        NOT NULL DEFAULT '',
    tenant_id   TEXT        NOT NULL DEFAULT '',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX admin_audit_created ON admin_audit (created_at DESC, id DESC);
CREATE INDEX admin_audit_actor   ON admin_audit (actor);

CREATE TABLE operation_audit (
    id          BIGINT      PRIMARY KEY,
    actor       TEXT        NOT NULL DEFAULT '',
    action      TEXT        NOT NULL,
    sandbox_id  TEXT        NOT NULL DEFAULT '',
    resource    TEXT        NOT NULL DEFAULT '',
    runtime     TEXT        NOT NULL DEFAULT '',
    status      TEXT        NOT NULL DEFAULT 'success' CHECK (status IN ('success','failure')),
    detail      TEXT        NOT NULL DEFAULT '',
    tenant_id   TEXT        NOT NULL DEFAULT '',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX operation_audit_created ON operation_audit (created_at DESC, id DESC);
CREATE INDEX operation_audit_sandbox ON operation_audit (sandbox_id);

CREATE TABLE revoked_worker_tokens (
    jti         TEXT COLLATE "C" PRIMARY KEY,
    reason      TEXT        NOT NULL DEFAULT '',
    revoked_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE raft_state (
    id            BIGINT PRIMARY KEY CHECK (id = 1),
    applied_index BIGINT NOT NULL DEFAULT 0 CHECK (applied_index >= 0),
    applied_log   TEXT   NOT NULL DEFAULT '',
    membership    TEXT   NOT NULL DEFAULT ''
);
INSERT INTO raft_state (id, applied_index, applied_log, membership) VALUES (1, 0, '', '')
ON CONFLICT (id) DO NOTHING;
