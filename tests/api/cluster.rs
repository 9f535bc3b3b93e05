//! The queue on a real three-master Redis Cluster, with the ingress split over shards.

use std::process::{Child, Command, Stdio};

use ensure_user::{Application, Config, Mode};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// `redis-server --cluster-enabled yes` processes joined by `redis-cli --cluster create`:
/// three masters, each with `replicas` replicas.
pub(crate) struct RedisCluster {
    pub(crate) ports: Vec<u16>,
    children: Vec<Child>,
    /// Indexes of the nodes killed.
    killed: Vec<usize>,
    _dir: tempfile::TempDir,
}

/// A port whose cluster bus port (+10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let port = 20_000 + (rand_u16() % 20_000);
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}

fn rand_u16() -> u16 {
    let id = uuid::Uuid::new_v4();
    u16::from_le_bytes([id.as_bytes()[0], id.as_bytes()[1]])
}

/// `n` distinct free cluster ports.
fn cluster_ports(n: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    while ports.len() < n {
        let p = cluster_port();
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    ports
}

fn cluster_urls(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl RedisCluster {
    async fn start() -> Self {
        Self::start_on(cluster_ports(3)).await
    }

    async fn start_on(ports: Vec<u16>) -> Self {
        Self::start_with(ports, 0, &[]).await
    }

    /// Three masters and three replicas (one each), with AOF, failing over within seconds
    /// of a master's death; returns once every replica is in sync with its master.
    pub(crate) async fn start_replicated() -> Self {
        let quick = ["--cluster-node-timeout", "1000", "--appendonly", "yes"];
        Self::start_with(cluster_ports(6), 1, &quick).await
    }

    /// `ports.len() / (1 + replicas)` masters with `replicas` each, and `extra`
    /// `redis-server` arguments.
    async fn start_with(ports: Vec<u16>, replicas: usize, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let node_dir = |port: u16| {
            let path = dir.path().join(port.to_string());
            std::fs::create_dir_all(&path).unwrap();
            path
        };
        let children = ports
            .iter()
            .map(|port| {
                Command::new("redis-server")
                    .args([
                        "--port",
                        &port.to_string(),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                    ])
                    // The other nodes' slots stay served while one node is down.
                    .args(["--cluster-require-full-coverage", "no"])
                    .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                    .arg(dir.path().join(format!("nodes-{port}.conf")))
                    // A folder per node: each its own AOF.
                    .arg("--dir")
                    .arg(node_dir(*port))
                    .args(extra)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server on PATH")
            })
            .collect();
        let cluster = Self {
            ports,
            children,
            killed: Vec::new(),
            _dir: dir,
        };
        for port in &cluster.ports {
            let url = format!("redis://127.0.0.1:{port}");
            wait_until_answers(&url).await;
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli on PATH");
        assert!(status.success(), "redis-cli --cluster create failed");
        for port in &cluster.ports {
            let url = format!("redis://127.0.0.1:{port}");
            eventually("the cluster to be ok on every node", || async {
                let mut conn = redis_conn(&url).await?;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                info.contains("cluster_state:ok").then_some(())
            })
            .await;
        }
        if replicas > 0 {
            eventually("every replica in sync with its master", || async {
                let mut online = 0;
                for port in &cluster.ports {
                    online += cluster
                        .info(*port, "replication")
                        .await?
                        .matches("state=online")
                        .count();
                }
                (online == cluster.ports.len() / (1 + replicas) * replicas).then_some(())
            })
            .await;
        }
        cluster
    }

    pub(crate) fn urls(&self) -> String {
        cluster_urls(&self.ports)
    }
}

impl RedisCluster {
    /// SIGKILLs node `i`.
    pub(crate) fn kill_node(&mut self, i: usize) {
        let _ = self.children[i].kill();
        let _ = self.children[i].wait();
        self.killed.push(i);
    }

    /// The ports of the nodes not killed.
    pub(crate) fn live_ports(&self) -> Vec<u16> {
        (0..self.ports.len())
            .filter(|i| !self.killed.contains(i))
            .map(|i| self.ports[i])
            .collect()
    }

    /// `INFO <section>` of the node on `port`, while it answers.
    pub(crate) async fn info(&self, port: u16, section: &str) -> Option<String> {
        let mut conn = redis_conn(&format!("redis://127.0.0.1:{port}")).await?;
        let cmd = redis::cmd("INFO").arg(section).clone();
        cmd.query_async(&mut conn).await.ok()
    }

    /// The index of the master serving `key`, when every live node says the same and the
    /// cluster is ok on each of them.
    pub(crate) async fn master_of(&self, key: &str) -> Option<usize> {
        let mut agreed = None;
        for port in self.live_ports() {
            let mut conn = redis_conn(&format!("redis://127.0.0.1:{port}")).await?;
            let ask = |sub: &str| redis::cmd("CLUSTER").arg(sub).clone();
            let info: String = ask("INFO").query_async(&mut conn).await.ok()?;
            let slot: u16 = ask("KEYSLOT").arg(key).query_async(&mut conn).await.ok()?;
            let nodes: String = ask("NODES").query_async(&mut conn).await.ok()?;
            let master = nodes
                .lines()
                .find_map(|line| master_port_serving(line, slot))?;
            let seen = self.ports.iter().position(|p| *p == master)?;
            if !info.contains("cluster_state:ok") || agreed.is_some_and(|a| a != seen) {
                return None;
            }
            agreed = Some(seen);
        }
        agreed
    }
}

/// The port of the node of a `CLUSTER NODES` line, when it is a master not failing and
/// serves `slot`.
fn master_port_serving(line: &str, slot: u16) -> Option<u16> {
    let fields: Vec<&str> = line.split(' ').collect();
    let flags = fields.get(2)?.split(',').collect::<Vec<_>>();
    if !flags.contains(&"master") || flags.iter().any(|f| f.starts_with("fail")) {
        return None;
    }
    let serves = fields.iter().skip(8).any(|range| {
        let (from, to) = range.split_once('-').unwrap_or((range, range));
        matches!((from.parse::<u16>(), to.parse::<u16>()), (Ok(a), Ok(b)) if (a..=b).contains(&slot))
    });
    let address = fields.get(1)?.split('@').next()?;
    serves.then(|| address.rsplit(':').next()?.parse().ok())?
}

/// Settings of an app whose queue is the cluster at `urls`, split over three shards.
pub(crate) fn cluster_vars(
    urls: &str,
    engine: &RedisServer,
    dir: &tempfile::TempDir,
) -> Vec<(String, String)> {
    let mut vars = test_vars(engine, engine, &dir.path().join("users.db"));
    set(&mut vars, "REDIS_URL", urls);
    set(&mut vars, "ENSURE_SHARDS", "3");
    vars
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn the_queue_runs_on_a_redis_cluster_split_over_three_shards() {
    let cluster = RedisCluster::start().await;
    let engine = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let vars = cluster_vars(&cluster.urls(), &engine, &dir);
    let app = Application::build(Config::from_vars(vars).unwrap(), Mode::Serve)
        .await
        .unwrap();
    let address = app.address();
    let stop = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
    let client = reqwest::Client::new();

    let mut request_ids = Vec::new();
    for i in 0..30 {
        let user = format!("cluster-{i}");
        let token = token(&user, &format!("{user}@example.com"));
        let response = client
            .post(format!("http://{address}{ENSURE_PATH}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "request {i}");
        let json: Value = response.json().await.unwrap();
        assert_eq!(json["userId"], user.as_str());
        request_ids.push((token, json["requestId"].as_str().unwrap().to_string()));
    }

    assert_eq!(rows(&dir.path().join("users.db")).len(), 30);
    assert_eq!(engine.entries("stream:exness").await.len(), 30);
    // Each shard has its own hash-tagged stream with its consumer group, and users were
    // spread over all of them (their status records sit beside their shard's stream).
    let nodes: Vec<String> = cluster
        .ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect();
    let mut conn = redis::cluster::ClusterClient::new(nodes)
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    let mut used = std::collections::BTreeSet::new();
    for shard in 0..3 {
        let stream = format!("stream:ensure-user:{{{shard}}}");
        let groups: redis::Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&stream)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            matches!(groups, redis::Value::Array(ref g) if g.len() == 1),
            "{stream}: {groups:?}"
        );
        for (_, request_id) in &request_ids {
            let exists: bool = redis::cmd("EXISTS")
                .arg(format!("{stream}:request:{request_id}"))
                .query_async(&mut conn)
                .await
                .unwrap();
            if exists {
                used.insert(shard);
            }
        }
    }
    assert_eq!(used.len(), 3, "30 users spread over the 3 shards");
    // Request status records live on the user's shard and are found again.
    for (token, request_id) in request_ids.iter().take(5) {
        let status: Value = client
            .get(format!(
                "http://{address}/api/v1/auth/ensure-user/requests/{request_id}"
            ))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(status["state"], "done");
    }
    stop.cancel();
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_cluster_that_is_down_at_start_gets_503_until_it_comes_up() {
    let ports = cluster_ports(3);
    let engine = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let vars = cluster_vars(&cluster_urls(&ports), &engine, &dir);
    // Nothing listens on the cluster's ports yet: the process starts all the same.
    let app = Application::build(Config::from_vars(vars).unwrap(), Mode::Serve)
        .await
        .expect("the process starts without its cluster");
    let address = app.address();
    let stop = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
    let client = reqwest::Client::new();
    let ensure = |user: &str| {
        client
            .post(format!("http://{address}{ENSURE_PATH}"))
            .bearer_auth(token(user, &format!("{user}@example.com")))
            .send()
    };
    assert_eq!(ensure("early").await.unwrap().status(), 503);
    let ready = client.get(format!("http://{address}/readyz")).send().await;
    assert_eq!(ready.unwrap().status(), 503);

    let _cluster = RedisCluster::start_on(ports).await;
    eventually("a 200 once the cluster is up", || async {
        (ensure("later").await.ok()?.status() == 200).then_some(())
    })
    .await;
    stop.cancel();
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn outcomes_still_reach_a_listener_after_a_cluster_node_dies() {
    let mut cluster = RedisCluster::start().await;
    let engine = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut vars = cluster_vars(&cluster.urls(), &engine, &dir);
    set(&mut vars, "ENSURE_WAIT_MS", "1000");
    // A listener and a worker apart: outcomes travel by PUBLISH through the cluster.
    let start = |mode| {
        let vars = vars.clone();
        async move {
            let app = Application::build(Config::from_vars(vars).unwrap(), mode)
                .await
                .unwrap();
            let address = app.address();
            let stop = CancellationToken::new();
            let running = tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
            (address, stop, running)
        }
    };
    let (address, stop_listener, listener) = start(Mode::Listen).await;
    let (_, stop_worker, worker) = start(Mode::Work).await;
    let client = reqwest::Client::new();
    let ensure = |user: String| {
        let request = client
            .post(format!("http://{address}{ENSURE_PATH}"))
            .bearer_auth(token(&user, &format!("{user}@example.com")));
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(ensure("before".into()).await, 200);

    // The node the listener subscribed through (the first of REDIS_URL) dies. Outcomes
    // published while it subscribes again are lost (those clients get 202); after that,
    // users whose shard lives on a node still up are answered 200 again. (Users on the dead
    // node's shard get 503.)
    cluster.kill_node(0);
    let mut n = 0;
    eventually("a 200 through a node still up", || {
        n += 1;
        let answer = ensure(format!("after-{n}"));
        async move {
            let status = answer.await;
            assert!([200, 202, 503].contains(&status), "{status}");
            (status == 200).then_some(())
        }
    })
    .await;
    stop_listener.cancel();
    stop_worker.cancel();
    listener.await.unwrap().unwrap();
    worker.await.unwrap().unwrap();
}
