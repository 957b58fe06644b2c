//! Where the clients connect from and to: the URLs (client i goes to URL i mod N, as a load
//! balancer spreading clients over the nodes of a cluster would) and the source addresses.

use crate::prelude::*;

#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) addrs: Vec<SocketAddr>,
    pub(crate) path: String,
    pub(crate) sources: Vec<IpAddr>,
    /// Clients from this index on go to `others` instead (observers on other nodes).
    others_from: usize,
    others: Vec<SocketAddr>,
}

impl Target {
    pub(crate) fn parse(c: &Common) -> Result<Target, String> {
        let (addrs, path) = parse_urls(&c.url)?;
        let sources = match &c.source_addrs {
            None => Vec::new(),
            Some(range) => parse_range(range)?,
        };
        Ok(Target {
            addrs,
            path,
            sources,
            others_from: usize::MAX,
            others: Vec::new(),
        })
    }

    /// The same clients, connecting to `urls` instead.
    pub(crate) fn to(&self, urls: &str) -> Result<Target, String> {
        let (addrs, path) = parse_urls(urls)?;
        Ok(Target {
            addrs,
            path,
            ..self.clone()
        })
    }

    /// Clients `from` and up connect to `urls` (round robin), the others as before.
    pub(crate) fn others_to(&self, from: usize, urls: &str) -> Result<Target, String> {
        let (others, _) = parse_urls(urls)?;
        Ok(Target {
            others_from: from,
            others,
            ..self.clone()
        })
    }

    /// The server client `i` connects to.
    pub(crate) fn addr(&self, i: usize) -> SocketAddr {
        if i >= self.others_from && !self.others.is_empty() {
            return self.others[i % self.others.len()];
        }
        self.addrs[i % self.addrs.len()]
    }

    pub(crate) fn source(&self, i: usize) -> Option<IpAddr> {
        (!self.sources.is_empty()).then(|| self.sources[i % self.sources.len()])
    }
}

/// Loopback ws:// URLs, comma-separated: their addresses and the (last) socket path.
fn parse_urls(urls: &str) -> Result<(Vec<SocketAddr>, String), String> {
    let mut addrs = Vec::new();
    let mut path = String::new();
    for url in urls.split(',') {
        let rest = url.strip_prefix("ws://").ok_or("only ws:// URLs")?;
        let (host, p) = rest.split_once('/').unwrap_or((rest, "socket"));
        let addr = host
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("no address")?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{addr} is not a loopback address; roster-bench only targets 127.0.0.0/8"
            ));
        }
        addrs.push(addr);
        path = format!("/{}", p.trim_end_matches('/'));
    }
    Ok((addrs, path))
}

pub(crate) fn parse_range(s: &str) -> Result<Vec<IpAddr>, String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: Ipv4Addr = a.parse().map_err(|e| format!("{a}: {e}"))?;
    let b: Ipv4Addr = b.parse().map_err(|e| format!("{b}: {e}"))?;
    let (a, b) = (u32::from(a), u32::from(b));
    if b < a || b - a > 65_536 {
        return Err(format!("bad source range {s}"));
    }
    let v: Vec<IpAddr> = (a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))).collect();
    if v.iter().any(|ip| !ip.is_loopback()) {
        return Err("source addresses must be in 127.0.0.0/8".into());
    }
    Ok(v)
}
