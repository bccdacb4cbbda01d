//! Adding watches from the command line: `start` (start a Dari job and
//! watch it, through `watches::start_and_watch`), `watch import`'s JSON
//! lines (each a `watches::WatchRequest`), and what a `watch add` of a job
//! already watched leaves unchanged.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{Context, anyhow};

use super::{Failure, block_on, load_config, open_store, runtime, usage};
use crate::config::Config;
use crate::vocab::{NewWatch, PortalId};
use crate::watches::{StartError, WatchRequest, start_and_watch};

/// The options of a `watch add` that differ from the watch already stored,
/// as the user wrote them, with what the watch keeps.
pub(super) fn ignored_options(new: &NewWatch, existing: &serde_json::Value) -> Vec<String> {
    let mut ignored = Vec::new();
    let portal_id = existing["portal_id"].as_str().unwrap_or_default();
    if new.portal.to_string() != portal_id {
        ignored.push(format!("the portal {} (it stays on {portal_id})", new.portal));
    }
    let kept_labels: BTreeMap<&str, &str> = existing["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.as_str().unwrap_or_default()))
        .collect();
    let kept_webhooks: Option<Vec<String>> =
        existing["webhooks"].as_array().map(|list| list.iter().filter_map(|w| w.as_str().map(str::to_owned)).collect());
    for (k, v) in &new.labels {
        match kept_labels.get(k.as_str()) {
            Some(kept) if kept == v => {}
            Some(kept) => ignored.push(format!("--label {k}={v} (it keeps {k}={kept})")),
            None => ignored.push(format!("--label {k}={v}")),
        }
    }
    if let Some(webhooks) = &new.webhooks {
        let sorted = |w: &[String]| {
            let mut w = w.to_vec();
            w.sort();
            w
        };
        if kept_webhooks.as_deref().map(sorted) != Some(sorted(webhooks)) {
            let kept = kept_webhooks.as_ref().map_or("every matching webhook".to_owned(), |w| w.join(", "));
            let given: Vec<String> = webhooks.iter().map(|w| format!("--webhook {w}")).collect();
            ignored.push(format!("{} (it delivers to {kept})", given.join(" ")));
        }
    }
    if new.from_now {
        ignored.push("--from-now".to_owned());
    }
    ignored
}

/// Reads and validates every line before anything is imported, so a bad
/// line imports nothing. Each line is a [`WatchRequest`], as
/// `POST /v1/watches` takes it.
pub(super) fn read_import(config: &Config, file: &Path) -> Result<Vec<NewWatch>, Failure> {
    let reader: Box<dyn BufRead> = if file == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display())).map_err(usage)?;
        Box::new(std::io::BufReader::new(f))
    };
    let name = if file == Path::new("-") { "<stdin>".to_owned() } else { file.display().to_string() };
    let mut watches = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let at = |e: String| usage(anyhow!("{name}:{}: {e}; nothing was imported", i + 1));
        let line = line.map_err(|e| at(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let json: serde_json::Value = serde_json::from_str(&line).map_err(|e| at(e.to_string()))?;
        let watch = WatchRequest::from_json(&json).and_then(|r| r.check(config)).map_err(|e| at(e.to_string()))?;
        watches.push(watch);
    }
    Ok(watches)
}

/// `start`: asks Dari to start a job with the org's key, then watches it.
/// The watch options are checked first, so a bad `--webhook` never starts a
/// paid job.
pub(super) fn start(
    path: &Path,
    portal: PortalId,
    body: &Path,
    webhooks: Vec<String>,
    labels: Vec<(String, String)>,
) -> Result<(), Failure> {
    let config = load_config(path)?;
    let body = if body == Path::new("-") {
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut text).map_err(usage)?;
        text
    } else {
        std::fs::read(body).with_context(|| format!("cannot read {}", body.display())).map_err(usage)?
    };
    serde_json::from_slice::<serde_json::Value>(&body).context("--body is not JSON").map_err(usage)?;
    let request = WatchRequest {
        portal_id: Some(portal.to_string()),
        webhooks: (!webhooks.is_empty()).then_some(webhooks),
        labels: labels.into_iter().collect(),
        ..WatchRequest::default()
    };
    // The store is opened once the job is started, as it always was.
    let add = |watch: NewWatch| {
        let config = &config;
        async move { open_store(config).await?.add_watches(vec![watch]).await.map_err(runtime) }
    };
    let started = match block_on(start_and_watch(&config, request, body, add)) {
        Ok(started) => started,
        Err(StartError::Invalid(e)) => return Err(usage(e)),
        Err(StartError::Client(e)) => return Err(runtime(e)),
        Err(StartError::Dari(e)) => return Err(runtime(anyhow::Error::new(e).context("Dari did not start the job"))),
        // The job is running and paid for: say which it is.
        Err(StartError::NotWatched { job_id, error }) => {
            return Err(runtime(anyhow!(
                "Dari started job {job_id}, but it could not be watched: {:#}; add it with `dari-relay watch add {portal} {job_id}`",
                error.error(),
            )));
        }
    };
    let (job_id, portal) = (&started.job_id, &started.watch.portal);
    let _ = writeln!(std::io::stdout().lock(), "started job {job_id} on {portal}; watching it");
    Ok(())
}
