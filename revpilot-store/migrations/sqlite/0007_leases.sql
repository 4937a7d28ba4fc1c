-- Leases (issue #7): a named claim one worker holds until a deadline (microseconds since the
-- epoch), so two workers never sync one connection at once.
CREATE TABLE leases (
    key        TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at INTEGER NOT NULL
) STRICT;

-- End-of-period invoicing walks the users with a Stripe customer.
CREATE INDEX user_profiles_billable ON user_profiles (user_id) WHERE stripe_customer_id IS NOT NULL;
