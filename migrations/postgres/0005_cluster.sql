-- Replica node IDs removed from the Raft cluster (Postgres dialect of
-- migrations/sqlite/0005). An ID, once removed, is never admitted again.
CREATE TABLE removed_nodes (
    node_id    BIGINT      PRIMARY KEY CHECK (node_id >= 1),
    removed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
