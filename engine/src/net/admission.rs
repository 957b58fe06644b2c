//! Who may connect: allowed browser origins, connections in total and per source address. The
//! counts are the one thing the shards share outside the rings: a connection is admitted once,
//! at its handshake, never on the presence path, so a lock there costs nothing that matters.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::net::handshake::Reject;

pub struct Admission {
    /// 0 = no limit.
    max_total: usize,
    max_per_ip: usize,
    origins: Vec<String>,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
}

/// A place taken; given back when dropped (the connection ended).
pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Admission {
    pub fn new(max_total: usize, max_per_ip: usize, origins: Vec<String>) -> Arc<Admission> {
        Arc::new(Admission {
            max_total,
            max_per_ip,
            origins,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    /// A browser's `Origin` must be one of the allowed ones, when any are set. Clients that send
    /// none (not browsers) are not held to it: they could send any origin they like.
    pub fn check_origin(&self, origin: Option<&str>) -> Result<(), Reject> {
        match origin {
            Some(o) if !self.origins.is_empty() && !self.origins.iter().any(|a| a == o) => {
                Err(Reject {
                    status: 403,
                    reason: "origin not allowed",
                })
            }
            _ => Ok(()),
        }
    }

    /// Takes a place for a connection from `ip`, or says why there is none (HTTP 503 / 429).
    /// None when no limit is set: nothing to count.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Option<Ticket>, Reject> {
        if self.max_total == 0 && self.max_per_ip == 0 {
            return Ok(None);
        }
        let total = self.total.fetch_add(1, Ordering::Relaxed);
        if self.max_total > 0 && total >= self.max_total {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Reject {
                status: 503,
                reason: "server full: too many connections",
            });
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_ip.entry(ip).or_insert(0);
        if self.max_per_ip > 0 && *n as usize >= self.max_per_ip {
            drop(per_ip);
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Reject {
                status: 429,
                reason: "too many connections from this address",
            });
        }
        *n += 1;
        Ok(Some(Ticket {
            admission: self.clone(),
            ip,
        }))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let a = &self.admission;
        a.total.fetch_sub(1, Ordering::Relaxed);
        let mut per_ip = a.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_counted_and_given_back() {
        let a = Admission::new(3, 2, Vec::new());
        let (x, y): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
        let t1 = a.admit(x).unwrap();
        let _t2 = a.admit(x).unwrap();
        assert_eq!(a.admit(x).err().map(|r| r.status), Some(429));
        let _t3 = a.admit(y).unwrap();
        assert_eq!(a.admit(y).err().map(|r| r.status), Some(503));
        drop(t1);
        assert!(a.admit(x).is_ok(), "a place came back");
        let unlimited = Admission::new(0, 0, Vec::new());
        assert!(unlimited.admit(x).unwrap().is_none());
    }

    #[test]
    fn origins_are_checked_when_set() {
        let a = Admission::new(0, 0, vec!["https://app.example".into()]);
        assert!(a.check_origin(Some("https://app.example")).is_ok());
        assert_eq!(
            a.check_origin(Some("https://evil.example"))
                .err()
                .map(|r| r.status),
            Some(403)
        );
        assert!(a.check_origin(None).is_ok());
        assert!(Admission::new(0, 0, Vec::new())
            .check_origin(Some("x"))
            .is_ok());
    }
}
