//! Version-1 command encodings committed under `tests/fixtures/` must keep
//! decoding to the same values, and bad payloads must be refused cleanly.
//! Regenerate (only when adding a new fixture, never to "fix" a failure) with
//! `STACYVM_WRITE_FIXTURES=1 cargo nextest run -p stacyvm-raft codec_fixtures`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use stacyvm_raft::codec::{self, Command, DecodeError};
use stacyvm_store::*;

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/command-v1.bin")
}

/// The value the version-1 fixture encodes: a spread of mutation shapes.
fn v1_command() -> Command {
    let t = Ts(1_700_000_000_000_000);
    Command::Store(vec![
        Mutation::CreateSandbox(Sandbox {
            id: "sb-0123abcd".into(),
            state: SandboxState::Creating,
            runtime: "docker".into(),
            image: "busybox:latest".into(),
            memory_mb: 512,
            vcpus: 1,
            owner_id: "alice".into(),
            tenant_id: "t1".into(),
            worker_id: "w1".into(),
            runtime_id: String::new(),
            metadata: BTreeMap::from([("k".into(), "v".into())]),
            created_at: t,
            updated_at: t,
            expires_at: t.plus_millis(60_000),
        }),
        Mutation::AcquireLease(AcquireLease {
            resource_id: "sb-0123abcd".into(),
            resource_type: "sandbox".into(),
            holder_id: "w1".into(),
            ttl_ms: 30_000,
            now: t,
        }),
        Mutation::SetWorkerStatus {
            id: "w2".into(),
            status: WorkerStatus::Offline,
            at: t,
        },
        Mutation::RevokeToken(RevokedToken {
            jti: "jti-1".into(),
            reason: "rotated".into(),
            revoked_at: t,
            expires_at: t.plus_millis(900_000),
        }),
        Mutation::Atomic(vec![Mutation::DeleteTenant { id: "t9".into() }]),
    ])
}

#[test]
fn version_1_fixture_still_decodes() {
    let path = fixture_path();
    if std::env::var("STACYVM_WRITE_FIXTURES").is_ok_and(|v| v == "1") {
        std::fs::write(&path, codec::encode(&v1_command()).expect("encode"))
            .expect("write fixture");
    }
    let bytes = std::fs::read(&path).expect("fixture present");
    assert_eq!(bytes[0], 1, "fixture is version 1");
    assert_eq!(codec::decode(&bytes).expect("decode fixture"), v1_command());
}

#[test]
fn round_trip_and_refusals() {
    let cmd = v1_command();
    let bytes = codec::encode(&cmd).expect("encode");
    assert_eq!(bytes[0], codec::CURRENT_VERSION);
    assert_eq!(codec::decode(&bytes).expect("round trip"), cmd);
    assert_eq!(codec::decode(&[]), Err(DecodeError::Empty));
    assert_eq!(
        codec::decode(&[9, 0, 0]),
        Err(DecodeError::UnknownVersion(9))
    );
    assert!(matches!(
        codec::decode(&bytes[..bytes.len() / 2]),
        Err(DecodeError::Corrupt { .. })
    ));
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(matches!(
        codec::decode(&trailing),
        Err(DecodeError::Corrupt { .. })
    ));
    // Arbitrary garbage never panics.
    for seed in 0u32..2_000 {
        let junk: Vec<u8> = (0..(seed % 64))
            .map(|i| (seed.wrapping_mul(2_654_435_761).wrapping_add(i * 97) >> 7) as u8)
            .collect();
        let mut payload = vec![1];
        payload.extend(junk);
        let _ = codec::decode(&payload);
    }
}
