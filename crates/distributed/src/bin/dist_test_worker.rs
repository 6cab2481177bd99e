//! Helper process for this crate's multi-process tests (not a user tool).
//!
//! `dist-test-worker <mode> [args]`, with rank and world from the environment:
//! - `collectives <out_dir>`: runs every collective on `tests/common/data.rs`'s buffers and
//!   writes the results' bits to `<out_dir>/rank<R>.txt`.
//! - `die <victim>`: rank `victim` exits (code 3) after one all-reduce; the others keep
//!   all-reducing and must get an error: they print it and exit 42.
//! - `hang <victim>`: like `die`, but the victim sleeps instead of exiting.
//! - `mismatch`: rank 1 calls `barrier` while the others `all_reduce_sum`; exit 42 on error.
//! - `fail <victim>`: for the launcher: prints a line; rank `victim` exits 7 after 200 ms, the
//!   others sleep 60 s (the launcher must kill them).
//! - `hello`: prints its torchrun variables and `OMP_NUM_THREADS`, exits 0.
//! - `launch <nproc> <program> [args...]`: runs `alignment_distributed::launch::launch`, as
//!   `cargo xtask launch` does; exits 1 and prints the error if it fails.

#[path = "../../tests/common/data.rs"]
mod data;
use data::bits;

use alignment_distributed::launch::{launch, LaunchSpec};
use alignment_distributed::{Communicator, DistEnv, DistError, ShardLayout, TcpCommunicator};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

fn connect() -> TcpCommunicator {
    match TcpCommunicator::from_env() {
        Ok(Some(comm)) => comm,
        Ok(None) => panic!("not started as a multi-process job"),
        Err(e) => {
            eprintln!("connect failed: {e}");
            std::process::exit(2)
        }
    }
}

fn collectives(out_dir: &str) -> Result<(), DistError> {
    let mut comm = connect();
    let (rank, n) = (comm.rank(), comm.world_size());
    let mut out = String::new();
    for len in data::LENGTHS {
        let layout = ShardLayout::new(len, n);
        let mut reduced = data::buffer(rank, len);
        comm.all_reduce_sum(&mut reduced)?;
        writeln!(out, "all_reduce {len} {}", bits(&reduced)).unwrap();
        let shard = comm.reduce_scatter_sum(&data::buffer(rank, len), &layout)?;
        writeln!(out, "reduce_scatter {len} {}", bits(&shard)).unwrap();
        let own = data::buffer(rank, len)[layout.range(rank)].to_vec();
        let gathered = comm.all_gather(&own, &layout)?;
        writeln!(out, "all_gather {len} {}", bits(&gathered)).unwrap();
        for root in 0..n {
            let mut buffer = data::buffer(rank, len);
            comm.broadcast(&mut buffer, root)?;
            writeln!(out, "broadcast{root} {len} {}", bits(&buffer)).unwrap();
        }
        comm.barrier()?;
    }
    std::fs::write(format!("{out_dir}/rank{rank}.txt"), out).expect("write results");
    Ok(())
}

/// Keeps all-reducing until an error; exits 42 with the error printed.
fn expect_failure(comm: &mut TcpCommunicator) -> ! {
    let start = Instant::now();
    for _ in 0..100 {
        let mut buffer = data::buffer(comm.rank(), 1000);
        if let Err(e) = comm.all_reduce_sum(&mut buffer) {
            println!("rank {} error after {:.2}s: {e}", comm.rank(), start.elapsed().as_secs_f64());
            std::process::exit(42);
        }
    }
    println!("rank {}: no error", comm.rank());
    std::process::exit(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    match mode {
        "collectives" => {
            if let Err(e) = collectives(&args[2]) {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
        "die" | "hang" => {
            let victim: usize = args[2].parse().unwrap();
            let mut comm = connect();
            let mut buffer = data::buffer(comm.rank(), 1000);
            comm.all_reduce_sum(&mut buffer).expect("first all_reduce");
            if comm.rank() == victim {
                if mode == "die" {
                    std::process::exit(3);
                }
                std::thread::sleep(Duration::from_secs(60));
                std::process::exit(0);
            }
            expect_failure(&mut comm);
        }
        "mismatch" => {
            let mut comm = connect();
            let result = if comm.rank() == 1 { comm.barrier() } else { comm.all_reduce_sum(&mut [1.0; 10]) };
            match result {
                Err(e) => {
                    println!("rank {} error: {e}", comm.rank());
                    std::process::exit(42);
                }
                Ok(()) => println!("rank {}: no error", comm.rank()),
            }
        }
        "fail" => {
            let victim: usize = args[2].parse().unwrap();
            let env = DistEnv::from_env().unwrap().expect("launched");
            println!("rank {} of {} started", env.rank, env.world_size);
            if env.rank == victim {
                std::thread::sleep(Duration::from_millis(200));
                eprintln!("rank {victim} fails on purpose");
                std::process::exit(7);
            }
            std::thread::sleep(Duration::from_secs(60));
        }
        "hello" => {
            let env = DistEnv::from_env().unwrap().expect("launched");
            println!("hello from rank {} of {} (local {}) via {}", env.rank, env.world_size, env.local_rank, env.master());
            println!("OMP_NUM_THREADS={}", std::env::var("OMP_NUM_THREADS").unwrap_or_default());
        }
        "launch" => {
            let nproc: usize = args[2].parse().unwrap();
            let spec = LaunchSpec::new(nproc, &args[3], &args[4..]);
            if let Err(e) = launch(&spec) {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
        _ => {
            eprintln!("usage: dist-test-worker collectives|die|hang|mismatch|fail|hello|launch ...");
            std::process::exit(64);
        }
    }
}
