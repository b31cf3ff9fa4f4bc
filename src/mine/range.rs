//! Which studies the archive holds in the date window, with as few C-FINDs (or QIDO-RS
//! searches) as the archive allows: the whole window is asked for at once (or pages of
//! `archive.query_page_days` where that is set), and a range is split only when the
//! archive caps its answer (C-FIND: final status FE00 Cancel or a Bxxx warning, as Orthanc
//! answers when `LimitFindResults` is reached; `archive.find_answer_limit` answers or more;
//! QIDO-RS or C-FIND: more answers than one query may hold). A capped range of dates is
//! bisected; a capped single day is bisected by Study Time (down to one second); a second
//! still capped is an *unresolved* range: counted, logged and reported, never dropped
//! silently. The answers of a capped query are kept as well (the caller skips a study it
//! has seen), so a split loses nothing that the capped answer held.
//!
//! The walk is depth-first in date order, so the studies of the first answered range are
//! mined before later ranges are asked for, and memory stays bounded by one answer.

use std::future::Future;

use chrono::NaiveDate;
use serde::Serialize;

use super::answer::Answer;
use super::archive::ArchiveError;

/// Seconds in a day; Study Time ranges split a day in these.
const DAY_SECONDS: u32 = 24 * 60 * 60;

/// A range of studies to ask for: dates (inclusive), or a stretch of one day's Study Times
/// (seconds after midnight, inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    Days { from: NaiveDate, to: NaiveDate },
    Seconds { day: NaiveDate, from: u32, to: u32 },
}

fn date(d: NaiveDate) -> String {
    d.format("%Y%m%d").to_string()
}

fn time(seconds: u32) -> String {
    format!(
        "{:02}{:02}{:02}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

impl Span {
    /// The Study Date matching key: `YYYYMMDD` or `YYYYMMDD-YYYYMMDD`.
    pub fn study_date(&self) -> String {
        match *self {
            Span::Days { from, to } if from == to => date(from),
            Span::Days { from, to } => format!("{}-{}", date(from), date(to)),
            Span::Seconds { day, .. } => date(day),
        }
    }

    /// The Study Time matching key, if the span is part of a day: `HHMMSS-HHMMSS.999999`
    /// (the end inclusive of fractions of its second).
    pub fn study_time(&self) -> Option<String> {
        match *self {
            Span::Days { .. } => None,
            Span::Seconds { from, to, .. } => Some(format!("{}-{}.999999", time(from), time(to))),
        }
    }

    /// The span's two halves, or none where it is one second.
    pub fn split(&self) -> Option<(Span, Span)> {
        match *self {
            Span::Days { from, to } if from == to => Some((
                Span::Seconds {
                    day: from,
                    from: 0,
                    to: DAY_SECONDS / 2 - 1,
                },
                Span::Seconds {
                    day: from,
                    from: DAY_SECONDS / 2,
                    to: DAY_SECONDS - 1,
                },
            )),
            Span::Days { from, to } => {
                let mid = from + chrono::Duration::days((to - from).num_days() / 2);
                Some((
                    Span::Days { from, to: mid },
                    Span::Days {
                        from: mid + chrono::Duration::days(1),
                        to,
                    },
                ))
            }
            Span::Seconds { from, to, .. } if from >= to => None,
            Span::Seconds { day, from, to } => {
                let mid = from + (to - from) / 2;
                Some((
                    Span::Seconds { day, from, to: mid },
                    Span::Seconds {
                        day,
                        from: mid + 1,
                        to,
                    },
                ))
            }
        }
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.study_time() {
            Some(t) => write!(f, "{} {}", self.study_date(), t),
            None => f.write_str(&self.study_date()),
        }
    }
}

/// One answer to a study query: what came, and whether the archive capped it (more match).
#[derive(Debug, Default)]
pub struct Found {
    pub answers: Vec<Answer>,
    pub capped: bool,
}

/// Asks the archive for the studies of a span.
pub trait FindStudies {
    fn find_studies(&self, span: &Span) -> impl Future<Output = Result<Found, ArchiveError>>;
}

/// What the study queries of a run cost and found, for the report.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct QueryCounts {
    /// Study queries sent (C-FIND or QIDO-RS searches, each with its pages).
    pub queries: u64,
    /// Of those, answered with no study (they are not held back by the rate limit).
    pub empty: u64,
    /// Of those, capped by the archive, then split.
    pub capped: u64,
    /// Single days split by Study Time because the archive capped them.
    pub days_split_by_time: u64,
    /// One-second spans the archive still capped: studies there may be missing.
    pub unresolved: u64,
}

/// The walk over the window's spans, depth-first in date order.
pub struct Walk {
    /// Spans still to ask for, the next one last.
    stack: Vec<Span>,
    pub counts: QueryCounts,
}

/// What one step of the walk brought.
#[derive(Debug)]
pub struct Step {
    pub span: Span,
    pub answers: Vec<Answer>,
    /// The archive capped this span's answer and it could not be split further.
    pub unresolved: bool,
}

impl Walk {
    /// The window `since..=until`, in pages of `page_days` (0: one page).
    pub fn new(since: NaiveDate, until: NaiveDate, page_days: u32) -> Walk {
        let mut pages = Vec::new();
        let mut start = since;
        while start <= until {
            let end = if page_days == 0 {
                until
            } else {
                (start + chrono::Duration::days(i64::from(page_days) - 1)).min(until)
            };
            pages.push(Span::Days {
                from: start,
                to: end,
            });
            start = end + chrono::Duration::days(1);
        }
        pages.reverse();
        Walk {
            stack: pages,
            counts: QueryCounts::default(),
        }
    }

    /// Spans still to ask for (the pages not yet asked for, at the start).
    pub fn pending(&self) -> usize {
        self.stack.len()
    }

    /// Ask for the next span; `None` when the window is done. A capped span is split (its
    /// halves are asked for next) and its answers come back all the same.
    pub async fn next<F: FindStudies>(
        &mut self,
        archive: &F,
    ) -> Option<Result<Step, (Span, ArchiveError)>> {
        let span = self.stack.pop()?;
        self.counts.queries += 1;
        let found = match archive.find_studies(&span).await {
            Ok(found) => found,
            Err(e) => return Some(Err((span, e))),
        };
        if found.answers.is_empty() && !found.capped {
            self.counts.empty += 1;
        }
        let mut unresolved = false;
        if found.capped {
            match span.split() {
                Some((first, second)) => {
                    self.counts.capped += 1;
                    if matches!(span, Span::Days { from, to } if from == to) {
                        self.counts.days_split_by_time += 1;
                    }
                    self.stack.push(second);
                    self.stack.push(first);
                }
                None => {
                    self.counts.unresolved += 1;
                    unresolved = true;
                }
            }
        }
        Some(Ok(Step {
            span,
            answers: found.answers,
            unresolved,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_dictionary_std::tags;
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y%m%d").unwrap()
    }

    /// An archive holding (uid, date, seconds) studies that answers at most `limit` (0: no
    /// cap) and says when it capped, as Orthanc does with `LimitFindResults`.
    struct FakeArchive {
        studies: Vec<(String, NaiveDate, u32)>,
        limit: usize,
        asked: RefCell<Vec<String>>,
    }

    impl FindStudies for FakeArchive {
        async fn find_studies(&self, span: &Span) -> Result<Found, ArchiveError> {
            self.asked.borrow_mut().push(span.to_string());
            let matching: Vec<&(String, NaiveDate, u32)> = self
                .studies
                .iter()
                .filter(|(_, day, t)| match *span {
                    Span::Days { from, to } => (from..=to).contains(day),
                    Span::Seconds { day: d, from, to } => d == *day && (from..=to).contains(t),
                })
                .collect();
            let capped = self.limit > 0 && matching.len() > self.limit;
            let take = if capped { self.limit } else { matching.len() };
            Ok(Found {
                answers: matching[..take]
                    .iter()
                    .map(|(uid, _, _)| {
                        let mut a = Answer::default();
                        a.insert(tags::STUDY_INSTANCE_UID, vec![uid.clone()]);
                        a
                    })
                    .collect(),
                capped,
            })
        }
    }

    fn walk_all(archive: &FakeArchive, since: &str, until: &str) -> (BTreeSet<String>, Walk) {
        let mut walk = Walk::new(d(since), d(until), 0);
        let mut seen = BTreeSet::new();
        futures_executor(async {
            while let Some(step) = walk.next(archive).await {
                let step = step.unwrap();
                for a in step.answers {
                    seen.insert(a.text(tags::STUDY_INSTANCE_UID));
                }
            }
        });
        (seen, walk)
    }

    fn futures_executor(f: impl Future<Output = ()>) {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f);
    }

    fn study(uid: &str, day: &str, hms: u32) -> (String, NaiveDate, u32) {
        (uid.to_string(), d(day), hms)
    }

    #[test]
    fn an_uncapped_archive_is_asked_once_for_forty_years() {
        let archive = FakeArchive {
            studies: vec![
                study("a", "19850312", 100),
                study("b", "20030701", 200),
                study("c", "20240101", 300),
            ],
            limit: 0,
            asked: RefCell::default(),
        };
        let (seen, walk) = walk_all(&archive, "19840101", "20241231");
        assert_eq!(seen.len(), 3);
        assert_eq!(walk.counts.queries, 1);
        assert_eq!(*archive.asked.borrow(), ["19840101-20241231"]);
    }

    #[test]
    fn a_capped_archive_is_bisected_by_date_then_by_time_and_loses_nothing() {
        let mut studies = vec![
            study("a", "19850312", 100),
            study("b", "20030701", 200),
            study("c", "20240101", 300),
            study("d", "20240101", 40_000),
            study("e", "20240101", 80_000),
            study("f", "20240102", 10),
        ];
        // Ten studies in the same second of one day: more than the cap even there.
        let limit = 2;
        let archive = FakeArchive {
            studies: studies.clone(),
            limit,
            asked: RefCell::default(),
        };
        let (seen, walk) = walk_all(&archive, "19840101", "20241231");
        assert_eq!(seen.len(), 6, "{seen:?}");
        assert!(walk.counts.capped > 0 && walk.counts.days_split_by_time == 1);
        assert_eq!(walk.counts.unresolved, 0);
        // A handful of queries, not one a day.
        assert!(walk.counts.queries < 80, "{:?}", walk.counts);
        let asked = archive.asked.borrow();
        assert!(
            asked.iter().any(|q| q.starts_with("20240101 ")),
            "{asked:?}"
        );
        // Every capped query was split: the number of queries is 1 + 2 per capped one.
        assert_eq!(walk.counts.queries, 1 + 2 * walk.counts.capped);

        for i in 0..3 {
            studies.push(study(&format!("same{i}"), "20100505", 3600));
        }
        let archive = FakeArchive {
            studies,
            limit,
            asked: RefCell::default(),
        };
        let (seen, walk) = walk_all(&archive, "19840101", "20241231");
        // What a capped one-second span answered is kept; the rest is reported.
        assert_eq!(walk.counts.unresolved, 1, "{:?}", walk.counts);
        assert_eq!(seen.len(), 8, "{seen:?}");
    }

    #[test]
    fn pages_are_walked_in_date_order_and_an_empty_page_is_counted() {
        let archive = FakeArchive {
            studies: vec![
                study("late", "20240105", 10),
                study("early", "20240101", 10),
            ],
            limit: 0,
            asked: RefCell::default(),
        };
        let mut walk = Walk::new(d("20240101"), d("20240112"), 4);
        assert_eq!(walk.pending(), 3);
        let mut order = Vec::new();
        futures_executor(async {
            while let Some(step) = walk.next(&archive).await {
                for a in step.unwrap().answers {
                    order.push(a.text(tags::STUDY_INSTANCE_UID));
                }
            }
        });
        assert_eq!(order, ["early", "late"]);
        assert_eq!(
            *archive.asked.borrow(),
            [
                "20240101-20240104",
                "20240105-20240108",
                "20240109-20240112"
            ]
        );
        assert_eq!((walk.counts.queries, walk.counts.empty), (3, 1));
    }

    #[test]
    fn spans_split_into_halves_that_cover_them() {
        let s = Span::Days {
            from: d("20240101"),
            to: d("20240104"),
        };
        let (a, b) = s.split().unwrap();
        assert_eq!(
            (a.study_date(), b.study_date()),
            ("20240101-20240102".into(), "20240103-20240104".into())
        );
        let day = Span::Days {
            from: d("20240101"),
            to: d("20240101"),
        };
        let (a, b) = day.split().unwrap();
        assert_eq!(a.study_time().unwrap(), "000000-115959.999999");
        assert_eq!(b.study_time().unwrap(), "120000-235959.999999");
        assert_eq!(a.study_date(), "20240101");
        let second = Span::Seconds {
            day: d("20240101"),
            from: 7,
            to: 7,
        };
        assert!(second.split().is_none());
        let pages = Walk::new(d("20240101"), d("20240110"), 7).stack;
        assert_eq!(pages.len(), 2);
    }
}
