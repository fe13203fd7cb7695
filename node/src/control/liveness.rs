//! Worker liveness as the leader judges it: pure, time passed in.
//!
//! A worker is `online` while it heartbeats, `stale` after three missed
//! heartbeats (no new placements), and `offline` once it has been silent for
//! a full lease TTL plus a grace period (a Raft decision: its leases are
//! revoked and its sandboxes become `lost`). Heartbeat times are leader
//! memory, so a new leader counts silence from its own election: nobody is
//! declared offline before one full TTL has passed under the new leader.
//! `draining` (operator or worker decision) keeps a live worker out of
//! placement but does not stop its sandboxes.

use std::time::{Duration, Instant};

use stacyvm_store::WorkerStatus;

/// The timing every liveness decision uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LivenessTiming {
    pub heartbeat: Duration,
    pub lease_ttl: Duration,
    pub grace: Duration,
}

impl LivenessTiming {
    /// Silence after which a worker is stale (three missed heartbeats).
    pub fn stale_after(&self) -> Duration {
        self.heartbeat * 3
    }

    /// Silence after which a worker is offline.
    pub fn offline_after(&self) -> Duration {
        self.lease_ttl + self.grace
    }
}

/// A worker's effective health right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Online,
    Stale,
    Draining,
    Offline,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Online => "online",
            Health::Stale => "stale",
            Health::Draining => "draining",
            Health::Offline => "offline",
        }
    }
}

/// Judges one worker. `recorded` is its status in the store, `last_seen` the
/// leader's last heartbeat from it (None: not since this leader's election).
pub fn judge(
    recorded: WorkerStatus,
    last_seen: Option<Instant>,
    elected_at: Instant,
    now: Instant,
    t: &LivenessTiming,
) -> Health {
    if recorded == WorkerStatus::Offline && last_seen.is_none() {
        return Health::Offline;
    }
    let since = last_seen.map_or(elected_at, |s| s.max(elected_at));
    let silent = now.saturating_duration_since(since);
    if silent >= t.offline_after() {
        Health::Offline
    } else if recorded == WorkerStatus::Draining {
        Health::Draining
    } else if recorded == WorkerStatus::Offline {
        // It heartbeated again after being declared offline; the heartbeat
        // handler re-registers it as online.
        Health::Online
    } else if silent >= t.stale_after() {
        Health::Stale
    } else {
        Health::Online
    }
}

/// Whether the leader must now record the worker as offline (a Raft command).
pub fn must_declare_offline(recorded: WorkerStatus, health: Health) -> bool {
    health == Health::Offline && recorded != WorkerStatus::Offline
}

/// The status a heartbeat leaves in the store: a worker that says it drains
/// drains; an operator's drain sticks until undrained; otherwise online.
pub fn status_after_heartbeat(recorded: Option<WorkerStatus>, reported: &str) -> WorkerStatus {
    if reported == "draining" || recorded == Some(WorkerStatus::Draining) {
        WorkerStatus::Draining
    } else {
        WorkerStatus::Online
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: LivenessTiming = LivenessTiming {
        heartbeat: Duration::from_secs(1),
        lease_ttl: Duration::from_secs(10),
        grace: Duration::from_secs(5),
    };

    #[test]
    fn judge_table() {
        let e = Instant::now();
        let s = |secs: u64| e + Duration::from_secs(secs);
        use Health::*;
        use WorkerStatus as W;
        #[rustfmt::skip]
        let cases: &[(&str, W, Option<Instant>, Instant, Health)] = &[
            ("fresh heartbeat", W::Online, Some(s(10)), s(10), Online),
            ("two missed", W::Online, Some(s(10)), s(12), Online),
            ("three missed: stale", W::Online, Some(s(10)), s(13), Stale),
            ("silent TTL+grace: offline", W::Online, Some(s(10)), s(25), Offline),
            ("new leader, never heard: online at first", W::Online, None, s(1), Online),
            ("new leader, never heard: stale after 3 beats", W::Online, None, s(3), Stale),
            ("new leader waits a full TTL+grace", W::Online, None, s(14), Stale),
            ("new leader, silent TTL+grace: offline", W::Online, None, s(15), Offline),
            ("heartbeat before election counts from election", W::Online, Some(e - Duration::from_secs(100)), s(2), Online),
            ("draining live worker", W::Draining, Some(s(10)), s(11), Draining),
            ("draining but silent stays draining until offline", W::Draining, Some(s(10)), s(20), Draining),
            ("draining and dead", W::Draining, Some(s(10)), s(26), Offline),
            ("recorded offline, silent", W::Offline, None, s(1), Offline),
            ("recorded offline, heartbeating again", W::Offline, Some(s(5)), s(5), Online),
        ];
        for (name, rec, seen, now, want) in cases {
            assert_eq!(judge(*rec, *seen, e, *now, &T), *want, "{name}");
        }
    }

    #[test]
    fn offline_is_declared_once() {
        assert!(must_declare_offline(WorkerStatus::Online, Health::Offline));
        assert!(must_declare_offline(
            WorkerStatus::Draining,
            Health::Offline
        ));
        assert!(!must_declare_offline(
            WorkerStatus::Offline,
            Health::Offline
        ));
        assert!(!must_declare_offline(WorkerStatus::Online, Health::Stale));
    }

    #[test]
    fn heartbeat_status() {
        use WorkerStatus as W;
        assert_eq!(status_after_heartbeat(None, "online"), W::Online);
        assert_eq!(status_after_heartbeat(None, ""), W::Online);
        assert_eq!(
            status_after_heartbeat(Some(W::Online), "draining"),
            W::Draining
        );
        assert_eq!(
            status_after_heartbeat(Some(W::Draining), "online"),
            W::Draining
        );
        assert_eq!(
            status_after_heartbeat(Some(W::Offline), "online"),
            W::Online
        );
        assert_eq!(status_after_heartbeat(Some(W::Stale), "online"), W::Online);
    }
}
