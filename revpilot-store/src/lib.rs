//! Storage adapter for RevPilot: SQLite (embedded default) and PostgreSQL behind `revpilot-core`'s
//! storage ports; it is filled by the store issue.
