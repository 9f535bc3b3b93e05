//! A Redis Cluster with a replica per master and `QUEUE_MIN_REPLICAS=1`: a master killed
//! under load loses no request answered 2xx, and its replica takes over.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ensure_user::queue::QueueTopology;

use crate::cluster::{cluster_vars, RedisCluster};
use crate::helpers::*;

const LOAD: Duration = Duration::from_secs(20);
const KILL_AT: Duration = Duration::from_secs(7);
const CONCURRENCY: usize = 16;
/// The longest the service may go without a 2xx after the kill.
const BACK_WITHIN: Duration = Duration::from_secs(15);
/// How long the backlog may take to be carried out once the load stops.
const DRAIN_WITHIN: Duration = Duration::from_secs(60);

/// One request of the load: its user, when it was sent and answered (since the load
/// began), and its status (`None`: no HTTP answer).
struct Answer {
    user: String,
    sent: Duration,
    answered: Duration,
    status: Option<u16>,
}

impl Answer {
    fn accepted(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// `CONCURRENCY` clients, each sending ensures of users of its own one after the other,
/// until `LOAD` has passed since `start`.
async fn load(address: SocketAddr, start: Instant) -> Vec<Answer> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let lanes = (0..CONCURRENCY).map(|lane| {
        let client = client.clone();
        async move {
            let mut answers = Vec::new();
            while start.elapsed() < LOAD {
                let user = format!("rep-{lane}-{}", answers.len());
                let sent = start.elapsed();
                let response = post_ensure(&client, address, &user).await;
                let status = response.ok().map(|r| r.status().as_u16());
                let answered = start.elapsed();
                answers.push(Answer {
                    user,
                    sent,
                    answered,
                    status,
                });
            }
            answers
        }
    });
    let lanes = futures_util::future::join_all(lanes).await;
    lanes.into_iter().flatten().collect()
}

/// What the load got, split around the kill.
struct Figures {
    accepted: usize,
    /// Of those, sent before the kill to a shard of the master killed.
    accepted_on_victim_before: usize,
    /// Sent after the kill to a shard of the master killed (no replica left): must be 0.
    accepted_on_victim_after: usize,
    /// Sent after the kill and answered 2xx.
    accepted_after: usize,
    unavailable: usize,
    /// No HTTP answer, or a status other than 2xx and 503.
    errors: usize,
    /// The longest stretch after the kill without a 2xx answer.
    without_service: Duration,
}

impl Figures {
    fn of(answers: &[Answer], killed_at: Duration, on_victim: impl Fn(&str) -> bool) -> Self {
        let accepted = answers.iter().filter(|a| a.accepted());
        let count = |f: &dyn Fn(&Answer) -> bool| answers.iter().filter(|a| f(a)).count();
        let mut times: Vec<Duration> = accepted
            .clone()
            .map(|a| a.answered)
            .filter(|t| *t >= killed_at)
            .collect();
        times.extend([killed_at, LOAD]);
        times.sort();
        Self {
            accepted: accepted.count(),
            accepted_on_victim_before: count(&|a| {
                a.accepted() && a.sent < killed_at && on_victim(&a.user)
            }),
            accepted_on_victim_after: count(&|a| {
                a.accepted() && a.sent >= killed_at && on_victim(&a.user)
            }),
            accepted_after: count(&|a| a.accepted() && a.sent >= killed_at),
            unavailable: count(&|a| a.status == Some(503)),
            errors: count(&|a| !a.accepted() && a.status != Some(503)),
            without_service: times.windows(2).map(|w| w[1] - w[0]).max().unwrap(),
        }
    }
}

/// Polls, for at most `DRAIN_WITHIN`, until every user of `accepted` has a row in SQLite
/// and a `createUser` on the Engine stream; returns how many do not (lost), and how many
/// `createUser` were published more than once for a user (duplicates).
async fn delivery(
    db: &std::path::Path,
    engine: &RedisServer,
    accepted: &BTreeSet<String>,
) -> (usize, usize) {
    let look = || async {
        let stored: BTreeSet<String> = rows(db).into_iter().map(|(id, _)| id).collect();
        let published: Vec<String> = published_users(engine).await.into_iter().collect();
        let distinct: BTreeSet<&String> = published.iter().collect();
        let lost = accepted
            .iter()
            .filter(|u| !stored.contains(*u) || !distinct.contains(u))
            .count();
        (lost, published.len() - distinct.len())
    };
    last_look(
        DRAIN_WITHIN,
        Duration::from_millis(200),
        look,
        |(lost, _)| *lost == 0,
    )
    .await
}

/// Calls of `command` (refused and failed ones included) in an `INFO commandstats`.
fn calls(commandstats: &str, command: &str) -> u64 {
    let prefix = format!("cmdstat_{command}:");
    let Some(line) = commandstats.lines().find(|l| l.starts_with(&prefix)) else {
        return 0;
    };
    line[prefix.len()..]
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| ["calls", "rejected_calls", "failed_calls"].contains(k))
        .map(|(_, v)| v.trim().parse::<u64>().unwrap())
        .sum()
}

/// While every node is up, each `WAIT` went with its `XADD` to the shard's master: no
/// replica got one, a master serving no shard got none, and a master serving shards got
/// at least one per XADD (the listener's, plus the workers'; a WAIT is counted once it
/// returns, so at most one per client lane may still be blocked).
async fn assert_wait_goes_with_xadd(cluster: &RedisCluster) {
    for port in cluster.live_ports() {
        let stats = cluster.info(port, "commandstats").await.unwrap();
        let master = cluster
            .info(port, "replication")
            .await
            .unwrap()
            .contains("role:master");
        let (xadd, wait) = (calls(&stats, "xadd"), calls(&stats, "wait"));
        let what = format!("node {port} (master: {master}): {xadd} XADD, {wait} WAIT");
        assert!(master || wait == 0, "{what}");
        assert!(!master || xadd > 0 || wait == 0, "{what}");
        assert!(!master || wait + CONCURRENCY as u64 >= xadd, "{what}");
    }
}

/// After the kill, the client sends pipelines for the dead master's slots to other nodes
/// until it learns of the promotion; those answer the XADD with MOVED (and run its WAIT
/// for nothing). No 2xx rests on such a WAIT: none came for a shard whose master had no
/// replica left, and every 2xx was carried out.
#[tokio::test]
async fn cluster_with_replicas_loses_no_acknowledged_request_when_a_master_dies() {
    let mut cluster = RedisCluster::start_replicated().await;
    let engine = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut vars = cluster_vars(&cluster.urls(), &engine, &dir);
    set(&mut vars, "QUEUE_MIN_REPLICAS", "1");
    // Answered as soon as queued: a 2xx rests on the replica's copy of the entry alone.
    set(&mut vars, "ENSURE_WAIT_MS", "0");
    let serve = Process::spawn(&["serve"], &vars).await;
    let topology = QueueTopology::new(Vec::new(), true, "stream:ensure-user", 3);
    // Shard {1}'s master (it serves {2} too: both slots are in the same third).
    let doomed_key = &topology.shards[1];
    let victim = cluster.master_of(doomed_key).await.unwrap();
    let mut orphaned = BTreeSet::new();
    for shard in &topology.shards {
        if cluster.master_of(shard).await == Some(victim) {
            orphaned.insert(shard.clone());
        }
    }

    let start = Instant::now();
    let load = tokio::spawn(load(serve.address, start));
    // The fault's place in the schedule, not a synchronisation.
    tokio::time::sleep_until((start + KILL_AT).into()).await;
    assert_wait_goes_with_xadd(&cluster).await;
    cluster.kill_node(victim);
    let killed_at = start.elapsed();
    eventually("a replica promoted in the dead master's place", || async {
        cluster.master_of(doomed_key).await.filter(|m| *m != victim)
    })
    .await;
    let promoted_after = start.elapsed() - killed_at;
    let answers = load.await.unwrap();

    let on_victim = |user: &str| orphaned.contains(topology.shard_for(user));
    let figures = Figures::of(&answers, killed_at, on_victim);
    let accepted: BTreeSet<String> = answers
        .iter()
        .filter(|a| a.accepted())
        .map(|a| a.user.clone())
        .collect();
    let (lost, duplicates) = delivery(&dir.path().join("users.db"), &engine, &accepted).await;
    eprintln!(
        "sent {}: accepted {} ({} on the killed master's shards before the kill, {} after), \
         503 {}, errors {}, lost {lost}, duplicates {duplicates}; killed at {killed_at:.1?}, \
         replica promoted {promoted_after:.1?} later, longest without a 2xx {:.1?}",
        answers.len(),
        figures.accepted,
        figures.accepted_on_victim_before,
        figures.accepted_on_victim_after,
        figures.unavailable,
        figures.errors,
        figures.without_service,
    );
    assert_eq!(lost, 0, "requests answered 2xx but never carried out");
    assert!(
        figures.accepted_on_victim_before > 0,
        "the kill hit no accepted entry"
    );
    assert_eq!(
        figures.accepted_on_victim_after, 0,
        "a 2xx without a replica"
    );
    assert!(figures.accepted_after > 0, "no 2xx after the kill");
    assert!(figures.without_service <= BACK_WITHIN);
    assert!(serve.terminate().await.success());
}
