//! Worker identity end to end: which credential works on which route, signed
//! tokens with audiences, scopes, revocation and rotation, and remote spawn
//! over signed RPC tokens with no shared worker token.

use std::sync::Arc;
use std::time::Duration;

use stacyvm_api::{ExecRequest, SpawnRequest};
use stacyvm_node::config::{AuthSources, FileConfig, SecretSource};
use stacyvm_store::StoreDriver;

use crate::plane::{Plane, W, eventually, fast};

const USER: &str = "user-key-0123456789abcdef0123456789";
const ADMIN: &str = "admin-key-0123456789abcdef012345678";
const SIGNING: &str = "signing-key-0123456789abcdef0123456";
const PREVIOUS: &str = "previous-key-0123456789abcdef012345";

fn auth(yaml: &str) -> Arc<AuthSources> {
    let cfg = FileConfig::parse(yaml, "test").expect("config");
    Arc::new(AuthSources::from_config(&cfg).expect("sources"))
}

struct Call<'a> {
    http: &'a reqwest::Client,
    api: &'a str,
}

impl Call<'_> {
    async fn beat(
        &self,
        worker: &str,
        token: Option<&str>,
        leases: bool,
    ) -> (u16, serde_json::Value) {
        let body = serde_json::json!({
            "rpc_url": "http://127.0.0.1:9",
            "runtimes": ["mock"],
            "leases": if leases { serde_json::json!([{"resource_id": "sb-00000000abcd", "generation": 1}]) } else { serde_json::json!([]) },
        });
        let mut b = self
            .http
            .post(format!(
                "http://{}/api/v1/worker/{worker}/heartbeat",
                self.api
            ))
            .header("x-worker-id", worker)
            .json(&body);
        if let Some(t) = token {
            b = b.header("x-worker-token", t);
        }
        let r = b.send().await.expect("send");
        (r.status().as_u16(), r.json().await.unwrap_or_default())
    }

    async fn issue(
        &self,
        key: &str,
        worker: &str,
        audience: &str,
        scopes: &[&str],
    ) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(format!("http://{}/api/v1/admin/worker-tokens", self.api))
            .header("x-admin-api-key", key)
            .json(&serde_json::json!({"worker_id": worker, "ttl": "10m", "audience": audience, "scopes": scopes}))
            .send()
            .await
            .expect("send");
        (r.status().as_u16(), r.json().await.unwrap_or_default())
    }
}

fn reason(v: &serde_json::Value) -> &str {
    v["reason"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credentials_are_checked_per_route() {
    let yaml = format!(
        "auth:\n  api_key: {USER}\n  admin_api_key: {ADMIN}\n  worker_token: shared-staging-token\n  worker_tokens:\n    w-own: own-token-of-w-own\n  worker_signing_key: {SIGNING}\n  worker_signing_keys: [{PREVIOUS}]\n"
    );
    let plane = Plane::start_with(1, StoreDriver::Sqlite, fast(), auth(&yaml))
        .await
        .expect("plane");
    let http = reqwest::Client::new();
    let api = plane.cps[0].api.clone();
    let c = Call {
        http: &http,
        api: &api,
    };

    // Per-worker token overrides and shuts the shared token out for that ID.
    assert_eq!(
        c.beat("w-own", Some("own-token-of-w-own"), true).await.0,
        200
    );
    let (st, v) = c.beat("w-own", Some("shared-staging-token"), false).await;
    assert_eq!((st, reason(&v)), (403, "shared_token_shut_out"));
    assert!(
        !v.to_string().contains("shared-staging-token"),
        "the token is never echoed"
    );
    // The shared staging token works for other IDs.
    assert_eq!(
        c.beat("w-any", Some("shared-staging-token"), false).await.0,
        200
    );
    // No credential, or a wrong one.
    assert_eq!(
        reason(&c.beat("w-any", None, false).await.1),
        "credential_missing"
    );
    assert_eq!(
        reason(&c.beat("w-any", Some("guess"), false).await.1),
        "credential_invalid"
    );
    // User and admin keys are not worker credentials.
    assert_eq!(c.beat("w-any", Some(USER), false).await.0, 401);
    assert_eq!(c.beat("w-any", Some(ADMIN), false).await.0, 401);

    // Issuance is admin only; the user key is never promoted.
    assert_eq!(
        c.issue(USER, "w-1", "worker:control-plane", &[]).await.0,
        403
    );
    let (st, issued) = c
        .issue(
            ADMIN,
            "w-1",
            "worker:control-plane",
            &["worker:heartbeat", "worker:lease"],
        )
        .await;
    assert_eq!(st, 201, "{issued}");
    let signed = issued["token"].as_str().expect("token").to_string();
    assert!(signed.starts_with("stacyvm-worker-v1."));
    assert_eq!(c.beat("w-1", Some(&signed), true).await.0, 200);
    // Subject must equal X-Worker-ID.
    assert_eq!(
        reason(&c.beat("w-2", Some(&signed), false).await.1),
        "token_wrong_worker"
    );
    // RPC-audience tokens are refused on control-plane routes.
    let (_, rpc) = c
        .issue(ADMIN, "w-1", "worker:rpc", &["worker:heartbeat"])
        .await;
    let (st, v) = c.beat("w-1", rpc["token"].as_str(), false).await;
    assert_eq!((st, reason(&v)), (403, "token_wrong_audience"));
    // worker:lease guards lease renewal.
    let (_, hb_only) = c
        .issue(ADMIN, "w-1", "worker:control-plane", &["worker:heartbeat"])
        .await;
    let hb_only = hb_only["token"].as_str().expect("token");
    assert_eq!(c.beat("w-1", Some(hb_only), false).await.0, 200);
    let (st, v) = c.beat("w-1", Some(hb_only), true).await;
    assert_eq!((st, reason(&v)), (403, "token_missing_scope"));
    // Unknown scopes are refused at issuance.
    assert_eq!(
        c.issue(ADMIN, "w-1", "worker:control-plane", &["worker:everything"])
            .await
            .0,
        400
    );

    // A token signed by the previous key verifies during the rotation window.
    let old = stacyvm_auth::token::mint(
        PREVIOUS.as_bytes(),
        &stacyvm_auth::token::claims_for(
            "w-1",
            "worker:control-plane",
            &["worker:heartbeat"],
            chrono::Utc::now().timestamp(),
            300,
        ),
    )
    .expect("mint");
    assert_eq!(c.beat("w-1", Some(&old), false).await.0, 200);

    // Revocation through the admin API, replicated, honoured at once.
    let r = http
        .post(format!("http://{api}/api/v1/admin/worker-tokens/revoke"))
        .header("x-admin-api-key", ADMIN)
        .json(&serde_json::json!({"token_id": issued["token_id"], "reason": "test"}))
        .send()
        .await
        .expect("revoke");
    assert_eq!(r.status(), 200);
    let (st, v) = c.beat("w-1", Some(&signed), false).await;
    assert_eq!((st, reason(&v)), (401, "token_revoked"));

    // User routes: the user key works, worker credentials do not.
    let ok = http
        .get(format!("http://{api}/api/v1/sandboxes"))
        .header("x-api-key", USER)
        .send()
        .await
        .expect("list");
    assert_eq!(ok.status(), 200);
    let v: serde_json::Value = http
        .get(format!("http://{api}/api/v1/sandboxes"))
        .header("x-worker-token", "own-token-of-w-own")
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(reason(&v), "credential_wrong_kind");
    let none = http
        .get(format!("http://{api}/api/v1/sandboxes"))
        .send()
        .await
        .expect("list");
    assert_eq!(none.status(), 401);
    // Admin routes need the admin key.
    let v: serde_json::Value = http
        .get(format!("http://{api}/api/v1/admin/quotas"))
        .header("x-api-key", USER)
        .send()
        .await
        .expect("quotas")
        .json()
        .await
        .expect("json");
    assert_eq!(reason(&v), "admin_required");
    // Probes stay open.
    assert_eq!(
        http.get(format!("http://{api}/health"))
            .send()
            .await
            .expect("health")
            .status(),
        200
    );
    plane.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remote_spawn_over_signed_rpc_without_a_shared_token() {
    let yaml = format!(
        "auth:\n  api_key: {USER}\n  admin_api_key: {ADMIN}\n  worker_signing_key: {SIGNING}\n"
    );
    let plane = Plane::start_with(1, StoreDriver::Sqlite, fast(), auth(&yaml))
        .await
        .expect("plane");
    let http = reqwest::Client::new();
    let api = plane.cps[0].api.clone();
    let c = Call {
        http: &http,
        api: &api,
    };
    // The worker gets a signed token (as an external issuer would write it to a file).
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("token");
    let (_, issued) = c
        .issue(
            ADMIN,
            "w-signed",
            "worker:control-plane",
            &["worker:heartbeat", "worker:lease"],
        )
        .await;
    std::fs::write(&file, issued["token"].as_str().expect("token")).expect("write");
    let cred = SecretSource::from_parts(None, Some(&file.display().to_string())).expect("source");
    let w = W::start_with_credential("w-signed", plane.apis(), cred).await;
    let client = stacyvm_client::Client::new(
        &format!("http://{api}"),
        Some(USER.into()),
        Duration::from_secs(30),
    )
    .expect("client");
    eventually(Duration::from_secs(5), "worker online", || async {
        client
            .workers()
            .await
            .is_ok_and(|ws| ws.iter().any(|w| w.status == "online"))
    })
    .await;

    let sb = client
        .spawn(&SpawnRequest {
            image: "busybox".into(),
            ..Default::default()
        })
        .await
        .expect("spawn over signed RPC");
    let r = client
        .exec(
            &sb.id,
            &ExecRequest {
                command: "echo signed".into(),
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    assert_eq!(r.stdout, "signed\n");

    // The worker's RPC server refuses calls without a valid RPC credential.
    let call = |token: Option<String>, worker: &'static str| {
        let mut b = http
            .post(format!("{}/rpc/v1/sandboxes/{}/exec", w.rpc_url, sb.id))
            .header("x-worker-id", worker)
            .header("x-stacyvm-generation", sb.generation.to_string())
            .json(&serde_json::json!({"command": "true"}));
        if let Some(t) = token {
            b = b.bearer_auth(t);
        }
        b.send()
    };
    assert_eq!(call(None, "w-signed").await.expect("call").status(), 401);
    let wa = plane.cps[0].control_auth();
    let now = chrono::Utc::now().timestamp();
    assert_eq!(
        call(wa.mint_rpc("w-signed", now), "w-signed")
            .await
            .expect("call")
            .status(),
        200
    );
    // A token for another worker (signed with that worker's derived key, so
    // it does not even verify here), or for the control-plane audience, is refused.
    assert_eq!(
        call(wa.mint_rpc("w-other", now), "w-signed")
            .await
            .expect("call")
            .status(),
        401
    );
    assert_eq!(
        call(wa.mint_rpc("w-signed", now), "w-other")
            .await
            .expect("call")
            .status(),
        403
    );
    let cp_aud = c
        .issue(ADMIN, "w-signed", "worker:control-plane", &["worker:exec"])
        .await
        .1["token"]
        .as_str()
        .map(String::from);
    assert!(matches!(
        call(cp_aud, "w-signed")
            .await
            .expect("call")
            .status()
            .as_u16(),
        401 | 403
    ));
    // A revoked RPC token ID is refused once the worker hears of it.
    let t = wa.mint_rpc("w-signed", now).expect("token");
    let jti = stacyvm_auth::token::decode_unverified(&t)
        .expect("claims")
        .jti;
    http.post(format!("http://{api}/api/v1/admin/worker-tokens/revoke"))
        .header("x-admin-api-key", ADMIN)
        .json(&serde_json::json!({"token_id": jti}))
        .send()
        .await
        .expect("revoke");
    eventually(
        Duration::from_secs(3),
        "revoked RPC token refused",
        || async {
            call(Some(t.clone()), "w-signed")
                .await
                .is_ok_and(|r| r.status() == 401)
        },
    )
    .await;
    client.destroy(&sb.id).await.expect("destroy");
    w.cleanup().await;
    plane.shutdown().await;
}

/// Worker RPC over mutual TLS with certificates from the cluster CA: a real
/// client-authenticated request works; no client certificate, a foreign CA,
/// and another worker's certificate are refused; a worker certificate must
/// name the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_rpc_mutual_tls() {
    use rustls_pki_types::pem::PemObject;
    use stacyvm_raft::certs;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("dir");
    let ca = dir.path().join("ca");
    certs::init_ca(&ca).expect("ca");
    let (w_cert, w_key) = certs::issue_worker(&ca, "w-tls", dir.path()).expect("worker cert");
    let (other_cert, other_key) =
        certs::issue_worker(&ca, "w-other", dir.path()).expect("other worker cert");
    let (c_cert, c_key) = certs::issue_client(&ca, "cp", dir.path()).expect("client cert");
    let foreign = dir.path().join("foreign");
    certs::init_ca(&foreign).expect("foreign ca");
    let (f_cert, f_key) = certs::issue_client(&foreign, "cp", &foreign).expect("foreign client");
    let ca_pem = ca.join("ca.pem");

    // A worker certificate must carry the worker's own ID.
    let wrong = stacyvm_node::rpc_tls::server_config("w-tls", &other_cert, &other_key, &ca_pem)
        .expect_err("wrong identity");
    assert!(wrong.to_string().contains("not for worker"), "{wrong}");

    let tls_client =
        stacyvm_node::rpc_tls::RpcTlsClient::load(&ca_pem, &c_cert, &c_key).expect("client");
    let cfg = stacyvm_node::control::ControlConfig {
        rpc_tls: Some(Arc::new(tls_client)),
        ..fast()
    };
    let plane = Plane::start(1, StoreDriver::Sqlite, cfg)
        .await
        .expect("plane");
    let server = stacyvm_node::rpc_tls::server_config("w-tls", &w_cert, &w_key, &ca_pem)
        .expect("server config");
    let w = W::start_tls("w-tls", plane.apis(), server).await;
    assert!(w.rpc_url.starts_with("https://"));
    let c = plane.client();
    eventually(Duration::from_secs(5), "worker online", || async {
        c.workers()
            .await
            .is_ok_and(|ws| ws.iter().any(|w| w.status == "online"))
    })
    .await;
    // Spawn, exec and a file round trip, all over mutual TLS.
    let sb = c
        .spawn(&SpawnRequest {
            image: "busybox".into(),
            ..Default::default()
        })
        .await
        .expect("spawn over mTLS");
    let r = c
        .exec(
            &sb.id,
            &ExecRequest {
                command: "echo tls".into(),
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    assert_eq!(r.stdout, "tls\n");
    c.upload(
        &sb.id,
        "/workspace/t.bin",
        || reqwest::Body::from(vec![7u8; 4096]),
        None,
    )
    .await
    .expect("upload");

    // Direct calls with other client identities never get past the handshake.
    let addr: std::net::SocketAddr = w
        .rpc_url
        .trim_start_matches("https://")
        .parse()
        .expect("addr");
    let host = certs::worker_dns_name("w-tls");
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_file_iter(&ca_pem).expect("pem") {
            r.add(c.expect("cert")).expect("add");
        }
        r
    };
    let attempt = |client_auth: Option<(std::path::PathBuf, std::path::PathBuf)>| {
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots.clone());
        let cfg = match client_auth {
            Some((cert, key)) => {
                let chain = rustls_pki_types::CertificateDer::pem_file_iter(&cert)
                    .expect("pem")
                    .map(|c| c.expect("cert"))
                    .collect();
                let key = <rustls_pki_types::PrivateKeyDer as rustls_pki_types::pem::PemObject>::from_pem_file(&key).expect("key");
                builder
                    .with_client_auth_cert(chain, key)
                    .expect("client auth")
            }
            None => builder.with_no_client_auth(),
        };
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(cfg)
            .resolve(&host, addr)
            .build()
            .expect("client");
        let url = format!("https://{host}:{}/health", addr.port());
        async move { client.get(url).send().await }
    };
    assert!(
        attempt(Some((c_cert.clone(), c_key.clone())))
            .await
            .is_ok_and(|r| r.status() == 200),
        "control-plane certificate accepted"
    );
    assert!(
        attempt(None).await.is_err(),
        "no client certificate: refused"
    );
    assert!(
        attempt(Some((f_cert, f_key))).await.is_err(),
        "foreign CA: refused"
    );
    assert!(
        attempt(Some((other_cert, other_key))).await.is_err(),
        "another worker's certificate: refused"
    );
    // Plain HTTP to the TLS port does not work either.
    let plain = reqwest::Client::new()
        .get(format!("http://{addr}/health"))
        .send()
        .await;
    assert!(
        !plain.is_ok_and(|r| r.status().is_success()),
        "plain HTTP refused"
    );
    c.destroy(&sb.id).await.expect("destroy");
    w.cleanup().await;
    plane.shutdown().await;
}

/// Enrollment: an admin makes a single-use, short-lived secret for one
/// worker; the worker exchanges it once for its own credential, which then
/// shuts the shared token out for that worker. Reuse, expiry, another
/// worker and unknown secrets are refused with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enrollment_is_single_use_and_binds_the_worker() {
    let yaml = format!(
        "auth:\n  api_key: {USER}\n  admin_api_key: {ADMIN}\n  worker_token: shared-staging-token\n  worker_signing_key: {SIGNING}\n"
    );
    let plane = Plane::start_with(1, StoreDriver::Sqlite, fast(), auth(&yaml))
        .await
        .expect("plane");
    let http = reqwest::Client::new();
    let api = plane.cps[0].api.clone();
    let c = Call {
        http: &http,
        api: &api,
    };
    let enroll_secret = |ttl: &'static str| {
        let http = http.clone();
        let api = api.clone();
        async move {
            let r = http
                .post(format!("http://{api}/api/v1/admin/worker-enrollments"))
                .header("x-admin-api-key", ADMIN)
                .json(&serde_json::json!({"worker_id": "w-e", "ttl": ttl}))
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 201);
            let v: serde_json::Value = r.json().await.expect("json");
            v["enroll_token"].as_str().expect("secret").to_string()
        }
    };
    let exchange = |worker: &'static str, secret: String| {
        let http = http.clone();
        let api = api.clone();
        async move {
            let r = http
                .post(format!("http://{api}/api/v1/worker/{worker}/enroll"))
                .json(&serde_json::json!({"enroll_token": secret}))
                .send()
                .await
                .expect("send");
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    // Only admins make enrollment secrets.
    let no_key = Plane::start_with(
        1,
        StoreDriver::Sqlite,
        fast(),
        auth(&format!("auth:\n  admin_api_key: {ADMIN}\n")),
    )
    .await
    .expect("plane");
    let r = http
        .post(format!(
            "http://{}/api/v1/admin/worker-enrollments",
            no_key.cps[0].api
        ))
        .header("x-admin-api-key", ADMIN)
        .json(&serde_json::json!({"worker_id": "w-e"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 503, "enrollment needs a signing key");
    no_key.shutdown().await;
    let r = http
        .post(format!("http://{api}/api/v1/admin/worker-enrollments"))
        .header("x-api-key", USER)
        .json(&serde_json::json!({"worker_id": "w-e"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 403);

    let secret = enroll_secret("10m").await;
    let (st, v) = exchange("w-other", secret.clone()).await;
    assert_eq!((st, reason(&v)), (403, "enroll_wrong_worker"));
    let (st, v) = exchange("w-e", secret.clone()).await;
    assert_eq!(st, 200, "{v}");
    let credential = v["worker_token"].as_str().expect("credential").to_string();
    let (st, v) = exchange("w-e", secret.clone()).await;
    assert_eq!((st, reason(&v)), (403, "enroll_reused"));
    assert!(
        !v.to_string().contains(&secret),
        "the secret is never echoed"
    );
    let (st, v) = exchange("w-e", "stacyvm-enroll-v1.00".into()).await;
    assert_eq!((st, reason(&v)), (401, "enroll_invalid"));
    let short = enroll_secret("1s").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (st, v) = exchange("w-e", short).await;
    assert_eq!((st, reason(&v)), (403, "enroll_expired"));

    // The credential works for w-e only, and the shared token no longer does.
    let (st, v) = c.beat("w-e", Some(&credential), true).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = c.beat("w-e", Some("shared-staging-token"), false).await;
    assert_eq!((st, reason(&v)), (403, "shared_token_shut_out"));
    assert_eq!(c.beat("w-x", Some(&credential), false).await.0, 401);
    plane.shutdown().await;
}
