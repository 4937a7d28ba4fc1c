-- Derived accounts: a connection's rebuilt account by customer, written under a generation and
-- published by the stamp row, so a half-written derivation is never read.
CREATE TABLE derived_accounts (
    stripe_connection_id TEXT PRIMARY KEY REFERENCES stripe_connections (id) ON DELETE CASCADE,
    generation           TEXT NOT NULL,
    version              INTEGER NOT NULL,
    synced_at            INTEGER,
    as_of                INTEGER,
    published_at         INTEGER NOT NULL
) STRICT;
CREATE TABLE derived_customers (
    stripe_connection_id TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    generation           TEXT NOT NULL,
    key                  TEXT NOT NULL,
    data                 TEXT NOT NULL,
    PRIMARY KEY (stripe_connection_id, generation, key)
) STRICT, WITHOUT ROWID;
