//! Unit tests of loading, resolving and printing the configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use super::resolved;
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

/// Issue 10 item 10: every bounded value out of its bounds is refused, naming
/// the key and its line, instead of wrapping, panicking later or silently
/// deleting history (`retention = "1000000000y"` used to make the pruner's
/// cutoff wrap into the future).
#[test]
fn values_out_of_bounds_are_refused_naming_key_and_line() {
    let cases: &[(&str, &str)] = &[
        (
            "retention = \"1000000000y\"",
            "relay.toml:1: retention: 365250000000d is out of bounds: it must be from 1s to 3650d",
        ),
        ("retention = \"0s\"", "relay.toml:1: retention: 0s is out of bounds"),
        (
            "[upstream]\npoll_interval = \"0s\"",
            "relay.toml:2: upstream.poll_interval: 0s is out of bounds: it must be from 1ms to 1h",
        ),
        (
            "[upstream]\npoll_interval = \"2h\"\nmax_poll_interval = \"3h\"",
            "relay.toml:2: upstream.poll_interval: 2h is out of bounds",
        ),
        (
            "[upstream]\nmax_poll_interval = \"400d\"",
            "relay.toml:2: upstream.max_poll_interval: 400d is out of bounds: it must be from 1ms to 1d",
        ),
        ("[upstream]\nrequest_timeout = \"1h\"", "relay.toml:2: upstream.request_timeout: 1h is out of bounds"),
        (
            "[upstream]\nmax_in_flight = 0",
            "relay.toml:2: upstream.max_in_flight: must be a whole number from 1 to 10000, not 0",
        ),
        (
            "[upstream]\nmax_in_flight = 9223372036854775807",
            "relay.toml:2: upstream.max_in_flight: must be a whole number from 1 to 10000",
        ),
        ("[upstream]\nmax_in_flight = -1", "upstream.max_in_flight: must be a whole number from 1 to 10000, not -1"),
        (
            "[upstream]\nmax_response_bytes = 10",
            "relay.toml:2: upstream.max_response_bytes: must be a whole number from 1024 to 268435456",
        ),
        ("[upstream]\nnot_found_grace = \"100y\"", "relay.toml:2: upstream.not_found_grace: 36525d is out of bounds"),
        ("[upstream]\nauth_grace = \"0s\"", "relay.toml:2: upstream.auth_grace: 0s is out of bounds"),
        (
            "[upstream]\nmax_watch_age = \"20000d\"",
            "relay.toml:2: upstream.max_watch_age: 20000d is out of bounds: it must be from 100ms to 3650d",
        ),
        (
            "[upstream]\nterminal_statuses = [\"done\", \"  \"]",
            "relay.toml:2: upstream.terminal_statuses: a status must be 1 to 128 characters",
        ),
        (
            "[delivery]\nretry_schedule = [\"5s\",\n  \"30d\"]",
            "relay.toml:3: delivery.retry_schedule: 30d is out of bounds: it must be from 10ms to 7d",
        ),
        ("[delivery]\nretry_schedule = [\"1ms\"]", "relay.toml:2: delivery.retry_schedule: 1ms is out of bounds"),
        ("[delivery]\nrequest_timeout = \"1ms\"", "relay.toml:2: delivery.request_timeout: 1ms is out of bounds"),
        (
            "[delivery]\nshutdown_timeout = \"1h\"",
            "relay.toml:2: delivery.shutdown_timeout: 1h is out of bounds: it must be from 0s to 10m",
        ),
        (
            "[orgs.a]\napi_key_env = \"KEY\"\nmax_requests_per_second = 1e-300",
            "relay.toml:3: orgs.a.max_requests_per_second: must be a number from 0.001 to 10000",
        ),
        (
            "[orgs.a]\napi_key_env = \"KEY\"\nmax_requests_per_second = 1e300",
            "orgs.a.max_requests_per_second: must be a number from 0.001 to 10000",
        ),
        (
            "[orgs.a]\napi_key_env = \"KEY\"\nmax_requests_per_second = nan",
            "orgs.a.max_requests_per_second: must be a number",
        ),
        (
            "[orgs.a]\napi_key_env = \"KEY\"\nmax_requests_per_second = 0",
            "orgs.a.max_requests_per_second: must be a number",
        ),
        (
            &format!("{HOOK}max_per_second = 0.0000001"),
            "relay.toml:4: webhooks[0] (h).max_per_second: must be a number from 0.001 to 10000",
        ),
        (
            &format!("{HOOK}max_in_flight = 100000"),
            "relay.toml:4: webhooks[0] (h).max_in_flight: must be a whole number from 1 to 1000",
        ),
        (
            "[[webhooks]]\nname = \"hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh\"\nurl = \"http://x\"",
            "relay.toml:2: webhooks[0].name: ",
        ),
        (
            "[admin]\nlisten = \"127.0.0.1:9187\"\nallowed_hosts = [\"ok.example\", \"bad host\"]",
            "relay.toml:3: admin.allowed_hosts: \"bad host\" is not a host name",
        ),
        (
            "[admin]\nlisten = \"127.0.0.1:9187\"\nallowed_hosts = [\"x:99999\"]",
            "admin.allowed_hosts: \"x:99999\" is not a host name",
        ),
        // Overflow is an error of the parser, on the right line, not a wrap.
        ("retention = \"99999999999999999999s\"", "line 1"),
        ("retention = \"18446744073709551615s 1s\"", "line 1"),
    ];
    for (text, want) in cases {
        let err = load(text).unwrap_err().to_string();
        assert!(err.contains(want), "{text:?}\n  got:  {err}\n  want: {want}");
    }
    let many = |n: usize, item: &str| vec![item; n].join(", ");
    let lists = [
        (format!("[upstream]\nterminal_statuses = [{}]", many(65, "\"x\"")), "upstream.terminal_statuses: at most 64"),
        (format!("[delivery]\nretry_schedule = [{}]", many(101, "\"1s\"")), "delivery.retry_schedule: at most 100"),
        (format!("{HOOK}types = [{}]", many(257, "\"job.*\"")), "webhooks[0] (h).types: at most 256 patterns"),
        (
            format!("{HOOK}portals = [\"{}\"]", "a".repeat(5000)),
            "webhooks[0] (h).portals: a pattern must be at most 4096",
        ),
        (
            format!("{HOOK}body_template = \"{}\"", "x".repeat(2 << 20)),
            "the template is 2097152 bytes; at most 1048576",
        ),
    ];
    for (text, want) in lists {
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains(want), "{}...\n  got:  {err}\n  want: {want}", &text[..60.min(text.len())]);
    }
}

/// Every bound is inclusive: the extremes themselves are accepted.
#[test]
fn the_bounds_themselves_are_accepted() {
    let c = load(
        "retention = \"3650d\"\n[upstream]\npoll_interval = \"1ms\"\nmax_poll_interval = \"1d\"\nmax_in_flight = 10000\n\
         max_response_bytes = 268435456\nmax_watch_age = \"3650d\"\n[delivery]\nretry_schedule = [\"10ms\", \"7d\"]\n\
         shutdown_timeout = \"0s\"\n[orgs.a]\napi_key_env = \"KEY\"\nmax_requests_per_second = 0.001\n",
    )
    .unwrap();
    assert_eq!(c.retention, defaults::RETENTION.max);
    assert_eq!(c.upstream.poll_interval, defaults::POLL_INTERVAL.min);
    assert_eq!(c.delivery.shutdown_timeout, Duration::ZERO);
    assert_eq!(c.orgs["a"].max_requests_per_second, Some(defaults::MIN_RATE));
}

/// Issue 17 item 9: `"5 mins"` is five minutes (humantime's spelling), and a
/// poll_interval above the default max_poll_interval is blamed on
/// poll_interval, the key that was written, with both values.
#[test]
fn five_mins_is_five_minutes_and_a_too_long_interval_names_its_own_key() {
    let c = load("[upstream]\npoll_interval = \"5 mins\"\nmax_poll_interval = \"10 mins\"\n").unwrap();
    assert_eq!(c.upstream.poll_interval, Duration::from_secs(300));
    let err = load("[upstream]\npoll_interval = \"5 mins\"\n").unwrap_err().to_string();
    assert_eq!(
        err,
        "relay.toml:2: upstream.poll_interval: 5m is longer than upstream.max_poll_interval (1m, its default); \
         set max_poll_interval too"
    );
    let err = load("[upstream]\npoll_interval = \"5m\"\nmax_poll_interval = \"2m\"\n").unwrap_err().to_string();
    assert_eq!(err, "relay.toml:3: upstream.max_poll_interval: 2m must be at least upstream.poll_interval (5m)");
}

/// Secret files and templates are read with a cap: `/dev/zero` is an error,
/// not an endless read.
#[test]
fn secret_and_template_files_are_read_with_a_cap() {
    let err = load("[orgs.a]\napi_key_file = \"/dev/zero\"\n").unwrap_err().to_string();
    assert!(
        err.contains("relay.toml:2: orgs.a.api_key_file: cannot read /dev/zero: it is longer than 65536 bytes"),
        "{err}"
    );
    let err = Config::from_toml(&format!("{HOOK}template = \"/dev/zero\"\n"), Path::new("relay.toml"), &|_| None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("webhooks[0] (h).template: cannot read /dev/zero: it is longer than 1048576 bytes"), "{err}");
}

/// The example config states the defaults: every value it sets in the
/// top level, `[upstream]`, `[delivery]` and its first `[[webhooks]]` (bar
/// the values that have no default) is the const in [`defaults`], and
/// resolving it gives what resolving an empty file gives.
#[test]
fn example_states_the_defaults() {
    use toml::Value as T;
    let text = include_str!("../../config.example.toml");
    let example: toml::Table = toml::from_str(text).unwrap();
    let dur = |d: Duration| T::String(resolved::show(d));
    let strs = |items: &[&str]| T::Array(items.iter().map(|s| T::String((*s).to_owned())).collect());
    let empty_table = T::Table(toml::Table::new());
    let expected: Vec<(&str, &str, T)> = vec![
        ("", "database", T::String(defaults::DATABASE.into())),
        ("", "retention", dur(defaults::RETENTION.default)),
        ("", "log_format", T::String(defaults::LOG_FORMAT.into())),
        ("upstream", "base_url", T::String(defaults::BASE_URL.into())),
        ("upstream", "poll_interval", dur(defaults::POLL_INTERVAL.default)),
        ("upstream", "max_poll_interval", dur(defaults::MAX_POLL_INTERVAL.default)),
        ("upstream", "request_timeout", dur(defaults::UPSTREAM_REQUEST_TIMEOUT.default)),
        ("upstream", "max_in_flight", T::Integer(defaults::UPSTREAM_MAX_IN_FLIGHT.default as i64)),
        ("upstream", "terminal_statuses", strs(&defaults::TERMINAL_STATUSES)),
        ("upstream", "max_response_bytes", T::Integer(defaults::MAX_RESPONSE_BYTES.default as i64)),
        ("upstream", "not_found_grace", dur(defaults::NOT_FOUND_GRACE.default)),
        ("upstream", "auth_grace", dur(defaults::AUTH_GRACE.default)),
        ("upstream", "max_watch_age", dur(defaults::MAX_WATCH_AGE.default)),
        ("delivery", "retry_schedule", T::Array(defaults::RETRY_SCHEDULE.iter().map(|&d| dur(d)).collect())),
        ("delivery", "request_timeout", dur(defaults::DELIVERY_REQUEST_TIMEOUT.default)),
        ("delivery", "shutdown_timeout", dur(defaults::SHUTDOWN_TIMEOUT.default)),
        ("webhooks", "format", T::String(defaults::WEBHOOK_FORMAT.as_str().into())),
        ("webhooks", "mode", T::String(defaults::WEBHOOK_MODE.as_str().into())),
        ("webhooks", "max_in_flight", T::Integer(defaults::WEBHOOK_MAX_IN_FLIGHT.default as i64)),
        ("webhooks", "types", T::Array(vec![])),
        ("webhooks", "portals", T::Array(vec![])),
        ("webhooks", "labels", empty_table.clone()),
        ("webhooks", "headers", empty_table.clone()),
        ("webhooks", "headers_env", empty_table),
    ];
    // Durations compare by value: "60s" in the example is the "1m" default.
    let same = |a: &T, b: &T| match (a, b) {
        (T::String(a), T::String(b)) => a == b || parse_duration(a).ok().is_some_and(|a| parse_duration(b) == Ok(a)),
        (T::Array(a), T::Array(b)) => {
            a.len() == b.len()
                && a.iter().zip(b).all(|(a, b)| match (a, b) {
                    (T::String(a), T::String(b)) => a == b || parse_duration(a) == parse_duration(b),
                    _ => a == b,
                })
        }
        _ => a == b,
    };
    let table = |section: &str| -> toml::Table {
        match section {
            "" => example
                .iter()
                .filter(|(_, v)| {
                    !v.is_table() && !v.is_array() || v.as_array().is_some_and(|a| !a.iter().any(T::is_table))
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            "webhooks" => example["webhooks"][0].as_table().unwrap().clone(),
            s => example[s].as_table().unwrap().clone(),
        }
    };
    // Keys that are set in the example but have no default.
    let no_default = ["name", "url", "secret_env"];
    for section in ["", "upstream", "delivery", "webhooks"] {
        for (key, value) in table(section) {
            if section == "webhooks" && no_default.contains(&key.as_str()) {
                continue;
            }
            let Some((_, _, want)) = expected.iter().find(|(s, k, _)| *s == section && *k == key) else {
                panic!("config.example.toml sets {section}.{key}, which this test does not check against a default");
            };
            assert!(same(&value, want), "config.example.toml: {section}.{key} = {value}, but the default is {want}");
        }
    }
    for (section, key, _) in &expected {
        assert!(table(section).contains_key(*key), "config.example.toml does not state the default of {section}.{key}");
    }

    // And the code uses those consts: the example resolves to what an empty
    // file does.
    let env = |name: &str| match name {
        "DARI_API_KEY" => Some("sk".to_owned()),
        "BACKEND_WEBHOOK_SECRET" => Some(SECRET_VALUE.to_owned()),
        _ => None,
    };
    let from_example = Config::from_toml(text, Path::new("config.example.toml"), &env).unwrap();
    let from_nothing = load(&format!("{HOOK}format = \"standard\"\n")).unwrap();
    let shown = |c: &Config| {
        let text = c.redacted_toml();
        let upto = text.find("\n[orgs").or_else(|| text.find("\n[[webhooks")).unwrap();
        // log_format is stated in the example but left to the CLI when absent.
        text[text.find('\n').unwrap()..upto]
            .lines()
            .filter(|l| !l.starts_with("log_format"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(shown(&from_example), shown(&from_nothing));
    assert_eq!(from_example.webhooks[0].max_in_flight, from_nothing.webhooks[0].max_in_flight);
    assert_eq!(from_example.webhooks[0].format, from_nothing.webhooks[0].format);
    assert_eq!(from_nothing.log_format, None, "an empty file leaves the log format to the CLI (text)");
}

/// Every bound in [`defaults`] is written next to its key in the example,
/// as the resolver checks it.
#[test]
fn example_documents_the_bounds() {
    let text = include_str!("../../config.example.toml");
    let d = |b: defaults::DurationBounds| format!("Bounds: {} to {}", resolved::show(b.min), resolved::show(b.max));
    let c = |b: defaults::CountBounds| format!("Bounds: {} to {}", b.min, b.max);
    let rate = format!("Bounds: {} to {}", defaults::MIN_RATE, defaults::MAX_RATE);
    let cases = [
        ("retention", d(defaults::RETENTION)),
        ("poll_interval", d(defaults::POLL_INTERVAL)),
        ("max_poll_interval", d(defaults::MAX_POLL_INTERVAL)),
        ("request_timeout", d(defaults::UPSTREAM_REQUEST_TIMEOUT)),
        ("request_timeout", d(defaults::DELIVERY_REQUEST_TIMEOUT)),
        ("max_in_flight", c(defaults::UPSTREAM_MAX_IN_FLIGHT)),
        ("max_in_flight", c(defaults::WEBHOOK_MAX_IN_FLIGHT)),
        ("max_response_bytes", c(defaults::MAX_RESPONSE_BYTES)),
        ("not_found_grace", d(defaults::NOT_FOUND_GRACE)),
        ("auth_grace", d(defaults::AUTH_GRACE)),
        ("max_watch_age", d(defaults::MAX_WATCH_AGE)),
        ("shutdown_timeout", d(defaults::SHUTDOWN_TIMEOUT)),
        ("max_requests_per_second", rate.clone()),
        ("max_per_second", rate),
        (
            "retry_schedule",
            format!(
                "Bounds: at most {} waits, each {} to {}",
                defaults::MAX_RETRIES,
                resolved::show(defaults::RETRY_WAIT.min),
                resolved::show(defaults::RETRY_WAIT.max)
            ),
        ),
        ("terminal_statuses", format!("Bounds: at most {} statuses", defaults::MAX_TERMINAL_STATUSES)),
        ("allowed_hosts", format!("Bounds: at most {} names", defaults::MAX_LIST_LEN)),
        ("channel", format!("Bounds: 1 to {} letters and digits", defaults::MAX_CHANNEL_LEN)),
        ("api_url", format!("The default is {:?}", defaults::SLACK_API_URL)),
        (
            "auto_watch",
            format!(
                "Bounds: at most {} patterns, each at most {} bytes",
                defaults::MAX_LIST_LEN,
                defaults::MAX_VALUE_LEN
            ),
        ),
        (
            "types",
            format!(
                "Bounds: at most {} patterns, each at most {} bytes",
                defaults::MAX_LIST_LEN,
                defaults::MAX_VALUE_LEN
            ),
        ),
        ("template", format!("Bounds: at most 1 MiB ({} bytes)", defaults::MAX_TEMPLATE_BYTES)),
    ];
    let lines: Vec<&str> = text.lines().collect();
    for (key, bounds) in cases {
        // The line right above `key = ` (or `# key = `) states the bounds.
        let documented = lines.windows(2).any(|w| {
            w[0].starts_with(&format!("# {bounds}"))
                && (w[1].starts_with(&format!("{key} = ")) || w[1].starts_with(&format!("# {key} = ")))
        });
        assert!(documented, "config.example.toml does not say \"{bounds}\" right above {key}");
    }
}

/// `[inbound]`: resolved with its key redacted; a bad address, an empty
/// pattern, too many patterns or both key sources are refused naming the key.
#[test]
fn inbound_resolves_and_refuses_bad_values() {
    let c =
        load("[inbound]\nlisten = \"0.0.0.0:8443\"\ndari_webhook_key_env = \"SECRET\"\nauto_watch = [\"acme/*\"]\n")
            .unwrap();
    let inbound = c.inbound.as_ref().unwrap();
    assert_eq!(inbound.listen, "0.0.0.0:8443".parse().unwrap());
    assert!(inbound.auto_watch[0].matches("acme/form"));
    let shown = format!("{}\n{:?}", c.redacted_toml(), c);
    assert!(!shown.contains("MfKQ9r8"), "{shown}");
    assert!(shown.contains("[inbound]") && shown.contains("<redacted, from $SECRET>"), "{shown}");
    assert!(load("").unwrap().inbound.is_none());
    let many = format!("[inbound]\nlisten = \"127.0.0.1:1\"\nauto_watch = [{}]\n", vec!["\"a/*\""; 257].join(", "));
    let cases = [
        ("[inbound]\nlisten = \"unix:/x\"\n".to_owned(), "relay.toml:2: inbound.listen"),
        ("[inbound]\nlisten = \"127.0.0.1:1\"\nauto_watch = [\"\"]\n".to_owned(), "relay.toml:3: inbound.auto_watch"),
        (many, "inbound.auto_watch: at most 256 patterns"),
        (
            "[inbound]\nlisten = \"127.0.0.1:1\"\ndari_webhook_key_env = \"NOPE\"\n".to_owned(),
            "inbound.dari_webhook_key_env: environment variable NOPE is not set",
        ),
        (
            "[inbound]\nlisten = \"127.0.0.1:1\"\ndari_webhook_key_env = \"SECRET\"\ndari_webhook_key_file = \"/k\"\n"
                .to_owned(),
            "set either dari_webhook_key_env or dari_webhook_key_file",
        ),
        ("[inbound]\nlisten = \"127.0.0.1:1\"\nkey = \"x\"\n".to_owned(), "unknown field `key`"),
    ];
    for (text, want) in cases {
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains(want), "{text:?}: {err}");
    }
}
