//! Attribute matching (PS3.4 C.2.2.2): the value of a key in a request, turned into a
//! condition the SQL builder can bind — never into SQL text. Also the wild card matcher
//! used on sequence items, and the DA/TM/DT parsers behind Range Matching.

/// A value of a text key: matched as it is, or with `*` and `?` as wild cards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextValue {
    Exact(String),
    Wildcard(String),
}

/// What a key's value asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// Zero length (or only `*` where wild cards apply): every entity matches.
    Universal,
    /// Any of these values (Single Value / Wild Card Matching; a multi-valued key matches
    /// when any value does).
    Text(Vec<TextValue>),
    /// List of UID Matching.
    Uids(Vec<String>),
    /// DA or TM: inclusive bounds compared as strings (both are fixed-order digit strings).
    Range(Vec<Bounds<String>>),
    /// DT: inclusive bounds in Unix epoch milliseconds.
    Millis(Vec<Bounds<i64>>),
    /// IS / US.
    Integers(Vec<i64>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounds<T> {
    pub from: Option<T>,
    pub to: Option<T>,
}

/// Why a value cannot be matched: the peer's identifier does not fit the key (A900).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadValue(pub String);

fn non_empty(values: &[String]) -> impl Iterator<Item = &str> {
    values.iter().map(|v| v.as_str()).filter(|v| !v.is_empty())
}

fn has_wildcard(value: &str) -> bool {
    value.contains(['*', '?'])
}

/// Text keys: Single Value and Wild Card Matching.
pub fn text(values: &[String]) -> Condition {
    let mut out = Vec::new();
    for v in non_empty(values) {
        // "*" (or "**"...) matches every value, empty ones included: Universal Matching.
        if v.chars().all(|c| c == '*') {
            return Condition::Universal;
        }
        out.push(if has_wildcard(v) {
            TextValue::Wildcard(v.to_string())
        } else {
            TextValue::Exact(v.to_string())
        });
    }
    if out.is_empty() {
        Condition::Universal
    } else {
        Condition::Text(out)
    }
}

/// UI keys: Single Value and List of UID Matching. Wild cards do not apply to UIDs; a lone
/// `*`, which some SCUs send, is taken as Universal Matching.
pub fn uids(values: &[String]) -> Condition {
    let list: Vec<String> = non_empty(values).map(str::to_string).collect();
    if list.is_empty() || list.iter().any(|v| v == "*") {
        Condition::Universal
    } else {
        Condition::Uids(list)
    }
}

pub fn integers(values: &[String]) -> Result<Condition, BadValue> {
    let mut list = Vec::new();
    for v in non_empty(values) {
        if v == "*" {
            return Ok(Condition::Universal);
        }
        let n = v
            .trim_start_matches('+')
            .parse::<i64>()
            .map_err(|_| BadValue(format!("{v:?} is not an integer")))?;
        list.push(n);
    }
    Ok(if list.is_empty() {
        Condition::Universal
    } else {
        Condition::Integers(list)
    })
}

/// Split `A-B`, `-B`, `A-` (Range Matching) or a single value.
fn split_range(v: &str) -> Option<(&str, &str)> {
    v.split_once('-').map(|(a, b)| (a.trim(), b.trim()))
}

/// DA: `YYYYMMDD`, or a range of them.
pub fn dates(values: &[String]) -> Result<Condition, BadValue> {
    ranges(values, |v| {
        let (from, to) = match split_range(v) {
            Some(("", "")) => return Err(BadValue(format!("{v:?} is not a date range"))),
            Some((a, b)) => (opt(a, parse_date)?, opt(b, parse_date)?),
            None => {
                let d = parse_date(v)?;
                (Some(d.clone()), Some(d))
            }
        };
        ordered(v, from, to)
    })
    .map(|b| b.map_or(Condition::Universal, Condition::Range))
}

/// TM: `HH[MM[SS[.F{1,6}]]]`, or a range. A time of lower precision stands for the whole
/// hour, minute or second: its lower bound is the value itself, its upper bound the value
/// padded with its last moment (`1030` → `103059.999999`), as stored times sort.
pub fn times(values: &[String]) -> Result<Condition, BadValue> {
    ranges(values, |v| {
        let (from, to) = match split_range(v) {
            Some(("", "")) => return Err(BadValue(format!("{v:?} is not a time range"))),
            Some((a, b)) => (
                opt(a, |t| parse_time(t).map(|(lo, _)| lo))?,
                opt(b, |t| parse_time(t).map(|(_, hi)| hi))?,
            ),
            None => {
                let (lo, hi) = parse_time(v)?;
                (Some(lo), Some(hi))
            }
        };
        ordered(v, from, to)
    })
    .map(|b| b.map_or(Condition::Universal, Condition::Range))
}

/// DT: `YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]][&ZZXX]`, or a range; as epoch milliseconds. A
/// value without an offset from UTC is taken as UTC.
pub fn datetimes(values: &[String]) -> Result<Condition, BadValue> {
    ranges(values, |v| {
        // The offset's sign is also the range separator: split at a '-' that follows a
        // complete value, i.e. not the one inside "&ZZXX" (always followed by 4 digits
        // and preceded by at least a year).
        let (from, to) = match split_datetime_range(v) {
            Some(("", "")) => return Err(BadValue(format!("{v:?} is not a datetime range"))),
            Some((a, b)) => (
                opt(a, |t| parse_datetime(t).map(|(lo, _)| lo))?,
                opt(b, |t| parse_datetime(t).map(|(_, hi)| hi))?,
            ),
            None => {
                let (lo, hi) = parse_datetime(v)?;
                (Some(lo), Some(hi))
            }
        };
        ordered(v, from, to)
    })
    .map(|b| b.map_or(Condition::Universal, Condition::Millis))
}

fn ranges<T>(
    values: &[String],
    parse: impl Fn(&str) -> Result<Bounds<T>, BadValue>,
) -> Result<Option<Vec<Bounds<T>>>, BadValue> {
    let mut out = Vec::new();
    for v in non_empty(values) {
        if v == "*" {
            return Ok(None);
        }
        out.push(parse(v)?);
    }
    Ok(if out.is_empty() { None } else { Some(out) })
}

fn opt<T>(text: &str, parse: impl Fn(&str) -> Result<T, BadValue>) -> Result<Option<T>, BadValue> {
    if text.is_empty() {
        Ok(None)
    } else {
        parse(text).map(Some)
    }
}

fn ordered<T: PartialOrd>(v: &str, from: Option<T>, to: Option<T>) -> Result<Bounds<T>, BadValue> {
    if let (Some(a), Some(b)) = (&from, &to) {
        if a > b {
            return Err(BadValue(format!("{v:?}: the range ends before it starts")));
        }
    }
    Ok(Bounds { from, to })
}

fn digits(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

fn number(text: &str) -> u32 {
    text.parse().unwrap_or(0)
}

pub fn parse_date(text: &str) -> Result<String, BadValue> {
    let bad = || BadValue(format!("{text:?} is not a date (YYYYMMDD)"));
    if text.len() != 8 || !digits(text) {
        return Err(bad());
    }
    let (month, day) = (number(&text[4..6]), number(&text[6..8]));
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return Err(bad());
    }
    Ok(text.to_string())
}

/// (lower bound, upper bound) of a TM value.
pub fn parse_time(text: &str) -> Result<(String, String), BadValue> {
    let bad = || BadValue(format!("{text:?} is not a time (HHMMSS.FFFFFF)"));
    // ACR-NEMA style "HH:MM:SS" still turns up.
    let t: String = text.chars().filter(|&c| c != ':').collect();
    let (whole, fraction) = match t.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (t.as_str(), None),
    };
    if !digits(whole) || !matches!(whole.len(), 2 | 4 | 6) {
        return Err(bad());
    }
    let parts: Vec<u32> = whole
        .as_bytes()
        .chunks(2)
        .map(|c| u32::from(c[0] - b'0') * 10 + u32::from(c[1] - b'0'))
        .collect();
    let limits = [23, 59, 60];
    if parts.iter().zip(limits).any(|(v, max)| *v > max) {
        return Err(bad());
    }
    let upper = match (whole.len(), fraction) {
        (6, Some(f)) if (1..=6).contains(&f.len()) && digits(f) => {
            format!("{whole}.{f}{}", "9".repeat(6 - f.len()))
        }
        (_, Some(_)) => return Err(bad()),
        (2, None) => format!("{whole}5959.999999"),
        (4, None) => format!("{whole}59.999999"),
        _ => format!("{whole}.999999"),
    };
    let lower = match fraction {
        Some(f) => format!("{whole}.{f}"),
        None => whole.to_string(),
    };
    Ok((lower, upper))
}

fn split_datetime_range(v: &str) -> Option<(&str, &str)> {
    let bytes = v.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b != b'-' {
            continue;
        }
        // An offset "-ZZXX" (at most 14 hours) follows at least a year and is followed by
        // exactly four digits and then the end or another '-'.
        let is_offset = i >= 4
            && bytes.len() >= i + 5
            && bytes[i + 1..i + 5].iter().all(u8::is_ascii_digit)
            && (bytes.len() == i + 5 || bytes[i + 5] == b'-')
            && number(&v[i + 1..i + 3]) <= 14
            && number(&v[i + 3..i + 5]) <= 59;
        if !is_offset {
            return Some((v[..i].trim(), v[i + 1..].trim()));
        }
    }
    None
}

/// (first, last) millisecond of a DT value.
pub fn parse_datetime(text: &str) -> Result<(i64, i64), BadValue> {
    let bad = || {
        BadValue(format!(
            "{text:?} is not a datetime (YYYYMMDDHHMMSS.FFFFFF&ZZXX)"
        ))
    };
    let (value, offset_minutes) = match text.rfind(['+', '-']) {
        Some(i) if text.len() == i + 5 && digits(&text[i + 1..]) => {
            let hours = i64::from(number(&text[i + 1..i + 3]));
            let minutes = i64::from(number(&text[i + 3..i + 5]));
            let sign = if text.as_bytes()[i] == b'-' { -1 } else { 1 };
            (&text[..i], sign * (hours * 60 + minutes))
        }
        _ => (text, 0),
    };
    let (whole, fraction) = match value.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (value, None),
    };
    if !digits(whole) || !matches!(whole.len(), 4 | 6 | 8 | 10 | 12 | 14) {
        return Err(bad());
    }
    if let Some(f) = fraction {
        if whole.len() != 14 || !(1..=6).contains(&f.len()) || !digits(f) {
            return Err(bad());
        }
    }
    let field = |range: std::ops::Range<usize>| whole.get(range).map(number);
    let year = i64::from(number(&whole[0..4]));
    let month = field(4..6);
    let day = field(6..8);
    let hour = field(8..10);
    let minute = field(10..12);
    let second = field(12..14);
    let valid = month.is_none_or(|m| (1..=12).contains(&m))
        && day.is_none_or(|d| (1..=31).contains(&d))
        && hour.is_none_or(|h| h <= 23)
        && minute.is_none_or(|m| m <= 59)
        && second.is_none_or(|s| s <= 60);
    if !valid {
        return Err(bad());
    }
    let (m, d) = (i64::from(month.unwrap_or(1)), i64::from(day.unwrap_or(1)));
    let (h, mi, s) = (
        i64::from(hour.unwrap_or(0)),
        i64::from(minute.unwrap_or(0)),
        i64::from(second.unwrap_or(0)),
    );
    let (fraction_ms, fraction_unit_ms) = match fraction {
        Some(f) => {
            let micros: i64 = format!("{f:0<6}").parse().unwrap_or(0);
            let unit_micros = 10_i64.pow(6 - f.len() as u32);
            (micros / 1000, (unit_micros / 1000).max(1))
        }
        None => (0, 1000),
    };
    let start =
        (days_from_civil(year, m, d) * 86_400 + h * 3600 + mi * 60 + s) * 1000 + fraction_ms;
    let end = match (month, day, hour, minute, second, fraction) {
        (None, ..) => days_from_civil(year + 1, 1, 1) * 86_400_000 - 1,
        (Some(_), None, ..) => {
            let (ny, nm) = if m == 12 {
                (year + 1, 1)
            } else {
                (year, m + 1)
            };
            days_from_civil(ny, nm, 1) * 86_400_000 - 1
        }
        (_, Some(_), None, ..) => start + 86_400_000 - 1,
        (_, _, Some(_), None, ..) => start + 3_600_000 - 1,
        (_, _, _, Some(_), None, _) => start + 60_000 - 1,
        (_, _, _, _, Some(_), None) => start + 1000 - 1,
        (.., Some(_)) => start + fraction_unit_ms - 1,
    };
    let shift = offset_minutes * 60_000;
    Ok((start - shift, end - shift))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day count since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A DT value in UTC for epoch milliseconds: `YYYYMMDDHHMMSS.FFF+0000`.
pub fn format_datetime(millis: i64) -> String {
    let days = millis.div_euclid(86_400_000);
    let ms_of_day = millis.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (h, rest) = (ms_of_day / 3_600_000, ms_of_day % 3_600_000);
    let (mi, rest) = (rest / 60_000, rest % 60_000);
    let (s, ms) = (rest / 1000, rest % 1000);
    format!("{y:04}{m:02}{d:02}{h:02}{mi:02}{s:02}.{ms:03}+0000")
}

/// The value as a pattern for SQL `LIKE ... ESCAPE '!'`: `*` → `%`, `?` → `_`, and the
/// characters LIKE would take as wild cards escaped.
pub fn like_pattern(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 4);
    for c in value.chars() {
        match c {
            '*' => out.push('%'),
            '?' => out.push('_'),
            '%' | '_' | '!' => {
                out.push('!');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// The value as an SQLite GLOB pattern (case-sensitive, `*` and `?` as in DICOM); `[`
/// would open a character class, so it is written as the class `[[]`.
pub fn glob_pattern(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 4);
    for c in value.chars() {
        match c {
            '[' => out.push_str("[[]"),
            c => out.push(c),
        }
    }
    out
}

/// Wild Card Matching in memory (sequence items): `*` any run of characters, `?` one.
pub fn wildcard_matches(pattern: &str, value: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let v: Vec<char> = value.chars().collect();
    let (mut pi, mut vi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == v[vi]) {
            pi += 1;
            vi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, vi));
            pi += 1;
        } else if let Some((sp, sv)) = star {
            pi = sp + 1;
            vi = sv + 1;
            star = Some((sp, sv + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Whether `value` (absent = empty) satisfies a text condition, in memory.
pub fn text_matches(condition: &Condition, value: Option<&str>) -> bool {
    match condition {
        Condition::Universal => true,
        Condition::Text(values) => {
            let Some(value) = value else { return false };
            values.iter().any(|t| match t {
                TextValue::Exact(e) => e == value,
                TextValue::Wildcard(w) => wildcard_matches(w, value),
            })
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn universal_and_wildcards() {
        assert_eq!(text(&v(&[])), Condition::Universal);
        assert_eq!(text(&v(&[""])), Condition::Universal);
        assert_eq!(text(&v(&["*"])), Condition::Universal);
        assert_eq!(
            text(&v(&["CHEST"])),
            Condition::Text(vec![TextValue::Exact("CHEST".into())])
        );
        assert_eq!(
            text(&v(&["CH?ST*", "PELVIS"])),
            Condition::Text(vec![
                TextValue::Wildcard("CH?ST*".into()),
                TextValue::Exact("PELVIS".into())
            ])
        );
        assert_eq!(
            uids(&v(&["1.2", "1.3"])),
            Condition::Uids(v(&["1.2", "1.3"]))
        );
        assert_eq!(uids(&v(&["*"])), Condition::Universal);
    }

    #[test]
    fn patterns_escape_what_sql_would_take_as_wildcards() {
        assert_eq!(like_pattern("50%_a!*b?"), "50!%!_a!!%b_");
        assert_eq!(glob_pattern("a[1]*"), "a[[]1]*");
    }

    #[test]
    fn in_memory_wildcards() {
        assert!(wildcard_matches("*", ""));
        assert!(wildcard_matches("Ch*t", "Chest"));
        assert!(wildcard_matches("?hest", "Chest"));
        assert!(!wildcard_matches("chest", "Chest"));
        assert!(wildcard_matches("*a*b*", "xxaxxbxx"));
        assert!(!wildcard_matches("*a*b", "xxaxxbxx"));
        assert!(wildcard_matches("Lower*", "Lower limb"));
    }

    #[test]
    fn date_ranges() {
        let r = |s: &str| dates(&v(&[s]));
        let b = |f: Option<&str>, t: Option<&str>| Bounds {
            from: f.map(str::to_string),
            to: t.map(str::to_string),
        };
        assert_eq!(
            r("20240101-20240131"),
            Ok(Condition::Range(vec![b(
                Some("20240101"),
                Some("20240131")
            )]))
        );
        assert_eq!(
            r("-20240131"),
            Ok(Condition::Range(vec![b(None, Some("20240131"))]))
        );
        assert_eq!(
            r("20240101-"),
            Ok(Condition::Range(vec![b(Some("20240101"), None)]))
        );
        assert_eq!(
            r("20240101"),
            Ok(Condition::Range(vec![b(
                Some("20240101"),
                Some("20240101")
            )]))
        );
        assert!(r("2024-01-01").is_err());
        assert!(r("20241301").is_err());
        assert!(r("-").is_err());
        assert!(r("20240201-20240101").is_err());
    }

    #[test]
    fn time_ranges_cover_the_whole_unit() {
        assert_eq!(parse_time("10"), Ok(("10".into(), "105959.999999".into())));
        assert_eq!(
            parse_time("1030"),
            Ok(("1030".into(), "103059.999999".into()))
        );
        assert_eq!(
            parse_time("103000"),
            Ok(("103000".into(), "103000.999999".into()))
        );
        assert_eq!(
            parse_time("103000.5"),
            Ok(("103000.5".into(), "103000.599999".into()))
        );
        assert_eq!(
            parse_time("10:30"),
            Ok(("1030".into(), "103059.999999".into()))
        );
        assert!(parse_time("2500").is_err());
        assert!(parse_time("1030.5").is_err());
        let c = times(&v(&["0800-1000"])).unwrap();
        assert_eq!(
            c,
            Condition::Range(vec![Bounds {
                from: Some("0800".into()),
                to: Some("100059.999999".into())
            }])
        );
        // every stored form of 09:00 sorts inside
        for stored in ["0900", "090000", "090000.123", "1000", "100059"] {
            assert!(("0800"..="100059.999999").contains(&stored), "{stored}");
        }
    }

    #[test]
    fn datetimes_in_utc() {
        assert_eq!(parse_datetime("1970"), Ok((0, 365 * 86_400_000 - 1)));
        assert_eq!(
            parse_datetime("19700102"),
            Ok((86_400_000, 2 * 86_400_000 - 1))
        );
        assert_eq!(parse_datetime("19700101010000+0100"), Ok((0, 999)));
        assert_eq!(parse_datetime("19700101000000.5"), Ok((500, 599)));
        assert_eq!(
            parse_datetime("197002"),
            Ok((31 * 86_400_000, 59 * 86_400_000 - 1))
        );
        assert!(parse_datetime("1970010").is_err());
        let c = datetimes(&v(&["1970-19700101000001-0000"])).unwrap();
        assert_eq!(
            c,
            Condition::Millis(vec![Bounds {
                from: Some(0),
                to: Some(1999)
            }])
        );
        let c = datetimes(&v(&["-19700101"])).unwrap();
        assert_eq!(
            c,
            Condition::Millis(vec![Bounds {
                from: None,
                to: Some(86_400_000 - 1)
            }])
        );
        assert_eq!(format_datetime(0), "19700101000000.000+0000");
        assert_eq!(
            format_datetime(1_700_000_000_123),
            "20231114221320.123+0000"
        );
        for day in [-1000, 0, 19_000, 20_000] {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
    }

    #[test]
    fn integers_are_single_values() {
        assert_eq!(integers(&v(&["3"])), Ok(Condition::Integers(vec![3])));
        assert_eq!(
            integers(&v(&["+3", "4"])),
            Ok(Condition::Integers(vec![3, 4]))
        );
        assert!(integers(&v(&["3-4"])).is_err());
        assert_eq!(integers(&v(&[])), Ok(Condition::Universal));
    }
}
