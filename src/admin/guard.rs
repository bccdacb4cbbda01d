//! The checks every admin request passes before a handler sees it: the
//! browser guard ([`refuse_browsers`]) and the bearer token
//! ([`require_token`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use secrecy::ExposeSecret;
use tracing::warn;

use super::{AdminState, ApiError};
use crate::config::split_host_port;

/// Routes answered without the token: liveness only, which says nothing
/// but "the process answers", so a load balancer or an orchestrator's
/// probe needs no secret.
const OPEN_ROUTES: [&str; 1] = ["/healthz"];

/// Refuses requests without the configured bearer token.
pub(super) async fn require_token(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    if OPEN_ROUTES.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let config = Arc::clone(&state.config.borrow());
    let Some(token) = config.admin.as_ref().and_then(|a| a.token.as_ref()).or(state.startup_token.as_ref()) else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.expose_secret().as_bytes()) {
        next.run(request).await
    } else {
        let mut response =
            ApiError::new(StatusCode::UNAUTHORIZED, "a valid Authorization: Bearer token is required").into_response();
        response.headers_mut().insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static header value"));
        response
    }
}

/// Refuses what a web page in the operator's browser could make the browser
/// send, token or not (a page cannot read the token, but without one the
/// loopback address was all that stood between a page and a paid job):
///
/// - a `Host` (or HTTP/2 authority) other than the listener's own address,
///   `localhost`, `127.0.0.1` or `[::1]` with the listener's port, or a name
///   in `[admin] allowed_hosts`: 403. This defeats DNS rebinding, where a
///   page's own name is pointed at 127.0.0.1 and the page then reads the
///   API as same-origin. A Unix socket has no host to check (a browser
///   cannot reach it), so only configured names count there for `Origin`.
/// - an `Origin` that is not one of those hosts (including `null`), or
///   `Sec-Fetch-Site` other than `same-origin` or `none`: 403.
/// - a request with a body whose `content-type` is not JSON: 415. Browsers
///   send `text/plain`, form and multipart bodies cross-site without a
///   preflight; a JSON content type always needs one, which this API never
///   answers.
pub(super) async fn refuse_browsers(
    State((state, bound)): State<(AdminState, Option<SocketAddr>)>,
    request: Request,
    next: Next,
) -> Response {
    let config = Arc::clone(&state.config.borrow());
    let names: &[String] = config.admin.as_ref().map_or(&[], |a| a.allowed_hosts.as_slice());
    let headers = request.headers();
    if let Some(bound) = bound {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| request.uri().authority().map(|a| a.to_string()));
        let Some(host) = host else {
            return ApiError::new(StatusCode::BAD_REQUEST, "a Host header is required").into_response();
        };
        if !host_allowed(&host, 80, Some(bound), names) {
            warn!(host = %host, "admin API: refused a request for a foreign Host");
            return ApiError::new(
                StatusCode::FORBIDDEN,
                format!("Host {host:?} is not this API's address; add it to [admin] allowed_hosts if it should be"),
            )
            .into_response();
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("null");
        if !origin_allowed(origin, bound, names) {
            warn!(origin = %origin, "admin API: refused a cross-origin request");
            return ApiError::new(
                StatusCode::FORBIDDEN,
                format!("cross-origin requests are refused (Origin {origin:?})"),
            )
            .into_response();
        }
    }
    if let Some(site) = headers.get("sec-fetch-site")
        && !matches!(site.as_bytes(), b"same-origin" | b"none")
    {
        warn!(sec_fetch_site = ?site, "admin API: refused a cross-site request");
        return ApiError::new(StatusCode::FORBIDDEN, "cross-site requests are refused").into_response();
    }
    // The status page's POSTs are forms; its CSRF token and SameSite=Strict
    // session cookie refuse what another site's page could send there.
    let status_page = request.uri().path().starts_with("/ui/");
    if !status_page && has_body(&request) && !is_json(headers.get(header::CONTENT_TYPE)) {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a request body must be sent as content-type: application/json",
        )
        .into_response();
    }
    next.run(request).await
}

/// Whether the authority `host` (`name[:port]`, `default_port` when it has
/// none) is the listener's own address, localhost, or a configured name.
/// A configured name without a port matches any port.
fn host_allowed(host: &str, default_port: u16, bound: Option<SocketAddr>, names: &[String]) -> bool {
    let Some((name, port)) = split_host_port(host) else { return false };
    let name = name.to_ascii_lowercase();
    let port = port.unwrap_or(default_port);
    let configured = names.iter().any(|allowed| match split_host_port(allowed) {
        Some((n, p)) => n == name && p.is_none_or(|p| p == port),
        None => false,
    });
    let own = bound.is_some_and(|bound| {
        let ip = name.parse::<IpAddr>().ok();
        port == bound.port()
            && (name == "localhost"
                || ip.is_some_and(|ip| ip.is_loopback() || ip == bound.ip())
                // Bound to every address: any IP literal is this machine's
                // (a rebinding attack needs a name, never an IP literal).
                || (bound.ip().is_unspecified() && ip.is_some()))
    });
    configured || own
}

/// Whether an `Origin` header names an allowed host (`null` never does).
fn origin_allowed(origin: &str, bound: Option<SocketAddr>, names: &[String]) -> bool {
    // The API itself speaks plain HTTP, so an https:// origin can only be a
    // configured name (a TLS proxy in front of it).
    let (authority, default_port, bound) = if let Some(rest) = origin.strip_prefix("http://") {
        (rest, 80, bound)
    } else if let Some(rest) = origin.strip_prefix("https://") {
        (rest, 443, None)
    } else {
        return false;
    };
    !authority.contains('/') && host_allowed(authority, default_port, bound, names)
}

/// Whether a request carries a body: a non-zero `content-length`, a
/// `transfer-encoding`, or (HTTP/2) a body stream that is not empty.
fn has_body(request: &Request) -> bool {
    use axum::body::HttpBody as _;
    let headers = request.headers();
    let length = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match length {
        Some(n) => n > 0,
        None => headers.contains_key(header::TRANSFER_ENCODING) || !request.body().is_end_stream(),
    }
}

/// Whether a `content-type` is JSON: `application/json` or
/// `application/<anything>+json`, parameters (`; charset=utf-8`) allowed.
fn is_json(content_type: Option<&header::HeaderValue>) -> bool {
    let Some(value) = content_type.and_then(|v| v.to_str().ok()) else { return false };
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Compares without stopping at the first difference, so response timing
/// says nothing about how much of a guessed token was right.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        let ct = |v: &str| is_json(Some(&header::HeaderValue::from_str(v).unwrap()));
        assert!(ct("application/json") && ct("Application/JSON; charset=utf-8") && ct("application/merge-patch+json"));
        assert!(!ct("text/plain") && !ct("application/x-www-form-urlencoded") && !ct("text/json") && !is_json(None));
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret!"));
    }
}
