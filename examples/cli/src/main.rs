//! `revpilot`: export a Stripe account to one JSON file, compute its revenue metrics offline,
//! explain why two rule profiles differ, and sync an account into a store.
//!
//! Bad input (an unreadable file, invalid JSON, an object missing a required field, an unknown
//! currency or profile) prints one line naming the file and the object, and exits with 2. A
//! failure of Stripe or the store exits with 1.

mod report;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use base64::Engine as _;
use chrono::{DateTime, NaiveDate, Utc};
use clap::{Parser, Subcommand, ValueEnum};
use revpilot_core::fx::{FxTable, NoFx};
use revpilot_core::metrics::{Engine, Granularity, SeriesRequest};
use revpilot_core::ports::{
    ConnectionStore, Limits, NewConnection, Tier, Tokens, UserId, UserStore,
};
use revpilot_core::{Currency, Profile};
use revpilot_store::{KeyRing, SqliteStore};
use revpilot_stripe::client::{Client, ClientConfig};
use revpilot_stripe::rebuild::Rebuilt;
use revpilot_stripe::rebuild::stream::{StreamOptions, rebuild_reader};
use revpilot_stripe::sync::{Progress, SyncJob, SyncPorts, Syncer, export_account};
use secrecy::SecretString;

#[derive(Parser)]
#[command(name = "revpilot", version, about = "Revenue analytics on Stripe data")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum GranularityArg {
    Day,
    Month,
}

/// Output formats of `metrics`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// One JSON document.
    Json,
    /// The series as CSV, for spreadsheets.
    Csv,
    /// Aligned columns, for people.
    Table,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch an account into one JSON file (written to standard output).
    Export {
        /// Secret key (or a connected account's access token).
        #[arg(long, env = "STRIPE_API_KEY", hide_env_values = true)]
        api_key: String,
        /// API base URL.
        #[arg(long, default_value = revpilot_stripe::client::STRIPE_API_BASE)]
        api_base: String,
        /// A connected account to act on (`Stripe-Account`).
        #[arg(long)]
        account: Option<String>,
    },
    /// Compute the metric series of an export, offline.
    Metrics {
        /// The export file.
        #[arg(long)]
        input: PathBuf,
        /// First day (YYYY-MM-DD).
        #[arg(long)]
        from: NaiveDate,
        /// Last day (YYYY-MM-DD).
        #[arg(long)]
        to: NaiveDate,
        /// One row per day or per month.
        #[arg(long, value_enum, default_value = "month")]
        granularity: GranularityArg,
        /// Reporting currency.
        #[arg(long, default_value = "usd")]
        currency: String,
        /// Rule profile: default (alias chartmogul), stripe or profitwell.
        #[arg(long, default_value = "default")]
        profile: String,
        /// Exchange rates, CSV `date,from,to,rate`.
        #[arg(long)]
        fx: Option<PathBuf>,
        /// The instant the export's data runs to (RFC 3339, or YYYY-MM-DD for its midnight UTC);
        /// by default the newest instant any of its objects or events carries. Nothing later is
        /// reported.
        #[arg(long, value_parser = parse_as_of)]
        as_of: Option<DateTime<Utc>>,
        /// Output format.
        #[arg(long, value_enum, default_value = "json")]
        format: Format,
    },
    /// Show which customers' MRR differs between two profiles on a day, and why.
    Explain {
        /// The export file.
        #[arg(long)]
        input: PathBuf,
        /// The day (YYYY-MM-DD).
        #[arg(long)]
        date: NaiveDate,
        /// First profile.
        #[arg(long)]
        profile: String,
        /// Second profile.
        #[arg(long)]
        vs: String,
        /// Reporting currency.
        #[arg(long, default_value = "usd")]
        currency: String,
    },
    /// Sync an account into a store.
    Sync {
        /// Secret key.
        #[arg(long, env = "STRIPE_API_KEY", hide_env_values = true)]
        api_key: String,
        /// API base URL.
        #[arg(long, default_value = revpilot_stripe::client::STRIPE_API_BASE)]
        api_base: String,
        /// Store URL (a SQLite file by default).
        #[arg(long, default_value = "sqlite://revpilot.db")]
        db: String,
        /// Client-side rate limit, requests per second.
        #[arg(long, default_value_t = 25)]
        rate: u32,
    },
    /// Write a synthetic Stripe-shaped export (for demos and benchmarks) to standard output.
    Synth {
        /// Customers.
        #[arg(long, default_value_t = 1000)]
        customers: usize,
        /// Months of history from 2023-01-01.
        #[arg(long, default_value_t = 24)]
        months: u32,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// A failure, and whether the input was at fault (exit 2) or something else (exit 1).
pub(crate) enum Failure {
    Input(String),
    Runtime(String),
}

type Result<T> = std::result::Result<T, Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Input(msg)) => {
            eprintln!("revpilot: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(msg)) => {
            eprintln!("revpilot: {msg}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Metrics {
            input,
            from,
            to,
            granularity,
            currency,
            profile,
            fx,
            as_of,
            format,
        } => {
            // REVPILOT_TIMINGS=1 prints where the time goes (to standard error).
            let timings = std::env::var_os("REVPILOT_TIMINGS").is_some();
            let clock = std::time::Instant::now();
            let lap = |what: &str| {
                if timings {
                    eprintln!("{what}: {:.3} s", clock.elapsed().as_secs_f64());
                }
            };
            let rebuilt = read_export(&input)?;
            lap("read, parsed and rebuilt");
            let currency = parse_currency(&currency)?;
            let profile = parse_profile(&profile)?;
            let fx_table = match &fx {
                Some(path) => Some(
                    FxTable::from_csv(&read_text(path)?)
                        .map_err(|e| Failure::Input(format!("{}: {e}", path.display())))?,
                ),
                None => None,
            };
            let engine = Engine::new(&rebuilt.account, profile.rules(), currency);
            let engine = match &fx_table {
                Some(t) => engine.with_fx(t),
                None => engine.with_fx(&NoFx),
            };
            let as_of = as_of.or(rebuilt.as_of);
            let engine = match as_of {
                Some(at) => engine.with_as_of(at),
                None => engine,
            };
            let granularity = match granularity {
                GranularityArg::Day => Granularity::Day,
                GranularityArg::Month => Granularity::Month,
            };
            let series = engine
                .series(&SeriesRequest::new(from, to, granularity))
                .map_err(|e| Failure::Input(e.to_string()))?;
            lap("series computed");
            let ledger = engine
                .movements(from, to)
                .map_err(|e| Failure::Input(e.to_string()))?;
            lap("movements computed");
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            report::write(
                &mut out,
                format,
                profile,
                as_of,
                &series,
                &ledger,
                &rebuilt.issues,
            )
            .and_then(|()| out.flush())
            .map_err(|e| Failure::Runtime(format!("writing the report: {e}")))
        }
        Command::Explain {
            input,
            date,
            profile,
            vs,
            currency,
        } => {
            let rebuilt = read_export(&input)?;
            let currency = parse_currency(&currency)?;
            let (a, b) = (parse_profile(&profile)?, parse_profile(&vs)?);
            let engine = Engine::new(&rebuilt.account, a.rules(), currency);
            let diff = engine
                .diff_profiles(&b.rules(), date)
                .map_err(|e| Failure::Input(e.to_string()))?;
            let mut out = std::io::stdout().lock();
            report::explain(&mut out, a, b, currency, &diff)
                .map_err(|e| Failure::Runtime(format!("writing: {e}")))
        }
        Command::Export {
            api_key,
            api_base,
            account,
        } => {
            let mut cfg = ClientConfig::new(SecretString::from(api_key))
                .with_api_base(&api_base)
                .map_err(|e| Failure::Input(e.to_string()))?;
            cfg.account = account;
            let client = Client::new(cfg).map_err(|e| Failure::Runtime(e.to_string()))?;
            let rt = runtime()?;
            let bar = progress_reporter();
            let export = rt
                .block_on(export_account(&client, &*bar))
                .map_err(|e| Failure::Runtime(e.to_string()))?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            serde_json::to_writer(&mut out, &export)
                .map_err(std::io::Error::other)
                .and_then(|()| out.flush())
                .map_err(|e| Failure::Runtime(format!("writing the export: {e}")))
        }
        Command::Sync {
            api_key,
            api_base,
            db,
            rate,
        } => sync(api_key, &api_base, &db, rate),
        Command::Synth {
            customers,
            months,
            seed,
        } => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            revpilot_stripe::synth::SynthExport {
                customers,
                months,
                seed,
            }
            .write(&mut out)
            .map_err(|e| Failure::Runtime(format!("writing: {e}")))
        }
    }
}

fn parse_as_of(s: &str) -> std::result::Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .ok_or_else(|| format!("{s:?} is not an RFC 3339 instant or a YYYY-MM-DD date"))
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Failure::Input(format!("{}: {e}", path.display())))
}

/// Streams the export file into the rebuilt account: the file is read once in batches, never
/// held whole.
fn read_export(path: &Path) -> Result<Rebuilt> {
    let file = std::fs::File::open(path)
        .map_err(|e| Failure::Input(format!("{}: {e}", path.display())))?;
    rebuild_reader(file, &StreamOptions::default())
        .map_err(|e| Failure::Input(format!("{}: {e}", path.display())))
}

fn parse_currency(code: &str) -> Result<Currency> {
    let c = Currency::parse(code).map_err(|e| Failure::Input(e.to_string()))?;
    if c.minor_digits().is_none() {
        return Err(Failure::Input(format!(
            "unknown currency {code:?}: not an ISO 4217 currency"
        )));
    }
    Ok(c)
}

fn parse_profile(name: &str) -> Result<Profile> {
    name.parse()
        .map_err(|e: revpilot_core::rules::UnknownProfile| Failure::Input(e.to_string()))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Runtime(format!("cannot start the runtime: {e}")))
}

/// A progress bar on a terminal, plain log lines otherwise.
fn progress_reporter() -> Box<dyn Fn(&Progress) + Send + Sync> {
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        Box::new(move |p: &Progress| match p {
            Progress::Page { stream, total } => bar.set_message(format!("{stream}: {total}")),
            Progress::StreamDone { stream, total } => {
                bar.println(format!("{stream}: {total} done"))
            }
        })
    } else {
        Box::new(|p: &Progress| match p {
            Progress::Page { stream, total } => eprintln!("synced {total} {stream} objects so far"),
            Progress::StreamDone { stream, total } => eprintln!("{stream}: {total} objects, done"),
        })
    }
}

/// The CLI's own user in the store: the sync needs a user and a connection to record runs and
/// cursors against.
const CLI_USER: UserId = UserId(uuid::Uuid::from_u128(
    0x5245_5650_494c_4f54_0000_0000_0000_0001,
));

fn sync(api_key: String, api_base: &str, db: &str, rate: u32) -> Result<()> {
    let keys = match std::env::var("REVPILOT_ENCRYPTION_KEY") {
        Ok(spec) => KeyRing::parse(&spec)
            .map_err(|e| Failure::Input(format!("REVPILOT_ENCRYPTION_KEY: {e}")))?,
        // The key is only needed by the CLI to store the token it is given on every run.
        Err(_) => {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key)
                .map_err(|e| Failure::Runtime(format!("no randomness: {e}")))?;
            let b64 = base64::engine::general_purpose::STANDARD.encode(key);
            KeyRing::parse(&format!("cli:{b64}")).map_err(|e| Failure::Runtime(e.to_string()))?
        }
    };
    let mut cfg = ClientConfig::new(SecretString::from(api_key.clone()))
        .with_api_base(api_base)
        .map_err(|e| Failure::Input(e.to_string()))?;
    cfg.requests_per_second = std::num::NonZeroU32::new(rate)
        .ok_or_else(|| Failure::Input("--rate must be at least 1".into()))?;
    let client = Client::new(cfg).map_err(|e| Failure::Runtime(e.to_string()))?;
    let rt = runtime()?;
    rt.block_on(async {
        let store = Arc::new(
            SqliteStore::connect(db, keys)
                .await
                .map_err(|e| Failure::Input(e.to_string()))?,
        );
        let now = chrono::Utc::now();
        let store_err = |e: revpilot_core::ports::StoreError| Failure::Runtime(e.to_string());
        if store.user(CLI_USER).await.map_err(store_err)?.is_none() {
            store
                .create_user(CLI_USER, None, Tier::Enterprise, Limits::default(), now)
                .await
                .map_err(store_err)?;
        }
        // The account's id when the server says it (localstripe has no /v1/account).
        let account = match client.get("/v1/account", &[]).await {
            Ok(body) => serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "acct_default".to_owned()),
            Err(e) if e.is_not_found() => "acct_default".to_owned(),
            Err(e) => return Err(Failure::Runtime(e.to_string())),
        };
        let connection = store
            .save_connection(
                NewConnection {
                    user: CLI_USER,
                    stripe_account_id: account.clone(),
                    business_name: None,
                    currency: None,
                    tokens: Tokens {
                        access_token: SecretString::from(api_key),
                        refresh_token: None,
                    },
                },
                now,
            )
            .await
            .map_err(store_err)?;
        let ports = SyncPorts::from_store(store.clone());
        let job = SyncJob {
            user: CLI_USER,
            connection: connection.id,
            stripe_account_id: account,
            usage: None,
        };
        let bar = progress_reporter();
        let (status, outcome) = Syncer::new(client, ports)
            .run(&job, &*bar)
            .await
            .map_err(store_err)?;
        let objects: Vec<String> = outcome
            .objects
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "sync {}: {} ({} requests, {} retries)",
            status.as_str(),
            objects.join(" "),
            outcome.requests,
            outcome.retries
        );
        match outcome.error {
            Some(error) => Err(Failure::Runtime(error)),
            None => Ok(()),
        }
    })
}
