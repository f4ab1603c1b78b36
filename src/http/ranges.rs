//! Which bytes of a file a `Range` header asks for: a pure decision, no I/O.
//!
//! RFC 9110 §14.2 lets a server ignore a `Range` header, and §14.3 asks it to guard against
//! requests that ask for many small or overlapping ranges, which cost far more to answer than the
//! file is worth (2,000 × `0-` once turned a 6 KB request into a 63 MB response). The policy here:
//!
//! - one range, or up to [`MAX_RANGES`] ranges in ascending order that do not overlap, each
//!   clamped to the file: **206** with exactly those bytes, so a response is never larger than
//!   the file plus a few part headers;
//! - more ranges, overlapping or descending ones, a header longer than [`MAX_HEADER_LEN`], or
//!   syntax this module does not understand: the header is **ignored** and the whole file is sent
//!   with 200 (what §14.2 allows, and what a client that asked honestly can always use);
//! - well-formed ranges none of which starts inside the file: **416** with `Content-Range:
//!   bytes */<length>` (§15.5.17).

use std::ops::Range;

/// The most ranges one request may ask for; more and the header is ignored. Four covers every
/// real client (media players and PDF viewers ask for one or two) with room to spare.
pub const MAX_RANGES: usize = 4;

/// The longest `Range` header value that is read at all; longer ones are ignored. Four ranges of
/// 20-digit offsets fit in under 100 characters.
pub const MAX_HEADER_LEN: usize = 256;

/// What to send for a `Range` header and a representation of `len` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangePlan {
    /// Send the whole representation with 200 (no header, or one that is ignored).
    Whole,
    /// Send these byte ranges with 206; non-empty, ascending, disjoint, within the file.
    Partial(Vec<Range<u64>>),
    /// Answer 416: the header is well-formed but asks for nothing inside the file.
    Unsatisfiable,
}

/// Decides what to send for the `Range` header value `header` on a representation of `len` bytes.
pub fn plan(header: &str, len: u64) -> RangePlan {
    if header.len() > MAX_HEADER_LEN {
        return RangePlan::Whole;
    }
    let Some(specs) = header.trim().strip_prefix("bytes=") else {
        return RangePlan::Whole;
    };
    let mut ranges: Vec<Range<u64>> = Vec::new();
    let mut well_formed = 0usize;
    for spec in specs.split(',') {
        let spec = spec.trim();
        if spec.is_empty() {
            continue;
        }
        well_formed += 1;
        if well_formed > MAX_RANGES {
            return RangePlan::Whole;
        }
        let Some(range) = parse_spec(spec) else {
            return RangePlan::Whole;
        };
        let Some(range) = range.resolve(len) else {
            continue;
        };
        if let Some(last) = ranges.last() {
            if range.start < last.end {
                return RangePlan::Whole;
            }
        }
        ranges.push(range);
    }
    if well_formed == 0 {
        RangePlan::Whole
    } else if ranges.is_empty() {
        RangePlan::Unsatisfiable
    } else {
        RangePlan::Partial(ranges)
    }
}

/// One `range-spec` before it meets the file's length.
#[derive(Debug, Clone, Copy)]
enum Spec {
    /// `first-last` or `first-`.
    From { first: u64, last: Option<u64> },
    /// `-suffix`: the last `suffix` bytes.
    Suffix(u64),
}

impl Spec {
    /// The bytes this spec selects from `len` bytes, or `None` if it selects none.
    fn resolve(self, len: u64) -> Option<Range<u64>> {
        match self {
            Spec::From { first, last } => {
                if first >= len {
                    return None;
                }
                let end = last.map_or(len, |last| last.saturating_add(1).min(len));
                Some(first..end)
            }
            Spec::Suffix(0) => None,
            Spec::Suffix(suffix) => (len > 0).then(|| len.saturating_sub(suffix)..len),
        }
    }
}

/// Parses `first-last`, `first-` or `-suffix`; `None` for anything else (including last < first).
fn parse_spec(spec: &str) -> Option<Spec> {
    let (first, last) = spec.split_once('-')?;
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    if first.trim().is_empty() {
        return Some(Spec::Suffix(number(last)?));
    }
    let first = number(first)?;
    if last.trim().is_empty() {
        return Some(Spec::From { first, last: None });
    }
    let last = number(last)?;
    (last >= first).then_some(Spec::From {
        first,
        last: Some(last),
    })
}

#[cfg(test)]
// `vec![a..b]` is exactly what a one-range plan is here.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn single_ranges_of_every_form() {
        assert_eq!(plan("bytes=0-9", 100), RangePlan::Partial(vec![0..10]));
        assert_eq!(plan("bytes=90-", 100), RangePlan::Partial(vec![90..100]));
        assert_eq!(plan("bytes=-10", 100), RangePlan::Partial(vec![90..100]));
        assert_eq!(plan("bytes=-500", 100), RangePlan::Partial(vec![0..100]));
        assert_eq!(plan("bytes=95-500", 100), RangePlan::Partial(vec![95..100]));
        assert_eq!(plan(" bytes= 1-1 ", 100), RangePlan::Partial(vec![1..2]));
    }

    #[test]
    fn a_few_ascending_disjoint_ranges_are_served() {
        assert_eq!(
            plan("bytes=0-1,10-19,-5", 100),
            RangePlan::Partial(vec![0..2, 10..20, 95..100])
        );
        assert_eq!(
            plan("bytes=0-0,1-1,2-2,3-3", 100),
            RangePlan::Partial(vec![0..1, 1..2, 2..3, 3..4])
        );
    }

    #[test]
    fn amplification_gets_the_whole_file_once() {
        let flood = vec!["0-"; 2000].join(",");
        assert_eq!(plan(&format!("bytes={flood}"), 100), RangePlan::Whole);
        assert_eq!(plan("bytes=0-,0-", 100), RangePlan::Whole, "overlapping");
        assert_eq!(
            plan("bytes=0-50,40-60", 100),
            RangePlan::Whole,
            "overlapping"
        );
        assert_eq!(
            plan("bytes=50-60,0-10", 100),
            RangePlan::Whole,
            "descending"
        );
        assert_eq!(
            plan("bytes=0-0,2-2,4-4,6-6,8-8", 100),
            RangePlan::Whole,
            "more than MAX_RANGES"
        );
        let long = format!("bytes=0-{}", "9".repeat(MAX_HEADER_LEN));
        assert_eq!(plan(&long, 100), RangePlan::Whole);
    }

    #[test]
    fn malformed_headers_are_ignored() {
        for header in [
            "",
            "bytes=",
            "bytes=,",
            "items=0-1",
            "bytes=a-b",
            "bytes=5-1",
            "bytes=--1",
            "bytes=1",
            "bytes=0x1-2",
            "bytes=+1-2",
            "bytes=-",
        ] {
            assert_eq!(plan(header, 100), RangePlan::Whole, "{header:?}");
        }
        assert_eq!(
            plan("bytes=99999999999999999999999-", 100),
            RangePlan::Whole,
            "overflowing number"
        );
    }

    #[test]
    fn ranges_outside_the_file_are_unsatisfiable() {
        assert_eq!(plan("bytes=100-", 100), RangePlan::Unsatisfiable);
        assert_eq!(plan("bytes=200-300,150-", 100), RangePlan::Unsatisfiable);
        assert_eq!(plan("bytes=-0", 100), RangePlan::Unsatisfiable);
        assert_eq!(plan("bytes=0-", 0), RangePlan::Unsatisfiable);
        assert_eq!(plan("bytes=-5", 0), RangePlan::Unsatisfiable);
        assert_eq!(
            plan("bytes=200-300,0-1", 100),
            RangePlan::Partial(vec![0..2]),
            "satisfiable ones are kept"
        );
    }
}
