//! The launcher (`cargo xtask launch` calls `alignment_distributed::launch::launch`), end to end
//! with real processes: environment, prefixed output, and stopping everyone when a rank fails.

mod common;

use common::{text, wait_all, WORKER};
use std::process::{Command, Stdio};
use std::time::Duration;

fn run_launcher(args: &[&str]) -> (std::process::Output, Duration) {
    run_launcher_with(args, None)
}

/// The launcher run with `OMP_NUM_THREADS` set to `omp` in its environment, or unset.
fn run_launcher_with(args: &[&str], omp: Option<&str>) -> (std::process::Output, Duration) {
    let mut command = Command::new(WORKER);
    match omp {
        Some(threads) => command.env("OMP_NUM_THREADS", threads),
        None => command.env_remove("OMP_NUM_THREADS"),
    };
    let child = command.arg("launch").args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (mut outputs, elapsed) = wait_all(vec![child], Duration::from_secs(30));
    (outputs.remove(0), elapsed)
}

#[test]
fn launched_ranks_get_torchrun_variables_and_prefixed_output() {
    let (output, _) = run_launcher(&["3", WORKER, "hello"]);
    let out = text(&output);
    assert!(output.status.success(), "{out}");
    for rank in 0..3 {
        assert!(out.contains(&format!("[rank {rank}] hello from rank {rank} of 3 (local {rank}) via 127.0.0.1:")), "{out}");
    }
}

#[test]
fn ranks_share_the_cores_among_their_openmp_threads_unless_told() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (output, _) = run_launcher_with(&["3", WORKER, "hello"], None);
    let out = text(&output);
    let expected = (cores / 3).max(1);
    for rank in 0..3 {
        assert!(out.contains(&format!("[rank {rank}] OMP_NUM_THREADS={expected}\n")), "{cores} cores: {out}");
    }
    let (output, _) = run_launcher_with(&["2", WORKER, "hello"], Some("5"));
    let out = text(&output);
    assert!(out.contains("[rank 0] OMP_NUM_THREADS=5\n") && out.contains("[rank 1] OMP_NUM_THREADS=5\n"), "{out}");
}

#[test]
fn launched_ranks_run_collectives() {
    let dir = tempfile::tempdir().unwrap();
    let (output, _) = run_launcher(&["2", WORKER, "collectives", dir.path().to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output));
    let a = std::fs::read_to_string(dir.path().join("rank0.txt")).unwrap();
    let b = std::fs::read_to_string(dir.path().join("rank1.txt")).unwrap();
    let all_reduce = |s: &str| s.lines().filter(|l| l.starts_with("all_reduce")).map(String::from).collect::<Vec<_>>();
    assert_eq!(all_reduce(&a), all_reduce(&b));
}

#[test]
fn a_failing_rank_stops_the_others_and_is_named() {
    // Ranks 0 and 2 would sleep 60 s; rank 1 exits 7 after 200 ms.
    let (output, elapsed) = run_launcher(&["3", WORKER, "fail", "1"]);
    let out = text(&output);
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}: the launcher did not stop the others\n{out}");
    assert_eq!(output.status.code(), Some(1), "{out}");
    assert!(out.contains("rank 1 failed (exit code 7); the other ranks were stopped"), "{out}");
    assert!(out.contains("[rank 1] rank 1 fails on purpose"), "{out}");
}

#[test]
fn a_dying_rank_is_named_with_the_ones_it_took_down() {
    // Rank 1 exits 3 after one all-reduce; ranks 0 and 2 then fail with exit 42 within
    // microseconds, so which exit the launcher sees first is a race: all are named.
    let (output, elapsed) = run_launcher(&["3", WORKER, "die", "1"]);
    let out = text(&output);
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}\n{out}");
    assert_eq!(output.status.code(), Some(1), "{out}");
    assert!(out.contains("rank 1 failed (exit code 3)") || out.contains("rank 1: exit code 3"), "{out}");
}
