//! Generated insights and the figures they cite: [`InsightStore`].

use async_trait::async_trait;
use revpilot_core::insights::InsightKind;
use revpilot_core::ports::{
    ConnectionId, InsightRecord, InsightStore, StoreError, StoreResult, UserId,
};

use super::{Dialect, R, Row, SqlStore, backend, limit, sql, sql_owned};

fn insight_row<D: Dialect>(row: &Row<D>) -> StoreResult<InsightRecord> {
    let r = R::<D>(row);
    let kind: String = r.get(4)?;
    let figures: serde_json::Value = r.get(7)?;
    Ok(InsightRecord {
        id: r.id(0)?,
        generation: r.id(1)?,
        user: UserId(r.id(2)?),
        connection: r.opt_id(3)?.map(ConnectionId),
        kind: InsightKind::parse(&kind)
            .ok_or_else(|| StoreError::Invalid(format!("stored insight kind {kind:?}")))?,
        title: r.get(5)?,
        summary: r.get(6)?,
        figures: serde_json::from_value(figures)
            .map_err(|e| StoreError::Invalid(format!("stored insight figures: {e}")))?,
        provider: r.get(8)?,
        note: r.get(9)?,
        created_at: r.at(10)?,
    })
}

#[async_trait]
impl<D: Dialect> InsightStore for SqlStore<D> {
    async fn save_insights(&self, records: &[InsightRecord]) -> StoreResult<()> {
        let mut tx = self.write().await?;
        for r in records {
            let known = sql::<D>("SELECT 1 FROM user_profiles WHERE user_id = $1")
                .id(r.user.0)
                .opt(&mut tx)
                .await?;
            if known.is_none() {
                return Err(StoreError::NotFound("user"));
            }
            if let Some(c) = r.connection {
                let owned =
                    sql::<D>("SELECT 1 FROM stripe_connections WHERE id = $1 AND user_id = $2")
                        .id(c.0)
                        .id(r.user.0)
                        .opt(&mut tx)
                        .await?;
                if owned.is_none() {
                    return Err(StoreError::NotFound("connection"));
                }
            }
            let figures = serde_json::to_value(&r.figures)
                .map_err(|e| StoreError::Invalid(format!("insight figures: {e}")))?;
            sql::<D>(
                "INSERT INTO insights (id, generation_id, user_id, stripe_connection_id, kind, title,
                   summary, figures, provider, note, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .id(r.id)
            .id(r.generation)
            .id(r.user.0)
            .opt_id(r.connection.map(|c| c.0))
            .bind(r.kind.as_str())
            .bind(r.title.as_str())
            .bind(r.summary.as_str())
            .bind(figures)
            .bind(r.provider.as_str())
            .bind(r.note.as_deref())
            .at(r.created_at)
            .run(&mut tx)
            .await?;
        }
        tx.commit().await.map_err(backend)
    }

    async fn insights(
        &self,
        user: UserId,
        connection: Option<ConnectionId>,
        limit_to: usize,
    ) -> StoreResult<Vec<InsightRecord>> {
        let rows = sql_owned::<D>(format!(
            "SELECT id, generation_id, user_id, stripe_connection_id, kind, title, summary, figures,
               provider, note, created_at
             FROM insights WHERE user_id = $1 AND ({} IS NULL OR stripe_connection_id = $2)
             ORDER BY created_at DESC, kind LIMIT $3",
            D::typed(2, "uuid")
        ))
        .id(user.0)
        .opt_id(connection.map(|c| c.0))
        .bind(limit(limit_to))
        .all(&mut *self.conn().await?)
        .await?;
        rows.iter().map(insight_row::<D>).collect()
    }
}
