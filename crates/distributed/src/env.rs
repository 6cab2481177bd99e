//! Rank discovery from the environment torchrun or Slurm sets.

use crate::DistError;
use std::time::Duration;

/// Where this process sits in a multi-process job, as torchrun (`RANK`, `WORLD_SIZE`,
/// `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or Slurm's srun (`SLURM_PROCID`, `SLURM_NTASKS`,
/// `SLURM_LOCALID`) describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank, `0..world_size`; rank 0 hosts the rendezvous and writes outputs.
    pub rank: usize,
    /// Number of processes in the job (≥ 2: a single process has no `DistEnv`).
    pub world_size: usize,
    /// Rank on this machine: the GPU ordinal this process drives.
    pub local_rank: usize,
    /// Host of rank 0's rendezvous listener.
    pub master_addr: String,
    /// Port of rank 0's rendezvous listener.
    pub master_port: u16,
}

/// The port torchrun uses when `MASTER_PORT` is not set.
pub const DEFAULT_MASTER_PORT: u16 = 29500;
/// Environment variable: collective / rendezvous timeout in seconds (fractions allowed).
pub const TIMEOUT_VAR: &str = "ALIGNMENT_DIST_TIMEOUT_S";
/// The timeout when [`TIMEOUT_VAR`] is unset.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

fn invalid(var: &str, value: &str, reason: impl Into<String>) -> DistError {
    DistError::Env { var: var.into(), value: value.into(), reason: reason.into() }
}

/// The first of `names` that is set, with its name.
fn first_set(get: &dyn Fn(&str) -> Option<String>, names: &[&'static str]) -> Option<(&'static str, String)> {
    names.iter().find_map(|name| get(name).map(|value| (*name, value)))
}

fn parse_usize(var: &str, value: &str) -> Result<usize, DistError> {
    value.trim().parse::<usize>().map_err(|_| invalid(var, value, "expected a non-negative integer"))
}

impl DistEnv {
    /// Reads the process environment. `Ok(None)` means "not distributed": neither `WORLD_SIZE`
    /// nor `SLURM_NTASKS` is set, or the world size is 1 (then `RANK`, if set, must be 0).
    /// torchrun's variables take precedence over Slurm's, variable by variable. With a world
    /// size ≥ 2, the rank and local rank are required, `MASTER_ADDR` is required and
    /// `MASTER_PORT` defaults to 29500; any malformed or inconsistent value is an error naming
    /// the variable.
    pub fn from_env() -> Result<Option<DistEnv>, DistError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`DistEnv::from_env`] over an arbitrary variable lookup (for tests and launchers).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>, DistError> {
        let get: &dyn Fn(&str) -> Option<String> = &get;
        let Some((world_var, world_value)) = first_set(get, &["WORLD_SIZE", "SLURM_NTASKS"]) else {
            return Ok(None);
        };
        let world_size = parse_usize(world_var, &world_value)?;
        if world_size == 0 {
            return Err(invalid(world_var, &world_value, "the world size must be at least 1"));
        }
        let rank = match first_set(get, &["RANK", "SLURM_PROCID"]) {
            Some((var, value)) => {
                let rank = parse_usize(var, &value)?;
                if rank >= world_size {
                    return Err(invalid(var, &value, format!("rank must be below the world size {world_size} ({world_var})")));
                }
                rank
            }
            None if world_size == 1 => 0,
            None => return Err(invalid("RANK", "", format!("not set (nor SLURM_PROCID) although {world_var}={world_size}"))),
        };
        if world_size == 1 {
            return Ok(None);
        }
        let local_rank = match first_set(get, &["LOCAL_RANK", "SLURM_LOCALID"]) {
            Some((var, value)) => {
                let local_rank = parse_usize(var, &value)?;
                if local_rank >= world_size {
                    return Err(invalid(var, &value, format!("local rank must be below the world size {world_size}")));
                }
                local_rank
            }
            None => return Err(invalid("LOCAL_RANK", "", format!("not set (nor SLURM_LOCALID) although {world_var}={world_size}"))),
        };
        let master_addr = match get("MASTER_ADDR") {
            Some(addr) if !addr.trim().is_empty() => addr.trim().to_string(),
            Some(addr) => return Err(invalid("MASTER_ADDR", &addr, "empty")),
            None => return Err(invalid("MASTER_ADDR", "", format!("not set although {world_var}={world_size} (the host of rank 0)"))),
        };
        let master_port = match get("MASTER_PORT") {
            Some(value) => match value.trim().parse::<u16>() {
                Ok(0) | Err(_) => return Err(invalid("MASTER_PORT", &value, "expected a port number 1-65535")),
                Ok(port) => port,
            },
            None => DEFAULT_MASTER_PORT,
        };
        Ok(Some(DistEnv { rank, world_size, local_rank, master_addr, master_port }))
    }

    /// Whether this is rank 0 (the one that logs, evaluates and saves).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// `MASTER_ADDR:MASTER_PORT`.
    pub fn master(&self) -> String {
        if self.master_addr.contains(':') && !self.master_addr.starts_with('[') {
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }
}

/// The collective timeout from `ALIGNMENT_DIST_TIMEOUT_S` (seconds, > 0, fractions allowed),
/// [`DEFAULT_TIMEOUT`] when unset.
pub fn timeout_from_env() -> Result<Duration, DistError> {
    timeout_from_value(std::env::var(TIMEOUT_VAR).ok().as_deref())
}

/// [`timeout_from_env`] over a given value.
pub fn timeout_from_value(value: Option<&str>) -> Result<Duration, DistError> {
    let Some(value) = value else {
        return Ok(DEFAULT_TIMEOUT);
    };
    match value.trim().parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 && seconds < 1e9 => Ok(Duration::from_secs_f64(seconds)),
        _ => Err(invalid(TIMEOUT_VAR, value, "expected a positive number of seconds")),
    }
}
