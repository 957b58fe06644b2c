//! Presence metas. A client's meta arrives as a JSON object; roster stores it encoded, with the
//! server's fields (`phx_ref`, `phx_ref_prev`) already in it, so that every later frame copies the
//! bytes instead of building a JSON tree.

use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::decode::{CowStr, PayloadError};

/// Fields the server owns; a client's values for them are dropped so they cannot spoof refs.
const RESERVED: [&str; 2] = ["phx_ref", "phx_ref_prev"];

/// A meta object as the client sent it, validated to be a JSON object, not yet copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientMeta<'a> {
    raw: Option<&'a str>,
}

impl<'a> ClientMeta<'a> {
    pub(crate) fn empty() -> Self {
        ClientMeta { raw: None }
    }

    /// The meta is copied verbatim into every frame that shows it, so it must be JSON that any
    /// standard decoder takes: serde_json's raw values only check its syntax, so a lone
    /// surrogate escape (`"\ud800"`) or a number no f64 holds (`1e400`) would get through and make
    /// strict clients drop whole frames.
    pub(crate) fn parse(raw: &'a RawValue) -> Result<Self, PayloadError> {
        let text = raw.get();
        if !text.starts_with('{') {
            return Err(PayloadError::MetaNotObject);
        }
        if may_be_refused(text) {
            serde_json::from_str::<Strict>(text).map_err(|_| PayloadError::MetaInvalid)?;
        }
        Ok(ClientMeta { raw: Some(text) })
    }

    /// Parses a meta object from text (for server-side metas such as token claims).
    pub fn from_json(text: &'a str) -> Result<Self, PayloadError> {
        let raw: &RawValue = serde_json::from_str(text).map_err(|_| PayloadError::Malformed)?;
        Self::parse(raw)
    }

    /// Size of the meta as the client sent it; this is what `max_meta_bytes` limits.
    pub fn len(&self) -> usize {
        self.raw.map_or(0, str::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Encodes the stored form of this meta: the client's fields (minus reserved ones, and minus
    /// any field `forced` also has), then `forced`'s fields, then, after an update,
    /// `phx_ref_prev`, and always last `phx_ref`. `phx_ref` is last so that it sits at a fixed
    /// offset from the end ([`stored_phx_ref`]): the tables need not keep it a second time.
    pub fn encode(
        &self,
        out: &mut Vec<u8>,
        forced: Option<ClientMeta<'_>>,
        phx_ref: PhxRef,
        prev: Option<PhxRef>,
    ) {
        self.encode_dropping(out, None, forced, phx_ref, prev)
    }

    /// [`ClientMeta::encode`], without the fields `drop` names either.
    fn encode_dropping(
        &self,
        out: &mut Vec<u8>,
        drop: Option<ClientMeta<'_>>,
        forced: Option<ClientMeta<'_>>,
        phx_ref: PhxRef,
        prev: Option<PhxRef>,
    ) {
        out.push(b'{');
        let mut first = true;
        let mut skip = forced.map(|f| f.keys()).unwrap_or_default();
        skip.extend(drop.map(|d| d.keys()).unwrap_or_default());
        self.write_fields(out, &mut first, &skip);
        if let Some(forced) = forced {
            forced.write_fields(out, &mut first, &[]);
        }
        if !first {
            out.push(b',');
        }
        if let Some(prev) = prev {
            out.extend_from_slice(b"\"phx_ref_prev\":\"");
            out.extend_from_slice(&prev.text());
            out.extend_from_slice(b"\",");
        }
        out.extend_from_slice(b"\"phx_ref\":\"");
        out.extend_from_slice(&phx_ref.text());
        out.extend_from_slice(b"\"}");
    }

    fn keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        self.each_field(|k, _| keys.push(k.to_owned()));
        keys
    }

    fn write_fields(&self, out: &mut Vec<u8>, first: &mut bool, skip: &[String]) {
        self.each_field(|k, v| {
            if RESERVED.contains(&k) || skip.iter().any(|s| s == k) {
                return;
            }
            if !*first {
                out.push(b',');
            }
            *first = false;
            write_json_str(out, k);
            out.push(b':');
            out.extend_from_slice(v.as_bytes());
        });
    }

    fn each_field(&self, mut f: impl FnMut(&str, &str)) {
        let Some(raw) = self.raw else { return };
        struct Fields<'f, F>(&'f mut F);
        impl<'de, F: FnMut(&str, &str)> Visitor<'de> for Fields<'_, F> {
            type Value = ();
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
                while let Some(k) = map.next_key::<CowStr<'de>>()? {
                    let v: &'de RawValue = map.next_value()?;
                    (self.0)(&k.0, v.get());
                }
                Ok(())
            }
        }
        let mut de = serde_json::Deserializer::from_str(raw);
        // `raw` was decoded strictly by `parse` (every key unescaped), so this cannot fail.
        let _ = de::Deserializer::deserialize_map(&mut de, Fields(&mut f));
    }
}

/// Whether syntactically valid JSON `text` may still be refused by a strict decoder, so that
/// most metas skip the second pass. Without a backslash every string is the UTF-8 it is written
/// in (no escape can make a lone surrogate); without an exponent and without a run of 300 or more
/// digits every number is below 10^300, well inside f64. False positives ("e" after a digit in a
/// string) only cost the strict pass.
fn may_be_refused(text: &str) -> bool {
    let mut digits = 0usize;
    for b in text.bytes() {
        match b {
            b'\\' => return true,
            b'0'..=b'9' => {
                digits += 1;
                if digits >= 300 {
                    return true;
                }
            }
            b'e' | b'E' if digits > 0 => return true,
            _ => digits = 0,
        }
    }
    false
}

/// Any JSON value, decoded the way a strict decoder would (every string unescaped, every number
/// read as a finite number) and then thrown away: only the verdict is kept.
struct Strict;

impl<'de> de::Deserialize<'de> for Strict {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Strict)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Strict;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Strict, E> {
        if v.is_finite() {
            Ok(Strict)
        } else {
            Err(E::custom("number out of range"))
        }
    }

    fn visit_str<E>(self, _: &str) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        while seq.next_element::<Strict>()?.is_some() {}
        Ok(Strict)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        while map.next_key::<Strict>()?.is_some() {
            map.next_value::<Strict>()?;
        }
        Ok(Strict)
    }
}

/// Identifies one tracked presence (one meta of one key in one topic). Unique within a process
/// run: the shard that tracks it puts its own id in the high bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PhxRef(pub u64);

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The text of the `phx_ref` of a meta made by [`ClientMeta::encode`] (its last 11 characters but
/// the closing `"}`), without parsing.
pub fn stored_phx_ref(stored: &[u8]) -> Option<&[u8]> {
    let end = stored.len().checked_sub(2)?;
    stored.get(end.checked_sub(PhxRef::TEXT_LEN)?..end)
}

const REF_TAIL: usize = b"\"phx_ref\":\"".len() + PhxRef::TEXT_LEN + 2;
const PREV_FIELD: &[u8] = b"\"phx_ref_prev\":\"";
const PREV_LEN: usize = PREV_FIELD.len() + PhxRef::TEXT_LEN + 2;

/// The client's part of a stored meta: everything before the server's fields, so two metas can be
/// compared for "the same meta" whatever their refs (leave-grace takeover).
pub fn stored_body(stored: &[u8]) -> &[u8] {
    let Some(end) = stored.len().checked_sub(REF_TAIL) else {
        return stored;
    };
    match end.checked_sub(PREV_LEN) {
        Some(at) if stored[at..].starts_with(PREV_FIELD) => &stored[..at],
        _ => &stored[..end],
    }
}

/// A stored meta with its server fields rewritten: same client fields, `phx_ref_prev` = `prev`,
/// `phx_ref` as it was (the presence keeps its identity, the diff shows what it replaced).
pub fn restamp_prev(stored: &[u8], prev: PhxRef, out: &mut Vec<u8>) {
    let body = stored_body(stored);
    let tail = &stored[stored.len().saturating_sub(REF_TAIL)..];
    out.extend_from_slice(body);
    out.extend_from_slice(PREV_FIELD);
    out.extend_from_slice(&prev.text());
    out.extend_from_slice(b"\",");
    out.extend_from_slice(tail);
}

/// A stored meta with the same client fields under another `phx_ref`, and no `phx_ref_prev`:
/// the same presence made anew (a second connection that took over the same presence).
pub fn restamp_ref(stored: &[u8], r: PhxRef, out: &mut Vec<u8>) {
    out.extend_from_slice(stored_body(stored));
    out.extend_from_slice(b"\"phx_ref\":\"");
    out.extend_from_slice(&r.text());
    out.extend_from_slice(b"\"}");
}

/// A stored meta made anew with other forced fields (a token refreshed with other meta claims):
/// the fields `was` names are dropped (the meta was made with `was` forced, so none of them is
/// the client's), then `forced`'s are put in, under a new `phx_ref` that replaced `prev`.
pub fn reforce(
    stored: &[u8],
    was: Option<ClientMeta<'_>>,
    forced: Option<ClientMeta<'_>>,
    (phx_ref, prev): (PhxRef, PhxRef),
    out: &mut Vec<u8>,
) -> Result<(), PayloadError> {
    let body = std::str::from_utf8(stored_body(stored)).map_err(|_| PayloadError::MetaInvalid)?;
    let client = format!("{}}}", body.strip_suffix(',').unwrap_or(body));
    let client = ClientMeta::from_json(&client)?;
    client.encode_dropping(out, was, forced, phx_ref, Some(prev));
    Ok(())
}

/// A stored meta with `"topic"` added as its last field (watch lists say where a user is). Last,
/// so that a client field of the same name cannot hide it.
pub(crate) fn write_with_topic(stored: &[u8], topic: &str, out: &mut Vec<u8>) {
    let open = stored.len().saturating_sub(1);
    out.extend_from_slice(&stored[..open]);
    out.extend_from_slice(b",\"topic\":");
    write_json_str(out, topic);
    out.push(b'}');
}

impl PhxRef {
    pub const TEXT_LEN: usize = 11;

    /// Text form: 11 base64url characters, most significant first.
    pub fn text(self) -> [u8; PhxRef::TEXT_LEN] {
        let mut t = [0u8; PhxRef::TEXT_LEN];
        for (i, c) in t.iter_mut().enumerate() {
            *c = ALPHABET[((self.0 >> ((10 - i) * 6)) & 63) as usize];
        }
        t
    }

    /// The inverse of [`PhxRef::text`] (the tests show no two refs share a text).
    pub fn parse(text: &str) -> Option<PhxRef> {
        if text.len() != 11 {
            return None;
        }
        let mut v: u64 = 0;
        for (i, c) in text.bytes().enumerate() {
            let d = ALPHABET.iter().position(|&a| a == c)? as u64;
            // The first character only holds the top 4 bits of 64.
            if i == 0 && d > 15 {
                return None;
            }
            v = (v << 6) | d;
        }
        Some(PhxRef(v))
    }
}

impl fmt::Display for PhxRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(&self.text()).map_err(|_| fmt::Error)?)
    }
}

/// Writes `s` as a JSON string literal. serde_json's escaper, without building a `Value`.
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(meta: &str, forced: Option<&str>, r: u64, prev: Option<u64>) -> String {
        let m = ClientMeta::from_json(meta).unwrap();
        let f = forced.map(|f| ClientMeta::from_json(f).unwrap());
        let mut out = Vec::new();
        m.encode(&mut out, f, PhxRef(r), prev.map(PhxRef));
        String::from_utf8(out).unwrap()
    }

    fn reforced(stored: &str, was: Option<&str>, forced: Option<&str>) -> serde_json::Value {
        fn meta(m: Option<&str>) -> Option<ClientMeta<'_>> {
            m.map(|m| ClientMeta::from_json(m).unwrap())
        }
        let mut out = Vec::new();
        let refs = (PhxRef(9), PhxRef(5));
        reforce(stored.as_bytes(), meta(was), meta(forced), refs, &mut out).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn reforce_swaps_the_forced_fields_and_keeps_the_clients() {
        // Made with {"role":"a"} forced over a client that also said "role".
        let stored = encoded(
            r#"{"page":"/a","role":"mine"}"#,
            Some(r#"{"role":"a"}"#),
            5,
            None,
        );
        let v = reforced(&stored, Some(r#"{"role":"a"}"#), Some(r#"{"tier":"gold"}"#));
        assert_eq!(v["page"], "/a");
        assert!(
            v.get("role").is_none(),
            "an old claim is not the client's: {v}"
        );
        assert_eq!(v["tier"], "gold");
        assert_eq!(v["phx_ref"], PhxRef(9).to_string());
        assert_eq!(v["phx_ref_prev"], PhxRef(5).to_string());
        // No claims before, one now; a meta with a prev ref; an empty meta.
        let stored = encoded(r#"{"page":"/b"}"#, None, 5, Some(3));
        let v = reforced(&stored, None, Some(r#"{"role":"b"}"#));
        assert_eq!((&v["page"], &v["role"]), (&"/b".into(), &"b".into()));
        assert_eq!(v["phx_ref_prev"], PhxRef(5).to_string());
        let v = reforced(&encoded("{}", None, 5, None), None, None);
        assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
    }

    #[test]
    fn phx_ref_round_trips() {
        for v in [0, 1, 63, 64, u64::MAX, 0x0123_4567_89ab_cdef] {
            let s = PhxRef(v).to_string();
            assert_eq!(s.len(), 11);
            assert_eq!(PhxRef::parse(&s), Some(PhxRef(v)), "{s}");
        }
        assert_eq!(PhxRef::parse("/AAAAAAAAAA"), None);
        assert_eq!(PhxRef::parse("zAAAAAAAAAA"), None);
        assert_eq!(PhxRef::parse("AAAA"), None);
    }

    #[test]
    fn encode_adds_refs_after_client_fields() {
        let s = encoded(r#"{"page": "/a", "n": [1, {"x":2}]}"#, None, 1, None);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["page"], "/a");
        assert_eq!(v["n"][1]["x"], 2);
        assert_eq!(v["phx_ref"], PhxRef(1).to_string());
        assert!(v.get("phx_ref_prev").is_none());
        assert_eq!(
            stored_phx_ref(s.as_bytes()),
            Some(PhxRef(1).to_string().as_bytes())
        );
    }

    #[test]
    fn empty_meta_gets_only_refs() {
        let s = encoded("{}", None, 2, Some(1));
        assert_eq!(
            s,
            format!(
                r#"{{"phx_ref_prev":"{}","phx_ref":"{}"}}"#,
                PhxRef(1),
                PhxRef(2)
            )
        );
        assert_eq!(
            stored_phx_ref(s.as_bytes()),
            Some(PhxRef(2).to_string().as_bytes())
        );
        let mut out = Vec::new();
        ClientMeta::empty().encode(&mut out, None, PhxRef(2), None);
        assert_eq!(out, format!(r#"{{"phx_ref":"{}"}}"#, PhxRef(2)).as_bytes());
    }

    #[test]
    fn body_restamp_and_topic() {
        let plain = encoded(r#"{"a":1}"#, None, 5, None);
        let updated = encoded(r#"{"a":1}"#, None, 6, Some(5));
        assert_eq!(stored_body(plain.as_bytes()), br#"{"a":1,"#);
        assert_eq!(stored_body(updated.as_bytes()), br#"{"a":1,"#);
        assert_eq!(
            stored_body(encoded("{}", None, 5, Some(4)).as_bytes()),
            b"{"
        );
        let mut out = Vec::new();
        restamp_prev(plain.as_bytes(), PhxRef(9), &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["phx_ref_prev"], PhxRef(9).to_string());
        assert_eq!(v["phx_ref"], PhxRef(5).to_string());
        assert_eq!(stored_phx_ref(&out), Some(PhxRef(5).to_string().as_bytes()));
        out.clear();
        let own_topic = encoded(r#"{"topic":"mine"}"#, None, 5, None);
        write_with_topic(own_topic.as_bytes(), "room:\"1\"", &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["topic"], "room:\"1\"");
        assert_eq!(v["phx_ref"], PhxRef(5).to_string());
    }

    #[test]
    fn metas_strict_decoders_refuse_are_refused() {
        for bad in [
            r#"{"a":"\ud800"}"#,
            r#"{"\udc00":1,"b":2}"#,
            r#"{"a":1e400}"#,
            r#"{"a":[-1e309]}"#,
            r#"{"a":{"b":"x\udfffy"}}"#,
        ] {
            assert_eq!(
                ClientMeta::from_json(bad),
                Err(PayloadError::MetaInvalid),
                "{bad}"
            );
            // What the check stands for: serde_json itself refuses these.
            assert!(
                serde_json::from_str::<serde_json::Value>(bad).is_err(),
                "{bad}"
            );
        }
        for good in [
            r#"{"a":"\ud83d\ude00","b":1e300,"c":-0.5,"d":null,"e":[true,{}],"\u00e9":18446744073709551615}"#,
            r#"{}"#,
        ] {
            assert!(ClientMeta::from_json(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn the_fast_path_skips_only_what_cannot_be_refused() {
        for needs in [r#"{"a":"\n"}"#, r#"{"a":1e5}"#, r#"{"a":2E-3}"#] {
            assert!(may_be_refused(needs), "{needs}");
        }
        let long = format!(r#"{{"a":{}}}"#, "9".repeat(300));
        assert!(may_be_refused(&long));
        for plain in [
            r#"{"page":"/home","n":12345,"x":-0.5,"ok":true}"#,
            r#"{"e":"eee"}"#,
        ] {
            assert!(!may_be_refused(plain), "{plain}");
        }
        // 309 nines is past f64::MAX: the fast path must not let it through.
        let huge = format!(r#"{{"a":{}}}"#, "9".repeat(309));
        assert_eq!(ClientMeta::from_json(&huge), Err(PayloadError::MetaInvalid));
    }

    #[test]
    fn client_cannot_spoof_reserved_or_forced_fields() {
        let s = encoded(
            r#"{"phx_ref":"evil","phx_ref_prev":"evil","role":"admin","a\"b":1}"#,
            Some(r#"{"role":"user"}"#),
            7,
            None,
        );
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["phx_ref"], PhxRef(7).to_string());
        assert!(v.get("phx_ref_prev").is_none());
        assert_eq!(v["role"], "user");
        assert_eq!(v["a\"b"], 1);
        assert_eq!(s.matches("role").count(), 1, "{s}");
    }
}
