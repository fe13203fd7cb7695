//! The Raft state machine is the store: a committed entry is applied with
//! [`Store::apply_batch`], which records the entry's log ID in the same
//! transaction as its effects, so a crash can never apply an entry twice or
//! half-apply it. Snapshots are logical (every table, from one consistent read)
//! and installed in one transaction; they travel as codec-encoded bytes, which
//! openraft sends in chunks.

use std::io::Cursor;
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError, StoredMembership};
use stacyvm_store::{AppliedLog, BatchOutcome, Mutation, Store, StoreSnapshot};

use crate::codec::{Command, decode_value, encode_value};
use crate::types::{
    Entry, LogId, NodeId, NodeInfo, Response, StorageError, TypeConfig, store_index,
};

type Membership = StoredMembership<NodeId, NodeInfo>;

/// The last snapshot this replica built or installed, kept for followers that
/// need it.
#[derive(Clone, Debug)]
struct CurrentSnapshot {
    meta: SnapshotMeta<NodeId, NodeInfo>,
    data: Vec<u8>,
}

/// The state machine of one replica.
#[derive(Clone, Debug)]
pub struct StoreStateMachine {
    store: Arc<dyn Store>,
    current: Arc<Mutex<Option<CurrentSnapshot>>>,
    applied: tokio::sync::broadcast::Sender<Arc<AppliedMutations>>,
}

/// Mutations of normal entries this replica just applied, with their Raft
/// index, in log order. Every replica sees the same sequence (events are built
/// from it). Entries skipped as already applied are not repeated.
#[derive(Debug)]
pub struct AppliedMutations {
    pub entries: Vec<(u64, Vec<Mutation>)>,
}

impl StoreStateMachine {
    pub fn new(store: Arc<dyn Store>) -> Self {
        StoreStateMachine {
            store,
            current: Arc::new(Mutex::new(None)),
            applied: tokio::sync::broadcast::channel(1024).0,
        }
    }

    /// Subscribes to what this replica applies (lagging receivers lose the
    /// oldest batches and are told so by `RecvError::Lagged`).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<AppliedMutations>> {
        self.applied.subscribe()
    }

    /// The store this state machine applies to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn set_current(&self, snap: CurrentSnapshot) {
        // A poisoned lock only means a panic elsewhere; the value is still sound.
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(snap);
    }
}

fn sm_read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_state_machine(&e).into()
}

fn sm_write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_state_machine(&e).into()
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Decodes the store's bookkeeping text columns into openraft values.
fn decode_applied(
    applied_log: &str,
    membership: &str,
) -> Result<(Option<LogId>, Membership), StorageError> {
    let log_id = if applied_log.is_empty() {
        None
    } else {
        Some(serde_json::from_str(applied_log).map_err(sm_read_err)?)
    };
    let membership = if membership.is_empty() {
        Membership::default()
    } else {
        serde_json::from_str(membership).map_err(sm_read_err)?
    };
    Ok((log_id, membership))
}

impl RaftStateMachine<TypeConfig> for StoreStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        let state = self.store.raft_state().await.map_err(sm_read_err)?;
        decode_applied(&state.applied_log, &state.membership)
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        // Every entry openraft hands over at once goes into one store
        // transaction: one commit for many entries when the leader is busy.
        let mut batch = Vec::new();
        let mut kinds = Vec::new();
        let mut first_log_id = None;
        for entry in entries {
            let log_id = entry.log_id;
            first_log_id.get_or_insert(log_id);
            let at = AppliedLog {
                index: store_index(log_id.index),
                log_id: json(&log_id),
            };
            let (mutations, normal) = match entry.payload {
                EntryPayload::Blank => (Vec::new(), false),
                EntryPayload::Normal(Command::Store(m)) => (m, true),
                EntryPayload::Membership(m) => {
                    let stored = Membership::new(Some(log_id), m);
                    (
                        vec![Mutation::SetMembership {
                            membership: json(&stored),
                        }],
                        false,
                    )
                }
            };
            batch.push((at, mutations));
            kinds.push(normal);
        }
        let Some(first) = first_log_id else {
            return Ok(Vec::new());
        };
        let outcomes = self
            .store
            .apply_entries(&batch)
            .await
            .map_err(|e| StorageError::from(StorageIOError::apply(first, &e)))?;
        if self.applied.receiver_count() > 0 {
            let entries = batch
                .iter()
                .zip(&outcomes)
                .zip(&kinds)
                .filter(|((_, o), normal)| **normal && matches!(o, BatchOutcome::Applied(_)))
                .map(|(((at, m), _), _)| (at.index.saturating_sub(1), m.clone()))
                .collect::<Vec<_>>();
            if !entries.is_empty() {
                let _ = self.applied.send(Arc::new(AppliedMutations { entries }));
            }
        }
        let out = outcomes
            .into_iter()
            .zip(kinds)
            .map(|(outcome, normal)| match outcome {
                BatchOutcome::Skipped { .. } => Response::AlreadyApplied,
                BatchOutcome::Applied(results) if normal => Response::Applied(results),
                BatchOutcome::Applied(_) => Response::None,
            })
            .collect();
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let snap: StoreSnapshot = decode_value(&data).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e))
        })?;
        // The tables must describe exactly the state the metadata claims.
        let (log_id, membership) = decode_applied(&snap.raft.applied_log, &snap.raft.membership)?;
        if log_id != meta.last_log_id || membership != meta.last_membership {
            let e = std::io::Error::other(format!(
                "snapshot {} claims {:?} but its tables are at {:?}",
                meta.snapshot_id, meta.last_log_id, log_id
            ));
            return Err(StorageIOError::read_snapshot(Some(meta.signature()), &e).into());
        }
        // With several replicas sharing one database, another replica may have
        // applied past this snapshot already: replacing the tables would move
        // the shared record backwards. The tables already reflect it; keep them.
        let current = self.store.raft_state().await.map_err(sm_read_err)?;
        if current.applied_index < snap.raft.applied_index {
            self.store.install_snapshot(&snap).await.map_err(|e| {
                StorageError::from(StorageIOError::write_snapshot(Some(meta.signature()), &e))
            })?;
        }
        self.set_current(CurrentSnapshot {
            meta: meta.clone(),
            data,
        });
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let current = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(current.map(|c| Snapshot {
            meta: c.meta,
            snapshot: Box::new(Cursor::new(c.data)),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StoreStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // One consistent read gives the tables and the log ID they reflect.
        let snap = self.store.export_snapshot().await.map_err(sm_read_err)?;
        let (last_log_id, last_membership) =
            decode_applied(&snap.raft.applied_log, &snap.raft.membership)?;
        let data = encode_value(&snap).map_err(sm_write_err)?;
        let snapshot_id = match last_log_id {
            Some(l) => format!(
                "{}-{}-{}",
                l.leader_id.term,
                l.index,
                stacyvm_store::Ts::now().micros()
            ),
            None => format!("empty-{}", stacyvm_store::Ts::now().micros()),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        self.set_current(CurrentSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        });
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}
