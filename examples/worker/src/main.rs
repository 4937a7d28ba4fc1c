//! `revpilot-worker`: runs the jobs of the RevPilot queue (syncs, the billing inbox, daily
//! snapshots, end-of-period overage) from the store's database until Ctrl-C or SIGTERM, then
//! lets the jobs in hand finish or hands them back to the queue, and exits within
//! `REVPILOT_SHUTDOWN_GRACE_SECS` (a second signal exits at once). Run as many as needed
//! against one PostgreSQL database.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use revpilot_store::KeyRing;
use revpilot_stripe::client::Client;
use revpilot_worker::{QUEUE, Runner, ShutdownGuard, open, shutdown_signal};

// mimalloc hands freed memory back to the system shortly after a large load; glibc's allocator
// keeps it resident in its arenas.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The RevPilot example worker.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// `sqlite://FILE` or `postgres://...` (the server's).
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://revpilot.db")]
    database_url: String,
    /// Encryption keys of stored Stripe tokens: `id:base64key[,id:base64key]` (the server's).
    #[arg(long, env = "REVPILOT_ENCRYPTION_KEY", hide_env_values = true)]
    encryption_key: String,
    /// The company's own Stripe secret key: billing events and overage invoices (optional).
    #[arg(long, env = "STRIPE_SECRET_KEY", hide_env_values = true)]
    stripe_secret_key: Option<String>,
    /// Stripe's API base (a fake in tests).
    #[arg(long, env = "STRIPE_API_BASE")]
    stripe_api_base: Option<String>,
    /// A TOML tier catalog replacing the default tiers (the server's).
    #[arg(long, env = "REVPILOT_CATALOG")]
    catalog: Option<PathBuf>,
    /// This worker's name (logs, the queue's worker table, lease holder).
    #[arg(long, env = "REVPILOT_WORKER_NAME", default_value = "worker")]
    name: String,
    /// The queue.
    #[arg(long, env = "REVPILOT_QUEUE", default_value = QUEUE)]
    queue: String,
    /// Seconds between the worker's heartbeats; a worker silent for two is dead, and the jobs it
    /// held run again elsewhere.
    #[arg(long, env = "REVPILOT_WORKER_HEARTBEAT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    heartbeat_secs: u64,
    /// Seconds a sync's lease on its connection lasts without renewal (renewed every third
    /// while the sync runs): how long a killed worker's connection waits before another sync.
    #[arg(long, env = "REVPILOT_SYNC_LEASE_SECS", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(3..))]
    lease_secs: u64,
    /// Seconds a shutdown may take: after the first SIGTERM or Ctrl-C, jobs in hand may finish
    /// for most of it, then go back to the queue; past it the process exits. A second signal
    /// exits at once.
    #[arg(long, env = "REVPILOT_SHUTDOWN_GRACE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    shutdown_grace_secs: u64,
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("revpilot-worker: {message}");
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let guard = match ShutdownGuard::install(Duration::from_secs(args.shutdown_grace_secs)) {
        Ok(g) => g,
        Err(e) => return fail(format!("signal handlers: {e}")),
    };
    let catalog = match revpilot_worker::load_catalog(args.catalog.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let keys = match KeyRing::parse(&args.encryption_key) {
        Ok(k) => k,
        Err(e) => return fail(format!("REVPILOT_ENCRYPTION_KEY: {e}")),
    };
    let (store, queue) = match open(&args.database_url, keys, &args.queue).await {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    let queue = queue.with_heartbeat(Duration::from_secs(args.heartbeat_secs));
    // The queue knows workers by id: a unique one per process, so a worker restarted under the
    // same name does not inherit (and strand) the jobs its previous life held.
    let id = revpilot_worker::unique(&args.name);
    let mut runner = Runner::new(store, &id);
    runner.lease = Duration::from_secs(args.lease_secs);
    runner.catalog = Arc::new(catalog);
    if let Some(base) = &args.stripe_api_base {
        match url::Url::parse(base) {
            Ok(u) => runner.stripe_api_base = u,
            Err(e) => return fail(format!("STRIPE_API_BASE {base:?}: {e}")),
        }
    }
    let base = Some(runner.stripe_api_base.as_str());
    match Client::from_key(args.stripe_secret_key.as_deref(), base) {
        Ok(Some(c)) => runner.billing = Some(c),
        Ok(None) => tracing::warn!(
            "STRIPE_SECRET_KEY is not set: billing events and overage invoices are skipped"
        ),
        Err(e) => return fail(format!("STRIPE_SECRET_KEY / STRIPE_API_BASE: {e}")),
    }
    let result = revpilot_worker::work(queue, runner, id, shutdown_signal(), guard.drain()).await;
    match result {
        Ok(()) => {
            tracing::info!("worker stopped");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}
