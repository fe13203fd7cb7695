//! The PRoot runtime with a real `proot` and a busybox-static rootfs: the
//! contract suite, plus the jail itself (the rootfs is the image's, host files
//! are out of sight, file operations stay in `/workspace`).
//!
//! Needs `proot` on `PATH` and `STACYVM_TEST_ROOTFS` (a rootfs directory with
//! `/bin/sh`); `scripts/test.sh` provides both. Without them the cases print
//! `SKIP`, except under `CI=true`, where they fail.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use stacyvm_runtimes::mock::{MockOptions, MockRuntime};
use stacyvm_runtimes::proot::ProotOptions;
use stacyvm_runtimes::testing::cases::{code, run, run_ok, write};
use stacyvm_runtimes::testing::{Fixture, random_sandbox_id, skip_unless_ci};
use stacyvm_runtimes::{Runtime, SpawnSpec};

const IMAGE: &str = "busybox";

struct ProotFixture {
    dir: tempfile::TempDir,
    proot: ProotOptions,
    runtime: Arc<MockRuntime>,
}

fn make(dir: &std::path::Path, proot: &ProotOptions) -> MockRuntime {
    MockRuntime::proot(dir, MockOptions::default(), proot.clone()).expect("proot runtime")
}

async fn fixture() -> Option<ProotFixture> {
    let Some(rootfs) = std::env::var_os("STACYVM_TEST_ROOTFS").filter(|v| !v.is_empty()) else {
        skip_unless_ci("proot", "STACYVM_TEST_ROOTFS is not set");
        return None;
    };
    let proot = ProotOptions {
        binary: PathBuf::new(),
        images: BTreeMap::from([(IMAGE.to_string(), PathBuf::from(rootfs))]),
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = make(dir.path(), &proot);
    if let Err(e) = runtime.health().await {
        skip_unless_ci("proot", &e.to_string());
        return None;
    }
    Some(ProotFixture {
        dir,
        proot,
        runtime: Arc::new(runtime),
    })
}

/// Host processes whose command line names `needle`.
fn processes_naming(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(c) = std::fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&c).contains(needle)
        {
            out.push(format!(
                "pid {pid}: {}",
                String::from_utf8_lossy(&c).replace('\0', " ")
            ));
        }
    }
    out
}

#[async_trait]
impl Fixture for ProotFixture {
    fn runtime(&self) -> Arc<dyn Runtime> {
        self.runtime.clone()
    }

    fn image(&self) -> String {
        IMAGE.into()
    }

    async fn kill_main(&self, sandbox_id: &str) {
        let meta =
            std::fs::read(self.dir.path().join(sandbox_id).join("meta.json")).expect("meta.json");
        let meta: serde_json::Value = serde_json::from_slice(&meta).expect("meta");
        let pid = meta["keeper_pid"].as_u64().expect("keeper_pid");
        let ok = std::process::Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{pid}")])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    async fn reopen(&self) -> Arc<dyn Runtime> {
        Arc::new(make(self.dir.path(), &self.proot))
    }

    /// Sandbox directories and any process (proot, keeper, command) that
    /// still names this fixture's state directory.
    async fn leftovers(&self) -> Vec<String> {
        let mut left = processes_naming(&self.dir.path().display().to_string());
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

async fn proot_fixture() -> Option<Box<dyn Fixture>> {
    fixture().await.map(|f| Box::new(f) as Box<dyn Fixture>)
}

stacyvm_runtimes::runtime_contract_suite!(proot_fixture);

/// Commands see the image's rootfs, not the host's; files stay in /workspace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jail_shows_the_image_not_the_host() {
    let Some(f) = fixture().await else {
        return;
    };
    let rt: Arc<dyn Runtime> = f.runtime.clone();
    let id = random_sandbox_id();
    let spec = SpawnSpec {
        sandbox_id: id.clone(),
        image: IMAGE.into(),
        ..SpawnSpec::default()
    };
    rt.spawn(&spec).await.expect("spawn");
    let passwd = run_ok(&rt, &id, "cat /etc/passwd").await;
    // The host's /etc/debian_version is not in the busybox rootfs.
    let host_file = run(
        &rt,
        &id,
        &stacyvm_runtimes::testing::cases::sh("test -e /etc/debian_version"),
    )
    .await;
    let pwd = run_ok(&rt, &id, "pwd").await;
    write(&rt, &id, "/workspace/in.txt", b"x").await;
    let outside = rt.stat(&id, "/etc/passwd").await;
    let outside_write = rt
        .write_file(
            &id,
            "/etc/stacyvm",
            0,
            stacyvm_runtimes::testing::cases::body(b"x"),
        )
        .await;
    rt.destroy(&id).await.expect("destroy");
    assert!(passwd.contains("sandbox:x:1000"), "{passwd}");
    assert_ne!(host_file.exit_code, 0, "the host's files are visible");
    assert_eq!(pwd.trim_end(), "/workspace");
    assert_eq!(code(&outside), "INVALID_PATH");
    assert_eq!(code(&outside_write), "INVALID_PATH");
}

/// An image with no configured rootfs is a bad request that leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_image_refused() {
    let Some(f) = fixture().await else {
        return;
    };
    let id = random_sandbox_id();
    let err = f
        .runtime
        .spawn(&SpawnSpec {
            sandbox_id: id.clone(),
            image: "alpine".into(),
            ..SpawnSpec::default()
        })
        .await
        .expect_err("unknown image");
    assert_eq!(err.code(), "BAD_REQUEST", "{err}");
    assert!(
        err.to_string().contains("not configured for proot"),
        "{err}"
    );
    assert!(f.leftovers().await.is_empty());
}
