//! The binary's command line: bad config and bad arguments exit 2 with one
//! message naming what is wrong; good ones work; the demo runs.

use std::path::{Path, PathBuf};

use assert_cmd::Command;

const JOB: &str = "550e8400-e29b-41d4-a716-446655440000";

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env { dir: tempfile::tempdir().unwrap() }
    }

    /// Writes a config with a valid database path and `body` after it.
    fn config(&self, body: &str) -> PathBuf {
        let path = self.dir.path().join("config.toml");
        let db = self.dir.path().join("state/relay.db");
        std::fs::write(&path, format!("database = \"{}\"\n{body}", db.display())).unwrap();
        path
    }

    fn cmd(&self, config: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dari-relay"));
        cmd.args(args).arg("--config").arg(config);
        cmd.env("DARI_API_KEY", "sk-live-0123456789").env("HOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        cmd.env_remove("RUST_LOG");
        cmd
    }
}

const GOOD: &str = r#"
[orgs.acme]
api_key_env = "DARI_API_KEY"

[[webhooks]]
name = "backend"
url = "http://127.0.0.1:9/hook"
secret_env = "HOOK_SECRET"
"#;

/// Runs `check-config` on `body` and returns stderr, asserting exit 2.
fn bad_config(body: &str) -> String {
    let env = Env::new();
    let config = env.config(body);
    let out = env.cmd(&config, &["check-config"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "stdout: {}", String::from_utf8_lossy(&out.stdout));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("config.toml"), "names the file: {stderr}");
    stderr
}

#[test]
fn unknown_key_is_refused_with_its_line() {
    let err = bad_config("[upstream]\npoll_interval = \"2s\"\npoll_intervall = \"3s\"\n");
    assert!(err.contains("unknown field `poll_intervall`") && err.contains("line 4"), "{err}");
}

#[test]
fn bad_duration_is_refused_with_its_line() {
    let err = bad_config("[upstream]\nmax_poll_interval = \"sixty\"\n");
    assert!(
        err.contains("invalid duration \"sixty\"") && err.contains("line 3") && err.contains("max_poll_interval"),
        "{err}"
    );
}

#[test]
fn bad_url_is_refused_with_its_line() {
    let err = bad_config(&format!("{GOOD}[[webhooks]]\nname = \"x\"\nurl = \"not a url\"\n"));
    assert!(err.contains("invalid URL \"not a url\"") && err.contains("line 12"), "{err}");
}

#[test]
fn missing_environment_variable_is_named() {
    let err = bad_config("[orgs.acme]\napi_key_env = \"ACME_KEY_NOT_SET\"\n");
    assert!(err.contains(":3: orgs.acme.api_key_env: environment variable ACME_KEY_NOT_SET is not set"), "{err}");
}

#[test]
fn webhook_name_used_twice_is_refused() {
    let err = bad_config(&format!("{GOOD}[[webhooks]]\nname = \"backend\"\nurl = \"http://127.0.0.1:9/other\"\n"));
    assert!(err.contains("webhooks[1].name") && err.contains("\"backend\" is used twice"), "{err}");
}

#[test]
fn missing_config_file_exits_2_naming_it() {
    let env = Env::new();
    let out = env.cmd(&env.dir.path().join("nope.toml"), &["check-config"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.toml"));
}

#[test]
fn check_config_prints_the_resolved_config_without_secrets() {
    let env = Env::new();
    let config = env.config(GOOD);
    let out = env.cmd(&config, &["check-config"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("poll_interval = \"2s\"") && text.contains("<redacted, from $DARI_API_KEY>"), "{text}");
    assert!(!text.contains("sk-live") && !text.contains("MfKQ9r8"), "{text}");
}

#[test]
fn non_uuid_job_id_is_refused() {
    let env = Env::new();
    let config = env.config(GOOD);
    let out = env.cmd(&config, &["watch", "add", "acme/contact_form", "job-42"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("\"job-42\" is not a UUID") && stderr.contains("<JOB_ID>"), "{stderr}");
}

#[test]
fn bad_portal_unknown_webhook_and_unknown_org_are_refused() {
    let env = Env::new();
    let config = env.config(GOOD);
    let cases: [(&[&str], &str); 4] = [
        (&["watch", "add", "acme", JOB], "is not a portal id"),
        (&["watch", "add", "acme/form", JOB, "--webhook", "nope"], "--webhook \"nope\" is not a webhook"),
        (&["watch", "add", "other/form", JOB], "org \"other\" has no [orgs.other] table"),
        (&["watch", "add", "acme/form", JOB, "--label", "novalue"], "is not KEY=VALUE"),
    ];
    for (args, want) in cases {
        let out = env.cmd(&config, args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}

#[test]
fn watch_add_list_rm_round_trip_and_database_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let config = env.config(GOOD);
    let add = ["watch", "add", "acme/contact_form", JOB, "--label", "customer=acme", "--webhook", "backend"];
    env.cmd(&config, &add).assert().success().stdout(format!("watching job {JOB} on acme/contact_form\n"));
    // Adding again changes nothing and exits 0.
    env.cmd(&config, &add).assert().success().stdout(format!("already watching job {JOB} on acme/contact_form\n"));
    let db = env.dir.path().join("state/relay.db");
    assert_eq!(std::fs::metadata(&db).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(db.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);

    let out = env.cmd(&config, &["watch", "list", "--json"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["job_id"], JOB);
    assert_eq!(list[0]["labels"]["customer"], "acme");
    assert_eq!(list[0]["webhooks"][0], "backend");
    assert_eq!(list[0]["state"], "active");

    env.cmd(&config, &["watch", "rm", JOB]).assert().success();
    let out = env.cmd(&config, &["watch", "list", "--json"]).output().unwrap();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(), serde_json::json!([]));
    let out = env.cmd(&config, &["watch", "list", "--all"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed"));
    env.cmd(&config, &["watch", "rm", JOB]).assert().code(2);
    // The key never reaches the database.
    let bytes = std::fs::read(env.dir.path().join("state/relay.db")).unwrap();
    assert!(!bytes.windows(7).any(|w| w == b"sk-live"));
}

#[test]
fn import_reports_the_bad_line_and_imports_nothing() {
    let env = Env::new();
    let config = env.config(GOOD);
    let lines = format!(
        "{{\"portal_id\":\"acme/a\",\"job_id\":\"{JOB}\"}}\n\n{{\"portal_id\":\"acme/a\",\"job_id\":\"not-a-uuid\"}}\n"
    );
    let out = env.cmd(&config, &["watch", "import", "-"]).write_stdin(lines).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("<stdin>:3:") && stderr.contains("nothing was imported"), "{stderr}");
    let out = env.cmd(&config, &["watch", "list", "--json"]).output().unwrap();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(), serde_json::json!([]));
}

/// 100,000 lines go in through one transaction (timed in the README, not here).
#[test]
fn import_takes_a_hundred_thousand_lines() {
    use std::fmt::Write as _;
    let env = Env::new();
    let config = env.config(GOOD);
    let mut lines = String::new();
    for i in 0..100_000u32 {
        let _ = writeln!(
            lines,
            "{{\"portal_id\":\"acme/form\",\"job_id\":\"{i:08x}-0000-4000-8000-000000000000\",\"labels\":{{\"n\":\"{i}\"}}}}"
        );
    }
    let file = env.dir.path().join("jobs.jsonl");
    std::fs::write(&file, lines).unwrap();
    env.cmd(&config, &["watch", "import", file.to_str().unwrap()])
        .assert()
        .success()
        .stdout("imported 100000 watches (100000 new, 0 already watched)\n");
}

#[test]
fn demo_runs_the_whole_pipeline() {
    let out = Command::new(env!("CARGO_BIN_EXE_dari-relay")).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("10 notifications delivered in order, every signature verified"), "{stdout}");
    assert!(stdout.contains("will be retried, same id"));
}

#[test]
fn admin_api_on_a_public_address_needs_a_token() {
    let err = bad_config("[admin]\nlisten = \"0.0.0.0:9187\"\n");
    assert!(err.contains(":3: admin.listen: 0.0.0.0:9187 is reachable from other machines"), "{err}");
    let err = bad_config("[admin]\nlisten = \"localhost\"\n");
    assert!(err.contains("admin.listen") && err.contains("is not an address"), "{err}");
}

/// `--log-format json`: one JSON object per line, and every line about a job
/// carries its job id (through the span).
#[test]
fn json_logs_carry_the_job_id() {
    use std::io::{BufRead, BufReader};
    let env = Env::new();
    // A portal that answers nothing: the relay logs a failed poll for the job.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = env.config(&format!(
        "[upstream]\nbase_url = \"http://{closed}\"\npoll_interval = \"50ms\"\nmax_poll_interval = \"100ms\"\n{GOOD}"
    ));
    env.cmd(&config, &["watch", "add", "acme/form", JOB]).assert().success();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dari-relay"))
        .args(["run", "--log-format", "json", "--config"])
        .arg(&config)
        .env("DARI_API_KEY", "sk-live-0123456789")
        .env("HOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut about_job = 0;
    while about_job < 2 {
        let line = lines.next().expect("the daemon keeps logging").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v["message"] == "poll failed" {
            // As an event field, or through the span the line was logged in.
            assert!(v["job_id"] == JOB || v["span"]["job_id"] == JOB, "{line}");
            about_job += 1;
        }
    }
    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success());
}

/// Without `--config`, the config file is `$DARI_RELAY_CONFIG`.
#[test]
fn config_path_comes_from_the_environment_without_the_flag() {
    let env = Env::new();
    let config = env.config(GOOD);
    let out = Command::new(env!("CARGO_BIN_EXE_dari-relay"))
        .arg("check-config")
        .env("DARI_RELAY_CONFIG", &config)
        .env("DARI_API_KEY", "sk-live-0123456789")
        .env("HOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("# resolved from {}", config.display())));
}
