//! Deterministic synthetic accounts.
