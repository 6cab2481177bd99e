//! The crate's error type.

use std::time::Duration;

/// Everything that can go wrong in rank discovery, rendezvous, a collective, a ZeRO config or the
/// launcher. Messages name the rank that saw the problem, the peer involved and the operation.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A torchrun/Slurm environment variable is missing or malformed.
    #[error("environment variable {var}={value:?} is invalid: {reason}")]
    Env {
        /// The variable's name.
        var: String,
        /// Its value (empty when unset).
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The processes could not meet at MASTER_ADDR:MASTER_PORT.
    #[error("rank {rank}: rendezvous at {addr} failed: {detail}")]
    Rendezvous {
        /// The rank reporting.
        rank: usize,
        /// The address involved (master or a peer's listener).
        addr: String,
        /// What happened.
        detail: String,
    },
    /// A socket error while talking to a peer.
    #[error("rank {rank}: {op} with rank {peer} failed: {source}")]
    Io {
        /// The rank reporting.
        rank: usize,
        /// The peer on the other end of the socket.
        peer: usize,
        /// The collective (or setup step) in progress.
        op: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// A peer closed its connection: it exited, crashed or gave up after its own error.
    #[error("rank {rank}: rank {peer} closed the connection during {op} (it exited, crashed or failed)")]
    PeerClosed {
        /// The rank reporting.
        rank: usize,
        /// The peer that went away.
        peer: usize,
        /// The collective in progress.
        op: String,
    },
    /// A peer sent nothing for the configured timeout (ALIGNMENT_DIST_TIMEOUT_S).
    #[error("rank {rank}: no progress from rank {peer} during {op} for {timeout:?} (is it hung, or stuck outside the collective? raise ALIGNMENT_DIST_TIMEOUT_S for long phases)")]
    Timeout {
        /// The rank reporting.
        rank: usize,
        /// The peer that did not answer.
        peer: usize,
        /// The collective in progress.
        op: String,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// A peer is in a different collective, or the buffers' lengths disagree.
    #[error("rank {rank}: protocol mismatch with rank {peer}: {detail}")]
    Protocol {
        /// The rank reporting.
        rank: usize,
        /// The peer whose message did not match.
        peer: usize,
        /// Expected versus received.
        detail: String,
    },
    /// The ranks called collectives for different things (their passes diverged).
    #[error("rank {rank}: the ranks diverged: {detail}")]
    Diverged {
        /// The rank reporting.
        rank: usize,
        /// What differed.
        detail: String,
    },
    /// A call with arguments that cannot be right (wrong buffer length, root out of range...).
    #[error("rank {rank}: invalid argument: {detail}")]
    InvalidArgument {
        /// The rank reporting.
        rank: usize,
        /// What is wrong.
        detail: String,
    },
    /// An earlier collective failed; the communicator is unusable (the peers were disconnected).
    #[error("rank {rank}: communicator unusable after an earlier failure: {first_error}")]
    Poisoned {
        /// The rank reporting.
        rank: usize,
        /// The first failure's message.
        first_error: String,
    },
    /// An NCCL or CUDA call failed (`cuda` feature).
    #[error("rank {rank}: NCCL/CUDA {op} failed: {detail}")]
    Nccl {
        /// The rank reporting.
        rank: usize,
        /// The call.
        op: String,
        /// The library's error.
        detail: String,
    },
    /// An accelerate-style YAML config could not be read or is not supported.
    #[error("accelerate config {path}: {detail}")]
    Config {
        /// The file (or `<string>`).
        path: String,
        /// What is wrong, naming the field.
        detail: String,
    },
    /// The launcher could not start or watch its processes.
    #[error("launch: {detail}")]
    Launch {
        /// What happened.
        detail: String,
    },
    /// A launched rank exited with an error or was killed; the launcher stopped the others.
    /// When one rank's death takes others down, they can exit within microseconds of each other
    /// and the launcher cannot always tell who was first: every failed rank is listed.
    #[error("launch: rank {rank} failed ({status}){}; the other ranks were stopped", also_failed(.others))]
    RankFailed {
        /// The first rank seen failing.
        rank: usize,
        /// Its exit status, in words.
        status: String,
        /// Other ranks that failed on their own (not stopped by the launcher): `rank N: status`.
        others: Vec<String>,
    },
}

fn also_failed(others: &[String]) -> String {
    if others.is_empty() {
        String::new()
    } else {
        format!(" (also failed: {})", others.join(", "))
    }
}
