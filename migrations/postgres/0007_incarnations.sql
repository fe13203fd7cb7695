-- The newest incarnation each replica started as (Postgres dialect of
-- migrations/sqlite/0007). A replica restarted from an older copy of its data
-- directory presents an incarnation not above the recorded one and is refused.
CREATE TABLE replica_incarnations (
    node_id     BIGINT      PRIMARY KEY CHECK (node_id >= 1),
    incarnation BIGINT      NOT NULL CHECK (incarnation >= 1),
    boot_id     TEXT        COLLATE "C" NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);
