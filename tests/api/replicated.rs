//! A replicated queue Redis for the failover tests: a primary with AOF, two replicas of it
//! and three Sentinels watching them (quorum 2), every process on a free port of its own and
//! killed when dropped. Nothing here sleeps to synchronise: every wait polls a condition.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::*;

/// How long a failover may take before the harness gives up. Sentinel needs its
/// `down-after-milliseconds` (1 s) and an election, usually a few seconds in all; a split
/// vote makes it wait twice `failover-timeout` (20 s) before the next election.
pub const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);

/// One `redis-server` or `redis-sentinel` process.
struct Instance {
    port: u16,
    child: Option<Child>,
}

impl Instance {
    /// SIGKILL, and waits until it is gone.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

fn url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

/// `n` distinct free ports.
fn free_ports(n: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    while ports.len() < n {
        let port = free_port();
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports
}

/// The queue's Redis as Sentinel serves it.
pub struct ReplicatedRedis {
    name: String,
    /// The first primary, then its two replicas (any of them may be primary later).
    servers: Vec<Instance>,
    sentinels: Vec<Instance>,
    dir: tempfile::TempDir,
}

impl ReplicatedRedis {
    /// Starts the primary, its replicas and the Sentinels monitoring it as `name`, and
    /// returns once the replicas are in sync and every Sentinel knows both replicas and the
    /// two other Sentinels.
    pub async fn start(name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(6);
        let (server_ports, sentinel_ports) = ports.split_at(3);
        let primary = server_ports[0];
        let mut servers = Vec::new();
        for (i, &port) in server_ports.iter().enumerate() {
            servers.push(spawn_server(dir.path(), port, (i > 0).then_some(primary)));
            wait_until_answers(&url(port)).await;
        }
        let mut redis = Self {
            name: name.to_string(),
            servers,
            sentinels: Vec::new(),
            dir,
        };
        redis.wait_for_replicas(primary, 2).await;
        // Started once the replicas are online, a Sentinel finds them in its first INFO.
        for &port in sentinel_ports {
            let sentinel = spawn_sentinel(redis.dir.path(), port, name, primary);
            redis.sentinels.push(sentinel);
            wait_until_answers(&url(port)).await;
        }
        for &port in sentinel_ports {
            redis.wait_until_sentinel_knows_everyone(port).await;
        }
        redis
    }

    /// The `REDIS_SENTINELS` value: `127.0.0.1:<port>,…`.
    pub fn sentinels_setting(&self) -> String {
        self.live_sentinels()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Points `vars` at the Sentinels. `REDIS_URL` names a port where nothing listens, so
    /// a process that used its host instead of asking the Sentinels reaches nothing.
    pub fn vars(&self, vars: &mut Vec<(String, String)>) {
        set(vars, "REDIS_SENTINELS", &self.sentinels_setting());
        set(vars, "REDIS_SENTINEL_MASTER", &self.name);
        set(vars, "REDIS_URL", "redis://127.0.0.1:1");
    }

    /// The same for the Engine's Redis: `ENGINE_REDIS_SENTINELS`,
    /// `ENGINE_REDIS_SENTINEL_MASTER`, and `ENGINE_REDIS_URL` where nothing listens.
    pub fn engine_vars(&self, vars: &mut Vec<(String, String)>) {
        set(vars, "ENGINE_REDIS_SENTINELS", &self.sentinels_setting());
        set(vars, "ENGINE_REDIS_SENTINEL_MASTER", &self.name);
        set(vars, "ENGINE_REDIS_URL", "redis://127.0.0.1:1");
    }

    /// The primary's port as the first answering Sentinel names it.
    pub async fn primary_port(&self) -> u16 {
        for port in self.live_sentinels() {
            if let Some(primary) = self.primary_named_by(port).await {
                return primary;
            }
        }
        panic!("no Sentinel names a primary for {}", self.name);
    }

    /// A connection to the current primary that waits up to 5 s for an answer (the
    /// client's default, 500 ms, is shorter than a `WAIT` may take).
    pub async fn primary_conn(&self) -> redis::aio::MultiplexedConnection {
        let port = self.primary_port().await;
        let mut conn = redis_conn(&url(port)).await.expect("the primary answers");
        conn.set_response_timeout(Duration::from_secs(5));
        conn
    }

    /// Waits until both replicas hold everything the primary has taken so far (a write of
    /// our own, then `WAIT 2`: replication is in order).
    pub async fn sync_replicas(&self) {
        let mut conn = self.primary_conn().await;
        let _: () = redis::cmd("SET")
            .arg("harness:sync")
            .arg(uuid::Uuid::new_v4().to_string())
            .query_async(&mut conn)
            .await
            .unwrap();
        let confirmed: u64 = redis::cmd("WAIT")
            .arg(2)
            .arg(5000)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(confirmed, 2, "both replicas confirm");
    }

    /// Every entry of `stream` on the current primary, oldest first.
    pub async fn entries(&self, stream: &str) -> Vec<ensure_user::connection::RawEntry> {
        stream_entries(&mut self.primary_conn().await, stream).await
    }

    /// SIGKILLs the current primary (it is not restarted); returns its port.
    pub async fn kill_primary(&mut self) -> u16 {
        let port = self.primary_port().await;
        let server = self.servers.iter_mut().find(|s| s.port == port);
        server.expect("the primary is one of ours").kill();
        port
    }

    /// Waits until every Sentinel names a primary other than `old_port` (the same one) and
    /// that server answers `ROLE` as a master; returns its port.
    pub async fn wait_for_new_primary(&self, old_port: u16) -> u16 {
        within(
            FAILOVER_DEADLINE,
            "Sentinel to promote a replica",
            || async {
                let mut named = Vec::new();
                for port in self.live_sentinels() {
                    named.push(self.primary_named_by(port).await?);
                }
                let new = named[0];
                if new == old_port || named.iter().any(|&p| p != new) {
                    return None;
                }
                (role(new).await?.as_str() == "master").then_some(new)
            },
        )
        .await
    }

    /// Waits until the server on `port` has at least `n` replicas online.
    pub async fn wait_for_replicas(&self, port: u16, n: usize) {
        within(
            FAILOVER_DEADLINE,
            &format!("{n} replicas online at {port}"),
            || async { (online_replicas(port).await? >= n).then_some(()) },
        )
        .await;
    }

    /// Makes the current primary stop feeding its replicas, so they fall behind: the
    /// `default` user (the replicas' and everyone's) loses `PSYNC`, `SYNC` and `REPLCONF`,
    /// so their reconnections are refused (`NOPERM`), and their links are cut. Clients keep
    /// writing; `WAIT` answers 0. Returns once the primary counts no replica.
    pub async fn cut_replication(&self) {
        let port = self.primary_port().await;
        let mut conn = redis_conn(&url(port)).await.expect("the primary answers");
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg("-psync")
            .arg("-replconf")
            .arg("-sync")
            .query_async(&mut conn)
            .await
            .unwrap();
        let _: redis::Value = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("replica")
            .query_async(&mut conn)
            .await
            .unwrap();
        within(DEADLINE, "the primary to count no replica", || async {
            (connected_replicas(port).await? == 0).then_some(())
        })
        .await;
    }

    /// The last lines of every Sentinel's log, for a failure message.
    pub fn sentinel_logs(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| {
                let log = std::fs::read_to_string(log_path(self.dir.path(), s.port));
                let log = log.unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("sentinel {}:\n{}", s.port, tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn live_sentinels(&self) -> impl Iterator<Item = u16> + '_ {
        self.sentinels
            .iter()
            .filter(|s| s.child.is_some())
            .map(|s| s.port)
    }

    async fn primary_named_by(&self, sentinel: u16) -> Option<u16> {
        let mut conn = redis_conn(&url(sentinel)).await?;
        let addr: Vec<String> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.name)
            .query_async(&mut conn)
            .await
            .ok()?;
        addr.get(1)?.parse().ok()
    }

    async fn wait_until_sentinel_knows_everyone(&self, sentinel: u16) {
        let what = format!("Sentinel {sentinel} to know 2 replicas and 2 Sentinels");
        within(DEADLINE, &what, || async {
            let mut conn = redis_conn(&url(sentinel)).await?;
            let replicas = sentinel_list(&mut conn, "REPLICAS", &self.name).await?;
            let sentinels = sentinel_list(&mut conn, "SENTINELS", &self.name).await?;
            let healthy = |i: &Vec<String>| !field(i, "flags").is_some_and(|f| f.contains("down"));
            let ok = replicas.iter().filter(|r| healthy(r)).count() == 2
                && sentinels.iter().filter(|s| healthy(s)).count() == 2;
            ok.then_some(())
        })
        .await;
    }
}

/// `SENTINEL <sub> <name>`: one flat `name, value, …` description per instance.
async fn sentinel_list(
    conn: &mut redis::aio::MultiplexedConnection,
    sub: &str,
    name: &str,
) -> Option<Vec<Vec<String>>> {
    redis::cmd("SENTINEL")
        .arg(sub)
        .arg(name)
        .query_async(conn)
        .await
        .ok()
}

/// The value of `name` in a Sentinel's flat `name, value, …` description of an instance.
fn field<'a>(instance: &'a [String], name: &str) -> Option<&'a str> {
    instance
        .chunks(2)
        .find(|kv| kv[0] == name)
        .and_then(|kv| kv.get(1))
        .map(String::as_str)
}

/// `INFO replication` of the server on `port`.
async fn replication_info(port: u16) -> Option<String> {
    let mut conn = redis_conn(&url(port)).await?;
    redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut conn)
        .await
        .ok()
}

/// `connected_slaves` of the server on `port`.
async fn connected_replicas(port: u16) -> Option<usize> {
    let info = replication_info(port).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("connected_slaves:"))?
        .trim()
        .parse()
        .ok()
}

/// Replicas the server on `port` lists with `state=online`.
async fn online_replicas(port: u16) -> Option<usize> {
    let info = replication_info(port).await?;
    Some(
        info.lines()
            .filter(|l| l.starts_with("slave") && l.contains("state=online"))
            .count(),
    )
}

/// The first element of `ROLE` (`master`, `slave`) of the server on `port`.
async fn role(port: u16) -> Option<String> {
    let mut conn = redis_conn(&url(port)).await?;
    let role: redis::Value = redis::cmd("ROLE").query_async(&mut conn).await.ok()?;
    let redis::Value::Array(parts) = role else {
        return None;
    };
    redis::from_redis_value_ref(parts.first()?).ok()
}

fn log_path(dir: &Path, port: u16) -> std::path::PathBuf {
    dir.join(format!("{port}.log"))
}

/// A `redis-server` with AOF fsynced on every write, a replica of `primary` when given.
fn spawn_server(dir: &Path, port: u16, primary: Option<u16>) -> Instance {
    let data = dir.join(port.to_string());
    std::fs::create_dir_all(&data).unwrap();
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ])
        // Redis 7.0 waits 5 s for more replicas before a diskless full sync by default.
        .args(["--repl-diskless-sync-delay", "0"])
        .arg("--dir")
        .arg(&data)
        .arg("--logfile")
        .arg(log_path(dir, port));
    if let Some(primary) = primary {
        command.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
    }
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be on PATH (scripts/install-deps installs it)");
    Instance {
        port,
        child: Some(child),
    }
}

/// A `redis-sentinel` monitoring `primary` as `name`, with a config file of its own (Sentinel
/// rewrites it as it learns, so it must be writable).
fn spawn_sentinel(dir: &Path, port: u16, name: &str, primary: u16) -> Instance {
    let config = dir.join(format!("sentinel-{port}.conf"));
    let text = format!(
        "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {log}\n\
         sentinel resolve-hostnames no\n\
         sentinel monitor {name} 127.0.0.1 {primary} 2\n\
         sentinel down-after-milliseconds {name} 1000\n\
         sentinel failover-timeout {name} 10000\n\
         sentinel parallel-syncs {name} 2\n",
        dir = dir.display(),
        log = log_path(dir, port).display(),
    );
    std::fs::write(&config, text).unwrap();
    let child = Command::new("redis-sentinel")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-sentinel must be on PATH (scripts/install-deps installs it)");
    Instance {
        port,
        child: Some(child),
    }
}

/// `SET key value` on the current primary, confirmed by `WAIT` on both replicas.
async fn set_replicated(redis: &ReplicatedRedis, key: &str, value: &str) {
    let mut conn = redis.primary_conn().await;
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query_async(&mut conn)
        .await
        .unwrap();
    redis.sync_replicas().await;
}

/// `GET key` on the server on `port`.
async fn get(port: u16, key: &str) -> Option<String> {
    let mut conn = redis_conn(&url(port)).await.expect("the server answers");
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// The harness itself, no service: a SIGKILLed primary is replaced by a replica holding
/// what the primary confirmed, the Sentinels agree on it, and the other replica follows it.
#[tokio::test]
async fn sentinels_promote_a_replica_when_the_primary_is_killed() {
    let mut redis = ReplicatedRedis::start("harness").await;
    set_replicated(&redis, "before-the-kill", "kept").await;

    let killed_at = Instant::now();
    let old = redis.kill_primary().await;
    let new = redis.wait_for_new_primary(old).await;
    let failover = killed_at.elapsed();
    redis.wait_for_replicas(new, 1).await;
    let followed = killed_at.elapsed();

    eprintln!(
        "failover: {old} -> {new} in {:.2} s (every Sentinel agrees, ROLE master); \
         the other replica online again after {:.2} s",
        failover.as_secs_f64(),
        followed.as_secs_f64()
    );
    assert_ne!(new, old);
    assert_eq!(get(new, "before-the-kill").await.as_deref(), Some("kept"));
    assert_eq!(redis.primary_port().await, new);
}

/// The harness's replication cut: once cut, the primary's writes are confirmed by no
/// replica (their reconnections are refused, so `WAIT` answers 0 over 1.5 s, longer than
/// a replica's 1 s reconnection period), and the replica promoted after the kill lacks them.
#[tokio::test]
async fn a_cut_primary_confirms_nothing_and_its_successor_lacks_the_writes() {
    let mut redis = ReplicatedRedis::start("harness-cut").await;
    set_replicated(&redis, "before-the-cut", "kept").await;

    redis.cut_replication().await;
    let mut conn = redis.primary_conn().await;
    let _: () = redis::cmd("SET")
        .arg("after-the-cut")
        .arg("lost")
        .query_async(&mut conn)
        .await
        .unwrap();
    let confirmed: u64 = redis::cmd("WAIT")
        .arg(1)
        .arg(1500)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(confirmed, 0, "no replica may confirm a write after the cut");

    let old = redis.kill_primary().await;
    let new = redis.wait_for_new_primary(old).await;
    assert_eq!(get(new, "before-the-cut").await.as_deref(), Some("kept"));
    assert_eq!(get(new, "after-the-cut").await, None);
}
