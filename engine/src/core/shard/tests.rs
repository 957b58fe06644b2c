use super::*;

/// One shard, one connection: every request must get exactly the reply PROTOCOL.md gives.
fn shard() -> Shard {
    let config = Config {
        max_topics_per_conn: 2,
        max_meta_bytes: 16,
        ..Config::default()
    };
    let mut s = Shard::new(ShardId(0), config);
    s.open(ConnId(1), UserKey::new("u1"));
    s
}

fn texts(s: &mut Shard) -> Vec<String> {
    s.flush();
    s.outputs()
        .map(|o| match o {
            Output::Send { frame, .. } => String::from_utf8_lossy(&frame).into_owned(),
            Output::Close { code, reason, .. } => format!("close {} {reason}", code.0),
            Output::Mesh { to, msg } => panic!("one shard sends nothing to {to:?}: {msg:?}"),
            Output::Nats(out) => panic!("a single node publishes nothing: {out:?}"),
            Output::Refresh { token, .. } => format!("refresh {token}"),
            Output::Event(e) => {
                let why = e.reason.map_or("", |r| r.as_str());
                format!(
                    "event {} {} {} {why}",
                    e.kind.as_str(),
                    e.topic.as_str(),
                    e.key.as_str()
                )
            }
        })
        .collect()
}

/// The events a shard with events on reports for `run`'s inputs, in order.
fn events_of(config: Config, run: impl FnOnce(&mut Shard)) -> Vec<String> {
    let mut s = Shard::new(
        ShardId(0),
        Config {
            events: true,
            ..config
        },
    );
    s.open(ConnId(1), UserKey::new("u1"));
    run(&mut s);
    s.flush();
    let all = texts(&mut s);
    all.into_iter()
        .filter(|t| t.starts_with("event "))
        .map(|t| t[6..].trim_end().to_owned())
        .collect()
}

const JOIN: &str = r#"["1","1","room","phx_join",{"meta":{"a":1}}]"#;

#[test]
fn events_say_why_a_presence_left() {
    let left = events_of(Config::default(), |s| {
        s.frame(ConnId(1), JOIN.as_bytes());
        s.frame(ConnId(1), br#"["1","2","room","phx_leave",{}]"#);
    });
    let want = [
        "presence_join room u1",
        "user_online room u1",
        "presence_leave room u1 left",
        "user_offline room u1",
    ];
    assert_eq!(left, want);
    let closed = events_of(Config::default(), |s| {
        s.frame(ConnId(1), JOIN.as_bytes());
        s.close(ConnId(1));
    });
    assert_eq!(closed[2], "presence_leave room u1 closed");
    let heartbeat = Config {
        heartbeat_timeout: Millis(1_000),
        ..Config::default()
    };
    let silent = events_of(heartbeat, |s| {
        s.frame(ConnId(1), JOIN.as_bytes());
        s.tick(Millis(5_000));
    });
    assert_eq!(silent[2], "presence_leave room u1 heartbeat_timeout");
    let graced = Config {
        leave_grace: Millis(500),
        ..Config::default()
    };
    let expired = events_of(graced, |s| {
        s.frame(ConnId(1), JOIN.as_bytes());
        s.close(ConnId(1));
        s.tick(Millis(100));
        s.tick(Millis(1_000));
    });
    assert_eq!(
        expired[2..],
        [
            "presence_leave room u1 grace_expired",
            "user_offline room u1"
        ]
    );
}

/// A reconnect within the leave grace takes its presence back: the backend hears nothing, and
/// an update is one event naming the presence it replaced.
#[test]
fn a_takeover_is_no_event_and_an_update_is_one() {
    let graced = Config {
        leave_grace: Millis(500),
        ..Config::default()
    };
    let events = events_of(graced, |s| {
        s.frame(ConnId(1), JOIN.as_bytes());
        s.close(ConnId(1));
        s.open(ConnId(2), UserKey::new("u1"));
        s.frame(ConnId(2), JOIN.as_bytes());
        s.frame(
            ConnId(2),
            br#"["1","2","room","presence_update",{"meta":{"a":2}}]"#,
        );
        s.tick(Millis(1_000));
    });
    assert_eq!(
        events,
        [
            "presence_join room u1",
            "user_online room u1",
            "presence_update room u1"
        ]
    );
}

/// With events off (no backend) the core makes none.
#[test]
fn no_events_without_a_backend() {
    let mut s = shard();
    let out = send(&mut s, JOIN);
    assert!(out.iter().all(|t| !t.starts_with("event")), "{out:?}");
}

fn send(s: &mut Shard, frame: &str) -> Vec<String> {
    s.frame(ConnId(1), frame.as_bytes());
    texts(s)
}

#[test]
fn join_replies_then_state_then_own_join_diff() {
    let mut s = shard();
    let out = send(&mut s, r#"["1","1","room","phx_join",{"meta":{"a":1}}]"#);
    assert_eq!(
        out[0],
        r#"["1","1","room","phx_reply",{"status":"ok","response":{}}]"#
    );
    assert_eq!(out[1], r#"["1",null,"room","presence_state",{}]"#);
    assert!(
        out[2].starts_with(
            r#"[null,null,"room","presence_diff",{"joins":{"u1":{"metas":[{"a":1,"phx_ref":"#
        ),
        "{}",
        out[2]
    );
    assert_eq!(out.len(), 3);
}

#[test]
fn every_error_of_the_contract() {
    let mut s = shard();
    let err = |jr: &str, r: &str, t: &str, reason: &str| {
        format!(
            r#"[{jr},"{r}","{t}","phx_reply",{{"status":"error","response":{{"reason":"{reason}"}}}}]"#
        )
    };
    assert_eq!(
        send(&mut s, r#"[null,"1","room","shout",{}]"#),
        [err("null", "1", "room", "unmatched topic")]
    );
    assert_eq!(
        send(
            &mut s,
            r#"["2","2","room","phx_join",{"meta":{"x":"0123456789"}}]"#
        ),
        [err(r#""2""#, "2", "room", "meta too large")]
    );
    send(&mut s, r#"["3","3","a","phx_join",{"track":false}]"#);
    assert_eq!(
        send(&mut s, r#"["3","4","a","shout",{}]"#),
        [err(r#""3""#, "4", "a", "unknown event")]
    );
    assert_eq!(
        send(&mut s, r#"["3","5","a","presence_update",{"meta":{}}]"#),
        [err(r#""3""#, "5", "a", "not tracked")]
    );
    assert_eq!(
        send(&mut s, r#"["9","6","a","shout",{}]"#),
        [err(r#""9""#, "6", "a", "unmatched topic")],
        "stale join_ref"
    );
    assert_eq!(
        send(&mut s, r#"["3","7","a","phx_join",{"track":"yes"}]"#),
        [err(r#""3""#, "7", "a", "track must be a boolean")]
    );
    send(&mut s, r#"["8","8","b","phx_join",{}]"#);
    assert_eq!(
        send(&mut s, r#"["9","9","c","phx_join",{}]"#),
        [err(r#""9""#, "9", "c", "too many channels joined")]
    );
    assert_eq!(
        send(&mut s, r#"[null,"10","phoenix","heartbeat",{}]"#),
        [r#"[null,"10","phoenix","phx_reply",{"status":"ok","response":{}}]"#]
    );
    let long_topic = "t".repeat(256);
    assert_eq!(
        send(
            &mut s,
            &format!(r#"["5","5","{long_topic}","phx_join",{{}}]"#)
        ),
        [err(r#""5""#, "5", &long_topic, "topic too long")]
    );
    assert_eq!(
        send(&mut s, r#"["6","6","never-joined","phx_join",{"track":1}]"#),
        [err(
            r#""6""#,
            "6",
            "never-joined",
            "track must be a boolean"
        )]
    );
    // Not a V2 message: closed with 1007, and its presences leave.
    assert_eq!(
        send(&mut s, "[1]"),
        ["close 1007 invalid frame: expected [join_ref, ref, topic, event, payload]"]
    );
    s.tick(Millis(0));
    assert_eq!(s.topic_view("b"), None);
    assert!(
        send(&mut s, r#"[null,"11","phoenix","heartbeat",{}]"#).is_empty(),
        "closed connection is forgotten"
    );
    assert!(s.is_empty(), "{:?}", s.stats());
}

#[test]
fn an_overlong_ref_closes_the_connection() {
    let mut s = shard();
    send(&mut s, r#"["1","1","room","phx_join",{}]"#);
    let frame = format!(r#"["1","{}","room","shout",{{}}]"#, "r".repeat(65));
    assert_eq!(
        send(&mut s, &frame),
        ["close 1007 invalid frame: join_ref or ref too long"]
    );
    s.tick(Millis(0));
    assert!(s.is_empty(), "{:?}", s.stats());
}

#[test]
fn update_is_leave_plus_join_with_prev() {
    let mut s = shard();
    send(&mut s, r#"["1","1","room","phx_join",{"meta":{"p":1}}]"#);
    let out = send(
        &mut s,
        r#"["1","2","room","presence_update",{"meta":{"p":2}}]"#,
    );
    assert_eq!(
        out[0],
        r#"["1","2","room","phx_reply",{"status":"ok","response":{}}]"#
    );
    let diff: serde_json::Value = serde_json::from_str(&out[1]).expect("JSON");
    let joined = &diff[4]["joins"]["u1"]["metas"][0];
    let left = &diff[4]["leaves"]["u1"]["metas"][0];
    assert_eq!(
        (&joined["p"], &left["p"]),
        (&2.into(), &1.into()),
        "{}",
        out[1]
    );
    assert_eq!(joined["phx_ref_prev"], left["phx_ref"], "{}", out[1]);
    assert_ne!(joined["phx_ref"], left["phx_ref"], "{}", out[1]);
}

/// One shard with a leave grace of 1 s.
fn graced() -> Shard {
    let config = Config {
        leave_grace: Millis(1000),
        ..Config::default()
    };
    Shard::new(ShardId(0), config)
}

fn diff_of(text: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(text).expect("JSON");
    assert_eq!(v[3], "presence_diff", "{text}");
    v[4].clone()
}

#[test]
fn a_reconnect_within_the_grace_takes_the_presence_over() {
    let mut s = graced();
    let (old, observer, new, newer) = (ConnId(1), ConnId(2), ConnId(3), ConnId(4));
    s.open(old, UserKey::new("u1"));
    s.open(observer, UserKey::new("obs"));
    s.frame(old, br#"["1","1","room","phx_join",{"meta":{"a":1}}]"#);
    s.frame(observer, br#"["1","1","room","phx_join",{"track":false}]"#);
    let out = texts(&mut s);
    let state: serde_json::Value =
        serde_json::from_str(out.last().expect("observer state")).expect("JSON");
    let held_ref = state[4]["u1"]["metas"][0]["phx_ref"].clone();
    // The socket drops; the same key is back within the grace with the same meta.
    s.close(old);
    s.tick(Millis(500));
    s.open(new, UserKey::new("u1"));
    s.frame(new, br#"["1","1","room","phx_join",{"meta":{"a":1}}]"#);
    let out = texts(&mut s);
    assert_eq!(
        out.len(),
        2,
        "reply and state to the new connection only: {out:?}"
    );
    let state: serde_json::Value = serde_json::from_str(&out[1]).expect("JSON");
    assert_eq!(
        state[4]["u1"]["metas"][0]["phx_ref"], held_ref,
        "{}",
        out[1]
    );
    s.tick(Millis(5000));
    assert!(texts(&mut s).is_empty(), "no leave when the grace ends");
    // Its update names the adopted presence.
    s.frame(
        new,
        br#"["1","2","room","presence_update",{"meta":{"a":3}}]"#,
    );
    let out = texts(&mut s);
    assert_eq!(
        diff_of(&out[1])["leaves"]["u1"]["metas"][0]["phx_ref"],
        held_ref
    );
    let updated = diff_of(&out[1])["joins"]["u1"]["metas"][0]["phx_ref"].clone();
    // Another drop, and a return with a different meta: one update diff.
    s.close(new);
    s.tick(Millis(5500));
    s.open(newer, UserKey::new("u1"));
    s.frame(newer, br#"["1","1","room","phx_join",{"meta":{"a":2}}]"#);
    let out = texts(&mut s);
    let diffs: Vec<&String> = out.iter().filter(|f| f.contains("presence_diff")).collect();
    assert_eq!(
        diffs.len(),
        2,
        "one diff each to observer and joiner: {out:?}"
    );
    let d = diff_of(diffs[0]);
    assert_eq!(d["leaves"]["u1"]["metas"][0]["phx_ref"], updated, "{d}");
    assert_eq!(d["joins"]["u1"]["metas"][0]["phx_ref_prev"], updated, "{d}");
    assert_eq!(d["joins"]["u1"]["metas"][0]["a"], 2, "{d}");
    // A drop with nobody coming back: the leave goes out when the grace ends.
    s.close(newer);
    assert!(texts(&mut s).is_empty(), "held, not left");
    s.tick(Millis(6600));
    let out = texts(&mut s);
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(diff_of(&out[0])["leaves"]["u1"].is_object(), "{}", out[0]);
    s.close(observer);
    s.tick(Millis(7000));
    assert!(s.is_empty(), "{:?}", s.stats());
}

#[test]
fn a_large_topic_sends_one_diff_per_window_and_one_state_to_its_joiners() {
    let config = Config {
        diff_window: Millis(50),
        large_topic_threshold: 3,
        ..Config::default()
    };
    let mut s = Shard::new(ShardId(0), config);
    for i in 1..=3 {
        s.open(ConnId(i), UserKey::new(&format!("u{i}")));
        s.frame(ConnId(i), br#"["1","1","big","phx_join",{}]"#);
        s.flush();
    }
    // u3 made it large: its diff opened a window, which ends quietly.
    s.tick(Millis(60));
    s.outputs().for_each(drop);
    // Three joins: the first goes out at once and opens a window, the other two wait, and
    // so do their joiners.
    for i in 4..=6 {
        s.open(ConnId(i), UserKey::new(&format!("u{i}")));
        s.frame(ConnId(i), br#"["1","1","big","phx_join",{}]"#);
        s.flush();
    }
    let out = texts(&mut s);
    let diffs = out.iter().filter(|f| f.contains("presence_diff")).count();
    let states = out.iter().filter(|f| f.contains("presence_state")).count();
    assert_eq!((diffs, states), (4, 1), "{out:?}");
    s.tick(Millis(120));
    let out = texts(&mut s);
    let diffs: Vec<&String> = out.iter().filter(|f| f.contains("presence_diff")).collect();
    let states: Vec<&String> = out
        .iter()
        .filter(|f| f.contains("presence_state"))
        .collect();
    assert_eq!(
        diffs.len(),
        4,
        "one diff to each of the 4 earlier members: {out:?}"
    );
    assert_eq!(
        diff_of(diffs[0])["joins"].as_object().map(|o| o.len()),
        Some(2),
        "u5 and u6 in one diff: {}",
        diffs[0]
    );
    assert_eq!(
        states.len(),
        2,
        "u5 and u6 get their state at the window's end"
    );
    let payload = |f: &str| serde_json::from_str::<serde_json::Value>(f).expect("JSON")[4].clone();
    assert_eq!(payload(states[0]), payload(states[1]));
    assert_eq!(
        payload(states[0]).as_object().map(|o| o.len()),
        Some(6),
        "{}",
        states[0]
    );
    assert_eq!(s.stats().diffs_coalesced, 2);
}

/// The driver's clock is an input: a window opened between two ticks lasts its whole length
/// from the moment of the diff that opened it, whatever the phase of the driver's ticks, and
/// `poll_timeout` names its end.
#[test]
fn a_window_lasts_its_full_length_whatever_the_phase_of_the_ticks() {
    for phase in [0u64, 1, 17, 49] {
        let config = Config {
            diff_window: Millis(50),
            large_topic_threshold: 2,
            ..Config::default()
        };
        let mut s = Shard::new(ShardId(0), config);
        let ms = |t: u64| t * 1000;
        for i in 1..=2 {
            s.advance(ms(1000));
            s.open(ConnId(i), UserKey::new(&format!("u{i}")));
            s.frame(ConnId(i), br#"["1","1","big","phx_join",{}]"#);
            s.flush();
        }
        // Quiet until the window u2's join opened has ended.
        s.tick(Millis(1100));
        s.outputs().for_each(drop);
        // (The wheel looks at deadlines beyond its horizon early, to check them.)
        let due = s.poll_timeout();
        assert!(
            due.is_some_and(|d| d.0 > 60_000),
            "nothing but the heartbeat timeouts waits on time: {due:?}"
        );
        // A join between two ticks (the driver ticks at phase + k*50): its diff goes at once
        // and opens a window from this moment.
        let t0 = 1100 + phase + 3;
        s.advance(ms(t0));
        s.open(ConnId(3), UserKey::new("u3"));
        s.frame(ConnId(3), br#"["1","1","big","phx_join",{}]"#);
        s.flush();
        let diffs = |s: &mut Shard| {
            texts(s)
                .iter()
                .filter(|f| f.contains("presence_diff"))
                .count()
        };
        assert_eq!(diffs(&mut s), 3, "u3's join to u1, u2 and u3 at once");
        assert_eq!(s.poll_timeout(), Some(Millis(t0 + 50)));
        // One more change right after: it waits for the window's end, not the next tick.
        s.advance(ms(t0 + 1));
        s.open(ConnId(4), UserKey::new("u4"));
        s.frame(ConnId(4), br#"["1","1","big","phx_join",{"track":false}]"#);
        s.frame(
            ConnId(1),
            br#"["1","2","big","presence_update",{"meta":{"n":1}}]"#,
        );
        s.flush();
        assert_eq!(diffs(&mut s), 0, "held by the window");
        // A driver tick that happens to fall 1 ms before the end sends nothing...
        s.tick(Millis(t0 + 49));
        assert_eq!(
            diffs(&mut s),
            0,
            "phase {phase}: the window is not cut short"
        );
        // ...and the one poll_timeout asked for sends the window's diff, and u4, which joined
        // inside the window, its state.
        s.tick(Millis(t0 + 50));
        let out = texts(&mut s);
        let count = |what: &str| out.iter().filter(|f| f.contains(what)).count();
        assert_eq!(
            (count("presence_diff"), count("presence_state")),
            (3, 1),
            "phase {phase}: {out:?}"
        );
    }
}

#[test]
fn a_reconnect_before_the_old_connection_closes_is_a_twin() {
    let mut s = graced();
    let (old, observer, new, tab) = (ConnId(1), ConnId(2), ConnId(3), ConnId(4));
    s.open(observer, UserKey::new("obs"));
    s.frame(observer, br#"["1","1","room","phx_join",{"track":false}]"#);
    s.open(old, UserKey::new("u1"));
    s.frame(old, br#"["1","1","room","phx_join",{"meta":{"a":1}}]"#);
    let out = texts(&mut s);
    let first =
        diff_of(out.last().expect("the join"))["joins"]["u1"]["metas"][0]["phx_ref"].clone();
    // The reconnect arrives before the old socket is seen closing: nobody hears of it...
    s.open(new, UserKey::new("u1"));
    s.frame(new, br#"["1","1","room","phx_join",{"meta":{"a":1}}]"#);
    let out = texts(&mut s);
    assert!(out.iter().all(|f| !f.contains("presence_diff")), "{out:?}");
    assert_eq!(s.stats().twins, 1);
    // ...nor of the old one closing: the new connection has its presence now.
    s.close(old);
    s.tick(Millis(5000));
    assert!(texts(&mut s).is_empty());
    s.frame(
        new,
        br#"["1","2","room","presence_update",{"meta":{"a":2}}]"#,
    );
    let out = texts(&mut s);
    let d = diff_of(&out[1]);
    assert_eq!(d["leaves"]["u1"]["metas"][0]["phx_ref"], first, "{d}");
    assert_eq!(
        s.topic_view("room").map(|v| v.presences[0].1.len()),
        Some(1)
    );
    // A second tab with the same meta whose twin stays open: announced when its grace ends.
    s.open(tab, UserKey::new("u1"));
    s.frame(tab, br#"["1","1","room","phx_join",{"meta":{"a":2}}]"#);
    assert!(texts(&mut s).iter().all(|f| !f.contains("presence_diff")));
    s.tick(Millis(6100));
    let out = texts(&mut s);
    let joins: Vec<&String> = out.iter().filter(|f| f.contains("presence_diff")).collect();
    assert_eq!(
        joins.len(),
        3,
        "observer, new and tab each see the tab: {out:?}"
    );
    assert_eq!(
        s.topic_view("room").map(|v| v.presences[0].1.len()),
        Some(2)
    );
}

#[test]
fn a_presence_held_taken_over_and_held_again_keeps_its_second_grace() {
    let mut s = graced();
    s.open(ConnId(9), UserKey::new("obs"));
    s.frame(ConnId(9), br#"["1","1","room","phx_join",{"track":false}]"#);
    s.open(ConnId(1), UserKey::new("u1"));
    s.frame(
        ConnId(1),
        br#"["1","1","room","phx_join",{"meta":{"a":1}}]"#,
    );
    texts(&mut s);
    s.close(ConnId(1)); // held until 1000
    s.tick(Millis(100));
    s.open(ConnId(2), UserKey::new("u1"));
    s.frame(
        ConnId(2),
        br#"["1","1","room","phx_join",{"meta":{"a":1}}]"#,
    );
    s.tick(Millis(200));
    s.close(ConnId(2)); // held again, until 1200
    assert!(texts(&mut s).iter().all(|f| !f.contains("presence_diff")));
    s.tick(Millis(1000));
    assert!(
        texts(&mut s).is_empty(),
        "the first hold's end must not release the second"
    );
    s.tick(Millis(1300));
    let out = texts(&mut s);
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(diff_of(&out[0])["leaves"]["u1"].is_object());
    assert_eq!(s.stats().grace_expired, 1);
}

/// A restart with a state file, in the core: what one run exports, the next takes back as held
/// presences. The same key with an equal meta takes its presence over (same ref, nothing sent
/// to anyone else); a changed meta is one update; an unclaimed one leaves when the grace ends.
#[test]
fn presences_of_a_previous_run_are_taken_back_or_leave_at_the_restart_grace() {
    let mut before = Shard::new(ShardId(0), Config::default());
    for (conn, key, meta) in [(1, "same", 1), (2, "changed", 2), (3, "gone", 3)] {
        before.open(ConnId(conn), UserKey::new(key));
        let join = format!(r#"["1","1","room","phx_join",{{"meta":{{"m":{meta}}}}}]"#);
        before.frame(ConnId(conn), join.as_bytes());
    }
    texts(&mut before);
    let conns = before.export_conns();
    assert_eq!(conns.len(), 3);
    assert!(conns.iter().all(|(_, held)| held.len() == 1));
    let exported = before.export_presences();
    assert_eq!(exported.len(), 3);
    let ref_of = |key: &str| {
        let (_, t) = exported
            .iter()
            .find(|(_, t)| t.key.as_str() == key)
            .expect("exported");
        t.phx_ref
    };

    // Each run has refs of its own (the server seeds them at random).
    let config = Config {
        ref_seed: 99,
        ..Config::default()
    };
    let mut after = Shard::new(ShardId(0), config);
    let until = Millis(30_000);
    let all = exported
        .iter()
        .map(|(topic, t)| (topic.as_str(), t.key.as_str(), t.meta.bytes()));
    assert_eq!(after.restore(all, until), 3);
    // What no file should hold is refused.
    let bad: [(&str, &str, &[u8]); 3] = [
        ("room", "x", br#"{"m":1}"#), // no ref
        ("room", "x", b"not json"),
        ("", "x", exported[0].1.meta.bytes()),
    ];
    for b in bad {
        assert_eq!(after.restore([b], until), 0, "{b:?}");
    }
    // An observer sees all three, with their old refs.
    after.open(ConnId(10), UserKey::new("observer"));
    after.frame(
        ConnId(10),
        br#"["1","1","room","phx_join",{"track":false}]"#,
    );
    let out = texts(&mut after);
    let state: serde_json::Value = serde_json::from_str(&out[1]).expect("JSON");
    for key in ["same", "changed", "gone"] {
        let shown = &state[4][key]["metas"][0]["phx_ref"];
        assert_eq!(shown, &ref_of(key).to_string(), "{key} in {}", out[1]);
    }
    // The same client comes back: its reply and state, nothing for the observer.
    after.tick(Millis(1_000));
    after.open(ConnId(11), UserKey::new("same"));
    after.frame(
        ConnId(11),
        br#"["1","1","room","phx_join",{"meta":{"m":1}}]"#,
    );
    let out = texts(&mut after);
    assert_eq!(out.len(), 2, "reply and state to the joiner only: {out:?}");
    // One with a changed meta: one update diff.
    after.open(ConnId(12), UserKey::new("changed"));
    after.frame(
        ConnId(12),
        br#"["1","1","room","phx_join",{"meta":{"m":20}}]"#,
    );
    let out = texts(&mut after);
    let diffs: Vec<_> = out.iter().filter(|f| f.contains("presence_diff")).collect();
    assert_eq!(
        diffs.len(),
        3,
        "one diff each to the observer, the client back before and the joiner: {out:?}"
    );
    let d = diff_of(diffs[0]);
    assert_eq!(d["joins"]["changed"]["metas"][0]["m"], 20, "{d}");
    assert_eq!(
        d["leaves"]["changed"]["metas"][0]["phx_ref"],
        ref_of("changed").to_string(),
        "{d}"
    );
    // Nobody takes the third back: it leaves when the grace ends, not before.
    after.tick(Millis(29_999));
    assert!(texts(&mut after).is_empty());
    after.tick(Millis(30_000));
    let out = texts(&mut after);
    assert_eq!(out.len(), 3, "one leave to each subscriber: {out:?}");
    for f in &out {
        let d = diff_of(f);
        assert!(
            d["leaves"]["gone"].is_object() && d["joins"] == serde_json::json!({}),
            "{d}"
        );
    }
}

/// A server-side presence joins like a connection's, an update replaces its meta, and it leaves
/// at its TTL (a second put's TTL counts, not the first's) or when removed.
#[test]
fn server_side_presences_join_update_and_expire() {
    let events = events_of(Config::default(), |s| {
        assert_eq!(
            s.server_track("room", "bot", r#"{"k":1}"#, Some(Millis(100))),
            Ok(())
        );
        s.tick(Millis(50));
        assert_eq!(
            s.server_track("room", "bot", r#"{"k":2}"#, Some(Millis(100))),
            Ok(())
        );
        s.tick(Millis(120));
        assert!(
            s.topic_view("room").is_some(),
            "the first TTL no longer counts"
        );
        s.tick(Millis(200));
        assert!(s.topic_view("room").is_none(), "gone at the second TTL");
        assert_eq!(s.server_track("room", "call", "{}", None), Ok(()));
        s.server_untrack("room", "call");
    });
    let want = [
        "presence_join room bot",
        "user_online room bot",
        "presence_update room bot",
        "presence_leave room bot ttl_expired",
        "user_offline room bot",
        "presence_join room call",
        "user_online room call",
        "presence_leave room call removed",
        "user_offline room call",
    ];
    assert_eq!(events, want);
    let mut s = shard();
    let too_big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(40));
    assert_eq!(
        s.server_track("room", "bot", &too_big, None),
        Err("meta too large")
    );
    assert_eq!(
        s.server_track("room", "", "{}", None),
        Err("key must be 1 to 255 bytes")
    );
    assert!(s.server_track("room", "bot", "[1]", None).is_err());
}

/// A restart with a state file keeps server-side presences: exported apart from the
/// connections' (so not held for a client), taken back live with their refs, no event, and
/// the rest of their TTLs; one taken back with nothing left leaves at the first tick.
#[test]
fn server_side_presences_come_back_after_a_restart_with_the_rest_of_their_ttl() {
    let mut before = Shard::new(ShardId(0), Config::default());
    before.tick(Millis(1_000));
    assert_eq!(
        before.server_track("room", "bot", r#"{"k":1}"#, Some(Millis(500))),
        Ok(())
    );
    assert_eq!(before.server_track("room", "call", "{}", None), Ok(()));
    assert_eq!(
        before.server_track("room", "late", "{}", Some(Millis(250))),
        Ok(())
    );
    before.open(ConnId(1), UserKey::new("u1"));
    before.frame(ConnId(1), br#"["1","1","room","phx_join",{"meta":{}}]"#);
    texts(&mut before);
    before.tick(Millis(1_200));
    let mut server = before.export_server_presences();
    server.sort_by(|a, b| a.1.key.cmp(&b.1.key));
    let got: Vec<_> = server
        .iter()
        .map(|(t, p, ttl)| (t.as_str(), p.key.as_str(), *ttl))
        .collect();
    assert_eq!(
        got,
        [
            ("room", "bot", Some(Millis(300))),
            ("room", "call", None),
            ("room", "late", Some(Millis(50))),
        ]
    );
    let conns: Vec<_> = before.export_presences();
    assert_eq!(conns.len(), 1, "the connection's only: {conns:?}");
    assert_eq!(conns[0].1.key.as_str(), "u1");

    let events = events_of(Config::default(), |after| {
        after.tick(Millis(10_000));
        // Down for 100 ms, as the driver counts it: late's TTL ran out meanwhile.
        let back = server.iter().map(|(t, p, ttl)| {
            let ttl = ttl.map(|t| Millis(t.0.saturating_sub(100)));
            (t.as_str(), p.key.as_str(), p.meta.bytes(), ttl)
        });
        assert_eq!(after.restore_server(back), 3);
        let bad: [(&str, &str, &[u8], _); 2] = [
            ("room", "x", br#"{"k":1}"#, None), // no ref
            ("", "x", server[0].1.meta.bytes(), None),
        ];
        assert_eq!(after.restore_server(bad), 0);
        // As they were: their refs and metas (u1 is the events_of connection, not tracked).
        let view = after.topic_view("room").expect("the room is back");
        let was: Vec<_> = server
            .iter()
            .map(|(_, p, _)| (p.key.clone(), vec![p.meta.clone()]))
            .collect();
        assert_eq!(view.presences, was);
        after.tick(Millis(10_001));
        after.tick(Millis(10_199));
        after.tick(Millis(10_200));
        // Still a server-side presence: a DELETE removes it.
        after.server_untrack("room", "call");
    });
    // No presence_join: they never left. Each key is online again on this run's user owner;
    // the id is of (key, ref), so the same as before the restart when this presence was the
    // one that made the key online, as here.
    let want = [
        "user_online room bot",
        "user_online room call",
        "user_online room late",
        "presence_leave room late ttl_expired",
        "user_offline room late",
        "presence_leave room bot ttl_expired",
        "user_offline room bot",
        "presence_leave room call removed",
        "user_offline room call",
    ];
    assert_eq!(events, want);
}

/// A disconnect closes each connection of the key, and only those, with the code and reason.
#[test]
fn a_disconnect_closes_the_keys_connections() {
    let mut s = shard();
    s.open(ConnId(2), UserKey::new("u2"));
    s.open(ConnId(3), UserKey::new("u1"));
    texts(&mut s);
    let n = s.disconnect_user("u1", CloseCode(4001), "banned".into());
    assert_eq!(n, 2);
    let mut closes = texts(&mut s);
    closes.sort();
    assert_eq!(closes, ["close 4001 banned", "close 4001 banned"]);
    assert!(s.disconnect_user("u1", CloseCode(4001), "again".into()) == 0);
}

/// A connection is closed when its token expires, unless a fresh token for its key came first;
/// the core hands the token to the driver and takes its verdict.
#[test]
fn a_token_expires_unless_refreshed() {
    let mut s = Shard::new(ShardId(0), Config::default());
    s.open_with(ConnId(1), UserKey::new("u1"), None, Some(Millis(100)));
    s.open_with(ConnId(2), UserKey::new("u2"), None, Some(Millis(100)));
    s.frame(ConnId(2), br#"["1","1","roster:token","phx_join",{}]"#);
    s.frame(
        ConnId(2),
        br#"["1","2","roster:token","refresh",{"token":"t"}]"#,
    );
    s.flush();
    let asked: Vec<_> = s
        .outputs()
        .filter_map(|o| match o {
            Output::Refresh { conn, token, .. } => Some((conn, token)),
            _ => None,
        })
        .collect();
    assert_eq!(asked, [(ConnId(2), "t".into())]);
    let other = Ok((UserKey::new("u1"), None, Some(Millis(1_000))));
    s.refreshed(ConnId(2), other, Some("1"), Some("2"));
    let refused = texts(&mut s);
    assert!(
        refused[0].contains("token names another key"),
        "{refused:?}"
    );
    s.refreshed(
        ConnId(2),
        Ok((UserKey::new("u2"), None, Some(Millis(1_000)))),
        None,
        None,
    );
    texts(&mut s);
    s.tick(Millis(150));
    assert_eq!(texts(&mut s), ["close 4001 token expired"]);
    s.tick(Millis(1_000));
    assert_eq!(texts(&mut s), ["close 4001 token expired"]);
    assert!(s.is_empty());
}

/// A refresh with other meta claims makes each presence of the connection anew with them: the
/// client's fields stay, the old claims go (even one the client had set: the claim hid it), and
/// a later update of the client names the new presence.
#[test]
fn a_refresh_puts_the_new_claims_in_the_tracked_presences() {
    let claims = |meta: &str| {
        Some(Box::new(Grants {
            topics: None,
            meta: Some(meta.into()),
        }))
    };
    let mut s = Shard::new(ShardId(0), Config::default());
    s.open_with(
        ConnId(1),
        UserKey::new("u1"),
        claims(r#"{"role":"a"}"#),
        None,
    );
    s.open(ConnId(2), UserKey::new("u2"));
    s.frame(
        ConnId(1),
        br#"["1","1","room","phx_join",{"meta":{"page":"/a","role":"mine"}}]"#,
    );
    s.frame(ConnId(2), br#"["2","2","room","phx_join",{}]"#);
    texts(&mut s);
    let metas = |s: &Shard| -> Vec<serde_json::Value> {
        let view = s.topic_view("room").expect("tracked");
        let (_, metas) = view
            .presences
            .iter()
            .find(|(k, _)| k.as_str() == "u1")
            .unwrap();
        let m = |m: &Meta| serde_json::from_slice(m.bytes()).unwrap();
        metas.iter().map(m).collect()
    };
    assert_eq!(metas(&s)[0]["role"], "a");
    let first_ref = metas(&s)[0]["phx_ref"].clone();
    let fresh = Ok((UserKey::new("u1"), claims(r#"{"tier":"gold"}"#), None));
    s.refreshed(ConnId(1), fresh, Some("9"), Some("9"));
    let seen = texts(&mut s);
    let diff = seen.iter().find(|f| f.contains("presence_diff"));
    let diff = diff.unwrap_or_else(|| panic!("the room saw no diff: {seen:?}"));
    assert!(diff.contains(r#""tier":"gold""#), "{diff}");
    let now = metas(&s);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(
        (&now[0]["page"], &now[0]["tier"]),
        (&"/a".into(), &"gold".into())
    );
    assert!(now[0].get("role").is_none(), "{now:?}");
    assert_eq!(now[0]["phx_ref_prev"], first_ref);
    s.frame(
        ConnId(1),
        br#"["1","3","room","presence_update",{"meta":{"page":"/b"}}]"#,
    );
    texts(&mut s);
    let after = metas(&s);
    assert_eq!(
        after.len(),
        1,
        "the update replaced the made-anew presence: {after:?}"
    );
    assert_eq!(
        (&after[0]["page"], &after[0]["tier"]),
        (&"/b".into(), &"gold".into())
    );
    assert_eq!(after[0]["phx_ref_prev"], now[0]["phx_ref"]);
    // The same claims again: nothing to make anew.
    let same = Ok((UserKey::new("u1"), claims(r#"{"tier":"gold"}"#), None));
    s.refreshed(ConnId(1), same, None, None);
    let quiet = texts(&mut s);
    assert!(
        quiet.iter().all(|f| !f.contains("presence_diff")),
        "{quiet:?}"
    );
}
