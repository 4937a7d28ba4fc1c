//! Shared helpers for RevPilot's benchmarks: the benchmark accounts and a baseline pass.

use revpilot_core::Account;
use revpilot_core::synth::{SynthConfig, generate};

/// The benchmark account: `customers` customers of the synthetic SaaS signing up over 48 months
/// (about 10 timeline entries each, so 1,000,000 customers is about 10 million entries), without
/// payments (the target counts timeline entries; cash is one more linear pass).
pub fn bench_account(customers: usize) -> (SynthConfig, Account) {
    let mut config = SynthConfig::new(customers, 42);
    config.months = 48;
    config.payments = false;
    let account = generate(&config);
    (config, account)
}

/// The baseline: one pass reading every timeline entry's instant and amount, the least any
/// computation over the account must do.
pub fn touch_every_entry(account: &Account) -> i64 {
    let mut acc = 0i64;
    for s in &account.subscriptions {
        for st in &s.statuses {
            acc = acc.wrapping_add(st.at.timestamp());
        }
        for i in &s.items {
            acc = acc
                .wrapping_add(i.from.timestamp())
                .wrapping_add(i.quantity as i64);
            acc = acc.wrapping_add(i.price.unit_amount.mantissa() as i64);
        }
        for d in &s.discounts {
            acc = acc.wrapping_add(d.start.timestamp());
        }
        acc = acc.wrapping_add(i64::from(s.cancellation.is_some()));
    }
    acc
}

/// Peak resident memory of this process so far, in bytes (Linux `VmHWM`), when available.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The server process of a two-process benchmark; killed when dropped (also when the benchmark
/// panics).
#[derive(Debug)]
pub struct ServerProcess(std::process::Child);

impl ServerProcess {
    /// Its process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts this program again as `program --serve ARGS...` (the server of a two-process
/// benchmark); it prints its port on its first line. Returns the process and
/// `http://127.0.0.1:PORT`.
///
/// # Panics
/// When the program cannot be started or prints no port (a benchmark has nothing to measure).
#[allow(clippy::unwrap_used)]
pub fn spawn_server(args: &[&str]) -> (ServerProcess, String) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("--serve")
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let server = ServerProcess(child);
    let mut port = String::new();
    BufReader::new(stdout).read_line(&mut port).unwrap();
    (server, format!("http://127.0.0.1:{}", port.trim()))
}

/// The median of `v` (the upper one of an even count); 0 for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Creates the benchmarks' user (enterprise tier, its limits) and its connection to Stripe
/// account `acct_bench`, reported in USD, in `store`.
///
/// # Panics
/// When the store refuses either write (a benchmark stops there).
pub async fn bench_connection<S>(
    store: &S,
) -> (
    revpilot_core::ports::UserId,
    revpilot_core::ports::ConnectionId,
)
where
    S: revpilot_core::ports::UserStore + revpilot_core::ports::ConnectionStore + ?Sized,
{
    use revpilot_core::ports::{NewConnection, Tier, Tokens, UserId};
    let user = UserId(uuid::Uuid::new_v4());
    let now = chrono::Utc::now();
    let limits = revpilot_core::billing::Catalog::default()
        .plan(Tier::Enterprise)
        .limits;
    store
        .create_user(user, None, Tier::Enterprise, limits, now)
        .await
        .expect("the benchmark user");
    let connection = NewConnection {
        user,
        stripe_account_id: "acct_bench".into(),
        business_name: Some("Bench".into()),
        currency: Some("usd".into()),
        tokens: Tokens {
            access_token: secrecy::SecretString::from("sk_test_bench"),
            refresh_token: None,
        },
    };
    let id = store
        .save_connection(connection, now)
        .await
        .expect("the benchmark connection")
        .id;
    (user, id)
}
