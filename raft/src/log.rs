//! The durable Raft log: entries, vote, committed log ID and last purged log
//! ID, behind the small [`LogStore`] trait so the engine underneath can change.
//!
//! [`SledLog`] keeps entries in a sled tree keyed by big-endian index (so
//! iteration order is index order) and the metadata in a second tree. Every
//! mutating call flushes sled before it returns: an append or a vote that
//! returned `Ok` survives `kill -9` (the crash test proves it). Values are
//! opaque bytes; the openraft glue owns their encoding. Purging after a
//! snapshot keeps disk and memory bounded.

use std::ops::RangeBounds;
use std::path::Path;

/// Why the log failed. Any error means this replica must stop serving: it
/// cannot promise durability any more.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("raft log I/O failed: {0}")]
    Io(String),
    #[error("raft log is corrupt: {0}")]
    Corrupt(String),
}

impl From<sled::Error> for LogError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Corruption { .. } => LogError::Corrupt(e.to_string()),
            other => LogError::Io(other.to_string()),
        }
    }
}

/// Storage for one replica's Raft log. Implementations must make every
/// mutation durable before returning `Ok`.
pub trait LogStore: Send + Sync {
    /// Appends entries `(index, payload)`; they must follow the current last
    /// index (or overwrite a suffix the caller truncated).
    fn append(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), LogError>;
    /// Entries whose index is in `range`, in index order.
    fn entries(&self, range: impl RangeBounds<u64>) -> Result<Vec<(u64, Vec<u8>)>, LogError>
    where
        Self: Sized;
    /// The last entry's `(index, payload)`, if any.
    fn last(&self) -> Result<Option<(u64, Vec<u8>)>, LogError>;
    /// Removes every entry with index `>= index` (conflicting suffix).
    fn truncate_from(&self, index: u64) -> Result<(), LogError>;
    /// Removes every entry with index `<= index` and records `log_id` (opaque)
    /// as the last purged log ID.
    fn purge_to(&self, index: u64, log_id: &[u8]) -> Result<(), LogError>;
    fn last_purged(&self) -> Result<Option<Vec<u8>>, LogError>;
    fn save_vote(&self, vote: &[u8]) -> Result<(), LogError>;
    fn vote(&self) -> Result<Option<Vec<u8>>, LogError>;
    fn save_committed(&self, committed: Option<&[u8]>) -> Result<(), LogError>;
    fn committed(&self) -> Result<Option<Vec<u8>>, LogError>;
}

const VOTE: &str = "vote";
const INSTANCE: &str = "instance";
/// Sidecar file naming the log instance; see [`SledLog::open`].
pub const INSTANCE_FILE: &str = "STACYVM_LOG_INSTANCE";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// The Raft log on sled, under `<data_dir>/raft`.
#[derive(Debug, Clone)]
pub struct SledLog {
    db: sled::Db,
    entries: sled::Tree,
    meta: sled::Tree,
}

impl SledLog {
    /// Opens (creating) the log in `dir`.
    ///
    /// A random instance ID is kept both inside sled and in a sidecar file
    /// beside it. sled may come back *empty* from damaged files instead of
    /// failing; if the sidecar names an instance sled no longer has, the log
    /// lost its contents and opening fails rather than serving an empty
    /// history as if nothing had been acknowledged.
    pub fn open(dir: &Path) -> Result<Self, LogError> {
        let log = Self::open_engine(dir)?;
        log.check_instance(dir)?;
        Ok(log)
    }

    fn check_instance(&self, dir: &Path) -> Result<(), LogError> {
        let sidecar = dir.join(INSTANCE_FILE);
        let stored = self
            .meta
            .get(INSTANCE)?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        let on_disk = match std::fs::read_to_string(&sidecar) {
            Ok(s) => Some(s.trim().to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(LogError::Io(format!("{}: {e}", sidecar.display()))),
        };
        match (on_disk, stored) {
            (Some(file), Some(db)) if file == db => Ok(()),
            (Some(file), db) => Err(LogError::Corrupt(format!(
                "the raft log in {} lost its contents (instance {file} expected, found {}); \
                 this replica cannot be trusted: wipe its data directory and add it back under a new node id",
                dir.display(),
                db.as_deref().unwrap_or("none")
            ))),
            (None, Some(db)) => write_sidecar(&sidecar, &db),
            (None, None) => {
                let id = format!("{:016x}{:016x}", rand_u64(), rand_u64());
                self.meta.insert(INSTANCE, id.as_bytes())?;
                self.flush()?;
                write_sidecar(&sidecar, &id)
            }
        }
    }

    fn open_engine(dir: &Path) -> Result<Self, LogError> {
        let config = sled::Config::new()
            .path(dir)
            // We flush explicitly on every write; no background flusher.
            .flush_every_ms(None)
            // The log is read back only for replication and restart, mostly
            // its recent tail; 16 MiB keeps that and bounds replica memory.
            .cache_capacity(16 * 1024 * 1024);
        // A log closed a moment ago in this process can still hold its file
        // lock while sled's I/O threads finish: retry a locked log for up
        // to 10 s (a loaded machine) before calling it taken (another process holds it).
        let mut attempts = 0;
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock && attempts < 200 =>
                {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => break other?,
            }
        };
        let entries = db.open_tree("entries")?;
        let meta = db.open_tree("meta")?;
        Ok(SledLog { db, entries, meta })
    }

    fn flush(&self) -> Result<(), LogError> {
        self.db.flush()?;
        Ok(())
    }

    /// Bytes sled reports on disk.
    pub fn size_on_disk(&self) -> Result<u64, LogError> {
        Ok(self.db.size_on_disk()?)
    }
}

fn write_sidecar(path: &Path, id: &str) -> Result<(), LogError> {
    use std::io::Write;
    let io = |e: std::io::Error| LogError::Io(format!("{}: {e}", path.display()));
    let mut f = std::fs::File::create(path).map_err(io)?;
    f.write_all(id.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// A random value without pulling a RNG crate into this module: the std
/// hasher is randomly keyed per process.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn index_of(k: &[u8]) -> Result<u64, LogError> {
    let arr: [u8; 8] = k
        .try_into()
        .map_err(|_| LogError::Corrupt(format!("entry key of {} bytes", k.len())))?;
    Ok(u64::from_be_bytes(arr))
}

impl LogStore for SledLog {
    fn append(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), LogError> {
        let mut batch = sled::Batch::default();
        for (index, payload) in entries {
            batch.insert(&key(*index), payload.as_slice());
        }
        self.entries.apply_batch(batch)?;
        self.flush()
    }

    fn entries(&self, range: impl RangeBounds<u64>) -> Result<Vec<(u64, Vec<u8>)>, LogError> {
        use std::ops::Bound::*;
        let start = match range.start_bound() {
            Included(i) => Included(key(*i)),
            Excluded(i) => Excluded(key(*i)),
            Unbounded => Unbounded,
        };
        let end = match range.end_bound() {
            Included(i) => Included(key(*i)),
            Excluded(i) => Excluded(key(*i)),
            Unbounded => Unbounded,
        };
        self.entries
            .range::<[u8; 8], _>((start, end))
            .map(|kv| {
                let (k, v) = kv?;
                Ok((index_of(&k)?, v.to_vec()))
            })
            .collect()
    }

    fn last(&self) -> Result<Option<(u64, Vec<u8>)>, LogError> {
        match self.entries.last()? {
            Some((k, v)) => Ok(Some((index_of(&k)?, v.to_vec()))),
            None => Ok(None),
        }
    }

    fn truncate_from(&self, index: u64) -> Result<(), LogError> {
        let mut batch = sled::Batch::default();
        for kv in self.entries.range(key(index)..) {
            batch.remove(kv?.0);
        }
        self.entries.apply_batch(batch)?;
        self.flush()
    }

    fn purge_to(&self, index: u64, log_id: &[u8]) -> Result<(), LogError> {
        // Record the purge point first: after a crash mid-purge the reader
        // still knows which prefix is gone.
        self.meta.insert(LAST_PURGED, log_id)?;
        self.flush()?;
        let mut batch = sled::Batch::default();
        for kv in self.entries.range(..=key(index)) {
            batch.remove(kv?.0);
        }
        self.entries.apply_batch(batch)?;
        self.flush()
    }

    fn last_purged(&self) -> Result<Option<Vec<u8>>, LogError> {
        Ok(self.meta.get(LAST_PURGED)?.map(|v| v.to_vec()))
    }

    fn save_vote(&self, vote: &[u8]) -> Result<(), LogError> {
        self.meta.insert(VOTE, vote)?;
        self.flush()
    }

    fn vote(&self) -> Result<Option<Vec<u8>>, LogError> {
        Ok(self.meta.get(VOTE)?.map(|v| v.to_vec()))
    }

    fn save_committed(&self, committed: Option<&[u8]>) -> Result<(), LogError> {
        match committed {
            Some(c) => self.meta.insert(COMMITTED, c)?,
            None => self.meta.remove(COMMITTED)?,
        };
        self.flush()
    }

    fn committed(&self) -> Result<Option<Vec<u8>>, LogError> {
        Ok(self.meta.get(COMMITTED)?.map(|v| v.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64) -> (u64, Vec<u8>) {
        (i, format!("entry-{i}").into_bytes())
    }

    #[test]
    fn append_read_truncate_purge_and_meta_survive_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let log = SledLog::open(dir.path()).expect("open");
            assert_eq!(log.last().expect("last"), None);
            log.append(&(1..=10).map(entry).collect::<Vec<_>>())
                .expect("append");
            assert_eq!(
                log.entries(3..=5).expect("range"),
                vec![entry(3), entry(4), entry(5)]
            );
            log.truncate_from(8).expect("truncate");
            assert_eq!(log.last().expect("last"), Some(entry(7)));
            log.append(&[(8, b"rewritten".to_vec())])
                .expect("overwrite suffix");
            log.purge_to(3, b"purged-3").expect("purge");
            log.save_vote(b"vote-term-4").expect("vote");
            log.save_committed(Some(b"committed-6")).expect("committed");
        }
        let log = SledLog::open(dir.path()).expect("reopen");
        let all = log.entries(..).expect("all");
        assert_eq!(all.first(), Some(&entry(4)), "purged prefix is gone");
        assert_eq!(all.last(), Some(&(8, b"rewritten".to_vec())));
        assert_eq!(all.len(), 5);
        assert_eq!(
            log.last_purged().expect("purged").as_deref(),
            Some(&b"purged-3"[..])
        );
        assert_eq!(
            log.vote().expect("vote").as_deref(),
            Some(&b"vote-term-4"[..])
        );
        assert_eq!(
            log.committed().expect("committed").as_deref(),
            Some(&b"committed-6"[..])
        );
        log.save_committed(None).expect("clear");
        assert_eq!(log.committed().expect("committed"), None);
    }

    #[test]
    fn entries_iterate_in_numeric_order_across_byte_boundaries() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = SledLog::open(dir.path()).expect("open");
        let idx = [1u64, 255, 256, 65_535, 65_536, u64::from(u32::MAX) + 1];
        log.append(&idx.iter().map(|&i| entry(i)).collect::<Vec<_>>())
            .expect("append");
        let got: Vec<u64> = log
            .entries(..)
            .expect("all")
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(got, idx);
    }
}
