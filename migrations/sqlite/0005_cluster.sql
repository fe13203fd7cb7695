-- Replica node IDs removed from the Raft cluster. An ID, once removed, is never
-- admitted again: a returning replica with a stale log under a recycled ID could
-- otherwise vote with a history the cluster no longer has.
CREATE TABLE removed_nodes (
    node_id    INTEGER PRIMARY KEY NOT NULL CHECK (node_id >= 1),
    removed_at INTEGER NOT NULL
);
