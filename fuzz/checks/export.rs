//! The export reader and the history rebuild: arbitrary bytes to `Export::from_json`, then
//! `rebuild` on whatever parses. Errors are fine, panics are not.

use revpilot_stripe::export::Export;
use revpilot_stripe::rebuild::rebuild;

/// One input, as the `export` target and the regression replay run it.
pub(crate) fn run(data: &[u8]) {
    if let Ok(export) = Export::from_json(data) {
        let _ = rebuild(&export);
    }
}
