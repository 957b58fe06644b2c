//! What an executor (or a worker process) measured, merged and written out.

use crate::prelude::*;

pub(crate) fn hist() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant figures is valid")
}

/// What one executor measured.
pub(crate) struct Part {
    pub(crate) a: Histogram<u64>,
    pub(crate) b: Histogram<u64>,
    /// Two more, for scenarios that time more than two things (`million`).
    pub(crate) c: Histogram<u64>,
    pub(crate) d: Histogram<u64>,
    pub(crate) ok: usize,
    pub(crate) errors: usize,
    pub(crate) timeouts: usize,
    pub(crate) first_error: Option<String>,
    /// Resident memory the load generator process gained while holding its clients.
    pub(crate) client_bytes: usize,
    /// Connections that ended while held idle (heartbeats going).
    pub(crate) lost: usize,
    /// Channels crashed in worker processes (this process counts its own in
    /// `client::CRASHED_CHANNELS`).
    pub(crate) crashed: u64,
}

impl Part {
    /// A client that did (or, by the deadline, did not) see what it waited for.
    pub(crate) fn finished(&mut self, done: bool) {
        if done {
            self.ok += 1;
        } else {
            self.timeouts += 1;
        }
    }

    pub(crate) fn new() -> Part {
        Part {
            a: hist(),
            b: hist(),
            c: hist(),
            d: hist(),
            ok: 0,
            errors: 0,
            timeouts: 0,
            first_error: None,
            client_bytes: 0,
            lost: 0,
            crashed: 0,
        }
    }

    pub(crate) fn error(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }

    /// One line of JSON, histograms in hdrhistogram's V2 format as hex, for worker processes.
    pub(crate) fn to_json(&self) -> String {
        let hex = |h: &Histogram<u64>| {
            let mut buf = Vec::new();
            let _ = hdrhistogram::serialization::Serializer::serialize(
                &mut hdrhistogram::serialization::V2Serializer::new(),
                h,
                &mut buf,
            );
            buf.iter().map(|b| format!("{b:02x}")).collect::<String>()
        };
        json!({"a": hex(&self.a), "b": hex(&self.b), "c": hex(&self.c), "d": hex(&self.d), "ok": self.ok, "errors": self.errors,
               "timeouts": self.timeouts, "first_error": self.first_error, "client_bytes": self.client_bytes,
               "lost": self.lost, "crashed": self.crashed_all()})
        .to_string()
    }

    pub(crate) fn from_json(text: &str) -> Result<Part, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("worker result: {e}"))?;
        let hist = |key: &str| -> Result<Histogram<u64>, String> {
            let hex = v[key].as_str().unwrap_or_default();
            let bytes: Vec<u8> = (0..hex.len() / 2)
                .map(|i| {
                    u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("00"), 16).unwrap_or(0)
                })
                .collect();
            hdrhistogram::serialization::Deserializer::new()
                .deserialize(&mut &bytes[..])
                .map_err(|e| format!("worker histogram: {e:?}"))
        };
        let count = |key: &str| v[key].as_u64().unwrap_or(0) as usize;
        Ok(Part {
            a: hist("a")?,
            b: hist("b")?,
            c: hist("c")?,
            d: hist("d")?,
            ok: count("ok"),
            errors: count("errors"),
            timeouts: count("timeouts"),
            first_error: v["first_error"].as_str().map(str::to_owned),
            client_bytes: count("client_bytes"),
            lost: count("lost"),
            crashed: count("crashed") as u64,
        })
    }

    pub(crate) fn print_errors(&self) {
        let first = self
            .first_error
            .as_ref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default();
        let crashed = self.crashed_all();
        println!(
            "  errors: {} timeouts: {} crashed channels (phx_error, rejoined as phoenix.js does): {crashed}{first}",
            self.errors, self.timeouts
        );
    }

    /// Crashed channels: the workers' and this process's own.
    fn crashed_all(&self) -> u64 {
        let here = &roster_bench::client::CRASHED_CHANNELS;
        self.crashed + here.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn merge(parts: Vec<Part>) -> Part {
        let mut all = Part::new();
        for p in parts {
            all.a.add(&p.a).ok();
            all.b.add(&p.b).ok();
            all.c.add(&p.c).ok();
            all.d.add(&p.d).ok();
            all.ok += p.ok;
            all.errors += p.errors;
            all.timeouts += p.timeouts;
            all.client_bytes += p.client_bytes;
            all.lost += p.lost;
            all.crashed += p.crashed;
            if all.first_error.is_none() {
                all.first_error = p.first_error;
            }
        }
        all
    }
}

/// What this executor measured, once its tasks are done with it.
pub(crate) fn into_part(part: Rc<RefCell<Part>>) -> Part {
    Rc::try_unwrap(part)
        .map(RefCell::into_inner)
        .unwrap_or_else(|_| Part::new())
}

pub(crate) fn write_json(c: &Common, v: Value) -> Result<(), String> {
    if let Some(path) = &c.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
