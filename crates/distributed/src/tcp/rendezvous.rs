//! Rendezvous and mesh construction.
//!
//! Rank 0 listens at `MASTER_ADDR:MASTER_PORT`. Every other rank binds a listener of its own
//! (an ephemeral port on the interface that reaches the master), connects to the master and
//! sends `hello <rank> <world_size> <port>`. Once all ranks have arrived, rank 0 sends each the
//! table of listeners; rank r then connects to ranks 1..r and accepts ranks r+1..N. The
//! connections to the master are rank 0's links. Everything is bounded by the timeout.

use super::wire::{self, Header, Op};
use crate::{DistEnv, DistError};
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const PROTOCOL: &str = "alignment-distributed/1";

/// Builds the full mesh; returns one stream per peer, indexed by rank (`None` for this rank).
pub(crate) fn connect_mesh(env: &DistEnv, timeout: Duration) -> Result<Vec<Option<TcpStream>>, DistError> {
    let deadline = Instant::now() + timeout;
    let links = if env.rank == 0 { master(env, timeout, deadline)? } else { worker(env, timeout, deadline)? };
    for (peer, link) in links.iter().enumerate() {
        if let Some(link) = link {
            configure(link, timeout).map_err(|e| wire::io_error(env.rank, peer, "socket setup", e, timeout))?;
        }
    }
    Ok(links)
}

fn configure(stream: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))
}

fn rendezvous_error(env: &DistEnv, addr: impl ToString, detail: impl Into<String>) -> DistError {
    DistError::Rendezvous { rank: env.rank, addr: addr.to_string(), detail: detail.into() }
}

fn send_text(stream: &TcpStream, op: Op, text: &str) -> std::io::Result<()> {
    wire::send(stream, Header { op: op as u32, seq: 0, bytes: text.len() as u64 }, text.as_bytes())
}

fn recv_text(stream: &TcpStream, op: Op) -> std::io::Result<String> {
    let header = wire::recv_header(stream)?;
    if header.op != op as u32 || header.bytes > 1 << 20 {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("expected {}, received {}", Op::name(op as u32), Op::name(header.op)),
        ));
    }
    let mut payload = vec![0u8; header.bytes as usize];
    wire::recv_payload(stream, &mut payload)?;
    String::from_utf8(payload).map_err(|_| std::io::Error::new(ErrorKind::InvalidData, "rendezvous message is not UTF-8"))
}

/// Accepts one connection before `deadline` (the listener is non-blocking).
fn accept_until(listener: &TcpListener, deadline: Instant) -> std::io::Result<Option<(TcpStream, SocketAddr)>> {
    loop {
        match listener.accept() {
            Ok((stream, addr)) => {
                stream.set_nonblocking(false)?;
                return Ok(Some((stream, addr)));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100))
}

fn master(env: &DistEnv, timeout: Duration, deadline: Instant) -> Result<Vec<Option<TcpStream>>, DistError> {
    let addr = env.master();
    let listener = match TcpListener::bind(addr.as_str()) {
        Ok(listener) => listener,
        // MASTER_ADDR names this host but not one of its interfaces (NAT, alias): listen on all.
        Err(e) if e.kind() == ErrorKind::AddrNotAvailable => TcpListener::bind(("0.0.0.0", env.master_port))
            .map_err(|e| rendezvous_error(env, format!("0.0.0.0:{}", env.master_port), format!("cannot listen: {e}")))?,
        Err(e) => {
            return Err(rendezvous_error(
                env,
                &addr,
                format!("rank 0 cannot listen: {e} (another job on this port? choose another MASTER_PORT)"),
            ))
        }
    };
    listener.set_nonblocking(true).map_err(|e| rendezvous_error(env, &addr, e.to_string()))?;
    let n = env.world_size;
    let mut links: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut listeners: Vec<Option<SocketAddr>> = vec![None; n];
    let mut arrived = 1;
    while arrived < n {
        let Some((stream, from)) =
            accept_until(&listener, deadline).map_err(|e| rendezvous_error(env, &addr, format!("accept failed: {e}")))?
        else {
            let missing: Vec<usize> = (1..n).filter(|&r| links[r].is_none()).collect();
            return Err(rendezvous_error(env, &addr, format!("ranks {missing:?} of {n} did not arrive within {timeout:?}")));
        };
        stream.set_read_timeout(Some(remaining(deadline))).map_err(|e| rendezvous_error(env, from, e.to_string()))?;
        let hello = match recv_text(&stream, Op::Hello) {
            Ok(hello) => hello,
            // Not one of ours (a port scanner, a stale client): ignore it.
            Err(_) => continue,
        };
        let fields: Vec<&str> = hello.split_whitespace().collect();
        let parsed = match fields.as_slice() {
            [protocol, rank, world, port] if *protocol == PROTOCOL => {
                rank.parse::<usize>().ok().zip(world.parse::<usize>().ok()).zip(port.parse::<u16>().ok())
            }
            _ => None,
        };
        let Some(((rank, world), port)) = parsed else {
            return Err(rendezvous_error(env, from, format!("unexpected hello {hello:?} (a different version of this program?)")));
        };
        if world != n {
            return Err(rendezvous_error(env, from, format!("rank {rank} says the world size is {world}, rank 0 has {n}")));
        }
        if rank == 0 || rank >= n {
            return Err(rendezvous_error(env, from, format!("a process claims rank {rank}, outside 1..{n}")));
        }
        if links[rank].is_some() {
            return Err(rendezvous_error(env, from, format!("rank {rank} arrived twice (two processes with the same RANK?)")));
        }
        listeners[rank] = Some(SocketAddr::new(from.ip(), port));
        links[rank] = Some(stream);
        arrived += 1;
    }
    let table: String = (1..n).map(|r| format!("{r} {}\n", listeners[r].expect("every rank arrived"))).collect();
    for (rank, link) in links.iter().enumerate() {
        if let Some(link) = link {
            send_text(link, Op::Table, &table).map_err(|e| wire::io_error(0, rank, "rendezvous table", e, timeout))?;
        }
    }
    Ok(links)
}

fn worker(env: &DistEnv, timeout: Duration, deadline: Instant) -> Result<Vec<Option<TcpStream>>, DistError> {
    let (rank, n) = (env.rank, env.world_size);
    let addr = env.master();
    let to_master = connect_until(&addr, deadline)
        .map_err(|detail| rendezvous_error(env, &addr, format!("cannot reach rank 0 within {timeout:?}: {detail}")))?;
    // Listen on the interface that reaches the master: the peers can reach it too.
    let local_ip: IpAddr = to_master.local_addr().map_err(|e| rendezvous_error(env, &addr, e.to_string()))?.ip();
    let listener = TcpListener::bind((local_ip, 0)).map_err(|e| rendezvous_error(env, local_ip, format!("cannot listen: {e}")))?;
    listener.set_nonblocking(true).map_err(|e| rendezvous_error(env, local_ip, e.to_string()))?;
    let port = listener.local_addr().map_err(|e| rendezvous_error(env, local_ip, e.to_string()))?.port();
    send_text(&to_master, Op::Hello, &format!("{PROTOCOL} {rank} {n} {port}"))
        .map_err(|e| wire::io_error(rank, 0, "rendezvous hello", e, timeout))?;
    // Rank 0 waits for everyone until the same deadline; allow it a margin to report first.
    to_master
        .set_read_timeout(Some(remaining(deadline) + Duration::from_secs(2)))
        .map_err(|e| rendezvous_error(env, &addr, e.to_string()))?;
    let table =
        recv_text(&to_master, Op::Table).map_err(|e| match wire::io_error(rank, 0, "rendezvous (waiting for all ranks)", e, timeout) {
            DistError::PeerClosed { .. } => {
                rendezvous_error(env, &addr, "rank 0 closed the connection before every rank arrived (see its error)")
            }
            other => other,
        })?;
    let mut peers: Vec<Option<SocketAddr>> = vec![None; n];
    for line in table.lines() {
        let parsed = line.split_once(' ').and_then(|(r, a)| r.parse::<usize>().ok().zip(a.parse::<SocketAddr>().ok()));
        match parsed {
            Some((r, a)) if r < n => peers[r] = Some(a),
            _ => return Err(rendezvous_error(env, &addr, format!("malformed rendezvous table line {line:?}"))),
        }
    }
    let mut links: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    links[0] = Some(to_master);
    for (peer, link) in links.iter_mut().enumerate().take(rank).skip(1) {
        let peer_addr =
            peers[peer].ok_or_else(|| rendezvous_error(env, &addr, format!("rank {peer} missing from the rendezvous table")))?;
        let stream = connect_until(&peer_addr.to_string(), deadline)
            .map_err(|detail| rendezvous_error(env, peer_addr, format!("cannot connect to rank {peer}: {detail}")))?;
        send_text(&stream, Op::PeerHello, &format!("{PROTOCOL} {rank}"))
            .map_err(|e| wire::io_error(rank, peer, "mesh hello", e, timeout))?;
        *link = Some(stream);
    }
    let mut accepted = 0;
    while accepted < n - 1 - rank {
        let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let Some((stream, from)) =
            accept_until(&listener, deadline).map_err(|e| rendezvous_error(env, &local, format!("accept failed: {e}")))?
        else {
            let missing: Vec<usize> = (rank + 1..n).filter(|&r| links[r].is_none()).collect();
            return Err(rendezvous_error(env, local, format!("ranks {missing:?} did not connect within {timeout:?}")));
        };
        stream.set_read_timeout(Some(remaining(deadline))).map_err(|e| rendezvous_error(env, from, e.to_string()))?;
        let hello = recv_text(&stream, Op::PeerHello).map_err(|e| rendezvous_error(env, from, format!("bad mesh hello: {e}")))?;
        let peer = hello.strip_prefix(PROTOCOL).and_then(|r| r.trim().parse::<usize>().ok());
        match peer {
            Some(peer) if peer > rank && peer < n && links[peer].is_none() => links[peer] = Some(stream),
            _ => return Err(rendezvous_error(env, from, format!("unexpected mesh hello {hello:?}"))),
        }
        accepted += 1;
    }
    Ok(links)
}

/// Connects to `addr` (resolved on each try), retrying refused connections until `deadline`.
fn connect_until(addr: &str, deadline: Instant) -> Result<TcpStream, String> {
    let mut last_error = String::from("no attempt");
    loop {
        match addr.to_socket_addrs() {
            Ok(candidates) => {
                for candidate in candidates {
                    match TcpStream::connect_timeout(&candidate, remaining(deadline).min(Duration::from_secs(5))) {
                        Ok(stream) => return Ok(stream),
                        Err(e) => last_error = e.to_string(),
                    }
                }
            }
            Err(e) => last_error = format!("cannot resolve: {e}"),
        }
        if Instant::now() >= deadline {
            return Err(last_error);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
