//! Users, their plans and built-in accounts: [`UserStore`] and [`CredentialStore`].

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use revpilot_core::ports::{
    CredentialStore, Limits, PlanChange, StoreError, StoreResult, Tier, UserId, UserProfile,
    UserStore,
};
use uuid::Uuid;

use super::{Conn, Dialect, Q, R, Row, SqlStore, backend, is_unique, sql, sql_owned};

const USER_COLUMNS: &str = "user_id, email, subscription_tier, subscription_status, stripe_customer_id, \
     stripe_subscription_id, subscription_current_period_end, monthly_scenario_limit, \
     monthly_ai_insights_limit, monthly_transaction_volume_limit, created_at, updated_at, \
     subscription_current_period_start";

pub(crate) fn tier(stored: &str) -> StoreResult<Tier> {
    Tier::parse(stored).ok_or_else(|| StoreError::Invalid(format!("stored tier {stored:?}")))
}

fn user_row<D: Dialect>(row: &Row<D>) -> StoreResult<UserProfile> {
    let r = R::<D>(row);
    Ok(UserProfile {
        user_id: UserId(r.id(0)?),
        email: r.get(1)?,
        tier: tier(&r.get::<String>(2)?)?,
        subscription_status: r.get(3)?,
        stripe_customer_id: r.get(4)?,
        stripe_subscription_id: r.get(5)?,
        current_period_start: r.opt_at(12)?,
        current_period_end: r.opt_at(6)?,
        limits: Limits {
            scenarios: r.int(7)?,
            ai_insights: r.int(8)?,
            transaction_volume: r
                .get::<Option<i64>>(9)?
                .map(|v| {
                    u64::try_from(v).map_err(|_| StoreError::Invalid(format!("stored limit {v}")))
                })
                .transpose()?,
        },
        created_at: r.at(10)?,
        updated_at: r.at(11)?,
    })
}

/// Locks the user's profile row until the transaction ends, so that one user's writes that read
/// before they write take turns; [`StoreError::NotFound`] when there is no such user.
pub(crate) async fn lock_user<D: Dialect>(tx: &mut Conn<D>, user: Uuid) -> StoreResult<()> {
    sql_owned::<D>(format!(
        "SELECT 1 FROM user_profiles WHERE user_id = $1{}",
        D::FOR_UPDATE
    ))
    .id(user)
    .opt(tx)
    .await?
    .map(drop)
    .ok_or(StoreError::NotFound("user"))
}

/// The profile INSERT of [`UserStore::create_user`], on any connection or transaction.
async fn insert_user<D: Dialect>(
    c: &mut Conn<D>,
    user: UserId,
    email: Option<&str>,
    tier: Tier,
    limits: Limits,
    now: DateTime<Utc>,
) -> StoreResult<UserProfile> {
    let volume = crate::volume_to_db(&limits)?;
    let row = sql_owned::<D>(format!(
        "INSERT INTO user_profiles (user_id, email, subscription_tier, monthly_scenario_limit,
           monthly_ai_insights_limit, monthly_transaction_volume_limit, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7) RETURNING {USER_COLUMNS}"
    ))
    .id(user.0)
    .bind(email)
    .bind(tier.as_str())
    .int(limits.scenarios)?
    .int(limits.ai_insights)?
    .bind(volume)
    .at(now)
    .try_opt(c)
    .await
    .map_err(|e| {
        if is_unique(&e) {
            StoreError::Conflict(format!("user {user} or email"))
        } else {
            backend(e)
        }
    })?
    .ok_or_else(|| backend(sqlx::Error::RowNotFound))?;
    user_row::<D>(&row)
}

/// The plan UPDATE of [`UserStore::set_plan`], on any connection or transaction.
pub(crate) async fn update_plan<D: Dialect>(
    c: &mut Conn<D>,
    user: UserId,
    change: &PlanChange,
    now: DateTime<Utc>,
) -> StoreResult<UserProfile> {
    let volume = crate::volume_to_db(&change.limits)?;
    let row = sql_owned::<D>(format!(
        "UPDATE user_profiles SET subscription_tier = $1, subscription_status = $2,
           stripe_customer_id = COALESCE($3, stripe_customer_id), stripe_subscription_id = $4,
           subscription_current_period_end = $5, monthly_scenario_limit = $6,
           monthly_ai_insights_limit = $7, monthly_transaction_volume_limit = $8, updated_at = $9,
           subscription_current_period_start = $11
         WHERE user_id = $10 RETURNING {USER_COLUMNS}"
    ))
    .bind(change.tier.as_str())
    .bind(change.subscription_status.as_deref())
    .bind(change.stripe_customer_id.as_deref())
    .bind(change.stripe_subscription_id.as_deref())
    .opt_at(change.current_period_end)
    .int(change.limits.scenarios)?
    .int(change.limits.ai_insights)?
    .bind(volume)
    .at(now)
    .id(user.0)
    .opt_at(change.current_period_start)
    .try_opt(c)
    .await
    .map_err(|e| {
        if is_unique(&e) {
            StoreError::Conflict("Stripe customer or subscription of another user".into())
        } else {
            backend(e)
        }
    })?;
    row.as_ref()
        .map(user_row::<D>)
        .transpose()?
        .ok_or(StoreError::NotFound("user"))
}

impl<D: Dialect> SqlStore<D> {
    /// The profile matching `condition`, its parameter bound by `bind`.
    async fn user_where(
        &self,
        condition: &str,
        bind: impl FnOnce(Q<D>) -> Q<D> + Send,
    ) -> StoreResult<Option<UserProfile>> {
        bind(sql_owned::<D>(format!(
            "SELECT {USER_COLUMNS} FROM user_profiles WHERE {condition}"
        )))
        .opt(&mut *self.conn().await?)
        .await?
        .as_ref()
        .map(user_row::<D>)
        .transpose()
    }
}

#[async_trait]
impl<D: Dialect> UserStore for SqlStore<D> {
    async fn create_user(
        &self,
        user: UserId,
        email: Option<&str>,
        tier: Tier,
        limits: Limits,
        now: DateTime<Utc>,
    ) -> StoreResult<UserProfile> {
        insert_user::<D>(
            &mut *self.write_conn().await?,
            user,
            email,
            tier,
            limits,
            now,
        )
        .await
    }

    async fn user(&self, user: UserId) -> StoreResult<Option<UserProfile>> {
        self.user_where("user_id = $1", |q| q.id(user.0)).await
    }

    async fn user_by_email(&self, email: &str) -> StoreResult<Option<UserProfile>> {
        self.user_where(&D::email_is("email", 1), |q| q.bind(email))
            .await
    }

    async fn user_by_stripe_customer(&self, customer: &str) -> StoreResult<Option<UserProfile>> {
        self.user_where("stripe_customer_id = $1", |q| q.bind(customer))
            .await
    }

    async fn user_by_stripe_subscription(
        &self,
        subscription: &str,
    ) -> StoreResult<Option<UserProfile>> {
        self.user_where("stripe_subscription_id = $1", |q| q.bind(subscription))
            .await
    }

    async fn set_plan(
        &self,
        user: UserId,
        change: &PlanChange,
        now: DateTime<Utc>,
    ) -> StoreResult<UserProfile> {
        update_plan::<D>(&mut *self.write_conn().await?, user, change, now).await
    }

    async fn set_stripe_customer(
        &self,
        user: UserId,
        customer: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<UserProfile> {
        let row = sql_owned::<D>(format!(
            "UPDATE user_profiles SET stripe_customer_id = COALESCE(stripe_customer_id, $1),
               updated_at = CASE WHEN stripe_customer_id IS NULL THEN $2 ELSE updated_at END
             WHERE user_id = $3 RETURNING {USER_COLUMNS}"
        ))
        .bind(customer)
        .at(now)
        .id(user.0)
        .try_opt(&mut *self.write_conn().await?)
        .await
        .map_err(|e| {
            if is_unique(&e) {
                StoreError::Conflict(format!("Stripe customer {customer}"))
            } else {
                backend(e)
            }
        })?;
        row.as_ref()
            .map(user_row::<D>)
            .transpose()?
            .ok_or(StoreError::NotFound("user"))
    }

    async fn billable_users(&self) -> StoreResult<Vec<UserProfile>> {
        sql_owned::<D>(format!(
            "SELECT {USER_COLUMNS} FROM user_profiles WHERE stripe_customer_id IS NOT NULL ORDER BY user_id"
        ))
        .all(&mut *self.conn().await?)
        .await?
        .iter()
        .map(user_row::<D>)
        .collect()
    }
}

#[async_trait]
impl<D: Dialect> CredentialStore for SqlStore<D> {
    async fn create_account(
        &self,
        user: UserId,
        email: &str,
        password_hash: &str,
        tier: Tier,
        limits: Limits,
        now: DateTime<Utc>,
    ) -> StoreResult<UserProfile> {
        let mut tx = self.write().await?;
        let profile = insert_user::<D>(&mut tx, user, Some(email), tier, limits, now).await?;
        sql::<D>(
            "INSERT INTO user_credentials (user_id, password_hash, created_at) VALUES ($1, $2, $3)",
        )
        .id(user.0)
        .bind(password_hash)
        .at(now)
        .run(&mut tx)
        .await?;
        tx.commit().await.map_err(backend)?;
        Ok(profile)
    }

    async fn credentials(&self, email: &str) -> StoreResult<Option<(UserId, String)>> {
        let row = sql_owned::<D>(format!(
            "SELECT p.user_id, c.password_hash FROM user_profiles p
             JOIN user_credentials c ON c.user_id = p.user_id WHERE {}",
            D::email_is("p.email", 1)
        ))
        .bind(email)
        .opt(&mut *self.conn().await?)
        .await?;
        row.map(|row| {
            let r = R::<D>(&row);
            Ok((UserId(r.id(0)?), r.get(1)?))
        })
        .transpose()
    }

    async fn end_session(
        &self,
        session: &str,
        expires: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        revpilot_core::ports::check_session_id(session)?;
        let mut c = self.write_conn().await?;
        sql::<D>("DELETE FROM ended_sessions WHERE expires_at < $1")
            .at(now)
            .run(&mut c)
            .await?;
        sql::<D>(
            "INSERT INTO ended_sessions (session_id, expires_at) VALUES ($1, $2)
             ON CONFLICT (session_id) DO NOTHING",
        )
        .bind(session)
        .at(expires)
        .run(&mut c)
        .await?;
        Ok(())
    }

    async fn session_ended(&self, session: &str) -> StoreResult<bool> {
        let row = sql::<D>("SELECT 1 FROM ended_sessions WHERE session_id = $1")
            .bind(session)
            .opt(&mut *self.conn().await?)
            .await?;
        Ok(row.is_some())
    }
}
