-- The cache tables keep their rows in rowid order, with the key in its own index.
--
-- As WITHOUT ROWID tables the object's JSON lived in the key's B-tree: a key B-tree keeps about
-- 1,000 bytes of a row in its page and spills the rest, and a sync's objects arrive in no key
-- order, so every object rewrote a page somewhere in the middle of the table (and split it).
-- With rowids the rows are appended; only the small key entries land in random pages.

CREATE TABLE customers_cache_new (
    stripe_connection_id TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              INTEGER NOT NULL,
    data                 TEXT NOT NULL,
    customer_id          TEXT,
    written_at           INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (stripe_connection_id, stripe_id)
) STRICT;
INSERT INTO customers_cache_new (stripe_connection_id, stripe_id, version, data, customer_id, written_at)
    SELECT stripe_connection_id, stripe_id, version, data, customer_id, written_at FROM customers_cache;
DROP TABLE customers_cache;
ALTER TABLE customers_cache_new RENAME TO customers_cache;
CREATE INDEX customers_cache_written ON customers_cache (stripe_connection_id, written_at);
CREATE INDEX customers_cache_customer ON customers_cache (stripe_connection_id, customer_id);

CREATE TABLE subscriptions_cache_new (
    stripe_connection_id TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              INTEGER NOT NULL,
    data                 TEXT NOT NULL,
    customer_id          TEXT,
    written_at           INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (stripe_connection_id, stripe_id)
) STRICT;
INSERT INTO subscriptions_cache_new (stripe_connection_id, stripe_id, version, data, customer_id, written_at)
    SELECT stripe_connection_id, stripe_id, version, data, customer_id, written_at FROM subscriptions_cache;
DROP TABLE subscriptions_cache;
ALTER TABLE subscriptions_cache_new RENAME TO subscriptions_cache;
CREATE INDEX subscriptions_cache_written ON subscriptions_cache (stripe_connection_id, written_at);
CREATE INDEX subscriptions_cache_customer ON subscriptions_cache (stripe_connection_id, customer_id);

CREATE TABLE invoices_cache_new (
    stripe_connection_id TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              INTEGER NOT NULL,
    data                 TEXT NOT NULL,
    customer_id          TEXT,
    written_at           INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (stripe_connection_id, stripe_id)
) STRICT;
INSERT INTO invoices_cache_new (stripe_connection_id, stripe_id, version, data, customer_id, written_at)
    SELECT stripe_connection_id, stripe_id, version, data, customer_id, written_at FROM invoices_cache;
DROP TABLE invoices_cache;
ALTER TABLE invoices_cache_new RENAME TO invoices_cache;
CREATE INDEX invoices_cache_written ON invoices_cache (stripe_connection_id, written_at);
CREATE INDEX invoices_cache_customer ON invoices_cache (stripe_connection_id, customer_id);

CREATE TABLE charges_cache_new (
    stripe_connection_id TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              INTEGER NOT NULL,
    data                 TEXT NOT NULL,
    customer_id          TEXT,
    written_at           INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (stripe_connection_id, stripe_id)
) STRICT;
INSERT INTO charges_cache_new (stripe_connection_id, stripe_id, version, data, customer_id, written_at)
    SELECT stripe_connection_id, stripe_id, version, data, customer_id, written_at FROM charges_cache;
DROP TABLE charges_cache;
ALTER TABLE charges_cache_new RENAME TO charges_cache;
CREATE INDEX charges_cache_written ON charges_cache (stripe_connection_id, written_at);
CREATE INDEX charges_cache_customer ON charges_cache (stripe_connection_id, customer_id);

CREATE TABLE prices_cache_new (
    stripe_connection_id TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              INTEGER NOT NULL,
    data                 TEXT NOT NULL,
    customer_id          TEXT,
    written_at           INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (stripe_connection_id, stripe_id)
) STRICT;
INSERT INTO prices_cache_new (stripe_connection_id, stripe_id, version, data, customer_id, written_at)
    SELECT stripe_connection_id, stripe_id, version, data, customer_id, written_at FROM prices_cache;
DROP TABLE prices_cache;
ALTER TABLE prices_cache_new RENAME TO prices_cache;
CREATE INDEX prices_cache_written ON prices_cache (stripe_connection_id, written_at);
CREATE INDEX prices_cache_customer ON prices_cache (stripe_connection_id, customer_id);

CREATE TABLE products_cache_new (
    stripe_connection_id TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              INTEGER NOT NULL,
    data                 TEXT NOT NULL,
    customer_id          TEXT,
    written_at           INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (stripe_connection_id, stripe_id)
) STRICT;
INSERT INTO products_cache_new (stripe_connection_id, stripe_id, version, data, customer_id, written_at)
    SELECT stripe_connection_id, stripe_id, version, data, customer_id, written_at FROM products_cache;
DROP TABLE products_cache;
ALTER TABLE products_cache_new RENAME TO products_cache;
CREATE INDEX products_cache_written ON products_cache (stripe_connection_id, written_at);
CREATE INDEX products_cache_customer ON products_cache (stripe_connection_id, customer_id);

CREATE TABLE coupons_cache_new (
    stripe_connection_id TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              INTEGER NOT NULL,
    data                 TEXT NOT NULL,
    customer_id          TEXT,
    written_at           INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (stripe_connection_id, stripe_id)
) STRICT;
INSERT INTO coupons_cache_new (stripe_connection_id, stripe_id, version, data, customer_id, written_at)
    SELECT stripe_connection_id, stripe_id, version, data, customer_id, written_at FROM coupons_cache;
DROP TABLE coupons_cache;
ALTER TABLE coupons_cache_new RENAME TO coupons_cache;
CREATE INDEX coupons_cache_written ON coupons_cache (stripe_connection_id, written_at);
CREATE INDEX coupons_cache_customer ON coupons_cache (stripe_connection_id, customer_id);

CREATE TABLE disputes_cache_new (
    stripe_connection_id TEXT NOT NULL REFERENCES stripe_connections (id) ON DELETE CASCADE,
    stripe_id            TEXT NOT NULL,
    version              INTEGER NOT NULL,
    data                 TEXT NOT NULL,
    customer_id          TEXT,
    written_at           INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (stripe_connection_id, stripe_id)
) STRICT;
INSERT INTO disputes_cache_new (stripe_connection_id, stripe_id, version, data, customer_id, written_at)
    SELECT stripe_connection_id, stripe_id, version, data, customer_id, written_at FROM disputes_cache;
DROP TABLE disputes_cache;
ALTER TABLE disputes_cache_new RENAME TO disputes_cache;
CREATE INDEX disputes_cache_written ON disputes_cache (stripe_connection_id, written_at);
CREATE INDEX disputes_cache_customer ON disputes_cache (stripe_connection_id, customer_id);
