//! Iterative on-policy alignment in one stage (`align.rounds = R > 1`).
//!
//! Round r samples fresh pairs from the policy as the round starts (labelled
//! by the task checkers, `pairs.seed + r`), trains `train.steps` steps on them
//! with a fresh optimizer, and evaluates. Its reference is the parent
//! (`align.reference_update = "fixed"`) or the policy the round started from
//! (`"previous"`).
//!
//! Each round works in `round-<r>/` of the stage's working directory, so a
//! killed run resumes inside the round it was in: finished rounds are read
//! back (their model and summary), the interrupted one continues from its
//! `train_state`. When the stage finishes, each round's pairs are kept as
//! `pairs-<r>.jsonl`, their summaries as `rounds.json`, and `metrics.jsonl`
//! holds every round's lines one after another (steps counted across
//! rounds, each line tagged with its `round`), then one summary line per
//! round.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use baton_core::burn::module::AutodiffModule;
use baton_core::burn::tensor::backend::AutodiffBackend;
use baton_core::checkpoint::{self, Checkpoint, DataRef, StageDir};
use baton_core::tokenizer::Tokenizer;
use baton_core::train::{Start, train_from};
use serde_json::json;

use crate::config::{AlignConfig, PairsConfig, ReferenceUpdate, RunOptions};
use crate::pairs::{default_pair_tasks, jsonl_bytes, sample_pairs};
use crate::prefs::parse_preferences;
use crate::rows::AlignData;
use crate::task::{AlignTask, HeldOut};
use crate::{Aligned, aligned_model, reference_key};

/// What a finished round leaves for a resumed run: its summary line.
const SUMMARY: &str = "round.json";
/// A finished round's weights, which the next round starts from.
const WEIGHTS: &str = "model.safetensors";

pub(crate) fn run<B: AutodiffBackend>(
    parent: &Checkpoint,
    tokenizer: &Tokenizer,
    cfg: &AlignConfig,
    opts: &RunOptions,
    inputs: &[&Path],
    device: &B::Device,
) -> Result<PathBuf> {
    let rounds = cfg.align.rounds;
    if !opts.data.is_empty() {
        bail!(
            "align.rounds = {rounds} samples fresh pairs every round; --data gives fixed pairs (use align.rounds = 1)"
        );
    }
    if baton_core::dist::World::from_env()
        .ok()
        .flatten()
        .is_some_and(|w| w.size > 1)
    {
        bail!("align.rounds = {rounds} runs in one process for now (not under baton launch)");
    }
    let spec = cfg.align.spec()?;
    let params = cfg.align.params();
    let stage = StageDir::open(&opts.out, opts.resume, opts.force, inputs)?;
    stage.copy_from(parent, checkpoint::TOKENIZER_FILE)?;
    stage.record_run(
        &baton_core::config::to_toml(cfg),
        &checkpoint::run_inputs(Some(parent), &[]),
        opts.resume,
        opts.allow_changes,
    )?;
    let fixed = parent.model::<B::InnerBackend>(device)?;
    let parent_metrics =
        HeldOut::new(cfg).metrics(&fixed, tokenizer, cfg.eval.max_new_tokens, device);
    tracing::info!(
        "parent task accuracy {:.4}; {rounds} rounds of {} steps",
        parent_metrics
            .get("task_accuracy")
            .copied()
            .unwrap_or(f64::NAN),
        cfg.train.steps
    );

    let mut policy = aligned_model::<B>(parent, cfg, None, device)?;
    let mut all_refs: Vec<DataRef> = Vec::new();
    let mut last = None;
    for round in 0..rounds {
        let dir = stage.work.join(format!("round-{round}"));
        let pairs_path = dir.join(crate::PAIRS_FILE);
        if dir.join(SUMMARY).is_file() {
            // Finished before an interruption: its result is the next start.
            let weights = checkpoint::read_safetensors(&dir.join(WEIGHTS))?;
            policy = checkpoint::load_named(policy, weights, device)
                .map_err(|e| anyhow::anyhow!("{}: {}", dir.join(WEIGHTS).display(), e.0))?;
            all_refs.push(pairs_ref(round, &std::fs::read(&pairs_path)?));
            tracing::info!("round {round}: finished before; kept");
            continue;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let sampler = policy.valid();
        // A resumed round keeps the pairs it sampled.
        let bytes = match pairs_path.is_file() {
            true => std::fs::read(&pairs_path)?,
            false => {
                let pairs = PairsConfig {
                    seed: cfg.pairs.seed + round as u64,
                    ..cfg.pairs.clone()
                };
                let (lines, stats) = sample_pairs(
                    &sampler,
                    tokenizer,
                    &default_pair_tasks(cfg),
                    &pairs,
                    device,
                )?;
                tracing::info!(
                    "round {round}: {} pairs from {} prompts (sample accuracy {:.3})",
                    stats.pairs,
                    stats.prompts,
                    stats.sample_accuracy
                );
                let bytes = jsonl_bytes(&lines)?;
                checkpoint::write_atomic(&pairs_path, &bytes)?;
                bytes
            }
        };
        let prefs = parse_preferences(&bytes, &pairs_path)?;
        let refs = vec![pairs_ref(round, &bytes)];
        let data = AlignData::for_training(&prefs, tokenizer, cfg, &spec)?;
        let mut task = AlignTask::<B>::new(
            data,
            cfg,
            spec.clone(),
            params.clone(),
            tokenizer,
            parent,
            device,
        );
        let reference = match cfg.align.reference_update {
            ReferenceUpdate::Fixed => fixed.clone(),
            ReferenceUpdate::Previous => sampler,
        };
        let key = reference_key(parent, tokenizer, &refs, cfg, task.data.items.len());
        task.attach_reference(reference, &key, &dir)?;
        let start = match opts.resume && dir.join(checkpoint::TRAIN_STATE_DIR).is_dir() {
            true => Start::Resume,
            false => Start::Fresh,
        };
        let outcome = train_from(policy, &cfg.train, &mut task, &dir, &start, device)?;
        let bytes = checkpoint::model_bytes(&outcome.model.valid())
            .map_err(|e| anyhow::anyhow!("{}: {}", dir.display(), e.0))?;
        checkpoint::write_atomic(&dir.join(WEIGHTS), &bytes)?;
        let mut summary = json!({
            "round": round,
            "step": (round as u64 + 1) * cfg.train.steps,
            "pairs": task.train_units.len(),
            "tokens_seen": outcome.tokens_seen,
            "wall_seconds": outcome.wall_seconds,
        });
        for (k, v) in &outcome.final_metrics {
            summary[format!("round/{k}")] = json!(v);
        }
        checkpoint::write_atomic(&dir.join(SUMMARY), summary.to_string().as_bytes())?;
        baton_core::files::fault_point(&format!("round-{round}"));
        tracing::info!(
            "round {round}: task accuracy {:.4}, KL {:.4}",
            outcome
                .final_metrics
                .get("task_accuracy")
                .copied()
                .unwrap_or(f64::NAN),
            outcome
                .final_metrics
                .get("kl_to_reference")
                .copied()
                .unwrap_or(f64::NAN)
        );
        all_refs.extend(refs);
        policy = outcome.model.clone();
        last = Some(outcome);
    }
    let Some(mut outcome) = last else {
        bail!(
            "{}: every round had finished before; nothing is left to resume (start over with --force)",
            opts.out.display()
        );
    };
    // Read back from the files, so a resumed run's records are the same bytes.
    let summaries = (0..rounds)
        .map(|r| read_json(&stage.work.join(format!("round-{r}")).join(SUMMARY)))
        .collect::<Result<Vec<_>>>()?;
    outcome.step = rounds as u64 * cfg.train.steps;
    // The stage's totals: every round's.
    outcome.tokens_seen = summaries
        .iter()
        .filter_map(|s| s["tokens_seen"].as_u64())
        .sum();
    outcome.wall_seconds = summaries
        .iter()
        .filter_map(|s| s["wall_seconds"].as_f64())
        .sum();
    outcome.tokens_per_second = outcome.tokens_seen as f64 / outcome.wall_seconds.max(1e-9);
    finish_rounds(&stage.work, rounds, cfg.train.steps, &summaries)?;
    let mut extra = BTreeMap::from([("rounds".to_string(), rounds as f64)]);
    extra.insert(
        "pairs".into(),
        summaries.iter().filter_map(|s| s["pairs"].as_f64()).sum(),
    );
    let aligned = Aligned {
        parent,
        tokenizer,
        parent_metrics,
        data_refs: all_refs,
        cfg,
        adapter: None,
    };
    aligned.commit(stage, outcome, extra)
}

fn pairs_ref(round: usize, bytes: &[u8]) -> DataRef {
    DataRef {
        source: format!("on-policy pairs of round {round} (pairs-{round}.jsonl)"),
        sha256: checkpoint::sha256_bytes(bytes),
        bytes: bytes.len() as u64,
        tokens: 0,
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not JSON", path.display()))
}

/// The stage's files from its rounds: `metrics.jsonl` (every round's lines,
/// steps counted across rounds, tagged with the round; then the summaries),
/// `rounds.json`, `pairs-<r>.jsonl`; the round directories are removed.
fn finish_rounds(
    work: &Path,
    rounds: usize,
    steps: u64,
    summaries: &[serde_json::Value],
) -> Result<()> {
    let mut lines = Vec::new();
    for round in 0..rounds {
        let dir = work.join(format!("round-{round}"));
        let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap_or_default();
        for line in text.lines() {
            let Ok(mut v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let step = v["step"].as_u64().unwrap_or(0) + round as u64 * steps;
            v["step"] = json!(step);
            v["round"] = json!(round);
            lines.push(v);
        }
    }
    lines.extend(summaries.iter().cloned());
    checkpoint::write_atomic(&work.join("metrics.jsonl"), &jsonl_bytes(&lines)?)?;
    checkpoint::write_atomic(
        &work.join("rounds.json"),
        serde_json::to_string_pretty(summaries)?.as_bytes(),
    )?;
    for round in 0..rounds {
        let dir = work.join(format!("round-{round}"));
        std::fs::copy(
            dir.join(crate::PAIRS_FILE),
            work.join(format!("pairs-{round}.jsonl")),
        )
        .with_context(|| format!("keeping the pairs of {}", dir.display()))?;
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}
