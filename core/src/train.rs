//! The training loop every stage shares: step-driven, gradient accumulation
//! normalised by the global count of supervised tokens, AdamW, warmup +
//! cosine/WSD, global clipping, periodic eval, `metrics.jsonl`, atomic
//! `train_state` saves and a resume that continues bit-exactly.
//!
//! A stage supplies a [`TrainTask`]: the micro-batches of each step (a pure
//! function of the step, so a resumed run sees the same data) and its
//! evaluation.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::chat::Rendered;
use crate::checkpoint::{self, CheckpointError};
use crate::model::{AttentionMask, Llama, Positions, token_logprobs};
use crate::optim::{AdamW, AdamWConfig, Schedule, learning_rate};

/// Training knobs shared by every stage (`[train]` in a stage config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Tokens per training sequence.
    pub seq_len: usize,
    pub lr: f64,
    /// Final learning rate as a fraction of `lr`.
    pub min_lr_ratio: f64,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    /// Share of the steps spent decaying (warmup-stable-decay only).
    pub decay_fraction: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables.
    pub grad_clip: f64,
    /// Evaluate every N steps (and always at the end); 0 = only at the end.
    pub eval_every: u64,
    /// Validation tokens for periodic evals (the final eval uses all); 0 = all.
    pub eval_tokens: usize,
    /// Save `train_state` every N steps; 0 = never.
    pub save_every: u64,
    /// Write a `metrics.jsonl` line every N steps.
    pub log_every: u64,
    pub seed: u64,
    /// Stop after this many consecutive steps with a NaN/inf loss or gradient.
    pub max_bad_steps: u32,
    /// Threads that share each micro-batch on CPU backends: its rows are
    /// split among them, each runs forward and backward on its part, and the
    /// gradients are summed in a fixed order (so results do not depend on
    /// scheduling). 1 = one thread; GPU backends always use one.
    pub workers: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 440,
            batch_size: 16,
            grad_accum: 1,
            seq_len: 128,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 30,
            schedule: Schedule::Cosine,
            decay_fraction: 0.2,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            eval_every: 100,
            eval_tokens: 8192,
            save_every: 100,
            log_every: 10,
            seed: 1337,
            max_bad_steps: 5,
            workers: 2,
        }
    }
}

impl TrainConfig {
    /// Checks value ranges; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let finite_non_negative = |v: f64| v.is_finite() && v >= 0.0;
        let checks = [
            ("train.steps must be positive", self.steps > 0),
            ("train.batch_size must be positive", self.batch_size > 0),
            ("train.grad_accum must be positive", self.grad_accum > 0),
            ("train.seq_len must be at least 2", self.seq_len >= 2),
            (
                "train.batch_size × train.seq_len must be at most 2^22 tokens per micro-batch",
                self.batch_size.saturating_mul(self.seq_len) <= 1 << 22,
            ),
            ("train.steps must be at most 2^40", self.steps <= 1 << 40),
            (
                "train.grad_accum must be at most 65536",
                self.grad_accum <= 1 << 16,
            ),
            ("train.workers must be at most 1024", self.workers <= 1024),
            (
                "train.lr must be positive and finite",
                self.lr > 0.0 && self.lr.is_finite(),
            ),
            (
                "train.weight_decay must be a finite number ≥ 0",
                finite_non_negative(self.weight_decay),
            ),
            (
                "train.grad_clip must be a finite number ≥ 0 (0 disables clipping)",
                finite_non_negative(self.grad_clip),
            ),
            (
                "train.eps must be positive and finite",
                self.eps > 0.0 && self.eps.is_finite(),
            ),
            (
                "train.min_lr_ratio must be in [0, 1]",
                (0.0..=1.0).contains(&self.min_lr_ratio),
            ),
            (
                "train.decay_fraction must be in [0, 1]",
                (0.0..=1.0).contains(&self.decay_fraction),
            ),
            (
                "train.beta1 and train.beta2 must be in [0, 1)",
                (0.0..1.0).contains(&self.beta1) && (0.0..1.0).contains(&self.beta2),
            ),
            ("train.log_every must be positive", self.log_every > 0),
            (
                "train.max_bad_steps must be positive",
                self.max_bad_steps > 0,
            ),
            ("train.workers must be positive", self.workers > 0),
        ];
        match checks.iter().find(|(_, ok)| !ok) {
            Some((message, _)) => Err(message.to_string()),
            None => Ok(()),
        }
    }

    fn lr_at(&self, step: u64) -> f64 {
        learning_rate(
            self.schedule,
            self.lr,
            self.min_lr_ratio,
            self.warmup_steps,
            self.decay_fraction,
            step,
            self.steps,
        )
    }
}

/// One micro-batch, host-side: `batch × seq` token ids, next-token targets and
/// per-position loss weights (1 = supervised). `positions`/`doc_ids` describe
/// packed documents; when absent, each row is one causal sequence from 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
    pub positions: Option<Vec<u32>>,
    pub doc_ids: Option<Vec<u32>>,
}

impl Batch {
    /// A plain language-modelling batch: every position supervised.
    pub fn dense(batch: usize, seq: usize, inputs: Vec<u32>, targets: Vec<u32>) -> Self {
        Self {
            batch,
            seq,
            weights: vec![1.0; inputs.len()],
            inputs,
            targets,
            positions: None,
            doc_ids: None,
        }
    }

    /// Real (non-padding) tokens: those in a document when the batch is packed.
    pub fn tokens(&self) -> u64 {
        match &self.doc_ids {
            Some(docs) => {
                let mut n = 0;
                for row in docs.chunks(self.seq) {
                    // Padding positions carry ids counting down from u32::MAX.
                    n += row.iter().filter(|&&d| d < u32::MAX / 2).count() as u64;
                }
                n
            }
            None => self.inputs.len() as u64,
        }
    }

    /// The rows split into `parts` consecutive groups (sizes differ by at
    /// most one; no group is empty, so fewer than `parts` when rows are few).
    pub fn split_rows(&self, parts: usize) -> Vec<Batch> {
        let parts = parts.clamp(1, self.batch.max(1));
        let per_row =
            |v: &[u32], from: usize, to: usize| v[from * self.seq..to * self.seq].to_vec();
        let mut out = Vec::with_capacity(parts);
        let mut from = 0;
        for i in 0..parts {
            let to = from + self.batch / parts + usize::from(i < self.batch % parts);
            out.push(Batch {
                batch: to - from,
                seq: self.seq,
                inputs: per_row(&self.inputs, from, to),
                targets: per_row(&self.targets, from, to),
                weights: self.weights[from * self.seq..to * self.seq].to_vec(),
                positions: self.positions.as_ref().map(|p| per_row(p, from, to)),
                doc_ids: self.doc_ids.as_ref().map(|d| per_row(d, from, to)),
            });
            from = to;
        }
        out
    }

    pub fn supervised_tokens(&self) -> f64 {
        self.weights.iter().map(|&w| w as f64).sum()
    }

    /// Summed NLL over the supervised positions (a scalar tensor).
    pub fn nll_sum<B: Backend>(&self, model: &Llama<B>, device: &B::Device) -> Tensor<B, 1> {
        let weights = Tensor::<B, 2>::from_data(
            TensorData::new(self.weights.clone(), [self.batch, self.seq]),
            device,
        );
        self.token_logprobs(model, device).mul(weights).sum().neg()
    }

    /// Log-probability of every target, `[batch, seq]` (padding included:
    /// weight it out).
    pub fn token_logprobs<B: Backend>(&self, model: &Llama<B>, device: &B::Device) -> Tensor<B, 2> {
        let ids = int_tensor::<B>(&self.inputs, self.batch, self.seq, device);
        let targets = int_tensor::<B>(&self.targets, self.batch, self.seq, device);
        let positions = match &self.positions {
            Some(p) => Positions::PerToken(int_tensor::<B>(p, self.batch, self.seq, device)),
            None => Positions::Contiguous {
                start: 0,
                len: self.seq,
            },
        };
        let mask = match &self.doc_ids {
            Some(docs) => AttentionMask::documents(docs, self.seq)
                .expect("packed documents are contiguous runs of positions"),
            None => AttentionMask::Causal,
        };
        let logits = model.forward_with(ids, &positions, &mask);
        token_logprobs(logits, targets)
    }
}

pub fn int_tensor<B: Backend>(
    ids: &[u32],
    rows: usize,
    cols: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let data: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    Tensor::from_data(TensorData::new(data, [rows, cols]), device)
}

/// Block-diagonal causal mask `[batch, 1, seq, seq]` (`true` = blocked): a query
/// sees keys at or before it *in the same document*. The plain form of
/// [`AttentionMask::documents`], kept as the reference the tests compare with.
pub fn document_mask<B: Backend>(
    doc_ids: &[u32],
    batch: usize,
    seq: usize,
    device: &B::Device,
) -> Tensor<B, 4, burn::tensor::Bool> {
    let mut blocked = Vec::with_capacity(batch * seq * seq);
    for row in 0..batch {
        let docs = &doc_ids[row * seq..(row + 1) * seq];
        for q in 0..seq {
            for k in 0..seq {
                blocked.push(k > q || docs[k] != docs[q]);
            }
        }
    }
    Tensor::from_data(TensorData::new(blocked, [batch, 1, seq, seq]), device)
}

/// Draws conversations for one row until the next one does not fit in `capacity` tokens.
pub fn pack_row<'e>(
    examples: &'e [Rendered],
    capacity: usize,
    rng: &mut rand::rngs::StdRng,
) -> Vec<&'e Rendered> {
    let mut row = Vec::new();
    let mut used = 0;
    loop {
        let example = &examples[rng.random_range(0..examples.len())];
        if used + example.ids.len() > capacity && !row.is_empty() {
            return row;
        }
        used += example.ids.len();
        row.push(example);
        if used >= capacity {
            return row;
        }
    }
}

/// Lays rows of conversations out as a batch of `seq` positions: each
/// conversation is shifted on its own (no prediction across a boundary), its
/// positions restart at zero and its tokens attend only within it; the rest is
/// padding with no loss.
pub fn packed_batch(rows: &[Vec<&Rendered>], seq: usize, pad: u32) -> Batch {
    let n = rows.len();
    let mut inputs = vec![pad; n * seq];
    let mut targets = vec![pad; n * seq];
    let mut weights = vec![0.0; n * seq];
    let mut positions = vec![0u32; n * seq];
    let mut doc_ids = vec![u32::MAX; n * seq];
    for (r, row) in rows.iter().enumerate() {
        let mut at = 0;
        for (d, conversation) in row.iter().enumerate() {
            let (i, t, w) = conversation.shifted();
            let take = i.len().min(seq - at);
            for k in 0..take {
                let slot = r * seq + at + k;
                inputs[slot] = i[k];
                targets[slot] = t[k];
                weights[slot] = w[k];
                positions[slot] = k as u32;
                doc_ids[slot] = d as u32;
            }
            at += take;
            if at == seq {
                break;
            }
        }
        // Padding: each pad position its own document, position 0.
        for k in at..seq {
            doc_ids[r * seq + k] = u32::MAX - k as u32;
        }
    }
    Batch {
        batch: n,
        seq,
        inputs,
        targets,
        weights,
        positions: Some(positions),
        doc_ids: Some(doc_ids),
    }
}

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
    /// Extra per-step metrics for `metrics.jsonl` (e.g. reward margins), read
    /// after the step's losses were computed.
    fn step_metrics(&mut self) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }
    /// Held-out metrics (`val/loss`, `val/bpb`, `task_accuracy`, …). `full` asks
    /// for the complete evaluation (end of training).
    fn evaluate(&mut self, model: &Llama<B::InnerBackend>, full: bool) -> BTreeMap<String, f64>;
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
    #[error("{path}: train_state does not fit this run: {reason}")]
    BadState { path: String, reason: String },
}

/// Threads [`nll_grads`] should use for `cfg` on `device`'s backend: GPU
/// backends run one micro-batch at a time, and gain nothing from more.
pub fn workers_for<B: Backend>(cfg: &TrainConfig, _device: &B::Device) -> usize {
    if crate::backend::is_gpu::<B>() {
        1
    } else {
        cfg.workers.max(1)
    }
}

/// Runs `job(model, part, first_row)` for every row part of `batch` split
/// `workers` ways and returns the results in row order. The parts run as
/// tasks of rayon's pool, the pool flex's matmuls parallelise on: a matmul
/// inside a busy task then runs on its own thread instead of waking more
/// threads than there are cores (flex runs its elementwise kernels on one
/// core, so a second thread keeps the second core busy).
fn on_row_parts<B, T, F>(model: &Llama<B>, batch: &Batch, workers: usize, job: F) -> Vec<T>
where
    B: AutodiffBackend,
    T: Send,
    F: Fn(&Llama<B>, &Batch, usize) -> T + Sync,
{
    if workers <= 1 || batch.batch < 2 {
        return vec![job(model, batch, 0)];
    }
    let parts = batch.split_rows(workers);
    let first_rows: Vec<usize> = parts
        .iter()
        .scan(0, |row, p| {
            let first = *row;
            *row += p.batch;
            Some(first)
        })
        .collect();
    let mut results: Vec<Option<T>> = parts.iter().map(|_| None).collect();
    let job = &job;
    rayon::scope(|scope| {
        let (head, rest) = results.split_first_mut().expect("at least one part");
        for ((part, &first), slot) in parts[1..].iter().zip(&first_rows[1..]).zip(rest) {
            // Parameters as fresh autodiff leaves (same ParamIds): each
            // worker builds its own graph. Workers sharing the leaves
            // share one graph, and Burn's graph locking can deadlock
            // when two threads register and run backward on it.
            let model = Llama::<B>::from_inner(model.valid());
            scope.spawn(move |_| *slot = Some(job(&model, part, first)));
        }
        *head = Some(job(model, &parts[0], 0));
    });
    results
        .into_iter()
        .map(|r| r.expect("a training worker panicked"))
        .collect()
}

/// Sums per-part gradients in part order, so the result does not depend on
/// scheduling.
fn sum_grads<B: AutodiffBackend>(
    model: &Llama<B>,
    parts: impl IntoIterator<Item = GradientsParams>,
) -> GradientsParams {
    let mut accumulator = GradientsAccumulator::<Llama<B>>::new();
    for grads in parts {
        accumulator.accumulate(model, grads);
    }
    accumulator.grads()
}

/// The summed next-token NLL of `batch` and the gradients of that sum divided
/// by `scale`. With `workers` > 1 the rows are split among that many threads,
/// each running forward and backward on its part of the rows.
pub fn nll_grads<B: AutodiffBackend>(
    model: &Llama<B>,
    batch: &Batch,
    workers: usize,
    scale: f64,
    device: &B::Device,
) -> (f64, GradientsParams) {
    let results = on_row_parts(model, batch, workers, |model, part, _| {
        let nll = part.nll_sum(model, device);
        let value = nll.clone().into_scalar().elem::<f64>();
        let grads = GradientsParams::from_grads(nll.div_scalar(scale).backward(), model);
        (value, grads)
    });
    let total = results.iter().map(|(v, _)| v).sum();
    (total, sum_grads(model, results.into_iter().map(|(_, g)| g)))
}

/// A loss that is a function of per-row-part values: `inner(model, part,
/// first_row)` maps each row part of `batch` to a vector (e.g. the summed
/// log-probs of the replies in those rows), and `outer` maps their
/// concatenation, in row order, to the scalar loss (and a by-product `T`).
/// Returns the loss, the gradients of loss / `scale`, and the by-product.
///
/// The inner values of the parts are computed on `workers` threads, each on
/// its own graph. `outer` runs once on a leaf holding their concatenation,
/// which yields g = ∂loss/∂values; then each thread back-propagates Σ gᵢ·valueᵢ
/// through its part. By the chain rule the summed gradients are those of
/// `outer` applied to the whole batch on one thread.
pub fn split_grads<B, T, F>(
    model: &Llama<B>,
    batch: &Batch,
    workers: usize,
    scale: f64,
    device: &B::Device,
    inner: F,
    outer: impl FnOnce(Tensor<B, 1>) -> (Tensor<B, 1>, T),
) -> (f64, GradientsParams, T)
where
    B: AutodiffBackend,
    F: Fn(&Llama<B>, &Batch, usize) -> Tensor<B, 1> + Sync,
{
    let parts = on_row_parts(model, batch, workers, |model, part, first_row| {
        let values = inner(model, part, first_row);
        let host: Vec<f32> = values
            .clone()
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap_or_default();
        // The part's parameter leaves (a clone shares them): its gradients
        // are found through them.
        (values, host, model.clone())
    });
    let gathered: Vec<f32> = parts
        .iter()
        .flat_map(|(_, h, _)| h.iter().copied())
        .collect();
    let n = gathered.len();
    let leaf = Tensor::<B, 1>::from_data(TensorData::new(gathered, [n]), device).require_grad();
    let (loss, by_product) = outer(leaf.clone());
    let value = loss.clone().into_scalar().elem::<f64>();
    let outer_grads = loss.div_scalar(scale).backward();
    let g: Vec<f32> = match leaf.grad(&outer_grads) {
        Some(g) => g.into_data().convert::<f32>().to_vec().unwrap_or_default(),
        None => vec![0.0; n],
    };
    // Each part's slice of g, back-propagated through that part's graph on
    // the thread pool; parts without values add nothing.
    let mut offset = 0;
    let jobs: Vec<(Tensor<B, 1>, Vec<f32>, Llama<B>)> = parts
        .into_iter()
        .map(|(values, host, leaves)| {
            let slice = g[offset..offset + host.len()].to_vec();
            offset += host.len();
            (values, slice, leaves)
        })
        .collect();
    let mut results: Vec<Option<GradientsParams>> = jobs.iter().map(|_| None).collect();
    rayon::scope(|scope| {
        for ((values, slice, leaves), slot) in jobs.into_iter().zip(results.iter_mut()) {
            scope.spawn(move |_| {
                if slice.is_empty() {
                    return;
                }
                let k = slice.len();
                let g = Tensor::<B, 1>::from_data(TensorData::new(slice, [k]), device);
                let grads = values.mul(g).sum().backward();
                *slot = Some(GradientsParams::from_grads(grads, &leaves));
            });
        }
    });
    let grads = sum_grads(model, results.into_iter().flatten());
    (value, grads, by_product)
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
        }
    }
}

#[derive(Serialize, Deserialize)]
struct SavedState {
    step: u64,
    tokens_seen: u64,
    wall_seconds: f64,
    skipped_steps: u64,
    bad_in_a_row: u32,
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
    let mut model = model;
    let mut optim = AdamW::<B::InnerBackend>::new(AdamWConfig {
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
    });
    let mut state = SavedState {
        step: 0,
        tokens_seen: 0,
        wall_seconds: 0.0,
        skipped_steps: 0,
        bad_in_a_row: 0,
    };
    if resume {
        let (json, files) = checkpoint::load_train_state(work)?;
        let bad_state = |reason: String| TrainError::BadState {
            path: work.join(checkpoint::TRAIN_STATE_DIR).display().to_string(),
            reason,
        };
        state = serde_json::from_value(json).map_err(|e| bad_state(e.to_string()))?;
        let weights = parse_tensors(&files, "model.safetensors").map_err(bad_state)?;
        model = checkpoint::load_named(model, weights, device).map_err(bad_state)?;
        let moments = parse_tensors(&files, "optim.safetensors").map_err(bad_state)?;
        optim
            .load_state(moments, state.step - state.skipped_steps, device)
            .map_err(bad_state)?;
        tracing::info!("resuming at step {} of {}", state.step, cfg.steps);
    }
    let metrics_path = work.join("metrics.jsonl");
    let mut metrics = MetricsLog::open(&metrics_path, resume.then_some(state.step))?;

    let started = Instant::now();
    let wall_before = state.wall_seconds;
    let tokens_before = state.tokens_seen;
    let bar = progress_bar(cfg.steps, state.step);
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
    while state.step < cfg.steps {
        let step = state.step;
        let lr = cfg.lr_at(step);
        let batches = task.batches(step);
        let total_weight: f64 = batches
            .iter()
            .enumerate()
            .map(|(micro, batch)| task.weight(micro, batch))
            .sum::<f64>()
            .max(1.0);
        let mut accumulator = GradientsAccumulator::<Llama<B>>::new();
        let mut nll_total = 0.0;
        let mut tokens = 0u64;
        for (micro, batch) in batches.iter().enumerate() {
            tokens += batch.tokens();
            let (nll, grads) = task.loss_grads(&model, micro, batch, workers, total_weight, device);
            nll_total += nll;
            accumulator.accumulate(&model, grads);
        }
        let grads = accumulator.grads();
        let loss = nll_total / total_weight;
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
        }

        let elapsed = started.elapsed().as_secs_f64();
        if gpu && state.step == first_step {
            bar.suspend(|| tracing::info!("step {}: first step took {elapsed:.1} s", state.step));
        }
        let tok_per_s = (state.tokens_seen - tokens_before) as f64 / elapsed.max(1e-9);
        bar.set_position(state.step);
        bar.set_message(format!("loss {loss:.4} · {tok_per_s:.0} tok/s"));
        let done = state.step == cfg.steps;
        let extra = task.step_metrics();
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
            metrics.write(&line)?;
        }
        if done || (cfg.eval_every > 0 && state.step.is_multiple_of(cfg.eval_every)) {
            let eval = task.evaluate(&model.valid(), done);
            let mut line =
                serde_json::json!({"step": state.step, "tokens_seen": state.tokens_seen});
            let summary: Vec<String> = eval.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
            for (k, v) in &eval {
                line[k] = serde_json::json!(v);
            }
            metrics.write(&line)?;
            bar.suspend(|| tracing::info!("step {}: {}", state.step, summary.join(" · ")));
            last_eval = eval;
        }
        if cfg.save_every > 0 && state.step.is_multiple_of(cfg.save_every) && !done {
            state.wall_seconds = wall_before + started.elapsed().as_secs_f64();
            save_state(work, &state, &model, &optim)?;
        }
    }
    bar.finish_and_clear();
    let wall_seconds = wall_before + started.elapsed().as_secs_f64();
    state.wall_seconds = wall_seconds;
    if resume && state.step == cfg.steps && last_eval.is_empty() {
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
    })
}

fn parse_tensors(
    files: &HashMap<String, Vec<u8>>,
    name: &str,
) -> Result<HashMap<String, TensorData>, String> {
    let bytes = files.get(name).ok_or_else(|| format!("{name} missing"))?;
    checkpoint::parse_safetensors(bytes).map_err(|e| format!("{name}: {e}"))
}

fn save_state<B: AutodiffBackend>(
    work: &Path,
    state: &SavedState,
    model: &Llama<B>,
    optim: &AdamW<B::InnerBackend>,
) -> Result<(), TrainError> {
    let bad = |reason: String| TrainError::BadState {
        path: work.display().to_string(),
        reason,
    };
    let weights = checkpoint::model_bytes(model).map_err(bad)?;
    let moments = checkpoint::safetensors_bytes(
        optim.state_tensors().iter().map(|(n, d)| (n, d)),
        checkpoint::WeightDtype::F32,
    )
    .map_err(bad)?;
    let json = serde_json::to_value(state).map_err(|e| bad(e.to_string()))?;
    checkpoint::save_train_state(
        work,
        &json,
        &[
            ("model.safetensors", weights),
            ("optim.safetensors", moments),
        ],
    )?;
    Ok(())
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

/// The config of a stage that continues a parent checkpoint (sft, align): the
/// parent's `[train]` as defaults, then the stage's built-in file, then the
/// user's layers. A `[model]` table is refused (the architecture is the
/// parent's), `train` is validated against the parent's context length, and
/// every training knob that differs from the parent is logged.
pub fn child_config<T: Serialize + serde::de::DeserializeOwned>(
    parent: &checkpoint::Checkpoint,
    user: &crate::config::ConfigSources,
    (stage, builtin): (&str, &str),
    defaults: impl FnOnce(TrainConfig) -> T,
    train_of: impl Fn(&T) -> &TrainConfig,
) -> anyhow::Result<T> {
    use anyhow::{Context, bail};
    for file in &user.files {
        if crate::config::file_has_table(file, "model")? {
            bail!(
                "{}: a [model] table is not allowed in an {stage} config: the architecture comes from the parent checkpoint",
                file.display()
            );
        }
    }
    let parent_train: TrainConfig = serde_json::from_value(parent.manifest.train.clone())
        .with_context(|| {
            format!(
                "{}: parent manifest has an unreadable [train]",
                parent.dir.display()
            )
        })?;
    let mut sources = user.clone();
    sources.builtin.insert(
        0,
        (
            format!("configs/{stage}.toml (built in)"),
            builtin.to_string(),
        ),
    );
    let cfg: T = crate::config::resolve_from(&defaults(parent_train.clone()), &sources)?;
    let train = train_of(&cfg);
    train.validate().map_err(anyhow::Error::msg)?;
    if train.seq_len > parent.manifest.model.max_seq_len {
        bail!(
            "train.seq_len ({}) exceeds the parent's model.max_seq_len ({})",
            train.seq_len,
            parent.manifest.model.max_seq_len
        );
    }
    let (before, after) = (
        serde_json::to_value(&parent_train)?,
        serde_json::to_value(train)?,
    );
    if let (Some(before), Some(after)) = (before.as_object(), after.as_object()) {
        let changed: Vec<String> = after
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(v))
            .map(|(k, v)| format!("{k}: {} → {v}", before.get(k).cloned().unwrap_or_default()))
            .collect();
        tracing::info!(
            "train: {} knobs inherited from the parent; overridden: {}",
            after.len() - changed.len(),
            if changed.is_empty() {
                "none".to_string()
            } else {
                changed.join(", ")
            }
        );
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Inner, Train};
    use crate::model::ModelConfig;

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
        let run = |workers: usize, dir: &Path| {
            let model = model_cfg.init::<Train>(4, &device);
            let cfg = TrainConfig {
                workers,
                ..train_cfg.clone()
            };
            let mut task = RowParallel(Fixed {
                micro: vec![batch(&i, &t, &w, 5, seq)],
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
        for workers in [1, 2, 3] {
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
                "{workers} workers: loss {value} vs {expected_value}"
            );
            let got = crate::optim::grad_values(&model, &grads);
            let diff = crate::optim::max_abs_diff(&got, &expected).expect("same parameters");
            assert!(
                diff < 1e-5 * norm.max(1.0),
                "{workers} workers: gradients differ by {diff}"
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
