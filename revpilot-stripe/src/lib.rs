//! Stripe adapter for RevPilot: tolerant object types, the export file, the history rebuild,
//! Connect OAuth and a complete, resumable sync, billing webhooks.
//!
//! - [`objects`]: RevPilot's own tolerant types for the Stripe objects it reads, which accept
//!   today's API shapes and the older ones.
//! - [`export`]: an account's objects in one JSON file, read in parallel without a JSON tree.
//! - [`rebuild`]: Stripe objects -> the core's account timeline (pure).
//! - [`client`], [`connect`], [`sync`]: HTTP with Stripe's retry rules, Connect OAuth, the sync.
//! - [`webhook`]: `Stripe-Signature` verification (any `v1`, any secret, constant time).
//! - [`accounts`]: the accounts a process keeps per connection, loaded once per sync (single
//!   flight, bounded in bytes), with their series memo.
//! - [`app`]: the application's use cases ([`App`]): what a server does for a signed-in user,
//!   for Stripe's webhooks and for its cron, each answering a value or a
//!   [`revpilot_core::guard::Refusal`].
//! - [`jobs`]: the background use cases (sync under a lease, billing inbox, daily snapshot,
//!   period closing and overage) and the [`jobs::Runner`] that executes them.
//!
//! The types a program embedding RevPilot uses most are re-exported at the root
//! ([`App`], [`Runner`], [`Accounts`], [`Connect`], [`Client`], [`receive`], ...).
//!
//! # Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `fake` | a Stripe-shaped fake server ([`fake`], wiremock) for tests and benchmarks |
//! | `synth` | a deterministic Stripe-shaped export generator ([`synth`]) for tests, benchmarks and sample data; the demo's synthetic account ([`App::seed_demo`]) |
#![cfg_attr(docsrs, feature(doc_cfg))]
#![recursion_limit = "256"]

pub mod accounts;
pub mod app;
pub mod billing;
pub mod client;
pub mod connect;
pub mod export;
#[cfg(feature = "fake")]
#[cfg_attr(docsrs, doc(cfg(feature = "fake")))]
pub mod fake;
pub mod jobs;
pub mod objects;
pub mod rebuild;
pub mod sync;
#[cfg(feature = "synth")]
#[cfg_attr(docsrs, doc(cfg(feature = "synth")))]
pub mod synth;
pub mod webhook;

/// Describes the metrics this crate records (help text and units), for an exporter such as
/// Prometheus: billing webhook deliveries, insight generations, syncs, jobs and busy series
/// slots. Call it once after installing the recorder.
pub fn describe_metrics() {
    use metrics::describe_counter;
    describe_counter!(
        "revpilot_billing_webhooks_total",
        "Billing webhook deliveries, by outcome (stored, duplicate, ignored, refused)."
    );
    describe_counter!(
        "revpilot_insight_generations_total",
        "Insight generations, by the provider that wrote them (provider or local_fallback)."
    );
    describe_counter!(
        "revpilot_syncs_total",
        "Connection syncs run by this process's worker, by status."
    );
    describe_counter!(
        "revpilot_jobs_total",
        "Background jobs run by this process's worker, by kind and outcome."
    );
    describe_counter!(
        "revpilot_metrics_busy_total",
        "Metrics requests answered busy because every series-computation slot stayed busy."
    );
}

pub use accounts::{Accounts, Loaded, SharedAccounts};
pub use app::App;
pub use billing::{Processor, Receipt, ReceiveError, WebhookConfig, receive};
pub use client::{ApiError, Client, ClientConfig};
pub use connect::{Connect, ConnectConfig, ConnectError, receive_connect_event};
pub use export::{Export, ExportError, RawExport};
pub use jobs::{Done, Enqueue, EnqueueError, ExecuteJob, Job, JobError, RunAtOnce, Runner};
pub use rebuild::derived::{Held, LoadedAccount, load_account};
pub use sync::{SyncJob, SyncPorts, Syncer};
