-- The newest incarnation each replica started as. A replica bumps its
-- incarnation (kept in its data directory) at every start and has it recorded
-- here, through Raft, before it takes part in the cluster: a replica restarted
-- from an older copy of its data directory presents an incarnation that is not
-- above the recorded one and is refused (it may have voted or acknowledged
-- entries that copy does not remember). `boot_id` makes a retried recording of
-- the same start idempotent.
CREATE TABLE replica_incarnations (
    node_id     INTEGER PRIMARY KEY NOT NULL CHECK (node_id >= 1),
    incarnation INTEGER NOT NULL CHECK (incarnation >= 1),
    boot_id     TEXT    NOT NULL,
    updated_at  INTEGER NOT NULL
);
