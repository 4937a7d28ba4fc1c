-- Running totals per (user, meter, period): a limit check reads one row instead of summing a
-- period's events (which grows with usage: 500,000 a month on the business tier). Each event
-- records the period it was counted in, so a released reservation decrements the right total.
ALTER TABLE usage_events ADD COLUMN period_start INTEGER;
ALTER TABLE usage_events ADD COLUMN period_end INTEGER;

CREATE TABLE usage_counters (
    user_id      TEXT NOT NULL REFERENCES user_profiles (user_id) ON DELETE CASCADE,
    event_type   TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    period_end   INTEGER NOT NULL,
    used         INTEGER NOT NULL CHECK (used >= 0),
    PRIMARY KEY (user_id, event_type, period_start, period_end)
) STRICT;

-- Existing events count in the calendar month of their creation.
UPDATE usage_events SET
    period_start = CAST(strftime('%s', date(created_at / 1000000, 'unixepoch', 'start of month')) AS INTEGER) * 1000000,
    period_end = CAST(strftime('%s', date(created_at / 1000000, 'unixepoch', 'start of month', '+1 month')) AS INTEGER) * 1000000;
INSERT INTO usage_counters (user_id, event_type, period_start, period_end, used)
    SELECT user_id, event_type, period_start, period_end, SUM(amount)
    FROM usage_events GROUP BY user_id, event_type, period_start, period_end;
