//! Cross-origin access for browsers: which origins may call the API, and the CORS headers.
//!
//! The platform's web app calls the API from its own origin with `Authorization` and
//! `Content-Type: application/json`, so the browser first sends a preflight `OPTIONS`.
//! With `CORS_ALLOWED_ORIGINS` empty (the default) nothing here adds a header and the
//! service answers exactly as without CORS. Otherwise a preflight from a listed origin on
//! the ensure or request-status route is answered 204, and every answer to a listed origin
//! carries `Access-Control-Allow-Origin` and exposes `Location` and `Retry-After`; an
//! origin not on the list gets no `Access-Control-*` header at all, so its browser refuses
//! the answer.

use hyper::header::{
    HeaderMap, HeaderValue, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use hyper::{Method, StatusCode};

use super::responses::{self, HttpResponse};
#[cfg(test)]
use crate::config::normalise;
use crate::config::AllowedOrigins;

/// What a preflight allows: the ensure POST, the request-status GET, and the preflight.
const ALLOW_METHODS: &str = "POST, GET, OPTIONS";
/// Headers a page's script may read besides the CORS-safelisted ones: the 202's
/// `Location` (the request-status URL) and a 503's `Retry-After`.
const EXPOSE_HEADERS: &str = "Location, Retry-After";
/// How long a browser may cache a preflight's answer, in seconds. Ten minutes is
/// Chromium's own cap (7200 s) well within, and short enough that a changed list
/// reaches browsers soon.
const MAX_AGE_SECS: &str = "600";

impl AllowedOrigins {
    /// The request's `Origin` when it is allowed, ready to be echoed back.
    fn allowed<'a>(&self, headers: &'a HeaderMap) -> Option<&'a HeaderValue> {
        let value = headers.get(ORIGIN)?;
        let origin = value.to_str().ok()?;
        let allowed = if self.any {
            // Echoing the header only when it is a well-formed origin already, so `*`
            // never reflects `null` or anything a browser would not send.
            crate::config::normalise(origin).as_deref() == Some(origin)
        } else {
            self.origins.iter().any(|o| o == origin)
        };
        allowed.then_some(value)
    }

    /// The answer to a CORS preflight (an `OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`) from an allowed origin; `None` for anything else,
    /// which is then routed as any other request.
    pub fn preflight(&self, method: &Method, headers: &HeaderMap) -> Option<HttpResponse> {
        if method != Method::OPTIONS || !headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD) {
            return None;
        }
        let origin = self.allowed(headers)?.clone();
        let mut r = responses::empty(StatusCode::NO_CONTENT);
        let h = r.headers_mut();
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOW_METHODS),
        );
        // The requested headers, as the browser listed them: the service reads only
        // `Authorization` and ignores the rest, so whatever a page sends is harmless.
        if let Some(requested) = headers.get(ACCESS_CONTROL_REQUEST_HEADERS) {
            h.insert(ACCESS_CONTROL_ALLOW_HEADERS, requested.clone());
        }
        h.insert(
            ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(MAX_AGE_SECS),
        );
        Some(r)
    }

    /// Adds the CORS headers of a real answer (any status) for the request's `headers`.
    pub fn decorate(&self, headers: &HeaderMap, response: &mut HttpResponse) {
        if !self.is_enabled() {
            return;
        }
        let h = response.headers_mut();
        // The answer depends on `Origin` whenever CORS is on, for listed and unlisted
        // origins alike (the Fetch standard's advice), so no cache hands one origin's
        // answer to another.
        h.append(VARY, HeaderValue::from_static("Origin"));
        if let Some(origin) = self.allowed(headers) {
            if !h.contains_key(ACCESS_CONTROL_ALLOW_ORIGIN) {
                h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
                h.insert(
                    ACCESS_CONTROL_EXPOSE_HEADERS,
                    HeaderValue::from_static(EXPOSE_HEADERS),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn origins_are_normalised_as_browsers_send_them() {
        let cases = [
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
            ("HTTPS://App.Example.COM", "https://app.example.com"),
            ("https://app.example.com:443", "https://app.example.com"),
            ("http://localhost:80", "http://localhost"),
            ("http://[::1]:3000", "http://[::1]:3000"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalise(raw).as_deref(), Some(want), "{raw}");
        }
    }

    #[test]
    fn anything_but_an_origin_or_star_is_refused() {
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://",
            "https://host:99999",
            "https://host:",
            "https://user@host",
            "null",
            "**",
            "://host",
            "https://[::1",
        ] {
            assert!(AllowedOrigins::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_setting_lists_origins_or_star() {
        assert!(!AllowedOrigins::parse("").unwrap().is_enabled());
        assert!(!AllowedOrigins::parse(" , ").unwrap().is_enabled());
        let list = AllowedOrigins::parse("https://a.example, http://127.0.0.1:9000").unwrap();
        assert_eq!(list.origins, ["https://a.example", "http://127.0.0.1:9000"]);
        assert!(!list.any);
        assert!(AllowedOrigins::parse("*").unwrap().any);
    }

    #[test]
    fn a_preflight_from_a_listed_origin_gets_every_header() {
        let cors = AllowedOrigins::parse("https://a.example").unwrap();
        let headers = request(&[
            ("origin", "https://a.example"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization,content-type",
            ),
        ]);
        let mut r = cors.preflight(&Method::OPTIONS, &headers).unwrap();
        cors.decorate(&headers, &mut r);
        assert_eq!(r.status(), 204);
        let h = r.headers();
        assert_eq!(h["access-control-allow-origin"], "https://a.example");
        assert_eq!(h["access-control-allow-methods"], "POST, GET, OPTIONS");
        assert_eq!(
            h["access-control-allow-headers"],
            "authorization,content-type"
        );
        assert_eq!(h["access-control-max-age"], "600");
        assert_eq!(h["vary"], "Origin");
        assert!(!h.contains_key("access-control-expose-headers"));
    }

    #[test]
    fn no_preflight_for_other_origins_methods_or_without_cors() {
        let preflight = request(&[
            ("origin", "https://b.example"),
            ("access-control-request-method", "POST"),
        ]);
        let cors = AllowedOrigins::parse("https://a.example").unwrap();
        assert!(cors.preflight(&Method::OPTIONS, &preflight).is_none());
        assert!(AllowedOrigins::none()
            .preflight(&Method::OPTIONS, &preflight)
            .is_none());
        // An OPTIONS without Access-Control-Request-Method is not a preflight.
        let plain = request(&[("origin", "https://a.example")]);
        assert!(cors.preflight(&Method::OPTIONS, &plain).is_none());
        let listed = request(&[
            ("origin", "https://a.example"),
            ("access-control-request-method", "POST"),
        ]);
        assert!(cors.preflight(&Method::POST, &listed).is_none());
    }

    #[test]
    fn star_echoes_any_well_formed_origin_but_not_null() {
        let cors = AllowedOrigins::parse("*").unwrap();
        let mut r = responses::empty(StatusCode::OK);
        cors.decorate(&request(&[("origin", "http://x.example:81")]), &mut r);
        assert_eq!(
            r.headers()["access-control-allow-origin"],
            "http://x.example:81"
        );
        for odd in ["null", "http://x.example/", "HTTP://X.EXAMPLE"] {
            let mut h = HeaderMap::new();
            h.insert(ORIGIN, HeaderValue::from_static(odd));
            let mut r = responses::empty(StatusCode::OK);
            cors.decorate(&h, &mut r);
            assert!(
                !r.headers().contains_key("access-control-allow-origin"),
                "{odd}"
            );
        }
    }

    #[test]
    fn real_answers_expose_location_and_retry_after_to_listed_origins_only() {
        let cors = AllowedOrigins::parse("https://a.example").unwrap();
        let mut r = responses::empty(StatusCode::SERVICE_UNAVAILABLE);
        cors.decorate(&request(&[("origin", "https://a.example")]), &mut r);
        assert_eq!(
            r.headers()["access-control-allow-origin"],
            "https://a.example"
        );
        assert_eq!(
            r.headers()["access-control-expose-headers"],
            "Location, Retry-After"
        );
        assert_eq!(r.headers()["vary"], "Origin");

        let mut r = responses::empty(StatusCode::OK);
        cors.decorate(&request(&[("origin", "https://b.example")]), &mut r);
        assert_eq!(r.headers()["vary"], "Origin");
        assert!(r
            .headers()
            .keys()
            .all(|k| !k.as_str().starts_with("access-control-")));

        let mut r = responses::empty(StatusCode::OK);
        AllowedOrigins::none().decorate(&request(&[("origin", "https://a.example")]), &mut r);
        assert!(r.headers().is_empty());
    }
}
