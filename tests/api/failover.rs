//! Issue 15: the queue's Redis as a primary with two replicas under Sentinel. The primary is
//! SIGKILLed under load and never restarted. With `QUEUE_MIN_REPLICAS=1` a request is
//! answered 2xx only once a replica holds its entry, so no 2xx may be lost; and the service
//! must follow Sentinel to the promoted replica and answer 2xx again within 15 s.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;
use crate::replicated::ReplicatedRedis;

/// Clients sending at once, each one new user after another.
const CLIENTS: usize = 16;
/// How soon after the kill 2xx answers must resume.
const RESUME_WITHIN: Duration = Duration::from_secs(15);
/// How long accepted requests get to be carried out once the load is over.
const SETTLE_WITHIN: Duration = Duration::from_secs(60);

/// What a failover test does.
struct Experiment {
    /// The service's processes, the listener first: `serve`, or `listen` + 2 × `work`.
    modes: &'static [&'static str],
    /// How long the clients send, from the start.
    load_for: Duration,
    /// When the primary is SIGKILLed, from the start.
    kill_at: Duration,
    /// Replication cut this long before the kill, if at all.
    cut_before: Option<Duration>,
}

/// One request, its times counted from the start of the experiment.
struct Answer {
    user: String,
    sent: Duration,
    answered: Duration,
    /// `None`: no answer (connection refused or cut, timed out).
    status: Option<u16>,
    request_id: Option<String>,
}

impl Answer {
    fn accepted(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// When things happened, from the start of the experiment.
#[derive(Clone, Copy)]
struct Timeline {
    /// The primary counted no replica any more.
    cut: Option<Duration>,
    kill: Duration,
    /// Every Sentinel named the new primary.
    promoted: Duration,
    new_primary: u16,
}

/// What the experiment is judged by.
struct Figures {
    sent: usize,
    accepted: usize,
    unavailable: usize,
    other_errors: usize,
    /// 2xx whose user is not in SQLite or whose request id has no `createUser`.
    lost: Vec<String>,
    /// `createUser` commands beyond the first for one request id.
    duplicates: usize,
    /// Requests answered other than 2xx whose `createUser` was published all the same.
    refused_but_carried_out: usize,
    accepted_before_kill: usize,
    /// Requests sent once the cut was in place and answered before the kill, and their 2xx.
    in_cut_window: (usize, usize),
    /// The last 2xx answered before the kill to the first 2xx sent after it.
    without_service: Option<Duration>,
    /// The kill to the first 2xx sent after it.
    resumed_after_kill: Option<Duration>,
    timeline: Timeline,
    /// `/readyz`'s `queuePrimary` at the end.
    ready_primary: Option<String>,
}

/// `serve` with `QUEUE_MIN_REPLICAS=1`: 16 clients with distinct users for 30 s, the
/// primary SIGKILLed at 10 s and never restarted. Proves every 2xx survives the failover
/// (its row in SQLite, its `createUser` on the Engine stream) and that 2xx answers resume
/// through the promoted replica within 15 s of the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_min_replicas_loses_no_acknowledged_request_when_the_primary_dies() {
    let figures = run(
        "serve-kill",
        Experiment {
            modes: &["serve"],
            load_for: Duration::from_secs(30),
            kill_at: Duration::from_secs(10),
            cut_before: None,
        },
    )
    .await;
    figures.assert_nothing_acknowledged_lost();
}

/// As above, but the primary stops feeding its replicas 1.2 s before the kill, so its last
/// writes die with it. (1.2 s, not less: each unconfirmed XADD holds its connection for the
/// WAIT's 200 ms, so requests sent after the cut need a few hundred ms to be answered.) Proves that what no replica confirmed was not answered 2xx (503
/// instead), so still no 2xx is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_min_replicas_loses_no_acknowledged_request_when_replication_was_cut_first() {
    let figures = run(
        "serve-cut",
        Experiment {
            modes: &["serve"],
            load_for: Duration::from_secs(30),
            kill_at: Duration::from_secs(10),
            cut_before: Some(Duration::from_millis(1200)),
        },
    )
    .await;
    figures.assert_nothing_acknowledged_lost();
    let (in_window, accepted_in_window) = figures.in_cut_window;
    assert!(
        in_window > 0,
        "no request was answered between the cut and the kill: the cut proved nothing"
    );
    assert_eq!(
        accepted_in_window, 0,
        "2xx answered while no replica could confirm anything"
    );
    assert!(figures.unavailable > 0, "the unconfirmed requests get 503");
}

/// `listen` + 2 × `work` with `QUEUE_MIN_REPLICAS=1`: 16 clients for 22 s, the primary
/// SIGKILLed at 7 s. Proves the split processes (listener, workers, the outcome subscriber)
/// all follow Sentinel: no 2xx lost, 2xx again within 15 s of the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_and_two_workers_with_min_replicas_lose_no_acknowledged_request_when_the_primary_dies(
) {
    let figures = run(
        "split-kill",
        Experiment {
            modes: &["listen", "work", "work"],
            load_for: Duration::from_secs(22),
            kill_at: Duration::from_secs(7),
            cut_before: None,
        },
    )
    .await;
    figures.assert_nothing_acknowledged_lost();
}

/// The Engine's Redis behind Sentinel (`ENGINE_REDIS_SENTINELS`), its primary SIGKILLed
/// between two series of requests to `serve`. Proves the workers follow it to the promoted
/// replica: 200 again after the kill, and every 2xx's `createUser` on the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_follow_the_engine_redis_to_its_promoted_replica() {
    let queue = RedisServer::start().await;
    let mut engine = ReplicatedRedis::start("engine").await;
    let dir = tempfile::tempdir().unwrap();
    let mut vars = test_vars(&queue, &queue, &dir.path().join("users.db"));
    engine.engine_vars(&mut vars);
    set(&mut vars, "ENSURE_WAIT_MS", "2000");
    let serve = Process::spawn(&["serve"], &vars).await;
    let ok = |a: &Answer| a.status == Some(200);
    let start = Instant::now();
    let mut answers = vec![first_answer(&serve, "engine-before", start, ok).await];
    let client = client();
    for i in 0..10 {
        answers.push(ensure(&client, serve.address, format!("engine-before-{i}"), start).await);
    }
    engine.sync_replicas().await;

    let old = engine.kill_primary().await;
    let killed = start.elapsed();
    let new = engine.wait_for_new_primary(old).await;
    answers.push(first_answer(&serve, "engine-after", start, ok).await);
    let resumed = start.elapsed() - killed;
    for i in 0..10 {
        answers.push(ensure(&client, serve.address, format!("engine-after-{i}"), start).await);
    }

    let expected: BTreeSet<String> = answers
        .iter()
        .filter(|a| a.accepted())
        .filter_map(|a| a.request_id.clone())
        .collect();
    let published = eventually("every 2xx's createUser on the new primary", || async {
        let published = request_ids(engine.entries("stream:exness").await);
        expected
            .iter()
            .all(|id| published.contains_key(id))
            .then_some(published)
    })
    .await;
    let duplicates: usize = published.values().map(|n| n - 1).sum();
    eprintln!(
        "engine failover {old} -> {new}: 200 again {:.2} s after the kill; sent {}, 2xx {}, \
         200 {}, duplicates {duplicates}",
        resumed.as_secs_f64(),
        answers.len(),
        expected.len(),
        answers.iter().filter(|a| ok(a)).count()
    );
    assert!(answers.iter().all(Answer::accepted), "every request is 2xx");
}

/// Runs `experiment` against a replicated queue Redis, a plain Engine Redis and SQLite, with
/// `QUEUE_MIN_REPLICAS=1`; waits for every 2xx to be carried out (or `SETTLE_WITHIN`) and
/// returns the figures, printed.
async fn run(name: &str, experiment: Experiment) -> Figures {
    let mut redis = ReplicatedRedis::start("queue").await;
    let engine = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let mut vars = test_vars(&engine, &engine, &db);
    redis.vars(&mut vars);
    set(&mut vars, "QUEUE_MIN_REPLICAS", "1");
    set(&mut vars, "ENSURE_WAIT_MS", "1000");
    let mut processes = Vec::new();
    for mode in experiment.modes {
        processes.push(Process::spawn(&[mode], &vars).await);
    }
    let listener = processes[0].address;

    let start = Instant::now();
    let warm_up = first_acceptance(&processes[0], name, start).await;
    let until = start + experiment.load_for;
    let load = tokio::spawn(load(listener, name.to_string(), start, until));
    let timeline = break_primary(&mut redis, &experiment, start).await;
    let mut answers = load.await.unwrap();
    answers.push(warm_up);

    let mut figures = settle(&db, &engine, &answers, timeline).await;
    figures.ready_primary = ready_primary(listener, figures.timeline.new_primary).await;
    figures.print(name);
    if !figures.lost.is_empty() || figures.resumed_after_kill.is_none() {
        for process in &processes {
            eprintln!(
                "--- log of {}:\n{}",
                process.pid(),
                tail(&process.log(), 40)
            );
        }
        eprintln!("--- Sentinels:\n{}", redis.sentinel_logs());
    }
    figures
}

/// Sends ensures until one is answered 2xx (the service reached the primary through the
/// Sentinels), or panics with the listener's log after `DEADLINE`.
async fn first_acceptance(listener: &Process, name: &str, start: Instant) -> Answer {
    first_answer(listener, name, start, Answer::accepted).await
}

/// Sends ensures until one's answer is `wanted`, or panics with the log after `DEADLINE`.
async fn first_answer(
    listener: &Process,
    name: &str,
    start: Instant,
    wanted: fn(&Answer) -> bool,
) -> Answer {
    let client = client();
    let mut i = 0;
    let send = || {
        i += 1;
        ensure(
            &client,
            listener.address,
            format!("{name}-warm-up-{i}"),
            start,
        )
    };
    let answer = last_look(DEADLINE, Duration::from_millis(100), send, wanted).await;
    assert!(
        wanted(&answer),
        "{name}: not the answer wanted within {DEADLINE:?} (last: {:?}); \
         does the service follow the Sentinels? Its log:\n{}",
        answer.status,
        tail(&listener.log(), 30)
    );
    answer
}

/// `CLIENTS` clients, each sending ensures of new users (`<prefix>-<client>-<i>`) one after
/// another until `until`.
async fn load(address: SocketAddr, prefix: String, start: Instant, until: Instant) -> Vec<Answer> {
    let client = client();
    let clients = (0..CLIENTS).map(|c| {
        let (client, prefix) = (client.clone(), prefix.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in 0.. {
                if Instant::now() >= until {
                    break;
                }
                answers.push(ensure(&client, address, format!("{prefix}-{c}-{i}"), start).await);
            }
            answers
        })
    });
    let mut answers = Vec::new();
    for handle in futures_util::future::join_all(clients).await {
        answers.extend(handle.unwrap());
    }
    answers
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// One ensure of `user`, timed from `start`.
async fn ensure(
    client: &reqwest::Client,
    address: SocketAddr,
    user: String,
    start: Instant,
) -> Answer {
    let sent = start.elapsed();
    let response = post_ensure(client, address, &user).await;
    let (status, request_id) = match response {
        Ok(response) => {
            let status = response.status().as_u16();
            let body: Option<Value> = response.json().await.ok();
            let id = body.and_then(|b| b["requestId"].as_str().map(str::to_string));
            (Some(status), id)
        }
        Err(_) => (None, None),
    };
    Answer {
        user,
        sent,
        answered: start.elapsed(),
        status,
        request_id,
    }
}

/// At the experiment's times: cuts replication (if asked), SIGKILLs the primary, and waits
/// for the Sentinels to name its successor.
async fn break_primary(redis: &mut ReplicatedRedis, ex: &Experiment, start: Instant) -> Timeline {
    let kill_at = start + ex.kill_at;
    let mut cut = None;
    if let Some(lead) = ex.cut_before {
        tokio::time::sleep_until((kill_at - lead).into()).await; // the experiment's clock
        redis.cut_replication().await;
        cut = Some(start.elapsed());
    }
    tokio::time::sleep_until(kill_at.into()).await; // the experiment's clock
    let old = redis.kill_primary().await;
    let kill = start.elapsed();
    let new_primary = redis.wait_for_new_primary(old).await;
    Timeline {
        cut,
        kill,
        promoted: start.elapsed(),
        new_primary,
    }
}

/// Polls SQLite and the Engine stream until every 2xx is carried out or `SETTLE_WITHIN`
/// has passed; returns the figures of the last look.
async fn settle(
    db: &std::path::Path,
    engine: &RedisServer,
    answers: &[Answer],
    timeline: Timeline,
) -> Figures {
    let look = || async {
        let mut figures = Figures::of_answers(answers, timeline);
        let stored: BTreeSet<String> = rows(db).into_iter().map(|(id, _)| id).collect();
        let published = request_ids(engine.entries("stream:exness").await);
        figures.count_deliveries(answers, &stored, &published);
        figures
    };
    let done = |f: &Figures| f.lost.is_empty();
    last_look(SETTLE_WITHIN, Duration::from_millis(250), look, done).await
}

/// How many `createUser` commands these Engine entries hold per request id.
fn request_ids(entries: Vec<ensure_user::connection::RawEntry>) -> BTreeMap<String, usize> {
    let mut published = BTreeMap::new();
    for entry in entries {
        let message: Value = serde_json::from_str(&engine_message(&entry)).unwrap();
        assert_eq!(message["function"], "createUser");
        let id = message["requestId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        *published.entry(id).or_insert(0) += 1;
    }
    published
}

/// `/readyz`'s `queuePrimary` once it names `127.0.0.1:<expected>`, or the last seen after
/// `DEADLINE`.
async fn ready_primary(listener: SocketAddr, expected: u16) -> Option<String> {
    let expected = format!("127.0.0.1:{expected}");
    let look = || async {
        let ready: Option<Value> = match reqwest::get(format!("http://{listener}/readyz")).await {
            Ok(response) => response.json().await.ok(),
            Err(_) => None,
        };
        ready.and_then(|r| r["queuePrimary"].as_str().map(str::to_string))
    };
    let named = |n: &Option<String>| n.as_deref() == Some(expected.as_str());
    last_look(DEADLINE, Duration::from_millis(100), look, named).await
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Figures {
    /// Everything the answers and the timeline tell, before looking at deliveries.
    fn of_answers(answers: &[Answer], timeline: Timeline) -> Self {
        let kill = timeline.kill;
        let accepted = answers.iter().filter(|a| a.accepted());
        let last_before = accepted
            .clone()
            .map(|a| a.answered)
            .filter(|&t| t <= kill)
            .max();
        let resumed = accepted
            .clone()
            .filter(|a| a.sent >= kill)
            .map(|a| a.answered)
            .min();
        let in_window: Vec<&Answer> = match timeline.cut {
            Some(cut) => answers
                .iter()
                .filter(|a| a.sent >= cut && a.answered <= kill)
                .collect(),
            None => Vec::new(),
        };
        Self {
            sent: answers.len(),
            accepted: accepted.clone().count(),
            unavailable: answers.iter().filter(|a| a.status == Some(503)).count(),
            other_errors: answers
                .iter()
                .filter(|a| !a.accepted() && a.status != Some(503))
                .count(),
            lost: Vec::new(),
            duplicates: 0,
            refused_but_carried_out: 0,
            accepted_before_kill: accepted.clone().filter(|a| a.answered <= kill).count(),
            in_cut_window: (
                in_window.len(),
                in_window.iter().filter(|a| a.accepted()).count(),
            ),
            without_service: resumed.zip(last_before).map(|(r, l)| r.saturating_sub(l)),
            resumed_after_kill: resumed.map(|r| r.saturating_sub(kill)),
            timeline,
            ready_primary: None,
        }
    }

    /// Lost, duplicated and carried-out-though-refused requests, from what SQLite stores and
    /// the Engine stream holds.
    fn count_deliveries(
        &mut self,
        answers: &[Answer],
        stored: &BTreeSet<String>,
        published: &BTreeMap<String, usize>,
    ) {
        let published_id = |a: &Answer| {
            a.request_id
                .as_ref()
                .is_some_and(|id| published.contains_key(id))
        };
        self.lost = answers
            .iter()
            .filter(|a| a.accepted() && !(stored.contains(&a.user) && published_id(a)))
            .map(|a| a.user.clone())
            .collect();
        self.duplicates = published.values().map(|n| n - 1).sum();
        self.refused_but_carried_out = answers
            .iter()
            .filter(|a| !a.accepted() && published_id(a))
            .count();
    }

    fn print(&self, name: &str) {
        let secs =
            |d: Option<Duration>| d.map_or("never".into(), |d| format!("{:.2} s", d.as_secs_f64()));
        let t = &self.timeline;
        eprintln!(
            "{name}: sent {}, accepted (2xx) {} ({} before the kill), 503 {}, other errors {}, \
             lost {}, duplicates {}, refused but carried out {}",
            self.sent,
            self.accepted,
            self.accepted_before_kill,
            self.unavailable,
            self.other_errors,
            self.lost.len(),
            self.duplicates,
            self.refused_but_carried_out
        );
        eprintln!(
            "{name}: kill at {:.2} s, new primary {} named by every Sentinel {:.2} s later; \
             without service {}; 2xx again {} after the kill; /readyz queuePrimary {:?}",
            t.kill.as_secs_f64(),
            t.new_primary,
            (t.promoted - t.kill).as_secs_f64(),
            secs(self.without_service),
            secs(self.resumed_after_kill),
            self.ready_primary
        );
        if let Some(cut) = t.cut {
            eprintln!(
                "{name}: replication cut {:.0} ms before the kill; answered in that window {}, \
                 of them 2xx {}",
                (t.kill - cut).as_secs_f64() * 1000.0,
                self.in_cut_window.0,
                self.in_cut_window.1
            );
        }
        if !self.lost.is_empty() {
            eprintln!(
                "{name}: lost users (first 20): {:?}",
                &self.lost[..self.lost.len().min(20)]
            );
        }
    }

    /// What every failover test asserts: 2xx before the kill, none lost, 2xx again within
    /// `RESUME_WITHIN` of the kill, and `/readyz` naming the new primary.
    fn assert_nothing_acknowledged_lost(&self) {
        assert!(self.accepted_before_kill > 0, "no 2xx before the kill");
        assert!(
            self.lost.is_empty(),
            "{} requests answered 2xx were lost, e.g. {:?}",
            self.lost.len(),
            self.lost.first()
        );
        let resumed = self.resumed_after_kill.expect("no 2xx after the kill");
        assert!(
            resumed <= RESUME_WITHIN,
            "2xx resumed only {resumed:?} after the kill"
        );
        let expected = format!("127.0.0.1:{}", self.timeline.new_primary);
        assert_eq!(
            self.ready_primary.as_deref(),
            Some(expected.as_str()),
            "/readyz's queuePrimary names the promoted replica"
        );
    }
}
