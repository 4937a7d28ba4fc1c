-- Insights (issue #6): scenario runs are a usage meter, and generated insights are stored with
-- the figures they cite.
ALTER TABLE usage_events DROP CONSTRAINT usage_events_event_type_check;
ALTER TABLE usage_events ADD CONSTRAINT usage_events_event_type_check
    CHECK (event_type IN ('ai_insight', 'transaction_volume', 'scenario'));

CREATE TABLE insights (
    id                   UUID PRIMARY KEY,
    generation_id        UUID NOT NULL,
    user_id              UUID NOT NULL REFERENCES user_profiles (user_id) ON DELETE CASCADE,
    stripe_connection_id UUID REFERENCES stripe_connections (id) ON DELETE CASCADE,
    kind                 TEXT NOT NULL,
    title                TEXT NOT NULL,
    summary              TEXT NOT NULL,
    -- The cited figures: [{id, label, value (decimal text), unit}].
    figures              JSONB NOT NULL,
    provider             TEXT NOT NULL,
    note                 TEXT,
    created_at           TIMESTAMPTZ NOT NULL
);
CREATE INDEX insights_user ON insights (user_id, stripe_connection_id, created_at);
