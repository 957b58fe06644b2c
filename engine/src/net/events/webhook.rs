//! Webhook delivery: the events thread's loop. Records are gathered into batches (up to
//! `batch` events, or what came within `batch_wait` of the first), posted as one JSON body
//! signed with HMAC-SHA256 (`x-roster-signature: sha256=HEX`), and a batch that fails (no
//! answer, a 5xx, 408 or 429) is posted again, the same bytes, after 100 ms, 200 ms, ... up to
//! 5 s, until it is taken: delivery is at least once. A receiver that refuses a batch (any
//! other 4xx) will refuse it again: it is dropped, counted and logged.
//!
//! Must not: block a shard (they only `try_send` into the bounded queue), or lose a batch it
//! has not been told is taken, except at shutdown past its deadline.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::hmac;

use super::record::{encode, Record};
use super::{EventStats, Names, Stopping};
use crate::config::WebhookConfig;

const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_secs(5);

/// What a post came to.
enum Posted {
    Taken,
    /// Worth trying again (the receiver is down, slow or busy).
    Retry(String),
    /// The receiver said no for good.
    Refused(u16),
}

pub(super) struct Webhook {
    config: WebhookConfig,
    agent: ureq::Agent,
    key: Option<hmac::Key>,
}

impl Webhook {
    pub(super) fn new(config: WebhookConfig) -> Webhook {
        let mut agent = ureq::Agent::config_builder()
            .timeout_global(Some(config.timeout))
            .http_status_as_error(false)
            .user_agent(concat!("roster/", env!("CARGO_PKG_VERSION")));
        let certs = rustls_native_certs::load_native_certs();
        if !certs.certs.is_empty() {
            let roots: Vec<ureq::tls::Certificate<'static>> = certs
                .certs
                .iter()
                .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                .collect();
            let tls = ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
                .build();
            agent = agent.tls_config(tls);
        }
        let key = config
            .secret
            .as_ref()
            .map(|s| hmac::Key::new(hmac::HMAC_SHA256, &s.0));
        Webhook {
            agent: agent.build().new_agent(),
            config,
            key,
        }
    }

    /// Runs until every sender is gone and the queue is empty (or the shutdown deadline).
    pub(super) fn run(
        self,
        rx: flume::Receiver<Record>,
        names: Names,
        stats: Arc<EventStats>,
        stop: Stopping,
    ) {
        let mut batch = Vec::with_capacity(self.config.batch);
        let mut body = Vec::with_capacity(64 << 10);
        loop {
            let Some(first) = stop.next(&rx) else {
                return;
            };
            batch.push(first);
            let until = Instant::now() + self.config.batch_wait;
            while batch.len() < self.config.batch {
                match rx.recv_deadline(until) {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            body.clear();
            body.extend_from_slice(b"{\"node\":");
            let _ = serde_json::to_writer(&mut body, names.me());
            body.extend_from_slice(b",\"events\":[");
            for (i, r) in batch.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                encode(r, &names.of(r.event.origin), &mut body);
            }
            body.extend_from_slice(b"]}");
            let n = batch.len() as u64;
            batch.clear();
            self.deliver(&body, n, &stats, &stop);
        }
    }

    /// Posts one batch until it is taken or refused (or shutdown's deadline passes).
    fn deliver(&self, body: &[u8], n: u64, stats: &EventStats, stop: &Stopping) {
        let mut wait = FIRST_RETRY;
        loop {
            match self.post(body) {
                Posted::Taken => {
                    stats.webhook_batches.fetch_add(1, Ordering::Relaxed);
                    stats.webhook_sent.fetch_add(n, Ordering::Relaxed);
                    return;
                }
                Posted::Refused(status) => {
                    stats.webhook_refused.fetch_add(n, Ordering::Relaxed);
                    tracing::warn!(status, events = n, "webhook refused a batch: dropped");
                    return;
                }
                Posted::Retry(why) => {
                    let failures = stats.webhook_failures.fetch_add(1, Ordering::Relaxed);
                    if failures.is_power_of_two() {
                        tracing::warn!(%why, failures = failures + 1, "webhook post failed: retrying");
                    }
                }
            }
            if stop.past_deadline() {
                stats.dropped.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(events = n, "stopping: a webhook batch not delivered");
                return;
            }
            std::thread::sleep(wait);
            wait = (wait * 2).min(LAST_RETRY);
        }
    }

    fn post(&self, body: &[u8]) -> Posted {
        let mut req = self
            .agent
            .post(&self.config.url)
            .header("content-type", "application/json");
        if let Some(key) = &self.key {
            let sig = hmac::sign(key, body);
            req = req.header(
                "x-roster-signature",
                format!("sha256={}", hex::encode(sig.as_ref())),
            );
        }
        match req.send(body) {
            Ok(resp) => match resp.status().as_u16() {
                200..=299 => Posted::Taken,
                s @ (408 | 429 | 500..) => Posted::Retry(format!("HTTP {s}")),
                s => Posted::Refused(s),
            },
            Err(e) => Posted::Retry(e.to_string()),
        }
    }
}
