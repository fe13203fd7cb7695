-- Sandboxes and their exec logs.
-- Timestamps are INTEGER microseconds since the Unix epoch, always supplied by the
-- caller (the Raft leader), never by the database clock, so every replica applies
-- the same bytes. JSON-shaped columns are TEXT so they round-trip byte for byte.
-- Row IDs of log tables are assigned by the store as MAX(id)+1 inside the applying
-- transaction, so every replica assigns the same IDs.
CREATE TABLE sandboxes (
    id          TEXT    PRIMARY KEY NOT NULL,
    state       TEXT    NOT NULL DEFAULT 'creating'
                CHECK (state IN ('creating','running','idle','unhealthy','expired','destroyed','error','lost')),
    runtime     TEXT    NOT NULL,
    image       TEXT    NOT NULL DEFAULT '',
    memory_mb   INTEGER NOT NULL DEFAULT 512 CHECK (memory_mb >= 0),
    vcpus       INTEGER NOT NULL DEFAULT 1 CHECK (vcpus >= 0),
    owner_id    TEXT    NOT NULL DEFAULT '',
    tenant_id   TEXT    NOT NULL DEFAULT '',
    worker_id   TEXT    NOT NULL DEFAULT '',
    runtime_id  TEXT    NOT NULL DEFAULT '',
    metadata    TEXT    NOT NULL DEFAULT '{}',
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);
CREATE INDEX sandboxes_owner   ON sandboxes (owner_id);
CREATE INDEX sandboxes_tenant  ON sandboxes (tenant_id);
CREATE INDEX sandboxes_worker  ON sandboxes (worker_id);
CREATE INDEX sandboxes_expires ON sandboxes (expires_at);

CREATE TABLE exec_logs (
    id          INTEGER PRIMARY KEY NOT NULL,
    sandbox_id  TEXT    NOT NULL REFERENCES sandboxes (id),
    command     TEXT    NOT NULL,
    exit_code   INTEGER NOT NULL,
    stdout      TEXT    NOT NULL DEFAULT '',
    stderr      TEXT    NOT NULL DEFAULT '',
    duration_ms INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);
CREATE INDEX exec_logs_sandbox ON exec_logs (sandbox_id, id);
