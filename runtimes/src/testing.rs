//! The runtime contract suite: one list of named cases that every backend
//! must pass.
//!
//! A backend's test file supplies a [`Fixture`] maker and runs the suite with
//! [`runtime_contract_suite!`](crate::runtime_contract_suite), one
//! `#[tokio::test]` per case, so test output names every case on every
//! backend:
//!
//! ```ignore
//! async fn mock_fixture() -> Box<dyn Fixture> { /* a runtime on a temp dir */ }
//! stacyvm_runtimes::runtime_contract_suite!(mock_fixture);
//! ```
//!
//! The maker is any expression that can be called with no arguments and
//! awaited: an `async fn` path or a closure returning an `async` block. It
//! returns `Box<dyn Fixture>`, or `Option<Box<dyn Fixture>>` when the backend
//! may be missing on the host (`None` after printing a loud `SKIP` line).
//!
//! Every case spawns sandboxes with fresh ids (`sb-` + random hex) through
//! [`Harness::new_id`], and [`run_case`] destroys all of them afterwards, even
//! when the case panicked.
//!
//! Behaviour the suite pins down beyond the trait docs:
//! - exit codes: `-1` when killed (signal or timeout); a missing program is
//!   exit code `127` in both shell and argv mode (not an error);
//! - an empty command is `Invalid`; exec on a stopped sandbox is `Invalid`;
//! - a missing workdir is `NotFound`; a workdir that leaves the sandbox is `InvalidPath`;
//! - `list_files` of a file is `Invalid`; reading a directory is an error;
//! - removing `/` or `/workspace` is `Invalid`; removing a non-empty directory
//!   without `recursive` is `Invalid`;
//! - file mode `0` on write means `0o644`.

use std::collections::BTreeMap;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::FutureExt;

use crate::{Runtime, SpawnSpec};

/// One backend under test.
#[async_trait]
pub trait Fixture: Send + Sync {
    fn runtime(&self) -> Arc<dyn Runtime>;
    /// An image every case may spawn (it needs `sh` and coreutils).
    fn image(&self) -> String;
    /// Kill the sandbox's main process behind the runtime's back.
    async fn kill_main(&self, sandbox_id: &str);
    /// A new runtime instance over the same host state (a worker restart).
    async fn reopen(&self) -> Arc<dyn Runtime>;
    /// What of this fixture's sandboxes is still on the host (containers,
    /// processes), described for a failure message; checked after every case
    /// once its sandboxes are destroyed.
    async fn leftovers(&self) -> Vec<String> {
        Vec::new()
    }
}

/// For a fixture whose backend is missing on this host: under `CI=true` a
/// failure (nothing may be skipped in CI), otherwise a loud `SKIP` line and `None`.
pub fn skip_unless_ci(backend: &str, why: &str) -> Option<Box<dyn Fixture>> {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{backend} is required under CI=true but unavailable: {why}");
    }
    eprintln!("SKIP {backend} runtime contract: {why}");
    None
}

/// What a case gets: the fixture, plus bookkeeping of the sandboxes it
/// creates so [`run_case`] can destroy them whatever happens.
pub struct Harness {
    fixture: Box<dyn Fixture>,
    created: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("runtime", &self.fixture.runtime().name())
            .field("created", &self.created_ids())
            .finish()
    }
}

impl Harness {
    pub fn new(fixture: Box<dyn Fixture>) -> Harness {
        Harness {
            fixture,
            created: Mutex::new(Vec::new()),
        }
    }

    pub fn fixture(&self) -> &dyn Fixture {
        self.fixture.as_ref()
    }

    pub fn runtime(&self) -> Arc<dyn Runtime> {
        self.fixture.runtime()
    }

    /// A fresh sandbox id, remembered for cleanup.
    pub fn new_id(&self) -> String {
        let id = random_sandbox_id();
        self.created
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(id.clone());
        id
    }

    /// A spawn spec for `id` with the fixture's image.
    pub fn spec(&self, id: &str) -> SpawnSpec {
        SpawnSpec {
            sandbox_id: id.to_string(),
            image: self.fixture.image(),
            memory_mb: 256,
            vcpus: 1,
            env: BTreeMap::new(),
            labels: BTreeMap::from([("stacyvm.contract".to_string(), "1".to_string())]),
            generation: 1,
        }
    }

    fn created_ids(&self) -> Vec<String> {
        self.created
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Destroys every sandbox this case created that still exists.
    pub async fn cleanup(&self) {
        let runtime = self.runtime();
        for id in self.created_ids() {
            match runtime.destroy(&id).await {
                Ok(()) | Err(crate::RuntimeError::NotFound(_)) => {}
                Err(e) => eprintln!("cleanup: destroying {id} failed: {e}"),
            }
        }
    }
}

/// `sb-` and 16 random hex digits.
pub fn random_sandbox_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded randomly per process; the counter and the pid
    // keep ids distinct within and across test processes.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    format!("sb-{:016x}", h.finish())
}

/// A boxed contract case.
pub type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs one case on `fixture` (skipped when `None`), destroying what the case
/// created even if it panics.
pub async fn run_case(
    fixture: impl Into<Option<Box<dyn Fixture>>>,
    name: &str,
    case: fn(Arc<Harness>) -> CaseFuture,
) {
    let Some(fixture) = fixture.into() else {
        return;
    };
    let harness = Arc::new(Harness::new(fixture));
    eprintln!(
        "RUN runtime contract case {name} on {}",
        harness.runtime().name()
    );
    let result = std::panic::AssertUnwindSafe(case(harness.clone()))
        .catch_unwind()
        .await;
    harness.cleanup().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    // Removal may finish asynchronously (a shim exiting): poll briefly.
    let mut left = harness.fixture().leftovers().await;
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        left = harness.fixture().leftovers().await;
    }
    assert!(
        left.is_empty(),
        "case {name} left behind on the host: {left:?}"
    );
}

/// Expands to one `#[tokio::test]` per contract case. `$make` is called with
/// no arguments and awaited for each case, giving a `Box<dyn Fixture>` (or an
/// `Option` of one); see the [module docs](crate::testing).
#[macro_export]
macro_rules! runtime_contract_suite {
    ($make:expr) => {
        $crate::runtime_contract_suite!(@cases $make;
            spawn_status_destroy,
            exec_shell_and_argv,
            exec_timeout_kills_tree,
            exec_stream_ends_with_exit,
            files_binary_round_trip,
            file_ops,
            traversal_refused,
            status_after_main_dies,
            adoption_after_restart,
            health_ok,
        );
    };
    (@cases $make:expr; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::testing::run_case(($make)().await, stringify!($case), |h| {
                    Box::pin($crate::testing::cases::$case(h))
                })
                .await;
            }
        )+
    };
}

/// The contract cases. Each takes a harness over a fresh fixture.
pub mod cases {
    use std::collections::BTreeMap;
    use std::future::Future;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use tokio::io::AsyncReadExt;

    use super::Harness;
    use crate::*;

    /// Generous bound for anything that "should happen soon".
    const SOON: Duration = Duration::from_secs(15);

    /// The stable code of a result (`"ok"` when it succeeded).
    pub fn code<T>(r: &Result<T, RuntimeError>) -> &'static str {
        match r {
            Ok(_) => "ok",
            Err(e) => e.code(),
        }
    }

    pub fn sh(command: &str) -> ExecSpec {
        ExecSpec {
            command: command.to_string(),
            ..ExecSpec::default()
        }
    }

    pub fn argv(command: &str, args: &[&str]) -> ExecSpec {
        ExecSpec {
            command: command.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            mode: ExecMode::Argv,
            ..ExecSpec::default()
        }
    }

    pub fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    pub async fn run(rt: &Arc<dyn Runtime>, id: &str, spec: &ExecSpec) -> ExecOutput {
        rt.exec(id, spec)
            .await
            .unwrap_or_else(|e| panic!("exec {:?} failed: {e}", spec.command))
    }

    /// Runs a shell command that must succeed; returns its stdout.
    pub async fn run_ok(rt: &Arc<dyn Runtime>, id: &str, command: &str) -> String {
        let out = run(rt, id, &sh(command)).await;
        assert_eq!(
            out.exit_code,
            0,
            "{command:?} failed: stdout {:?} stderr {:?}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    pub async fn write(rt: &Arc<dyn Runtime>, id: &str, path: &str, data: &[u8]) -> u64 {
        rt.write_file(id, path, 0, body(data))
            .await
            .unwrap_or_else(|e| panic!("write {path}: {e}"))
    }

    pub fn body(data: &[u8]) -> ByteReader {
        Box::pin(std::io::Cursor::new(data.to_vec()))
    }

    pub async fn read(rt: &Arc<dyn Runtime>, id: &str, path: &str) -> Vec<u8> {
        let (size, mut reader) = rt
            .read_file(id, path)
            .await
            .unwrap_or_else(|e| panic!("read {path}: {e}"));
        let mut data = Vec::new();
        reader
            .read_to_end(&mut data)
            .await
            .unwrap_or_else(|e| panic!("read {path}: {e}"));
        assert_eq!(size, data.len() as u64, "size reported for {path}");
        data
    }

    /// Polls `check` until it holds or `SOON` passes.
    pub async fn eventually<F, Fut>(what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let start = Instant::now();
        while start.elapsed() < SOON {
            if check().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{what}: not true after {SOON:?}");
    }

    /// Collects a stream to its end (bounded by `SOON` per item).
    pub async fn collect(mut rx: tokio::sync::mpsc::Receiver<ExecChunk>) -> Vec<ExecChunk> {
        let mut items = Vec::new();
        loop {
            match tokio::time::timeout(SOON, rx.recv()).await {
                Ok(Some(item)) => items.push(item),
                Ok(None) => return items,
                Err(_) => panic!("stream stalled after {items:?}"),
            }
        }
    }

    /// Stdout and stderr of a stream, concatenated, plus its single Exit.
    pub fn split_stream(items: &[ExecChunk]) -> (String, String, (i32, bool)) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let exits: Vec<(usize, i32, bool)> = items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| match item {
                ExecChunk::Exit {
                    exit_code,
                    timed_out,
                    ..
                } => Some((i, *exit_code, *timed_out)),
                _ => None,
            })
            .collect();
        assert_eq!(exits.len(), 1, "exactly one Exit: {items:?}");
        assert_eq!(exits[0].0, items.len() - 1, "Exit is last: {items:?}");
        for item in items {
            match item {
                ExecChunk::Stdout(b) => out.extend_from_slice(b),
                ExecChunk::Stderr(b) => err.extend_from_slice(b),
                ExecChunk::Exit { .. } => {}
            }
        }
        (text(&out), text(&err), (exits[0].1, exits[0].2))
    }

    /// A shell test that passes when the pid in `file` is gone (a zombie
    /// whose parent died counts as gone: it runs no more code).
    fn pid_gone(file: &str) -> String {
        format!(
            "pid=$(cat {file}); if kill -0 \"$pid\" 2>/dev/null; then \
             state=$(sed -n 's/^.*) \\(.\\).*$/\\1/p' /proc/$pid/stat 2>/dev/null); \
             [ \"$state\" = Z ]; else exit 0; fi"
        )
    }

    async fn spawn(h: &Harness, spec: &SpawnSpec) -> RuntimeSandbox {
        h.runtime()
            .spawn(spec)
            .await
            .unwrap_or_else(|e| panic!("spawn {}: {e}", spec.sandbox_id))
    }

    /// Spawns one sandbox with the harness's default spec.
    async fn spawn_default(h: &Harness) -> String {
        let id = h.new_id();
        spawn(h, &h.spec(&id)).await;
        id
    }

    pub async fn spawn_status_destroy(h: Arc<Harness>) {
        let rt = h.runtime();
        let id = h.new_id();
        let mut spec = h.spec(&id);
        spec.labels.insert("worker_id".into(), "w-contract".into());
        spec.generation = 7;

        let sb = spawn(&h, &spec).await;
        assert_eq!(sb.sandbox_id, id);
        assert_eq!(sb.state, RuntimeState::Running);
        assert_eq!(sb.image, spec.image);
        assert_eq!(sb.labels, spec.labels);
        assert_eq!(sb.generation, 7);
        assert!(!sb.runtime_id.is_empty());

        let st = rt.status(&id).await.expect("status");
        assert_eq!(
            (st.state, st.generation, &st.labels, &st.image),
            (RuntimeState::Running, 7, &spec.labels, &spec.image)
        );
        assert_eq!(code(&rt.spawn(&spec).await), "CONFLICT", "spawn twice");
        let listed = rt.list().await.expect("list");
        assert!(listed.iter().any(|s| s.sandbox_id == id), "{listed:?}");
        let logs = rt.logs(&id, 50).await.expect("logs");
        assert!(logs.len() <= 50);

        // Malformed requests.
        for bad in ["", "../escape", "a/b", "sp ace"] {
            let mut spec = h.spec(bad);
            spec.sandbox_id = bad.to_string();
            assert_eq!(code(&rt.spawn(&spec).await), "BAD_REQUEST", "id {bad:?}");
        }
        let long = "x".repeat(129);
        assert_eq!(code(&rt.spawn(&h.spec(&long)).await), "BAD_REQUEST");
        let mut no_image = h.spec(&h.new_id());
        no_image.image = String::new();
        assert_eq!(
            code(&rt.spawn(&no_image).await),
            "BAD_REQUEST",
            "empty image"
        );

        // Concurrent spawns of one id: exactly one wins.
        let race_id = h.new_id();
        let race_spec = h.spec(&race_id);
        let attempts = (0..6).map(|_| {
            let (rt, spec) = (rt.clone(), race_spec.clone());
            tokio::spawn(async move { rt.spawn(&spec).await.map(|_| ()) })
        });
        let mut codes = Vec::new();
        for a in attempts {
            codes.push(code(&a.await.expect("join")));
        }
        codes.sort();
        assert_eq!(
            codes,
            ["CONFLICT"; 5]
                .iter()
                .copied()
                .chain(["ok"])
                .collect::<Vec<_>>()
        );

        rt.destroy(&id).await.expect("destroy");
        assert_eq!(code(&rt.status(&id).await), "NOT_FOUND");
        assert_eq!(code(&rt.exec(&id, &sh("true")).await), "NOT_FOUND");
        assert_eq!(code(&rt.stat(&id, "/workspace").await), "NOT_FOUND");
        assert_eq!(code(&rt.logs(&id, 10).await), "NOT_FOUND");
        assert_eq!(code(&rt.destroy(&id).await), "NOT_FOUND");
        assert_eq!(code(&rt.status("sb-never-existed").await), "NOT_FOUND");
        let listed = rt.list().await.expect("list");
        assert!(!listed.iter().any(|s| s.sandbox_id == id), "{listed:?}");

        // The id is free again.
        spawn(&h, &spec).await;
        rt.destroy(&id).await.expect("destroy again");
        rt.destroy(&race_id).await.expect("destroy race winner");
    }

    pub async fn exec_shell_and_argv(h: Arc<Harness>) {
        let rt = h.runtime();
        let id = h.new_id();
        let mut spec = h.spec(&id);
        spec.env = BTreeMap::from([
            ("SPAWN_VAR".into(), "from-spawn".into()),
            ("OVERRIDE".into(), "spawn".into()),
        ]);
        spawn(&h, &spec).await;

        assert_eq!(run(&rt, &id, &sh("exit 0")).await.exit_code, 0);
        let out = run(&rt, &id, &sh("echo out; echo err >&2; exit 3")).await;
        assert_eq!(
            (
                out.exit_code,
                text(&out.stdout),
                text(&out.stderr),
                out.timed_out
            ),
            (3, "out\n".into(), "err\n".into(), false)
        );
        // stdin is empty, never the caller's terminal.
        assert_eq!(run_ok(&rt, &id, "cat").await, "");

        // Environment: spawn env, overridden by exec env.
        let mut with_env = sh("printf '%s|%s|%s' \"$SPAWN_VAR\" \"$OVERRIDE\" \"$EXEC_VAR\"");
        with_env.env = BTreeMap::from([
            ("OVERRIDE".into(), "exec".into()),
            ("EXEC_VAR".into(), "x y".into()),
        ]);
        assert_eq!(
            text(&run(&rt, &id, &with_env).await.stdout),
            "from-spawn|exec|x y"
        );

        // Working directories.
        assert!(
            run_ok(&rt, &id, "pwd")
                .await
                .trim_end()
                .ends_with("/workspace")
        );
        run_ok(&rt, &id, "mkdir -p sub/dir").await;
        for (workdir, suffix) in [
            ("sub/dir", "/workspace/sub/dir"),
            ("/workspace/sub", "/workspace/sub"),
        ] {
            let mut spec = sh("pwd");
            spec.workdir = Some(workdir.into());
            let out = run(&rt, &id, &spec).await;
            assert!(
                text(&out.stdout).trim_end().ends_with(suffix),
                "workdir {workdir}: {:?}",
                text(&out.stdout)
            );
        }
        let mut missing = sh("pwd");
        missing.workdir = Some("/workspace/no/such/dir".into());
        assert_eq!(code(&rt.exec(&id, &missing).await), "NOT_FOUND");
        let mut outside = sh("pwd");
        outside.workdir = Some("../..".into());
        assert_eq!(code(&rt.exec(&id, &outside).await), "INVALID_PATH");

        // Arguments survive both modes byte for byte.
        let args = ["a b", "it's", "\"q\"", "$HOME", "", "*", "back\\slash"];
        let want: String = args.iter().map(|a| format!("{a}\n")).collect();
        let mut shell = sh("printf '%s\\n'");
        shell.args = args.iter().map(|a| a.to_string()).collect();
        assert_eq!(
            text(&run(&rt, &id, &shell).await.stdout),
            want,
            "shell mode"
        );
        let mut direct = argv("printf", &["%s\n"]);
        direct.args.extend(args.iter().map(|a| a.to_string()));
        assert_eq!(
            text(&run(&rt, &id, &direct).await.stdout),
            want,
            "argv mode"
        );

        // Argv mode runs no shell: metacharacters are plain bytes.
        let out = run(&rt, &id, &argv("echo", &["$HOME;", "|", "x"])).await;
        assert_eq!(text(&out.stdout), "$HOME; | x\n");
        assert_eq!(
            run(&rt, &id, &argv("sh", &["-c", "exit 5"]))
                .await
                .exit_code,
            5
        );

        // A missing program is exit code 127 in both modes.
        let out = run(&rt, &id, &argv("stacyvm-no-such-program", &[])).await;
        assert_eq!(out.exit_code, 127, "argv: {:?}", text(&out.stderr));
        assert_eq!(
            run(&rt, &id, &sh("stacyvm-no-such-program"))
                .await
                .exit_code,
            127
        );

        // An empty command is a bad request in both modes.
        assert_eq!(code(&rt.exec(&id, &sh("")).await), "BAD_REQUEST");
        assert_eq!(code(&rt.exec(&id, &argv("", &["x"])).await), "BAD_REQUEST");

        rt.destroy(&id).await.expect("destroy");
    }

    pub async fn exec_timeout_kills_tree(h: Arc<Harness>) {
        let rt = h.runtime();
        let id = spawn_default(&h).await;
        let mut spec = sh("sleep 300 & echo $! > bg.pid; wait");
        spec.timeout = Some(Duration::from_millis(500));
        let started = Instant::now();
        let out = run(&rt, &id, &spec).await;
        assert!(out.timed_out, "{out:?}");
        assert_eq!(out.exit_code, -1);
        assert!(out.duration_ms >= 400, "{out:?}");
        assert!(started.elapsed() < SOON, "took {:?}", started.elapsed());

        let check = pid_gone("bg.pid");
        eventually("the background sleep is killed", || {
            let (rt, id, check) = (rt.clone(), id.clone(), check.clone());
            async move { run(&rt, &id, &sh(&check)).await.exit_code == 0 }
        })
        .await;

        // A command that finishes within its timeout is not marked.
        let mut quick = sh("echo fast");
        quick.timeout = Some(Duration::from_secs(30));
        let out = run(&rt, &id, &quick).await;
        assert_eq!((out.exit_code, out.timed_out), (0, false));
        assert_eq!(text(&out.stdout), "fast\n");

        rt.destroy(&id).await.expect("destroy");
    }

    pub async fn exec_stream_ends_with_exit(h: Arc<Harness>) {
        let rt = h.runtime();
        let id = spawn_default(&h).await;

        // Output must arrive while the command still runs: the command waits
        // for a file the test writes only after the first chunk came.
        let mut spec = sh("echo ready; while [ ! -e go ]; do sleep 0.05; done; \
             for i in 1 2 3; do echo out$i; echo err$i >&2; done; exit 4");
        spec.timeout = Some(Duration::from_secs(60));
        let mut rx = rt.exec_stream(&id, &spec).await.expect("exec_stream");
        let first = tokio::time::timeout(SOON, rx.recv())
            .await
            .expect("first chunk while the command runs (is output buffered?)");
        assert_eq!(
            first,
            Some(ExecChunk::Stdout(Bytes::from_static(b"ready\n")))
        );
        write(&rt, &id, "/workspace/go", b"").await;
        let mut items = vec![ExecChunk::Stdout(Bytes::from_static(b"ready\n"))];
        items.extend(collect(rx).await);
        let (out, err, exit) = split_stream(&items);
        assert_eq!(out, "ready\nout1\nout2\nout3\n");
        assert_eq!(err, "err1\nerr2\nerr3\n");
        assert_eq!(exit, (4, false));

        // A streamed timeout ends with Exit { timed_out: true }.
        let mut spec = sh("echo start; sleep 300");
        spec.timeout = Some(Duration::from_millis(500));
        let items = collect(rt.exec_stream(&id, &spec).await.expect("exec_stream")).await;
        let (out, _, exit) = split_stream(&items);
        assert_eq!(out, "start\n");
        assert_eq!(exit, (-1, true));

        // Dropping the receiver kills the process tree.
        let spec = sh("sleep 300 & echo $! > drop.pid; echo ready; wait");
        let mut rx = rt.exec_stream(&id, &spec).await.expect("exec_stream");
        let first = tokio::time::timeout(SOON, rx.recv()).await.expect("ready");
        assert_eq!(
            first,
            Some(ExecChunk::Stdout(Bytes::from_static(b"ready\n")))
        );
        drop(rx);
        let check = pid_gone("drop.pid");
        eventually("dropping the stream kills the command", || {
            let (rt, id, check) = (rt.clone(), id.clone(), check.clone());
            async move { run(&rt, &id, &sh(&check)).await.exit_code == 0 }
        })
        .await;

        // A program that cannot start still ends its stream with Exit.
        let items = collect(
            rt.exec_stream(&id, &argv("stacyvm-no-such-program", &[]))
                .await
                .expect("exec_stream"),
        )
        .await;
        assert_eq!(split_stream(&items).2, (127, false));

        rt.destroy(&id).await.expect("destroy");
        assert_eq!(code(&rt.exec_stream(&id, &sh("true")).await), "NOT_FOUND");
    }

    pub async fn files_binary_round_trip(h: Arc<Harness>) {
        let rt = h.runtime();
        let id = spawn_default(&h).await;
        // 10 MiB holding every byte value, in an order that is not periodic
        // at any small power of two.
        let data: Vec<u8> = (0..10 * 1024 * 1024u32)
            .map(|i| (i ^ (i >> 8) ^ (i >> 17)) as u8)
            .collect();
        assert!((0..=255u8).all(|b| data.contains(&b)));

        let written = rt
            .write_file(&id, "/workspace/bin/data.bin", 0o600, body(&data))
            .await
            .expect("write");
        assert_eq!(written, data.len() as u64);
        let back = read(&rt, &id, "/workspace/bin/data.bin").await;
        assert!(back == data, "10 MiB round trip differs");
        let st = rt.stat(&id, "bin/data.bin").await.expect("stat");
        assert_eq!(
            (st.size, st.mode, st.is_dir),
            (data.len() as u64, 0o600, false)
        );
        assert_eq!(st.path, "/workspace/bin/data.bin");

        // The command side sees the same bytes.
        let sum = run_ok(&rt, &id, "wc -c < bin/data.bin").await;
        assert_eq!(sum.trim(), data.len().to_string());

        // Overwrite with something shorter: no stale tail.
        assert_eq!(
            write(&rt, &id, "/workspace/bin/data.bin", b"short").await,
            5
        );
        assert_eq!(read(&rt, &id, "/workspace/bin/data.bin").await, b"short");
        // Mode 0 means 0o644.
        assert_eq!(
            rt.stat(&id, "bin/data.bin").await.expect("stat").mode,
            0o644
        );

        // Empty files and files the command wrote.
        assert_eq!(write(&rt, &id, "empty", b"").await, 0);
        assert_eq!(read(&rt, &id, "/workspace/empty").await, b"");
        run_ok(&rt, &id, "printf 'from\\0exec' > fromexec.bin").await;
        assert_eq!(read(&rt, &id, "fromexec.bin").await, b"from\0exec");

        assert_eq!(code(&rt.read_file(&id, "nope.bin").await), "NOT_FOUND");
        assert_ne!(code(&rt.read_file(&id, "/workspace/bin").await), "ok");
        rt.destroy(&id).await.expect("destroy");
    }

    pub async fn file_ops(h: Arc<Harness>) {
        let rt = h.runtime();
        let id = spawn_default(&h).await;
        write(&rt, &id, "a.txt", b"alpha").await;
        write(&rt, &id, "/workspace/dir/b.txt", b"beta").await;
        write(&rt, &id, "dir/sub/c.txt", b"gamma").await;
        write(&rt, &id, "dir/d.log", b"delta").await;

        let paths = |v: Vec<FileInfo>| v.into_iter().map(|f| f.path).collect::<Vec<_>>();
        let top = rt.list_files(&id, "/workspace").await.expect("list");
        assert_eq!(paths(top.clone()), ["/workspace/a.txt", "/workspace/dir"]);
        assert!(top[1].is_dir && !top[0].is_dir);
        assert_eq!(top[0].size, 5);
        assert_eq!(
            paths(rt.list_files(&id, "dir").await.expect("list")),
            [
                "/workspace/dir/b.txt",
                "/workspace/dir/d.log",
                "/workspace/dir/sub"
            ]
        );
        assert_eq!(code(&rt.list_files(&id, "missing").await), "NOT_FOUND");
        assert_eq!(code(&rt.list_files(&id, "a.txt").await), "BAD_REQUEST");

        let st = rt.stat(&id, "/workspace/a.txt").await.expect("stat");
        assert_eq!((st.size, st.mode, st.is_dir), (5, 0o644, false));
        assert!(looks_rfc3339(&st.mod_time), "mod_time {:?}", st.mod_time);
        assert!(rt.stat(&id, "/workspace/dir").await.expect("stat").is_dir);
        assert_eq!(code(&rt.stat(&id, "missing.txt").await), "NOT_FOUND");

        // Globs: `*` stays within one component, `**` crosses them.
        let glob = |p: &'static str| {
            let (rt, id) = (rt.clone(), id.clone());
            async move { rt.glob(&id, p).await.expect("glob") }
        };
        assert_eq!(glob("/workspace/dir/*.txt").await, ["/workspace/dir/b.txt"]);
        assert_eq!(glob("/workspace/*.txt").await, ["/workspace/a.txt"]);
        assert_eq!(
            glob("dir/*").await,
            [
                "/workspace/dir/b.txt",
                "/workspace/dir/d.log",
                "/workspace/dir/sub"
            ]
        );
        assert_eq!(glob("/workspace/*/b.txt").await, ["/workspace/dir/b.txt"]);
        assert_eq!(
            glob("/workspace/**/c.txt").await,
            ["/workspace/dir/sub/c.txt"]
        );
        assert!(glob("/workspace/*.none").await.is_empty());
        assert_eq!(code(&rt.glob(&id, "/workspace/../*").await), "INVALID_PATH");

        // Rename creates the target's parents.
        rt.rename(&id, "a.txt", "/workspace/moved/deep/a2.txt")
            .await
            .expect("rename");
        assert_eq!(code(&rt.stat(&id, "a.txt").await), "NOT_FOUND");
        assert_eq!(read(&rt, &id, "moved/deep/a2.txt").await, b"alpha");
        assert_eq!(code(&rt.rename(&id, "a.txt", "x.txt").await), "NOT_FOUND");
        rt.rename(&id, "dir/sub", "dir/sub2")
            .await
            .expect("rename dir");
        assert_eq!(read(&rt, &id, "dir/sub2/c.txt").await, b"gamma");

        // Chmod, seen by the command side too.
        rt.chmod(&id, "moved/deep/a2.txt", 0o755)
            .await
            .expect("chmod");
        assert_eq!(
            rt.stat(&id, "moved/deep/a2.txt").await.expect("stat").mode,
            0o755
        );
        run_ok(&rt, &id, "test -x moved/deep/a2.txt").await;
        assert_eq!(code(&rt.chmod(&id, "missing", 0o600).await), "NOT_FOUND");

        // Remove: files, empty dirs, trees only when recursive.
        rt.remove(&id, "moved/deep/a2.txt", false)
            .await
            .expect("rm file");
        rt.remove(&id, "moved/deep", false)
            .await
            .expect("rm empty dir");
        assert_eq!(code(&rt.remove(&id, "dir", false).await), "BAD_REQUEST");
        assert!(
            rt.stat(&id, "dir/b.txt").await.is_ok(),
            "kept after refusal"
        );
        rt.remove(&id, "dir", true).await.expect("rm -r");
        assert_eq!(code(&rt.stat(&id, "dir").await), "NOT_FOUND");
        assert_eq!(code(&rt.remove(&id, "dir", true).await), "NOT_FOUND");
        assert_eq!(code(&rt.remove(&id, "/", true).await), "BAD_REQUEST");
        assert_eq!(
            code(&rt.remove(&id, "/workspace", true).await),
            "BAD_REQUEST"
        );
        assert!(rt.stat(&id, "/workspace").await.expect("stat").is_dir);

        // Files and commands share one filesystem.
        run_ok(&rt, &id, "echo hi > fromexec.txt").await;
        assert_eq!(read(&rt, &id, "fromexec.txt").await, b"hi\n");
        assert_eq!(
            paths(rt.list_files(&id, "/workspace").await.expect("list")),
            ["/workspace/fromexec.txt", "/workspace/moved"]
        );
        rt.destroy(&id).await.expect("destroy");
    }

    fn looks_rfc3339(s: &str) -> bool {
        let b = s.as_bytes();
        b.len() >= 20
            && b[..4].iter().all(u8::is_ascii_digit)
            && &s[..4] >= "2000"
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T'
            && b[13] == b':'
            && (s.ends_with('Z') || s[19..].contains('+') || s[19..].contains('-'))
    }

    pub async fn traversal_refused(h: Arc<Harness>) {
        let rt = h.runtime();
        let id = spawn_default(&h).await;
        let marker = format!("stacyvm-escape-{}", &super::random_sandbox_id()[3..]);
        let host_marker = std::path::Path::new("/tmp").join(&marker);
        write(&rt, &id, "inside.txt", b"x").await;

        let invalid = |r: &Result<(), RuntimeError>, what: &str| {
            assert_eq!(code(r), "INVALID_PATH", "{what}: {r:?}");
        };
        let w = |p: String| {
            let (rt, id) = (rt.clone(), id.clone());
            async move { rt.write_file(&id, &p, 0, body(b"pwned")).await.map(|_| ()) }
        };
        invalid(&w("../x".into()).await, "../x");
        invalid(&w(format!("/workspace/../../tmp/{marker}")).await, "dotdot");
        invalid(&w("/workspace/a\0b".to_string()).await, "NUL");
        invalid(
            &rt.read_file(&id, "/workspace/../../etc/passwd")
                .await
                .map(|_| ()),
            "read ../../etc/passwd",
        );

        // A symlink made inside the sandbox that points at the host's root.
        run_ok(&rt, &id, "ln -s / esc").await;
        invalid(
            &w(format!("/workspace/esc/tmp/{marker}")).await,
            "write via symlink",
        );
        invalid(
            &w(format!("esc/tmp/{marker}")).await,
            "relative write via symlink",
        );
        invalid(
            &rt.read_file(&id, "esc/etc/passwd").await.map(|_| ()),
            "read via symlink",
        );
        invalid(
            &rt.stat(&id, "esc/etc/passwd").await.map(|_| ()),
            "stat via symlink",
        );
        invalid(
            &rt.list_files(&id, "esc").await.map(|_| ()),
            "list via symlink",
        );
        invalid(
            &rt.list_files(&id, "esc/tmp").await.map(|_| ()),
            "list via symlink",
        );
        invalid(&rt.glob(&id, "esc/*").await.map(|_| ()), "glob via symlink");
        invalid(
            &rt.chmod(&id, &format!("esc/tmp/{marker}"), 0o777).await,
            "chmod via symlink",
        );
        invalid(
            &rt.rename(&id, "inside.txt", &format!("esc/tmp/{marker}"))
                .await,
            "rename into symlink",
        );
        invalid(
            &rt.remove(&id, &format!("esc/tmp/{marker}"), false).await,
            "remove via symlink",
        );
        // A glob that walks through the link never reports what is outside.
        let found = rt.glob(&id, "/workspace/*/etc/passwd").await;
        assert!(
            matches!(&found, Ok(v) if v.is_empty()) || code(&found) == "INVALID_PATH",
            "{found:?}"
        );
        assert!(
            !host_marker.exists(),
            "{} was written",
            host_marker.display()
        );
        assert_eq!(read(&rt, &id, "inside.txt").await, b"x", "rename refused");

        // A symlink within the sandbox is fine.
        run_ok(&rt, &id, "mkdir -p real && ln -s real alias").await;
        write(&rt, &id, "alias/f.txt", b"ok").await;
        assert_eq!(read(&rt, &id, "real/f.txt").await, b"ok");

        rt.destroy(&id).await.expect("destroy");
        assert!(!host_marker.exists());
    }

    pub async fn status_after_main_dies(h: Arc<Harness>) {
        let rt = h.runtime();
        let id = spawn_default(&h).await;
        assert_eq!(
            rt.status(&id).await.expect("status").state,
            RuntimeState::Running
        );
        h.fixture().kill_main(&id).await;
        eventually("status reports Stopped", || {
            let (rt, id) = (rt.clone(), id.clone());
            async move {
                rt.status(&id)
                    .await
                    .is_ok_and(|s| s.state == RuntimeState::Stopped)
            }
        })
        .await;
        let listed = rt.list().await.expect("list");
        let entry = listed.iter().find(|s| s.sandbox_id == id).expect("listed");
        assert_eq!(entry.state, RuntimeState::Stopped);
        assert_eq!(code(&rt.exec(&id, &sh("true")).await), "BAD_REQUEST");
        rt.destroy(&id).await.expect("destroy a stopped sandbox");
        assert_eq!(code(&rt.status(&id).await), "NOT_FOUND");
    }

    pub async fn adoption_after_restart(h: Arc<Harness>) {
        let rt = h.runtime();
        let id = h.new_id();
        let mut spec = h.spec(&id);
        spec.labels.insert("worker_id".into(), "w-adopt".into());
        spec.generation = 42;
        spawn(&h, &spec).await;
        write(&rt, &id, "kept.txt", b"still here").await;

        let again = h.fixture().reopen().await;
        let listed = again.list().await.expect("list after reopen");
        let sb = listed
            .iter()
            .find(|s| s.sandbox_id == id)
            .unwrap_or_else(|| panic!("{id} not adopted: {listed:?}"));
        assert_eq!(sb.state, RuntimeState::Running);
        assert_eq!(sb.labels, spec.labels);
        assert_eq!(sb.generation, 42);
        assert_eq!(sb.image, spec.image);
        assert_eq!(again.status(&id).await.expect("status").generation, 42);
        assert_eq!(read(&again, &id, "kept.txt").await, b"still here");
        assert_eq!(run_ok(&again, &id, "cat kept.txt").await, "still here");

        again
            .destroy(&id)
            .await
            .expect("destroy via the new instance");
        assert_eq!(code(&rt.status(&id).await), "NOT_FOUND");
        assert_eq!(code(&again.status(&id).await), "NOT_FOUND");
    }

    pub async fn health_ok(h: Arc<Harness>) {
        let rt = h.runtime();
        rt.health().await.expect("health");
        assert!(!rt.name().is_empty());
        assert_eq!(rt.name(), h.fixture().reopen().await.name());
    }
}
