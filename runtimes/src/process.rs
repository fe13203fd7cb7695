//! Host processes for runtimes whose commands run as ordinary host processes
//! (the mock now, PRoot later).
//!
//! Owns: starting a command in its own process group with a cleared
//! environment, collecting or streaming its output, enforcing its timeout by
//! killing the *whole* group, and never hanging on pipes that a descendant
//! keeps open.
//!
//! Rules every caller can rely on:
//! - Each command is the leader of a new process group (pgid = its pid), so one
//!   `SIGKILL` to the group ends the command and everything it started that did
//!   not leave the group (`setsid` escapes it; the bounded waits below cover that).
//! - Exit codes: the process's own code; `-1` when it was killed by a signal
//!   (including the timeout), as [`ExecOutput::exit_code`] documents. A program
//!   that cannot be started because it does not exist gives `127` (`126` when
//!   it is not executable) and a line on stderr, like a shell would.
//! - When the main process exits, output still buffered is read; descendants
//!   that keep the pipes open get [`EXIT_GRACE`] and are then left running
//!   (their further output is dropped). Background processes are not killed on
//!   a normal exit: a command may start a server on purpose.
//! - On timeout, on a dropped stream receiver and on a dropped `run_to_end`
//!   future the group is killed. Waits after a kill are bounded by [`KILL_GRACE`].
//!
//! Signals go through [`crate::sys`], the workspace's one `unsafe` module.

use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::{ExecChunk, ExecOutput, RuntimeError};

/// Default cap on each of stdout and stderr collected by [`run_to_end`].
pub(crate) const OUTPUT_CAP: usize = 16 * 1024 * 1024;

/// Chunks buffered between a streaming command and its consumer.
pub(crate) const STREAM_CAPACITY: usize = 64;

/// How long output is still read after the main process exited while a
/// descendant keeps a pipe open.
pub(crate) const EXIT_GRACE: Duration = Duration::from_millis(250);

/// Upper bound on waiting for the process and its pipes after a kill.
pub(crate) const KILL_GRACE: Duration = Duration::from_secs(2);

const READ_CHUNK: usize = 32 * 1024;

/// Runs `cmd` to completion or `timeout` and returns what it printed (each
/// stream truncated at `output_cap` bytes; the rest is read and dropped so the
/// process never blocks on a full pipe).
pub(crate) async fn run_to_end(
    mut cmd: Command,
    timeout: Option<Duration>,
    output_cap: usize,
) -> Result<ExecOutput, RuntimeError> {
    let start = Instant::now();
    let (child, pgid) = match start_child(&mut cmd)? {
        Started::Running(child, pgid) => (child, pgid),
        Started::Failed { exit_code, message } => {
            return Ok(ExecOutput {
                exit_code,
                stderr: message.into_bytes(),
                duration_ms: elapsed_ms(start),
                ..ExecOutput::default()
            });
        }
    };
    let mut sink = Sink::Collect {
        stdout: Vec::new(),
        stderr: Vec::new(),
        cap: output_cap,
    };
    let outcome = drive(child, pgid, start, timeout, &mut sink).await;
    let (stdout, stderr) = match sink {
        Sink::Collect { stdout, stderr, .. } => (stdout, stderr),
        Sink::Stream(_) => (Vec::new(), Vec::new()),
    };
    Ok(ExecOutput {
        exit_code: outcome.exit_code,
        stdout,
        stderr,
        timed_out: outcome.timed_out,
        duration_ms: outcome.duration_ms,
    })
}

/// Starts `cmd` and streams its output. The channel always ends with exactly
/// one [`ExecChunk::Exit`] (unless the receiver was dropped, which kills the
/// process group). Must be called inside a Tokio runtime.
pub(crate) fn run_streaming(
    mut cmd: Command,
    timeout: Option<Duration>,
) -> Result<mpsc::Receiver<ExecChunk>, RuntimeError> {
    let start = Instant::now();
    let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
    match start_child(&mut cmd)? {
        Started::Failed { exit_code, message } => {
            // The channel is empty and holds far more than two items.
            let _ = tx.try_send(ExecChunk::Stderr(Bytes::from(message)));
            let _ = tx.try_send(ExecChunk::Exit {
                exit_code,
                timed_out: false,
                duration_ms: elapsed_ms(start),
            });
        }
        Started::Running(child, pgid) => {
            tokio::spawn(async move {
                let mut sink = Sink::Stream(tx);
                let outcome = drive(child, pgid, start, timeout, &mut sink).await;
                if let (Sink::Stream(tx), false) = (sink, outcome.consumer_gone) {
                    let _ = tx
                        .send(ExecChunk::Exit {
                            exit_code: outcome.exit_code,
                            timed_out: outcome.timed_out,
                            duration_ms: outcome.duration_ms,
                        })
                        .await;
                }
            });
        }
    }
    Ok(rx)
}

/// Sends `SIGKILL` to every process in group `pgid`. Errors (the group is
/// already gone) are ignored.
pub(crate) fn kill_group(pgid: u32) {
    // Groups 0 and 1 would mean "our own group" and "init's": never ours to kill.
    if pgid > 1
        && let Ok(g) = i32::try_from(pgid)
    {
        crate::sys::kill_group(g, libc::SIGKILL);
    }
}

/// Sends `SIGKILL` to each of `pids`. Errors (already gone) are ignored.
pub(crate) fn kill_pids(pids: &[u32]) {
    for p in pids.iter().filter(|p| **p > 1 && **p != std::process::id()) {
        if let Ok(pid) = i32::try_from(*p) {
            crate::sys::kill(pid, libc::SIGKILL);
        }
    }
}

enum Started {
    Running(Child, u32),
    /// The program could not be started; reported like a shell would.
    Failed {
        exit_code: i32,
        message: String,
    },
}

fn start_child(cmd: &mut Command) -> Result<Started, RuntimeError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    match cmd.spawn() {
        Ok(child) => match child.id() {
            Some(pid) => Ok(Started::Running(child, pid)),
            None => Err(RuntimeError::Internal(
                "child process has no pid right after spawn".into(),
            )),
        },
        Err(e) => {
            let program = cmd.as_std().get_program().to_string_lossy().into_owned();
            match e.kind() {
                std::io::ErrorKind::NotFound => Ok(Started::Failed {
                    exit_code: 127,
                    message: format!("{program}: command not found\n"),
                }),
                std::io::ErrorKind::PermissionDenied => Ok(Started::Failed {
                    exit_code: 126,
                    message: format!("{program}: permission denied\n"),
                }),
                _ => Err(RuntimeError::Internal(format!("starting {program}: {e}"))),
            }
        }
    }
}

/// Kills the group when dropped while armed: a cancelled `run_to_end` or a
/// streaming task torn down with its runtime leaves nothing running.
struct GroupGuard {
    pgid: u32,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            kill_group(self.pgid);
        }
    }
}

#[derive(Clone, Copy)]
enum Which {
    Stdout,
    Stderr,
}

enum Sink {
    Collect {
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        cap: usize,
    },
    Stream(mpsc::Sender<ExecChunk>),
}

enum Pushed {
    Done,
    /// The receiver was dropped.
    Gone,
    /// The deadline passed while the consumer was not reading.
    Late,
}

impl Sink {
    async fn push(
        &mut self,
        which: Which,
        data: &Bytes,
        deadline: Option<tokio::time::Instant>,
    ) -> Pushed {
        match self {
            Sink::Collect {
                stdout,
                stderr,
                cap,
            } => {
                let buf = match which {
                    Which::Stdout => stdout,
                    Which::Stderr => stderr,
                };
                let room = cap.saturating_sub(buf.len());
                buf.extend_from_slice(&data[..data.len().min(room)]);
                Pushed::Done
            }
            Sink::Stream(tx) => {
                let permit = match deadline {
                    Some(at) => match tokio::time::timeout_at(at, tx.reserve()).await {
                        Ok(Ok(permit)) => permit,
                        Ok(Err(_)) => return Pushed::Gone,
                        Err(_) => return Pushed::Late,
                    },
                    None => match tx.reserve().await {
                        Ok(permit) => permit,
                        Err(_) => return Pushed::Gone,
                    },
                };
                permit.send(match which {
                    Which::Stdout => ExecChunk::Stdout(data.clone()),
                    Which::Stderr => ExecChunk::Stderr(data.clone()),
                });
                Pushed::Done
            }
        }
    }

    /// Resolves when a streaming consumer went away; never for collection.
    async fn closed(&self) {
        match self {
            Sink::Stream(tx) => tx.closed().await,
            Sink::Collect { .. } => std::future::pending().await,
        }
    }
}

struct Outcome {
    exit_code: i32,
    timed_out: bool,
    duration_ms: u64,
    consumer_gone: bool,
}

/// The one loop behind both entry points: reads both pipes, waits for the
/// main process, enforces the deadline and bounds every wait after an exit or
/// a kill.
async fn drive(
    mut child: Child,
    pgid: u32,
    start: Instant,
    timeout: Option<Duration>,
    sink: &mut Sink,
) -> Outcome {
    let mut guard = GroupGuard { pgid, armed: true };
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let deadline = timeout.map(|t| tokio::time::Instant::from_std(start) + t);
    let mut status: Option<ExitStatus> = None;
    let mut timed_out = false;
    let mut consumer_gone = false;
    // Once set, the loop ends at this instant whatever is still open.
    let mut stop_at: Option<tokio::time::Instant> = None;

    'run: while status.is_none() || stdout.is_some() || stderr.is_some() {
        tokio::select! {
            read = read_chunk(&mut stdout), if stdout.is_some() => match read {
                Some(data) => {
                    let mut at = deadline.filter(|_| !timed_out && status.is_none());
                    loop {
                        match sink.push(Which::Stdout, &data, at).await {
                            Pushed::Done => break,
                            Pushed::Gone => { consumer_gone = true; break 'run; }
                            Pushed::Late => { timed_out = true; kill_and_bound(pgid, &mut stop_at); at = None; }
                        }
                    }
                }
                None => stdout = None,
            },
            read = read_chunk(&mut stderr), if stderr.is_some() => match read {
                Some(data) => {
                    let mut at = deadline.filter(|_| !timed_out && status.is_none());
                    loop {
                        match sink.push(Which::Stderr, &data, at).await {
                            Pushed::Done => break,
                            Pushed::Gone => { consumer_gone = true; break 'run; }
                            Pushed::Late => { timed_out = true; kill_and_bound(pgid, &mut stop_at); at = None; }
                        }
                    }
                }
                None => stderr = None,
            },
            waited = child.wait(), if status.is_none() => {
                match waited {
                    Ok(s) => status = Some(s),
                    Err(e) => {
                        tracing::warn!(error = %e, pgid, "waiting for a command failed");
                        break 'run;
                    }
                }
                // The leader is reaped: from here its pid may be reused, so the
                // group is never signalled again (a timed-out group was
                // killed already).
                guard.armed = false;
                if stop_at.is_none() {
                    stop_at = Some(tokio::time::Instant::now() + EXIT_GRACE);
                }
            },
            _ = sleep_until(deadline), if !timed_out && status.is_none() && deadline.is_some() => {
                timed_out = true;
                kill_and_bound(pgid, &mut stop_at);
            },
            _ = sleep_until(stop_at), if stop_at.is_some() => break 'run,
            _ = sink.closed() => {
                consumer_gone = true;
                break 'run;
            },
        }
    }

    // Left before the leader exited and without a timeout kill: the consumer
    // went away (or waiting failed). Nothing may keep running.
    if status.is_none() && !timed_out {
        kill_group(pgid);
        let _ = tokio::time::timeout(KILL_GRACE, child.wait()).await;
    }
    // Every path that must kill has killed by now; what is left is either
    // reaped or abandoned after a bounded wait.
    guard.armed = false;
    drop(guard);

    let exit_code = match status.and_then(|s| s.code()) {
        Some(code) if !timed_out => code,
        _ => -1,
    };
    Outcome {
        exit_code,
        timed_out,
        duration_ms: elapsed_ms(start),
        consumer_gone,
    }
}

/// Kills the group and bounds how much longer the loop may run.
fn kill_and_bound(pgid: u32, stop_at: &mut Option<tokio::time::Instant>) {
    kill_group(pgid);
    *stop_at = Some(tokio::time::Instant::now() + KILL_GRACE);
}

async fn read_chunk<R: AsyncRead + Unpin>(pipe: &mut Option<R>) -> Option<Bytes> {
    let pipe = pipe.as_mut()?;
    let mut buf = vec![0u8; READ_CHUNK];
    // `read` is cancel safe: when another select branch wins, nothing was consumed.
    match pipe.read(&mut buf).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.truncate(n);
            Some(Bytes::from(buf))
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn elapsed_ms(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .env_clear()
            .envs(BTreeMap::from([("PATH", "/usr/bin:/bin")]))
            .current_dir("/");
        cmd
    }

    fn alive(pid: u32) -> bool {
        // Gone, or a zombie nobody reaped yet, both count as dead.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !matches!(
                stat.rsplit_once(") ")
                    .and_then(|(_, rest)| rest.chars().next()),
                Some('Z' | 'X')
            ),
            Err(_) => false,
        }
    }

    async fn wait_dead(pid: u32) {
        for _ in 0..100 {
            if !alive(pid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("process {pid} still alive");
    }

    fn pid_in(dir: &Path, name: &str) -> u32 {
        std::fs::read_to_string(dir.join(name))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid")
    }

    #[tokio::test]
    async fn collects_exit_code_and_both_streams() {
        let out = run_to_end(sh("echo out; echo err >&2; exit 3"), None, OUTPUT_CAP)
            .await
            .expect("run");
        assert_eq!(out.exit_code, 3);
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert!(!out.timed_out);
    }

    #[tokio::test]
    async fn output_is_capped_but_fully_drained() {
        let out = run_to_end(sh("head -c 100000 /dev/zero; echo done >&2"), None, 1000)
            .await
            .expect("run");
        assert_eq!(out.exit_code, 0);
        assert_eq!(out.stdout.len(), 1000);
        assert_eq!(out.stderr, b"done\n");
    }

    #[tokio::test]
    async fn killed_by_signal_is_minus_one() {
        let out = run_to_end(sh("kill -9 $$"), None, OUTPUT_CAP)
            .await
            .expect("run");
        assert_eq!(out.exit_code, -1);
        assert!(!out.timed_out);
    }

    #[tokio::test]
    async fn missing_program_is_127() {
        let mut cmd = Command::new("stacyvm-no-such-program");
        cmd.env_clear().env("PATH", "/usr/bin:/bin");
        let out = run_to_end(cmd, None, OUTPUT_CAP).await.expect("run");
        assert_eq!(out.exit_code, 127);
        assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    }

    #[tokio::test]
    async fn timeout_kills_the_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = sh("sleep 300 & echo $! > bg.pid; wait");
        cmd.current_dir(dir.path());
        let started = Instant::now();
        let out = run_to_end(cmd, Some(Duration::from_millis(300)), OUTPUT_CAP)
            .await
            .expect("run");
        assert!(out.timed_out);
        assert_eq!(out.exit_code, -1);
        assert!(started.elapsed() < Duration::from_secs(10));
        wait_dead(pid_in(dir.path(), "bg.pid")).await;
    }

    #[tokio::test]
    async fn timeout_does_not_hang_on_a_detached_grandchild() {
        // `setsid` leaves the group but keeps stdout open: the wait is bounded.
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = sh("setsid sh -c 'echo $$ > detached.pid; exec sleep 30' & sleep 300");
        cmd.current_dir(dir.path());
        let started = Instant::now();
        let out = run_to_end(cmd, Some(Duration::from_millis(300)), OUTPUT_CAP)
            .await
            .expect("run");
        assert!(out.timed_out);
        assert!(started.elapsed() < KILL_GRACE + Duration::from_secs(5));
        kill_pids(&[pid_in(dir.path(), "detached.pid")]);
    }

    #[tokio::test]
    async fn normal_exit_does_not_wait_for_background_pipe_holders() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = sh("sleep 30 & echo $! > bg.pid; echo hi");
        cmd.current_dir(dir.path());
        let started = Instant::now();
        let out = run_to_end(cmd, None, OUTPUT_CAP).await.expect("run");
        assert_eq!(out.exit_code, 0);
        assert_eq!(out.stdout, b"hi\n");
        assert!(started.elapsed() < Duration::from_secs(10));
        kill_pids(&[pid_in(dir.path(), "bg.pid")]);
    }

    #[tokio::test]
    async fn stream_ends_with_one_exit() {
        let mut rx = run_streaming(sh("echo a; sleep 0.1; echo b >&2; exit 2"), None).expect("run");
        let mut items = Vec::new();
        while let Some(item) = rx.recv().await {
            items.push(item);
        }
        let Some(ExecChunk::Exit {
            exit_code,
            timed_out,
            ..
        }) = items.last()
        else {
            panic!("last item is not Exit: {items:?}");
        };
        assert_eq!((*exit_code, *timed_out), (2, false));
        let exits = items
            .iter()
            .filter(|i| matches!(i, ExecChunk::Exit { .. }))
            .count();
        assert_eq!(exits, 1);
        assert!(items.contains(&ExecChunk::Stdout(Bytes::from_static(b"a\n"))));
        assert!(items.contains(&ExecChunk::Stderr(Bytes::from_static(b"b\n"))));
    }

    #[tokio::test]
    async fn dropping_the_receiver_kills_the_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = sh("sleep 300 & echo $! > bg.pid; echo ready; wait");
        cmd.current_dir(dir.path());
        let mut rx = run_streaming(cmd, None).expect("run");
        assert_eq!(
            rx.recv().await,
            Some(ExecChunk::Stdout(Bytes::from_static(b"ready\n")))
        );
        drop(rx);
        wait_dead(pid_in(dir.path(), "bg.pid")).await;
    }

    #[tokio::test]
    async fn streamed_timeout_with_a_stalled_consumer() {
        // The consumer reads nothing until after the deadline: the command is
        // still killed on time and the Exit says so.
        let mut rx = run_streaming(
            sh("while :; do echo spam; done"),
            Some(Duration::from_millis(300)),
        )
        .expect("run");
        tokio::time::sleep(Duration::from_millis(800)).await;
        let mut last = None;
        while let Some(item) = rx.recv().await {
            last = Some(item);
        }
        assert!(
            matches!(
                last,
                Some(ExecChunk::Exit {
                    exit_code: -1,
                    timed_out: true,
                    ..
                })
            ),
            "{last:?}"
        );
    }
}
