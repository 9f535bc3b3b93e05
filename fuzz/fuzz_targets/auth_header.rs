//! Fuzzes the header-and-token path: any bytes as the `Authorization` header value must
//! come back as a refusal or an identity, never a panic.
#![no_main]

use std::sync::OnceLock;

use ensure_user::config::{JwtConfig, JwtSecret};
use ensure_user::http::auth::Authenticator;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use libfuzzer_sys::fuzz_target;

fn authenticator() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        Authenticator::new(&JwtConfig {
            secret: Some(JwtSecret::new("fuzz-secret-fuzz-secret-fuzz-secret")),
            previous_secret: None,
            algorithms: vec![jsonwebtoken_alg()],
            public_key: None,
            jwks: None,
            issuer: None,
            audience: Vec::new(),
            leeway_secs: 60,
            require_exp: false,
        })
        .expect("the fuzz configuration is valid")
    })
}

fn jsonwebtoken_alg() -> ensure_user::http::auth::Algorithm {
    ensure_user::http::auth::Algorithm::HS256
}

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(data) {
        headers.insert(AUTHORIZATION, value);
    }
    let _ = authenticator().authenticate(&headers);
    // The token alone, too, including shapes a header value cannot carry.
    let _ = authenticator().verify(&String::from_utf8_lossy(data));
});
