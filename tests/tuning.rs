//! `tuning/apply.sh`: the values it computes for N connections and a given
//! RAM, its memory estimate (from the figures `switchboard check` states)
//! and refusal, idempotent drop-ins, failures that name the key, and that
//! the example files in `tuning/` hold exactly what it computes for 1M
//! connections on 16 GiB. And the nftables files (`per-source-limit.nft`,
//! `notrack.nft`), loaded where they act.
//!
//! Nothing here changes this machine's settings: dry runs read the real
//! `/proc/sys`; applying runs against a fake `--proc-sys` tree, or (as root,
//! where `unshare` works) against the real kernel inside a new network
//! namespace, for namespaced `net.*` keys only; the nftables rules are
//! loaded only inside such a namespace. Drop-ins go to temporary
//! directories.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

const RAM_16G: &str = "17179869184";
/// The binary whose `switchboard check` apply.sh takes the memory figures
/// from (every run here points it there with SWITCHBOARD_BIN).
const SB: &str = env!("CARGO_BIN_EXE_switchboard");
/// The measured memory per idle connection, where it lives.
const USER: u64 = switchboard::limits::USER_BYTES_PER_IDLE_CONN;
const KERNEL: u64 = switchboard::limits::KERNEL_BYTES_PER_IDLE_CONN;
/// Socket buffers per direction in apply.sh's under-load estimate.
const BUF: u64 = 4096;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn script() -> PathBuf {
    root().join("tuning/apply.sh")
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "switchboard-tuning-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn sub(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn ok(self) -> Run {
        assert_eq!(self.code, 0, "apply.sh failed\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }

    fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

fn apply<S: AsRef<OsStr>>(args: &[S]) -> Run {
    let mut cmd = Command::new("bash");
    cmd.arg(script()).args(args).env("SWITCHBOARD_BIN", SB).current_dir(root());
    Run::from(cmd.output().expect("bash runs"))
}

/// apply.sh's `human`: GiB with two decimals, else MiB with one.
fn human(b: u64) -> String {
    if b >= 1 << 30 {
        let h = (b * 100 + (1 << 29)) >> 30;
        format!("{}.{:02} GiB", h / 100, h % 100)
    } else {
        let h = (b * 10 + (1 << 19)) >> 20;
        format!("{}.{} MiB", h / 10, h % 10)
    }
}

/// The estimate line apply.sh prints for `n` connections of the server
/// (`user` bytes of ours each) or the load generator (`None`).
fn estimate(n: u64, ram: u64, user: Option<u64>, kernel: u64) -> String {
    let per_idle = user.unwrap_or(0) + kernel;
    let (idle, busy) = (n * per_idle, n * (per_idle + 2 * BUF));
    let pct = (busy * 2000 / ram).div_ceil(2); // tenths of a percent, rounded, as apply.sh
    let what = match user {
        Some(u) => format!("{u} B user + {kernel} B kernel each"),
        None => format!("{kernel} B kernel each; the load generator's own memory not counted"),
    };
    format!(
        "memory estimate: {n} connections: idle {idle} B ({}: {what}); under load up to {busy} B ({}: + 2 x {BUF} B \
         socket buffers each); RAM {ram} B ({}): {}.{}% under load",
        human(idle),
        human(busy),
        human(ram),
        pct / 10,
        pct % 10
    )
}

#[derive(Debug, Clone)]
struct Row {
    current: String,
    wanted: String,
    new: String,
    action: String,
}

/// The table: `key | current | wanted | new | action`.
fn table(stdout: &str) -> HashMap<String, Row> {
    let mut rows = HashMap::new();
    let mut in_table = false;
    for line in stdout.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() == 5 && cells[0] == "key" && cells[4] == "action" {
            in_table = true;
            continue;
        }
        if !in_table || line.starts_with("---") {
            continue;
        }
        if cells.len() != 5 {
            break;
        }
        let row =
            Row { current: cells[1].into(), wanted: cells[2].into(), new: cells[3].into(), action: cells[4].into() };
        rows.insert(cells[0].to_string(), row);
    }
    assert!(!rows.is_empty(), "no table in:\n{stdout}");
    rows
}

fn nums(s: &str) -> Vec<u64> {
    s.split_whitespace().map(|w| w.parse().unwrap_or_else(|_| panic!("not a number: {s:?}"))).collect()
}

/// What `new` must be given `current` and `wanted` (the script's rules).
fn expected_new(key: &str, current: &str, wanted: &str) -> String {
    if current == "n/a" {
        return wanted.to_string();
    }
    let (c, w) = (nums(current), nums(wanted));
    let join = |v: Vec<u64>| v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
    match key {
        "net.ipv4.tcp_rmem" | "net.ipv4.tcp_wmem" => join(vec![w[0], w[1], c[2].max(w[2])]),
        "net.ipv4.tcp_mem" => join(c.iter().zip(&w).map(|(a, b)| *a.max(b)).collect()),
        "net.ipv4.ip_local_port_range" => join(vec![c[0].min(w[0]), c[1].max(w[1])]),
        "net.ipv4.tcp_fin_timeout"
        | "net.ipv4.tcp_keepalive_time"
        | "net.ipv4.tcp_keepalive_intvl"
        | "net.ipv4.tcp_keepalive_probes" => c[0].min(w[0]).to_string(),
        "net.ipv4.tcp_tw_reuse" | "net.ipv4.tcp_migrate_req" => wanted.to_string(),
        _ => c[0].max(w[0]).to_string(),
    }
}

/// Every row: `new` follows from `current` and `wanted`, and the action from both.
fn check_rows(rows: &HashMap<String, Row>) {
    for (key, r) in rows {
        assert_eq!(r.new, expected_new(key, &r.current, &r.wanted), "{key}: {r:?}");
        let optional = ["net.netfilter.nf_conntrack_max", "net.ipv4.tcp_migrate_req"];
        let action = if r.current == "n/a" && optional.contains(&key.as_str()) {
            "skip"
        } else if r.current == r.new {
            "ok"
        } else {
            "change"
        };
        assert_eq!(r.action, action, "{key}: {r:?}");
    }
}

fn wanted(rows: &HashMap<String, Row>, key: &str) -> String {
    rows.get(key).unwrap_or_else(|| panic!("no row {key} in {rows:?}")).wanted.clone()
}

fn page_size() -> u64 {
    let out = Command::new("getconf").arg("PAGESIZE").output().expect("getconf");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(4096)
}

/// tcp_mem for N connections on RAM bytes: high = N x 16 KiB in pages, within
/// 1/16 .. 1/2 of RAM; pressure = 3/4 high; low = 1/2 high.
fn tcp_mem(n: u64, ram: u64) -> String {
    let ps = page_size();
    let pages = ram / ps;
    let high = (n * 16384).div_ceil(ps).max(pages / 16).min(pages / 2);
    format!("{} {} {}", high / 2, high * 3 / 4, high)
}

#[test]
fn dry_run_for_a_million_connections_on_16_gib() {
    let t = TempDir::new("1m");
    let (sysctl_dir, limits_dir) = (t.sub("sysctl.d"), t.sub("limits.d"));
    let r = apply(&[
        "--dry-run",
        "--connections",
        "1000000",
        "--ram-bytes",
        RAM_16G,
        "--sysctl-dir",
        &sysctl_dir,
        "--limits-dir",
        &limits_dir,
    ])
    .ok();
    let want = estimate(1_000_000, 17179869184, Some(USER), KERNEL);
    assert!(r.stdout.lines().any(|l| l == want), "want {want:?} in\n{}", r.stdout);
    if (USER, KERNEL) == (200, 4000) {
        assert!(want.contains("idle 4200000000 B (3.91 GiB") && want.ends_with("72.1% under load"), "{want}");
    }
    let rows = table(&r.stdout);
    assert_eq!(wanted(&rows, "fs.file-max"), "1179648");
    assert_eq!(wanted(&rows, "fs.nr_open"), "1179648");
    assert_eq!(wanted(&rows, "net.core.somaxconn"), "16384");
    assert_eq!(wanted(&rows, "net.ipv4.tcp_max_syn_backlog"), "16384");
    assert_eq!(wanted(&rows, "net.core.netdev_max_backlog"), "16384");
    assert_eq!(wanted(&rows, "net.ipv4.tcp_rmem"), "4096 4096 6291456");
    assert_eq!(wanted(&rows, "net.ipv4.tcp_wmem"), "4096 4096 4194304");
    assert_eq!(wanted(&rows, "net.ipv4.tcp_mem"), tcp_mem(1_000_000, 17179869184));
    if page_size() == 4096 {
        assert_eq!(wanted(&rows, "net.ipv4.tcp_mem"), "1048576 1572864 2097152");
    }
    assert_eq!(wanted(&rows, "net.ipv4.tcp_keepalive_time"), "600");
    assert_eq!(wanted(&rows, "nofile"), "1048576");
    assert_eq!(rows["nofile"].current, "n/a", "no drop-in in the empty limits dir");
    check_rows(&rows);
    // The table's current values are this machine's.
    for key in ["fs.nr_open", "net.core.somaxconn", "net.ipv4.tcp_mem"] {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let live = fs::read_to_string(path).map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "));
        assert_eq!(rows[key].current, live.unwrap_or_else(|_| "n/a".into()), "{key}");
    }
    assert!(r.stdout.contains("dry run: nothing changed."), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("would write {sysctl_dir}/90-switchboard.conf")), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("would write {limits_dir}/switchboard.conf")), "{}", r.stdout);
    assert!(r.stdout.contains("LimitNOFILE=1048576"), "{}", r.stdout);
    assert!(r.stdout.contains("server.listen_backlog = 16384"), "{}", r.stdout);
    assert!(!Path::new(&sysctl_dir).exists() && !Path::new(&limits_dir).exists(), "a dry run wrote something");
}

#[test]
fn dry_run_for_ten_thousand_connections() {
    let t = TempDir::new("10k");
    let r = apply(&["--dry-run", "--connections", "10000", "--ram-bytes", RAM_16G, "--limits-dir", &t.sub("l")]).ok();
    let want = estimate(10_000, 17179869184, Some(USER), KERNEL);
    assert!(r.stdout.lines().any(|l| l == want), "want {want:?} in\n{}", r.stdout);
    let rows = table(&r.stdout);
    assert_eq!(wanted(&rows, "fs.file-max"), "131072");
    assert_eq!(wanted(&rows, "fs.nr_open"), "131072");
    assert_eq!(wanted(&rows, "net.core.somaxconn"), "4096");
    assert_eq!(wanted(&rows, "net.ipv4.tcp_max_syn_backlog"), "4096");
    assert_eq!(wanted(&rows, "net.ipv4.tcp_mem"), tcp_mem(10_000, 17179869184));
    if page_size() == 4096 {
        // N x 16 KiB is below 1/16 of RAM: the floor.
        assert_eq!(wanted(&rows, "net.ipv4.tcp_mem"), "131072 196608 262144");
    }
    assert_eq!(wanted(&rows, "nofile"), "65536");
    check_rows(&rows);
    assert!(!r.stdout.contains("server.listen_backlog"), "the default backlog suffices:\n{}", r.stdout);
}

#[test]
fn dry_run_loadgen_profile() {
    let t = TempDir::new("loadgen");
    let r = apply(&[
        "--dry-run",
        "--role",
        "loadgen",
        "--connections",
        "1000000",
        "--ram-bytes",
        RAM_16G,
        "--limits-dir",
        &t.sub("l"),
    ])
    .ok();
    let want = estimate(1_000_000, 17179869184, None, KERNEL);
    assert!(r.stdout.lines().any(|l| l == want), "want {want:?} in\n{}", r.stdout);
    let rows = table(&r.stdout);
    assert_eq!(wanted(&rows, "fs.nr_open"), "1179648");
    assert_eq!(wanted(&rows, "net.ipv4.ip_local_port_range"), "1024 65535");
    assert_eq!(wanted(&rows, "net.ipv4.tcp_tw_reuse"), "1");
    assert_eq!(wanted(&rows, "net.ipv4.tcp_fin_timeout"), "15");
    assert_eq!(wanted(&rows, "net.ipv4.tcp_mem"), tcp_mem(1_000_000, 17179869184));
    assert_eq!(wanted(&rows, "nofile"), "1048576");
    for server_only in ["net.core.somaxconn", "net.ipv4.tcp_rmem", "net.ipv4.tcp_keepalive_time"] {
        assert!(!rows.contains_key(server_only), "{server_only} is not in the loadgen profile");
    }
    check_rows(&rows);
    // One ephemeral range per source address and destination.
    let range = nums(&rows["net.ipv4.ip_local_port_range"].new);
    let ports = range[1] - range[0] + 1;
    let line = format!(
        "source addresses: 1000000 connections to one server address:port need at least {} source addresses \
         ({ports} ephemeral ports each); see tuning/loadgen-sysctl.conf",
        1_000_000u64.div_ceil(ports)
    );
    assert!(r.stdout.lines().any(|l| l == line), "want {line:?} in\n{}", r.stdout);
    if ports == 64512 {
        assert!(line.contains("at least 16 source addresses"));
    }
    assert!(r.stdout.contains("90-switchboard-loadgen.conf"), "{}", r.stdout);
}

#[test]
fn refuses_more_connections_than_the_ram_holds() {
    let r = apply(&["--dry-run", "--connections", "2000000", "--ram-bytes", RAM_16G]);
    assert_eq!(r.code, 1, "{}", r.all());
    let (ram, per_busy) = (17179869184u64, USER + KERNEL + 2 * BUF);
    let want = format!(
        "refused: 2000000 connections need up to {} B ({}) under load, more than this host's \
         RAM of {ram} B (16.00 GiB); at most {} connections fit",
        2_000_000 * per_busy,
        human(2_000_000 * per_busy),
        ram / per_busy
    );
    assert!(r.stderr.contains(&want), "want {want:?} in\n{}", r.all());
    assert!(!r.stdout.contains("| action"), "no table after a refusal:\n{}", r.stdout);

    // --force goes on while the idle total fits, with a warning.
    let r = apply(&[
        "--dry-run",
        "--force",
        "--connections",
        "2000000",
        "--ram-bytes",
        RAM_16G,
        "--limits-dir",
        "/nonexistent",
    ])
    .ok();
    assert!(r.stdout.contains("warning: --force: under load the estimate exceeds RAM"), "{}", r.stdout);

    // Not even idle: refused with or without --force.
    let r = apply(&["--dry-run", "--force", "--connections", "5000000", "--ram-bytes", RAM_16G]);
    assert_eq!(r.code, 1, "{}", r.all());
    let fit = format!("at most {} connections fit", ram / (USER + KERNEL));
    assert!(r.stderr.contains("even idle") && r.stderr.contains(&fit), "want {fit:?} in\n{}", r.all());
}

// --- Where the memory figures come from --------------------------------------

/// The line of `switchboard check` apply.sh reads: (user, kernel) bytes.
fn check_figures() -> (u64, u64) {
    let out = Command::new(SB).args(["check", "--connections", "1000"]).output().expect("switchboard check runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("per idle connection: ")).unwrap_or_else(|| panic!("{text}"));
    let num = |key: &str| -> u64 {
        let v = line.split(key).nth(1).unwrap_or_else(|| panic!("{line}"));
        v.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    (num("user_bytes="), num("kernel_bytes="))
}

#[test]
fn the_memory_figures_come_from_switchboard_check() {
    assert_eq!(check_figures(), (USER, KERNEL), "check prints the constants of src/limits.rs");
    let r =
        apply(&["--dry-run", "--connections", "10000", "--ram-bytes", RAM_16G, "--limits-dir", "/nonexistent"]).ok();
    let source = format!("memory per idle connection: {USER} B user + {KERNEL} B kernel (from {SB} check)");
    assert!(r.stdout.lines().any(|l| l == source), "want {source:?} in\n{}", r.stdout);

    // --switchboard names the binary (over SWITCHBOARD_BIN).
    let r = apply(&["--dry-run", "--connections", "10", "--switchboard", SB, "--limits-dir", "/nonexistent"]).ok();
    assert!(r.stdout.contains(&format!("(from {SB} check)")), "{}", r.stdout);
}

#[test]
fn figures_given_by_hand_need_no_binary() {
    let mut cmd = Command::new("bash");
    cmd.arg(script())
        .args(["--dry-run", "--connections", "10000", "--ram-bytes", RAM_16G, "--limits-dir", "/nonexistent"])
        .args(["--user-bytes", "250", "--kernel-bytes", "4000"])
        .env("SWITCHBOARD_BIN", "/nonexistent/switchboard")
        .current_dir(root());
    let r = Run::from(cmd.output().unwrap()).ok();
    assert!(r
        .stdout
        .contains("memory per idle connection: 250 B user + 4000 B kernel (from --user-bytes/--kernel-bytes)"));
    let want = estimate(10_000, 17179869184, Some(250), 4000);
    assert!(r.stdout.lines().any(|l| l == want), "want {want:?} in\n{}", r.stdout);

    for args in
        [&["--user-bytes", "250"][..], &["--kernel-bytes", "4000"], &["--user-bytes", "2.5e2", "--kernel-bytes", "1"]]
    {
        let r = apply(&[&["--dry-run", "--connections", "10"][..], args].concat());
        assert_eq!(r.code, 2, "{args:?}: {}", r.all());
    }
    let r =
        apply(&["--dry-run", "--connections", "10", "--user-bytes", "1", "--kernel-bytes", "1", "--switchboard", SB]);
    assert_eq!(r.code, 2, "either the binary or the figures: {}", r.all());
}

#[test]
fn without_the_figures_it_refuses_and_says_how_to_give_them() {
    // A copy of the script outside the checkout (no target/release next to
    // it), no SWITCHBOARD_BIN, a PATH without switchboard.
    let t = TempDir::new("nobin");
    let copy = t.path().join("apply.sh");
    fs::copy(script(), &copy).unwrap();
    let path_dirs: Vec<&str> = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .into_iter()
        .filter(|d| !Path::new(d).join("switchboard").exists())
        .collect();
    let out = Command::new("bash")
        .arg(&copy)
        .args(["--dry-run", "--connections", "10"])
        .env_remove("SWITCHBOARD_BIN")
        .env("PATH", path_dirs.join(":"))
        .current_dir(t.path())
        .output()
        .unwrap();
    let r = Run::from(out);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("no switchboard binary found"), "{}", r.all());
    for hint in ["cargo build --release", "--switchboard BIN", "SWITCHBOARD_BIN", "--user-bytes B --kernel-bytes B"] {
        assert!(r.stderr.contains(hint), "{hint}: {}", r.all());
    }
    assert!(!r.stdout.contains("| action"), "no table without the figures:\n{}", r.stdout);

    // A binary that does not state them (an older build, or not switchboard).
    let r = apply(&["--dry-run", "--connections", "10", "--switchboard", "/bin/true"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("printed no 'per idle connection: user_bytes=… kernel_bytes=…' line"), "{}", r.all());
    let r = apply(&["--dry-run", "--connections", "10", "--switchboard", "/nonexistent/switchboard"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("/nonexistent/switchboard is not an executable file"), "{}", r.all());
}

#[test]
fn bad_arguments_are_usage_errors() {
    for args in [
        &["--dry-run"][..],
        &["--connections", "lots"],
        &["--connections", "0"],
        &["--connections", "10", "--role", "client"],
        &["--connections", "10", "--ram-bytes", "16G"],
        &["--connections", "10", "--only", "net.core.nonsense"],
        &["--connections", "10", "--frobnicate"],
    ] {
        let r = apply(args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.all());
        assert!(r.stderr.contains("apply.sh: "), "{args:?}: {}", r.all());
    }
}

/// A fake `/proc/sys` tree with the kernel's formatting (tabs in triplets).
fn fake_proc(dir: &Path, entries: &[(&str, &str)]) {
    for (key, value) in entries {
        let path = dir.join(key.replace('.', "/"));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, format!("{}\n", value.replace(' ', "\t"))).unwrap();
    }
}

fn read_key(dir: &Path, key: &str) -> String {
    let v = fs::read_to_string(dir.join(key.replace('.', "/"))).unwrap();
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

const FAKE_SERVER: &[(&str, &str)] = &[
    ("fs.file-max", "9999999"), // already higher: kept
    ("fs.nr_open", "1048576"),
    ("net.core.somaxconn", "4096"),
    ("net.ipv4.tcp_max_syn_backlog", "2048"),
    ("net.core.netdev_max_backlog", "1000"),
    ("net.ipv4.tcp_rmem", "4096 131072 33554432"),
    ("net.ipv4.tcp_wmem", "4096 16384 4194304"),
    ("net.ipv4.tcp_mem", "287901 383868 575802"),
    ("net.ipv4.tcp_keepalive_time", "7200"),
    ("net.ipv4.tcp_keepalive_intvl", "30"), // already lower: kept
    ("net.ipv4.tcp_keepalive_probes", "9"),
    ("net.ipv4.tcp_migrate_req", "0"),
    // net.netfilter.nf_conntrack_max absent: conntrack not loaded, skipped.
];

#[test]
fn applies_to_a_fake_proc_sys_and_writes_idempotent_drop_ins() {
    let t = TempDir::new("apply");
    let proc = t.path().join("proc-sys");
    fake_proc(&proc, FAKE_SERVER);
    let (sysctl_dir, limits_dir) = (t.sub("etc/sysctl.d"), t.sub("etc/limits.d"));
    let args = |n: &str, dry: bool| {
        let mut v: Vec<String> = ["--connections", n, "--ram-bytes", RAM_16G, "--proc-sys", proc.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(["--sysctl-dir".into(), sysctl_dir.clone(), "--limits-dir".into(), limits_dir.clone()]);
        if dry {
            v.push("--dry-run".into());
        }
        v
    };

    let r = apply(&args("1000000", false)).ok();
    let rows = table(&r.stdout);
    check_rows(&rows);
    let expect = [
        ("fs.file-max", "9999999", "ok"),
        ("fs.nr_open", "1179648", "change"),
        ("net.core.somaxconn", "16384", "change"),
        ("net.ipv4.tcp_rmem", "4096 4096 33554432", "change"),
        ("net.ipv4.tcp_wmem", "4096 4096 4194304", "change"),
        ("net.ipv4.tcp_keepalive_time", "600", "change"),
        ("net.ipv4.tcp_keepalive_intvl", "30", "ok"),
        ("net.ipv4.tcp_migrate_req", "1", "change"),
        ("nofile", "1048576", "change"),
    ];
    for (key, new, action) in expect {
        assert_eq!((rows[key].new.as_str(), rows[key].action.as_str()), (new, action), "{key}");
    }
    assert_eq!(
        (
            rows["net.netfilter.nf_conntrack_max"].current.as_str(),
            rows["net.netfilter.nf_conntrack_max"].action.as_str()
        ),
        ("n/a", "skip")
    );
    for (key, new, _) in expect.iter().filter(|e| e.0 != "nofile") {
        assert_eq!(read_key(&proc, key), *new, "{key} in the fake /proc/sys");
    }
    assert!(r.stdout.contains("set net.core.somaxconn = 16384"), "{}", r.stdout);
    assert!(!r.stdout.contains("set fs.file-max"), "{}", r.stdout);
    let sysctl_file = format!("{sysctl_dir}/90-switchboard.conf");
    let limits_file = format!("{limits_dir}/switchboard.conf");
    assert!(r.stdout.contains(&format!("wrote {sysctl_file}")), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("wrote {limits_file}")), "{}", r.stdout);

    let dropin = fs::read_to_string(&sysctl_file).unwrap();
    let settings: Vec<&str> = dropin.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    assert_eq!(
        settings,
        [
            "fs.file-max = 9999999",
            "fs.nr_open = 1179648",
            "net.core.somaxconn = 16384",
            "net.ipv4.tcp_max_syn_backlog = 16384",
            "net.core.netdev_max_backlog = 16384",
            "net.ipv4.tcp_rmem = 4096 4096 33554432",
            "net.ipv4.tcp_wmem = 4096 4096 4194304",
            &format!("net.ipv4.tcp_mem = {}", tcp_mem(1_000_000, 17179869184)),
            "net.ipv4.tcp_keepalive_time = 600",
            "net.ipv4.tcp_keepalive_intvl = 30",
            "net.ipv4.tcp_keepalive_probes = 5",
            "-net.ipv4.tcp_migrate_req = 1",
        ]
    );
    let limits = fs::read_to_string(&limits_file).unwrap();
    let limit_lines: Vec<Vec<&str>> =
        limits.lines().filter(|l| !l.starts_with('#')).map(|l| l.split_whitespace().collect()).collect();
    assert!(limit_lines.contains(&vec!["switchboard", "soft", "nofile", "1048576"]), "{limits}");
    assert!(limit_lines.contains(&vec!["switchboard", "hard", "nofile", "1048576"]), "{limits}");

    // Again: nothing to change, identical files are left alone.
    let before = fs::metadata(&sysctl_file).unwrap().modified().unwrap();
    let r = apply(&args("1000000", false)).ok();
    assert!(table(&r.stdout).values().all(|row| row.action == "ok" || row.action == "skip"), "{}", r.stdout);
    assert!(r.stdout.contains("no kernel value needed to change."), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("unchanged: {sysctl_file}")), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("unchanged: {limits_file}")), "{}", r.stdout);
    assert_eq!(fs::metadata(&sysctl_file).unwrap().modified().unwrap(), before);
    let r = apply(&args("1000000", true)).ok();
    assert!(r.stdout.contains(&format!("unchanged: {sysctl_file}")), "{}", r.stdout);

    // Fewer connections: nothing is lowered, not even the limits drop-in.
    let r = apply(&args("10000", false)).ok();
    let rows = table(&r.stdout);
    assert_eq!((rows["net.core.somaxconn"].new.as_str(), rows["net.core.somaxconn"].action.as_str()), ("16384", "ok"));
    assert_eq!((rows["nofile"].current.as_str(), rows["nofile"].new.as_str()), ("1048576", "1048576"));
    assert_eq!(read_key(&proc, "fs.nr_open"), "1179648");
    assert!(r.stdout.contains(&format!("wrote {sysctl_file}")), "the header names N:\n{}", r.stdout);
    assert!(fs::read_to_string(&sysctl_file).unwrap().contains("net.core.somaxconn = 16384"));
}

#[test]
fn a_key_that_cannot_be_applied_stops_with_its_name_and_changes_nothing() {
    let t = TempDir::new("fail");
    let proc = t.path().join("proc-sys");
    let entries: Vec<(&str, &str)> =
        FAKE_SERVER.iter().copied().filter(|(k, _)| *k != "net.core.netdev_max_backlog").collect();
    fake_proc(&proc, &entries);
    let (sysctl_dir, limits_dir) = (t.sub("sysctl.d"), t.sub("limits.d"));
    let p = proc.to_str().unwrap();
    let r = apply(&[
        "--connections",
        "1000000",
        "--ram-bytes",
        RAM_16G,
        "--proc-sys",
        p,
        "--sysctl-dir",
        &sysctl_dir,
        "--limits-dir",
        &limits_dir,
    ]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stdout.contains("warning: net.core.netdev_max_backlog is absent"), "{}", r.stdout);
    assert!(
        r.stderr.contains("cannot set net.core.netdev_max_backlog = 16384:") && r.stderr.contains("does not exist"),
        "{}",
        r.all()
    );
    assert!(r.stderr.contains("nothing was changed"), "{}", r.all());
    assert_eq!(read_key(&proc, "net.core.somaxconn"), "4096", "changed before failing");
    assert!(!Path::new(&sysctl_dir).join("90-switchboard.conf").exists());
    assert!(!Path::new(&limits_dir).join("switchboard.conf").exists());

    // --only leaves the missing key out, and then it works.
    let r = apply(&[
        "--connections",
        "1000000",
        "--ram-bytes",
        RAM_16G,
        "--proc-sys",
        p,
        "--sysctl-dir",
        &sysctl_dir,
        "--limits-dir",
        &limits_dir,
        "--only",
        "net.core.somaxconn,nofile",
    ])
    .ok();
    assert_eq!(table(&r.stdout).len(), 2, "{}", r.stdout);
    assert_eq!(read_key(&proc, "net.core.somaxconn"), "16384");
    assert_eq!(read_key(&proc, "fs.nr_open"), "1048576", "--only touched another key");
}

/// `--only` handles the keys it names, and the drop-in keeps what an earlier
/// run wrote for the others: rewriting it with the named keys alone would
/// undo, at the next boot, every other setting that run made.
#[test]
fn only_keeps_the_other_keys_of_the_drop_in() {
    let t = TempDir::new("only");
    let proc = t.path().join("proc-sys");
    fake_proc(&proc, FAKE_SERVER);
    let (sysctl_dir, limits_dir) = (t.sub("sysctl.d"), t.sub("limits.d"));
    let p = proc.to_str().unwrap().to_string();
    let run = |n: &str, only: Option<&str>| {
        // --force: 2,000,000 busy connections would not fit in 16 GiB.
        let mut v: Vec<&str> = vec!["--connections", n, "--ram-bytes", RAM_16G, "--proc-sys", &p, "--force"];
        v.extend(["--sysctl-dir", &sysctl_dir, "--limits-dir", &limits_dir]);
        if let Some(keys) = only {
            v.extend(["--only", keys]);
        }
        apply(&v).ok()
    };
    let sysctl_file = format!("{sysctl_dir}/90-switchboard.conf");
    let settings = || -> Vec<String> {
        let text = fs::read_to_string(&sysctl_file).unwrap();
        text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).map(String::from).collect()
    };

    run("1000000", None);
    let full = settings();
    assert_eq!(full.len(), 12, "{full:?}");

    // Someone lowered one key by hand: --only puts it back, and the drop-in
    // still holds every key the full run wrote.
    fake_proc(&proc, &[("net.core.somaxconn", "4096")]);
    let r = run("1000000", Some("net.core.somaxconn"));
    assert_eq!(table(&r.stdout).len(), 1, "{}", r.stdout);
    assert!(r.stdout.contains("set net.core.somaxconn = 16384"), "{}", r.stdout);
    assert_eq!(read_key(&proc, "fs.nr_open"), "1179648");
    assert_eq!(settings(), full, "the drop-in lost the keys --only did not name");
    let text = fs::read_to_string(&sysctl_file).unwrap();
    assert!(text.contains("# largest RLIMIT_NOFILE"), "a kept key lost its comment:\n{text}");
    assert!(r.stdout.contains(&format!("unchanged: {sysctl_file}")), "{}", r.stdout);

    // A key --only names takes its new value; the others keep theirs.
    let r = run("2000000", Some("net.core.somaxconn"));
    assert_eq!(read_key(&proc, "net.core.somaxconn"), "32768", "{}", r.stdout);
    let expect: Vec<String> = full
        .iter()
        .map(|l| if l.starts_with("net.core.somaxconn ") { "net.core.somaxconn = 32768".into() } else { l.clone() })
        .collect();
    assert_eq!(settings(), expect);

    // The same again: nothing to write.
    let r = run("2000000", Some("net.core.somaxconn"));
    assert!(r.stdout.contains(&format!("unchanged: {sysctl_file}")), "{}", r.stdout);
    // And a full run afterwards plans every key again, in the usual order.
    run("1000000", None);
    let keys: Vec<String> = settings().iter().map(|l| l.split(" = ").next().unwrap().to_string()).collect();
    let full_keys: Vec<String> = full.iter().map(|l| l.split(" = ").next().unwrap().to_string()).collect();
    assert_eq!(keys, full_keys);
}

/// `key = value` lines of a sysctl file (a leading `-` kept).
fn sysctl_settings(path: &str) -> Vec<(String, String)> {
    let text = fs::read_to_string(root().join(path)).unwrap();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{path}: not key = value: {l}"));
            (k.trim().to_string(), v.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .collect()
}

#[test]
fn the_example_files_hold_what_apply_computes_for_1m_on_16_gib() {
    if page_size() != 4096 {
        return; // tcp_mem is in pages: the examples are for 4 KiB pages
    }
    for (role, file) in [("server", "tuning/switchboard-sysctl.conf"), ("loadgen", "tuning/loadgen-sysctl.conf")] {
        let t = TempDir::new(role);
        let r = apply(&[
            "--dry-run",
            "--role",
            role,
            "--connections",
            "1000000",
            "--ram-bytes",
            RAM_16G,
            "--limits-dir",
            &t.sub("l"),
        ])
        .ok();
        let rows = table(&r.stdout);
        let settings = sysctl_settings(file);
        let keys: Vec<String> = settings.iter().map(|(k, _)| k.trim_start_matches('-').to_string()).collect();
        let mut table_keys: Vec<String> = rows.keys().filter(|k| *k != "nofile").cloned().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        table_keys.sort();
        assert_eq!(sorted, table_keys, "{file}: the same keys as apply.sh --role {role}");
        for (k, v) in &settings {
            let key = k.trim_start_matches('-');
            assert_eq!(v, &rows[key].wanted, "{file}: {key}");
            let optional = key == "net.netfilter.nf_conntrack_max" || key == "net.ipv4.tcp_migrate_req";
            assert_eq!(k.starts_with('-'), optional, "{file}: {key}: '-' marks exactly the optional keys");
        }
        assert_eq!(rows["nofile"].wanted, "1048576");
    }

    let limits = fs::read_to_string(root().join("tuning/limits.conf")).unwrap();
    let lines: Vec<Vec<&str>> =
        limits.lines().filter(|l| !l.trim_start().starts_with('#')).map(|l| l.split_whitespace().collect()).collect();
    assert!(lines.contains(&vec!["switchboard", "soft", "nofile", "1048576"]), "{limits}");
    assert!(lines.contains(&vec!["switchboard", "hard", "nofile", "1048576"]), "{limits}");
}

/// The settings of a unit file, section by section, comments dropped.
fn unit_settings(path: &str) -> Vec<String> {
    let text = fs::read_to_string(root().join(path)).unwrap();
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect()
}

#[test]
fn the_systemd_units_agree() {
    let unit = unit_settings("tuning/switchboard.service");
    for want in [
        "ExecStart=/usr/local/bin/switchboard serve --config /etc/switchboard/switchboard.toml",
        "LimitNOFILE=1048576",
        "LimitMEMLOCK=infinity",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "User=switchboard",
        // The store's default path is relative: under a directory the
        // service may write (ProtectSystem=strict makes / read-only).
        "StateDirectory=switchboard",
        "WorkingDirectory=/var/lib/switchboard",
    ] {
        assert!(unit.iter().any(|l| l == want), "switchboard.service lacks {want}");
    }
    assert!(!unit.iter().any(|l| l.starts_with("SystemCallFilter=")), "a syscall filter could block io_uring_setup");
    assert!(!unit.iter().any(|l| l.starts_with("ProcSubset=")), "ProcSubset=pid hides /proc/sys and /proc/meminfo");
    // TimeoutStopSec outlasts the drain window + linger (10 s + 2 s by default).
    let stop = unit.iter().find_map(|l| l.strip_prefix("TimeoutStopSec=")).expect("TimeoutStopSec");
    let stop_s: u64 = stop.trim_end_matches('s').parse().unwrap();
    assert!(stop_s > 12, "TimeoutStopSec={stop}");

    let template = unit_settings("tuning/switchboard@.service");
    // Both instances read the environment file of tuning/README.md's
    // install steps (SWITCHBOARD_JWT_SECRET: blue and green must check
    // tokens with the same secret), then one of their own.
    assert!(
        template.iter().any(|l| l == "EnvironmentFile=-/etc/switchboard/switchboard.env"),
        "switchboard@.service does not read /etc/switchboard/switchboard.env"
    );
    let per_instance = "EnvironmentFile=-/etc/switchboard/%i.env";
    let at = template.iter().position(|l| l == per_instance).expect(per_instance);
    assert_eq!(
        template[at - 1],
        "EnvironmentFile=-/etc/switchboard/switchboard.env",
        "the instance's own file comes last"
    );
    let normalize = |l: &String| l.replace("%i.toml", "switchboard.toml");
    let template: Vec<String> =
        template.iter().filter(|&l| l != per_instance && !l.starts_with("Description=")).map(normalize).collect();
    let unit: Vec<String> = unit.iter().filter(|&l| !l.starts_with("Description=")).cloned().collect();
    assert_eq!(template, unit, "switchboard@.service must differ from switchboard.service only in %i");
}

// --- Real application inside a new network namespace (root only) ----------

fn netns_id() -> String {
    fs::read_link("/proc/self/ns/net").map(|p| p.display().to_string()).unwrap_or_default()
}

/// Runs `body` (bash) in a new network namespace (and mount namespace when
/// `mount_ns`), refusing inside if the namespace is not a new one. None when
/// this machine cannot (not root, no unshare, namespaces not permitted).
fn in_new_netns(body: &str, mount_ns: bool) -> Option<Run> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: not root");
        return None;
    }
    let probe = Command::new("unshare").args(["-n", "true"]).output();
    if !matches!(probe, Ok(ref o) if o.status.success()) {
        eprintln!("skipped: unshare -n does not work here");
        return None;
    }
    let guard = r#"[ "$(readlink /proc/self/ns/net)" != "$PARENT_NETNS" ] || { echo "not in a new network namespace" >&2; exit 99; }"#;
    let mut cmd = Command::new("unshare");
    if mount_ns {
        cmd.args(["-m", "--propagation", "private"]);
    }
    cmd.args(["-n", "bash", "-c"])
        .arg(format!("set -e; {guard}\n{body}"))
        .env("PARENT_NETNS", netns_id())
        .env("APPLY", script())
        .env("SWITCHBOARD_BIN", SB)
        .current_dir(root());
    let r = Run::from(cmd.output().expect("unshare runs"));
    assert_ne!(r.code, 99, "{}", r.all());
    Some(r)
}

/// Namespaced keys only: nothing outside the new namespace can change.
const NETNS_SERVER_KEYS: &str =
    "net.core.somaxconn,net.ipv4.tcp_max_syn_backlog,net.ipv4.tcp_rmem,net.ipv4.tcp_wmem,net.ipv4.tcp_keepalive_time,\
     net.ipv4.tcp_keepalive_intvl,net.ipv4.tcp_keepalive_probes,nofile";

#[test]
fn applies_for_real_inside_a_network_namespace() {
    let host_before: Vec<String> = ["net/core/somaxconn", "net/ipv4/tcp_rmem", "net/ipv4/tcp_keepalive_time"]
        .iter()
        .map(|k| fs::read_to_string(format!("/proc/sys/{k}")).unwrap_or_default())
        .collect();
    let t = TempDir::new("netns");
    let script = format!(
        r#"args=(--connections 1000000 --ram-bytes {RAM_16G} --sysctl-dir {s} --limits-dir {l} --only {NETNS_SERVER_KEYS})
bash "$APPLY" "${{args[@]}}"
echo "== live: $(cat /proc/sys/net/core/somaxconn) / $(cat /proc/sys/net/ipv4/tcp_rmem | tr '\t' ' ')"
echo "== second run"
bash "$APPLY" "${{args[@]}}"
echo "== loadgen"
bash "$APPLY" --role loadgen --connections 100000 --ram-bytes {RAM_16G} --sysctl-dir {s} --limits-dir {l} \
  --only net.ipv4.ip_local_port_range,net.ipv4.tcp_tw_reuse,net.ipv4.tcp_fin_timeout
echo "== live: $(cat /proc/sys/net/ipv4/ip_local_port_range | tr '\t' ' ') / $(cat /proc/sys/net/ipv4/tcp_fin_timeout)"
"#,
        s = t.sub("sysctl.d"),
        l = t.sub("limits.d"),
    );
    let Some(r) = in_new_netns(&script, false) else { return };
    let r = r.ok();
    let out = &r.stdout;
    assert!(out.contains("set net.core.somaxconn = 16384"), "{out}");
    assert!(out.contains("set net.ipv4.tcp_max_syn_backlog = 16384"), "{out}");
    assert!(out.contains("set net.ipv4.tcp_keepalive_time = 600"), "{out}");
    assert!(out.contains("== live: 16384 / 4096 4096 "), "{out}");
    let second = &out[out.find("== second run").unwrap()..out.find("== loadgen").unwrap()];
    assert!(second.contains("no kernel value needed to change."), "{second}");
    assert!(second.contains("unchanged: ") && !second.contains("wrote "), "{second}");
    let loadgen = &out[out.find("== loadgen").unwrap()..];
    assert!(loadgen.contains("set net.ipv4.tcp_fin_timeout = 15"), "{loadgen}");
    assert!(loadgen.contains("== live: 1024 65535 / 15"), "{loadgen}");
    let dropin = fs::read_to_string(t.path().join("sysctl.d/90-switchboard.conf")).unwrap();
    assert!(dropin.contains("\nnet.core.somaxconn = 16384\n") && !dropin.contains("fs."), "{dropin}");

    let host_after: Vec<String> = ["net/core/somaxconn", "net/ipv4/tcp_rmem", "net/ipv4/tcp_keepalive_time"]
        .iter()
        .map(|k| fs::read_to_string(format!("/proc/sys/{k}")).unwrap_or_default())
        .collect();
    assert_eq!(host_before, host_after, "the host's own settings changed");
}

#[test]
fn read_only_proc_sys_is_refused_with_the_key_and_reason() {
    // As in a container: /proc/sys mounted read-only (in a private mount
    // namespace, inside a new network namespace).
    let t = TempDir::new("ro");
    let script = format!(
        r#"mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
bash "$APPLY" --connections 1000000 --ram-bytes {RAM_16G} --sysctl-dir {s} --limits-dir {l} --only net.core.somaxconn,nofile
"#,
        s = t.sub("sysctl.d"),
        l = t.sub("limits.d"),
    );
    let Some(r) = in_new_netns(&script, true) else { return };
    if r.stderr.contains("mount:") {
        eprintln!("skipped: cannot remount /proc/sys here: {}", r.stderr);
        return;
    }
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("cannot set net.core.somaxconn = 16384:") && r.stderr.contains("read-only /proc/sys"),
        "{}",
        r.all()
    );
    assert!(r.stderr.contains("nothing was changed"), "{}", r.all());
    assert!(!t.path().join("limits.d/switchboard.conf").exists(), "wrote a drop-in after refusing");
}

// --- The nftables files, loaded inside a new network namespace (root) ------

/// Python: listens on 0.0.0.0 at each port given (never accepting: the
/// kernel completes handshakes into the backlog), then for each
/// `SRC:DST:PORT:N` opens N connections from SRC and prints how many are
/// still open half a second later (a reset one reads as closed).
const NFT_PROBE: &str = r#"
import socket, sys, time
listen, jobs = sys.argv[1].split(','), sys.argv[2:]
ls = []
for p in listen:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('0.0.0.0', int(p))); s.listen(4096); ls.append(s)
held = []
for job in jobs:
    src, dst, port, n = job.split(':')
    socks = []
    for _ in range(int(n)):
        c = socket.socket(); c.settimeout(2); c.bind((src, 0))
        try:
            c.connect((dst, int(port))); socks.append(c)
        except OSError:
            c.close()
    time.sleep(0.5)
    alive = 0
    for c in socks:
        c.setblocking(False)
        try:
            alive += c.recv(1) != b''
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    print(f'{job} open {alive}', flush=True)
    held += socks
"#;

/// A temporary directory holding [`NFT_PROBE`] as a file, and that file;
/// `None` (the test skipped, and saying so) where `nft` is not installed.
fn nft_probe(name: &str) -> Option<(TempDir, std::path::PathBuf)> {
    let ok = Command::new("nft").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: nft is not installed (scripts/test.sh installs nftables)");
        return None;
    }
    let t = TempDir::new(name);
    let probe = t.path().join("probe.py");
    fs::write(&probe, NFT_PROBE).unwrap();
    Some((t, probe))
}

/// tuning/per-source-limit.nft: 256 connections from one address to the
/// client ports, the next refused, another address unaffected; and this
/// host's own addresses never counted, since the TLS front of
/// tuning/nginx-tls.conf connects from 127.0.1.1..25 for all its clients
/// (counted, it would hold 25 x 256 of them at most), while its clients
/// are counted on its ports, 443 and 7443.
#[test]
fn per_source_limit_counts_clients_not_the_local_tls_front() {
    let Some((_t, probe)) = nft_probe("nft-limit") else { return };
    let script = format!(
        r#"ip link set lo up
ip addr add 192.0.2.1/32 dev lo
ip addr add 192.0.2.10/32 dev lo
ip addr add 192.0.2.11/32 dev lo
nft -c -f tuning/per-source-limit.nft
nft -f tuning/per-source-limit.nft
python3 {probe} 7700,7710,7701,7443 \
  192.0.2.10:192.0.2.1:7700:200 192.0.2.10:192.0.2.1:7710:100 192.0.2.11:192.0.2.1:7700:10 \
  192.0.2.10:192.0.2.1:7701:40 127.0.1.5:127.0.0.1:7700:300 127.0.0.1:127.0.0.1:7701:40 \
  192.0.2.11:192.0.2.1:7443:300
"#,
        probe = probe.display()
    );
    let Some(r) = in_new_netns(&script, false) else { return };
    let r = r.ok();
    for want in [
        // One address: 256 to the client ports together, the rest reset.
        "192.0.2.10:192.0.2.1:7700:200 open 200",
        "192.0.2.10:192.0.2.1:7710:100 open 56",
        // Another address is not held back by the first.
        "192.0.2.11:192.0.2.1:7700:10 open 10",
        "192.0.2.10:192.0.2.1:7701:40 open 32",
        // The host's own addresses (the TLS front's 127.0.1.x) are not limited.
        "127.0.1.5:127.0.0.1:7700:300 open 300",
        "127.0.0.1:127.0.0.1:7701:40 open 40",
        // The front's clients are, on its port: 10 already held above.
        "192.0.2.11:192.0.2.1:7443:300 open 246",
    ] {
        assert!(r.stdout.lines().any(|l| l == want), "want {want:?}:\n{}", r.all());
    }
}

/// tuning/notrack.nft: connections to 7700, 7701 and 7710 are never
/// tracked (a probe rule that uses conntrack sees them as untracked),
/// others still are.
#[test]
fn notrack_leaves_the_switchboard_ports_untracked() {
    let Some((_t, probe)) = nft_probe("nft-notrack") else { return };
    let script = format!(
        r#"ip link set lo up
nft -c -f tuning/notrack.nft
nft -f tuning/notrack.nft
nft -f - <<'NFT'
table inet probe {{
  chain input {{
    type filter hook input priority filter; policy accept;
    tcp dport {{ 7700, 7701, 7710 }} ct state untracked counter name untracked_sb
    tcp dport {{ 7700, 7701, 7710 }} ct state new,established counter name tracked_sb
    tcp dport 7443 ct state new,established counter name tracked_other
  }}
  counter untracked_sb {{ }}
  counter tracked_sb {{ }}
  counter tracked_other {{ }}
}}
NFT
python3 {probe} 7700,7701,7710,7443 127.0.0.1:127.0.0.1:7700:5 127.0.0.1:127.0.0.1:7701:5 \
  127.0.0.1:127.0.0.1:7710:5 127.0.0.1:127.0.0.1:7443:5
for c in untracked_sb tracked_sb tracked_other; do
  echo "$c $(nft list counter inet probe $c | grep -o 'packets [0-9]*')"
done
"#,
        probe = probe.display()
    );
    let Some(r) = in_new_netns(&script, false) else { return };
    let r = r.ok();
    let packets = |name: &str| -> u64 {
        let line = r
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name} packets ")))
            .unwrap_or_else(|| panic!("{}", r.all()));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(packets("untracked_sb") >= 15, "{}", r.all());
    assert_eq!(packets("tracked_sb"), 0, "{}", r.all());
    assert!(packets("tracked_other") >= 5, "{}", r.all());
}

/// With conntrack loaded, nf_conntrack_max goes into the drop-in, but
/// systemd-sysctl applies it at boot only if the module is loaded by then
/// (the "-" before the key skips it silently otherwise): apply.sh says how
/// to make it so, for either profile.
#[test]
fn a_loaded_conntrack_comes_with_how_to_keep_its_limit_across_reboots() {
    let t = TempDir::new("conntrack");
    let proc = t.path().join("proc-sys");
    let mut entries = FAKE_SERVER.to_vec();
    entries.extend([
        ("net.netfilter.nf_conntrack_max", "262144"),
        ("net.ipv4.ip_local_port_range", "32768 60999"),
        ("net.ipv4.tcp_tw_reuse", "2"),
        ("net.ipv4.tcp_fin_timeout", "60"),
    ]);
    fake_proc(&proc, &entries);
    for role in ["server", "loadgen"] {
        let r = apply(&[
            "--dry-run",
            "--role",
            role,
            "--connections",
            "1000000",
            "--ram-bytes",
            RAM_16G,
            "--proc-sys",
            proc.to_str().unwrap(),
            "--limits-dir",
            &t.sub("l"),
        ])
        .ok();
        assert_eq!(table(&r.stdout)["net.netfilter.nf_conntrack_max"].action, "change", "{}", r.stdout);
        assert!(
            r.stdout.contains("/etc/modules-load.d/"),
            "{role}: nothing about loading nf_conntrack at boot:\n{}",
            r.stdout
        );
    }
    // Not loaded: not a word about it.
    let bare = t.path().join("bare");
    fake_proc(&bare, FAKE_SERVER);
    let r =
        apply(&["--dry-run", "--connections", "1000", "--ram-bytes", RAM_16G, "--proc-sys", bare.to_str().unwrap()])
            .ok();
    assert!(!r.stdout.contains("modules-load.d"), "{}", r.stdout);
}
