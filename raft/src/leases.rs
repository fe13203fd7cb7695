//! Lease arbitration on the leader.
//!
//! Grants and revocations are Raft commands (the store's lease rules give each
//! grant a generation higher than any before). Renewal is not: a worker renews
//! all its leases in one call, and the leader only moves their deadlines in
//! memory ([`LeaseTable`]). That keeps the log free of heartbeat traffic. The
//! price is that deadlines are soft state, so a new leader starts every
//! deadline fresh: it treats each lease as valid until one full lease TTL after
//! its own election, never expiring what the old leader may have just renewed.
//!
//! The decision logic is pure (time is passed in) and table-tested; the
//! replica does the I/O.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use stacyvm_store::{Lease, Ts};

/// A lease a worker says it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLease {
    pub resource_id: String,
    pub generation: i64,
}

/// The leader's answer to a batched renewal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewOutcome {
    /// Still valid; deadlines extended by each lease's TTL.
    pub renewed: Vec<HeldLease>,
    /// No longer valid (expired, revoked, or granted to someone else): the
    /// worker must stop these sandboxes.
    pub lost: Vec<HeldLease>,
    /// TTL applied to the renewed leases, in milliseconds (the smallest).
    pub ttl_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Deadline {
    holder: String,
    generation: i64,
    at: Instant,
}

/// Leader-local lease deadlines for one term.
#[derive(Debug, Clone)]
pub struct LeaseTable {
    term: u64,
    elected_at: Instant,
    deadlines: HashMap<String, Deadline>,
}

/// A lease's TTL as granted (expiry minus grant time), at least 1 ms.
pub fn lease_ttl(l: &Lease) -> Duration {
    let micros = l
        .expires_at
        .micros()
        .saturating_sub(l.granted_at.micros())
        .max(1_000);
    Duration::from_micros(u64::try_from(micros).unwrap_or(1_000))
}

impl LeaseTable {
    /// A fresh table for a leader elected at `elected_at` in `term`.
    pub fn new(term: u64, elected_at: Instant) -> Self {
        LeaseTable {
            term,
            elected_at,
            deadlines: HashMap::new(),
        }
    }

    pub fn term(&self) -> u64 {
        self.term
    }

    /// When `l` stops being valid, as this leader knows it: its renewed
    /// deadline, or (never renewed under this leader) one TTL after election.
    pub fn deadline(&self, l: &Lease) -> Instant {
        match self.deadlines.get(&l.resource_id) {
            Some(d) if d.holder == l.holder_id && d.generation == l.generation => d.at,
            _ => self.elected_at + lease_ttl(l),
        }
    }

    /// True when `l` may be handed to someone else at `now` (`wall_now` on
    /// the wall clock the store's timestamps use). Both the leader's
    /// deadline and the lease's own stored expiry must have passed: a grant
    /// is applied to the store a moment before it is recorded here, and in
    /// that moment an unrecorded lease must not look expired (it would be
    /// handed to a second holder, or its renewal refused).
    pub fn is_expired(&self, l: &Lease, now: Instant, wall_now: Ts) -> bool {
        l.expires_at <= wall_now && self.deadline(l) <= now
    }

    /// Records a grant the log just committed.
    pub fn granted(&mut self, l: &Lease, now: Instant) {
        self.deadlines.insert(
            l.resource_id.clone(),
            Deadline {
                holder: l.holder_id.clone(),
                generation: l.generation,
                at: now + lease_ttl(l),
            },
        );
    }

    /// Forgets a released or revoked lease.
    pub fn forget(&mut self, resource_id: &str) {
        self.deadlines.remove(resource_id);
    }

    /// Renews what `holder` claims, given the committed lease rows (`None` when
    /// the resource has no lease).
    pub fn renew(
        &mut self,
        holder: &str,
        claims: &[(HeldLease, Option<Lease>)],
        now: Instant,
        wall_now: Ts,
    ) -> RenewOutcome {
        let mut out = RenewOutcome::default();
        let mut ttl_ms = i64::MAX;
        for (claim, row) in claims {
            let valid = row.as_ref().filter(|l| {
                l.holder_id == holder
                    && l.generation == claim.generation
                    && !self.is_expired(l, now, wall_now)
            });
            match valid {
                Some(l) => {
                    let ttl = lease_ttl(l);
                    ttl_ms = ttl_ms.min(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
                    self.granted(l, now);
                    out.renewed.push(claim.clone());
                }
                None => out.lost.push(claim.clone()),
            }
        }
        out.ttl_ms = if out.renewed.is_empty() { 0 } else { ttl_ms };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wall clock long after every test lease's stored expiry.
    const LATER: Ts = Ts(1_000_000_000_000);

    fn lease(holder: &str, generation: i64, ttl_ms: i64) -> Lease {
        Lease {
            resource_id: "sb-1".into(),
            resource_type: "sandbox".into(),
            holder_id: holder.into(),
            generation,
            granted_at: Ts(0),
            expires_at: Ts(0).plus_millis(ttl_ms),
            updated_at: Ts(0),
        }
    }

    fn claim(generation: i64) -> HeldLease {
        HeldLease {
            resource_id: "sb-1".into(),
            generation,
        }
    }

    #[test]
    fn new_leader_expires_nothing_for_one_ttl() {
        let t0 = Instant::now();
        let table = LeaseTable::new(7, t0);
        let l = lease("w1", 3, 1_000);
        // The lease's stored expiry is long past in wall-clock terms, but this
        // leader has never seen it renewed: it is valid for a TTL after election.
        assert!(!table.is_expired(&l, t0 + Duration::from_millis(999), LATER));
        assert!(table.is_expired(&l, t0 + Duration::from_millis(1_000), LATER));
    }

    #[test]
    fn a_grant_not_yet_recorded_is_not_expired() {
        // A leader in office for a minute; a grant it has applied to the
        // store but not yet recorded in its table (the apply-to-record gap).
        let t0 = Instant::now();
        let table = LeaseTable::new(3, t0);
        let now = t0 + Duration::from_secs(60);
        let granted_wall = Ts(5_000_000_000);
        let mut fresh = lease("w1", 9, 1_500);
        fresh.granted_at = granted_wall;
        fresh.expires_at = granted_wall.plus_millis(1_500);
        // 100 ms after the grant: the table alone would call it expired
        // (elected_at + TTL is long past); the stored expiry says no.
        assert!(!table.is_expired(&fresh, now, granted_wall.plus_millis(100)));
        let mut renewing = table.clone();
        let out = renewing.renew(
            "w1",
            &[(claim(9), Some(fresh.clone()))],
            now,
            granted_wall.plus_millis(100),
        );
        assert_eq!(out.renewed, vec![claim(9)], "a fresh grant renews");
        // Once both the stored expiry and the deadline have passed, it is.
        assert!(table.is_expired(&fresh, now, granted_wall.plus_millis(1_500)));
    }

    #[test]
    fn renew_table() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // (name, holder asking, claim generation, committed row, at, renewed?)
        let cases: Vec<(&str, &str, i64, Option<Lease>, Duration, bool)> = vec![
            (
                "holder, generation, in time",
                "w1",
                3,
                Some(lease("w1", 3, 1_000)),
                ms(500),
                true,
            ),
            (
                "grace after election ended",
                "w1",
                3,
                Some(lease("w1", 3, 1_000)),
                ms(1_000),
                false,
            ),
            (
                "other holder",
                "w2",
                3,
                Some(lease("w1", 3, 1_000)),
                ms(10),
                false,
            ),
            (
                "stale generation",
                "w1",
                2,
                Some(lease("w1", 3, 1_000)),
                ms(10),
                false,
            ),
            ("no lease at all", "w1", 3, None, ms(10), false),
        ];
        for (name, holder, generation, row, at, want) in cases {
            let mut table = LeaseTable::new(1, t0);
            let out = table.renew(holder, &[(claim(generation), row)], t0 + at, LATER);
            assert_eq!(out.renewed.len() == 1, want, "{name}: {out:?}");
            assert_eq!(out.lost.len() == 1, !want, "{name}: {out:?}");
            if want {
                assert_eq!(out.ttl_ms, 1_000, "{name}");
            }
        }
    }

    #[test]
    fn renewal_moves_the_deadline_and_a_new_grant_resets_it() {
        let t0 = Instant::now();
        let mut table = LeaseTable::new(1, t0);
        let l = lease("w1", 3, 1_000);
        let ms = Duration::from_millis;
        assert_eq!(
            table
                .renew("w1", &[(claim(3), Some(l.clone()))], t0 + ms(900), LATER)
                .renewed
                .len(),
            1
        );
        assert!(
            !table.is_expired(&l, t0 + ms(1_899), LATER),
            "renewed at 900 ms for 1 s"
        );
        assert!(table.is_expired(&l, t0 + ms(1_900), LATER));
        // A new generation (a new grant) does not inherit the old deadline.
        let regranted = lease("w2", 4, 1_000);
        assert_eq!(table.deadline(&regranted), t0 + ms(1_000));
        table.granted(&regranted, t0 + ms(2_000));
        assert_eq!(table.deadline(&regranted), t0 + ms(3_000));
        table.forget("sb-1");
        assert_eq!(table.deadline(&regranted), t0 + ms(1_000));
    }
}
