//! The one place Raft commands are encoded and decoded.
//!
//! A log entry's payload is `[version byte] ++ bincode(Command)`. Version 1 is
//! the first format. Rules that keep every committed entry readable forever:
//! new [`Command`] (and store `Mutation`) variants go at the end; existing
//! variants and fields never change meaning; a format change bumps
//! [`CURRENT_VERSION`] and keeps a decoder for every older version. The
//! fixtures under `raft/tests/fixtures/` are version-1 encodings that must keep
//! decoding to the same values.
//!
//! bincode is behind this module alone (it is unmaintained, RUSTSEC-2025-0141),
//! so swapping it touches nothing else.

use serde::{Deserialize, Serialize};
use stacyvm_store::Mutation;

/// The format [`encode`] writes.
pub const CURRENT_VERSION: u8 = 1;
/// Largest payload [`decode`] accepts; anything bigger is corruption or abuse.
pub const MAX_PAYLOAD: usize = 64 * 1024 * 1024;

/// What one Raft log entry asks every replica to do. The leader has already
/// filled in every non-deterministic input (IDs, timestamps, "now").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Apply these store mutations, in order, in one transaction.
    Store(Vec<Mutation>),
}

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty command payload")]
    Empty,
    #[error("command payload is {0} bytes; the limit is {MAX_PAYLOAD}")]
    TooLarge(usize),
    #[error(
        "command format version {0} is newer than this binary understands (up to {CURRENT_VERSION}); upgrade stacyvm"
    )]
    UnknownVersion(u8),
    #[error("corrupt command payload (version {version}): {reason}")]
    Corrupt { version: u8, reason: String },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_PAYLOAD>()
}

/// Encodes `cmd` in the current format (fails only past [`MAX_PAYLOAD`]).
pub fn encode(cmd: &Command) -> Result<Vec<u8>, DecodeError> {
    encode_value(cmd)
}

/// Decodes a command payload of any supported version.
pub fn decode(bytes: &[u8]) -> Result<Command, DecodeError> {
    decode_value(bytes)
}

/// Encodes any serde value (log entries, votes, log IDs, snapshots) in the
/// current format: the same version byte, the same bincode configuration.
pub fn encode_value<T: Serialize>(value: &T) -> Result<Vec<u8>, DecodeError> {
    let mut out = vec![CURRENT_VERSION];
    let body =
        bincode::serde::encode_to_vec(value, config()).map_err(|e| DecodeError::Corrupt {
            version: CURRENT_VERSION,
            reason: e.to_string(),
        })?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a value written by [`encode_value`], of any supported version.
/// Version 1 is the only one so far; a later format adds its arm here and
/// keeps this one.
pub fn decode_value<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if bytes.len() > MAX_PAYLOAD {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    if version != 1 {
        return Err(DecodeError::UnknownVersion(version));
    }
    let (v, used) = bincode::serde::decode_from_slice::<T, _>(body, config()).map_err(|e| {
        DecodeError::Corrupt {
            version,
            reason: e.to_string(),
        }
    })?;
    if used != body.len() {
        return Err(DecodeError::Corrupt {
            version,
            reason: format!("{} trailing bytes", body.len() - used),
        });
    }
    Ok(v)
}
