//! Three (or more) `switchboard serve` processes sharing one Redis or a
//! Redis Cluster, for the cluster tests: each node its own config file,
//! ports, node id and admin API; readiness read from Redis itself (the
//! node is in the live set and subscribed to its channel).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use switchboard::client::Client;
use switchboard::proto::frame::{Frame, RoomOp};

const SB: &str = env!("CARGO_BIN_EXE_switchboard");

/// Where the nodes find Redis.
#[derive(Clone, Debug)]
pub enum Redis {
    One(String),
    Cluster(Vec<String>),
}

impl Redis {
    fn toml(&self) -> String {
        match self {
            Redis::One(u) => format!("redis = {u:?}"),
            Redis::Cluster(v) => format!("redis = {v:?}"),
        }
    }

    /// Runs one command on Redis (on a cluster: routed by its key).
    pub fn cmd(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        match self {
            Redis::One(u) => {
                let mut conn = redis::Client::open(u.as_str())?.get_connection()?;
                c.query(&mut conn)
            }
            Redis::Cluster(v) => {
                let mut conn = redis::cluster::ClusterClient::new(v.clone())?.get_connection()?;
                c.query(&mut conn)
            }
        }
    }

    /// The nodes in `user`'s presence hash, by name (the `/<pid>` of each
    /// field left out).
    pub fn presence(&self, user: &str) -> Vec<String> {
        let key = switchboard::cluster::node::presence_key(user);
        match self.cmd(&["HKEYS", &key]) {
            Ok(v) => {
                let fields: Vec<String> = redis::from_redis_value(v).unwrap_or_default();
                let mut nodes: Vec<String> =
                    fields.iter().map(|f| f.rsplit_once('/').map_or(f.as_str(), |(n, _)| n).to_string()).collect();
                nodes.sort();
                nodes
            }
            Err(_) => Vec::new(),
        }
    }

    /// Subscribers of `channel` over every Redis node (classic pub/sub
    /// counts per node in a cluster).
    pub fn subscribers(&self, channel: &str) -> i64 {
        let urls = match self {
            Redis::One(u) => vec![u.clone()],
            Redis::Cluster(v) => v.clone(),
        };
        let mut total = 0;
        for u in urls {
            let Ok(mut conn) = redis::Client::open(u.as_str()).and_then(|c| c.get_connection()) else { continue };
            let r: redis::RedisResult<(String, i64)> = redis::cmd("PUBSUB").arg("NUMSUB").arg(channel).query(&mut conn);
            if let Ok((_, n)) = r {
                total += n;
            }
        }
        total
    }

    /// Whether `node` is in the live set.
    pub fn is_live(&self, node: &str) -> bool {
        matches!(self.cmd(&["ZSCORE", "sb:nodes", node]), Ok(redis::Value::BulkString(_)) | Ok(redis::Value::Double(_)))
    }
}

/// Settings of a test node besides Redis.
#[derive(Clone, Debug)]
pub struct NodeOpts {
    /// `store.kind`: "none" or "redis".
    pub store: &'static str,
    pub heartbeat_ms: u64,
    pub node_ttl_ms: u64,
    pub command_timeout_ms: u64,
    /// Extra TOML appended to the file.
    pub extra: String,
    /// Extra lines in its `[store]` table.
    pub store_extra: &'static str,
    /// Wait at start until the node has joined (false: Redis is down).
    pub wait_join: bool,
}

impl Default for NodeOpts {
    fn default() -> Self {
        NodeOpts {
            store: "none",
            heartbeat_ms: 200,
            node_ttl_ms: 600,
            command_timeout_ms: 1000,
            extra: String::new(),
            store_extra: "",
            wait_join: true,
        }
    }
}

/// One `switchboard serve` process in the cluster.
pub struct Node {
    /// The configured `node_id`.
    pub id: String,
    /// The id in Redis: `<node_id>/<pid>`.
    pub redis_id: String,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    child: Option<Child>,
    wait_join: bool,
    dir: PathBuf,
    config: PathBuf,
}

impl Node {
    /// Starts node `id`. Its ports are picked free, but another test may
    /// take one before the node binds it: a node that exits at start is
    /// tried again on new ports.
    pub fn start(id: &str, redis: &Redis, opts: &NodeOpts) -> Node {
        super::arm_watchdog();
        for _ in 0..4 {
            if let Some(n) = Self::try_start(id, redis, opts) {
                return n;
            }
        }
        panic!("node {id} exited at start four times");
    }

    fn try_start(id: &str, redis: &Redis, opts: &NodeOpts) -> Option<Node> {
        let dir = std::env::temp_dir().join(format!("sb-cluster-{}-{id}-{}", std::process::id(), super::free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let (port, admin) = (super::free_port(), super::free_port());
        let config = dir.join("switchboard.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nworkers = 2\npin_workers = false\n\
                 [websocket]\nlisten = \"\"\n\
                 [auth]\njwt_secret = {secret:?}\n\
                 [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
                 [store]\nkind = {store:?}\n{store_extra}\n\
                 [cluster]\n{redis}\nnode_id = {id:?}\nheartbeat_ms = {hb}\nnode_ttl_ms = {ttl}\ncommand_timeout_ms = {ct}\n{extra}\n",
                secret = super::SECRET,
                store = opts.store,
                store_extra = opts.store_extra,
                redis = redis.toml(),
                hb = opts.heartbeat_ms,
                ttl = opts.node_ttl_ms,
                ct = opts.command_timeout_ms,
                extra = opts.extra,
            ),
        )
        .unwrap();
        let mut n = Node {
            id: id.to_string(),
            redis_id: String::new(),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            admin: format!("127.0.0.1:{admin}").parse().unwrap(),
            child: None,
            wait_join: opts.wait_join,
            dir,
            config,
        };
        n.spawn(redis).then_some(n)
    }

    /// Runs the node and waits until it has joined; false if it exited
    /// at start.
    fn spawn(&mut self, redis: &Redis) -> bool {
        let child = Command::new(SB)
            .args(["serve", "--log", &std::env::var("SB_NODE_LOG").unwrap_or_else(|_| "warn".into())])
            .arg("--config")
            .arg(&self.config)
            .env_remove("SWITCHBOARD_JWT_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("switchboard serve starts");
        self.redis_id = format!("{}/{}", self.id, child.id());
        self.child = Some(child);
        let addr = self.addr;
        let mut exited = false;
        let up = super::wait_until(Duration::from_secs(15), || {
            if let Some(Ok(Some(s))) = self.child.as_mut().map(|c| c.try_wait()) {
                eprintln!("node {} exited at start: {s}", self.id);
                exited = true;
                return true;
            }
            self.child.as_ref().is_some_and(|c| super::listens(c.id(), addr))
        });
        if exited {
            self.child = None;
            return false;
        }
        assert!(up, "node {} did not listen on {addr}", self.id);
        if self.wait_join {
            self.wait_joined(redis);
        }
        true
    }

    /// Waits until the node is in the live set and subscribed to its channel.
    pub fn wait_joined(&self, redis: &Redis) {
        let channel = format!("sb:n:{}", self.redis_id);
        let joined = super::wait_until(Duration::from_secs(15), || {
            redis.is_live(&self.redis_id) && redis.subscribers(&channel) >= 1
        });
        assert!(joined, "node {} did not join the cluster (live set and its channel)", self.id);
    }

    /// SIGKILL: no clean-up of any kind.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` to the node's process (SIGSTOP, SIGCONT: a stall).
    pub fn signal(&self, signal: i32) {
        let pid = self.child.as_ref().expect("the node runs").id() as i32;
        // SAFETY: kill(2) on a child of this process that has not been waited for.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "signal {signal} to node {}", self.id);
    }

    /// Starts the node again with the same config and ports.
    pub fn restart(&mut self, redis: &Redis) {
        self.kill();
        assert!(self.spawn(redis), "node {} exited at restart", self.id);
    }

    /// A client logged in as `user` on this node (with `device`: for
    /// reliable delivery, resuming after `last_seq`).
    pub fn login(&self, user: &str, device: Option<(&str, u64)>) -> Client {
        let mut c = Client::connect_timeout(&self.addr, Duration::from_secs(5)).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let token = super::token(user);
        match device {
            Some((d, last)) => c.login_device(user, &token, d, last).expect("login"),
            None => c.login(user, &token).expect("login"),
        };
        c
    }

    /// One admin API request with a JSON body: (status, body).
    pub fn api(&self, path: &str, body: &str) -> (u16, String) {
        super::http(self.admin, "POST", path, body.as_bytes(), None).expect("admin API answers")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The next PUSH or ROOM_MSG payload (PINGs answered and a publisher's
/// ROOM_ACK skipped on the way), as text, with the room ("" for a PUSH).
pub fn next_message(c: &mut Client) -> (String, String) {
    loop {
        let f = c.recv_skipping_pings().expect("a frame arrives");
        return match f.frame() {
            Frame::Push { payload, .. } => (String::new(), String::from_utf8_lossy(payload).into_owned()),
            Frame::RoomMsg { room, payload, .. } => (room.to_string(), String::from_utf8_lossy(payload).into_owned()),
            Frame::RoomAck { op: RoomOp::Published, .. } => continue,
            other => panic!("expected PUSH or ROOM_MSG, got {other:?}"),
        };
    }
}
