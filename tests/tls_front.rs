//! TLS today: Switchboard behind nginx as a TLS-terminating front, with the
//! configuration docs/DEPLOY.md gives (`tuning/nginx-tls.conf`, run as is
//! but for its ports, paths and limits). A real nginx from Debian's
//! packages (`nginx`, `libnginx-mod-stream`) ends TLS for a wss:// client
//! (the Python `websockets` library) and for a raw-protocol client over TLS
//! (Python's ssl module); both verify the front's certificate (made here
//! with `openssl`, for 127.0.0.1) and talk to each other through it.
//! `tests/interop/tls_client.py` lists the checkpoints.
//!
//! Tools: `/usr/sbin/nginx` with the stream module, `openssl`, and the
//! Python of tests/ws_interop.rs; `scripts/test.sh` installs them. A missing
//! one fails the test with the command that installs it.
//!
//! Also checked: DEPLOY.md shows exactly the tested file.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::interop::*;
use common::*;

const NGINX: &str = "/usr/sbin/nginx";
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
const INSTALL: &str =
    "apt-get install --no-install-recommends nginx libnginx-mod-stream openssl (scripts/test.sh does)";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The documented configuration.
fn sample_config() -> String {
    std::fs::read_to_string(repo().join("tuning/nginx-tls.conf")).expect("tuning/nginx-tls.conf")
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let dir = std::env::temp_dir().join(format!("switchboard-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// nginx in its own process group, killed (with its workers) when dropped.
struct Nginx {
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group of the child this guard
        // started (nginx's master and its workers).
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Replaces `from` (which must occur exactly once) with `to`: a change of
/// the documented file must fail here, not pass untested.
fn rewrite(text: &mut String, from: &str, to: &str) {
    assert_eq!(text.matches(from).count(), 1, "tuning/nginx-tls.conf should contain {from:?} once");
    *text = text.replacen(from, to, 1);
}

/// A self-signed certificate for 127.0.0.1 (ECDSA P-256), its key, as
/// (cert, key) paths in `dir`.
fn certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap_or_else(|e| panic!("this test needs openssl ({e}): {INSTALL}"));
    assert!(out.status.success(), "openssl req: {}", String::from_utf8_lossy(&out.stderr));
    (cert, key)
}

/// The peers of established connections accepted on 127.0.0.1:`port`
/// (from /proc/net/tcp).
fn peers_of(port: u16) -> Vec<std::net::Ipv4Addr> {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(remote), Some("01")) = (f.get(1), f.get(2), f.get(3).copied()) else { continue };
        let port_of = |a: &str| a.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
        if port_of(local) != Some(port) {
            continue;
        }
        let ip = remote.split(':').next().and_then(|h| u32::from_str_radix(h, 16).ok());
        // /proc/net/tcp prints the address as the host's u32 of network-order bytes.
        out.extend(ip.map(|v| std::net::Ipv4Addr::from(v.to_le_bytes())));
    }
    out
}

#[test]
fn wss_and_raw_tls_through_nginx_with_the_documented_config() {
    require_python_websockets();
    assert!(Path::new(NGINX).exists(), "this test needs {NGINX}: {INSTALL}");
    assert!(Path::new(STREAM_MODULE).exists(), "this test needs nginx's stream module {STREAM_MODULE}: {INSTALL}");

    let mut cfg = config();
    cfg.websocket.listen = "127.0.0.1:0".into();
    // Heartbeats several times a second, so the clients' silence spans
    // several PING/PONG rounds through the front.
    cfg.timeouts.heartbeat_interval_ms = 300;
    cfg.timeouts.idle_timeout_ms = 1500;
    let server = start(cfg);
    let h = server.handle();
    let (raw, ws) = (server.local_addr(), server.ws_addr().unwrap());

    let dir = TempDir::new("tls-front");
    let (cert, key) = certificate(&dir.0);
    // Two distinct ports (two binds to port 0 in a row can get the same).
    let (wss_port, tls_port) = (common::free_port(), common::free_port());
    let mut conf = sample_config();
    // Ports and addresses of this test; files in its directory; limits that
    // fit this machine; nginx runs as whoever runs the test.
    rewrite(&mut conf, "listen 443 ssl ", &format!("listen 127.0.0.1:{wss_port} ssl "));
    rewrite(&mut conf, "listen 7443 ssl ", &format!("listen 127.0.0.1:{tls_port} ssl "));
    rewrite(&mut conf, "proxy_pass http://127.0.0.1:7710;", &format!("proxy_pass http://{ws};"));
    rewrite(&mut conf, "proxy_pass 127.0.0.1:7700;", &format!("proxy_pass {raw};"));
    let cert_paths = format!("ssl_certificate     {};\n        ssl_certificate_key {};", cert.display(), key.display());
    let documented_cert = "ssl_certificate     /etc/ssl/switchboard/fullchain.pem;\n        ssl_certificate_key /etc/ssl/switchboard/privkey.pem;";
    assert_eq!(conf.matches(documented_cert).count(), 2, "both servers name the certificate");
    conf = conf.replace(documented_cert, &cert_paths);
    rewrite(&mut conf, "user www-data;", "");
    rewrite(&mut conf, "worker_processes auto;", "worker_processes 2;");
    rewrite(&mut conf, "worker_rlimit_nofile 140000;", "worker_rlimit_nofile 4096;");
    rewrite(&mut conf, "worker_connections 65536;", "worker_connections 1024;");
    rewrite(&mut conf, "pid /run/nginx-switchboard.pid;", &format!("pid {};", dir.0.join("nginx.pid").display()));
    rewrite(
        &mut conf,
        "error_log /var/log/nginx/switchboard-error.log warn;",
        &format!("error_log {} warn;", dir.0.join("error.log").display()),
    );
    // Proxy timeouts far below the documented 350 s and above the
    // heartbeat interval: the 2 s of silence below then shows that the
    // server's heartbeats keep a connection through the front, which is
    // what the documented relation between the two rests on.
    rewrite(&mut conf, "proxy_read_timeout 350s;", "proxy_read_timeout 1s;");
    rewrite(&mut conf, "proxy_send_timeout 350s;", "proxy_send_timeout 1s;");
    rewrite(&mut conf, "proxy_timeout 350s;", "proxy_timeout 1s;");
    let conf_path = dir.0.join("nginx.conf");
    std::fs::write(&conf_path, &conf).unwrap();

    let child = Command::new(NGINX)
        .arg("-p")
        .arg(&dir.0)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(dir.0.join("error.log"))
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {NGINX}: {e}"));
    let mut nginx = Nginx { child, dir: dir.0.clone() };
    let up = wait_until(Duration::from_secs(10), || {
        if let Ok(Some(st)) = nginx.child.try_wait() {
            panic!("nginx exited at start ({st}):\n{}", nginx.log());
        }
        let pid = nginx.child.id();
        [wss_port, tls_port].iter().all(|p| listens(pid, std::net::SocketAddr::from(([127, 0, 0, 1], *p))))
    });
    assert!(up, "nginx did not listen within 10 s:\n{}", nginx.log());

    let args = [
        format!("wss://127.0.0.1:{wss_port}/"),
        format!("127.0.0.1:{tls_port}"),
        cert.display().to_string(),
        "alice".into(),
        token("alice"),
        "bob".into(),
        token("bob"),
        "2.0".into(),
    ];
    let mut s = Script::spawn("tls_client.py", &args);
    let line = s.expect("WSS_LOGIN_OK alice");
    assert!(line.contains("tls=TLSv1.3"), "{line}");
    let line = s.expect("TLS_LOGIN_OK bob");
    assert!(line.contains("tls=TLSv1.3"), "{line}");
    s.expect("READY");
    // The connections to Switchboard come from the file's spread of
    // loopback source addresses (docs/DEPLOY.md, "Source ports").
    for port in [raw.port(), ws.port()] {
        let peers = peers_of(port);
        assert!(
            !peers.is_empty() && peers.iter().all(|ip| ip.octets()[..3] == [127, 0, 1]),
            "connections to port {port} from {peers:?}"
        );
    }
    assert_eq!(h.push_to_user("alice", "pushed-to-A").unwrap().connections, 1);
    assert_eq!(h.push_to_user("bob", "pushed-to-B").unwrap().connections, 1);
    s.expect("PUSHES ok");
    s.expect("SEND alice->bob ok");
    s.expect("ALIVE after 2.0s idle");
    let st = h.stats();
    assert!(st.pings_sent >= 2, "the server pinged through the front: {st:?}");
    assert_eq!(st.idle_timeouts, 0, "{st:?}");
    s.expect("DONE");
    s.finish();

    assert!(wait_until(Duration::from_secs(5), || h.connection_count() == 0), "{:?}", h.stats());
    let st = h.stats();
    assert_eq!((st.ws_upgrades, st.logins, st.protocol_errors), (1, 2, 0), "{st:?}");
    let log = nginx.log();
    assert!(!log.contains("[emerg]") && !log.contains("[alert]") && !log.contains("[crit]"), "nginx:\n{log}");
    drop(nginx);
    server.shutdown().unwrap();
}

/// DEPLOY.md shows the tested configuration, byte for byte.
#[test]
fn deploy_md_shows_the_tested_nginx_config() {
    let deploy = std::fs::read_to_string(repo().join("docs/DEPLOY.md")).unwrap();
    let block = format!("```nginx\n{}```", sample_config());
    assert!(deploy.contains(&block), "docs/DEPLOY.md should show tuning/nginx-tls.conf in a ```nginx block");
}
