-- Insights (issue #6): scenario runs are a usage meter, and generated insights are stored with
-- the figures they cite. SQLite cannot change a CHECK constraint, so usage_events is rebuilt
-- with the same rows (nothing references it).
CREATE TABLE usage_events_new (
    id                   TEXT PRIMARY KEY,
    user_id              TEXT NOT NULL REFERENCES user_profiles (user_id) ON DELETE CASCADE,
    event_type           TEXT NOT NULL CHECK (event_type IN ('ai_insight', 'transaction_volume', 'scenario')),
    stripe_connection_id TEXT REFERENCES stripe_connections (id) ON DELETE SET NULL,
    amount               INTEGER NOT NULL CHECK (amount >= 0),
    idempotency_key      TEXT NOT NULL,
    status               TEXT NOT NULL CHECK (status IN ('reserved', 'committed')),
    metadata             TEXT NOT NULL DEFAULT '{}',
    created_at           INTEGER NOT NULL,
    period_start         INTEGER,
    period_end           INTEGER,
    UNIQUE (user_id, idempotency_key)
) STRICT;
INSERT INTO usage_events_new (id, user_id, event_type, stripe_connection_id, amount, idempotency_key,
    status, metadata, created_at, period_start, period_end)
  SELECT id, user_id, event_type, stripe_connection_id, amount, idempotency_key,
    status, metadata, created_at, period_start, period_end FROM usage_events;
DROP TABLE usage_events;
ALTER TABLE usage_events_new RENAME TO usage_events;
CREATE INDEX usage_events_period ON usage_events (user_id, event_type, created_at);
CREATE INDEX usage_events_connection ON usage_events (stripe_connection_id, event_type, created_at);

CREATE TABLE insights (
    id                   TEXT PRIMARY KEY,
    generation_id        TEXT NOT NULL,
    user_id              TEXT NOT NULL REFERENCES user_profiles (user_id) ON DELETE CASCADE,
    stripe_connection_id TEXT REFERENCES stripe_connections (id) ON DELETE CASCADE,
    kind                 TEXT NOT NULL,
    title                TEXT NOT NULL,
    summary              TEXT NOT NULL,
    -- The cited figures as JSON: [{id, label, value (decimal text), unit}].
    figures              TEXT NOT NULL,
    provider             TEXT NOT NULL,
    note                 TEXT,
    created_at           INTEGER NOT NULL
) STRICT;
CREATE INDEX insights_user ON insights (user_id, stripe_connection_id, created_at);
