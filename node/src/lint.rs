//! `stacyvm config lint [--file F] [--production] [--role control-plane|worker]`.
//!
//! Owns: every check on a configuration, as a pure function of the parsed
//! file and the contents of the files it names ([`lint`]), and the report
//! format (`[PASS|WARN|FAIL] name: message` plus `fix:` lines). Severity
//! "production" findings are WARN normally and FAIL with `--production`.
//! Secrets are read only to judge them (length, placeholders, duplicates);
//! no finding ever contains one.
//!
//! Does not own: loading rules (`config`), or what the settings do.

use std::collections::BTreeSet;
use std::path::Path;

use crate::config::FileConfig;

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Pass,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub name: String,
    pub message: String,
    pub fix: Option<String>,
}

/// Which process the file configures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    ControlPlane,
    Worker,
}

/// Reads a file named by the config (secrets, certificates). `None` when
/// unreadable; tests substitute their own.
pub type ReadFile<'a> = &'a dyn Fn(&str) -> Option<String>;

struct Report {
    production: bool,
    out: Vec<Finding>,
}

impl Report {
    fn pass(&mut self, name: &str, message: impl Into<String>) {
        self.out.push(Finding {
            level: Level::Pass,
            name: name.into(),
            message: message.into(),
            fix: None,
        });
    }
    fn warn(&mut self, name: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.out.push(Finding {
            level: Level::Warn,
            name: name.into(),
            message: message.into(),
            fix: Some(fix.into()),
        });
    }
    fn fail(&mut self, name: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.out.push(Finding {
            level: Level::Fail,
            name: name.into(),
            message: message.into(),
            fix: Some(fix.into()),
        });
    }
    /// WARN, or FAIL with `--production`.
    fn prod(&mut self, name: &str, message: impl Into<String>, fix: impl Into<String>) {
        let level = if self.production {
            Level::Fail
        } else {
            Level::Warn
        };
        self.out.push(Finding {
            level,
            name: name.into(),
            message: message.into(),
            fix: Some(fix.into()),
        });
    }
}

const PLACEHOLDERS: [&str; 4] = ["change-me", "changeme", "replace-me", "example"];

/// A secret's value from inline or file, or why it is unusable.
fn secret(
    inline: &Option<String>,
    file: &Option<String>,
    read: ReadFile<'_>,
) -> Result<Option<String>, String> {
    match (inline, file) {
        (Some(_), Some(_)) => Err("set both inline and as a file".into()),
        (_, Some(f)) => match read(f) {
            Some(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_string())),
            Some(_) => Err(format!("file {f} is empty")),
            None => Err(format!("file {f} cannot be read")),
        },
        (Some(v), None) if !v.is_empty() => Ok(Some(v.clone())),
        _ => Ok(None),
    }
}

fn weak(v: &str) -> Option<&'static str> {
    let low = v.to_ascii_lowercase();
    if PLACEHOLDERS.iter().any(|p| low.contains(p)) {
        Some("is a placeholder value")
    } else if v.len() < 32 {
        Some("is shorter than 32 bytes")
    } else {
        None
    }
}

fn check_secret(
    r: &mut Report,
    name: &str,
    inline: &Option<String>,
    file: &Option<String>,
    read: ReadFile<'_>,
    required: bool,
) -> Option<String> {
    match secret(inline, file, read) {
        Err(why) => {
            r.fail(
                name,
                why,
                format!("set {name} or {name}_file (one of them) to a readable, non-empty file"),
            );
            None
        }
        Ok(None) => {
            if required {
                r.prod(
                    name,
                    "not set",
                    format!(
                        "set {name}_file to a file holding a random secret of at least 32 bytes"
                    ),
                );
            }
            None
        }
        Ok(Some(v)) => {
            match weak(&v) {
                Some(why) => r.prod(
                    name,
                    format!("value {why}"),
                    "use at least 32 random bytes (e.g. `openssl rand -hex 32`)",
                ),
                None => r.pass(
                    name,
                    if file.is_some() {
                        "set (from a file)"
                    } else {
                        "set"
                    },
                ),
            }
            Some(v)
        }
    }
}

/// Runs every check. `read` reads files the configuration names.
pub fn lint(c: &FileConfig, role: Role, production: bool, read: ReadFile<'_>) -> Vec<Finding> {
    let mut r = Report {
        production,
        out: Vec::new(),
    };
    r.pass("config", "parsed");
    if let Err(e) = c.validate() {
        r.fail(
            "config.secrets",
            e.to_string(),
            "keep either the value or its _file",
        );
    }
    let a = &c.auth;
    if role == Role::ControlPlane {
        let api = check_secret(
            &mut r,
            "auth.api_key",
            &a.api_key,
            &a.api_key_file,
            read,
            true,
        );
        let admin = check_secret(
            &mut r,
            "auth.admin_api_key",
            &a.admin_api_key,
            &a.admin_api_key_file,
            read,
            true,
        );
        match (&api, &admin) {
            (Some(x), Some(y)) if x == y => r.prod(
                "auth.key_separation",
                "the user and admin API keys are the same",
                "use different keys: the admin key must not be handed to users",
            ),
            _ => r.pass("auth.key_separation", "user and admin keys are separate"),
        }

        // Worker credentials.
        let signing = secret(&a.worker_signing_key, &a.worker_signing_key_file, read);
        let shared = secret(&a.worker_token, &a.worker_token_file, read);
        let per_worker = !a.worker_tokens.is_empty() || !a.worker_tokens_files.is_empty();
        let n_static = a.worker_tokens.len() + a.worker_tokens_files.len();
        let rotation: Vec<String> = a
            .worker_signing_keys
            .iter()
            .cloned()
            .chain(
                a.worker_signing_keys_files
                    .iter()
                    .filter_map(|f| read(f).map(|v| v.trim().to_string())),
            )
            .collect();
        let revoked = a.worker_revoked_token_ids.len();
        match &signing {
            Err(why) => r.fail(
                "auth.worker_signing_key",
                why.clone(),
                "point auth.worker_signing_key_file at a readable, non-empty file",
            ),
            Ok(Some(key)) => {
                match weak(key) {
                    Some(why) => r.prod(
                        "auth.worker_signing_key",
                        format!("value {why}"),
                        "use at least 32 random bytes",
                    ),
                    None => r.pass("auth.worker_signing_key", "signed worker tokens enabled"),
                }
                if a.worker_signing_key_file.is_some() {
                    r.pass(
                        "auth.worker_signing_key_file",
                        "signing key read from a file",
                    );
                } else {
                    r.warn(
                        "auth.worker_signing_key_file",
                        "signing key is inline in the config",
                        "move it to a file and set auth.worker_signing_key_file",
                    );
                }
                if !rotation.is_empty() {
                    let distinct: BTreeSet<&String> = rotation.iter().collect();
                    if rotation.iter().any(|k| k == key) {
                        r.warn(
                            "auth.worker_signing_keys",
                            "rotation keys include the active worker signing key",
                            "list only previous keys in auth.worker_signing_keys",
                        );
                    } else if distinct.len() != rotation.len() {
                        r.warn(
                            "auth.worker_signing_keys",
                            "rotation keys contain duplicates",
                            "list each previous key once",
                        );
                    } else {
                        r.pass(
                            "auth.worker_signing_keys",
                            format!(
                                "{} rotation key(s) accepted for verification",
                                rotation.len()
                            ),
                        );
                    }
                }
                if revoked > 0 {
                    r.pass(
                        "auth.worker_revoked_token_ids",
                        format!("{revoked} revoked token ID(s)"),
                    );
                }
                match &shared {
                    Ok(Some(_)) => r.warn("auth.worker_token", "shared worker token still configured with signed worker tokens", "remove auth.worker_token once every worker uses a signed or per-worker token"),
                    Err(why) => r.fail("auth.worker_token", why.clone(), "fix or remove auth.worker_token_file"),
                    Ok(None) => {}
                }
                if per_worker {
                    r.warn(
                        "auth.worker_tokens",
                        format!("{n_static} static per-worker token(s) still configured"),
                        "move those workers to signed tokens, then remove their static tokens",
                    );
                }
            }
            Ok(None) if !rotation.is_empty() => {
                r.prod(
                    "auth.worker_signing_key",
                    "rotation keys are set but no active signing key",
                    "set auth.worker_signing_key_file to the new key",
                );
                if revoked > 0 {
                    r.warn(
                        "auth.worker_revoked_token_ids",
                        "revoked token IDs without an active signing key",
                        "set the active signing key",
                    );
                }
            }
            Ok(None) if per_worker => {
                if revoked > 0 {
                    r.warn(
                        "auth.worker_revoked_token_ids",
                        "revoked token IDs but no signing key",
                        "revocation applies to signed tokens only",
                    );
                }
                r.pass(
                    "auth.worker_tokens",
                    format!("{n_static} per-worker token(s)"),
                );
                if let Ok(Some(_)) = shared {
                    r.warn(
                        "auth.worker_token",
                        "shared worker token configured next to per-worker tokens",
                        "remove auth.worker_token once every worker has its own token",
                    );
                }
            }
            Ok(None) => {
                if revoked > 0 {
                    r.warn(
                        "auth.worker_revoked_token_ids",
                        "revoked token IDs but no signing key",
                        "revocation applies to signed tokens only",
                    );
                }
                match &shared {
                    Ok(Some(_)) => {
                        r.prod("auth.worker_tokens", "using shared worker token", "give each worker its own token (auth.worker_tokens) or use signed tokens");
                        if a.worker_token_file.is_some() {
                            r.pass("auth.worker_token_file", "shared token read from a file");
                        } else {
                            r.warn(
                                "auth.worker_token_file",
                                "shared token is inline",
                                "move it to a file",
                            );
                        }
                    }
                    Err(why) => r.fail(
                        "auth.worker_token",
                        why.clone(),
                        "fix or remove auth.worker_token_file",
                    ),
                    // Worker routes are open without any credential: never production.
                    Ok(None) => r.prod(
                        "auth.worker_tokens",
                        "no worker credentials configured (worker routes are open)",
                        "configure auth.worker_tokens or auth.worker_signing_key",
                    ),
                }
            }
        }
        for (id, f) in &a.worker_tokens_files {
            if read(f).is_none_or(|v| v.trim().is_empty()) {
                r.fail(
                    &format!("auth.worker_tokens_files.{id}"),
                    format!("file {f} is missing or empty"),
                    "write the worker's token to it",
                );
            }
        }

        // Database.
        match c.database.driver.as_deref().unwrap_or("sqlite") {
            "postgres" | "postgresql" => {
                match secret(&c.database.dsn, &c.database.dsn_file, read) {
                    Ok(Some(dsn))
                        if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") =>
                    {
                        r.pass("database.dsn", "Postgres DSN set")
                    }
                    Ok(Some(_)) => r.fail(
                        "database.dsn",
                        "not a postgres:// URL",
                        "use postgres://user@host:port/db",
                    ),
                    Ok(None) => r.fail(
                        "database.dsn",
                        "database.driver is postgres but no DSN is set",
                        "set database.dsn_file",
                    ),
                    Err(why) => r.fail(
                        "database.dsn",
                        why,
                        "set database.dsn_file to a readable file",
                    ),
                }
            }
            "sqlite" => match c.database.path.as_deref() {
                Some(p) if Path::new(p).is_absolute() => {
                    r.pass("database.path", "absolute SQLite path")
                }
                _ => r.prod(
                    "database.path",
                    "SQLite path is relative or unset (it then depends on the working directory)",
                    "set database.path to an absolute path",
                ),
            },
            other => r.fail(
                "database.driver",
                format!("unknown driver {other:?}"),
                "use sqlite or postgres",
            ),
        }

        // Limits.
        let d = &c.defaults;
        if d.max_sandboxes.unwrap_or(0) <= 0 || d.max_sandboxes_per_owner.unwrap_or(0) <= 0 {
            r.prod(
                "defaults.sandbox_caps",
                "a sandbox cap is unlimited",
                "set defaults.max_sandboxes and defaults.max_sandboxes_per_owner",
            );
        } else {
            r.pass("defaults.sandbox_caps", "global and per-owner caps set");
        }
        for (name, v) in [
            ("defaults.max_ttl", &d.max_ttl),
            ("defaults.max_exec_timeout", &d.max_exec_timeout),
        ] {
            match v.as_deref().map(stacyvm_api::parse_duration) {
                Some(Ok(t)) if !t.is_zero() => r.pass(name, "set"),
                Some(Err(e)) => r.fail(name, e, "use a duration such as 24h or 10m"),
                _ => r.prod(
                    name,
                    "not set (the built-in default applies)",
                    format!("set {name} explicitly"),
                ),
            }
        }

        // Cluster identity and Raft TLS.
        let n = &c.node;
        match n.id {
            Some(id) if id > 0 => r.pass("node.id", format!("node {id}")),
            _ => r.prod(
                "node.id",
                "node ID not set",
                "set node.id (never reuse a removed node's ID)",
            ),
        }
        match n.data_dir.as_deref() {
            Some(p) if Path::new(p).is_absolute() => r.pass("node.data_dir", "absolute"),
            _ => r.prod(
                "node.data_dir",
                "data directory is relative or unset",
                "set node.data_dir to an absolute path",
            ),
        }
        if n.bootstrap || !n.peers.is_empty() || n.join.is_some() {
            r.pass("node.peers", "bootstrap, peers or join given");
        } else {
            r.prod(
                "node.peers",
                "no peers, bootstrap or join: a one-replica cluster",
                "list the initial members in node.peers or set node.join",
            );
        }
        match (n.certs_dir.as_deref(), n.id) {
            (Some(dir), Some(id)) => {
                let missing: Vec<String> = [
                    "ca.pem".to_string(),
                    format!("node-{id}.pem"),
                    format!("node-{id}-key.pem"),
                ]
                .into_iter()
                .filter(|f| read(&format!("{dir}/{f}")).is_none())
                .collect();
                if missing.is_empty() {
                    r.pass("node.certs_dir", "Raft TLS files present and readable");
                } else {
                    r.fail(
                        "node.certs_dir",
                        format!("missing or unreadable: {}", missing.join(", ")),
                        "stacyvm certs init / certs issue node --id N",
                    );
                }
            }
            _ => r.prod(
                "node.certs_dir",
                "no Raft TLS directory (certificates would be generated into the data directory)",
                "issue certificates from one cluster CA and set node.certs_dir",
            ),
        }
    }

    // Worker RPC mTLS, for the role.
    let t = &c.worker.rpc_tls;
    if !t.enabled {
        r.warn(
            "worker.rpc_tls.enabled",
            "worker RPC is plain HTTP",
            "enable worker.rpc_tls with certificates from the cluster CA",
        );
    } else {
        let need: Vec<(&str, &Option<String>)> = match role {
            Role::ControlPlane => vec![
                ("worker.rpc_tls.ca_file", &t.ca_file),
                ("worker.rpc_tls.client_cert_file", &t.client_cert_file),
                ("worker.rpc_tls.client_key_file", &t.client_key_file),
            ],
            Role::Worker => vec![
                ("worker.rpc_tls.server_cert_file", &t.server_cert_file),
                ("worker.rpc_tls.server_key_file", &t.server_key_file),
                ("worker.rpc_tls.client_ca_file", &t.client_ca_file),
            ],
        };
        for (name, v) in need {
            match v {
                Some(f) if read(f).is_some() => r.pass(name, "readable"),
                Some(f) => r.fail(
                    name,
                    format!("{f} cannot be read"),
                    "fix the path or the permissions",
                ),
                None => r.prod(name, "not set", format!("set {name}")),
            }
        }
    }
    if role == Role::Worker {
        match c.worker.id.as_deref() {
            Some(id) if stacyvm_api::check_name("worker id", id).is_ok() => {
                r.pass("worker.id", "set")
            }
            Some(_) => r.fail(
                "worker.id",
                "not a valid worker ID",
                "use letters, digits, '.', '_', '@', ':' or '-'",
            ),
            None => r.prod(
                "worker.id",
                "not set (the host name is used)",
                "set worker.id",
            ),
        }
        if c.worker.bootstrap.is_empty() {
            r.fail(
                "worker.bootstrap",
                "no replica to join through",
                "list replica API addresses in worker.bootstrap",
            );
        } else {
            r.pass(
                "worker.bootstrap",
                format!("{} replica address(es)", c.worker.bootstrap.len()),
            );
        }
        for (image, dir) in &c.runtimes.proot.images {
            let name = format!("runtimes.proot.images.{image}");
            if image.is_empty() || image.contains(char::is_whitespace) {
                r.fail(
                    &name,
                    "not a valid image name",
                    "name the image as spawns do (no spaces)",
                );
            } else if !Path::new(dir).is_absolute() {
                r.fail(
                    &name,
                    "rootfs directory is not an absolute path",
                    "give the rootfs directory as an absolute path",
                );
            } else {
                r.pass(&name, "absolute rootfs directory");
            }
        }
    }
    r.out
}

/// Prints a report; returns whether it has no FAIL.
pub fn print(findings: &[Finding]) -> bool {
    for f in findings {
        let tag = match f.level {
            Level::Pass => "PASS",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        println!("[{tag}] {}: {}", f.name, f.message);
        if let Some(fix) = &f.fix {
            println!("    fix: {fix}");
        }
    }
    !findings.iter().any(|f| f.level == Level::Fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const KEY32: &str = "k0123456789abcdef0123456789abcdef";

    fn files() -> BTreeMap<String, String> {
        [
            ("/s/api", "a-0123456789abcdef0123456789abcdef"),
            ("/s/admin", "b-0123456789abcdef0123456789abcdef"),
            ("/s/signing", KEY32),
            ("/s/w1", "w1-0123456789abcdef0123456789abcde"),
            ("/s/dsn", "postgres://stacyvm@db.internal:5432/stacyvm"),
            ("/certs/ca.pem", "pem"),
            ("/certs/node-1.pem", "pem"),
            ("/certs/node-1-key.pem", "pem"),
            ("/certs/client.pem", "pem"),
            ("/certs/client-key.pem", "pem"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
    }

    fn production_yaml(worker_auth: &str, database: &str) -> String {
        format!(
            "node:\n  id: 1\n  data_dir: /var/lib/stacyvm\n  certs_dir: /certs\n  bootstrap: true\n  peers: [\"1=10.0.0.1:7001=10.0.0.1:7423\"]\n\
             auth:\n  api_key_file: /s/api\n  admin_api_key_file: /s/admin\n{worker_auth}\
             database:\n{database}\
             defaults:\n  max_sandboxes: 1000\n  max_sandboxes_per_owner: 50\n  max_ttl: 24h\n  max_exec_timeout: 10m\n\
             worker:\n  rpc_tls:\n    enabled: true\n    ca_file: /certs/ca.pem\n    client_cert_file: /certs/client.pem\n    client_key_file: /certs/client-key.pem\n"
        )
    }

    fn run(yaml: &str, production: bool) -> Vec<Finding> {
        let cfg = FileConfig::parse(yaml, "test").expect("parse");
        let f = files();
        lint(&cfg, Role::ControlPlane, production, &|p| f.get(p).cloned())
    }

    fn fails(v: &[Finding]) -> Vec<String> {
        v.iter()
            .filter(|f| f.level == Level::Fail)
            .map(|f| format!("{}: {}", f.name, f.message))
            .collect()
    }

    fn has(v: &[Finding], level: Level, msg: &str) -> bool {
        v.iter()
            .any(|f| f.level == level && f.message.contains(msg))
    }

    #[test]
    fn production_aligned_configs_pass() {
        let sqlite = "  driver: sqlite\n  path: /var/lib/stacyvm/stacyvm.db\n";
        let pg = "  driver: postgres\n  dsn_file: /s/dsn\n";
        for (auth, db) in [
            ("  worker_tokens_files:\n    w1: /s/w1\n", sqlite),
            ("  worker_signing_key_file: /s/signing\n", sqlite),
            ("  worker_signing_key_file: /s/signing\n", pg),
        ] {
            let out = run(&production_yaml(auth, db), true);
            assert!(fails(&out).is_empty(), "{auth}{db}: {:?}", fails(&out));
        }
    }

    #[test]
    fn migration_warnings() {
        let out = run(
            &production_yaml(
                &format!(
                    "  worker_signing_key: {KEY32}\n  worker_signing_keys: [{KEY32}]\n  worker_token: shared-token-0123456789abcdef0123456\n"
                ),
                "  driver: sqlite\n  path: /x.db\n",
            ),
            false,
        );
        assert!(has(
            &out,
            Level::Warn,
            "shared worker token still configured with signed worker tokens"
        ));
        assert!(has(
            &out,
            Level::Warn,
            "rotation keys include the active worker signing key"
        ));
        assert!(has(&out, Level::Warn, "signing key is inline"));
    }

    #[test]
    fn defaults_fail_production_and_secrets_never_print() {
        let yaml = "auth:\n  api_key: changeme-please-changeme-please-xx\n  admin_api_key: changeme-please-changeme-please-xx\n  worker_token: tiny\ndatabase:\n  driver: postgres\n";
        let out = run(yaml, true);
        let f = fails(&out);
        for name in [
            "auth.api_key",
            "auth.key_separation",
            "auth.worker_tokens",
            "database.dsn",
            "defaults.sandbox_caps",
            "node.id",
            "node.certs_dir",
        ] {
            assert!(
                f.iter().any(|l| l.starts_with(name)),
                "{name} should fail: {f:?}"
            );
        }
        let text = format!("{out:?}");
        assert!(
            !text.contains("changeme-please") && !text.contains("tiny"),
            "a secret leaked: {text}"
        );
        // Without --production the same findings are warnings.
        let soft = run(yaml, false);
        assert!(
            fails(&soft).iter().all(|l| l.starts_with("database.dsn")),
            "{:?}",
            fails(&soft)
        );
    }

    #[test]
    fn worker_role() {
        let yaml = "worker:\n  id: w1\n  bootstrap: [\"10.0.0.1:7423\"]\n  rpc_tls:\n    enabled: true\n    server_cert_file: /certs/node-1.pem\n    server_key_file: /certs/node-1-key.pem\n    client_ca_file: /certs/ca.pem\n";
        let cfg = FileConfig::parse(yaml, "t").expect("parse");
        let f = files();
        let out = lint(&cfg, Role::Worker, true, &|p| f.get(p).cloned());
        assert!(fails(&out).is_empty(), "{:?}", fails(&out));
        let proot = FileConfig::parse(
            "worker:\n  id: w1\n  bootstrap: [\"10.0.0.1:7423\"]\nruntimes:\n  proot:\n    images:\n      stacyvm-test/busybox:1: /srv/busybox\n      rel: srv/rel\n      \"bad name\": /srv/x\n",
            "t",
        )
        .expect("parse");
        let out = lint(&proot, Role::Worker, false, &|p| f.get(p).cloned());
        assert_eq!(
            fails(&out),
            vec![
                "runtimes.proot.images.bad name: not a valid image name",
                "runtimes.proot.images.rel: rootfs directory is not an absolute path",
            ]
        );
        let bare = FileConfig::parse("worker:\n  id: w1\n", "t").expect("parse");
        let out = lint(&bare, Role::Worker, true, &|p| f.get(p).cloned());
        assert!(
            fails(&out)
                .iter()
                .any(|l| l.starts_with("worker.bootstrap"))
        );
    }
}
