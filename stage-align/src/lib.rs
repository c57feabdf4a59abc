//! The `align` stage: direct preference optimisation. Reads an `sft` (or
//! `align`) checkpoint, writes an `align` checkpoint.
//!
//! Data: preference pairs (TRL's `prompt`/`chosen`/`rejected`), unpaired
//! labelled replies (KTO), or — without `--data` — pairs sampled on-policy from
//! the parent and labelled by the task checkers. Losses: one algebra in
//! [`loss`]. The reference model's log-probs are computed once
//! into a hashed artifact (or, `reference = "online"`, by a reference model
//! kept in memory).

mod config;
pub mod grpo;
pub mod loss;
mod pairs;
pub mod prefs;
mod reference;
mod rounds;
mod rows;
mod task;

pub use config::{
    AlignConfig, AlignSection, BUILTIN_CONFIG, EvalConfig, GrpoConfig, HarderConfig, Method,
    PairsConfig, Reference, ReferenceUpdate, RunOptions, ScoreTokens, load_config,
};
pub use pairs::{
    PAIRS_FILE, PairStats, default_pair_tasks, read_tasks, rule_pairs, sample_pairs, write_jsonl,
};
pub use reference::{CacheKey, read_reference_cache, write_reference_cache};
pub use rows::{AlignData, Item, Unit, reply_logps};
pub use task::{ReferenceSource, batch_loss, batch_loss_grads, kl_estimate};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use baton_core::burn::module::AutodiffModule;
use baton_core::burn::tensor::backend::AutodiffBackend;
use baton_core::chat;
use baton_core::checkpoint::{self, Checkpoint, DataRef, StageDir, StageKind};
use baton_core::tokenizer::Tokenizer;
use baton_core::train::{Start, TrainOutcome, train_from};

use crate::pairs::load_preferences;
use crate::task::AlignTask;

/// This stage's checkpoint kind: `align`; it continues an SFT model or an earlier alignment.
pub const KIND: StageKind = StageKind {
    name: "align",
    accepts: &["pretrain", "sft", "align", "merge"],
};

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
    // 1. The parent, and everything checked before anything is written.
    let spec = cfg.align.spec()?;
    let parent = open_parent(
        from,
        !spec.needs_reference() && cfg.align.method == Method::Preference,
    )?;
    let params = cfg.align.params();
    params.validate().map_err(anyhow::Error::msg)?;
    let adapter = baton_core::stage_model::plan(&parent, &cfg.lora, opts.merge_adapter)?;
    let adapter_spec = adapter.as_ref().map(|a| a.spec());
    baton_core::train::freeze::check(&cfg.train, &parent.manifest.model, adapter_spec.as_ref())
        .map_err(anyhow::Error::msg)?;
    let mut inputs = vec![from];
    inputs.extend(opts.data.iter().map(PathBuf::as_path));
    StageDir::check(&opts.out, opts.resume, opts.force, &inputs)?;
    let start = Start::for_child(opts.resume, &parent, &cfg.train)?;
    let tokenizer = parent.tokenizer()?;
    if cfg.align.method != Method::Preference {
        return run_rl::<B>(&parent, &tokenizer, cfg, opts, (start, adapter), device);
    }
    if cfg.align.rounds > 1 {
        return rounds::run::<B>(&parent, &tokenizer, cfg, opts, &inputs, device);
    }

    // 2. Preference data: the user's files, or on-policy pairs from the parent.
    //    With an adapter, the policy as it starts is the parent: it samples,
    //    scores the reference and trains, sharing one copy of the frozen base.
    let policy = match adapter {
        Some(_) => Some(aligned_model::<B>(&parent, cfg, adapter.as_ref(), device)?),
        None => None,
    };
    let reference_model = match &policy {
        Some(model) => model.valid(),
        None => parent.model::<B::InnerBackend>(device)?,
    };
    let (prefs, data_refs, generated) =
        load_preferences(cfg, opts, &reference_model, &tokenizer, device)?;
    let data = AlignData::for_training(&prefs, &tokenizer, cfg, &spec)?;
    let stage = StageDir::open(&opts.out, opts.resume, opts.force, &inputs)?;
    stage.copy_from(&parent, checkpoint::TOKENIZER_FILE)?;
    stage.record_run(
        &baton_core::config::to_toml(cfg),
        &checkpoint::run_inputs(Some(&parent), &data_refs),
        opts.resume,
        opts.allow_changes,
    )?;
    if let Some(bytes) = generated {
        checkpoint::write_atomic(&stage.path(PAIRS_FILE), &bytes)?;
    }
    let mut task = AlignTask::<B>::new(data, cfg, spec, params, &tokenizer, &parent, device);

    // 3. Reference log-probs (once into a hashed cache, or online), and the
    //    parent's accuracy on the held-out tasks for before → after.
    let key = reference_key(&parent, &tokenizer, &data_refs, cfg, task.data.items.len());
    task.attach_reference(reference_model.clone(), &key, &stage.work)?;
    let parent_metrics = task.heldout.metrics(
        &reference_model,
        &tokenizer,
        cfg.eval.max_new_tokens,
        device,
    );
    drop(reference_model);
    let before = parent_metrics.get("task_accuracy").copied();
    tracing::info!("parent task accuracy {:.4}", before.unwrap_or(f64::NAN));

    // 4. Train with the loop every stage shares.
    let model = match policy {
        Some(policy) => policy,
        None => aligned_model::<B>(&parent, cfg, None, device)?,
    };
    let outcome = train_from(model, &cfg.train, &mut task, &stage.work, &start, device)?;

    // 5. The aligned checkpoint.
    let mut extra = BTreeMap::from([("pairs".to_string(), task.train_units.len() as f64)]);
    if let Some(v) = outcome.final_metrics.get("eval/rewards/accuracies") {
        extra.insert("rewards/accuracies".into(), *v);
    }
    let aligned = Aligned {
        parent: &parent,
        tokenizer: &tokenizer,
        parent_metrics,
        data_refs,
        cfg,
        adapter,
    };
    aligned.commit(stage, outcome, extra)
}

/// The model align trains: the parent, with a LoRA adapter when `[lora]`
/// asks for one or the parent holds one (see `lora::stage_model`).
fn aligned_model<B: AutodiffBackend>(
    parent: &Checkpoint,
    cfg: &AlignConfig,
    adapter: Option<&checkpoint::AdapterRef>,
    device: &B::Device,
) -> Result<baton_core::model::Llama<B>> {
    baton_core::stage_model::stage_model::<B>(parent, adapter, cfg.train.seed, device)
}

/// What an align run's checkpoint records besides the model: the parent, its
/// held-out metrics (as `parent_…`), the data and the settings.
struct Aligned<'a> {
    parent: &'a Checkpoint,
    tokenizer: &'a Tokenizer,
    parent_metrics: BTreeMap<String, f64>,
    data_refs: Vec<DataRef>,
    cfg: &'a AlignConfig,
    /// The adapter the run trained, written instead of full weights.
    adapter: Option<checkpoint::AdapterRef>,
}

impl Aligned<'_> {
    /// Writes the trained model and the manifest (the run's metrics, the
    /// parent's, and `extra`), and commits the checkpoint.
    fn commit<B: AutodiffBackend>(
        self,
        stage: StageDir,
        outcome: TrainOutcome<B>,
        extra: BTreeMap<String, f64>,
    ) -> Result<PathBuf> {
        let adapter = stage.write_trained(
            &outcome.model.valid(),
            self.adapter,
            outcome.trained.as_deref(),
            &self.parent.manifest.model,
            &self.tokenizer.special,
        )?;
        let mut metrics = outcome.manifest_metrics();
        for (k, v) in &self.parent_metrics {
            metrics.insert(format!("parent_{k}"), *v);
        }
        metrics.extend(extra);
        metrics.retain(|_, v| v.is_finite());
        let mut manifest = outcome.child_manifest(
            KIND.name,
            self.parent,
            self.tokenizer,
            self.data_refs,
            &self.cfg.train,
            metrics,
        );
        manifest.adapter = adapter;
        Ok(stage.commit(manifest)?)
    }
}

/// Align by RL with verifiable rewards (`align.method = "grpo"` or `"rloo"`):
/// the policy samples its own replies to generated task prompts.
fn run_rl<B: AutodiffBackend>(
    parent: &Checkpoint,
    tokenizer: &Tokenizer,
    cfg: &AlignConfig,
    opts: &RunOptions,
    (start, adapter): (Start, Option<checkpoint::AdapterRef>),
    device: &B::Device,
) -> Result<PathBuf> {
    if !opts.data.is_empty() {
        bail!(
            "align.method = {:?} samples its own replies from task prompts; --data is for preference pairs",
            cfg.align.method
        );
    }
    let description = format!(
        "generated task prompts {}",
        serde_json::to_string(&(&cfg.tasks, &cfg.harder, cfg.pairs.prompts))?
    );
    let data_refs = vec![DataRef {
        sha256: checkpoint::sha256_bytes(description.as_bytes()),
        source: description,
        bytes: 0,
        tokens: 0,
    }];
    let stage = StageDir::open(&opts.out, opts.resume, opts.force, &[parent.dir.as_path()])?;
    stage.copy_from(parent, checkpoint::TOKENIZER_FILE)?;
    stage.record_run(
        &baton_core::config::to_toml(cfg),
        &checkpoint::run_inputs(Some(parent), &data_refs),
        opts.resume,
        opts.allow_changes,
    )?;
    let model = aligned_model::<B>(parent, cfg, adapter.as_ref(), device)?;
    // With an adapter the reference is the policy as it starts: it shares
    // the frozen base weights (tensors are shared, not copied) and holds the
    // adapter's starting values — zero for a fresh one, i.e. the parent.
    let reference = match adapter {
        Some(_) => model.valid(),
        None => parent.model::<B::InnerBackend>(device)?,
    };
    let mut task =
        grpo::GrpoTask::<B>::new(default_pair_tasks(cfg), reference, tokenizer, cfg, device)?;
    let parent_metrics =
        task.heldout
            .metrics(&task.reference, tokenizer, cfg.eval.max_new_tokens, device);
    tracing::info!(
        "parent task accuracy {:.4}",
        parent_metrics
            .get("task_accuracy")
            .copied()
            .unwrap_or(f64::NAN)
    );
    let outcome = train_from(model, &cfg.train, &mut task, &stage.work, &start, device)?;
    // Sampling against the rest of the run (training and evaluation),
    // and batched generation's own speed.
    let extra = BTreeMap::from([
        ("sample_seconds".to_string(), task.sample_seconds),
        ("generate_seconds".to_string(), task.generate_seconds),
        // This process's (rank 0's share under `baton launch`).
        ("generate_tokens".to_string(), task.generated_tokens as f64),
        (
            "generate_tokens_per_second".to_string(),
            task.generated_tokens as f64 / task.generate_seconds.max(1e-9),
        ),
    ]);
    let aligned = Aligned {
        parent,
        tokenizer,
        parent_metrics,
        data_refs,
        cfg,
        adapter,
    };
    aligned.commit(stage, outcome, extra)
}

/// The parent checkpoint: a chat model, or — for a reference-free loss
/// (`one_stage`: ORPO, ASFT, SimPO, NLL), which aligns a base model in one
/// stage — any model; it then takes the chat template from here on.
fn open_parent(from: &Path, one_stage: bool) -> Result<Checkpoint> {
    let parent = Checkpoint::open(from, KIND.accepts)
        .with_context(|| format!("loading the parent checkpoint {}", from.display()))?;
    if parent.manifest.chat_template.is_none() && !one_stage {
        bail!(
            "{}: parent has no chat template: align starts from an sft checkpoint, or from a base model with a reference-free loss (orpo, asft, simpo, nll) in one stage",
            parent.dir.display()
        );
    }
    Ok(parent)
}

/// What the reference cache of this run is valid for.
fn reference_key(
    parent: &Checkpoint,
    tokenizer: &Tokenizer,
    data_refs: &[DataRef],
    cfg: &AlignConfig,
    items: usize,
) -> CacheKey {
    let template = chat::template(tokenizer);
    CacheKey {
        reference_manifest_sha256: parent.manifest_sha256.clone(),
        data_sha256: combined_sha(data_refs),
        tokenizer_sha256: parent.manifest.tokenizer_sha256.clone(),
        chat_template: format!("{} v{}", template.name, template.version),
        seq_len: cfg.train.seq_len,
        items,
        score_tokens: cfg.align.score_tokens,
    }
}

fn combined_sha(refs: &[DataRef]) -> String {
    let joined: Vec<&str> = refs.iter().map(|r| r.sha256.as_str()).collect();
    checkpoint::sha256_bytes(joined.join(",").as_bytes())
}
