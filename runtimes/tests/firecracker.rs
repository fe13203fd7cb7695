//! Firecracker: the real binary's API lifecycle (machine config, boot source,
//! drives, vsock, start, pause, stop), the platform gate on guest boot, and
//! the full runtime contract through the guest-agent protocol against an
//! in-process agent (no VM boots on PVM hosts; see the module docs).
//!
//! The real-binary cases need `STACYVM_FIRECRACKER_BIN`
//! (`scripts/fetch-firecracker.sh`); without it they print `SKIP`, except
//! under `CI=true`, where they fail.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use stacyvm_runtimes::firecracker::{
    FirecrackerImage, FirecrackerRuntime, FirecrackerVmm, InProcessGuest, MachineConfig, Vmm,
    agent, guest_boot_gate,
};
use stacyvm_runtimes::testing::{Fixture, random_sandbox_id, skip_unless_ci};
use stacyvm_runtimes::{Runtime, SpawnSpec};

struct GuestFixture {
    dir: tempfile::TempDir,
    launcher: Arc<InProcessGuest>,
    runtime: Arc<FirecrackerRuntime>,
}

#[async_trait]
impl Fixture for GuestFixture {
    fn runtime(&self) -> Arc<dyn Runtime> {
        self.runtime.clone()
    }

    fn image(&self) -> String {
        "guest:test".into()
    }

    /// The guest's keeper stands for the VM: killing it is the VM dying.
    async fn kill_main(&self, sandbox_id: &str) {
        let dir = self.dir.path().join(sandbox_id);
        let pid = self
            .launcher
            .keeper_pid(&dir, sandbox_id)
            .expect("guest keeper");
        let ok = std::process::Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{pid}")])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    async fn reopen(&self) -> Arc<dyn Runtime> {
        Arc::new(FirecrackerRuntime::new(self.dir.path(), self.launcher.clone()).expect("reopen"))
    }

    async fn leftovers(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path())
            .map(|d| {
                d.flatten()
                    .map(|e| format!("directory {}", e.path().display()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

async fn guest_fixture() -> Box<dyn Fixture> {
    let dir = tempfile::tempdir().expect("temp dir");
    let launcher = Arc::new(InProcessGuest::default());
    let runtime = Arc::new(FirecrackerRuntime::new(dir.path(), launcher.clone()).expect("runtime"));
    Box::new(GuestFixture {
        dir,
        launcher,
        runtime,
    })
}

/// The contract, with every exec and file operation crossing the vsock
/// handshake and the agent's framing.
mod agent_protocol {
    use super::*;
    stacyvm_runtimes::runtime_contract_suite!(guest_fixture);
}

fn firecracker_bin() -> Option<PathBuf> {
    match std::env::var_os("STACYVM_FIRECRACKER_BIN").filter(|v| !v.is_empty()) {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            skip_unless_ci("firecracker", "STACYVM_FIRECRACKER_BIN is not set");
            None
        }
    }
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !matches!(
            s.rsplit_once(") ").and_then(|(_, r)| r.chars().next()),
            None | Some('Z' | 'X')
        )
    })
}

/// The real VMM: configure every device through the API, read the
/// configuration back, and see the API refuse what a not-started VM cannot
/// do; a kernel that is not an ELF image is refused at start with
/// Firecracker's own message; stopping leaves no process and no socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vmm_api_lifecycle() {
    let Some(bin) = firecracker_bin() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let id = random_sandbox_id();
    let vmm = Vmm::launch(&bin, dir.path(), &id).await.expect("launch");
    let pid = vmm.pid();
    assert!(pid_alive(pid));
    let info = vmm.get("/").await.expect("instance info");
    assert_eq!(info["id"], id.as_str());
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["vmm_version"], "1.12.1");

    let kernel = dir.path().join("vmlinux");
    let rootfs = dir.path().join("rootfs.ext4");
    std::fs::write(&kernel, vec![0u8; 4096]).expect("kernel");
    std::fs::write(&rootfs, vec![0u8; 1 << 20]).expect("rootfs");
    let cfg = MachineConfig {
        vcpus: 2,
        memory_mib: 128,
        kernel,
        boot_args: "console=ttyS0".into(),
        rootfs,
        rootfs_read_only: true,
        guest_cid: 3,
    };
    vmm.configure(&cfg).await.expect("configure");
    let machine = vmm.get("/machine-config").await.expect("machine config");
    assert_eq!(
        (&machine["vcpu_count"], &machine["mem_size_mib"]),
        (&serde_json::json!(2), &serde_json::json!(128))
    );
    let cfg_all = vmm.get("/vm/config").await.expect("vm config");
    assert_eq!(cfg_all["drives"][0]["drive_id"], "rootfs");
    assert_eq!(cfg_all["drives"][0]["is_read_only"], true);
    assert_eq!(cfg_all["vsock"]["guest_cid"], 3);

    // Bad input is the API's clear error, not a crash.
    let bad = vmm
        .send(
            "PUT",
            "/machine-config",
            serde_json::json!({"vcpu_count": 0, "mem_size_mib": 128}),
        )
        .await
        .expect_err("zero vCPUs");
    assert_eq!(bad.code(), "BAD_REQUEST", "{bad}");
    let paused = vmm.pause().await.expect_err("pause before start");
    assert!(paused.to_string().contains("before starting"), "{paused}");
    let start = vmm
        .start()
        .await
        .expect_err("a zero-filled kernel cannot boot");
    assert!(start.to_string().contains("Invalid Elf magic"), "{start}");
    assert_eq!(vmm.get("/").await.expect("info")["state"], "Not started");
    assert!(pid_alive(pid), "a failed start does not kill the VMM");

    vmm.stop().await;
    assert!(!pid_alive(pid), "VMM still running after stop");
    assert!(!dir.path().join("api.sock").exists());
}

/// The real launcher's health tells exactly why guests cannot boot here,
/// and a spawn through it fails cleanly: no directory, no VMM left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_launcher_gate_and_clean_failure() {
    let Some(bin) = firecracker_bin() else {
        return;
    };
    let images = tempfile::tempdir().expect("images");
    let kernel = images.path().join("vmlinux");
    let rootfs = images.path().join("rootfs.ext4");
    std::fs::write(&kernel, vec![0u8; 4096]).expect("kernel");
    std::fs::write(&rootfs, vec![0u8; 1 << 20]).expect("rootfs");
    let launcher = FirecrackerVmm {
        binary: bin,
        images: BTreeMap::from([("tiny".to_string(), FirecrackerImage { kernel, rootfs })]),
    };
    let state = tempfile::tempdir().expect("state");
    let rt = FirecrackerRuntime::new(state.path(), Arc::new(launcher)).expect("runtime");
    match (guest_boot_gate(), rt.health().await) {
        (Some(why), Err(e)) => {
            assert_eq!(e.code(), "UNAVAILABLE");
            assert_eq!(e.to_string(), format!("runtime unavailable: {why}"));
            eprintln!("guest boot on this host: {why}");
        }
        (None, Ok(())) => eprintln!("guest boot on this host: available"),
        other => panic!("gate and health disagree: {other:?}"),
    }

    let id = random_sandbox_id();
    let err = rt
        .spawn(&SpawnSpec {
            sandbox_id: id.clone(),
            image: "tiny".into(),
            memory_mb: 128,
            vcpus: 1,
            ..SpawnSpec::default()
        })
        .await
        .expect_err("a zero-filled kernel cannot boot");
    assert_eq!(err.code(), "BAD_REQUEST", "{err}");
    let unknown = rt
        .spawn(&SpawnSpec {
            sandbox_id: random_sandbox_id(),
            image: "nope".into(),
            ..SpawnSpec::default()
        })
        .await
        .expect_err("unknown image");
    assert!(unknown.to_string().contains("not configured"), "{unknown}");
    let left: Vec<_> = std::fs::read_dir(state.path())
        .expect("state dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // No VMM of this sandbox survives the failed spawn.
    let survivors: Vec<u32> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .filter(|pid: &u32| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == id.as_bytes()))
        })
        .collect();
    assert!(survivors.is_empty(), "{survivors:?}");
}

/// Frames and requests the agent must refuse without panicking.
#[tokio::test]
async fn agent_refuses_bad_frames_and_requests() {
    // A frame longer than the bound.
    let mut bytes: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0];
    let err = agent::read_frame(&mut bytes).await.expect_err("too long");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    // A zero-length frame has no kind byte.
    let mut zero: &[u8] = &[0, 0, 0, 0];
    assert!(agent::read_frame(&mut zero).await.is_err());
    // Truncated payloads are errors; an empty stream is a clean end.
    let mut short: &[u8] = &[0, 0, 0, 9, 0, b'{'];
    assert!(agent::read_frame(&mut short).await.is_err());
    let mut empty: &[u8] = &[];
    assert!(agent::read_frame(&mut empty).await.expect("eof").is_none());

    // Unknown fields and unknown ops are refused by the request decoder.
    for bad in [
        r#"{"op":"ping","extra":1}"#,
        r#"{"op":"format_disk"}"#,
        r#"{"op":"stat"}"#,
    ] {
        assert!(
            serde_json::from_str::<agent::Request>(bad).is_err(),
            "{bad}"
        );
    }

    // Through a live agent: a malformed request gets an error reply.
    let state = tempfile::tempdir().expect("state");
    let rt: Arc<dyn Runtime> = Arc::new(
        stacyvm_runtimes::mock::MockRuntime::with_event_log(state.path(), None).expect("mock"),
    );
    let (host, guest) = tokio::io::duplex(4096);
    let served = tokio::spawn(agent::serve(guest, rt, "sb-none"));
    let (mut r, mut w) = tokio::io::split(host);
    agent::write_frame(&mut w, agent::JSON, br#"{"op":"nonsense"}"#)
        .await
        .expect("write");
    let (kind, body) = agent::read_frame(&mut r)
        .await
        .expect("read")
        .expect("a reply");
    assert_eq!(kind, agent::JSON);
    let reply: agent::Reply = serde_json::from_slice(&body).expect("reply json");
    assert!(
        matches!(&reply, agent::Reply::Error(e) if e.code() == "BAD_REQUEST"),
        "{reply:?}"
    );
    served.await.expect("join").expect("serve");
}
