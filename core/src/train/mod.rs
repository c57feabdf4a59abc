//! The training loop every stage shares: step-driven, gradient accumulation
//! normalised by the global count of supervised tokens, AdamW, warmup +
//! cosine/WSD, global clipping, periodic eval, `metrics.jsonl`, atomic
//! `train_state` saves and a resume that continues bit-exactly.
//!
//! A stage supplies a [`TrainTask`]: the micro-batches of each step (a pure
//! function of the step, so a resumed run sees the same data) and its
//! evaluation.

mod batch;
pub mod config;
pub mod distill;
pub mod freeze;
mod grads;

pub use batch::{Batch, document_mask, int_tensor, pack_row, packed_batch};
pub use config::TrainConfig;
pub use distill::{DistillConfig, Distiller, TeacherTargets};
pub use grads::{
    StepDevices, inference_logprobs, nll_grads, row_grads, scored_logprobs, split_grads,
    workers_for,
};

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::Digest;

use crate::checkpoint::{self, CheckpointError, TrainState};
use crate::model::Llama;
use crate::optim::{AdamW, AdamWConfig};

/// What a stage plugs into the shared loop.
pub trait TrainTask<B: AutodiffBackend> {
    /// The micro-batches of optimizer step `step` (a pure function of `step`).
    fn batches(&mut self, step: u64) -> Vec<Batch>;
    /// What the step's losses are normalised by: the weight of one micro-batch
    /// (default: its supervised tokens; a pairwise loss counts pairs).
    fn weight(&self, _micro: usize, batch: &Batch) -> f64 {
        batch.supervised_tokens()
    }
    /// The *summed* loss of micro-batch `micro` of the current step (the loop
    /// divides by the step's total weight). Default: next-token NLL.
    fn loss(
        &mut self,
        model: &Llama<B>,
        _micro: usize,
        batch: &Batch,
        device: &B::Device,
    ) -> Tensor<B, 1> {
        batch.nll_sum(model, device)
    }
    /// Whether [`TrainTask::loss`] is the default next-token NLL, a sum over
    /// rows: then a micro-batch may be split by rows among
    /// [`TrainConfig::workers`] threads ([`nll_grads`]).
    fn row_parallel(&self) -> bool {
        false
    }
    /// The summed loss of micro-batch `micro` and the gradients of that loss
    /// divided by `scale`, on up to `workers` threads. Default: [`nll_grads`]
    /// for a [`TrainTask::row_parallel`] task, else [`TrainTask::loss`] on one
    /// thread. A task whose loss couples rows can split its batch with
    /// [`split_grads`].
    fn loss_grads(
        &mut self,
        model: &Llama<B>,
        micro: usize,
        batch: &Batch,
        workers: usize,
        scale: f64,
        device: &B::Device,
    ) -> (f64, GradientsParams) {
        if self.row_parallel() {
            return nll_grads(model, batch, workers, scale, device);
        }
        let loss = self.loss(model, micro, batch, device);
        let value = loss.clone().into_scalar().elem::<f64>();
        let grads = GradientsParams::from_grads(loss.div_scalar(scale).backward(), model);
        (value, grads)
    }
    /// The learning rate of step `step`. Default: the `[train]` schedule; a
    /// stage with phases supplies its own segments.
    fn lr_at(&self, cfg: &TrainConfig, step: u64) -> f64 {
        cfg.lr_at(step)
    }
    /// The micro-batches step `step` trains on, given the model as it stands:
    /// a task may score its batches without gradients and drop examples
    /// (loss-threshold filtering). Default: all of them.
    fn select(&mut self, _model: &Llama<B>, _step: u64, batches: Vec<Batch>) -> Vec<Batch> {
        batches
    }
    /// [`TrainTask::select`] for a task that shares the work of choosing
    /// among the processes of a data-parallel run (GRPO's sampling): each
    /// does its [`Exchange::share`] and [`Exchange::sum`] gives every
    /// process the whole. Every process must return the same batches.
    /// Default: [`TrainTask::select`], each process on its own.
    fn select_shared(
        &mut self,
        model: &Llama<B>,
        step: u64,
        batches: Vec<Batch>,
        _exchange: &mut dyn Exchange,
    ) -> Result<Vec<Batch>, String> {
        Ok(self.select(model, step, batches))
    }
    /// What the task carries from step to step, saved in `train_state` so a
    /// resumed run continues exactly. Default: nothing.
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Takes back what [`TrainTask::state`] saved.
    fn restore(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
    /// Whether a run that starts anew (not resumed) evaluates once before its
    /// first step: a run that continues a trained model, so its curves start
    /// where the parent stopped. Default: no.
    fn eval_before_training(&self) -> bool {
        false
    }
    /// The sums and counts behind this process's [`TrainTask::step_metrics`]
    /// that add up over the processes of a data-parallel run (a micro-batch's
    /// reward margins live on the rank that trained it). Read after the
    /// step's passes, summed over the ranks with the gradients, and handed
    /// back through [`TrainTask::set_step_sums`] (unchanged in one process).
    /// Every process must return as many. Default: none.
    fn step_sums(&mut self) -> Vec<f64> {
        Vec::new()
    }
    /// The step's [`TrainTask::step_sums`], summed over the processes.
    fn set_step_sums(&mut self, _sums: &[f64]) {}
    /// Extra per-step metrics for `metrics.jsonl` (e.g. reward margins), read
    /// after the step's losses were computed.
    fn step_metrics(&mut self) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }
    /// Held-out metrics (`val/loss`, `val/bpb`, `task_accuracy`, …). `full` asks
    /// for the complete evaluation (end of training).
    fn evaluate(&mut self, model: &Llama<B::InnerBackend>, full: bool) -> BTreeMap<String, f64>;
}

/// What [`TrainTask::select_shared`] may ask of the other processes of a
/// data-parallel run.
pub trait Exchange {
    /// This process's contiguous share of `n` items (all of them in one
    /// process; the shares of all processes cover `0..n` once, in order).
    fn share(&self, n: usize) -> std::ops::Range<usize>;
    /// How many processes the run has (a share may be empty, or all of the
    /// items, on some of them).
    fn processes(&self) -> usize;
    /// Sums `values` over the processes, in place (nothing in one process).
    /// f32 values survive exactly when the other processes add zeros.
    fn sum(&mut self, values: &mut [f64]) -> Result<(), String>;
}

/// One process: everything here, nothing to sum.
pub struct Alone;

impl Exchange for Alone {
    fn share(&self, n: usize) -> std::ops::Range<usize> {
        0..n
    }
    fn processes(&self) -> usize {
        1
    }
    fn sum(&mut self, _values: &mut [f64]) -> Result<(), String> {
        Ok(())
    }
}

/// The training loop's [`GradSync`](crate::dist::GradSync) as an
/// [`Exchange`].
struct SyncExchange<'a, B: AutodiffBackend> {
    sync: &'a mut dyn crate::dist::GradSync<B, Llama<B>>,
    device: &'a B::Device,
}

impl<B: AutodiffBackend> Exchange for SyncExchange<'_, B> {
    fn share(&self, n: usize) -> std::ops::Range<usize> {
        self.sync.share(n)
    }
    fn processes(&self) -> usize {
        self.sync.processes()
    }
    fn sum(&mut self, values: &mut [f64]) -> Result<(), String> {
        self.sync.sum_values(values, self.device)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{path}: cannot write metrics: {reason}")]
    Metrics { path: String, reason: String },
    #[error(
        "training diverged: {count} consecutive steps with a non-finite loss or gradient (last at step {step})"
    )]
    Diverged { count: u32, step: u64 },
    #[error("{path}: {reason}")]
    Start { path: String, reason: String },
}

/// Where a run's weights, optimizer and step come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Start {
    /// The model as given, fresh optimizer moments, step 0.
    Fresh,
    /// This stage's own interrupted `train_state` (in its working directory).
    Resume,
    /// The model as given and the optimizer moments of the checkpoint at this
    /// path (its final `train_state`), from step 0 (`train.carry_optimizer`).
    CarryOptimizer(std::path::PathBuf),
    /// Weights, optimizer and step of the checkpoint at this path (its
    /// `train_state`): the run goes on from that step with its own settings
    /// (`pretrain --from-state`).
    Branch(std::path::PathBuf),
}

impl Start {
    /// How a stage that continues `parent` starts: its own state on resume,
    /// else the parent's optimizer when `train.carry_optimizer` asks for it
    /// (checked here: the parent must hold its final `train_state`), else fresh.
    pub fn for_child(
        resume: bool,
        parent: &checkpoint::Checkpoint,
        cfg: &TrainConfig,
    ) -> Result<Start, TrainError> {
        if resume {
            return Ok(Start::Resume);
        }
        if !cfg.carry_optimizer {
            return Ok(Start::Fresh);
        }
        let final_state = TrainState::peek(&parent.dir)?;
        match final_state {
            Some(s) if s.step == parent.manifest.step => {
                Ok(Start::CarryOptimizer(parent.dir.clone()))
            }
            other => Err(TrainError::Start {
                path: parent.dir.display().to_string(),
                reason: format!(
                    "train.carry_optimizer needs the parent's optimizer state at its last step ({}), but {}; train the parent with train.keep_state = true",
                    parent.manifest.step,
                    match other {
                        Some(s) => format!("its train_state is from step {}", s.step),
                        None => "it has no train_state".into(),
                    }
                ),
            }),
        }
    }
}

/// What a finished run hands back to its stage.
pub struct TrainOutcome<B: AutodiffBackend> {
    pub model: Llama<B>,
    pub step: u64,
    pub tokens_seen: u64,
    pub wall_seconds: f64,
    pub tokens_per_second: f64,
    pub skipped_steps: u64,
    /// Metrics of the final (full) evaluation.
    pub final_metrics: BTreeMap<String, f64>,
    /// The tensors that trained, when `train.freeze`/`train.train_only`
    /// left some frozen (`None`: all of them).
    pub trained: Option<Vec<String>>,
}

impl<B: AutodiffBackend> TrainOutcome<B> {
    /// The final evaluation plus the run's totals, for a manifest's `metrics`
    /// (`val_loss`, `tokens_seen`, `wall_seconds`, `tokens_per_second`, …).
    pub fn manifest_metrics(&self) -> BTreeMap<String, f64> {
        let mut metrics = self.final_metrics.clone();
        if let Some(val_loss) = metrics.get("val/loss").copied() {
            metrics.insert("val_loss".into(), val_loss);
        }
        metrics.insert("tokens_seen".into(), self.tokens_seen as f64);
        metrics.insert("wall_seconds".into(), self.wall_seconds);
        metrics.insert("tokens_per_second".into(), self.tokens_per_second);
        metrics.insert("skipped_steps".into(), self.skipped_steps as f64);
        // JSON has no NaN: a metric that could not be computed is left out.
        metrics.retain(|_, v| v.is_finite());
        metrics
    }
}

impl<B: AutodiffBackend> TrainOutcome<B> {
    /// The manifest of a stage that continued `parent` (sft, align): the
    /// parent's architecture, tokenizer and lineage, the chat template, and
    /// this run's data, config, counters and `metrics`.
    pub fn child_manifest(
        &self,
        stage: &str,
        parent: &checkpoint::Checkpoint,
        tokenizer: &crate::tokenizer::Tokenizer,
        data: Vec<checkpoint::DataRef>,
        train: &TrainConfig,
        metrics: BTreeMap<String, f64>,
    ) -> checkpoint::Manifest {
        checkpoint::Manifest {
            format_version: checkpoint::FORMAT_VERSION,
            stage: stage.to_string(),
            baton_version: crate::VERSION.to_string(),
            created_at: crate::now_rfc3339(),
            model: parent.manifest.model.clone(),
            tokenizer_sha256: parent.manifest.tokenizer_sha256.clone(),
            chat_template: Some(crate::chat::template(tokenizer)),
            parents: vec![parent.as_parent("parent")],
            data,
            train: serde_json::to_value(train).unwrap_or_default(),
            step: self.step,
            tokens_seen: self.tokens_seen,
            metrics,
            files: BTreeMap::new(),
            trained: self.trained.clone(),
            adapter: None,
        }
    }
}

/// Runs (or resumes) training in the stage's working directory `work`.
pub fn train<B: AutodiffBackend, T: TrainTask<B>>(
    model: Llama<B>,
    cfg: &TrainConfig,
    task: &mut T,
    work: &Path,
    resume: bool,
    device: &B::Device,
) -> Result<TrainOutcome<B>, TrainError> {
    let start = if resume { Start::Resume } else { Start::Fresh };
    train_from(model, cfg, task, work, &start, device)
}

/// [`train`] from a given [`Start`].
pub fn train_from<B: AutodiffBackend, T: TrainTask<B>>(
    model: Llama<B>,
    cfg: &TrainConfig,
    task: &mut T,
    work: &Path,
    start: &Start,
    device: &B::Device,
) -> Result<TrainOutcome<B>, TrainError> {
    let mut model = model;
    let mut optim = AdamW::<B::InnerBackend>::new(AdamWConfig {
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
    });
    let mut state = TrainState::default();
    let resume = *start == Start::Resume;
    // Rank 0 (or the only process) writes metrics and train_state; in a
    // data-parallel run every rank reads rank 0's train_state on resume.
    let leader = crate::dist::is_leader();
    match start {
        Start::Fresh => {}
        Start::Resume => {
            let dir = crate::dist::state_dir(work);
            (state, model) = TrainState::load(&dir, model, &mut optim, device)?;
            tracing::info!("resuming at step {} of {}", state.step, cfg.steps);
        }
        Start::CarryOptimizer(dir) => {
            let (_, carried) = TrainState::load(dir, model, &mut optim, device)?;
            model = carried;
            tracing::info!("optimizer moments carried over from {}", dir.display());
        }
        Start::Branch(dir) => {
            (state, model) = TrainState::load(dir, model, &mut optim, device)?;
            if state.step >= cfg.steps {
                return Err(TrainError::Start {
                    path: dir.display().to_string(),
                    reason: format!(
                        "its train_state is at step {}, not before train.steps ({}): nothing to train",
                        state.step, cfg.steps
                    ),
                });
            }
            state.bad_in_a_row = 0;
            tracing::info!(
                "branching at step {} of {} from {}",
                state.step,
                cfg.steps,
                dir.display()
            );
        }
    }
    let trained = freeze::trained_set(cfg, &freeze::param_names(&model)).map_err(|reason| {
        TrainError::Start {
            path: work.display().to_string(),
            reason,
        }
    })?;
    if let Some(trained) = &trained {
        model = freeze::apply(model, trained);
        optim.retain(|name| trained.contains(name));
        let total = freeze::param_names(&model).len();
        tracing::info!(
            "training {} of {total} tensors ({} frozen by train.freeze/train.train_only)",
            trained.len(),
            total - trained.len()
        );
    }
    if resume || matches!(start, Start::Branch(_)) {
        task.restore(&state.task)
            .map_err(|reason| TrainError::Start {
                path: work.display().to_string(),
                reason,
            })?;
    }
    let start_err = |reason: String| TrainError::Start {
        path: work.display().to_string(),
        reason,
    };
    let _devices = enter_devices::<B>(cfg, device).map_err(start_err)?;
    grads::weights_changed();
    let mut sync = crate::dist::grad_sync::<B, Llama<B>>().map_err(start_err)?;
    let weights = checkpoint::model_bytes(&model.valid())
        .map(|b| sha2::Sha256::digest(&b).to_vec())
        .unwrap_or_default();
    sync.check_same("the model's initial weights", &weights, device)
        .map_err(start_err)?;
    let mut metrics = match leader {
        true => Some(MetricsLog::open(
            &work.join("metrics.jsonl"),
            resume.then_some(state.step),
        )?),
        false => None,
    };

    let started = Instant::now();
    let wall_before = state.wall_seconds;
    let tokens_before = state.tokens_seen;
    let bar = match leader {
        true => progress_bar(cfg.steps, state.step),
        false => ProgressBar::hidden(),
    };
    // GPU backends compile and autotune their kernels during the first steps
    // of a process: minutes on an H200 with empty caches (bench/README.md).
    let gpu = crate::backend::is_gpu::<B>();
    let workers = workers_for::<B>(cfg, device);
    if gpu {
        bar.suspend(|| {
            tracing::info!(
                "the first step compiles and autotunes GPU kernels: minutes when their on-disk caches are empty"
            )
        });
    }
    let first_step = state.step + 1;
    let mut last_eval = BTreeMap::new();
    // A grown model's masks follow the step (`model::Growth`): m = 0 for the
    // evaluation before training, then min(1, step / ramp_steps).
    model.set_growth_step(state.step);
    if !resume
        && task.eval_before_training()
        && let Some(metrics) = &mut metrics
    {
        evaluate(task, &model, &state, false, metrics, &bar)?;
    }
    while state.step < cfg.steps {
        let step = state.step;
        let lr = task.lr_at(cfg, step);
        let mask = model.growth.as_ref().map(|g| g.mask());
        let (loss, tokens, grads) =
            step_grads(task, &model, step, cfg.seed, workers, &mut *sync, device)
                .map_err(start_err)?;
        let grad_norm = crate::optim::global_grad_norm(&model, &grads);
        state.step += 1;
        state.tokens_seen += tokens;
        if !loss.is_finite() || !grad_norm.is_finite() {
            state.skipped_steps += 1;
            state.bad_in_a_row += 1;
            tracing::warn!(
                "step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); step skipped"
            );
            if state.bad_in_a_row >= cfg.max_bad_steps {
                return Err(TrainError::Diverged {
                    count: state.bad_in_a_row,
                    step,
                });
            }
        } else {
            state.bad_in_a_row = 0;
            model = optim.step::<B, _>(model, grads, lr, grad_norm, cfg.grad_clip);
            grads::weights_changed();
        }

        model.set_growth_step(state.step);
        crate::files::fault_point(&format!("step-{}", state.step));
        let elapsed = started.elapsed().as_secs_f64();
        if gpu && state.step == first_step {
            bar.suspend(|| tracing::info!("step {}: first step took {elapsed:.1} s", state.step));
        }
        let tok_per_s = (state.tokens_seen - tokens_before) as f64 / elapsed.max(1e-9);
        bar.set_position(state.step);
        bar.set_message(format!("loss {loss:.4} · {tok_per_s:.0} tok/s"));
        let done = state.step == cfg.steps;
        let extra = task.step_metrics();
        let Some(metrics) = &mut metrics else {
            continue;
        };
        if state.step.is_multiple_of(cfg.log_every) || done {
            let mut line = serde_json::json!({
                "step": state.step,
                "train/loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_seen": state.tokens_seen,
                "tok_per_s": tok_per_s,
                "elapsed_seconds": wall_before + elapsed,
            });
            for (k, v) in &extra {
                line[k] = serde_json::json!(v);
            }
            if let Some(mask) = mask {
                line["grow/mask"] = serde_json::json!(mask);
            }
            for (k, v) in model.balance.iter().flat_map(|b| b.take_metrics()) {
                line[k] = serde_json::json!(v);
            }
            if let Some(seconds) = sync.last_seconds() {
                line["allreduce_seconds"] = serde_json::json!(seconds);
            }
            metrics.write(&line)?;
        }
        if done || (cfg.eval_every > 0 && state.step.is_multiple_of(cfg.eval_every)) {
            last_eval = evaluate(task, &model, &state, done, metrics, &bar)?;
        }
        let periodic = cfg.save_every > 0 && state.step.is_multiple_of(cfg.save_every);
        if (periodic && !done) || (done && cfg.keep_state) {
            state.wall_seconds = wall_before + started.elapsed().as_secs_f64();
            state.task = task.state();
            state.save(work, &model, &optim)?;
        }
    }
    bar.finish_and_clear();
    crate::dist::finish();
    let wall_seconds = wall_before + started.elapsed().as_secs_f64();
    state.wall_seconds = wall_seconds;
    if leader && resume && state.step == cfg.steps && last_eval.is_empty() {
        // Resumed at the very end: the final evaluation still has to run.
        last_eval = task.evaluate(&model.valid(), true);
    }
    Ok(TrainOutcome {
        model,
        step: state.step,
        tokens_seen: state.tokens_seen,
        wall_seconds,
        tokens_per_second: state.tokens_seen as f64 / wall_seconds.max(1e-9),
        skipped_steps: state.skipped_steps,
        final_metrics: last_eval,
        trained: trained.map(|t| t.into_iter().collect()),
    })
}

/// `train.devices` > 1: the GPUs this thread's training passes split rows
/// among from now on (see [`StepDevices`]); `device`, the model's, must be
/// the first.
fn enter_devices<B: AutodiffBackend>(
    cfg: &TrainConfig,
    device: &B::Device,
) -> Result<Option<StepDevices>, String> {
    if cfg.devices <= 1 {
        return Ok(None);
    }
    let devices = crate::backend::step_devices(cfg.devices).map_err(|e| e.0)?;
    let first = format!("{:?}", devices[0]);
    if !crate::backend::is_gpu::<B>() || format!("{device:?}") != first {
        return Err(format!(
            "train.devices = {}: the model must train on the GPU backend's device {first}, not {device:?}",
            cfg.devices
        ));
    }
    tracing::info!(
        "train.devices = {}: each micro-batch's rows are split among GPUs {first} to {:?}; NCCL sums their gradients",
        cfg.devices,
        devices[cfg.devices - 1]
    );
    Ok(Some(StepDevices::enter(devices)))
}

/// One step's summed gradients over its micro-batches, the loss normalised by
/// the step's total weight (the global count of supervised tokens), and the
/// tokens it saw. In a data-parallel run every rank draws the step's
/// micro-batches, computes its share of them, and `sync` sums the gradients
/// (and losses) over the ranks.
fn step_grads<B: AutodiffBackend, T: TrainTask<B>>(
    task: &mut T,
    model: &Llama<B>,
    step: u64,
    seed: u64,
    workers: usize,
    sync: &mut dyn crate::dist::GradSync<B, Llama<B>>,
    device: &B::Device,
) -> Result<(f64, u64, GradientsParams), String> {
    let batches = task.batches(step);
    let batches = task.select_shared(
        model,
        step,
        batches,
        &mut SyncExchange {
            sync: &mut *sync,
            device,
        },
    )?;
    let total_weight: f64 = batches
        .iter()
        .enumerate()
        .map(|(micro, batch)| task.weight(micro, batch))
        .sum::<f64>()
        .max(1.0);
    let tokens = batches.iter().map(Batch::tokens).sum();
    let mut accumulator = GradientsAccumulator::<Llama<B>>::new();
    let mut nll_total = 0.0;
    let share = sync.share(batches.len());
    if let Some(balance) = &model.balance
        && prepass_routing(
            balance,
            model,
            &batches,
            share.clone(),
            grads::row_ways::<B>(workers),
            device,
        )
        && balance.settings().balance == crate::moe::BalanceScope::Global
    {
        // Data-parallel: the global count is over every rank's micro-batches.
        let (layers, mut counts) = balance.step_counts();
        sync.sum_values(&mut counts, device)?;
        balance.set_step_counts(layers, counts);
    }
    for micro in share {
        if let Some(balance) = &model.balance {
            balance.set_micro(micro);
        }
        let batch = &batches[micro];
        // Adapter dropout masks: a pure function of (seed, step, micro-batch).
        let masks = crate::dropout::mix_seed(seed, &[step, micro as u64]);
        let (nll, grads) = crate::dropout::with_dropout(masks, || {
            task.loss_grads(model, micro, batch, workers, total_weight, device)
        });
        nll_total += nll;
        accumulator.accumulate(model, grads);
    }
    let mut extra = vec![nll_total];
    extra.extend(task.step_sums());
    let grads = sync.all_reduce(model, accumulator.grads(), &mut extra, device)?;
    task.set_step_sums(&extra[1..]);
    Ok((extra[0] / total_weight, tokens, grads))
}

/// An MoE model's routing of the step's micro-batches, counted without
/// gradients before the training passes when the balancing loss needs
/// counts its own pass cannot see (see [`crate::moe::Balance`]). Returns
/// whether it ran.
fn prepass_routing<B: AutodiffBackend>(
    balance: &crate::moe::Balance,
    model: &Llama<B>,
    batches: &[Batch],
    share: std::ops::Range<usize>,
    workers: usize,
    device: &B::Device,
) -> bool {
    let rows = batches.iter().map(|b| b.batch).max().unwrap_or(0);
    if !balance.needs_prepass(workers, rows) {
        balance.clear_prepass();
        return false;
    }
    let inner = model.valid();
    balance.begin_prepass(batches.len());
    for micro in share {
        balance.set_micro(micro);
        // The rows split among the workers as the training passes split
        // them: counts add up, so the parts' order does not matter.
        let parts = batches[micro].split_rows(workers);
        rayon::scope(|scope| {
            for part in &parts {
                let inner = &inner;
                scope.spawn(move |_| part.route(inner, device));
            }
        });
    }
    balance.end_prepass();
    true
}

/// Runs the task's evaluation, appends it to `metrics.jsonl` and logs it.
fn evaluate<B: AutodiffBackend, T: TrainTask<B>>(
    task: &mut T,
    model: &Llama<B>,
    state: &TrainState,
    done: bool,
    metrics: &mut MetricsLog,
    bar: &ProgressBar,
) -> Result<BTreeMap<String, f64>, TrainError> {
    let eval = task.evaluate(&model.valid(), done);
    let mut line = serde_json::json!({"step": state.step, "tokens_seen": state.tokens_seen});
    let summary: Vec<String> = eval.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
    for (k, v) in &eval {
        line[k] = serde_json::json!(v);
    }
    metrics.write(&line)?;
    bar.suspend(|| tracing::info!("step {}: {}", state.step, summary.join(" · ")));
    Ok(eval)
}

fn progress_bar(total: u64, position: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(position);
    bar
}

/// `metrics.jsonl`, appended line by line and flushed. On resume, lines past the
/// resumed step (written after the last save) are dropped so the file reads as
/// if the run had never stopped.
struct MetricsLog {
    path: String,
    file: fs::File,
}

impl MetricsLog {
    fn open(path: &Path, resume_step: Option<u64>) -> Result<Self, TrainError> {
        let err = |e: std::io::Error| TrainError::Metrics {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        if let Some(step) = resume_step {
            let kept: Vec<String> = fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .filter(|line| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            fs::write(path, kept.concat()).map_err(err)?;
        }
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        Ok(Self {
            path: path.display().to_string(),
            file,
        })
    }

    fn write(&mut self, value: &serde_json::Value) -> Result<(), TrainError> {
        writeln!(self.file, "{value}")
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::Metrics {
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Inner, Train};
    use crate::model::ModelConfig;
    use burn::tensor::TensorData;

    /// Serves fixed micro-batches: the same rows, split differently.
    struct Fixed {
        micro: Vec<Batch>,
    }

    impl TrainTask<Train> for Fixed {
        fn batches(&mut self, _step: u64) -> Vec<Batch> {
            self.micro.clone()
        }
        fn evaluate(&mut self, _model: &Llama<Inner>, _full: bool) -> BTreeMap<String, f64> {
            BTreeMap::new()
        }
    }

    /// [`Fixed`] with the NLL split by rows among `train.workers` threads.
    struct RowParallel(Fixed);

    impl TrainTask<Train> for RowParallel {
        fn batches(&mut self, step: u64) -> Vec<Batch> {
            self.0.batches(step)
        }
        fn row_parallel(&self) -> bool {
            true
        }
        fn evaluate(&mut self, _model: &Llama<Inner>, _full: bool) -> BTreeMap<String, f64> {
            BTreeMap::new()
        }
    }

    fn config() -> (ModelConfig, TrainConfig) {
        let model = ModelConfig {
            vocab_size: 30,
            d_model: 16,
            n_layers: 1,
            n_heads: 2,
            n_kv_heads: 2,
            d_ff: 24,
            max_seq_len: 8,
            ..ModelConfig::default()
        };
        let train = TrainConfig {
            steps: 2,
            warmup_steps: 0,
            eval_every: 0,
            save_every: 0,
            log_every: 1,
            ..TrainConfig::default()
        };
        (model, train)
    }

    fn rows(n: usize, seq: usize, offset: u32) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
        let inputs: Vec<u32> = (0..n * seq).map(|i| (i as u32 * 7 + offset) % 30).collect();
        let targets: Vec<u32> = (0..n * seq)
            .map(|i| (i as u32 * 11 + offset) % 30)
            .collect();
        // Uneven supervision: the global token count, not the per-batch one, must normalise.
        let weights: Vec<f32> = (0..n * seq)
            .map(|i| if i % 3 == 0 { 0.0 } else { 1.0 })
            .collect();
        (inputs, targets, weights)
    }

    fn batch(inputs: &[u32], targets: &[u32], weights: &[f32], n: usize, seq: usize) -> Batch {
        Batch {
            batch: n,
            seq,
            inputs: inputs.to_vec(),
            targets: targets.to_vec(),
            weights: weights.to_vec(),
            positions: None,
            doc_ids: None,
        }
    }

    #[test]
    fn accumulation_does_not_change_the_update() {
        let (model_cfg, train_cfg) = config();
        let device = Default::default();
        let seq = 6;
        let (i, t, w) = rows(4, seq, 3);
        // Rows 0-2 carry 12 supervised tokens; row 3 carries 4: halves differ.
        let mut w = w;
        for x in &mut w[3 * seq..3 * seq + 2] {
            *x = 0.0;
        }
        let whole = vec![batch(&i, &t, &w, 4, seq)];
        let split_at = 3 * seq;
        let parts = vec![
            batch(&i[..split_at], &t[..split_at], &w[..split_at], 3, seq),
            batch(&i[split_at..], &t[split_at..], &w[split_at..], 1, seq),
        ];
        let run = |micro: Vec<Batch>, dir: &Path| {
            let model = model_cfg.init::<Train>(9, &device);
            let out = train(model, &train_cfg, &mut Fixed { micro }, dir, false, &device).unwrap();
            crate::checkpoint::named_tensors(&out.model.valid())
        };
        let tmp_a = tempfile::tempdir().unwrap();
        let tmp_b = tempfile::tempdir().unwrap();
        let a = run(whole, tmp_a.path());
        let b = run(parts, tmp_b.path());
        let max_diff = max_weight_diff(&a, &b);
        assert!(max_diff < 1e-5, "accumulated update differs by {max_diff}");
    }

    fn max_weight_diff(
        a: &[(String, burn::tensor::TensorData)],
        b: &[(String, burn::tensor::TensorData)],
    ) -> f32 {
        let mut max_diff = 0f32;
        for ((name_a, x), (name_b, y)) in a.iter().zip(b) {
            assert_eq!(name_a, name_b);
            let x: Vec<f32> = x.to_vec().unwrap();
            let y: Vec<f32> = y.to_vec().unwrap();
            for (p, q) in x.iter().zip(&y) {
                max_diff = max_diff.max((p - q).abs());
            }
        }
        max_diff
    }

    #[test]
    fn rows_split_among_workers_give_the_same_update() {
        let (model_cfg, train_cfg) = config();
        let device = Default::default();
        let seq = 6;
        let (i, t, w) = rows(5, seq, 5);
        // Two micro-batches a step: under StepDevices the second reuses the
        // first's copies of the weights, and the next step copies anew.
        let (i2, t2, w2) = rows(4, seq, 6);
        let run = |workers: usize, dir: &Path| {
            let model = model_cfg.init::<Train>(4, &device);
            let cfg = TrainConfig {
                workers,
                ..train_cfg.clone()
            };
            let mut task = RowParallel(Fixed {
                micro: vec![batch(&i, &t, &w, 5, seq), batch(&i2, &t2, &w2, 4, seq)],
            });
            let out = train(model, &cfg, &mut task, dir, false, &device).unwrap();
            crate::checkpoint::named_tensors(&out.model.valid())
        };
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let one = run(1, dirs[0].path());
        let three = run(3, dirs[1].path());
        // Two steps at lr 3e-3 move weights by ~1e-2: a missing part's gradient would show.
        let moved = max_weight_diff(
            &one,
            &crate::checkpoint::named_tensors(&model_cfg.init::<Train>(4, &device).valid()),
        );
        assert!(moved > 1e-3, "training did not move the weights ({moved})");
        let diff = max_weight_diff(&one, &three);
        assert!(diff < 1e-5, "3 workers differ from 1 by {diff}");
        // Scheduling does not matter: the same split gives the same bytes.
        assert_eq!(three, run(3, dirs[2].path()));
        // The same three parts as `train.devices` would run them: each on a
        // copy of the weights "on its device" (the CPU named three times),
        // gradients moved to the first and added in part order.
        let dir = tempfile::tempdir().unwrap();
        let on_devices = {
            let _devices = StepDevices::enter(named(&device, 3));
            run(1, dir.path())
        };
        assert_eq!(three, on_devices);
        // More than one device needs a CUDA build with NCCL: refused here,
        // in one line that names the setting.
        let cfg = TrainConfig {
            devices: 2,
            ..train_cfg.clone()
        };
        let mut task = RowParallel(Fixed {
            micro: vec![batch(&i, &t, &w, 5, seq)],
        });
        let model = model_cfg.init::<Train>(4, &device);
        let dir = tempfile::tempdir().unwrap();
        let err = train(model, &cfg, &mut task, dir.path(), false, &device)
            .err()
            .expect("train.devices = 2 on the CPU")
            .to_string();
        assert!(
            err.contains("train.devices = 2") && err.contains("nccl") && !err.contains('\n'),
            "{err}"
        );
    }

    /// `device` named `n` times (a CUDA device is not `Copy`).
    fn named<D: Clone>(device: &D, n: usize) -> Vec<D> {
        vec![device.clone(); n]
    }

    #[test]
    fn split_grads_equal_the_gradients_of_the_whole_batch() {
        let (model_cfg, _) = config();
        let device = Default::default();
        let seq = 6;
        let (i, t, w) = rows(5, seq, 7);
        let whole = batch(&i, &t, &w, 5, seq);
        let model = model_cfg.init::<Train>(4, &device);
        // Per-row summed log-probs, and a loss that couples neighbouring rows
        // (as a preference loss couples a pair's replies across rows).
        let row_logps = |model: &Llama<Train>, part: &Batch| -> Tensor<Train, 1> {
            let device = model.device();
            let weights = Tensor::<Train, 2>::from_data(
                TensorData::new(part.weights.clone(), [part.batch, part.seq]),
                &device,
            );
            let lp = part.token_logprobs(model, &device).mul(weights).sum_dim(1);
            lp.reshape([part.batch])
        };
        let coupled = |y: Tensor<Train, 1>| -> Tensor<Train, 1> {
            let n = y.dims()[0];
            let gap = y.clone().narrow(0, 0, n - 1) - y.narrow(0, 1, n - 1).mul_scalar(0.5);
            burn::tensor::activation::softplus(gap, 1.0).sum()
        };
        let scale = 3.0;
        let loss = coupled(row_logps(&model, &whole));
        let expected_value = loss.clone().into_scalar().elem::<f64>();
        let expected = crate::optim::grad_values(
            &model,
            &GradientsParams::from_grads(loss.div_scalar(scale).backward(), &model),
        );
        let norm: f32 = expected.iter().map(|g| g * g).sum::<f32>().sqrt();
        assert!(norm > 1e-3, "the loss has no gradient ({norm})");
        // Three workers, then three "devices" (the CPU named three times):
        // the latter's parts run on copies of the weights.
        for (workers, devices) in [(1, 1), (2, 1), (3, 1), (1, 3)] {
            let _devices = StepDevices::enter(named(&device, devices));
            let (value, grads, rows_seen) = split_grads(
                &model,
                &whole,
                workers,
                scale,
                &device,
                |model, part, _| row_logps(model, part),
                |y| {
                    let n = y.dims()[0];
                    (coupled(y), n)
                },
            );
            assert_eq!(rows_seen, 5);
            assert!(
                (value - expected_value).abs() < 1e-5 * expected_value.abs().max(1.0),
                "{workers} workers, {devices} devices: loss {value} vs {expected_value}"
            );
            let got = crate::optim::grad_values(&model, &grads);
            let diff = crate::optim::max_abs_diff(&got, &expected).expect("same parameters");
            assert!(
                diff < 1e-5 * norm.max(1.0),
                "{workers} workers, {devices} devices: gradients differ by {diff}"
            );
        }
    }

    #[test]
    fn split_rows_covers_every_row_once() {
        let (i, t, w) = rows(5, 4, 1);
        let mut b = batch(&i, &t, &w, 5, 4);
        b.positions = Some((0..20).collect());
        let parts = b.split_rows(3);
        assert_eq!(
            parts.iter().map(|p| p.batch).collect::<Vec<_>>(),
            vec![2, 2, 1]
        );
        let joined: Vec<u32> = parts.iter().flat_map(|p| p.inputs.clone()).collect();
        assert_eq!(joined, b.inputs);
        let positions: Vec<u32> = parts
            .iter()
            .flat_map(|p| p.positions.clone().unwrap())
            .collect();
        assert_eq!(positions, (0..20).collect::<Vec<u32>>());
        assert_eq!(b.split_rows(9).len(), 5);
    }

    #[test]
    fn inference_logprobs_split_among_workers_match_one_pass() {
        let (model_cfg, _) = config();
        let device = Default::default();
        let model = model_cfg.init::<Inner>(4, &device);
        let (i, t, w) = rows(5, 6, 2);
        let b = batch(&i, &t, &w, 5, 6);
        let one = inference_logprobs(&model, &b, 1, &device);
        assert_eq!(one.len(), 5 * 6);
        assert!(one.iter().all(|&x| x.is_finite() && x < 0.0), "{one:?}");
        for workers in [2, 3] {
            let split = inference_logprobs(&model, &b, workers, &device);
            let diff = one
                .iter()
                .zip(&split)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{workers} workers: log-probs differ by {diff}");
        }
    }

    #[test]
    fn non_finite_steps_are_skipped_then_training_stops() {
        let (model_cfg, mut train_cfg) = config();
        train_cfg.steps = 10;
        train_cfg.max_bad_steps = 3;
        let device = Default::default();
        let (i, t, mut w) = rows(2, 4, 1);
        w[0] = f32::NAN;
        let tmp = tempfile::tempdir().unwrap();
        let model = model_cfg.init::<Train>(1, &device);
        let micro = vec![batch(&i, &t, &w, 2, 4)];
        let err = train(
            model,
            &train_cfg,
            &mut Fixed { micro },
            tmp.path(),
            false,
            &device,
        )
        .err()
        .unwrap();
        assert!(
            matches!(err, TrainError::Diverged { count: 3, step: 2 }),
            "{err}"
        );
    }

    /// Serves its own micro-batches for each step.
    struct Script(Vec<Vec<Batch>>);

    impl TrainTask<Train> for Script {
        fn batches(&mut self, step: u64) -> Vec<Batch> {
            self.0[step as usize].clone()
        }
        fn evaluate(&mut self, _model: &Llama<Inner>, _full: bool) -> BTreeMap<String, f64> {
            BTreeMap::new()
        }
    }

    #[test]
    fn a_skipped_step_leaves_the_weights_and_adamw_state_untouched() {
        let (model_cfg, mut train_cfg) = config();
        // A constant learning rate, so only AdamW's own state differs by step.
        train_cfg.min_lr_ratio = 1.0;
        train_cfg.max_bad_steps = 3;
        let device = Default::default();
        let (i, t, w) = rows(2, 4, 1);
        let mut nan = w.clone();
        nan[0] = f32::NAN;
        let good = || vec![batch(&i, &t, &w, 2, 4)];
        let bad = || vec![batch(&i, &t, &nan, 2, 4)];
        let run = |steps: u64, script: Vec<Vec<Batch>>| {
            let tmp = tempfile::tempdir().unwrap();
            let cfg = TrainConfig {
                steps,
                ..train_cfg.clone()
            };
            let model = model_cfg.init::<Train>(4, &device);
            let out = train(model, &cfg, &mut Script(script), tmp.path(), false, &device).unwrap();
            (
                crate::checkpoint::model_bytes(&out.model.valid()).unwrap(),
                out.skipped_steps,
            )
        };
        let init = crate::checkpoint::model_bytes(&model_cfg.init::<Inner>(4, &device)).unwrap();
        // One bad step: the weights are the initial ones, byte for byte.
        let (after_bad, skipped) = run(1, vec![bad()]);
        assert_eq!(skipped, 1);
        assert!(after_bad == init, "a skipped step changed the weights");
        // Bad then good equals good alone: the skipped step left AdamW's moments
        // and its step count (bias correction) as they were.
        let (bad_then_good, _) = run(2, vec![bad(), good()]);
        let (good_only, skipped) = run(1, vec![good()]);
        assert_eq!(skipped, 0);
        assert!(good_only != init);
        assert!(
            bad_then_good == good_only,
            "the step after a skipped one differs from a first step"
        );
    }

    #[test]
    fn the_loop_overfits_a_fixed_batch() {
        let (model_cfg, mut train_cfg) = config();
        train_cfg.steps = 40;
        train_cfg.lr = 1e-2;
        train_cfg.log_every = 1;
        let device = Default::default();
        let (i, t, w) = rows(2, 6, 5);
        let tmp = tempfile::tempdir().unwrap();
        let model = model_cfg.init::<Train>(2, &device);
        let micro = vec![batch(&i, &t, &w, 2, 6)];
        train(
            model,
            &train_cfg,
            &mut Fixed { micro },
            tmp.path(),
            false,
            &device,
        )
        .unwrap();
        let losses: Vec<f64> = fs::read_to_string(tmp.path().join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["train/loss"].as_f64())
            .collect();
        assert_eq!(losses.len(), 40);
        assert!(
            losses[39] < 0.2 * losses[0],
            "loss {} → {}",
            losses[0],
            losses[39]
        );
    }
}
