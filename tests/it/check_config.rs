//! Issue 17 item 7: `check-config` refuses (exit 2) an empty file and a
//! database that cannot be created, and warns (`warning: ...` on stderr,
//! exit 0) about a `types` pattern that matches no notification type and a
//! Slack or Discord URL written in the config text, which it never prints
//! in full.

use std::path::Path;
use std::process::Command;

const ORG: &str = "[orgs.acme]\napi_key_env = \"DARI_API_KEY\"\n";

/// `check-config` on `body` (after a database line for `db`, if given) in
/// `dir`, as `nobody` when `as_nobody` and the tests run as root; returns
/// the exit code, stdout and stderr.
fn check(dir: &Path, db: Option<&Path>, body: &str, as_nobody: bool) -> (Option<i32>, String, String) {
    let path = dir.join("config.toml");
    let database = db.map(|d| format!("database = \"{}\"\n", d.display())).unwrap_or_default();
    std::fs::write(&path, format!("{database}{body}")).unwrap();
    let root = std::fs::metadata(&path).map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap();
    let mut cmd = if as_nobody && root {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_dari-relay")]);
        cmd
    } else {
        Command::new(env!("CARGO_BIN_EXE_dari-relay"))
    };
    let out = cmd.args(["check-config", "-c"]).arg(&path).env_clear().env("DARI_API_KEY", "sk-x").output().unwrap();
    (out.status.code(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn an_empty_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for body in ["", "\n  \n# only a comment\n"] {
        let (code, stdout, stderr) = check(dir.path(), None, body, false);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stdout.is_empty());
        assert!(stderr.contains("config.toml is empty: with no [orgs.*] and no [[webhooks]]"), "{stderr}");
    }
}

#[test]
fn a_types_pattern_that_matches_no_notification_type_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{ORG}[[webhooks]]\nname = \"backend\"\nurl = \"http://127.0.0.1:9/h\"\n\
         types = [\"job.completed\", \"job.complete\", \"watch.*\", \"job.*\", \"jobs.failed\"]\n"
    );
    let (code, stdout, stderr) = check(dir.path(), Some(&dir.path().join("r.db")), &body, false);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("[[webhooks]]"), "the resolved config is still printed: {stdout}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(
        warnings[0].contains("webhooks[0] (backend).types: \"job.complete\" matches no notification type")
            && warnings[0].contains("did you mean \"job.completed\"?"),
        "{stderr}"
    );
    assert!(warnings[1].contains("\"jobs.failed\" matches no notification type"), "{stderr}");
}

#[test]
fn a_database_that_cannot_be_created_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // A file where a folder should be.
    std::fs::write(dir.path().join("afile"), "").unwrap();
    let (code, _, stderr) = check(dir.path(), Some(&dir.path().join("afile/state/relay.db")), ORG, false);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("database: cannot create") && stderr.contains("afile is not a folder"), "{stderr}");
    // A folder this user may not write (run as nobody when the tests run as root).
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    let (code, _, stderr) = check(dir.path(), Some(&locked.join("state/relay.db")), ORG, true);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{} is not writable", locked.display()))
            && stderr.contains("set database = \"./relay.db\""),
        "{stderr}"
    );
    assert!(!locked.join("state").exists(), "check-config creates nothing");
    // A folder that does not exist yet, under one that is writable: fine, and not created.
    let (code, _, stderr) = check(dir.path(), Some(&dir.path().join("new/state/relay.db")), ORG, false);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!dir.path().join("new").exists());
}

#[test]
fn a_chat_url_written_in_the_config_is_a_warning_and_never_printed_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let slack = "https://hooks.slack.com/services/T000/B000/XXXXXXXXXXXXXXXXXXXXXXXX";
    let discord = "https://discord.com/api/webhooks/123456/abcdefTOKEN";
    let body = format!(
        "{ORG}[[webhooks]]\nname = \"chat\"\nurl = \"{slack}\"\nformat = \"slack\"\n\
         [[webhooks]]\nname = \"disc\"\nurl = \"{discord}\"\nformat = \"discord\"\n\
         [[webhooks]]\nname = \"plain\"\nurl = \"http://127.0.0.1:9/h\"\n"
    );
    let (code, stdout, stderr) = check(dir.path(), Some(&dir.path().join("r.db")), &body, false);
    assert_eq!(code, Some(0), "{stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(warnings[0].contains("webhooks[0] (chat).url: a Slack webhook URL (https://hooks.slack.com/<redacted>)"));
    assert!(warnings[0].contains("move it to the environment with url_env"), "{stderr}");
    assert!(warnings[1].contains("webhooks[1] (disc).url: a Discord webhook URL (https://discord.com/<redacted>)"));
    for secret in ["XXXXXXXXXXXXXXXXXXXXXXXX", "abcdefTOKEN", "T000/B000"] {
        assert!(!stdout.contains(secret) && !stderr.contains(secret), "{secret} printed:\n{stdout}\n{stderr}");
    }
    assert!(stdout.contains("url = \"https://hooks.slack.com/<redacted>\""), "{stdout}");
    assert!(stdout.contains("url = \"http://127.0.0.1:9/h\""), "a plain URL is shown: {stdout}");
}
