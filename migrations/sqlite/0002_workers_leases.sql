-- Worker registry and sandbox leases.
-- lease_generations keeps the highest generation ever granted per resource and is
-- never deleted: releasing a lease deletes its row in `leases` but a later grant
-- still gets a higher generation, so generations are usable as fencing tokens.
CREATE TABLE workers (
    id             TEXT    PRIMARY KEY NOT NULL,
    hostname       TEXT    NOT NULL DEFAULT '',
    status         TEXT    NOT NULL DEFAULT 'online'
                   CHECK (status IN ('online','stale','offline','draining')),
    rpc_url        TEXT    NOT NULL DEFAULT '',
    runtimes       TEXT    NOT NULL DEFAULT '[]',
    capabilities   TEXT    NOT NULL DEFAULT '[]',
    capacity       TEXT    NOT NULL DEFAULT '{}',
    last_heartbeat INTEGER NOT NULL,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);
CREATE INDEX workers_status ON workers (status);

CREATE TABLE leases (
    resource_id   TEXT    PRIMARY KEY NOT NULL,
    resource_type TEXT    NOT NULL DEFAULT '',
    holder_id     TEXT    NOT NULL,
    generation    INTEGER NOT NULL CHECK (generation >= 1),
    granted_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX leases_holder  ON leases (holder_id);
CREATE INDEX leases_expires ON leases (expires_at);

CREATE TABLE lease_generations (
    resource_id     TEXT    PRIMARY KEY NOT NULL,
    last_generation INTEGER NOT NULL DEFAULT 0 CHECK (last_generation >= 0)
);
