//! Issue 10 item 9: what a web page in the operator's browser could make it
//! send to an admin API without a token is refused: bodies that are not JSON
//! (415), foreign `Host`s (DNS rebinding) and cross-site requests (403).
//! Plus the bounded query parameters and ids of the API (issue 10's
//! siblings).

use dari_relay::admin::Listener;
use dari_relay::config::ListenAddr;
use reqwest::Method;
use serde_json::{Value, json};

use crate::fakes::{FakeDari, Relay, Reply, config_text};

const JOB: &str = "550e8400-e29b-41d4-a716-446655440000";

/// A relay with its admin API on 127.0.0.1:0 and no token.
async fn relay_with_api(extra: &str) -> (Relay, FakeDari, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let text = config_text(&dir.path().join("r.db"), &dari, &[], extra);
    let listener = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()), None).await.unwrap();
    let base = format!("http://{}", listener.describe());
    (Relay::start_with_admin(&text, Some(listener)).await, dari, base, dir)
}

/// Sends `method url` with the given headers and body; returns the status
/// and the JSON answer.
async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request.body(body.to_owned());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    assert_eq!(content_type.as_deref(), Some("application/json"), "{status} {text}");
    (status, serde_json::from_str(&text).unwrap())
}

#[tokio::test]
async fn a_body_that_is_not_json_is_refused_with_415_before_a_paid_job_starts() {
    let (relay, dari, api, _dir) = relay_with_api("").await;
    dari.on_start(JOB, vec![Reply::Json(json!({"status": "pending", "events": []}))]);
    let start = format!("{api}/v1/jobs/acme/form/start");
    let inputs = r#"{"inputs": {"name": "Ada"}}"#;
    // What an HTML form or fetch(..., {mode: "no-cors"}) can send cross-site
    // without a preflight, and no content type at all.
    for content_type in
        [Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("multipart/form-data; boundary=x"), None]
    {
        let headers: Vec<(&str, &str)> = content_type.iter().map(|c| ("content-type", *c)).collect();
        let (status, answer) = send(Method::POST, &start, &headers, Some(inputs)).await;
        assert_eq!(status, 415, "{content_type:?}: {answer}");
        assert!(answer["error"].as_str().unwrap().contains("application/json"), "{answer}");
        let watch = format!(r#"{{"portal_id": "acme/form", "job_id": "{JOB}"}}"#);
        let (status, _) = send(Method::POST, &format!("{api}/v1/watches"), &headers, Some(&watch)).await;
        assert_eq!(status, 415, "{content_type:?}");
    }
    assert!(dari.starts().is_empty(), "no job was started");
    assert!(relay.store.query_watches(&Default::default()).unwrap().is_empty(), "no watch was added");
    // JSON, with parameters or as a +json type, is accepted; so is a POST
    // without a body.
    let (status, answer) =
        send(Method::POST, &start, &[("content-type", "application/json; charset=utf-8")], Some(inputs)).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(dari.starts().len(), 1);
    let (status, _) = send(Method::POST, &format!("{api}/v1/deliveries/1/retry"), &[], None).await;
    assert_eq!(status, 409, "a bodiless POST passes the content-type check");
    relay.stop().await;
}

#[tokio::test]
async fn foreign_hosts_and_cross_site_requests_are_refused_with_403() {
    let (relay, _dari, api, _dir) = relay_with_api(
        "[admin]\nlisten = \"127.0.0.1:9\"\nallowed_hosts = [\"relay.internal\", \"Proxy.example:8443\"]\n",
    )
    .await;
    let port = api.rsplit(':').next().unwrap().to_owned();
    let watches = format!("{api}/v1/watches");
    let refused = [
        // DNS rebinding: the attacker's name, resolved to 127.0.0.1.
        vec![("host", format!("evil.example:{port}"))],
        vec![("host", "evil.example".to_owned())],
        vec![("host", format!("localhost:{}", port.parse::<u16>().unwrap() + 1))],
        vec![("host", "proxy.example:9999".to_owned())],
        vec![("host", "not a host".to_owned())],
        // A page of another site, or of another port of this machine.
        vec![("origin", "http://evil.example".to_owned())],
        vec![("origin", format!("http://localhost:{}", port.parse::<u16>().unwrap() + 1))],
        vec![("origin", "null".to_owned())],
        vec![("origin", format!("https://127.0.0.1:{port}"))],
        vec![("sec-fetch-site", "cross-site".to_owned())],
        vec![("sec-fetch-site", "same-site".to_owned())],
    ];
    for headers in refused {
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let (status, answer) = send(Method::GET, &watches, &pairs, None).await;
        assert_eq!(status, 403, "{headers:?}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    let accepted = [
        vec![("host", format!("localhost:{port}"))],
        vec![("host", format!("127.0.0.1:{port}"))],
        vec![("host", format!("[::1]:{port}"))],
        vec![("host", "relay.internal".to_owned())],
        vec![("host", "RELAY.internal:1234".to_owned())],
        vec![("host", "proxy.example:8443".to_owned())],
        vec![("origin", format!("http://127.0.0.1:{port}")), ("sec-fetch-site", "same-origin".to_owned())],
        vec![("origin", "https://relay.internal".to_owned())],
        vec![("sec-fetch-site", "none".to_owned())],
    ];
    for headers in accepted {
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let (status, answer) = send(Method::GET, &watches, &pairs, None).await;
        assert_eq!(status, 200, "{headers:?}: {answer}");
    }
    // A cross-site POST is refused even with a JSON body.
    let watch = format!(r#"{{"portal_id": "acme/form", "job_id": "{JOB}"}}"#);
    let (status, _) = send(
        Method::POST,
        &watches,
        &[("content-type", "application/json"), ("origin", "http://evil.example")],
        Some(&watch),
    )
    .await;
    assert_eq!(status, 403);
    assert!(relay.store.query_watches(&Default::default()).unwrap().is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn query_parameters_and_ids_are_bounded_with_a_json_400() {
    let (relay, _dari, api, _dir) = relay_with_api("").await;
    let bad = [
        ("/v1/watches?limit=0", "limit"),
        ("/v1/watches?limit=1001", "limit"),
        ("/v1/watches?limit=99999999999999999999999", "limit"),
        ("/v1/watches?after=not-a-job", "after"),
        ("/v1/watches?portal_id=no-slash", "portal_id"),
        ("/v1/watches?state=%ZZ", "state"),
        ("/v1/deliveries?limit=0", "limit"),
        ("/v1/deliveries?limit=5000", "limit"),
        ("/v1/deliveries?page=2", "query"),
        ("/v1/watches/not-a-uuid", "job_id"),
    ];
    for (path, field) in bad {
        let (status, answer) = send(Method::GET, &format!("{api}{path}"), &[], None).await;
        assert_eq!((status, answer["field"].as_str()), (400, Some(field)), "{path}: {answer}");
    }
    for id in ["0", "-5", "abc", "99999999999999999999"] {
        let (status, answer) = send(Method::POST, &format!("{api}/v1/deliveries/{id}/retry"), &[], None).await;
        assert_eq!((status, answer["field"].as_str()), (400, Some("id")), "{id}: {answer}");
    }
    let (status, answer) = send(Method::GET, &format!("{api}/v1/deliveries?limit=10&status=failed"), &[], None).await;
    assert_eq!(status, 200, "{answer}");
    let (status, _) =
        send(Method::GET, &format!("{api}/v1/watches?after={JOB}&portal_id=acme/form&limit=5"), &[], None).await;
    assert_eq!(status, 200);
    // Watch labels and webhook lists are bounded too, for the API and the CLI alike.
    let labels: serde_json::Map<String, Value> = (0..300).map(|i| (format!("k{i}"), json!("v"))).collect();
    let too_many = json!({"portal_id": "acme/form", "job_id": JOB, "labels": labels});
    let long = json!({"portal_id": "acme/form", "job_id": JOB, "labels": {"k": "v".repeat(5000)}});
    let empty = json!({"portal_id": "acme/form", "job_id": JOB, "labels": {"": "v"}});
    for body in [too_many, long, empty] {
        let (status, answer) = send(
            Method::POST,
            &format!("{api}/v1/watches"),
            &[("content-type", "application/json")],
            Some(&body.to_string()),
        )
        .await;
        assert_eq!((status, answer["field"].as_str()), (400, Some("labels")), "{answer}");
    }
    relay.stop().await;
}
