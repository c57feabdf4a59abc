//! The `sft` stage: teach a pretrained model to follow instructions in the chat
//! format. Reads a `pretrain` (or `sft`) checkpoint, writes an `sft` checkpoint.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use baton_core::burn::module::AutodiffModule;
use baton_core::burn::optim::GradientsParams;
use baton_core::burn::tensor::ElementConversion;
use baton_core::burn::tensor::backend::AutodiffBackend;
use baton_core::chat::{ChatRenderer, Rendered, Role, Supervise};
use baton_core::checkpoint::{self, Checkpoint, DataRef, StageDir, StageKind};
use baton_core::config::{ConfigSources, child_config};
use baton_core::conversations::{Conversation, read_jsonl};
use baton_core::data::step_rng;
use baton_core::lora::LoraConfig;
use baton_core::model::Llama;
use baton_core::stage_model;
use baton_core::tasks::{Task, TasksConfig, task_metrics};
use baton_core::tokenizer::Tokenizer;
use baton_core::train::distill::{self, DistillConfig, Distiller, TeacherMode};
use baton_core::train::freeze;
use baton_core::train::{
    Batch, Start, TrainConfig, TrainTask, pack_row, packed_batch, train_from, workers_for,
};
use rand::Rng;
use serde::{Deserialize, Serialize};

pub mod filter;
use filter::{Filter, FilterConfig};

/// This stage's checkpoint kind: `sft`; it continues a pretrained (or imported) model or an earlier SFT.
pub const KIND: StageKind = StageKind {
    name: "sft",
    accepts: &["pretrain", "sft", "merge"],
};

/// The shipped defaults (`configs/sft.toml`), applied over the parent's `[train]`.
pub const BUILTIN_CONFIG: &str = include_str!("../../configs/sft.toml");

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    pub train: TrainConfig,
    pub data: SftDataConfig,
    pub tasks: TasksConfig,
    pub eval: EvalConfig,
    /// Distillation from `--teacher` (ignored without one).
    pub distill: DistillConfig,
    /// LoRA adapters instead of full fine-tuning (off unless `rank` is set).
    pub lora: LoraConfig,
    /// The auxiliary losses of a mixture-of-experts parent (ignored for a
    /// dense one), as in pretrain.
    pub moe: baton_core::moe::MoeTrainConfig,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Cut tokens from the left of the prompt (after BOS) until it fits.
    #[default]
    TruncateLeft,
    /// Leave the example out.
    Drop,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftDataConfig {
    pub supervise: Supervise,
    pub overflow: Overflow,
    pub pack: bool,
    pub skip_bad_lines: bool,
    /// Loss-threshold filtering (`{ percentile = p, warmup = n }`); off at percentile 0.
    pub filter: FilterConfig,
}

impl Default for SftDataConfig {
    fn default() -> Self {
        Self {
            supervise: Supervise::AllAssistant,
            overflow: Overflow::TruncateLeft,
            pack: true,
            skip_bad_lines: false,
            filter: FilterConfig::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Generation limit per held-out answer.
    pub max_new_tokens: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self { max_new_tokens: 24 }
    }
}

/// Resolves the SFT config: the parent's `[train]`, then the built-in defaults,
/// then the user's layers. Logs every training knob that differs from the parent.
pub fn load_config(parent: &Checkpoint, user: &ConfigSources) -> Result<SftConfig> {
    let cfg = child_config(
        parent,
        user,
        ("sft", BUILTIN_CONFIG),
        |train| SftConfig {
            train,
            ..SftConfig::default()
        },
        |c| &c.train,
    )?;
    cfg.data.filter.validate().map_err(anyhow::Error::msg)?;
    cfg.distill.validate().map_err(anyhow::Error::msg)?;
    cfg.moe.validate().map_err(anyhow::Error::msg)?;
    if cfg.tasks.families.is_empty() {
        bail!("tasks.families is empty");
    }
    cfg.tasks.check_weights().map_err(anyhow::Error::msg)?;
    Ok(cfg)
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub out: PathBuf,
    pub resume: bool,
    pub force: bool,
    /// With `resume`: continue even if the settings or data changed.
    pub allow_changes: bool,
    /// JSONL conversation files; empty = generated tasks.
    pub data: Vec<PathBuf>,
    /// Distil from this checkpoint (same tokenizer) with `[distill]`.
    pub teacher: Option<PathBuf>,
    /// The parent holds a LoRA adapter: merge it and train the full model
    /// (instead of going on training the adapter).
    pub merge_adapter: bool,
}

/// Fine-tunes the parent checkpoint at `from` on conversations and writes an
/// `sft` checkpoint. Returns its directory.
pub fn run<B: AutodiffBackend>(
    from: &Path,
    cfg: &SftConfig,
    opts: &RunOptions,
    device: &B::Device,
) -> Result<PathBuf> {
    // 1. Start where pretraining stopped: architecture and tokenizer come from its manifest.
    let parent = Checkpoint::open(from, KIND.accepts)
        .with_context(|| format!("loading the parent checkpoint {}", from.display()))?;
    let tokenizer = parent.tokenizer()?;
    warn_on_a_from_scratch_rate(&parent, cfg);
    let adapter = stage_model::plan(&parent, &cfg.lora, opts.merge_adapter)?;
    let spec = adapter.as_ref().map(|a| a.spec());
    freeze::check(&cfg.train, &parent.manifest.model, spec.as_ref()).map_err(anyhow::Error::msg)?;
    let teacher = match &opts.teacher {
        Some(dir) => {
            let teacher = distill::open_teacher(dir)?;
            distill::check_teacher(
                &teacher,
                &parent.manifest.tokenizer_sha256,
                parent.manifest.model.vocab_size,
            )?;
            if cfg.distill.teacher == TeacherMode::Cached && cfg.data.filter.on() {
                bail!(
                    "distill.teacher = \"cached\" scores each step's batches in advance, but data.filter reselects them during training: use distill.teacher = \"online\""
                );
            }
            Some(teacher)
        }
        None => None,
    };

    // 2. Render conversations with the parent's tokenizer; only assistant tokens carry loss.
    let (train_set, heldout_tasks, data_refs) = load_data(cfg, opts)?;
    let renderer = ChatRenderer::new(&tokenizer);
    let limit = cfg.train.seq_len + 1;
    let (examples, truncated, dropped) = render_all(&renderer, &train_set, cfg, limit)?;
    tracing::info!(
        "sft data: {} conversations ({truncated} truncated, {dropped} dropped), {} held-out tasks",
        examples.len(),
        heldout_tasks.len()
    );
    let later = later_phase(&renderer, cfg, opts, limit)?;
    let heldout_conversations = render_heldout(&renderer, &heldout_tasks, limit);

    let mut inputs = vec![from];
    inputs.extend(opts.data.iter().map(PathBuf::as_path));
    inputs.extend(opts.teacher.as_deref());
    let start = Start::for_child(opts.resume, &parent, &cfg.train)?;
    let stage = StageDir::open(&opts.out, opts.resume, opts.force, &inputs)?;
    stage.copy_from(&parent, checkpoint::TOKENIZER_FILE)?;
    let mut run_inputs = checkpoint::run_inputs(Some(&parent), &data_refs);
    run_inputs.extend(teacher.as_ref().map(distill::teacher_input));
    stage.record_run(
        &baton_core::config::to_toml(cfg),
        &run_inputs,
        opts.resume,
        opts.allow_changes,
    )?;

    // 3. Train with the loop every stage shares.
    let mut model =
        stage_model::stage_model::<B>(&parent, adapter.as_ref(), cfg.train.seed, device)?;
    if parent.manifest.model.moe.is_some() {
        model.balance = Some(baton_core::moe::Balance::new(cfg.moe.clone()));
    }
    let mut task = SftTask::<B> {
        examples,
        later,
        heldout_tasks: heldout_tasks.clone(),
        heldout_conversations,
        tokenizer: &tokenizer,
        cfg: cfg.clone(),
        device: device.clone(),
        filter: Filter::default(),
        distiller: None,
    };
    if let Some(teacher) = &teacher {
        let distiller = Distiller::prepare(
            teacher,
            &cfg.distill,
            stage.path(distill::DEFAULT_CACHE),
            cfg.train.steps,
            |step| task.batches(step),
            device,
        )?;
        task.distiller = Some(distiller);
    }
    let outcome = train_from(model, &cfg.train, &mut task, &stage.work, &start, device)?;

    // 4. Hand the baton to `align`.
    let adapter = stage.write_trained(
        &outcome.model.valid(),
        adapter,
        outcome.trained.as_deref(),
        &parent.manifest.model,
        &tokenizer.special,
    )?;
    let mut metrics = outcome.manifest_metrics();
    metrics.insert("truncated_examples".into(), truncated as f64);
    metrics.insert("dropped_examples".into(), dropped as f64);
    if cfg.data.filter.on() {
        metrics.insert("filter_skipped_share".into(), task.filter.skipped_share());
    }
    let mut manifest = outcome.child_manifest(
        KIND.name, &parent, &tokenizer, data_refs, &cfg.train, metrics,
    );
    manifest
        .parents
        .extend(teacher.iter().map(|t| t.as_parent("teacher")));
    manifest.adapter = adapter;
    Ok(stage.commit(manifest)?)
}

/// Fine-tuning an imported model at a from-scratch learning rate is a
/// mistake worth a warning.
fn warn_on_a_from_scratch_rate(parent: &Checkpoint, cfg: &SftConfig) {
    if checkpoint::is_imported(&parent.manifest) && cfg.train.lr > 1e-3 {
        tracing::warn!(
            "the parent is an imported model and train.lr = {} is a from-scratch rate; fine-tuning usually wants 1e-5…1e-4 (--set train.lr=3e-5)",
            cfg.train.lr
        );
    }
}

/// The later phase of the curriculum, when training on generated tasks
/// reaches it: its first step and its rendered conversations.
fn later_phase(
    renderer: &ChatRenderer,
    cfg: &SftConfig,
    opts: &RunOptions,
    limit: usize,
) -> Result<Option<(u64, Vec<Rendered>)>> {
    let reached = cfg.tasks.later_from < cfg.train.steps && opts.data.is_empty();
    let Some(tasks) = cfg.tasks.later_train().filter(|_| reached) else {
        return Ok(None);
    };
    let conversations: Vec<Conversation> = tasks.iter().map(Conversation::of_task).collect();
    let (later, _, _) = render_all(renderer, &conversations, cfg, limit)?;
    tracing::info!(
        "sft data: from step {} on, {} conversations drawn with tasks.later_weights",
        cfg.tasks.later_from,
        later.len()
    );
    Ok(Some((cfg.tasks.later_from, later)))
}

/// The held-out tasks as whole rendered conversations (for the eval loss).
fn render_heldout(renderer: &ChatRenderer, heldout: &[Task], limit: usize) -> Vec<Rendered> {
    heldout
        .iter()
        .filter_map(|t| renderer.render(&t.messages(), Supervise::AllAssistant).ok())
        .filter_map(|r| match fit(r, limit, Overflow::Drop) {
            Fit::Whole(r) => Some(r),
            _ => None,
        })
        .collect()
}

/// The training conversations, the held-out tasks, and the data provenance.
fn load_data(
    cfg: &SftConfig,
    opts: &RunOptions,
) -> Result<(Vec<Conversation>, Vec<Task>, Vec<DataRef>)> {
    let (train, heldout) = cfg.tasks.sets();
    if opts.data.is_empty() {
        let conversations = train.iter().map(Conversation::of_task).collect();
        let description = serde_json::to_string(&cfg.tasks)?;
        let data = vec![DataRef {
            source: format!("generated tasks {description}"),
            sha256: checkpoint::sha256_bytes(description.as_bytes()),
            bytes: 0,
            tokens: 0,
        }];
        return Ok((conversations, heldout, data));
    }
    let mut conversations = Vec::new();
    let mut data = Vec::new();
    let mut skipped = 0;
    for path in &opts.data {
        let loaded = read_jsonl(path, cfg.data.skip_bad_lines)?;
        skipped += loaded.skipped;
        data.push(DataRef {
            source: path.display().to_string(),
            sha256: checkpoint::sha256_file(path)?,
            bytes: std::fs::metadata(path)?.len(),
            tokens: 0,
        });
        conversations.extend(loaded.conversations);
    }
    if skipped > 0 {
        tracing::warn!("skipped {skipped} malformed lines (--skip-bad-lines)");
    }
    // Held-out tasks must not repeat a training conversation.
    let seen: HashSet<&str> = conversations
        .iter()
        .filter_map(|c| c.messages.iter().find(|m| m.role == Role::User))
        .map(|m| m.content.as_str())
        .collect();
    let heldout = heldout
        .into_iter()
        .filter(|t| !seen.contains(t.prompt.as_str()))
        .collect();
    if conversations.is_empty() {
        bail!("the training set is empty after filtering ({skipped} malformed lines skipped)");
    }
    Ok((conversations, heldout, data))
}

/// Renders and fits every training conversation: the examples, and how many
/// were truncated and dropped.
fn render_all(
    renderer: &ChatRenderer,
    conversations: &[Conversation],
    cfg: &SftConfig,
    limit: usize,
) -> Result<(Vec<Rendered>, usize, usize)> {
    let mut examples = Vec::with_capacity(conversations.len());
    let (mut truncated, mut dropped) = (0usize, 0usize);
    for conversation in conversations {
        let rendered = renderer.render(&conversation.messages, cfg.data.supervise)?;
        match fit(rendered, limit, cfg.data.overflow) {
            Fit::Whole(r) => examples.push(r),
            Fit::Truncated(r) => {
                truncated += 1;
                examples.push(r)
            }
            Fit::Dropped => dropped += 1,
        }
    }
    if examples.is_empty() {
        bail!(
            "the training set is empty after filtering ({} conversations read, {dropped} dropped as longer than {limit} tokens)",
            conversations.len()
        );
    }
    Ok((examples, truncated, dropped))
}

enum Fit {
    Whole(Rendered),
    Truncated(Rendered),
    Dropped,
}

/// Makes an example at most `limit` tokens long, by the overflow rule; never
/// cuts supervised tokens (an example whose supervised part alone is too long
/// is dropped).
fn fit(rendered: Rendered, limit: usize, overflow: Overflow) -> Fit {
    let n = rendered.ids.len();
    if n <= limit {
        return Fit::Whole(rendered);
    }
    let excess = n - limit;
    let first_supervised = rendered.loss_mask.iter().position(|&m| m).unwrap_or(n);
    if overflow == Overflow::Drop || 1 + excess > first_supervised.saturating_sub(1) {
        return Fit::Dropped;
    }
    // Keep BOS, cut `excess` prompt tokens after it.
    let mut ids = vec![rendered.ids[0]];
    ids.extend_from_slice(&rendered.ids[1 + excess..]);
    let mut loss_mask = vec![false];
    loss_mask.extend_from_slice(&rendered.loss_mask[1 + excess..]);
    Fit::Truncated(Rendered { ids, loss_mask })
}

struct SftTask<'a, B: AutodiffBackend> {
    examples: Vec<Rendered>,
    /// The later phase of a curriculum: from this step on, rows draw from these.
    later: Option<(u64, Vec<Rendered>)>,
    heldout_tasks: Vec<Task>,
    heldout_conversations: Vec<Rendered>,
    tokenizer: &'a Tokenizer,
    cfg: SftConfig,
    device: B::Device,
    filter: Filter,
    /// The teacher, when distilling.
    distiller: Option<Distiller<B>>,
}

impl<B: AutodiffBackend> TrainTask<B> for SftTask<'_, B> {
    fn row_parallel(&self) -> bool {
        true
    }

    fn loss_grads(
        &mut self,
        model: &Llama<B>,
        _micro: usize,
        batch: &Batch,
        workers: usize,
        scale: f64,
        device: &B::Device,
    ) -> (f64, GradientsParams) {
        let distiller = self.distiller.as_mut();
        distill::loss_grads(distiller, model, batch, workers, scale, device)
    }

    fn select(&mut self, model: &Llama<B>, step: u64, batches: Vec<Batch>) -> Vec<Batch> {
        let cfg = &self.cfg.data.filter;
        if !cfg.on() {
            return batches;
        }
        let workers = workers_for::<B>(&self.cfg.train, &self.device);
        self.filter
            .select(cfg, (model, workers), step, batches, &self.device)
    }

    fn state(&self) -> serde_json::Value {
        if self.cfg.data.filter.on() {
            serde_json::to_value(&self.filter).unwrap_or_default()
        } else {
            serde_json::Value::Null
        }
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        if self.cfg.data.filter.on() && !state.is_null() {
            self.filter = serde_json::from_value(state.clone())
                .map_err(|e| format!("train_state: unreadable filter state ({e})"))?;
        }
        Ok(())
    }

    fn step_metrics(&mut self) -> BTreeMap<String, f64> {
        if self.cfg.data.filter.on() {
            BTreeMap::from([("filter/skipped".to_string(), self.filter.last_share)])
        } else {
            BTreeMap::new()
        }
    }

    fn batches(&mut self, step: u64) -> Vec<Batch> {
        let cfg = &self.cfg.train;
        let examples = match &self.later {
            Some((from, later)) if step >= *from => later,
            _ => &self.examples,
        };
        (0..cfg.grad_accum as u64)
            .map(|micro| {
                let mut rng = step_rng(cfg.seed, 1, step, micro);
                let rows: Vec<Vec<&Rendered>> = (0..cfg.batch_size)
                    .map(|_| {
                        if self.cfg.data.pack {
                            pack_row(examples, cfg.seq_len + 1, &mut rng)
                        } else {
                            vec![&examples[rng.random_range(0..examples.len())]]
                        }
                    })
                    .collect();
                packed_batch(&rows, cfg.seq_len, self.tokenizer.special.pad)
            })
            .collect()
    }

    fn evaluate(&mut self, model: &Llama<B::InnerBackend>, _full: bool) -> BTreeMap<String, f64> {
        let mut metrics = task_metrics(
            model,
            self.tokenizer,
            &self.heldout_tasks,
            self.cfg.eval.max_new_tokens,
            &self.device,
        );
        let refs: Vec<Vec<&Rendered>> =
            self.heldout_conversations.iter().map(|r| vec![r]).collect();
        let (mut nll, mut count) = (0.0, 0.0);
        for chunk in refs.chunks(self.cfg.train.batch_size.max(1)) {
            let seq = chunk.iter().map(|r| r[0].ids.len() - 1).max().unwrap_or(1);
            let batch = packed_batch(chunk, seq, self.tokenizer.special.pad);
            nll += batch
                .nll_sum(model, &self.device)
                .into_scalar()
                .elem::<f64>();
            count += batch.supervised_tokens();
        }
        metrics.insert("val/loss".into(), nll / count.max(1.0));
        metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::backend::Train;
    use baton_core::burn::tensor::Tensor;
    use baton_core::chat::Message;
    use baton_core::model::ModelConfig;

    #[test]
    fn packed_loss_equals_unpacked_loss() {
        let text = "What is 12 + 30? 42\nReverse: a b c\nc b a\n";
        let tokenizer = Tokenizer::train(std::iter::repeat_n(text, 20), 300).unwrap();
        let renderer = ChatRenderer::new(&tokenizer);
        let conversations: Vec<Rendered> = [
            ("What is 1 + 2?", "3"),
            ("Reverse: a b c", "c b a"),
            ("Hi", "Hello there"),
        ]
        .iter()
        .map(|(u, a)| {
            renderer
                .render(
                    &[
                        Message::new(Role::User, *u),
                        Message::new(Role::Assistant, *a),
                    ],
                    Supervise::AllAssistant,
                )
                .unwrap()
        })
        .collect();
        let config = ModelConfig {
            vocab_size: 300,
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            d_ff: 48,
            max_seq_len: 64,
            ..ModelConfig::default()
        };
        let device = Default::default();
        let model = config.init::<Train>(4, &device);
        let pad = tokenizer.special.pad;
        let packed = packed_batch(&[conversations.iter().collect()], 48, pad);
        let rows: Vec<Vec<&Rendered>> = conversations.iter().map(|c| vec![c]).collect();
        let longest = conversations.iter().map(|c| c.ids.len() - 1).max().unwrap();
        let unpacked = packed_batch(&rows, longest, pad);
        assert_eq!(packed.supervised_tokens(), unpacked.supervised_tokens());
        let a: Tensor<Train, 1> = packed.nll_sum(&model, &device);
        let b: Tensor<Train, 1> = unpacked.nll_sum(&model, &device);
        let (a, b): (f32, f32) = (a.into_scalar(), b.into_scalar());
        assert!(
            (a - b).abs() < 1e-4 * b.abs().max(1.0),
            "packed {a} vs unpacked {b}"
        );
        // Without the document mask the packed loss would differ.
        let leaky = Batch {
            doc_ids: None,
            positions: None,
            ..packed.clone()
        };
        let c: f32 = leaky.nll_sum(&model.valid(), &device).into_scalar();
        assert!(
            (c - b).abs() > 1e-4,
            "the mask must matter for this test to mean anything"
        );
    }

    #[test]
    fn rows_draw_from_the_later_set_from_later_from_on() {
        let tokenizer = Tokenizer::train(std::iter::repeat_n("a b c d e f", 20), 300).unwrap();
        let example = |id: u32| Rendered {
            ids: vec![id; 6],
            loss_mask: vec![false, false, true, true, true, true],
        };
        let mut cfg = SftConfig::default();
        cfg.train.batch_size = 2;
        cfg.train.seq_len = 16;
        let mut task = SftTask::<Train> {
            examples: vec![example(100)],
            later: Some((5, vec![example(200)])),
            heldout_tasks: Vec::new(),
            heldout_conversations: Vec::new(),
            tokenizer: &tokenizer,
            cfg,
            device: Default::default(),
            filter: Filter::default(),
            distiller: None,
        };
        let ids = |task: &mut SftTask<Train>, step: u64| -> HashSet<u32> {
            let pad = task.tokenizer.special.pad;
            let batches = task.batches(step);
            let ids = batches.iter().flat_map(|b| b.inputs.iter().copied());
            ids.filter(|&id| id != pad).collect()
        };
        assert_eq!(ids(&mut task, 0), HashSet::from([100]));
        assert_eq!(ids(&mut task, 4), HashSet::from([100]));
        assert_eq!(ids(&mut task, 5), HashSet::from([200]));
        assert_eq!(ids(&mut task, 9), HashSet::from([200]));
    }

    #[test]
    fn overflow_truncates_the_prompt_or_drops() {
        let r = Rendered {
            ids: (0..10).collect(),
            loss_mask: (0..10).map(|i| i >= 7).collect(),
        };
        let Fit::Truncated(t) = fit(r.clone(), 8, Overflow::TruncateLeft) else {
            panic!("expected truncation")
        };
        assert_eq!(t.ids, vec![0, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(t.loss_mask.iter().filter(|&&m| m).count(), 3);
        assert!(matches!(fit(r.clone(), 8, Overflow::Drop), Fit::Dropped));
        assert!(matches!(fit(r, 3, Overflow::TruncateLeft), Fit::Dropped));
    }
}
