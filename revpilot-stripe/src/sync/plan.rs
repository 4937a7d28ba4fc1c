//! A stream's backfill plan: its `created` range split into segments that lanes page through side
//! by side, split further whenever a lane is idle, and saved as the stream's cursor after every
//! page.
//!
//! A stream starts as one segment `[0, now + 1 day)`. A lane pages a segment newest first with
//! `created[gte]`/`created[lt]` and `starting_after`. An idle lane takes the busy segment with the
//! widest unread range `[lo, oldest seen]` and splits it at the middle: it reads `[lo, mid)`, the
//! busy lane continues in `[mid, ..)`. An account's objects usually span a few years of a range
//! that starts in 1970, so the first splits find nothing (one request each) and the next ones
//! land where the objects are. Every saved plan covers everything not yet stored, so a sync
//! resumed from any saved plan is complete; at worst a page is read twice, which the cache and the
//! usage store take as no change. A server that does not filter by `created` (localstripe) gets
//! one plain lane.

use serde::{Deserialize, Serialize};

/// One range of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Segment {
    /// `created[gte]`.
    pub(crate) lo: i64,
    /// `created[lt]`.
    pub(crate) hi: i64,
    /// The last object read (`starting_after`).
    #[serde(default)]
    pub(crate) after: Option<String>,
    /// Read to its end.
    #[serde(default)]
    pub(crate) done: bool,
    /// A lane is on it (not saved: nothing is in flight after a restart).
    #[serde(skip)]
    pub(crate) busy: bool,
    /// `created` of the oldest object read (not saved: only steers splitting).
    #[serde(skip)]
    pub(crate) oldest: Option<i64>,
}

/// The plan of one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Plan {
    /// The server ignores or refuses `created` filters: one lane, no filters.
    #[serde(default)]
    pub(crate) plain: bool,
    /// The list path in use, when a fallback replaced the stream's own.
    #[serde(default)]
    pub(crate) path: Option<String>,
    /// The segments; indices never change (splits append).
    pub(crate) segments: Vec<Segment>,
}

/// What a lane should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Take {
    /// Read the next page of this segment.
    Work(usize),
    /// Nothing free now; other lanes are busy.
    Wait,
    /// The stream is read to its end.
    Finished,
}

impl Plan {
    /// A fresh plan covering everything created before `now` + 1 day. With the account's
    /// creation time as `floor`, the range is split there first: splits then land among the
    /// account's objects, and the range before it costs one request.
    pub(crate) fn new(now: i64, floor: Option<i64>) -> Self {
        let hi = now.saturating_add(86_400);
        let segment = |lo, hi| Segment {
            lo,
            hi,
            after: None,
            done: false,
            busy: false,
            oldest: None,
        };
        let segments = match floor.filter(|f| *f > 0 && *f < hi) {
            Some(f) => vec![segment(f, hi), segment(0, f)],
            None => vec![segment(0, hi)],
        };
        Plan {
            plain: false,
            path: None,
            segments,
        }
    }

    /// The plan saved as `cursor`, or a fresh one.
    pub(crate) fn load(cursor: Option<&str>, now: i64, floor: Option<i64>) -> Self {
        match cursor {
            None => Plan::new(now, floor),
            Some(c) if c == super::DONE => {
                let mut p = Plan::new(now, None);
                p.segments[0].done = true;
                p
            }
            Some(c) => serde_json::from_str(c).unwrap_or_else(|_| {
                // A cursor of an earlier version: the plain last id.
                let mut p = Plan::new(now, None);
                p.plain = true;
                p.segments[0].after = Some(c.to_owned());
                p
            }),
        }
    }

    /// The saved form.
    pub(crate) fn save(&self) -> String {
        if self.is_done() {
            return super::DONE.to_owned();
        }
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Every segment is read to its end.
    pub(crate) fn is_done(&self) -> bool {
        self.segments.iter().all(|s| s.done)
    }

    /// Picks work for an idle lane, splitting a busy segment when none is free and `may_split`.
    pub(crate) fn take(&mut self, may_split: bool) -> Take {
        if self.is_done() {
            return Take::Finished;
        }
        if let Some(i) = self.segments.iter().position(|s| !s.done && !s.busy) {
            self.segments[i].busy = true;
            return Take::Work(i);
        }
        if self.plain || !may_split {
            return Take::Wait;
        }
        let widest = self
            .segments
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.done && s.busy)
            .filter_map(|(i, s)| s.oldest.map(|o| (i, o - s.lo)))
            .filter(|(_, width)| *width >= 2)
            .max_by_key(|(_, width)| *width);
        let Some((i, width)) = widest else {
            return Take::Wait;
        };
        let lo = self.segments[i].lo;
        let mid = lo + width / 2;
        self.segments[i].lo = mid;
        self.segments.push(Segment {
            lo,
            hi: mid,
            after: None,
            done: false,
            busy: true,
            oldest: None,
        });
        Take::Work(self.segments.len() - 1)
    }

    /// Records a page read from segment `i`: its last object (id, created) and whether more follow.
    pub(crate) fn page_done(&mut self, i: usize, last: Option<(String, i64)>, has_more: bool) {
        let Some(s) = self.segments.get_mut(i) else {
            return;
        };
        s.busy = false;
        match last {
            Some((id, created)) if has_more => {
                s.after = Some(id);
                s.oldest = Some(created);
            }
            _ => s.done = true,
        }
    }

    /// Gives segment `i` back after a failed request.
    pub(crate) fn release(&mut self, i: usize) {
        if let Some(s) = self.segments.get_mut(i) {
            s.busy = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitting_covers_the_range_exactly_and_survives_a_save() {
        let mut p = Plan::new(1_000, None);
        assert_eq!(p.take(true), Take::Work(0));
        assert_eq!(
            p.take(true),
            Take::Wait,
            "nothing known about segment 0 yet"
        );
        p.segments[0].oldest = Some(800);
        assert_eq!(p.take(true), Take::Work(1));
        assert_eq!((p.segments[1].lo, p.segments[1].hi), (0, 400));
        assert_eq!(p.segments[0].lo, 400);
        // The saved plan covers [0, hi) with no gap and no overlap.
        let saved = Plan::load(Some(&p.save()), 5_000, None);
        let mut ranges: Vec<(i64, i64)> = saved.segments.iter().map(|s| (s.lo, s.hi)).collect();
        ranges.sort_unstable();
        assert_eq!(ranges, vec![(0, 400), (400, 87_400)]);
        assert!(
            saved.segments.iter().all(|s| !s.busy),
            "nothing is in flight after a restart"
        );
    }

    #[test]
    fn the_account_creation_splits_the_range_first() {
        let p = Plan::new(1_000, Some(600));
        let ranges: Vec<(i64, i64)> = p.segments.iter().map(|s| (s.lo, s.hi)).collect();
        assert_eq!(ranges, vec![(600, 87_400), (0, 600)]);
        assert_eq!(Plan::new(1_000, Some(0)).segments.len(), 1);
    }

    #[test]
    fn pages_finish_segments_and_the_plan() {
        let mut p = Plan::new(0, None);
        assert_eq!(p.take(true), Take::Work(0));
        p.page_done(0, Some(("cus_9".into(), 50)), true);
        assert_eq!(p.segments[0].after.as_deref(), Some("cus_9"));
        assert_eq!(p.take(true), Take::Work(0));
        p.page_done(0, Some(("cus_1".into(), 10)), false);
        assert!(p.is_done());
        assert_eq!(p.take(true), Take::Finished);
        assert_eq!(p.save(), "done");
        assert!(Plan::load(Some("done"), 0, None).is_done());
    }

    #[test]
    fn a_plain_plan_never_splits_and_an_old_cursor_resumes_plainly() {
        let mut p = Plan::load(Some("cus_42"), 100, None);
        assert!(p.plain);
        assert_eq!(p.take(true), Take::Work(0));
        p.segments[0].oldest = Some(90);
        assert_eq!(p.take(true), Take::Wait);
        assert_eq!(p.segments[0].after.as_deref(), Some("cus_42"));
    }
}
