//! Raft log growth under snapshot-style purging (run by hand:
//! `cargo bench -p stacyvm-raft --bench log_purge`).
//!
//! Appends 1,000,000 entries of about 100 bytes to a [`SledLog`] in a temp
//! directory, 1,000 per append call (each call flushes, as the log always
//! does), and after every 100,000 purges everything but the last 10,000, as
//! a snapshot would. Prints Markdown tables: one row per purge, then totals
//! with sled's own `size_on_disk()`, the directory's real size, and the
//! process RSS at the start, at the peak and at the end.

use std::error::Error;
use std::path::Path;
use std::time::{Duration, Instant};

use stacyvm_raft::log::{LogStore, SledLog};

const ENTRIES: u64 = 1_000_000;
const BATCH: u64 = 1_000;
const PURGE_EVERY: u64 = 100_000;
const KEEP: u64 = 10_000;
const PAYLOAD: usize = 100;

/// A field of `/proc/self/status` in bytes (`VmRSS`, `VmHWM`).
fn proc_status_bytes(field: &str) -> Result<u64, Box<dyn Error>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .ok_or_else(|| format!("{field} missing from /proc/self/status"))?;
    let kib: u64 = line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

fn rss() -> Result<u64, Box<dyn Error>> {
    proc_status_bytes("VmRSS")
}

/// (apparent bytes, allocated bytes, files) under `dir`.
fn dir_size(dir: &Path) -> Result<(u64, u64, u64), Box<dyn Error>> {
    use std::os::unix::fs::MetadataExt;
    let (mut apparent, mut allocated, mut files) = (0, 0, 0);
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            let (a, b, f) = dir_size(&entry.path())?;
            apparent += a;
            allocated += b;
            files += f;
        } else {
            apparent += meta.len();
            allocated += meta.blocks() * 512;
            files += 1;
        }
    }
    Ok((apparent, allocated, files))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn payload(index: u64) -> Vec<u8> {
    let mut p = format!("entry {index:>12} ").into_bytes();
    p.resize(PAYLOAD, b'.');
    p
}

fn main() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let rss_start = rss()?;
    let mut rss_peak = rss_start;
    let log = SledLog::open(dir.path())?;

    println!(
        "## Raft log: {ENTRIES} entries of {PAYLOAD} bytes, {BATCH} per append, \
         keep the last {KEEP} after every {PURGE_EVERY}\n"
    );
    println!(
        "| appended | purged to | sled size_on_disk | dir (apparent) | dir (allocated) | files | RSS | time |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");

    let started = Instant::now();
    let mut appending = Duration::ZERO;
    let mut purging = Duration::ZERO;
    let mut next = 1;
    while next <= ENTRIES {
        let batch: Vec<(u64, Vec<u8>)> = (next..next + BATCH).map(|i| (i, payload(i))).collect();
        let t = Instant::now();
        log.append(&batch)?;
        appending += t.elapsed();
        next += BATCH;
        rss_peak = rss_peak.max(rss()?);
        let last = next - 1;
        if last % PURGE_EVERY == 0 {
            let upto = last - KEEP;
            let t = Instant::now();
            log.purge_to(upto, &upto.to_be_bytes())?;
            purging += t.elapsed();
            rss_peak = rss_peak.max(rss()?);
            let (apparent, allocated, files) = dir_size(dir.path())?;
            println!(
                "| {last} | {upto} | {} | {} | {} | {files} | {} | {:.1} s |",
                mib(log.size_on_disk()?),
                mib(apparent),
                mib(allocated),
                mib(rss()?),
                started.elapsed().as_secs_f64()
            );
        }
    }
    let total = started.elapsed();

    // What is left is exactly the last KEEP entries, intact.
    let left = log.entries(..)?;
    let first = left.first().map(|e| e.0);
    if left.len() as u64 != KEEP || first != Some(ENTRIES - KEEP + 1) {
        return Err(format!(
            "after purging, {} entries remain starting at {first:?}; expected {KEEP} from {}",
            left.len(),
            ENTRIES - KEEP + 1
        )
        .into());
    }
    if let Some((i, p)) = left.iter().find(|(i, p)| *p != payload(*i)) {
        return Err(format!("entry {i} came back as {:?}", String::from_utf8_lossy(p)).into());
    }
    drop(left);

    let size_on_disk = log.size_on_disk()?;
    let (apparent, allocated, files) = dir_size(dir.path())?;
    let rss_end = rss()?;
    let hwm = proc_status_bytes("VmHWM")?;
    let appends = (ENTRIES / BATCH) as f64;
    println!("\n| metric | value |");
    println!("|---|---:|");
    println!("| total time | {:.2} s |", total.as_secs_f64());
    println!(
        "| time in append (flushed) / purge | {:.2} s / {:.2} s |",
        appending.as_secs_f64(),
        purging.as_secs_f64()
    );
    println!(
        "| entries appended per second | {:.0} |",
        ENTRIES as f64 / total.as_secs_f64()
    );
    println!(
        "| append calls per second ({BATCH} entries, one flush each) | {:.0} |",
        appends / appending.as_secs_f64()
    );
    println!("| sled size_on_disk() at the end | {} |", mib(size_on_disk));
    println!(
        "| directory at the end: apparent / allocated ({files} files) | {} / {} |",
        mib(apparent),
        mib(allocated)
    );
    println!("| RSS at start | {} |", mib(rss_start));
    println!(
        "| RSS peak (sampled after every append) | {} |",
        mib(rss_peak)
    );
    println!("| RSS high-water mark (VmHWM) | {} |", mib(hwm));
    println!("| RSS at end | {} |", mib(rss_end));
    println!("| entries left after the last purge | {KEEP}, intact |");
    Ok(())
}
