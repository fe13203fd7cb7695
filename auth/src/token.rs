//! Signed worker tokens: `stacyvm-worker-v1.<b64url(claims)>.<b64url(HMAC-SHA256)>`.
//!
//! Owns minting and verification, with every rule of the earlier format made
//! strict (the reference's loopholes closed): `aud`, `iat`, `jti` and `exp`
//! are required; the lifetime `exp − iat` is at most [`MAX_LIFETIME_S`];
//! `iat` and `nbf` may be at most [`SKEW_S`] in the future; `exp` must be in
//! the future; the subject must be the expected worker; scopes must be known
//! worker scopes, and an empty list grants nothing. Every refusal names its
//! rule ([`TokenError::reason`]) and never contains the token.
//!
//! Does not own: where keys come from, revocation storage (the caller passes
//! a predicate), or HTTP.

use std::collections::BTreeSet;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Every signed token starts with this.
pub const PREFIX: &str = "stacyvm-worker-v1";
/// Longest lifetime a token may claim.
pub const MAX_LIFETIME_S: i64 = 15 * 60;
/// Clock skew allowed on `iat` and `nbf`.
pub const SKEW_S: i64 = 30;
/// Largest token accepted (anything longer is refused before decoding).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Worker → control plane routes.
pub const AUD_CONTROL_PLANE: &str = "worker:control-plane";
/// Control plane → worker RPC.
pub const AUD_RPC: &str = "worker:rpc";

/// The worker scopes; nothing else is ever granted by a worker token.
pub const SCOPES: [&str; 8] = [
    "worker:heartbeat",
    "worker:spawn",
    "worker:destroy",
    "worker:status",
    "worker:exec",
    "worker:files",
    "worker:logs",
    "worker:lease",
];

/// The claims of a token, in the earlier format's key order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    pub worker_id: String,
    pub jti: String,
    pub aud: String,
    pub scopes: Vec<String>,
    pub iat: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    pub exp: i64,
}

/// Why a token was refused. Each variant is one rule; [`TokenError::reason`]
/// is its stable code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is not a stacyvm-worker-v1 token: {0}")]
    Malformed(&'static str),
    #[error("token signature does not verify under any configured key")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token lifetime is longer than 15 minutes")]
    LifetimeTooLong,
    #[error("token is for audience {got:?}, not {want:?}")]
    WrongAudience { got: String, want: String },
    #[error("token is for another worker")]
    WrongWorker,
    #[error("token has been revoked")]
    Revoked,
    #[error("token names an unknown scope {0:?}")]
    UnknownScope(String),
    #[error("token lacks scope {0}")]
    MissingScope(String),
    #[error("no signing key is configured")]
    NoKey,
}

impl TokenError {
    /// Stable reason code naming the rule.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) => "token_malformed",
            TokenError::BadSignature => "token_bad_signature",
            TokenError::Expired => "token_expired",
            TokenError::NotYetValid => "token_not_yet_valid",
            TokenError::LifetimeTooLong => "token_lifetime_too_long",
            TokenError::WrongAudience { .. } => "token_wrong_audience",
            TokenError::WrongWorker => "token_wrong_worker",
            TokenError::Revoked => "token_revoked",
            TokenError::UnknownScope(_) => "token_unknown_scope",
            TokenError::MissingScope(_) => "token_missing_scope",
            TokenError::NoKey => "token_no_key",
        }
    }

    /// 403 for a valid token used where it does not belong; 401 otherwise.
    pub fn is_forbidden(&self) -> bool {
        matches!(
            self,
            TokenError::WrongAudience { .. }
                | TokenError::WrongWorker
                | TokenError::MissingScope(_)
        )
    }
}

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8], signed: &str) -> Result<HmacSha256, TokenError> {
    if key.is_empty() {
        return Err(TokenError::NoKey);
    }
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(key).map_err(|_| TokenError::NoKey)?;
    m.update(signed.as_bytes());
    Ok(m)
}

/// A fresh token ID: 16 random bytes as hex.
pub fn new_jti() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Checks claims for minting: the same rules verification applies (minus time).
pub fn check_claims(c: &Claims) -> Result<(), TokenError> {
    if c.worker_id.is_empty() || c.worker_id.len() > 128 {
        return Err(TokenError::Malformed(
            "worker_id must be 1 to 128 characters",
        ));
    }
    if c.jti.is_empty() || c.jti.len() > 128 {
        return Err(TokenError::Malformed("jti must be 1 to 128 characters"));
    }
    if c.aud != AUD_CONTROL_PLANE && c.aud != AUD_RPC {
        return Err(TokenError::WrongAudience {
            got: c.aud.clone(),
            want: format!("{AUD_CONTROL_PLANE} or {AUD_RPC}"),
        });
    }
    if let Some(s) = c.scopes.iter().find(|s| !SCOPES.contains(&s.as_str())) {
        return Err(TokenError::UnknownScope(s.chars().take(64).collect()));
    }
    if c.exp <= c.iat {
        return Err(TokenError::Expired);
    }
    if c.exp - c.iat > MAX_LIFETIME_S {
        return Err(TokenError::LifetimeTooLong);
    }
    Ok(())
}

/// Signs `claims` with `key`.
pub fn mint(key: &[u8], claims: &Claims) -> Result<String, TokenError> {
    check_claims(claims)?;
    let payload =
        serde_json::to_vec(claims).map_err(|_| TokenError::Malformed("claims do not serialise"))?;
    let signed = format!("{PREFIX}.{}", B64.encode(payload));
    let sig = mac(key, &signed)?.finalize().into_bytes();
    Ok(format!("{signed}.{}", B64.encode(sig)))
}

/// Splits and decodes a token without checking its signature (`inspect`).
pub fn decode_unverified(token: &str) -> Result<Claims, TokenError> {
    parts(token).map(|(_, claims, _)| claims)
}

fn parts(token: &str) -> Result<(&str, Claims, Vec<u8>), TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed("longer than 8 KiB"));
    }
    let mut it = token.split('.');
    let (Some(prefix), Some(payload), Some(sig), None) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return Err(TokenError::Malformed("expected three dot-separated parts"));
    };
    if prefix != PREFIX {
        return Err(TokenError::Malformed("wrong prefix"));
    }
    let raw = B64
        .decode(payload)
        .map_err(|_| TokenError::Malformed("claims are not base64url"))?;
    let sig = B64
        .decode(sig)
        .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
    let claims: Claims = serde_json::from_slice(&raw)
        .map_err(|_| TokenError::Malformed("claims are not the expected JSON"))?;
    let signed_len = PREFIX.len() + 1 + payload.len();
    Ok((&token[..signed_len], claims, sig))
}

/// What a verifier expects of a token.
#[derive(Clone, Debug)]
pub struct Expect<'a> {
    pub audience: &'a str,
    /// The worker the request claims to be (`X-Worker-ID`), or the worker
    /// verifying an RPC token meant for itself.
    pub worker_id: &'a str,
    /// Unix seconds.
    pub now: i64,
    /// A scope the call needs, if any.
    pub scope: Option<&'a str>,
}

/// Verifies `token` under any of `keys` (the active key first, then the
/// rotation keys). `revoked` says whether a `jti` is revoked.
pub fn verify(
    token: &str,
    keys: &[&[u8]],
    expect: &Expect<'_>,
    revoked: &dyn Fn(&str) -> bool,
) -> Result<Claims, TokenError> {
    let (signed, claims, sig) = parts(token)?;
    let keys: Vec<&[u8]> = keys.iter().copied().filter(|k| !k.is_empty()).collect();
    if keys.is_empty() {
        return Err(TokenError::NoKey);
    }
    // Constant-time comparison (`verify_slice`) under each key.
    let signed_ok = keys
        .iter()
        .any(|k| mac(k, signed).is_ok_and(|m| m.verify_slice(&sig).is_ok()));
    if !signed_ok {
        return Err(TokenError::BadSignature);
    }
    check_claims(&claims)?;
    if claims.aud != expect.audience {
        return Err(TokenError::WrongAudience {
            got: claims.aud.clone(),
            want: expect.audience.to_string(),
        });
    }
    if expect.now >= claims.exp {
        return Err(TokenError::Expired);
    }
    if claims.iat > expect.now + SKEW_S || claims.nbf.is_some_and(|n| n > expect.now + SKEW_S) {
        return Err(TokenError::NotYetValid);
    }
    if !crate::ct_eq(claims.worker_id.as_bytes(), expect.worker_id.as_bytes()) {
        return Err(TokenError::WrongWorker);
    }
    if revoked(&claims.jti) {
        return Err(TokenError::Revoked);
    }
    if let Some(scope) = expect.scope
        && !claims.scopes.iter().any(|s| s == scope)
    {
        return Err(TokenError::MissingScope(scope.to_string()));
    }
    Ok(claims)
}

/// Builds claims for a worker: `ttl_s` from `now`, random `jti`.
pub fn claims_for(
    worker_id: &str,
    audience: &str,
    scopes: &[&str],
    now: i64,
    ttl_s: i64,
) -> Claims {
    Claims {
        worker_id: worker_id.to_string(),
        jti: new_jti(),
        aud: audience.to_string(),
        scopes: scopes
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        iat: now,
        nbf: None,
        exp: now + ttl_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const OLD: &[u8] = b"old-key-old-key-old-key-old-key!";
    const NOW: i64 = 1_800_000_000;

    fn base() -> Claims {
        Claims {
            worker_id: "w1".into(),
            jti: "j1".into(),
            aud: AUD_CONTROL_PLANE.into(),
            scopes: vec!["worker:heartbeat".into(), "worker:lease".into()],
            iat: NOW,
            nbf: None,
            exp: NOW + 300,
        }
    }

    fn expect() -> Expect<'static> {
        Expect {
            audience: AUD_CONTROL_PLANE,
            worker_id: "w1",
            now: NOW + 1,
            scope: Some("worker:heartbeat"),
        }
    }

    fn no_revocations(_: &str) -> bool {
        false
    }

    /// Mints bypassing `check_claims`, to build tokens a correct issuer never would.
    fn forge(key: &[u8], claims: &serde_json::Value) -> String {
        let signed = format!(
            "{PREFIX}.{}",
            B64.encode(serde_json::to_vec(claims).expect("json"))
        );
        let sig = mac(key, &signed).expect("mac").finalize().into_bytes();
        format!("{signed}.{}", B64.encode(sig))
    }

    #[test]
    fn round_trip_and_rotation() {
        let t = mint(KEY, &base()).expect("mint");
        assert!(t.starts_with("stacyvm-worker-v1."));
        assert_eq!(verify(&t, &[KEY], &expect(), &no_revocations), Ok(base()));
        let old = mint(OLD, &base()).expect("mint old");
        assert_eq!(
            verify(&old, &[KEY, OLD], &expect(), &no_revocations).map(|c| c.jti),
            Ok("j1".into())
        );
        assert_eq!(
            verify(&old, &[KEY], &expect(), &no_revocations),
            Err(TokenError::BadSignature)
        );
        assert_eq!(decode_unverified(&old), Ok(base()));
    }

    #[test]
    fn every_rule_is_enforced() {
        let j = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = serde_json::to_value(base()).expect("json");
            f(&mut v);
            forge(KEY, &v)
        };
        let cases: Vec<(&str, String, Expect<'static>, &str)> = vec![
            (
                "expired",
                j(&|v| v["exp"] = (NOW - 1).into()),
                expect(),
                "token_expired",
            ),
            (
                "exp equals now",
                j(&|v| v["exp"] = (NOW + 1).into()),
                expect(),
                "token_expired",
            ),
            (
                "iat in the future",
                j(&|v| {
                    v["iat"] = (NOW + 60).into();
                    v["exp"] = (NOW + 120).into();
                }),
                expect(),
                "token_not_yet_valid",
            ),
            (
                "iat within skew",
                j(&|v| {
                    v["iat"] = (NOW + 20).into();
                    v["exp"] = (NOW + 120).into();
                }),
                expect(),
                "ok",
            ),
            (
                "nbf in the future",
                j(&|v| v["nbf"] = (NOW + 120).into()),
                expect(),
                "token_not_yet_valid",
            ),
            (
                "over-long lifetime",
                j(&|v| v["exp"] = (NOW + 901).into()),
                expect(),
                "token_lifetime_too_long",
            ),
            (
                "no aud",
                j(&|v| {
                    v.as_object_mut().expect("obj").remove("aud");
                }),
                expect(),
                "token_malformed",
            ),
            (
                "no iat",
                j(&|v| {
                    v.as_object_mut().expect("obj").remove("iat");
                }),
                expect(),
                "token_malformed",
            ),
            (
                "no jti",
                j(&|v| {
                    v.as_object_mut().expect("obj").remove("jti");
                }),
                expect(),
                "token_malformed",
            ),
            (
                "empty jti",
                j(&|v| v["jti"] = "".into()),
                expect(),
                "token_malformed",
            ),
            (
                "rpc audience on a control-plane route",
                j(&|v| v["aud"] = AUD_RPC.into()),
                expect(),
                "token_wrong_audience",
            ),
            (
                "unknown audience",
                j(&|v| v["aud"] = "admin".into()),
                expect(),
                "token_wrong_audience",
            ),
            (
                "other worker",
                j(&|v| v["worker_id"] = "w2".into()),
                expect(),
                "token_wrong_worker",
            ),
            (
                "unknown scope",
                j(&|v| v["scopes"] = serde_json::json!(["worker:heartbeat", "admin:*"])),
                expect(),
                "token_unknown_scope",
            ),
            (
                "empty scopes grant nothing",
                j(&|v| v["scopes"] = serde_json::json!([])),
                expect(),
                "token_missing_scope",
            ),
            (
                "missing the needed scope",
                j(&|v| v["scopes"] = serde_json::json!(["worker:heartbeat"])),
                Expect {
                    scope: Some("worker:lease"),
                    ..expect()
                },
                "token_missing_scope",
            ),
            (
                "string exp",
                j(&|v| v["exp"] = "soon".into()),
                expect(),
                "token_malformed",
            ),
            (
                "extra claim",
                j(&|v| v["sub"] = "w1".into()),
                expect(),
                "token_malformed",
            ),
        ];
        for (name, token, exp, want) in cases {
            let got = verify(&token, &[KEY], &exp, &no_revocations);
            let reason = got.as_ref().map(|_| "ok").unwrap_or_else(|e| e.reason());
            assert_eq!(reason, want, "{name}: {got:?}");
            if let Err(e) = got {
                assert!(
                    !e.to_string().contains(&token),
                    "{name}: error echoes the token"
                );
            }
        }
    }

    #[test]
    fn malformed_inputs() {
        let good = mint(KEY, &base()).expect("mint");
        let (p, rest) = good.split_once('.').expect("dot");
        let (claims, sig) = rest.split_once('.').expect("dot");
        let cases = [
            "".to_string(),
            "stacyvm-worker-v1".to_string(),
            format!("stacyvm-worker-v2.{claims}.{sig}"),
            format!("{p}.{claims}"),
            format!("{p}.{claims}.{sig}.extra"),
            format!("{p}.!!!.{sig}"),
            format!("{p}.{claims}.%%%"),
            format!("{p}.{}.{sig}", B64.encode("not json")),
            format!("{p}.{claims}.{}", B64.encode("short")),
            "x".repeat(MAX_TOKEN_LEN + 1),
        ];
        for t in cases {
            let e = verify(&t, &[KEY], &expect(), &no_revocations).expect_err("refused");
            assert!(
                matches!(e, TokenError::Malformed(_) | TokenError::BadSignature),
                "{e:?}"
            );
        }
        // A flipped signature bit.
        let mut bad = good.clone().into_bytes();
        let last = bad.len() - 2;
        bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
        let bad = String::from_utf8(bad).expect("utf8");
        assert_eq!(
            verify(&bad, &[KEY], &expect(), &no_revocations),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verify(&good, &[], &expect(), &no_revocations),
            Err(TokenError::NoKey)
        );
    }

    #[test]
    fn revocation() {
        let t = mint(KEY, &base()).expect("mint");
        assert_eq!(
            verify(&t, &[KEY], &expect(), &|j| j == "j1"),
            Err(TokenError::Revoked)
        );
        assert!(verify(&t, &[KEY], &expect(), &|j| j == "other").is_ok());
    }

    #[test]
    fn minting_refuses_bad_claims() {
        let mut c = base();
        c.exp = c.iat + 901;
        assert_eq!(mint(KEY, &c), Err(TokenError::LifetimeTooLong));
        let mut c = base();
        c.scopes.push("worker:everything".into());
        assert!(matches!(mint(KEY, &c), Err(TokenError::UnknownScope(_))));
        assert_eq!(mint(b"", &base()), Err(TokenError::NoKey));
        let c = claims_for("w9", AUD_RPC, &["worker:exec", "worker:exec"], NOW, 60);
        assert_eq!(c.scopes, ["worker:exec"]);
        assert_eq!(c.jti.len(), 32);
    }
}
