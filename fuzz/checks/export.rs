//! The export reader and the history rebuild: arbitrary bytes to `Export::from_json`, then
//! `rebuild` on whatever parses, and to the streaming rebuild, read in tiny batches so objects
//! cross buffer boundaries. Errors are fine, panics are not; whatever the in-memory reader
//! accepts, the streaming one rebuilds to exactly the same account and issues.

use revpilot_stripe::export::Export;
use revpilot_stripe::rebuild::rebuild;
use revpilot_stripe::rebuild::stream::{StreamOptions, rebuild_reader};

/// One input, as the `export` target and the regression replay run it.
pub(crate) fn run(data: &[u8]) {
    let options = StreamOptions {
        batch_bytes: 64,
        threads: 2,
    };
    let streamed = rebuild_reader(data, &options);
    if let Ok(export) = Export::from_json(data) {
        let simple = rebuild(&export);
        match streamed {
            Ok(streamed) => assert!(
                streamed == simple,
                "the streaming rebuild differs from the in-memory one"
            ),
            Err(e) => panic!("the in-memory reader accepts what the stream refuses: {e}"),
        }
    }
}
