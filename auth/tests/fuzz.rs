//! Property tests: the token parser and verifier never panic, and only a
//! token minted under a configured key ever verifies.

use proptest::prelude::*;
use stacyvm_auth::token::{self, AUD_CONTROL_PLANE, Expect};

const KEY: &[u8] = b"fuzz-key-fuzz-key-fuzz-key-fuzz!";

fn expect() -> Expect<'static> {
    Expect {
        audience: AUD_CONTROL_PLANE,
        worker_id: "w1",
        now: 1_800_000_000,
        scope: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_strings_never_panic_or_verify(s in ".{0,300}") {
        let _ = token::decode_unverified(&s);
        prop_assert!(token::verify(&s, &[KEY], &expect(), &|_| false).is_err());
    }

    #[test]
    fn prefixed_garbage_never_panics(a in "[A-Za-z0-9_\\-]{0,200}", b in "[A-Za-z0-9_\\-=+/]{0,100}") {
        let t = format!("stacyvm-worker-v1.{a}.{b}");
        prop_assert!(token::verify(&t, &[KEY], &expect(), &|_| false).is_err());
    }

    #[test]
    fn tampered_tokens_never_verify(worker in "[a-z0-9-]{1,20}", flip in 0usize..400) {
        let c = token::claims_for(&worker, AUD_CONTROL_PLANE, &["worker:heartbeat"], 1_800_000_000, 300);
        let t = token::mint(KEY, &c).expect("mint");
        let mut bytes = t.clone().into_bytes();
        let i = flip % bytes.len();
        bytes[i] = if bytes[i] == b'x' { b'y' } else { b'x' };
        let tampered = String::from_utf8(bytes).expect("ascii");
        let e = Expect { worker_id: &worker, ..expect() };
        if tampered != t {
            prop_assert!(token::verify(&tampered, &[KEY], &e, &|_| false).is_err());
        }
        prop_assert!(token::verify(&t, &[KEY], &e, &|_| false).is_ok());
    }
}
