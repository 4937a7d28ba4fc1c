//! The storage conformance suite against the in-memory reference implementation.

use revpilot_core::testing::{MemoryStore, conformance};

#[tokio::test]
async fn memory_store_passes_the_conformance_suite() {
    conformance::run_all(|| async { MemoryStore::new() }).await;
}
