//! Mutual TLS for worker RPC.
//!
//! Owns: the worker's TLS server configuration (its certificate must carry
//! `worker-<id>.stacyvm.internal`, it requires a client certificate from the
//! cluster CA that is valid for [`CONTROL_PLANE_DNS`], so another worker's
//! certificate is refused), and the control plane's TLS client (trusts the
//! cluster CA, presents its client certificate, and checks that the worker
//! it reaches holds the certificate of the worker it meant to call: the URL
//! host is replaced by `worker-<id>.stacyvm.internal`, resolved to the
//! worker's address, so ordinary hostname verification binds ID to
//! certificate).
//!
//! Does not own: certificate issuance (`stacyvm_raft::certs`) or the RPC
//! itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use stacyvm_raft::certs::{CONTROL_PLANE_DNS, cert_has_dns_name, worker_dns_name};

/// Why TLS material could not be used. Messages name files, never contents.
#[derive(Debug, thiserror::Error)]
pub enum RpcTlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, RpcTlsError> {
    let v: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| RpcTlsError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|_| RpcTlsError::File {
            path: path.display().to_string(),
            reason: "not a PEM certificate".into(),
        })?;
    if v.is_empty() {
        return Err(RpcTlsError::File {
            path: path.display().to_string(),
            reason: "no certificate in it".into(),
        });
    }
    Ok(v)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, RpcTlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|_| RpcTlsError::File {
        path: path.display().to_string(),
        reason: "not a PEM private key".into(),
    })
}

fn roots(path: &Path) -> Result<RootCertStore, RpcTlsError> {
    let mut r = RootCertStore::empty();
    for c in certs(path)? {
        r.add(c).map_err(|e| RpcTlsError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    Ok(r)
}

/// Accepts client certificates that chain to the cluster CA *and* are valid
/// for [`CONTROL_PLANE_DNS`].
#[derive(Debug)]
struct ControlPlaneOnly(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for ControlPlaneOnly {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.verify_client_cert(end_entity, intermediates, now)?;
        if !cert_has_dns_name(end_entity, CONTROL_PLANE_DNS) {
            return Err(rustls::Error::General(format!(
                "client certificate is not a control-plane certificate (no {CONTROL_PLANE_DNS})"
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The worker's TLS server: its certificate must be for `worker_id`.
pub fn server_config(
    worker_id: &str,
    cert_path: &Path,
    key_path: &Path,
    client_ca_path: &Path,
) -> Result<Arc<rustls::ServerConfig>, RpcTlsError> {
    let chain = certs(cert_path)?;
    if !cert_has_dns_name(&chain[0], &worker_dns_name(worker_id)) {
        return Err(RpcTlsError::Invalid(format!(
            "{}: certificate is not for worker {worker_id:?} (it lacks {}); issue one with `stacyvm certs issue worker --id {worker_id}`",
            cert_path.display(),
            worker_dns_name(worker_id)
        )));
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots(client_ca_path)?))
        .build()
        .map_err(|e| RpcTlsError::Invalid(format!("client CA: {e}")))?;
    let cfg = rustls::ServerConfig::builder()
        .with_client_cert_verifier(Arc::new(ControlPlaneOnly(verifier)))
        .with_single_cert(chain, key(key_path)?)
        .map_err(|e| RpcTlsError::Invalid(format!("{}: {e}", key_path.display())))?;
    Ok(Arc::new(cfg))
}

/// The control plane's mTLS client for worker RPC.
#[derive(Debug)]
pub struct RpcTlsClient {
    config: Arc<rustls::ClientConfig>,
    clients: Mutex<HashMap<(String, SocketAddr, bool), reqwest::Client>>,
}

impl RpcTlsClient {
    pub fn load(
        ca_path: &Path,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<RpcTlsClient, RpcTlsError> {
        let cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots(ca_path)?)
            .with_client_auth_cert(certs(cert_path)?, key(key_path)?)
            .map_err(|e| RpcTlsError::Invalid(format!("{}: {e}", key_path.display())))?;
        Ok(RpcTlsClient {
            config: Arc::new(cfg),
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// A client for `worker_id` at `addr`, and the base URL to use with it
    /// (`https://worker-<id>.stacyvm.internal:<port>`). `streaming` clients
    /// have an idle-read timeout instead of none.
    pub fn client_for(
        &self,
        worker_id: &str,
        addr: SocketAddr,
        streaming: bool,
    ) -> Result<(reqwest::Client, String), RpcTlsError> {
        let host = worker_dns_name(worker_id);
        let base = format!("https://{host}:{}", addr.port());
        let mut map = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let key = (worker_id.to_string(), addr, streaming);
        if let Some(c) = map.get(&key) {
            return Ok((c.clone(), base));
        }
        let mut b = reqwest::Client::builder()
            .use_preconfigured_tls((*self.config).clone())
            .resolve(&host, addr)
            .connect_timeout(Duration::from_secs(2));
        if streaming {
            b = b.read_timeout(Duration::from_secs(120));
        }
        let c = b.build().map_err(|e| RpcTlsError::Invalid(e.to_string()))?;
        map.insert(key, c.clone());
        Ok((c, base))
    }
}
