//! StacyVM identity: who a caller is, decided without I/O.
//!
//! Owns: signed worker tokens ([`token`]), the worker credential rules
//! ([`WorkerAuth`]: shared staging token, per-worker tokens that shut the
//! shared token out for their ID, signed tokens with rotation keys), per-worker
//! RPC keys derived from the signing key ([`WorkerAuth::rpc_key`]) so no
//! worker ever holds a key that mints tokens another worker accepts, user and
//! admin API keys ([`ApiKeys`]), constant-time comparison ([`ct_eq`]) and
//! secret hashing for stored credentials ([`hash_secret`]).
//!
//! Does not own: HTTP (the node maps [`AuthError`] to 401/403 once), where
//! secrets come from (config, files), or revocation storage (callers pass a
//! predicate backed by the replicated store).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

pub mod token;

pub use token::{AUD_CONTROL_PLANE, AUD_RPC, Claims, Expect, SCOPES, TokenError};

/// Constant-time equality of two byte strings (length is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// SHA-256 of a secret, hex: what the store keeps of enrollment secrets and
/// issued credentials.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A secret value: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(v: impl Into<String>) -> Self {
        Secret(v.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Why a caller was refused. [`AuthError::reason`] is a stable code naming
/// the rule; messages never contain a credential.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no credential presented")]
    Missing,
    #[error("invalid credential")]
    Invalid,
    #[error("worker authentication is not configured")]
    NotConfigured,
    #[error("the shared worker token cannot be used for worker {0:?}: it has its own token")]
    SharedTokenShutOut(String),
    #[error("worker credentials are not accepted here")]
    WrongKind,
    #[error("admin API key required")]
    AdminRequired,
    #[error(transparent)]
    Token(#[from] TokenError),
}

impl AuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "credential_missing",
            AuthError::Invalid => "credential_invalid",
            AuthError::NotConfigured => "worker_auth_not_configured",
            AuthError::SharedTokenShutOut(_) => "shared_token_shut_out",
            AuthError::WrongKind => "credential_wrong_kind",
            AuthError::AdminRequired => "admin_required",
            AuthError::Token(t) => t.reason(),
        }
    }

    /// 403 (authenticated but not allowed here) or 401.
    pub fn is_forbidden(&self) -> bool {
        match self {
            AuthError::WrongKind | AuthError::AdminRequired | AuthError::SharedTokenShutOut(_) => {
                true
            }
            AuthError::Token(t) => t.is_forbidden(),
            _ => false,
        }
    }
}

/// How a worker proved who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// The shared staging token: proves nothing about *which* worker.
    Shared,
    /// Its own static token (`auth.worker_tokens.<id>` or enrollment).
    PerWorker,
    /// A signed token.
    Signed { jti: String, exp: i64 },
}

/// An authenticated worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerIdentity {
    pub worker_id: String,
    pub scopes: BTreeSet<String>,
    pub via: Via,
}

impl WorkerIdentity {
    /// Whether the credential is bound to this worker's ID (not the shared token).
    pub fn is_bound(&self) -> bool {
        !matches!(self.via, Via::Shared)
    }
}

fn all_scopes() -> BTreeSet<String> {
    SCOPES.iter().map(|s| s.to_string()).collect()
}

/// Worker credential configuration (`auth.worker_*`).
#[derive(Clone, Debug, Default)]
pub struct WorkerAuth {
    /// `auth.worker_token`: any worker ID without its own token.
    pub shared_token: Option<Secret>,
    /// `auth.worker_tokens.<id>` (plus enrolled workers' tokens, by hash).
    pub worker_tokens: BTreeMap<String, Secret>,
    /// `auth.worker_signing_key`: signs and verifies.
    pub signing_key: Option<Secret>,
    /// `auth.worker_signing_keys`: verify only (rotation window).
    pub verify_keys: Vec<Secret>,
    /// `auth.worker_revoked_token_ids` (the replicated list adds to it).
    pub revoked: BTreeSet<String>,
}

/// Domain separation for derived per-worker RPC keys.
const RPC_KEY_LABEL: &[u8] = b"stacyvm-worker-rpc-key-v1\0";

/// The RPC verification key of `worker_id` under signing key `key`:
/// HMAC-SHA256(key, label ‖ worker_id). Knowing it lets a holder mint RPC
/// tokens only for that same worker, which only that worker accepts.
pub fn derive_rpc_key(key: &[u8], worker_id: &str) -> Vec<u8> {
    let Ok(mut m) = <Hmac<Sha256> as KeyInit>::new_from_slice(key) else {
        return Vec::new();
    };
    m.update(RPC_KEY_LABEL);
    m.update(worker_id.as_bytes());
    m.finalize().into_bytes().to_vec()
}

impl WorkerAuth {
    /// Whether any worker credential is configured.
    pub fn configured(&self) -> bool {
        self.shared_token.is_some() || !self.worker_tokens.is_empty() || self.has_signing()
    }

    fn has_signing(&self) -> bool {
        self.signing_key.as_ref().is_some_and(|k| !k.is_empty())
            || self.verify_keys.iter().any(|k| !k.is_empty())
    }

    /// Verification keys: active first, then rotation keys, de-duplicated.
    pub fn keys(&self) -> Vec<&[u8]> {
        let mut out: Vec<&[u8]> = Vec::new();
        for k in self.signing_key.iter().chain(self.verify_keys.iter()) {
            let b = k.expose().trim().as_bytes();
            if !b.is_empty() && !out.contains(&b) {
                out.push(b);
            }
        }
        out
    }

    /// Authenticates a worker on a control-plane route (`/api/v1/worker/*`).
    /// `revoked` adds the replicated revocation list to the configured one.
    pub fn authenticate(
        &self,
        worker_id: &str,
        token: Option<&str>,
        now: i64,
        scope: &str,
        revoked: &dyn Fn(&str) -> bool,
    ) -> Result<WorkerIdentity, AuthError> {
        self.authenticate_with(worker_id, token, now, scope, revoked, None)
    }

    /// Like [`WorkerAuth::authenticate`], with the hash of the worker's
    /// enrolled credential (replicated store), if it has one. An enrolled
    /// credential is bound like a per-worker token: the shared token no longer
    /// works for that worker.
    pub fn authenticate_with(
        &self,
        worker_id: &str,
        token: Option<&str>,
        now: i64,
        scope: &str,
        revoked: &dyn Fn(&str) -> bool,
        enrolled_hash: Option<&str>,
    ) -> Result<WorkerIdentity, AuthError> {
        if !self.configured() && enrolled_hash.is_none() {
            return Err(AuthError::NotConfigured);
        }
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        if worker_id.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.starts_with(token::PREFIX) {
            let keys = self.keys();
            if keys.is_empty() {
                return Err(AuthError::Token(TokenError::NoKey));
            }
            let is_revoked = |j: &str| self.revoked.contains(j) || revoked(j);
            let expect = Expect {
                audience: AUD_CONTROL_PLANE,
                worker_id,
                now,
                scope: Some(scope),
            };
            let c = token::verify(token, &keys, &expect, &is_revoked)?;
            return Ok(WorkerIdentity {
                worker_id: worker_id.to_string(),
                scopes: c.scopes.into_iter().collect(),
                via: Via::Signed {
                    jti: c.jti,
                    exp: c.exp,
                },
            });
        }
        if let Some(h) = enrolled_hash
            && !self.worker_tokens.contains_key(worker_id)
        {
            if ct_eq(hash_secret(token).as_bytes(), h.as_bytes()) {
                return Ok(WorkerIdentity {
                    worker_id: worker_id.to_string(),
                    scopes: all_scopes(),
                    via: Via::PerWorker,
                });
            }
            if self
                .shared_token
                .as_ref()
                .is_some_and(|s| ct_eq(s.expose().as_bytes(), token.as_bytes()))
            {
                return Err(AuthError::SharedTokenShutOut(worker_id.to_string()));
            }
            return Err(AuthError::Invalid);
        }
        if let Some(own) = self.worker_tokens.get(worker_id) {
            if ct_eq(own.expose().as_bytes(), token.as_bytes()) {
                return Ok(WorkerIdentity {
                    worker_id: worker_id.to_string(),
                    scopes: all_scopes(),
                    via: Via::PerWorker,
                });
            }
            if self
                .shared_token
                .as_ref()
                .is_some_and(|s| ct_eq(s.expose().as_bytes(), token.as_bytes()))
            {
                return Err(AuthError::SharedTokenShutOut(worker_id.to_string()));
            }
            return Err(AuthError::Invalid);
        }
        if let Some(shared) = &self.shared_token
            && ct_eq(shared.expose().as_bytes(), token.as_bytes())
        {
            return Ok(WorkerIdentity {
                worker_id: worker_id.to_string(),
                scopes: all_scopes(),
                via: Via::Shared,
            });
        }
        Err(AuthError::Invalid)
    }

    /// The RPC verification keys of `worker_id` (active key first), to hand to
    /// that worker once it proved its identity with a bound credential.
    pub fn rpc_keys(&self, worker_id: &str) -> Vec<Vec<u8>> {
        self.keys()
            .into_iter()
            .map(|k| derive_rpc_key(k, worker_id))
            .collect()
    }

    /// A token the control plane sends with an RPC to `worker_id`: signed with
    /// that worker's derived key, audience `worker:rpc`, five minutes.
    pub fn mint_rpc(&self, worker_id: &str, now: i64) -> Option<String> {
        let key = self.signing_key.as_ref().filter(|k| !k.is_empty())?;
        let rpc_key = derive_rpc_key(key.expose().trim().as_bytes(), worker_id);
        let claims = token::claims_for(worker_id, AUD_RPC, &SCOPES, now, 300);
        token::mint(&rpc_key, &claims).ok()
    }

    /// Mints a token with the active key (admin issuance, `worker token issue`).
    pub fn issue(&self, claims: &Claims) -> Result<String, TokenError> {
        let key = self
            .signing_key
            .as_ref()
            .filter(|k| !k.is_empty())
            .ok_or(TokenError::NoKey)?;
        token::mint(key.expose().trim().as_bytes(), claims)
    }
}

/// What a worker accepts on its RPC server.
#[derive(Clone, Debug, Default)]
pub struct RpcAuth {
    pub worker_id: String,
    /// Its own static token (per-worker or shared), accepted as is.
    pub static_token: Option<Secret>,
    /// Its derived RPC verification keys (active first).
    pub rpc_keys: Vec<Vec<u8>>,
    pub revoked: BTreeSet<String>,
}

impl RpcAuth {
    pub fn configured(&self) -> bool {
        self.static_token.is_some() || !self.rpc_keys.is_empty()
    }

    /// Checks an RPC from the control plane that needs `scope`.
    pub fn authenticate(
        &self,
        claimed_worker: &str,
        token: Option<&str>,
        now: i64,
        scope: &str,
    ) -> Result<(), AuthError> {
        if !ct_eq(claimed_worker.as_bytes(), self.worker_id.as_bytes()) {
            return Err(AuthError::Token(TokenError::WrongWorker));
        }
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        if token.starts_with(token::PREFIX) {
            let keys: Vec<&[u8]> = self.rpc_keys.iter().map(Vec::as_slice).collect();
            if keys.is_empty() {
                return Err(AuthError::Token(TokenError::NoKey));
            }
            let expect = Expect {
                audience: AUD_RPC,
                worker_id: &self.worker_id,
                now,
                scope: Some(scope),
            };
            token::verify(token, &keys, &expect, &|j| self.revoked.contains(j))?;
            return Ok(());
        }
        match &self.static_token {
            Some(s) if ct_eq(s.expose().as_bytes(), token.as_bytes()) => Ok(()),
            _ => Err(AuthError::Invalid),
        }
    }
}

/// User and admin API keys (`auth.api_key`, `auth.admin_api_key`).
#[derive(Clone, Debug, Default)]
pub struct ApiKeys {
    pub api_key: Option<Secret>,
    pub admin_api_key: Option<Secret>,
}

/// The role an API key grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Anonymous,
    User,
    Admin,
}

impl ApiKeys {
    pub fn enabled(&self) -> bool {
        self.api_key.is_some() || self.admin_api_key.is_some()
    }

    /// The role of a caller presenting `key` (from `X-Admin-API-Key` or
    /// `X-API-Key`). With no keys configured everyone is admin (auth off).
    /// A signed worker token is never an API key.
    pub fn role(&self, key: Option<&str>) -> Result<Role, AuthError> {
        if !self.enabled() {
            return Ok(Role::Admin);
        }
        let key = key.filter(|k| !k.is_empty()).ok_or(AuthError::Missing)?;
        if key.starts_with(token::PREFIX) {
            return Err(AuthError::WrongKind);
        }
        if self
            .admin_api_key
            .as_ref()
            .is_some_and(|a| ct_eq(a.expose().as_bytes(), key.as_bytes()))
        {
            return Ok(Role::Admin);
        }
        if self
            .api_key
            .as_ref()
            .is_some_and(|a| ct_eq(a.expose().as_bytes(), key.as_bytes()))
        {
            return Ok(Role::User);
        }
        Err(AuthError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;
    fn never(_: &str) -> bool {
        false
    }

    fn cfg() -> WorkerAuth {
        WorkerAuth {
            shared_token: Some(Secret::new("shared-staging-token")),
            worker_tokens: [("w-own".to_string(), Secret::new("own-token-of-w-own"))].into(),
            signing_key: Some(Secret::new("active-signing-key-0123456789abcdef")),
            verify_keys: vec![Secret::new("previous-signing-key-0123456789abc")],
            revoked: ["revoked-jti".to_string()].into(),
        }
    }

    #[test]
    fn worker_route_credentials() {
        let c = cfg();
        let hb = "worker:heartbeat";
        // Shared token: any ID without its own token.
        assert_eq!(
            c.authenticate("w-any", Some("shared-staging-token"), NOW, hb, &never)
                .map(|i| i.via),
            Ok(Via::Shared)
        );
        // Per-worker token overrides and shuts the shared token out.
        assert_eq!(
            c.authenticate("w-own", Some("own-token-of-w-own"), NOW, hb, &never)
                .map(|i| i.via),
            Ok(Via::PerWorker)
        );
        assert_eq!(
            c.authenticate("w-own", Some("shared-staging-token"), NOW, hb, &never),
            Err(AuthError::SharedTokenShutOut("w-own".into()))
        );
        // Another worker's own token is not a credential for this one.
        assert_eq!(
            c.authenticate("w-any", Some("own-token-of-w-own"), NOW, hb, &never),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            c.authenticate("w-any", None, NOW, hb, &never),
            Err(AuthError::Missing)
        );
        assert_eq!(
            WorkerAuth::default().authenticate("w", Some("x"), NOW, hb, &never),
            Err(AuthError::NotConfigured)
        );
    }

    #[test]
    fn signed_tokens_on_routes_and_rotation() {
        let c = cfg();
        let claims = token::claims_for("w-1", AUD_CONTROL_PLANE, &["worker:heartbeat"], NOW, 300);
        let t = c.issue(&claims).expect("issue");
        let ok = c
            .authenticate("w-1", Some(&t), NOW + 1, "worker:heartbeat", &never)
            .expect("valid");
        assert!(matches!(ok.via, Via::Signed { .. }));
        // Needs the scope the route guards.
        assert_eq!(
            c.authenticate("w-1", Some(&t), NOW + 1, "worker:lease", &never)
                .map(|_| ())
                .map_err(|e| e.reason()),
            Err("token_missing_scope")
        );
        // Subject must match X-Worker-ID.
        assert_eq!(
            c.authenticate("w-2", Some(&t), NOW + 1, "worker:heartbeat", &never)
                .map_err(|e| e.reason())
                .err(),
            Some("token_wrong_worker")
        );
        // RPC-audience tokens are refused on routes.
        let rpc = c
            .issue(&token::claims_for(
                "w-1",
                AUD_RPC,
                &["worker:heartbeat"],
                NOW,
                300,
            ))
            .expect("issue");
        assert_eq!(
            c.authenticate("w-1", Some(&rpc), NOW + 1, "worker:heartbeat", &never)
                .map_err(|e| e.reason())
                .err(),
            Some("token_wrong_audience")
        );
        // Revoked from config and from the replicated list.
        let mut revoked_claims = claims.clone();
        revoked_claims.jti = "revoked-jti".into();
        let r = c.issue(&revoked_claims).expect("issue");
        assert_eq!(
            c.authenticate("w-1", Some(&r), NOW + 1, "worker:heartbeat", &never)
                .map_err(|e| e.reason())
                .err(),
            Some("token_revoked")
        );
        let jti = claims.jti.clone();
        assert_eq!(
            c.authenticate("w-1", Some(&t), NOW + 1, "worker:heartbeat", &|j| j == jti)
                .map_err(|e| e.reason())
                .err(),
            Some("token_revoked")
        );
        // A token signed by the previous key verifies during rotation.
        let old = token::mint(b"previous-signing-key-0123456789abc", &claims).expect("mint");
        assert!(
            c.authenticate("w-1", Some(&old), NOW + 1, "worker:heartbeat", &never)
                .is_ok()
        );
        let mut no_rotation = cfg();
        no_rotation.verify_keys.clear();
        assert_eq!(
            no_rotation
                .authenticate("w-1", Some(&old), NOW + 1, "worker:heartbeat", &never)
                .map_err(|e| e.reason())
                .err(),
            Some("token_bad_signature")
        );
    }

    #[test]
    fn rpc_tokens_bind_one_worker() {
        let c = cfg();
        let t = c.mint_rpc("w-1", NOW).expect("rpc token");
        let w1 = RpcAuth {
            worker_id: "w-1".into(),
            rpc_keys: c.rpc_keys("w-1"),
            ..Default::default()
        };
        assert_eq!(
            w1.authenticate("w-1", Some(&t), NOW + 1, "worker:exec"),
            Ok(())
        );
        // Worker 2 refuses a token for worker 1, even presented as its own ID.
        let w2 = RpcAuth {
            worker_id: "w-2".into(),
            rpc_keys: c.rpc_keys("w-2"),
            ..Default::default()
        };
        assert!(
            w2.authenticate("w-2", Some(&t), NOW + 1, "worker:exec")
                .is_err()
        );
        assert!(
            w2.authenticate("w-1", Some(&t), NOW + 1, "worker:exec")
                .is_err()
        );
        // Worker 1's key cannot mint anything worker 2 accepts.
        let forged = token::mint(
            &c.rpc_keys("w-1")[0],
            &token::claims_for("w-2", AUD_RPC, &SCOPES, NOW, 60),
        )
        .expect("mint");
        assert_eq!(
            w2.authenticate("w-2", Some(&forged), NOW + 1, "worker:exec")
                .map_err(|e| e.reason()),
            Err("token_bad_signature")
        );
        // Control-plane audience refused on RPC.
        let cp = token::mint(
            &c.rpc_keys("w-1")[0],
            &token::claims_for("w-1", AUD_CONTROL_PLANE, &SCOPES, NOW, 60),
        )
        .expect("mint");
        assert_eq!(
            w1.authenticate("w-1", Some(&cp), NOW + 1, "worker:exec")
                .map_err(|e| e.reason()),
            Err("token_wrong_audience")
        );
        // Revoked IDs refused.
        let jti = token::decode_unverified(&t).expect("claims").jti;
        let w1r = RpcAuth {
            revoked: [jti].into(),
            ..w1.clone()
        };
        assert_eq!(
            w1r.authenticate("w-1", Some(&t), NOW + 1, "worker:exec")
                .map_err(|e| e.reason()),
            Err("token_revoked")
        );
        // Static own token works for RPC too.
        let st = RpcAuth {
            worker_id: "w-1".into(),
            static_token: Some(Secret::new("own")),
            ..Default::default()
        };
        assert_eq!(
            st.authenticate("w-1", Some("own"), NOW, "worker:exec"),
            Ok(())
        );
        assert_eq!(
            st.authenticate("w-1", Some("nope"), NOW, "worker:exec"),
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn enrolled_credentials_are_bound() {
        let c = WorkerAuth {
            shared_token: Some(Secret::new("shared")),
            ..Default::default()
        };
        let h = hash_secret("stacyvm-wcred-v1.abc");
        let ok = c.authenticate_with(
            "w-e",
            Some("stacyvm-wcred-v1.abc"),
            NOW,
            "worker:heartbeat",
            &never,
            Some(&h),
        );
        assert_eq!(ok.map(|i| i.via), Ok(Via::PerWorker));
        assert_eq!(
            c.authenticate_with(
                "w-e",
                Some("shared"),
                NOW,
                "worker:heartbeat",
                &never,
                Some(&h)
            ),
            Err(AuthError::SharedTokenShutOut("w-e".into()))
        );
        assert_eq!(
            c.authenticate_with(
                "w-e",
                Some("stacyvm-wcred-v1.abd"),
                NOW,
                "worker:heartbeat",
                &never,
                Some(&h)
            ),
            Err(AuthError::Invalid)
        );
        // With no configured credential at all, an enrolled one still counts.
        let none = WorkerAuth::default();
        assert!(
            none.authenticate_with(
                "w-e",
                Some("stacyvm-wcred-v1.abc"),
                NOW,
                "worker:heartbeat",
                &never,
                Some(&h)
            )
            .is_ok()
        );
    }

    #[test]
    fn api_keys() {
        let k = ApiKeys {
            api_key: Some(Secret::new("user-key")),
            admin_api_key: Some(Secret::new("admin-key")),
        };
        assert_eq!(k.role(Some("user-key")), Ok(Role::User));
        assert_eq!(k.role(Some("admin-key")), Ok(Role::Admin));
        assert_eq!(k.role(Some("other")), Err(AuthError::Invalid));
        assert_eq!(k.role(None), Err(AuthError::Missing));
        assert_eq!(
            k.role(Some("stacyvm-worker-v1.a.b")),
            Err(AuthError::WrongKind)
        );
        // No admin key: the user key is never promoted.
        let u = ApiKeys {
            api_key: Some(Secret::new("user-key")),
            admin_api_key: None,
        };
        assert_eq!(u.role(Some("user-key")), Ok(Role::User));
        assert_eq!(ApiKeys::default().role(None), Ok(Role::Admin));
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "Secret(***)");
        assert!(ct_eq(b"abc", b"abc") && !ct_eq(b"abc", b"abd") && !ct_eq(b"abc", b"ab"));
    }
}
