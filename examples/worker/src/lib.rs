//! The RevPilot example worker, as a library: what the example server and worker share beyond
//! RevPilot's crates — reading the tier catalog and a bounded shutdown. The persistent [`Queue`]
//! (apalis on the store's own database: [`revpilot_store::queue`]), the jobs and the [`Runner`]
//! that executes them ([`revpilot_stripe::jobs`]) are the library's, re-exported here.
//!
//! Jobs survive restarts (they are rows), retry with exponential backoff, and a stopped worker
//! finishes the job in hand before it exits.

use std::sync::Arc;
use std::time::Duration;

use revpilot_core::billing::Catalog;

pub use revpilot_core::ports::{Clock, Store};
pub use revpilot_store::queue::{self, OpenError, QUEUE, Queue, QueueError, open};
pub use revpilot_stripe::jobs::{
    AccountSource, Done, Enqueue, Job, JobError, LEASE, Runner, periodic_jobs, spawn_scheduler,
};

/// The tier catalog: the TOML file at `path` (`REVPILOT_CATALOG`) or the default tiers, with
/// the Stripe price ids from `STRIPE_<TIER>_PRICE_ID`. The server and the worker read it alike.
///
/// # Errors
/// A message naming the file or the field at fault.
pub fn load_catalog(path: Option<&std::path::Path>) -> Result<Catalog, String> {
    let catalog = match path {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => Catalog::from_toml(&text),
            Err(e) => return Err(format!("REVPILOT_CATALOG {}: {e}", path.display())),
        },
        None => Ok(Catalog::default()),
    };
    catalog
        .and_then(|c| c.with_price_ids_from(|name| std::env::var(name).ok()))
        .map_err(|e| e.to_string())
}

/// `name` with a random suffix: a worker id unique per process.
pub fn unique(name: &str) -> String {
    format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// Runs `runner`'s jobs from `queue` as the worker `id`, with the periodic jobs' scheduler,
/// until `shutdown` completes; the jobs in hand then have `drain` to finish before they go back
/// to the queue.
///
/// # Errors
/// The queue's.
pub async fn work(
    queue: Queue,
    mut runner: Runner,
    id: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> Result<(), QueueError> {
    runner.queue = Some(Arc::new(queue.clone()));
    let every = Duration::from_secs(600);
    let scheduler = spawn_scheduler(Arc::new(queue.clone()), runner.clock.clone(), every);
    tracing::info!(%id, "worker started");
    let result = queue.run(Arc::new(runner), id, shutdown, drain).await;
    scheduler.abort();
    result
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// The default grace period of a shutdown (`REVPILOT_SHUTDOWN_GRACE_SECS`).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Exit status of a process ended by a second signal or by its grace period running out.
pub const FORCED_EXIT: i32 = 1;

/// Bounds a process's shutdown, whatever state its runtime is in. Installed once at start:
/// - a **second** SIGTERM or Ctrl-C ends the process at once: the exit is made in the signal
///   handler itself (signal-hook), so it works even when every runtime thread is stuck;
/// - once the first signal has arrived, a plain thread (not a task: it needs no runtime) ends
///   the process [`grace`](Self::grace) later if it is still running.
///
/// The orderly part (stop serving, let the jobs in hand finish or hand them back to the queue:
/// [`Queue::run`]) happens within that time; this is what guarantees the end.
#[derive(Debug, Clone)]
pub struct ShutdownGuard {
    signalled: Arc<std::sync::atomic::AtomicBool>,
    grace: Duration,
}

impl ShutdownGuard {
    /// Registers the signal actions and starts the watchdog thread.
    ///
    /// # Errors
    /// The system's error when a signal action cannot be registered.
    pub fn install(grace: Duration) -> std::io::Result<ShutdownGuard> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let signalled = Arc::new(AtomicBool::new(false));
        #[cfg(unix)]
        for sig in signal_hook::consts::TERM_SIGNALS {
            // Order matters: the exit checks the flag before the flag is set, so the first
            // signal only arms it and the second one exits.
            signal_hook::flag::register_conditional_shutdown(
                *sig,
                FORCED_EXIT,
                Arc::clone(&signalled),
            )?;
            signal_hook::flag::register(*sig, Arc::clone(&signalled))?;
        }
        let flag = Arc::clone(&signalled);
        std::thread::Builder::new()
            .name("shutdown-watchdog".into())
            .spawn(move || {
                while !flag.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                std::thread::sleep(grace);
                eprintln!(
                    "shutdown: still running {} s after the signal; exiting",
                    grace.as_secs_f64()
                );
                std::process::exit(FORCED_EXIT);
            })?;
        Ok(ShutdownGuard { signalled, grace })
    }

    /// The grace period.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Whether the first signal has arrived.
    pub fn signalled(&self) -> bool {
        self.signalled.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How long the orderly part may let jobs in hand run before handing them back: most of
    /// the grace period, leaving time to hand them back and exit before the watchdog fires.
    pub fn drain(&self) -> Duration {
        self.grace.mul_f64(0.8)
    }
}
