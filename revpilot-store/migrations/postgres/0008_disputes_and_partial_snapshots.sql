-- Cached disputes: a lost dispute takes a charge's money back (cash, `total_revenue`).
CREATE TABLE disputes_cache (
    stripe_connection_id UUID NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              TIMESTAMPTZ NOT NULL,
    data                 TEXT NOT NULL,
    PRIMARY KEY (stripe_connection_id, stripe_id)
);

-- A snapshot taken before its day was over (the data's as-of instant inside it) says so.
ALTER TABLE metrics_snapshots ADD COLUMN partial BOOLEAN NOT NULL DEFAULT FALSE;
