//! The Docker runtimes on a real dockerd: the contract suite on runc
//! (`docker`) and on runsc (`gvisor`), plus what only Docker has (hardened
//! container settings, images, runtime registration, leftovers).
//!
//! Needs `DOCKER_HOST` (or `/var/run/docker.sock`) and the image named by
//! `STACYVM_TEST_DOCKER_IMAGE` (busybox-static, `docker import`ed);
//! `scripts/test.sh` provides both. Without them the cases print `SKIP`,
//! except under `CI=true`, where they fail.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptionsBuilder};
use stacyvm_runtimes::docker::{DockerOptions, DockerRuntime, PullPolicy};
use stacyvm_runtimes::testing::cases::{code, run, run_ok, sh};
use stacyvm_runtimes::testing::{Fixture, random_sandbox_id, skip_unless_ci};
use stacyvm_runtimes::{Runtime, SpawnSpec};

struct DockerFixture {
    dir: tempfile::TempDir,
    opts: DockerOptions,
    runtime: Arc<DockerRuntime>,
    image: String,
}

fn test_image() -> Option<String> {
    std::env::var("STACYVM_TEST_DOCKER_IMAGE")
        .ok()
        .filter(|v| !v.is_empty())
}

fn docker_reachable() -> bool {
    std::env::var("DOCKER_HOST").is_ok_and(|h| h.starts_with("unix://"))
        || Path::new("/var/run/docker.sock").exists()
}

/// Options for `name` on a fresh state directory with a unique instance
/// (so `list` sees only this fixture's containers) and pulling off (no
/// registry is reachable; tests never leave loopback).
fn options(name: &str, dir: &Path) -> DockerOptions {
    let mut opts = DockerOptions::new(name, dir).expect("known docker runtime name");
    opts.instance = format!("t{}", &random_sandbox_id()[3..11]);
    opts.pull = PullPolicy::Never;
    opts
}

async fn fixture(name: &str) -> Option<DockerFixture> {
    let Some(image) = test_image() else {
        skip_unless_ci(name, "STACYVM_TEST_DOCKER_IMAGE is not set");
        return None;
    };
    if !docker_reachable() {
        skip_unless_ci(name, "no DOCKER_HOST and no /var/run/docker.sock");
        return None;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let opts = options(name, dir.path());
    let runtime = DockerRuntime::connect(opts.clone())
        .await
        .expect("docker client");
    if let Err(e) = runtime.health().await {
        skip_unless_ci(name, &e.to_string());
        return None;
    }
    Some(DockerFixture {
        dir,
        opts,
        runtime: Arc::new(runtime),
        image,
    })
}

#[async_trait]
impl Fixture for DockerFixture {
    fn runtime(&self) -> Arc<dyn Runtime> {
        self.runtime.clone()
    }

    fn image(&self) -> String {
        self.image.clone()
    }

    async fn kill_main(&self, sandbox_id: &str) {
        self.runtime
            .kill_main(sandbox_id)
            .await
            .expect("docker kill");
    }

    async fn reopen(&self) -> Arc<dyn Runtime> {
        Arc::new(
            DockerRuntime::connect(self.opts.clone())
                .await
                .expect("reconnect"),
        )
    }

    /// Containers of this fixture's instance, sandbox directories, and host
    /// processes naming this fixture's state directory.
    async fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        let filters = HashMap::from([(
            "label",
            vec![format!("stacyvm.instance={}", self.opts.instance)],
        )]);
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        match self.runtime.client().list_containers(Some(opts)).await {
            Ok(cs) => left.extend(
                cs.into_iter()
                    .map(|c| format!("container {:?}", c.names.unwrap_or_default())),
            ),
            Err(e) => left.push(format!("cannot list containers: {e}")),
        }
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            left.extend(
                entries
                    .flatten()
                    .map(|e| format!("directory {}", e.path().display())),
            );
        }
        left
    }
}

async fn runc_fixture() -> Option<Box<dyn Fixture>> {
    fixture("docker")
        .await
        .map(|f| Box::new(f) as Box<dyn Fixture>)
}

async fn runsc_fixture() -> Option<Box<dyn Fixture>> {
    fixture("gvisor")
        .await
        .map(|f| Box::new(f) as Box<dyn Fixture>)
}

mod runc {
    use super::*;
    stacyvm_runtimes::runtime_contract_suite!(runc_fixture);
}

mod gvisor {
    use super::*;
    stacyvm_runtimes::runtime_contract_suite!(runsc_fixture);
}

fn spec(f: &DockerFixture, id: &str) -> SpawnSpec {
    SpawnSpec {
        sandbox_id: id.to_string(),
        image: f.image.clone(),
        memory_mb: 128,
        vcpus: 1,
        ..SpawnSpec::default()
    }
}

/// The container really runs with the hardened settings, and they hold
/// inside it: non-root, no capabilities, no network but loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardened_container() {
    let Some(f) = fixture("docker").await else {
        return;
    };
    let rt: Arc<dyn Runtime> = f.runtime.clone();
    let id = random_sandbox_id();
    rt.spawn(&spec(&f, &id)).await.expect("spawn");
    let c = f
        .runtime
        .client()
        .inspect_container(
            &f.runtime.container_name(&id),
            None::<InspectContainerOptions>,
        )
        .await
        .expect("inspect");
    let host = c.host_config.expect("host config");
    let cfg = c.config.expect("config");
    let checks = (
        host.cap_drop.clone(),
        host.security_opt.clone(),
        host.pids_limit,
        host.memory,
        host.memory_swap,
        host.nano_cpus,
        host.network_mode.clone(),
        host.runtime.clone(),
        cfg.user.clone(),
    );
    let outcome = async {
        assert_eq!(
            checks,
            (
                Some(vec!["ALL".to_string()]),
                Some(vec!["no-new-privileges".to_string()]),
                Some(512),
                Some(128 * 1024 * 1024),
                Some(128 * 1024 * 1024),
                Some(1_000_000_000),
                Some("none".to_string()),
                Some("runc".to_string()),
                Some("1000:1000".to_string()),
            )
        );
        assert_eq!(run_ok(&rt, &id, "id -u").await.trim(), "1000");
        // CapEff is all zeros.
        let caps = run_ok(&rt, &id, "grep CapEff /proc/self/status").await;
        assert!(caps.trim_end().ends_with("0000000000000000"), "{caps}");
        // Only the loopback interface.
        let ifaces = run_ok(&rt, &id, "ls /sys/class/net").await;
        assert_eq!(ifaces.split_whitespace().collect::<Vec<_>>(), ["lo"]);
        // The root filesystem is the image's and writable only where allowed.
        let out = run(&rt, &id, &sh("touch /etc/x")).await;
        assert_ne!(out.exit_code, 0, "a non-root user wrote /etc");
    };
    let result = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(outcome)).await;
    rt.destroy(&id).await.expect("destroy");
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

/// With `readonly_rootfs`, only `/workspace` and the `/tmp` tmpfs are writable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_rootfs() {
    let Some(f) = fixture("docker").await else {
        return;
    };
    let mut opts = f.opts.clone();
    opts.readonly_rootfs = true;
    opts.user = "0:0".into();
    let rt: Arc<dyn Runtime> = Arc::new(DockerRuntime::connect(opts).await.expect("client"));
    let id = random_sandbox_id();
    rt.spawn(&spec(&f, &id)).await.expect("spawn");
    let root_write = run(&rt, &id, &sh("touch /etc/x")).await;
    let ws = run(&rt, &id, &sh("touch /workspace/x && touch /tmp/x")).await;
    rt.destroy(&id).await.expect("destroy");
    assert_ne!(root_write.exit_code, 0, "root wrote a read-only rootfs");
    assert_eq!(ws.exit_code, 0, "{:?}", String::from_utf8_lossy(&ws.stderr));
}

/// A missing image (pulling off) and an unregistered OCI runtime are clear
/// errors that leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_image_and_missing_runtime() {
    let Some(f) = fixture("docker").await else {
        return;
    };
    let rt: Arc<dyn Runtime> = f.runtime.clone();
    let id = random_sandbox_id();
    let mut bad = spec(&f, &id);
    bad.image = "stacyvm-test/no-such-image:404".into();
    let err = rt.spawn(&bad).await.expect_err("missing image");
    assert_eq!(err.code(), "BAD_REQUEST", "{err}");
    assert!(err.to_string().contains("not on this host"), "{err}");
    assert_eq!(code(&rt.status(&id).await), "NOT_FOUND");

    let mut opts = f.opts.clone();
    opts.name = "kata".into();
    opts.oci_runtime = "stacyvm-no-such-oci-runtime".into();
    let missing = DockerRuntime::connect(opts).await.expect("client");
    let health = missing.health().await.expect_err("unregistered runtime");
    assert_eq!(health.code(), "UNAVAILABLE");
    assert!(health.to_string().contains("not registered"), "{health}");
    let err = missing
        .spawn(&spec(&f, &id))
        .await
        .expect_err("spawn on a missing runtime");
    assert!(
        matches!(err.code(), "BAD_REQUEST" | "INTERNAL_ERROR"),
        "{err}"
    );
    assert_eq!(code(&missing.status(&id).await), "NOT_FOUND");
    assert!(f.leftovers().await.is_empty(), "{:?}", f.leftovers().await);
}

/// `docker import` of a rootfs tarball through the runtime, then a spawn of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_rootfs_then_spawn() {
    let Some(f) = fixture("docker").await else {
        return;
    };
    let Ok(rootfs) = std::env::var("STACYVM_TEST_ROOTFS") else {
        skip_unless_ci("docker import", "STACYVM_TEST_ROOTFS is not set");
        return;
    };
    let out = std::process::Command::new("tar")
        .args(["-C", &rootfs, "-c", "."])
        .output()
        .expect("tar");
    assert!(out.status.success());
    let tag = format!("stacyvm-test/imported:{}", &random_sandbox_id()[3..11]);
    f.runtime
        .import_rootfs(out.stdout.into(), &tag)
        .await
        .expect("import");
    let rt: Arc<dyn Runtime> = f.runtime.clone();
    let id = random_sandbox_id();
    let mut s = spec(&f, &id);
    s.image = tag.clone();
    rt.spawn(&s).await.expect("spawn imported image");
    let hello = run_ok(&rt, &id, "echo imported").await;
    rt.destroy(&id).await.expect("destroy");
    let _ = f
        .runtime
        .client()
        .remove_image(
            &tag,
            None::<bollard::query_parameters::RemoveImageOptions>,
            None,
        )
        .await;
    assert_eq!(hello, "imported\n");
}

/// A dockerd this test starts and stops itself (its own socket, data and
/// exec roots; no bridge, no iptables), so it can be stopped mid-spawn
/// without touching the daemon the other cases share.
struct PrivateDockerd {
    run: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl PrivateDockerd {
    fn socket(&self) -> String {
        format!("unix://{}/docker.sock", self.run.path().display())
    }

    fn start(&mut self) {
        let p = self.run.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p.join("dockerd.log"))
            .expect("dockerd log");
        let child = std::process::Command::new(dockerd_bin())
            .args(["--host", &self.socket()])
            .arg("--data-root")
            .arg(p.join("data"))
            .arg("--exec-root")
            .arg(p.join("exec"))
            .arg("--pidfile")
            .arg(p.join("dockerd.pid"))
            .args(["--bridge=none", "--iptables=false", "--ip-masq=false"])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        self.child = Some(child);
    }

    /// Sends `sig` (SIGTERM: `systemctl stop docker`; SIGKILL: a crash)
    /// and waits for it to exit.
    fn stop_with(&mut self, sig: i32) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                stacyvm_runtimes::sys::kill(pid, sig);
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// After a SIGKILL, dockerd's containerd dies too but may stay a zombie
    /// when nothing reaps orphans (PID 1 in a container often does not), and
    /// a restarted dockerd takes its live-looking PID for a running
    /// containerd and waits for it forever. Wait for it to die, then drop
    /// its pid file. (A host's init reaps at once; this is the test box.)
    async fn forget_dead_containerd(&self) {
        let pidfile = self.run.path().join("exec/containerd/containerd.pid");
        let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        else {
            return;
        };
        let dead = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| {
                    s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
                .unwrap_or(true)
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !dead() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(dead(), "containerd {pid} outlived its killed dockerd");
        let _ = std::fs::remove_file(pidfile);
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.run.path().join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        self.stop_with(libc::SIGTERM);
    }
}

fn dockerd_bin() -> String {
    ["/usr/sbin/dockerd", "/usr/bin/dockerd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("dockerd")
        .to_string()
}

async fn answers(rt: &DockerRuntime, within: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if rt.health().await.is_ok() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    false
}

/// dockerd killed in the middle of a spawn: the spawn ends (no hang) with
/// a clear error or, if it won the race, a sandbox; while the daemon is
/// down every call answers `UNAVAILABLE` (never `NOT_FOUND`, which a worker
/// would take for "gone"); once it is back, a destroy leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_stopped_mid_spawn() {
    let name = "docker (dockerd stopped mid-spawn)";
    let Ok(rootfs) = std::env::var("STACYVM_TEST_ROOTFS") else {
        skip_unless_ci(name, "STACYVM_TEST_ROOTFS is not set");
        return;
    };
    // SAFETY-free check for root: only root may start a dockerd.
    let is_root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    });
    if !is_root || !Path::new(&dockerd_bin()).exists() {
        skip_unless_ci(name, "needs root and a dockerd binary");
        return;
    }
    let mut d = PrivateDockerd {
        run: tempfile::Builder::new()
            .prefix("stacyvm-dockerd-")
            .tempdir_in("/tmp")
            .expect("run dir"),
        child: None,
    };
    d.start();
    let state = tempfile::tempdir().expect("state dir");
    let mut opts = options("docker", state.path());
    opts.socket = d.socket();
    let sock = d.run.path().join("docker.sock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !sock.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let rt = Arc::new(DockerRuntime::connect(opts.clone()).await.expect("client"));
    assert!(
        answers(&rt, std::time::Duration::from_secs(60)).await,
        "private dockerd did not start:\n{}",
        d.log_tail()
    );
    let tar = std::process::Command::new("tar")
        .args(["-C", &rootfs, "-c", "."])
        .output()
        .expect("tar");
    assert!(tar.status.success());
    let image = "stacyvm-test/stopped-daemon:1";
    rt.import_rootfs(tar.stdout.into(), image)
        .await
        .expect("import");

    let id = random_sandbox_id();
    let spec = SpawnSpec {
        sandbox_id: id.clone(),
        image: image.to_string(),
        memory_mb: 128,
        vcpus: 1,
        ..SpawnSpec::default()
    };
    let spawning = {
        let rt = rt.clone();
        tokio::spawn(async move { rt.spawn(&spec).await })
    };
    // Killed, not stopped politely: a SIGTERMed dockerd finishes the API
    // calls in flight, so the spawn would always win the race.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    d.stop_with(libc::SIGKILL);
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(120), spawning)
        .await
        .expect("the spawn must end, not hang, when dockerd stops")
        .expect("join");
    eprintln!("spawn with dockerd killed 20 ms in: {outcome:?}");
    if let Err(e) = &outcome {
        assert!(
            matches!(e.code(), "UNAVAILABLE" | "INTERNAL_ERROR"),
            "a stopped daemon is a clear error, got {}: {e}",
            e.code()
        );
    }
    let rt_dyn: Arc<dyn Runtime> = rt.clone();
    let down = rt_dyn.status(&id).await.expect_err("dockerd is down");
    assert_eq!(down.code(), "UNAVAILABLE", "{down}");
    assert_eq!(
        rt_dyn.health().await.expect_err("down").code(),
        "UNAVAILABLE"
    );

    // Back up: whatever the spawn left is found and removed by a destroy.
    d.forget_dead_containerd().await;
    d.start();
    assert!(
        answers(&rt, std::time::Duration::from_secs(60)).await,
        "private dockerd did not restart:\n{}",
        d.log_tail()
    );
    match rt_dyn.destroy(&id).await {
        Ok(()) => {}
        Err(e) => assert_eq!(e.code(), "NOT_FOUND", "destroy after restart: {e}"),
    }
    let f = DockerFixture {
        dir: state,
        opts,
        runtime: rt.clone(),
        image: image.to_string(),
    };
    let left = f.leftovers().await;
    assert!(
        left.is_empty(),
        "left behind: {left:?} (spawn outcome {outcome:?})"
    );
    d.stop_with(libc::SIGTERM);
}
