-- Billing (issue #5): the start of the user's Stripe billing period (usage is counted per
-- billing period when subscribed, and a period's start cannot be derived from its end), and one
-- subscription event per Stripe event id, so a webhook processed twice (two workers, a retry
-- after a crash between apply and mark) is applied once.
ALTER TABLE user_profiles ADD COLUMN subscription_current_period_start TIMESTAMPTZ;
CREATE UNIQUE INDEX subscription_events_stripe_event ON subscription_events (stripe_event_id)
    WHERE stripe_event_id IS NOT NULL;
