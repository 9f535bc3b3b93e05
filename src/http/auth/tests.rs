//! Unit tests of the authenticator: keys, algorithms, claims, the bearer header.
#![cfg(test)]

use super::*;
use crate::config::JwtSecret;
use hyper::header::HeaderValue;
use hyper::header::AUTHORIZATION;
use jsonwebtoken::{EncodingKey, Header};

fn auth() -> Authenticator {
    Authenticator::new(&JwtConfig::hs256("secret")).unwrap()
}

fn headers(values: &[&str]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for v in values {
        h.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
    }
    h
}

#[test]
fn scheme_is_case_insensitive_and_token_trimmed() {
    for v in ["Bearer abc", "bearer abc", "BEARER   abc  "] {
        assert_eq!(bearer_token(&headers(&[v])), Ok("abc"), "{v}");
    }
}

#[test]
fn missing_or_foreign_credentials_are_no_token() {
    for v in ["Basic abc", "Bearer", "Bearer    ", "abc", ""] {
        assert_eq!(
            bearer_token(&headers(&[v])),
            Err(AuthError::NoToken),
            "{v:?}"
        );
    }
    assert_eq!(bearer_token(&HeaderMap::new()), Err(AuthError::NoToken));
}

#[test]
fn two_authorization_headers_are_refused() {
    let h = headers(&["Bearer a", "Bearer b"]);
    assert_eq!(bearer_token(&h), Err(AuthError::InvalidToken));
}

#[test]
fn minted_tokens_verify() {
    let token = mint_token(b"secret", "u1", "u1@example.com", Some(60)).unwrap();
    let id = auth().verify(&token).unwrap();
    assert_eq!(id.user_id, "u1");
    assert_eq!(id.email, "u1@example.com");
}

#[test]
fn oversized_tokens_are_invalid() {
    let token = "a".repeat(MAX_TOKEN_BYTES + 1);
    assert_eq!(auth().verify(&token), Err(AuthError::InvalidToken));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever bytes arrive as `Authorization`, the answer is one of the contract's
        /// refusals or a verified identity, never a panic.
        #[test]
        fn any_authorization_header_is_answered(raw in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut headers = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_bytes(&raw) {
                headers.insert(AUTHORIZATION, value);
            }
            let _ = auth().authenticate(&headers);
        }

        /// Token-shaped garbage (three base64url-ish segments) never verifies.
        #[test]
        fn forged_tokens_never_verify(a in "[A-Za-z0-9_-]{0,200}", b in "[A-Za-z0-9_-]{0,400}", c in "[A-Za-z0-9_-]{0,100}") {
            let token = format!("{a}.{b}.{c}");
            prop_assert!(auth().verify(&token).is_err());
        }

        /// Every usable identity survives minting and verification unchanged.
        #[test]
        fn minted_identities_round_trip(user_id in "[a-zA-Z0-9_.:-]{1,128}", local in "[a-z0-9.+_-]{1,64}", domain in "[a-z0-9-]{1,30}\\.[a-z]{2,10}") {
            let email = format!("{local}@{domain}");
            let token = mint_token(b"secret", &user_id, &email, None).unwrap();
            let id = auth().verify(&token).unwrap();
            prop_assert_eq!(id.user_id, user_id);
            prop_assert_eq!(id.email, email);
        }
    }
}

mod keys {
    use super::*;
    use crate::config::KeyFile;
    use serde_json::json;

    const RSA_PRIVATE: &[u8] = include_bytes!("../../../tests/fixtures/rsa-private.pem");
    const RSA_PUBLIC: &[u8] = include_bytes!("../../../tests/fixtures/rsa-public.pem");
    const EC_PRIVATE: &[u8] = include_bytes!("../../../tests/fixtures/ec-private.pem");
    const EC_PUBLIC: &[u8] = include_bytes!("../../../tests/fixtures/ec-public.pem");
    const ED_PRIVATE: &[u8] = include_bytes!("../../../tests/fixtures/ed-private.pem");
    const ED_PUBLIC: &[u8] = include_bytes!("../../../tests/fixtures/ed-public.pem");
    const JWKS: &[u8] = include_bytes!("../../../tests/fixtures/jwks.json");

    fn config(algorithms: &[Algorithm]) -> JwtConfig {
        JwtConfig {
            secret: None,
            algorithms: algorithms.to_vec(),
            leeway_secs: 0,
            ..JwtConfig::hs256("unused")
        }
    }

    fn file(contents: &[u8]) -> Option<KeyFile> {
        Some(KeyFile {
            path: "fixture".into(),
            contents: contents.to_vec(),
        })
    }

    fn sign(header: Header, claims: serde_json::Value, key: &EncodingKey) -> String {
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }

    fn claims() -> serde_json::Value {
        json!({"userId": "u1", "email": "u1@example.com"})
    }

    #[test]
    fn public_key_algorithms_verify_with_their_key_files() {
        let cases: [(Algorithm, &[u8], EncodingKey); 3] = [
            (
                Algorithm::RS256,
                RSA_PUBLIC,
                EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
            ),
            (
                Algorithm::ES256,
                EC_PUBLIC,
                EncodingKey::from_ec_pem(EC_PRIVATE).unwrap(),
            ),
            (
                Algorithm::EdDSA,
                ED_PUBLIC,
                EncodingKey::from_ed_pem(ED_PRIVATE).unwrap(),
            ),
        ];
        for (alg, public, private) in cases {
            let mut c = config(&[alg]);
            c.public_key = file(public);
            let auth = Authenticator::new(&c).unwrap();
            let token = sign(Header::new(alg), claims(), &private);
            assert_eq!(auth.verify(&token).unwrap().user_id, "u1", "{alg:?}");
        }
    }

    #[test]
    fn jwks_keys_are_chosen_by_kid() {
        let mut c = config(&[Algorithm::RS256]);
        c.jwks = file(JWKS);
        let auth = Authenticator::new(&c).unwrap();
        let key = EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap();
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("rsa-1".into());
        assert!(auth.verify(&sign(header.clone(), claims(), &key)).is_ok());
        header.kid = Some("unknown".into());
        assert_eq!(
            auth.verify(&sign(header, claims(), &key)),
            Err(AuthError::InvalidToken)
        );
    }

    /// The fixture's RSA key as a JWK with these extra members.
    fn rsa_jwk(extra: serde_json::Value) -> serde_json::Value {
        let set: serde_json::Value = serde_json::from_slice(JWKS).unwrap();
        let mut key = set["keys"][0].clone();
        let key_map = key.as_object_mut().unwrap();
        key_map.remove("use");
        key_map.remove("alg");
        key_map.extend(extra.as_object().unwrap().clone());
        key
    }

    fn jwks_auth(keys: Vec<serde_json::Value>, algorithms: &[Algorithm]) -> Authenticator {
        let mut c = config(algorithms);
        c.jwks = file(&serde_json::to_vec(&json!({ "keys": keys })).unwrap());
        Authenticator::new(&c).unwrap()
    }

    fn rsa_token(alg: Algorithm, kid: Option<&str>) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(Into::into);
        sign(
            header,
            claims(),
            &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
        )
    }

    #[test]
    fn a_jwks_key_verifies_only_for_its_alg_and_use() {
        let auth = jwks_auth(
            vec![
                rsa_jwk(json!({"kid": "enc", "use": "enc"})),
                rsa_jwk(json!({"kid": "wrap", "key_ops": ["wrapKey"]})),
                rsa_jwk(json!({"kid": "oaep", "alg": "RSA-OAEP"})),
                rsa_jwk(json!({"kid": "rs384", "use": "sig", "alg": "RS384"})),
                rsa_jwk(json!({"kid": "any", "key_ops": ["verify"]})),
            ],
            &[Algorithm::RS256, Algorithm::RS384, Algorithm::PS256],
        );
        for kid in ["enc", "wrap", "oaep"] {
            assert_eq!(
                auth.verify(&rsa_token(Algorithm::RS256, Some(kid))),
                Err(AuthError::InvalidToken),
                "{kid}"
            );
        }
        // Declared for RS384: that algorithm only, not RS256 nor PS256 with the same key.
        assert!(auth
            .verify(&rsa_token(Algorithm::RS384, Some("rs384")))
            .is_ok());
        for alg in [Algorithm::RS256, Algorithm::PS256] {
            assert_eq!(
                auth.verify(&rsa_token(alg, Some("rs384"))),
                Err(AuthError::InvalidToken),
                "{alg:?}"
            );
        }
        // No `alg`: any algorithm of the key's family.
        for alg in [Algorithm::RS256, Algorithm::PS256] {
            assert!(auth.verify(&rsa_token(alg, Some("any"))).is_ok(), "{alg:?}");
        }
    }

    #[test]
    fn a_jwks_without_a_signing_key_is_a_configuration_error() {
        let mut c = config(&[Algorithm::RS256]);
        let set = json!({"keys": [rsa_jwk(json!({"use": "enc"}))]});
        c.jwks = file(&serde_json::to_vec(&set).unwrap());
        assert_eq!(Authenticator::new(&c).unwrap_err().setting, "JWT_JWKS_FILE");
    }

    #[test]
    fn without_a_kid_every_key_of_the_family_is_tried() {
        // A rollover: the old key first, the signing key second, both with a kid.
        let mut old = rsa_jwk(json!({"kid": "old", "use": "sig"}));
        let n = old["n"].as_str().unwrap().replacen('s', "t", 1);
        old["n"] = json!(n);
        let auth = jwks_auth(
            vec![old, rsa_jwk(json!({"kid": "new", "use": "sig"}))],
            &[Algorithm::RS256],
        );
        assert!(auth.verify(&rsa_token(Algorithm::RS256, None)).is_ok());
        // A kid still narrows the choice to its key.
        assert_eq!(
            auth.verify(&rsa_token(Algorithm::RS256, Some("old"))),
            Err(AuthError::InvalidToken)
        );
        // And a token no key signed is refused after all were tried.
        let forged = rsa_token(Algorithm::RS256, None);
        let mut tampered = forged.clone();
        tampered.replace_range(forged.len() - 4.., "AAAA");
        assert_eq!(auth.verify(&tampered), Err(AuthError::InvalidToken));
    }

    #[test]
    fn an_hmac_token_is_never_checked_against_a_public_key() {
        // The classic confusion: sign HS256 with the server's public key as the secret.
        let mut c = config(&[Algorithm::HS256, Algorithm::RS256]);
        c.secret = Some(JwtSecret::new("the-real-secret-that-is-long-enough!"));
        c.public_key = file(RSA_PUBLIC);
        let auth = Authenticator::new(&c).unwrap();
        let forged = sign(
            Header::new(Algorithm::HS256),
            claims(),
            &EncodingKey::from_secret(RSA_PUBLIC),
        );
        assert_eq!(auth.verify(&forged), Err(AuthError::InvalidToken));
        // And with only RS256 allowed, an HS256 token is refused outright.
        let mut rs_only = config(&[Algorithm::RS256]);
        rs_only.public_key = file(RSA_PUBLIC);
        let auth = Authenticator::new(&rs_only).unwrap();
        assert_eq!(auth.verify(&forged), Err(AuthError::InvalidToken));
    }

    #[test]
    fn the_previous_secret_is_still_accepted_during_rotation() {
        let mut c = config(&[Algorithm::HS256]);
        c.secret = Some(JwtSecret::new("new-secret-new-secret-new-secret!!"));
        c.previous_secret = Some(JwtSecret::new("old-secret-old-secret-old-secret!!"));
        let auth = Authenticator::new(&c).unwrap();
        for (secret, ok) in [
            ("new-secret-new-secret-new-secret!!", true),
            ("old-secret-old-secret-old-secret!!", true),
            ("older-secret-older-secret-older!!!", false),
        ] {
            let token = mint_token(secret.as_bytes(), "u1", "u1@example.com", None).unwrap();
            assert_eq!(auth.verify(&token).is_ok(), ok, "{secret}");
        }
    }

    #[test]
    fn issuer_and_audience_are_enforced_when_set() {
        let mut c = config(&[Algorithm::HS256]);
        c.secret = Some(JwtSecret::new("secret"));
        c.issuer = Some("https://auth.example".into());
        c.audience = vec!["ensure-user".into()];
        let auth = Authenticator::new(&c).unwrap();
        let key = EncodingKey::from_secret(b"secret");
        let with = |extra: serde_json::Value| {
            let mut claims = claims();
            claims
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            sign(Header::new(Algorithm::HS256), claims, &key)
        };
        assert!(auth
            .verify(&with(
                json!({"iss": "https://auth.example", "aud": "ensure-user"})
            ))
            .is_ok());
        for bad in [
            json!({"iss": "https://evil.example", "aud": "ensure-user"}),
            json!({"iss": "https://auth.example", "aud": "someone-else"}),
            json!({"aud": "ensure-user"}),
            json!({"iss": "https://auth.example"}),
        ] {
            assert_eq!(
                auth.verify(&with(bad.clone())),
                Err(AuthError::InvalidToken),
                "{bad}"
            );
        }
    }

    #[test]
    fn unusable_key_files_are_configuration_errors() {
        let mut c = config(&[Algorithm::RS256]);
        c.public_key = file(b"not a pem");
        assert_eq!(
            Authenticator::new(&c).unwrap_err().setting,
            "JWT_PUBLIC_KEY_FILE"
        );
        let mut c = config(&[Algorithm::RS256]);
        c.jwks = file(b"{}");
        assert_eq!(Authenticator::new(&c).unwrap_err().setting, "JWT_JWKS_FILE");
    }
}
