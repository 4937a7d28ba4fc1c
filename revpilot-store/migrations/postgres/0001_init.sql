-- RevPilot schema, PostgreSQL. Ids are UUID, instants TIMESTAMPTZ, money NUMERIC (exact).
-- "Unlimited" limits are NULL.

CREATE TABLE user_profiles (
    user_id                          UUID PRIMARY KEY,
    email                            TEXT,
    subscription_tier                TEXT NOT NULL DEFAULT 'starter'
        CHECK (subscription_tier IN ('starter', 'professional', 'business', 'enterprise')),
    subscription_status              TEXT,
    stripe_customer_id               TEXT UNIQUE,
    stripe_subscription_id           TEXT UNIQUE,
    subscription_current_period_end  TIMESTAMPTZ,
    monthly_scenario_limit           INTEGER CHECK (monthly_scenario_limit >= 0),
    monthly_ai_insights_limit        INTEGER CHECK (monthly_ai_insights_limit >= 0),
    monthly_transaction_volume_limit BIGINT CHECK (monthly_transaction_volume_limit >= 0),
    created_at                       TIMESTAMPTZ NOT NULL,
    updated_at                       TIMESTAMPTZ NOT NULL
);
CREATE UNIQUE INDEX user_profiles_email ON user_profiles (lower(email));

CREATE TABLE stripe_connections (
    id                UUID PRIMARY KEY,
    user_id           UUID NOT NULL REFERENCES user_profiles (user_id) ON DELETE CASCADE,
    stripe_account_id TEXT NOT NULL UNIQUE,
    -- base64(nonce || AES-256-GCM ciphertext || tag), bound to (id, user_id, field).
    access_token_enc  TEXT,
    refresh_token_enc TEXT,
    token_key_id      TEXT,
    business_name     TEXT,
    currency          TEXT,
    is_active         BOOLEAN NOT NULL DEFAULT TRUE,
    last_synced_at    TIMESTAMPTZ,
    created_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL,
    CHECK ((access_token_enc IS NULL) = (token_key_id IS NULL))
);
CREATE INDEX stripe_connections_user ON stripe_connections (user_id);

CREATE TABLE usage_events (
    id                   UUID PRIMARY KEY,
    user_id              UUID NOT NULL REFERENCES user_profiles (user_id) ON DELETE CASCADE,
    event_type           TEXT NOT NULL CHECK (event_type IN ('ai_insight', 'transaction_volume')),
    stripe_connection_id UUID REFERENCES stripe_connections (id) ON DELETE SET NULL,
    amount               BIGINT NOT NULL CHECK (amount >= 0),
    idempotency_key      TEXT NOT NULL,
    status               TEXT NOT NULL CHECK (status IN ('reserved', 'committed')),
    metadata             JSONB NOT NULL DEFAULT '{}',
    created_at           TIMESTAMPTZ NOT NULL,
    UNIQUE (user_id, idempotency_key)
);
CREATE INDEX usage_events_period ON usage_events (user_id, event_type, created_at);

CREATE TABLE metrics_snapshots (
    id                     UUID PRIMARY KEY,
    stripe_connection_id   UUID NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    snapshot_date          DATE NOT NULL,
    period_start           DATE NOT NULL,
    mrr_start              NUMERIC NOT NULL,
    mrr                    NUMERIC NOT NULL,
    arr                    NUMERIC NOT NULL,
    total_revenue          NUMERIC NOT NULL,
    customers_start        BIGINT NOT NULL,
    total_customers        BIGINT NOT NULL,
    active_subscriptions   BIGINT NOT NULL,
    churned_customers      BIGINT NOT NULL,
    arpu                   NUMERIC,
    ltv                    NUMERIC,
    customer_churn_rate    NUMERIC,
    revenue_churn_rate     NUMERIC,
    net_revenue_churn_rate NUMERIC,
    new_mrr                NUMERIC NOT NULL,
    expansion_mrr          NUMERIC NOT NULL,
    contraction_mrr        NUMERIC NOT NULL,
    churned_mrr            NUMERIC NOT NULL,
    reactivation_mrr       NUMERIC NOT NULL,
    fx_mrr                 NUMERIC NOT NULL,
    quick_ratio            NUMERIC,
    nrr                    NUMERIC,
    grr                    NUMERIC,
    created_at             TIMESTAMPTZ NOT NULL,
    UNIQUE (stripe_connection_id, snapshot_date)
);

-- Cached Stripe objects: the raw JSON and the version (event `created` or fetch time) it was
-- seen at; an older version never overwrites a newer one.
CREATE TABLE customers_cache (
    stripe_connection_id UUID NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              TIMESTAMPTZ NOT NULL,
    data                 TEXT NOT NULL,
    PRIMARY KEY (stripe_connection_id, stripe_id)
);
CREATE TABLE subscriptions_cache (
    stripe_connection_id UUID NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              TIMESTAMPTZ NOT NULL,
    data                 TEXT NOT NULL,
    PRIMARY KEY (stripe_connection_id, stripe_id)
);
CREATE TABLE invoices_cache (
    stripe_connection_id UUID NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              TIMESTAMPTZ NOT NULL,
    data                 TEXT NOT NULL,
    PRIMARY KEY (stripe_connection_id, stripe_id)
);
CREATE TABLE charges_cache (
    stripe_connection_id UUID NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              TIMESTAMPTZ NOT NULL,
    data                 TEXT NOT NULL,
    PRIMARY KEY (stripe_connection_id, stripe_id)
);
CREATE TABLE prices_cache (
    stripe_connection_id UUID NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              TIMESTAMPTZ NOT NULL,
    data                 TEXT NOT NULL,
    PRIMARY KEY (stripe_connection_id, stripe_id)
);
CREATE TABLE products_cache (
    stripe_connection_id UUID NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              TIMESTAMPTZ NOT NULL,
    data                 TEXT NOT NULL,
    PRIMARY KEY (stripe_connection_id, stripe_id)
);
CREATE TABLE coupons_cache (
    stripe_connection_id UUID NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              TIMESTAMPTZ NOT NULL,
    data                 TEXT NOT NULL,
    PRIMARY KEY (stripe_connection_id, stripe_id)
);

-- The webhook inbox: unique on Stripe's event id; processed events stay (as duplicates).
CREATE TABLE webhook_events (
    event_id     TEXT PRIMARY KEY,
    event_type   TEXT NOT NULL,
    created      TIMESTAMPTZ NOT NULL,
    livemode     BOOLEAN NOT NULL,
    payload      TEXT NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL,
    processed_at TIMESTAMPTZ,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT
);
CREATE INDEX webhook_events_pending ON webhook_events (created) WHERE processed_at IS NULL;

CREATE TABLE oauth_states (
    state      TEXT PRIMARY KEY,
    user_id    UUID NOT NULL REFERENCES user_profiles (user_id) ON DELETE CASCADE,
    expires_at TIMESTAMPTZ NOT NULL
);

-- Filled by the Stripe issue (#4) and the billing issue (#5); the tables exist from the start so
-- foreign keys and migrations stay in one order.
CREATE TABLE user_subscriptions (
    user_id                UUID NOT NULL REFERENCES user_profiles (user_id) ON DELETE CASCADE,
    stripe_subscription_id TEXT NOT NULL UNIQUE,
    stripe_customer_id     TEXT,
    tier                   TEXT NOT NULL,
    status                 TEXT,
    price_id               TEXT,
    current_period_end     TIMESTAMPTZ,
    last_event_created     TIMESTAMPTZ,
    created_at             TIMESTAMPTZ NOT NULL,
    updated_at             TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (user_id, stripe_subscription_id)
);

CREATE TABLE subscription_events (
    id              UUID PRIMARY KEY,
    user_id         UUID NOT NULL REFERENCES user_profiles (user_id) ON DELETE CASCADE,
    stripe_event_id TEXT,
    event_type      TEXT NOT NULL,
    tier            TEXT NOT NULL,
    status          TEXT,
    note            TEXT,
    payload         JSONB NOT NULL DEFAULT '{}',
    created         TIMESTAMPTZ NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL
);
CREATE INDEX subscription_events_user ON subscription_events (user_id, created);

CREATE TABLE sync_cursors (
    stripe_connection_id UUID NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    object_kind          TEXT NOT NULL,
    cursor               TEXT NOT NULL,
    updated_at           TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (stripe_connection_id, object_kind)
);

CREATE TABLE sync_runs (
    id                   UUID PRIMARY KEY,
    stripe_connection_id UUID NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    started_at           TIMESTAMPTZ NOT NULL,
    finished_at          TIMESTAMPTZ,
    status               TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'paused')),
    objects              JSONB NOT NULL DEFAULT '{}',
    requests             BIGINT NOT NULL DEFAULT 0,
    retries              BIGINT NOT NULL DEFAULT 0,
    error                TEXT
);
CREATE INDEX sync_runs_connection ON sync_runs (stripe_connection_id, started_at);
