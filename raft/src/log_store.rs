//! openraft's `RaftLogStorage` over a [`LogStore`]: entries, vote, committed
//! log ID and purge point encoded with the [`codec`](crate::codec), sled I/O on
//! the blocking pool (each write fsyncs), and the append callback fired only
//! after the entries are durable.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{RaftLogReader, StorageIOError, Vote};

use crate::codec::{decode_value, encode_value};
use crate::log::{LogError, LogStore, SledLog};
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

/// The Raft log of one replica.
#[derive(Clone, Debug)]
pub struct RaftLogStore {
    log: Arc<SledLog>,
}

impl RaftLogStore {
    pub fn new(log: SledLog) -> Self {
        RaftLogStore { log: Arc::new(log) }
    }

    /// Wraps `log` after checking that it is whole: every entry decodes and
    /// sits at its own index, indexes are contiguous from the purge point, and
    /// neither the committed log ID nor `applied_index` (what the state
    /// machine has already applied, from the store) is beyond what the log
    /// still holds. A log that fails is refused, so a damaged replica stops
    /// instead of serving a history with holes: sled, like most engines, can
    /// come back from damaged files with an older prefix and no error.
    ///
    /// The applied-index check can also refuse a replica that crashed between
    /// installing a snapshot and purging its log; that is the safe side (the
    /// operator wipes it and adds it back under a new ID).
    pub fn open_checked(log: SledLog, applied_index: Option<u64>) -> Result<Self, LogError> {
        let purged: Option<LogId> = log.last_purged()?.map(|b| decode(&b)).transpose()?;
        let mut expected = purged.map(|p| p.index + 1);
        let mut last: Option<LogId> = purged;
        for (index, bytes) in log.entries(..)? {
            let entry: Entry = decode(&bytes)?;
            if entry.log_id.index != index {
                return Err(LogError::Corrupt(format!(
                    "entry stored at index {index} claims index {}",
                    entry.log_id.index
                )));
            }
            if let Some(want) = expected
                && index != want
            {
                return Err(LogError::Corrupt(format!(
                    "entries {want} to {} are missing",
                    index.saturating_sub(1)
                )));
            }
            expected = Some(index + 1);
            last = Some(entry.log_id);
        }
        let committed: Option<LogId> = log.committed()?.map(|b| decode(&b)).transpose()?;
        if let Some(c) = committed
            && last.is_none_or(|l| l.index < c.index)
        {
            return Err(LogError::Corrupt(format!(
                "the log ends at {:?} but entry {} was committed: committed entries are missing",
                last.map(|l| l.index),
                c.index
            )));
        }
        if let Some(applied) = applied_index
            && last.is_none_or(|l| l.index < applied)
        {
            return Err(LogError::Corrupt(format!(
                "the state machine applied entry {applied} but the log ends at {:?}: the log lost entries",
                last.map(|l| l.index)
            )));
        }
        if let Some(v) = log.vote()? {
            decode::<Vote<NodeId>>(&v)?;
        }
        Ok(Self::new(log))
    }

    /// Runs blocking log I/O off the async threads.
    async fn blocking<T, F>(&self, f: F) -> Result<T, LogError>
    where
        T: Send + 'static,
        F: FnOnce(&SledLog) -> Result<T, LogError> + Send + 'static,
    {
        let log = self.log.clone();
        tokio::task::spawn_blocking(move || f(&log))
            .await
            .map_err(|e| LogError::Io(format!("log task failed: {e}")))?
    }
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, LogError> {
    decode_value(bytes).map_err(|e| LogError::Corrupt(e.to_string()))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, LogError> {
    encode_value(v).map_err(|e| LogError::Io(e.to_string()))
}

fn read_err(e: LogError) -> StorageError {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: LogError) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

impl RaftLogReader<TypeConfig> for RaftLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let bounds: (Bound<u64>, Bound<u64>) =
            (range.start_bound().cloned(), range.end_bound().cloned());
        self.blocking(move |log| {
            log.entries(bounds)?
                .iter()
                .map(|(_, bytes)| decode::<Entry>(bytes))
                .collect()
        })
        .await
        .map_err(read_err)
    }
}

impl RaftLogStorage<TypeConfig> for RaftLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.blocking(|log| {
            let last_purged_log_id: Option<LogId> =
                log.last_purged()?.map(|b| decode(&b)).transpose()?;
            let last = match log.last()? {
                Some((_, bytes)) => Some(decode::<Entry>(&bytes)?.log_id),
                None => last_purged_log_id,
            };
            Ok(LogState {
                last_purged_log_id,
                last_log_id: last,
            })
        })
        .await
        .map_err(read_err)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let bytes = encode(vote).map_err(|e| StorageError::from(StorageIOError::write_vote(&e)))?;
        self.blocking(move |log| log.save_vote(&bytes))
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.blocking(|log| log.vote()?.map(|b| decode(&b)).transpose())
            .await
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let bytes = committed
            .map(|c| encode(&c))
            .transpose()
            .map_err(write_err)?;
        self.blocking(move |log| log.save_committed(bytes.as_deref()))
            .await
            .map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.blocking(|log| log.committed()?.map(|b| decode(&b)).transpose())
            .await
            .map_err(read_err)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let encoded = entries
            .into_iter()
            .map(|e| Ok((e.log_id.index, encode(&e)?)))
            .collect::<Result<Vec<_>, LogError>>()
            .map_err(write_err)?;
        let result = self.blocking(move |log| log.append(&encoded)).await;
        // Durable (flushed) or failed: only now may openraft count these entries.
        callback.log_io_completed(
            result
                .as_ref()
                .map(|_| ())
                .map_err(|e| io::Error::other(e.to_string())),
        );
        result.map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.blocking(move |log| log.truncate_from(log_id.index))
            .await
            .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let bytes = encode(&log_id).map_err(write_err)?;
        self.blocking(move |log| log.purge_to(log_id.index, &bytes))
            .await
            .map_err(write_err)
    }
}
