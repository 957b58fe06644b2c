//! The NATS bridge: one OS thread running roster's NATS client (`link`, `wire`) on a
//! current-thread tokio runtime, between the glommio shards and NATS. Shards hand it batches
//! of what their cores asked for (`NatsOut`) on one bounded channel and never wait on it; it
//! hands each shard the
//! frames about the names that shard owns (decoded and validated here, off the shards' cores),
//! the answers to its requests, and what heartbeats say about the other nodes (`cluster::nodes`,
//! driven here: it is the node's, not a shard's).
//!
//! Must not: block a shard; pass on bytes that are not a valid frame; publish while its NATS
//! connection is down or its backlog is full: such frames are dropped and the next heartbeat
//! skips a number, so the other nodes fetch this node's parts again.

mod link;
mod wire;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use link::Counters;
use link::{Creds, Event, Link, Server};
use wire::Msg;

use crate::cluster::frame::{Command, Frame, Goodbye, Kind, Origin};
use crate::cluster::inbox::Inbox;
use crate::cluster::lookup::{Ask, Found, Lookups, To};
use crate::cluster::nodes::{DownReason, NodeEvent, Nodes, Timing};
use crate::cluster::subject::{both, name_hash, name_subject, split_name_subject, Side, Subjects};
use crate::config::NodeConfig;
use crate::core::{Millis, NatsOut};
use crate::mesh::{Router, ShardId};

/// What a shard sends the bridge.
pub enum ToBridge {
    Batch(ShardId, Vec<NatsOut>),
    /// The admin API asks for every other node's presences of a name this node holds nothing
    /// of (`cluster::lookup`).
    Lookup(Kind, String, LookupReply),
    /// The admin API acts on every node (this one too: it hears its own command).
    Command(Command),
    /// A graceful stop that keeps presence has begun (the shards handed their presences
    /// over): nothing more is published, so that closing the clients is not seen by the other
    /// nodes, who hold this node's parts for the restart grace instead.
    Quiet,
    /// The shards have stopped: say goodbye (asking the others to hold this node's parts for
    /// that long, if not zero) and end.
    Stop(Duration),
}

/// Where a lookup's answer goes.
pub type LookupReply = std::sync::mpsc::Sender<Found>;

/// What the bridge sends a shard.
#[derive(Debug)]
pub enum FromBridge {
    /// A frame about a name the shard owns; `reply` is where a request wants its answer.
    Frame(Frame, Option<String>),
    /// Nobody subscribes to what the shard's request about this name asked.
    NoResponders(Kind, String),
    NodeUp(Origin),
    NodeBack(Origin),
    NodeDown(Origin),
    /// It ended, but its presences stay for a grace (`cluster::nodes::NodeEvent::Held`).
    NodeHeld(Origin),
    NodeGap(Origin),
    /// A frame of this origin about this name was dropped (the shard's queue was full): that
    /// part alone is fetched again.
    NameGap(Origin, Kind, String),
    /// Requests to this node may have been lost: publish its own parts.
    Announce,
    /// The admin API of some node acts (for this shard: every shard disconnects, the
    /// topic's owner tracks).
    Command(Command),
}

/// The cluster's figures, shared with the admin side.
#[derive(Default, Debug)]
pub struct ClusterStats {
    pub nodes_up: AtomicU64,
    /// Bytes from NATS that were not a valid frame (or not for this node).
    pub bad_frames: AtomicU64,
    /// Frames a shard's queue had no room for (their names' parts are fetched again).
    pub dropped_in: AtomicU64,
    /// Frames not published: the NATS connection was down or its backlog full.
    pub dropped_out: AtomicU64,
    pub part_requests: AtomicU64,
    /// Gaps in other nodes' heartbeats or this node's reconnects: parts fetched again.
    pub gaps: AtomicU64,
    pub nodes_down: AtomicU64,
    /// The NATS connection's own counters: messages and bytes each way, connects.
    pub nats: Arc<Counters>,
}

impl ClusterStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The running bridge, as the server holds it.
pub struct Bridge {
    pub me: Origin,
    pub subjects: Subjects,
    pub max_payload: usize,
    pub to_bridge: flume::Sender<ToBridge>,
    /// Shard i's inputs; taken by the shard when it starts.
    pub from_bridge: Vec<flume::Receiver<FromBridge>>,
    pub stats: Arc<ClusterStats>,
    thread: std::thread::JoinHandle<()>,
}

/// Batches the shards may have waiting for the bridge; past this a shard's task waits (its
/// frames stay in its own queue).
const BRIDGE_QUEUE: usize = 4096;
/// Frames waiting in one shard's input queue past which frames are dropped (their names' parts
/// are then fetched again). Node events are never dropped.
const SHARD_QUEUE: usize = 65_536;
/// Names owed a re-fetch past which a drop owes its whole origin instead (every name of
/// interest fetched again from it), so that what is owed stays bounded.
const OWED_NAMES: usize = 65_536;
/// "No responders", as NATS says it in a reply's status.
const NO_RESPONDERS: u16 = 503;
/// How long a request's record is kept for NATS's "no responders" (which comes at once).
const REQUEST_KEEP: Millis = Millis(30_000);
/// How long a lookup waits for holders (the admin API's own wait for an answer is longer).
const LOOKUP_WAIT: Millis = Millis(1_000);

impl Bridge {
    /// Connects to NATS and listens for a while to be sure no live node has this node's name;
    /// then the bridge runs on its own thread until [`Bridge::stop`].
    /// `names` gets every node's name as its heartbeats say it (for events about its presences).
    pub fn start(node: &NodeConfig, shards: u16, names: NodeNames) -> Result<Bridge, String> {
        let me = Origin {
            node: name_hash(&node.name),
            incarnation: fastrand::u64(1..),
        };
        let subjects = Subjects::new(&node.prefix).map_err(|e| e.0)?;
        let (to_bridge, commands) = flume::bounded(BRIDGE_QUEUE);
        let (senders, from_bridge): (Vec<_>, Vec<_>) =
            (0..shards).map(|_| flume::unbounded()).unzip();
        let stats = Arc::new(ClusterStats::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let setup = Setup {
            node: node.clone(),
            me,
            subjects: subjects.clone(),
            shards: senders,
            stats: stats.clone(),
            commands,
            names,
        };
        let thread = std::thread::Builder::new()
            .name("roster-nats".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("cannot start the NATS thread: {e}")));
                        return;
                    }
                };
                rt.block_on(async move {
                    match setup.connect().await {
                        Ok(bridge) => {
                            let _ = ready_tx.send(Ok(bridge.link.max_payload()));
                            bridge.run().await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })
            .map_err(|e| format!("cannot start the NATS thread: {e}"))?;
        let max_payload = ready_rx
            .recv()
            .map_err(|_| "the NATS thread ended before connecting".to_owned())??;
        Ok(Bridge {
            me,
            subjects,
            max_payload,
            to_bridge,
            from_bridge,
            stats,
            thread,
        })
    }

    /// Says goodbye to the cluster (after the shards have stopped), asking the other nodes to
    /// hold this node's parts for `hold` (its state file is written), and waits for the thread.
    pub fn stop(self, hold: Duration) {
        let _ = self.to_bridge.send(ToBridge::Stop(hold));
        let _ = self.thread.join();
    }
}

struct Setup {
    node: NodeConfig,
    me: Origin,
    subjects: Subjects,
    shards: Vec<flume::Sender<FromBridge>>,
    stats: Arc<ClusterStats>,
    commands: flume::Receiver<ToBridge>,
    names: NodeNames,
}

/// Node names by node id, shared with the event sinks.
pub type NodeNames = Arc<std::sync::RwLock<HashMap<u64, String>>>;

impl Setup {
    async fn connect(self) -> Result<Running, String> {
        let node = &self.node;
        let servers: Vec<Server> = node
            .nats_urls
            .iter()
            .map(|u| Server::parse(u).map_err(|e| format!("--nats-url {e}")))
            .collect::<Result<_, _>>()?;
        let creds = match &node.creds {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("--nats-creds {}: {e}", path.display()))?;
                Some(
                    Creds::parse(&text)
                        .map_err(|e| format!("--nats-creds {}: {e}", path.display()))?,
                )
            }
            None => None,
        };
        let shown: Vec<String> = servers
            .iter()
            .map(|s| format!("{}:{}", s.host, s.port))
            .collect();
        let options = link::Options {
            servers,
            name: format!("roster {}", node.name),
            creds,
            // Notices a dead server within seconds.
            ping_interval: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
        };
        let mut link = Link::connect(options, self.stats.nats.clone())
            .await
            .map_err(|e| format!("cannot connect to NATS at {}: {e}", shown.join(",")))?;
        let inbox = Inbox::new(link.new_inbox(), self.shards.len() as u16, REQUEST_KEEP);
        let sids = Sids {
            heartbeats: link.subscribe(self.subjects.heartbeats()),
            answers: link.subscribe(inbox.subscription()),
            commands: link.subscribe(self.subjects.commands()),
        };
        // Requests to this node alone; its frames are handled by name, as names' are.
        link.subscribe(self.subjects.node(self.me.node));
        let deliver = Deliver {
            router: Router::new(self.shards.len() as u16),
            shards: self.shards,
            stats: self.stats.clone(),
            owed: Owed::default(),
        };
        let epoch = Instant::now();
        let timing = Timing {
            heartbeat: millis(node.heartbeat),
            timeout: millis(node.timeout),
            isolation_grace: millis(node.isolation_grace),
            leave_grace: millis(node.leave_grace),
        };
        // Listen before speaking: a live node of this name beats within a heartbeat.
        let listen = node.heartbeat * 2 + Duration::from_millis(100);
        let mut running = Running {
            nodes: Nodes::new(self.me, &node.name, timing, millis(listen)),
            link,
            sids,
            me: self.me,
            subjects: self.subjects,
            name: node.name.clone(),
            commands: self.commands,
            inbox,
            lookups: Lookups::new(self.me),
            deliver,
            names: HashMap::new(),
            node_names: self.names,
            retiring: VecDeque::new(),
            epoch,
            connected: true,
            stats: self.stats,
            quiet: false,
            hold: Millis(0),
        };
        let until = tokio::time::Instant::from_std(epoch + listen);
        loop {
            tokio::select! {
                e = running.link.next() => {
                    let Some(e) = e else { break };
                    if let Some(clash) = running.link_event(e, true) {
                        return Err(clash);
                    }
                }
                _ = tokio::time::sleep_until(until) => break,
            }
        }
        tracing::info!(
            node = %running.name,
            id = format_args!("{:016x}", running.me.node),
            peers = running.nodes.up().count(),
            max_payload = running.link.max_payload(),
            "joined the cluster"
        );
        Ok(running)
    }
}

fn millis(d: Duration) -> Millis {
    Millis(d.as_millis() as u64)
}

/// Hands inbound frames to the shards that own their names.
struct Deliver {
    shards: Vec<flume::Sender<FromBridge>>,
    router: Router,
    stats: Arc<ClusterStats>,
    owed: Owed,
}

/// Re-fetches owed to shards whose frames were dropped, sent once their queues have room.
#[derive(Default)]
struct Owed {
    /// A name's part of one origin, for a dropped delta or part about it.
    names: BTreeSet<(u16, Origin, Kind, String)>,
    /// Every name's, past [`OWED_NAMES`].
    origins: BTreeSet<(u16, Origin)>,
}

impl Deliver {
    /// A command of the admin API: to every shard (a disconnect), or to the topic's owner.
    fn command(&mut self, m: &Msg) {
        let Some(Frame::Command(c)) = self.decode(m) else {
            ClusterStats::add(&self.stats.bad_frames, 1);
            return;
        };
        match &c {
            Command::Disconnect { .. } => {
                for shard in &self.shards {
                    let _ = shard.send(FromBridge::Command(c.clone()));
                }
            }
            Command::Track { topic, .. } | Command::Untrack { topic, .. } => {
                let owner = self.router.topic_owner(topic).index();
                if let Some(shard) = self.shards.get(owner) {
                    let _ = shard.send(FromBridge::Command(c));
                }
            }
        }
    }

    fn decode(&self, m: &Msg) -> Option<Frame> {
        match Frame::decode(&m.payload) {
            Ok(f) => Some(f),
            Err(e) => {
                ClusterStats::add(&self.stats.bad_frames, 1);
                tracing::debug!(subject = %m.subject, "dropped a bad frame: {e}");
                None
            }
        }
    }

    /// A frame on a topic's subject or this node's own: to the owner of its name.
    fn by_name(&mut self, m: Msg) {
        let Some(frame) = self.decode(&m) else {
            return;
        };
        let Some((kind, name)) = frame.about() else {
            // Heartbeats have a subject of their own.
            ClusterStats::add(&self.stats.bad_frames, 1);
            return;
        };
        // The same shard as the name's owner on every node (`mesh::Router`).
        let shard = match kind {
            Kind::Topic => self.router.topic_owner(name),
            Kind::User => self.router.user_owner(name),
        };
        self.frame(shard, frame, m.reply);
    }

    fn frame(&mut self, shard: ShardId, frame: Frame, reply: Option<String>) {
        let tx = &self.shards[shard.index()];
        if tx.len() >= SHARD_QUEUE {
            ClusterStats::add(&self.stats.dropped_in, 1);
            // A dropped request is asked again by its sender, whose fetch times out.
            let origin = match &frame {
                Frame::Delta(d) => Some(d.origin),
                Frame::Part(p) => Some(p.origin),
                _ => None,
            };
            if let (Some(o), Some((kind, name))) = (origin, frame.about()) {
                let owed = &mut self.owed;
                if owed.origins.contains(&(shard.0, o)) {
                    return;
                }
                if owed.names.len() < OWED_NAMES {
                    owed.names.insert((shard.0, o, kind, name.to_owned()));
                } else {
                    owed.origins.insert((shard.0, o));
                }
            }
            return;
        }
        let _ = tx.send(FromBridge::Frame(frame, reply));
    }

    /// Node events go to every shard and are never dropped.
    fn everyone(&self, event: impl Fn() -> FromBridge) {
        for tx in &self.shards {
            let _ = tx.send(event());
        }
    }

    /// Re-fetches owed by drops, once the shards' queues have room again.
    fn settle_owed(&mut self) {
        let shards = &self.shards;
        let room = |shard: u16| shards[shard as usize].len() < SHARD_QUEUE / 2;
        let Owed { names, origins } = &mut self.owed;
        origins.retain(|&(shard, origin)| {
            if !room(shard) {
                return true;
            }
            let _ = shards[shard as usize].send(FromBridge::NodeGap(origin));
            false
        });
        names.retain(|(shard, origin, kind, name)| {
            // Owed with its whole origin: fetched again with it.
            if origins.contains(&(*shard, *origin)) {
                return false;
            }
            if !room(*shard) {
                return true;
            }
            let gap = FromBridge::NameGap(*origin, *kind, name.clone());
            let _ = shards[*shard as usize].send(gap);
            false
        });
    }
}

/// How long a name's old subscription stays after a new one replaced it: until then a message
/// may be routed to the old one alone (the server may not have the new one yet), after it to
/// both. Messages that come twice are harmless: a delta is dropped as a duplicate by its seq, a
/// part is the same part again. Closing the old one at once lost messages under load (a
/// watcher missing a user that was online).
const SWAP_OVERLAP: Duration = Duration::from_secs(1);

/// One name's subjects as this node subscribes to them: its deltas alone while its first fetch
/// is on, then deltas and part requests as one wildcard (`subject::both`). Half the
/// subscriptions: each costs ~1 KiB in nats-server, and a node has one or two per topic and user
/// its clients touch.
#[derive(Default)]
struct NameSubs {
    /// Shards' subscriptions to the name's deltas and to its part requests.
    deltas: u32,
    parts: u32,
    /// The subscription's kind and id.
    sub: Option<(Side, u64)>,
}

impl NameSubs {
    /// The subscription wanted: both subjects (`Side::Parts` stands for the wildcard), the
    /// deltas only, or none.
    fn wanted(&self) -> Option<Side> {
        if self.parts > 0 {
            Some(Side::Parts)
        } else if self.deltas > 0 {
            Some(Side::Deltas)
        } else {
            None
        }
    }
}

/// The subscriptions that are the bridge's own, not names'.
#[derive(Clone, Copy)]
struct Sids {
    heartbeats: u64,
    answers: u64,
    commands: u64,
}

struct Running {
    link: Link,
    sids: Sids,
    me: Origin,
    name: String,
    subjects: Subjects,
    nodes: Nodes,
    commands: flume::Receiver<ToBridge>,
    inbox: Inbox,
    lookups: Lookups<LookupReply>,
    deliver: Deliver,
    /// Subscriptions of names' subjects, by stem (`subject::split_name_subject`).
    names: HashMap<String, NameSubs>,
    /// Other nodes' names, from their heartbeats (for the event sinks).
    node_names: NodeNames,
    /// Subscriptions replaced by another, and when they end (`SWAP_OVERLAP`).
    retiring: VecDeque<(Instant, u64)>,
    epoch: Instant,
    connected: bool,
    stats: Arc<ClusterStats>,
    /// A stop that keeps presence is on: the shards' frames are not published (`Quiet`).
    quiet: bool,
    /// What the goodbye asks the others to hold this node's parts for.
    hold: Millis,
}

impl Running {
    fn now(&self) -> Millis {
        millis(self.epoch.elapsed())
    }

    async fn run(mut self) {
        loop {
            let next = self.nodes.poll_timeout();
            let next = self.lookups.next_wake().map_or(next, |l| l.min(next));
            let wake = self.epoch + Duration::from_millis(next.0);
            let wake = self.retiring.front().map_or(wake, |&(at, _)| at.min(wake));
            let wake = tokio::time::Instant::from_std(wake.max(Instant::now()));
            // Not biased: a flood of the shards' batches must not starve the other nodes'
            // heartbeats (they would be taken for dead). Heartbeats and silences are checked
            // after every branch, as a busy loop may never reach the sleep.
            tokio::select! {
                e = self.link.next() => match e {
                    Some(e) => {
                        self.link_event(e, false);
                    }
                    None => break,
                },
                c = self.commands.recv_async() => match c {
                    Ok(ToBridge::Batch(shard, outs)) => self.outs(shard, outs).await,
                    Ok(ToBridge::Lookup(kind, name, reply)) => {
                        let ask = self.lookups.start(kind, &name, self.now(), LOOKUP_WAIT, reply);
                        self.lookup_ask(ask).await;
                    }
                    Ok(ToBridge::Quiet) => self.quiet = true,
                    Ok(ToBridge::Command(c)) => {
                        let subject = self.subjects.commands();
                        self.publish(subject, None, Frame::Command(c).encode()).await;
                    }
                    Ok(ToBridge::Stop(hold)) => {
                        self.hold = millis(hold);
                        break;
                    }
                    Err(_) => break,
                },
                _ = tokio::time::sleep_until(wake) => {}
            }
            self.tick().await;
        }
        self.goodbye().await;
    }

    /// Heartbeats due, nodes silent too long, lookups due, and replaced subscriptions' ends.
    async fn tick(&mut self) {
        let at = Instant::now();
        while let Some(&(_, sid)) = self.retiring.front().filter(|(end, _)| *end <= at) {
            self.link.unsubscribe(sid);
            self.retiring.pop_front();
        }
        let now = self.now();
        let events = self.nodes.tick(now);
        self.node_events(events, false);
        let (done, asks) = self.lookups.tick(now);
        for (reply, found) in done {
            let _ = reply.send(found);
        }
        for ask in asks {
            self.lookup_ask(ask).await;
        }
        if let Some(hb) = self.nodes.heartbeat_due(now) {
            let frame = Frame::Heartbeat(hb).encode();
            self.publish(self.subjects.heartbeats(), None, frame).await;
            self.deliver.settle_owed();
        }
    }

    async fn outs(&mut self, shard: ShardId, outs: Vec<NatsOut>) {
        if self.quiet {
            return;
        }
        for out in outs {
            match out {
                NatsOut::Subscribe(s) => self.interest(s, true).await,
                NatsOut::Unsubscribe(s) => self.interest(s, false).await,
                NatsOut::Publish { subject, frame } => self.publish(subject, None, frame).await,
                NatsOut::Request {
                    subject,
                    kind,
                    name,
                    frame,
                } => {
                    ClusterStats::add(&self.stats.part_requests, 1);
                    let reply = self.inbox.ask(shard, kind, &name, self.now());
                    self.publish(subject, Some(reply), frame).await;
                }
                NatsOut::Reply { to, frame } => self.publish(to, None, frame).await,
            }
        }
    }

    async fn lookup_ask(&mut self, ask: Ask) {
        let subject = match ask.to {
            To::Holders(kind, name) => self.subjects.parts(kind.into(), &name),
            To::Node(node) => self.subjects.node(node),
        };
        let reply = self.inbox.lookup(ask.id);
        self.publish(subject, Some(reply), ask.frame).await;
    }

    /// A shard's interest in `subject` starts (`up`) or ends.
    async fn interest(&mut self, subject: String, up: bool) {
        let Some((stem, side)) = split_name_subject(&subject) else {
            // Shards only subscribe to names' subjects (`Subjects::deltas`, `Subjects::parts`).
            debug_assert!(false, "not a name's subject: {subject}");
            tracing::warn!(%subject, "not a name's subject: ignored");
            return;
        };
        let e = self.names.entry(stem.to_owned()).or_default();
        let count = match side {
            Side::Deltas => &mut e.deltas,
            Side::Parts => &mut e.parts,
        };
        *count = if up {
            *count + 1
        } else {
            count.saturating_sub(1)
        };
        let want = e.wanted();
        if want == e.sub.as_ref().map(|(s, _)| *s) {
            if want.is_none() {
                self.names.remove(stem);
            }
            return;
        }
        let before = e.sub.take().map(|(_, sid)| sid);
        let sid = match want {
            Some(Side::Parts) => Some(self.link.subscribe(both(stem))),
            Some(Side::Deltas) => Some(self.link.subscribe(name_subject(stem, Side::Deltas))),
            None => None,
        };
        // The old one ends at once if nothing replaces it, else after the overlap.
        match (before, sid) {
            (Some(before), Some(_)) => self
                .retiring
                .push_back((Instant::now() + SWAP_OVERLAP, before)),
            (Some(before), None) => self.link.unsubscribe(before),
            _ => {}
        }
        match (self.names.get_mut(stem), want.zip(sid)) {
            (Some(e), Some(sub)) => e.sub = Some(sub),
            _ => {
                self.names.remove(stem);
            }
        }
    }

    async fn publish(&mut self, subject: String, reply: Option<String>, frame: Vec<u8>) {
        if !self.connected || !self.link.publish(subject, reply, frame) {
            ClusterStats::add(&self.stats.dropped_out, 1);
            self.nodes.lost_frames();
        }
    }

    /// An answer to one of this node's requests, or NATS saying nobody could answer it.
    fn answer(&mut self, m: Msg) {
        if let Some(id) = self.inbox.lookup_of(&m.subject) {
            let done = if m.status == Some(NO_RESPONDERS) {
                self.lookups.no_responders(id)
            } else {
                match self.deliver.decode(&m) {
                    Some(Frame::Part(p)) => self.lookups.part(id, p),
                    _ => None,
                }
            };
            if let Some((reply, found)) = done {
                let _ = reply.send(found);
            }
            return;
        }
        if m.status == Some(NO_RESPONDERS) {
            if let Some((shard, kind, name)) = self.inbox.no_responders(&m.subject) {
                let answer = FromBridge::NoResponders(kind, name);
                let _ = self.deliver.shards[shard.index()].send(answer);
            }
            return;
        }
        let Some(shard) = self.inbox.answer(&m.subject) else {
            ClusterStats::add(&self.stats.bad_frames, 1);
            return;
        };
        if let Some(frame) = self.deliver.decode(&m) {
            self.deliver.frame(shard, frame, None);
        }
    }

    /// A heartbeat or a goodbye. While `probing` (before this node speaks), a live node of this
    /// node's name is an error to start with.
    fn heartbeat(&mut self, m: &Msg, probing: bool) -> Option<String> {
        let now = self.now();
        let events = match self.deliver.decode(m)? {
            Frame::Heartbeat(hb) => {
                let known = |n: &HashMap<u64, String>| n.get(&hb.origin.node) == Some(&hb.name);
                if !known(&self.node_names.read().unwrap_or_else(|e| e.into_inner())) {
                    let mut names = self.node_names.write().unwrap_or_else(|e| e.into_inner());
                    names.insert(hb.origin.node, hb.name.clone());
                }
                self.nodes.heard(&hb, now)
            }
            Frame::Goodbye(g) => self.nodes.goodbye(g.origin, Millis(g.hold_ms), now),
            _ => {
                ClusterStats::add(&self.stats.bad_frames, 1);
                return None;
            }
        };
        self.node_events(events, probing)
    }

    fn node_events(&mut self, events: Vec<NodeEvent>, probing: bool) -> Option<String> {
        let mut clash = None;
        for e in events {
            match e {
                NodeEvent::Up(o) => {
                    tracing::info!(node = format_args!("{:016x}", o.node), "node up");
                    self.deliver.everyone(|| FromBridge::NodeUp(o));
                }
                NodeEvent::Back(o) => {
                    tracing::info!(node = format_args!("{:016x}", o.node), "node back");
                    self.deliver.everyone(|| FromBridge::NodeBack(o));
                }
                NodeEvent::Restarted { old, .. } => {
                    tracing::info!(node = format_args!("{:016x}", old.node), "node restarted");
                    self.deliver.everyone(|| FromBridge::NodeDown(old));
                }
                NodeEvent::Gap(o) => {
                    ClusterStats::add(&self.stats.gaps, 1);
                    self.deliver.everyone(|| FromBridge::NodeGap(o));
                }
                NodeEvent::Down(o, reason) => {
                    if reason != DownReason::GraceEnded {
                        ClusterStats::add(&self.stats.nodes_down, 1);
                    }
                    tracing::warn!(node = format_args!("{:016x}", o.node), ?reason, "node down");
                    self.deliver.everyone(|| FromBridge::NodeDown(o));
                }
                NodeEvent::Held(o, reason) => {
                    ClusterStats::add(&self.stats.nodes_down, 1);
                    tracing::warn!(
                        node = format_args!("{:016x}", o.node),
                        ?reason,
                        "node down: its presences are held for their clients to reconnect"
                    );
                    self.deliver.everyone(|| FromBridge::NodeHeld(o));
                }
                NodeEvent::NameClash { name, theirs } => {
                    let msg = format!(
                        "another live node is named {name:?} (incarnation {:016x}): give each \
                         node its own --node-name",
                        theirs.incarnation
                    );
                    if probing {
                        clash = Some(msg);
                    } else {
                        // It started after this one and refuses to run; this one carries on.
                        tracing::error!("{msg}");
                    }
                }
            }
        }
        let up = self.nodes.up().count() as u64;
        self.stats.nodes_up.store(up, Ordering::Relaxed);
        clash
    }

    /// What the NATS connection says; a name clash while `probing`.
    fn link_event(&mut self, e: Event, probing: bool) -> Option<String> {
        let now = self.now();
        match e {
            Event::Msg(m) if m.sid == self.sids.heartbeats => return self.heartbeat(&m, probing),
            Event::Msg(m) if m.sid == self.sids.answers => self.answer(m),
            Event::Msg(m) if m.sid == self.sids.commands => self.deliver.command(&m),
            // The node's own subject and names' subscriptions: by the name in the frame.
            Event::Msg(m) => self.deliver.by_name(m),
            Event::Disconnected => {
                tracing::warn!(
                    "NATS connection lost: other nodes' presences are kept for the isolation grace"
                );
                self.connected = false;
                self.nodes.disconnected(now);
                // What was handed to the connection and not yet written went with it: the
                // next heartbeat says so, and the others fetch this node's parts again.
                self.nodes.lost_frames();
            }
            Event::Connected => {
                if !self.connected {
                    tracing::info!("NATS connection back: fetching the other nodes' parts again");
                    self.connected = true;
                    let events = self.nodes.reconnected(now);
                    self.node_events(events, false);
                }
            }
            Event::Dropped => {
                // Messages were dropped before the bridge took them: everyone's parts again.
                tracing::warn!(
                    "the NATS bridge fell behind and dropped messages: fetching the other nodes' \
                     parts again"
                );
                // Requests for this node's parts may have been among them: it announces them.
                let up: Vec<Origin> = self.nodes.up().collect();
                for o in up {
                    ClusterStats::add(&self.stats.gaps, 1);
                    self.deliver.everyone(|| FromBridge::NodeGap(o));
                }
                self.deliver.everyone(|| FromBridge::Announce);
            }
            Event::ServerError(e) => tracing::warn!("NATS: {e}"),
        }
        None
    }

    /// A graceful stop: the other nodes drop this node's parts now rather than after the node
    /// timeout.
    async fn goodbye(mut self) {
        let goodbye = Goodbye {
            origin: self.me,
            hold_ms: self.hold.0,
        };
        let frame = Frame::Goodbye(goodbye).encode();
        self.publish(self.subjects.heartbeats(), None, frame).await;
        let flushed = tokio::time::timeout(Duration::from_secs(2), self.link.flush()).await;
        if !matches!(flushed, Ok(true)) {
            tracing::warn!("could not flush the goodbye to NATS");
        }
        self.link.close();
        tracing::info!(node = %self.name, "left the cluster");
    }
}
