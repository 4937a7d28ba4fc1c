-- Derived accounts: a connection's rebuilt account by customer, written under a generation and
-- published by the stamp row, so a half-written derivation is never read.
CREATE TABLE derived_accounts (
    stripe_connection_id UUID PRIMARY KEY REFERENCES stripe_connections (id) ON DELETE CASCADE,
    generation           UUID NOT NULL,
    version              INTEGER NOT NULL,
    synced_at            TIMESTAMPTZ,
    as_of                TIMESTAMPTZ,
    published_at         TIMESTAMPTZ NOT NULL
);
CREATE TABLE derived_customers (
    stripe_connection_id UUID NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    generation           UUID NOT NULL,
    key                  TEXT NOT NULL,
    data                 TEXT NOT NULL,
    PRIMARY KEY (stripe_connection_id, generation, key)
);
