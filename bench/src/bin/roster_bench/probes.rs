//! What is read off the machine: resident memory, kernel socket memory, CPU time.

use crate::prelude::*;

pub(crate) fn rss_of(pid: u32) -> Option<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Kernel memory that grows with connections: slab caches (socket structures) and TCP buffer
/// pages, system-wide. On loopback this counts both ends of every connection.
pub(crate) fn kernel_bytes() -> Option<(usize, usize)> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let slab_kb: usize = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let tcp = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = tcp.split_whitespace();
    let pages: usize = words
        .by_ref()
        .skip_while(|w| *w != "mem")
        .nth(1)?
        .parse()
        .ok()?;
    Some((slab_kb * 1024, pages * 4096))
}

/// The server's CPU time over one phase of a run (in one process: with --procs the workers
/// reach a phase apart).
#[derive(Clone)]
pub(crate) struct CpuWindow {
    pub(crate) pid: Option<u32>,
    pub(crate) start: Arc<Mutex<Option<(f64, Instant)>>>,
}

impl CpuWindow {
    pub(crate) fn new(pid: Option<u32>) -> Self {
        CpuWindow {
            pid,
            start: Arc::new(Mutex::new(None)),
        }
    }

    pub(crate) fn start(&self) {
        if let (Some(cpu), Ok(mut s)) = (self.pid.and_then(cpu_seconds), self.start.lock()) {
            *s = Some((cpu, Instant::now()));
        }
    }

    /// `(server CPU seconds, wall seconds)` since `start`.
    pub(crate) fn finish(&self) -> Option<(f64, f64)> {
        let (cpu, at) = (*self.start.lock().ok()?)?;
        Some((
            self.pid.and_then(cpu_seconds)? - cpu,
            at.elapsed().as_secs_f64(),
        ))
    }
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// Prints `[cpu_s, wall_s]` (a [`CpuWindow`]) as a share of one core; returns the percentage.
pub(crate) fn print_cpu(window: &Value, what: &str) -> Option<f64> {
    let (cpu, wall) = (window[0].as_f64()?, window[1].as_f64()?);
    let pct = 100.0 * cpu / wall;
    println!("  server CPU from {what}: {cpu:.2} s in {wall:.2} s ({pct:.1}% of one core)");
    Some(pct)
}

/// host:port of an http://host:port URL, on loopback.
pub(crate) fn http_addr(url: &str) -> Result<SocketAddr, String> {
    let host = url
        .strip_prefix("http://")
        .ok_or(format!("{url}: only http:// URLs"))?
        .trim_end_matches('/');
    let addr = host
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .ok_or("no address")?;
    if !addr.ip().is_loopback() {
        return Err(format!("{addr} is not a loopback address"));
    }
    Ok(addr)
}

/// The body of GET `path` on a loopback HTTP listener (an admin or monitoring port: blocking,
/// as what is measured around it waits anyway).
pub(crate) fn http_get(url: &str, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let addr = http_addr(url).ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (_, body) = text.split_once("\r\n\r\n")?;
    Some(body.to_owned())
}

/// The processes whose parent is `pid` (a load generator's workers).
pub(crate) fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                return false;
            };
            // The parent is the second field after the command name (which may hold spaces).
            stat.get(stat.rfind(')').map_or(0, |i| i + 2)..)
                .and_then(|rest| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                == Some(pid)
        })
        .collect()
}
