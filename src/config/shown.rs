//! The resolved configuration printed back as TOML, every secret replaced by
//! where it came from: what `check-config` shows.

use std::time::Duration;

use super::{Config, ExtraHeader};
use crate::format::TemplateSource;
use crate::glob::Glob;

impl Config {
    /// The resolved configuration as TOML, every secret replaced by where it
    /// came from. This is what `check-config` prints.
    pub fn redacted_toml(&self) -> String {
        use std::fmt::Write as _;
        let dur = |d: Duration| format!("{:?}", humantime::format_duration(d).to_string());
        let list = |items: Vec<String>| format!("[{}]", items.join(", "));
        let globs = |g: &[Glob]| list(g.iter().map(|g| format!("{:?}", g.as_str())).collect());
        let mut out = String::new();
        let _ = writeln!(out, "# resolved from {}", self.path.display());
        match self.postgres.as_ref().and_then(|pg| pg.env.as_ref()) {
            Some(var) => {
                let _ = writeln!(out, "database_url_env = {var:?}  # {}", self.database.display());
            }
            None => {
                let _ = writeln!(out, "database = {:?}", self.database.display().to_string());
            }
        }
        let _ = writeln!(out, "retention = {}", dur(self.retention));
        if let Some(format) = self.log_format {
            let _ = writeln!(out, "log_format = {:?}", format!("{format:?}").to_lowercase());
        }
        out.push('\n');
        if let Some(cluster) = &self.cluster {
            let _ = writeln!(out, "[cluster]");
            let _ = writeln!(out, "instance = {:?}", cluster.instance);
            let _ = writeln!(out, "lease_ttl = {}\n", dur(cluster.lease_ttl));
        }
        let u = &self.upstream;
        let _ = writeln!(out, "[upstream]");
        let _ = writeln!(out, "base_url = {:?}", u.base_url.as_str());
        let _ = writeln!(out, "poll_interval = {}", dur(u.poll_interval));
        let _ = writeln!(out, "max_poll_interval = {}", dur(u.max_poll_interval));
        let _ = writeln!(out, "request_timeout = {}", dur(u.request_timeout));
        let _ = writeln!(out, "max_in_flight = {}", u.max_in_flight);
        let statuses = u.terminal_statuses.iter().map(|s| format!("{s:?}")).collect();
        let _ = writeln!(out, "terminal_statuses = {}", list(statuses));
        let _ = writeln!(out, "max_response_bytes = {}", u.max_response_bytes);
        let _ = writeln!(out, "not_found_grace = {}", dur(u.not_found_grace));
        let _ = writeln!(out, "auth_grace = {}", dur(u.auth_grace));
        let _ = writeln!(out, "max_watch_age = {}\n", dur(u.max_watch_age));
        let d = &self.delivery;
        let _ = writeln!(out, "[delivery]");
        let schedule = d.retry_schedule.iter().map(|&s| dur(s)).collect();
        let _ = writeln!(out, "retry_schedule = {}", list(schedule));
        let _ = writeln!(out, "request_timeout = {}", dur(d.request_timeout));
        let _ = writeln!(out, "shutdown_timeout = {}", dur(d.shutdown_timeout));
        if let Some(admin) = &self.admin {
            let _ = writeln!(out, "\n[admin]\nlisten = {:?}", admin.listen.to_string());
            if let Some(source) = &admin.token_source {
                let _ = writeln!(out, "token = {:?}", source.to_string());
            }
            if !admin.allowed_hosts.is_empty() {
                let _ = writeln!(
                    out,
                    "allowed_hosts = {}",
                    list(admin.allowed_hosts.iter().map(|h| format!("{h:?}")).collect())
                );
            }
        }
        if let Some(inbound) = &self.inbound {
            let _ = writeln!(out, "\n[inbound]\nlisten = {:?}", inbound.listen.to_string());
            if let Some(source) = &inbound.webhook_key_source {
                let _ = writeln!(out, "dari_webhook_key = {:?}", source.to_string());
            }
            if !inbound.auto_watch.is_empty() {
                let patterns = inbound.auto_watch.iter().map(|g| format!("{:?}", g.as_str())).collect();
                let _ = writeln!(out, "auto_watch = {}", list(patterns));
            }
        }
        for org in self.orgs.values() {
            let _ = writeln!(out, "\n[orgs.{:?}]", org.id);
            let _ = writeln!(out, "api_key = {:?}", org.api_key_source.to_string());
            if let Some(rate) = org.max_requests_per_second {
                let _ = writeln!(out, "max_requests_per_second = {rate}");
            }
        }
        for w in &self.webhooks {
            let _ = writeln!(out, "\n[[webhooks]]");
            let _ = writeln!(out, "name = {:?}", w.name);
            // A live Slack webhook has no URL of its own: it shows its api_url below.
            if w.slack_bot.is_none() {
                let _ = writeln!(out, "url = {:?}", w.shown_url());
            }
            let _ = writeln!(out, "format = {:?}", w.format.as_str());
            if let Some(source) = &w.secret_source {
                let _ = writeln!(out, "secret = {:?}", source.to_string());
            }
            let _ = writeln!(out, "types = {}", globs(&w.types));
            let _ = writeln!(out, "portals = {}", globs(&w.portals));
            if !w.labels.is_empty() {
                let pairs: Vec<String> = w.labels.iter().map(|(k, v)| format!("{k:?} = {v:?}")).collect();
                let _ = writeln!(out, "labels = {{ {} }}", pairs.join(", "));
            }
            let (plain, secret): (Vec<&ExtraHeader>, Vec<&ExtraHeader>) =
                w.headers.iter().partition(|h| h.source.is_none());
            if !plain.is_empty() {
                let pairs: Vec<String> = plain
                    .iter()
                    .map(|h| format!("{:?} = {:?}", h.name.as_str(), h.value.to_str().unwrap_or("<not UTF-8>")))
                    .collect();
                let _ = writeln!(out, "headers = {{ {} }}", pairs.join(", "));
            }
            if !secret.is_empty() {
                let pairs: Vec<String> = secret
                    .iter()
                    .filter_map(|h| Some(format!("{:?} = {:?}", h.name.as_str(), h.source.as_ref()?.to_string())))
                    .collect();
                let _ = writeln!(out, "headers_env = {{ {} }}", pairs.join(", "));
            }
            if let Some(t) = &w.template {
                match &t.source {
                    TemplateSource::File(path) => {
                        let _ = writeln!(out, "template = {:?}", path.display().to_string());
                    }
                    TemplateSource::Inline(text) => {
                        let _ = writeln!(out, "body_template = {text:?}");
                    }
                }
                let _ = writeln!(out, "content_type = {:?}", t.content_type);
            }
            let _ = writeln!(out, "mode = {:?}", w.mode.as_str());
            if let Some(bot) = &w.slack_bot {
                let _ = writeln!(out, "bot_token_env = {:?}", bot.token_source.to_string());
                let _ = writeln!(out, "channel = {:?}", bot.channel);
                let _ = writeln!(out, "api_url = {:?}", bot.api_url.as_str());
            }
            if let Some(ca) = &w.ca_file {
                let _ = writeln!(
                    out,
                    "ca_file = {:?}  # {} certificates",
                    ca.path.display().to_string(),
                    ca.certificates.len()
                );
            }
            let _ = writeln!(out, "max_in_flight = {}", w.max_in_flight);
            if let Some(rate) = w.max_per_second {
                let _ = writeln!(out, "max_per_second = {rate}");
            }
        }
        out
    }
}
