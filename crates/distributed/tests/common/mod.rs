//! Helpers to run the worker binary as N real processes.
#![allow(dead_code)]

pub mod data;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The helper binary.
pub const WORKER: &str = env!("CARGO_BIN_EXE_dist-test-worker");

/// A port free a moment ago, below Linux's ephemeral range (32768–60999). The tests of one
/// binary run in parallel and their ranks bind listeners to port 0: an ephemeral port released
/// by the launcher's `free_port` could be handed to another test's rank before this test's rank
/// 0 binds it, and that rank would then answer this test's rendezvous (seen once as "rank 0
/// closed the connection before every rank arrived"). Ports are taken from a block picked by
/// the process id, one after another, each checked free.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 500) as u16 * 24;
    for _ in 0..24 {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 24;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    alignment_distributed::launch::free_port().unwrap()
}

/// Starts `n` workers `WORKER args` with torchrun's variables on 127.0.0.1.
pub fn spawn(n: usize, args: &[&str], timeout_s: &str) -> Vec<Child> {
    let port = free_port().to_string();
    (0..n)
        .map(|rank| {
            Command::new(WORKER)
                .args(args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", n.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("ALIGNMENT_DIST_TIMEOUT_S", timeout_s)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start worker")
        })
        .collect()
}

/// Waits for every child, killing any still running after `limit` (so a hang fails the test
/// instead of hanging it). Returns each output and the time until the last exit.
pub fn wait_all(children: Vec<Child>, limit: Duration) -> (Vec<Output>, Duration) {
    let start = Instant::now();
    let mut children: Vec<Child> = children;
    loop {
        let done = children.iter_mut().all(|c| c.try_wait().unwrap().is_some());
        if done || start.elapsed() > limit {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let elapsed = start.elapsed();
    for child in &mut children {
        let _ = child.kill();
    }
    (children.into_iter().map(|c| c.wait_with_output().unwrap()).collect(), elapsed)
}

/// stdout and stderr of a process, for assertion messages.
pub fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}
