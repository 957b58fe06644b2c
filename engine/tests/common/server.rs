//! Runs the real `roster` binary as its own process (a process here may hold ~20k descriptors,
//! so large tests keep clients and server apart) and talks to it over blocking WebSockets.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

pub struct Server {
    pub addr: SocketAddr,
    child: Child,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    /// Starts roster on a free loopback port with `args`, waiting until every shard is ready.
    pub fn start(args: &[&str]) -> Server {
        Self::start_with(Command::new(env!("CARGO_BIN_EXE_roster")), args)
    }

    /// Starts roster with its open-files limit (soft and hard) set to `limit`.
    pub fn start_with_fd_limit(limit: u32, args: &[&str]) -> Server {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            &format!("ulimit -n {limit} && exec \"$0\" \"$@\""),
            env!("CARGO_BIN_EXE_roster"),
        ]);
        Self::start_with(cmd, args)
    }

    fn start_with(mut cmd: Command, args: &[&str]) -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut child = cmd
            .args(["--listen", &addr.to_string()])
            // Tests run servers side by side: each admin listener takes a port of its own.
            .args(if args.contains(&"--admin-listen") {
                &[][..]
            } else {
                &["--admin-listen", "127.0.0.1:0"][..]
            })
            .args(args)
            .env("ROSTER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("roster starts");
        let shards: usize = args
            .iter()
            .position(|a| *a == "--shards")
            .and_then(|i| args.get(i + 1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = log.clone();
        std::thread::spawn(move || {
            let mut ready = 0;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("shard ready") {
                    ready += 1;
                    if ready == shards {
                        let _ = tx.send(());
                    }
                }
                if std::env::var_os("ROSTER_TEST_SERVER_LOG").is_some() {
                    eprintln!("[roster] {line}");
                }
                if let Ok(mut l) = keep.lock() {
                    l.push(line);
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(10)).is_err() {
            let status = child.try_wait();
            let _ = child.kill();
            panic!("roster not ready within 10 s (exit status {status:?}); ROSTER_TEST_SERVER_LOG=1 shows its log");
        }
        Server { addr, child, log }
    }

    /// Whether any log line so far contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.log
            .lock()
            .map(|l| l.iter().any(|line| line.contains(text)))
            .unwrap_or(false)
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub fn stop(&mut self, within: Duration) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "roster did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of the server process, in bytes.
    pub fn rss(&self) -> usize {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Client {
    pub ws: WebSocket<TcpStream>,
    next_ref: u64,
}

impl Client {
    pub fn connect(addr: SocketAddr, user: &str) -> Result<Client, String> {
        let stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        Self::over(stream, addr, user, Duration::from_secs(10))
    }

    /// A client on an already connected stream, waiting at most `timeout` for any read.
    pub fn over(
        stream: TcpStream,
        addr: SocketAddr,
        user: &str,
        timeout: Duration,
    ) -> Result<Client, String> {
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0&user_id={user}");
        let config = WebSocketConfig::default().read_buffer_size(4096);
        let (ws, _) = tungstenite::client::client_with_config(url, stream, Some(config))
            .map_err(|e| format!("handshake: {e}"))?;
        Ok(Client { ws, next_ref: 0 })
    }

    /// A client whose upgrade request carries `query` (after `vsn=2.0.0&`) and, if given,
    /// `token` in Sec-WebSocket-Protocol the way phoenix.js 1.8's `authToken` sends it. A refusal
    /// comes back as "STATUS body".
    pub fn with_query(
        addr: SocketAddr,
        query: &str,
        token: Option<&str>,
    ) -> Result<Client, String> {
        let stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        let protocol = token.map(|t| {
            use base64::Engine as _;
            let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t);
            format!("phoenix, base64url.bearer.phx.{encoded}")
        });
        let headers: Vec<(&str, &str)> = protocol
            .as_deref()
            .map(|p| ("Sec-WebSocket-Protocol", p))
            .into_iter()
            .collect();
        Self::with_request(stream, addr, query, &headers)
    }

    /// The upgrade over `stream` with `query` and extra `headers`; a refusal comes back as
    /// "STATUS body".
    pub fn with_request(
        stream: TcpStream,
        addr: SocketAddr,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, String> {
        use tungstenite::client::IntoClientRequest;
        use tungstenite::http::{HeaderName, HeaderValue};
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0&{query}");
        let mut req = url.into_client_request().map_err(|e| e.to_string())?;
        for (name, value) in headers {
            req.headers_mut().insert(
                HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?,
                HeaderValue::from_str(value).map_err(|e| e.to_string())?,
            );
        }
        match tungstenite::client::client(req, stream) {
            Ok((ws, _)) => Ok(Client { ws, next_ref: 0 }),
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
                let body = resp
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                Err(format!("{} {}", resp.status().as_u16(), body.trim()))
            }
            Err(e) => Err(format!("handshake: {e}")),
        }
    }

    pub fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::text(frame.to_string()))
            .expect("send");
    }

    /// Sends `[jr, ref, topic, event, payload]`; returns the ref.
    pub fn push(&mut self, jr: &str, topic: &str, event: &str, payload: Value) -> String {
        self.next_ref += 1;
        let r = self.next_ref.to_string();
        self.send(json!([jr, r, topic, event, payload]));
        r
    }

    /// The next text frame as JSON; `None` on close.
    pub fn recv(&mut self) -> Option<Value> {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).expect("JSON frame")),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Reads until a frame matches.
    pub fn until(&mut self, mut pred: impl FnMut(&Value) -> bool) -> Value {
        loop {
            let f = self.recv().expect("connection open");
            if pred(&f) {
                return f;
            }
        }
    }

    /// Joins and returns the presence_state payload (full mode).
    pub fn join(&mut self, topic: &str, payload: Value) -> Value {
        let r = self.push(&format!("j{topic}"), topic, "phx_join", payload);
        let reply = self.until(|f| f[1] == r.as_str());
        assert_eq!(reply[4]["status"], "ok", "{reply}");
        self.until(|f| f[3] == "presence_state" && f[2] == topic)[4].clone()
    }
}
