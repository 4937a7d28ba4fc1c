//! What a sync keeps and what is derived from it: [`ObjectCache`], [`SnapshotStore`] and
//! [`DerivedStore`].

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use revpilot_core::metrics::SeriesRow;
use revpilot_core::ports::{
    CachedObject, ConnectionId, DerivedRow, DerivedStamp, DerivedStore, ObjectCache, ObjectKind,
    SnapshotStore, StoreResult, UpsertStats, UserId,
};
use uuid::Uuid;

use super::{BATCH, Dialect, R, Row, SqlStore, backend, count, limit, sql, sql_owned, tuples};

fn cache_table(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Customer => "customers_cache",
        ObjectKind::Subscription => "subscriptions_cache",
        ObjectKind::Invoice => "invoices_cache",
        ObjectKind::Charge => "charges_cache",
        ObjectKind::Price => "prices_cache",
        ObjectKind::Product => "products_cache",
        ObjectKind::Coupon => "coupons_cache",
        ObjectKind::Dispute => "disputes_cache",
    }
}

/// Rows of `stripe_id, version, data, customer_id` as cached objects of `kind`.
fn cached_objects<D: Dialect>(rows: &[Row<D>], kind: ObjectKind) -> StoreResult<Vec<CachedObject>> {
    rows.iter()
        .map(|row| {
            let r = R::<D>(row);
            Ok(CachedObject {
                kind,
                stripe_id: r.get(0)?,
                version: r.at(1)?,
                data: r.get(2)?,
                customer: r.get(3)?,
            })
        })
        .collect()
}

/// The columns every cache read selects, and its join to the owning user.
fn select_from(table_as_o: &str) -> String {
    format!(
        "SELECT o.stripe_id, o.version, o.data, o.customer_id FROM {table_as_o}
         JOIN stripe_connections c ON c.id = o.stripe_connection_id
         WHERE o.stripe_connection_id = $1 AND c.user_id = $2"
    )
}

#[async_trait]
impl<D: Dialect> ObjectCache for SqlStore<D> {
    async fn upsert_objects(
        &self,
        connection: ConnectionId,
        objects: &[CachedObject],
    ) -> StoreResult<UpsertStats> {
        let mut tx = self.write_for_connection(connection).await?;
        let mut stats = UpsertStats::default();
        for kind in ObjectKind::ALL {
            let table = cache_table(kind);
            let of_kind: Vec<&CachedObject> = objects.iter().filter(|o| o.kind == kind).collect();
            for chunk in of_kind.chunks(BATCH) {
                // What is stored now, to decide each object here: no write for unchanged data.
                let ids: Vec<&str> = chunk.iter().map(|o| o.stripe_id.as_str()).collect();
                let rows = sql_owned::<D>(format!(
                    "SELECT stripe_id, version, data FROM {table} WHERE stripe_connection_id = $1 AND {}",
                    D::one_of("stripe_id", 2, ids.len())
                ))
                .id(connection.0)
                .list(&ids)
                .all(&mut tx)
                .await?;
                let mut stored: HashMap<String, (i64, String)> = HashMap::new();
                for row in &rows {
                    let r = R::<D>(row);
                    stored.insert(r.get(0)?, (r.at(1)?.timestamp_micros(), r.get(2)?));
                }
                // Versions compare at the stores' precision (microseconds).
                let mut latest: HashMap<&str, (i64, &str)> = HashMap::new();
                let mut write: Vec<&CachedObject> = Vec::new();
                for o in chunk {
                    let version = o.version.timestamp_micros();
                    let current = latest
                        .get(o.stripe_id.as_str())
                        .copied()
                        .or_else(|| stored.get(&o.stripe_id).map(|(v, d)| (*v, d.as_str())));
                    match current {
                        None => stats.inserted += 1,
                        Some((v, d)) if version > v && d != o.data => stats.updated += 1,
                        Some(_) => {
                            stats.skipped += 1;
                            continue;
                        }
                    }
                    latest.insert(&o.stripe_id, (version, &o.data));
                    write.push(o);
                }
                // Within one chunk an id may be written twice; keep the last (newest) write.
                let mut last: HashMap<&str, &CachedObject> = HashMap::new();
                for o in &write {
                    last.insert(&o.stripe_id, o);
                }
                if last.is_empty() {
                    continue;
                }
                // The guard keeps a concurrent older write from winning.
                let mut q = sql_owned::<D>(format!(
                    "INSERT INTO {table} (stripe_connection_id, stripe_id, version, data, customer_id, written_at)
                     VALUES {}
                     ON CONFLICT (stripe_connection_id, stripe_id) DO UPDATE SET version = excluded.version,
                       data = excluded.data, customer_id = excluded.customer_id, written_at = excluded.written_at
                     WHERE {table}.version < excluded.version",
                    tuples(last.len(), 6, 1)
                ));
                let written = Utc::now();
                for o in last.values() {
                    q = q
                        .id(connection.0)
                        .bind(o.stripe_id.as_str())
                        .at(o.version)
                        .bind(o.data.as_str())
                        .bind(o.customer.as_deref())
                        .at(written);
                }
                q.run(&mut tx).await?;
            }
        }
        tx.commit().await.map_err(backend)?;
        Ok(stats)
    }

    async fn objects(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
    ) -> StoreResult<Vec<CachedObject>> {
        let table = format!("{} o", cache_table(kind));
        let rows = sql_owned::<D>(format!("{} ORDER BY o.stripe_id", select_from(&table)))
            .id(connection.0)
            .id(user.0)
            .all(&mut *self.conn().await?)
            .await?;
        cached_objects::<D>(&rows, kind)
    }

    async fn objects_page(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
        after: Option<&str>,
        limit_to: usize,
    ) -> StoreResult<Vec<CachedObject>> {
        // Keyset pages on the primary key (connection, stripe id).
        let table = format!("{} o", cache_table(kind));
        let rows = sql_owned::<D>(format!(
            "{} AND o.stripe_id > $3 ORDER BY o.stripe_id LIMIT $4",
            select_from(&table)
        ))
        .id(connection.0)
        .id(user.0)
        .bind(after.unwrap_or(""))
        .bind(limit(limit_to))
        .all(&mut *self.conn().await?)
        .await?;
        cached_objects::<D>(&rows, kind)
    }

    async fn objects_written_since(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
        since: DateTime<Utc>,
        after: Option<&str>,
        limit_to: usize,
    ) -> StoreResult<Vec<CachedObject>> {
        let table = cache_table(kind);
        let text = D::written_since(table).unwrap_or_else(|| {
            format!(
                "{} AND o.written_at >= $3 AND o.stripe_id > $4 ORDER BY o.stripe_id LIMIT $5",
                select_from(&D::read_by(table, "written_at"))
            )
        });
        let rows = sql_owned::<D>(text)
            .id(connection.0)
            .id(user.0)
            .at(since)
            .bind(after.unwrap_or(""))
            .bind(limit(limit_to))
            .all(&mut *self.conn().await?)
            .await?;
        cached_objects::<D>(&rows, kind)
    }

    async fn objects_of_customers(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
        customers: &[String],
    ) -> StoreResult<Vec<CachedObject>> {
        self.objects_where(user, connection, kind, "customer_id", customers)
            .await
    }

    async fn objects_by_ids(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
        ids: &[String],
    ) -> StoreResult<Vec<CachedObject>> {
        self.objects_where(user, connection, kind, "stripe_id", ids)
            .await
    }
}

impl<D: Dialect> SqlStore<D> {
    /// The user's cached objects of `kind` whose `column` is one of `values` (for
    /// `customer_id`, `""` stands for none), by Stripe id.
    async fn objects_where(
        &self,
        user: UserId,
        connection: ConnectionId,
        kind: ObjectKind,
        column: &str,
        values: &[String],
    ) -> StoreResult<Vec<CachedObject>> {
        let head = select_from(&D::read_by(cache_table(kind), column));
        let by_customer = column == "customer_id";
        let none = by_customer && values.iter().any(String::is_empty);
        let values: Vec<&str> = values
            .iter()
            .map(String::as_str)
            .filter(|v| !by_customer || !v.is_empty())
            .collect();
        let mut c = self.conn().await?;
        let mut out = Vec::new();
        for chunk in values.chunks(BATCH) {
            let rows = sql_owned::<D>(format!(
                "{head} AND {}",
                D::one_of(&format!("o.{column}"), 3, chunk.len())
            ))
            .id(connection.0)
            .id(user.0)
            .list(chunk)
            .all(&mut c)
            .await?;
            out.extend(cached_objects::<D>(&rows, kind)?);
        }
        if none {
            let rows = sql_owned::<D>(format!("{head} AND o.customer_id IS NULL"))
                .id(connection.0)
                .id(user.0)
                .all(&mut c)
                .await?;
            out.extend(cached_objects::<D>(&rows, kind)?);
        }
        out.sort_by(|a, b| a.stripe_id.cmp(&b.stripe_id));
        out.dedup_by(|a, b| a.stripe_id == b.stripe_id);
        Ok(out)
    }
}

const SNAPSHOT_COLUMNS: &str = "snapshot_date, period_start, mrr_start, mrr, arr, total_revenue, customers_start, \
     total_customers, active_subscriptions, churned_customers, arpu, ltv, customer_churn_rate, \
     revenue_churn_rate, net_revenue_churn_rate, new_mrr, expansion_mrr, contraction_mrr, churned_mrr, \
     reactivation_mrr, fx_mrr, quick_ratio, nrr, grr, partial";

fn snapshot_row<D: Dialect>(row: &Row<D>) -> StoreResult<SeriesRow> {
    let r = R::<D>(row);
    Ok(SeriesRow {
        date: r.date(0)?,
        period_start: r.date(1)?,
        mrr_start: r.money(2)?,
        mrr: r.money(3)?,
        arr: r.money(4)?,
        total_revenue: r.money(5)?,
        customers_start: r.count(6)?,
        total_customers: r.count(7)?,
        active_subscriptions: r.count(8)?,
        churned_customers: r.count(9)?,
        arpu: r.opt_money(10)?,
        ltv: r.opt_money(11)?,
        customer_churn_rate: r.opt_money(12)?,
        revenue_churn_rate: r.opt_money(13)?,
        net_revenue_churn_rate: r.opt_money(14)?,
        new_mrr: r.money(15)?,
        expansion_mrr: r.money(16)?,
        contraction_mrr: r.money(17)?,
        churned_mrr: r.money(18)?,
        reactivation_mrr: r.money(19)?,
        fx_mrr: r.money(20)?,
        quick_ratio: r.opt_money(21)?,
        nrr: r.opt_money(22)?,
        grr: r.opt_money(23)?,
        partial: r.get(24)?,
    })
}

#[async_trait]
impl<D: Dialect> SnapshotStore for SqlStore<D> {
    async fn upsert_snapshots(
        &self,
        connection: ConnectionId,
        rows: &[SeriesRow],
    ) -> StoreResult<usize> {
        let now = Utc::now();
        let mut tx = self.write_for_connection(connection).await?;
        let updates: Vec<String> = SNAPSHOT_COLUMNS
            .split(", ")
            .skip(1)
            .chain(["created_at"])
            .map(|c| format!("{c} = excluded.{c}"))
            .collect();
        let statement = format!(
            "INSERT INTO metrics_snapshots (id, stripe_connection_id, created_at, {SNAPSHOT_COLUMNS})
             VALUES {}
             ON CONFLICT (stripe_connection_id, snapshot_date) DO UPDATE SET {}",
            tuples(1, 28, 1),
            updates.join(", ")
        );
        for r in rows {
            sql_owned::<D>(statement.clone())
                .id(Uuid::new_v4())
                .id(connection.0)
                .at(now)
                .date(r.date)
                .date(r.period_start)
                .money(r.mrr_start)
                .money(r.mrr)
                .money(r.arr)
                .money(r.total_revenue)
                .bind(count(r.customers_start)?)
                .bind(count(r.total_customers)?)
                .bind(count(r.active_subscriptions)?)
                .bind(count(r.churned_customers)?)
                .opt_money(r.arpu)
                .opt_money(r.ltv)
                .opt_money(r.customer_churn_rate)
                .opt_money(r.revenue_churn_rate)
                .opt_money(r.net_revenue_churn_rate)
                .money(r.new_mrr)
                .money(r.expansion_mrr)
                .money(r.contraction_mrr)
                .money(r.churned_mrr)
                .money(r.reactivation_mrr)
                .money(r.fx_mrr)
                .opt_money(r.quick_ratio)
                .opt_money(r.nrr)
                .opt_money(r.grr)
                .bind(r.partial)
                .run(&mut tx)
                .await?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(rows.len())
    }

    async fn snapshots(
        &self,
        user: UserId,
        connection: ConnectionId,
        from: NaiveDate,
        to: NaiveDate,
    ) -> StoreResult<Vec<SeriesRow>> {
        let columns: Vec<String> = SNAPSHOT_COLUMNS
            .split(", ")
            .map(|c| format!("s.{c}"))
            .collect();
        let rows = sql_owned::<D>(format!(
            "SELECT {} FROM metrics_snapshots s JOIN stripe_connections c ON c.id = s.stripe_connection_id
             WHERE s.stripe_connection_id = $1 AND c.user_id = $2 AND s.snapshot_date BETWEEN $3 AND $4
             ORDER BY s.snapshot_date",
            columns.join(", ")
        ))
        .id(connection.0)
        .id(user.0)
        .date(from)
        .date(to)
        .all(&mut *self.conn().await?)
        .await?;
        rows.iter().map(snapshot_row::<D>).collect()
    }
}

#[async_trait]
impl<D: Dialect> DerivedStore for SqlStore<D> {
    async fn derived_stamp(&self, connection: ConnectionId) -> StoreResult<Option<DerivedStamp>> {
        let row = sql::<D>(
            "SELECT generation, version, synced_at, as_of, cache_read_at FROM derived_accounts
             WHERE stripe_connection_id = $1",
        )
        .id(connection.0)
        .opt(&mut *self.conn().await?)
        .await?;
        row.map(|row| {
            let r = R::<D>(&row);
            Ok(DerivedStamp {
                generation: r.id(0)?,
                version: r.version(1)?,
                synced_at: r.opt_at(2)?,
                as_of: r.opt_at(3)?,
                cache_read_at: r.at(4)?,
            })
        })
        .transpose()
    }

    async fn write_derived(
        &self,
        connection: ConnectionId,
        generation: Uuid,
        rows: &[DerivedRow],
    ) -> StoreResult<()> {
        let mut tx = self.write_for_connection(connection).await?;
        for chunk in rows.chunks(BATCH) {
            let mut q = sql_owned::<D>(format!(
                "INSERT INTO derived_customers (stripe_connection_id, generation, key, data) VALUES {}
                 ON CONFLICT (stripe_connection_id, generation, key) DO UPDATE SET data = excluded.data",
                tuples(chunk.len(), 4, 1)
            ));
            for r in chunk {
                q = q
                    .id(connection.0)
                    .id(generation)
                    .bind(r.key.as_str())
                    .bind(r.data.as_str());
            }
            q.run(&mut tx).await?;
        }
        tx.commit().await.map_err(backend)
    }

    async fn publish_derived(
        &self,
        connection: ConnectionId,
        stamp: &DerivedStamp,
        replacing: Option<Uuid>,
    ) -> StoreResult<bool> {
        // Under the connection's write lock: no other publish runs between the check and the
        // write.
        let mut tx = self.write_for_connection(connection).await?;
        let published = sql_owned::<D>(format!(
            "SELECT generation FROM derived_accounts WHERE stripe_connection_id = $1{}",
            D::FOR_UPDATE
        ))
        .id(connection.0)
        .opt(&mut tx)
        .await?
        .map(|row| D::get_id(&row, 0))
        .transpose()?
        .flatten();
        if published != replacing {
            return Ok(false);
        }
        sql::<D>(
            "INSERT INTO derived_accounts
               (stripe_connection_id, generation, version, synced_at, as_of, cache_read_at,
                published_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (stripe_connection_id) DO UPDATE SET generation = excluded.generation,
               version = excluded.version, synced_at = excluded.synced_at, as_of = excluded.as_of,
               cache_read_at = excluded.cache_read_at, published_at = excluded.published_at",
        )
        .id(connection.0)
        .id(stamp.generation)
        .version(stamp.version)
        .opt_at(stamp.synced_at)
        .opt_at(stamp.as_of)
        .at(stamp.cache_read_at)
        .at(Utc::now())
        .run(&mut tx)
        .await?;
        sql::<D>(
            "DELETE FROM derived_customers WHERE stripe_connection_id = $1 AND generation <> $2",
        )
        .id(connection.0)
        .id(stamp.generation)
        .run(&mut tx)
        .await?;
        tx.commit().await.map_err(backend)?;
        Ok(true)
    }

    async fn derived_page(
        &self,
        user: UserId,
        connection: ConnectionId,
        generation: Uuid,
        after: Option<&str>,
        limit_to: usize,
    ) -> StoreResult<Vec<DerivedRow>> {
        // Keyset pages on the primary key; an empty key sorts first, so the first page starts
        // below it.
        let rows = sql_owned::<D>(format!(
            "SELECT d.key, d.data FROM derived_customers d
             JOIN stripe_connections c ON c.id = d.stripe_connection_id
             WHERE d.stripe_connection_id = $1 AND c.user_id = $2 AND d.generation = $3
               AND ({} IS NULL OR d.key > $4)
             ORDER BY d.key LIMIT $5",
            D::typed(4, "text")
        ))
        .id(connection.0)
        .id(user.0)
        .id(generation)
        .bind(after)
        .bind(limit(limit_to))
        .all(&mut *self.conn().await?)
        .await?;
        rows.iter()
            .map(|row| {
                let r = R::<D>(row);
                Ok(DerivedRow {
                    key: r.get(0)?,
                    data: r.get(1)?,
                })
            })
            .collect()
    }
}
