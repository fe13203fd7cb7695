//! Cluster certificates: the private CA, node certificates, and loading them
//! for mutual TLS between replicas.
//!
//! This module owns the identity convention (node `N` is whoever holds a
//! certificate with DNS SAN `node-N.stacyvm.internal` signed by the cluster
//! CA), the on-disk layout written by [`init_ca`] and [`issue_node`] (`ca.pem`,
//! `ca-key.pem`, `node-<id>.pem`, `node-<id>-key.pem`; key files are created
//! with mode 0600 and never overwritten), and [`NodeTls`], the loaded and
//! checked material the [`crate::transport`] builds its TLS configurations
//! from. It never prints key material: errors name files, not contents.
//!
//! [`TestCa`] and [`test_cluster_tls`] build the same kind of material in
//! memory for tests; they are not meant for production use.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, TrustAnchor, UnixTime,
};

/// The DNS suffix every cluster identity lives under.
pub const CLUSTER_DOMAIN: &str = "stacyvm.internal";
/// File name of the CA certificate inside a CA (or node) directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside the CA directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// The CA subject is fixed so that [`issue_node`] can rebuild the issuer from
/// `ca-key.pem` alone (rcgen cannot parse an existing certificate without its
/// `x509-parser` feature); a CA made elsewhere with another subject is caught
/// by the chain check that follows every issuance.
const CA_COMMON_NAME: &str = "StacyVM cluster CA";
const ORGANIZATION: &str = "StacyVM";
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Certificates start being valid a little in the past so that a replica whose
/// clock lags the issuing machine's does not reject a freshly issued one.
const BACKDATE: Duration = Duration::from_secs(60 * 60);

/// The DNS name node `id`'s certificate must carry.
pub fn node_dns_name(id: u64) -> String {
    format!("node-{id}.{CLUSTER_DOMAIN}")
}

/// The DNS name a worker's certificate will carry (reserved for the worker role).
pub fn worker_dns_name(id: &str) -> String {
    format!("worker-{id}.{CLUSTER_DOMAIN}")
}

/// The DNS name an API client's certificate will carry (reserved for clients).
pub fn client_dns_name(name: &str) -> String {
    format!("client-{name}.{CLUSTER_DOMAIN}")
}

/// Why certificate material could not be created or loaded. Every variant
/// names the file involved and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(
        "{}: already exists; refusing to overwrite it (move it away first if you really mean to replace it)",
        .path.display()
    )]
    AlreadyExists { path: PathBuf },
    #[error("{}: cannot {action}: {source}", .path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}: no usable PEM certificate (expected `-----BEGIN CERTIFICATE-----` blocks): {reason}",
        .path.display()
    )]
    BadCertificate { path: PathBuf, reason: String },
    // The underlying parser error is left out on purpose: it can quote lines
    // of the file, and this file holds a secret.
    #[error(
        "{}: not a usable PEM private key (expected PKCS#8, SEC1 or PKCS#1 `-----BEGIN ... PRIVATE KEY-----`)",
        .path.display()
    )]
    BadKey { path: PathBuf },
    #[error(
        "{}: certificate is not for node {node_id} (it lacks the DNS name {expected}); load the file issued for node {node_id} or issue one with `issue_node`",
        .path.display()
    )]
    WrongIdentity {
        path: PathBuf,
        node_id: u64,
        expected: String,
    },
    #[error(
        "{}: certificate is not signed by the cluster CA in {} ({reason}); re-issue it with this cluster's CA",
        .path.display(), .ca_path.display()
    )]
    Untrusted {
        path: PathBuf,
        ca_path: PathBuf,
        reason: String,
    },
    #[error(
        "{}: private key does not belong to the certificate in {}; use the key file issued together with that certificate",
        .key_path.display(), .cert_path.display()
    )]
    KeyMismatch {
        cert_path: PathBuf,
        key_path: PathBuf,
    },
    #[error("certificate generation failed: {0}")]
    Generate(String),
}

impl From<rcgen::Error> for CertError {
    fn from(e: rcgen::Error) -> Self {
        CertError::Generate(e.to_string())
    }
}

/// Where one node's TLS files live: the CA certificate, the node certificate
/// and its key. [`CertPaths::node`] spells the layout [`issue_node`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertPaths {
    /// The files for node `id`: `ca_dir/ca.pem`, `node_dir/node-<id>.pem` and
    /// `node_dir/node-<id>-key.pem`.
    pub fn node(ca_dir: &Path, node_dir: &Path, id: u64) -> Self {
        CertPaths {
            ca_cert: ca_dir.join(CA_CERT_FILE),
            cert: node_dir.join(format!("node-{id}.pem")),
            key: node_dir.join(format!("node-{id}-key.pem")),
        }
    }
}

/// Creates a new cluster CA in `out_dir` (created if missing): `ca.pem` and
/// `ca-key.pem` (mode 0600). Refuses to touch existing files, because
/// replacing a CA silently would cut every node issued by the old one out of
/// the cluster.
pub fn init_ca(out_dir: &Path) -> Result<(), CertError> {
    let cert_path = out_dir.join(CA_CERT_FILE);
    let key_path = out_dir.join(CA_KEY_FILE);
    refuse_existing(&[&cert_path, &key_path])?;
    std::fs::create_dir_all(out_dir).map_err(|source| CertError::Io {
        path: out_dir.to_path_buf(),
        action: "create the directory",
        source,
    })?;
    let key = KeyPair::generate()?;
    let cert = ca_params()?.self_signed(&key)?;
    write_pair(&cert_path, &cert.pem(), &key_path, &key.serialize_pem())
}

/// Issues node `id`'s certificate with the CA in `ca_dir`, writing
/// `node-<id>.pem` and `node-<id>-key.pem` (mode 0600) into `out_dir`. The
/// certificate carries DNS SAN `node-<id>.stacyvm.internal` and both the server
/// and client auth usages, because every replica is both. Refuses to
/// overwrite existing files.
pub fn issue_node(ca_dir: &Path, id: u64, out_dir: &Path) -> Result<(), CertError> {
    let paths = CertPaths::node(ca_dir, out_dir, id);
    issue_files(ca_dir, &[node_dns_name(id)], &paths.cert, &paths.key)
}

/// The DNS name every control-plane RPC client certificate carries, besides
/// its own `client-<name>` name; workers accept RPC only from certificates
/// valid for it (a worker's certificate is not).
pub const CONTROL_PLANE_DNS: &str = "control-plane.stacyvm.internal";

/// Issues worker `id`'s certificate (`worker-<id>.pem`, `worker-<id>-key.pem`)
/// with DNS SAN `worker-<id>.stacyvm.internal`: the name the control plane
/// checks when it calls that worker's RPC. Refuses to overwrite.
pub fn issue_worker(
    ca_dir: &Path,
    id: &str,
    out_dir: &Path,
) -> Result<(PathBuf, PathBuf), CertError> {
    let cert = out_dir.join(format!("worker-{id}.pem"));
    let key = out_dir.join(format!("worker-{id}-key.pem"));
    issue_files(ca_dir, &[worker_dns_name(id)], &cert, &key)?;
    Ok((cert, key))
}

/// Issues a control-plane client certificate (`client-<name>.pem`, key) with
/// DNS SANs `client-<name>.stacyvm.internal` and [`CONTROL_PLANE_DNS`].
pub fn issue_client(
    ca_dir: &Path,
    name: &str,
    out_dir: &Path,
) -> Result<(PathBuf, PathBuf), CertError> {
    let cert = out_dir.join(format!("client-{name}.pem"));
    let key = out_dir.join(format!("client-{name}-key.pem"));
    issue_files(
        ca_dir,
        &[client_dns_name(name), CONTROL_PLANE_DNS.to_string()],
        &cert,
        &key,
    )?;
    Ok((cert, key))
}

fn issue_files(
    ca_dir: &Path,
    names: &[String],
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), CertError> {
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    refuse_existing(&[cert_path, key_path])?;

    let ca_certs = read_certs(&ca_cert_path)?;
    let ca_key_pem = read_file(&ca_key_path)?;
    let ca_key_pem = std::str::from_utf8(&ca_key_pem).map_err(|_| CertError::BadKey {
        path: ca_key_path.clone(),
    })?;
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(|_| CertError::BadKey {
        path: ca_key_path.clone(),
    })?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let (cert, key) = issue_leaf_names(&issuer, names)?;

    // Checking before writing means a CA directory whose key and certificate
    // do not belong together (or a CA not made by `init_ca`) fails here, with
    // the CA named, instead of producing a certificate nobody accepts.
    let chain = [CertificateDer::from(cert.der().to_vec())];
    verify_chain(&chain, &ca_certs).map_err(|reason| CertError::Untrusted {
        path: ca_key_path.clone(),
        ca_path: ca_cert_path.clone(),
        reason: format!("the CA key and CA certificate do not match: {reason}"),
    })?;
    if let Some(dir) = cert_path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
            path: dir.to_path_buf(),
            action: "create the directory",
            source,
        })?;
    }
    write_pair(cert_path, &cert.pem(), key_path, &key.serialize_pem())
}

/// Everything a replica needs for mutual TLS: the cluster CA certificates it
/// trusts, its own certificate chain and key, and the node ID the certificate
/// was checked to belong to.
pub struct NodeTls {
    pub ca: Vec<CertificateDer<'static>>,
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub node_id: u64,
}

impl fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeTls")
            .field("node_id", &self.node_id)
            .field("ca_certs", &self.ca.len())
            .field("cert_chain_len", &self.cert_chain.len())
            .field("key", &"[secret key elided]")
            .finish()
    }
}

impl Clone for NodeTls {
    fn clone(&self) -> Self {
        NodeTls {
            ca: self.ca.clone(),
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
            node_id: self.node_id,
        }
    }
}

impl NodeTls {
    /// Loads and checks node `node_id`'s TLS material: the certificate must
    /// name `node-<node_id>.stacyvm.internal`, chain to a certificate in
    /// `ca_pem`, and match the key in `key_pem`. Catching these at startup
    /// gives an error naming the file instead of refused handshakes later.
    pub fn load(
        ca_pem: &Path,
        cert_pem: &Path,
        key_pem: &Path,
        node_id: u64,
    ) -> Result<Self, CertError> {
        let ca = read_certs(ca_pem)?;
        let cert_chain = read_certs(cert_pem)?;
        let key_bytes = read_file(key_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|_| CertError::BadKey {
            path: key_pem.to_path_buf(),
        })?;
        let tls = NodeTls {
            ca,
            cert_chain,
            key,
            node_id,
        };
        tls.check_with_sources(ca_pem, cert_pem, key_pem)?;
        Ok(tls)
    }

    /// Loads node `node_id`'s files as laid out by [`CertPaths`].
    pub fn load_paths(paths: &CertPaths, node_id: u64) -> Result<Self, CertError> {
        Self::load(&paths.ca_cert, &paths.cert, &paths.key, node_id)
    }

    /// Runs the checks [`NodeTls::load`] runs on material that did not come
    /// from files (errors then name `<in memory>`).
    pub fn check(&self) -> Result<(), CertError> {
        let here = Path::new("<in memory>");
        self.check_with_sources(here, here, here)
    }

    fn check_with_sources(
        &self,
        ca_path: &Path,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<(), CertError> {
        let leaf = self
            .cert_chain
            .first()
            .ok_or_else(|| CertError::BadCertificate {
                path: cert_path.to_path_buf(),
                reason: "the certificate chain is empty".to_string(),
            })?;
        if !cert_has_dns_name(leaf, &node_dns_name(self.node_id)) {
            return Err(CertError::WrongIdentity {
                path: cert_path.to_path_buf(),
                node_id: self.node_id,
                expected: node_dns_name(self.node_id),
            });
        }
        verify_chain(&self.cert_chain, &self.ca).map_err(|reason| CertError::Untrusted {
            path: cert_path.to_path_buf(),
            ca_path: ca_path.to_path_buf(),
            reason,
        })?;
        let provider = rustls::crypto::ring::default_provider();
        rustls::sign::CertifiedKey::from_der(
            self.cert_chain.clone(),
            self.key.clone_key(),
            &provider,
        )
        .map_err(|_| CertError::KeyMismatch {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
        })?;
        Ok(())
    }
}

/// Whether `cert` is valid for DNS name `name` (by its SANs). Malformed
/// certificates and names are simply "not valid": callers treat both as a
/// refusal.
pub fn cert_has_dns_name(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(end_entity) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let Ok(server_name) = ServerName::try_from(name) else {
        return false;
    };
    end_entity
        .verify_is_valid_for_subject_name(&server_name)
        .is_ok()
}

/// Checks that `chain[0]` chains to one of `ca` and may be used both as a TLS
/// server and as a TLS client, as of now. The error is a human-readable reason.
fn verify_chain(chain: &[CertificateDer<'_>], ca: &[CertificateDer<'_>]) -> Result<(), String> {
    let leaf = chain
        .first()
        .ok_or_else(|| "the certificate chain is empty".to_string())?;
    let end_entity = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| format!("unparseable certificate: {e}"))?;
    let anchors: Vec<TrustAnchor<'_>> = ca
        .iter()
        .map(|c| {
            webpki::anchor_from_trusted_cert(c).map_err(|e| format!("unusable CA certificate: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if anchors.is_empty() {
        return Err("no CA certificate to check against".to_string());
    }
    let now = UnixTime::now();
    let intermediates = &chain[1..];
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn ca_params() -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params
        .distinguished_name
        .push(DnType::OrganizationName, ORGANIZATION);
    // Path length 0: the CA signs node certificates directly and nothing it
    // signs may act as a CA in turn.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_VALIDITY)?;
    Ok(params)
}

/// Issues an end-entity certificate for `dns_name` usable as both TLS server
/// and client, with a fresh key.
fn issue_leaf(
    issuer: &Issuer<'_, KeyPair>,
    dns_name: &str,
) -> Result<(rcgen::Certificate, KeyPair), CertError> {
    issue_leaf_names(issuer, &[dns_name.to_string()])
}

fn issue_leaf_names(
    issuer: &Issuer<'_, KeyPair>,
    names: &[String],
) -> Result<(rcgen::Certificate, KeyPair), CertError> {
    let dns_name = names.first().cloned().unwrap_or_default();
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, dns_name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, ORGANIZATION);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, LEAF_VALIDITY)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert, key))
}

fn set_validity(params: &mut CertificateParams, validity: Duration) -> Result<(), CertError> {
    let now = SystemTime::now();
    let not_before = now
        .checked_sub(BACKDATE)
        .ok_or_else(|| CertError::Generate("system clock is before the epoch".to_string()))?;
    let not_after = now
        .checked_add(validity)
        .ok_or_else(|| CertError::Generate("validity end overflows".to_string()))?;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    Ok(())
}

fn refuse_existing(paths: &[&Path]) -> Result<(), CertError> {
    for path in paths {
        // `symlink_metadata` so that a dangling symlink also counts as
        // "exists": writing through it could land the key somewhere surprising.
        if path.symlink_metadata().is_ok() {
            return Err(CertError::AlreadyExists {
                path: path.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Writes a certificate and its key as new files, key first with mode 0600.
/// If the second write fails the first file is removed, so a retry does not
/// trip over a half-written pair.
fn write_pair(
    cert_path: &Path,
    cert_pem: &str,
    key_path: &Path,
    key_pem: &str,
) -> Result<(), CertError> {
    write_new(key_path, key_pem.as_bytes(), true)?;
    if let Err(e) = write_new(cert_path, cert_pem.as_bytes(), false) {
        let _ = std::fs::remove_file(key_path);
        return Err(e);
    }
    Ok(())
}

fn write_new(path: &Path, contents: &[u8], secret: bool) -> Result<(), CertError> {
    let mut options = std::fs::OpenOptions::new();
    // `create_new` makes the no-overwrite promise hold even if the file
    // appeared after `refuse_existing` looked.
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // The mode is applied at creation, so the key is never readable by
        // others, not even for a moment.
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::AlreadyExists {
                path: path.to_path_buf(),
            }
        } else {
            CertError::Io {
                path: path.to_path_buf(),
                action: "create the file",
                source,
            }
        }
    })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|source| CertError::Io {
            path: path.to_path_buf(),
            action: "write the file",
            source,
        })
}

fn read_file(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        action: "read the file",
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::BadCertificate {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::BadCertificate {
            path: path.to_path_buf(),
            reason: "the file contains no certificate".to_string(),
        });
    }
    Ok(certs)
}

/// An in-memory CA for tests: issues node (or arbitrary) certificates without
/// touching disk. A second `TestCa` is a "foreign" CA whose certificates the
/// first one's cluster must refuse. Not for production use: the key never
/// leaves memory and nothing is persisted.
pub struct TestCa {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for TestCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCa")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl TestCa {
    /// A fresh CA with the same profile [`init_ca`] uses.
    pub fn new() -> Result<Self, CertError> {
        let params = ca_params()?;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(TestCa {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// This CA's certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// A certificate and key for several DNS names (a control-plane client:
    /// its own name and [`CONTROL_PLANE_DNS`]).
    pub fn issue_names(
        &self,
        names: &[String],
    ) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), CertError> {
        let (cert, key) = issue_leaf_names(&self.issuer, names)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((cert.der().clone(), key))
    }

    /// A certificate and key for an arbitrary DNS name (for example a worker
    /// name, to check that non-node identities are refused).
    pub fn issue(
        &self,
        dns_name: &str,
    ) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), CertError> {
        let (cert, key) = issue_leaf(&self.issuer, dns_name)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((cert.der().clone(), key))
    }

    /// Node `id`'s TLS material, issued and trusted by this CA.
    pub fn node_tls(&self, id: u64) -> Result<NodeTls, CertError> {
        let (cert, key) = self.issue(&node_dns_name(id))?;
        Ok(NodeTls {
            ca: vec![self.cert.clone()],
            cert_chain: vec![cert],
            key,
            node_id: id,
        })
    }
}

/// Test helper: a fresh CA and the TLS material of nodes `ids`, in order.
pub fn test_cluster_tls(ids: &[u64]) -> Result<(TestCa, Vec<NodeTls>), CertError> {
    let ca = TestCa::new()?;
    let nodes = ids
        .iter()
        .map(|&id| ca.node_tls(id))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((ca, nodes))
}
