-- Derived accounts: a connection's rebuilt account by customer, written under a generation and
-- published by the stamp row, so a half-written derivation is never read.
CREATE TABLE derived_accounts (
    stripe_connection_id TEXT PRIMARY KEY REFERENCES stripe_connections (id) ON DELETE CASCADE,
    generation           TEXT NOT NULL,
    version              INTEGER NOT NULL,
    synced_at            INTEGER,
    as_of                INTEGER,
    cache_read_at        INTEGER NOT NULL,
    published_at         INTEGER NOT NULL
) STRICT;
CREATE TABLE derived_customers (
    stripe_connection_id TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    generation           TEXT NOT NULL,
    key                  TEXT NOT NULL,
    data                 TEXT NOT NULL,
    PRIMARY KEY (stripe_connection_id, generation, key)
) STRICT, WITHOUT ROWID;

-- The cache knows each object's customer and when it was last written, so that after a sync
-- only the customers whose objects changed are rebuilt.
ALTER TABLE customers_cache ADD COLUMN customer_id TEXT;
ALTER TABLE customers_cache ADD COLUMN written_at INTEGER NOT NULL DEFAULT 0;
CREATE INDEX customers_cache_written ON customers_cache (stripe_connection_id, written_at);
ALTER TABLE subscriptions_cache ADD COLUMN customer_id TEXT;
ALTER TABLE subscriptions_cache ADD COLUMN written_at INTEGER NOT NULL DEFAULT 0;
CREATE INDEX subscriptions_cache_written ON subscriptions_cache (stripe_connection_id, written_at);
ALTER TABLE invoices_cache ADD COLUMN customer_id TEXT;
ALTER TABLE invoices_cache ADD COLUMN written_at INTEGER NOT NULL DEFAULT 0;
CREATE INDEX invoices_cache_written ON invoices_cache (stripe_connection_id, written_at);
ALTER TABLE charges_cache ADD COLUMN customer_id TEXT;
ALTER TABLE charges_cache ADD COLUMN written_at INTEGER NOT NULL DEFAULT 0;
CREATE INDEX charges_cache_written ON charges_cache (stripe_connection_id, written_at);
ALTER TABLE prices_cache ADD COLUMN customer_id TEXT;
ALTER TABLE prices_cache ADD COLUMN written_at INTEGER NOT NULL DEFAULT 0;
CREATE INDEX prices_cache_written ON prices_cache (stripe_connection_id, written_at);
CREATE INDEX prices_cache_customer ON prices_cache (stripe_connection_id, customer_id);
ALTER TABLE products_cache ADD COLUMN customer_id TEXT;
ALTER TABLE products_cache ADD COLUMN written_at INTEGER NOT NULL DEFAULT 0;
CREATE INDEX products_cache_written ON products_cache (stripe_connection_id, written_at);
CREATE INDEX products_cache_customer ON products_cache (stripe_connection_id, customer_id);
ALTER TABLE coupons_cache ADD COLUMN customer_id TEXT;
ALTER TABLE coupons_cache ADD COLUMN written_at INTEGER NOT NULL DEFAULT 0;
CREATE INDEX coupons_cache_written ON coupons_cache (stripe_connection_id, written_at);
CREATE INDEX coupons_cache_customer ON coupons_cache (stripe_connection_id, customer_id);
ALTER TABLE disputes_cache ADD COLUMN customer_id TEXT;
ALTER TABLE disputes_cache ADD COLUMN written_at INTEGER NOT NULL DEFAULT 0;
CREATE INDEX disputes_cache_written ON disputes_cache (stripe_connection_id, written_at);
CREATE INDEX disputes_cache_customer ON disputes_cache (stripe_connection_id, customer_id);
UPDATE customers_cache SET customer_id = stripe_id;
CREATE INDEX customers_cache_customer ON customers_cache (stripe_connection_id, customer_id);
UPDATE subscriptions_cache SET customer_id = CASE json_type(data, '$.customer')
    WHEN 'text' THEN json_extract(data, '$.customer')
    WHEN 'object' THEN json_extract(data, '$.customer.id') END;
CREATE INDEX subscriptions_cache_customer ON subscriptions_cache (stripe_connection_id, customer_id);
UPDATE invoices_cache SET customer_id = CASE json_type(data, '$.customer')
    WHEN 'text' THEN json_extract(data, '$.customer')
    WHEN 'object' THEN json_extract(data, '$.customer.id') END;
CREATE INDEX invoices_cache_customer ON invoices_cache (stripe_connection_id, customer_id);
UPDATE charges_cache SET customer_id = CASE json_type(data, '$.customer')
    WHEN 'text' THEN json_extract(data, '$.customer')
    WHEN 'object' THEN json_extract(data, '$.customer.id') END;
CREATE INDEX charges_cache_customer ON charges_cache (stripe_connection_id, customer_id);
