//! The store's rules, run the same way against SQLite and PostgreSQL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ensure_user::store::{NewUser, Resolution, Store, StoreOptions};

use crate::helpers::*;

fn user(id: &str, email: &str) -> NewUser {
    NewUser::new(id, email)
}

fn stored(id: &str, email: &str) -> Resolution {
    Resolution::stored(id, email)
}

/// Concurrent batches that overlap: one row per user, one owner per email.
async fn overlapping_batches_store_one_row_each(db: &TestDb, store: &Arc<Store>) {
    // Concurrent batches that overlap: one row per user, one owner per email. A batch may
    // fail retryably while they contend (a deadlock, a lock wait over the statement
    // timeout on a loaded machine); the worker runs such a batch again, and so does this.
    let tasks = (0..8).map(|t| {
        let store = Arc::clone(store);
        tokio::spawn(async move {
            let users: Vec<NewUser> = (0..40)
                .map(|i| {
                    user(
                        &format!("c{}", (i + t * 7) % 60),
                        &format!("c{}@x.com", (i + t * 7) % 60),
                    )
                })
                .collect();
            eventually("the concurrent batch to be stored", || {
                let (store, users) = (Arc::clone(&store), users.clone());
                async move {
                    match store.upsert(users).await {
                        Ok(resolutions) => Some(resolutions),
                        Err(e) if e.is_retryable() => None,
                        Err(e) => panic!("{e}"),
                    }
                }
            })
            .await
        })
    });
    for task in futures_util::future::join_all(tasks).await {
        assert!(task
            .unwrap()
            .iter()
            .all(|r| matches!(r, Resolution::Stored { .. })));
    }
    let rows = db.rows().await;
    assert_eq!(
        rows.iter().filter(|(id, _)| id.starts_with('c')).count(),
        60
    );
}

/// Every rule, against one store.
async fn behaviour(db: &TestDb) {
    let store = db.open().await;

    // The same user again adds no row.
    assert_eq!(
        store.upsert(vec![user("u1", "a@x.com")]).await.unwrap(),
        vec![stored("u1", "a@x.com")]
    );
    assert_eq!(
        store.upsert(vec![user("u1", "a@x.com")]).await.unwrap(),
        vec![stored("u1", "a@x.com")]
    );
    // An email that belongs to another id resolves to its owner.
    assert_eq!(
        store.upsert(vec![user("u2", "a@x.com")]).await.unwrap(),
        vec![stored("u1", "a@x.com")]
    );
    // An existing id keeps its email, and says so.
    assert_eq!(
        store.upsert(vec![user("u1", "new@x.com")]).await.unwrap(),
        vec![stored("u1", "a@x.com")]
    );
    // The console finds the canonical pair by id or by email.
    assert_eq!(store.find("u1").await.unwrap(), vec![user("u1", "a@x.com")]);
    assert_eq!(
        store.find("a@x.com").await.unwrap(),
        vec![user("u1", "a@x.com")]
    );
    assert_eq!(store.find("u2").await.unwrap(), vec![]);
    // In one batch, in arrival order.
    let got = store
        .upsert(vec![
            user("u3", "c@x.com"),
            user("u4", "c@x.com"),
            user("u3", "c@x.com"),
            user("u5", "e@x.com"),
        ])
        .await
        .unwrap();
    assert_eq!(
        got,
        vec![
            stored("u3", "c@x.com"),
            stored("u3", "c@x.com"),
            stored("u3", "c@x.com"),
            stored("u5", "e@x.com")
        ]
    );
    assert_eq!(
        db.rows().await,
        vec![
            ("u1".to_string(), "a@x.com".to_string()),
            ("u3".into(), "c@x.com".into()),
            ("u5".into(), "e@x.com".into())
        ]
    );

    let store = Arc::new(store);
    overlapping_batches_store_one_row_each(db, &store).await;

    // A row the database refuses is refused alone; its neighbours are stored.
    db.refuse("bad").await;
    let got = store
        .upsert(vec![
            user("g1", "g1@x.com"),
            user("bad", "bad@x.com"),
            user("g2", "g2@x.com"),
        ])
        .await
        .unwrap();
    assert_eq!(got[0], stored("g1", "g1@x.com"));
    assert!(
        matches!(&got[1], Resolution::Refused { .. }),
        "{:?}",
        got[1]
    );
    assert_eq!(got[2], stored("g2", "g2@x.com"));
    store.ping().await.unwrap();
}

#[tokio::test]
async fn sqlite_keeps_the_rules() {
    behaviour(&TestDb::sqlite()).await;
}

#[tokio::test]
async fn postgres_keeps_the_rules() {
    behaviour(&TestDb::postgres().await).await;
}

#[tokio::test]
async fn postgres_gives_up_on_a_locked_table_with_a_retryable_error_then_succeeds() {
    let db = TestDb::postgres().await;
    let store = db
        .open_with(StoreOptions {
            pool_size: 2,
            statement_timeout: Duration::from_millis(300),
        })
        .await;
    let locker = db.client().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        store.upsert(vec![user("locked", "locked@x.com")]),
    )
    .await
    .expect("the upsert does not wait for the lock")
    .unwrap_err();

    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(err.is_retryable(), "{err}");
    assert!(
        err.to_string().contains("57014"),
        "the server cancelled the statement: {err}"
    );
    locker.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        store
            .upsert(vec![user("locked", "locked@x.com")])
            .await
            .unwrap(),
        vec![stored("locked", "locked@x.com")]
    );
}

#[tokio::test]
async fn the_service_runs_end_to_end_on_postgres() {
    let db = TestDb::postgres().await;
    let url = db.url().unwrap().to_string();
    let app = spawn_app_with(|v| set(v, "DATABASE_URL", &url)).await;

    let response = app.ensure(&token("pg-user", "pg@example.com")).await;

    assert_eq!(response.status(), 200);
    assert_eq!(
        db.rows().await,
        vec![("pg-user".to_string(), "pg@example.com".to_string())]
    );
    assert!(app.rows().is_empty(), "nothing went to SQLite");
    assert_eq!(app.wait_for_engine_entries(1).await.len(), 1);
    let ready: serde_json::Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["status"], "ready");
    app.shutdown().await.unwrap();
}
