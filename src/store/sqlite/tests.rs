//! Unit tests of the SQLite store on real files: the upsert rules, and a file that is not a database.

use super::*;

fn temp_db(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("eu-store-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join("nested").join("users.db")
}

fn user(id: &str, email: &str) -> NewUser {
    NewUser::new(id, email)
}

fn stored(id: &str, email: &str) -> Resolution {
    Resolution::stored(id, email)
}

#[tokio::test]
async fn upserts_follow_the_email_owner_rule() {
    let path = temp_db("owner");
    let store = SqliteStore::open(&path, Duration::from_secs(1)).unwrap();
    let got = store
        .upsert(vec![
            user("u1", "a@x"),
            user("u1", "a@x"),
            user("u2", "a@x"),
            user("u1", "changed@x"),
            user("u3", "c@x"),
        ])
        .await
        .unwrap();
    assert_eq!(
        got,
        vec![
            stored("u1", "a@x"),
            stored("u1", "a@x"),
            stored("u1", "a@x"),
            stored("u1", "a@x"),
            stored("u3", "c@x")
        ]
    );
    let conn = Connection::open(&path).unwrap();
    let rows: Vec<(String, String)> = conn
        .prepare("SELECT user_id, email FROM users ORDER BY user_id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        rows,
        vec![("u1".into(), "a@x".into()), ("u3".into(), "c@x".into())]
    );
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, MIGRATIONS.len() as i64);
    store.ping().await.unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn a_file_that_is_not_a_database_is_refused_at_open() {
    let path = temp_db("garbage");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
    assert!(SqliteStore::open(&path, Duration::from_secs(1)).is_err());
}
