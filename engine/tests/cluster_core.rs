//! The core's cluster side with several nodes in one thread and a small model of NATS between
//! them (subjects, request/reply, "no responders", echo to the publisher's own subscriptions,
//! per-publisher order, nothing delivered to a subscription after it is gone): clients on
//! different nodes see each other as phoenix.js `Presence` would, a late node's first joiner
//! gets every node's members, a lost delta is repaired by a re-fetch, a lost re-fetch is asked
//! again, and a dead node's presences leave. Then seeded random runs (2-4 nodes of 1-3 shards,
//! publishers interleaved at random, coalescing windows on or off, watchers of keys beside the
//! tracked clients) with the faults a real NATS brings: messages dropped at a receiver (a slow
//! consumer: its node hears of gaps for everyone and announces its parts), nodes killed,
//! restarted with a new incarnation after the others saw the death or before (the news of the
//! old one's end racing the new one's frames), and cut off from NATS (shorter than the node
//! timeout, past it, and past the isolation grace too). At every quiescence each client's view
//! equals the model with the same refs on every node, and every watcher sees each key it
//! watches where the model has it; the runs prove they exercised each fault.
//! `ROSTER_CLUSTER_SEEDS=N` runs N seeds (default 300), `ROSTER_CLUSTER_SEED=S` one (its log
//! goes to /tmp/cluster-seed.log when it fails).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use roster_engine::cluster::frame::{Frame, Kind, Origin};
use roster_engine::cluster::subject::Subjects;
use roster_engine::core::event::{EventKind, Reason};
use roster_engine::core::{ClusterConfig, Config, ConnId, Millis, NatsOut, Output, Shard, UserKey};
use roster_engine::mesh::{Router, ShardId};

mod common;
use common::presence::{see, View};

/// One message NATS holds for a node.
#[derive(Debug)]
enum Inbound {
    Frame(Frame, Option<String>),
    NoResponders(Kind, String),
}

/// A message for one receiver: (to node, what, the subject it was published on to
/// subscribers: it is gone if the receiver unsubscribes first).
type InFlight = (usize, Inbound, Option<String>);

/// NATS as the nodes see it: who subscribes to what, request and reply through inboxes, "no
/// responders", and what it holds for receivers in each publisher's order.
struct Nats {
    subs: BTreeMap<String, BTreeSet<usize>>,
    flight: Vec<VecDeque<InFlight>>,
}

impl Nats {
    /// Each node's driver subscribes to its own subject when it connects.
    fn new(subjects: &Subjects, ids: &[u64]) -> Nats {
        let mut subs: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
        for (i, &node) in ids.iter().enumerate() {
            subs.entry(subjects.node(node)).or_default().insert(i);
        }
        Nats {
            subs,
            flight: ids.iter().map(|_| VecDeque::new()).collect(),
        }
    }

    fn subscribers(&self, subject: &str) -> Vec<usize> {
        self.subs
            .get(subject)
            .into_iter()
            .flatten()
            .copied()
            .collect()
    }

    /// What shard `shard` of node `from` (its process `life`: a restart is another NATS
    /// connection, with an inbox of its own) asked for.
    fn out(&mut self, from: usize, life: u64, shard: usize, out: NatsOut) {
        match out {
            NatsOut::Subscribe(s) => {
                self.subs.entry(s).or_default().insert(from);
            }
            NatsOut::Unsubscribe(s) => {
                if let Some(set) = self.subs.get_mut(&s) {
                    set.remove(&from);
                }
                for q in &mut self.flight {
                    q.retain(|(to, _, subject)| *to != from || subject.as_deref() != Some(&s));
                }
            }
            NatsOut::Publish { subject, frame } => {
                let frame = Frame::decode(&frame).expect("nodes publish valid frames");
                for to in self.subscribers(&subject) {
                    let m = (
                        to,
                        Inbound::Frame(frame.clone(), None),
                        Some(subject.clone()),
                    );
                    self.flight[from].push_back(m);
                }
            }
            NatsOut::Request {
                subject,
                kind,
                name,
                frame,
            } => {
                let frame = Frame::decode(&frame).expect("valid");
                let to = self.subscribers(&subject);
                if to.is_empty() {
                    self.flight[from].push_back((from, Inbound::NoResponders(kind, name), None));
                }
                for t in to {
                    let reply = Some(format!("_INBOX.{from}.{life}.{shard}"));
                    let m = (t, Inbound::Frame(frame.clone(), reply), None);
                    self.flight[from].push_back(m);
                }
            }
            NatsOut::Reply { to, frame } => {
                let node: usize = to.split('.').nth(1).unwrap().parse().unwrap();
                let frame = Frame::decode(&frame).expect("valid");
                self.flight[from].push_back((node, Inbound::Frame(frame, Some(to)), None));
            }
        }
    }

    /// Publishers with something in flight.
    fn busy(&self) -> Vec<usize> {
        (0..self.flight.len())
            .filter(|&i| !self.flight[i].is_empty())
            .collect()
    }

    /// A node died: its subscriptions go.
    fn gone(&mut self, node: usize) {
        for set in self.subs.values_mut() {
            set.remove(&node);
        }
    }
}

/// Which shard of a node's `shards` takes a frame: the owner of its name, as the node's driver
/// routes; an answer goes to the shard that asked. And the reply subject a request carries.
fn route(f: &Frame, reply: Option<String>, shards: u16) -> (usize, Option<String>) {
    let (kind, name) = f.about().expect("nodes' own frames are about names");
    let owner = owner(kind, name, shards);
    match (f, reply) {
        (Frame::Part(_), Some(inbox)) => (inbox.split('.').nth(3).unwrap().parse().unwrap(), None),
        (Frame::PartRequest(_), reply) => (owner, reply),
        _ => (owner, None),
    }
}

/// The shard owning a topic or a user key, the same on every node.
fn owner(kind: Kind, name: &str, shards: u16) -> usize {
    let router = Router::new(shards);
    match kind {
        Kind::Topic => router.topic_owner(name).index(),
        Kind::User => router.user_owner(name).index(),
    }
}

struct Cluster {
    nodes: Vec<Shard>,
    ids: Vec<u64>,
    nats: Nats,
    /// What each client (node, conn) has seen of "room", as phoenix.js keeps it.
    views: BTreeMap<(usize, u32), View>,
    /// Every frame each client got, in order.
    frames: BTreeMap<(usize, u32), Vec<serde_json::Value>>,
    /// Drop the next delta published by this node (a message NATS lost).
    lose_next_delta_of: Option<usize>,
    now: u64,
    /// The presence events each node reported, in order: (node, type, key, reason).
    events: Vec<(usize, EventKind, String, Option<Reason>)>,
}

impl Cluster {
    fn new(n: usize) -> Cluster {
        Cluster::with(n, Millis(0))
    }

    /// With a leave grace on every node.
    fn with(n: usize, leave_grace: Millis) -> Cluster {
        let subjects = Subjects::new("roster").unwrap();
        let ids: Vec<u64> = (0..n as u64).map(|i| 100 + i).collect();
        let nodes = ids
            .iter()
            .map(|&node| {
                let config = Config {
                    cluster: Some(ClusterConfig {
                        me: Origin {
                            node,
                            incarnation: node * 7,
                        },
                        subjects: subjects.clone(),
                        max_payload: 1 << 20,
                        fetch_timeout: Millis(1_000),
                    }),
                    // Distinct refs per node, as each process picks its own seed.
                    ref_seed: node.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    // Each settle lets 2 s pass, and these clients send no heartbeats.
                    heartbeat_timeout: Millis(3_600_000),
                    leave_grace,
                    events: true,
                    ..Config::default()
                };
                Shard::new(ShardId(0), config)
            })
            .collect();
        Cluster {
            nodes,
            nats: Nats::new(&subjects, &ids),
            ids,
            views: BTreeMap::new(),
            frames: BTreeMap::new(),
            lose_next_delta_of: None,
            now: 0,
            events: Vec::new(),
        }
    }

    fn collect(&mut self, i: usize) {
        self.nodes[i].flush();
        let outputs: Vec<Output> = self.nodes[i].outputs().collect();
        for o in outputs {
            match o {
                Output::Send { conn, frame, .. } => self.client_frame((i, conn.0), &frame),
                Output::Close { conn, reason, .. } => panic!("node {i} closed {conn:?}: {reason}"),
                Output::Mesh { msg, .. } => panic!("one shard per node sends no mesh: {msg:?}"),
                Output::Nats(out) => self.nats.out(i, 0, 0, out),
                Output::Event(e) => {
                    let key = e.key.as_str().to_owned();
                    self.events.push((i, e.kind, key, e.reason));
                }
                Output::Refresh { .. } => panic!("no tokens here"),
            }
        }
    }

    fn client_frame(&mut self, id: (usize, u32), bytes: &[u8]) {
        see(self.views.entry(id).or_default(), bytes);
        let v = serde_json::from_slice(bytes).expect("JSON");
        self.frames.entry(id).or_default().push(v);
    }

    /// Delivers until nothing is in flight, then lets the count interval pass everywhere
    /// (a topic nobody needs is forgotten once its last count change is settled).
    fn settle(&mut self) {
        for round in 0..2 {
            for i in 0..self.nodes.len() {
                if round == 1 {
                    self.now += 2_000;
                    self.nodes[i].tick(Millis(self.now));
                }
                self.collect(i);
            }
            // Publishers in turn, each in its order.
            while let Some(&from) = self.nats.busy().first() {
                self.deliver_from(from, 1);
            }
        }
    }

    /// Delivers the first `n` messages publisher `from` has in flight (fewer if it has fewer).
    fn deliver_from(&mut self, from: usize, n: usize) {
        for _ in 0..n {
            let Some((to, msg, _)) = self.nats.flight[from].pop_front() else {
                return;
            };
            match msg {
                Inbound::Frame(f, _) if self.lose(from, to, &f) => {}
                Inbound::Frame(f, reply) => {
                    let (_, reply) = route(&f, reply, 1);
                    self.nodes[to].nats_frame(f, reply.as_deref());
                }
                Inbound::NoResponders(kind, name) => self.nodes[to].no_responders(kind, &name),
            }
            self.collect(to);
        }
    }

    /// Time passes on node `i` (past the count interval, so topics nobody needs go).
    fn pass_time(&mut self, i: usize) {
        self.now += 2_000;
        self.nodes[i].tick(Millis(self.now));
        self.collect(i);
    }

    /// Whether this delivery is the delta that NATS loses.
    fn lose(&mut self, from: usize, to: usize, f: &Frame) -> bool {
        let lost =
            matches!(f, Frame::Delta(_)) && to != from && self.lose_next_delta_of == Some(from);
        if lost {
            self.lose_next_delta_of = None;
        }
        lost
    }

    fn join(&mut self, node: usize, conn: u32, key: &str, page: u32) {
        self.join_unsettled(node, conn, key, page);
        self.settle();
    }

    /// A join whose frames stay in flight.
    fn join_unsettled(&mut self, node: usize, conn: u32, key: &str, page: u32) {
        self.nodes[node].open(ConnId(conn), UserKey::new(key));
        let join = format!(r#"["1","1","room","phx_join",{{"meta":{{"page":{page}}}}}]"#);
        self.nodes[node].frame(ConnId(conn), join.as_bytes());
        self.collect(node);
    }

    fn close(&mut self, node: usize, conn: u32) {
        self.close_unsettled(node, conn);
        self.settle();
    }

    fn close_unsettled(&mut self, node: usize, conn: u32) {
        self.nodes[node].close(ConnId(conn));
        self.views.remove(&(node, conn));
        self.collect(node);
    }

    /// Who a client sees: key -> pages.
    fn sees(&self, node: usize, conn: u32) -> BTreeMap<String, Vec<u64>> {
        let view = &self.views[&(node, conn)];
        view.iter()
            .map(|(k, metas)| {
                (
                    k.clone(),
                    metas.iter().map(|m| m["page"].as_u64().unwrap()).collect(),
                )
            })
            .collect()
    }
}

fn who(pairs: &[(&str, u64)]) -> BTreeMap<String, Vec<u64>> {
    let mut m: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for &(k, p) in pairs {
        m.entry(k.to_owned()).or_default().push(p);
    }
    m
}

/// Node 0 asks node 1 for the room's parts, gives the room up and takes it up again before
/// node 1's answer arrives: that answer (with a presence that has left since) must not be
/// taken for one to the new fetch. (Seeded runs found this; the answer carries its interest.)
#[test]
fn a_late_answer_to_an_interest_given_up_is_not_taken() {
    let mut c = Cluster::new(2);
    c.join(1, 1, "ann", 1);
    c.join_unsettled(0, 1, "bob", 2);
    // Node 0's subscription and request reach node 1, whose answer stays in flight.
    c.deliver_from(0, usize::MAX);
    // ann leaves and node 1 forgets the room; so does node 0 once bob leaves (dropping what
    // was in flight on the room's subjects, not the answer to its inbox).
    c.close_unsettled(1, 1);
    c.pass_time(1);
    c.close_unsettled(0, 1);
    c.pass_time(0);
    // bob joins again: a new fetch, and the old answer arrives during it.
    c.join_unsettled(0, 2, "bob", 3);
    c.deliver_from(1, usize::MAX);
    c.settle();
    assert_eq!(c.sees(0, 2), who(&[("bob", 3)]));
}

#[test]
fn clients_on_different_nodes_see_each_other() {
    let mut c = Cluster::new(3);
    c.join(0, 1, "ann", 1);
    assert_eq!(c.sees(0, 1), who(&[("ann", 1)]));
    c.join(1, 1, "bob", 2);
    assert_eq!(
        c.sees(1, 1),
        who(&[("ann", 1), ("bob", 2)]),
        "bob's state has ann"
    );
    assert_eq!(
        c.sees(0, 1),
        who(&[("ann", 1), ("bob", 2)]),
        "ann got bob's join"
    );
    // A late node's first joiner gets every node's members.
    c.join(2, 1, "cy", 3);
    assert_eq!(c.sees(2, 1), who(&[("ann", 1), ("bob", 2), ("cy", 3)]));
    // Two tabs of one key on two nodes are one key with two metas everywhere.
    c.join(2, 2, "ann", 4);
    for id in [(0, 1), (1, 1), (2, 1), (2, 2)] {
        assert_eq!(
            c.sees(id.0, id.1),
            who(&[("ann", 1), ("ann", 4), ("bob", 2), ("cy", 3)]),
            "{id:?}"
        );
    }
    c.close(1, 1);
    for id in [(0, 1), (2, 1)] {
        assert_eq!(
            c.sees(id.0, id.1),
            who(&[("ann", 1), ("ann", 4), ("cy", 3)]),
            "{id:?}"
        );
    }
    // The same presence shows the same phx_ref on every node.
    let refs = |c: &Cluster, id| -> BTreeSet<String> {
        c.views[&id]
            .values()
            .flatten()
            .map(|m| m["phx_ref"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(refs(&c, (0, 1)), refs(&c, (2, 1)));
    // A node with no client in the topic holds nothing of it.
    assert!(c.nodes[1].topic_view("room").is_none());
}

#[test]
fn an_update_is_one_diff_and_counts_are_the_clusters() {
    let mut c = Cluster::new(2);
    c.join(0, 1, "ann", 1);
    c.join(1, 1, "bob", 2);
    // A count-mode subscriber on node 1 counts both nodes' presences.
    c.nodes[1].open(ConnId(2), UserKey::new("cat"));
    let count = r#"["2","2","room","phx_join",{"presence":"count","track":false}]"#;
    c.nodes[1].frame(ConnId(2), count.as_bytes());
    c.settle();
    let counts = |c: &Cluster| -> Vec<(u64, u64)> {
        let frames = c.frames.get(&(1, 2)).cloned().unwrap_or_default();
        let counts = frames.iter().filter(|f| f[3] == "presence_count");
        counts
            .map(|f| {
                (
                    f[4]["keys"].as_u64().unwrap(),
                    f[4]["metas"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(
        counts(&c).last(),
        Some(&(2, 2)),
        "{:?}",
        c.frames.get(&(1, 2))
    );
    c.join(0, 3, "dan", 3);
    assert_eq!(counts(&c).last(), Some(&(3, 3)));
    // ann's update on node 0 reaches bob on node 1 as one diff: the old meta leaves, the new
    // one joins naming it in phx_ref_prev.
    let before = c.frames[&(1, 1)].len();
    let update = r#"["1","2","room","presence_update",{"meta":{"page":9}}]"#;
    c.nodes[0].frame(ConnId(1), update.as_bytes());
    c.settle();
    let diffs: Vec<&serde_json::Value> = c.frames[&(1, 1)][before..]
        .iter()
        .filter(|f| f[3] == "presence_diff")
        .collect();
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    let (joins, leaves) = (
        &diffs[0][4]["joins"]["ann"]["metas"],
        &diffs[0][4]["leaves"]["ann"]["metas"],
    );
    assert_eq!(joins[0]["page"], 9);
    assert_eq!(leaves[0]["page"], 1);
    assert_eq!(joins[0]["phx_ref_prev"], leaves[0]["phx_ref"]);
    assert_eq!(c.sees(1, 1), who(&[("ann", 9), ("bob", 2), ("dan", 3)]));
}

/// A token refreshed with other meta claims on node 0 makes its presence anew there: node 1's
/// clients see one diff with the fresh claim and the client's own fields kept, and the backend
/// one update, from node 0.
#[test]
fn a_refreshed_claim_reaches_the_other_nodes() {
    let mut c = Cluster::new(2);
    c.nodes[0].open_with(
        ConnId(1),
        UserKey::new("ann"),
        common::claims(r#"{"role":"a"}"#),
        None,
    );
    let join = r#"["1","1","room","phx_join",{"meta":{"page":1}}]"#;
    c.nodes[0].frame(ConnId(1), join.as_bytes());
    c.settle();
    c.join(1, 1, "bob", 2);
    let role = |c: &Cluster| {
        let metas = &c.views[&(1, 1)]["ann"];
        assert_eq!(metas.len(), 1, "{metas:?}");
        assert_eq!(metas[0]["page"], 1);
        metas[0]["role"].clone()
    };
    assert_eq!(role(&c), "a");
    c.events.clear();
    let fresh = Ok((UserKey::new("ann"), common::claims(r#"{"role":"b"}"#), None));
    c.nodes[0].refreshed(ConnId(1), fresh, None, None);
    c.settle();
    assert_eq!(role(&c), "b");
    let ann: Vec<_> = c.events.iter().filter(|e| e.2 == "ann").cloned().collect();
    assert_eq!(ann, [(0, EventKind::Update, "ann".to_owned(), None)]);
}

#[test]
fn a_lost_delta_is_repaired_by_a_refetch() {
    let mut c = Cluster::new(2);
    c.join(0, 1, "ann", 1);
    c.join(1, 1, "bob", 2);
    c.lose_next_delta_of = Some(1);
    c.join(1, 2, "bea", 3); // Its delta never reaches node 0.
    assert_eq!(c.sees(0, 1), who(&[("ann", 1), ("bob", 2)]));
    c.join(1, 3, "ben", 4); // The next shows the gap: node 0 fetches node 1's part again.
    assert_eq!(
        c.sees(0, 1),
        who(&[("ann", 1), ("bea", 3), ("ben", 4), ("bob", 2)])
    );
}

#[test]
fn a_dead_nodes_presences_leave() {
    let mut c = Cluster::new(2);
    c.join(0, 1, "ann", 1);
    c.join(1, 1, "bob", 2);
    c.join(1, 2, "bea", 3);
    let dead = Origin {
        node: c.ids[1],
        incarnation: c.ids[1] * 7,
    };
    c.nodes[0].node_down(dead);
    c.settle();
    assert_eq!(c.sees(0, 1), who(&[("ann", 1)]));
}

/// Each node reports its own presences' events; a user is online once for the cluster, from
/// the node of its first presence, and offline from the node its last presence left.
#[test]
fn presence_events_come_from_each_presences_node() {
    use EventKind::*;
    let mut c = Cluster::new(2);
    c.join(0, 1, "ann", 1);
    c.join(1, 1, "ann", 2);
    c.join(1, 2, "bob", 3);
    c.close(0, 1);
    c.close(1, 1);
    let closed = Some(Reason::Closed);
    let ann: Vec<_> = c.events.iter().filter(|e| e.2 == "ann").cloned().collect();
    let want = vec![
        (0, Join, "ann".to_owned(), None),
        (0, Online, "ann".to_owned(), None),
        (1, Join, "ann".to_owned(), None),
        (0, Leave, "ann".to_owned(), closed),
        (1, Leave, "ann".to_owned(), closed),
        (1, Offline, "ann".to_owned(), None),
    ];
    assert_eq!(ann, want);
}

/// A key that comes and goes before its first fetch of the key's parts completes was online
/// for that time if no other node had it: both events come once the fetch says so.
#[test]
fn a_key_gone_within_its_first_fetch_was_online_meanwhile() {
    use EventKind::*;
    let mut c = Cluster::new(2);
    c.join(1, 1, "bob", 1);
    // The room is fetched on node 0 already; the key ann is not.
    c.join(0, 9, "obs", 9);
    c.join_unsettled(0, 1, "ann", 1);
    c.close_unsettled(0, 1);
    c.settle();
    let ann: Vec<_> = c
        .events
        .iter()
        .filter(|e| e.2 == "ann")
        .map(|e| (e.0, e.1))
        .collect();
    assert_eq!(ann, [(0, Join), (0, Leave), (0, Online), (0, Offline)]);
    // Had another node a presence of the key, neither is reported.
    c.events.clear();
    c.join(1, 2, "bob", 2);
    c.join_unsettled(0, 2, "bob", 3);
    c.close_unsettled(0, 2);
    c.settle();
    let bob: Vec<_> = c.events.iter().map(|e| (e.0, e.1)).collect();
    assert_eq!(bob, [(1, Join), (0, Join), (0, Leave)]);
}

/// A dead node's presences leave everywhere, and exactly one survivor reports each leave (and
/// the key's offline): the one `cluster::reporter` ranks first among those with presences in
/// the topic. Reported by the others too, it would be a duplicate with the same id; reported by
/// nobody, the backend would hold the key online forever.
#[test]
fn a_dead_nodes_presences_are_reported_by_one_survivor() {
    use EventKind::*;
    for n in [2, 3, 4] {
        let mut c = Cluster::new(n);
        for i in 0..n {
            c.join(i, 1, &format!("k{i}"), i as u32);
        }
        c.join(n - 1, 2, "dead-only", 9);
        c.events.clear();
        let dead = Origin {
            node: c.ids[n - 1],
            incarnation: c.ids[n - 1] * 7,
        };
        for i in 0..n - 1 {
            c.nodes[i].node_down(dead);
        }
        c.settle();
        for key in [format!("k{}", n - 1), "dead-only".to_owned()] {
            let of = |kind| {
                c.events
                    .iter()
                    .filter(|e| e.1 == kind && e.2 == key)
                    .count()
            };
            assert_eq!(of(Leave), 1, "{n} nodes, {key}: {:?}", c.events);
            assert_eq!(of(Offline), 1, "{n} nodes, {key}: {:?}", c.events);
        }
        let reasons: BTreeSet<_> = c
            .events
            .iter()
            .filter(|e| e.1 == Leave)
            .map(|e| e.3)
            .collect();
        assert_eq!(reasons, BTreeSet::from([Some(Reason::NodeDown)]));
        assert_eq!(c.events.len(), 4, "{:?}", c.events);
    }
}

/// Node 3 dies under a leave grace: the others hold its part; its clients come back to node 1
/// (which had the room) and to node 2 (which had not: it learns of the held presences from the
/// others' answers) and take their presences over, unseen by anyone; the one who never comes
/// back leaves when the grace ends.
#[test]
fn a_dead_nodes_clients_take_their_presences_over_on_other_nodes_unseen() {
    let mut c = Cluster::new(4);
    c.join(0, 1, "obs", 1);
    c.join(1, 1, "obs1", 2);
    for (conn, key) in [(1, "ann"), (2, "bob"), (3, "cy")] {
        c.join(3, conn, key, 10 + conn);
    }
    let all = who(&[
        ("ann", 11),
        ("bob", 12),
        ("cy", 13),
        ("obs", 1),
        ("obs1", 2),
    ]);
    assert_eq!(c.sees(0, 1), all);
    let dead = Origin {
        node: c.ids[3],
        incarnation: c.ids[3] * 7,
    };
    let refs = |c: &Cluster, node: usize, conn: u32| {
        let view = &c.views[&(node, conn)];
        let refs = view.iter().flat_map(|(k, ms)| {
            let refs = ms.iter().map(|m| m["phx_ref"].as_str().unwrap().to_owned());
            refs.map(move |r| format!("{k}:{r}"))
        });
        refs.collect::<BTreeSet<String>>()
    };
    let before = refs(&c, 0, 1);
    c.nats.gone(3);
    for i in 0..3 {
        c.nodes[i].node_held(dead);
    }
    c.settle();
    let seen = |c: &Cluster| c.frames[&(0, 1)].len() + c.frames[&(1, 1)].len();
    let quiet = seen(&c);
    c.join(1, 2, "ann", 11);
    c.join(2, 1, "bob", 12);
    assert_eq!(
        seen(&c),
        quiet,
        "no diff for the takeovers: {:?}",
        c.frames[&(0, 1)]
    );
    for (node, conn) in [(0, 1), (1, 1), (1, 2), (2, 1)] {
        assert_eq!(c.sees(node, conn), all, "node {node}");
        assert_eq!(refs(&c, node, conn), before, "the same refs on node {node}");
    }
    // The grace ends: cy leaves, once; ann and bob are their new nodes' now.
    for i in 0..3 {
        c.nodes[i].node_down(dead);
    }
    c.settle();
    let rest = who(&[("ann", 11), ("bob", 12), ("obs", 1), ("obs1", 2)]);
    for (node, conn) in [(0, 1), (1, 1), (1, 2), (2, 1)] {
        assert_eq!(c.sees(node, conn), rest, "node {node}");
    }
    assert_eq!(seen(&c), quiet + 2, "one diff each");
    c.close(2, 1);
    assert_eq!(c.sees(0, 1), who(&[("ann", 11), ("obs", 1), ("obs1", 2)]));
}

/// A killed node's client reconnects to another node before anyone has found the node dead:
/// with a leave grace its join is a twin of the presence it had (held back, not announced),
/// and once the node is found dead it takes that presence over, unseen.
#[test]
fn a_reconnect_before_the_death_is_known_takes_over_once_it_is() {
    let mut c = Cluster::with(3, Millis(60_000));
    c.join(0, 1, "obs", 1);
    c.join(1, 9, "obs1", 2);
    c.join(2, 1, "ann", 5);
    let before = c.views[&(0, 1)].clone();
    let dead = Origin {
        node: c.ids[2],
        incarnation: c.ids[2] * 7,
    };
    c.nats.gone(2);
    let quiet = c.frames[&(0, 1)].len();
    c.join(1, 1, "ann", 5);
    assert_eq!(c.frames[&(0, 1)].len(), quiet, "a twin: not announced");
    for i in 0..2 {
        c.nodes[i].node_held(dead);
    }
    c.settle();
    for i in 0..2 {
        c.nodes[i].node_down(dead);
    }
    c.settle();
    assert_eq!(
        c.frames[&(0, 1)].len(),
        quiet,
        "nothing seen: {:?}",
        &c.frames[&(0, 1)][quiet..]
    );
    assert_eq!(c.views[&(0, 1)], before, "ann's presence, her ref");
    assert_eq!(c.views[&(1, 1)], before);
    // She is node 1's now: her leave is seen (a leave, not a close: a close is held).
    c.nodes[1].frame(ConnId(1), br#"["1","2","room","phx_leave",{}]"#);
    c.collect(1);
    c.settle();
    assert_eq!(c.sees(0, 1), who(&[("obs", 1), ("obs1", 2)]));
}

/// Two clients of one key come back to two nodes at once and both take the same held
/// presence over: the node ranked first (lower id) keeps it, the other moves its client to the
/// key's other held presence of the same meta (unseen) or, when there is none, to a presence
/// of its own (one join, as a second tab is).
#[test]
fn two_nodes_claiming_one_held_presence_agree_on_one_winner() {
    for tabs in [2, 1] {
        let mut c = Cluster::new(4);
        c.join(0, 1, "obs", 1);
        for conn in 1..=tabs {
            c.join(3, conn, "tab", 7);
        }
        c.join(1, 9, "obs1", 2);
        c.join(2, 9, "obs2", 3);
        let dead = Origin {
            node: c.ids[3],
            incarnation: c.ids[3] * 7,
        };
        let metas = |c: &Cluster, node: usize, conn: u32| {
            let view = &c.views[&(node, conn)];
            let tab = view.iter().find(|(k, _)| k.as_str() == "tab");
            let refs = tab.into_iter().flat_map(|(_, ms)| ms.iter());
            let refs = refs.map(|m| m["phx_ref"].as_str().unwrap().to_owned());
            refs.collect::<BTreeSet<String>>()
        };
        let before = metas(&c, 0, 1);
        assert_eq!(before.len(), tabs as usize);
        c.nats.gone(3);
        for i in 0..3 {
            c.nodes[i].node_held(dead);
        }
        c.settle();
        let quiet = c.frames[&(0, 1)].len();
        // Both joins reach their nodes before either node hears of the other's.
        c.join_unsettled(1, 1, "tab", 7);
        c.join_unsettled(2, 1, "tab", 7);
        c.settle();
        for i in 0..3 {
            c.nodes[i].node_down(dead);
        }
        c.settle();
        let after = metas(&c, 0, 1);
        assert_eq!(after.len(), 2, "two clients, two metas");
        for (node, conn) in [(1, 1), (2, 1), (1, 9), (2, 9)] {
            assert_eq!(metas(&c, node, conn), after, "node {node} agrees");
        }
        let diffs = &c.frames[&(0, 1)][quiet..];
        if tabs == 2 {
            assert_eq!(after, before, "the held ones, taken over");
            assert!(diffs.is_empty(), "unseen: {diffs:?}");
        } else {
            assert!(after.is_superset(&before), "the held one stays");
            assert_eq!(diffs.len(), 1, "one join: {diffs:?}");
            assert_eq!(diffs[0][4]["leaves"], serde_json::json!({}));
        }
    }
}

/// Ann on node 0 and bob on node 1 in the room, and bob's leave lost on its way to node 0
/// (which still shows him); with node 1's origin.
fn a_leave_node_0_missed() -> (Cluster, Origin) {
    let mut c = Cluster::new(2);
    c.join(0, 1, "ann", 1);
    c.join(1, 1, "bob", 2);
    c.lose_next_delta_of = Some(1);
    c.close(1, 1);
    assert_eq!(c.sees(0, 1), who(&[("ann", 1), ("bob", 2)]));
    let one = Origin {
        node: c.ids[1],
        incarnation: c.ids[1] * 7,
    };
    (c, one)
}

/// Node 1's leave is lost, node 0 hears of a gap and asks node 1 again, and that request is
/// lost too: node 0 asks again when the retry time comes (node 1 has forgotten the room and
/// would never announce it).
#[test]
fn a_refetch_whose_request_is_lost_is_asked_again() {
    let (mut c, one) = a_leave_node_0_missed();
    c.nodes[0].node_gap(one);
    c.collect(0);
    let lost = c.nats.flight[0].drain(..).count();
    assert_eq!(lost, 2, "the requests to node 1: the room's part and ann's");
    c.settle();
    assert_eq!(c.sees(0, 1), who(&[("ann", 1)]));
}

/// A delta the bridge had to drop (node 0's shard queue was full) owes a re-fetch of its name
/// alone: one request, for the room's part of node 1, not one for every name node 0 holds.
#[test]
fn a_dropped_frame_refetches_its_name_alone() {
    let (mut c, one) = a_leave_node_0_missed();
    c.nodes[0].name_gap(Kind::Topic, "room", one);
    c.collect(0);
    let asked: Vec<String> = c.nats.flight[0]
        .iter()
        .map(|(to, m, _)| format!("{to} {m:?}"))
        .collect();
    assert_eq!(asked.len(), 1, "one request: {asked:?}");
    assert_eq!(c.nats.flight[0][0].0, 1, "to node 1: {asked:?}");
    c.settle();
    assert_eq!(c.sees(0, 1), who(&[("ann", 1)]));
    // A name this node does not hold asks nothing.
    c.nodes[0].name_gap(Kind::Topic, "room:elsewhere", one);
    c.nodes[0].name_gap(Kind::User, "nobody", one);
    c.collect(0);
    assert!(c.nats.flight[0].is_empty());
}

// ---- seeded random runs ------------------------------------------------------------------

mod random {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use roster_engine::core::MeshMsg;

    const TOPICS: &[&str] = &["room:a", "room:b"];
    const KEYS: &[&str] = &["ann", "bob", "cy", "dee"];
    /// Watchers join this topic with a list of keys to watch.
    const WATCH: &str = "watch:w";

    /// How far a node's cut-off from NATS has gone.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum Isolation {
        /// Shorter than the node timeout: the others will see a heartbeat gap.
        Short,
        /// Past the node timeout: the others have declared it down.
        PastTimeout,
        /// Past its isolation grace too: it has declared the others down.
        PastGrace,
    }

    struct Node {
        shards: Vec<Shard>,
        alive: bool,
        /// This process's incarnation; a restart takes a new one (and a new NATS inbox).
        incarnation: u64,
        isolated: Option<Isolation>,
        /// Origins this node has declared down (its driver's view of the cluster).
        downs: BTreeSet<Origin>,
        config: Config,
    }

    struct Client {
        node: usize,
        key: String,
        topic: &'static str,
        page: u32,
        /// A watcher (not tracked): the keys it watches.
        watching: Option<BTreeSet<String>>,
    }

    /// What the run did, so that it can prove it exercised each fault.
    #[derive(Debug, Default)]
    struct Exercised {
        /// Messages a receiver's NATS client dropped (a slow consumer).
        dropped: u64,
        /// Node events: gaps, deaths, returns (partitions healed).
        gaps: u64,
        downs: u64,
        backs: u64,
        /// Requests to one node (re-fetches and asks of silent holders).
        directed: u64,
        kills: u64,
        /// Restarts after the others saw the death, and before (a new incarnation's frames
        /// overtake the news of the old one's end).
        restarts: u64,
        quick_restarts: u64,
        isolations: BTreeMap<Isolation, u64>,
        /// Diffs that reached watchers after their state.
        watch_diffs: u64,
    }

    struct Run {
        rng: ChaCha8Rng,
        nodes: Vec<Node>,
        ids: Vec<u64>,
        subjects: Subjects,
        nats: Nats,
        clients: BTreeMap<(usize, usize, u32), Client>,
        views: BTreeMap<(usize, usize, u32), View>,
        /// Nodes whose NATS client dropped messages since the last quiescence.
        slow: BTreeSet<usize>,
        /// News of a quick restart not yet heard: (observer, the old origin).
        pending_downs: Vec<(usize, Origin)>,
        next_conn: u32,
        now: u64,
        log: Vec<String>,
        done: Exercised,
    }

    impl Run {
        fn new(seed: u64) -> Run {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let n = rng.gen_range(2..=4);
            let subjects = Subjects::new("roster").unwrap();
            let ids: Vec<u64> = (0..n as u64).map(|i| 1000 + i).collect();
            let windows = rng.gen_bool(0.5);
            let nodes = ids
                .iter()
                .map(|&node| {
                    let shards = rng.gen_range(1..=3);
                    let config = Config {
                        shards,
                        cluster: Some(ClusterConfig {
                            me: Origin {
                                node,
                                incarnation: 0,
                            },
                            subjects: subjects.clone(),
                            max_payload: 1 << 20,
                            fetch_timeout: Millis(1_000),
                        }),
                        hash_seed: seed,
                        diff_window: Millis(if windows { 300 } else { 0 }),
                        large_topic_threshold: 2,
                        // Clients here send no heartbeats; runs last minutes of model time.
                        heartbeat_timeout: Millis(3_600_000),
                        ..Config::default()
                    };
                    Node::start(config, node + seed)
                })
                .collect();
            Run {
                rng,
                nodes,
                nats: Nats::new(&subjects, &ids),
                subjects,
                ids,
                clients: BTreeMap::new(),
                views: BTreeMap::new(),
                slow: BTreeSet::new(),
                pending_downs: Vec::new(),
                next_conn: 0,
                now: 0,
                log: Vec::new(),
                done: Exercised::default(),
            }
        }

        /// Everything shard `s` of node `i` produced, and what that makes inside the node
        /// (its rings deliver at once here; the simulation of one node covers their orders).
        /// An isolated node's publishes are lost (its bridge drops them while disconnected).
        fn collect(&mut self, i: usize, s: usize) {
            let mut mesh: VecDeque<(usize, MeshMsg)> = VecDeque::new();
            let mut at = s;
            loop {
                self.nodes[i].shards[at].flush();
                let outputs: Vec<Output> = self.nodes[i].shards[at].outputs().collect();
                for o in outputs {
                    match o {
                        Output::Send { conn, frame, .. } => {
                            self.client_frame((i, at, conn.0), &frame)
                        }
                        Output::Close { conn, reason, .. } => panic!("closed {conn:?}: {reason}"),
                        Output::Mesh { to, msg } => mesh.push_back((to.index(), msg)),
                        Output::Nats(out) => self.nats_out(i, at, out),
                        // Not checked in the seeded runs (see the tests above).
                        Output::Event(_) => {}
                        Output::Refresh { .. } => panic!("no tokens here"),
                    }
                }
                let Some((to, msg)) = mesh.pop_front() else {
                    return;
                };
                self.nodes[i].shards[to].mesh(msg);
                at = to;
            }
        }

        fn nats_out(&mut self, i: usize, shard: usize, out: NatsOut) {
            let sends = matches!(
                out,
                NatsOut::Publish { .. } | NatsOut::Request { .. } | NatsOut::Reply { .. }
            );
            if sends && self.nodes[i].isolated.is_some() {
                return;
            }
            if let NatsOut::Request { subject, .. } = &out {
                if subject.starts_with("roster.n.") {
                    self.done.directed += 1;
                }
            }
            let life = self.nodes[i].incarnation;
            self.nats.out(i, life, shard, out);
        }

        fn client_frame(&mut self, id: (usize, usize, u32), bytes: &[u8]) {
            let watcher = self.clients.get(&id).is_some_and(|c| c.watching.is_some());
            let view = self.views.entry(id).or_default();
            if watcher && !view.is_empty() && bytes.windows(13).any(|w| w == b"presence_diff") {
                self.done.watch_diffs += 1;
            }
            see(view, bytes);
            self.log.push(format!(
                "    client {id:?} <- {}",
                String::from_utf8_lossy(bytes)
            ));
        }

        /// Delivers one message NATS holds, or (`may_drop`) has the receiver's client drop it
        /// as a slow consumer would: the receiver then hears of gaps for every node.
        fn deliver_one(&mut self, may_drop: bool) -> bool {
            let busy = self.nats.busy();
            if busy.is_empty() {
                return false;
            }
            let from = busy[self.rng.gen_range(0..busy.len())];
            let (to, msg, _) = self.nats.flight[from].pop_front().expect("busy");
            if !self.nodes[to].alive || self.nodes[to].isolated.is_some() {
                return true;
            }
            if may_drop && to != from && self.rng.gen_ratio(1, 25) {
                let what = match &msg {
                    Inbound::Frame(f, _) => describe(f),
                    Inbound::NoResponders(_, name) => format!("no responders {name}"),
                };
                self.log
                    .push(format!("dropped at {to} from {from}: {what}"));
                self.done.dropped += 1;
                self.slow.insert(to);
                return true;
            }
            match msg {
                Inbound::Frame(f, reply) => {
                    if let (Frame::Part(_), Some(inbox)) = (&f, &reply) {
                        // An answer to a request of an earlier process of this node.
                        let life: u64 = inbox.split('.').nth(2).unwrap().parse().unwrap();
                        if life != self.nodes[to].incarnation {
                            return true;
                        }
                    }
                    self.log
                        .push(format!("  nats {from}->{to}: {}", describe(&f)));
                    let shards = self.nodes[to].shards.len() as u16;
                    let (shard, reply) = route(&f, reply, shards);
                    self.nodes[to].shards[shard].nats_frame(f, reply.as_deref());
                    self.collect(to, shard);
                }
                Inbound::NoResponders(kind, name) => {
                    self.log.push(format!("  no responders {name} for {to}"));
                    let shard = owner(kind, &name, self.nodes[to].shards.len() as u16);
                    self.nodes[to].shards[shard].no_responders(kind, &name);
                    self.collect(to, shard);
                }
            }
            true
        }

        fn step(&mut self) {
            match self.rng.gen_range(0..100) {
                0..=37 => {
                    self.deliver_one(true);
                }
                38..=55 => self.open(),
                56..=63 => self.update(),
                64..=72 => self.close(),
                73 => self.kill(),
                74 => self.restart(),
                75 => self.isolate(),
                76..=77 => self.isolation_goes_on(),
                78 => self.hear_pending_down(),
                _ => {
                    self.now += self.rng.gen_range(0..400);
                    let i = self.rng.gen_range(0..self.nodes.len());
                    if self.nodes[i].alive {
                        for s in 0..self.nodes[i].shards.len() {
                            self.nodes[i].shards[s].tick(Millis(self.now));
                            self.collect(i, s);
                        }
                    }
                }
            }
        }

        fn live_nodes(&self) -> Vec<usize> {
            (0..self.nodes.len())
                .filter(|&i| self.nodes[i].alive)
                .collect()
        }

        fn open(&mut self) {
            let live = self.live_nodes();
            let node = live[self.rng.gen_range(0..live.len())];
            let shard = self.rng.gen_range(0..self.nodes[node].shards.len());
            self.next_conn += 1;
            let conn = self.next_conn;
            let key = KEYS[self.rng.gen_range(0..KEYS.len())];
            let watching = self.rng.gen_ratio(1, 5).then(|| {
                let n = self.rng.gen_range(1..=KEYS.len());
                (0..n)
                    .map(|_| KEYS[self.rng.gen_range(0..KEYS.len())].to_owned())
                    .collect::<BTreeSet<String>>()
            });
            let topic = match watching {
                Some(_) => WATCH,
                None => TOPICS[self.rng.gen_range(0..TOPICS.len())],
            };
            let page = self.rng.gen_range(0..50);
            let payload = match &watching {
                Some(users) => serde_json::json!({ "users": users }),
                None => serde_json::json!({ "meta": { "page": page } }),
            };
            self.log.push(format!(
                "open ({node},{shard},{conn}) {key} {topic} {payload}"
            ));
            let sh = &mut self.nodes[node].shards[shard];
            sh.open(ConnId(conn), UserKey::new(key));
            let join = serde_json::json!(["1", "1", topic, "phx_join", payload]).to_string();
            sh.frame(ConnId(conn), join.as_bytes());
            self.clients.insert(
                (node, shard, conn),
                Client {
                    node,
                    key: key.into(),
                    topic,
                    page,
                    watching,
                },
            );
            self.collect(node, shard);
        }

        fn pick(&mut self) -> Option<(usize, usize, u32)> {
            let ids: Vec<_> = self.clients.keys().copied().collect();
            (!ids.is_empty()).then(|| ids[self.rng.gen_range(0..ids.len())])
        }

        fn update(&mut self) {
            let Some(id) = self.pick() else { return };
            let page = self.rng.gen_range(50..100);
            let c = self.clients.get_mut(&id).expect("picked");
            if c.watching.is_some() {
                return;
            }
            c.page = page;
            let topic = c.topic;
            self.log.push(format!("update {id:?} page {page}"));
            let frame =
                format!(r#"["1","2","{topic}","presence_update",{{"meta":{{"page":{page}}}}}]"#);
            self.nodes[id.0].shards[id.1].frame(ConnId(id.2), frame.as_bytes());
            self.collect(id.0, id.1);
        }

        fn close(&mut self) {
            let Some(id) = self.pick() else { return };
            self.log.push(format!("close {id:?}"));
            self.clients.remove(&id);
            self.views.remove(&id);
            self.nodes[id.0].shards[id.1].close(ConnId(id.2));
            self.collect(id.0, id.1);
        }

        /// A node event, on every shard of `observer`.
        fn event(&mut self, observer: usize, what: &str, origin: Origin) {
            let node = &mut self.nodes[observer];
            match what {
                "down" => {
                    node.downs.insert(origin);
                    self.done.downs += 1;
                }
                "back" => {
                    node.downs.remove(&origin);
                    self.done.backs += 1;
                }
                _ => self.done.gaps += 1,
            }
            self.log
                .push(format!("{what} {} at {observer}", origin.incarnation));
            for s in 0..self.nodes[observer].shards.len() {
                let shard = &mut self.nodes[observer].shards[s];
                match what {
                    "down" => shard.node_down(origin),
                    "back" => shard.node_back(origin),
                    _ => shard.node_gap(origin),
                }
                self.collect(observer, s);
            }
        }

        /// The process of node `k` ends: its clients go, and what NATS held for it.
        fn end_process(&mut self, k: usize) {
            self.nodes[k].alive = false;
            self.nodes[k].isolated = None;
            self.clients.retain(|_, c| c.node != k);
            self.views.retain(|id, _| id.0 != k);
            self.nats.gone(k);
            for q in &mut self.nats.flight {
                q.retain(|(to, _, _)| *to != k);
            }
            self.slow.remove(&k);
            self.pending_downs.retain(|(observer, _)| *observer != k);
        }

        /// kill -9 of a node (never the last): the others see it silent and drop its parts
        /// (what it published before dying may still arrive first).
        fn kill(&mut self) {
            let live = self.live_nodes();
            if live.len() < 2 {
                return;
            }
            let k = live[self.rng.gen_range(0..live.len())];
            self.log.push(format!("kill {k}"));
            self.done.kills += 1;
            let o = self.origin_of(k);
            self.end_process(k);
            // Let NATS deliver some of what it holds, then the node timeout passes.
            while self.rng.gen_bool(0.5) && self.deliver_one(false) {}
            for i in self.live_nodes() {
                self.event(i, "down", o);
            }
        }

        /// A dead node starts again; or a live one restarts before anyone saw it die, its new
        /// incarnation's frames racing the news of the old one's end.
        fn restart(&mut self) {
            let dead: Vec<usize> = (0..self.nodes.len())
                .filter(|&i| !self.nodes[i].alive)
                .collect();
            let k = if let Some(&k) = dead.first() {
                self.done.restarts += 1;
                k
            } else {
                let live: Vec<usize> = self
                    .live_nodes()
                    .into_iter()
                    .filter(|&i| self.nodes[i].isolated.is_none())
                    .collect();
                if live.len() < 2 {
                    return;
                }
                let k = live[self.rng.gen_range(0..live.len())];
                let old = self.origin_of(k);
                self.end_process(k);
                for i in self.live_nodes() {
                    self.pending_downs.push((i, old));
                }
                self.done.quick_restarts += 1;
                k
            };
            let incarnation = self.nodes[k].incarnation + 1_000_000;
            self.log.push(format!("restart {k} as {incarnation}"));
            self.nodes[k] = Node::start(self.nodes[k].config.clone(), incarnation);
            let own = self.subjects.node(self.ids[k]);
            self.nats.subs.entry(own).or_default().insert(k);
        }

        /// The news of a quick restart reaches one node.
        fn hear_pending_down(&mut self) {
            if self.pending_downs.is_empty() {
                return;
            }
            let i = self.rng.gen_range(0..self.pending_downs.len());
            let (observer, old) = self.pending_downs.swap_remove(i);
            if self.nodes[observer].alive {
                self.event(observer, "down", old);
            }
        }

        /// A node's NATS connection goes down (one at a time, never the last node up).
        fn isolate(&mut self) {
            let live = self.live_nodes();
            if live.len() < 2 || live.iter().any(|&i| self.nodes[i].isolated.is_some()) {
                return;
            }
            let k = live[self.rng.gen_range(0..live.len())];
            self.log.push(format!("isolate {k}"));
            self.nodes[k].isolated = Some(Isolation::Short);
            for q in &mut self.nats.flight {
                q.retain(|(to, _, _)| *to != k);
            }
        }

        /// The isolated node's cut-off lasts past the node timeout, then past its isolation
        /// grace; or it ends.
        fn isolation_goes_on(&mut self) {
            let Some(k) = (0..self.nodes.len()).find(|&i| self.nodes[i].isolated.is_some()) else {
                return;
            };
            match self.nodes[k].isolated.expect("found above") {
                _ if self.rng.gen_bool(0.5) => self.heal(k),
                Isolation::Short => {
                    self.nodes[k].isolated = Some(Isolation::PastTimeout);
                    let o = self.origin_of(k);
                    for i in self.live_nodes().into_iter().filter(|&i| i != k) {
                        self.event(i, "down", o);
                    }
                }
                Isolation::PastTimeout => {
                    self.nodes[k].isolated = Some(Isolation::PastGrace);
                    for i in self.live_nodes().into_iter().filter(|&i| i != k) {
                        let o = self.origin_of(i);
                        if !self.nodes[k].downs.contains(&o) {
                            self.event(k, "down", o);
                        }
                    }
                }
                Isolation::PastGrace => self.heal(k),
            }
        }

        /// NATS is back for node `k`: it hears everyone again (a gap, or a return for those it
        /// declared down), and they hear it (its heartbeat skipped a number; or it returns).
        fn heal(&mut self, k: usize) {
            let how = self.nodes[k].isolated.take().expect("isolated");
            self.log.push(format!("heal {k} after {how:?}"));
            *self.done.isolations.entry(how).or_default() += 1;
            let ko = self.origin_of(k);
            for i in self.live_nodes().into_iter().filter(|&i| i != k) {
                let o = self.origin_of(i);
                let back = self.nodes[k].downs.contains(&o);
                self.event(k, if back { "back" } else { "gap" }, o);
                let back = self.nodes[i].downs.contains(&ko);
                self.event(i, if back { "back" } else { "gap" }, ko);
            }
        }

        /// Delivers until NATS holds nothing; a run that never ends is a livelock.
        fn drain_all(&mut self) {
            for _ in 0..200_000 {
                if !self.deliver_one(false) {
                    return;
                }
            }
            panic!("still delivering after 200,000 messages: a livelock");
        }

        fn quiesce(&mut self) {
            if let Some(k) = (0..self.nodes.len()).find(|&i| self.nodes[i].isolated.is_some()) {
                self.heal(k);
            }
            while !self.pending_downs.is_empty() {
                self.hear_pending_down();
            }
            for _ in 0..6 {
                self.drain_all();
                // A slow consumer's client says so: its node fetches every node's parts
                // again and announces its own (requests to it may have been dropped).
                for to in std::mem::take(&mut self.slow) {
                    if !self.nodes[to].alive {
                        continue;
                    }
                    for i in self.live_nodes().into_iter().filter(|&i| i != to) {
                        let o = self.origin_of(i);
                        if !self.nodes[to].downs.contains(&o) {
                            self.event(to, "gap", o);
                        }
                    }
                    self.log
                        .push(format!("slow consumer at {to}: gaps, announce"));
                    for s in 0..self.nodes[to].shards.len() {
                        self.nodes[to].shards[s].announce();
                        self.collect(to, s);
                    }
                }
                self.drain_all();
                self.now += 1_000;
                for i in self.live_nodes() {
                    for s in 0..self.nodes[i].shards.len() {
                        self.nodes[i].shards[s].tick(Millis(self.now));
                        self.collect(i, s);
                    }
                }
            }
        }

        fn origin_of(&self, node: usize) -> Origin {
            Origin {
                node: self.ids[node],
                incarnation: self.nodes[node].incarnation,
            }
        }

        /// Every client's view of its topic equals the model (every live client tracked in it,
        /// on any node), with the same refs as every other client's view; and every watcher
        /// sees each key it watches where the model has it, with the same refs.
        fn check(&self) {
            let mut refs_of: BTreeMap<(String, &str), BTreeSet<String>> = BTreeMap::new();
            for topic in TOPICS {
                let mut model: BTreeMap<String, Vec<u64>> = BTreeMap::new();
                let tracked = self.clients.values().filter(|c| c.topic == *topic);
                for c in tracked {
                    model.entry(c.key.clone()).or_default().push(c.page as u64);
                }
                for v in model.values_mut() {
                    v.sort();
                }
                let mut refs: Option<BTreeMap<String, BTreeSet<String>>> = None;
                for (id, _) in self.clients.iter().filter(|(_, c)| c.topic == *topic) {
                    let view = self.views.get(id).cloned().unwrap_or_default();
                    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
                    let mut these: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
                    for (k, metas) in &view {
                        for m in metas {
                            seen.entry(k.clone())
                                .or_default()
                                .push(m["page"].as_u64().unwrap());
                            let r = m["phx_ref"].as_str().unwrap().to_owned();
                            these.entry(k.clone()).or_default().insert(r);
                        }
                    }
                    for v in seen.values_mut() {
                        v.sort();
                    }
                    if seen != model {
                        panic!("{id:?} in {topic} sees {seen:?}, want {model:?}; view {view:?}");
                    }
                    match &refs {
                        None => refs = Some(these),
                        Some(r) if *r != these => {
                            panic!("{id:?} in {topic}: other refs {these:?} than {r:?}")
                        }
                        Some(_) => {}
                    }
                }
                for (k, r) in refs.unwrap_or_default() {
                    refs_of.insert((k, topic), r);
                }
            }
            for (id, c) in &self.clients {
                let Some(watching) = &c.watching else {
                    continue;
                };
                let mut want: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
                let tracked = self.clients.values().filter(|c| c.watching.is_none());
                for t in tracked.filter(|t| watching.contains(&t.key)) {
                    let at = (t.topic.to_owned(), t.page as u64);
                    want.entry(t.key.clone()).or_default().push(at);
                }
                let view = self.views.get(id).cloned().unwrap_or_default();
                let mut seen: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
                for (k, metas) in &view {
                    let mut by_topic: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
                    for m in metas {
                        let topic = m["topic"].as_str().unwrap().to_owned();
                        let page = m["page"].as_u64().unwrap();
                        let r = m["phx_ref"].as_str().unwrap().to_owned();
                        seen.entry(k.clone()).or_default().push((topic, page));
                        let t = TOPICS.iter().find(|t| **t == m["topic"]).unwrap();
                        by_topic.entry(t).or_default().insert(r);
                    }
                    for (t, r) in by_topic {
                        if refs_of.get(&(k.clone(), t)) != Some(&r) {
                            panic!("watcher {id:?} sees {k} in {t} with refs {r:?}, not theirs");
                        }
                    }
                }
                for v in want.values_mut().chain(seen.values_mut()) {
                    v.sort();
                }
                if seen != want {
                    panic!("watcher {id:?} of {watching:?} sees {seen:?}, want {want:?}");
                }
            }
        }

        fn run(&mut self, steps: usize) {
            for i in 0..steps {
                self.step();
                if i % 50 == 49 {
                    self.quiesce();
                    self.check();
                }
            }
            self.quiesce();
            self.check();
        }
    }

    impl Node {
        /// A process of the node: its shards, with refs of its own (refs are made from the
        /// node and its incarnation).
        fn start(mut config: Config, incarnation: u64) -> Node {
            let cluster = config.cluster.as_mut().expect("a cluster node");
            cluster.me.incarnation = incarnation;
            let mix = cluster.me.node.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ incarnation;
            config.ref_seed = mix.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            Node {
                shards: (0..config.shards)
                    .map(|s| Shard::new(ShardId(s), config.clone()))
                    .collect(),
                alive: true,
                incarnation,
                isolated: None,
                downs: BTreeSet::new(),
                config,
            }
        }
    }

    #[test]
    fn seeded_nodes_agree_with_the_model() {
        let seeds = std::env::var("ROSTER_CLUSTER_SEEDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300u64);
        let one: Option<u64> = std::env::var("ROSTER_CLUSTER_SEED")
            .ok()
            .and_then(|v| v.parse().ok());
        let mut all = Exercised::default();
        for seed in one.map_or(0..seeds, |s| s..s + 1) {
            let mut run = Run::new(seed);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run.run(300)));
            if let Err(e) = result {
                let msg = common::panic_message(&*e);
                let _ = std::fs::write("/tmp/cluster-seed.log", run.log.join("\n"));
                let tail = run.log[run.log.len().saturating_sub(40)..].join("\n");
                panic!("cluster seed {seed} failed: {msg}\nlast events:\n{tail}");
            }
            let d = run.done;
            all.dropped += d.dropped;
            all.gaps += d.gaps;
            all.downs += d.downs;
            all.backs += d.backs;
            all.directed += d.directed;
            all.kills += d.kills;
            all.restarts += d.restarts;
            all.quick_restarts += d.quick_restarts;
            all.watch_diffs += d.watch_diffs;
            for (k, n) in d.isolations {
                *all.isolations.entry(k).or_default() += n;
            }
        }
        eprintln!("{seeds} seeds exercised {all:?}");
        if one.is_none() && seeds >= 50 {
            let a = &all;
            let each = [
                ("messages dropped", a.dropped),
                ("gaps", a.gaps),
                ("nodes down", a.downs),
                ("partitions healed", a.backs),
                ("directed re-fetches", a.directed),
                ("kills", a.kills),
                ("restarts", a.restarts),
                ("quick restarts", a.quick_restarts),
                ("watch diffs", a.watch_diffs),
            ];
            for (what, n) in each {
                assert!(n > 0, "the runs no longer exercise {what}");
            }
            for how in [
                Isolation::Short,
                Isolation::PastTimeout,
                Isolation::PastGrace,
            ] {
                assert!(
                    a.isolations.get(&how).is_some_and(|&n| n > 0),
                    "the runs no longer isolate a node {how:?}"
                );
            }
        }
    }

    fn describe(f: &Frame) -> String {
        match f {
            Frame::Delta(d) => format!(
                "delta {} of {} seq {} prev {} +{:?} -{:?}",
                d.name,
                d.origin.incarnation,
                d.seq,
                d.prev,
                d.joins
                    .iter()
                    .map(|p| (&p.key, p.phx_ref))
                    .collect::<Vec<_>>(),
                d.leaves
                    .iter()
                    .map(|l| (&l.key, l.phx_ref))
                    .collect::<Vec<_>>()
            ),
            Frame::Part(p) => format!(
                "part {} of {} seq {} {:?} holders {:?} ask {}",
                p.name,
                p.origin.incarnation,
                p.seq,
                p.presences
                    .iter()
                    .map(|p| (&p.key, p.phx_ref))
                    .collect::<Vec<_>>(),
                p.holders,
                p.ask
            ),
            Frame::PartRequest(r) => format!("ask {} from {}", r.name, r.from.incarnation),
            _ => "other".into(),
        }
    }
}
