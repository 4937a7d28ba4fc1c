//! The streaming rebuild: an export flows once from its bytes to the compact [`Account`], and no
//! list of every Stripe object is ever held.
//!
//! - **Read in batches.** The reader fills a few reused buffers (a batch each, 8 MiB by default).
//!   A splitter walks the top-level object and cuts each array into its elements' byte ranges,
//!   without parsing them: it only follows strings and brackets. An element cut by the end of a
//!   buffer is carried into the next one.
//! - **Parsed on every core.** Workers take batches in turn, parse each element into RevPilot's
//!   tolerant type and fold it at once into what the rebuild keeps of it: a customer or a payment
//!   as the core's model, an invoice as a digest (its lines' prices interned), a
//!   subscription as parsed (one per customer or so), prices and coupons as parsed (few).
//! - **Then rebuilt.** Once the input ends, every kind is reduced to the last occurrence of each
//!   id (the order of the file never matters: a customer's invoices can be anywhere), invoices
//!   are grouped by subscription, and the subscriptions are rebuilt as [`super::rebuild`] does,
//!   in the same order, with the same issues.
//!
//! Memory follows the compact model: the buffers in flight, the digests, and the account built.
//! [`super::rebuild`], which holds every object, is kept as this module's test oracle.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use revpilot_core::Account;
use revpilot_core::model;
use revpilot_core::ports::{
    CachedObject, ConnectionId, ObjectCache, ObjectKind, StoreError, UserId,
};

use super::{
    Ctx, InvoiceDigest, Issue, Names, Rebuilt, attach_disputes, consider_price, customer,
    event_subscription, payment, rebuild_one,
};
use crate::export::ExportError;
use crate::objects::{self, ParseError};

/// How the export is read.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Bytes read per batch (a batch grows when one object is larger).
    pub batch_bytes: usize,
    /// Parsing threads (at least 1).
    pub threads: usize,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            batch_bytes: 8 << 20,
            threads: std::thread::available_parallelism().map_or(1, usize::from),
        }
    }
}

/// Rebuilds an account from export bytes already in memory (see [`rebuild_reader`]).
///
/// # Errors
/// As [`rebuild_reader`].
pub fn rebuild_json(json: &[u8]) -> Result<Rebuilt, ExportError> {
    rebuild_reader(json, &StreamOptions::default())
}

/// Rebuilds an account from an export read from `reader` (a file, a socket, a slice), holding
/// only the buffers in flight and the compact model: the same [`Rebuilt`] as
/// [`super::rebuild`] of the whole [`crate::export::Export`].
///
/// # Errors
/// [`ExportError::Shape`] or [`ExportError::Json`] when the input is not a JSON object of lists
/// (with the byte offset),
/// [`ExportError::Truncated`] when it ends inside the object, [`ExportError::Object`] naming the
/// first object that cannot be read (its kind and id, or its byte offset when it has no id), and
/// [`ExportError::Read`] when the reader fails.
pub fn rebuild_reader<R: Read>(
    mut reader: R,
    options: &StreamOptions,
) -> Result<Rebuilt, ExportError> {
    let threads = options.threads.max(1);
    let batch_bytes = options.batch_bytes.max(64);
    let (work_tx, work_rx) = mpsc::sync_channel::<Batch>(threads);
    let work_rx = Mutex::new(work_rx);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    let stop = AtomicBool::new(false);
    let (read, mut parts) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (work_rx, free_tx, stop) = (&work_rx, free_tx.clone(), &stop);
                scope.spawn(move || work(work_rx, &free_tx, stop))
            })
            .collect();
        let read = split_all(&mut reader, batch_bytes, &work_tx, &free_rx, &stop);
        drop(work_tx);
        let parts: Vec<Part> = workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect();
        (read, parts)
    });
    // The error nearest the start of the input wins, wherever it was found.
    let (exported_at, mut first) = match read {
        Ok(stamp) => (stamp, None),
        Err(e) => (None, Some(e)),
    };
    // Taken, not cloned (an error keeps its source, which cannot be cloned): when one is found
    // the parts are dropped unassembled.
    for part in &mut parts {
        if let Some(found) = part.error.take() {
            keep_earliest(&mut first, found);
        }
    }
    if let Some((_, e)) = first {
        return Err(e);
    }
    let mut rebuilt = assemble(parts);
    if let Some(at) = exported_at.and_then(super::instant) {
        rebuilt.as_of = Some(at);
    }
    Ok(rebuilt)
}

/// Calls `each` with every object of an export read from `reader`, in input order, as its kind
/// (`customer`, `subscription`, ... `event`) and its JSON bytes, holding one batch at a time: to
/// seed a store's cache from an export of any size (demos, tests, benchmarks). The objects are
/// not parsed; `each` decides what to do with them.
///
/// # Errors
/// As [`rebuild_reader`] for the export's shape; the first error `each` returns.
pub fn for_each_object<R: Read + Send>(
    mut reader: R,
    mut each: impl FnMut(&'static str, &[u8]) -> Result<(), ExportError>,
) -> Result<(), ExportError> {
    let (work, batches) = mpsc::sync_channel::<Batch>(1);
    let (free_tx, free) = mpsc::channel::<Vec<u8>>();
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let stop = &stop;
        let reading = scope.spawn(move || split_all(&mut reader, 8 << 20, &work, &free, stop));
        let mut result = Ok(());
        'batches: for batch in &batches {
            for e in &batch.elements {
                if let Err(err) = each(e.kind.name(), &batch.buf[e.start..e.end]) {
                    result = Err(err);
                    break 'batches;
                }
            }
            let _ = free_tx.send(batch.buf);
        }
        // Stops the reader (its next send finds no receiver).
        stop.store(true, Ordering::Relaxed);
        drop(batches);
        let read = reading
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        result?;
        read.map(|_| ()).map_err(|(_, e)| e)
    })
}

/// A rebuild fed one object at a time, in any order (a store's cache read page by page): the
/// same fold as [`rebuild_reader`], on the caller's thread.
#[derive(Default)]
pub struct Rebuilder {
    part: Part,
    next: u64,
}

impl std::fmt::Debug for Rebuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rebuilder")
            .field("objects", &self.next)
            .finish()
    }
}

impl Rebuilder {
    /// An empty rebuild.
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds one object of `kind` (products, which the rebuild does not read, are skipped). An
    /// object added again supersedes the earlier one.
    ///
    /// # Errors
    /// The object cannot be read: its kind and id.
    pub fn add(&mut self, kind: ObjectKind, json: &[u8]) -> Result<(), ParseError> {
        let Some(kind) = Kind::of_cached(kind) else {
            return Ok(());
        };
        self.next += 1;
        self.part.fold(kind, json, self.next)
    }

    /// The rebuilt account.
    pub fn finish(self) -> Rebuilt {
        assemble(vec![self.part])
    }
}

/// Why a connection's cache cannot be rebuilt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CachedRebuildError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A cached object cannot be read (its kind and id).
    #[error(transparent)]
    Object(#[from] ParseError),
    /// The load was stopped before it finished (the runtime is shutting down).
    #[error("the account's load was stopped before it finished")]
    Cancelled,
}

/// Objects read from the cache per page by [`rebuild_cached`].
pub const CACHE_PAGE: usize = 2_000;

/// Rebuilds the account of the user's connection from the objects its syncs cached, reading
/// `page` objects at a time (see [`CACHE_PAGE`]): the same [`Rebuilt`] as
/// [`super::rebuild`] of [`crate::export::Export::from_cached`] of every object, while only a
/// few pages and the compact model are ever held. One fold worker per core (on blocking
/// threads, so a server's request threads stay free) takes pages from a short queue that the
/// store's reads keep filled: the reads never wait for a fold to finish, and the folds never
/// wait for a read while a page is queued.
///
/// # Errors
/// [`CachedRebuildError`]: the store's error, or the first cached object that cannot be read.
pub async fn rebuild_cached<C: ObjectCache + ?Sized>(
    cache: &C,
    user: UserId,
    connection: ConnectionId,
    page: usize,
) -> Result<Rebuilt, CachedRebuildError> {
    let page = page.max(1);
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    // Pages waiting for a worker: one per worker, so each finds the next when it is done.
    let (pages, queue) = tokio::sync::mpsc::channel::<(Kind, u64, Vec<CachedObject>)>(threads);
    let queue = Arc::new(Mutex::new(queue));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let queue = Arc::clone(&queue);
            tokio::task::spawn_blocking(move || fold_pages(&queue))
        })
        .collect();
    drop(queue);
    let read = read_pages(cache, user, connection, page, &pages).await;
    // Closing the queue lets the workers finish what is queued and stop.
    drop(pages);
    let mut parts = Vec::with_capacity(workers.len());
    let mut first: Option<(u64, ParseError)> = None;
    for worker in workers {
        match worker
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        {
            Ok(part) => parts.push(part),
            Err(found) => keep_earliest(&mut first, found),
        }
    }
    read?;
    if let Some((_, e)) = first {
        return Err(e.into());
    }
    let finished = tokio::task::spawn_blocking(move || assemble(parts)).await;
    Ok(finished.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())))
}

/// Keeps `found` when it is nearer the start of the input than the error kept so far.
fn keep_earliest<E>(first: &mut Option<(u64, E)>, found: (u64, E)) {
    if first.as_ref().is_none_or(|(at, _)| found.0 < *at) {
        *first = Some(found);
    }
}

/// The cached kinds the rebuild reads, the largest first, each with the first number of its
/// objects: numbers only order objects of one kind, so each kind has its own range.
fn cached_kinds() -> Vec<(ObjectKind, Kind, u64)> {
    let mut kinds: Vec<(ObjectKind, Kind, u64)> = ObjectKind::ALL
        .into_iter()
        .zip(0u64..)
        .filter_map(|(kind, n)| Some((kind, Kind::of_cached(kind)?, n << 40)))
        .collect();
    kinds.sort_by_key(|(kind, ..)| match kind {
        ObjectKind::Invoice => 0,
        ObjectKind::Charge => 1,
        _ => 2,
    });
    kinds
}

/// Store reads in flight at once: one reader alone left a third of two cores idle at 100,000
/// customers (each page is a round trip through the driver's thread).
const READERS: usize = 2;

/// Reads every kind the rebuild needs page by page into the workers' queue, [`READERS`] kinds
/// at a time, each from its own connection. Stops early when every worker has stopped (on an
/// unreadable object).
async fn read_pages<C: ObjectCache + ?Sized>(
    cache: &C,
    user: UserId,
    connection: ConnectionId,
    page: usize,
    pages: &tokio::sync::mpsc::Sender<(Kind, u64, Vec<CachedObject>)>,
) -> Result<(), StoreError> {
    let kinds = cached_kinds();
    let taken = std::sync::atomic::AtomicUsize::new(0);
    let reader = || async {
        while let Some(&(kind, k, first)) = kinds.get(taken.fetch_add(1, Ordering::Relaxed)) {
            let mut next = first;
            let mut after: Option<String> = None;
            loop {
                let objects = cache
                    .objects_page(user, connection, kind, after.as_deref(), page)
                    .await?;
                let Some(last) = objects.last() else { break };
                after = Some(last.stripe_id.clone());
                let full = objects.len() == page;
                let base = next;
                next += objects.len() as u64;
                if pages.send((k, base, objects)).await.is_err() {
                    return Ok(());
                }
                if !full {
                    break;
                }
            }
        }
        Ok::<(), StoreError>(())
    };
    futures::future::try_join_all((0..READERS).map(|_| reader())).await?;
    Ok(())
}

/// A fold worker: folds the pages it takes from the queue into its own part until the queue
/// is closed and empty, or until an object cannot be read (with its position).
fn fold_pages(
    queue: &Mutex<tokio::sync::mpsc::Receiver<(Kind, u64, Vec<CachedObject>)>>,
) -> Result<Part, (u64, ParseError)> {
    let mut part = Part::default();
    loop {
        let taken = match queue.lock() {
            Ok(mut queue) => queue.blocking_recv(),
            Err(_) => None,
        };
        let Some((kind, base, objects)) = taken else {
            return Ok(part);
        };
        for (i, o) in (0u64..).zip(&objects) {
            part.fold(kind, o.data.as_bytes(), base + i)
                .map_err(|e| (base + i, e))?;
        }
    }
}

/// The kinds of the export's lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Customer,
    Subscription,
    Invoice,
    Charge,
    Price,
    Coupon,
    Event,
    Dispute,
}

impl Kind {
    /// The list a cached kind belongs to; products are not read.
    fn of_cached(kind: ObjectKind) -> Option<Kind> {
        Some(match kind {
            ObjectKind::Customer => Kind::Customer,
            ObjectKind::Subscription => Kind::Subscription,
            ObjectKind::Invoice => Kind::Invoice,
            ObjectKind::Charge => Kind::Charge,
            ObjectKind::Price => Kind::Price,
            ObjectKind::Coupon => Kind::Coupon,
            ObjectKind::Dispute => Kind::Dispute,
            ObjectKind::Product => return None,
        })
    }

    fn of_key(key: &str) -> Option<Kind> {
        Some(match key {
            "customers" => Kind::Customer,
            "subscriptions" => Kind::Subscription,
            "invoices" => Kind::Invoice,
            "charges" => Kind::Charge,
            "prices" => Kind::Price,
            "coupons" => Kind::Coupon,
            "events" => Kind::Event,
            "disputes" => Kind::Dispute,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Customer => "customer",
            Kind::Subscription => "subscription",
            Kind::Invoice => "invoice",
            Kind::Charge => "charge",
            Kind::Price => "price",
            Kind::Coupon => "coupon",
            Kind::Event => "event",
            Kind::Dispute => "dispute",
        }
    }
}

/// One array element: its kind and its byte range in the batch's buffer.
struct Element {
    kind: Kind,
    start: usize,
    end: usize,
}

/// A filled buffer and the elements cut from it; `base` is the buffer's offset in the input.
struct Batch {
    buf: Vec<u8>,
    base: u64,
    elements: Vec<Element>,
}

/// Reads `reader` to its end in batches, cutting each into elements for the workers. Stops
/// early when a worker met an error. Returns the export's `exported_at`, if it has one.
fn split_all<R: Read>(
    reader: &mut R,
    batch_bytes: usize,
    work: &mpsc::SyncSender<Batch>,
    free: &mpsc::Receiver<Vec<u8>>,
    stop: &AtomicBool,
) -> Result<Option<i64>, (u64, ExportError)> {
    let mut splitter = Splitter::default();
    let mut buf = vec![0u8; batch_bytes];
    let (mut filled, mut base, mut eof) = (0usize, 0u64, false);
    loop {
        while filled < buf.len() && !eof {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => eof = true,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err((base + filled as u64, ExportError::Read(e))),
            }
        }
        let mut elements = Vec::new();
        let consumed = splitter
            .feed(&buf[..filled], base, eof, &mut elements)
            .map_err(|e| (e.offset(), ExportError::from(e)))?;
        if stop.load(Ordering::Relaxed) {
            return Ok(splitter.exported_at);
        }
        if eof {
            if !elements.is_empty() {
                let _ = work.send(Batch {
                    buf,
                    base,
                    elements,
                });
            }
            return Ok(splitter.exported_at);
        }
        // The unread tail moves to the next buffer; one element larger than a buffer doubles it.
        let tail = filled - consumed;
        let want = if consumed == 0 {
            buf.len() * 2
        } else {
            batch_bytes.max(tail + 1)
        };
        let mut next = free.try_recv().unwrap_or_default();
        if next.len() < want {
            next.resize(want, 0);
        }
        next[..tail].copy_from_slice(&buf[consumed..filled]);
        if elements.is_empty() {
            drop(buf);
        } else if work
            .send(Batch {
                buf,
                base,
                elements,
            })
            .is_err()
        {
            return Ok(splitter.exported_at);
        }
        base += consumed as u64;
        buf = next;
        filled = tail;
    }
}

/// Where the splitter is in the top-level object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum At {
    /// Before the opening brace.
    #[default]
    Start,
    /// After `{` (a key or `}`) or after `,` (a key).
    Key { first: bool },
    /// After a key: `:`.
    Colon(Option<Kind>),
    /// After `:`: the value (a list for a known key).
    Value(Option<Kind>),
    /// In a list: an element, or `]` when `first`.
    Element { kind: Kind, first: bool },
    /// After an element: `,` or `]`.
    AfterElement(Kind),
    /// After a value: `,` or `}`.
    AfterValue,
    /// After the closing brace: only whitespace.
    Done,
}

/// Cuts the export's top-level object into array elements, across buffers.
#[derive(Default)]
struct Splitter {
    at: At,
    seen: HashSet<&'static str>,
    /// The key being read is `exported_at`.
    stamp: bool,
    /// The export's `exported_at` (unix seconds), once read.
    exported_at: Option<i64>,
}

/// Why the splitter stopped, with the input offset.
#[derive(Debug)]
enum SplitError {
    Shape(u64, String),
    /// A token the JSON parser refused: where it starts, what it should be, the parser's error.
    Json(u64, Option<&'static str>, serde_json::Error),
    Truncated(u64, Option<Kind>),
}

impl SplitError {
    fn offset(&self) -> u64 {
        match self {
            SplitError::Shape(at, _) | SplitError::Json(at, ..) | SplitError::Truncated(at, _) => {
                *at
            }
        }
    }
}

impl From<SplitError> for ExportError {
    fn from(e: SplitError) -> Self {
        match e {
            SplitError::Shape(at, what) => ExportError::Shape(format!("at byte {at}: {what}")),
            SplitError::Json(at, what, source) => ExportError::Json {
                offset: Some(at),
                what,
                source,
            },
            SplitError::Truncated(at, kind) => ExportError::Truncated {
                kind: kind.map(Kind::name),
                offset: at,
            },
        }
    }
}

impl Splitter {
    /// Walks `buf` (input offset `base`) as far as complete tokens go, pushing the elements met.
    /// Returns how many bytes were consumed: the rest starts an unfinished token and is fed again
    /// with more input. At `eof` the input must be complete.
    fn feed(
        &mut self,
        buf: &[u8],
        base: u64,
        eof: bool,
        out: &mut Vec<Element>,
    ) -> Result<usize, SplitError> {
        let at_byte = |i: usize| base + i as u64;
        let mut i = 0;
        loop {
            while i < buf.len() && buf[i].is_ascii_whitespace() {
                i += 1;
            }
            if i == buf.len() {
                if !eof || self.at == At::Done {
                    return Ok(i);
                }
                let kind = match self.at {
                    At::Element { kind, .. } | At::AfterElement(kind) => Some(kind),
                    At::Colon(kind) | At::Value(kind) => kind,
                    _ => None,
                };
                return Err(SplitError::Truncated(at_byte(i), kind));
            }
            let c = buf[i];
            let shape = |what: &str| SplitError::Shape(at_byte(i), what.to_owned());
            match self.at {
                At::Start => {
                    if c != b'{' {
                        return Err(shape(
                            "expected a JSON object with keys such as \"customers\" and \"subscriptions\"",
                        ));
                    }
                    self.at = At::Key { first: true };
                    i += 1;
                }
                At::Key { first } => {
                    if c == b'}' && first {
                        self.at = At::Done;
                        i += 1;
                        continue;
                    }
                    if c != b'"' {
                        return Err(shape("expected a key"));
                    }
                    let Some(end) = string_end(buf, i) else {
                        return self.incomplete(i, eof, base, None);
                    };
                    let key: String = serde_json::from_slice(&buf[i..end])
                        .map_err(|e| SplitError::Json(at_byte(i), Some("key"), e))?;
                    let kind = Kind::of_key(&key);
                    self.stamp = key == "exported_at";
                    if let Some(k) = kind
                        && !self.seen.insert(k.name())
                    {
                        return Err(SplitError::Shape(
                            at_byte(i),
                            format!("duplicate field `{key}`"),
                        ));
                    }
                    self.at = At::Colon(kind);
                    i = end;
                }
                At::Colon(kind) => {
                    if c != b':' {
                        return Err(shape("expected ':'"));
                    }
                    self.at = At::Value(kind);
                    i += 1;
                }
                At::Value(Some(kind)) => {
                    if c != b'[' {
                        return Err(SplitError::Shape(
                            at_byte(i),
                            format!("the value of \"{}s\" is not a list", kind.name()),
                        ));
                    }
                    self.at = At::Element { kind, first: true };
                    i += 1;
                }
                At::Value(None) => {
                    // Another key's value: skipped, but it must be JSON.
                    let Some(end) = value_end(buf, i, eof) else {
                        return self.incomplete(i, eof, base, None);
                    };
                    if self.stamp {
                        self.exported_at = serde_json::from_slice::<Option<i64>>(&buf[i..end])
                            .map_err(|e| {
                                SplitError::Json(
                                    at_byte(i),
                                    Some("\"exported_at\" is not unix seconds"),
                                    e,
                                )
                            })?;
                    } else {
                        serde_json::from_slice::<serde::de::IgnoredAny>(&buf[i..end])
                            .map_err(|e| SplitError::Json(at_byte(i), None, e))?;
                    }
                    self.at = At::AfterValue;
                    i = end;
                }
                At::Element { kind, first } => {
                    if c == b']' && first {
                        self.at = At::AfterValue;
                        i += 1;
                        continue;
                    }
                    let Some(end) = value_end(buf, i, eof) else {
                        return self.incomplete(i, eof, base, Some(kind));
                    };
                    out.push(Element {
                        kind,
                        start: i,
                        end,
                    });
                    self.at = At::AfterElement(kind);
                    i = end;
                }
                At::AfterElement(kind) => {
                    self.at = match c {
                        b',' => At::Element { kind, first: false },
                        b']' => At::AfterValue,
                        _ => return Err(shape("expected ',' or ']' after a list element")),
                    };
                    i += 1;
                }
                At::AfterValue => {
                    self.at = match c {
                        b',' => At::Key { first: false },
                        b'}' => At::Done,
                        _ => return Err(shape("expected ',' or '}'")),
                    };
                    i += 1;
                }
                At::Done => return Err(shape("trailing characters after the export")),
            }
        }
    }

    /// A token starting at `i` is not complete in this buffer.
    fn incomplete(
        &self,
        i: usize,
        eof: bool,
        base: u64,
        kind: Option<Kind>,
    ) -> Result<usize, SplitError> {
        if eof {
            Err(SplitError::Truncated(base + i as u64, kind))
        } else {
            Ok(i)
        }
    }
}

/// The end (exclusive) of the string starting with the quote at `buf[i]`, or `None` when the
/// buffer ends first.
fn string_end(buf: &[u8], i: usize) -> Option<usize> {
    let mut k = i + 1;
    loop {
        let j = k + memchr::memchr2(b'"', b'\\', buf.get(k..)?)?;
        if buf[j] == b'"' {
            return Some(j + 1);
        }
        k = j + 2;
    }
}

/// The end (exclusive) of the JSON value starting at `buf[i]`, or `None` when the buffer ends
/// first. Only strings and brackets are followed: the value's own parser checks the rest. In an
/// object only braces count (brackets balance inside it in any valid JSON), so one `memchr3`
/// finds the next byte that matters.
fn value_end(buf: &[u8], i: usize, eof: bool) -> Option<usize> {
    let (open, close) = match buf[i] {
        b'"' => return string_end(buf, i),
        b'{' => (b'{', b'}'),
        b'[' => (b'[', b']'),
        _ => {
            let len = buf[i..]
                .iter()
                .position(|c| matches!(c, b',' | b']' | b'}') || c.is_ascii_whitespace());
            return match len {
                Some(len) => Some(i + len),
                None if eof => Some(buf.len()),
                None => None,
            };
        }
    };
    let mut depth = 0usize;
    let mut k = i;
    loop {
        let j = k + memchr::memchr3(b'"', open, close, buf.get(k..)?)?;
        if buf[j] == b'"' {
            k = string_end(buf, j)?;
        } else if buf[j] == open {
            depth += 1;
            k = j + 1;
        } else {
            depth -= 1;
            k = j + 1;
            if depth == 0 {
                return Some(k);
            }
        }
    }
}

/// A key ordering the first definition of a price: the price list, then subscription items,
/// then invoice lines, each in input order.
type PriceKey = (u8, u64, u32);

/// What one worker folded from the batches it took.
#[derive(Default)]
struct Part {
    error: Option<(u64, ExportError)>,
    as_of: i64,
    prices: Vec<(PriceKey, objects::Price)>,
    /// The first embedded definition of each price id this worker met.
    embedded: HashMap<String, (PriceKey, objects::Price)>,
    coupons: Vec<(u64, objects::Coupon)>,
    customers: Vec<(u64, Converted<model::Customer>)>,
    subscriptions: Vec<(u64, objects::Subscription)>,
    invoices: Vec<(u64, Option<Arc<str>>, InvoiceDigest)>,
    charges: Vec<(u64, Converted<model::Payment>)>,
    events: Vec<(u64, objects::Event)>,
    disputes: Vec<(u64, objects::Dispute)>,
    names: Names,
}

/// An object converted as soon as it is read: its id, the result and the issues met.
struct Converted<T> {
    id: Box<str>,
    value: Option<T>,
    issues: Vec<Issue>,
}

fn work(
    batches: &Mutex<mpsc::Receiver<Batch>>,
    free: &mpsc::Sender<Vec<u8>>,
    stop: &AtomicBool,
) -> Part {
    let mut part = Part::default();
    loop {
        let batch = {
            let Ok(rx) = batches.lock() else { break };
            rx.recv()
        };
        let Ok(batch) = batch else { break };
        if part.error.is_none() && !stop.load(Ordering::Relaxed) {
            for e in &batch.elements {
                let at = batch.base + e.start as u64;
                if let Err(err) = part.fold(e.kind, &batch.buf[e.start..e.end], at) {
                    part.error = Some((at, ExportError::Object(err)));
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
            }
        }
        let _ = free.send(batch.buf);
    }
    part
}

impl Part {
    fn fold(&mut self, kind: Kind, json: &[u8], at: u64) -> Result<(), ParseError> {
        let name = kind.name();
        match kind {
            Kind::Price => {
                let p: objects::Price = parse(name, json, at)?;
                self.prices.push(((0, at, 0), p));
            }
            Kind::Coupon => self.coupons.push((at, parse(name, json, at)?)),
            Kind::Customer => {
                let c: objects::Customer = parse(name, json, at)?;
                self.as_of = self.as_of.max(c.created);
                let mut issues = Vec::new();
                let value = customer(&c, &mut issues);
                self.customers.push((
                    at,
                    Converted {
                        id: c.id.into(),
                        value,
                        issues,
                    },
                ));
            }
            Kind::Subscription => {
                let s: objects::Subscription = parse(name, json, at)?;
                self.as_of = [
                    Some(s.created),
                    s.canceled_at,
                    s.ended_at,
                    s.current_period_start,
                ]
                .into_iter()
                .flatten()
                .chain(s.items.data.iter().filter_map(|i| i.current_period_start))
                .fold(self.as_of, i64::max);
                for (n, item) in s.items.data.iter().enumerate() {
                    if let Some(p) = item.price() {
                        self.embed((1, at, index(n)), p);
                    }
                }
                self.subscriptions.push((at, s));
            }
            Kind::Invoice => {
                let inv: objects::Invoice = parse(name, json, at)?;
                self.as_of = self.as_of.max(inv.created);
                for (n, line) in inv.lines.data.iter().enumerate() {
                    if let Some(p) = line.price.as_ref().or(line.plan.as_ref()) {
                        self.embed((2, at, index(n)), p);
                    }
                }
                let sub = inv.subscription_id().map(|s| self.names.get(s));
                let digest = InvoiceDigest::of(&inv, &mut self.names);
                self.invoices.push((at, sub, digest));
            }
            Kind::Charge => {
                let ch: objects::Charge = parse(name, json, at)?;
                self.as_of = self.as_of.max(ch.created);
                let mut issues = Vec::new();
                let value = payment(&ch, &mut issues);
                self.charges.push((
                    at,
                    Converted {
                        id: ch.id.into(),
                        value,
                        issues,
                    },
                ));
            }
            Kind::Event => {
                let e: objects::Event = parse(name, json, at)?;
                self.as_of = self.as_of.max(e.created);
                self.events.push((at, e));
            }
            Kind::Dispute => {
                let d: objects::Dispute = parse(name, json, at)?;
                self.as_of = self.as_of.max(d.created);
                self.disputes.push((at, d));
            }
        }
        Ok(())
    }

    fn embed(&mut self, key: PriceKey, price: &objects::Price) {
        match self.embedded.get_mut(price.id.as_str()) {
            Some(have) if have.0 <= key => {}
            Some(have) => *have = (key, price.clone()),
            None => {
                self.embedded.insert(price.id.clone(), (key, price.clone()));
            }
        }
    }
}

fn index(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// [`objects::parse`], naming the byte offset when the object has no readable id.
fn parse<T: serde::de::DeserializeOwned>(
    kind: &'static str,
    json: &[u8],
    at: u64,
) -> Result<T, ParseError> {
    objects::parse(kind, json).map_err(|mut e| {
        if e.id == "(no id)" {
            e.id = format!("(no id, at byte {at})");
        }
        e
    })
}

/// The last occurrence of each id, in input order.
fn latest<T>(mut items: Vec<(u64, T)>, id: impl Fn(&T) -> &str) -> Vec<(u64, T)> {
    items.sort_unstable_by_key(|(at, _)| *at);
    let mut last: HashMap<&str, u64> = HashMap::with_capacity(items.len());
    for (at, t) in &items {
        last.insert(id(t), *at);
    }
    let keep: Vec<bool> = items
        .iter()
        .map(|(at, t)| last.get(id(t)) == Some(at))
        .collect();
    drop(last);
    let mut keep = keep.into_iter();
    items.retain(|_| keep.next().unwrap_or(false));
    items
}

/// Everything the workers folded, rebuilt in [`super::rebuild`]'s order.
fn assemble(parts: Vec<Part>) -> Rebuilt {
    let mut as_of = 0;
    let mut prices = Vec::new();
    let mut embedded: HashMap<String, (PriceKey, objects::Price)> = HashMap::new();
    let (mut coupons, mut customers, mut subscriptions) = (Vec::new(), Vec::new(), Vec::new());
    let (mut invoices, mut charges, mut events) = (Vec::new(), Vec::new(), Vec::new());
    let mut disputes = Vec::new();
    for p in parts {
        as_of = as_of.max(p.as_of);
        prices.extend(p.prices);
        for (id, (key, price)) in p.embedded {
            match embedded.get_mut(&id) {
                Some(have) if have.0 <= key => {}
                Some(have) => *have = (key, price),
                None => {
                    embedded.insert(id, (key, price));
                }
            }
        }
        coupons.extend(p.coupons);
        customers.extend(p.customers);
        subscriptions.extend(p.subscriptions);
        invoices.extend(p.invoices);
        charges.extend(p.charges);
        events.extend(p.events);
        disputes.extend(p.disputes);
    }
    prices.extend(embedded.into_values());
    prices.sort_unstable_by_key(|(key, _)| *key);
    coupons.sort_unstable_by_key(|(at, _)| *at);

    let mut cx = Ctx {
        prices: HashMap::new(),
        bad_prices: HashSet::new(),
        coupons: HashMap::new(),
        issues: Vec::new(),
        as_of,
    };
    for (_, p) in &prices {
        consider_price(p, &mut cx);
    }
    for (_, c) in &coupons {
        cx.coupons.insert(&c.id, c);
    }
    let mut account = Account::default();
    for (_, c) in latest(customers, |c| &*c.id) {
        cx.issues.extend(c.issues);
        account.customers.extend(c.value);
    }
    let mut by_sub: HashMap<Arc<str>, Vec<InvoiceDigest>> = HashMap::new();
    for (_, (sub, inv)) in latest(
        invoices
            .into_iter()
            .map(|(at, sub, inv)| (at, (sub, inv)))
            .collect(),
        |(_, inv)| &*inv.id,
    ) {
        if let Some(sub) = sub {
            by_sub.entry(sub).or_default().push(inv);
        }
    }
    let events = latest(events, |e| &e.id);
    let mut events_by_sub: HashMap<String, Vec<(&objects::Event, objects::Subscription)>> =
        HashMap::new();
    for (_, e) in &events {
        if let Some(sub) = event_subscription(e, &mut cx.issues) {
            events_by_sub
                .entry(sub.id.clone())
                .or_default()
                .push((e, sub));
        }
    }
    for (_, sub) in latest(subscriptions, |s| &s.id) {
        let invs = by_sub.remove(sub.id.as_str()).unwrap_or_default();
        let evs = events_by_sub.remove(&sub.id).unwrap_or_default();
        if let Some(s) = rebuild_one(&sub, invs, evs, &mut cx) {
            account.subscriptions.push(s);
        }
    }
    for (_, ch) in latest(charges, |c| &*c.id) {
        cx.issues.extend(ch.issues);
        account.payments.extend(ch.value);
    }
    let disputes = latest(disputes, |d| &d.id);
    attach_disputes(
        &mut account.payments,
        disputes.iter().map(|(_, d)| d),
        &mut cx.issues,
    );
    Rebuilt {
        account,
        issues: cx.issues,
        as_of: (cx.as_of > 0).then(|| super::instant(cx.as_of)).flatten(),
    }
}

#[cfg(test)]
mod tests;
