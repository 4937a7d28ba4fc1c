-- Running totals per (user, meter, period): a limit check reads one row instead of summing a
-- period's events (which grows with usage: 500,000 a month on the business tier). Each event
-- records the period it was counted in, so a released reservation decrements the right total.
ALTER TABLE usage_events ADD COLUMN period_start TIMESTAMPTZ;
ALTER TABLE usage_events ADD COLUMN period_end TIMESTAMPTZ;

CREATE TABLE usage_counters (
    user_id      UUID NOT NULL REFERENCES user_profiles (user_id) ON DELETE CASCADE,
    event_type   TEXT NOT NULL,
    period_start TIMESTAMPTZ NOT NULL,
    period_end   TIMESTAMPTZ NOT NULL,
    used         BIGINT NOT NULL CHECK (used >= 0),
    PRIMARY KEY (user_id, event_type, period_start, period_end)
);

-- Existing events count in the calendar month (UTC) of their creation.
UPDATE usage_events SET
    period_start = date_trunc('month', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
    period_end = (date_trunc('month', created_at AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC';
INSERT INTO usage_counters (user_id, event_type, period_start, period_end, used)
    SELECT user_id, event_type, period_start, period_end, SUM(amount)
    FROM usage_events GROUP BY user_id, event_type, period_start, period_end;
