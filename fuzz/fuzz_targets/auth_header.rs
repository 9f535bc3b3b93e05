//! Fuzzes the header-and-token path: any bytes as the `Authorization` header value must
//! come back as a refusal or an identity, never a panic.
#![no_main]

use std::sync::OnceLock;

use ensure_user::config::JwtConfig;
use ensure_user::http::auth::Authenticator;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use libfuzzer_sys::fuzz_target;

fn authenticator() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        Authenticator::new(&JwtConfig::hs256("fuzz-secret-fuzz-secret-fuzz-secret"))
            .expect("the fuzz configuration is valid")
    })
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
