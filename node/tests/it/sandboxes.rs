//! The sandbox API end to end: three in-process replicas, two workers with
//! the mock runtime, every call through the typed client or raw HTTP.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use stacyvm_api::{DurationValue, ExecRequest, SpawnRequest};
use stacyvm_client::ClientError;
use stacyvm_store::StoreDriver;

use crate::plane::{Plane, W, eventually, fast, workers_online};

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code().unwrap_or("<transport>").to_string(),
    }
}

fn shell(cmd: &str) -> ExecRequest {
    ExecRequest {
        command: cmd.into(),
        ..Default::default()
    }
}

async fn plane_with_workers(n_workers: usize) -> (Plane, Vec<W>) {
    let plane = Plane::start(3, StoreDriver::Sqlite, fast())
        .await
        .expect("sqlite plane");
    let mut ws = Vec::new();
    for i in 0..n_workers {
        ws.push(
            W::start(
                &format!("worker-{i}"),
                plane.apis(),
                Duration::from_millis(500),
            )
            .await,
        );
    }
    workers_online(&plane.client(), n_workers).await;
    (plane, ws)
}

async fn teardown(plane: Plane, ws: Vec<W>) {
    for w in ws {
        w.cleanup().await;
    }
    plane.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spawn_exec_files_destroy_through_any_replica() {
    let (plane, ws) = plane_with_workers(2).await;
    let leader = plane.wait_leader().await;
    let follower = (leader + 1) % 3;
    let c = plane.client_of(follower);

    // Placement spreads sandboxes over the least-loaded workers.
    let mut ids = Vec::new();
    for _ in 0..4 {
        let sb = c
            .spawn(&SpawnRequest {
                image: "busybox".into(),
                ..Default::default()
            })
            .await
            .expect("spawn via follower");
        assert_eq!(sb.state, "running");
        assert!(sb.id.starts_with("sb-"));
        assert!(sb.generation > 0, "the sandbox runs under a lease");
        ids.push(sb);
    }
    for w in &ws {
        assert_eq!(
            ids.iter().filter(|s| s.worker_id == w.id).count(),
            2,
            "least-loaded placement"
        );
    }
    let sb = ids[0].clone();
    let got = plane
        .client_of(leader)
        .get(&sb.id)
        .await
        .expect("get via leader");
    assert_eq!(got.worker_id, sb.worker_id);
    assert_eq!(got.provider, "mock");

    // Exec: sync with exit code and stderr, env and workdir, argv mode.
    let r = c
        .exec(&sb.id, &shell("echo out; echo err >&2; exit 3"))
        .await
        .expect("exec");
    assert_eq!(
        (r.exit_code, r.stdout.as_str(), r.stderr.as_str()),
        (3, "out\n", "err\n")
    );
    let r = c
        .exec(
            &sb.id,
            &ExecRequest {
                command: "sh".into(),
                args: vec![
                    "-c".into(),
                    "mkdir -p d && cd d && pwd && echo $GREETING".into(),
                ],
                mode: "argv".into(),
                env: [("GREETING".to_string(), "hi there".to_string())].into(),
                ..Default::default()
            },
        )
        .await
        .expect("argv exec");
    assert!(
        r.stdout.ends_with("/workspace/d\nhi there\n"),
        "{:?}",
        r.stdout
    );

    // Streamed exec ends with a line carrying the exit code.
    let mut lines = Box::pin(
        c.exec_stream(&sb.id, &shell("for i in 1 2 3; do echo $i; done; exit 7"))
            .await
            .expect("stream"),
    );
    let mut out = String::new();
    let mut exit = None;
    while let Some(l) = lines.next().await {
        let l = l.expect("line");
        if let Some(d) = l.data {
            out.push_str(&d);
        }
        if l.exit_code.is_some() {
            exit = l.exit_code;
        }
    }
    assert_eq!((out.as_str(), exit), ("1\n2\n3\n", Some(7)));

    // A timeout kills the command: 408 TIMEOUT.
    let slow = ExecRequest {
        command: "sleep 30".into(),
        timeout: Some(DurationValue::Text("300ms".into())),
        ..Default::default()
    };
    assert_eq!(code(c.exec(&sb.id, &slow).await), "TIMEOUT");

    // 100 MB binary upload and download through a follower, streamed.
    let size = 100 * 1024 * 1024;
    let chunk: Vec<u8> = (0..=255u8).cycle().take(1024 * 1024).collect();
    let body = || {
        let chunk = chunk.clone();
        reqwest::Body::wrap_stream(futures::stream::iter(
            (0..100).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
        ))
    };
    c.upload(&sb.id, "/workspace/big.bin", body, Some(0o600))
        .await
        .expect("upload");
    let resp = c
        .download(&sb.id, "/workspace/big.bin")
        .await
        .expect("download");
    let mut hasher = Sha256::new();
    let mut n = 0usize;
    let mut stream = resp.bytes_stream();
    while let Some(b) = stream.next().await {
        let b = b.expect("bytes");
        n += b.len();
        hasher.update(&b);
    }
    let mut want = Sha256::new();
    for _ in 0..100 {
        want.update(&chunk);
    }
    assert_eq!(n, size);
    assert_eq!(hasher.finalize(), want.finalize(), "download equals upload");

    // list / stat / glob / move / chmod / delete through raw HTTP.
    let http = reqwest::Client::new();
    let base = format!(
        "http://{}/api/v1/sandboxes/{}",
        plane.cps[follower].api, sb.id
    );
    let stat: serde_json::Value = http
        .get(format!("{base}/files/stat?path=/workspace/big.bin"))
        .send()
        .await
        .expect("stat")
        .json()
        .await
        .expect("json");
    assert_eq!(
        (stat["size"].as_u64(), stat["mode"].as_str()),
        (Some(size as u64), Some("0600"))
    );
    let moved = http.post(format!("{base}/files/move")).json(&serde_json::json!({"old_path": "/workspace/big.bin", "new_path": "/workspace/sub/b.bin"})).send().await.expect("move");
    assert_eq!(moved.status(), 200);
    let ch = http
        .post(format!("{base}/files/chmod"))
        .json(&serde_json::json!({"path": "/workspace/sub/b.bin", "mode": "0755"}))
        .send()
        .await
        .expect("chmod");
    assert_eq!(ch.status(), 200);
    let glob: Vec<String> = http
        .get(format!("{base}/files/glob?pattern=/workspace/sub/*.bin"))
        .send()
        .await
        .expect("glob")
        .json()
        .await
        .expect("json");
    assert_eq!(glob, ["/workspace/sub/b.bin"]);
    let list = c.list_files(&sb.id, "/workspace/sub").await.expect("list");
    assert_eq!((list.len(), list[0].mode.as_str()), (1, "0755"));
    let del = http
        .delete(format!("{base}/files?path=/workspace/sub&recursive=true"))
        .send()
        .await
        .expect("delete");
    assert_eq!(del.status(), 200);
    assert_eq!(
        code(c.list_files(&sb.id, "/workspace/sub").await),
        "NOT_FOUND"
    );
    // The earlier JSON upload still works.
    let legacy = http
        .post(format!("{base}/files"))
        .json(&serde_json::json!({"path": "notes.txt", "content": "hello", "mode": "0644"}))
        .send()
        .await
        .expect("legacy write");
    assert_eq!(legacy.status(), 200);
    assert_eq!(
        c.exec(&sb.id, &shell("cat notes.txt"))
            .await
            .expect("cat")
            .stdout,
        "hello"
    );

    // Traversal is refused with a stable code, on every file route.
    for bad in ["../etc/passwd", "/workspace/../../etc/shadow"] {
        let r = http
            .get(format!("{base}/files?path={}", stacyvm_client::enc(bad)))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 400);
        let body: serde_json::Value = r.json().await.expect("json");
        assert_eq!(body["code"], "INVALID_PATH", "{bad}");
    }
    let r = c
        .upload(&sb.id, "../escape", || reqwest::Body::from("x"), None)
        .await;
    assert_eq!(code(r), "INVALID_PATH");

    // Logs and exec logs.
    let logs: Vec<String> = http
        .get(format!("{base}/logs?lines=50"))
        .send()
        .await
        .expect("logs")
        .json()
        .await
        .expect("json");
    assert!(logs.iter().any(|l| l.contains("exec")), "{logs:?}");
    eventually(Duration::from_secs(5), "exec logs replicated", || async {
        let v: serde_json::Value = http
            .get(format!("{base}/exec-logs"))
            .send()
            .await
            .expect("x")
            .json()
            .await
            .expect("json");
        v["exec_logs"].as_array().is_some_and(|a| a.len() >= 3)
    })
    .await;

    // Extend is bounded by the max TTL.
    let ext = c
        .extend(
            &sb.id,
            &stacyvm_api::ExtendRequest {
                ttl: DurationValue::Text("2h".into()),
            },
        )
        .await
        .expect("extend");
    assert!(ext.expires_at > sb.expires_at);
    assert_eq!(
        code(
            c.extend(
                &sb.id,
                &stacyvm_api::ExtendRequest {
                    ttl: DurationValue::Text("48h".into())
                }
            )
            .await
        ),
        "BAD_REQUEST"
    );

    // Destroy: the sandbox is gone everywhere; later calls answer NOT_FOUND.
    for s in &ids {
        c.destroy(&s.id).await.expect("destroy");
    }
    assert_eq!(code(c.get(&sb.id).await), "NOT_FOUND");
    assert_eq!(code(c.exec(&sb.id, &shell("true")).await), "NOT_FOUND");
    assert_eq!(code(c.destroy(&sb.id).await), "NOT_FOUND");
    for w in &ws {
        assert!(
            w.running_here().await.is_empty(),
            "{} still runs sandboxes",
            w.id
        );
    }
    assert!(c.list("").await.expect("list").is_empty());
    teardown(plane, ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_stable_codes() {
    let (plane, ws) = plane_with_workers(1).await;
    let c = plane.client();
    let spawn = |rt: &str, ttl: Option<&str>| SpawnRequest {
        image: "busybox".into(),
        runtime: rt.into(),
        ttl: ttl.map(|t| DurationValue::Text(t.into())),
        ..Default::default()
    };
    assert_eq!(
        code(c.spawn(&spawn("gvisor", None)).await),
        "UNKNOWN_RUNTIME"
    );
    assert_eq!(code(c.spawn(&spawn("", Some("48h"))).await), "BAD_REQUEST");
    assert_eq!(code(c.spawn(&spawn("", Some("soon"))).await), "BAD_REQUEST");
    assert_eq!(code(c.spawn(&SpawnRequest::default()).await), "BAD_REQUEST");
    assert_eq!(code(c.get("sb-../../etc").await), "BAD_REQUEST");
    assert_eq!(code(c.get("sb-0000000000ff").await), "NOT_FOUND");

    let http = reqwest::Client::new();
    let api = &plane.cps[0].api;
    for (body, what) in [
        (r#"{"image":"busybox","imagee":"x"}"#, "unknown field"),
        (r#"{"image":"busybox","memory_mb":"lots"}"#, "wrong type"),
        ("{not json", "malformed"),
    ] {
        let r = http
            .post(format!("http://{api}/api/v1/sandboxes"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 400, "{what}");
        let v: serde_json::Value = r.json().await.expect("json");
        assert_eq!(v["code"], "BAD_REQUEST", "{what}");
        assert!(v["request_id"].as_str().is_some_and(|s| !s.is_empty()));
    }
    let huge = vec![b'a'; 2 * 1024 * 1024];
    let r = http
        .post(format!("http://{api}/api/v1/sandboxes"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 413);

    // No eligible worker: the only one is drained.
    c.worker_action("worker-0", "drain").await.expect("drain");
    assert_eq!(code(c.spawn(&spawn("", None)).await), "NO_ELIGIBLE_WORKER");
    c.worker_action("worker-0", "undrain")
        .await
        .expect("undrain");
    let sb = c
        .spawn(&spawn("", None))
        .await
        .expect("spawn after undrain");
    c.destroy(&sb.id).await.expect("destroy");
    assert_eq!(code(c.exec(&sb.id, &shell("true")).await), "NOT_FOUND");
    teardown(plane, ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quotas_caps_queue_and_templates() {
    let mut cfg = fast();
    cfg.max_sandboxes = 3;
    cfg.spawn_queue_timeout = Duration::from_secs(5);
    let plane = Plane::start(1, StoreDriver::Sqlite, cfg)
        .await
        .expect("plane");
    let w = W::start("worker-q", plane.apis(), Duration::from_millis(500)).await;
    let c = plane.client();
    workers_online(&c, 1).await;
    let http = reqwest::Client::new();
    let api = &plane.cps[0].api;

    // Owner quota: at most one sandbox for alice.
    let r = http
        .put(format!("http://{api}/api/v1/admin/quotas/alice"))
        .json(&serde_json::json!({"max_sandboxes": 1, "max_ttl": "1h"}))
        .send()
        .await
        .expect("put quota");
    assert_eq!(r.status(), 200);
    let alice = |ttl: &str| SpawnRequest {
        image: "busybox".into(),
        owner_id: "alice".into(),
        ttl: Some(DurationValue::Text(ttl.into())),
        ..Default::default()
    };
    assert_eq!(
        code(c.spawn(&alice("2h")).await),
        "BAD_REQUEST",
        "quota max_ttl"
    );
    let a1 = c.spawn(&alice("10m")).await.expect("alice 1");
    // The per-owner cap queues too; with a 5 s queue the second spawn waits
    // until the first is destroyed.
    let c2 = plane.client();
    let waiting = tokio::spawn(async move { c2.spawn(&alice("10m")).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "the second spawn waits in the queue"
    );
    c.destroy(&a1.id).await.expect("destroy");
    let a2 = waiting.await.expect("join").expect("dequeued spawn");

    // Global cap: three live sandboxes; a fourth times out in the queue.
    let b1 = c
        .spawn(&SpawnRequest {
            image: "busybox".into(),
            ..Default::default()
        })
        .await
        .expect("b1");
    let b2 = c
        .spawn(&SpawnRequest {
            image: "busybox".into(),
            ..Default::default()
        })
        .await
        .expect("b2");
    let started = std::time::Instant::now();
    assert_eq!(
        code(
            c.spawn(&SpawnRequest {
                image: "busybox".into(),
                ..Default::default()
            })
            .await
        ),
        "RESOURCE_LIMIT"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "refused only after the queue timeout"
    );
    for s in [&a2, &b1, &b2] {
        c.destroy(&s.id).await.expect("destroy");
    }

    // Templates: env and setup commands are applied.
    let t = serde_json::json!({"name": "py", "image": "busybox", "env": {"FOO": "bar"}, "setup": ["echo ready > setup.txt"], "ttl_seconds": 600});
    let r = http
        .post(format!("http://{api}/api/v1/templates"))
        .json(&t)
        .send()
        .await
        .expect("create template");
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let r = http
        .post(format!("http://{api}/api/v1/templates"))
        .json(&t)
        .send()
        .await
        .expect("duplicate");
    assert_eq!(r.status(), 409);
    let r = http
        .post(format!("http://{api}/api/v1/templates/py/spawn"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("template spawn");
    assert_eq!(r.status(), 201);
    let sb: stacyvm_api::Sandbox = r.json().await.expect("sandbox");
    assert_eq!(sb.metadata.get("template").map(String::as_str), Some("py"));
    let out = c
        .exec(&sb.id, &shell("cat setup.txt; echo $FOO"))
        .await
        .expect("exec");
    assert_eq!(out.stdout, "ready\nbar\n");
    // A failing setup step fails the spawn and leaves nothing running.
    let bad = serde_json::json!({"name": "broken", "image": "busybox", "setup": ["exit 9"]});
    http.post(format!("http://{api}/api/v1/templates"))
        .json(&bad)
        .send()
        .await
        .expect("create");
    let r = http
        .post(format!("http://{api}/api/v1/templates/broken/spawn"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("spawn");
    assert_eq!(r.status(), 400);
    c.destroy(&sb.id).await.expect("destroy");
    assert!(w.running_here().await.is_empty());
    assert!(c.list("").await.expect("list").is_empty());
    w.cleanup().await;
    plane.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_exec_events_and_metrics() {
    let (plane, ws) = plane_with_workers(1).await;
    let c = plane.client();
    let sb = c
        .spawn(&SpawnRequest {
            image: "busybox".into(),
            ..Default::default()
        })
        .await
        .expect("spawn");

    // WebSocket exec: chunks, then the exit code, then done.
    let url = format!(
        "ws://{}/api/v1/sandboxes/{}/exec/ws",
        plane.cps[1].api, sb.id
    );
    let (mut sock, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("ws connect");
    let req = serde_json::to_string(&shell("echo ws; exit 5")).expect("json");
    sock.send(tokio_tungstenite::tungstenite::Message::Text(req.into()))
        .await
        .expect("send");
    let mut got = Vec::new();
    while let Some(Ok(m)) = sock.next().await {
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            got.push(serde_json::from_str::<serde_json::Value>(&t).expect("frame"));
        }
    }
    assert!(got.iter().any(|v| v["data"] == "ws\n"), "{got:?}");
    let last = got.last().expect("frames");
    assert_eq!(
        (last["type"].as_str(), last["exit_code"].as_i64()),
        (Some("done"), Some(5))
    );

    // Events: every replica emits the same IDs; Last-Event-ID replays the rest.
    let http = reqwest::Client::new();
    let read_events = |api: String, last: Option<String>, n: usize| {
        let http = http.clone();
        async move {
            let mut req = http.get(format!("http://{api}/api/v1/events"));
            if let Some(l) = last {
                req = req.header("last-event-id", l);
            }
            let resp = req.send().await.expect("events");
            let mut stream = resp.bytes_stream();
            let mut buf = String::new();
            let mut ids = Vec::new();
            while ids.len() < n {
                let Ok(Some(Ok(b))) =
                    tokio::time::timeout(Duration::from_secs(5), stream.next()).await
                else {
                    break;
                };
                buf.push_str(&String::from_utf8_lossy(&b));
                while let Some(pos) = buf.find("\n\n") {
                    let frame: String = buf.drain(..pos + 2).collect();
                    if let Some(id) = frame
                        .lines()
                        .find_map(|l| l.strip_prefix("id: ").or_else(|| l.strip_prefix("id:")))
                    {
                        ids.push(id.trim().to_string());
                    }
                }
            }
            ids
        }
    };
    let api0 = plane.cps[0].api.clone();
    let live = tokio::spawn(read_events(api0, None, 4));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sb2 = c
        .spawn(&SpawnRequest {
            image: "busybox".into(),
            ..Default::default()
        })
        .await
        .expect("spawn 2");
    c.destroy(&sb2.id).await.expect("destroy 2");
    let first = live.await.expect("join");
    assert!(first.len() >= 4, "live events: {first:?}");
    let replay = read_events(plane.cps[2].api.clone(), Some(first[1].clone()), 2).await;
    assert_eq!(
        &replay[..2],
        &first[2..4],
        "replay from another replica continues after Last-Event-ID"
    );

    // Prometheus metrics.
    let text = http
        .get(format!(
            "http://{}/api/v1/metrics/prometheus",
            plane.leader().await.api
        ))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(text.contains("stacyvm_spawns_total 2"), "{text}");
    assert!(text.contains("stacyvm_raft_is_leader 1"));
    c.destroy(&sb.id).await.expect("destroy");
    teardown(plane, ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_dying_mid_exec_is_a_clear_error() {
    let (plane, ws) = plane_with_workers(1).await;
    let c = plane.client();
    let sb = c
        .spawn(&SpawnRequest {
            image: "busybox".into(),
            ..Default::default()
        })
        .await
        .expect("spawn");
    let mut lines = Box::pin(
        c.exec_stream(&sb.id, &shell("echo started; sleep 30"))
            .await
            .expect("stream"),
    );
    let first = lines.next().await.expect("line").expect("ok");
    assert_eq!(first.data.as_deref(), Some("started\n"));
    ws[0].crash();
    let last = tokio::time::timeout(Duration::from_secs(10), async {
        let mut last = None;
        while let Some(l) = lines.next().await {
            last = Some(l.expect("line"));
        }
        last
    })
    .await
    .expect("the stream ends")
    .expect("a final line");
    assert_eq!(
        last.error.as_ref().map(|e| e.code.as_str()),
        Some("WORKER_UNAVAILABLE"),
        "{last:?}"
    );
    assert_eq!(
        code(c.exec(&sb.id, &shell("true")).await),
        "WORKER_UNAVAILABLE"
    );
    teardown(plane, ws).await;
}
