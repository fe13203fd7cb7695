-- Sandboxes and their exec logs (Postgres dialect of migrations/sqlite/0001).
-- Timestamps are TIMESTAMPTZ, always supplied by the caller (the Raft leader);
-- the defaults exist only for hand-written rows. JSON-shaped columns are TEXT so
-- they round-trip byte for byte (JSONB would reorder keys and break store digests).
-- Row IDs of log tables are assigned by the store as MAX(id)+1 inside the applying
-- transaction, not by a sequence: sequences are not rolled back with a failed
-- mutation, so they would hand different IDs to different replicas. Key columns
-- use the "C" collation so ORDER BY agrees with SQLite's byte order.
-- Plain CREATE (no IF NOT EXISTS): a database holding a foreign schema must fail
-- loudly, not be half-adopted.
CREATE TABLE sandboxes (
    id          TEXT COLLATE "C" PRIMARY KEY,
    state       TEXT        NOT NULL DEFAULT 'creating'
                CHECK (state IN ('creating','running','idle','unhealthy','expired','destroyed','error','lost')),
    runtime     TEXT        NOT NULL,
    image       TEXT        NOT NULL DEFAULT '',
    memory_mb   BIGINT      NOT NULL DEFAULT 512 CHECK (memory_mb >= 0),
    vcpus       BIGINT      NOT NULL DEFAULT 1 CHECK (vcpus >= 0),
    owner_id    TEXT        NOT NULL DEFAULT '',
    tenant_id   TEXT        NOT NULL DEFAULT '',
    worker_id   TEXT        NOT NULL DEFAULT '',
    runtime_id  TEXT        NOT NULL DEFAULT '',
    metadata    TEXT        NOT NULL DEFAULT '{}',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX sandboxes_owner   ON sandboxes (owner_id);
CREATE INDEX sandboxes_tenant  ON sandboxes (tenant_id);
CREATE INDEX sandboxes_worker  ON sandboxes (worker_id);
CREATE INDEX sandboxes_expires ON sandboxes (expires_at);

CREATE TABLE exec_logs (
    id          BIGINT      PRIMARY KEY,
    sandbox_id  TEXT        NOT NULL REFERENCES sandboxes (id),
    command     TEXT        NOT NULL,
    exit_code   BIGINT      NOT NULL,
    stdout      TEXT        NOT NULL DEFAULT '',
    stderr      TEXT        NOT NULL DEFAULT '',
    duration_ms BIGINT      NOT NULL DEFAULT 0,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX exec_logs_sandbox ON exec_logs (sandbox_id, id);
