//! The token settings: the HMAC secret(s) and key files `JWT_*` name, read at start.

use secrecy::{ExposeSecret as _, SecretSlice};

/// A secret the settings hold (the HMAC key, the console token): `secrecy` keeps it out of
/// `Debug` and zeroes it when dropped.
#[derive(Clone, Debug)]
pub struct JwtSecret(SecretSlice<u8>);

impl JwtSecret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into().into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.expose_secret()
    }
}

/// A key file's name and contents, read at start.
#[derive(Debug, Clone)]
pub struct KeyFile {
    pub path: String,
    pub contents: Vec<u8>,
}

/// How the service checks bearer tokens.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// The HMAC secret (required when an HS algorithm is allowed).
    pub secret: Option<JwtSecret>,
    /// A second HMAC secret still accepted, so the secret can be rotated without refusing
    /// live sessions.
    pub previous_secret: Option<JwtSecret>,
    /// The accepted algorithms (`JWT_ALGORITHMS`, default HS256); anything else is refused.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// A PEM public key for RS*/PS*/ES*/EdDSA tokens.
    pub public_key: Option<KeyFile>,
    /// A local JWKS file; a token's `kid` chooses the key.
    pub jwks: Option<KeyFile>,
    pub issuer: Option<String>,
    pub audience: Vec<String>,
    pub leeway_secs: u64,
    pub require_exp: bool,
}

impl JwtConfig {
    /// No key at all: an authenticator built from it refuses every token. For commands
    /// that never verify one.
    pub fn no_keys() -> Self {
        Self {
            secret: None,
            ..Self::hs256("")
        }
    }

    /// HS256 with one secret and the contract's defaults (leeway 60 s, `exp` optional).
    pub fn hs256(secret: impl Into<Vec<u8>>) -> Self {
        Self {
            secret: Some(JwtSecret::new(secret)),
            previous_secret: None,
            algorithms: vec![jsonwebtoken::Algorithm::HS256],
            public_key: None,
            jwks: None,
            issuer: None,
            audience: Vec::new(),
            leeway_secs: 60,
            require_exp: false,
        }
    }
}
