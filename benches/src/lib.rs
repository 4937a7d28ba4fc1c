//! Shared helpers for the benchmarks (the benches themselves are in `benches/`).
