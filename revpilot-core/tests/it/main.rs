//! Integration tests of `revpilot-core`: data-driven metric cases and property tests.

mod dsl;
mod fuzz_regressions;
mod props;
mod store;

use std::path::{Path, PathBuf};

const SEPARATOR: &str = "-- expect --";

fn case_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/cases exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "case"))
        .collect();
    files.sort();
    files
}

/// Every `tests/cases/*.case` file: the text above `-- expect --` is the input, the text below is
/// the expected rendering. `UPDATE_EXPECT=1 cargo test -p revpilot-core --test it` rewrites it.
#[test]
fn metric_cases() {
    let update = std::env::var_os("UPDATE_EXPECT").is_some();
    let files = case_files();
    assert!(
        files.len() >= 25,
        "expected the full set of metric cases, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("readable case");
        let (input, expected) = match text.split_once(SEPARATOR) {
            Some((i, e)) => (i, e.trim_start_matches('\n')),
            None => (text.as_str(), ""),
        };
        let actual = dsl::parse(input)
            .and_then(|case| dsl::run(&case))
            .unwrap_or_else(|e| format!("ERROR {e}\n"));
        if actual != expected {
            if update {
                std::fs::write(&path, format!("{}{SEPARATOR}\n{actual}", input))
                    .expect("writable case");
            } else {
                failures.push(format!(
                    "{}:\n--- expected\n{expected}--- actual\n{actual}",
                    path.display()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) differ (UPDATE_EXPECT=1 to bless):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
