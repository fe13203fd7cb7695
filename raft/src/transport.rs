//! Request/response RPC between Raft replicas over QUIC with mutual TLS.
//!
//! Payloads are opaque bytes: the caller encodes openraft messages. This
//! module owns the wire framing, the TLS policy and the connection handling:
//!
//! - Both sides present certificates signed by the cluster CA (see
//!   [`crate::certs`]); the ALPN is [`ALPN`] and anything else is refused.
//! - The client names the server `node-<target_id>.stacyvm.internal`, so
//!   rustls refuses a server holding another node's certificate.
//! - Each RPC is one bidirectional stream. The request frame is a `u32`
//!   big-endian length followed by that many bytes: the sender's node ID
//!   (`u64` big-endian) and then the request body. The server checks the
//!   claimed ID against the client certificate and closes the connection if
//!   they disagree. The response frame is a `u32` big-endian length followed
//!   by the response. Frames above [`MAX_FRAME`] are refused before anything
//!   is allocated for them.
//! - [`RpcClient`] keeps one connection per target, reconnects with
//!   exponential backoff, and bounds every call by its timeout. Keep-alives
//!   and an idle timeout detect dead peers.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt};
use rustls_pki_types::CertificateDer;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::certs::{NodeTls, cert_has_dns_name, node_dns_name};

/// The ALPN protocol both sides must agree on.
pub const ALPN: &[u8] = b"stacyvm-raft/1";
/// The largest frame (request including its 8-byte sender ID, or response)
/// either side accepts.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Bytes of the claimed sender ID at the start of every request frame.
const SENDER_ID_LEN: usize = 8;
/// Keep-alives well inside the idle timeout keep a quiet but healthy
/// connection open, while a dead peer is noticed after the idle timeout.
const KEEP_ALIVE: Duration = Duration::from_secs(1);
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long [`RpcServer::shutdown`] waits for peers to acknowledge the close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// QUIC application error codes this transport sends, so that peers (and
/// tests) can tell why a connection or stream was refused.
pub mod codes {
    /// The server is shutting down.
    pub const SHUTDOWN: u32 = 0;
    /// The peer negotiated a protocol other than [`super::ALPN`].
    pub const BAD_ALPN: u32 = 0x10;
    /// The peer's certificate could not be read or is not a node certificate.
    pub const BAD_PEER_CERT: u32 = 0x11;
    /// The sender ID in a request frame is not the one in the certificate.
    pub const IDENTITY_MISMATCH: u32 = 0x12;
    /// A frame's length is above [`super::MAX_FRAME`].
    pub const FRAME_TOO_LARGE: u32 = 0x20;
    /// A frame is too short to hold the sender ID.
    pub const BAD_FRAME: u32 = 0x21;
}

/// Why an RPC failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("rpc timed out")]
    Timeout,
    #[error("cannot connect: {0}")]
    Connect(String),
    /// TLS or identity failure: wrong CA, wrong node, missing certificate,
    /// wrong protocol. Retrying will not help until the configuration changes.
    #[error("refused: {0}")]
    Refused(String),
    #[error("frame of {0} bytes is larger than the {MAX_FRAME}-byte limit")]
    FrameTooLarge(usize),
    #[error("i/o error: {0}")]
    Io(String),
    #[error("connection closed")]
    Closed,
}

/// Checks a frame length against [`MAX_FRAME`]. Both sides call it on the
/// length prefix before allocating, so a bogus length costs nothing.
pub fn check_frame_len(len: usize) -> Result<(), TransportError> {
    if len > MAX_FRAME {
        Err(TransportError::FrameTooLarge(len))
    } else {
        Ok(())
    }
}

/// Serves RPCs. `from` is the sender's node ID, already checked against its
/// certificate; `request` is the body the sender passed to [`RpcClient::call`].
#[async_trait]
pub trait RpcHandler: Send + Sync {
    async fn handle(&self, from: u64, request: Vec<u8>) -> Vec<u8>;
}

fn install_crypto_provider() {
    // Installing fails only if a provider is already installed, which is
    // just as good; the configurations below also name ring explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport_config() -> Result<Arc<quinn::TransportConfig>, TransportError> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(IDLE_TIMEOUT)
            .map_err(|e| TransportError::Io(format!("idle timeout: {e}")))?,
    ));
    Ok(Arc::new(transport))
}

fn root_store(tls: &NodeTls) -> Result<Arc<rustls::RootCertStore>, TransportError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in &tls.ca {
        roots
            .add(cert.clone())
            .map_err(|e| TransportError::Refused(format!("unusable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(TransportError::Refused(
            "no CA certificate configured".to_string(),
        ));
    }
    Ok(Arc::new(roots))
}

/// The server's QUIC configuration: TLS 1.3, client certificates required and
/// checked against the cluster CA, only [`ALPN`].
fn server_config(tls: &NodeTls) -> Result<quinn::ServerConfig, TransportError> {
    install_crypto_provider();
    let provider = crypto_provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        root_store(tls)?,
        provider.clone(),
    )
    .build()
    .map_err(|e| TransportError::Refused(format!("client verifier: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Refused(format!("TLS 1.3 unavailable: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(tls.cert_chain.clone(), tls.key.clone_key())
        .map_err(|e| TransportError::Refused(format!("node certificate or key unusable: {e}")))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(config)
        .map_err(|e| TransportError::Refused(format!("QUIC TLS configuration: {e}")))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(transport_config()?);
    Ok(server)
}

/// The client's QUIC configuration: TLS 1.3, our node certificate as client
/// certificate, servers checked against the cluster CA, only [`ALPN`].
fn client_config(tls: &NodeTls) -> Result<quinn::ClientConfig, TransportError> {
    install_crypto_provider();
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Refused(format!("TLS 1.3 unavailable: {e}")))?
        .with_root_certificates(root_store(tls)?)
        .with_client_auth_cert(tls.cert_chain.clone(), tls.key.clone_key())
        .map_err(|e| TransportError::Refused(format!("node certificate or key unusable: {e}")))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // Every connection does a full handshake, so both certificates are
    // checked against the current CA each time; replicas reconnect rarely
    // enough that resumption would save nothing worth that.
    config.resumption = rustls::client::Resumption::disabled();
    let quic = QuicClientConfig::try_from(config)
        .map_err(|e| TransportError::Refused(format!("QUIC TLS configuration: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(transport_config()?);
    Ok(client)
}

fn is_crypto_code(code: quinn::TransportErrorCode) -> bool {
    // QUIC carries TLS alerts as transport error codes 0x100..=0x1ff.
    u64::from(code) & !0xff == 0x100
}

fn map_connection_error(e: &ConnectionError) -> TransportError {
    match e {
        ConnectionError::TransportError(te) if is_crypto_code(te.code) => {
            TransportError::Refused(format!("TLS handshake failed: {te}"))
        }
        ConnectionError::ConnectionClosed(close) if is_crypto_code(close.error_code) => {
            TransportError::Refused(format!("peer rejected the TLS handshake: {close}"))
        }
        ConnectionError::ApplicationClosed(close)
            if close.error_code != VarInt::from_u32(codes::SHUTDOWN) =>
        {
            TransportError::Refused(format!(
                "peer closed the connection with code {}: {close}",
                close.error_code
            ))
        }
        ConnectionError::ApplicationClosed(_)
        | ConnectionError::Reset
        | ConnectionError::LocallyClosed => TransportError::Closed,
        ConnectionError::TimedOut => {
            TransportError::Io("peer stopped responding (idle timeout)".to_string())
        }
        ConnectionError::TransportError(_)
        | ConnectionError::ConnectionClosed(_)
        | ConnectionError::VersionMismatch
        | ConnectionError::CidsExhausted => TransportError::Io(e.to_string()),
    }
}

fn map_write_error(e: &quinn::WriteError) -> TransportError {
    match e {
        quinn::WriteError::ConnectionLost(ce) => map_connection_error(ce),
        quinn::WriteError::Stopped(code) => stream_refusal("stopped", *code),
        quinn::WriteError::ClosedStream => TransportError::Closed,
        quinn::WriteError::ZeroRttRejected => TransportError::Io(e.to_string()),
    }
}

fn map_read_error(e: &quinn::ReadExactError) -> TransportError {
    match e {
        quinn::ReadExactError::FinishedEarly(_) => {
            TransportError::Io("peer ended the stream in the middle of a frame".to_string())
        }
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(ce)) => {
            map_connection_error(ce)
        }
        quinn::ReadExactError::ReadError(quinn::ReadError::Reset(code)) => {
            stream_refusal("reset", *code)
        }
        quinn::ReadExactError::ReadError(quinn::ReadError::ClosedStream) => TransportError::Closed,
        quinn::ReadExactError::ReadError(other) => TransportError::Io(other.to_string()),
    }
}

fn stream_refusal(what: &str, code: VarInt) -> TransportError {
    let why = if code == VarInt::from_u32(codes::FRAME_TOO_LARGE) {
        "frame too large"
    } else if code == VarInt::from_u32(codes::BAD_FRAME) {
        "malformed frame"
    } else {
        "refused"
    };
    TransportError::Refused(format!("peer {what} the stream with code {code} ({why})"))
}

// ---------------------------------------------------------------- server ---

/// A running RPC server. Dropping it (or [`RpcServer::shutdown`]) closes every
/// connection and stops accepting new ones.
pub struct RpcServer {
    endpoint: Endpoint,
    local_addr: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for RpcServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcServer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl RpcServer {
    /// The address the server is bound to (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Closes every connection, stops accepting, and waits (at most a couple
    /// of seconds) for peers to learn of the close. The UDP port is released
    /// once quinn's background driver notices; rebinding it immediately in
    /// the same process may need a short retry.
    pub async fn shutdown(mut self) {
        self.endpoint
            .close(VarInt::from_u32(codes::SHUTDOWN), b"server shutting down");
        self.accept_task.abort();
        // Awaiting the aborted task makes sure it, and the connection and
        // stream tasks it owns, have let go of their endpoint handles.
        let _ = (&mut self.accept_task).await;
        // Waiting for the closes to be acknowledged lets clients see a clean
        // close instead of waiting out their idle timeout; the bound keeps an
        // unreachable peer from holding up shutdown.
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.endpoint.wait_idle()).await;
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.endpoint
            .close(VarInt::from_u32(codes::SHUTDOWN), b"server shutting down");
        // Aborting the accept task drops the connection and stream tasks it
        // owns (through their `JoinSet`s), so no handler call outlives the
        // server.
        self.accept_task.abort();
    }
}

/// Starts serving RPCs on `bind` with `tls`'s identity; every accepted
/// request goes to `handler`. Must be called within a tokio runtime.
pub async fn serve(
    bind: SocketAddr,
    tls: &NodeTls,
    handler: Arc<dyn RpcHandler>,
) -> Result<RpcServer, TransportError> {
    let config = server_config(tls)?;
    let endpoint = Endpoint::server(config, bind)
        .map_err(|e| TransportError::Io(format!("cannot bind {bind}: {e}")))?;
    let local_addr = endpoint
        .local_addr()
        .map_err(|e| TransportError::Io(format!("local address of {bind}: {e}")))?;
    let accept_task = tokio::spawn(accept_loop(endpoint.clone(), handler));
    Ok(RpcServer {
        endpoint,
        local_addr,
        accept_task,
    })
}

async fn accept_loop(endpoint: Endpoint, handler: Arc<dyn RpcHandler>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    connections.spawn(serve_connection(incoming, handler.clone()));
                }
                None => break,
            },
            // Reaping finished connection tasks keeps the set from growing
            // with every connection ever accepted.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(incoming: quinn::Incoming, handler: Arc<dyn RpcHandler>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "raft transport: handshake failed");
            return;
        }
    };
    // rustls already refuses other protocols; checking again costs nothing
    // and keeps this invariant local to this file.
    let alpn_ok = conn
        .handshake_data()
        .and_then(|data| data.downcast::<HandshakeData>().ok())
        .and_then(|data| data.protocol)
        .is_some_and(|protocol| protocol == ALPN);
    if !alpn_ok {
        conn.close(VarInt::from_u32(codes::BAD_ALPN), b"unsupported protocol");
        return;
    }
    let leaf = conn
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.into_iter().next());
    let Some(leaf) = leaf else {
        conn.close(
            VarInt::from_u32(codes::BAD_PEER_CERT),
            b"no client certificate",
        );
        return;
    };
    let leaf = Arc::new(leaf);
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(
                        conn.clone(),
                        leaf.clone(),
                        send,
                        recv,
                        handler.clone(),
                    ));
                }
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "raft transport: connection ended");
                    break;
                }
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
}

async fn serve_stream(
    conn: Connection,
    leaf: Arc<CertificateDer<'static>>,
    mut send: SendStream,
    mut recv: RecvStream,
    handler: Arc<dyn RpcHandler>,
) {
    let mut header = [0u8; 4];
    if recv.read_exact(&mut header).await.is_err() {
        return;
    }
    let len = u32::from_be_bytes(header) as usize;
    let refusal = if check_frame_len(len).is_err() {
        Some(codes::FRAME_TOO_LARGE)
    } else if len < SENDER_ID_LEN {
        Some(codes::BAD_FRAME)
    } else {
        None
    };
    if let Some(code) = refusal {
        tracing::warn!(remote = %conn.remote_address(), len, "raft transport: refusing request frame");
        let _ = recv.stop(VarInt::from_u32(code));
        let _ = send.reset(VarInt::from_u32(code));
        return;
    }

    let mut sender = [0u8; SENDER_ID_LEN];
    if recv.read_exact(&mut sender).await.is_err() {
        return;
    }
    let from = u64::from_be_bytes(sender);
    // The identity is checked before the body is read, so a peer claiming
    // to be someone else cannot even make us buffer its request.
    if !cert_has_dns_name(&leaf, &node_dns_name(from)) {
        tracing::warn!(
            remote = %conn.remote_address(),
            claimed = from,
            "raft transport: sender ID does not match the peer certificate; closing the connection"
        );
        conn.close(
            VarInt::from_u32(codes::IDENTITY_MISMATCH),
            b"sender id does not match certificate",
        );
        return;
    }

    let mut body = vec![0u8; len - SENDER_ID_LEN];
    if recv.read_exact(&mut body).await.is_err() {
        return;
    }
    let response = handler.handle(from, body).await;
    let Ok(response_len) = u32::try_from(response.len()) else {
        tracing::error!(
            len = response.len(),
            "raft transport: response does not fit a frame"
        );
        let _ = send.reset(VarInt::from_u32(codes::FRAME_TOO_LARGE));
        return;
    };
    if check_frame_len(response.len()).is_err() {
        tracing::error!(
            len = response.len(),
            "raft transport: response larger than MAX_FRAME"
        );
        let _ = send.reset(VarInt::from_u32(codes::FRAME_TOO_LARGE));
        return;
    }
    if send.write_all(&response_len.to_be_bytes()).await.is_err()
        || send.write_all(&response).await.is_err()
    {
        return;
    }
    let _ = send.finish();
}

// ---------------------------------------------------------------- client ---

/// Connection state for one target node. Its mutex is held while connecting,
/// so concurrent calls to a target share one connection attempt.
#[derive(Default)]
struct Peer {
    addr: Option<SocketAddr>,
    conn: Option<Connection>,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<TransportError>,
}

impl Peer {
    fn note_failure(&mut self, error: &TransportError) {
        self.failures = self.failures.saturating_add(1);
        let shift = self.failures.saturating_sub(1).min(16);
        let delay = BACKOFF_START.saturating_mul(1u32 << shift).min(BACKOFF_MAX);
        self.retry_at = Some(Instant::now() + delay);
        self.last_error = Some(error.clone());
    }
}

/// Calls other replicas. One cached connection per target node; one stream
/// per call. Cheap to share behind an `Arc`.
pub struct RpcClient {
    node_id: u64,
    config: quinn::ClientConfig,
    /// Endpoints by local bind address, created on first use so that
    /// [`RpcClient::new`] needs no runtime.
    endpoints: Mutex<HashMap<SocketAddr, Endpoint>>,
    /// The loopback IP calls to loopback targets leave from (default
    /// 127.0.0.1); see [`RpcClient::with_source_ip`].
    loopback_source: Ipv4Addr,
    peers: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<Peer>>>>,
    connections_established: AtomicU64,
}

impl fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcClient")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl RpcClient {
    /// A client that identifies as `tls.node_id` with `tls`'s certificate.
    pub fn new(tls: &NodeTls) -> Result<Self, TransportError> {
        Ok(RpcClient {
            node_id: tls.node_id,
            config: client_config(tls)?,
            endpoints: Mutex::new(HashMap::new()),
            loopback_source: Ipv4Addr::LOCALHOST,
            peers: Mutex::new(HashMap::new()),
            connections_established: AtomicU64::new(0),
        })
    }

    /// How many connections this client has established so far. A steady
    /// value under load shows connections are being reused; a climbing one
    /// shows peers dropping and reconnecting.
    pub fn connections_established(&self) -> u64 {
        self.connections_established.load(Ordering::Relaxed)
    }

    /// Sends `request` to node `target_id` at `target_addr` and returns its
    /// response. The whole call, including connecting and any backoff wait,
    /// is bounded by `timeout`.
    pub async fn call(
        &self,
        target_id: u64,
        target_addr: SocketAddr,
        request: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let frame_len = request
            .len()
            .checked_add(SENDER_ID_LEN)
            .ok_or(TransportError::FrameTooLarge(usize::MAX))?;
        check_frame_len(frame_len)?;
        let deadline = Instant::now() + timeout;
        match tokio::time::timeout_at(
            deadline,
            self.call_inner(target_id, target_addr, request, deadline),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout),
        }
    }

    async fn call_inner(
        &self,
        target_id: u64,
        target_addr: SocketAddr,
        request: &[u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, TransportError> {
        let peer = self.peer(target_id)?;
        let (conn, reused) = self
            .connection(&peer, target_id, target_addr, deadline)
            .await?;
        match self.rpc(&conn, request).await {
            Ok(response) => Ok(response),
            Err(e) => {
                let dead = conn.close_reason().is_some();
                if dead {
                    Self::forget(&peer, &conn).await;
                }
                // A cached connection can die unnoticed between calls (the
                // peer restarted, say); one attempt on a fresh connection
                // hides that from the caller. Refusals would only repeat.
                if reused && dead && !matches!(e, TransportError::Refused(_)) {
                    let (conn, _) = self
                        .connection(&peer, target_id, target_addr, deadline)
                        .await?;
                    let result = self.rpc(&conn, request).await;
                    if result.is_err() && conn.close_reason().is_some() {
                        Self::forget(&peer, &conn).await;
                    }
                    return result;
                }
                Err(e)
            }
        }
    }

    fn peer(&self, target_id: u64) -> Result<Arc<tokio::sync::Mutex<Peer>>, TransportError> {
        let mut peers = self
            .peers
            .lock()
            .map_err(|_| TransportError::Io("peer table lock poisoned".to_string()))?;
        Ok(peers.entry(target_id).or_default().clone())
    }

    async fn forget(peer: &tokio::sync::Mutex<Peer>, conn: &Connection) {
        let mut state = peer.lock().await;
        if state
            .conn
            .as_ref()
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            state.conn = None;
        }
    }

    /// The cached connection to the target, or a new one. The flag says
    /// whether the connection was reused.
    async fn connection(
        &self,
        peer: &tokio::sync::Mutex<Peer>,
        target_id: u64,
        target_addr: SocketAddr,
        deadline: Instant,
    ) -> Result<(Connection, bool), TransportError> {
        let mut state = peer.lock().await;
        if state.addr != Some(target_addr) {
            // The target moved (or this is the first call): a connection to
            // its old address is of no use, and failures there say nothing
            // about the new one.
            if let Some(conn) = state.conn.take() {
                conn.close(VarInt::from_u32(codes::SHUTDOWN), b"peer address changed");
            }
            state.addr = Some(target_addr);
            state.failures = 0;
            state.retry_at = None;
            state.last_error = None;
        }
        if let Some(conn) = &state.conn {
            if conn.close_reason().is_none() {
                return Ok((conn.clone(), true));
            }
            state.conn = None;
        }
        if let Some(retry_at) = state.retry_at
            && retry_at > Instant::now()
        {
            if retry_at >= deadline {
                let last = state
                    .last_error
                    .as_ref()
                    .map_or_else(String::new, |e| format!(": {e}"));
                return Err(TransportError::Connect(format!(
                    "node {target_id} at {target_addr}: backing off after {} failed attempts{last}",
                    state.failures
                )));
            }
            tokio::time::sleep_until(retry_at).await;
        }
        let result =
            match tokio::time::timeout_at(deadline, self.connect(target_id, target_addr)).await {
                Ok(result) => result,
                Err(_) => Err(TransportError::Timeout),
            };
        match result {
            Ok(conn) => {
                self.connections_established.fetch_add(1, Ordering::Relaxed);
                state.conn = Some(conn.clone());
                state.failures = 0;
                state.retry_at = None;
                state.last_error = None;
                Ok((conn, false))
            }
            Err(e) => {
                tracing::debug!(target_id, %target_addr, error = %e, "raft transport: connect failed");
                state.note_failure(&e);
                Err(e)
            }
        }
    }

    /// Calls to IPv4 loopback targets leave from `ip` when it is a loopback
    /// address (a replica bound to 127.0.0.12 calls from 127.0.0.12), so a
    /// proxy in front of a peer can tell which replica sent a datagram.
    /// Other addresses leave the default (127.0.0.1) in place.
    pub fn with_source_ip(mut self, ip: IpAddr) -> Self {
        if let IpAddr::V4(v4) = ip
            && v4.is_loopback()
        {
            self.loopback_source = v4;
        }
        self
    }

    fn endpoint_for(&self, target: SocketAddr) -> Result<Endpoint, TransportError> {
        // A loopback target is reached from a loopback socket; anything
        // else from the unspecified address of the target's family.
        let bind: SocketAddr = match target {
            SocketAddr::V4(v4) if v4.ip().is_loopback() => (self.loopback_source, 0).into(),
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(v6) if v6.ip().is_loopback() => (Ipv6Addr::LOCALHOST, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let mut endpoints = self
            .endpoints
            .lock()
            .map_err(|_| TransportError::Io("endpoint table lock poisoned".to_string()))?;
        if let Some(endpoint) = endpoints.get(&bind) {
            return Ok(endpoint.clone());
        }
        let endpoint = Endpoint::client(bind)
            .map_err(|e| TransportError::Io(format!("cannot bind client socket {bind}: {e}")))?;
        endpoints.insert(bind, endpoint.clone());
        Ok(endpoint)
    }

    async fn connect(
        &self,
        target_id: u64,
        target_addr: SocketAddr,
    ) -> Result<Connection, TransportError> {
        let endpoint = self.endpoint_for(target_addr)?;
        // The server name is what makes rustls insist on the target's own
        // certificate: node 3 answering at node 1's address is refused.
        let server_name = node_dns_name(target_id);
        let connecting = endpoint
            .connect_with(self.config.clone(), target_addr, &server_name)
            .map_err(|e| TransportError::Connect(format!("{target_addr}: {e}")))?;
        let conn = connecting
            .await
            .map_err(|e| match map_connection_error(&e) {
                TransportError::Io(msg) => TransportError::Connect(format!("{target_addr}: {msg}")),
                other => other,
            })?;
        let alpn_ok = conn
            .handshake_data()
            .and_then(|data| data.downcast::<HandshakeData>().ok())
            .and_then(|data| data.protocol)
            .is_some_and(|protocol| protocol == ALPN);
        if !alpn_ok {
            conn.close(VarInt::from_u32(codes::BAD_ALPN), b"unsupported protocol");
            return Err(TransportError::Refused(format!(
                "{target_addr} did not agree on protocol {}",
                String::from_utf8_lossy(ALPN)
            )));
        }
        Ok(conn)
    }

    /// One request/response exchange on its own stream.
    async fn rpc(&self, conn: &Connection, request: &[u8]) -> Result<Vec<u8>, TransportError> {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| map_connection_error(&e))?;
        let frame_len = request.len() + SENDER_ID_LEN;
        let frame_len =
            u32::try_from(frame_len).map_err(|_| TransportError::FrameTooLarge(frame_len))?;
        send.write_all(&frame_len.to_be_bytes())
            .await
            .map_err(|e| map_write_error(&e))?;
        send.write_all(&self.node_id.to_be_bytes())
            .await
            .map_err(|e| map_write_error(&e))?;
        send.write_all(request)
            .await
            .map_err(|e| map_write_error(&e))?;
        send.finish().map_err(|_| TransportError::Closed)?;

        let mut header = [0u8; 4];
        recv.read_exact(&mut header)
            .await
            .map_err(|e| map_read_error(&e))?;
        let len = u32::from_be_bytes(header) as usize;
        if let Err(e) = check_frame_len(len) {
            let _ = recv.stop(VarInt::from_u32(codes::FRAME_TOO_LARGE));
            return Err(e);
        }
        let mut response = vec![0u8; len];
        recv.read_exact(&mut response)
            .await
            .map_err(|e| map_read_error(&e))?;
        Ok(response)
    }
}
