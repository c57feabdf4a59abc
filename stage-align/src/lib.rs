//! The `align` stage: direct preference optimisation. Reads an `sft` (or
//! `align`) checkpoint, writes an `align` checkpoint.
//!
//! Data: preference pairs (TRL's `prompt`/`chosen`/`rejected`), unpaired
//! labelled replies (KTO), or — without `--data` — pairs sampled on-policy from
//! the parent and labelled by the task checkers. Losses: one algebra in
//! [`baton_core::align`]. The reference model's log-probs are computed once
//! into a hashed artifact (or, `reference = "online"`, by a reference model
//! kept in memory).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use baton_core::align::{
    LossOutput, LossParams, LossSpec, Preferences, Side, alignment_loss, pair_count,
    parse_preferences, read_preferences,
};
use baton_core::burn::module::AutodiffModule;
use baton_core::burn::optim::GradientsParams;
use baton_core::burn::tensor::backend::{AutodiffBackend, Backend};
use baton_core::burn::tensor::{Int, Tensor, TensorData};
use baton_core::chat::{self, ChatRenderer, Message, Rendered};
use baton_core::checkpoint::{self, Checkpoint, DataRef, StageDir, StageKind};
use baton_core::config::ConfigSources;
use baton_core::data::step_rng;
use baton_core::generate::{Sampling, generate};
use baton_core::model::Llama;
use baton_core::tasks::{Task, TasksConfig, task_metrics};
use baton_core::tokenizer::Tokenizer;
use baton_core::train::{
    Batch, TrainConfig, TrainTask, child_config, packed_batch, split_grads, train,
};
use rand::Rng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

/// This stage's checkpoint kind: `align`; it continues an SFT model or an earlier alignment.
pub const KIND: StageKind = StageKind {
    name: "align",
    accepts: &["sft", "align"],
};

/// The shipped defaults (`configs/align.toml`), applied over the parent's `[train]`.
pub const BUILTIN_CONFIG: &str = include_str!("../../configs/align.toml");

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlignConfig {
    pub train: TrainConfig,
    pub align: AlignSection,
    pub pairs: PairsConfig,
    pub tasks: TasksConfig,
    pub eval: EvalConfig,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reference {
    /// Reference log-probs computed once into a file, the model then dropped.
    #[default]
    Cached,
    /// The reference model stays in memory and scores every batch.
    Online,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlignSection {
    pub loss: String,
    pub temperature: f64,
    pub align_weight: f64,
    pub margin: f64,
    pub label_smoothing: f64,
    pub reference: Reference,
    /// Reference cache path; empty = `reference_logps.json` in the checkpoint.
    pub reference_cache: String,
    /// Pairs held out of training for reward metrics.
    pub heldout_pairs: usize,
    /// Which reply tokens a pair is scored on.
    pub score_tokens: ScoreTokens,
}

/// Which reply tokens a chosen/rejected pair is scored on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreTokens {
    /// Every reply token and the end-of-turn token.
    #[default]
    All,
    /// The tokens up to and including the first one where chosen and rejected
    /// differ. The shared prefix cancels in every log-ratio; the tokens after
    /// the first difference follow different prefixes, so a preference on them
    /// is not a preference between the two replies' next tokens. This is
    /// Step-DPO's credit assignment (Lai et al. 2024) with a token as the step.
    ToDivergence,
}

impl Default for AlignSection {
    fn default() -> Self {
        let p = LossParams::default();
        Self {
            loss: "dpo".into(),
            temperature: p.temperature,
            align_weight: p.align_weight,
            margin: p.margin,
            label_smoothing: p.label_smoothing,
            reference: Reference::Cached,
            reference_cache: String::new(),
            heldout_pairs: 64,
            score_tokens: ScoreTokens::All,
        }
    }
}

impl AlignSection {
    pub fn spec(&self) -> Result<LossSpec> {
        LossSpec::parse(&self.loss).map_err(|e| anyhow::anyhow!("align.loss: {e}"))
    }

    pub fn params(&self) -> LossParams {
        LossParams {
            temperature: self.temperature,
            align_weight: self.align_weight,
            margin: self.margin,
            label_smoothing: self.label_smoothing,
        }
    }
}

/// How on-policy pairs are sampled from the parent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PairsConfig {
    /// Task prompts to sample on (from the training split of `[tasks]`).
    pub prompts: usize,
    /// Replies sampled per prompt.
    pub samples: usize,
    pub temperature: f64,
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// When no sampled reply is correct, use the task's answer as chosen.
    pub gold_fallback: bool,
    /// Make the first reply of each prompt the greedy one.
    pub include_greedy: bool,
    pub seed: u64,
}

impl Default for PairsConfig {
    fn default() -> Self {
        Self {
            prompts: 3000,
            samples: 4,
            temperature: 1.0,
            top_k: 0,
            max_new_tokens: 24,
            gold_fallback: true,
            include_greedy: true,
            seed: 11,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    pub max_new_tokens: usize,
    /// Held-out prompts sampled for the KL-to-reference estimate.
    pub kl_prompts: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 24,
            kl_prompts: 60,
        }
    }
}

/// Resolves the align config: the parent's `[train]`, the built-in defaults,
/// then the user's layers; checks the loss name and parameter ranges.
pub fn load_config(parent: &Checkpoint, user: &ConfigSources) -> Result<AlignConfig> {
    let cfg = child_config(
        parent,
        user,
        ("align", BUILTIN_CONFIG),
        |train| AlignConfig {
            train,
            ..AlignConfig::default()
        },
        |c| &c.train,
    )?;
    cfg.align.spec()?;
    cfg.align.params().validate().map_err(anyhow::Error::msg)?;
    if cfg.tasks.families.is_empty() {
        bail!("tasks.families is empty");
    }
    cfg.tasks.check_weights().map_err(anyhow::Error::msg)?;
    if !(cfg.pairs.temperature.is_finite() && cfg.pairs.temperature >= 0.0) {
        bail!(
            "pairs.temperature must be a finite number ≥ 0 (0 = greedy; got {})",
            cfg.pairs.temperature
        );
    }
    if cfg.pairs.samples < 2 && !cfg.pairs.gold_fallback {
        bail!("pairs.samples must be at least 2 (or pairs.gold_fallback = true)");
    }
    Ok(cfg)
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub out: PathBuf,
    pub resume: bool,
    pub force: bool,
    /// With `resume`: continue even if the settings or data changed.
    pub allow_changes: bool,
    /// Preference JSONL files; empty = on-policy pairs from the parent.
    pub data: Vec<PathBuf>,
}

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
    for (i, task) in tasks.iter().enumerate() {
        progress.inc(1);
        let prompt = renderer.render_prompt(&task.messages()[..1])?;
        let mut replies: Vec<(String, bool)> = Vec::new();
        for k in 0..cfg.samples {
            // Reply 0 is the greedy one: the answer evaluation sees, so the
            // most useful one to reject when wrong (or to keep when right).
            let greedy = k == 0 && cfg.include_greedy;
            let sampling = Sampling {
                max_new_tokens: cfg.max_new_tokens,
                temperature: if greedy { 0.0 } else { cfg.temperature },
                top_k: cfg.top_k,
                seed: cfg
                    .seed
                    .wrapping_mul(1_000_003)
                    .wrapping_add((i * cfg.samples + k) as u64),
                stop: vec![tokenizer.special.end],
                ..Sampling::default()
            };
            let ids = generate(model, &prompt, &sampling, device, |_| {});
            let text = renderer.decode_reply(&ids)?;
            let ok = task.check(&text);
            correct_samples += usize::from(ok);
            all_samples += 1;
            replies.push((text, ok));
        }
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

fn jsonl_bytes(lines: &[serde_json::Value]) -> Result<Vec<u8>> {
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

// ---------------------------------------------------------------------------
// Items: the sequences alignment scores
// ---------------------------------------------------------------------------

/// One prompt + reply, rendered; only the reply's tokens (and its end-of-turn)
/// are scored.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub rendered: Rendered,
    pub reply_tokens: usize,
}

/// What the loss compares: a pair of items, or one labelled item.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unit {
    Pair { chosen: usize, rejected: usize },
    Single { item: usize, desirable: bool },
}

impl Unit {
    fn items(self) -> Vec<usize> {
        match self {
            Unit::Pair { chosen, rejected } => vec![chosen, rejected],
            Unit::Single { item, .. } => vec![item],
        }
    }
}

/// Items and units of a preference dataset.
#[derive(Clone, Debug, Default)]
pub struct AlignData {
    pub items: Vec<Item>,
    pub units: Vec<Unit>,
    /// Units dropped as longer than the training window.
    pub dropped: usize,
}

impl AlignData {
    /// Renders preferences with the chat renderer; units with a sequence
    /// longer than `limit` tokens are dropped. `scope` says which tokens of a
    /// pair's replies are scored (unpaired replies are always scored whole).
    pub fn render(
        prefs: &Preferences,
        tokenizer: &Tokenizer,
        limit: usize,
        scope: ScoreTokens,
    ) -> Result<Self> {
        let renderer = ChatRenderer::new(tokenizer);
        let mut data = AlignData::default();
        let item =
            |prompt: &[Message], reply: Rendered, data: &mut AlignData| -> Result<Option<usize>> {
                let mut rendered = Rendered {
                    ids: renderer.render_prompt(prompt)?,
                    ..Rendered::default()
                };
                rendered.loss_mask = vec![false; rendered.ids.len()];
                let reply_tokens = reply.ids.len();
                rendered.ids.extend(reply.ids);
                rendered.loss_mask.extend(reply.loss_mask);
                if rendered.ids.len() > limit {
                    return Ok(None);
                }
                data.items.push(Item {
                    rendered,
                    reply_tokens,
                });
                Ok(Some(data.items.len() - 1))
            };
        for pair in &prefs.pairs {
            let before = data.items.len();
            let mut chosen = renderer.render_reply(&pair.chosen)?;
            let mut rejected = renderer.render_reply(&pair.rejected)?;
            if scope == ScoreTokens::ToDivergence {
                // Both replies end with end-of-turn, so unequal replies differ
                // at some index below both lengths.
                let shared = chosen
                    .ids
                    .iter()
                    .zip(&rejected.ids)
                    .take_while(|(a, b)| a == b)
                    .count();
                for reply in [&mut chosen, &mut rejected] {
                    let keep = (shared + 1).min(reply.ids.len());
                    reply.ids.truncate(keep);
                    reply.loss_mask.truncate(keep);
                }
            }
            match (
                item(&pair.prompt, chosen, &mut data)?,
                item(&pair.prompt, rejected, &mut data)?,
            ) {
                (Some(chosen), Some(rejected)) => data.units.push(Unit::Pair { chosen, rejected }),
                _ => {
                    data.items.truncate(before);
                    data.dropped += 1;
                }
            }
        }
        for l in &prefs.labelled {
            let reply = renderer.render_reply(&l.completion)?;
            match item(&l.prompt, reply, &mut data)? {
                Some(i) => data.units.push(Unit::Single {
                    item: i,
                    desirable: l.desirable,
                }),
                None => data.dropped += 1,
            }
        }
        Ok(data)
    }

    /// Packs units, in order, into `rows` rows of `seq` positions until the
    /// next one does not fit (a pair's replies may sit in different rows).
    /// Returns the batch and where each placed item sits.
    fn pack(&self, units: &[usize], rows: usize, seq: usize, pad: u32) -> (Batch, Placed) {
        let mut layout: Vec<Vec<&Rendered>> = vec![Vec::new(); rows];
        let mut placed = Placed::default();
        let mut used = vec![0usize; rows];
        let mut row = 0;
        'units: for &u in units {
            let mut trial_row = row;
            let mut trial_used = used.clone();
            let mut slots = Vec::new();
            for i in self.units[u].items() {
                let len = self.items[i].rendered.ids.len() - 1;
                while trial_row < rows && trial_used[trial_row] + len > seq {
                    trial_row += 1;
                }
                if trial_row == rows {
                    break 'units;
                }
                slots.push((i, trial_row, trial_used[trial_row], len));
                trial_used[trial_row] += len;
            }
            for (i, r, at, len) in slots {
                placed.items.push((i, r * seq + at, len));
                layout[r].push(&self.items[i].rendered);
            }
            row = trial_row;
            used = trial_used;
            placed.units.push(u);
        }
        (packed_batch(&layout, seq, pad), placed)
    }
}

/// Where a batch's items sit.
#[derive(Clone, Debug, Default)]
struct Placed {
    /// `(item, first slot, length)` in the flattened `[batch * seq]` layout.
    items: Vec<(usize, usize, usize)>,
    units: Vec<usize>,
}

impl Placed {
    /// `[batch*seq, n]` one-hot weights that sum the supervised token
    /// log-probs of the `n` items in `part`, the rows `first_row..` of the
    /// packed batch (the whole batch from row 0). `pack` places items in row
    /// order, so the parts' items, concatenated in row order, are `items` in
    /// order. `None` when no item sits in `part`.
    fn segment_matrix<B: Backend>(
        &self,
        part: &Batch,
        first_row: usize,
        device: &B::Device,
    ) -> Option<Tensor<B, 2>> {
        let slots = part.batch * part.seq;
        let offset = first_row * part.seq;
        let inside: Vec<(usize, usize)> = self
            .items
            .iter()
            .filter(|&&(_, start, _)| start >= offset && start < offset + slots)
            .map(|&(_, start, len)| (start - offset, len))
            .collect();
        let n = inside.len();
        if n == 0 {
            return None;
        }
        let mut m = vec![0f32; slots * n];
        for (col, &(start, len)) in inside.iter().enumerate() {
            for slot in start..start + len {
                m[slot * n + col] = part.weights[slot];
            }
        }
        Some(Tensor::from_data(TensorData::new(m, [slots, n]), device))
    }
}

/// Summed reply log-prob of every placed item in `part`, the rows
/// `first_row..` of the packed batch: `[n]`, in placement order.
fn item_logps<B: Backend>(
    model: &Llama<B>,
    part: &Batch,
    placed: &Placed,
    first_row: usize,
    device: &B::Device,
) -> Tensor<B, 1> {
    let Some(segments) = placed.segment_matrix::<B>(part, first_row, device) else {
        return Tensor::zeros([0], device);
    };
    let n = segments.dims()[1];
    let slots = part.batch * part.seq;
    let lp = part
        .token_logprobs(model, device)
        .reshape([1, slots])
        .matmul(segments);
    lp.reshape([n])
}

/// Summed reply log-prob of every item under `model`, computed in packed
/// batches (the reference cache, and the policy side of the KL estimate).
pub fn reply_logps<B: Backend>(
    model: &Llama<B>,
    data: &AlignData,
    rows: usize,
    seq: usize,
    pad: u32,
    device: &B::Device,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; data.items.len()];
    let all: Vec<usize> = (0..data.units.len()).collect();
    let mut next = 0;
    let progress = baton_core::cli::progress(all.len() as u64, "reference log-probs");
    while next < all.len() {
        let (batch, placed) = data.pack(&all[next..], rows, seq, pad);
        if placed.units.is_empty() {
            break;
        }
        let values: Vec<f32> = item_logps(model, &batch, &placed, 0, device)
            .into_data()
            .to_vec()
            .unwrap_or_default();
        for (&(item, _, _), v) in placed.items.iter().zip(values) {
            out[item] = v;
        }
        next += placed.units.len();
        progress.inc(placed.units.len() as u64);
    }
    progress.finish_and_clear();
    out
}

// ---------------------------------------------------------------------------
// Reference cache
// ---------------------------------------------------------------------------

/// What a reference cache is valid for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKey {
    pub reference_manifest_sha256: String,
    pub data_sha256: String,
    pub tokenizer_sha256: String,
    pub chat_template: String,
    pub seq_len: usize,
    pub items: usize,
    /// `align.score_tokens`: which reply tokens were scored.
    pub score_tokens: ScoreTokens,
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    format: String,
    key: CacheKey,
    logps: Vec<f32>,
}

const CACHE_FORMAT: &str = "baton-reference-logps/1";

/// Reads a reference cache, refusing it unless its key equals `key`.
pub fn read_reference_cache(path: &Path, key: &CacheKey) -> Result<Vec<f32>> {
    let text = baton_core::files::read_text(path, "reference cache", baton_core::files::cap::TEXT)?;
    let file: CacheFile = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not a reference cache: {e}", path.display()))?;
    if file.format != CACHE_FORMAT {
        bail!(
            "{}: reference cache format {} (expected {CACHE_FORMAT})",
            path.display(),
            file.format
        );
    }
    let (have, want) = (serde_json::to_value(&file.key)?, serde_json::to_value(key)?);
    if let (Some(have), Some(want)) = (have.as_object(), want.as_object()) {
        for (k, v) in want {
            if have.get(k) != Some(v) {
                bail!(
                    "{}: stale reference cache: {k} is {} but this run has {v}; delete it or pass another align.reference_cache",
                    path.display(),
                    have.get(k).cloned().unwrap_or_default()
                );
            }
        }
    }
    if file.logps.len() != key.items || file.logps.iter().any(|v| !v.is_finite()) {
        bail!("{}: reference cache is corrupt", path.display());
    }
    Ok(file.logps)
}

pub fn write_reference_cache(path: &Path, key: &CacheKey, logps: &[f32]) -> Result<()> {
    let file = CacheFile {
        format: CACHE_FORMAT.into(),
        key: key.clone(),
        logps: logps.to_vec(),
    };
    checkpoint::write_atomic(path, serde_json::to_string(&file)?.as_bytes())
        .with_context(|| format!("writing the reference cache {}", path.display()))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The stage
// ---------------------------------------------------------------------------

/// Aligns the parent checkpoint at `from` and writes an `align` checkpoint.
pub fn run<B: AutodiffBackend>(
    from: &Path,
    cfg: &AlignConfig,
    opts: &RunOptions,
    device: &B::Device,
) -> Result<PathBuf> {
    let parent = Checkpoint::open(from, KIND.accepts)
        .with_context(|| format!("loading the parent checkpoint {}", from.display()))?;
    if parent.manifest.chat_template.is_none() {
        bail!(
            "{}: parent has no chat template (align starts from an sft checkpoint)",
            parent.dir.display()
        );
    }
    let spec = cfg.align.spec()?;
    let params = cfg.align.params();
    params.validate().map_err(anyhow::Error::msg)?;
    let mut inputs = vec![from];
    inputs.extend(opts.data.iter().map(PathBuf::as_path));
    StageDir::check(&opts.out, opts.resume, opts.force, &inputs)?;
    let tokenizer = parent.tokenizer()?;
    let heldout_tasks = cfg.tasks.heldout();

    // 1. Preference data: the user's files, or on-policy pairs from the parent.
    //    Everything is checked before anything is written.
    let reference_model = parent.model::<B::InnerBackend>(device)?;
    let (prefs, data_refs, generated) =
        load_preferences(cfg, opts, &reference_model, &tokenizer, device)?;
    let limit = cfg.train.seq_len + 1;
    let data = AlignData::render(&prefs, &tokenizer, limit, cfg.align.score_tokens)?;
    let pointwise_data = data.units.iter().any(|u| matches!(u, Unit::Single { .. }));
    if pointwise_data && !spec.pointwise() {
        bail!(
            "loss \"{spec}\" needs chosen/rejected pairs but the data has unpaired labelled replies (use kto or asft)"
        );
    }
    if data.units.is_empty() {
        bail!(
            "the preference set is empty after filtering ({} identical pairs skipped, {} longer than {limit} tokens dropped)",
            prefs.identical,
            data.dropped
        );
    }

    let stage = StageDir::open(&opts.out, opts.resume, opts.force, &inputs)?;
    std::fs::copy(
        parent.dir.join(checkpoint::TOKENIZER_FILE),
        stage.path(checkpoint::TOKENIZER_FILE),
    )
    .with_context(|| format!("copying the tokenizer into {}", stage.work.display()))?;
    stage.record_run(
        &baton_core::config::to_toml(cfg),
        &checkpoint::run_inputs(Some(&parent), &data_refs),
        opts.resume,
        opts.allow_changes,
    )?;
    if let Some(bytes) = generated {
        checkpoint::write_atomic(&stage.path(PAIRS_FILE), &bytes)?;
    }
    let mut order: Vec<usize> = (0..data.units.len()).collect();
    order.shuffle(&mut step_rng(cfg.train.seed, 4, 0, 0));
    let held = cfg
        .align
        .heldout_pairs
        .min(data.units.len() / 5)
        .min(data.units.len().saturating_sub(1));
    let (eval_units, train_units) = order.split_at(held);
    tracing::info!(
        "align data: {} units ({} items) for training, {} held out for reward metrics; {} identical pairs skipped, {} over-long dropped",
        train_units.len(),
        data.items.len(),
        eval_units.len(),
        prefs.identical,
        data.dropped
    );

    // 2. Reference log-probs: once into a hashed cache, or online.
    let pad = tokenizer.special.pad;
    let mut task = AlignTask::<B> {
        data,
        train_units: train_units.to_vec(),
        eval_units: eval_units.to_vec(),
        references: None,
        online: None,
        spec: spec.clone(),
        params,
        heldout_tasks: heldout_tasks.clone(),
        tokenizer: &tokenizer,
        cfg: cfg.clone(),
        parent_dir: parent.dir.clone(),
        device: device.clone(),
        current: Vec::new(),
        step_stats: Vec::new(),
    };
    if spec.needs_reference() || !eval_units.is_empty() {
        match cfg.align.reference {
            Reference::Online => task.online = Some(reference_model.clone()),
            Reference::Cached => {
                let key = CacheKey {
                    reference_manifest_sha256: parent.manifest_sha256.clone(),
                    data_sha256: combined_sha(&data_refs),
                    tokenizer_sha256: parent.manifest.tokenizer_sha256.clone(),
                    chat_template: {
                        let t = chat::template(&tokenizer);
                        format!("{} v{}", t.name, t.version)
                    },
                    seq_len: cfg.train.seq_len,
                    items: task.data.items.len(),
                    score_tokens: cfg.align.score_tokens,
                };
                let path = if cfg.align.reference_cache.is_empty() {
                    stage.path("reference_logps.json")
                } else {
                    PathBuf::from(&cfg.align.reference_cache)
                };
                let logps = if path.exists() {
                    let logps = read_reference_cache(&path, &key)?;
                    tracing::info!("reference log-probs from {}", path.display());
                    logps
                } else {
                    let logps = reply_logps(
                        &reference_model,
                        &task.data,
                        cfg.train.batch_size,
                        cfg.train.seq_len,
                        pad,
                        device,
                    );
                    write_reference_cache(&path, &key, &logps)?;
                    tracing::info!("reference log-probs written to {}", path.display());
                    logps
                };
                task.references = Some(logps);
            }
        }
    }
    // The parent's accuracy on the same held-out tasks, for before → after.
    let parent_metrics = task_metrics(
        &reference_model,
        &tokenizer,
        &heldout_tasks,
        cfg.eval.max_new_tokens,
        device,
    );
    drop(reference_model);
    tracing::info!(
        "parent task accuracy {:.4}",
        parent_metrics
            .get("task_accuracy")
            .copied()
            .unwrap_or(f64::NAN)
    );

    // 3. Train with the loop every stage shares.
    let model = parent.model::<B>(device)?;
    let outcome = train(
        model,
        &cfg.train,
        &mut task,
        &stage.work,
        opts.resume,
        device,
    )?;

    // 4. The aligned checkpoint.
    stage.write_model(
        &outcome.model.valid(),
        &parent.manifest.model,
        &tokenizer.special,
    )?;
    let mut metrics = outcome.manifest_metrics();
    for (k, v) in &parent_metrics {
        metrics.insert(format!("parent_{k}"), *v);
    }
    if let Some(v) = metrics.get("eval/rewards/accuracies").copied() {
        metrics.insert("rewards/accuracies".into(), v);
    }
    metrics.insert("pairs".into(), task.train_units.len() as f64);
    metrics.retain(|_, v| v.is_finite());
    let manifest = outcome.child_manifest(
        KIND.name, &parent, &tokenizer, data_refs, &cfg.train, metrics,
    );
    Ok(stage.commit(manifest)?)
}

fn combined_sha(refs: &[DataRef]) -> String {
    let joined: Vec<&str> = refs.iter().map(|r| r.sha256.as_str()).collect();
    checkpoint::sha256_bytes(joined.join(",").as_bytes())
}

/// On-policy pairs live in the checkpoint under this name.
pub const PAIRS_FILE: &str = "pairs.jsonl";

/// The preferences, their provenance, and — when sampled here — the bytes of
/// `pairs.jsonl` to store in the checkpoint.
type Loaded = (Preferences, Vec<DataRef>, Option<Vec<u8>>);

fn load_preferences<B: Backend>(
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

/// Per-step reward statistics.
#[derive(Clone, Debug, Default)]
struct RewardStats {
    chosen: Vec<f32>,
    rejected: Vec<f32>,
    chosen_logps: Vec<f32>,
    rejected_logps: Vec<f32>,
}

impl RewardStats {
    fn summary(&self, prefix: &str) -> BTreeMap<String, f64> {
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
        let mut out = BTreeMap::new();
        if self.chosen.is_empty() && self.rejected.is_empty() {
            return out;
        }
        out.insert(format!("{prefix}rewards/chosen"), mean(&self.chosen));
        out.insert(format!("{prefix}rewards/rejected"), mean(&self.rejected));
        out.insert(format!("{prefix}logps/chosen"), mean(&self.chosen_logps));
        out.insert(
            format!("{prefix}logps/rejected"),
            mean(&self.rejected_logps),
        );
        if self.chosen.len() == self.rejected.len() && !self.chosen.is_empty() {
            let margins: Vec<f32> = self
                .chosen
                .iter()
                .zip(&self.rejected)
                .map(|(c, r)| c - r)
                .collect();
            let wins: Vec<f32> = margins.iter().map(|&m| f32::from(m > 0.0)).collect();
            out.insert(format!("{prefix}rewards/margins"), mean(&margins));
            out.insert(format!("{prefix}rewards/accuracies"), mean(&wins));
        }
        out
    }
}

struct AlignTask<'a, B: AutodiffBackend> {
    data: AlignData,
    train_units: Vec<usize>,
    eval_units: Vec<usize>,
    references: Option<Vec<f32>>,
    online: Option<Llama<B::InnerBackend>>,
    spec: LossSpec,
    params: LossParams,
    heldout_tasks: Vec<Task>,
    tokenizer: &'a Tokenizer,
    cfg: AlignConfig,
    parent_dir: PathBuf,
    device: B::Device,
    /// Placement of the current step's micro-batches.
    current: Vec<Placed>,
    step_stats: Vec<RewardStats>,
}

/// Splits placed items into chosen/desirable and rejected/undesirable sides:
/// the positions in the placed-item order.
fn sides_of(placed: &Placed, data: &AlignData) -> (Vec<usize>, Vec<usize>) {
    let position: BTreeMap<usize, usize> = placed
        .items
        .iter()
        .enumerate()
        .map(|(k, &(item, _, _))| (item, k))
        .collect();
    let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
    for &u in &placed.units {
        match data.units[u] {
            Unit::Pair {
                chosen: c,
                rejected: r,
            } => {
                chosen.push(position[&c]);
                rejected.push(position[&r]);
            }
            Unit::Single { item, desirable } => {
                if desirable {
                    chosen.push(position[&item]);
                } else {
                    rejected.push(position[&item]);
                }
            }
        }
    }
    (chosen, rejected)
}

/// Where reference log-probs come from.
pub enum ReferenceSource<'a, B: Backend> {
    /// Precomputed, one per item of the data.
    Cached(&'a [f32]),
    /// A reference model scoring the batch.
    Online(&'a Llama<B>),
}

/// The loss of the units packed into one batch of `rows × seq` (padding id
/// `pad`), against `reference`.
pub fn batch_loss<B: Backend>(
    model: &Llama<B>,
    data: &AlignData,
    units: &[usize],
    (rows, seq, pad): (usize, usize, u32),
    (spec, params): (&LossSpec, &LossParams),
    reference: ReferenceSource<'_, B>,
    device: &B::Device,
) -> LossOutput<B> {
    let (batch, placed) = data.pack(units, rows, seq, pad);
    let (cached, online) = match reference {
        ReferenceSource::Cached(c) => (Some(c), None),
        ReferenceSource::Online(m) => (None, Some(m)),
    };
    loss_of(
        model, data, &batch, &placed, spec, params, cached, online, device,
    )
    .0
}

/// The gradients of [`batch_loss`] (divided by `scale`) against cached
/// reference log-probs, with the batch's rows split among `workers` threads
/// ([`split_grads`]); returns the loss and the gradients.
#[allow(clippy::too_many_arguments)]
pub fn batch_loss_grads<B: AutodiffBackend>(
    model: &Llama<B>,
    data: &AlignData,
    units: &[usize],
    (rows, seq, pad): (usize, usize, u32),
    (spec, params): (&LossSpec, &LossParams),
    cache: &[f32],
    (workers, scale): (usize, f64),
    device: &B::Device,
) -> (f64, GradientsParams) {
    let (batch, placed) = data.pack(units, rows, seq, pad);
    let references = reference_logps::<B>(&batch, &placed, Some(cache), None, device);
    let (value, grads, _) = loss_grads(
        model,
        data,
        &batch,
        &placed,
        (spec, params),
        references.as_deref(),
        (workers, scale),
        device,
    );
    (value, grads)
}

/// The reference log-probs of the placed items, in placement order: from the
/// cache, or scored by the online reference model.
fn reference_logps<R: Backend>(
    batch: &Batch,
    placed: &Placed,
    cached: Option<&[f32]>,
    online: Option<&Llama<R>>,
    device: &R::Device,
) -> Option<Vec<f32>> {
    match (cached, online) {
        (Some(cache), _) => Some(placed.items.iter().map(|&(i, _, _)| cache[i]).collect()),
        (None, Some(reference)) => Some(
            item_logps(reference, batch, placed, 0, device)
                .into_data()
                .to_vec()
                .unwrap_or_default(),
        ),
        (None, None) => None,
    }
}

#[allow(clippy::too_many_arguments)]
fn loss_of<B: Backend, R: Backend<Device = B::Device>>(
    model: &Llama<B>,
    data: &AlignData,
    batch: &Batch,
    placed: &Placed,
    spec: &LossSpec,
    params: &LossParams,
    cached: Option<&[f32]>,
    online: Option<&Llama<R>>,
    device: &B::Device,
) -> (LossOutput<B>, RewardStats) {
    let logps = item_logps(model, batch, placed, 0, device);
    let references = reference_logps(batch, placed, cached, online, device);
    loss_from_logps(
        logps,
        data,
        placed,
        (spec, params),
        references.as_deref(),
        device,
    )
}

/// The loss of the units of `placed` from their items' log-probs `logps`
/// (placement order) and the reference log-probs.
fn loss_from_logps<B: Backend>(
    logps: Tensor<B, 1>,
    data: &AlignData,
    placed: &Placed,
    (spec, params): (&LossSpec, &LossParams),
    references: Option<&[f32]>,
    device: &B::Device,
) -> (LossOutput<B>, RewardStats) {
    assert_eq!(
        logps.dims()[0],
        placed.items.len(),
        "one log-prob per placed item"
    );
    let (chosen, rejected) = sides_of(placed, data);
    let side = |positions: &[usize]| {
        let index = Tensor::<B, 1, Int>::from_data(
            TensorData::new(
                positions.iter().map(|&p| p as i32).collect::<Vec<_>>(),
                [positions.len()],
            ),
            device,
        );
        let tokens: Vec<f32> = positions
            .iter()
            .map(|&p| data.items[placed.items[p].0].reply_tokens as f32)
            .collect();
        let reference: Option<Vec<f32>> =
            references.map(|r| positions.iter().map(|&p| r[p]).collect());
        Side::new(
            logps.clone().select(0, index),
            &tokens,
            reference.as_deref(),
        )
    };
    let (c, r) = (side(&chosen), side(&rejected));
    let out = alignment_loss(spec, params, &c, &r);
    let host = |t: Tensor<B, 1>| -> Vec<f32> { t.into_data().to_vec().unwrap_or_default() };
    let stats = RewardStats {
        chosen: host(out.chosen_rewards.clone()),
        rejected: host(out.rejected_rewards.clone()),
        chosen_logps: host(c.logp.detach()),
        rejected_logps: host(r.logp.detach()),
    };
    (out, stats)
}

/// The loss of a packed batch and its gradients divided by `scale`, the
/// item log-probs computed on `workers` threads ([`split_grads`]).
#[allow(clippy::too_many_arguments)]
fn loss_grads<B: AutodiffBackend>(
    model: &Llama<B>,
    data: &AlignData,
    batch: &Batch,
    placed: &Placed,
    (spec, params): (&LossSpec, &LossParams),
    references: Option<&[f32]>,
    (workers, scale): (usize, f64),
    device: &B::Device,
) -> (f64, GradientsParams, RewardStats) {
    split_grads(
        model,
        batch,
        workers,
        scale,
        device,
        |model, part, first_row| item_logps(model, part, placed, first_row, device),
        |logps| {
            let (out, stats) =
                loss_from_logps(logps, data, placed, (spec, params), references, device);
            (out.loss, stats)
        },
    )
}

impl<B: AutodiffBackend> TrainTask<B> for AlignTask<'_, B> {
    fn batches(&mut self, step: u64) -> Vec<Batch> {
        let cfg = &self.cfg.train;
        self.current.clear();
        self.step_stats.clear();
        (0..cfg.grad_accum as u64)
            .map(|micro| {
                let mut rng = step_rng(cfg.seed, 2, step, micro);
                // Enough units to fill every row; `pack` stops when full.
                let draw: Vec<usize> = (0..cfg.batch_size * cfg.seq_len / 8 + 1)
                    .map(|_| self.train_units[rng.random_range(0..self.train_units.len())])
                    .collect();
                let (batch, placed) = self.data.pack(
                    &draw,
                    cfg.batch_size,
                    cfg.seq_len,
                    self.tokenizer.special.pad,
                );
                self.current.push(placed);
                batch
            })
            .collect()
    }

    fn weight(&self, micro: usize, _batch: &Batch) -> f64 {
        let (c, r) = sides_of(&self.current[micro], &self.data);
        pair_count(c.len(), r.len())
    }

    fn loss_grads(
        &mut self,
        model: &Llama<B>,
        micro: usize,
        batch: &Batch,
        workers: usize,
        scale: f64,
        device: &B::Device,
    ) -> (f64, GradientsParams) {
        let placed = &self.current[micro];
        let references = reference_logps(
            batch,
            placed,
            self.references.as_deref(),
            self.online.as_ref(),
            device,
        );
        let (value, grads, stats) = loss_grads(
            model,
            &self.data,
            batch,
            placed,
            (&self.spec, &self.params),
            references.as_deref(),
            (workers, scale),
            device,
        );
        self.step_stats.push(stats);
        (value, grads)
    }

    fn step_metrics(&mut self) -> BTreeMap<String, f64> {
        let mut all = RewardStats::default();
        for s in self.step_stats.drain(..) {
            all.chosen.extend(s.chosen);
            all.rejected.extend(s.rejected);
            all.chosen_logps.extend(s.chosen_logps);
            all.rejected_logps.extend(s.rejected_logps);
        }
        all.summary("")
    }

    fn evaluate(&mut self, model: &Llama<B::InnerBackend>, _full: bool) -> BTreeMap<String, f64> {
        let mut metrics = task_metrics(
            model,
            self.tokenizer,
            &self.heldout_tasks,
            self.cfg.eval.max_new_tokens,
            &self.device,
        );
        // The reference, for rewards without a cache and for the KL estimate.
        let reference: Option<Llama<B::InnerBackend>> = match &self.online {
            Some(m) => Some(m.clone()),
            None => Checkpoint::open(&self.parent_dir, &[])
                .and_then(|c| c.model::<B::InnerBackend>(&self.device))
                .map_err(|e| tracing::warn!("KL estimate skipped: {e}"))
                .ok(),
        };
        // Rewards on held-out pairs.
        let cfg = &self.cfg.train;
        let pad = self.tokenizer.special.pad;
        let mut stats = RewardStats::default();
        let mut next = 0;
        while next < self.eval_units.len() {
            let (batch, placed) =
                self.data
                    .pack(&self.eval_units[next..], cfg.batch_size, cfg.seq_len, pad);
            if placed.units.is_empty() {
                break;
            }
            next += placed.units.len();
            let (_, s) = loss_of(
                model,
                &self.data,
                &batch,
                &placed,
                &self.spec,
                &self.params,
                self.references.as_deref(),
                reference.as_ref(),
                &self.device,
            );
            stats.chosen.extend(s.chosen);
            stats.rejected.extend(s.rejected);
            stats.chosen_logps.extend(s.chosen_logps);
            stats.rejected_logps.extend(s.rejected_logps);
        }
        metrics.extend(stats.summary("eval/"));
        if let Some(reference) = reference {
            let kl = kl_estimate(
                model,
                &reference,
                self.tokenizer,
                &self.heldout_tasks,
                &self.cfg.eval,
                cfg.seq_len,
                &self.device,
            );
            metrics.insert("kl_to_reference".into(), kl);
        }
        metrics
    }
}

/// Monte-Carlo estimate of KL(policy ‖ reference) per reply: replies sampled
/// from the policy (temperature 1) on held-out prompts, mean of
/// log π(y|x) − log ρ(y|x) over them.
pub fn kl_estimate<B: Backend>(
    policy: &Llama<B>,
    reference: &Llama<B>,
    tokenizer: &Tokenizer,
    tasks: &[Task],
    cfg: &EvalConfig,
    seq: usize,
    device: &B::Device,
) -> f64 {
    let renderer = ChatRenderer::new(tokenizer);
    let mut data = AlignData::default();
    for (i, task) in tasks.iter().take(cfg.kl_prompts).enumerate() {
        let Ok(prompt) = renderer.render_prompt(&task.messages()[..1]) else {
            continue;
        };
        let sampling = Sampling {
            max_new_tokens: cfg.max_new_tokens,
            temperature: 1.0,
            seed: 0x6b6c + i as u64,
            stop: vec![tokenizer.special.end],
            ..Sampling::default()
        };
        let reply = generate(policy, &prompt, &sampling, device, |_| {});
        let n = prompt.len() + reply.len();
        if reply.is_empty() || n > seq + 1 {
            continue;
        }
        let mut loss_mask = vec![false; prompt.len()];
        loss_mask.extend(std::iter::repeat_n(true, reply.len()));
        let mut ids = prompt;
        ids.extend(&reply);
        data.items.push(Item {
            rendered: Rendered { ids, loss_mask },
            reply_tokens: reply.len(),
        });
        let item = data.items.len() - 1;
        data.units.push(Unit::Single {
            item,
            desirable: true,
        });
    }
    if data.items.is_empty() {
        return f64::NAN;
    }
    let pad = tokenizer.special.pad;
    let p = reply_logps(policy, &data, 8, seq, pad, device);
    let r = reply_logps(reference, &data, 8, seq, pad, device);
    p.iter().zip(&r).map(|(a, b)| (a - b) as f64).sum::<f64>() / p.len() as f64
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
/// the first `pairs.prompts` of the training set, never a held-out instance.
pub fn default_pair_tasks(cfg: &AlignConfig) -> Vec<Task> {
    TasksConfig {
        count: cfg.pairs.prompts.min(cfg.tasks.count),
        ..cfg.tasks.clone()
    }
    .train()
}
