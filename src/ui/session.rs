//! Sessions and CSRF tokens of the status page.
//!
//! With an admin token, `/ui/login` asks for it once and hands out a
//! session: a random id in an `HttpOnly; SameSite=Strict` cookie (`Secure`
//! when the request came through TLS, as `X-Forwarded-Proto: https` says),
//! valid for [`SESSION_TTL`]. Without a token, the first page seen opens a
//! session the same way, so the CSRF tokens work alike in both cases.
//!
//! Each session has its own CSRF token, written into every form; a POST
//! whose `csrf` field does not match its session's is refused. A session
//! also remembers a hash of the token it was opened with: rotating the
//! token on a reload ends every session opened with the old one. Sessions
//! live in memory only (a restart logs everyone out, which is what an
//! operator restarting a relay expects) and are capped at [`MAX_SESSIONS`]:
//! the oldest go first, so no flood of logins can grow memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// How long a session lasts after login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The most sessions kept at once.
pub const MAX_SESSIONS: usize = 1024;
/// The cookie's name.
pub const COOKIE: &str = "dari_relay_session";

/// One open session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The cookie's value.
    pub id: String,
    /// What every form of this session carries.
    pub csrf: String,
    /// When it ends (monotonic).
    pub expires_at: Instant,
    /// SHA-256 of the admin token it was opened with (`None`: no token).
    token: Option<[u8; 32]>,
}

/// The open sessions. One per router, created by `ui::router`.
#[derive(Debug, Default)]
pub struct Sessions {
    open: Mutex<HashMap<String, Session>>,
}

/// A hash of the admin token, so a session can tell the token changed
/// without keeping the token itself.
pub fn token_hash(token: Option<&str>) -> Option<[u8; 32]> {
    token.map(|t| Sha256::digest(t.as_bytes()).into())
}

/// 256 bits from the operating system's generator (via `uuid`'s v4, which
/// uses getrandom), as hex.
fn random_hex() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

impl Sessions {
    /// Opens a session for `token` (the hash of the token in force) at `now`.
    pub fn open(&self, token: Option<[u8; 32]>, now: Instant) -> Session {
        let session = Session { id: random_hex(), csrf: random_hex(), expires_at: now + SESSION_TTL, token };
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|_, s| s.expires_at > now);
        while open.len() >= MAX_SESSIONS {
            let Some(oldest) = open.values().min_by_key(|s| s.expires_at).map(|s| s.id.clone()) else { break };
            open.remove(&oldest);
        }
        open.insert(session.id.clone(), session.clone());
        session
    }

    /// The session with this id, if it is open at `now` and was opened with
    /// the token now in force.
    pub fn get(&self, id: &str, token: Option<[u8; 32]>, now: Instant) -> Option<Session> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let session = open.get(id)?;
        if session.expires_at <= now || session.token != token {
            open.remove(id);
            return None;
        }
        Some(session.clone())
    }

    /// Ends a session (logout).
    pub fn close(&self, id: &str) {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
}

impl Session {
    /// Whether a form's `csrf` field is this session's, compared in constant time.
    pub fn csrf_ok(&self, given: Option<&str>) -> bool {
        given.is_some_and(|g| crate::admin::constant_time_eq(g.as_bytes(), self.csrf.as_bytes()))
    }
}

/// The session cookie's value in a `Cookie` header, if any.
pub fn cookie_value(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// The `Set-Cookie` value for `session` (or, with `None`, one that ends it).
/// `secure`: the request came through TLS.
pub fn set_cookie(session: Option<&Session>, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match session {
        Some(s) => {
            format!("{COOKIE}={}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{secure}", s.id, SESSION_TTL.as_secs())
        }
        None => format!("{COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_follow_the_token_and_are_capped() {
        let t0 = Instant::now();
        let sessions = Sessions::default();
        let token = token_hash(Some("a"));
        let s = sessions.open(token, t0);
        assert_eq!(s.id.len(), 64);
        assert_ne!(s.id, s.csrf);
        assert_eq!(sessions.get(&s.id, token, t0 + Duration::from_secs(60)).as_ref(), Some(&s));
        // Another token (a reload rotated it): the session is gone.
        assert!(sessions.get(&s.id, token_hash(Some("b")), t0).is_none());
        assert!(sessions.get(&s.id, token, t0).is_none());
        let s = sessions.open(token, t0);
        assert!(sessions.get(&s.id, token, t0 + SESSION_TTL).is_none());
        for i in 0..MAX_SESSIONS + 10 {
            sessions.open(None, t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(sessions.open.lock().unwrap().len(), MAX_SESSIONS);
    }

    #[test]
    fn csrf_and_cookies() {
        let s = Sessions::default().open(None, Instant::now());
        assert!(s.csrf_ok(Some(&s.csrf.clone())));
        assert!(!s.csrf_ok(Some("nope")) && !s.csrf_ok(None));
        let cookie = set_cookie(Some(&s), true);
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.ends_with("; Secure"));
        assert!(!set_cookie(Some(&s), false).contains("Secure"));
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(axum::http::header::COOKIE, format!("other=1; {COOKIE}={}", s.id).parse().unwrap());
        assert_eq!(cookie_value(&headers), Some(s.id.clone()));
    }
}
