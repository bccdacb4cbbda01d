//! The file as written: serde types that mirror the TOML, with spans so the
//! resolver can name the line of a bad value. Every table denies unknown keys,
//! so a typo is an error with a line number instead of a silently ignored
//! setting.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;
use toml::Spanned;

use super::LogFormat;
use crate::vocab::{Format, Mode};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) database: Option<Spanned<String>>,
    pub(super) database_url_env: Option<Spanned<String>>,
    pub(super) cluster: Option<Spanned<RawCluster>>,
    pub(super) retention: Option<Spanned<DurationValue>>,
    #[serde(default)]
    pub(super) upstream: RawUpstream,
    #[serde(default)]
    pub(super) delivery: RawDelivery,
    #[serde(default)]
    pub(super) orgs: BTreeMap<String, Spanned<RawOrg>>,
    #[serde(default)]
    pub(super) webhooks: Vec<Spanned<RawWebhook>>,
    pub(super) admin: Option<Spanned<RawAdmin>>,
    pub(super) inbound: Option<Spanned<RawInbound>>,
    pub(super) log_format: Option<LogFormat>,
}

/// `[cluster]`: several instances on one PostgreSQL database.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) instance: Option<Spanned<String>>,
    pub(super) lease_ttl: Option<Spanned<DurationValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Spanned<String>,
    pub(super) token_env: Option<Spanned<String>>,
    pub(super) token_file: Option<Spanned<String>>,
    /// Host names (optionally `name:port`) the API answers to besides its
    /// own address and localhost, for a reverse proxy or a DNS name.
    #[serde(default)]
    pub(super) allowed_hosts: Vec<Spanned<String>>,
}

/// `[inbound]`: the listener for Dari's own webhook (push assist).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInbound {
    pub(super) listen: Spanned<String>,
    pub(super) dari_webhook_key_env: Option<Spanned<String>>,
    pub(super) dari_webhook_key_file: Option<Spanned<String>>,
    /// Portal patterns (`my-org/*`) whose announced jobs are watched when
    /// nobody added them.
    #[serde(default)]
    pub(super) auto_watch: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) base_url: Option<Spanned<HttpUrl>>,
    pub(super) poll_interval: Option<Spanned<DurationValue>>,
    pub(super) max_poll_interval: Option<Spanned<DurationValue>>,
    pub(super) request_timeout: Option<Spanned<DurationValue>>,
    pub(super) max_in_flight: Option<Spanned<i64>>,
    pub(super) terminal_statuses: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) max_response_bytes: Option<Spanned<i64>>,
    pub(super) not_found_grace: Option<Spanned<DurationValue>>,
    pub(super) auth_grace: Option<Spanned<DurationValue>>,
    pub(super) max_watch_age: Option<Spanned<DurationValue>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDelivery {
    pub(super) retry_schedule: Option<Spanned<Vec<Spanned<DurationValue>>>>,
    pub(super) request_timeout: Option<Spanned<DurationValue>>,
    pub(super) shutdown_timeout: Option<Spanned<DurationValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOrg {
    pub(super) api_key_env: Option<Spanned<String>>,
    pub(super) api_key_file: Option<Spanned<String>>,
    pub(super) max_requests_per_second: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    pub(super) name: Spanned<String>,
    pub(super) url: Option<Spanned<HttpUrl>>,
    pub(super) url_env: Option<Spanned<String>>,
    #[serde(default = "default_format")]
    pub(super) format: Format,
    pub(super) secret_env: Option<Spanned<String>>,
    pub(super) secret_file: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) types: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) portals: Vec<Spanned<String>>,
    pub(super) max_in_flight: Option<Spanned<i64>>,
    pub(super) max_per_second: Option<Spanned<f64>>,
    /// `labels = { team = "growth" }`: watches (that name no webhooks) whose
    /// labels hold every pair.
    #[serde(default)]
    pub(super) labels: BTreeMap<String, Spanned<String>>,
    /// `headers = { "X-Team" = "growth" }`: extra headers, values as written.
    #[serde(default)]
    pub(super) headers: BTreeMap<String, Spanned<String>>,
    /// `headers_env = { "Authorization" = "HOOK_TOKEN" }`: extra headers whose
    /// values are secrets, each read from the named environment variable.
    #[serde(default)]
    pub(super) headers_env: BTreeMap<String, Spanned<String>>,
    /// A minijinja template file for the body, relative to the config file's
    /// folder unless absolute.
    pub(super) template: Option<Spanned<String>>,
    /// A minijinja template for the body, inline.
    pub(super) body_template: Option<Spanned<String>>,
    /// The `content-type` of templated bodies; JSON (the default) escapes
    /// inserted values as JSON.
    pub(super) content_type: Option<Spanned<String>>,
    /// `"each"` (the default) or `"live"`: one message per job, edited.
    pub(super) mode: Option<Spanned<Mode>>,
    /// A live Slack webhook's bot token, the name of the environment
    /// variable that holds it.
    pub(super) bot_token_env: Option<Spanned<String>>,
    /// A live Slack webhook's channel id.
    pub(super) channel: Option<Spanned<String>>,
    /// A live Slack webhook's Web API base URL.
    pub(super) api_url: Option<Spanned<HttpUrl>>,
    /// A PEM file of CA certificates this webhook's receiver is also
    /// trusted under (a private CA), relative to the config file's folder
    /// unless absolute.
    pub(super) ca_file: Option<Spanned<String>>,
}

fn default_format() -> Format {
    super::defaults::WEBHOOK_FORMAT
}

/// A duration written as `"500ms"`, `"2s"`, `"5m"`; rejected with a clear
/// message (and, through the TOML parser, the line) when it is anything else.
#[derive(Debug, Clone, Copy)]
pub(super) struct DurationValue(pub(super) Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text).map(DurationValue).map_err(serde::de::Error::custom)
    }
}

/// Parses a duration such as `"500ms"`, `"2s"`, `"5m"`, `"1h 30m"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("invalid duration {text:?} ({e}); write it like \"500ms\", \"2s\", \"5m\" or \"1h\""))
}

/// An absolute `http` or `https` URL.
#[derive(Debug, Clone)]
pub(super) struct HttpUrl(pub(super) Url);

impl<'de> Deserialize<'de> for HttpUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_http_url(&text).map(HttpUrl).map_err(serde::de::Error::custom)
    }
}

pub(super) fn parse_http_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text.trim()).map_err(|e| format!("invalid URL {text:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("invalid URL {text:?}: expected an http:// or https:// URL with a host"));
    }
    Ok(url)
}
