//! A Stripe-shaped fake server the tests and benchmarks own (feature `fake`).
//!
//! It serves what localstripe cannot do on demand:
//! - lists of any size in Stripe's order (newest first), with `limit`, `starting_after`,
//!   `created[gte]` and `created[lt]`;
//! - invoice lines and refunds beyond the embedded ten;
//! - the Events API;
//! - a server-side rate limit: 429 when its bucket of R requests, refilled at R per second, is
//!   empty;
//! - injected faults at chosen requests.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{Value, json};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// A fault to answer a request with: an HTTP status, optionally with `Stripe-Should-Retry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The status.
    pub status: u16,
    /// The `Stripe-Should-Retry` header, if any.
    pub should_retry: Option<bool>,
}

type FaultFn = Box<dyn FnMut(u64, &str) -> Option<Fault> + Send>;

/// The fake's data and behaviour, shared with the running server.
pub struct FakeState {
    /// Lists by path (`/v1/customers`, ...), newest first as Stripe lists them.
    lists: Mutex<BTreeMap<String, Vec<Value>>>,
    /// Each list's index, built on its first page and dropped when the list changes, so a page
    /// costs its own objects, not the list's length (a benchmark serves lists of millions).
    indexes: Mutex<HashMap<String, Arc<ListIndex>>>,
    rate: Option<u32>,
    /// The rate limit's bucket: last refill and tokens.
    bucket: Mutex<(Instant, f64)>,
    requests: AtomicU64,
    limited: AtomicU64,
    faults: Mutex<Option<FaultFn>>,
}

/// A running fake Stripe.
pub struct FakeStripe {
    server: MockServer,
    state: Arc<FakeState>,
}

/// Where each object of a list is, and whether the list is in Stripe's order (`created`
/// descending), which lets a `created` range start and stop without walking the rest.
struct ListIndex {
    position: HashMap<String, usize>,
    newest_first: bool,
}

impl ListIndex {
    fn of(items: &[Value]) -> Self {
        ListIndex {
            position: items
                .iter()
                .enumerate()
                .filter_map(|(i, v)| Some((v["id"].as_str()?.to_owned(), i)))
                .collect(),
            newest_first: items.windows(2).all(|w| created(&w[0]) >= created(&w[1])),
        }
    }
}

fn created(v: &Value) -> i64 {
    v["created"].as_i64().unwrap_or(0)
}

struct Responder(Arc<FakeState>);

impl Respond for Responder {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        self.0.respond(req)
    }
}

fn error(status: u16, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .set_body_json(json!({"error": {"message": message, "type": "api_error"}}))
}

impl FakeState {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let n = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let path = req.url.path().to_owned();
        if let Some(rate) = self.rate {
            // A token bucket of one second's capacity, refilled at `rate` per second (Stripe's
            // limiter is a bucket too).
            let mut w = self
                .bucket
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let refill = w.0.elapsed().as_secs_f64() * f64::from(rate);
            w.0 = Instant::now();
            w.1 = (w.1 + refill).min(f64::from(rate));
            if w.1 < 1.0 {
                self.limited.fetch_add(1, Ordering::SeqCst);
                return error(429, "Too many requests");
            }
            w.1 -= 1.0;
        }
        if let Some(f) = self
            .faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_mut()
            .and_then(|f| {
                f(
                    n,
                    &format!("{path}?{}", req.url.query().unwrap_or_default()),
                )
            })
        {
            let mut r = error(f.status, "injected fault");
            if let Some(retry) = f.should_retry {
                r = r.insert_header("Stripe-Should-Retry", if retry { "true" } else { "false" });
            }
            return r;
        }
        let query: BTreeMap<String, String> = req.url.query_pairs().into_owned().collect();
        let lists = self
            .lists
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(object) = lists.get(&format!("object:{path}")).and_then(|v| v.first()) {
            return ResponseTemplate::new(200).set_body_json(object);
        }
        let (items, filter): (Option<&Vec<Value>>, Option<(&str, &String)>) = if let Some(inv) =
            path.strip_prefix("/v1/invoices/")
                .and_then(|p| p.strip_suffix("/lines"))
        {
            (lists.get(&format!("lines:{inv}")), None)
        } else if path == "/v1/refunds" {
            (
                lists.get("/v1/refunds"),
                query.get("charge").map(|c| ("charge", c)),
            )
        } else {
            (lists.get(&path), None)
        };
        let Some(items) = items else {
            return error(404, &format!("Unrecognized request URL (GET: {path})"));
        };
        let index = {
            let mut indexes = self
                .indexes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            indexes
                .entry(path.clone())
                .or_insert_with(|| Arc::new(ListIndex::of(items)))
                .clone()
        };
        let limit = query
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .unwrap_or(10)
            .clamp(1, 100);
        let bound = |k: &str| query.get(k).and_then(|v| v.parse::<i64>().ok());
        let (gte, lt) = (bound("created[gte]"), bound("created[lt]"));
        // The page starts after `starting_after`'s place in the list (Stripe accepts an object
        // outside the filter).
        let mut start = match query.get("starting_after") {
            Some(after) => match index.position.get(after) {
                Some(at) => at + 1,
                None => return error(400, &format!("No such object: '{after}'")),
            },
            None => 0,
        };
        // In Stripe's order a `created` range is one run of the list: start at its newest
        // object and stop after its oldest.
        let newest_first = index.newest_first;
        if let (true, Some(l)) = (newest_first, lt) {
            start = start.max(items.partition_point(|v| created(v) >= l));
        }
        let mut matching = items[start.min(items.len())..]
            .iter()
            .take_while(|v| !newest_first || gte.is_none_or(|g| created(v) >= g))
            .filter(|v| filter.is_none_or(|(k, want)| v[k].as_str() == Some(want.as_str())))
            .filter(|v| {
                let created = created(v);
                gte.is_none_or(|g| created >= g) && lt.is_none_or(|l| created < l)
            });
        /// A list page, serialized from the stored objects as they are: building a `Value` of
        /// it first cloned every object, under the lists' lock.
        #[derive(serde::Serialize)]
        struct Page<'a> {
            object: &'static str,
            url: &'a str,
            has_more: bool,
            data: Vec<&'a Value>,
        }
        let data: Vec<&Value> = matching.by_ref().take(limit).collect();
        let has_more = matching.next().is_some();
        let page = Page {
            object: "list",
            url: &path,
            has_more,
            data,
        };
        match serde_json::to_vec(&page) {
            Ok(body) => ResponseTemplate::new(200).set_body_raw(body, "application/json"),
            Err(e) => error(500, &format!("the fake cannot serialize a page: {e}")),
        }
    }
}

impl FakeStripe {
    /// Starts a fake with no data; `rate` is its token bucket (capacity and refill per second).
    pub async fn start(rate: Option<u32>) -> Self {
        let server = MockServer::start().await;
        let state = Arc::new(FakeState {
            lists: Mutex::new(BTreeMap::new()),
            indexes: Mutex::default(),
            rate,
            bucket: Mutex::new((Instant::now(), f64::from(rate.unwrap_or(0)))),
            requests: AtomicU64::new(0),
            limited: AtomicU64::new(0),
            faults: Mutex::new(None),
        });
        Mock::given(wiremock::matchers::any())
            .respond_with(Responder(state.clone()))
            .mount(&server)
            .await;
        FakeStripe { server, state }
    }

    /// The base URL to point a client at.
    pub fn uri(&self) -> String {
        self.server.uri()
    }

    /// Every request received so far, as `path?query`.
    pub async fn received(&self) -> Vec<String> {
        self.server
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .map(|r| format!("{}?{}", r.url.path(), r.url.query().unwrap_or_default()))
            .collect()
    }

    /// Requests received, and how many of them the rate limit refused.
    pub fn requests(&self) -> (u64, u64) {
        (
            self.state.requests.load(Ordering::SeqCst),
            self.state.limited.load(Ordering::SeqCst),
        )
    }

    /// Sets the objects of a list path (`/v1/customers`), oldest first; served newest first.
    /// An invoice whose `lines.data` holds more than ten lines is served with the first ten
    /// embedded and `has_more`, the rest from `/v1/invoices/{id}/lines`; the same for a
    /// charge's refunds (from `/v1/refunds?charge=`).
    pub fn set(&self, path: &str, mut objects: Vec<Value>) {
        let mut lists = self
            .state
            .lists
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for o in &mut objects {
            for (field, key) in [("lines", "lines"), ("refunds", "refunds")] {
                let Some(all) = o.get(field).and_then(|l| l["data"].as_array()).cloned() else {
                    continue;
                };
                let id = o["id"].as_str().unwrap_or_default().to_owned();
                if key == "lines" {
                    lists.insert(format!("lines:{id}"), all.clone());
                } else {
                    lists
                        .entry("/v1/refunds".to_owned())
                        .or_default()
                        .extend(all.iter().cloned());
                }
                o[field]["data"] = Value::Array(all.iter().take(10).cloned().collect());
                o[field]["has_more"] = Value::Bool(all.len() > 10);
            }
        }
        objects.reverse();
        lists.insert(path.to_owned(), objects);
        self.lists_changed();
    }

    /// Drops the lists' indexes after a change (they are built again on the next page).
    fn lists_changed(&self) {
        self.state
            .indexes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// Serves `object` at `path` (`/v1/account`).
    pub fn set_object(&self, path: &str, object: Value) {
        self.state
            .lists
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(format!("object:{path}"), vec![object]);
        self.lists_changed();
    }

    /// Adds objects to the front of a list (newer than all), as Stripe shows new objects.
    pub fn push(&self, path: &str, objects: Vec<Value>) {
        let mut lists = self
            .state
            .lists
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = lists.entry(path.to_owned()).or_default();
        for o in objects {
            list.insert(0, o);
        }
        self.lists_changed();
    }

    /// Answers requests with faults: `f(request_number, path_and_query)` (numbers from 1 over the
    /// fake's life) returns the fault for that request, or `None` to serve it.
    pub fn faults(&self, f: impl FnMut(u64, &str) -> Option<Fault> + Send + 'static) {
        *self
            .state
            .faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Box::new(f));
    }

    /// Stops injecting faults.
    pub fn clear_faults(&self) {
        *self
            .state
            .faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

/// A localstripe server (PyPI: a stateful fake Stripe) from the virtualenv `scripts/test`
/// creates (`REVPILOT_TEST_VENV`), on a free loopback port, from scratch; killed on drop.
#[derive(Debug)]
pub struct LocalStripe {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl LocalStripe {
    /// Starts localstripe and waits until it listens; `None` (after printing that the test is
    /// skipped) when `REVPILOT_TEST_VENV` is not set.
    ///
    /// # Panics
    /// When the virtualenv has no localstripe or it does not start within a minute: a test
    /// harness failure, not an input.
    #[allow(clippy::unwrap_used, clippy::panic)]
    pub fn start() -> Option<LocalStripe> {
        use std::process::{Command, Stdio};
        use std::time::Duration;
        let Ok(venv) = std::env::var("REVPILOT_TEST_VENV") else {
            eprintln!(
                "skipped: REVPILOT_TEST_VENV is not set (scripts/test creates the virtualenv and sets it)"
            );
            return None;
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        // The free port is released before localstripe binds it: another process can take it
        // in between, and localstripe then exits at once. Start it again on another port.
        loop {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .unwrap();
            let child = Command::new(format!("{venv}/bin/localstripe"))
                .args(["--port", &port.to_string(), "--from-scratch"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("localstripe from {venv}: {e}"));
            let mut ls = LocalStripe {
                child,
                base: format!("http://127.0.0.1:{port}"),
            };
            loop {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(ls);
                }
                assert!(Instant::now() < deadline, "localstripe did not start");
                if ls.child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

impl Drop for LocalStripe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `Stripe-Signature` header made by the official `stripe` Python SDK of the virtualenv at
/// `venv` (`stripe.WebhookSignature.generate_signature_header`), for `payload` signed with
/// `secret` at `timestamp`.
///
/// # Panics
/// When the SDK cannot be run: a test harness failure.
#[allow(clippy::unwrap_used)]
pub fn sdk_signature_header(venv: &str, payload: &str, secret: &str, timestamp: i64) -> String {
    let out = std::process::Command::new(format!("{venv}/bin/python"))
        .args([
            "-c",
            "import sys, stripe; print(stripe.WebhookSignature.generate_signature_header(sys.argv[1], sys.argv[2], timestamp=int(sys.argv[3])))",
            payload,
            secret,
            &timestamp.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}
