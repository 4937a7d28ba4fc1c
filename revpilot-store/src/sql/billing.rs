//! Metered usage against limits, billing events, the webhook inbox and leases: [`UsageStore`],
//! [`BillingStore`], [`WebhookInbox`] and [`LeaseStore`].

use std::collections::HashSet;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use revpilot_core::ports::{
    Applied, BillingStore, InboxEvent, Inserted, LeaseStore, Meter, PendingEvent, Period,
    PlanChange, Recorded, StoreError, StoreResult, SubscriptionEvent, UsageRecord, UsageStore,
    UserId, UserSubscription, WebhookInbox,
};
use uuid::Uuid;

use super::users::{lock_user, tier, update_plan};
use super::{
    BATCH, Conn, Dialect, Q, R, SqlStore, backend, changed, limit, missing, sql, sql_owned, tuples,
};

fn amount(units: u64) -> StoreResult<i64> {
    i64::try_from(units).map_err(|_| StoreError::Invalid("usage amount too large".into()))
}

/// The units of `meter` counted for the user in the period (committed and reserved).
async fn counted<D: Dialect>(
    tx: &mut Conn<D>,
    user: Uuid,
    meter: Meter,
    period: Period,
) -> StoreResult<u64> {
    let row = sql::<D>(
        "SELECT used FROM usage_counters
         WHERE user_id = $1 AND event_type = $2 AND period_start = $3 AND period_end = $4",
    )
    .id(user)
    .bind(meter.as_str())
    .at(period.start)
    .at(period.end)
    .opt(tx)
    .await?;
    let used: Option<i64> = row.map(|r| R::<D>(&r).get(0)).transpose()?;
    Ok(used.and_then(|u| u64::try_from(u).ok()).unwrap_or(0))
}

/// Adds `units` to the user's counter of `meter` in the period.
async fn add_to_counter<D: Dialect>(
    tx: &mut Conn<D>,
    user: Uuid,
    meter: Meter,
    period: Period,
    units: i64,
) -> StoreResult<()> {
    sql::<D>(
        "INSERT INTO usage_counters (user_id, event_type, period_start, period_end, used)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (user_id, event_type, period_start, period_end)
         DO UPDATE SET used = usage_counters.used + excluded.used",
    )
    .id(user)
    .bind(meter.as_str())
    .at(period.start)
    .at(period.end)
    .bind(units)
    .run(tx)
    .await
    .map(drop)
}

const USAGE_COLUMNS: &str = "id, user_id, event_type, stripe_connection_id, amount, \
     idempotency_key, status, metadata, created_at, period_start, period_end";

impl<D: Dialect> Q<D> {
    /// The [`USAGE_COLUMNS`] of a new usage event.
    fn usage(self, r: &UsageRecord, units: i64, status: &str, period: Period) -> Self {
        self.id(Uuid::new_v4())
            .id(r.user.0)
            .bind(r.meter.as_str())
            .opt_id(r.connection.map(|c| c.0))
            .bind(units)
            .bind(r.idempotency_key.as_str())
            .bind(status)
            .bind(r.metadata.clone())
            .at(r.at)
            .at(period.start)
            .at(period.end)
    }
}

impl<D: Dialect> SqlStore<D> {
    async fn add_usage(
        &self,
        record: &UsageRecord,
        period: Period,
        limit: Option<u64>,
        status: &str,
    ) -> StoreResult<Recorded> {
        let units = amount(record.amount)?;
        let user = record.user.0;
        let mut tx = self.write().await?;
        // Serializes this user's usage writes: the counter read below cannot go stale.
        lock_user::<D>(&mut tx, user).await?;
        // The unique (user, key) decides duplicates; a refused record rolls back with the tx.
        let inserted = sql_owned::<D>(format!(
            "INSERT INTO usage_events ({USAGE_COLUMNS}) VALUES {}
             ON CONFLICT (user_id, idempotency_key) DO NOTHING",
            tuples(1, 11, 1)
        ))
        .usage(record, units, status, period)
        .try_run(&mut tx)
        .await
        .map_err(missing("user or connection"))?;
        if inserted == 0 {
            return Ok(Recorded::Duplicate);
        }
        if let Some(limit) = limit {
            let used = counted::<D>(&mut tx, user, record.meter, period).await?;
            if used.saturating_add(record.amount) > limit {
                return Err(StoreError::LimitExceeded {
                    meter: record.meter,
                    limit,
                    used,
                });
            }
        }
        add_to_counter::<D>(&mut tx, user, record.meter, period, units).await?;
        tx.commit().await.map_err(backend)?;
        Ok(Recorded::New)
    }
}

#[async_trait]
impl<D: Dialect> UsageStore for SqlStore<D> {
    async fn record(
        &self,
        record: &UsageRecord,
        period: Period,
        limit: Option<u64>,
    ) -> StoreResult<Recorded> {
        self.add_usage(record, period, limit, "committed").await
    }

    async fn record_all(
        &self,
        records: &[UsageRecord],
        period: Period,
        limit: Option<u64>,
    ) -> StoreResult<Vec<Recorded>> {
        let Some(user) = records.first().map(|r| r.user) else {
            return Ok(Vec::new());
        };
        if records.iter().any(|r| r.user != user) {
            // Keys and counters are per user: several users' records go one by one.
            return revpilot_core::ports::record_each(self, records, period, limit).await;
        }
        for r in records {
            amount(r.amount)?;
        }
        let mut tx = self.write().await?;
        // Serializes this user's usage writes: the counters read below cannot go stale.
        lock_user::<D>(&mut tx, user.0).await?;
        // One statement per batch of keys, one per meter, one insert: the whole page in a
        // few statements instead of three per record.
        let mut stored = HashSet::new();
        for chunk in records.chunks(BATCH) {
            let keys: Vec<&str> = chunk.iter().map(|r| r.idempotency_key.as_str()).collect();
            let rows = sql_owned::<D>(format!(
                "SELECT idempotency_key FROM usage_events WHERE user_id = $1 AND {}",
                D::one_of("idempotency_key", 2, keys.len())
            ))
            .id(user.0)
            .list(&keys)
            .all(&mut tx)
            .await?;
            for row in &rows {
                stored.insert(R::<D>(row).get::<String>(0)?);
            }
        }
        let mut used: Vec<(Meter, u64)> = Vec::new();
        if limit.is_some() {
            for r in records {
                if !used.iter().any(|(m, _)| *m == r.meter) {
                    used.push((
                        r.meter,
                        counted::<D>(&mut tx, user.0, r.meter, period).await?,
                    ));
                }
            }
        }
        let plan = revpilot_core::ports::plan_usage(records, &stored, &used, limit);
        for chunk in plan.new.chunks(BATCH) {
            let mut q = sql_owned::<D>(format!(
                "INSERT INTO usage_events ({USAGE_COLUMNS}) VALUES {}",
                tuples(chunk.len(), 11, 1)
            ));
            for r in chunk {
                q = q.usage(r, amount(r.amount)?, "committed", period);
            }
            q.try_run(&mut tx)
                .await
                .map_err(missing("user or connection"))?;
        }
        for (meter, units) in &plan.added {
            let units = i64::try_from(*units).unwrap_or(i64::MAX);
            add_to_counter::<D>(&mut tx, user.0, *meter, period, units).await?;
        }
        tx.commit().await.map_err(backend)?;
        match plan.refused {
            Some(refused) => Err(refused),
            None => Ok(plan.outcomes),
        }
    }

    async fn reserve(
        &self,
        record: &UsageRecord,
        period: Period,
        limit: Option<u64>,
    ) -> StoreResult<Recorded> {
        self.add_usage(record, period, limit, "reserved").await
    }

    async fn commit(&self, user: UserId, idempotency_key: &str) -> StoreResult<()> {
        let done = sql::<D>(
            "UPDATE usage_events SET status = 'committed'
             WHERE user_id = $1 AND idempotency_key = $2 AND status = 'reserved'",
        )
        .id(user.0)
        .bind(idempotency_key)
        .run(&mut *self.write_conn().await?)
        .await?;
        changed(done, "usage reservation")
    }

    async fn release(&self, user: UserId, idempotency_key: &str) -> StoreResult<()> {
        let mut tx = self.write().await?;
        let gone = sql::<D>(
            "DELETE FROM usage_events WHERE user_id = $1 AND idempotency_key = $2 AND status = 'reserved'
             RETURNING event_type, amount, period_start, period_end",
        )
        .id(user.0)
        .bind(idempotency_key)
        .opt(&mut tx)
        .await?;
        let Some(row) = gone else {
            return Err(StoreError::NotFound("usage reservation"));
        };
        let r = R::<D>(&row);
        sql::<D>(
            "UPDATE usage_counters SET used = used - $1
             WHERE user_id = $2 AND event_type = $3 AND period_start = $4 AND period_end = $5",
        )
        .bind(r.get::<i64>(1)?)
        .id(user.0)
        .bind(r.get::<String>(0)?)
        .at(r.at(2)?)
        .at(r.at(3)?)
        .run(&mut tx)
        .await?;
        tx.commit().await.map_err(backend)
    }

    async fn used(&self, user: UserId, meter: Meter, period: Period) -> StoreResult<u64> {
        let row = sql::<D>(
            "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM usage_events
             WHERE user_id = $1 AND event_type = $2 AND status = 'committed'
               AND created_at >= $3 AND created_at < $4",
        )
        .id(user.0)
        .bind(meter.as_str())
        .at(period.start)
        .at(period.end)
        .one(&mut *self.conn().await?)
        .await?;
        Ok(u64::try_from(R::<D>(&row).get::<i64>(0)?).unwrap_or(0))
    }
}

#[async_trait]
impl<D: Dialect> BillingStore for SqlStore<D> {
    async fn apply_plan_event(
        &self,
        user: UserId,
        change: &PlanChange,
        subscription: &UserSubscription,
        event: &SubscriptionEvent,
        now: DateTime<Utc>,
    ) -> StoreResult<Applied> {
        let mut tx = self.write().await?;
        // One user's events apply in turn.
        lock_user::<D>(&mut tx, user.0).await?;
        let row =
            sql::<D>("SELECT MAX(last_event_created) FROM user_subscriptions WHERE user_id = $1")
                .id(user.0)
                .one(&mut tx)
                .await?;
        if R::<D>(&row).opt_at(0)?.is_some_and(|l| l > event.created) {
            return Ok(Applied::Stale);
        }
        if let Some(id) = &event.stripe_event_id {
            let seen = sql::<D>("SELECT 1 FROM subscription_events WHERE stripe_event_id = $1")
                .bind(id.as_str())
                .opt(&mut tx)
                .await?;
            if seen.is_some() {
                return Ok(Applied::Duplicate);
            }
        }
        update_plan::<D>(&mut tx, user, change, now).await?;
        sql::<D>(
            "INSERT INTO user_subscriptions (user_id, stripe_subscription_id, stripe_customer_id, tier, status, price_id,
               current_period_end, last_event_created, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)
             ON CONFLICT (stripe_subscription_id) DO UPDATE SET stripe_customer_id = excluded.stripe_customer_id,
               tier = excluded.tier, status = excluded.status, price_id = excluded.price_id,
               current_period_end = excluded.current_period_end, last_event_created = excluded.last_event_created,
               updated_at = excluded.updated_at
             WHERE user_subscriptions.user_id = excluded.user_id",
        )
        .id(user.0)
        .bind(subscription.stripe_subscription_id.as_str())
        .bind(subscription.stripe_customer_id.as_deref())
        .bind(subscription.tier.as_str())
        .bind(subscription.status.as_deref())
        .bind(subscription.price_id.as_deref())
        .opt_at(subscription.current_period_end)
        .at(event.created)
        .at(now)
        .run(&mut tx)
        .await?;
        sql::<D>(
            "INSERT INTO subscription_events (id, user_id, stripe_event_id, event_type, tier, status, note, created, recorded_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .id(Uuid::new_v4())
        .id(user.0)
        .bind(event.stripe_event_id.as_deref())
        .bind(event.event_type.as_str())
        .bind(event.tier.as_str())
        .bind(event.status.as_deref())
        .bind(event.note.as_deref())
        .at(event.created)
        .at(now)
        .run(&mut tx)
        .await?;
        tx.commit().await.map_err(backend)?;
        Ok(Applied::Applied)
    }

    async fn user_subscription(&self, user: UserId) -> StoreResult<Option<UserSubscription>> {
        let row = sql::<D>(
            "SELECT stripe_subscription_id, stripe_customer_id, tier, status, price_id, current_period_end
             FROM user_subscriptions WHERE user_id = $1 ORDER BY last_event_created DESC, updated_at DESC LIMIT 1",
        )
        .id(user.0)
        .opt(&mut *self.conn().await?)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let r = R::<D>(&row);
        Ok(Some(UserSubscription {
            stripe_subscription_id: r.get(0)?,
            stripe_customer_id: r.get(1)?,
            tier: tier(&r.get::<String>(2)?)?,
            status: r.get(3)?,
            price_id: r.get(4)?,
            current_period_end: r.opt_at(5)?,
        }))
    }

    async fn last_subscription_event(&self, user: UserId) -> StoreResult<Option<DateTime<Utc>>> {
        let row = sql::<D>("SELECT MAX(created) FROM subscription_events WHERE user_id = $1")
            .id(user.0)
            .one(&mut *self.conn().await?)
            .await?;
        R::<D>(&row).opt_at(0)
    }

    async fn subscription_events(&self, user: UserId) -> StoreResult<Vec<SubscriptionEvent>> {
        let rows = sql::<D>(
            "SELECT stripe_event_id, event_type, tier, status, note, created FROM subscription_events
             WHERE user_id = $1 ORDER BY created, recorded_at",
        )
        .id(user.0)
        .all(&mut *self.conn().await?)
        .await?;
        rows.iter()
            .map(|row| {
                let r = R::<D>(row);
                Ok(SubscriptionEvent {
                    stripe_event_id: r.get(0)?,
                    event_type: r.get(1)?,
                    tier: tier(&r.get::<String>(2)?)?,
                    status: r.get(3)?,
                    note: r.get(4)?,
                    created: r.at(5)?,
                })
            })
            .collect()
    }
}

#[async_trait]
impl<D: Dialect> WebhookInbox for SqlStore<D> {
    async fn insert(&self, event: &InboxEvent) -> StoreResult<Inserted> {
        let done = sql::<D>(
            "INSERT INTO webhook_events (event_id, event_type, created, livemode, payload, received_at)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(event.event_id.as_str())
        .bind(event.event_type.as_str())
        .at(event.created)
        .bind(event.livemode)
        .bind(event.payload.as_str())
        .at(event.received_at)
        .run(&mut *self.write_conn().await?)
        .await?;
        Ok(if done == 1 {
            Inserted::New
        } else {
            Inserted::Duplicate
        })
    }

    async fn pending(&self, max: usize, max_attempts: u32) -> StoreResult<Vec<PendingEvent>> {
        let rows = sql::<D>(
            "SELECT event_id, event_type, created, livemode, payload, received_at, attempts, last_error
             FROM webhook_events WHERE processed_at IS NULL AND attempts < $1
             ORDER BY created, event_id LIMIT $2",
        )
        .int(Some(max_attempts.min(i32::MAX.unsigned_abs())))?
        .bind(limit(max))
        .all(&mut *self.conn().await?)
        .await?;
        rows.iter()
            .map(|row| {
                let r = R::<D>(row);
                Ok(PendingEvent {
                    event: InboxEvent {
                        event_id: r.get(0)?,
                        event_type: r.get(1)?,
                        created: r.at(2)?,
                        livemode: r.get(3)?,
                        payload: r.get(4)?,
                        received_at: r.at(5)?,
                    },
                    attempts: r.int(6)?.unwrap_or(u32::MAX),
                    last_error: r.get(7)?,
                })
            })
            .collect()
    }

    async fn mark_processed(&self, event_id: &str, now: DateTime<Utc>) -> StoreResult<()> {
        let done = sql::<D>("UPDATE webhook_events SET processed_at = $1 WHERE event_id = $2 AND processed_at IS NULL")
            .at(now)
            .bind(event_id)
            .run(&mut *self.write_conn().await?)
            .await?;
        changed(done, "webhook event")
    }

    async fn mark_failed(&self, event_id: &str, error: &str) -> StoreResult<()> {
        let done = sql::<D>(
            "UPDATE webhook_events SET attempts = attempts + 1, last_error = $1
             WHERE event_id = $2 AND processed_at IS NULL",
        )
        .bind(error)
        .bind(event_id)
        .run(&mut *self.write_conn().await?)
        .await?;
        changed(done, "webhook event")
    }
}

#[async_trait]
impl<D: Dialect> LeaseStore for SqlStore<D> {
    async fn acquire_lease(
        &self,
        key: &str,
        holder: &str,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        // One statement: insert, or take over an expired lease, or extend one's own; a live
        // lease of another holder matches no row.
        let done = sql::<D>(
            "INSERT INTO leases (key, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (key) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at <= $4",
        )
        .bind(key)
        .bind(holder)
        .at(until)
        .at(now)
        .run(&mut *self.write_conn().await?)
        .await?;
        Ok(done == 1)
    }

    async fn release_lease(&self, key: &str, holder: &str) -> StoreResult<()> {
        sql::<D>("DELETE FROM leases WHERE key = $1 AND holder = $2")
            .bind(key)
            .bind(holder)
            .run(&mut *self.write_conn().await?)
            .await
            .map(drop)
    }
}
