//! The core's cluster side with several nodes in one thread and a small model of NATS between
//! them (subjects, request/reply, "no responders", echo to the publisher's own subscriptions):
//! clients on different nodes see each other as phoenix.js `Presence` would, a late node's
//! first joiner gets every node's members, a lost delta is repaired by a re-fetch, and a dead
//! node's presences leave. (The simulation with random interleavings is not here yet.)

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use roster_engine::cluster::frame::{Frame, Origin};
use roster_engine::cluster::subject::Subjects;
use roster_engine::core::{ClusterConfig, Config, ConnId, Millis, NatsOut, Output, Shard, UserKey};
use roster_engine::mesh::ShardId;
use serde_json::Value;

mod common;
use common::presence::{sync_diff, sync_state, View};

/// One message in flight to a node.
enum Inbound {
    Frame(Frame, Option<String>),
    NoResponders(String),
}

struct Cluster {
    nodes: Vec<Shard>,
    ids: Vec<u64>,
    subs: BTreeMap<String, BTreeSet<usize>>,
    queue: VecDeque<(usize, Inbound)>,
    /// What each client (node, conn) has seen of "room", as phoenix.js keeps it.
    views: BTreeMap<(usize, u32), View>,
    /// Drop the next delta published by this node (a message NATS lost).
    lose_next_delta_of: Option<usize>,
    now: u64,
}

impl Cluster {
    fn new(n: usize) -> Cluster {
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
                    }),
                    // Distinct refs per node, as each process picks its own seed.
                    ref_seed: node.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    ..Config::default()
                };
                Shard::new(ShardId(0), config)
            })
            .collect();
        let mut subs: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
        for (i, &node) in ids.iter().enumerate() {
            // Each node's driver subscribes to its own subject at connect.
            subs.entry(subjects.node(node)).or_default().insert(i);
        }
        Cluster {
            nodes,
            ids,
            subs,
            queue: VecDeque::new(),
            views: BTreeMap::new(),
            lose_next_delta_of: None,
            now: 0,
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
                Output::Nats(out) => self.nats(i, out),
            }
        }
    }

    fn nats(&mut self, from: usize, out: NatsOut) {
        match out {
            NatsOut::Subscribe(s) => {
                self.subs.entry(s).or_default().insert(from);
            }
            NatsOut::Unsubscribe(s) => {
                if let Some(set) = self.subs.get_mut(&s) {
                    set.remove(&from);
                }
            }
            NatsOut::Publish { subject, frame } => {
                let frame = Frame::decode(&frame).expect("nodes publish valid frames");
                if matches!(frame, Frame::Delta(_)) && self.lose_next_delta_of == Some(from) {
                    self.lose_next_delta_of = None;
                    return;
                }
                for &to in self.subs.get(&subject).into_iter().flatten() {
                    self.queue
                        .push_back((to, Inbound::Frame(frame.clone(), None)));
                }
            }
            NatsOut::Request {
                subject,
                name,
                frame,
            } => {
                let frame = Frame::decode(&frame).expect("valid");
                let to: Vec<usize> = self
                    .subs
                    .get(&subject)
                    .into_iter()
                    .flatten()
                    .copied()
                    .collect();
                if to.is_empty() {
                    self.queue.push_back((from, Inbound::NoResponders(name)));
                }
                for t in to {
                    let reply = format!("_INBOX.{from}");
                    self.queue
                        .push_back((t, Inbound::Frame(frame.clone(), Some(reply))));
                }
            }
            NatsOut::Reply { to, frame } => {
                let node: usize = to.trim_start_matches("_INBOX.").parse().expect("an inbox");
                let frame = Frame::decode(&frame).expect("valid");
                self.queue.push_back((node, Inbound::Frame(frame, None)));
            }
        }
    }

    fn client_frame(&mut self, id: (usize, u32), bytes: &[u8]) {
        let v: Value = serde_json::from_slice(bytes).unwrap();
        let view = self.views.entry(id).or_default();
        match v[3].as_str() {
            Some("presence_state") => sync_state(view, &v[4]),
            Some("presence_diff") => sync_diff(view, &v[4]),
            _ => {}
        }
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
            while let Some((to, msg)) = self.queue.pop_front() {
                match msg {
                    Inbound::Frame(f, reply) => self.nodes[to].nats_frame(f, reply.as_deref()),
                    Inbound::NoResponders(name) => self.nodes[to].no_responders(&name),
                }
                self.collect(to);
            }
        }
    }

    fn join(&mut self, node: usize, conn: u32, key: &str, page: u32) {
        self.nodes[node].open(ConnId(conn), UserKey::new(key));
        let join = format!(r#"["1","1","room","phx_join",{{"meta":{{"page":{page}}}}}]"#);
        self.nodes[node].frame(ConnId(conn), join.as_bytes());
        self.settle();
    }

    fn close(&mut self, node: usize, conn: u32) {
        self.nodes[node].close(ConnId(conn));
        self.views.remove(&(node, conn));
        self.settle();
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
    let dead = c.ids[1];
    c.nodes[0].node_down(dead);
    c.settle();
    assert_eq!(c.sees(0, 1), who(&[("ann", 1)]));
}
