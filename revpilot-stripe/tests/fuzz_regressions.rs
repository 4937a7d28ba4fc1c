//! Every input kept in `fuzz/regressions/{export,stripe_objects,webhook}/` (crashes the fuzzer
//! found, and hand-written edge cases) replayed through the very function its fuzz target calls
//! (`fuzz/checks/*.rs`, included here): errors are fine, panics and broken oracles are not.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

#[path = "../../fuzz/checks/export.rs"]
mod export;
#[path = "../../fuzz/checks/stripe_objects.rs"]
mod stripe_objects;
#[path = "../../fuzz/checks/webhook.rs"]
mod webhook;

/// The inputs saved for `target`, by file name.
fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no inputs in {}", dir.display());
    paths
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

#[test]
fn export_inputs_replay() {
    for (name, data) in inputs("export") {
        eprintln!("export/{name}");
        export::run(&data);
    }
}

#[test]
fn stripe_object_inputs_replay() {
    for (name, data) in inputs("stripe_objects") {
        eprintln!("stripe_objects/{name}");
        stripe_objects::run(&data);
    }
}

#[test]
fn webhook_inputs_replay_and_only_the_truly_signed_one_is_accepted() {
    let accepted: Vec<String> = inputs("webhook")
        .into_iter()
        .filter(|(name, data)| {
            eprintln!("webhook/{name}");
            webhook::run(data)
        })
        .map(|(name, _)| name)
        .collect();
    // `upper-case-v1.txt` is the same request with one hex digit of the signature in upper
    // case: the right bytes, but not as Stripe writes them, so refused.
    assert_eq!(accepted, ["signed-webhook.txt"]);
}
