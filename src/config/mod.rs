//! Configuration: the TOML file as written ([`raw`], private), the resolved
//! form the rest of the program uses ([`Config`], in [`resolved`]), its
//! redacted printout for `check-config` ([`shown`]), and every default and
//! bound in one place ([`defaults`]).
//!
//! The file is read and validated exactly once: durations become
//! [`Duration`](std::time::Duration)s, URLs are parsed, glob patterns are
//! checked, every number is held to the bounds of [`defaults`] and every
//! secret is loaded from the environment or a file. Whatever is wrong is
//! reported as a [`ConfigError`] that names the file, the key and, where the
//! TOML parser knows it, the line, so `main` can print one clear message and
//! exit 2. Secrets are wrapped in `secrecy` types and never printed:
//! `check-config` shows where each one came from instead.

mod database;
pub mod defaults;
mod raw;
mod resolved;
mod shown;
#[cfg(test)]
mod tests;
mod webhook;

use std::path::{Path, PathBuf};

pub use database::{Cluster, PostgresDatabase, default_instance, without_password};
pub use raw::parse_duration;
pub use resolved::{Admin, Config, Delivery, Inbound, ListenAddr, LogFormat, Org, SecretSource, Upstream};
pub use webhook::{CaFile, ExtraHeader, SlackBot, Webhook};

/// Where the config file is looked for when neither `--config` nor
/// `$DARI_RELAY_CONFIG` names one.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/dari-relay/config.toml";

/// Headers a webhook's `headers` and `headers_env` may not set: the relay
/// sets these itself (the Standard Webhooks headers and the body's type,
/// INTERFACE.md), and the rest belong to HTTP framing.
pub const RESERVED_HEADERS: [&str; 9] = [
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-type",
    "user-agent",
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
];

/// Why a new watch is refused, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidWatch {
    /// The field of the watch (as in the admin API's JSON) that is wrong.
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

/// A configuration problem, reported before anything runs.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// The TOML did not parse or did not fit the schema; the parser's message
    /// already names the line, column and key.
    #[error("invalid config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    /// A value parsed but is not acceptable.
    #[error("{}{}: {key}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid { path: PathBuf, line: Option<usize>, key: String, message: String },
}

impl Config {
    /// Reads, parses and resolves the config file at `path`, taking secrets
    /// from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::from_toml(&text, path, &|name| std::env::var(name).ok())
    }

    /// Parses and resolves `text`; `env` looks up environment variables, so
    /// tests and the demo need not touch the process environment.
    pub fn from_toml(text: &str, path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string().trim_end().to_owned() })?;
        resolved::Resolver { text, path, env }.resolve(raw)
    }

    /// The webhook called `name`.
    pub fn webhook(&self, name: &str) -> Option<&Webhook> {
        self.webhooks.iter().find(|w| w.name == name)
    }

    /// The rules every new watch must follow, whoever adds it (CLI or API):
    /// its org has credentials and every webhook it names exists.
    pub fn check_watch(&self, watch: &crate::vocab::NewWatch) -> Result<(), InvalidWatch> {
        if !self.orgs.contains_key(&watch.portal.org) {
            return Err(InvalidWatch {
                field: "portal_id",
                message: format!(
                    "org {:?} has no [orgs.{}] table in {}; add its api_key_env or api_key_file first",
                    watch.portal.org,
                    watch.portal.org,
                    self.path.display()
                ),
            });
        }
        let names = watch.webhooks.as_deref().unwrap_or_default();
        if names.len() > defaults::MAX_LIST_LEN {
            let message = format!("at most {} webhooks per watch", defaults::MAX_LIST_LEN);
            return Err(InvalidWatch { field: "webhooks", message });
        }
        if watch.labels.len() > defaults::MAX_LIST_LEN {
            let message = format!("at most {} labels per watch", defaults::MAX_LIST_LEN);
            return Err(InvalidWatch { field: "labels", message });
        }
        let (max_key, max_value) = (defaults::MAX_NAME_LEN, defaults::MAX_VALUE_LEN);
        if let Some((key, _)) =
            watch.labels.iter().find(|(k, v)| k.is_empty() || k.len() > max_key || v.len() > max_value)
        {
            let message = format!(
                "label {key:?}: a label name must be 1 to {max_key} bytes and its value at most {max_value} bytes"
            );
            return Err(InvalidWatch { field: "labels", message });
        }
        for name in names {
            if self.webhook(name).is_none() {
                let known: Vec<&str> = self.webhooks.iter().map(|w| w.name.as_str()).collect();
                return Err(InvalidWatch {
                    field: "webhooks",
                    message: format!(
                        "--webhook {name:?} is not a webhook in {} (known: {})",
                        self.path.display(),
                        known.join(", ")
                    ),
                });
            }
        }
        Ok(())
    }

    /// Whether `status` (normalised) ends polling.
    pub fn is_terminal(&self, status: &str) -> bool {
        self.upstream.terminal_statuses.iter().any(|s| s == status)
    }
}

/// Splits a `Host` header or an origin's authority (`name`, `name:port`,
/// `[::1]:9187`) into its host (brackets removed) and port; `None` when the
/// port is not a number or an IPv6 address is not bracketed.
pub fn split_host_port(authority: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            port => Some((host, Some(port.strip_prefix(':')?.parse().ok()?))),
        };
    }
    match authority.rsplit_once(':') {
        None => Some((authority, None)),
        Some((host, _)) if host.contains(':') => None,
        Some((host, port)) => Some((host, Some(port.parse().ok()?))),
    }
}
