-- Worker enrollment secrets and enrolled worker credentials (Postgres dialect of
-- migrations/sqlite/0006). Both hold only the hex SHA-256 of a secret.
CREATE TABLE worker_enrollments (
    token_hash  TEXT COLLATE "C" PRIMARY KEY,
    worker_id   TEXT COLLATE "C" NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at  TIMESTAMPTZ NOT NULL,
    used_at     TIMESTAMPTZ
);
CREATE INDEX worker_enrollments_expires ON worker_enrollments (expires_at);

CREATE TABLE worker_credentials (
    worker_id   TEXT COLLATE "C" PRIMARY KEY,
    token_hash  TEXT COLLATE "C" NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
