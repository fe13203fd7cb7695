//! Lease decisions: pure functions from (current lease, request, now) to the new
//! lease or a refusal. The drivers read the current row under a lock, call these,
//! and write the result; nothing here does I/O or reads a clock.
//!
//! Rules (fixing the earlier implementation's weak spots, reference §3.4, §12):
//! - acquire succeeds when the lease is free, expired, or already held by the
//!   same holder; otherwise `Conflict` naming the current holder;
//! - every grant (re-acquire included) gets `last_generation + 1`, where
//!   `last_generation` is the highest generation ever granted for the resource,
//!   kept even after release, so generations work as fencing tokens;
//! - renew needs the holder, the current generation and an unexpired lease; it
//!   does not change the generation (it extends the same grant);
//! - TTLs must be positive and are capped at [`MAX_LEASE_TTL_MS`];
//! - release by anyone but the holder is `Conflict`.

use serde::{Deserialize, Serialize};

use crate::StoreError;
use crate::model::{Lease, MAX_ID_LEN, Ts, check_id, check_len, check_ts};

/// Longest TTL any grant or renewal gets; longer requests are capped.
pub const MAX_LEASE_TTL_MS: i64 = 24 * 60 * 60 * 1000;

/// Request to take (or re-take) a lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcquireLease {
    pub resource_id: String,
    pub resource_type: String,
    pub holder_id: String,
    pub ttl_ms: i64,
    pub now: Ts,
}

/// Request to extend a held lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewLease {
    pub resource_id: String,
    pub holder_id: String,
    pub generation: i64,
    pub ttl_ms: i64,
    pub now: Ts,
}

impl AcquireLease {
    /// Structural checks (IDs, TTL), before any I/O.
    pub fn validate(&self) -> Result<(), StoreError> {
        check_id("lease resource id", &self.resource_id)?;
        check_id("lease holder id", &self.holder_id)?;
        check_len("lease resource type", &self.resource_type, MAX_ID_LEN)?;
        check_ts("lease now", self.now)?;
        check_ts(
            "lease expiry",
            self.now.plus_millis(check_ttl(self.ttl_ms)?),
        )
    }
}

fn check_ttl(ttl_ms: i64) -> Result<i64, StoreError> {
    if ttl_ms <= 0 {
        return Err(StoreError::Invalid(format!(
            "lease ttl must be positive (got {ttl_ms} ms)"
        )));
    }
    Ok(ttl_ms.min(MAX_LEASE_TTL_MS))
}

fn held_by_other(lease: &Lease) -> StoreError {
    StoreError::conflict(
        "lease",
        &lease.resource_id,
        format!(
            "held by {:?} (generation {}) until {}",
            lease.holder_id, lease.generation, lease.expires_at
        ),
    )
}

/// The lease a successful acquire writes.
pub fn decide_acquire(
    current: Option<&Lease>,
    last_generation: i64,
    req: &AcquireLease,
) -> Result<Lease, StoreError> {
    req.validate()?;
    let ttl = check_ttl(req.ttl_ms)?;
    if let Some(cur) = current {
        let live = cur.expires_at > req.now;
        if live && cur.holder_id != req.holder_id {
            return Err(held_by_other(cur));
        }
    }
    let floor = current.map_or(0, |c| c.generation);
    Ok(Lease {
        resource_id: req.resource_id.clone(),
        resource_type: req.resource_type.clone(),
        holder_id: req.holder_id.clone(),
        generation: last_generation.max(floor) + 1,
        granted_at: req.now,
        expires_at: req.now.plus_millis(ttl),
        updated_at: req.now,
    })
}

/// The lease a successful renewal writes.
pub fn decide_renew(current: Option<&Lease>, req: &RenewLease) -> Result<Lease, StoreError> {
    let ttl = check_ttl(req.ttl_ms)?;
    check_ts("lease expiry", req.now.plus_millis(ttl))?;
    let Some(cur) = current else {
        return Err(StoreError::not_found("lease", &req.resource_id));
    };
    if cur.holder_id != req.holder_id {
        return Err(held_by_other(cur));
    }
    if cur.generation != req.generation {
        return Err(StoreError::conflict(
            "lease",
            &cur.resource_id,
            format!(
                "generation {} is not the current grant (current is {})",
                req.generation, cur.generation
            ),
        ));
    }
    if cur.expires_at <= req.now {
        return Err(StoreError::conflict(
            "lease",
            &cur.resource_id,
            format!("expired at {}; acquire it again", cur.expires_at),
        ));
    }
    Ok(Lease {
        expires_at: req.now.plus_millis(ttl),
        updated_at: req.now,
        ..cur.clone()
    })
}

/// Checks that `holder_id` may release the lease.
pub fn decide_release(
    current: Option<&Lease>,
    resource_id: &str,
    holder_id: &str,
) -> Result<(), StoreError> {
    match current {
        None => Err(StoreError::not_found("lease", resource_id)),
        Some(cur) if cur.holder_id != holder_id => Err(held_by_other(cur)),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, generation: i64, expires: i64) -> Lease {
        Lease {
            resource_id: "sb-1".into(),
            resource_type: "sandbox".into(),
            holder_id: holder.into(),
            generation,
            granted_at: Ts(0),
            expires_at: Ts(expires),
            updated_at: Ts(0),
        }
    }

    fn acquire(holder: &str, ttl_ms: i64, now: i64) -> AcquireLease {
        AcquireLease {
            resource_id: "sb-1".into(),
            resource_type: "sandbox".into(),
            holder_id: holder.into(),
            ttl_ms,
            now: Ts(now),
        }
    }

    #[test]
    fn acquire_table() {
        // (name, current, last_generation, request, expected generation or error kind)
        let cases: Vec<(&str, Option<Lease>, i64, AcquireLease, Result<i64, &str>)> = vec![
            (
                "free, never granted",
                None,
                0,
                acquire("w1", 1000, 10),
                Ok(1),
            ),
            (
                "free after release keeps counting",
                None,
                7,
                acquire("w1", 1000, 10),
                Ok(8),
            ),
            (
                "same holder re-acquires",
                Some(lease("w1", 3, 5_000)),
                3,
                acquire("w1", 10, 10),
                Ok(4),
            ),
            (
                "other holder, live",
                Some(lease("w1", 3, 5_000)),
                3,
                acquire("w2", 10, 10),
                Err("conflict"),
            ),
            (
                "other holder, expired",
                Some(lease("w1", 3, 10)),
                3,
                acquire("w2", 10, 10),
                Ok(4),
            ),
            (
                "other holder, expires exactly now",
                Some(lease("w1", 3, 10)),
                3,
                acquire("w2", 10, 10),
                Ok(4),
            ),
            ("zero ttl", None, 0, acquire("w1", 0, 10), Err("invalid")),
            (
                "negative ttl",
                None,
                0,
                acquire("w1", -5, 10),
                Err("invalid"),
            ),
            ("empty holder", None, 0, acquire("", 10, 10), Err("invalid")),
            (
                "row generation above counter still increases",
                Some(lease("w1", 9, 1)),
                4,
                acquire("w2", 10, 10),
                Ok(10),
            ),
        ];
        for (name, cur, last, req, want) in cases {
            let got = decide_acquire(cur.as_ref(), last, &req);
            match (got, want) {
                (Ok(l), Ok(g)) => {
                    assert_eq!(l.generation, g, "{name}");
                    assert_eq!(l.holder_id, req.holder_id, "{name}");
                    assert_eq!(l.expires_at, req.now.plus_millis(req.ttl_ms), "{name}");
                }
                (Err(StoreError::Conflict { reason, .. }), Err("conflict")) => {
                    assert!(
                        reason.contains("\"w1\""),
                        "{name}: conflict must name the holder: {reason}"
                    );
                }
                (Err(StoreError::Invalid(_)), Err("invalid")) => {}
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn acquire_caps_ttl() {
        let l = decide_acquire(None, 0, &acquire("w1", i64::MAX, 0)).expect("grant");
        assert_eq!(l.expires_at, Ts(0).plus_millis(MAX_LEASE_TTL_MS));
    }

    #[test]
    fn renew_table() {
        let renew = |holder: &str, generation: i64, ttl_ms: i64, now: i64| RenewLease {
            resource_id: "sb-1".into(),
            holder_id: holder.into(),
            generation,
            ttl_ms,
            now: Ts(now),
        };
        let cur = lease("w1", 3, 5_000);
        let cases: Vec<(&str, Option<Lease>, RenewLease, Result<i64, &str>)> = vec![
            (
                "holder, generation, live",
                Some(cur.clone()),
                renew("w1", 3, 1, 100),
                Ok(100 + 1000),
            ),
            (
                "capped ttl",
                Some(cur.clone()),
                renew("w1", 3, i64::MAX, 0),
                Ok(MAX_LEASE_TTL_MS * 1000),
            ),
            (
                "other holder",
                Some(cur.clone()),
                renew("w2", 3, 1, 100),
                Err("conflict"),
            ),
            (
                "stale generation",
                Some(cur.clone()),
                renew("w1", 2, 1, 100),
                Err("conflict"),
            ),
            (
                "expired",
                Some(cur.clone()),
                renew("w1", 3, 1, 5_000),
                Err("conflict"),
            ),
            ("missing", None, renew("w1", 3, 1, 100), Err("not_found")),
            (
                "zero ttl",
                Some(cur.clone()),
                renew("w1", 3, 0, 100),
                Err("invalid"),
            ),
        ];
        for (name, cur, req, want) in cases {
            match (decide_renew(cur.as_ref(), &req), want) {
                (Ok(l), Ok(exp)) => {
                    assert_eq!(l.expires_at, Ts(exp), "{name}");
                    assert_eq!(l.generation, 3, "{name}: renew keeps the generation");
                }
                (Err(StoreError::Conflict { .. }), Err("conflict"))
                | (Err(StoreError::NotFound { .. }), Err("not_found"))
                | (Err(StoreError::Invalid(_)), Err("invalid")) => {}
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn release_table() {
        let cur = lease("w1", 3, 5_000);
        assert!(decide_release(Some(&cur), "sb-1", "w1").is_ok());
        assert!(matches!(
            decide_release(Some(&cur), "sb-1", "w2"),
            Err(StoreError::Conflict { .. })
        ));
        assert!(matches!(
            decide_release(None, "sb-1", "w1"),
            Err(StoreError::NotFound { .. })
        ));
        // An expired lease can still be released by its holder.
        let expired = lease("w1", 3, 0);
        assert!(decide_release(Some(&expired), "sb-1", "w1").is_ok());
    }
}
