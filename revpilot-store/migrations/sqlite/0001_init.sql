-- RevPilot schema, SQLite. Timestamps are INTEGER microseconds since the Unix epoch (they order
-- and compare as numbers); dates are TEXT 'YYYY-MM-DD'; money is decimal TEXT (exact; a NUMERIC
-- or REAL column would round it). "Unlimited" limits are NULL.

CREATE TABLE user_profiles (
    user_id                          TEXT PRIMARY KEY,
    email                            TEXT UNIQUE COLLATE NOCASE,
    subscription_tier                TEXT NOT NULL DEFAULT 'starter'
        CHECK (subscription_tier IN ('starter', 'professional', 'business', 'enterprise')),
    subscription_status              TEXT,
    stripe_customer_id               TEXT UNIQUE,
    stripe_subscription_id           TEXT UNIQUE,
    subscription_current_period_end  INTEGER,
    monthly_scenario_limit           INTEGER CHECK (monthly_scenario_limit >= 0),
    monthly_ai_insights_limit        INTEGER CHECK (monthly_ai_insights_limit >= 0),
    monthly_transaction_volume_limit INTEGER CHECK (monthly_transaction_volume_limit >= 0),
    created_at                       INTEGER NOT NULL,
    updated_at                       INTEGER NOT NULL
) STRICT;

CREATE TABLE stripe_connections (
    id                TEXT PRIMARY KEY,
    user_id           TEXT NOT NULL REFERENCES user_profiles (user_id) ON DELETE CASCADE,
    stripe_account_id TEXT NOT NULL UNIQUE,
    -- base64(nonce || AES-256-GCM ciphertext || tag), bound to (id, user_id, field).
    access_token_enc  TEXT,
    refresh_token_enc TEXT,
    token_key_id      TEXT,
    business_name     TEXT,
    currency          TEXT,
    is_active         INTEGER NOT NULL DEFAULT 1 CHECK (is_active IN (0, 1)),
    last_synced_at    INTEGER,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    CHECK ((access_token_enc IS NULL) = (token_key_id IS NULL))
) STRICT;
CREATE INDEX stripe_connections_user ON stripe_connections (user_id);

CREATE TABLE usage_events (
    id                   TEXT PRIMARY KEY,
    user_id              TEXT NOT NULL REFERENCES user_profiles (user_id) ON DELETE CASCADE,
    event_type           TEXT NOT NULL CHECK (event_type IN ('ai_insight', 'transaction_volume')),
    stripe_connection_id TEXT REFERENCES stripe_connections (id) ON DELETE SET NULL,
    amount               INTEGER NOT NULL CHECK (amount >= 0),
    idempotency_key      TEXT NOT NULL,
    status               TEXT NOT NULL CHECK (status IN ('reserved', 'committed')),
    metadata             TEXT NOT NULL DEFAULT '{}',
    created_at           INTEGER NOT NULL,
    UNIQUE (user_id, idempotency_key)
) STRICT;
CREATE INDEX usage_events_period ON usage_events (user_id, event_type, created_at);

CREATE TABLE metrics_snapshots (
    id                     TEXT PRIMARY KEY,
    stripe_connection_id   TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    snapshot_date          TEXT NOT NULL,
    period_start           TEXT NOT NULL,
    mrr_start              TEXT NOT NULL,
    mrr                    TEXT NOT NULL,
    arr                    TEXT NOT NULL,
    total_revenue          TEXT NOT NULL,
    customers_start        INTEGER NOT NULL,
    total_customers        INTEGER NOT NULL,
    active_subscriptions   INTEGER NOT NULL,
    churned_customers      INTEGER NOT NULL,
    arpu                   TEXT,
    ltv                    TEXT,
    customer_churn_rate    TEXT,
    revenue_churn_rate     TEXT,
    net_revenue_churn_rate TEXT,
    new_mrr                TEXT NOT NULL,
    expansion_mrr          TEXT NOT NULL,
    contraction_mrr        TEXT NOT NULL,
    churned_mrr            TEXT NOT NULL,
    reactivation_mrr       TEXT NOT NULL,
    fx_mrr                 TEXT NOT NULL,
    quick_ratio            TEXT,
    nrr                    TEXT,
    grr                    TEXT,
    created_at             INTEGER NOT NULL,
    UNIQUE (stripe_connection_id, snapshot_date)
) STRICT;

-- Cached Stripe objects: the raw JSON and the version (event `created` or fetch time) it was
-- seen at; an older version never overwrites a newer one.
CREATE TABLE customers_cache (
    stripe_connection_id TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              INTEGER NOT NULL,
    data                 TEXT NOT NULL,
    PRIMARY KEY (stripe_connection_id, stripe_id)
) STRICT, WITHOUT ROWID;
CREATE TABLE subscriptions_cache (
    stripe_connection_id TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              INTEGER NOT NULL,
    data                 TEXT NOT NULL,
    PRIMARY KEY (stripe_connection_id, stripe_id)
) STRICT, WITHOUT ROWID;
CREATE TABLE invoices_cache (
    stripe_connection_id TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              INTEGER NOT NULL,
    data                 TEXT NOT NULL,
    PRIMARY KEY (stripe_connection_id, stripe_id)
) STRICT, WITHOUT ROWID;
CREATE TABLE charges_cache (
    stripe_connection_id TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              INTEGER NOT NULL,
    data                 TEXT NOT NULL,
    PRIMARY KEY (stripe_connection_id, stripe_id)
) STRICT, WITHOUT ROWID;
CREATE TABLE prices_cache (
    stripe_connection_id TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              INTEGER NOT NULL,
    data                 TEXT NOT NULL,
    PRIMARY KEY (stripe_connection_id, stripe_id)
) STRICT, WITHOUT ROWID;
CREATE TABLE products_cache (
    stripe_connection_id TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              INTEGER NOT NULL,
    data                 TEXT NOT NULL,
    PRIMARY KEY (stripe_connection_id, stripe_id)
) STRICT, WITHOUT ROWID;
CREATE TABLE coupons_cache (
    stripe_connection_id TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              INTEGER NOT NULL,
    data                 TEXT NOT NULL,
    PRIMARY KEY (stripe_connection_id, stripe_id)
) STRICT, WITHOUT ROWID;

-- The webhook inbox: unique on Stripe's event id; processed events stay (as duplicates).
CREATE TABLE webhook_events (
    event_id     TEXT PRIMARY KEY,
    event_type   TEXT NOT NULL,
    created      INTEGER NOT NULL,
    livemode     INTEGER NOT NULL CHECK (livemode IN (0, 1)),
    payload      TEXT NOT NULL,
    received_at  INTEGER NOT NULL,
    processed_at INTEGER,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT
) STRICT;
CREATE INDEX webhook_events_pending ON webhook_events (created) WHERE processed_at IS NULL;

CREATE TABLE oauth_states (
    state      TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES user_profiles (user_id) ON DELETE CASCADE,
    expires_at INTEGER NOT NULL
) STRICT;

-- Filled by the Stripe issue (#4) and the billing issue (#5); the tables exist from the start so
-- foreign keys and migrations stay in one order.
CREATE TABLE user_subscriptions (
    user_id                TEXT NOT NULL REFERENCES user_profiles (user_id) ON DELETE CASCADE,
    stripe_subscription_id TEXT NOT NULL UNIQUE,
    stripe_customer_id     TEXT,
    tier                   TEXT NOT NULL,
    status                 TEXT,
    price_id               TEXT,
    current_period_end     INTEGER,
    last_event_created     INTEGER,
    created_at             INTEGER NOT NULL,
    updated_at             INTEGER NOT NULL,
    PRIMARY KEY (user_id, stripe_subscription_id)
) STRICT;

CREATE TABLE subscription_events (
    id              TEXT PRIMARY KEY,
    user_id         TEXT NOT NULL REFERENCES user_profiles (user_id) ON DELETE CASCADE,
    stripe_event_id TEXT,
    event_type      TEXT NOT NULL,
    tier            TEXT NOT NULL,
    status          TEXT,
    note            TEXT,
    payload         TEXT NOT NULL DEFAULT '{}',
    created         INTEGER NOT NULL,
    recorded_at     INTEGER NOT NULL
) STRICT;
CREATE INDEX subscription_events_user ON subscription_events (user_id, created);

CREATE TABLE sync_cursors (
    stripe_connection_id TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    object_kind          TEXT NOT NULL,
    cursor               TEXT NOT NULL,
    updated_at           INTEGER NOT NULL,
    PRIMARY KEY (stripe_connection_id, object_kind)
) STRICT;

CREATE TABLE sync_runs (
    id                   TEXT PRIMARY KEY,
    stripe_connection_id TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    started_at           INTEGER NOT NULL,
    finished_at          INTEGER,
    status               TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'paused')),
    objects              TEXT NOT NULL DEFAULT '{}',
    requests             INTEGER NOT NULL DEFAULT 0,
    retries              INTEGER NOT NULL DEFAULT 0,
    error                TEXT
) STRICT;
CREATE INDEX sync_runs_connection ON sync_runs (stripe_connection_id, started_at);
