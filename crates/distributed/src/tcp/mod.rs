//! The CPU transport: a full mesh of TCP connections (std::net), set up through a rendezvous at
//! `MASTER_ADDR:MASTER_PORT`.
//!
//! Algorithms (N ranks, buffer of S bytes):
//! - `reduce_scatter_sum`: every rank sends shard j of its buffer straight to rank j, which sums
//!   the N contributions in rank order. Each rank sends and receives (N-1)/N·S.
//! - `all_gather`: every rank sends its shard to every other rank: (N-1)/N·S each way.
//! - `all_reduce_sum` = reduce-scatter + all-gather: 2(N-1)/N·S each way per rank, the
//!   bandwidth-optimal volume (the same as a ring all-reduce), and since each shard's sum is
//!   computed once, by its owner, in rank order, every rank gets the same bits.
//! - `broadcast`: the root sends the whole buffer to each peer ((N-1)·S out of the root); used
//!   once at start-up, so a tree is not worth it.
//!
//! Every message carries the collective, a sequence number and its length, so ranks that call
//! different collectives fail with [`DistError::Protocol`] instead of mixing data. Sends and
//! receives run on one thread per peer, so full-duplex exchanges cannot deadlock on socket
//! buffers. A closed connection is reported at once; a silent peer after the timeout (socket
//! read/write timeouts). The first failure shuts down every link, so the peers fail fast too.

mod rendezvous;
mod wire;

use crate::comm::{check_layout, check_shard};
use crate::{Communicator, DistEnv, DistError, ShardLayout};
use std::net::{Shutdown, TcpStream};
use std::sync::Mutex;
use std::time::Duration;
use wire::{Header, Op};

/// [`Communicator`] over TCP between OS processes (one per rank), for CPU training and tests.
#[derive(Debug)]
pub struct TcpCommunicator {
    rank: usize,
    world_size: usize,
    /// Indexed by peer rank; `None` at this rank's own index.
    links: Vec<Option<TcpStream>>,
    seq: u64,
    timeout: Duration,
    failed: Option<String>,
}

/// One message to send: peer and payload.
type Send<'a> = (usize, &'a [u8]);

impl TcpCommunicator {
    /// Meets the other ranks at `env.master()` (rank 0 listens there, the others connect,
    /// retrying until `timeout`), builds the mesh and checks it with a barrier. Fails with a
    /// [`DistError`] naming the missing or misbehaving rank if the world is not complete within
    /// `timeout`; `timeout` is also the collectives' timeout for a silent peer.
    pub fn connect(env: &DistEnv, timeout: Duration) -> Result<Self, DistError> {
        let links = rendezvous::connect_mesh(env, timeout)?;
        let mut comm = TcpCommunicator { rank: env.rank, world_size: env.world_size, links, seq: 0, timeout, failed: None };
        comm.barrier()?;
        Ok(comm)
    }

    /// [`TcpCommunicator::connect`] with the environment's rank and timeout
    /// (`ALIGNMENT_DIST_TIMEOUT_S`); `Ok(None)` when the process is not part of a multi-process job.
    pub fn from_env() -> Result<Option<Self>, DistError> {
        let Some(env) = DistEnv::from_env()? else {
            return Ok(None);
        };
        Ok(Some(Self::connect(&env, crate::env::timeout_from_env()?)?))
    }

    /// The timeout for a silent peer.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Broadcasts a byte string of any length from `root` (used to share NCCL's unique id).
    pub fn broadcast_bytes(&mut self, bytes: &mut Vec<u8>, root: usize) -> Result<(), DistError> {
        self.check_root(root, "broadcast_bytes")?;
        let op = Op::BroadcastBytes as u32 | ((root as u32) << 8);
        if self.rank == root {
            let sends: Vec<Send> = self.peers().map(|p| (p, bytes.as_slice())).collect();
            self.exchange(op, &sends, &[])?;
        } else {
            let mut received = self.exchange(op, &[], &[(root, None)])?;
            *bytes = received.pop().expect("one message from the root");
        }
        Ok(())
    }

    fn peers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.world_size).filter(move |&p| p != self.rank)
    }

    fn check_root(&self, root: usize, what: &str) -> Result<(), DistError> {
        if root >= self.world_size {
            return Err(DistError::InvalidArgument {
                rank: self.rank,
                detail: format!("{what}: root {root} out of range for world size {}", self.world_size),
            });
        }
        Ok(())
    }

    /// Sends `sends` and receives one message from each of `recvs` (peer, expected byte length
    /// or any), all concurrently; returns the received payloads in `recvs` order.
    fn exchange(&mut self, op: u32, sends: &[Send], recvs: &[(usize, Option<usize>)]) -> Result<Vec<Vec<u8>>, DistError> {
        if let Some(first_error) = &self.failed {
            return Err(DistError::Poisoned { rank: self.rank, first_error: first_error.clone() });
        }
        self.seq += 1;
        let (rank, seq, timeout, links) = (self.rank, self.seq, self.timeout, &self.links);
        let op_name = Op::name(op);
        let first_error: Mutex<Option<DistError>> = Mutex::new(None);
        let fail = |error: DistError| {
            let mut first = first_error.lock().unwrap_or_else(|e| e.into_inner());
            if first.is_none() {
                *first = Some(error);
                // Unblock the other threads (and tell the peers) at once.
                for link in links.iter().flatten() {
                    let _ = link.shutdown(Shutdown::Both);
                }
            }
        };
        let link = |peer: usize| links[peer].as_ref().expect("no link to self");
        let received: Vec<Option<Vec<u8>>> = std::thread::scope(|scope| {
            for &(peer, payload) in sends {
                let (fail, op_name) = (&fail, &op_name);
                scope.spawn(move || {
                    let header = Header { op, seq, bytes: payload.len() as u64 };
                    if let Err(e) = wire::send(link(peer), header, payload) {
                        fail(wire::io_error(rank, peer, op_name, e, timeout));
                    }
                });
            }
            let handles: Vec<_> = recvs
                .iter()
                .map(|&(peer, expected)| {
                    let (fail, op_name) = (&fail, &op_name);
                    scope.spawn(move || {
                        let stream = link(peer);
                        let header = match wire::recv_header(stream) {
                            Ok(header) => header,
                            Err(e) => {
                                fail(wire::io_error(rank, peer, op_name, e, timeout));
                                return None;
                            }
                        };
                        let length_ok = expected.is_none_or(|n| header.bytes == n as u64);
                        if header.op != op || header.seq != seq || !length_ok {
                            let expected_len = expected.map_or("any length".to_string(), |n| format!("{n} bytes"));
                            let detail = format!(
                                "expected {op_name} #{seq} of {expected_len}, received {} #{} of {} bytes (do all ranks run the same collectives in the same order with the same sizes?)",
                                Op::name(header.op),
                                header.seq,
                                header.bytes
                            );
                            fail(DistError::Protocol { rank, peer, detail });
                            return None;
                        }
                        let mut payload = vec![0u8; header.bytes as usize];
                        match wire::recv_payload(stream, &mut payload) {
                            Ok(()) => Some(payload),
                            Err(e) => {
                                fail(wire::io_error(rank, peer, op_name, e, timeout));
                                None
                            }
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(None)).collect()
        });
        if let Some(error) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
            self.failed = Some(error.to_string());
            return Err(error);
        }
        Ok(received.into_iter().map(|r| r.expect("no error, so every message arrived")).collect())
    }
}

fn as_bytes(values: &[f32]) -> &[u8] {
    bytemuck::cast_slice(values)
}

/// Received bytes as `f32` (copied: a `Vec<u8>` is not aligned for `f32`).
fn to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, buffer: &mut [f32]) -> Result<(), DistError> {
        let layout = ShardLayout::new(buffer.len(), self.world_size);
        let shard = self.reduce_scatter_sum(buffer, &layout)?;
        let full = self.all_gather(&shard, &layout)?;
        buffer.copy_from_slice(&full);
        Ok(())
    }

    fn reduce_scatter_sum(&mut self, buffer: &[f32], layout: &ShardLayout) -> Result<Vec<f32>, DistError> {
        check_layout(self.rank, self.world_size, layout, buffer.len(), "reduce_scatter")?;
        let own = layout.range(self.rank);
        let sends: Vec<Send> = self.peers().map(|p| (p, as_bytes(&buffer[layout.range(p)]))).collect();
        let recvs: Vec<(usize, Option<usize>)> = self.peers().map(|p| (p, Some(own.len() * 4))).collect();
        let received = self.exchange(Op::ReduceScatter as u32, &sends, &recvs)?;
        // Contributions in rank order; this rank's own at its index.
        let mut contributions: Vec<Vec<f32>> = received.iter().map(|b| to_f32(b)).collect();
        contributions.insert(self.rank, buffer[own].to_vec());
        let mut contributions = contributions.into_iter();
        let mut sum = contributions.next().expect("at least one rank");
        for contribution in contributions {
            for (s, c) in sum.iter_mut().zip(&contribution) {
                *s += *c;
            }
        }
        Ok(sum)
    }

    fn all_gather(&mut self, shard: &[f32], layout: &ShardLayout) -> Result<Vec<f32>, DistError> {
        check_shard(self.rank, self.world_size, layout, shard.len(), "all_gather")?;
        let sends: Vec<Send> = self.peers().map(|p| (p, as_bytes(shard))).collect();
        let recvs: Vec<(usize, Option<usize>)> = self.peers().map(|p| (p, Some(layout.shard_len(p) * 4))).collect();
        let received = self.exchange(Op::AllGather as u32, &sends, &recvs)?;
        let mut received = received.into_iter();
        let mut full = Vec::with_capacity(layout.len());
        for r in 0..self.world_size {
            if r == self.rank {
                full.extend_from_slice(shard);
            } else {
                full.extend(to_f32(&received.next().expect("one message per peer")));
            }
        }
        Ok(full)
    }

    fn broadcast(&mut self, buffer: &mut [f32], root: usize) -> Result<(), DistError> {
        self.check_root(root, "broadcast")?;
        let op = Op::Broadcast as u32 | ((root as u32) << 8);
        if self.rank == root {
            let sends: Vec<Send> = self.peers().map(|p| (p, as_bytes(buffer))).collect();
            self.exchange(op, &sends, &[])?;
        } else {
            let received = self.exchange(op, &[], &[(root, Some(buffer.len() * 4))])?;
            buffer.copy_from_slice(&to_f32(&received[0]));
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), DistError> {
        let sends: Vec<Send> = self.peers().map(|p| (p, &[][..])).collect();
        let recvs: Vec<(usize, Option<usize>)> = self.peers().map(|p| (p, Some(0))).collect();
        self.exchange(Op::Barrier as u32, &sends, &recvs)?;
        Ok(())
    }

    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        for link in self.links.iter().flatten() {
            let _ = link.set_read_timeout(Some(timeout));
            let _ = link.set_write_timeout(Some(timeout));
        }
    }
}
