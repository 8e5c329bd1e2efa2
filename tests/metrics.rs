//! `GET /metrics` over real HTTP, read by a Prometheus text parser this
//! project did not write: the Python client's
//! (`prometheus_client.parser.text_string_to_metric_families`, run by
//! `tests/interop/prom_parse.py` in `$SWITCHBOARD_PYTHON`, which
//! `scripts/test.sh` gives the `prometheus_client` package). The test
//! drives traffic between two scrapes and checks that the counters moved by
//! exactly what it did; that a cluster node (on a real `redis-server`
//! from `switchboard::redis_proc`) exposes the `switchboard_cluster_*`
//! families and a single node none; then that every metric the Grafana
//! dashboard and the alert rules in `tuning/` name is one a server exposes,
//! and that Prometheus's own `promtool` accepts the rules and passes their
//! unit tests (`tuning/prometheus-alerts.test.yml`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::interop::python;
use common::*;
use switchboard::client::admin_request;
use switchboard::proto::frame::Frame;
use switchboard::redis_proc::RedisServer;
use switchboard::Server;

const TOKEN: &str = "0123456789abcdef-metrics";

/// A parsed scrape: each sample's value by its name and labels.
struct Scrape {
    samples: BTreeMap<(String, BTreeMap<String, String>), f64>,
    families: BTreeMap<String, String>,
}

impl Scrape {
    /// The sum of the samples called `name` whose labels include `with`.
    fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|((n, labels), _)| {
                n == name && with.iter().all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| *v)
            .collect();
        assert!(!found.is_empty(), "no sample {name} {with:?} in the scrape");
        found.iter().sum()
    }

    fn names(&self) -> BTreeSet<String> {
        self.samples.keys().map(|(n, _)| n.clone()).collect()
    }
}

/// Scrapes `/metrics` and parses it with the Python client's parser.
fn scrape(admin: SocketAddr) -> Scrape {
    let (status, body) = admin_request(admin, "GET", "/metrics", b"", Some(TOKEN)).expect("scrape");
    assert_eq!(status, 200, "{body}");
    let py = python();
    let mut child = Command::new(&py)
        .arg(common::interop::interop_dir().join("prom_parse.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {py} ({e}): run scripts/test.sh, which installs python3"));
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the scrape (the Python package prometheus_client is needed in {py}: \
         scripts/test.sh installs it, or `{py} -m pip install prometheus_client`):\n{}\n--- scrape ---\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    let families: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut s = Scrape { samples: BTreeMap::new(), families: BTreeMap::new() };
    for f in &families {
        s.families.insert(f["name"].as_str().unwrap().into(), f["type"].as_str().unwrap().into());
        for sample in f["samples"].as_array().unwrap() {
            let name = sample[0].as_str().unwrap().to_string();
            let labels = sample[1]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            let value = sample[2].as_f64().unwrap_or_else(|| panic!("{name}: not a number: {}", sample[2]));
            s.samples.insert((name, labels), value);
        }
    }
    s
}

fn server() -> Server {
    let mut cfg = config();
    cfg.admin.listen = "127.0.0.1:0".into();
    cfg.admin.token = Some(TOKEN.into());
    cfg.websocket.listen = "127.0.0.1:0".into();
    start(cfg)
}

/// A server with the default store kind, on disk in a fresh `dir` (the
/// tests' `config()` keeps inboxes in RAM), holding `max_bytes` at most.
fn disk_server(dir: &std::path::Path, max_bytes: u64) -> Server {
    let _ = std::fs::remove_dir_all(dir);
    let mut cfg = config();
    cfg.admin.listen = "127.0.0.1:0".into();
    cfg.admin.token = Some(TOKEN.into());
    cfg.store.kind = switchboard::config::StoreKind::Disk;
    cfg.store.path = dir.to_path_buf();
    cfg.store.max_bytes = max_bytes;
    start(cfg)
}

#[test]
fn counters_move_as_traffic_is_driven() {
    let server = server();
    let h = server.handle();
    let admin = server.admin_addr().unwrap();
    let ws_addr = server.ws_addr().unwrap();

    // /metrics needs the admin token, like /stats.
    assert_eq!(admin_request(admin, "GET", "/metrics", b"", None).unwrap().0, 401);
    assert_eq!(admin_request(admin, "POST", "/metrics", b"", Some(TOKEN)).unwrap().0, 405);
    let (status, body) = admin_request(admin, "GET", "/metrics", b"", Some(TOKEN)).unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("# TYPE switchboard_connections gauge"), "{body}");

    let before = scrape(admin);
    assert_eq!(before.families.get("switchboard_logins").map(String::as_str), Some("counter"));
    assert_eq!(before.families.get("switchboard_push_to_written_seconds").map(String::as_str), Some("histogram"));
    assert_eq!(before.sum("switchboard_connections", &[]), 0.0);

    // Two raw TCP connections and one WebSocket connection, logged in.
    let (mut alice, _) = login(server.local_addr(), "alice");
    let (_bob, _) = login(server.local_addr(), "bob");
    let _carol = ws_login_query(ws_addr, "carol");
    // A refused login (a token signed with another secret) and a protocol
    // error (a frame with protocol version 9: CLOSE 4000).
    let mut mallory = connect(server.local_addr());
    let forged = switchboard::JwtHs256::new("another-secret").mint("mallory", unix_now() + 60);
    mallory.send_frame(&Frame::Login { user: "mallory", token: forged.as_bytes(), device: None, last_seq: 0 }).unwrap();
    assert!(matches!(mallory.recv().unwrap().frame(), Frame::LoginError { code: 2, .. }));
    let mut bad = connect(server.local_addr());
    bad.send_raw(&[0, 0, 0, 2, 9, 0x04]).unwrap();
    assert_eq!(bad.recv_close_code().unwrap(), Some(switchboard::CloseCode::UnsupportedVersion as u16));

    // Three pushes to alice through the handle, one stored (memory store).
    let mid = scrape(admin);
    for i in 0..3 {
        assert_eq!(h.push_to_user("alice", format!("push {i}")).unwrap().connections, 1);
        assert_eq!(expect_push(&mut alice).2, format!("push {i}").as_bytes());
    }
    let receipt = h.push_reliable("alice", "kept", 0).unwrap().wait().unwrap();
    assert_eq!(receipt.connections, 1);
    // The receipt comes when the notice is queued for alice's worker; the
    // worker writes (and counts) it after.
    assert_eq!(expect_push(&mut alice).2, b"kept");
    assert!(wait_until(Duration::from_secs(5), || {
        let s = h.stats();
        s.logged_in == 3 && s.login_failures == 1 && s.protocol_errors == 1
    }));

    let push_deliveries = |m: &Scrape| m.sum("switchboard_deliveries_total", &[("kind", "push")]);
    let mut after = scrape(admin);
    let counted = wait_until(Duration::from_secs(5), || {
        after = scrape(admin);
        push_deliveries(&after) - push_deliveries(&before) >= 4.0
    });
    assert!(counted, "the four PUSH deliveries are counted once written");
    let moved = |name: &str, with: &[(&str, &str)]| after.sum(name, with) - before.sum(name, with);

    assert_eq!(moved("switchboard_logins_total", &[]), 3.0);
    assert_eq!(moved("switchboard_login_failures_total", &[("reason", "bad_signature")]), 1.0);
    assert_eq!(moved("switchboard_login_failures_total", &[]), 1.0);
    assert_eq!(moved("switchboard_protocol_errors_total", &[("code", "4000")]), 1.0);
    assert_eq!(moved("switchboard_protocol_errors_total", &[]), 1.0);
    // Alice's, bob's and mallory's LOGIN frames, and carol's from her URL.
    assert_eq!(moved("switchboard_messages_in_total", &[("kind", "login")]), 4.0);
    // Alice's and bob's sockets are raw, carol's is WebSocket; mallory's and
    // the bad one may still be closing.
    assert_eq!(after.sum("switchboard_logged_in_connections", &[]), 3.0);
    assert!(after.sum("switchboard_connections_by_transport", &[("transport", "raw")]) >= 2.0);
    assert_eq!(after.sum("switchboard_connections_by_transport", &[("transport", "websocket")]), 1.0);
    // Three live pushes, and the stored message as a live PUSH (alice has
    // no device id), all to one connection.
    assert_eq!(moved("switchboard_deliveries_total", &[("kind", "push")]), 4.0);
    assert!(moved("switchboard_sent_bytes_total", &[]) >= 4.0 * 10.0, "four PUSH frames at least");
    assert!(moved("switchboard_received_bytes_total", &[]) > 0.0);
    // Each of the four was a write of its own (the three from this thread,
    // which is no worker, used to go uncounted).
    let since_mid = |name: &str| after.sum(name, &[]) - mid.sum(name, &[]);
    assert!(since_mid("switchboard_writes_total") >= 4.0, "{} writes", since_mid("switchboard_writes_total"));
    assert!(since_mid("switchboard_frames_out_total") >= 4.0);
    // The three handle pushes were written at once: each one is timed.
    assert!(moved("switchboard_push_to_written_seconds_count", &[]) >= 3.0);
    assert_eq!(moved("switchboard_store_appends_total", &[]), 1.0);
    assert!(moved("switchboard_store_syncs_total", &[]) >= 1.0);
    assert!(moved("switchboard_store_commit_seconds_count", &[]) >= 1.0);
    // Every store request is timed in the queue: the append at least.
    assert!(moved("switchboard_store_queue_wait_seconds_count", &[]) >= 1.0);
    assert_eq!(after.sum("switchboard_store_pending_messages", &[]), 1.0);
    assert_eq!(after.sum("switchboard_mailbox_rejections_total", &[]), 0.0);
    assert!(after.sum("process_resident_memory_bytes", &[]) > 1e6);
    // Linux 6.2 and later count open descriptors in /proc/self/fd's size;
    // an older kernel reports 0 and the server leaves the metric out.
    if std::fs::metadata("/proc/self/fd").unwrap().len() > 0 {
        assert!(after.sum("process_open_fds", &[]) >= 5.0);
    }
    // Per-worker labels, never per-user ones.
    for (name, labels) in after.samples.keys() {
        for k in labels.keys() {
            assert!(["worker", "transport", "reason", "kind", "code", "le"].contains(&k.as_str()), "{name}: {k}");
        }
    }

    // Every histogram's buckets are cumulative and end at +Inf = count.
    for h in [
        "switchboard_push_to_written_seconds",
        "switchboard_store_commit_seconds",
        "switchboard_store_queue_wait_seconds",
    ] {
        let inf = after.sum(&format!("{h}_bucket"), &[("le", "+Inf")]);
        assert_eq!(inf, after.sum(&format!("{h}_count"), &[]), "{h}");
    }

    // Closing a WebSocket connection takes it off its transport's gauge.
    drop(_carol);
    assert!(wait_until(Duration::from_secs(5), || h.logged_in_count() == 2));
    assert!(wait_until(Duration::from_secs(5), || {
        scrape(admin).sum("switchboard_connections_by_transport", &[("transport", "websocket")]) == 0.0
    }));
    server.shutdown().unwrap();
}

/// A device that stops acknowledging (an app frozen in the background, a
/// path that died without a close) is closed with 4007 after
/// `delivery.max_retransmits` retransmits; operators saw only `closed`
/// move (an outside review). It is counted on its own.
#[test]
fn an_ack_timeout_close_is_counted() {
    let mut cfg = config();
    cfg.admin.listen = "127.0.0.1:0".into();
    cfg.admin.token = Some(TOKEN.into());
    cfg.delivery.max_retransmits = 2;
    cfg.delivery.ack_timeout_ms = 300;
    let server = start(cfg);
    let (addr, admin) = (server.local_addr(), server.admin_addr().unwrap());
    assert_eq!(scrape(admin).sum("switchboard_ack_timeout_closes_total", &[]), 0.0);
    let (mut alice, _) = login(addr, "alice");
    let mut phone = switchboard::client::Client::connect(addr).unwrap();
    phone.login_device("bob", &token("bob"), "phone", 0).unwrap();
    alice.send(1, "bob", b"never acknowledged").unwrap();
    phone.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let code = loop {
        match phone.recv_skipping_pings().expect("closed with a CLOSE frame first").frame() {
            Frame::Close { code, .. } => break code,
            _ => continue,
        }
    };
    assert_eq!(code, switchboard::CloseCode::AckTimeout as u16);
    assert!(
        wait_until(Duration::from_secs(5), || scrape(admin).sum("switchboard_ack_timeout_closes_total", &[]) == 1.0)
    );
    assert!(scrape(admin).sum("switchboard_retransmits_total", &[]) >= 2.0);
    server.shutdown().unwrap();
}

/// A device's new login closes its old connection with 4008 (PROTOCOL.md
/// 15.2), and operators see how often: two clients fighting over one
/// device id would otherwise show only as `closed` moving.
#[test]
fn a_connection_replaced_by_its_devices_new_login_is_counted() {
    let mut cfg = config();
    cfg.admin.listen = "127.0.0.1:0".into();
    cfg.admin.token = Some(TOKEN.into());
    let server = start(cfg);
    let (addr, admin) = (server.local_addr(), server.admin_addr().unwrap());
    assert_eq!(scrape(admin).sum("switchboard_replaced_closes_total", &[]), 0.0);
    let mut old = switchboard::client::Client::connect(addr).unwrap();
    old.login_device("bob", &token("bob"), "phone", 0).unwrap();
    let mut new = switchboard::client::Client::connect(addr).unwrap();
    new.login_device("bob", &token("bob"), "phone", 0).unwrap();
    old.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(old.recv_close_code().unwrap(), Some(switchboard::CloseCode::Replaced as u16));
    assert!(wait_until(Duration::from_secs(5), || scrape(admin).sum("switchboard_replaced_closes_total", &[]) == 1.0));
    server.shutdown().unwrap();
}

/// Metric names in a dashboard or rule file: every `switchboard_…` and
/// `process_…` identifier.
fn referenced_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for prefix in ["switchboard_", "process_"] {
        let mut rest = text;
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().next_back();
            let tail = &rest[i..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                names.insert(tail[..end].to_string());
            }
            rest = &tail[end..];
        }
    }
    names
}

/// A node of a cluster on `redis`, with the admin API.
fn cluster_server(redis: &RedisServer, node_id: &str) -> Server {
    let mut cfg = config();
    cfg.admin.listen = "127.0.0.1:0".into();
    cfg.admin.token = Some(TOKEN.into());
    cfg.store.kind = switchboard::config::StoreKind::None;
    cfg.cluster.redis = Some(switchboard::config::RedisAddrs::Single(redis.url()));
    cfg.cluster.node_id = node_id.into();
    start(cfg)
}

#[test]
fn a_cluster_node_exposes_its_cross_node_counters() {
    // A node without a cluster has none of the families.
    let single = server();
    let names = scrape(single.admin_addr().unwrap()).names();
    assert!(!names.iter().any(|n| n.starts_with("switchboard_cluster_")), "{names:?}");
    single.shutdown().unwrap();

    let redis = RedisServer::start();
    let a = cluster_server(&redis, "metrics-a");
    let b = cluster_server(&redis, "metrics-b");
    let admin = a.admin_addr().unwrap();
    let h = a.handle();
    let id = format!("metrics-a/{}", std::process::id());
    assert_eq!(h.node_id().as_deref(), Some(id.as_str()));
    let counters = h.cluster_counters().expect("a cluster node has counters");
    let connected = || scrape(admin).sum("switchboard_cluster_connected", &[]) == 1.0;
    assert!(wait_until(Duration::from_secs(10), connected), "switchboard_cluster_connected never became 1");
    assert!(wait_until(Duration::from_secs(10), || scrape(admin).sum("switchboard_cluster_live_nodes", &[]) == 1.0));

    // A user on node b; a push through node a reaches it across Redis.
    let (mut bob, _) = login(b.local_addr(), "bob");
    let bc = b.handle().cluster_counters().unwrap();
    let written = || bc.presence_writes.load(std::sync::atomic::Ordering::Relaxed) >= 2;
    assert!(wait_until(Duration::from_secs(10), written), "bob's presence was not written");
    let before = scrape(admin);
    assert_eq!(h.push_to_user("bob", "across").unwrap().connections, 0, "bob is not on node a");
    assert_eq!(expect_push(&mut bob).2, b"across");
    // The cluster thread counts a batch after Redis answered its PUBLISH,
    // which may be after bob already has the message.
    let sent = || {
        scrape(admin).sum("switchboard_cluster_batches_sent_total", &[])
            > before.sum("switchboard_cluster_batches_sent_total", &[])
    };
    assert!(wait_until(Duration::from_secs(5), sent), "the batch was never counted");
    let after = scrape(admin);
    let moved = |name: &str| after.sum(name, &[]) - before.sum(name, &[]);
    assert_eq!(moved("switchboard_cluster_records_sent_total"), 1.0);
    assert_eq!(moved("switchboard_cluster_batches_sent_total"), 1.0);
    assert!(moved("switchboard_cluster_redis_commands_total") >= 1.0);
    assert!(moved("switchboard_cluster_redis_round_trips_total") >= 1.0);
    assert_eq!(after.sum("switchboard_cluster_queue_full_total", &[]), 0.0);
    assert_eq!(after.sum("switchboard_cluster_queue_bytes", &[]), 0.0, "the forward left the queue");
    assert_eq!(after.sum("switchboard_cluster_forwards_failed_total", &[]), 0.0);
    assert_eq!(
        after.sum("switchboard_cluster_records_sent_total", &[]),
        counters.records_sent.load(std::sync::atomic::Ordering::Relaxed) as f64
    );
    for (family, kind) in [
        ("switchboard_cluster_redis_commands", "counter"),
        ("switchboard_cluster_redis_round_trips", "counter"),
        ("switchboard_cluster_redis_errors", "counter"),
        ("switchboard_cluster_records_sent", "counter"),
        ("switchboard_cluster_batches_sent", "counter"),
        ("switchboard_cluster_records_received", "counter"),
        ("switchboard_cluster_batches_received", "counter"),
        ("switchboard_cluster_batches_malformed", "counter"),
        ("switchboard_cluster_deliveries", "counter"),
        ("switchboard_cluster_queue_full", "counter"),
        ("switchboard_cluster_forwards_failed", "counter"),
        ("switchboard_cluster_route_cache_hits", "counter"),
        ("switchboard_cluster_route_lookups", "counter"),
        ("switchboard_cluster_presence_writes", "counter"),
        ("switchboard_cluster_presence_resyncs", "counter"),
        ("switchboard_cluster_connected", "gauge"),
        ("switchboard_cluster_live_nodes", "gauge"),
        ("switchboard_cluster_room_subscriptions", "gauge"),
        ("switchboard_cluster_queue_bytes", "gauge"),
    ] {
        assert_eq!(after.families.get(family).map(String::as_str), Some(kind), "{family}");
    }
    // Node b counted what it received and delivered.
    let b_scrape = scrape(b.admin_addr().unwrap());
    assert!(b_scrape.sum("switchboard_cluster_records_received_total", &[]) >= 1.0);
    assert!(b_scrape.sum("switchboard_cluster_deliveries_total", &[]) >= 1.0);

    // /api/v1/stats carries the same counters.
    let (status, body) = admin_request(admin, "GET", "/api/v1/stats", b"", Some(TOKEN)).unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["cluster"]["node_id"], id.as_str());
    assert_eq!(v["cluster"]["connected"], true);
    assert!(v["cluster"]["records_sent"].as_u64().unwrap() >= 1);
    assert!(v["store"].is_null());
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

/// Every counter `/api/v1/stats` serves has a metric, which
/// docs/METRICS.md's table "From `/stats` to `/metrics`" names and a
/// scrape exposes: docs/DEPLOY.md's monitoring list speaks in `/stats`
/// names, and an operator graphs them from Prometheus.
#[test]
fn every_stats_counter_has_a_metric_the_docs_name() {
    let server = server();
    let exposed = scrape(server.admin_addr().unwrap()).names();
    let stats = serde_json::to_value(server.handle().stats()).unwrap();
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/METRICS.md")).unwrap();
    let (_, table) = doc.split_once("## From `/stats` to `/metrics`").expect("METRICS.md has the table");
    let named: BTreeMap<String, String> = table
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            let metric = cells.get(2)?.strip_prefix('`')?.split('`').next()?;
            Some((name.to_string(), metric.to_string()))
        })
        .collect();
    for key in stats.as_object().unwrap().keys() {
        let metric = named.get(key).unwrap_or_else(|| panic!("METRICS.md does not say which metric /stats' {key} is"));
        assert!(exposed.contains(metric), "/stats' {key} is {metric} in METRICS.md, which /metrics does not expose");
    }
    server.shutdown().unwrap();
}

/// A stopped store fails every reliable request while `/readyz` stays
/// 200 (the at-most-once paths go on): only the store's own metrics say
/// so, and the shipped rules must watch them, and what leads there (a
/// full disk) before it does.
#[test]
fn the_shipped_alerts_and_dashboard_watch_a_stopped_store() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning");
    let alerts = std::fs::read_to_string(dir.join("prometheus-alerts.yml")).unwrap();
    let dashboard = std::fs::read_to_string(dir.join("grafana-dashboard.json")).unwrap();
    for name in [
        "switchboard_store_stopped",
        "switchboard_store_errors_total",
        // And one about to: the inboxes near their limit, the disk near full.
        "switchboard_store_max_bytes",
        "switchboard_store_disk_free_bytes",
    ] {
        assert!(referenced_names(&alerts).contains(name), "no alert on {name}");
        assert!(referenced_names(&dashboard).contains(name), "no panel shows {name}");
    }
}

#[test]
fn the_dashboard_and_the_alerts_name_only_exposed_metrics() {
    let server = server();
    let mut exposed = scrape(server.admin_addr().unwrap()).names();
    // The cluster families are exposed by cluster nodes only.
    let redis = RedisServer::start();
    let node = cluster_server(&redis, "metrics-names");
    exposed.extend(scrape(node.admin_addr().unwrap()).names());
    node.shutdown().unwrap();
    // The disk store's families, by a server with one.
    let dir = std::env::temp_dir().join(format!("sb-metrics-names-{}", std::process::id()));
    let disk = disk_server(&dir, 1 << 30);
    exposed.extend(scrape(disk.admin_addr().unwrap()).names());
    disk.shutdown().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning");
    let dashboard = std::fs::read_to_string(dir.join("grafana-dashboard.json")).unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let alerts = std::fs::read_to_string(dir.join("prometheus-alerts.yml")).unwrap();
    for (file, text) in [("grafana-dashboard.json", &dashboard), ("prometheus-alerts.yml", &alerts)] {
        let names = referenced_names(text);
        assert!(names.len() >= 5, "{file} names too few metrics: {names:?}");
        let unknown: Vec<_> = names.iter().filter(|n| !exposed.contains(*n)).collect();
        assert!(unknown.is_empty(), "tuning/{file} names metrics /metrics does not expose: {unknown:?}");
    }
    server.shutdown().unwrap();
}

/// Bytes free to this process on the filesystem of `dir` (`statvfs`, as
/// `df` counts what a non-root user may still write).
fn free_bytes(dir: &std::path::Path) -> f64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs fills a plain struct from a NUL-terminated path.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(c.as_ptr(), &mut st), 0, "statvfs {}", dir.display());
        st
    };
    st.f_bavail as f64 * st.f_frsize as f64
}

/// What the store may hold (`store.max_bytes`) and the room left on the
/// disk store's filesystem are exposed, in `/metrics` and in
/// `/api/v1/stats`, so that the shipped alerts can warn before the
/// inboxes reach the limit (SENDs refused with ERROR 114) or the disk
/// fills first (the store stops: ERROR 115). A memory store has the limit
/// and no disk.
#[test]
fn the_store_limit_and_the_free_disk_are_exposed() {
    let dir = std::env::temp_dir().join(format!("sb-metrics-disk-{}", std::process::id()));
    let disk = disk_server(&dir, 300 << 20);
    let admin = disk.admin_addr().unwrap();
    let before = free_bytes(&dir);
    let s = scrape(admin);
    let (status, body) = admin_request(admin, "GET", "/api/v1/stats", b"", Some(TOKEN)).unwrap();
    let after = free_bytes(&dir);
    assert_eq!(status, 200, "{body}");
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(s.sum("switchboard_store_max_bytes", &[]), (300u64 << 20) as f64);
    assert_eq!(stats["store"]["max_bytes"], 300u64 << 20);
    // Other tests write to this filesystem meanwhile: the figure read
    // between the two readings here, give or take 256 MiB.
    let slack = (256u64 << 20) as f64;
    let (low, high) = (before.min(after) - slack, before.max(after) + slack);
    let free = s.sum("switchboard_store_disk_free_bytes", &[]);
    assert!(free > 0.0 && (low..=high).contains(&free), "{free} not within {low}..={high}");
    let in_stats = stats["store"]["disk_free_bytes"].as_f64().expect("disk_free_bytes with a disk store");
    assert!((low..=high).contains(&in_stats), "{in_stats} not within {low}..={high}");
    disk.shutdown().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    // The tests' memory store: the limit, no disk.
    let server = server();
    let admin = server.admin_addr().unwrap();
    let s = scrape(admin);
    assert_eq!(s.sum("switchboard_store_max_bytes", &[]), switchboard::Config::default().store.max_bytes as f64);
    assert!(!s.names().contains("switchboard_store_disk_free_bytes"));
    let (_, body) = admin_request(admin, "GET", "/api/v1/stats", b"", Some(TOKEN)).unwrap();
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(stats["store"]["disk_free_bytes"].is_null(), "{body}");
    server.shutdown().unwrap();
}

/// The shipped rules are valid PromQL and fire as their unit tests say
/// (`tuning/prometheus-alerts.test.yml`: the store near its limit, the
/// disk near full, on one instance and not the other, after their
/// `for`), checked by Prometheus's own `promtool`, which scripts/test.sh
/// installs (Debian's `prometheus` package).
#[test]
fn promtool_accepts_the_alert_rules_and_passes_their_unit_tests() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning");
    for args in [["check", "rules", "prometheus-alerts.yml"], ["test", "rules", "prometheus-alerts.test.yml"]] {
        let out = Command::new("promtool").args(args).current_dir(&dir).output().unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): run scripts/test.sh, which installs it (Debian: prometheus)")
        });
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
