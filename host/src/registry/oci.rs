//! Release bytes in an OCI registry, in the CNCF Wasm artifact layout (config
//! `application/vnd.wasm.config.v0+json`, one `application/wasm` layer): push and pull.
//!
//! The broker keeps the signed record and where the bytes are; the bytes pulled are
//! checked against the signed digest like any others, so a location is only a hint.

use super::release::ReleaseRecord;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::OciImageManifest;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use std::collections::BTreeMap;

pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/wasm";
/// The manifest annotation carrying the signed release (JSON), for tools reading the registry.
pub const RELEASE_ANNOTATION: &str = "dev.taskhost.release";

/// `oci://host[:port]/repo/path` (HTTPS), or `oci+http://…` for a plain-HTTP registry.
#[derive(Debug, Clone, PartialEq)]
pub struct OciTarget {
    /// `host[:port]/repo/path`, no trailing slash.
    base: String,
    plain_http: bool,
}

/// The rest of an `oci://` (HTTPS) or `oci+http://` URL, and whether it is plain HTTP.
pub fn split_scheme(url: &str) -> Option<(&str, bool)> {
    match (url.strip_prefix("oci://"), url.strip_prefix("oci+http://")) {
        (Some(r), _) => Some((r, false)),
        (_, Some(r)) => Some((r, true)),
        _ => None,
    }
}

impl OciTarget {
    pub fn parse(url: &str) -> Result<OciTarget, String> {
        let (rest, plain_http) = split_scheme(url)
            .ok_or_else(|| format!("{url:?} is not oci://host/repository (or oci+http:// for a plain-HTTP registry)"))?;
        let base = rest.trim_end_matches('/');
        // A ':' only for the host's port; no digest, query or empty path segment.
        let path_ok = base.split('/').skip(1).all(|seg| !seg.is_empty() && !seg.contains(':'));
        if !base.contains('/') || base.starts_with('/') || base.contains(['@', '?', '#']) || !path_ok {
            return Err(format!("{url:?}: expected oci://host[:port]/repository"));
        }
        Ok(OciTarget { base: base.to_string(), plain_http })
    }

    /// Where `task@version` is pushed: `<base>/<task>:<version>` as a URL.
    pub fn location(&self, task: &str, version: &str) -> Result<String, String> {
        if task.chars().any(|c| c.is_ascii_uppercase()) || !task.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
            return Err(format!("task {task:?}: OCI repository names are lowercase letters, digits and . _ -"));
        }
        let scheme = if self.plain_http { "oci+http" } else { "oci" };
        Ok(format!("{scheme}://{}/{task}:{version}", self.base))
    }
}

fn parse_location(location: &str) -> Result<(Reference, bool), String> {
    let (rest, plain_http) = split_scheme(location).ok_or_else(|| format!("{location:?} is not an oci:// location"))?;
    let reference: Reference = rest.parse().map_err(|e| format!("{location}: {e}"))?;
    Ok((reference, plain_http))
}

fn client(reference: &Reference, plain_http: bool) -> Client {
    let protocol =
        if plain_http { ClientProtocol::HttpsExcept(vec![reference.resolve_registry().to_string()]) } else { ClientProtocol::Https };
    Client::new(ClientConfig { protocol, ..Default::default() })
}

/// Basic credentials from `TASKHOST_OCI_USERNAME` / `TASKHOST_OCI_PASSWORD`, else anonymous.
fn auth() -> RegistryAuth {
    match (std::env::var("TASKHOST_OCI_USERNAME"), std::env::var("TASKHOST_OCI_PASSWORD")) {
        (Ok(user), Ok(password)) if !user.is_empty() => RegistryAuth::Basic(user, password),
        _ => RegistryAuth::Anonymous,
    }
}

/// What [`push`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Pushed {
    Pushed,
    /// The tag already holds this very component.
    Same,
    /// The tag holds another component (its layer digest).
    Conflict(String),
}

fn layer_of(manifest: &OciImageManifest) -> Option<&oci_client::manifest::OciDescriptor> {
    manifest.layers.iter().find(|l| l.media_type == WASM_LAYER_MEDIA_TYPE)
}

/// Pushes a component to `location` (from [`OciTarget::location`]) unless the tag is taken.
pub async fn push(location: &str, component: &[u8], signed_json: &str, record: &ReleaseRecord) -> Result<Pushed, String> {
    let (reference, plain_http) = parse_location(location)?;
    let client = client(&reference, plain_http);
    let auth = auth();
    let wanted = format!("sha256:{}", record.component_sha256);
    if let Ok((manifest, _)) = client.pull_image_manifest(&reference, &auth).await {
        return Ok(match layer_of(&manifest) {
            Some(l) if l.digest == wanted => Pushed::Same,
            Some(l) => Pushed::Conflict(l.digest.clone()),
            None => Pushed::Conflict("a manifest without an application/wasm layer".into()),
        });
    }
    let config = serde_json::json!({
        "created": record.time,
        "architecture": "wasm",
        "os": "wasip2",
        "layerDigests": [wanted],
    });
    let config = Config::new(serde_json::to_vec(&config).map_err(|e| e.to_string())?, WASM_CONFIG_MEDIA_TYPE.to_string(), None);
    let layers = vec![ImageLayer::new(component.to_vec(), WASM_LAYER_MEDIA_TYPE.to_string(), None)];
    let annotations = BTreeMap::from([
        ("org.opencontainers.image.created".to_string(), record.time.clone()),
        ("org.opencontainers.image.title".to_string(), record.task.clone()),
        ("org.opencontainers.image.version".to_string(), record.version.clone()),
        // One line: the client writes canonical JSON, which leaves control characters raw.
        (RELEASE_ANNOTATION.to_string(), compact(signed_json)),
    ]);
    let manifest = OciImageManifest::build(&layers, &config, Some(annotations));
    client.push(&reference, &layers, config, &auth, Some(manifest)).await.map_err(|e| format!("pushing to {location}: {e}"))?;
    Ok(Pushed::Pushed)
}

fn compact(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json).map_or_else(|_| json.replace(['\n', '\r'], " "), |v| v.to_string())
}

/// Pulls the component at `location`, refusing one larger than `max` bytes before
/// fetching it.
pub async fn pull(location: &str, max: u64) -> Result<Vec<u8>, String> {
    let (reference, plain_http) = parse_location(location)?;
    let client = client(&reference, plain_http);
    let (manifest, _) = client.pull_image_manifest(&reference, &auth()).await.map_err(|e| format!("{location}: {e}"))?;
    let layer = layer_of(&manifest).ok_or_else(|| format!("{location}: no application/wasm layer"))?;
    if layer.size < 0 || layer.size as u64 > max {
        return Err(format!("{location}: component is {} bytes, above this worker's max_component_size ({max})", layer.size));
    }
    let mut out = Vec::with_capacity(layer.size as usize);
    client.pull_blob(&reference, layer, &mut out).await.map_err(|e| format!("{location}: {e}"))?;
    if out.len() as u64 > max {
        return Err(format!("{location}: component above max_component_size"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_locations() {
        let t = OciTarget::parse("oci://registry.example.com/team/tasks").unwrap();
        assert_eq!(t.location("media.thumbnail", "1.4.0").unwrap(), "oci://registry.example.com/team/tasks/media.thumbnail:1.4.0");
        let local = OciTarget::parse("oci+http://127.0.0.1:5000/taskhost/").unwrap();
        assert_eq!(local.location("tasks.add", "1.0.0").unwrap(), "oci+http://127.0.0.1:5000/taskhost/tasks.add:1.0.0");
        assert!(OciTarget::parse("oci://registry.example.com").is_err());
        assert!(OciTarget::parse("https://x/y").is_err());
        assert!(t.location("Media.Thumb", "1.0.0").is_err());
        let (r, plain) = parse_location("oci+http://127.0.0.1:5000/taskhost/tasks.add:1.0.0").unwrap();
        assert!(plain);
        assert_eq!((r.registry(), r.repository(), r.tag()), ("127.0.0.1:5000", "taskhost/tasks.add", Some("1.0.0")));
    }
}
