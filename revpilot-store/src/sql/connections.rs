//! Stripe connections and how they sync: [`ConnectionStore`], [`OAuthStateStore`] and
//! [`SyncStateStore`].

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use revpilot_core::ports::{
    Connection, ConnectionId, ConnectionStore, NewConnection, OAuthStateStore, RunOutcome,
    StoreError, StoreResult, SyncRun, SyncStateStore, SyncStatus, Tokens, UserId,
};
use uuid::Uuid;

use super::{
    Dialect, R, Row, SqlStore, backend, changed, count, is_unique, missing, sql, sql_owned,
};

const CONNECTION_COLUMNS: &str = "id, user_id, stripe_account_id, business_name, currency, is_active, last_synced_at, created_at, updated_at";

fn connection_row<D: Dialect>(row: &Row<D>) -> StoreResult<Connection> {
    let r = R::<D>(row);
    Ok(Connection {
        id: ConnectionId(r.id(0)?),
        user: UserId(r.id(1)?),
        stripe_account_id: r.get(2)?,
        business_name: r.get(3)?,
        currency: r.get(4)?,
        is_active: r.get(5)?,
        last_synced_at: r.opt_at(6)?,
        created_at: r.at(7)?,
        updated_at: r.at(8)?,
    })
}

#[async_trait]
impl<D: Dialect> ConnectionStore for SqlStore<D> {
    async fn save_connection(
        &self,
        new: NewConnection,
        now: DateTime<Utc>,
    ) -> StoreResult<Connection> {
        let user = new.user.0;
        let mut tx = self.write().await?;
        let existing = sql_owned::<D>(format!(
            "SELECT id, user_id FROM stripe_connections WHERE stripe_account_id = $1{}",
            D::FOR_UPDATE
        ))
        .bind(new.stripe_account_id.as_str())
        .opt(&mut tx)
        .await?;
        let id = match existing {
            Some(row) => {
                let r = R::<D>(&row);
                if r.id(1)? != user {
                    return Err(StoreError::Conflict(format!(
                        "Stripe account {}",
                        new.stripe_account_id
                    )));
                }
                r.id(0)?
            }
            None => Uuid::new_v4(),
        };
        let (access, refresh, key_id) = self.seal_tokens(&new.tokens, id, user)?;
        let row = sql_owned::<D>(format!(
            "INSERT INTO stripe_connections (id, user_id, stripe_account_id, access_token_enc, refresh_token_enc,
               token_key_id, business_name, currency, is_active, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, TRUE, $9, $9)
             ON CONFLICT (id) DO UPDATE SET access_token_enc = excluded.access_token_enc,
               refresh_token_enc = excluded.refresh_token_enc, token_key_id = excluded.token_key_id,
               business_name = excluded.business_name, currency = excluded.currency, is_active = TRUE,
               updated_at = excluded.updated_at
             RETURNING {CONNECTION_COLUMNS}"
        ))
        .id(id)
        .id(user)
        .bind(new.stripe_account_id.as_str())
        .bind(access)
        .bind(refresh)
        .bind(key_id)
        .bind(new.business_name.as_deref())
        .bind(new.currency.as_deref())
        .at(now)
        .try_opt(&mut tx)
        .await
        .map_err(|e| {
            // Two first connections of one account at once: the row did not exist to lock.
            if is_unique(&e) {
                StoreError::Conflict(format!("Stripe account {}", new.stripe_account_id))
            } else {
                missing("user")(e)
            }
        })?
        .ok_or_else(|| backend(sqlx::Error::RowNotFound))?;
        let connection = connection_row::<D>(&row)?;
        tx.commit().await.map_err(backend)?;
        Ok(connection)
    }

    async fn connection(&self, user: UserId, id: ConnectionId) -> StoreResult<Option<Connection>> {
        sql_owned::<D>(format!(
            "SELECT {CONNECTION_COLUMNS} FROM stripe_connections WHERE id = $1 AND user_id = $2"
        ))
        .id(id.0)
        .id(user.0)
        .opt(&mut *self.conn().await?)
        .await?
        .as_ref()
        .map(connection_row::<D>)
        .transpose()
    }

    async fn connections(&self, user: UserId) -> StoreResult<Vec<Connection>> {
        let rows = sql_owned::<D>(format!(
            "SELECT {CONNECTION_COLUMNS} FROM stripe_connections WHERE user_id = $1 ORDER BY created_at, id"
        ))
        .id(user.0)
        .all(&mut *self.conn().await?)
        .await?;
        rows.iter().map(connection_row::<D>).collect()
    }

    async fn active_connections(&self) -> StoreResult<Vec<Connection>> {
        let rows = sql_owned::<D>(format!(
            "SELECT {CONNECTION_COLUMNS} FROM stripe_connections WHERE is_active ORDER BY created_at, id"
        ))
        .all(&mut *self.conn().await?)
        .await?;
        rows.iter().map(connection_row::<D>).collect()
    }

    async fn tokens(&self, user: UserId, id: ConnectionId) -> StoreResult<Option<Tokens>> {
        let row = sql::<D>(
            "SELECT id, user_id, access_token_enc, refresh_token_enc, token_key_id FROM stripe_connections
             WHERE id = $1 AND user_id = $2 AND is_active AND access_token_enc IS NOT NULL",
        )
        .id(id.0)
        .id(user.0)
        .opt(&mut *self.conn().await?)
        .await?;
        row.map(|r| self.open_tokens(&R::<D>(&r), id.0, user.0))
            .transpose()
    }

    async fn deactivate(
        &self,
        stripe_account_id: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Connection>> {
        sql_owned::<D>(format!(
            "UPDATE stripe_connections SET is_active = FALSE, access_token_enc = NULL, refresh_token_enc = NULL,
               token_key_id = NULL, updated_at = $1
             WHERE stripe_account_id = $2 RETURNING {CONNECTION_COLUMNS}"
        ))
        .at(now)
        .bind(stripe_account_id)
        .opt(&mut *self.conn().await?)
        .await?
        .as_ref()
        .map(connection_row::<D>)
        .transpose()
    }

    async fn set_last_synced(&self, id: ConnectionId, at: DateTime<Utc>) -> StoreResult<()> {
        let done = sql::<D>("UPDATE stripe_connections SET last_synced_at = $1 WHERE id = $2")
            .at(at)
            .id(id.0)
            .run(&mut *self.write_conn().await?)
            .await?;
        changed(done, "connection")
    }
}

#[async_trait]
impl<D: Dialect> OAuthStateStore for SqlStore<D> {
    async fn put_state(
        &self,
        state: &str,
        user: UserId,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut c = self.write_conn().await?;
        // Expired states go as new ones come, whether or not their callback ever does.
        sql::<D>("DELETE FROM oauth_states WHERE expires_at <= $1")
            .at(Utc::now())
            .run(&mut c)
            .await?;
        sql::<D>("INSERT INTO oauth_states (state, user_id, expires_at) VALUES ($1, $2, $3)")
            .bind(state)
            .id(user.0)
            .at(expires_at)
            .try_run(&mut c)
            .await
            .map_err(|e| {
                if is_unique(&e) {
                    StoreError::Conflict("OAuth state".into())
                } else {
                    missing("user")(e)
                }
            })?;
        Ok(())
    }

    async fn take_state(
        &self,
        state: &str,
        user: UserId,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<UserId>> {
        let mut c = self.write_conn().await?;
        sql::<D>("DELETE FROM oauth_states WHERE expires_at <= $1")
            .at(now)
            .run(&mut c)
            .await?;
        // Deleting is the single use: of concurrent takes, one deletes the row, the others find
        // nothing. Only the state's own user deletes it.
        let taken = sql::<D>(
            "DELETE FROM oauth_states WHERE state = $1 AND user_id = $2 RETURNING user_id, expires_at",
        )
        .bind(state)
        .id(user.0)
        .opt(&mut c)
        .await?;
        if let Some(row) = taken {
            let r = R::<D>(&row);
            let (owner, expires) = (r.id(0)?, r.at(1)?);
            return Ok((now < expires).then_some(UserId(owner)));
        }
        let owner =
            sql::<D>("SELECT user_id FROM oauth_states WHERE state = $1 AND expires_at > $2")
                .bind(state)
                .at(now)
                .opt(&mut c)
                .await?;
        owner.map(|row| R::<D>(&row).id(0).map(UserId)).transpose()
    }
}

#[async_trait]
impl<D: Dialect> SyncStateStore for SqlStore<D> {
    async fn cursor(&self, connection: ConnectionId, stream: &str) -> StoreResult<Option<String>> {
        sql::<D>(
            "SELECT cursor FROM sync_cursors WHERE stripe_connection_id = $1 AND object_kind = $2",
        )
        .id(connection.0)
        .bind(stream)
        .opt(&mut *self.conn().await?)
        .await?
        .map(|row| R::<D>(&row).get(0))
        .transpose()
    }

    async fn set_cursor(
        &self,
        connection: ConnectionId,
        stream: &str,
        cursor: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        sql::<D>(
            "INSERT INTO sync_cursors (stripe_connection_id, object_kind, cursor, updated_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (stripe_connection_id, object_kind) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at",
        )
        .id(connection.0)
        .bind(stream)
        .bind(cursor)
        .at(now)
        .try_run(&mut *self.write_conn().await?)
        .await
        .map_err(missing("connection"))?;
        Ok(())
    }

    async fn clear_cursors(&self, connection: ConnectionId) -> StoreResult<()> {
        sql::<D>("DELETE FROM sync_cursors WHERE stripe_connection_id = $1")
            .id(connection.0)
            .run(&mut *self.write_conn().await?)
            .await?;
        Ok(())
    }

    async fn start_run(&self, connection: ConnectionId, now: DateTime<Utc>) -> StoreResult<Uuid> {
        let id = Uuid::new_v4();
        sql::<D>("INSERT INTO sync_runs (id, stripe_connection_id, started_at, status) VALUES ($1, $2, $3, 'running')")
            .id(id)
            .id(connection.0)
            .at(now)
            .try_run(&mut *self.write_conn().await?)
            .await
            .map_err(missing("connection"))?;
        Ok(id)
    }

    async fn finish_run(
        &self,
        run: Uuid,
        status: SyncStatus,
        outcome: &RunOutcome,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        status.ensure_final()?;
        let done = sql::<D>(
            "UPDATE sync_runs SET finished_at = $1, status = $2, objects = $3, requests = $4, retries = $5, error = $6
             WHERE id = $7 AND status = 'running'",
        )
        .at(now)
        .bind(status.as_str())
        .bind(crate::counts_json(&outcome.objects))
        .bind(count(outcome.requests)?)
        .bind(count(outcome.retries)?)
        .bind(outcome.error.as_deref())
        .id(run)
        .run(&mut *self.write_conn().await?)
        .await?;
        changed(done, "running sync run")
    }

    async fn last_run(
        &self,
        user: UserId,
        connection: ConnectionId,
    ) -> StoreResult<Option<SyncRun>> {
        let row = sql::<D>(
            "SELECT r.id, r.started_at, r.finished_at, r.status, r.objects, r.requests, r.retries, r.error
             FROM sync_runs r JOIN stripe_connections c ON c.id = r.stripe_connection_id
             WHERE r.stripe_connection_id = $1 AND c.user_id = $2
             ORDER BY r.started_at DESC, r.id DESC LIMIT 1",
        )
        .id(connection.0)
        .id(user.0)
        .opt(&mut *self.conn().await?)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let r = R::<D>(&row);
        let status: String = r.get(3)?;
        let objects: serde_json::Value = r.get(4)?;
        Ok(Some(SyncRun {
            id: r.id(0)?,
            connection,
            started_at: r.at(1)?,
            finished_at: r.opt_at(2)?,
            status: SyncStatus::parse(&status)
                .ok_or_else(|| StoreError::Invalid(format!("stored status {status:?}")))?,
            outcome: RunOutcome {
                objects: serde_json::from_value(objects)
                    .map_err(|e| StoreError::Invalid(format!("stored run objects: {e}")))?,
                requests: r.count(5)?,
                retries: r.count(6)?,
                error: r.get(7)?,
            },
        }))
    }
}
