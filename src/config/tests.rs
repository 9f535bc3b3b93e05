//! Unit tests of the settings: defaults, refusals, and that every setting is documented.

use super::*;

fn with(extra: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let mut vars = vec![("JWT_SECRET", "s3cret")];
    vars.extend_from_slice(extra);
    Config::from_vars(vars)
}

#[test]
fn defaults_follow_the_contract() {
    let c = with(&[]).unwrap();
    assert_eq!(c.listen_addr.to_string(), "0.0.0.0:8000");
    assert_eq!(c.metrics_addr.to_string(), "0.0.0.0:9100");
    assert_eq!(c.admin_addr.unwrap().to_string(), "127.0.0.1:9101");
    assert!(c.admin_token.is_none());
    assert_eq!(c.redis_url, "redis://127.0.0.1:6379");
    assert_eq!(c.engine_redis_url, c.redis_url);
    assert_eq!(c.ensure_stream, "stream:ensure-user");
    assert_eq!(c.redis_nodes, vec!["redis://127.0.0.1:6379"]);
    assert_eq!(c.ensure_shards, 1);
    assert!(!c.redis_cluster);
    assert_eq!(c.ensure_group, "ensure-workers");
    assert_eq!(c.engine_stream, "stream:exness");
    assert_eq!(c.engine_reply_stream, "stream:exnessReceive");
    assert_eq!(c.ensure_wait, Duration::from_millis(5000));
    assert_eq!(c.database_path, PathBuf::from("./data/ensure-user.db"));
    assert_eq!(c.database_statement_timeout, Duration::from_millis(5000));
    assert_eq!(c.jwt.leeway_secs, 60);
    assert!(!c.jwt.require_exp);
    assert_eq!(c.shutdown_grace, Duration::from_secs(30));
    assert!(!c.cors_allowed_origins.is_enabled());
}

#[test]
fn the_console_needs_a_token_off_loopback() {
    assert!(with(&[("ADMIN_ADDR", "off")]).unwrap().admin_addr.is_none());
    assert!(with(&[("ADMIN_ADDR", "[::1]:9200")]).is_ok());
    let err = with(&[("ADMIN_ADDR", "0.0.0.0:9101")]).unwrap_err();
    assert_eq!(err.setting, "ADMIN_TOKEN");
    let c = with(&[
        ("ADMIN_ADDR", "0.0.0.0:9101"),
        ("ADMIN_TOKEN", "0123456789abcdef"),
    ])
    .unwrap();
    assert_eq!(c.admin_token.unwrap().as_bytes(), b"0123456789abcdef");
    assert_eq!(
        with(&[("ADMIN_TOKEN", "short")]).unwrap_err().setting,
        "ADMIN_TOKEN"
    );
    assert_eq!(
        with(&[("ADMIN_ADDR", "everywhere")]).unwrap_err().setting,
        "ADMIN_ADDR"
    );
}

#[test]
fn port_sets_the_listen_address() {
    assert_eq!(with(&[("PORT", "9000")]).unwrap().listen_addr.port(), 9000);
}

#[test]
fn bad_settings_name_themselves() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("PORT", "eighty")], "PORT"),
        (&[("ENSURE_WAIT_MS", "-1")], "ENSURE_WAIT_MS"),
        (&[("JWT_REQUIRE_EXP", "maybe")], "JWT_REQUIRE_EXP"),
        (&[("REDIS_URL", "http://nope")], "REDIS_URL"),
        (&[("WORKER_CONCURRENCY", "0")], "WORKER_CONCURRENCY"),
        (&[("LISTEN_ADDR", "localhost")], "LISTEN_ADDR"),
        (&[("LOG_FORMAT", "xml")], "LOG_FORMAT"),
        (
            &[("REDIS_URL", "redis://a:1,redis://b:2")],
            "ENGINE_REDIS_URL",
        ),
        (&[("ENSURE_SHARDS", "0")], "ENSURE_SHARDS"),
        (&[("WORKER_BLOCK_MS", "0")], "WORKER_BLOCK_MS"),
        (&[("CLAIM_IDLE_MS", "10")], "CLAIM_IDLE_MS"),
        (&[("ENGINE_CONFIRM", "maybe")], "ENGINE_CONFIRM"),
        (&[("MAX_DELIVERIES", "0")], "MAX_DELIVERIES"),
        (
            &[("DATABASE_STATEMENT_TIMEOUT_MS", "99")],
            "DATABASE_STATEMENT_TIMEOUT_MS",
        ),
        (
            &[("DATABASE_STATEMENT_TIMEOUT_MS", "5s")],
            "DATABASE_STATEMENT_TIMEOUT_MS",
        ),
        (&[("JWT_ALGORITHMS", "HS256,none")], "JWT_ALGORITHMS"),
        (
            &[("CORS_ALLOWED_ORIGINS", "https://app.example.com/")],
            "CORS_ALLOWED_ORIGINS",
        ),
        (
            &[("CORS_ALLOWED_ORIGINS", "*,app.example.com")],
            "CORS_ALLOWED_ORIGINS",
        ),
        (&[("JWT_ALGORITHMS", "RS256")], "JWT_PUBLIC_KEY_FILE"),
        (
            &[("JWT_PUBLIC_KEY_FILE", "/nonexistent/key.pem")],
            "JWT_PUBLIC_KEY_FILE",
        ),
    ];
    for (vars, setting) in cases {
        let err = with(vars).unwrap_err();
        assert_eq!(err.setting, *setting, "{vars:?}");
        assert!(err
            .to_string()
            .starts_with(&format!("configuration error: {setting}: ")));
    }
}

/// Every name a setting is read under, from the config module's code (its tests left
/// out): each must have its row in the contract's settings table and in the README's.
#[test]
fn every_setting_is_documented() {
    let code = [
        include_str!("mod.rs"),
        include_str!("settings.rs"),
        include_str!("traces.rs"),
    ]
    .concat();
    // Quoted upper-case names; `HS256` is the one such value that is not a setting.
    let names: std::collections::BTreeSet<&str> = code
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.starts_with(|c: char| c.is_ascii_uppercase())
                && s.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                && *s != "HS256"
        })
        .collect();
    assert!(
        names.contains("CORS_ALLOWED_ORIGINS") && names.len() > 30,
        "{names:?}"
    );
    for (doc, text) in [
        ("docs/contract.md", include_str!("../../docs/contract.md")),
        ("README.md", include_str!("../../README.md")),
    ] {
        let missing: Vec<_> = names
            .iter()
            .filter(|n| !text.contains(&format!("`{n}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "{doc} does not document {missing:?}: give each a row in its settings table"
        );
    }
}

#[test]
fn the_users_commands_read_store_and_engine_settings_without_a_secret() {
    let vars: HashMap<&str, &str> = [
        ("DATABASE_PATH", "/tmp/users.db"),
        ("REDIS_URL", "redis://queue:6379"),
        ("ENGINE_STREAM", "stream:engine"),
    ]
    .into();
    let s = Settings {
        lookup: &|name| vars.get(name).map(|v| v.to_string()),
    };
    let store = s.store().unwrap();
    assert_eq!(store.database_path, PathBuf::from("/tmp/users.db"));
    assert!(store.database_url.is_none());
    let engine = s.engine().unwrap();
    assert_eq!(engine.engine_redis_url, "redis://queue:6379");
    assert_eq!(engine.engine_stream, "stream:engine");
    let cluster = Settings {
        lookup: &|name| (name == "REDIS_URL").then(|| "redis://a:1,redis://b:2".into()),
    };
    assert_eq!(cluster.engine().unwrap_err().setting, "ENGINE_REDIS_URL");
    let bad = Settings {
        lookup: &|name| (name == "DATABASE_URL").then(|| "mysql://x".into()),
    };
    assert_eq!(bad.store().unwrap_err().setting, "DATABASE_URL");
}

#[test]
fn operator_commands_need_no_token_settings() {
    let c = Config::operator_from_vars([("REDIS_URL", "redis://127.0.0.1:7000")]).unwrap();
    assert_eq!(c.redis_url, "redis://127.0.0.1:7000");
    assert!(c.jwt.secret.is_none() && c.jwt.public_key.is_none() && c.jwt.jwks.is_none());
    // Other settings are still checked.
    let err = Config::operator_from_vars([("REDIS_URL", "http://nope")]).unwrap_err();
    assert_eq!(err.setting, "REDIS_URL");
}

#[test]
fn a_missing_secret_is_refused() {
    let err = Config::from_vars(Vec::<(&str, &str)>::new()).unwrap_err();
    assert_eq!(err.setting, "JWT_SECRET");
}

#[test]
fn secret_file_loses_its_trailing_newline() {
    let dir = std::env::temp_dir().join(format!("eu-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("secret");
    std::fs::write(&path, "from-file\n").unwrap();
    let c = Config::from_vars([("JWT_SECRET_FILE", path.to_str().unwrap())]).unwrap();
    assert_eq!(c.jwt.secret.as_ref().unwrap().as_bytes(), b"from-file");
    let debug = format!("{:?}", c.jwt.secret);
    assert!(!debug.contains("from-file"), "{debug}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn secrets_never_show_in_debug_output() {
    let c = Config::from_vars([
        ("JWT_SECRET", "jwt-secret-value"),
        ("ADMIN_TOKEN", "admin-token-value-0123"),
    ])
    .unwrap();
    let shown = format!("{c:?}");
    assert!(!shown.contains("jwt-secret-value"), "{shown}");
    assert!(!shown.contains("admin-token-value-0123"), "{shown}");
    assert_eq!(c.admin_token.unwrap().as_bytes(), b"admin-token-value-0123");
}

#[test]
fn traces_are_off_without_an_endpoint_and_follow_the_standard_variables() {
    assert_eq!(with(&[]).unwrap().tracing, None);
    let endpoint = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")];
    let t = with(&endpoint).unwrap().tracing.unwrap();
    assert_eq!(t.endpoint, "http://collector:4318/v1/traces");
    assert_eq!(t.service_name, "ensure-user");
    assert_eq!(t.sampler, TraceSampler::ParentBasedAlwaysOn);
    assert_eq!((t.max_queue, t.max_batch), (2048, 512));
    assert_eq!(t.schedule_delay, Duration::from_millis(5000));
    let t = with(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://other:9999/traces",
        ),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "service.name=from-attrs,team=a%2Cb",
        ),
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
    ])
    .unwrap()
    .tracing
    .unwrap();
    assert_eq!(
        t.endpoint, "http://other:9999/traces",
        "the signal's URL as it is"
    );
    assert_eq!(t.service_name, "from-attrs");
    assert_eq!(t.resource[1], ("team".to_string(), "a,b".to_string()));
    assert_eq!(t.sampler, TraceSampler::ParentBasedTraceIdRatio(0.25));
    let off = with(&[endpoint[0], ("OTEL_SDK_DISABLED", "true")]).unwrap();
    assert_eq!(off.tracing, None);
}

#[test]
fn bad_trace_settings_stop_the_process_naming_the_variable() {
    let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
    for (setting, value) in [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "not a url"),
        ("OTEL_TRACES_SAMPLER", "sometimes"),
        ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
        ("OTEL_TRACES_SAMPLER_ARG", "half"),
        ("OTEL_RESOURCE_ATTRIBUTES", "novalue"),
        ("OTEL_RESOURCE_ATTRIBUTES", "=x"),
        ("OTEL_RESOURCE_ATTRIBUTES", "k=%zz"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4096"),
        ("OTEL_BSP_SCHEDULE_DELAY", "soon"),
        ("OTEL_SDK_DISABLED", "maybe"),
    ] {
        let mut vars = vec![endpoint, (setting, value)];
        if setting == "OTEL_TRACES_SAMPLER_ARG" {
            vars.push(("OTEL_TRACES_SAMPLER", "traceidratio"));
        }
        let err = with(&vars).expect_err(value);
        assert_eq!(err.setting, setting, "{value:?}: {err}");
    }
}
