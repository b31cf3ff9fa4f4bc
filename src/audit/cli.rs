//! `anatomy-node audit`: the audit trail for people, newest first, as a table or JSON lines.
//! It reads the index the node uses (its configuration file), so it works while the node runs.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::{list, EventType, Filter, Outcome, StoredEvent};
use crate::config::Config;
use crate::node;
use crate::store::now_millis;

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Configuration file of the node (its database).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Events at or after this time: RFC 3339 (2026-12-07T20:00:00Z), a date (2026-12-07,
    /// UTC midnight), or an age (90s, 15m, 2h, 7d).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<i64>,
    /// Events at or before this time (same forms as --since).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<i64>,
    /// Only this event type: node_start, node_stop, config_reload, association_accepted,
    /// association_refused, instances_received, c_find, forward, http_request, auth_failure.
    #[arg(long = "type", value_parser = parse_type)]
    pub event_type: Option<EventType>,
    /// Only this actor (calling AE title, "token NAME", "jwt SUBJECT", "anonymous", "node").
    #[arg(long)]
    pub actor: Option<String>,
    /// Only this outcome: success, failure or refused.
    #[arg(long, value_parser = parse_outcome)]
    pub outcome: Option<Outcome>,
    /// Events listed at most (1 to 1000000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
    pub limit: i64,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: AuditArgs) -> anyhow::Result<()> {
    if let (Some(since), Some(until)) = (args.since, args.until) {
        if since > until {
            anyhow::bail!("--since is after --until: nothing could match");
        }
    }
    let config = Config::load(args.config.as_deref())?;
    let index = node::open_index(&config).await?;
    let filter = Filter {
        since: args.since,
        until: args.until,
        event_type: args.event_type,
        actor: args.actor.clone(),
        outcome: args.outcome,
        limit: args.limit,
    };
    let events = list(&index, &filter)
        .await
        .context("reading the audit trail");
    index.close().await;
    let events = events?;
    print!("{}", render(&events, args.json)?);
    Ok(())
}

fn render(events: &[StoredEvent], json: bool) -> anyhow::Result<String> {
    let mut out = String::new();
    if json {
        for e in events {
            out.push_str(&serde_json::to_string(e).context("encoding an event")?);
            out.push('\n');
        }
        return Ok(out);
    }
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let rows: Vec<[String; 7]> = events
        .iter()
        .map(|e| {
            let mut object = dash(&e.object);
            if let Some(series) = &e.series {
                object = if e.object.is_some() {
                    format!("{object} series={series}")
                } else {
                    format!("series={series}")
                };
            }
            [
                e.time.clone(),
                e.event_type.clone(),
                e.outcome.clone(),
                e.actor.clone(),
                dash(&e.peer),
                object,
                dash(&e.detail),
            ]
        })
        .collect();
    let header = [
        "TIME (UTC)",
        "TYPE",
        "OUTCOME",
        "ACTOR",
        "PEER",
        "OBJECT",
        "DETAIL",
    ];
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        // The last column is not padded.
        for (w, cell) in widths.iter_mut().zip(row.iter()).take(6) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        l.trim_end().to_string() + "\n"
    };
    out.push_str(&line(header.to_vec()));
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    if rows.is_empty() {
        out.push_str("(no events)\n");
    }
    Ok(out)
}

fn parse_type(text: &str) -> Result<EventType, String> {
    EventType::parse(text).ok_or_else(|| {
        let names: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
        format!("unknown event type; one of {}", names.join(", "))
    })
}

fn parse_outcome(text: &str) -> Result<Outcome, String> {
    Outcome::parse(text).ok_or_else(|| "one of success, failure, refused".to_string())
}

/// RFC 3339, a date (UTC midnight), or an age before now (90s, 15m, 2h, 7d).
pub fn parse_time(text: &str) -> Result<i64, String> {
    parse_time_at(text, now_millis())
}

fn parse_time_at(text: &str, now: i64) -> Result<i64, String> {
    let t = text.trim();
    let usage = || {
        format!(
            "{t:?} is not a time: use RFC 3339 (2026-12-07T20:00:00Z), a date (2026-12-07) or \
             an age (90s, 15m, 2h, 7d)"
        )
    };
    if let Ok(dt) = chrono::DateTime::parse_from_rfc3339(t) {
        return Ok(dt.timestamp_millis());
    }
    if let Ok(date) = chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        return date
            .and_hms_opt(0, 0, 0)
            .map(|d| d.and_utc().timestamp_millis())
            .ok_or_else(usage);
    }
    let unit_ms: i64 = match t.chars().last() {
        Some('s') => 1_000,
        Some('m') => 60_000,
        Some('h') => 3_600_000,
        Some('d') => 86_400_000,
        _ => return Err(usage()),
    };
    let number: i64 = t[..t.len() - 1].parse().map_err(|_| usage())?;
    if number < 0 {
        return Err(usage());
    }
    number
        .checked_mul(unit_ms)
        .map(|ago| now.saturating_sub(ago))
        .ok_or_else(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_every_form() {
        let now = 1_000_000_000_000;
        assert_eq!(parse_time_at("1970-01-02", now), Ok(86_400_000));
        assert_eq!(
            parse_time_at("1970-01-01T00:00:01Z", now),
            Ok(1000),
            "RFC 3339"
        );
        assert_eq!(
            parse_time_at("1970-01-01T01:00:00+01:00", now),
            Ok(0),
            "offsets"
        );
        assert_eq!(parse_time_at("15m", now), Ok(now - 900_000));
        assert_eq!(parse_time_at("7d", now), Ok(now - 7 * 86_400_000));
        for bad in [
            "",
            "yesterday",
            "-5m",
            "5x",
            "m",
            "2026-13-01",
            "99999999999999999d",
        ] {
            assert!(parse_time_at(bad, now).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn table_and_json() {
        let e = StoredEvent {
            id: 1,
            time: "2026-12-07T20:00:00.000Z".into(),
            occurred_at: 0,
            event_type: "c_find".into(),
            outcome: "success".into(),
            actor: "PACS".into(),
            peer: Some("127.0.0.1:4000".into()),
            cert_subject: None,
            studies: None,
            series: None,
            object: Some("STUDY".into()),
            detail: Some("3 matches".into()),
        };
        let table = render(std::slice::from_ref(&e), false).unwrap();
        assert!(table.starts_with("TIME (UTC)"), "{table}");
        assert!(
            table.contains("c_find") && table.contains("3 matches"),
            "{table}"
        );
        let json = render(&[e], true).unwrap();
        let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        assert_eq!(v["actor"], "PACS");
        assert_eq!(v["cert_subject"], serde_json::Value::Null);
        assert_eq!(render(&[], false).unwrap().lines().count(), 2);
    }
}
