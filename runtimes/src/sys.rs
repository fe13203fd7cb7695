//! The workspace's only `unsafe`: thin, checked wrappers over the libc calls
//! std does not offer (signals to processes and process groups, the
//! monotonic clock, the allocator's arena limit). Everything else calls these.
#![allow(unsafe_code)]

/// Caps glibc malloc at `arenas` arenas unless the operator set
/// `MALLOC_ARENA_MAX`. glibc's default (8 per core) lets every busy thread
/// keep its own arena of freed memory: a replica with 10,000 sandboxes
/// measured 161 MB resident with the default and 118 MB with 2
/// (docs/benchmarks.md). Call first thing in `main`, before other threads exist.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn limit_malloc_arenas(arenas: i32) {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() || arenas < 1 {
        return;
    }
    // SAFETY: mallopt(3) only changes allocator tuning; called before any
    // other thread runs, with a valid parameter and a positive value.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

/// No-op where glibc is not the allocator.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn limit_malloc_arenas(_arenas: i32) {}

/// Sends `sig` to process `pid`. Returns false if the process does not exist
/// (or cannot be signalled). `pid` must be positive: 0 and negatives (which
/// address groups) are refused here.
pub fn kill(pid: i32, sig: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill(2) has no memory effects; pid is a positive process ID.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// Sends `sig` to every process in process group `pgid` (> 1).
pub fn kill_group(pgid: i32, sig: i32) -> bool {
    if pgid <= 1 {
        return false;
    }
    // SAFETY: kill(2) with a negative pid addresses the process group; no memory effects.
    unsafe { libc::kill(-pgid, sig) == 0 }
}

/// Restores the default SIGPIPE action (terminate quietly), as command-line
/// tools expect when their output pipe closes early (`stacyvm ls | head`).
/// Rust starts with SIGPIPE ignored, which turns that into a panic in
/// `println!`. Never call this in a server: a peer closing a socket would
/// then kill the process.
pub fn default_sigpipe() {
    // SAFETY: signal(2) with SIG_DFL installs no handler code; called once at start.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Whether process `pid` exists (signal 0).
pub fn alive(pid: i32) -> bool {
    kill(pid, 0)
}

/// CLOCK_MONOTONIC in nanoseconds (comparable across processes on one host).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_and_clock() {
        assert!(alive(i32::try_from(std::process::id()).unwrap_or(0)));
        assert!(!kill(0, 0), "group addressing is refused");
        assert!(!kill_group(1, 0), "init's group is refused");
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }
}
