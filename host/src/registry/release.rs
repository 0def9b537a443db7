//! Signed releases: the canonical record of one published component, its Ed25519 signature,
//! the keys a worker trusts per task-name pattern (`trust.toml`), and the check on every load.

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use semver::Version;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// What a signed release says about one published component. Signed as the exact JSON text
/// [`SignedRelease::record`] carries, so no re-encoding ever changes what was signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub task: String,
    pub version: String,
    /// Hex SHA-256 of the component bytes.
    pub component_sha256: String,
    /// Hex SHA-256 of the manifest bytes, if the release has a manifest.
    pub manifest_sha256: Option<String>,
    /// The taskhost world the component exports (`0.3.0`).
    pub world: String,
    /// Who published (from `--publisher`, or the CI actor, or the user).
    pub publisher: String,
    /// The signing key's id ([`key_id`]).
    pub key_id: String,
    /// RFC 3339.
    pub time: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci_run: Option<String>,
}

impl ReleaseRecord {
    /// `name@version`, the release's key everywhere.
    pub fn key(&self) -> String {
        format!("{}@{}", self.task, self.version)
    }
}

/// The record's exact text, its signature and the key that made it: what the broker
/// stores and what sits beside a component as `<task>@<version>.release.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedRelease {
    pub record: String,
    /// Base64 Ed25519 signature of `record`'s bytes.
    pub signature: String,
    /// Base64 of the 32-byte public key.
    pub public_key: String,
}

/// Largest `.release.json` read.
pub const MAX_RELEASE_BYTES: u64 = 16 << 10;

impl SignedRelease {
    pub fn sign(record: &ReleaseRecord, key: &SigningKey) -> SignedRelease {
        let text = serde_json::to_string(record).expect("a record always encodes");
        let signature = key.sign(text.as_bytes());
        SignedRelease {
            record: text,
            signature: b64().encode(signature.to_bytes()),
            public_key: b64().encode(key.verifying_key().to_bytes()),
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<SignedRelease, Refusal> {
        serde_json::from_slice(bytes).map_err(|e| Refusal::Malformed(format!("release file: {e}")))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a signed release always encodes")
    }

    /// The record, unchecked (for listings; loads go through [`Trust::verify`]).
    pub fn unverified_record(&self) -> Result<ReleaseRecord, Refusal> {
        serde_json::from_str(&self.record).map_err(|e| Refusal::Malformed(format!("release record: {e}")))
    }

    fn public_key(&self) -> Result<VerifyingKey, Refusal> {
        let bytes: [u8; 32] = b64()
            .decode(self.public_key.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| Refusal::Malformed("public_key is not 32 bytes of base64".into()))?;
        VerifyingKey::from_bytes(&bytes).map_err(|e| Refusal::Malformed(format!("public_key: {e}")))
    }

    fn check_signature(&self, key: &VerifyingKey) -> Result<(), Refusal> {
        let bytes: [u8; 64] = b64()
            .decode(self.signature.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| Refusal::Malformed("signature is not 64 bytes of base64".into()))?;
        key.verify_strict(self.record.as_bytes(), &Signature::from_bytes(&bytes)).map_err(|_| Refusal::BadSignature)
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `ed25519:` and the first 16 hex digits of the public key's SHA-256.
pub fn key_id(key: &VerifyingKey) -> String {
    format!("ed25519:{}", &sha256_hex(key.as_bytes())[..16])
}

/// Why a component is not loaded under the trust policy.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("unsigned: no release record beside it (sign with `taskhost publish`, or run the worker with --allow-unsigned for development)")]
    Unsigned,
    #[error("the signature does not match the release record")]
    BadSignature,
    #[error("signed by {0}, a key trust.toml does not list")]
    UnknownKey(String),
    #[error("signed by key {0:?}, which trust.toml marks revoked")]
    Revoked(String),
    #[error("signed by key {key:?}, which trust.toml does not trust for task {task}")]
    NotTrustedFor { key: String, task: String },
    #[error("the {what} differs from the one signed (sha256 {found}, signed {signed})")]
    DigestMismatch { what: &'static str, found: String, signed: String },
    #[error("the release record names {signed}, not {found}")]
    WrongRelease { signed: String, found: String },
    #[error("{0}")]
    Malformed(String),
}

/// One `[[key]]` of trust.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustedKeyEntry {
    name: String,
    public_key: String,
    /// Task-name patterns this key may publish (`*` matches any run, dots included).
    tasks: Vec<String>,
    #[serde(default)]
    revoked: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustFile {
    #[serde(default)]
    key: Vec<TrustedKeyEntry>,
}

#[derive(Debug, Clone)]
struct TrustedKey {
    entry: TrustedKeyEntry,
    key: VerifyingKey,
}

/// The keys a worker accepts releases from, and for which task names.
#[derive(Debug, Clone)]
pub struct Trust {
    pub path: PathBuf,
    keys: Vec<TrustedKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
}

impl Trust {
    pub fn load(path: &Path) -> Result<Trust, TrustError> {
        let invalid = |reason: String| TrustError::Invalid { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
        Self::parse(&text).map(|mut t| {
            t.path = path.to_path_buf();
            t
        })
        .map_err(|e| match e {
            TrustError::Invalid { reason, .. } => invalid(reason),
        })
    }

    pub fn parse(text: &str) -> Result<Trust, TrustError> {
        let invalid = |reason: String| TrustError::Invalid { path: PathBuf::from("trust.toml"), reason };
        let file: TrustFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut keys = Vec::new();
        for entry in file.key {
            let key = parse_public_key(&entry.public_key).map_err(|e| invalid(format!("key {:?}: {e}", entry.name)))?;
            if entry.tasks.is_empty() {
                return Err(invalid(format!("key {:?}: tasks is empty (list the task-name patterns it may publish)", entry.name)));
            }
            keys.push(TrustedKey { entry, key });
        }
        Ok(Trust { path: PathBuf::from("trust.toml"), keys })
    }

    /// Checks a release against this policy: a trusted, unrevoked key allowed for the task
    /// signed a record naming this task and version and these very bytes.
    pub fn verify(
        &self,
        task: &str,
        version: &Version,
        component: &[u8],
        manifest: Option<&[u8]>,
        signed: Option<&SignedRelease>,
    ) -> Result<ReleaseRecord, Refusal> {
        let signed = signed.ok_or(Refusal::Unsigned)?;
        let public = signed.public_key()?;
        // A key listed twice: revoked if any entry revokes it, trusted for what any allows.
        let entries: Vec<&TrustedKey> = self.keys.iter().filter(|k| k.key == public).collect();
        let first = entries.first().ok_or_else(|| Refusal::UnknownKey(key_id(&public)))?;
        signed.check_signature(&first.key)?;
        if let Some(revoked) = entries.iter().find(|k| k.entry.revoked) {
            return Err(Refusal::Revoked(revoked.entry.name.clone()));
        }
        let record = signed.unverified_record()?;
        if !entries.iter().flat_map(|k| &k.entry.tasks).any(|p| crate::runtime::name_matches(p, task)) {
            return Err(Refusal::NotTrustedFor { key: first.entry.name.clone(), task: task.to_string() });
        }
        let named = format!("{task}@{version}");
        if record.task != task || Version::parse(&record.version).ok().as_ref() != Some(version) {
            return Err(Refusal::WrongRelease { signed: record.key(), found: named });
        }
        check_digest("component", component, Some(&record.component_sha256))?;
        match (manifest, &record.manifest_sha256) {
            (None, None) => {}
            (Some(m), signed) => check_digest("manifest", m, signed.as_ref())?,
            (None, Some(signed)) => {
                return Err(Refusal::DigestMismatch { what: "manifest", found: "absent".into(), signed: signed.clone() })
            }
        }
        Ok(record)
    }
}

fn check_digest(what: &'static str, bytes: &[u8], signed: Option<&String>) -> Result<(), Refusal> {
    let found = sha256_hex(bytes);
    match signed {
        Some(s) if *s == found => Ok(()),
        Some(s) => Err(Refusal::DigestMismatch { what, found, signed: s.clone() }),
        None => Err(Refusal::DigestMismatch { what, found, signed: "none".into() }),
    }
}

pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let text = text.trim();
    let text = text.strip_prefix("ed25519:").unwrap_or(text);
    let bytes: [u8; 32] = b64()
        .decode(text)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("not 32 bytes of base64")?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| e.to_string())
}

/// A private key as `taskhost keygen` writes it: the 32-byte seed in base64 on one line.
pub fn parse_signing_key(text: &str) -> Result<SigningKey, String> {
    let bytes: [u8; 32] = b64()
        .decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("a signing key is 32 bytes of base64 on one line (as `taskhost keygen` writes it)")?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// A fresh key from the OS's randomness.
pub fn generate_signing_key() -> SigningKey {
    SigningKey::from_bytes(&rand::random::<[u8; 32]>())
}

pub fn encode_signing_key(key: &SigningKey) -> String {
    b64().encode(key.to_bytes())
}

pub fn encode_public_key(key: &VerifyingKey) -> String {
    b64().encode(key.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(component: &[u8]) -> ReleaseRecord {
        ReleaseRecord {
            task: "media.thumbnail".into(),
            version: "1.4.0".into(),
            component_sha256: sha256_hex(component),
            manifest_sha256: None,
            world: "0.3.0".into(),
            publisher: "ci".into(),
            key_id: "x".into(),
            time: "2026-12-02T00:00:00Z".into(),
            size: component.len() as u64,
            git_commit: None,
            ci_run: None,
        }
    }

    fn trust_for(key: &SigningKey, tasks: &str, revoked: bool) -> Trust {
        Trust::parse(&format!(
            "[[key]]\nname = \"ci\"\npublic_key = \"{}\"\ntasks = [{tasks}]\nrevoked = {revoked}\n",
            encode_public_key(&key.verifying_key())
        ))
        .unwrap()
    }

    #[test]
    fn a_signed_release_verifies_and_every_tampering_is_refused() {
        let key = generate_signing_key();
        let bytes = b"\0asm component";
        let signed = SignedRelease::sign(&record(bytes), &key);
        let v = Version::parse("1.4.0").unwrap();
        let trust = trust_for(&key, "\"media.*\"", false);
        assert!(trust.verify("media.thumbnail", &v, bytes, None, Some(&signed)).is_ok());

        assert_eq!(trust.verify("media.thumbnail", &v, bytes, None, None), Err(Refusal::Unsigned));
        let flipped = b"\0asm componenu";
        assert!(matches!(trust.verify("media.thumbnail", &v, flipped, None, Some(&signed)), Err(Refusal::DigestMismatch { .. })));
        // A record edited after signing (the digest pointed at other bytes).
        let mut edited = signed.clone();
        edited.record = edited.record.replace(&sha256_hex(bytes), &sha256_hex(flipped));
        assert_eq!(trust.verify("media.thumbnail", &v, flipped, None, Some(&edited)), Err(Refusal::BadSignature));
        // Renamed: the same signed bytes offered as another task or version.
        assert!(matches!(trust.verify("media.other", &v, bytes, None, Some(&signed)), Err(Refusal::WrongRelease { .. })));
        let v2 = Version::parse("2.0.0").unwrap();
        assert!(matches!(trust.verify("media.thumbnail", &v2, bytes, None, Some(&signed)), Err(Refusal::WrongRelease { .. })));
        // A manifest added beside a release signed without one.
        assert!(matches!(trust.verify("media.thumbnail", &v, bytes, Some(b"queue='x'"), Some(&signed)), Err(Refusal::DigestMismatch { .. })));
        // Another key, its own public key in the file: not listed.
        let stranger = SignedRelease::sign(&record(bytes), &generate_signing_key());
        assert!(matches!(trust.verify("media.thumbnail", &v, bytes, None, Some(&stranger)), Err(Refusal::UnknownKey(_))));
        // The trusted key's public key pasted over a stranger's signature.
        let mut forged = stranger.clone();
        forged.public_key = signed.public_key.clone();
        assert_eq!(trust.verify("media.thumbnail", &v, bytes, None, Some(&forged)), Err(Refusal::BadSignature));
        // Trusted, but not for this name.
        assert!(matches!(
            trust_for(&key, "\"tasks.*\"", false).verify("media.thumbnail", &v, bytes, None, Some(&signed)),
            Err(Refusal::NotTrustedFor { .. })
        ));
        assert!(matches!(
            trust_for(&key, "\"media.*\"", true).verify("media.thumbnail", &v, bytes, None, Some(&signed)),
            Err(Refusal::Revoked(_))
        ));
    }

    #[test]
    fn a_key_listed_twice_is_revoked_if_either_entry_says_so() {
        let key = generate_signing_key();
        let bytes = b"component";
        let signed = SignedRelease::sign(&record(bytes), &key);
        let v = Version::parse("1.4.0").unwrap();
        let public = encode_public_key(&key.verifying_key());
        let twice = |second: &str| {
            Trust::parse(&format!(
                "[[key]]\nname='ci'\npublic_key='{public}'\ntasks=['tasks.*']\n[[key]]\nname='ci-again'\npublic_key='{public}'\n{second}\n"
            ))
            .unwrap()
        };
        assert!(matches!(
            twice("tasks=['media.*']\nrevoked=true").verify("media.thumbnail", &v, bytes, None, Some(&signed)),
            Err(Refusal::Revoked(_))
        ));
        assert!(twice("tasks=['media.*']").verify("media.thumbnail", &v, bytes, None, Some(&signed)).is_ok());
    }

    #[test]
    fn a_manifest_is_covered_by_the_signature() {
        let key = generate_signing_key();
        let bytes = b"component";
        let mut r = record(bytes);
        r.manifest_sha256 = Some(sha256_hex(b"queue = \"a\""));
        let signed = SignedRelease::sign(&r, &key);
        let v = Version::parse("1.4.0").unwrap();
        let trust = trust_for(&key, "\"*\"", false);
        assert!(trust.verify("media.thumbnail", &v, bytes, Some(b"queue = \"a\""), Some(&signed)).is_ok());
        assert!(trust.verify("media.thumbnail", &v, bytes, Some(b"queue = \"b\""), Some(&signed)).is_err());
        assert!(trust.verify("media.thumbnail", &v, bytes, None, Some(&signed)).is_err());
    }

    #[test]
    fn trust_files_say_what_is_wrong() {
        assert!(Trust::parse("[[key]]\nname='a'\npublic_key='nope'\ntasks=['*']\n").unwrap_err().to_string().contains("base64"));
        let valid = encode_public_key(&generate_signing_key().verifying_key());
        let empty = Trust::parse(&format!("[[key]]\nname='a'\npublic_key='{valid}'\ntasks=[]\n")).unwrap_err();
        assert!(empty.to_string().contains("tasks is empty"), "{empty}");
        assert!(Trust::parse("[[keys]]\n").is_err());
        let key = generate_signing_key();
        let round = parse_signing_key(&encode_signing_key(&key)).unwrap();
        assert_eq!(round.to_bytes(), key.to_bytes());
    }
}
