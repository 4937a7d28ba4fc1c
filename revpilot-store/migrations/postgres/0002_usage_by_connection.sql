-- Usage per connection (the dashboard's "transactions synced from this account").
CREATE INDEX usage_events_connection ON usage_events (stripe_connection_id, event_type, created_at);
