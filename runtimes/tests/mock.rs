//! The mock runtime: the shared contract suite plus what only the mock has
//! (its on-disk layout, its evidence log).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use stacyvm_runtimes::mock::{KEEPER_TAG, MockOptions, MockRuntime};
use stacyvm_runtimes::testing::cases::{code, read, run_ok, write};
use stacyvm_runtimes::testing::{Fixture, random_sandbox_id};
use stacyvm_runtimes::{Runtime, RuntimeState, SpawnSpec};

/// A mock runtime on its own temp state directory.
struct MockFixture {
    dir: tempfile::TempDir,
    runtime: Arc<MockRuntime>,
}

impl MockFixture {
    fn new() -> MockFixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let runtime =
            Arc::new(MockRuntime::with_event_log(dir.path(), None).expect("mock runtime"));
        MockFixture { dir, runtime }
    }
}

/// The keeper pid recorded in the sandbox's `meta.json`.
fn keeper_pid(state_dir: &Path, sandbox_id: &str) -> u32 {
    let meta = std::fs::read(state_dir.join(sandbox_id).join("meta.json")).expect("meta.json");
    let meta: serde_json::Value = serde_json::from_slice(&meta).expect("meta json");
    meta["keeper_pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .expect("keeper_pid")
}

fn sigkill(target: &str) {
    let status = std::process::Command::new("kill")
        .args(["-s", "KILL", "--", target])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {target}");
}

#[async_trait]
impl Fixture for MockFixture {
    fn runtime(&self) -> Arc<dyn Runtime> {
        self.runtime.clone()
    }

    fn image(&self) -> String {
        "mock:latest".into()
    }

    /// The keeper's whole group: the `sh` loop and its `sleep`.
    async fn kill_main(&self, sandbox_id: &str) {
        let pid = keeper_pid(self.dir.path(), sandbox_id);
        sigkill(&format!("-{pid}"));
    }

    async fn reopen(&self) -> Arc<dyn Runtime> {
        Arc::new(MockRuntime::with_event_log(self.dir.path(), None).expect("reopen mock runtime"))
    }
}

async fn mock_fixture() -> Box<dyn Fixture> {
    Box::new(MockFixture::new())
}

stacyvm_runtimes::runtime_contract_suite!(mock_fixture);

fn spec(id: &str, worker: &str, generation: i64) -> SpawnSpec {
    SpawnSpec {
        sandbox_id: id.to_string(),
        image: "mock:latest".into(),
        labels: [("worker_id".to_string(), worker.to_string())].into(),
        generation,
        ..SpawnSpec::default()
    }
}

/// Polls `status` (which notices a dead keeper and records its stop) until
/// the sandbox reads stopped; panics after 15 s.
async fn wait_stopped(rt: &MockRuntime, id: &str) {
    for _ in 0..150 {
        if rt.status(id).await.expect("status").state == RuntimeState::Stopped {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{id} never read stopped");
}

fn events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_log_records_start_and_stop() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log: PathBuf = dir.path().join("events.jsonl");
    let rt = MockRuntime::with_event_log(dir.path().join("state"), Some(log.clone()))
        .expect("mock runtime");

    let a = random_sandbox_id();
    rt.spawn(&spec(&a, "w-1", 3)).await.expect("spawn a");
    rt.destroy(&a).await.expect("destroy a");

    let ev = events(&log);
    assert_eq!(ev.len(), 2, "{ev:?}");
    let pid = u64::from(std::process::id());
    for (e, kind) in ev.iter().zip(["start", "stop"]) {
        assert_eq!(e["event"], kind);
        assert_eq!(e["sandbox_id"], a.as_str());
        assert_eq!(e["worker_id"], "w-1");
        assert_eq!(e["generation"], 3);
        assert_eq!(e["pid"], pid);
        assert!(e["mono_ns"].as_u64().is_some_and(|n| n > 0), "{e}");
    }
    assert!(ev[1]["mono_ns"].as_u64() >= ev[0]["mono_ns"].as_u64());

    // A keeper that dies is one stop, written when status first sees it;
    // destroying afterwards adds none. No worker_id label means "".
    let b = random_sandbox_id();
    let mut no_worker = spec(&b, "", 9);
    no_worker.labels.clear();
    rt.spawn(&no_worker).await.expect("spawn b");
    sigkill(&format!("-{}", keeper_pid(rt.state_dir(), &b)));
    wait_stopped(&rt, &b).await;
    assert_eq!(
        rt.status(&b).await.expect("status").state,
        RuntimeState::Stopped
    );
    rt.destroy(&b).await.expect("destroy b");
    let ev: Vec<_> = events(&log)
        .into_iter()
        .filter(|e| e["sandbox_id"] == b.as_str())
        .collect();
    let kinds: Vec<_> = ev
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(kinds, ["start", "stop"], "{ev:?}");
    assert_eq!(ev[0]["worker_id"], "");
    assert_eq!(ev[1]["generation"], 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_event_log_unless_asked() {
    let fx = MockFixture::new();
    let id = random_sandbox_id();
    fx.runtime.spawn(&spec(&id, "w", 1)).await.expect("spawn");
    fx.runtime.destroy(&id).await.expect("destroy");
    let names: Vec<_> = std::fs::read_dir(fx.dir.path())
        .expect("read state dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(names.is_empty(), "left behind: {names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_do_not_share_files() {
    let fx = MockFixture::new();
    let rt = fx.runtime();
    let (a, b) = (random_sandbox_id(), random_sandbox_id());
    rt.spawn(&spec(&a, "w", 1)).await.expect("spawn a");
    rt.spawn(&spec(&b, "w", 1)).await.expect("spawn b");

    write(&rt, &a, "only-a.txt", b"a").await;
    assert!(
        fx.dir
            .path()
            .join(&a)
            .join("root/workspace/only-a.txt")
            .is_file()
    );
    assert_eq!(code(&rt.stat(&b, "only-a.txt").await), "NOT_FOUND");
    assert!(rt.glob(&b, "/workspace/*").await.expect("glob").is_empty());
    assert_eq!(run_ok(&rt, &b, "ls -A").await, "");
    assert_eq!(run_ok(&rt, &a, "ls -A").await, "only-a.txt\n");

    // Each exec knows its sandbox: HOME is its own workspace.
    let home = run_ok(&rt, &b, "printf '%s %s' \"$SANDBOX_ID\" \"$HOME\"").await;
    let want_home = fx.dir.path().join(&b).join("root/workspace");
    assert_eq!(home, format!("{b} {}", want_home.display()));
    assert_eq!(read(&rt, &a, "/workspace/only-a.txt").await, b"a");

    rt.destroy(&a).await.expect("destroy a");
    rt.destroy(&b).await.expect("destroy b");
    assert!(!fx.dir.path().join(&a).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_log_and_meta() {
    let fx = MockFixture::new();
    let rt = fx.runtime();
    let id = random_sandbox_id();
    rt.spawn(&spec(&id, "w-7", 5)).await.expect("spawn");
    run_ok(&rt, &id, "echo one").await;
    run_ok(&rt, &id, "echo two").await;

    let logs = rt.logs(&id, 100).await.expect("logs");
    assert_eq!(logs.len(), 3, "{logs:?}");
    assert!(logs[0].ends_with("started image=mock:latest"), "{logs:?}");
    assert!(
        logs[1].contains("echo one") && logs[2].contains("echo two"),
        "{logs:?}"
    );
    assert_eq!(rt.logs(&id, 1).await.expect("logs"), logs[2..]);

    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fx.dir.path().join(&id).join("meta.json")).expect("meta"),
    )
    .expect("json");
    assert_eq!(meta["sandbox_id"], id.as_str());
    assert_eq!(meta["image"], "mock:latest");
    assert_eq!(meta["labels"]["worker_id"], "w-7");
    assert_eq!(meta["generation"], 5);
    assert!(
        meta["created_at"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z'))
    );

    // The keeper names its sandbox, which is how pid reuse is told apart.
    let pid = keeper_pid(fx.dir.path(), &id);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    assert!(args.contains(&b"stacyvm-mock-keeper".as_slice()));
    assert!(args.contains(&id.as_bytes()));

    rt.destroy(&id).await.expect("destroy");
    assert!(!Path::new(&format!("/proc/{pid}/cmdline")).exists() || !keeper_named(pid, &id));
}

fn keeper_named(pid: u32, id: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|b| *b == 0).any(|a| a == id.as_bytes()))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_kills_running_execs() {
    let fx = MockFixture::new();
    let rt = fx.runtime();
    let id = random_sandbox_id();
    rt.spawn(&spec(&id, "w", 1)).await.expect("spawn");
    let mut long = stacyvm_runtimes::testing::cases::sh("echo $$ > exec.pid; sleep 300");
    long.timeout = Some(std::time::Duration::from_secs(120));
    let running = {
        let (rt, id, long) = (rt.clone(), id.clone(), long.clone());
        tokio::spawn(async move { rt.exec(&id, &long).await })
    };
    let pid_file = fx.dir.path().join(&id).join("root/workspace/exec.pid");
    for _ in 0..100 {
        if std::fs::read_to_string(&pid_file).is_ok_and(|s| s.ends_with('\n')) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    rt.destroy(&id).await.expect("destroy");
    let out = tokio::time::timeout(std::time::Duration::from_secs(15), running)
        .await
        .expect("exec ends once its sandbox is destroyed")
        .expect("join")
        .expect("exec");
    assert_eq!(out.exit_code, -1);
    assert!(!out.timed_out);
}

#[tokio::test]
async fn bad_state_dir_is_unavailable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("file");
    std::fs::write(&file, b"").expect("write");
    let err = MockRuntime::with_event_log(file.join("state"), None).expect_err("not a dir");
    assert_eq!(err.code(), "UNAVAILABLE");
}

/// Pids of live processes whose command line names `KEEPER_TAG` followed by `id`.
fn keepers_of(id: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            // The keeper's own children (`sleep`) briefly carry its command
            // line between fork and exec: count only the group leader.
            let leader = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|st| st.rsplit(')').next().map(str::to_owned))
                .and_then(|rest| {
                    rest.split_whitespace()
                        .nth(2)
                        .and_then(|g| g.parse::<u32>().ok())
                })
                == Some(pid);
            if leader
                && args
                    .windows(2)
                    .any(|w| w[0] == KEEPER_TAG.as_bytes() && w[1] == id.as_bytes())
            {
                out.push(pid);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeper_off_sandboxes_run_until_destroyed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("events.jsonl");
    let state = dir.path().join("state");
    let lite = MockOptions {
        event_log: Some(log.clone()),
        keeper: false,
    };
    let rt: Arc<dyn Runtime> =
        Arc::new(MockRuntime::with_options(&state, lite).expect("mock runtime"));
    let id = random_sandbox_id();
    let sb = rt.spawn(&spec(&id, "w", 2)).await.expect("spawn");
    assert_eq!(sb.state, RuntimeState::Running);
    assert_eq!(
        rt.status(&id).await.expect("status").state,
        RuntimeState::Running
    );
    assert!(keepers_of(&id).is_empty(), "a keeper was started");
    assert_eq!(keeper_pid(&state, &id), 0);

    // Exec and files work as usual.
    assert_eq!(
        run_ok(&rt, &id, "echo \"hi $SANDBOX_ID\"").await,
        format!("hi {id}\n")
    );
    write(&rt, &id, "f.txt", b"lite").await;
    assert_eq!(read(&rt, &id, "/workspace/f.txt").await, b"lite");

    // The choice is recorded per sandbox: a runtime with the keeper on
    // adopts it as running.
    let other = MockRuntime::with_event_log(&state, None).expect("reopen");
    let listed = other.list().await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].state, RuntimeState::Running);

    rt.destroy(&id).await.expect("destroy");
    assert!(!state.join(&id).exists());
    assert_eq!(code(&rt.status(&id).await), "NOT_FOUND");
    let kinds: Vec<String> = events(&log)
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("?").to_string())
        .collect();
    assert_eq!(kinds, ["start", "stop"]);

    // The default keeps the keeper.
    assert!(MockOptions::default().keeper);
    let b = random_sandbox_id();
    other.spawn(&spec(&b, "w", 1)).await.expect("spawn b");
    assert_eq!(keepers_of(&b).len(), 1);
    other.destroy(&b).await.expect("destroy b");
}

/// A worker that dies mid-spawn, after the start is on record but before
/// the keeper's PID is: its successor finds the sandbox, stops the
/// unrecorded keeper (found by the sandbox root in its environment),
/// reports it stopped, and the evidence log closes the interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_spawn_is_stopped_by_the_next_instance() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log: PathBuf = dir.path().join("events.jsonl");
    let state = dir.path().join("state");
    let rt = MockRuntime::with_event_log(&state, Some(log.clone())).expect("mock runtime");
    let id = random_sandbox_id();
    rt.spawn(&spec(&id, "w-1", 4)).await.expect("spawn");
    assert_eq!(keepers_of(&id).len(), 1, "keeper running");
    // What a crash between the two metadata writes leaves: no keeper PID.
    let meta_path = state.join(&id).join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).expect("meta")).expect("json");
    meta["keeper_pid"] = 0.into();
    std::fs::write(&meta_path, meta.to_string()).expect("rewrite meta");
    drop(rt);

    let next = MockRuntime::with_event_log(&state, Some(log.clone())).expect("reopen");
    let listed = next.list().await.expect("list");
    let me = listed
        .iter()
        .find(|s| s.sandbox_id == id)
        .expect("the interrupted sandbox is listed, not hidden");
    assert_eq!(me.state, RuntimeState::Stopped);
    for _ in 0..100 {
        if keepers_of(&id).is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(keepers_of(&id).is_empty(), "unrecorded keeper stopped");
    let kinds: Vec<String> = events(&log)
        .iter()
        .filter(|e| e["sandbox_id"] == id.as_str())
        .map(|e| e["event"].as_str().unwrap_or("?").to_string())
        .collect();
    assert_eq!(kinds, ["start", "stop"]);
    next.destroy(&id).await.expect("destroy");
}

/// A stop whose evidence could not be written (here: the evidence log's
/// directory is missing; in chaos: the worker was killed between writing
/// the stop and marking it written) is written by the next observer, and
/// only until it has landed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_evidence_is_written_again_until_it_lands() {
    let dir = tempfile::tempdir().expect("temp dir");
    let evidence = dir.path().join("evidence");
    let log = evidence.join("events.jsonl");
    let rt = MockRuntime::with_event_log(dir.path().join("state"), Some(log.clone()))
        .expect("mock runtime");
    let id = random_sandbox_id();
    rt.spawn(&spec(&id, "w-1", 2)).await.expect("spawn");
    sigkill(&format!("-{}", keeper_pid(rt.state_dir(), &id)));
    wait_stopped(&rt, &id).await;
    assert!(
        events(&log).is_empty(),
        "the evidence log cannot be written"
    );

    std::fs::create_dir(&evidence).expect("evidence dir");
    let stops = || {
        events(&log)
            .iter()
            .filter(|e| e["sandbox_id"] == id.as_str() && e["event"] == "stop")
            .count()
    };
    assert_eq!(
        rt.status(&id).await.expect("status").state,
        RuntimeState::Stopped
    );
    assert_eq!(stops(), 1, "the stop is written once the log takes it");
    rt.status(&id).await.expect("status");
    rt.destroy(&id).await.expect("destroy");
    assert_eq!(stops(), 1, "and not again once it landed");
}

/// A destroy that overtakes its own spawn (sent while the spawn is still
/// starting the sandbox) waits for it, then stops what it started: no
/// keeper is left running, the spawn itself succeeds, and the evidence is
/// one start followed by one stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_during_spawn_leaves_nothing_running() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log: PathBuf = dir.path().join("events.jsonl");
    let state = dir.path().join("state");
    let rt = Arc::new(MockRuntime::with_event_log(&state, Some(log.clone())).expect("mock"));
    for round in 0..20 {
        let id = random_sandbox_id();
        let spawner = rt.clone();
        let spec = spec(&id, "w-1", round);
        let spawn = tokio::spawn(async move { spawner.spawn(&spec).await });
        // Destroy as soon as the spawn has claimed the sandbox's directory.
        let claimed = state.join(&id);
        while !claimed.exists() && !spawn.is_finished() {
            tokio::task::yield_now().await;
        }
        rt.destroy(&id).await.expect("destroy");
        spawn.await.expect("spawn task").expect("spawn");
        for _ in 0..100 {
            if keepers_of(&id).is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(keepers_of(&id).is_empty(), "round {round}: keeper left");
        assert!(!claimed.exists(), "round {round}: directory left");
        let kinds: Vec<String> = events(&log)
            .iter()
            .filter(|e| e["sandbox_id"] == id.as_str())
            .map(|e| e["event"].as_str().unwrap_or("?").to_string())
            .collect();
        assert_eq!(kinds, ["start", "stop"], "round {round}");
    }
}

/// A full workspace disk: the upload fails with `NO_SPACE`, leaves neither
/// the file nor a temporary behind, and the sandbox keeps working. Needs
/// root to mount a 2 MiB tmpfs as the state directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_is_no_space_and_leaves_nothing() {
    // Only root may mount.
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if uid != "0" {
        eprintln!("SKIP full disk: mounting a small tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "stacyvm-test-full"])
        .arg(dir.path())
        .status()
        .expect("run mount");
    assert!(mounted.success(), "mount a 2 MiB tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(dir.path().to_path_buf());

    let rt: Arc<dyn Runtime> =
        Arc::new(MockRuntime::with_event_log(dir.path().join("state"), None).expect("runtime"));
    let id = random_sandbox_id();
    rt.spawn(&spec(&id, "w", 1)).await.expect("spawn");
    let big = vec![7u8; 4 * 1024 * 1024];
    let body: stacyvm_runtimes::ByteReader = Box::pin(std::io::Cursor::new(big));
    let err = rt
        .write_file(&id, "/workspace/big.bin", 0o644, body)
        .await
        .expect_err("4 MiB into 2 MiB");
    assert_eq!(err.code(), "NO_SPACE", "{err}");
    let names: Vec<String> = rt
        .list_files(&id, "/workspace")
        .await
        .expect("list")
        .into_iter()
        .map(|f| f.path)
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.ends_with("/big.bin") && !n.contains(".stacyvm-write-")),
        "nothing partial left: {names:?}"
    );
    // Space came back with the temporary: a small write works.
    assert_eq!(write(&rt, &id, "/workspace/small.txt", b"ok").await, 2);
    assert_eq!(read(&rt, &id, "/workspace/small.txt").await, b"ok");
    rt.destroy(&id).await.expect("destroy");
}
