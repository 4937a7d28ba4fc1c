//! Unit tests of the engine on hand-built accounts.
