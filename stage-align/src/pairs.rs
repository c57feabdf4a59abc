//! Preference pairs: sampled on-policy and labelled by the task checkers, or
//! built by rule; task prompts from JSONL.

use std::path::Path;

use anyhow::{Context, Result, bail};
use baton_core::burn::tensor::backend::Backend;
use baton_core::chat::ChatRenderer;
use baton_core::checkpoint::{self, DataRef};
use baton_core::data::step_rng;
use baton_core::generate::{Policy, Sampling, generate_rows};
use baton_core::model::Llama;
use baton_core::tasks::{Task, TasksConfig};
use baton_core::tokenizer::Tokenizer;
use rand::Rng;
use serde::Serialize;

use crate::config::*;
use crate::prefs::{Preferences, parse_preferences, read_preferences};

// ---------------------------------------------------------------------------
// Pairs
// ---------------------------------------------------------------------------

/// What pair sampling produced.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PairStats {
    pub prompts: usize,
    pub pairs: usize,
    /// Pairs whose chosen reply is the task's answer (no sample was correct).
    pub gold_chosen: usize,
    /// Prompts where every sample was correct (nothing to prefer against).
    pub all_correct: usize,
    /// Share of all samples the checker accepted.
    pub sample_accuracy: f64,
}

/// Replies generated in one batch while sampling pairs.
const PAIR_BATCH: usize = 64;

/// Samples `cfg.samples` replies per task from `model`, checks each with the
/// task's checker, and pairs a correct reply with an incorrect one. Each line
/// records the verdicts and the sampling settings.
pub fn sample_pairs<B: Backend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    tasks: &[Task],
    cfg: &PairsConfig,
    device: &B::Device,
) -> Result<(Vec<serde_json::Value>, PairStats)> {
    let renderer = ChatRenderer::new(tokenizer);
    let settings = serde_json::to_value(cfg)?;
    let mut stats = PairStats {
        prompts: tasks.len(),
        ..PairStats::default()
    };
    let (mut correct_samples, mut all_samples) = (0usize, 0usize);
    let mut lines = Vec::new();
    let progress = baton_core::cli::progress(tasks.len() as u64, "sampling pairs");
    // Every sample of a chunk of prompts is generated in one batch.
    let per_chunk = (PAIR_BATCH / cfg.samples.max(1)).max(1);
    let mut sampled: Vec<Vec<(String, bool)>> = Vec::with_capacity(tasks.len());
    for (c, chunk) in tasks.chunks(per_chunk).enumerate() {
        let mut prompts = Vec::with_capacity(chunk.len());
        for task in chunk {
            prompts.push(renderer.render_prompt(&task.messages()[..1])?);
        }
        let mut settings = Vec::with_capacity(chunk.len() * cfg.samples);
        for t in 0..chunk.len() {
            let i = c * per_chunk + t;
            for k in 0..cfg.samples {
                // Reply 0 is the greedy one: the answer evaluation sees, so the
                // most useful one to reject when wrong (or to keep when right).
                let greedy = k == 0 && cfg.include_greedy;
                settings.push(Sampling {
                    max_new_tokens: cfg.max_new_tokens,
                    temperature: if greedy { 0.0 } else { cfg.temperature },
                    top_k: cfg.top_k,
                    seed: cfg
                        .seed
                        .wrapping_mul(1_000_003)
                        .wrapping_add((i * cfg.samples + k) as u64),
                    stop: vec![tokenizer.special.end],
                    ..Sampling::default()
                });
            }
        }
        let rows: Vec<(&[u32], &Sampling)> = settings
            .iter()
            .enumerate()
            .map(|(r, s)| (prompts[r / cfg.samples].as_slice(), s))
            .collect();
        let replies = generate_rows(&Policy::One(model), &rows, device);
        for (t, task) in chunk.iter().enumerate() {
            let mut checked = Vec::with_capacity(cfg.samples);
            for ids in &replies[t * cfg.samples..(t + 1) * cfg.samples] {
                let text = renderer.decode_reply(ids)?;
                let ok = task.check(&text);
                correct_samples += usize::from(ok);
                all_samples += 1;
                checked.push((text, ok));
            }
            sampled.push(checked);
        }
        progress.inc(chunk.len() as u64);
    }
    for (task, replies) in tasks.iter().zip(sampled) {
        let verdicts: Vec<bool> = replies.iter().map(|(_, ok)| *ok).collect();
        let rejected = replies
            .iter()
            .find(|(text, ok)| !ok && !text.trim().is_empty());
        let Some((rejected, _)) = rejected else {
            stats.all_correct += usize::from(verdicts.iter().all(|&v| v));
            continue;
        };
        let (chosen, source) = match replies.iter().find(|(_, ok)| *ok) {
            Some((text, _)) => (text.clone(), "sample"),
            None if cfg.gold_fallback => {
                stats.gold_chosen += 1;
                (task.answer.clone(), "gold")
            }
            None => continue,
        };
        stats.pairs += 1;
        lines.push(serde_json::json!({
            "prompt": task.prompt,
            "chosen": chosen,
            "rejected": rejected,
            "family": task.family.name(),
            "answer": task.answer,
            "chosen_source": source,
            "verdicts": verdicts,
            "sampling": settings,
        }));
    }
    progress.finish_and_clear();
    stats.sample_accuracy = correct_samples as f64 / all_samples.max(1) as f64;
    Ok((lines, stats))
}

/// Off-policy pairs built by rule: the task's answer against a corrupted one
/// (a wrong digit or letter, the wrong format, or a reply that does not stop).
pub fn rule_pairs(tasks: &[Task], seed: u64) -> Vec<serde_json::Value> {
    let mut rng = step_rng(seed, 3, 0, 0);
    tasks
        .iter()
        .filter_map(|task| {
            let (rule, rejected) = corrupt(&task.answer, &mut rng);
            (rejected != task.answer).then(|| {
                serde_json::json!({
                    "prompt": task.prompt,
                    "chosen": task.answer,
                    "rejected": rejected,
                    "family": task.family.name(),
                    "answer": task.answer,
                    "rule": rule,
                })
            })
        })
        .collect()
}

fn corrupt(answer: &str, rng: &mut rand::rngs::StdRng) -> (&'static str, String) {
    match rng.random_range(0..3) {
        0 => {
            // Change one digit or letter.
            let chars: Vec<char> = answer.chars().collect();
            let slots: Vec<usize> = (0..chars.len())
                .filter(|&i| chars[i].is_ascii_alphanumeric())
                .collect();
            if slots.is_empty() {
                return ("no_stop", format!("{answer} {answer}"));
            }
            let at = slots[rng.random_range(0..slots.len())];
            let mut out = chars.clone();
            out[at] = if chars[at].is_ascii_digit() {
                let d = chars[at].to_digit(10).unwrap_or(0);
                char::from_digit((d + rng.random_range(1..10)) % 10, 10).unwrap_or('0')
            } else {
                (b'a' + (chars[at] as u8 - b'a' + rng.random_range(1..26u8)) % 26) as char
            };
            ("wrong_token", out.into_iter().collect())
        }
        1 => match answer.strip_prefix("Answer: ") {
            Some(bare) => ("wrong_format", bare.to_string()),
            None => ("wrong_format", format!("The answer is {answer}")),
        },
        _ => ("no_stop", format!("{answer} {answer} {answer}")),
    }
}

pub(crate) fn jsonl_bytes(lines: &[serde_json::Value]) -> Result<Vec<u8>> {
    let mut text = String::new();
    for line in lines {
        text.push_str(&serde_json::to_string(line)?);
        text.push('\n');
    }
    Ok(text.into_bytes())
}

/// Writes JSONL lines (atomically).
pub fn write_jsonl(path: &Path, lines: &[serde_json::Value]) -> Result<()> {
    checkpoint::write_atomic(path, &jsonl_bytes(lines)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Task prompts from a tasks JSONL (`baton data tasks`): conversations that
/// carry their family and answer.
pub fn read_tasks(path: &Path) -> Result<Vec<Task>> {
    let loaded = baton_core::conversations::read_jsonl(path, false)?;
    let tasks: Vec<Task> = loaded
        .conversations
        .into_iter()
        .filter_map(|c| c.task)
        .collect();
    if tasks.is_empty() {
        bail!(
            "{}: no verifiable tasks (lines need \"family\" and \"answer\", as `baton data tasks` writes)",
            path.display()
        );
    }
    Ok(tasks)
}

/// The on-policy training split's tasks (for `baton data pairs` without a file):
/// the first `pairs.prompts` of the training set, never a held-out instance;
/// `harder.prompt_share` of them from the harder difficulty's training set.
pub fn default_pair_tasks(cfg: &AlignConfig) -> Vec<Task> {
    let total = cfg.pairs.prompts.min(cfg.tasks.count);
    let harder = cfg.harder.tasks(&cfg.tasks);
    let hard = match &harder {
        Some(_) => (total as f64 * cfg.harder.prompt_share).round() as usize,
        None => 0,
    };
    let mut tasks = TasksConfig {
        count: total - hard,
        ..cfg.tasks.clone()
    }
    .train();
    if let Some(harder) = harder.filter(|_| hard > 0) {
        tasks.extend(
            TasksConfig {
                count: hard,
                ..harder
            }
            .train(),
        );
    }
    tasks
}

/// On-policy pairs live in the checkpoint under this name.
pub const PAIRS_FILE: &str = "pairs.jsonl";

/// The preferences, their provenance, and — when sampled here — the bytes of
/// `pairs.jsonl` to store in the checkpoint.
type Loaded = (Preferences, Vec<DataRef>, Option<Vec<u8>>);

pub(crate) fn load_preferences<B: Backend>(
    cfg: &AlignConfig,
    opts: &RunOptions,
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    device: &B::Device,
) -> Result<Loaded> {
    if opts.data.is_empty() {
        // A resumed run reuses the pairs it sampled before.
        let earlier = checkpoint::partial_dir(&opts.out).join(PAIRS_FILE);
        let (bytes, fresh) = if opts.resume && earlier.exists() {
            (std::fs::read(&earlier)?, false)
        } else {
            let tasks = default_pair_tasks(cfg);
            let (lines, stats) = sample_pairs(model, tokenizer, &tasks, &cfg.pairs, device)?;
            tracing::info!(
                "on-policy pairs: {} from {} prompts × {} samples (sample accuracy {:.3}; {} with the answer as chosen, {} all correct)",
                stats.pairs,
                stats.prompts,
                cfg.pairs.samples,
                stats.sample_accuracy,
                stats.gold_chosen,
                stats.all_correct
            );
            (jsonl_bytes(&lines)?, true)
        };
        let prefs = parse_preferences(&bytes, Path::new(PAIRS_FILE))?;
        let refs = vec![DataRef {
            source: format!("on-policy pairs ({PAIRS_FILE})"),
            sha256: checkpoint::sha256_bytes(&bytes),
            bytes: bytes.len() as u64,
            tokens: 0,
        }];
        return Ok((prefs, refs, fresh.then_some(bytes)));
    }
    let mut prefs = Preferences::default();
    let mut refs = Vec::new();
    for path in &opts.data {
        let p = read_preferences(path)?;
        if p.pairs.is_empty() && p.labelled.is_empty() && p.identical == 0 {
            bail!(
                "{}: no preference lines (the file is empty)",
                path.display()
            );
        }
        prefs.identical += p.identical;
        prefs.pairs.extend(p.pairs);
        prefs.labelled.extend(p.labelled);
        refs.push(DataRef {
            source: path.display().to_string(),
            sha256: checkpoint::sha256_file(path)?,
            bytes: std::fs::metadata(path)?.len(),
            tokens: 0,
        });
    }
    Ok((prefs, refs, None))
}
