-- Worker enrollment secrets and enrolled worker credentials. Both hold only the
-- hex SHA-256 of a secret: the store never sees a secret itself.

-- A single-use enrollment secret issued for one worker ID. Consuming it sets
-- used_at (the row stays, so a second use is refused); rows whose expires_at
-- has passed can be pruned.
CREATE TABLE worker_enrollments (
    token_hash  TEXT    PRIMARY KEY NOT NULL,
    worker_id   TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER
);
CREATE INDEX worker_enrollments_expires ON worker_enrollments (expires_at);

-- The credential a worker obtained by enrolling, one per worker ID; enrolling
-- again replaces the hash and keeps created_at.
CREATE TABLE worker_credentials (
    worker_id   TEXT    PRIMARY KEY NOT NULL,
    token_hash  TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
