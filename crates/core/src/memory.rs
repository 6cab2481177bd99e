//! The process's own memory as Linux reports it (`/proc/self/status`), for the memory
//! summaries of training runs and the memory benchmark.

/// A `/proc/self/status` memory field in bytes (`VmRSS`: resident now, `VmHWM`: peak
/// resident), `None` where the file or field is unavailable (not Linux).
pub fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.split(':').next() == Some(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident memory of the process so far (`VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM")
}
