//! `[[webhooks]]`: the resolved [`Webhook`] (its filters, headers, template
//! and limits) and how the resolver builds one from the raw table.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use reqwest::Url;
use reqwest::header::{HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};

use serde_json::{Map, Value};
use toml::Spanned;

use super::defaults::{
    self, MAX_CA_CERTIFICATES, MAX_CA_FILE_BYTES, MAX_LIST_LEN, MAX_NAME_LEN, MAX_TEMPLATE_BYTES, MAX_VALUE_LEN,
};
use super::raw::{RawWebhook, parse_http_url};
use super::resolved::Resolver;
use super::{ConfigError, RESERVED_HEADERS, SecretSource};
use crate::format::{BodyTemplate, TemplateSource};
use crate::glob::Glob;
use crate::signature::SigningKey;
use crate::vocab::{Format, Mode};

/// `[[webhooks]]`: one receiver.
#[derive(Clone)]
pub struct Webhook {
    /// Unique name, used by `--webhook`, in the database and in logs.
    pub name: String,
    /// Where deliveries are POSTed. Chat URLs are secrets, so this is never
    /// logged; `url_source` says whether it may be shown.
    pub url: Url,
    /// `None` when the URL is written in the config, else where it came from.
    pub url_source: Option<SecretSource>,
    /// Body format.
    pub format: Format,
    /// Standard Webhooks signing key, when the webhook has a secret.
    pub secret: Option<SigningKey>,
    /// Where the secret came from.
    pub secret_source: Option<SecretSource>,
    /// Notification types this webhook accepts; empty means all.
    pub types: Vec<Glob>,
    /// Portal ids this webhook follows when a watch names no webhooks; empty means all.
    pub portals: Vec<Glob>,
    /// Labels this webhook follows when a watch names no webhooks: the
    /// watch's labels must hold every pair; empty means all.
    pub labels: BTreeMap<String, String>,
    /// Extra headers of every delivery, sorted by name.
    pub headers: Vec<ExtraHeader>,
    /// The webhook's own body template, compiled; it replaces the format's body.
    pub template: Option<BodyTemplate>,
    /// Attempts in flight to this webhook at once (different jobs in parallel).
    pub max_in_flight: usize,
    /// Attempts per second to this webhook; `None` for no limit.
    pub max_per_second: Option<f64>,
    /// A message per notification, or one live message per job (only
    /// Discord and Slack, checked at load).
    pub mode: Mode,
    /// A live Slack webhook's Web API access; `Some` exactly when the
    /// format is Slack and the mode live.
    pub slack_bot: Option<SlackBot>,
    /// Extra trust roots for this webhook's receiver (a private CA), read
    /// and checked at load; `None` trusts the built-in roots only.
    pub ca_file: Option<CaFile>,
}

/// What a live Slack webhook posts and edits with: Slack's Web API, a bot
/// token and the channel. The token is a secret, sent only in the
/// `Authorization` header of the API calls.
#[derive(Clone)]
pub struct SlackBot {
    /// The bot token (`xoxb-…`), from `bot_token_env`.
    token: SecretString,
    /// Where the token came from, which is what gets printed.
    pub token_source: SecretSource,
    /// The channel id (`C0123456789`).
    pub channel: String,
    /// The Web API's base URL, without a trailing `/`: `{api_url}/chat.postMessage`.
    pub api_url: Url,
}

impl SlackBot {
    /// The `Authorization` header value, marked sensitive so it is never
    /// printed by a `Debug` of the request.
    pub fn authorization(&self) -> HeaderValue {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", self.token.expose_secret()))
            .expect("config loading checked the token is a valid header value");
        value.set_sensitive(true);
        value
    }

    /// The URL of one Web API method, such as `chat.update`.
    pub fn method_url(&self, method: &str) -> Url {
        let mut url = self.api_url.clone();
        let path = format!("{}/{method}", url.path().trim_end_matches('/'));
        url.set_path(&path);
        url
    }
}

impl fmt::Debug for SlackBot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlackBot")
            .field("token", &self.token_source.to_string())
            .field("channel", &self.channel)
            .field("api_url", &self.api_url.as_str())
            .finish()
    }
}

/// A webhook's `ca_file`: the CA certificates its receiver is trusted under
/// besides the built-in (Mozilla) roots. Built by config loading, which
/// refused a file it could not read or that holds no certificate; the
/// deliverer adds them to that webhook's own HTTP client.
#[derive(Clone)]
pub struct CaFile {
    /// The file, as resolved (relative to the config file's folder).
    pub path: PathBuf,
    /// Its certificates, each already accepted as a trust anchor by rustls.
    pub certificates: Vec<reqwest::Certificate>,
}

impl fmt::Debug for CaFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} certificates)", self.path.display(), self.certificates.len())
    }
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook")
            .field("name", &self.name)
            .field("format", &self.format)
            .field("signed", &self.secret.is_some())
            .field("headers", &self.headers)
            .field("template", &self.template)
            .field("mode", &self.mode)
            .field("slack_bot", &self.slack_bot)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

impl Webhook {
    /// The body this webhook gets for a stored standard body (its template,
    /// else its format).
    pub fn render(&self, standard_body: &str) -> Result<String, crate::format::RenderError> {
        crate::format::render(self.format, self.template.as_ref(), standard_body)
    }

    /// Whether a notification of `kind` for a watch on `portal_id` with
    /// `labels` goes to this webhook. `named` is the watch's own webhook
    /// list: when present, it replaces the `portals` and `labels` filters
    /// (they choose watches), but the `types` filter still applies (it
    /// chooses what the receiver wants to hear).
    pub fn accepts(&self, kind: &str, portal_id: &str, named: Option<&[String]>, labels: &Map<String, Value>) -> bool {
        let chosen = match named {
            Some(names) => names.iter().any(|n| n == &self.name),
            None => crate::glob::any_matches(&self.portals, portal_id) && self.follows_labels(labels),
        };
        chosen && crate::glob::any_matches(&self.types, kind)
    }

    /// Whether a watch's labels hold every `key = value` of this webhook's
    /// `labels` filter.
    pub fn follows_labels(&self, labels: &Map<String, Value>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k).and_then(Value::as_str) == Some(v.as_str()))
    }

    /// The rate limit its deliveries keep, as (attempts per second, largest
    /// burst): `max_per_second` with a burst of one second's worth, or, for
    /// a Slack webhook that sets none, Slack's own limit with a small burst.
    pub fn rate_limit(&self) -> Option<(f64, f64)> {
        match (self.max_per_second, self.format) {
            (Some(rate), _) => Some((rate, rate.max(1.0))),
            (None, Format::Slack) => Some((defaults::SLACK_MAX_PER_SECOND, defaults::SLACK_BURST)),
            (None, _) => None,
        }
    }

    /// The `content-type` of this webhook's bodies.
    pub fn content_type(&self) -> &str {
        self.template.as_ref().map_or("application/json", |t| t.content_type.as_str())
    }

    /// Whether the URL itself is a credential: a Slack or Discord webhook
    /// (by format or by host), where whoever has the URL can post.
    pub fn url_is_secret(&self) -> bool {
        let host = self.url.host_str().unwrap_or_default();
        matches!(self.format, Format::Slack | Format::Discord)
            || host == "hooks.slack.com"
            || ((host == "discord.com" || host == "discordapp.com") && self.url.path().starts_with("/api/webhooks"))
    }

    /// The URL as it may be shown: in full when written in the config and not
    /// a credential; its origin only for a Slack or Discord URL written
    /// there; where it came from when it came from the environment.
    pub fn shown_url(&self) -> String {
        match &self.url_source {
            Some(source) => source.to_string(),
            None if self.url_is_secret() => format!("{}/<redacted>", self.url.origin().ascii_serialization()),
            None => self.url.to_string(),
        }
    }
}

/// One of a webhook's extra headers.
#[derive(Clone)]
pub struct ExtraHeader {
    /// The header's name, lower-case.
    pub name: HeaderName,
    /// Its value; marked sensitive when it came from the environment.
    pub value: HeaderValue,
    /// `None` when the value is written in the config, else where it came
    /// from (and then it is a secret, never printed).
    pub source: Option<SecretSource>,
}

impl fmt::Debug for ExtraHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            None => write!(f, "{}: {:?}", self.name, self.value),
            Some(source) => write!(f, "{}: {source}", self.name),
        }
    }
}

impl Resolver<'_> {
    pub(super) fn webhook(&self, index: usize, span: Range<usize>, raw: RawWebhook) -> Result<Webhook, ConfigError> {
        let name_span = raw.name.span();
        let name = raw.name.get_ref().clone();
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(self.error(
                Some(name_span),
                &format!("webhooks[{index}].name"),
                format!("{name:?} is not a valid webhook name: 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.'"),
            ));
        }
        let key = format!("webhooks[{index}] ({name})");
        let (mode, slack_bot) = self.live(&key, span.clone(), &raw)?;
        let (url, url_source) = match (raw.url, raw.url_env) {
            // A live Slack webhook talks to the Web API, not a webhook URL.
            (None, None) if let Some(bot) = &slack_bot => (bot.api_url.clone(), None),
            (Some(_), _) | (_, Some(_)) if slack_bot.is_some() => {
                return Err(self.error(
                    Some(span),
                    &key,
                    "a live Slack webhook posts through the Web API (bot_token_env, channel, api_url): \
                     remove url and url_env",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(self.error(Some(span), &key, "set either url or url_env, not both"));
            }
            (None, None) => return Err(self.error(Some(span), &key, "needs url or url_env")),
            (Some(url), None) => (url.into_inner().0, None),
            (None, Some(var_name)) => {
                let var = var_name.get_ref().trim().to_owned();
                let k = format!("{key}.url_env");
                let value = (self.env)(&var).filter(|v| !v.trim().is_empty()).ok_or_else(|| {
                    self.error(Some(var_name.span()), &k, format!("environment variable {var} is not set"))
                })?;
                // The value is a secret: the message names the variable only.
                let url = parse_http_url(&value).map_err(|_| {
                    self.error(Some(var_name.span()), &k, format!("environment variable {var} is not an http(s) URL"))
                })?;
                (url, Some(SecretSource::Env(var)))
            }
        };
        let (secret, secret_source) =
            self.secret(&key, Some(span.clone()), ("secret_env", raw.secret_env), ("secret_file", raw.secret_file))?;
        let secret = match secret {
            None => None,
            Some(text) => Some(
                SigningKey::parse(&text)
                    .map_err(|e| self.error(Some(span.clone()), &format!("{key}.secret"), e.to_string()))?,
            ),
        };
        let globs = |field: &str, list: Vec<Spanned<String>>| -> Result<Vec<Glob>, ConfigError> {
            let k = format!("{key}.{field}");
            if let Some(extra) = list.get(MAX_LIST_LEN) {
                return Err(self.error(Some(extra.span()), &k, format!("at most {MAX_LIST_LEN} patterns")));
            }
            list.into_iter()
                .map(|p| {
                    if p.get_ref().len() > MAX_VALUE_LEN {
                        let message = format!("a pattern must be at most {MAX_VALUE_LEN} bytes");
                        return Err(self.error(Some(p.span()), &k, message));
                    }
                    Glob::new(p.get_ref()).ok_or_else(|| self.error(Some(p.span()), &k, "a pattern must not be empty"))
                })
                .collect()
        };
        let max_in_flight =
            self.count(&format!("{key}.max_in_flight"), raw.max_in_flight, defaults::WEBHOOK_MAX_IN_FLIGHT)?;
        let max_per_second = self.rate(&format!("{key}.max_per_second"), raw.max_per_second)?;
        let mut labels = BTreeMap::new();
        let label_count = raw.labels.len();
        for (label, value) in raw.labels {
            let k = format!("{key}.labels");
            if label_count > MAX_LIST_LEN {
                return Err(self.error(Some(value.span()), &k, format!("at most {MAX_LIST_LEN} labels")));
            }
            if label.trim().is_empty() || label.len() > MAX_NAME_LEN || value.get_ref().len() > MAX_VALUE_LEN {
                let message = format!(
                    "a label name must be 1 to {MAX_NAME_LEN} bytes and its value at most {MAX_VALUE_LEN} bytes"
                );
                return Err(self.error(Some(value.span()), &k, message));
            }
            labels.insert(label, value.into_inner());
        }
        let headers = self.headers(&key, raw.headers, raw.headers_env)?;
        let template = self.template(&key, span, raw.template, raw.body_template, raw.content_type)?;
        let ca_file = raw.ca_file.map(|file| self.ca_file(&key, file)).transpose()?;
        Ok(Webhook {
            ca_file,
            max_in_flight,
            max_per_second,
            name,
            url,
            url_source,
            format: raw.format,
            secret,
            secret_source,
            types: globs("types", raw.types)?,
            portals: globs("portals", raw.portals)?,
            labels,
            headers,
            template,
            mode,
            slack_bot,
        })
    }

    /// The webhook's `mode` and, for a live Slack webhook, its Web API
    /// access: `mode = "live"` only for Discord and Slack and without a
    /// template; `bot_token_env`, `channel` and `api_url` only (and the
    /// first two always) for a live Slack webhook.
    fn live(&self, key: &str, span: Range<usize>, raw: &RawWebhook) -> Result<(Mode, Option<SlackBot>), ConfigError> {
        let mode = raw.mode.as_ref().map_or(defaults::WEBHOOK_MODE, |m| *m.get_ref());
        let mode_span = raw.mode.as_ref().map(Spanned::span);
        let k = format!("{key}.mode");
        if mode == Mode::Live {
            match raw.format {
                Format::Discord | Format::Slack => {}
                Format::Teams => {
                    return Err(self.error(
                        mode_span,
                        &k,
                        "mode = \"live\" cannot work with format = \"teams\": a Teams Workflows webhook can \
                         only post a new message, never edit one; use mode = \"each\"",
                    ));
                }
                Format::Standard => {
                    return Err(self.error(
                        mode_span,
                        &k,
                        "mode = \"live\" is for format = \"discord\" or \"slack\" (a chat message edited as \
                         the job moves); a standard webhook gets every notification",
                    ));
                }
            }
            if raw.template.is_some() || raw.body_template.is_some() {
                return Err(self.error(
                    mode_span,
                    &k,
                    "a live message is rendered by the relay from the job's state: remove template and body_template, \
                     or use mode = \"each\"",
                ));
            }
        }
        let slack_live = mode == Mode::Live && raw.format == Format::Slack;
        if !slack_live {
            let given = [
                ("bot_token_env", raw.bot_token_env.as_ref().map(Spanned::span)),
                ("channel", raw.channel.as_ref().map(Spanned::span)),
                ("api_url", raw.api_url.as_ref().map(Spanned::span)),
            ];
            if let Some((name, span)) = given.into_iter().find(|(_, s)| s.is_some()) {
                return Err(self.error(
                    span,
                    &format!("{key}.{name}"),
                    "only applies to format = \"slack\" with mode = \"live\" (the Web API that edits the message)",
                ));
            }
            return Ok((mode, None));
        }
        let Some(var_name) = &raw.bot_token_env else {
            return Err(self.error(
                Some(span),
                &format!("{key}.bot_token_env"),
                "a live Slack webhook needs bot_token_env: the environment variable holding a bot token \
                 (xoxb-…) with the chat:write scope, to post and edit its message",
            ));
        };
        let (token, token_source) =
            self.secret(key, Some(span.clone()), ("bot_token_env", Some(var_name.clone())), ("bot_token_file", None))?;
        // `secret` answers a value or an error for a set `bot_token_env`;
        // should that ever change, this is a config error, not a panic.
        let (Some(token), Some(token_source)) = (token, token_source) else {
            return Err(self.error(
                Some(span),
                &format!("{key}.bot_token_env"),
                "a live Slack webhook needs a bot token: bot_token_env names no value",
            ));
        };
        let var = var_name.get_ref().trim();
        let k = format!("{key}.bot_token_env");
        if token.len() > MAX_VALUE_LEN || HeaderValue::from_str(&format!("Bearer {token}")).is_err() {
            // The value is a secret: the message names the variable only.
            let message =
                format!("environment variable {var} is not a usable token (control characters, non-ASCII or too long)");
            return Err(self.error(Some(var_name.span()), &k, message));
        }
        let Some(channel) = &raw.channel else {
            return Err(self.error(
                Some(span),
                &format!("{key}.channel"),
                "a live Slack webhook needs channel: the channel's id (C0123456789), where the bot is invited",
            ));
        };
        let text = channel.get_ref().trim();
        if text.is_empty()
            || text.len() > defaults::MAX_CHANNEL_LEN
            || !text.chars().all(|c| c.is_ascii_alphanumeric() || "#-_.".contains(c))
        {
            return Err(self.error(
                Some(channel.span()),
                &format!("{key}.channel"),
                format!(
                    "{text:?} is not a Slack channel id: 1 to {} letters and digits, such as C0123456789",
                    defaults::MAX_CHANNEL_LEN
                ),
            ));
        }
        let api_url = match &raw.api_url {
            None => Url::parse(defaults::SLACK_API_URL).expect("the default API URL parses"),
            Some(url) => {
                let parsed = url.get_ref().0.clone();
                if parsed.query().is_some() || parsed.fragment().is_some() || parsed.as_str().len() > MAX_VALUE_LEN {
                    return Err(self.error(
                        Some(url.span()),
                        &format!("{key}.api_url"),
                        "the Web API's base URL, such as \"https://slack.com/api\", without a query or fragment",
                    ));
                }
                parsed
            }
        };
        let bot = SlackBot { token: SecretString::from(token), token_source, channel: text.to_owned(), api_url };
        Ok((mode, Some(bot)))
    }

    /// Resolves `headers` (values as written) and `headers_env` (values from
    /// the environment, secrets) into one list sorted by name.
    fn headers(
        &self,
        key: &str,
        literal: BTreeMap<String, Spanned<String>>,
        from_env: BTreeMap<String, Spanned<String>>,
    ) -> Result<Vec<ExtraHeader>, ConfigError> {
        let mut headers: BTreeMap<String, ExtraHeader> = BTreeMap::new();
        if let Some(extra) = literal.values().chain(from_env.values()).nth(MAX_LIST_LEN) {
            let message = format!("at most {MAX_LIST_LEN} headers in headers and headers_env together");
            return Err(self.error(Some(extra.span()), key, message));
        }
        let entries =
            literal.into_iter().map(|(n, v)| (n, v, false)).chain(from_env.into_iter().map(|(n, v)| (n, v, true)));
        for (raw_name, value, is_env) in entries {
            let table = if is_env { "headers_env" } else { "headers" };
            let k = format!("{key}.{table}.{raw_name}");
            let span = Some(value.span());
            let name = HeaderName::from_bytes(raw_name.trim().as_bytes())
                .map_err(|_| self.error(span.clone(), &k, format!("{raw_name:?} is not a valid header name")))?;
            if RESERVED_HEADERS.contains(&name.as_str()) {
                return Err(self.error(
                    span,
                    &k,
                    format!("{name} is set by the relay itself and cannot be overridden"),
                ));
            }
            let header = if is_env {
                let var = value.get_ref().trim().to_owned();
                let text = (self.env)(&var)
                    .filter(|v| !v.trim().is_empty())
                    .ok_or_else(|| self.error(span.clone(), &k, format!("environment variable {var} is not set")))?;
                // The value is a secret: the message names the variable only.
                let mut value = HeaderValue::from_str(text.trim()).map_err(|_| {
                    self.error(span.clone(), &k, format!("environment variable {var} is not a valid header value"))
                })?;
                value.set_sensitive(true);
                ExtraHeader { name: name.clone(), value, source: Some(SecretSource::Env(var)) }
            } else {
                if value.get_ref().len() > MAX_VALUE_LEN {
                    let message = format!("a header value must be at most {MAX_VALUE_LEN} bytes");
                    return Err(self.error(span, &k, message));
                }
                let value = HeaderValue::from_str(value.get_ref()).map_err(|_| {
                    self.error(span.clone(), &k, "not a valid header value (control characters or non-ASCII)")
                })?;
                ExtraHeader { name: name.clone(), value, source: None }
            };
            if headers.insert(name.as_str().to_owned(), header).is_some() {
                return Err(self.error(span, &k, format!("header {name} is set twice")));
            }
        }
        Ok(headers.into_values().collect())
    }

    /// Reads `ca_file` and checks that it holds at least one certificate
    /// rustls accepts as a trust anchor, so a bad file stops the load (exit
    /// 2, naming the webhook and the key) instead of failing every delivery.
    fn ca_file(&self, key: &str, file: Spanned<String>) -> Result<CaFile, ConfigError> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        let k = format!("{key}.ca_file");
        let span = Some(file.span());
        let written = PathBuf::from(file.get_ref().trim());
        let path = self.path.parent().unwrap_or(Path::new("")).join(&written);
        let text = super::resolved::read_capped(&path, MAX_CA_FILE_BYTES)
            .map_err(|e| self.error(span.clone(), &k, format!("cannot read {}: {e}", path.display())))?;
        let mut certificates = Vec::new();
        for (n, der) in CertificateDer::pem_slice_iter(text.as_bytes()).enumerate() {
            let der = der.map_err(|e| {
                self.error(
                    span.clone(),
                    &k,
                    format!("{} is not valid PEM (certificate {}): {e}", path.display(), n + 1),
                )
            })?;
            if n >= MAX_CA_CERTIFICATES {
                let message = format!("{} holds more than {MAX_CA_CERTIFICATES} certificates", path.display());
                return Err(self.error(span, &k, message));
            }
            rustls::RootCertStore::empty().add(der.clone()).map_err(|e| {
                let message =
                    format!("certificate {} in {} is not a usable CA certificate: {e}", n + 1, path.display());
                self.error(span.clone(), &k, message)
            })?;
            let certificate = reqwest::Certificate::from_der(der.as_ref())
                .map_err(|e| self.error(span.clone(), &k, format!("{}: {e}", path.display())))?;
            certificates.push(certificate);
        }
        if certificates.is_empty() {
            let message = format!(
                "{} holds no certificate (expected PEM blocks \"-----BEGIN CERTIFICATE-----\")",
                path.display()
            );
            return Err(self.error(span, &k, message));
        }
        Ok(CaFile { path, certificates })
    }

    /// Reads and compiles the body template given as `template` (a file) or
    /// `body_template` (inline), not both.
    fn template(
        &self,
        key: &str,
        table_span: Range<usize>,
        file: Option<Spanned<String>>,
        inline: Option<Spanned<String>>,
        content_type: Option<Spanned<String>>,
    ) -> Result<Option<BodyTemplate>, ConfigError> {
        let (source, text, span, k) = match (file, inline) {
            (Some(_), Some(_)) => {
                return Err(self.error(Some(table_span), key, "set either template or body_template, not both"));
            }
            (None, None) => {
                return match content_type {
                    Some(ct) => Err(self.error(
                        Some(ct.span()),
                        &format!("{key}.content_type"),
                        "only applies to a templated body: set template or body_template too",
                    )),
                    None => Ok(None),
                };
            }
            (Some(file), None) => {
                let k = format!("{key}.template");
                let written = PathBuf::from(file.get_ref().trim());
                // Relative to the config file, so a template can sit next to it.
                let path = self.path.parent().unwrap_or(Path::new("")).join(&written);
                let text = super::resolved::read_capped(&path, MAX_TEMPLATE_BYTES)
                    .map_err(|e| self.error(Some(file.span()), &k, format!("cannot read {}: {e}", path.display())))?;
                (TemplateSource::File(path), text, file.span(), k)
            }
            (None, Some(text)) => {
                let k = format!("{key}.body_template");
                (TemplateSource::Inline(text.get_ref().clone()), text.get_ref().clone(), text.span(), k)
            }
        };
        if text.trim().is_empty() {
            return Err(self.error(Some(span), &k, "the template is empty"));
        }
        if text.len() > MAX_TEMPLATE_BYTES {
            let message = format!("the template is {} bytes; at most {MAX_TEMPLATE_BYTES} are accepted", text.len());
            return Err(self.error(Some(span), &k, message));
        }
        if let Some(ct) = &content_type {
            let essence = ct.get_ref().split(';').next().unwrap_or_default().trim();
            let (kind, sub) = essence.split_once('/').unwrap_or_default();
            if kind.is_empty() || sub.is_empty() || HeaderValue::from_str(ct.get_ref()).is_err() {
                return Err(self.error(
                    Some(ct.span()),
                    &format!("{key}.content_type"),
                    format!("{:?} is not a content type such as \"application/json\" or \"text/plain\"", ct.get_ref()),
                ));
            }
        }
        BodyTemplate::compile(source, text, content_type.as_ref().map(|c| c.get_ref().as_str()))
            .map(Some)
            .map_err(|e| self.error(Some(span), &k, format!("the template does not compile: {e}")))
    }
}
