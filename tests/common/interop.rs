//! What the interoperability tests share (tests/ws_interop.rs,
//! tests/tls_front.rs): the Python they run and its `websockets` package,
//! and a script under test whose stdout is a stream of checkpoint lines.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The Python the tests run: `$SWITCHBOARD_PYTHON` (scripts/test.sh sets it
/// to the interpreter it installed `websockets` into), else `python3`.
pub fn python() -> String {
    std::env::var("SWITCHBOARD_PYTHON").ok().filter(|p| !p.is_empty()).unwrap_or_else(|| "python3".into())
}

/// How long one script may run, all checkpoints included.
pub const SCRIPT_DEADLINE: Duration = Duration::from_secs(60);

pub fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("interop")
}

/// Fails (never skips) unless the tests' Python can import
/// `websockets.sync.client`.
pub fn require_python_websockets() {
    let py = python();
    match Command::new(&py).args(["-c", "import websockets.sync.client"]).output() {
        Err(e) => panic!(
            "this test needs {py}, which could not be run ({e}): run scripts/test.sh as root (it installs python3 and \
             the websockets package), or install python3"
        ),
        Ok(o) if !o.status.success() => panic!(
            "this test needs the Python package `websockets` (11 or later, for websockets.sync.client) in {py}: run \
             scripts/test.sh as root, or `{py} -m pip install websockets`\n{py} said: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Ok(_) => {}
    }
}

/// A Python script under test: its stdout as a stream of checkpoint lines,
/// its stderr kept for the failure report, its stdin for the test's answers
/// ([`Script::tell`]), killed when dropped.
pub struct Script {
    name: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: Option<JoinHandle<String>>,
    deadline: Instant,
}

impl Script {
    pub fn spawn(name: &'static str, args: &[String]) -> Script {
        let mut child = Command::new(python())
            .arg(interop_dir().join(name))
            .args(args)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run python3 {name}: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Script {
            name,
            child,
            stdin,
            lines,
            seen: Vec::new(),
            stderr: Some(stderr),
            deadline: Instant::now() + SCRIPT_DEADLINE,
        }
    }

    /// The next line of output, which must start with `prefix`.
    pub fn expect(&mut self, prefix: &str) -> String {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => {
                self.seen.push(line.clone());
                if !line.starts_with(prefix) {
                    self.fail(&format!("expected a line starting with {prefix:?}, got {line:?}"));
                }
                line
            }
            Err(RecvTimeoutError::Timeout) => {
                self.fail(&format!("no line {prefix:?} within {} s", SCRIPT_DEADLINE.as_secs()))
            }
            Err(RecvTimeoutError::Disconnected) => self.fail(&format!("output ended before a line {prefix:?}")),
        }
    }

    /// Writes one line to the script's stdin: the test's answer at a
    /// checkpoint where the script must wait until the test has acted (e.g.
    /// stored messages while the script's client was offline, which the
    /// script cannot observe).
    pub fn tell(&mut self, line: &str) {
        let sent = self.stdin.as_mut().map(|w| writeln!(w, "{line}").and_then(|_| w.flush()));
        if !matches!(sent, Some(Ok(()))) {
            self.fail(&format!("cannot tell it {line:?}: its stdin is closed"));
        }
    }

    /// Waits for the script to end its output and exit 0.
    pub fn finish(mut self) {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => {
                self.seen.push(line.clone());
                self.fail(&format!("unexpected line after DONE: {line:?}"));
            }
            Err(RecvTimeoutError::Timeout) => self.fail("did not exit after DONE"),
            Err(RecvTimeoutError::Disconnected) => {}
        }
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) if st.success() => {
                    // Warnings (a deprecation in a new websockets) show with --nocapture.
                    let stderr = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
                    if !stderr.trim().is_empty() {
                        eprintln!("{} stderr:\n{}", self.name, stderr.trim_end());
                    }
                    return;
                }
                Ok(Some(st)) => self.fail(&format!("exited with {st}")),
                Ok(None) if Instant::now() < self.deadline => std::thread::sleep(Duration::from_millis(20)),
                Ok(None) => self.fail("did not exit after DONE"),
                Err(e) => self.fail(&format!("wait failed: {e}")),
            }
        }
    }

    /// Kills the script and panics with everything it printed.
    pub fn fail(&mut self, what: &str) -> ! {
        let _ = self.child.kill();
        let status = self.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
        let stderr = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
        panic!(
            "{}: {what} ({status})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.name,
            self.seen.join("\n"),
            stderr.trim_end()
        );
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
