//! The streaming rebuild against its oracle, the in-memory [`super::super::rebuild`], on
//! generated exports whose objects are shuffled, spread, duplicated and superseded, read in
//! batches of every size; and the bad-input contract.

use proptest::prelude::*;
use serde_json::Value;

use super::*;
use crate::export::Export;
use crate::synth::SynthExport;

const KEYS: [&str; 7] = [
    "prices",
    "coupons",
    "customers",
    "subscriptions",
    "invoices",
    "charges",
    "events",
];

/// The synthetic export's lists, as JSON values.
fn lists(customers: usize, months: u32, seed: u64) -> Vec<(&'static str, Vec<Value>)> {
    let mut bytes = Vec::new();
    SynthExport {
        customers,
        months,
        seed,
    }
    .write(&mut bytes)
    .expect("writing to a Vec cannot fail");
    let v: Value = serde_json::from_slice(&bytes).expect("synth writes JSON");
    KEYS.iter()
        .map(|k| (*k, v[*k].as_array().cloned().unwrap_or_default()))
        .collect()
}

/// Reorders, duplicates and supersedes objects, and writes the lists in a shuffled key order with
/// unknown keys between them, pretty-printed or not.
fn scramble(mut lists: Vec<(&'static str, Vec<Value>)>, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    for (key, list) in &mut lists {
        rng.shuffle(list);
        if list.is_empty() {
            continue;
        }
        for _ in 0..rng.usize(0..4) {
            // An exact copy, and an older version of another object (an earlier status, a
            // quantity or amount changed), each at a random place: the last one read wins.
            let copy = list[rng.usize(0..list.len())].clone();
            list.insert(rng.usize(0..=list.len()), copy);
            let mut older = list[rng.usize(0..list.len())].clone();
            match *key {
                "subscriptions" => older["status"] = Value::from("past_due"),
                "charges" => older["status"] = Value::from("failed"),
                "invoices" => older["created"] = Value::from(1_600_000_000),
                "customers" => older["created"] = Value::from(1_500_000_000),
                _ => older["livemode"] = Value::from(true),
            }
            list.insert(rng.usize(0..=list.len()), older);
        }
    }
    rng.shuffle(&mut lists);
    let pretty = rng.bool();
    let mut out = String::from("{");
    for (n, (key, list)) in lists.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        if rng.bool() {
            out.push_str("\"x-note\": {\"a\": [1, \"]}\"], \"b\": null},\n");
        }
        let list = Value::Array(list.clone());
        let text = if pretty {
            serde_json::to_string_pretty(&list)
        } else {
            serde_json::to_string(&list)
        }
        .expect("values serialize");
        out.push_str(&format!("\"{key}\": {text}"));
    }
    out.push_str("}\n");
    out.into_bytes()
}

fn both(json: &[u8], batch_bytes: usize, threads: usize) -> (Rebuilt, Rebuilt) {
    let simple = super::super::rebuild(&Export::from_json(json).expect("the oracle reads it"));
    let options = StreamOptions {
        batch_bytes,
        threads,
    };
    let streamed = rebuild_reader(json, &options).expect("the stream reads it");
    (streamed, simple)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn streaming_equals_the_in_memory_rebuild(
        customers in 1usize..40,
        months in 1u32..20,
        seed in any::<u64>(),
        order in any::<u64>(),
        batch_bytes in 64usize..20_000,
        threads in 1usize..4,
    ) {
        let json = scramble(lists(customers, months, seed), order);
        let (streamed, simple) = both(&json, batch_bytes, threads);
        prop_assert!(!simple.account.subscriptions.is_empty());
        prop_assert_eq!(streamed, simple);
    }
}

#[test]
fn the_sample_export_streams_to_the_same_account() {
    let json = include_bytes!("../../../../examples/data/sample-export.json");
    for batch_bytes in [64, 4096, 8 << 20] {
        let (streamed, simple) = both(json, batch_bytes, 2);
        assert_eq!(streamed, simple);
    }
}

#[test]
fn the_last_occurrence_of_an_object_wins() {
    let lists = lists(3, 6, 7);
    let subs = &lists[3].1;
    let mut older = subs[0].clone();
    older["status"] = Value::from("canceled");
    older["ended_at"] = Value::from(1_700_000_000);
    // The older version first, then every subscription as it stands.
    let mut changed = lists.clone();
    changed[3].1.insert(0, older);
    let json = scramble_in_order(&changed);
    let (streamed, simple) = both(&json, 128, 2);
    assert_eq!(streamed, simple);
    let plain = both(&scramble_in_order(&lists), 128, 2).0;
    assert_eq!(streamed.account, plain.account, "the later version wins");
}

fn scramble_in_order(lists: &[(&'static str, Vec<Value>)]) -> Vec<u8> {
    let map: serde_json::Map<String, Value> = lists
        .iter()
        .map(|(k, l)| ((*k).to_owned(), Value::Array(l.clone())))
        .collect();
    serde_json::to_vec(&map).expect("values serialize")
}

fn error(json: &str) -> String {
    let options = StreamOptions {
        batch_bytes: 64,
        threads: 2,
    };
    match rebuild_reader(json.as_bytes(), &options) {
        Ok(_) => panic!("read without error: {json}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_input_names_the_object_or_the_byte() {
    let good = r#"{"customers": [{"id": "cus_1", "created": 1}, {"id": "cus_2", "created": 2}],"#;
    // Truncated mid-list: the list and the offset.
    let e = error(&format!("{good} \"charges\": [{{\"id\": \"ch_1\""));
    assert!(e.contains("cut off") && e.contains("charges"), "{e}");
    let e = error(r#"{"customers": [{"id": "cus_1", "created": 1}"#);
    assert!(e.contains("cut off at byte"), "{e}");
    // An object missing a required field mid-file: its kind and id.
    let e = error(&format!(
        "{good} \"charges\": [{{\"id\": \"ch_9\", \"currency\": \"usd\"}}]}}"
    ));
    assert!(e.contains("charge ch_9") && e.contains("amount"), "{e}");
    // No id: the byte offset.
    let e = error(r#"{"customers": [{"id": "cus_1", "created": 1}, {"created": 2}]}"#);
    assert!(e.contains("customer (no id, at byte 46)"), "{e}");
    // Invalid JSON inside an object, between objects, after the export, in another key.
    let e = error(r#"{"customers": [{"id": "cus_1", "created": 1,}]}"#);
    assert!(
        e.contains("customer cus_1") || e.contains("customer (no id"),
        "{e}"
    );
    let e = error(r#"{"customers": [{"id": "cus_1", "created": 1} {"id": "cus_2"}]}"#);
    assert!(
        e.contains("expected ',' or ']'") && e.contains("byte 45"),
        "{e}"
    );
    let e = error(r#"{"customers": []} x"#);
    assert!(e.contains("trailing"), "{e}");
    let e = error(r#"{"note": [1, 2,], "customers": []}"#);
    assert!(e.contains("not an export") && e.contains("byte 9"), "{e}");
    let e = error(r#"{"customers": {"id": "cus_1"}}"#);
    assert!(e.contains("\"customers\" is not a list"), "{e}");
    let e = error(r#"{"customers": [], "customers": []}"#);
    assert!(e.contains("duplicate field `customers`"), "{e}");
    let e = error("[1, 2]");
    assert!(e.contains("expected a JSON object"), "{e}");
    let e = error("");
    assert!(e.contains("cut off at byte 0"), "{e}");
}

#[test]
fn an_object_larger_than_a_batch_grows_the_batch() {
    let name = "n".repeat(10_000);
    let json = format!(
        r#"{{"customers": [{{"id": "cus_1", "created": 1, "name": "{name}"}}, {{"id": "cus_2", "created": 2}}]}}"#
    );
    let (streamed, simple) = both(json.as_bytes(), 64, 2);
    assert_eq!(streamed, simple);
    assert_eq!(streamed.account.customers.len(), 2);
}

#[test]
fn strings_with_brackets_quotes_and_escapes_do_not_confuse_the_splitter() {
    let json = r#"{"customers": [{"id": "cus_\"}]1", "created": 1, "metadata": {"k": "\\", "{": "[[["}},
                   {"id": "cus_2", "created": 2, "metadata": {"x": "}}}\\\"]"}}]}"#;
    for batch_bytes in [64, 65, 100, 4096] {
        let (streamed, simple) = both(json.as_bytes(), batch_bytes, 1);
        assert_eq!(streamed, simple);
        assert_eq!(streamed.account.customers[0].id, "cus_\"}]1");
    }
}

#[tokio::test]
async fn a_cache_read_page_by_page_rebuilds_the_same_account() {
    use revpilot_core::ports::{ObjectCache, UserId};
    use revpilot_core::testing::MemoryStore;

    let now = chrono::Utc::now();
    let (store, user, conn) = MemoryStore::with_connection("acct_pages", now).await;
    let json = scramble(lists(30, 14, 3), 11);
    let raw: crate::export::RawExport = serde_json::from_slice(&json).expect("an export");
    let cached = raw.cached(now).expect("ids");
    store.upsert_objects(conn, &cached).await.expect("cached");
    // The oracle: every stored object at once, as the server read them before.
    let mut stored = Vec::new();
    for kind in revpilot_core::ports::ObjectKind::ALL {
        stored.extend(store.objects(user, conn, kind).await.expect("read"));
    }
    let oracle = super::super::rebuild(&Export::from_cached(&stored).expect("readable"));
    for page in [1, 7, CACHE_PAGE] {
        let paged = rebuild_cached(&store, user, conn, page)
            .await
            .expect("rebuilt");
        assert_eq!(paged, oracle, "pages of {page}");
    }
    assert!(!oracle.account.subscriptions.is_empty());
    // Another user's connection reads as empty; an unreadable object names itself.
    let stranger = rebuild_cached(&store, UserId(uuid::Uuid::new_v4()), conn, 7).await;
    assert!(stranger.expect("empty").account.customers.is_empty());
    let bad = revpilot_core::ports::CachedObject {
        kind: revpilot_core::ports::ObjectKind::Charge,
        stripe_id: "ch_bad".into(),
        version: now,
        data: r#"{"id": "ch_bad", "currency": "usd"}"#.into(),
        customer: None,
    };
    store.upsert_objects(conn, &[bad]).await.expect("cached");
    let e = rebuild_cached(&store, user, conn, 7)
        .await
        .expect_err("unreadable");
    assert!(e.to_string().contains("charge ch_bad"), "{e}");
}

#[test]
fn every_object_is_visited_once_in_input_order() {
    let json = scramble(lists(12, 8, 5), 3);
    let export: Value = serde_json::from_slice(&json).expect("JSON");
    let mut seen: Vec<(String, Value)> = Vec::new();
    for_each_object(&json[..], |kind, bytes| {
        seen.push((
            kind.to_owned(),
            serde_json::from_slice(bytes).expect("an object"),
        ));
        Ok(())
    })
    .expect("read");
    let expected: usize = KEYS
        .iter()
        .map(|k| export[*k].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(seen.len(), expected);
    let invoices: Vec<&Value> = seen
        .iter()
        .filter(|(k, _)| k == "invoice")
        .map(|(_, v)| v)
        .collect();
    let listed: Vec<&Value> = export["invoices"]
        .as_array()
        .expect("invoices")
        .iter()
        .collect();
    assert_eq!(invoices, listed);
    let e = for_each_object(&br#"{"customers": [{"id": 1}"#[..], |_, _| Ok(()));
    assert!(matches!(e, Err(ExportError::Truncated { .. })), "{e:?}");
}

#[test]
fn the_export_time_dates_the_data_in_both_paths() {
    let lists = lists(3, 6, 11);
    let mut map: serde_json::Map<String, Value> = lists
        .iter()
        .map(|(k, l)| ((*k).to_owned(), Value::Array(l.clone())))
        .collect();
    let plain = both(&serde_json::to_vec(&map).unwrap(), 128, 2).0;
    let newest = plain.as_of.expect("objects carry instants");
    let made = newest.timestamp() + 86_400;
    // Before the lists and after them: the stamp is found wherever it is.
    for first in [true, false] {
        let mut stamped = serde_json::Map::new();
        if first {
            stamped.insert("exported_at".into(), made.into());
        }
        stamped.extend(map.clone());
        if !first {
            stamped.insert("exported_at".into(), made.into());
        }
        let (streamed, simple) = both(&serde_json::to_vec(&stamped).unwrap(), 64, 2);
        assert_eq!(streamed, simple);
        assert_eq!(streamed.as_of.map(|t| t.timestamp()), Some(made));
        assert_eq!(streamed.account, plain.account);
    }
    map.insert("exported_at".into(), "yesterday".into());
    let e = error(&serde_json::to_string(&map).unwrap());
    assert!(e.contains("\"exported_at\" is not unix seconds"), "{e}");
}

/// A reader whose device fails.
struct Failing;

impl std::io::Read for Failing {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "the device went away",
        ))
    }
}

#[test]
fn errors_keep_their_sources() {
    let options = StreamOptions {
        batch_bytes: 64,
        threads: 2,
    };
    // The reader's error, after part of the export was read.
    let reader = std::io::Read::chain(&br#"{"customers": ["#[..], Failing);
    let Err(e) = rebuild_reader(reader, &options) else {
        panic!("a failing reader is an error");
    };
    assert!(matches!(e, ExportError::Read(_)), "{e:?}");
    assert_eq!(e.to_string(), "reading the export: the device went away");
    let source = std::error::Error::source(&e).expect("the reader's error is the source");
    let io = source
        .downcast_ref::<std::io::Error>()
        .expect("an io::Error");
    assert_eq!(io.kind(), std::io::ErrorKind::ConnectionReset);
    // The JSON parser's error, with where it happened.
    let Err(e) = rebuild_reader(&br#"{"note": [1, 2,], "customers": []}"#[..], &options) else {
        panic!("invalid JSON is an error");
    };
    assert!(
        matches!(
            e,
            ExportError::Json {
                offset: Some(9),
                what: None,
                ..
            }
        ),
        "{e:?}"
    );
    let source = std::error::Error::source(&e).expect("the parser's error is the source");
    assert!(
        source.downcast_ref::<serde_json::Error>().is_some(),
        "{source:?}"
    );
}
