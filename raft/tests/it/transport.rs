//! The QUIC RPC transport and the certificates it runs on, over loopback:
//! round trips on one cached connection, every refusal the mutual-TLS policy
//! promises (each with a positive control, so a refusal cannot pass just
//! because nothing works), frame limits, reconnects, and the on-disk CA and
//! node certificates.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use stacyvm_raft::certs::{
    self, CertError, CertPaths, NodeTls, TestCa, node_dns_name, test_cluster_tls, worker_dns_name,
};
use stacyvm_raft::transport::{
    self, ALPN, MAX_FRAME, RpcClient, RpcHandler, RpcServer, TransportError, check_frame_len, codes,
};
use tokio::time::Instant;

const LOOPBACK_ANY: &str = "127.0.0.1:0";
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Refusals must come back quickly; this bounds how long a test waits
/// before declaring the transport hung.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(3);

/// Echoes `echo:<request>` and records every `(from, request)` it was given.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl Recorder {
    fn calls(&self) -> Vec<(u64, Vec<u8>)> {
        self.calls.lock().expect("recorder lock").clone()
    }
}

#[async_trait]
impl RpcHandler for Recorder {
    async fn handle(&self, from: u64, request: Vec<u8>) -> Vec<u8> {
        self.calls
            .lock()
            .expect("recorder lock")
            .push((from, request.clone()));
        let mut response = b"echo:".to_vec();
        response.extend_from_slice(&request);
        response
    }
}

fn echo_of(request: &[u8]) -> Vec<u8> {
    let mut expected = b"echo:".to_vec();
    expected.extend_from_slice(request);
    expected
}

fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn loopback() -> SocketAddr {
    LOOPBACK_ANY.parse().expect("loopback address")
}

async fn start(tls: &NodeTls) -> (RpcServer, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let server = transport::serve(loopback(), tls, recorder.clone())
        .await
        .expect("server starts");
    (server, recorder)
}

/// Cluster with nodes 1, 2 and 3, in that order.
fn cluster() -> (TestCa, NodeTls, NodeTls, NodeTls) {
    install_provider();
    let (ca, mut nodes) = test_cluster_tls(&[1, 2, 3]).expect("test cluster");
    let n3 = nodes.pop().expect("node 3");
    let n2 = nodes.pop().expect("node 2");
    let n1 = nodes.pop().expect("node 1");
    (ca, n1, n2, n3)
}

/// A quinn client configuration built by hand, for peers our own client
/// would never be: no certificate, another ALPN.
fn raw_client_config(
    trusted_ca: &CertificateDer<'static>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[u8],
) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted_ca.clone()).expect("CA into root store");
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots);
    let mut config = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(config).expect("QUIC config");
    quinn::ClientConfig::new(Arc::new(quic))
}

fn request_frame(from: u64, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(8 + body.len()).expect("small frame");
    let mut frame = len.to_be_bytes().to_vec();
    frame.extend_from_slice(&from.to_be_bytes());
    frame.extend_from_slice(body);
    frame
}

/// One hand-made RPC: connect, send `frame`, read the whole response stream
/// (length prefix included). Any failure, including taking longer than
/// [`REFUSAL_TIMEOUT`], comes back as `Err` with a description.
async fn raw_rpc(
    config: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
    frame: &[u8],
) -> Result<Vec<u8>, String> {
    let endpoint = quinn::Endpoint::client(loopback()).map_err(|e| e.to_string())?;
    let exchange = async {
        let conn = endpoint
            .connect_with(config, addr, server_name)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("handshake: {e:?}"))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("open: {e}"))?;
        send.write_all(frame)
            .await
            .map_err(|e| format!("write: {e}"))?;
        send.finish().map_err(|e| format!("finish: {e}"))?;
        recv.read_to_end(MAX_FRAME + 4)
            .await
            .map_err(|e| format!("read: {e:?}"))
    };
    match tokio::time::timeout(REFUSAL_TIMEOUT, exchange).await {
        Ok(result) => result,
        Err(_) => Err("timed out".to_string()),
    }
}

fn assert_refused(result: &Result<Vec<u8>, TransportError>, what: &str) {
    eprintln!("{what}: {result:?}");
    assert!(
        matches!(result, Err(TransportError::Refused(_))),
        "{what}: expected a refusal, got {result:?}"
    );
}

// ------------------------------------------------------------ round trips ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_sequential_and_concurrent_on_one_connection() {
    let (_ca, n1, n2, _n3) = cluster();
    let (server, recorder) = start(&n1).await;
    let addr = server.local_addr();
    let client = RpcClient::new(&n2).expect("client");

    for i in 0..100u32 {
        let request = format!("request {i}").into_bytes();
        let response = client
            .call(1, addr, &request, CALL_TIMEOUT)
            .await
            .expect("sequential call");
        assert_eq!(response, echo_of(&request), "call {i}");
    }
    let calls = recorder.calls();
    assert_eq!(calls.len(), 100);
    for (i, (from, request)) in calls.iter().enumerate() {
        assert_eq!(*from, 2, "the handler must see the caller's node id");
        assert_eq!(request, &format!("request {i}").into_bytes());
    }
    assert_eq!(
        client.connections_established(),
        1,
        "sequential calls must share one cached connection"
    );

    let client = Arc::new(client);
    let tasks: Vec<_> = (0..32u32)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let request = vec![u8::try_from(i).expect("small"); 1000 + i as usize * 37];
                let response = client.call(1, addr, &request, CALL_TIMEOUT).await;
                (request, response)
            })
        })
        .collect();
    for task in tasks {
        let (request, response) = task.await.expect("task");
        assert_eq!(response.expect("concurrent call"), echo_of(&request));
    }
    assert_eq!(recorder.calls().len(), 132);
    assert_eq!(
        client.connections_established(),
        1,
        "concurrent calls must share the cached connection too"
    );
}

#[tokio::test]
async fn empty_and_large_payloads_round_trip() {
    let (_ca, n1, n2, _n3) = cluster();
    let (server, _recorder) = start(&n1).await;
    let client = RpcClient::new(&n2).expect("client");
    for request in [Vec::new(), vec![0xAB; 3 * 1024 * 1024]] {
        let response = client
            .call(1, server.local_addr(), &request, CALL_TIMEOUT)
            .await
            .expect("call");
        assert_eq!(response, echo_of(&request));
    }
}

// --------------------------------------------------------------- refusals ---

#[tokio::test]
async fn hand_made_client_with_certificate_is_served() {
    // Positive control for the raw client used by the refusal tests below:
    // with a node certificate and the right ALPN it gets an answer, so their
    // failures come from what they change, not from the helper.
    let (ca, n1, n2, _n3) = cluster();
    let (server, recorder) = start(&n1).await;
    let config = raw_client_config(
        ca.cert(),
        Some((n2.cert_chain.clone(), n2.key.clone_key())),
        ALPN,
    );
    let response = raw_rpc(
        config,
        server.local_addr(),
        &node_dns_name(1),
        &request_frame(2, b"hi"),
    )
    .await
    .expect("raw rpc");
    assert_eq!(&response[..4], &7u32.to_be_bytes());
    assert_eq!(&response[4..], b"echo:hi");
    assert_eq!(recorder.calls(), vec![(2, b"hi".to_vec())]);
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let (ca, n1, _n2, _n3) = cluster();
    let (server, recorder) = start(&n1).await;
    let config = raw_client_config(ca.cert(), None, ALPN);
    let result = raw_rpc(
        config,
        server.local_addr(),
        &node_dns_name(1),
        &request_frame(2, b"hi"),
    )
    .await;
    eprintln!("no certificate: {result:?}");
    let error = result.expect_err("a client without certificate must be refused");
    // A TLS alert (QUIC crypto error), not some later application error:
    // the handshake itself must fail.
    assert!(error.contains("Code::crypto("), "refused by TLS: {error}");
    assert!(recorder.calls().is_empty(), "the handler must not run");
}

#[tokio::test]
async fn client_certificate_from_foreign_ca_is_refused() {
    let (ca, n1, _n2, _n3) = cluster();
    let (server, recorder) = start(&n1).await;
    let foreign = TestCa::new().expect("foreign CA");
    let mut impostor = foreign.node_tls(2).expect("foreign node 2");
    // The impostor trusts the real cluster CA, so the server's certificate
    // passes on its side and only the server's check can stop it.
    impostor.ca = vec![ca.cert().clone()];
    let client = RpcClient::new(&impostor).expect("client");
    let result = client
        .call(1, server.local_addr(), b"hi", REFUSAL_TIMEOUT)
        .await;
    assert_refused(&result, "foreign client certificate");
    assert!(recorder.calls().is_empty(), "the handler must not run");
}

#[tokio::test]
async fn server_certificate_from_foreign_ca_is_refused() {
    let (_ca, _n1, n2, _n3) = cluster();
    let foreign = TestCa::new().expect("foreign CA");
    let mut impostor = foreign.node_tls(1).expect("foreign node 1");
    // The impostor server trusts our CA, so it would accept node 2; only the
    // client's check of the server certificate can stop the call.
    impostor.ca = n2.ca.clone();
    let (server, recorder) = start(&impostor).await;
    let client = RpcClient::new(&n2).expect("client");
    let result = client
        .call(1, server.local_addr(), b"hi", REFUSAL_TIMEOUT)
        .await;
    assert_refused(&result, "foreign server certificate");
    assert!(recorder.calls().is_empty(), "the handler must not run");
}

#[tokio::test]
async fn sender_id_must_match_client_certificate() {
    let (_ca, n1, _n2, n3) = cluster();
    let (server, recorder) = start(&n1).await;
    let addr = server.local_addr();

    // Node 3's genuine certificate, but the frames claim node 2.
    let mut liar = n3.clone();
    liar.node_id = 2;
    let client = RpcClient::new(&liar).expect("client");
    let result = client.call(1, addr, b"vote for me", REFUSAL_TIMEOUT).await;
    assert_refused(&result, "sender id mismatch");
    assert!(
        format!("{result:?}").contains(&format!("code {}", codes::IDENTITY_MISMATCH)),
        "refused for the identity: {result:?}"
    );
    assert!(
        recorder.calls().is_empty(),
        "the handler must never see a forged sender: {:?}",
        recorder.calls()
    );

    // Control: the same certificate telling the truth is served as node 3.
    let honest = RpcClient::new(&n3).expect("client");
    let response = honest
        .call(1, addr, b"vote for me", CALL_TIMEOUT)
        .await
        .expect("honest node 3");
    assert_eq!(response, echo_of(b"vote for me"));
    assert_eq!(recorder.calls(), vec![(3, b"vote for me".to_vec())]);
}

#[tokio::test]
async fn non_node_certificate_from_cluster_ca_is_refused() {
    let (ca, n1, _n2, _n3) = cluster();
    let (server, recorder) = start(&n1).await;
    // A worker certificate is signed by the right CA but names no node, so
    // it can claim no node ID.
    let (cert, key) = ca.issue(&worker_dns_name("w1")).expect("worker cert");
    let worker = NodeTls {
        ca: vec![ca.cert().clone()],
        cert_chain: vec![cert],
        key,
        node_id: 2,
    };
    let client = RpcClient::new(&worker).expect("client");
    let result = client
        .call(1, server.local_addr(), b"hi", REFUSAL_TIMEOUT)
        .await;
    assert_refused(&result, "worker certificate claiming a node id");
    assert!(recorder.calls().is_empty(), "the handler must not run");
}

#[tokio::test]
async fn wrong_server_at_target_address_is_refused() {
    let (_ca, _n1, n2, n3) = cluster();
    // Node 3 listens where the client believes node 1 is.
    let (server, recorder) = start(&n3).await;
    let addr = server.local_addr();
    let client = RpcClient::new(&n2).expect("client");
    let result = client.call(1, addr, b"hi", REFUSAL_TIMEOUT).await;
    assert_refused(&result, "server name mismatch");
    assert!(
        format!("{result:?}").contains("not valid for name"),
        "refused for the name: {result:?}"
    );
    assert!(recorder.calls().is_empty(), "the handler must not run");

    // Control: addressed as node 3, the same server answers.
    let response = client
        .call(3, addr, b"hi", CALL_TIMEOUT)
        .await
        .expect("call to node 3");
    assert_eq!(response, echo_of(b"hi"));
}

#[tokio::test]
async fn wrong_alpn_is_refused() {
    let (ca, n1, n2, _n3) = cluster();
    let (server, recorder) = start(&n1).await;
    let config = raw_client_config(
        ca.cert(),
        Some((n2.cert_chain.clone(), n2.key.clone_key())),
        b"other",
    );
    let result = raw_rpc(
        config,
        server.local_addr(),
        &node_dns_name(1),
        &request_frame(2, b"hi"),
    )
    .await;
    let error = result.expect_err("a client with another ALPN must be refused");
    eprintln!("wrong ALPN: {error}");
    assert!(
        error.starts_with("handshake"),
        "refused during the handshake: {error}"
    );
    // 0x78 is TLS's no_application_protocol alert.
    assert!(
        error.contains("Code::crypto(78)"),
        "refused for the ALPN: {error}"
    );
    assert!(recorder.calls().is_empty(), "the handler must not run");
}

// ----------------------------------------------------------------- frames ---

#[test]
fn frame_length_check() {
    assert_eq!(check_frame_len(0), Ok(()));
    assert_eq!(check_frame_len(MAX_FRAME), Ok(()));
    assert_eq!(
        check_frame_len(MAX_FRAME + 1),
        Err(TransportError::FrameTooLarge(MAX_FRAME + 1))
    );
}

#[tokio::test]
async fn oversized_request_is_refused_before_sending() {
    let (_ca, n1, n2, _n3) = cluster();
    let (server, recorder) = start(&n1).await;
    let client = RpcClient::new(&n2).expect("client");
    // `vec![0; n]` is backed by untouched zero pages, so this costs no real
    // memory. With the 8-byte sender ID it is just over the limit.
    let request = vec![0u8; MAX_FRAME];
    let result = client
        .call(1, server.local_addr(), &request, REFUSAL_TIMEOUT)
        .await;
    assert_eq!(result, Err(TransportError::FrameTooLarge(MAX_FRAME + 8)));
    assert_eq!(client.connections_established(), 0, "nothing was sent");
    assert!(recorder.calls().is_empty());

    // The largest allowed body still fits.
    let ok = client
        .call(1, server.local_addr(), b"small", CALL_TIMEOUT)
        .await;
    assert_eq!(ok, Ok(echo_of(b"small")));
}

/// Sends a bare length prefix (nothing after it, stream left open) and
/// returns how the server answered the stream.
async fn send_bare_header(len: u32) -> (Result<Vec<u8>, quinn::ReadToEndError>, Arc<Recorder>) {
    let (ca, n1, n2, _n3) = cluster();
    let (server, recorder) = start(&n1).await;
    let config = raw_client_config(
        ca.cert(),
        Some((n2.cert_chain.clone(), n2.key.clone_key())),
        ALPN,
    );
    let endpoint = quinn::Endpoint::client(loopback()).expect("client endpoint");
    let conn = endpoint
        .connect_with(config, server.local_addr(), &node_dns_name(1))
        .expect("connect")
        .await
        .expect("handshake");
    let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
    send.write_all(&len.to_be_bytes())
        .await
        .expect("write header");
    // No body and no finish: a server that believed the length would wait
    // (after allocating it) and this read would time out instead.
    let result = tokio::time::timeout(REFUSAL_TIMEOUT, recv.read_to_end(1024))
        .await
        .expect("the server must answer a bad frame at once, not wait for its body");
    drop(server);
    (result, recorder)
}

#[tokio::test]
async fn server_refuses_oversized_length_without_reading_the_body() {
    let too_big = u32::try_from(MAX_FRAME + 1).expect("fits u32");
    for len in [too_big, u32::MAX] {
        let (result, recorder) = send_bare_header(len).await;
        match result {
            Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
                assert_eq!(code, quinn::VarInt::from_u32(codes::FRAME_TOO_LARGE));
            }
            other => panic!("length {len}: expected a FRAME_TOO_LARGE reset, got {other:?}"),
        }
        assert!(recorder.calls().is_empty());
    }
}

#[tokio::test]
async fn server_refuses_frame_too_short_for_sender_id() {
    let (result, recorder) = send_bare_header(7).await;
    match result {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
            assert_eq!(code, quinn::VarInt::from_u32(codes::BAD_FRAME));
        }
        other => panic!("expected a BAD_FRAME reset, got {other:?}"),
    }
    assert!(recorder.calls().is_empty());
}

// -------------------------------------------------------------- reconnect ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_after_server_restart() {
    let (_ca, n1, n2, _n3) = cluster();
    let (server, _recorder) = start(&n1).await;
    let addr = server.local_addr();
    let client = RpcClient::new(&n2).expect("client");
    assert_eq!(
        client.call(1, addr, b"before", CALL_TIMEOUT).await,
        Ok(echo_of(b"before"))
    );
    server.shutdown().await;

    let down = client
        .call(1, addr, b"while down", Duration::from_millis(300))
        .await;
    assert!(
        down.is_err(),
        "a call to a stopped server must fail: {down:?}"
    );

    // The port can take a moment to be released; keep trying to bind it.
    let recorder = Arc::new(Recorder::default());
    let bind_deadline = Instant::now() + Duration::from_secs(5);
    let server = loop {
        match transport::serve(addr, &n1, recorder.clone()).await {
            Ok(server) => break server,
            Err(e) if Instant::now() < bind_deadline => {
                eprintln!("rebinding {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("could not rebind {addr}: {e}"),
        }
    };

    let deadline = Instant::now() + Duration::from_secs(8);
    let response = loop {
        match client
            .call(1, addr, b"after", Duration::from_millis(500))
            .await
        {
            Ok(response) => break response,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for reconnect: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the client never reconnected: {e}"),
        }
    };
    assert_eq!(response, echo_of(b"after"));
    assert_eq!(recorder.calls(), vec![(2, b"after".to_vec())]);
    assert_eq!(client.connections_established(), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn calls_to_a_dead_peer_respect_their_timeout() {
    let (_ca, _n1, n2, _n3) = cluster();
    // Bind and release a port, so nothing listens there.
    let socket = std::net::UdpSocket::bind(loopback()).expect("bind");
    let addr = socket.local_addr().expect("addr");
    drop(socket);
    let client = RpcClient::new(&n2).expect("client");
    let timeout = Duration::from_millis(200);
    let mut backed_off = 0;
    for attempt in 0..8 {
        let started = Instant::now();
        let result = client.call(1, addr, b"anyone?", timeout).await;
        let elapsed = started.elapsed();
        assert!(result.is_err(), "attempt {attempt}: {result:?}");
        assert!(
            elapsed < timeout + Duration::from_millis(150),
            "attempt {attempt} blocked for {elapsed:?}, longer than its {timeout:?} timeout"
        );
        if matches!(&result, Err(TransportError::Connect(m)) if m.contains("backing off")) {
            backed_off += 1;
        }
    }
    // The backoff grows past the call timeout after a few failures; from
    // then on calls give up at once instead of hammering the dead address.
    assert!(backed_off > 0, "no call was answered by the backoff");
}

// ------------------------------------------------------------ certificates ---

#[test]
fn init_ca_refuses_to_overwrite() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs::init_ca(dir.path()).expect("first init");
    let cert_before = std::fs::read(dir.path().join("ca.pem")).expect("ca.pem");
    let key_before = std::fs::read(dir.path().join("ca-key.pem")).expect("ca-key.pem");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca-key.pem"))
            .expect("key metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the CA key must be private");
    }

    let err = certs::init_ca(dir.path()).expect_err("second init must refuse");
    assert!(matches!(err, CertError::AlreadyExists { .. }), "{err:?}");
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    assert_eq!(
        std::fs::read(dir.path().join("ca.pem")).expect("ca.pem"),
        cert_before
    );
    assert_eq!(
        std::fs::read(dir.path().join("ca-key.pem")).expect("ca-key.pem"),
        key_before
    );
}

#[tokio::test]
async fn issued_node_certificates_load_and_talk() {
    install_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_dir = dir.path().join("ca");
    let node_dir = dir.path().join("nodes");
    certs::init_ca(&ca_dir).expect("init CA");
    certs::issue_node(&ca_dir, 5, &node_dir).expect("issue node 5");
    certs::issue_node(&ca_dir, 6, &node_dir).expect("issue node 6");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(node_dir.join("node-5-key.pem"))
            .expect("key metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "node keys must be private");
    }

    let again = certs::issue_node(&ca_dir, 5, &node_dir).expect_err("no overwrite");
    assert!(
        matches!(again, CertError::AlreadyExists { .. }),
        "{again:?}"
    );

    let n5 = NodeTls::load_paths(&CertPaths::node(&ca_dir, &node_dir, 5), 5).expect("load node 5");
    let n6 = NodeTls::load(
        &ca_dir.join("ca.pem"),
        &node_dir.join("node-6.pem"),
        &node_dir.join("node-6-key.pem"),
        6,
    )
    .expect("load node 6");
    assert_eq!((n5.node_id, n6.node_id), (5, 6));

    // The loaded files are good enough for the transport end to end.
    let (server, recorder) = start(&n5).await;
    let client = RpcClient::new(&n6).expect("client");
    let response = client
        .call(5, server.local_addr(), b"from disk", CALL_TIMEOUT)
        .await
        .expect("call");
    assert_eq!(response, echo_of(b"from disk"));
    assert_eq!(recorder.calls(), vec![(6, b"from disk".to_vec())]);
}

#[test]
fn loading_a_certificate_for_another_node_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs::init_ca(dir.path()).expect("init CA");
    certs::issue_node(dir.path(), 5, dir.path()).expect("issue node 5");
    let paths = CertPaths::node(dir.path(), dir.path(), 5);
    let err = NodeTls::load_paths(&paths, 6).expect_err("node 5's cert is not node 6's");
    match &err {
        CertError::WrongIdentity { path, node_id, .. } => {
            assert_eq!(path, &paths.cert);
            assert_eq!(*node_id, 6);
        }
        other => panic!("expected WrongIdentity, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains("node-5.pem"), "names the file: {message}");
    assert!(message.contains("node 6"), "names the node: {message}");
    assert!(
        !message.contains("PRIVATE KEY"),
        "no key material: {message}"
    );
}

#[test]
fn loading_with_wrong_ca_or_wrong_key_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_a = dir.path().join("a");
    let ca_b = dir.path().join("b");
    certs::init_ca(&ca_a).expect("CA a");
    certs::init_ca(&ca_b).expect("CA b");
    certs::issue_node(&ca_a, 1, &ca_a).expect("node 1 by a");
    certs::issue_node(&ca_a, 2, &ca_a).expect("node 2 by a");

    let err = NodeTls::load(
        &ca_b.join("ca.pem"),
        &ca_a.join("node-1.pem"),
        &ca_a.join("node-1-key.pem"),
        1,
    )
    .expect_err("CA b did not sign node 1");
    assert!(matches!(err, CertError::Untrusted { .. }), "{err:?}");
    assert!(
        err.to_string().contains("b/ca.pem"),
        "names the CA file: {err}"
    );

    let err = NodeTls::load(
        &ca_a.join("ca.pem"),
        &ca_a.join("node-1.pem"),
        &ca_a.join("node-2-key.pem"),
        1,
    )
    .expect_err("node 2's key does not belong to node 1's cert");
    assert!(matches!(err, CertError::KeyMismatch { .. }), "{err:?}");
    assert!(
        err.to_string().contains("node-2-key.pem"),
        "names the key file: {err}"
    );

    let err = NodeTls::load(
        &ca_a.join("missing.pem"),
        &ca_a.join("node-1.pem"),
        &ca_a.join("node-1-key.pem"),
        1,
    )
    .expect_err("missing CA file");
    assert!(
        err.to_string().contains("missing.pem"),
        "names the file: {err}"
    );

    // A CA directory whose key is not the certificate's: issuing must fail
    // instead of writing an unusable node certificate.
    std::fs::copy(ca_b.join("ca-key.pem"), dir.path().join("ca-key.pem")).expect("copy key");
    std::fs::copy(ca_a.join("ca.pem"), dir.path().join("ca.pem")).expect("copy cert");
    let out = dir.path().join("out");
    let err = certs::issue_node(dir.path(), 3, &out).expect_err("mismatched CA pair");
    assert!(matches!(err, CertError::Untrusted { .. }), "{err:?}");
    assert!(!out.join("node-3.pem").exists(), "nothing written");
}
