//! User/system split of some threads' CPU time from `perf` samples.
//!
//! Why: `/proc`'s utime/stime split comes from the scheduler tick (250
//! per second on the reference host). A single fan-out of 15,000
//! deliveries spends a few ms in user mode, so even 60 of them are a few
//! dozen user ticks, and the figure moved between 166 and 300 ns per
//! delivery for one binary. A `cpu-clock` sample every `SAMPLE_PERIOD_NS`
//! of the threads' run time gives several times more samples, and
//! `perf report` on the recording shows where the user time goes. A sample
//! counts as kernel when its instruction pointer is a kernel address; the
//! scheduler's nanosecond total is split in the ratio of the samples, as
//! the kernel splits it in the ratio of its ticks.
//!
//! Both are samples taken by a timer interrupt, and in a loop of one
//! syscall per delivery an interrupt that falls due while the kernel runs
//! with interrupts off is taken at the first user instruction after the
//! return: neither method resolves a few ns of user code next to 15 µs of
//! kernel work. Compare windows of one run (fan-out against the plain send
//! loop over the same sockets), not absolute figures across hosts or days.
//! Sampling costs the threads CPU too (each timer interrupt is a VM exit
//! here): a few percent at this period; at 10,000 per second their kernel
//! time grew by about a fifth.
//!
//! Owns: one `perf record` process per measured window, started disabled
//! and switched on and off through its control FIFO (`--control`), so
//! that perf's start-up and exit fall outside the window; reading the
//! samples back with `perf script`.
//! Must not: stand in for a measurement. When perf is missing or refuses
//! (no permission to sample these threads), `start` says why and the
//! caller reports the tick-sampled split, labelled as such.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{ProcStat, ThreadCpu};

/// Thread CPU time per sample: 2,000 samples per second of run time, eight
/// times the tick.
pub const SAMPLE_PERIOD_NS: u64 = 500_000;

/// How long perf may take to answer a control command.
const ACK_WAIT: Duration = Duration::from_secs(20);

/// Kernel text on x86-64 and arm64 lies in the top half of the address
/// space.
const KERNEL_HALF: u64 = 1 << 63;

/// Samples counted in one window.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Samples {
    pub user: u64,
    pub kernel: u64,
}

impl Samples {
    /// Share of user-mode samples (`None` without samples).
    pub fn user_share(&self) -> Option<f64> {
        let n = self.user + self.kernel;
        (n > 0).then(|| self.user as f64 / n as f64)
    }

    /// Counts the `perf script -F ip` output: one hexadecimal address per
    /// line.
    pub fn parse(text: &str) -> Self {
        let mut s = Samples::default();
        for ip in text.lines().filter_map(|l| u64::from_str_radix(l.trim(), 16).ok()) {
            if ip >= KERNEL_HALF {
                s.kernel += 1;
            } else {
                s.user += 1;
            }
        }
        s
    }
}

/// A `perf record` attached to some threads, recording only while enabled.
pub struct PerfSplit {
    child: Child,
    ctl: File,
    ack: BufReader<File>,
    dir: PathBuf,
}

impl PerfSplit {
    /// Attaches perf to `tids`, disabled. Its files go to `dir`, emptied
    /// first.
    pub fn start(tids: &[u32], dir: &Path) -> Result<Self, String> {
        if tids.is_empty() {
            return Err("no threads to sample".into());
        }
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (ctl_path, ack_path) = (dir.join("ctl"), dir.join("ack"));
        for p in [&ctl_path, &ack_path] {
            let c = std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
            // SAFETY: `c` is a valid NUL-terminated path for the call.
            if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
                return Err(format!("mkfifo {}: {}", p.display(), std::io::Error::last_os_error()));
            }
        }
        let list = tids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let control = format!("fifo:{},{}", ctl_path.display(), ack_path.display());
        let err = File::create(dir.join("perf.err")).map_err(|e| e.to_string())?;
        let child = Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-c", &SAMPLE_PERIOD_NS.to_string(), "-t", &list, "-D", "-1"])
            .args(["--control", &control, "-o"])
            .arg(dir.join("perf.data"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("perf: {e}"))?;
        // Read-write opens: a FIFO opened this way does not wait for perf
        // to open its end.
        let open = |p: &Path| OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(p);
        let ctl = open(&ctl_path).map_err(|e| e.to_string())?;
        let ack = BufReader::new(open(&ack_path).map_err(|e| e.to_string())?);
        let mut me = PerfSplit { child, ctl, ack, dir: dir.to_path_buf() };
        // A first disable proves perf is attached and listening.
        if let Err(e) = me.command("disable") {
            let _ = me.child.kill();
            let _ = me.child.wait();
            let said = std::fs::read_to_string(dir.join("perf.err")).unwrap_or_default();
            return Err(format!("{e}; perf said: {}", said.trim()));
        }
        Ok(me)
    }

    fn command(&mut self, what: &str) -> Result<(), String> {
        writeln!(self.ctl, "{what}").map_err(|e| e.to_string())?;
        let mut pfd = libc::pollfd { fd: self.ack.get_ref().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ACK_WAIT.as_millis() as i32) };
        if n != 1 {
            return Err(format!("perf did not acknowledge `{what}` within {ACK_WAIT:?}"));
        }
        let mut line = String::new();
        self.ack.read_line(&mut line).map_err(|e| e.to_string())?;
        // perf writes "ack\n" and a NUL, which starts the next line read.
        let line = line.trim_matches(|c: char| c == '\0' || c.is_whitespace());
        if line != "ack" {
            return Err(format!("perf answered `{}` to `{what}`", line.escape_debug()));
        }
        Ok(())
    }

    /// Starts counting samples.
    pub fn enable(&mut self) -> Result<(), String> {
        self.command("enable")
    }

    /// Stops counting.
    pub fn disable(&mut self) -> Result<(), String> {
        self.command("disable")
    }

    /// Ends perf (disabled first, by `disable`) and counts the samples
    /// taken while enabled, by mode. The recording stays in
    /// `<dir>/perf.data` for `perf report -i`.
    pub fn finish(mut self) -> Result<Samples, String> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().map_err(|e| e.to_string())?;
        // perf record ends on SIGINT by raising it again once it has written
        // its data.
        if !status.success() && status.signal() != Some(libc::SIGINT) {
            return Err(format!("perf record ended with {status}"));
        }
        let out = Command::new("perf")
            .args(["script", "-F", "ip", "-i"])
            .arg(self.dir.join("perf.data"))
            .stderr(Stdio::null())
            .output()
            .map_err(|e| format!("perf script: {e}"))?;
        if !out.status.success() {
            return Err(format!("perf script ended with {}", out.status));
        }
        Ok(Samples::parse(&String::from_utf8_lossy(&out.stdout)))
    }
}

impl Drop for PerfSplit {
    /// A window abandoned on an error ends its perf too.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// CPU time of this process's threads named `prefix*` over a window, split
/// into user and system time by perf samples when perf can sample them,
/// otherwise by the scheduler's ticks.
pub struct CpuWindow {
    prefix: String,
    start: ThreadCpu,
    perf: Result<PerfSplit, String>,
}

/// What a `CpuWindow` measured.
#[derive(Clone, Debug)]
pub struct CpuSplit {
    pub user_ns: f64,
    pub sys_ns: f64,
    /// The scheduler's run time of the threads over the window (what is
    /// split).
    pub sched_ns: f64,
    /// `perf` samples, or `None` when the split is the ticks'.
    pub samples: Option<Samples>,
    /// Why perf was not used, if it was not.
    pub perf_error: Option<String>,
}

impl CpuSplit {
    /// How the split was made, for reports.
    pub fn method(&self) -> &'static str {
        if self.samples.is_some() {
            "perf cpu-clock samples"
        } else {
            "scheduler ticks"
        }
    }
}

impl CpuWindow {
    /// Opens the window. `perf_dir` is where perf keeps its files; `None`
    /// uses the ticks.
    pub fn open(prefix: &str, perf_dir: Option<&Path>) -> Self {
        let perf = match perf_dir {
            Some(dir) => PerfSplit::start(&ProcStat::thread_ids(prefix), dir),
            None => Err("not asked for".into()),
        };
        let start = ProcStat::threads_cpu(prefix);
        let perf = perf.and_then(|mut p| p.enable().map(|()| p));
        CpuWindow { prefix: prefix.into(), start, perf }
    }

    /// Closes the window.
    pub fn close(self) -> CpuSplit {
        let CpuWindow { prefix, start, perf } = self;
        let perf = perf.and_then(|mut p| p.disable().map(|()| p));
        let end = ProcStat::threads_cpu(&prefix);
        let sched_ns = end.total_ns.saturating_sub(start.total_ns) as f64;
        match perf.and_then(PerfSplit::finish) {
            Ok(samples) if samples.user_share().is_some() => {
                let share = samples.user_share().unwrap_or(0.0);
                let (user_ns, sys_ns) = (sched_ns * share, sched_ns * (1.0 - share));
                CpuSplit { user_ns, sys_ns, sched_ns, samples: Some(samples), perf_error: None }
            }
            other => {
                let (user_ns, sys_ns) = end.since(&start);
                let why = other.err().unwrap_or_else(|| "perf took no samples".into());
                CpuSplit { user_ns, sys_ns, sched_ns, samples: None, perf_error: Some(why) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_told_apart_by_address_half() {
        let s = Samples::parse("     7f95691342ad\n ffffffff816d5b75\n ffffffff81d7f1a5\n\n 55d0c3a1b2c4\nnot-an-ip\n");
        assert_eq!(s, Samples { user: 2, kernel: 2 });
        assert_eq!(s.user_share(), Some(0.5));
        assert_eq!(Samples::default().user_share(), None);
    }
}
