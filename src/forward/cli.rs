//! `anatomy-node forward status` and `anatomy-node forward retry`: the outbox for people.
//! Both read the index the node uses (its configuration file), so they work while the node
//! runs; a running node picks up retried jobs within seconds.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use super::outbox;
use crate::config::Config;
use crate::node;
use crate::store::now_millis;

const STATES: [&str; 5] = ["pending", "sending", "done", "dead", "superseded"];

#[derive(Debug, Subcommand)]
pub enum ForwardCommand {
    /// Jobs per destination and state, and the dead letters with their reasons.
    Status {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only this destination's dead letters.
        #[arg(long)]
        destination: Option<String>,
        /// Dead letters listed at most (newest first).
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// One JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back in the queue (due now, attempts counted from zero).
    Retry {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only this destination's dead letters (default: all).
        #[arg(long)]
        destination: Option<String>,
    },
}

pub async fn run(command: ForwardCommand) -> anyhow::Result<()> {
    match command {
        ForwardCommand::Status {
            config,
            destination,
            limit,
            json,
        } => {
            let config = Config::load(config.as_deref())?;
            let index = node::open_index(&config).await?;
            let counts = outbox::counts(&index).await.context("reading the outbox")?;
            let dead = outbox::dead_letters(&index, destination.as_deref(), limit.max(0))
                .await
                .context("reading the dead letters")?;
            index.close().await;
            print!("{}", render_status(&config, &counts, &dead, json));
            Ok(())
        }
        ForwardCommand::Retry {
            config,
            destination,
        } => {
            let config = Config::load(config.as_deref())?;
            if let Some(d) = &destination {
                if !config.destinations.iter().any(|x| &x.name == d) {
                    eprintln!(
                        "anatomy-node: warning: {d:?} is not in [[destinations]] of this configuration; no node sends its jobs"
                    );
                }
            }
            let index = node::open_index(&config).await?;
            let n = outbox::retry_dead(&index, destination.as_deref(), now_millis())
                .await
                .context("putting dead letters back in the queue")?;
            index.close().await;
            match destination {
                Some(d) => println!("{n} dead letters of {d} back in the queue"),
                None => println!("{n} dead letters back in the queue"),
            }
            Ok(())
        }
    }
}

/// The status report: a table of counts and the dead letters, or one JSON object.
pub fn render_status(
    config: &Config,
    counts: &[outbox::StateCount],
    dead: &[outbox::DeadLetter],
    json: bool,
) -> String {
    let mut table: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for d in &config.destinations {
        table.entry(d.name.clone()).or_default();
    }
    for c in counts {
        *table
            .entry(c.destination.clone())
            .or_default()
            .entry(c.state.clone())
            .or_default() += c.count;
    }
    let configured = |name: &str| config.destinations.iter().any(|d| d.name == name);
    if json {
        let destinations: Vec<serde_json::Value> = table
            .iter()
            .map(|(name, states)| {
                let mut o = serde_json::Map::new();
                o.insert("destination".into(), name.clone().into());
                o.insert("configured".into(), configured(name).into());
                for s in STATES {
                    o.insert(s.into(), states.get(s).copied().unwrap_or(0).into());
                }
                serde_json::Value::Object(o)
            })
            .collect();
        let dead: Vec<serde_json::Value> = dead
            .iter()
            .map(|d| {
                serde_json::json!({
                    "destination": d.destination,
                    "kind": d.kind,
                    "sop_instance_uid": d.sop_instance_uid,
                    "series_uid": d.series_uid,
                    "attempts": d.attempts,
                    "last_status": d.last_status.map(|s| format!("{s:04X}")),
                    "reason": d.last_error,
                    "finished_at": d.finished_at,
                })
            })
            .collect();
        return format!(
            "{}\n",
            serde_json::json!({ "destinations": destinations, "dead_letters": dead })
        );
    }
    let mut out = String::new();
    let width = table.keys().map(String::len).max().unwrap_or(0).max(11);
    out.push_str(&format!("{:<width$}", "destination"));
    for s in STATES {
        out.push_str(&format!(" {s:>10}"));
    }
    out.push('\n');
    for (name, states) in &table {
        out.push_str(&format!("{name:<width$}"));
        for s in STATES {
            out.push_str(&format!(" {:>10}", states.get(s).copied().unwrap_or(0)));
        }
        if !configured(name) {
            out.push_str("  (not in [[destinations]]: nothing sends these)");
        }
        out.push('\n');
    }
    if table.is_empty() {
        out.push_str("(no destinations configured and no jobs)\n");
    }
    if dead.is_empty() {
        out.push_str("\nno dead letters\n");
    } else {
        out.push_str(&format!(
            "\ndead letters (newest first, {} shown):\n",
            dead.len()
        ));
        for d in dead {
            let status = d
                .last_status
                .map(|s| format!("status {s:04X}, "))
                .unwrap_or_default();
            out.push_str(&format!(
                "  {}  {} {} (series {}), {} attempt{}, {}{}\n",
                d.destination,
                if d.kind == outbox::KIND_KOS {
                    "KOS"
                } else {
                    "instance"
                },
                d.sop_instance_uid,
                d.series_uid,
                d.attempts,
                if d.attempts == 1 { "" } else { "s" },
                status,
                d.last_error.as_deref().unwrap_or("no reason recorded")
            ));
        }
    }
    out
}
