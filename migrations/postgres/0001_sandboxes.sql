-- Sandboxes and their exec logs (Postgres dialect of migrations/sqlite/0001).
-- Timestamps are TIMESTAMPTZ, always supplied by the caller (the Raft leader);
-- the defaults exist only for hand-written rows. JSON-shaped columns are TEXT so
-- they round-trip byte for byte (JSONB would reorder keys and break store digests).
CREATE TABLE IF NOT EXISTS sandboxes (
    id          TEXT        PRIMARY KEY,
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
CREATE INDEX IF NOT EXISTS sandboxes_owner   ON sandboxes (owner_id);
CREATE INDEX IF NOT EXISTS sandboxes_tenant  ON sandboxes (tenant_id);
CREATE INDEX IF NOT EXISTS sandboxes_worker  ON sandboxes (worker_id);
CREATE INDEX IF NOT EXISTS sandboxes_expires ON sandboxes (expires_at);

CREATE TABLE IF NOT EXISTS exec_logs (
    id          BIGSERIAL   PRIMARY KEY,
    sandbox_id  TEXT        NOT NULL REFERENCES sandboxes (id),
    command     TEXT        NOT NULL,
    exit_code   BIGINT      NOT NULL,
    stdout      TEXT        NOT NULL DEFAULT '',
    stderr      TEXT        NOT NULL DEFAULT '',
    duration_ms BIGINT      NOT NULL DEFAULT 0,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS exec_logs_sandbox ON exec_logs (sandbox_id, id);
