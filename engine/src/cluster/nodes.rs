//! Which other nodes are alive, from their heartbeats; and this node's own heartbeats. Pure:
//! the node's cluster driver feeds it what it hears and the time, and carries out the events
//! (a node down: its parts leave everywhere on this node; a gap or a restart: its parts are
//! fetched again or replaced).
//!
//! A node whose own NATS connection is down knows that it is the isolated one: it keeps every
//! other node's parts for the isolation grace (so a NATS restart shorter than that is not seen
//! by clients), then drops them. Back in time, it counts everyone as just heard and re-fetches
//! their parts, which ends in only the net changes. Nodes that stayed connected cannot tell a
//! crash from a partition: they drop a silent node after the node timeout and take it back
//! when it is heard again.

use std::collections::BTreeMap;

use crate::cluster::frame::{Heartbeat, Origin};
use crate::core::Millis;

/// Something the driver must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// A node heard for the first time.
    Up(Origin),
    /// A node this one had declared down (silent, or this one isolated too long) is heard
    /// again, the same incarnation: a partition healed, and its parts must be asked for anew.
    Back(Origin),
    /// A node restarted: the parts of `old` are replaced by the new incarnation's at once.
    Restarted { old: Origin, new: Origin },
    /// Frames of this node may have been lost (a heartbeat missing, or this node's own NATS
    /// connection came back): fetch its parts again.
    Gap(Origin),
    /// Gone: its parts leave.
    Down(Origin, DownReason),
    /// Gone, but its parts stay for a grace (a leave grace after a death, the restart grace
    /// its goodbye named): joins may take its presences over meanwhile. `Down` follows at the
    /// grace's end, unless it is heard again first (`Back`).
    Held(Origin, DownReason),
    /// Another live process uses this node's name: this one must not run.
    NameClash { name: String, theirs: Origin },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownReason {
    /// Said goodbye (a graceful stop).
    Goodbye,
    /// Silent for the node timeout.
    Silent,
    /// This node's own NATS connection was down for the whole isolation grace.
    Isolated,
    /// Its restart came with another incarnation before it was found silent.
    Restarted,
    /// The grace it was held for ended.
    GraceEnded,
}

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How often this node sends a heartbeat (`--node-heartbeat-ms`).
    pub heartbeat: Millis,
    /// A node silent this long is down (`--node-timeout-ms`).
    pub timeout: Millis,
    /// How long an isolated node keeps the others' parts (`--isolation-grace-ms`).
    pub isolation_grace: Millis,
    /// How long a dead node's presences are held (`--leave-grace-ms`; 0: they leave at once).
    pub leave_grace: Millis,
}

#[derive(Debug)]
struct Peer {
    origin: Origin,
    beat: u64,
    heard: Millis,
}

#[derive(Debug)]
pub struct Nodes {
    me: Origin,
    name: String,
    timing: Timing,
    peers: BTreeMap<u64, Peer>,
    /// Incarnations declared down for silence, which may come back.
    gone: BTreeMap<u64, Origin>,
    /// Ended incarnations whose parts are held, and until when.
    holds: BTreeMap<Origin, (Millis, DownReason)>,
    beat: u64,
    next_beat: Millis,
    /// Since when this node's own NATS connection has been down.
    isolated_since: Option<Millis>,
    /// Frames of this node were lost since its last heartbeat.
    lossy: bool,
}

impl Nodes {
    pub fn new(me: Origin, name: &str, timing: Timing, now: Millis) -> Nodes {
        Nodes {
            me,
            name: name.to_owned(),
            timing,
            peers: BTreeMap::new(),
            gone: BTreeMap::new(),
            holds: BTreeMap::new(),
            beat: 0,
            next_beat: now,
            isolated_since: None,
            lossy: false,
        }
    }

    /// Frames this node published may not have gone out (its NATS connection was down, or the
    /// bridge could not keep up): its next heartbeat skips a number, so that every other node
    /// sees a gap and fetches this node's parts again.
    pub fn lost_frames(&mut self) {
        self.lossy = true;
    }

    /// This node's heartbeat, if one is due.
    pub fn heartbeat_due(&mut self, now: Millis) -> Option<Heartbeat> {
        if now.0 < self.next_beat.0 || self.isolated_since.is_some() {
            return None;
        }
        self.beat += 1 + u64::from(std::mem::take(&mut self.lossy));
        self.next_beat = Millis(now.0 + self.timing.heartbeat.0);
        Some(Heartbeat {
            origin: self.me,
            name: self.name.clone(),
            beat: self.beat,
        })
    }

    /// A heartbeat came (this node's own come back too, as NATS echoes them).
    pub fn heard(&mut self, hb: &Heartbeat, now: Millis) -> Vec<NodeEvent> {
        let o = hb.origin;
        if o.node == self.me.node {
            return if o.incarnation == self.me.incarnation {
                Vec::new()
            } else {
                vec![NodeEvent::NameClash {
                    name: hb.name.clone(),
                    theirs: o,
                }]
            };
        }
        let Some(peer) = self.peers.get_mut(&o.node) else {
            self.peers.insert(
                o.node,
                Peer {
                    origin: o,
                    beat: hb.beat,
                    heard: now,
                },
            );
            let back = self.gone.remove(&o.node) == Some(o);
            self.holds.remove(&o);
            return vec![if back {
                NodeEvent::Back(o)
            } else {
                NodeEvent::Up(o)
            }];
        };
        if peer.origin.incarnation != o.incarnation {
            let old = peer.origin;
            *peer = Peer {
                origin: o,
                beat: hb.beat,
                heard: now,
            };
            if self.timing.leave_grace.0 > 0 {
                // A crash and a restart within the node timeout: the old incarnation's clients
                // are reconnecting, and it is held like any dead node.
                let until = Millis(now.0 + self.timing.leave_grace.0);
                self.holds.insert(old, (until, DownReason::Restarted));
                return vec![NodeEvent::Held(old, DownReason::Restarted)];
            }
            return vec![NodeEvent::Restarted { old, new: o }];
        }
        if hb.beat <= peer.beat {
            return Vec::new(); // An old one, overtaken.
        }
        let missed = hb.beat != peer.beat + 1;
        peer.beat = hb.beat;
        peer.heard = now;
        if missed {
            vec![NodeEvent::Gap(o)]
        } else {
            Vec::new()
        }
    }

    /// A node stops gracefully; with a hold, its parts stay that long (it restarts and takes
    /// its presences back).
    pub fn goodbye(&mut self, origin: Origin, hold: Millis, now: Millis) -> Vec<NodeEvent> {
        match self.peers.get(&origin.node) {
            Some(p) if p.origin == origin => {
                self.peers.remove(&origin.node);
                if hold.0 > 0 {
                    let until = Millis(now.0.saturating_add(hold.0));
                    self.holds.insert(origin, (until, DownReason::Goodbye));
                    return vec![NodeEvent::Held(origin, DownReason::Goodbye)];
                }
                vec![NodeEvent::Down(origin, DownReason::Goodbye)]
            }
            _ => Vec::new(),
        }
    }

    /// Holds whose grace ended: those nodes are down now.
    fn holds_ended(&mut self, now: Millis) -> Vec<NodeEvent> {
        let ended: Vec<Origin> = self
            .holds
            .iter()
            .filter(|(_, (until, _))| until.0 <= now.0)
            .map(|(o, _)| *o)
            .collect();
        for o in &ended {
            self.holds.remove(o);
        }
        ended
            .into_iter()
            .map(|o| NodeEvent::Down(o, DownReason::GraceEnded))
            .collect()
    }

    /// Time passed: silent nodes are down, unless this node is the one cut off.
    pub fn tick(&mut self, now: Millis) -> Vec<NodeEvent> {
        let mut events = self.holds_ended(now);
        events.extend(self.silences(now));
        events
    }

    fn silences(&mut self, now: Millis) -> Vec<NodeEvent> {
        if let Some(since) = self.isolated_since {
            if now.0.saturating_sub(since.0) < self.timing.isolation_grace.0 {
                return Vec::new();
            }
            let down = std::mem::take(&mut self.peers).into_values();
            let down: Vec<Origin> = down.map(|p| p.origin).collect();
            self.gone.extend(down.iter().map(|o| (o.node, *o)));
            return down
                .into_iter()
                .map(|o| NodeEvent::Down(o, DownReason::Isolated))
                .collect();
        }
        let timeout = self.timing.timeout.0;
        let silent: Vec<u64> = self
            .peers
            .values()
            .filter(|p| now.0.saturating_sub(p.heard.0) >= timeout)
            .map(|p| p.origin.node)
            .collect();
        let down: Vec<Origin> = silent
            .into_iter()
            .filter_map(|n| self.peers.remove(&n))
            .map(|p| p.origin)
            .collect();
        self.gone.extend(down.iter().map(|o| (o.node, *o)));
        let grace = self.timing.leave_grace;
        if grace.0 == 0 {
            return down
                .into_iter()
                .map(|o| NodeEvent::Down(o, DownReason::Silent))
                .collect();
        }
        let until = Millis(now.0 + grace.0);
        for o in &down {
            self.holds.insert(*o, (until, DownReason::Silent));
        }
        down.into_iter()
            .map(|o| NodeEvent::Held(o, DownReason::Silent))
            .collect()
    }

    /// This node's own NATS connection went down.
    pub fn disconnected(&mut self, now: Millis) {
        self.isolated_since.get_or_insert(now);
    }

    /// It is back: everyone counts as heard now, and everyone's parts are fetched again (what
    /// changed meanwhile was lost).
    pub fn reconnected(&mut self, now: Millis) -> Vec<NodeEvent> {
        self.isolated_since = None;
        self.next_beat = now;
        for p in self.peers.values_mut() {
            p.heard = now;
        }
        self.peers
            .values()
            .map(|p| NodeEvent::Gap(p.origin))
            .collect()
    }

    /// When [`Nodes::tick`] or [`Nodes::heartbeat_due`] next has something to do.
    pub fn poll_timeout(&self) -> Millis {
        if let Some(since) = self.isolated_since {
            return Millis(since.0 + self.timing.isolation_grace.0);
        }
        let timeout = self.timing.timeout.0;
        let silent = self.peers.values().map(|p| p.heard.0 + timeout);
        let held = self.holds.values().map(|(until, _)| until.0);
        Millis(silent.chain(held).fold(self.next_beat.0, u64::min))
    }

    /// The other nodes up now.
    pub fn up(&self) -> impl Iterator<Item = Origin> + '_ {
        self.peers.values().map(|p| p.origin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMING: Timing = Timing {
        heartbeat: Millis(500),
        timeout: Millis(3_000),
        isolation_grace: Millis(10_000),
        leave_grace: Millis(0),
    };

    fn o(node: u64, incarnation: u64) -> Origin {
        Origin { node, incarnation }
    }

    fn hb(origin: Origin, beat: u64) -> Heartbeat {
        Heartbeat {
            origin,
            name: format!("node-{}", origin.node),
            beat,
        }
    }

    #[test]
    fn heartbeats_bring_nodes_up_and_their_silence_takes_them_down() {
        let mut n = Nodes::new(o(1, 100), "node-1", TIMING, Millis(0));
        assert_eq!(n.heartbeat_due(Millis(0)).map(|h| h.beat), Some(1));
        assert_eq!(n.heartbeat_due(Millis(499)), None);
        assert_eq!(n.heartbeat_due(Millis(500)).map(|h| h.beat), Some(2));
        assert!(
            n.heard(&hb(o(1, 100), 1), Millis(0)).is_empty(),
            "our own echo"
        );
        assert_eq!(
            n.heard(&hb(o(2, 7), 1), Millis(0)),
            [NodeEvent::Up(o(2, 7))]
        );
        assert!(n.heard(&hb(o(2, 7), 2), Millis(500)).is_empty());
        assert_eq!(
            n.heard(&hb(o(2, 7), 5), Millis(2_000)),
            [NodeEvent::Gap(o(2, 7))]
        );
        assert!(
            n.heard(&hb(o(2, 7), 4), Millis(2_100)).is_empty(),
            "overtaken"
        );
        assert_eq!(n.poll_timeout(), Millis(1_000), "our next beat");
        assert!(n.tick(Millis(4_999)).is_empty());
        assert_eq!(
            n.tick(Millis(5_000)),
            [NodeEvent::Down(o(2, 7), DownReason::Silent)]
        );
        assert_eq!(n.up().count(), 0);
        assert_eq!(
            n.heard(&hb(o(2, 7), 9), Millis(6_000)),
            [NodeEvent::Back(o(2, 7))],
            "healed"
        );
        // A lost frame of ours: the next heartbeat skips a number.
        n.lost_frames();
        assert_eq!(
            n.heartbeat_due(Millis(6_000)).map(|h| h.beat),
            Some(4),
            "3 is skipped"
        );
        assert_eq!(n.heartbeat_due(Millis(6_500)).map(|h| h.beat), Some(5));
    }

    #[test]
    fn restarts_goodbyes_and_name_clashes() {
        let mut n = Nodes::new(o(1, 100), "node-1", TIMING, Millis(0));
        n.heard(&hb(o(2, 7), 1), Millis(0));
        assert_eq!(
            n.heard(&hb(o(2, 8), 1), Millis(100)),
            [NodeEvent::Restarted {
                old: o(2, 7),
                new: o(2, 8)
            }]
        );
        assert!(
            n.goodbye(o(2, 7), Millis(0), Millis(100)).is_empty(),
            "the old incarnation's goodbye"
        );
        assert_eq!(
            n.goodbye(o(2, 8), Millis(0), Millis(100)),
            [NodeEvent::Down(o(2, 8), DownReason::Goodbye)]
        );
        assert_eq!(
            n.heard(&hb(o(1, 999), 3), Millis(200)),
            [NodeEvent::NameClash {
                name: "node-1".into(),
                theirs: o(1, 999)
            }]
        );
    }

    #[test]
    fn an_isolated_node_keeps_the_others_for_its_grace() {
        let mut n = Nodes::new(o(1, 100), "node-1", TIMING, Millis(0));
        n.heard(&hb(o(2, 7), 1), Millis(0));
        n.heard(&hb(o(3, 9), 1), Millis(0));
        n.disconnected(Millis(1_000));
        assert_eq!(n.heartbeat_due(Millis(1_000)), None, "nowhere to send it");
        // Past the node timeout, but the silence is ours.
        assert!(n.tick(Millis(9_000)).is_empty());
        assert_eq!(n.poll_timeout(), Millis(11_000));
        let back = n.reconnected(Millis(9_500));
        assert_eq!(back, [NodeEvent::Gap(o(2, 7)), NodeEvent::Gap(o(3, 9))]);
        assert!(
            n.tick(Millis(12_000)).is_empty(),
            "counted as heard at 9.5 s"
        );
        assert!(n.heartbeat_due(Millis(9_500)).is_some());
        // Cut off for longer than the grace: everyone else is dropped.
        n.disconnected(Millis(13_000));
        let down = n.tick(Millis(23_000));
        assert_eq!(
            down,
            [
                NodeEvent::Down(o(2, 7), DownReason::Isolated),
                NodeEvent::Down(o(3, 9), DownReason::Isolated)
            ]
        );
    }

    #[test]
    fn under_a_grace_an_ended_node_is_held_until_the_grace_ends_or_it_is_heard_again() {
        let timing = Timing {
            leave_grace: Millis(5_000),
            ..TIMING
        };
        let mut n = Nodes::new(o(1, 100), "node-1", timing, Millis(0));
        n.heard(&hb(o(2, 7), 1), Millis(0));
        n.heard(&hb(o(3, 9), 1), Millis(0));
        n.heard(&hb(o(4, 5), 1), Millis(0));
        // 3 says goodbye with a hold (it wrote a state file); 4 without: it is down at once.
        assert_eq!(
            n.goodbye(o(3, 9), Millis(30_000), Millis(100)),
            [NodeEvent::Held(o(3, 9), DownReason::Goodbye)]
        );
        assert_eq!(
            n.goodbye(o(4, 5), Millis(0), Millis(100)),
            [NodeEvent::Down(o(4, 5), DownReason::Goodbye)]
        );
        // 2 falls silent: held for the leave grace, then down.
        assert_eq!(
            n.tick(Millis(3_000)),
            [NodeEvent::Held(o(2, 7), DownReason::Silent)]
        );
        n.heartbeat_due(Millis(7_900));
        assert_eq!(
            n.poll_timeout(),
            Millis(8_000),
            "the hold's end, before our next beat"
        );
        assert!(n.tick(Millis(7_999)).is_empty());
        assert_eq!(
            n.tick(Millis(8_000)),
            [NodeEvent::Down(o(2, 7), DownReason::GraceEnded)]
        );
        // 3's next run is up (a new incarnation): the old one stays held for its hold.
        assert_eq!(
            n.heard(&hb(o(3, 10), 1), Millis(9_000)),
            [NodeEvent::Up(o(3, 10))]
        );
        n.heard(&hb(o(3, 10), 2), Millis(30_000));
        assert_eq!(
            n.tick(Millis(30_100)),
            [NodeEvent::Down(o(3, 9), DownReason::GraceEnded)]
        );
        // A held node heard again (a partition healed) is back, and its hold ends.
        let mut p = Nodes::new(o(1, 100), "node-1", timing, Millis(0));
        p.heard(&hb(o(2, 7), 1), Millis(0));
        p.tick(Millis(3_000));
        assert_eq!(
            p.heard(&hb(o(2, 7), 9), Millis(4_000)),
            [NodeEvent::Back(o(2, 7))]
        );
        p.heard(&hb(o(2, 7), 10), Millis(7_000));
        assert!(
            p.tick(Millis(8_000)).is_empty(),
            "no down at the grace's end"
        );
        // A restart heard before the old incarnation fell silent: the old one is held.
        assert_eq!(
            p.heard(&hb(o(2, 8), 1), Millis(8_500)),
            [NodeEvent::Held(o(2, 7), DownReason::Restarted)]
        );
    }
}
