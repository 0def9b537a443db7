//! `taskhost usage`: the metered usage every worker stored on the broker, per tenant and
//! task, summed over the hours asked for (or per hour with `--hourly`).

use super::serve::BrokerArgs;
use super::{current_thread_runtime, CliError};
use crate::tenant::meter::{Usage, UsageRow};
use anyhow::anyhow;
use std::collections::BTreeMap;

#[derive(Debug, clap::Args)]
pub struct UsageArgs {
    /// Only this tenant.
    #[arg(long)]
    pub tenant: Option<String>,
    /// How far back: "24h", "90m", "7d" [default: 24h].
    #[arg(long, default_value = "24h")]
    pub since: String,
    /// One line per hour instead of sums over the period.
    #[arg(long)]
    pub hourly: bool,
    /// JSON: a list of {hour?, tenant, task, runs, succeeded, failed, retried, rejected,
    /// cpu_seconds, wall_seconds, memory_byte_seconds, memory_high_water}.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

/// "24h", "90m", "7d", "3600s" → seconds.
fn period(text: &str) -> Result<i64, CliError> {
    let bad = || CliError::usage(anyhow!("--since {text:?}: expected a number and a unit, such as 24h, 90m, 7d"));
    let (n, unit) = text.trim().split_at(text.trim().find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: i64 = n.parse().map_err(|_| bad())?;
    let per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(bad()),
    };
    n.checked_mul(per).ok_or_else(bad)
}

pub fn run(args: UsageArgs, file: &super::config::FileConfig) -> Result<(), CliError> {
    let (broker_url, _) = args.broker.urls(file);
    let since_hour = (chrono::Utc::now().timestamp() - period(&args.since)?).div_euclid(3600);
    let rt = current_thread_runtime()?;
    let rows: Vec<UsageRow> = rt.block_on(async {
        let broker = super::connect_broker(&broker_url).await?;
        broker.usage(since_hour).await.map_err(CliError::failed)
    })?;
    let rows = rows.into_iter().filter(|r| args.tenant.as_ref().is_none_or(|t| *t == r.tenant));
    // Summed over the period unless --hourly.
    let mut table: BTreeMap<(Option<i64>, String, String), Usage> = BTreeMap::new();
    for row in rows {
        let hour = args.hourly.then_some(row.hour);
        table.entry((hour, row.tenant, row.task)).or_default().add(&row.counts);
    }
    if args.json {
        let list: Vec<serde_json::Value> = table
            .iter()
            .map(|((hour, tenant, task), u)| {
                let mut v = serde_json::json!({"tenant": tenant, "task": task});
                if let Some(h) = hour {
                    v["hour"] = serde_json::json!(chrono::DateTime::from_timestamp(h * 3600, 0).map(|t| t.to_rfc3339()));
                }
                if let (serde_json::Value::Object(m), Ok(serde_json::Value::Object(counts))) = (&mut v, serde_json::to_value(u)) {
                    m.extend(counts);
                }
                v
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
        return Ok(());
    }
    println!(
        "{}{:<16} {:<28} {:>8} {:>8} {:>7} {:>12} {:>12} {:>12} {:>12}",
        if args.hourly { format!("{:<17} ", "hour (UTC)") } else { String::new() },
        "tenant",
        "task",
        "runs",
        "ok",
        "failed",
        "cpu s",
        "wall s",
        "MiB·s",
        "peak MiB"
    );
    for ((hour, tenant, task), u) in &table {
        let hour = hour
            .and_then(|h| chrono::DateTime::from_timestamp(h * 3600, 0))
            .map(|t| format!("{:<17} ", t.format("%Y-%m-%d %H:00")))
            .unwrap_or_default();
        println!(
            "{hour}{tenant:<16} {task:<28} {:>8} {:>8} {:>7} {:>12.3} {:>12.3} {:>12.1} {:>12.1}",
            u.runs,
            u.succeeded,
            u.failed + u.rejected,
            u.cpu_seconds,
            u.wall_seconds,
            u.memory_byte_seconds / (1 << 20) as f64,
            u.memory_high_water as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn periods_parse() {
        assert_eq!(super::period("24h").ok(), Some(86400));
        assert_eq!(super::period("90m").ok(), Some(5400));
        assert_eq!(super::period("7d").ok(), Some(604800));
        assert!(super::period("soon").is_err() && super::period("5y").is_err() && super::period("h").is_err());
    }
}
