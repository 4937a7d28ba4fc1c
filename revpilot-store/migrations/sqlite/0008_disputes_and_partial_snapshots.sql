-- Cached disputes: a lost dispute takes a charge's money back (cash, `total_revenue`).
CREATE TABLE disputes_cache (
    stripe_connection_id TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              INTEGER NOT NULL,
    data                 TEXT NOT NULL,
    PRIMARY KEY (stripe_connection_id, stripe_id)
) STRICT, WITHOUT ROWID;

-- A snapshot taken before its day was over (the data's as-of instant inside it) says so.
ALTER TABLE metrics_snapshots ADD COLUMN partial INTEGER NOT NULL DEFAULT 0;
