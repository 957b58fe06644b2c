//! Who may connect: allowed browser origins, connections in total and per source address, and
//! upgrades in progress in total and per source address. A connection is counted from the moment
//! it is accepted, before it has sent a byte, so sockets that never finish their upgrade count
//! too. The counts are the one thing the shards share outside the rings: a connection is
//! admitted once, at accept, never on the presence path, so a lock there costs nothing that
//! matters.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::net::handshake::Reject;

/// The limits, each 0 for none.
#[derive(Clone, Debug, Default)]
pub struct Limits {
    pub max_total: usize,
    pub max_per_ip: usize,
    pub max_handshakes: usize,
    pub max_handshakes_per_ip: usize,
}

pub struct Admission {
    limits: Limits,
    origins: Vec<String>,
    total: AtomicUsize,
    handshakes: AtomicUsize,
    /// Per source address: (connections, of which still upgrading).
    per_ip: Mutex<HashMap<IpAddr, (u32, u32)>>,
}

/// A place taken; given back when dropped (the connection ended).
pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
    upgrading: bool,
}

const FULL: Reject = Reject::new(503, "server full: too many connections");
const BUSY: Reject = Reject::new(503, "server busy: too many upgrades in progress");
const IP_FULL: Reject = Reject::new(429, "too many connections from this address");
const IP_BUSY: Reject = Reject::new(429, "too many upgrades in progress from this address");

/// Takes one from `counter` if it stays within `max` (0 = no limit).
fn take(counter: &AtomicUsize, max: usize) -> bool {
    let before = counter.fetch_add(1, Ordering::Relaxed);
    if max > 0 && before >= max {
        counter.fetch_sub(1, Ordering::Relaxed);
        return false;
    }
    true
}

impl Admission {
    pub fn new(limits: Limits, origins: Vec<String>) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            origins,
            total: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    /// Whether finished upgrades are counted at all (a connection limit is set); if not, a
    /// connection needs its ticket only while it upgrades.
    pub fn counts_connections(&self) -> bool {
        self.limits.max_total > 0 || self.per_ip_counted()
    }

    fn per_ip_counted(&self) -> bool {
        self.limits.max_per_ip > 0 || self.limits.max_handshakes_per_ip > 0
    }

    /// A browser's `Origin` must be one of the allowed ones, when any are set. Clients that send
    /// none (not browsers) are not held to it: they could send any origin they like.
    pub fn check_origin(&self, origin: Option<&str>) -> Result<(), Reject> {
        match origin {
            Some(o) if !self.origins.is_empty() && !self.origins.iter().any(|a| a == o) => {
                Err(Reject::new(403, "origin not allowed"))
            }
            _ => Ok(()),
        }
    }

    /// Takes a place for a connection from `ip` just accepted, still to upgrade, or says why
    /// there is none (HTTP 503 / 429). None when no limit is set: nothing to count.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Option<Ticket>, Reject> {
        let l = &self.limits;
        if l.max_total == 0 && l.max_handshakes == 0 && !self.per_ip_counted() {
            return Ok(None);
        }
        if !take(&self.total, l.max_total) {
            return Err(FULL);
        }
        if !take(&self.handshakes, l.max_handshakes) {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(BUSY);
        }
        if self.per_ip_counted() {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let (conns, upgrading) = per_ip.entry(ip).or_insert((0, 0));
            let refusal = if l.max_per_ip > 0 && *conns as usize >= l.max_per_ip {
                Some(IP_FULL)
            } else if l.max_handshakes_per_ip > 0 && *upgrading as usize >= l.max_handshakes_per_ip
            {
                Some(IP_BUSY)
            } else {
                *conns += 1;
                *upgrading += 1;
                None
            };
            if let Some(r) = refusal {
                if *conns == 0 {
                    per_ip.remove(&ip);
                }
                drop(per_ip);
                self.total.fetch_sub(1, Ordering::Relaxed);
                self.handshakes.fetch_sub(1, Ordering::Relaxed);
                return Err(r);
            }
        }
        Ok(Some(Ticket {
            admission: self.clone(),
            ip,
            upgrading: true,
        }))
    }
}

impl Ticket {
    /// The upgrade is done: the connection stops counting as one in progress.
    pub fn upgraded(&mut self) {
        if !std::mem::take(&mut self.upgrading) {
            return;
        }
        let a = &self.admission;
        a.handshakes.fetch_sub(1, Ordering::Relaxed);
        if a.per_ip_counted() {
            let mut per_ip = a.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, upgrading)) = per_ip.get_mut(&self.ip) {
                *upgrading -= 1;
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let upgrading = self.upgrading;
        let a = &self.admission;
        a.total.fetch_sub(1, Ordering::Relaxed);
        if upgrading {
            a.handshakes.fetch_sub(1, Ordering::Relaxed);
        }
        if a.per_ip_counted() {
            let mut per_ip = a.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((conns, up)) = per_ip.get_mut(&self.ip) {
                *conns -= 1;
                *up -= upgrading as u32;
                if *conns == 0 {
                    per_ip.remove(&self.ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_total: usize, max_per_ip: usize, hs: usize, hs_ip: usize) -> Limits {
        Limits {
            max_total,
            max_per_ip,
            max_handshakes: hs,
            max_handshakes_per_ip: hs_ip,
        }
    }

    fn status(r: Result<Option<Ticket>, Reject>) -> u16 {
        r.err().map_or(0, |r| r.status)
    }

    #[test]
    fn places_are_counted_and_given_back() {
        let a = Admission::new(limits(3, 2, 0, 0), Vec::new());
        let (x, y): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
        let t1 = a.admit(x).unwrap();
        let _t2 = a.admit(x).unwrap();
        assert_eq!(status(a.admit(x)), 429);
        let _t3 = a.admit(y).unwrap();
        assert_eq!(status(a.admit(y)), 503);
        drop(t1);
        assert!(a.admit(x).is_ok(), "a place came back");
        let unlimited = Admission::new(Limits::default(), Vec::new());
        assert!(unlimited.admit(x).unwrap().is_none());
    }

    #[test]
    fn upgrades_in_progress_are_bounded_apart() {
        let a = Admission::new(limits(0, 0, 2, 1), Vec::new());
        let (x, y, z): (IpAddr, IpAddr, IpAddr) = (
            "127.0.0.2".parse().unwrap(),
            "127.0.0.3".parse().unwrap(),
            "127.0.0.4".parse().unwrap(),
        );
        let mut tx = a.admit(x).unwrap().unwrap();
        assert_eq!(status(a.admit(x)), 429, "one upgrade at a time from x");
        let ty = a.admit(y).unwrap();
        assert_eq!(status(a.admit(z)), 503, "two in progress in all");
        tx.upgraded();
        let _tx2 = a.admit(x).unwrap();
        drop(ty);
        let _tz = a.admit(z).unwrap();
        drop(tx);
        assert_eq!(a.total.load(Ordering::Relaxed), 2);
        assert_eq!(a.handshakes.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn origins_are_checked_when_set() {
        let a = Admission::new(Limits::default(), vec!["https://app.example".into()]);
        assert!(a.check_origin(Some("https://app.example")).is_ok());
        assert_eq!(
            a.check_origin(Some("https://evil.example"))
                .err()
                .map(|r| r.status),
            Some(403)
        );
        assert!(a.check_origin(None).is_ok());
        assert!(Admission::new(Limits::default(), Vec::new())
            .check_origin(Some("x"))
            .is_ok());
    }
}
