//! The process launcher behind `cargo xtask launch`: N copies of a program with torchrun's
//! environment variables, output prefixed by rank, and all-or-nothing failure.

use crate::DistError;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

#[cfg(unix)]
use libc::{SIGKILL, SIGTERM};
#[cfg(not(unix))]
const SIGKILL: i32 = 9;
#[cfg(not(unix))]
const SIGTERM: i32 = 15;

/// What to launch.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Number of processes (ranks) on this machine.
    pub nproc: usize,
    /// `MASTER_ADDR` given to the ranks.
    pub master_addr: String,
    /// `MASTER_PORT`; `None` picks a free port.
    pub master_port: Option<u16>,
    /// The program.
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Extra environment variables for every rank (e.g. `ALIGNMENT_ACCELERATE_CONFIG`).
    pub env: Vec<(OsString, OsString)>,
}

impl LaunchSpec {
    /// `nproc` copies of `program args` on 127.0.0.1 with a free port.
    pub fn new(nproc: usize, program: impl Into<OsString>, args: impl IntoIterator<Item = impl Into<OsString>>) -> Self {
        LaunchSpec {
            nproc,
            master_addr: "127.0.0.1".into(),
            master_port: None,
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
        }
    }
}

/// A port that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> Result<u16, DistError> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| DistError::Launch { detail: format!("cannot find a free port: {e}") })?;
    listener.local_addr().map(|a| a.port()).map_err(|e| DistError::Launch { detail: format!("cannot find a free port: {e}") })
}

fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return format!("killed by signal {signal}");
        }
    }
    match status.code() {
        Some(code) => format!("exit code {code}"),
        None => status.to_string(),
    }
}

/// Copies `from` line by line to stdout or stderr, each line prefixed by `[rank N] `.
fn forward(from: impl Read + Send + 'static, rank: usize, to_stderr: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if !line.ends_with(b"\n") {
                        line.push(b'\n');
                    }
                    let mut text = format!("[rank {rank}] ").into_bytes();
                    text.extend_from_slice(&line);
                    let _ = if to_stderr { std::io::stderr().lock().write_all(&text) } else { std::io::stdout().lock().write_all(&text) };
                }
            }
        }
    })
}

fn stopped_by_us(status: ExitStatus) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        matches!(status.signal(), Some(SIGTERM) | Some(SIGKILL))
    }
    #[cfg(not(unix))]
    {
        let _ = status;
        false
    }
}

/// Sends `signal` to a child that has not been reaped yet.
fn signal(pid: u32, exited: &AtomicBool, signal: i32) {
    if exited.load(Ordering::SeqCst) {
        return;
    }
    #[cfg(unix)]
    // SAFETY: kill(2) on the pid of a child of ours that its waiter thread has not reaped.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
    #[cfg(not(unix))]
    let _ = (pid, signal);
}

/// How long stopped ranks get between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(3);

/// OpenMP threads per rank, `OMP_NUM_THREADS`, when neither the launcher's environment nor
/// `spec.env` sets it: the host's cores shared among the ranks (at least one). libtorch (the
/// `tch` backend) otherwise starts a thread per core in every rank, so N ranks on one host
/// oversubscribe the cores N times; torchrun sets 1. The CPU backend's threads are rayon's, not
/// OpenMP's, and stay as they are.
fn omp_threads(spec: &LaunchSpec) -> Option<String> {
    let set = std::env::var_os("OMP_NUM_THREADS").is_some() || spec.env.iter().any(|(k, _)| k == "OMP_NUM_THREADS");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (!set).then(|| (cores / spec.nproc).max(1).to_string())
}

/// Runs `spec.nproc` ranks with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
/// `MASTER_ADDR`, `MASTER_PORT` (and [`omp_threads`]) set, streams their output prefixed by
/// rank, and waits. When a rank exits non-zero or is killed, the others get SIGTERM (SIGKILL
/// after 3 s) and the error names the rank that failed first ([`DistError::RankFailed`]). `Ok`
/// when every rank exited with status 0.
pub fn launch(spec: &LaunchSpec) -> Result<(), DistError> {
    if spec.nproc == 0 {
        return Err(DistError::Launch { detail: "--nproc must be at least 1".into() });
    }
    let port = match spec.master_port {
        Some(port) => port,
        None => free_port()?,
    };
    // One waiter thread per rank reports (rank, status) as soon as the rank exits, so the
    // order of the reports is the order of the exits.
    let (events, exits) = mpsc::channel::<(usize, std::io::Result<ExitStatus>)>();
    let mut pids = Vec::with_capacity(spec.nproc);
    let mut threads = Vec::new();
    let stop_all = |pids: &[(u32, Arc<AtomicBool>)], sig: i32| {
        for (pid, exited) in pids {
            signal(*pid, exited, sig);
        }
    };
    let omp = omp_threads(spec);
    for rank in 0..spec.nproc {
        let mut command = Command::new(&spec.program);
        if let Some(threads) = &omp {
            command.env("OMP_NUM_THREADS", threads);
        }
        command
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", spec.nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", spec.nproc.to_string())
            .env("MASTER_ADDR", &spec.master_addr)
            .env("MASTER_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                stop_all(&pids, SIGKILL);
                drop(events);
                for _ in exits.iter() {}
                return Err(DistError::Launch { detail: format!("cannot start rank {rank} ({:?}): {e}", spec.program) });
            }
        };
        threads.push(forward(child.stdout.take().expect("piped"), rank, false));
        threads.push(forward(child.stderr.take().expect("piped"), rank, true));
        let exited = Arc::new(AtomicBool::new(false));
        pids.push((child.id(), exited.clone()));
        let events = events.clone();
        threads.push(std::thread::spawn(move || {
            let status = child.wait();
            exited.store(true, Ordering::SeqCst);
            let _ = events.send((rank, status));
        }));
    }
    drop(events);
    let mut failure: Option<(usize, String)> = None;
    let mut also_failed = Vec::new();
    let mut stop_deadline: Option<Instant> = None;
    let mut remaining = spec.nproc;
    while remaining > 0 {
        let event = match stop_deadline {
            None => exits.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            Some(deadline) => exits.recv_timeout(deadline.saturating_duration_since(Instant::now())),
        };
        match event {
            Ok((rank, status)) => {
                remaining -= 1;
                let problem = match status {
                    Ok(status) if status.success() => None,
                    // Stopped by us after the first failure: not a failure of its own.
                    Ok(status) if failure.is_some() && stopped_by_us(status) => None,
                    Ok(status) => Some(describe(status)),
                    Err(e) => Some(format!("cannot wait for it: {e}")),
                };
                if let Some(problem) = problem {
                    if failure.is_none() {
                        failure = Some((rank, problem));
                        stop_all(&pids, SIGTERM);
                        stop_deadline = Some(Instant::now() + GRACE);
                    } else {
                        also_failed.push(format!("rank {rank}: {problem}"));
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                stop_all(&pids, SIGKILL);
                stop_deadline = None;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    for thread in threads {
        let _ = thread.join();
    }
    match failure {
        Some((rank, status)) => Err(DistError::RankFailed { rank, status, others: also_failed }),
        None => Ok(()),
    }
}
