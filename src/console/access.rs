//! Who may use the console, and proof that a form was sent from the console itself.
//!
//! With `ADMIN_TOKEN` set, every request needs it: as `Authorization: Bearer`, or through
//! the login form, which sets an HttpOnly, SameSite=Strict cookie holding a random session
//! key of this process (never the token itself; a restart signs everyone out). Without a
//! token the console only listens on a loopback address (the settings refuse anything
//! else), and then the `Host` must be a loopback name too: a web page cannot reach it by
//! DNS rebinding. Every POST carries this process's random CSRF token, compared in constant
//! time, so another site's page can never make a signed-in browser replay or purge; the
//! sign-in form, shown to anyone, has a token of its own.

use hyper::header::{HeaderMap, AUTHORIZATION, COOKIE, HOST};

/// The cookie a signed-in browser sends.
pub const SESSION_COOKIE: &str = "ensure_user_console";

/// How a request got in; logged with every action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Viewer {
    /// `Authorization: Bearer` with the admin token.
    Bearer,
    /// The login form's cookie.
    Session,
    /// No token configured: loopback only.
    Loopback,
}

impl Viewer {
    pub fn name(self) -> &'static str {
        match self {
            Viewer::Bearer => "admin token (Bearer)",
            Viewer::Session => "admin token (signed in)",
            Viewer::Loopback => "loopback, no token",
        }
    }
}

/// Why a request was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the admin token is required")]
    NoToken,
    #[error("the Host is not a loopback name")]
    ForeignHost,
}

/// The console's secrets for this process.
pub struct Access {
    token: Option<Vec<u8>>,
    session: String,
    csrf: String,
    /// The sign-in form's own: the form is shown to anyone, the actions' token only to
    /// those let in.
    login_csrf: String,
}

impl Access {
    pub fn new(token: Option<Vec<u8>>) -> Self {
        Self {
            token,
            session: random_hex(),
            csrf: random_hex(),
            login_csrf: random_hex(),
        }
    }

    pub fn requires_token(&self) -> bool {
        self.token.is_some()
    }

    pub fn csrf(&self) -> &str {
        &self.csrf
    }

    pub fn login_csrf(&self) -> &str {
        &self.login_csrf
    }

    /// Whether a sign-in form's CSRF field is this process's.
    pub fn login_csrf_matches(&self, given: Option<&str>) -> bool {
        given.is_some_and(|g| constant_time_eq(self.login_csrf.as_bytes(), g.as_bytes()))
    }

    /// The session cookie's value for a browser that signed in.
    pub fn session(&self) -> &str {
        &self.session
    }

    /// Whether `given` is the admin token.
    pub fn token_matches(&self, given: &[u8]) -> bool {
        self.token
            .as_deref()
            .is_some_and(|token| constant_time_eq(token, given))
    }

    /// Whether a form's CSRF field is this process's.
    pub fn csrf_matches(&self, given: Option<&str>) -> bool {
        given.is_some_and(|g| constant_time_eq(self.csrf.as_bytes(), g.as_bytes()))
    }

    /// Lets a request in, or says why not.
    pub fn admit(&self, headers: &HeaderMap) -> Result<Viewer, Refusal> {
        if self.token.is_none() {
            let host = headers
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            return if is_loopback_host(host) {
                Ok(Viewer::Loopback)
            } else {
                Err(Refusal::ForeignHost)
            };
        }
        if let Some(bearer) = headers
            .get(AUTHORIZATION)
            .and_then(|h| h.as_bytes().strip_prefix(b"Bearer "))
        {
            if self.token_matches(bearer.trim_ascii()) {
                return Ok(Viewer::Bearer);
            }
        }
        let session = headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|h| h.to_str().ok())
            .flat_map(|h| h.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .any(|(name, value)| {
                name == SESSION_COOKIE
                    && constant_time_eq(self.session.as_bytes(), value.as_bytes())
            });
        if session {
            Ok(Viewer::Session)
        } else {
            Err(Refusal::NoToken)
        }
    }
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Compares without stopping at the first difference, so the time taken says nothing about
/// how much of a guess was right (only the length can be told).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_hex() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(hyper::header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        h
    }

    #[test]
    fn a_token_is_needed_when_one_is_set() {
        let access = Access::new(Some(b"admin-token-0123456789".to_vec()));
        assert_eq!(access.admit(&headers(&[])), Err(Refusal::NoToken));
        assert_eq!(
            access.admit(&headers(&[(AUTHORIZATION, "Bearer wrong")])),
            Err(Refusal::NoToken)
        );
        assert_eq!(
            access.admit(&headers(&[(
                AUTHORIZATION,
                "Bearer admin-token-0123456789"
            )])),
            Ok(Viewer::Bearer)
        );
        let cookie = format!("other=1; {SESSION_COOKIE}={}", access.session());
        assert_eq!(
            access.admit(&headers(&[(COOKIE, &cookie)])),
            Ok(Viewer::Session)
        );
        assert_eq!(
            access.admit(&headers(&[(
                COOKIE,
                &format!("{SESSION_COOKIE}=admin-token-0123456789")
            )])),
            Err(Refusal::NoToken)
        );
    }

    #[test]
    fn without_a_token_only_loopback_hosts() {
        let access = Access::new(None);
        for host in [
            "127.0.0.1:9101",
            "localhost:9101",
            "[::1]:9101",
            "localhost",
        ] {
            assert_eq!(
                access.admit(&headers(&[(HOST, host)])),
                Ok(Viewer::Loopback),
                "{host}"
            );
        }
        for host in ["evil.example:9101", "10.0.0.1:9101", ""] {
            assert_eq!(
                access.admit(&headers(&[(HOST, host)])),
                Err(Refusal::ForeignHost),
                "{host}"
            );
        }
    }

    #[test]
    fn csrf_and_comparisons() {
        let access = Access::new(None);
        assert!(access.csrf_matches(Some(access.csrf())));
        assert!(!access.csrf_matches(None));
        assert!(!access.csrf_matches(Some("")));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert_ne!(Access::new(None).csrf(), access.csrf());
        assert_ne!(access.login_csrf(), access.csrf());
        assert!(!access.login_csrf_matches(Some(access.csrf())));
        assert!(access.login_csrf_matches(Some(access.login_csrf())));
    }
}
