//! `taskhost.toml`: defaults for the command line. Precedence is flags > environment
//! variables > this file > built-in defaults. Unknown keys are rejected.

use super::CliError;
use anyhow::{anyhow, Context as _};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Looked for in the working directory when neither --config nor TASKHOST_CONFIG is given.
pub const DEFAULT_CONFIG_FILE: &str = "taskhost.toml";
/// The embedded broker and result store: a SQLite file beside where taskhost runs.
pub const DEFAULT_BROKER: &str = "sqlite://./taskhost.db";
pub const DEFAULT_PLUGINS: &str = "./plugins";

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub broker: Option<String>,
    pub result_backend: Option<String>,
    pub plugins: Option<PathBuf>,
    pub queues: Option<Vec<String>>,
    pub concurrency: Option<usize>,
    pub processes: Option<usize>,
    pub prefetch_multiplier: Option<usize>,
    /// See `taskhost serve --worker-nice`.
    pub worker_nice: Option<u8>,
    pub visibility_timeout: Option<f64>,
    pub shutdown_grace: Option<f64>,
    pub result_expires: Option<f64>,
    pub track_started: Option<bool>,
    pub hostname: Option<String>,
    /// trust.toml: the keys allowed to publish releases (see `taskhost serve --trust`).
    pub trust: Option<PathBuf>,
    /// The operator's ceilings (see `cli/limits.rs`).
    pub limits: Option<super::limits::LimitsFile>,
    /// The most any manifest may grant (see `cli/limits.rs`).
    pub grants: Option<super::limits::GrantsFile>,
}

impl FileConfig {
    /// Reads `explicit` (which must exist) or `./taskhost.toml` (if it exists).
    pub fn load(explicit: Option<&Path>) -> Result<FileConfig, CliError> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => PathBuf::from(DEFAULT_CONFIG_FILE),
            None => return Ok(FileConfig::default()),
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading config {}", path.display()))
            .map_err(CliError::Usage)?;
        toml::from_str(&text).map_err(|e| CliError::usage(anyhow!("config {}: {}", path.display(), e.message())))
    }

    pub fn broker(&self, flag_or_env: Option<&str>) -> String {
        flag_or_env.map(str::to_string).or_else(|| self.broker.clone()).unwrap_or_else(|| DEFAULT_BROKER.to_string())
    }

    /// The result backend: flag/env, file, else the broker's own URL.
    pub fn result_backend(&self, flag_or_env: Option<&str>, broker: &str) -> String {
        flag_or_env.map(str::to_string).or_else(|| self.result_backend.clone()).unwrap_or_else(|| broker.to_string())
    }

    pub fn plugins(&self, flag_or_env: Option<&Path>) -> PathBuf {
        flag_or_env.map(Path::to_path_buf).or_else(|| self.plugins.clone()).unwrap_or_else(|| PathBuf::from(DEFAULT_PLUGINS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let file: FileConfig = toml::from_str("broker = \"redis://file:6379/0\"\nplugins = \"/srv/plugins\"").unwrap();
        assert_eq!(file.broker(Some("redis://flag/0")), "redis://flag/0");
        assert_eq!(file.broker(None), "redis://file:6379/0");
        assert_eq!(FileConfig::default().broker(None), DEFAULT_BROKER);
        assert_eq!(file.result_backend(None, "redis://b/1"), "redis://b/1");
        assert_eq!(file.plugins(None), PathBuf::from("/srv/plugins"));
        assert_eq!(FileConfig::default().plugins(None), PathBuf::from("./plugins"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = toml::from_str::<FileConfig>("brokr = \"x\"").unwrap_err();
        assert!(e.message().starts_with("unknown field `brokr`"), "{}", e.message());
    }
}
