use super::*;
use proptest::prelude::*;

/// Frames the real phoenix.js 1.8.16 client sent over a socket (recorded with a `ws` server in
/// Node): join with meta and non-ASCII text, update, custom event, watch list, heartbeat, leave.
const CAPTURED: &[&str] = &[
    r#"["3","3","room:lobby","phx_join",{"meta":{"page":"/home","ü":"é\n"},"presence":"full"}]"#,
    r#"["3","4","room:lobby","presence_update",{"meta":{"page":"/about"}}]"#,
    r#"["3","5","room:lobby","custom_event",{"a":1}]"#,
    r#"["8","8","watch:friends","phx_join",{"users":["alice","bob"]}]"#,
    r#"["8","9","watch:friends","watch_add",{"users":["carol"]}]"#,
    r#"["8","10","watch:friends","watch_remove",{"users":["bob"]}]"#,
    r#"[null,"11","phoenix","heartbeat",{}]"#,
    r#"["3","12","room:lobby","phx_leave",{}]"#,
];

fn ok(s: &str) -> ClientMessage<'_> {
    decode(s.as_bytes()).unwrap_or_else(|e| panic!("{s}: {e}"))
}

#[test]
fn captured_phoenix_js_frames_decode() {
    let join = ok(CAPTURED[0]);
    assert_eq!(join.join_ref.as_deref(), Some("3"));
    assert_eq!(join.msg_ref.as_deref(), Some("3"));
    assert_eq!(join.topic, "room:lobby");
    let ClientEvent::Join(j) = join.event else {
        panic!("{:?}", join.event)
    };
    assert!(j.track);
    assert_eq!(j.presence, PresenceMode::Full);
    assert_eq!(j.meta.len(), r#"{"page":"/home","ü":"é\n"}"#.len());
    assert!(j.users.is_none());

    assert!(matches!(ok(CAPTURED[1]).event, ClientEvent::PresenceUpdate(m) if !m.is_empty()));
    assert_eq!(
        ok(CAPTURED[2]).event,
        ClientEvent::Unknown("custom_event".into())
    );
    let ClientEvent::Join(w) = ok(CAPTURED[3]).event else {
        panic!()
    };
    assert_eq!(w.users, Some(vec!["alice".into(), "bob".into()]));
    assert_eq!(
        ok(CAPTURED[4]).event,
        ClientEvent::WatchAdd(vec!["carol".into()])
    );
    assert_eq!(
        ok(CAPTURED[5]).event,
        ClientEvent::WatchRemove(vec!["bob".into()])
    );
    let hb = ok(CAPTURED[6]);
    assert_eq!(
        (hb.join_ref, hb.topic.as_ref(), hb.event),
        (None, "phoenix", ClientEvent::Heartbeat)
    );
    assert_eq!(ok(CAPTURED[7]).event, ClientEvent::Leave);
}

#[test]
fn join_defaults_and_modes() {
    let ClientEvent::Join(j) = ok(r#"["1","1","t","phx_join",{}]"#).event else {
        panic!()
    };
    assert_eq!(
        (j.track, j.presence, j.meta.is_empty()),
        (true, PresenceMode::Full, true)
    );
    let ClientEvent::Join(j) =
        ok(r#"["1","1","t","phx_join",{"track":false,"presence":"count","meta":null}]"#).event
    else {
        panic!()
    };
    assert_eq!((j.track, j.presence), (false, PresenceMode::Count));
    let ClientEvent::Join(j) = ok(r#"["1","1","t","phx_join",{"presence":"none"}]"#).event else {
        panic!()
    };
    assert_eq!(j.presence, PresenceMode::None);
}

#[test]
fn escaped_strings_are_owned_and_unescaped() {
    let m = ok(r#"["a\"b",null,"room:\u00e9","phx_leave",{}]"#);
    assert_eq!(m.join_ref.as_deref(), Some("a\"b"));
    assert_eq!(m.topic, "room:é");
}

#[test]
fn bad_payloads_are_answerable() {
    let cases = [
        (
            r#"["1","2","t","phx_join",{"meta":[1]}]"#,
            PayloadError::MetaNotObject,
        ),
        (
            r#"["1","2","t","phx_join",{"meta":"x"}]"#,
            PayloadError::MetaNotObject,
        ),
        (
            r#"["1","2","t","phx_join",{"track":"yes"}]"#,
            PayloadError::TrackNotBool,
        ),
        (
            r#"["1","2","t","phx_join",{"presence":"all"}]"#,
            PayloadError::BadPresenceMode,
        ),
        (
            r#"["1","2","t","phx_join",{"users":[1]}]"#,
            PayloadError::UsersNotStrings,
        ),
        (
            r#"["1","2","t","presence_update",{}]"#,
            PayloadError::MetaNotObject,
        ),
        (
            r#"["1","2","t","presence_update",{"meta":5}]"#,
            PayloadError::MetaNotObject,
        ),
        (
            r#"["1","2","t","watch_add",{}]"#,
            PayloadError::MissingUsers,
        ),
        (
            r#"["1","2","t","watch_remove",{"users":"a"}]"#,
            PayloadError::UsersNotStrings,
        ),
    ];
    for (frame, want) in cases {
        let m = ok(frame);
        assert_eq!(m.msg_ref.as_deref(), Some("2"), "{frame}");
        assert_eq!(m.event, ClientEvent::Invalid(want), "{frame}");
    }
}

#[test]
fn non_v2_frames_are_typed_errors() {
    let cases: &[(&[u8], FrameError)] = &[
        (b"", FrameError::NotJson),
        (b"hello", FrameError::NotJson),
        (b"[1,2", FrameError::NotJson),
        (b"\xff\xfe", FrameError::NotJson),
        (b"{}", FrameError::NotFiveElementArray),
        (b"[]", FrameError::NotFiveElementArray),
        (br#"[null,null,"t","e"]"#, FrameError::NotFiveElementArray),
        (
            br#"[null,null,"t","e",{},1]"#,
            FrameError::NotFiveElementArray,
        ),
        (br#"[1,null,"t","e",{}]"#, FrameError::BadRef),
        (br#"[null,[],"t","e",{}]"#, FrameError::BadRef),
        (br#"[null,null,3,"e",{}]"#, FrameError::BadTopic),
        (br#"[null,null,"t",null,{}]"#, FrameError::BadEvent),
        (br#"[null,null,"t","e",[]]"#, FrameError::PayloadNotObject),
        (br#"[null,null,"t","e",null]"#, FrameError::PayloadNotObject),
        (br#"[null,null,"t","e",{}] x"#, FrameError::NotJson),
    ];
    for (frame, want) in cases {
        assert_eq!(
            decode(frame).as_ref().err(),
            Some(want),
            "{}",
            String::from_utf8_lossy(frame)
        );
    }
}

fn exercise(bytes: &[u8]) {
    // Whatever comes out, using it must not panic either.
    match decode(bytes) {
        Ok(m) => {
            if let ClientEvent::Join(j) = &m.event {
                let mut out = Vec::new();
                j.meta.encode(&mut out, None, crate::PhxRef(1), None);
                serde_json::from_slice::<serde_json::Value>(&out).expect("stored meta is JSON");
            }
            if let ClientEvent::PresenceUpdate(meta) = &m.event {
                let mut out = Vec::new();
                meta.encode(&mut out, None, crate::PhxRef(2), Some(crate::PhxRef(1)));
                serde_json::from_slice::<serde_json::Value>(&out).expect("stored meta is JSON");
            }
        }
        Err(e) => assert!(e.reason().len() < 123),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        exercise(&bytes);
    }

    #[test]
    fn mutated_frames_never_panic(
        which in 0..CAPTURED.len(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..8),
    ) {
        let mut bytes = CAPTURED[which].as_bytes().to_vec();
        for (at, byte, op) in edits {
            if bytes.is_empty() { break; }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = byte,
                1 => { bytes.insert(i, byte); }
                _ => { bytes.truncate(i); }
            }
        }
        exercise(&bytes);
    }

    #[test]
    fn structured_frames_decode_or_error(
        jr in proptest::option::of("[a-z0-9\"\\\\]{0,4}"),
        topic in "\\PC{0,12}",
        event in prop::sample::select(vec!["phx_join", "phx_leave", "heartbeat", "presence_update", "watch_add", "x"]),
        payload in prop::sample::select(vec![
            "{}", "{\"meta\":{\"a\":1}}", "{\"meta\":1}", "{\"users\":[\"a\"]}", "{\"track\":false}",
            "{\"presence\":\"count\"}", "{\"meta\":{\"phx_ref\":\"x\"}}", "{\"users\":[1,2]}",
        ]),
    ) {
        let frame = serde_json::json!([jr, "1", topic, event, serde_json::from_str::<serde_json::Value>(payload).unwrap()]);
        let bytes = serde_json::to_vec(&frame).unwrap();
        let m = decode(&bytes).expect("well-formed V2 frame");
        prop_assert_eq!(m.join_ref.as_deref(), jr.as_deref());
        prop_assert_eq!(m.topic.as_ref(), topic.as_str());
        exercise(&bytes);
    }
}
