-- Worker registry and sandbox leases (Postgres dialect of migrations/sqlite/0002).
CREATE TABLE workers (
    id             TEXT COLLATE "C" PRIMARY KEY,
    hostname       TEXT        NOT NULL DEFAULT '',
    status         TEXT        NOT NULL DEFAULT 'online'
                   CHECK (status IN ('online','stale','offline','draining')),
    rpc_url        TEXT        NOT NULL DEFAULT '',
    runtimes       TEXT        NOT NULL DEFAULT '[]',
    capabilities   TEXT        NOT NULL DEFAULT '[]',
    capacity       TEXT        NOT NULL DEFAULT '{}',
    last_heartbeat TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX workers_status ON workers (status);

CREATE TABLE leases (
    resource_id   TEXT COLLATE "C" PRIMARY KEY,
    resource_type TEXT        NOT NULL DEFAULT '',
    holder_id     TEXT        NOT NULL,
    generation    BIGINT      NOT NULL CHECK (generation >= 1),
    granted_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at    TIMESTAMPTZ NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX leases_holder  ON leases (holder_id);
CREATE INDEX leases_expires ON leases (expires_at);

CREATE TABLE lease_generations (
    resource_id     TEXT COLLATE "C" PRIMARY KEY,
    last_generation BIGINT NOT NULL DEFAULT 0 CHECK (last_generation >= 0)
);
