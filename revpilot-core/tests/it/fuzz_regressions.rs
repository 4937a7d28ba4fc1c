//! Every input kept in `fuzz/regressions/{server_params,catalog,fx}/` (crashes the fuzzer found,
//! and hand-written edge cases) replayed through the very function its fuzz target calls
//! (`fuzz/checks/*.rs`, included here): errors are fine, panics are not.

use std::path::{Path, PathBuf};

#[path = "../../../fuzz/checks/catalog.rs"]
mod catalog;
#[path = "../../../fuzz/checks/fx.rs"]
mod fx;
#[path = "../../../fuzz/checks/server_params.rs"]
mod server_params;

/// Runs `check` on every input saved for `target`, naming each first (a panic then says which).
fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no inputs in {}", dir.display());
    for path in paths {
        eprintln!("{target}/{}", path.display());
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        check(&data);
    }
}

#[test]
fn server_param_inputs_replay() {
    replay("server_params", server_params::run);
}

#[test]
fn catalog_inputs_replay() {
    replay("catalog", catalog::run);
}

#[test]
fn fx_inputs_replay() {
    replay("fx", fx::run);
}
