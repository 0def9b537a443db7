//! The worker's secrets, read once at start: a TOML file of `NAME = "value"` lines
//! (`--secrets`) and `TASKHOST_SECRET_<NAME>` variables, which win. Values are handed
//! only to tasks whose manifest grants the name, and never printed.

use super::CliError;
use anyhow::anyhow;
use std::collections::BTreeMap;
use std::path::Path;

const ENV_PREFIX: &str = "TASKHOST_SECRET_";

pub fn load(file: Option<&Path>) -> Result<BTreeMap<String, String>, CliError> {
    let mut secrets = BTreeMap::new();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CliError::usage(anyhow!("reading secrets {}: {e}", path.display())))?;
        let table: toml::Table =
            toml::from_str(&text).map_err(|e| CliError::usage(anyhow!("secrets {}: {}", path.display(), e.message())))?;
        for (name, value) in table {
            // The value is not quoted back: an error must not leak a secret.
            let toml::Value::String(value) = value else {
                return Err(CliError::usage(anyhow!("secrets {}: {name} must be a string", path.display())));
            };
            secrets.insert(name, value);
        }
    }
    secrets.extend(from_env(std::env::vars()));
    Ok(secrets)
}

fn from_env(vars: impl Iterator<Item = (String, String)>) -> impl Iterator<Item = (String, String)> {
    vars.filter_map(|(k, v)| k.strip_prefix(ENV_PREFIX).filter(|n| !n.is_empty()).map(|n| (n.to_string(), v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_adds_to_and_overrides_the_file() {
        let dir = std::env::temp_dir().join(format!("taskhost-secrets-{}", std::process::id()));
        std::fs::write(&dir, "API_TOKEN = \"from-file\"\nSMTP_PASSWORD = \"p\"\n").unwrap();
        let from_file = load(Some(&dir)).unwrap();
        assert_eq!(from_file.get("SMTP_PASSWORD").map(String::as_str), Some("p"));
        let env = from_env([("TASKHOST_SECRET_API_TOKEN".to_string(), "env".to_string()), ("HOME".into(), "/".into())].into_iter());
        assert_eq!(env.collect::<Vec<_>>(), vec![("API_TOKEN".to_string(), "env".to_string())]);
        std::fs::write(&dir, "N = 3\n").unwrap();
        match load(Some(&dir)) {
            // Exactly this: the value itself is never quoted back.
            Err(CliError::Usage(e)) => assert_eq!(e.to_string(), format!("secrets {}: N must be a string", dir.display())),
            other => panic!("{other:?}"),
        }
        let _ = std::fs::remove_file(&dir);
    }
}
