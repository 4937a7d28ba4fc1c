//! RevPilot's storage adapter: every storage port of `revpilot-core` on SQLite (feature `sqlite`,
//! the embedded default: bundled, WAL, foreign keys on, nothing to install) and PostgreSQL
//! (feature `postgres`, for many servers and workers on one database).
//!
//! ```no_run
//! # async fn demo() -> Result<(), revpilot_store::Error> {
//! use revpilot_store::{KeyRing, SqliteStore};
//! let keys = KeyRing::parse(&std::env::var("REVPILOT_ENCRYPTION_KEY").unwrap_or_default())?;
//! let store = SqliteStore::connect("sqlite://revpilot.db", keys).await?;
//! # Ok(()) }
//! ```
//!
//! Guarantees, checked by `revpilot_core::testing::conformance` and this crate's tests: usage is
//! recorded once per key and atomically against limits; the webhook inbox stores an event id once;
//! an older cached object never overwrites a newer one, and an unchanged one is not rewritten;
//! every read of a connection's data takes its owner; money is stored exactly (decimal text on
//! SQLite, NUMERIC on PostgreSQL); Stripe tokens are stored only encrypted, bound to their
//! connection and user.
//!
//! Both backends are one implementation, [`sql::SqlStore`], generic over a [`sql::Dialect`] that
//! says how ids, instants and money bind and how a write takes its lock; each backend's
//! migrations are embedded with `sqlx::migrate!`.
//!
//! # Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `sqlite` | (default) [`SqliteStore`]: sqlx with bundled SQLite, nothing to install |
//! | `postgres` | [`PgStore`]: PostgreSQL, for many servers and workers on one database |
//! | `auth` | [`auth`]: session tokens (HS256 JWT) and argon2id password hashes on bounded threads, for an application's own accounts; [`auth::Sessions`], sign-up, log-in, log-out and who a token is, as use cases |
//! | `jwks` | `auth::jwks`: tokens of an identity provider (Supabase) signed with asymmetric keys, verified against its JWKS (adds reqwest) |
//! | `queue` | [`queue`]: the persistent job queue (apalis) in the store's own database, both backends |
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "auth")]
#[cfg_attr(docsrs, doc(cfg(feature = "auth")))]
pub mod auth;
mod crypto;
#[cfg(feature = "queue")]
#[cfg_attr(docsrs, doc(cfg(feature = "queue")))]
pub mod queue;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "sqlite", feature = "postgres"))))]
pub mod sql;

pub use crypto::{KeyError, KeyRing, Sealed};

/// Every storage port on PostgreSQL (UUID, TIMESTAMPTZ, NUMERIC), shared by any number of servers
/// and workers: [`sql::SqlStore`] over [`sql::Postgres`].
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub type PgStore = sql::SqlStore<sql::Postgres>;
/// Every storage port on one SQLite file, the embedded default: [`sql::SqlStore`] over
/// [`sql::Sqlite`].
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub type SqliteStore = sql::SqlStore<sql::Sqlite>;

/// Why a store cannot be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database URL is not one this build can open.
    #[error("invalid database URL {url:?}: {problem}")]
    InvalidUrl {
        /// The URL, with any password removed.
        url: String,
        /// What is wrong with it.
        problem: String,
        /// The driver's error, when the driver refused the URL (its message is `problem`).
        #[source]
        source: Option<sqlx::Error>,
    },
    /// The database cannot be opened or is not a RevPilot database.
    #[error("cannot open database {url:?}: {problem}")]
    Open {
        /// The URL, with any password removed.
        url: String,
        /// What went wrong.
        problem: String,
        /// The driver's (or the migrator's) error, when one caused this; its message is in
        /// `problem`. `None` when the database opened but is not one this store can use.
        #[source]
        source: Option<sqlx::Error>,
    },
    /// The encryption keys are missing or malformed.
    #[error(transparent)]
    Keys(#[from] KeyError),
}

/// The transaction-volume limit as the databases store it (a signed 64-bit integer; `None` is
/// unlimited).
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn volume_to_db(
    limits: &revpilot_core::ports::Limits,
) -> revpilot_core::ports::StoreResult<Option<i64>> {
    limits
        .transaction_volume
        .map(|v| {
            i64::try_from(v).map_err(|_| {
                revpilot_core::ports::StoreError::Invalid(format!("limit {v} is too large"))
            })
        })
        .transpose()
}

/// A sync run's object counts by stream name, as the `objects` column holds them: always JSON,
/// built directly, so there is no error to report.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn counts_json(counts: &std::collections::BTreeMap<String, u64>) -> serde_json::Value {
    serde_json::Value::Object(
        counts
            .iter()
            .map(|(stream, n)| (stream.clone(), serde_json::Value::from(*n)))
            .collect(),
    )
}

/// `url` without a password, for error messages.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..scheme + 3], user, &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            super::redact("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(super::redact("sqlite://file.db"), "sqlite://file.db");
    }
}
