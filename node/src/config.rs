//! The configuration file (`--config F`, YAML) and its secrets.
//!
//! Owns: the shape of the file (only the sections this build uses; unknown
//! keys are refused), environment overrides for secrets
//! (`STACYVM_AUTH_API_KEY`, ...), `*_file` secrets that are re-read whenever
//! the file changes (so an external rotator can replace them without a
//! restart), and turning all of it into the `stacyvm-auth` types.
//!
//! Does not own: what the credentials mean (`stacyvm-auth`), lint rules
//! (`lint`), or flags (each command's clap args; a flag wins over the file).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Deserialize;
use stacyvm_auth::{ApiKeys, Secret, WorkerAuth};

/// Why a configuration could not be loaded. Messages never hold a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// The file as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub node: NodeSection,
    pub auth: AuthSection,
    pub worker: WorkerSection,
    pub database: DatabaseSection,
    pub defaults: DefaultsSection,
    pub logging: LoggingSection,
    pub runtimes: RuntimesSection,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    pub id: Option<u64>,
    pub data_dir: Option<String>,
    pub raft_addr: Option<String>,
    pub api_addr: Option<String>,
    pub certs_dir: Option<String>,
    pub bootstrap: bool,
    pub peers: Vec<String>,
    pub join: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    pub api_key: Option<String>,
    pub api_key_file: Option<String>,
    pub admin_api_key: Option<String>,
    pub admin_api_key_file: Option<String>,
    pub worker_token: Option<String>,
    pub worker_token_file: Option<String>,
    pub worker_tokens: BTreeMap<String, String>,
    pub worker_tokens_files: BTreeMap<String, String>,
    pub worker_signing_key: Option<String>,
    pub worker_signing_key_file: Option<String>,
    pub worker_signing_keys: Vec<String>,
    pub worker_signing_keys_files: Vec<String>,
    pub worker_revoked_token_ids: Vec<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSection {
    pub id: Option<String>,
    pub bootstrap: Vec<String>,
    pub rpc_addr: Option<String>,
    pub rpc_tls: RpcTlsSection,
}

/// Worker RPC mTLS (`worker.rpc_tls.*`).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RpcTlsSection {
    pub enabled: bool,
    /// Worker: its certificate (SAN `worker-<id>.stacyvm.internal`) and key.
    pub server_cert_file: Option<String>,
    pub server_key_file: Option<String>,
    /// Worker: CA that signs control-plane client certificates.
    pub client_ca_file: Option<String>,
    /// Control plane: CA that signs worker certificates.
    pub ca_file: Option<String>,
    /// Control plane: its client certificate and key.
    pub client_cert_file: Option<String>,
    pub client_key_file: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSection {
    pub driver: Option<String>,
    pub path: Option<String>,
    pub dsn: Option<String>,
    pub dsn_file: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefaultsSection {
    pub max_sandboxes: Option<i64>,
    pub max_sandboxes_per_owner: Option<i64>,
    pub max_ttl: Option<String>,
    pub max_exec_timeout: Option<String>,
}

/// Runtime settings a worker reads (`stacyvm worker --config F`); flags
/// win over them.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimesSection {
    pub proot: ProotSection,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProotSection {
    /// Image name → its rootfs directory (`runtimes.proot.images.<name>`).
    pub images: BTreeMap<String, String>,
    /// The `proot` binary (default: `proot` on PATH).
    pub binary: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSection {
    pub format: Option<String>,
}

impl FileConfig {
    /// Reads and parses a file. Errors name the file and the problem, never a value.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses YAML text (empty text is an empty config).
    pub fn parse(text: &str, origin: &str) -> Result<FileConfig, ConfigError> {
        if text.trim().is_empty() {
            return Ok(FileConfig::default());
        }
        if text.len() > 1024 * 1024 {
            return Err(ConfigError::Parse {
                path: origin.into(),
                reason: "larger than 1 MiB".into(),
            });
        }
        serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.into(),
            // serde errors quote the offending *key*, and for type errors the
            // value's type, never a secret's text.
            reason: redact_error(&e.to_string()),
        })
    }

    /// Loads `path` when given, else an empty config; then applies the
    /// `STACYVM_AUTH_*` environment overrides.
    pub fn load_optional(path: Option<&Path>) -> Result<FileConfig, ConfigError> {
        let mut c = match path {
            Some(p) => Self::load(p)?,
            None => FileConfig::default(),
        };
        c.apply_env(|k| std::env::var(k).ok());
        Ok(c)
    }

    /// Environment overrides for secrets (`STACYVM_AUTH_<KEY>` and `_FILE`).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        let set = |slot: &mut Option<String>, name: &str| {
            if let Some(v) = get(name).filter(|v| !v.is_empty()) {
                *slot = Some(v);
            }
        };
        let a = &mut self.auth;
        set(&mut a.api_key, "STACYVM_AUTH_API_KEY");
        set(&mut a.api_key_file, "STACYVM_AUTH_API_KEY_FILE");
        set(&mut a.admin_api_key, "STACYVM_AUTH_ADMIN_API_KEY");
        set(&mut a.admin_api_key_file, "STACYVM_AUTH_ADMIN_API_KEY_FILE");
        set(&mut a.worker_token, "STACYVM_AUTH_WORKER_TOKEN");
        set(&mut a.worker_token_file, "STACYVM_AUTH_WORKER_TOKEN_FILE");
        set(&mut a.worker_signing_key, "STACYVM_AUTH_WORKER_SIGNING_KEY");
        set(
            &mut a.worker_signing_key_file,
            "STACYVM_AUTH_WORKER_SIGNING_KEY_FILE",
        );
        if let Some(v) = get("STACYVM_AUTH_WORKER_REVOKED_TOKEN_IDS") {
            a.worker_revoked_token_ids.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from),
            );
        }
    }

    /// Hard errors (lint reports them too): a value and its `_file` both set.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        for (name, v, f) in [
            ("auth.api_key", &a.api_key, &a.api_key_file),
            (
                "auth.admin_api_key",
                &a.admin_api_key,
                &a.admin_api_key_file,
            ),
            ("auth.worker_token", &a.worker_token, &a.worker_token_file),
            (
                "auth.worker_signing_key",
                &a.worker_signing_key,
                &a.worker_signing_key_file,
            ),
            ("database.dsn", &self.database.dsn, &self.database.dsn_file),
        ] {
            if v.is_some() && f.is_some() {
                return Err(ConfigError::Invalid(format!(
                    "{name} and {name}_file are both set; keep one"
                )));
            }
        }
        if let Some(id) = a
            .worker_tokens
            .keys()
            .find(|k| a.worker_tokens_files.contains_key(*k))
        {
            return Err(ConfigError::Invalid(format!(
                "auth.worker_tokens.{id} is set inline and as a file; keep one"
            )));
        }
        Ok(())
    }
}

fn redact_error(msg: &str) -> String {
    // First line only (later lines may quote the source), and no quoted
    // scalar: a type error would otherwise repeat the offending value.
    let first = msg.lines().next().unwrap_or("");
    let mut out = String::with_capacity(first.len());
    let mut quoted = false;
    for ch in first.chars() {
        if ch == '"' {
            if !quoted {
                out.push_str("\"…\"");
            }
            quoted = !quoted;
        } else if !quoted {
            out.push(ch);
        }
    }
    out.chars().take(300).collect()
}

/// A secret given inline or as a file that is re-read when it changes.
#[derive(Debug)]
pub enum SecretSource {
    Inline(Secret),
    File {
        path: PathBuf,
        cache: Mutex<Option<(SystemTime, u64, Secret)>>,
    },
}

impl SecretSource {
    pub fn from_parts(inline: Option<&String>, file: Option<&String>) -> Option<SecretSource> {
        match (inline, file) {
            (_, Some(f)) => Some(SecretSource::File {
                path: PathBuf::from(f),
                cache: Mutex::new(None),
            }),
            (Some(v), None) if !v.is_empty() => Some(SecretSource::Inline(Secret::new(v.clone()))),
            _ => None,
        }
    }

    /// The current value; a file is re-read when its mtime or size changed.
    /// An unreadable or empty file yields an error naming the path only.
    pub fn get(&self) -> Result<Secret, ConfigError> {
        match self {
            SecretSource::Inline(s) => Ok(s.clone()),
            SecretSource::File { path, cache } => {
                let meta = std::fs::metadata(path).map_err(|e| ConfigError::Read {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                let stamp = (
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    meta.len(),
                );
                let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((t, n, s)) = c.as_ref()
                    && (*t, *n) == stamp
                {
                    return Ok(s.clone());
                }
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                let v = text.trim();
                if v.is_empty() {
                    return Err(ConfigError::Invalid(format!(
                        "secret file {} is empty",
                        path.display()
                    )));
                }
                let s = Secret::new(v);
                *c = Some((stamp.0, stamp.1, s.clone()));
                Ok(s)
            }
        }
    }

    pub fn is_file(&self) -> bool {
        matches!(self, SecretSource::File { .. })
    }
}

/// Every credential a replica checks, with live file sources.
#[derive(Debug, Default)]
pub struct AuthSources {
    pub api_key: Option<SecretSource>,
    pub admin_api_key: Option<SecretSource>,
    pub worker_token: Option<SecretSource>,
    pub worker_tokens: BTreeMap<String, SecretSource>,
    pub signing_key: Option<SecretSource>,
    pub verify_keys: Vec<SecretSource>,
    pub revoked: BTreeSet<String>,
}

impl AuthSources {
    pub fn from_config(c: &FileConfig) -> Result<AuthSources, ConfigError> {
        c.validate()?;
        let a = &c.auth;
        let mut worker_tokens = BTreeMap::new();
        for (id, v) in &a.worker_tokens {
            worker_tokens.insert(id.clone(), SecretSource::Inline(Secret::new(v.clone())));
        }
        for (id, f) in &a.worker_tokens_files {
            worker_tokens.insert(
                id.clone(),
                SecretSource::File {
                    path: PathBuf::from(f),
                    cache: Mutex::new(None),
                },
            );
        }
        let mut verify_keys: Vec<SecretSource> = a
            .worker_signing_keys
            .iter()
            .filter(|k| !k.is_empty())
            .map(|k| SecretSource::Inline(Secret::new(k.clone())))
            .collect();
        verify_keys.extend(
            a.worker_signing_keys_files
                .iter()
                .map(|f| SecretSource::File {
                    path: PathBuf::from(f),
                    cache: Mutex::new(None),
                }),
        );
        let s = AuthSources {
            api_key: SecretSource::from_parts(a.api_key.as_ref(), a.api_key_file.as_ref()),
            admin_api_key: SecretSource::from_parts(
                a.admin_api_key.as_ref(),
                a.admin_api_key_file.as_ref(),
            ),
            worker_token: SecretSource::from_parts(
                a.worker_token.as_ref(),
                a.worker_token_file.as_ref(),
            ),
            worker_tokens,
            signing_key: SecretSource::from_parts(
                a.worker_signing_key.as_ref(),
                a.worker_signing_key_file.as_ref(),
            ),
            verify_keys,
            revoked: a.worker_revoked_token_ids.iter().cloned().collect(),
        };
        // Fail at start, not at the first request, when a file is unusable.
        s.worker_auth()?;
        s.api_keys()?;
        Ok(s)
    }

    fn opt(s: &Option<SecretSource>) -> Result<Option<Secret>, ConfigError> {
        s.as_ref().map(SecretSource::get).transpose()
    }

    /// The worker credential rules as of now (files re-read if changed).
    pub fn worker_auth(&self) -> Result<WorkerAuth, ConfigError> {
        let mut worker_tokens = BTreeMap::new();
        for (id, src) in &self.worker_tokens {
            worker_tokens.insert(id.clone(), src.get()?);
        }
        Ok(WorkerAuth {
            shared_token: Self::opt(&self.worker_token)?,
            worker_tokens,
            signing_key: Self::opt(&self.signing_key)?,
            verify_keys: self
                .verify_keys
                .iter()
                .map(SecretSource::get)
                .collect::<Result<_, _>>()?,
            revoked: self.revoked.clone(),
        })
    }

    pub fn api_keys(&self) -> Result<ApiKeys, ConfigError> {
        Ok(ApiKeys {
            api_key: Self::opt(&self.api_key)?,
            admin_api_key: Self::opt(&self.admin_api_key)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proot_images_are_read_and_unknown_runtime_keys_refused() {
        let c = FileConfig::parse(
            "runtimes:\n  proot:\n    binary: /usr/bin/proot\n    images:\n      busybox: /srv/rootfs/busybox\n      alpine: /srv/rootfs/alpine\n",
            "t",
        )
        .expect("parse");
        let want: BTreeMap<String, String> = [
            ("alpine".to_string(), "/srv/rootfs/alpine".to_string()),
            ("busybox".to_string(), "/srv/rootfs/busybox".to_string()),
        ]
        .into();
        assert_eq!(c.runtimes.proot.images, want);
        assert_eq!(c.runtimes.proot.binary.as_deref(), Some("/usr/bin/proot"));
        for bad in [
            "runtimes:\n  proot:\n    image: {}\n",
            "runtimes:\n  firecracker: {}\n",
        ] {
            assert!(FileConfig::parse(bad, "t").is_err(), "{bad:?} accepted");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]

        /// The loader never panics: arbitrary text is a config or an error.
        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,400}") {
            let _ = FileConfig::parse(&s, "fuzz").map(|c| c.validate());
        }

        /// YAML-shaped input with arbitrary keys and values never panics, and
        /// a refusal never quotes a value.
        #[test]
        fn yaml_shaped_input_never_panics_or_leaks(
            section in "(auth|worker|node|database|defaults|logging|bogus)",
            key in "[a-z_]{1,24}",
            value in "[A-Za-z0-9+/=:._-]{0,40}",
        ) {
            let text = format!("{section}:\n  {key}: zz{value}zz\n");
            if let Err(e) = FileConfig::parse(&text, "fuzz") {
                let msg = e.to_string();
                proptest::prop_assert!(!(value.len() > 3 && msg.contains(&format!("zz{value}zz"))), "{msg}");
            }
        }
    }

    #[test]
    fn parses_the_auth_section_and_refuses_unknown_keys() {
        let c = FileConfig::parse(
            "auth:\n  api_key: user-key\n  worker_tokens:\n    w1: t1\n  worker_signing_keys: [old]\nworker:\n  rpc_tls:\n    enabled: true\n",
            "test",
        )
        .expect("parse");
        assert_eq!(c.auth.api_key.as_deref(), Some("user-key"));
        assert_eq!(
            c.auth.worker_tokens.get("w1").map(String::as_str),
            Some("t1")
        );
        assert!(c.worker.rpc_tls.enabled);
        let e = FileConfig::parse("auth:\n  api_kee: x\n", "test").expect_err("unknown key");
        assert!(e.to_string().contains("api_kee"), "{e}");
        assert!(FileConfig::parse("", "empty").is_ok());
        assert!(FileConfig::parse("auth: [1, 2", "broken").is_err());
    }

    #[test]
    fn secret_files_are_reread_when_they_change() {
        let dir = tempfile::tempdir().expect("dir");
        let f = dir.path().join("key");
        std::fs::write(&f, "first-value\n").expect("write");
        let src = SecretSource::from_parts(None, Some(&f.display().to_string())).expect("source");
        assert_eq!(src.get().expect("get").expose(), "first-value");
        std::fs::write(&f, "second-value-longer\n").expect("write");
        assert_eq!(src.get().expect("get").expose(), "second-value-longer");
        std::fs::write(&f, "  \n").expect("write");
        let e = src.get().expect_err("empty");
        assert!(e.to_string().contains("empty"));
        let both = FileConfig::parse("auth:\n  worker_token: a\n  worker_token_file: /x\n", "t")
            .expect("parse");
        assert!(both.validate().is_err());
    }

    #[test]
    fn env_overrides_and_no_secret_in_debug() {
        let mut c = FileConfig::default();
        c.apply_env(|k| {
            (k == "STACYVM_AUTH_ADMIN_API_KEY").then(|| "admin-secret-value".to_string())
        });
        let s = AuthSources::from_config(&c).expect("sources");
        assert_eq!(
            s.api_keys()
                .expect("keys")
                .admin_api_key
                .map(|k| k.expose().to_string())
                .as_deref(),
            Some("admin-secret-value")
        );
        assert!(!format!("{s:?}").contains("admin-secret-value"));
    }
}
