//! Unit tests of loading, resolving and printing the configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use super::*;
use crate::format::TemplateSource;

fn load(text: &str) -> Result<Config, ConfigError> {
    let env = |name: &str| match name {
        "KEY" => Some("sk-test".to_owned()),
        "SECRET" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned()),
        _ => None,
    };
    Config::from_toml(text, Path::new("relay.toml"), &env)
}

const SECRET_VALUE: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[test]
fn defaults_fill_an_empty_file() {
    let c = load("").unwrap();
    assert_eq!(c.upstream.poll_interval, Duration::from_secs(2));
    assert_eq!(c.upstream.max_poll_interval, Duration::from_secs(60));
    assert_eq!(c.upstream.max_in_flight, 64);
    assert_eq!(c.delivery.retry_schedule.len(), 7);
    assert_eq!(c.database, PathBuf::from("/var/lib/dari-relay/relay.db"));
    assert!(c.is_terminal("completed") && c.is_terminal("cancelled"));
}

#[test]
fn errors_name_key_and_line() {
    let cases = [
        ("[upstream]\npoll_interval = \"soon\"\n", "line 2"),
        ("[upstream]\nbase_url = \"ftp://x\"\n", "line 2"),
        ("[upstream]\npol_interval = \"2s\"\n", "unknown field `pol_interval`"),
        (
            "[orgs.a]\napi_key_env = \"NOPE\"\n",
            "relay.toml:2: orgs.a.api_key_env: environment variable NOPE is not set",
        ),
        (
            "[[webhooks]]\nname = \"a\"\nurl = \"http://x\"\n[[webhooks]]\nname = \"a\"\nurl = \"http://y\"\n",
            "webhook name \"a\" is used twice",
        ),
        (
            "[upstream]\npoll_interval = \"5s\"\nmax_poll_interval = \"1s\"\n",
            "relay.toml:3: upstream.max_poll_interval",
        ),
    ];
    for (text, want) in cases {
        let err = load(text).unwrap_err().to_string();
        assert!(err.contains(want), "{text:?}: {err}");
    }
}

#[test]
fn secrets_are_redacted() {
    let c = load(
        "[orgs.acme]\napi_key_env = \"KEY\"\n[[webhooks]]\nname = \"b\"\nurl = \"http://127.0.0.1/h\"\nsecret_env = \"SECRET\"\n",
    )
    .unwrap();
    let shown = format!("{}\n{:?}", c.redacted_toml(), c);
    assert!(!shown.contains("sk-test") && !shown.contains("MfKQ9r8"), "{shown}");
    assert!(shown.contains("<redacted, from $KEY>"));
}

const HOOK: &str = "[[webhooks]]\nname = \"h\"\nurl = \"http://127.0.0.1/h\"\n";

#[test]
fn headers_literal_and_from_the_environment() {
    let c = load(&format!(
        "{HOOK}headers = {{ \"X-Team\" = \"growth\" }}\nheaders_env = {{ Authorization = \"SECRET\" }}\n"
    ))
    .unwrap();
    let h = &c.webhooks[0].headers;
    assert_eq!(h.len(), 2);
    assert_eq!((h[0].name.as_str(), h[0].value.to_str().unwrap()), ("authorization", SECRET_VALUE));
    assert!(h[0].value.is_sensitive() && h[0].source == Some(SecretSource::Env("SECRET".into())));
    assert_eq!((h[1].name.as_str(), h[1].value.to_str().unwrap(), &h[1].source), ("x-team", "growth", &None));
    let shown = format!("{}\n{:?}", c.redacted_toml(), c);
    assert!(!shown.contains("MfKQ9r8"), "{shown}");
    assert!(shown.contains("headers = { \"x-team\" = \"growth\" }"), "{shown}");
    assert!(shown.contains("headers_env = { \"authorization\" = \"<redacted, from $SECRET>\" }"), "{shown}");
}

#[test]
fn bad_headers_are_refused_naming_the_key() {
    let cases = [
        (
            "headers = { \"Bad Name\" = \"x\" }",
            ":4: webhooks[0] (h).headers.Bad Name: \"Bad Name\" is not a valid header name",
        ),
        ("headers = { \"X-A\" = \"line\\nbreak\" }", "webhooks[0] (h).headers.X-A: not a valid header value"),
        ("headers = { \"Content-Type\" = \"text/plain\" }", "content-type is set by the relay itself"),
        ("headers = { \"webhook-signature\" = \"v1,x\" }", "webhook-signature is set by the relay itself"),
        ("headers_env = { \"X-Token\" = \"NOPE\" }", "headers_env.X-Token: environment variable NOPE is not set"),
        ("headers = { \"X-A\" = \"1\" }\nheaders_env = { \"x-a\" = \"SECRET\" }", "header x-a is set twice"),
        ("headers = { \"X-A\" = 1 }", "line 4"),
    ];
    for (extra, want) in cases {
        let err = load(&format!("{HOOK}{extra}\n")).unwrap_err().to_string();
        assert!(err.contains(want), "{extra}: {err}");
    }
}

#[test]
fn labels_choose_watches_like_portals_do() {
    let c = load(&format!("{HOOK}labels = {{ team = \"growth\", tier = \"gold\" }}\ntypes = [\"job.*\"]\n")).unwrap();
    let w = &c.webhooks[0];
    let labels = |v: serde_json::Value| -> Map<String, Value> { serde_json::from_value(v).unwrap() };
    let growth_gold = labels(serde_json::json!({"team": "growth", "tier": "gold", "other": "x"}));
    assert!(w.accepts("job.completed", "o/e", None, &growth_gold));
    assert!(!w.accepts("watch.failed", "o/e", None, &growth_gold), "types still apply");
    assert!(!w.accepts("job.completed", "o/e", None, &labels(serde_json::json!({"team": "growth"}))));
    assert!(!w.accepts("job.completed", "o/e", None, &labels(serde_json::json!({"team": "sales", "tier": "gold"}))));
    assert!(!w.accepts("job.completed", "o/e", None, &Map::new()));
    // A watch that names the webhook gets it whatever its labels.
    assert!(w.accepts("job.completed", "o/e", Some(&["h".to_owned()]), &Map::new()));
    assert!(!w.accepts("watch.failed", "o/e", Some(&["h".to_owned()]), &Map::new()));
    assert!(c.redacted_toml().contains("labels = { \"team\" = \"growth\", \"tier\" = \"gold\" }"));
}

#[test]
fn templates_compile_at_load() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("body.j2"), "{\"text\": {{ data.job_id }}}").unwrap();
    let text = format!("{HOOK}template = \"body.j2\"\n");
    let c = Config::from_toml(&text, &dir.path().join("relay.toml"), &|_| None).unwrap();
    let t = c.webhooks[0].template.as_ref().unwrap();
    assert_eq!(t.source, TemplateSource::File(dir.path().join("body.j2")));
    assert_eq!(c.webhooks[0].content_type(), "application/json");
    assert!(c.redacted_toml().contains("template = "));

    let cases = [
        (
            "body_template = \"{{ data.job_id \"",
            ":4: webhooks[0] (h).body_template: the template does not compile: syntax error",
        ),
        ("body_template = \"{% for %}\"", "the template does not compile"),
        ("body_template = \" \"", "the template is empty"),
        ("template = \"missing.j2\"", "webhooks[0] (h).template: cannot read"),
        ("template = \"a\"\nbody_template = \"b\"", "set either template or body_template, not both"),
        ("content_type = \"text/plain\"", "content_type: only applies to a templated body"),
        ("body_template = \"x\"\ncontent_type = \"plain\"", "is not a content type"),
    ];
    for (extra, want) in cases {
        let err = load(&format!("{HOOK}{extra}\n")).unwrap_err().to_string();
        assert!(err.contains(want), "{extra}: {err}");
    }
    let plain = load(&format!("{HOOK}body_template = \"x\"\ncontent_type = \"text/plain\"\n")).unwrap();
    assert_eq!(plain.webhooks[0].content_type(), "text/plain");
}
