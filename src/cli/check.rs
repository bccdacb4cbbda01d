//! `check-config`: the config resolved (any problem in it is an error, exit
//! 2), then what would make it fail later or do nothing: an empty file and a
//! database that cannot be created are errors too; a `types` pattern that
//! matches no notification type and a Slack or Discord URL written in the
//! file are warnings (`warning: ...` on stderr, exit 0).

use std::path::Path;

use anyhow::anyhow;

use super::{Failure, load_config, usage};
use crate::config::Config;
use crate::vocab::Format;

/// The statuses every Dari job goes through or may end in; any other status
/// the API returns still becomes `job.<status>`, so a pattern for another
/// one is a warning, not an error.
const KNOWN_STATUSES: [&str; 8] =
    ["pending", "running", "paused", "waiting_for_input", "completed", "failed", "stopped", "cancelled"];

pub(super) fn check_config(path: &Path) -> Result<(), Failure> {
    let config = load_config(path)?;
    // Comments and blank lines only: every key at its default, no org, no
    // webhook, so nothing is polled and nothing delivered.
    let text = std::fs::read_to_string(path).unwrap_or_default();
    if text.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
        return Err(usage(anyhow!(
            "{} is empty: with no [orgs.*] and no [[webhooks]] the relay would poll and deliver nothing; \
             start from config.example.toml",
            path.display()
        )));
    }
    database_writable(&config)?;
    for warning in warnings(&config) {
        eprintln!("warning: {warning}");
    }
    print!("{}", config.redacted_toml());
    Ok(())
}

/// What is legal but probably not meant, one sentence each.
pub(super) fn warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let statuses: Vec<&str> =
        KNOWN_STATUSES.iter().copied().chain(config.upstream.terminal_statuses.iter().map(String::as_str)).collect();
    let mut kinds: Vec<String> = vec!["job.event".into(), "watch.failed".into()];
    kinds.extend(statuses.iter().map(|s| format!("job.{s}")));
    let file = config.path.display();
    for (i, w) in config.webhooks.iter().enumerate() {
        for pattern in &w.types {
            if kinds.iter().any(|k| pattern.matches(k)) {
                continue;
            }
            let hint = kinds
                .iter()
                .find(|k| k.starts_with(pattern.as_str()) || pattern.as_str().starts_with(k.as_str()))
                .map(|k| format!("; did you mean {k:?}?"))
                .unwrap_or_default();
            out.push(format!(
                "{file}: webhooks[{i}] ({}).types: {:?} matches no notification type (job.event, job.<status> such \
                 as job.completed, watch.failed){hint}",
                w.name,
                pattern.as_str()
            ));
        }
        if w.url_source.is_none() && w.url_is_secret() && w.slack_bot.is_none() {
            let discord = w.format == Format::Discord || w.url.host_str().is_some_and(|h| h.contains("discord"));
            let kind = if discord { "Discord" } else { "Slack" };
            out.push(format!(
                "{file}: webhooks[{i}] ({}).url: a {kind} webhook URL ({}) is a secret written in the config text; \
                 move it to the environment with url_env",
                w.name,
                w.shown_url()
            ));
        }
    }
    out
}

/// The database can be opened where the config says: the file, if it
/// exists, is writable; else its folder is, or the nearest folder that
/// exists above it (where `run` would create the rest). Nothing is created.
/// A PostgreSQL database is not connected to (opening it would create its
/// schema): its URL was checked when the config was resolved.
fn database_writable(config: &Config) -> Result<(), Failure> {
    if config.postgres.is_some() {
        return Ok(());
    }
    let db = &config.database;
    let refuse = |what: String| {
        usage(anyhow!(
            "{}: database: {what}; for a local run set database = \"./relay.db\", for the installed service run \
             check-config as its user (sudo -u dari-relay dari-relay check-config)",
            config.path.display()
        ))
    };
    if db.exists() {
        return match std::fs::OpenOptions::new().read(true).write(true).open(db) {
            Ok(_) => Ok(()),
            Err(e) => Err(refuse(format!("cannot open {} for writing: {e}", db.display()))),
        };
    }
    let parent = db.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Some(existing) = parent.ancestors().find(|a| a.as_os_str().is_empty() || a.exists()) else {
        return Ok(());
    };
    let existing = if existing.as_os_str().is_empty() { Path::new(".") } else { existing };
    if !existing.is_dir() {
        return Err(refuse(format!("cannot create {}: {} is not a folder", db.display(), existing.display())));
    }
    // Permission bits do not tell the whole story (root, ACLs, read-only
    // mounts): try the one thing `run` will do, and undo it.
    let probe = existing.join(format!(".dari-relay-check-{}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(refuse(format!("cannot create {}: {} is not writable: {e}", db.display(), existing.display()))),
    }
}
