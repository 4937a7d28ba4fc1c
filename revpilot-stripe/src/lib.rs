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
//! - [`jobs`]: the background use cases (sync under a lease, billing inbox, daily snapshot,
//!   period closing and overage) and the [`jobs::Runner`] that executes them.
//!
//! The types a program embedding RevPilot uses most are re-exported at the root
//! ([`Runner`], [`Accounts`], [`Connect`], [`Client`], [`receive`], ...).
//!
//! # Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `fake` | a Stripe-shaped fake server ([`fake`], wiremock) for tests and benchmarks |
//! | `synth` | a deterministic Stripe-shaped export generator ([`synth`]) for tests, benchmarks and sample data |
#![cfg_attr(docsrs, feature(doc_cfg))]
#![recursion_limit = "256"]

pub mod accounts;
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

pub use accounts::{Accounts, Loaded, SharedAccounts};
pub use billing::{Processor, Receipt, ReceiveError, WebhookConfig, receive};
pub use client::{ApiError, Client, ClientConfig};
pub use connect::{Connect, ConnectConfig, ConnectError, receive_connect_event};
pub use export::{Export, ExportError, RawExport};
pub use jobs::{Done, Enqueue, EnqueueError, ExecuteJob, Job, JobError, RunAtOnce, Runner};
pub use rebuild::derived::{LoadedAccount, load_account};
pub use sync::{SyncJob, SyncPorts, Syncer};
