//! `stacyvm worker token issue | inspect | verify | rotation-plan`.
//!
//! Owns: the operator's view of signed worker tokens. Keys come from
//! `--signing-key-file` / `--verification-key-file` (or the config file's
//! `auth.*`, or `STACYVM_AUTH_WORKER_SIGNING_KEY`); a token argument of `-`
//! is read from stdin so it never sits in the process list. Output never
//! contains a key; `inspect` and `verify` never print the token itself.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;
use stacyvm_auth::token::{self, AUD_CONTROL_PLANE, AUD_RPC, Claims, Expect};

use crate::cli::CliError;
use crate::config::{AuthSources, FileConfig};

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint a signed token for a worker (prints the token, or JSON).
    Issue(IssueArgs),
    /// Decode a token without checking its signature.
    Inspect { token: String },
    /// Check a token's signature and claims.
    Verify(VerifyArgs),
    /// The steps of a no-downtime signing-key rotation (no secrets printed).
    RotationPlan(PlanArgs),
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    /// Configuration file with `auth.worker_signing_key[_file]` and rotation keys.
    #[arg(long, env = "STACYVM_CONFIG")]
    pub config: Option<PathBuf>,
    /// File holding the active signing key.
    #[arg(long)]
    pub signing_key_file: Option<PathBuf>,
    /// Files holding previous keys still accepted during a rotation (repeatable).
    #[arg(long = "verification-key-file")]
    pub verification_key_files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    pub worker_id: String,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Lifetime (at most 15m).
    #[arg(long, default_value = "5m")]
    pub ttl: String,
    #[arg(long, default_value = AUD_CONTROL_PLANE)]
    pub audience: String,
    /// Scope to grant (repeatable); default: heartbeat and lease.
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// Token ID (default: 16 random bytes, hex).
    #[arg(long)]
    pub token_id: Option<String>,
    /// Not valid before now + this (default 0s: no nbf claim).
    #[arg(long, default_value = "0s")]
    pub not_before: String,
    /// token or json.
    #[arg(long, default_value = "token")]
    pub format: String,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    pub token: String,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[arg(long, default_value = AUD_CONTROL_PLANE)]
    pub audience: String,
    /// The worker the token must be for.
    #[arg(long)]
    pub worker_id: String,
    /// Token IDs to treat as revoked (repeatable; adds to the config's list).
    #[arg(long = "revoked-token-id")]
    pub revoked: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[arg(long, default_value = "auth.worker_signing_key")]
    pub new_key_ref: String,
    #[arg(long, default_value = "auth.worker_signing_keys[0]")]
    pub previous_key_ref: String,
    /// The longest token lifetime in use (at most 15m).
    #[arg(long, default_value = "15m")]
    pub ttl: String,
    /// text or json.
    #[arg(long, default_value = "text")]
    pub format: String,
}

fn now_s() -> i64 {
    stacyvm_store::Ts::now().micros() / 1_000_000
}

fn read_token(arg: &str) -> Result<String, CliError> {
    if arg == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| CliError::Failed(e.to_string()))?;
        Ok(s.trim().to_string())
    } else {
        Ok(arg.trim().to_string())
    }
}

fn read_key(path: &PathBuf) -> Result<String, CliError> {
    let v = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    let v = v.trim().to_string();
    if v.is_empty() {
        return Err(CliError::Usage(format!("{} is empty", path.display())));
    }
    Ok(v)
}

/// The worker credential rules from flags, config and environment.
fn worker_auth(k: &KeyArgs) -> Result<stacyvm_auth::WorkerAuth, CliError> {
    let cfg = FileConfig::load_optional(k.config.as_deref())
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let mut wa = AuthSources::from_config(&cfg)
        .and_then(|s| s.worker_auth())
        .map_err(|e| CliError::Usage(e.to_string()))?;
    if let Some(f) = &k.signing_key_file {
        wa.signing_key = Some(stacyvm_auth::Secret::new(read_key(f)?));
    }
    for f in &k.verification_key_files {
        wa.verify_keys.push(stacyvm_auth::Secret::new(read_key(f)?));
    }
    Ok(wa)
}

fn claims_json(c: &Claims, verified: bool) -> serde_json::Value {
    let ts = |s: i64| crate::api::rfc3339(stacyvm_store::Ts(s.saturating_mul(1_000_000)));
    json!({
        "signature_verified": verified,
        "worker_id": c.worker_id,
        "token_id": c.jti,
        "audience": c.aud,
        "scopes": c.scopes,
        "issued_at": ts(c.iat),
        "not_before": c.nbf.map(ts),
        "expires_at": ts(c.exp),
    })
}

fn token_err(e: token::TokenError) -> CliError {
    CliError::Refused(format!("{e} ({})", e.reason()))
}

pub fn run(cmd: TokenCommand) -> Result<(), CliError> {
    match cmd {
        TokenCommand::Issue(a) => {
            let ttl = stacyvm_api::parse_duration(&a.ttl)
                .map_err(|e| CliError::Usage(format!("--ttl: {e}")))?;
            let nbf = stacyvm_api::parse_duration(&a.not_before)
                .map_err(|e| CliError::Usage(format!("--not-before: {e}")))?;
            if ttl.is_zero() || ttl.as_secs() > token::MAX_LIFETIME_S as u64 {
                return Err(CliError::Usage("--ttl must be between 1s and 15m".into()));
            }
            if a.audience != AUD_CONTROL_PLANE && a.audience != AUD_RPC {
                return Err(CliError::Usage(format!(
                    "--audience must be {AUD_CONTROL_PLANE} or {AUD_RPC}"
                )));
            }
            stacyvm_api::check_name("worker id", &a.worker_id).map_err(|e| CliError::Usage(e.0))?;
            let wa = worker_auth(&a.keys)?;
            let scopes: Vec<&str> = if a.scopes.is_empty() {
                vec!["worker:heartbeat", "worker:lease"]
            } else {
                a.scopes.iter().map(String::as_str).collect()
            };
            let now = now_s();
            let mut c = token::claims_for(
                &a.worker_id,
                &a.audience,
                &scopes,
                now,
                i64::try_from(ttl.as_secs()).unwrap_or(0),
            );
            if let Some(j) = a.token_id {
                c.jti = j;
            }
            if !nbf.is_zero() {
                c.nbf = Some(now + i64::try_from(nbf.as_secs()).unwrap_or(0));
            }
            let t = wa.issue(&c).map_err(token_err)?;
            if a.format == "json" {
                let mut v = claims_json(&c, true);
                v["token"] = json!(t);
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                println!("{t}");
            }
        }
        TokenCommand::Inspect { token: t } => {
            let c = token::decode_unverified(&read_token(&t)?).map_err(token_err)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&claims_json(&c, false)).unwrap_or_default()
            );
        }
        TokenCommand::Verify(a) => {
            let wa = worker_auth(&a.keys)?;
            let keys = wa.keys();
            let t = read_token(&a.token)?;
            let expect = Expect {
                audience: &a.audience,
                worker_id: &a.worker_id,
                now: now_s(),
                scope: None,
            };
            let revoked = |j: &str| wa.revoked.contains(j) || a.revoked.iter().any(|r| r == j);
            let c = token::verify(&t, &keys, &expect, &revoked).map_err(token_err)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&claims_json(&c, true)).unwrap_or_default()
            );
        }
        TokenCommand::RotationPlan(a) => {
            let ttl = stacyvm_api::parse_duration(&a.ttl)
                .map_err(|e| CliError::Usage(format!("--ttl: {e}")))?;
            if ttl.as_secs() > token::MAX_LIFETIME_S as u64 {
                return Err(CliError::Usage("--ttl must be at most 15m".into()));
            }
            let wait = stacyvm_api::format_duration(
                ttl + std::time::Duration::from_secs(token::SKEW_S as u64),
            );
            let steps = [
                format!("1. Generate a new key and set it as {} (kept in a secret file); keep the old key's file.", a.new_key_ref),
                format!("2. Move the old key to {}, so tokens it signed still verify.", a.previous_key_ref),
                "3. Roll the change to every replica (secret files are re-read when they change; otherwise restart one replica at a time) and re-issue worker tokens.".to_string(),
                format!("4. Wait at least {wait} (the longest token lifetime plus clock skew) so no token signed by the old key is still valid."),
                format!("5. Remove the old key from {} and roll again.", a.previous_key_ref),
            ];
            let snippet = "auth:\n  worker_signing_key_file: /etc/stacyvm/worker-signing-key.new\n  worker_signing_keys_files:\n    - /etc/stacyvm/worker-signing-key.old\n";
            let validation = [
                "stacyvm config lint --production --file <config>: no FAIL; warns while the old key is still listed".to_string(),
                "stacyvm worker token verify <token signed by the old key> --worker-id <id> --config <config>: accepted during the window".to_string(),
                format!("after {wait}: the same token is refused (expired) and the old key can go"),
            ];
            if a.format == "json" {
                let v = json!({
                    "new_key_ref": a.new_key_ref,
                    "previous_key_ref": a.previous_key_ref,
                    "max_token_ttl": stacyvm_api::format_duration(ttl),
                    "steps": steps,
                    "config_snippet": snippet,
                    "validation": validation,
                });
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                println!("Worker signing-key rotation plan (no secrets shown)\n");
                for s in &steps {
                    println!("{s}");
                }
                println!("\nConfig during the window:\n{snippet}\nValidation:");
                for v in &validation {
                    println!("- {v}");
                }
            }
        }
    }
    Ok(())
}
