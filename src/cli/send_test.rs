//! `send-test`: a sample of each notification type a webhook accepts, sent
//! for real, with the receiver's answers.

use std::io::Write;
use std::path::Path;

use anyhow::anyhow;

use super::{Failure, block_on, load_config, runtime, usage};

pub(super) fn send_test(path: &Path, name: &str, kind: Option<&str>) -> Result<(), Failure> {
    use crate::notification::{SAMPLE_KINDS, now_timestamp, sample};
    let config = load_config(path)?;
    let webhook = config
        .webhook(name)
        .cloned()
        .ok_or_else(|| usage(anyhow!("{name:?} is not a webhook in {}", config.path.display())))?;
    let accepted = |k: &str| crate::glob::any_matches(&webhook.types, k);
    let kinds: Vec<&str> = match kind {
        Some(kind) => {
            if !accepted(kind) {
                eprintln!("note: the types filter of webhook {name} leaves out {kind}; sending it anyway");
            }
            vec![kind]
        }
        None => SAMPLE_KINDS.into_iter().filter(|k| accepted(k)).collect(),
    };
    if kinds.is_empty() {
        return Err(usage(anyhow!(
            "the types filter of webhook {name} accepts none of {}; pick a type with --type",
            SAMPLE_KINDS.join(", ")
        )));
    }
    let http = crate::deliver::webhook_client(&config, &webhook).map_err(runtime)?;
    // The sample job carries the labels the webhook follows, as a real one would.
    let mut labels: serde_json::Map<String, serde_json::Value> =
        webhook.labels.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
    // The label also marks the chat messages as tests (`🧪 Test:`).
    let (key, value) = crate::format::TEST_LABEL;
    labels.insert(key.into(), value.into());
    let timestamp = now_timestamp();
    let mut out = std::io::stdout().lock();
    if webhook.mode == crate::vocab::Mode::Live {
        // A live webhook gets one message, posted and then edited.
        let steps = block_on(crate::deliver::send_test_live(&http, &webhook, &labels, &timestamp));
        let mut failed = false;
        for (step, response, why) in &steps {
            let status = response.status.map_or("no answer".to_owned(), |s| format!("HTTP {s}"));
            match why {
                None => {
                    let _ = writeln!(out, "live {step}: {status}");
                }
                Some(why) => {
                    failed = true;
                    let _ = writeln!(out, "live {step}: {status}: {}", crate::format::truncate(why, 300));
                }
            }
        }
        return match (failed, steps.len()) {
            (false, 2) => Ok(()),
            _ => Err(runtime(anyhow!("the live sample to webhook {name} was not posted and edited"))),
        };
    }
    let mut failed = 0;
    block_on(async {
        for kind in &kinds {
            let notification = sample(kind, &labels, &timestamp);
            let body = match webhook.render(&notification.body.compose()) {
                Ok(body) => body,
                Err(e) => {
                    let _ = writeln!(out, "{kind}: {e}");
                    failed += 1;
                    continue;
                }
            };
            let msg_id = crate::poller::new_msg_id();
            let mut response = crate::deliver::send(&http, &webhook, &msg_id, body.clone()).await;
            // The named policy: crate::retry::send_test_retry.
            let mut retry = 1;
            while let Some(wait) = crate::retry::send_test_retry(retry, response.status, response.retry_after) {
                let _ = writeln!(out, "{kind}: HTTP 429, trying again in {:.1}s", wait.as_secs_f64());
                tokio::time::sleep(wait).await;
                response = crate::deliver::send(&http, &webhook, &msg_id, body.clone()).await;
                retry += 1;
            }
            match response.status {
                Some(status) => {
                    let _ = writeln!(out, "{kind}: HTTP {status}");
                }
                None => {
                    let _ =
                        writeln!(out, "{kind}: no answer: {}", response.error.as_deref().unwrap_or("unknown error"));
                }
            }
            if let Some(excerpt) = &response.excerpt {
                let line = excerpt.split_whitespace().collect::<Vec<_>>().join(" ");
                let _ = writeln!(out, "  answer: {}", crate::format::truncate(&line, 300));
            }
            if !response.is_success() {
                failed += 1;
            }
        }
    });
    if failed == 0 {
        Ok(())
    } else {
        Err(runtime(anyhow!("{failed} of {} samples to webhook {name} did not get a 2xx answer", kinds.len())))
    }
}
