//! Collectives between 2 and 3 real OS processes over TCP, checked bit for bit against the
//! serial rank-order computation; and failures: a dead peer, a hung peer, mismatched calls.

mod common;

use alignment_distributed::ShardLayout;
use common::data::bits;
use common::{data, spawn, text, wait_all};
use std::time::Duration;

/// What every rank must report, computed serially: sums in rank order.
fn expected(rank: usize, n: usize) -> String {
    let mut out = String::new();
    for len in data::LENGTHS {
        let layout = ShardLayout::new(len, n);
        let mut sum = data::buffer(0, len);
        for r in 1..n {
            for (s, v) in sum.iter_mut().zip(data::buffer(r, len)) {
                *s += v;
            }
        }
        out += &format!("all_reduce {len} {}\n", bits(&sum));
        out += &format!("reduce_scatter {len} {}\n", bits(&sum[layout.range(rank)]));
        let gathered: Vec<f32> = (0..n).flat_map(|r| data::buffer(r, len)[layout.range(r)].to_vec()).collect();
        out += &format!("all_gather {len} {}\n", bits(&gathered));
        for root in 0..n {
            out += &format!("broadcast{root} {len} {}\n", bits(&data::buffer(root, len)));
        }
    }
    out
}

fn check_collectives(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let children = spawn(n, &["collectives", dir.path().to_str().unwrap()], "20");
    let (outputs, _) = wait_all(children, Duration::from_secs(60));
    for (rank, output) in outputs.iter().enumerate() {
        assert!(output.status.success(), "rank {rank} failed: {}", text(output));
    }
    for rank in 0..n {
        let got = std::fs::read_to_string(dir.path().join(format!("rank{rank}.txt"))).unwrap();
        let want = expected(rank, n);
        for (g, w) in got.lines().zip(want.lines()) {
            let name: String = w.split(' ').take(2).collect::<Vec<_>>().join(" ");
            assert!(g == w, "rank {rank} of {n}: {name} differs from the serial result");
        }
        assert_eq!(got.lines().count(), want.lines().count());
    }
}

#[test]
fn two_processes_match_the_serial_computation_bit_for_bit() {
    check_collectives(2);
}

#[test]
fn three_processes_match_the_serial_computation_bit_for_bit() {
    check_collectives(3);
}

#[test]
fn the_rank_order_sum_is_not_trivially_order_independent() {
    // Guard for the test data: summing in another order changes bits, so the tests above
    // really check the rank order.
    let len = 1001;
    let forward: Vec<f32> = (0..len).map(|i| (data::value(0, i) + data::value(1, i)) + data::value(2, i)).collect();
    let backward: Vec<f32> = (0..len).map(|i| (data::value(2, i) + data::value(1, i)) + data::value(0, i)).collect();
    assert_ne!(bits(&forward), bits(&backward));
}

#[test]
fn a_rank_that_exits_makes_the_others_fail_at_once() {
    // Timeout 30 s: the others must notice the closed connections, not wait for the timeout.
    let children = spawn(3, &["die", "1"], "30");
    let (outputs, elapsed) = wait_all(children, Duration::from_secs(20));
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}: the survivors waited instead of failing");
    assert_eq!(outputs[1].status.code(), Some(3), "{}", text(&outputs[1]));
    for rank in [0, 2] {
        let out = text(&outputs[rank]);
        assert_eq!(outputs[rank].status.code(), Some(42), "rank {rank}: {out}");
        assert!(out.contains(&format!("rank {rank}:")) && out.contains("closed the connection"), "rank {rank}: {out}");
    }
}

#[test]
fn a_silent_rank_makes_the_others_time_out() {
    let mut children = spawn(3, &["hang", "2"], "1");
    let mut victim = children.pop().unwrap();
    let (outputs, elapsed) = wait_all(children, Duration::from_secs(20));
    let _ = victim.kill();
    let _ = victim.wait();
    assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}");
    for rank in [0, 1] {
        let out = text(&outputs[rank]);
        assert_eq!(outputs[rank].status.code(), Some(42), "rank {rank}: {out}");
        // Either this rank timed out on rank 2, or the rank that did shut its links first.
        assert!(out.contains("no progress from rank 2") || out.contains("closed the connection"), "rank {rank}: {out}");
    }
    assert!(outputs.iter().any(|o| text(o).contains("no progress from rank 2")), "nobody reported the timeout");
}

#[test]
fn different_collectives_on_different_ranks_are_a_protocol_error() {
    let children = spawn(2, &["mismatch"], "5");
    let (outputs, elapsed) = wait_all(children, Duration::from_secs(20));
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    let all: String = outputs.iter().map(text).collect();
    assert!(all.contains("protocol mismatch"), "{all}");
    assert!(all.contains("barrier") && all.contains("reduce_scatter"), "{all}");
}

#[test]
fn a_missing_rank_fails_the_rendezvous_within_the_timeout() {
    // World size 3 but only ranks 0 and 1 start.
    let port = common::free_port().to_string();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            std::process::Command::new(common::WORKER)
                .args(["collectives", "/nonexistent"])
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "3")
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("ALIGNMENT_DIST_TIMEOUT_S", "1")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let (outputs, elapsed) = wait_all(children, Duration::from_secs(20));
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    let rank0 = text(&outputs[0]);
    assert!(rank0.contains("ranks [2] of 3 did not arrive"), "{rank0}");
    assert_eq!(outputs[1].status.code(), Some(2), "{}", text(&outputs[1]));
}
