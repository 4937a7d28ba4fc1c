//! `revpilot-server`: reads the configuration, opens the store and its job queue, serves
//! [`revpilot_server::app`], and (`--with-worker`, the default on SQLite) runs the worker
//! in-process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use revpilot_server::{AppState, app};
use revpilot_store::KeyRing;
use revpilot_stripe::billing::WebhookConfig;
use revpilot_stripe::client::Client;
use revpilot_stripe::connect::{Connect, ConnectConfig};
use revpilot_stripe::webhook::secrets_from_csv;
use secrecy::SecretString;

// mimalloc hands freed memory back to the system shortly after a large load; glibc's allocator
// keeps it resident in its arenas.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The RevPilot example server.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "REVPILOT_BIND", default_value = "127.0.0.1:3000")]
    bind: SocketAddr,
    /// `sqlite://FILE` or `postgres://...`; default `sqlite://revpilot.db` (a temporary file in
    /// demo mode).
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Demo mode: SQLite in a temporary file, a demo user and a synthetic two-year account; no
    /// Stripe key or secret needed.
    #[arg(long)]
    demo: bool,
    /// Customers in the demo's synthetic account.
    #[arg(long, default_value_t = 600, requires = "demo")]
    demo_customers: usize,
    /// Encryption keys for stored Stripe tokens: `id:base64key[,id:base64key]`.
    #[arg(long, env = "REVPILOT_ENCRYPTION_KEY", hide_env_values = true)]
    encryption_key: Option<String>,
    /// The billing webhook's signing secrets (`whsec_...`, comma-separated while rotating).
    #[arg(long, env = "STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
    webhook_secret: Option<String>,
    /// The Stripe secret key of the company's own account (`sk_live_...` runs in live mode).
    #[arg(long, env = "STRIPE_SECRET_KEY", hide_env_values = true)]
    stripe_secret_key: Option<String>,
    /// Stripe's API base (a fake in tests).
    #[arg(long, env = "STRIPE_API_BASE")]
    stripe_api_base: Option<String>,
    /// A TOML tier catalog replacing the default tiers (see docs/billing.md).
    #[arg(long, env = "REVPILOT_CATALOG")]
    catalog: Option<PathBuf>,
    /// HS256 secret of session tokens (at least 32 bytes; Supabase's JWT secret works).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Required `iss` of session tokens, when set.
    #[arg(long, env = "JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Supabase's JWKS (`https://<ref>.supabase.co/auth/v1/.well-known/jwks.json`): accepts
    /// Supabase sessions signed with its asymmetric keys (RS256/ES256).
    #[arg(long, env = "SUPABASE_JWKS_URL")]
    supabase_jwks_url: Option<String>,
    /// The app's public URL (Checkout and Connect return to it); default `http://{bind}/`.
    #[arg(long, env = "REVPILOT_APP_URL")]
    app_url: Option<String>,
    /// The Connect platform's client id (`ca_...`); enables connecting accounts.
    #[arg(long, env = "STRIPE_CLIENT_ID")]
    stripe_client_id: Option<String>,
    /// Where Stripe's OAuth token endpoint is (a fake in tests); default Stripe's.
    #[arg(long, env = "STRIPE_OAUTH_BASE")]
    stripe_oauth_base: Option<String>,
    /// The cron's bearer secret for `POST /api/stripe/sync` (unset: every call is refused).
    #[arg(long, env = "CRON_SECRET", hide_env_values = true)]
    cron_secret: Option<String>,
    /// The Connect webhook's signing secrets (comma-separated while rotating).
    #[arg(long, env = "STRIPE_CONNECT_WEBHOOK_SECRET", hide_env_values = true)]
    connect_webhook_secret: Option<String>,
    /// Run the job worker in this process (the default on SQLite).
    #[arg(long, conflicts_with = "without_worker")]
    with_worker: bool,
    /// Only queue jobs; `revpilot-worker` processes run them (the default on PostgreSQL).
    #[arg(long)]
    without_worker: bool,
    /// The job queue's name (the workers' `REVPILOT_QUEUE`).
    #[arg(long, env = "REVPILOT_QUEUE", default_value = revpilot_worker::queue::QUEUE)]
    queue: String,
    /// Reverse proxies whose `X-Forwarded-For` names the client, comma-separated IP addresses
    /// (default none: the TCP peer is the client, for rate limits).
    #[arg(long, env = "REVPILOT_TRUSTED_PROXIES")]
    trusted_proxies: Option<String>,
    /// Seconds a client has to send a request's whole header (slow clients are cut off).
    #[arg(long, env = "REVPILOT_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    header_timeout_secs: u64,
    /// Connections open at once; past it new ones wait in the kernel's backlog.
    #[arg(long, env = "REVPILOT_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Password hashes (argon2, ~19 MiB each) computed at once; default one per core, at least 2.
    #[arg(long, env = "REVPILOT_AUTH_CONCURRENCY")]
    auth_concurrency: Option<usize>,
    /// Milliseconds a sign-up or log-in waits for a hashing slot before answering 503.
    #[arg(long, env = "REVPILOT_AUTH_WAIT_MS", default_value_t = 2000)]
    auth_wait_ms: u64,
    /// MiB of rebuilt accounts kept in memory, each with its compiled form; past it the oldest
    /// are dropped and rebuilt on their next request.
    #[arg(long, env = "REVPILOT_ACCOUNTS_MB", default_value_t = revpilot_stripe::accounts::DEFAULT_BUDGET_BYTES >> 20)]
    accounts_mb: usize,
    /// Seconds one insight generation may wait for the model, every attempt together; past it
    /// the local narrative stands in (and the generation is not counted).
    #[arg(long, env = "REVPILOT_INSIGHT_DEADLINE_SECS", default_value_t = 30)]
    insight_deadline_secs: u64,
    /// Seconds a shutdown may take: after the first SIGTERM or Ctrl-C the server stops
    /// accepting, the in-process worker's jobs in hand may finish for most of it and then go
    /// back to the queue; past it the process exits. A second signal exits at once.
    #[arg(long, env = "REVPILOT_SHUTDOWN_GRACE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    shutdown_grace_secs: u64,
}

/// `n` random bytes as base64 (`None` when the system's random source fails).
fn random_base64(n: usize) -> Option<String> {
    use base64::Engine as _;
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).ok()?;
    Some(base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("revpilot-server: {message}");
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let guard = match revpilot_worker::ShutdownGuard::install(Duration::from_secs(
        args.shutdown_grace_secs,
    )) {
        Ok(g) => g,
        Err(e) => return fail(format!("signal handlers: {e}")),
    };
    // Before anything is counted, so that nothing is lost.
    let _ = revpilot_server::telemetry::prometheus();

    let catalog = match revpilot_worker::load_catalog(args.catalog.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    // Demo mode needs no secrets: it makes throwaway ones, and a database that goes with it.
    let mut demo_dir = None;
    let (key_spec, database_url, jwt_secret) = if args.demo {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => return fail(format!("demo: no temporary directory: {e}")),
        };
        let url = format!("sqlite://{}", dir.path().join("demo.db").display());
        demo_dir = Some(dir);
        (
            args.encryption_key
                .clone()
                .or_else(|| random_base64(32).map(|k| format!("demo:{k}"))),
            url,
            args.jwt_secret.clone().or_else(|| random_base64(48)),
        )
    } else {
        (
            args.encryption_key.clone(),
            args.database_url
                .clone()
                .unwrap_or_else(|| "sqlite://revpilot.db".to_owned()),
            args.jwt_secret.clone(),
        )
    };
    let Some(key_spec) = key_spec.as_deref() else {
        return fail("REVPILOT_ENCRYPTION_KEY is required (id:base64 of 32 random bytes)");
    };
    let keys = match KeyRing::parse(key_spec) {
        Ok(k) => k,
        Err(e) => return fail(format!("REVPILOT_ENCRYPTION_KEY: {e}")),
    };
    let postgres = database_url.starts_with("postgres");
    let (store, queue) = match revpilot_worker::open(&database_url, keys, &args.queue).await {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    let with_worker = args.with_worker || (!postgres && !args.without_worker);

    let key = args.stripe_secret_key.as_deref();
    let stripe = match Client::from_key(key, args.stripe_api_base.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(format!("STRIPE_SECRET_KEY / STRIPE_API_BASE: {e}")),
    };
    let webhook = match (
        args.webhook_secret
            .as_deref()
            .filter(|s| !s.trim().is_empty()),
        &stripe,
    ) {
        (None, _) => {
            tracing::warn!("STRIPE_WEBHOOK_SECRET is not set: billing webhooks are refused");
            None
        }
        (Some(_), None) => {
            return fail(
                "STRIPE_SECRET_KEY is required with STRIPE_WEBHOOK_SECRET (billing events fetch subscriptions)",
            );
        }
        (Some(secrets), Some(client)) => {
            let mut webhook =
                WebhookConfig::new(SecretString::from(String::new()), client.is_live());
            webhook.secrets = secrets_from_csv(secrets);
            Some(webhook)
        }
    };
    let issuer = args.jwt_issuer.as_deref();
    let sessions = revpilot_store::auth::Sessions::default()
        .with_secret(jwt_secret.as_deref(), issuer)
        .and_then(|s| s.with_jwks(args.supabase_jwks_url.as_deref(), issuer));
    let mut sessions = match sessions {
        Ok(s) => s,
        Err(e) => return fail(format!("JWT_SECRET / SUPABASE_JWKS_URL: {e}")),
    };
    match (&sessions.jwt, &sessions.jwks) {
        (None, Some(_)) => {
            tracing::info!("JWT_SECRET is not set: Supabase sessions only, no built-in accounts")
        }
        (None, None) => tracing::warn!(
            "neither JWT_SECRET nor SUPABASE_JWKS_URL is set: every authenticated route answers 401"
        ),
        _ => {}
    }
    let llm = match revpilot_ai::provider_from_env(|n| std::env::var(n).ok()) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    // Bound before the app's URL is known: its default is the address actually bound (with
    // `--bind 127.0.0.1:0`, the port the system chose), which is the origin browsers post from.
    let listener = match tokio::net::TcpListener::bind(args.bind).await {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {}: {e}", args.bind)),
    };
    let bound = listener.local_addr().unwrap_or(args.bind);
    let app_url = args
        .app_url
        .clone()
        .unwrap_or_else(|| format!("http://{bound}/"));
    let app_url = match url::Url::parse(&app_url) {
        Ok(u) => u,
        Err(e) => return fail(format!("REVPILOT_APP_URL {app_url:?}: {e}")),
    };
    sessions.passwords = revpilot_server::auth::Passwords::new(
        args.auth_concurrency
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get().max(2))),
        Duration::from_millis(args.auth_wait_ms),
    );
    let mut state = AppState::new(store.clone(), webhook);
    state.sessions = sessions;
    let trusted =
        revpilot_core::params::address_list(args.trusted_proxies.as_deref().unwrap_or(""));
    state.trusted_proxies = match trusted {
        Ok(t) => t,
        Err(e) => return fail(format!("REVPILOT_TRUSTED_PROXIES {e}")),
    };
    state.app.accounts = Arc::new(
        revpilot_stripe::accounts::Accounts::default()
            .with_budget(args.accounts_mb.saturating_mul(1 << 20)),
    );
    state.app.catalog = Arc::new(catalog.clone());
    state.app.llm = llm;
    state.app.insight_deadline = Duration::from_secs(args.insight_deadline_secs.max(1));
    state.app.billing = stripe;
    if let Some(base) = &args.stripe_api_base {
        match url::Url::parse(base) {
            Ok(u) => state.app.stripe_api_base = u,
            Err(e) => return fail(format!("STRIPE_API_BASE {base:?}: {e}")),
        }
    }
    if let Some(client_id) = args.stripe_client_id.as_deref().filter(|c| !c.is_empty()) {
        let Some(key) = args.stripe_secret_key.as_deref().filter(|k| !k.is_empty()) else {
            return fail("STRIPE_SECRET_KEY is required with STRIPE_CLIENT_ID (Connect)");
        };
        let mut config = ConnectConfig::new(client_id, SecretString::from(key.to_owned()));
        config.api_base = state.app.stripe_api_base.clone();
        if let Some(base) = &args.stripe_oauth_base {
            match url::Url::parse(base) {
                Ok(u) => config.token_base = u,
                Err(e) => return fail(format!("STRIPE_OAUTH_BASE {base:?}: {e}")),
            }
        }
        config.redirect_uri = app_url
            .join("api/stripe/connect/callback")
            .ok()
            .map(String::from);
        match Connect::new(config, store.clone(), store.clone()) {
            Ok(c) => state.app.connect = Some(Arc::new(c)),
            Err(e) => return fail(e),
        }
    }
    state.app.connect_webhook_secrets = args
        .connect_webhook_secret
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .map(secrets_from_csv);
    if let Err(e) = state.app.set_cron_secret(args.cron_secret.as_deref()) {
        return fail(format!("CRON_SECRET {e}"));
    }
    state.app_url = app_url;
    state.app.jobs = Some(Arc::new(queue.clone()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (id, runner) = (
        revpilot_worker::unique("server-worker"),
        state.app.runner("server"),
    );
    let stopped = async move { drop(stopped.await) };
    let work = revpilot_worker::work(queue, runner, id, stopped, guard.drain());
    let worker = with_worker.then(|| {
        tracing::info!("running the job worker in this process");
        tokio::spawn(work)
    });

    if args.demo {
        let password = random_base64(12).unwrap_or_else(|| "demo-password".to_owned());
        let started = std::time::Instant::now();
        match revpilot_server::demo::seed(&mut state, args.demo_customers, &password).await {
            Ok(login) => {
                println!(
                    "RevPilot demo ({} synthetic customers, ready in {:.1} s)\n  open   http://{bound}/demo\n  or log in at http://{bound}/login as {} with password {}",
                    args.demo_customers,
                    started.elapsed().as_secs_f64(),
                    login.email,
                    login.password
                );
            }
            Err(e) => return fail(format!("demo: {e}")),
        }
    }
    tracing::info!("listening on http://{bound}");
    let limits = revpilot_server::serve::ServeLimits {
        header_timeout: Duration::from_secs(args.header_timeout_secs.max(1)),
        max_connections: args.max_connections.max(1),
    };
    let served = revpilot_server::serve::serve(
        listener,
        app(state),
        limits,
        revpilot_worker::shutdown_signal(),
    )
    .await;
    if let Some(run) = worker {
        // Once the server has stopped: take no new job; let the ones in hand finish for most
        // of the grace period, then hand them back (the guard's watchdog ends the process at
        // the grace period whatever happens here).
        let _ = stop.send(());
        match run.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the worker stopped on an error"),
            Err(e) => tracing::error!(error = %e, "the worker task failed"),
        }
    }
    drop(demo_dir);
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("revpilot-server: {e}");
            ExitCode::FAILURE
        }
    }
}
