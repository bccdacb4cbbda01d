//! The status poll's HTTP client: hyper's pooled client (the one reqwest
//! wraps) driven directly, for the one request the relay makes thousands of
//! times a second.
//!
//! A profile of unchanged polls at a fixed rate (docs/performance.md,
//! issue 18) put about a quarter of the relay's CPU in reqwest's own layers
//! around hyper: the URL parsed again by the redirect layer and for the
//! response, a header map and a boxed future per request, the retry layer.
//! Here a poll builds its `Uri` from a prefix encoded once, sets three
//! headers and reads the body without copying it when it arrives in one
//! piece. Everything a poll relies on is kept: the same connection pool (90 s
//! idle, keep-alive), TLS by rustls with the same roots as reqwest
//! (`webpki-roots`), no redirect followed, `request_timeout` over the whole
//! exchange and as the connect timeout, the body capped, the key sent as a
//! sensitive header and never in an error.
//!
//! Proxies stay with reqwest: when the environment names one
//! (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, either case), [`Direct::from_env`]
//! gives `None` and the status polls go through reqwest like every other
//! request (docs/receivers.md#proxies).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::http::{HeaderValue, Request, Uri, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};

use super::{UpstreamError, classify, content_length, innermost, read_capped};
use crate::vocab::PortalId;

/// What the `url` crate percent-encodes in a path segment (its
/// `PATH_SEGMENT` set), so a prefix built here is the URL reqwest's path
/// builder made (a unit test compares the two).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'/')
    .add(b'%');

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The status client. Cheap to clone: the pool is shared.
#[derive(Clone)]
pub(super) struct Direct {
    client: Client<Connector, Empty<Bytes>>,
    /// `base_url` without a trailing `/`, query or fragment.
    base: Arc<str>,
    /// `base_url`'s query, if it has one, kept before `job_id` as the path
    /// builder kept it.
    query: Option<Arc<str>>,
    timeout: Duration,
    user_agent: HeaderValue,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direct").field("base", &self.base).finish_non_exhaustive()
    }
}

/// Whether the environment names a proxy reqwest would use for some URL.
fn proxy_in_env(var: &dyn Fn(&str) -> Option<String>) -> bool {
    ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .any(|name| var(name).is_some_and(|v| !v.trim().is_empty()))
}

impl Direct {
    /// The direct client for `config`, or `None` when a proxy is set in the
    /// environment (then reqwest, which honours it, polls).
    pub(super) fn from_env(config: &crate::config::Upstream) -> Option<Direct> {
        if proxy_in_env(&|name| std::env::var(name).ok()) {
            return None;
        }
        Some(Direct::new(config))
    }

    fn new(config: &crate::config::Upstream) -> Direct {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.request_timeout));
        let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .build(connector);
        Direct {
            client,
            base: base_of(&config.base_url).into(),
            query: config.base_url.query().filter(|q| !q.is_empty()).map(Into::into),
            timeout: config.request_timeout,
            user_agent: HeaderValue::from_static(crate::USER_AGENT),
        }
    }

    /// `GET {base}/task/{org}/{endpoint}/status?job_id={job_id}`: the raw
    /// body of a 2xx answer, at most `limit` bytes.
    pub(super) async fn fetch_status(
        &self,
        portal: &PortalId,
        job_id: &str,
        api_key: &SecretString,
        limit: usize,
    ) -> Result<Bytes, UpstreamError> {
        let uri = status_uri(&self.base, self.query.as_deref(), portal, job_id)?;
        let mut key = HeaderValue::from_str(api_key.expose_secret())
            .map_err(|_| UpstreamError::Transport("the org's API key is not a valid header value".into()))?;
        key.set_sensitive(true);
        let request = Request::get(uri)
            .header(header::USER_AGENT, self.user_agent.clone())
            .header(header::ACCEPT, HeaderValue::from_static("*/*"))
            .header("x-api-key", key)
            .body(Empty::new())
            .map_err(|e| UpstreamError::Transport(e.to_string()))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(innermost)?;
            classify(response.status(), response.headers())?;
            let declared = content_length(response.headers());
            read_capped(response.into_body(), declared, limit, innermost).await
        };
        tokio::time::timeout(self.timeout, exchange).await.map_err(|_| UpstreamError::Timeout)?
    }
}

/// `base_url` as the prefix of every status URL: no query or fragment, and
/// no trailing `/` (the path builder dropped one empty last segment).
fn base_of(base_url: &Url) -> String {
    let mut base = base_url.clone();
    base.set_query(None);
    base.set_fragment(None);
    let text = base.as_str();
    text.strip_suffix('/').unwrap_or(text).to_owned()
}

fn status_uri(base: &str, query: Option<&str>, portal: &PortalId, job_id: &str) -> Result<Uri, UpstreamError> {
    let (org, endpoint, job) = (
        utf8_percent_encode(&portal.org, SEGMENT),
        utf8_percent_encode(&portal.endpoint, SEGMENT),
        // A job id is a UUID (`parse_job_id` checks every one that is
        // watched), which nothing escapes; encoded anyway, so no other
        // value could change the URL's shape.
        utf8_percent_encode(job_id, SEGMENT),
    );
    let text = match query {
        None => format!("{base}/task/{org}/{endpoint}/status?job_id={job}"),
        Some(query) => format!("{base}/task/{org}/{endpoint}/status?{query}&job_id={job}"),
    };
    Uri::try_from(text).map_err(|e| UpstreamError::Transport(format!("cannot build the status URL: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prefix and encoding give exactly the URL reqwest's path builder
    /// gave, for plain and awkward segments and base paths.
    #[test]
    fn status_urls_match_the_path_builder() {
        let job = "550e8400-e29b-41d4-a716-446655440000";
        for base in ["http://127.0.0.1:8080", "https://api.example/", "https://api.example/v1/", "http://h/p?q=1#f"] {
            let base_url = Url::parse(base).unwrap();
            for portal in ["acme/form", "ac%me/fo?rm", "a#b/c`d{e}", "ünï/cödé", "a\"b/<c>"] {
                let portal: PortalId = portal.parse().unwrap();
                // A fragment is never sent: the request's URI has none.
                let mut old = base_url.clone();
                old.set_fragment(None);
                old.path_segments_mut().unwrap().pop_if_empty().extend([
                    "task",
                    &portal.org,
                    &portal.endpoint,
                    "status",
                ]);
                old.query_pairs_mut().append_pair("job_id", job);
                let new = status_uri(&base_of(&base_url), base_url.query(), &portal, job).unwrap();
                assert_eq!(new.to_string(), old.as_str(), "{base} {portal}");
            }
        }
    }

    #[test]
    fn a_proxy_in_the_environment_leaves_polls_to_reqwest() {
        let env = |set: &'static str| move |name: &str| (name == set).then(|| "http://proxy:3128".to_owned());
        for name in ["HTTP_PROXY", "https_proxy", "ALL_PROXY"] {
            assert!(proxy_in_env(&env(name)), "{name}");
        }
        assert!(!proxy_in_env(&env("NO_PROXY")));
        assert!(!proxy_in_env(&|_| Some("  ".to_owned())));
    }
}
