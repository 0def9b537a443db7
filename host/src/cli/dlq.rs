//! `taskhost dlq`: the dead-letter queue — list, show, replay (put the original message
//! back on its queue), purge.

use super::serve::BrokerArgs;
use super::{current_thread_runtime, CliError};
use crate::broker::DeadLetter;
use anyhow::anyhow;

#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// One line per dead letter: letter id, time, queue, task, task id, reason.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// The whole record of one letter (by letter id or task id), original message included.
    Show {
        id: String,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Put letters' original messages back on their queues and drop the letters.
    Replay {
        /// Letter ids or task ids; none with --all.
        ids: Vec<String>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Delete letters (by id), or all of them.
    Purge {
        ids: Vec<String>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        #[command(flatten)]
        broker: BrokerArgs,
    },
}

fn matches(letter: &DeadLetter, id: &str) -> bool {
    letter.letter_id == id || letter.id.as_deref() == Some(id)
}

fn pick<'a>(letters: &'a [DeadLetter], ids: &[String], all: bool) -> Result<Vec<&'a DeadLetter>, CliError> {
    if all {
        return Ok(letters.iter().collect());
    }
    if ids.is_empty() {
        return Err(CliError::usage(anyhow!("name letters by id, or pass --all")));
    }
    let mut out = Vec::new();
    for id in ids {
        let found: Vec<&DeadLetter> = letters.iter().filter(|l| matches(l, id)).collect();
        if found.is_empty() {
            return Err(CliError::usage(anyhow!("no dead letter {id}")));
        }
        out.extend(found);
    }
    Ok(out)
}

pub fn run(cmd: DlqCommand, file: &super::config::FileConfig) -> Result<(), CliError> {
    let broker_args = match &cmd {
        DlqCommand::List { broker, .. }
        | DlqCommand::Show { broker, .. }
        | DlqCommand::Replay { broker, .. }
        | DlqCommand::Purge { broker, .. } => broker.clone(),
    };
    let (url, _) = broker_args.urls(file);
    let rt = current_thread_runtime()?;
    rt.block_on(async {
        let b = super::connect_broker(&url).await?;
        let letters = b.dead_letters().await.map_err(CliError::failed)?;
        match cmd {
            DlqCommand::List { json, .. } => {
                for l in &letters {
                    if json {
                        println!("{}", serde_json::to_string(l).map_err(CliError::failed)?);
                    } else {
                        println!(
                            "{}  {}  {}  {}  {}  {}",
                            l.letter_id,
                            l.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                            l.queue,
                            l.task.as_deref().unwrap_or("-"),
                            l.id.as_deref().unwrap_or("-"),
                            l.reason
                        );
                    }
                }
                if !json {
                    eprintln!("{} dead letter(s)", letters.len());
                }
            }
            DlqCommand::Show { id, .. } => {
                let found = pick(&letters, &[id], false)?;
                for l in found {
                    println!("{}", serde_json::to_string_pretty(l).map_err(CliError::failed)?);
                }
            }
            DlqCommand::Replay { ids, all, .. } => {
                for l in pick(&letters, &ids, all)? {
                    crate::broker::replay(b.as_ref(), l).await.map_err(CliError::failed)?;
                    println!("replayed {} onto {}", l.letter_id, l.queue);
                }
            }
            DlqCommand::Purge { ids, all, .. } => {
                let chosen = pick(&letters, &ids, all)?;
                for l in &chosen {
                    b.remove_dead_letter(&l.letter_id).await.map_err(CliError::failed)?;
                }
                println!("purged {} dead letter(s)", chosen.len());
            }
        }
        Ok(())
    })
}
