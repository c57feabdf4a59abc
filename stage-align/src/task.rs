//! Alignment as a `TrainTask` of the shared loop: the loss of packed batches,
//! reward statistics, and the KL estimate to the reference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use baton_core::burn::optim::GradientsParams;
use baton_core::burn::tensor::backend::{AutodiffBackend, Backend};
use baton_core::burn::tensor::{Int, Tensor, TensorData};
use baton_core::chat::{ChatRenderer, Rendered};
use baton_core::checkpoint::Checkpoint;
use baton_core::data::step_rng;
use baton_core::generate::{Sampling, generate};
use baton_core::model::Llama;
use baton_core::tasks::{Task, task_metrics};
use baton_core::tokenizer::Tokenizer;
use baton_core::train::{Batch, TrainTask, split_grads};
use rand::Rng;
use rand::seq::SliceRandom;

use crate::config::*;
use crate::loss::{LossOutput, LossParams, LossSpec, Side, alignment_loss, pair_count};
use crate::reference::*;
use crate::rows::*;

/// Per-step reward statistics.
#[derive(Clone, Debug, Default)]
struct RewardStats {
    chosen: Vec<f32>,
    rejected: Vec<f32>,
    chosen_logps: Vec<f32>,
    rejected_logps: Vec<f32>,
}

/// [`RewardStats`] as sums and counts, which add up over the ranks of a
/// data-parallel run: `[Σ chosen, n, Σ rejected, n, Σ chosen log-p, n,
/// Σ rejected log-p, n, Σ margin, Σ win, pairs]`.
fn reward_sums(stats: &RewardStats) -> Vec<f64> {
    let sum = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>();
    let mut out = Vec::with_capacity(11);
    for v in [
        &stats.chosen,
        &stats.rejected,
        &stats.chosen_logps,
        &stats.rejected_logps,
    ] {
        out.extend([sum(v), v.len() as f64]);
    }
    if stats.chosen.len() == stats.rejected.len() {
        let margins: Vec<f32> = stats
            .chosen
            .iter()
            .zip(&stats.rejected)
            .map(|(c, r)| c - r)
            .collect();
        let wins: Vec<f32> = margins.iter().map(|&m| f32::from(m > 0.0)).collect();
        out.extend([sum(&margins), sum(&wins), margins.len() as f64]);
    } else {
        out.extend([0.0, 0.0, 0.0]);
    }
    out
}

/// The per-step metrics of [`reward_sums`] added up over the ranks: the
/// same means [`RewardStats::summary`] gives in one process.
fn reward_means(sums: &[f64]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    if sums.len() < 11 || (sums[1] == 0.0 && sums[3] == 0.0) {
        return out;
    }
    let mean = |at: usize, n: usize| sums[at] / sums[n].max(1.0);
    out.insert("rewards/chosen".to_string(), mean(0, 1));
    out.insert("rewards/rejected".to_string(), mean(2, 3));
    out.insert("logps/chosen".to_string(), mean(4, 5));
    out.insert("logps/rejected".to_string(), mean(6, 7));
    if sums[10] > 0.0 {
        out.insert("rewards/margins".to_string(), mean(8, 10));
        out.insert("rewards/accuracies".to_string(), mean(9, 10));
    }
    out
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

pub(crate) struct AlignTask<'a, B: AutodiffBackend> {
    pub(crate) data: AlignData,
    pub(crate) train_units: Vec<usize>,
    eval_units: Vec<usize>,
    references: Option<Vec<f32>>,
    online: Option<Llama<B::InnerBackend>>,
    spec: LossSpec,
    params: LossParams,
    pub(crate) heldout: HeldOut,
    tokenizer: &'a Tokenizer,
    cfg: AlignConfig,
    parent_dir: PathBuf,
    device: B::Device,
    /// Placement of the current step's micro-batches.
    current: Vec<Placed>,
    step_stats: Vec<RewardStats>,
    /// The step's reward sums over every rank ([`reward_sums`]).
    step_sums: Vec<f64>,
}

/// The held-out tasks align is measured on: `[tasks]`' set, and the set at
/// `[harder]`'s difficulty (empty when off).
pub(crate) struct HeldOut {
    pub(crate) standard: Vec<Task>,
    pub(crate) harder: Vec<Task>,
}

impl HeldOut {
    pub(crate) fn new(cfg: &AlignConfig) -> Self {
        Self {
            standard: cfg.tasks.heldout(),
            harder: cfg
                .harder
                .tasks(&cfg.tasks)
                .map(|t| t.heldout())
                .unwrap_or_default(),
        }
    }

    /// Task metrics of `model` on both sets, the harder one's keyed `harder/…`.
    pub(crate) fn metrics<B: Backend>(
        &self,
        model: &Llama<B>,
        tokenizer: &Tokenizer,
        max_new_tokens: usize,
        device: &B::Device,
    ) -> BTreeMap<String, f64> {
        let mut metrics = task_metrics(model, tokenizer, &self.standard, max_new_tokens, device);
        if !self.harder.is_empty() {
            let harder = task_metrics(model, tokenizer, &self.harder, max_new_tokens, device);
            metrics.extend(harder.into_iter().map(|(k, v)| (format!("harder/{k}"), v)));
        }
        metrics
    }
}

impl<'a, B: AutodiffBackend> AlignTask<'a, B> {
    /// The task over `data`: units split (seeded) into training units and the
    /// held-out units reward metrics are measured on.
    pub(crate) fn new(
        data: AlignData,
        cfg: &AlignConfig,
        spec: LossSpec,
        params: LossParams,
        tokenizer: &'a Tokenizer,
        parent: &Checkpoint,
        device: &B::Device,
    ) -> Self {
        let mut order: Vec<usize> = (0..data.units.len()).collect();
        order.shuffle(&mut step_rng(cfg.train.seed, 4, 0, 0));
        let held = cfg
            .align
            .heldout_pairs
            .min(data.units.len() / 5)
            .min(data.units.len().saturating_sub(1));
        let (eval_units, train_units) = order.split_at(held);
        tracing::info!(
            "align units: {} for training, {} held out for reward metrics",
            train_units.len(),
            eval_units.len()
        );
        AlignTask {
            data,
            train_units: train_units.to_vec(),
            eval_units: eval_units.to_vec(),
            references: None,
            online: None,
            spec,
            params,
            heldout: HeldOut::new(cfg),
            tokenizer,
            cfg: cfg.clone(),
            parent_dir: parent.dir.clone(),
            device: device.clone(),
            current: Vec::new(),
            step_stats: Vec::new(),
            step_sums: Vec::new(),
        }
    }

    /// Where the reference log-probs come from, when the loss or the reward
    /// metrics need them: the hashed cache (read, or computed with
    /// `reference` and written), or `reference` kept in memory (online).
    pub(crate) fn attach_reference(
        &mut self,
        reference: Llama<B::InnerBackend>,
        key: &CacheKey,
        dir: &Path,
    ) -> Result<()> {
        if !self.spec.needs_reference() && self.eval_units.is_empty() {
            return Ok(());
        }
        match self.cfg.align.reference {
            Reference::Online => self.online = Some(reference),
            Reference::Cached => {
                let path = if self.cfg.align.reference_cache.is_empty() {
                    dir.join("reference_logps.json")
                } else {
                    PathBuf::from(&self.cfg.align.reference_cache)
                };
                let logps = if path.exists() {
                    let logps = read_reference_cache(&path, key)?;
                    tracing::info!("reference log-probs from {}", path.display());
                    logps
                } else {
                    let logps = reply_logps(
                        &reference,
                        &self.data,
                        self.cfg.train.batch_size,
                        self.cfg.train.seq_len,
                        self.tokenizer.special.pad,
                        &self.device,
                    );
                    write_reference_cache(&path, key, &logps)?;
                    tracing::info!("reference log-probs written to {}", path.display());
                    logps
                };
                self.references = Some(logps);
            }
        }
        Ok(())
    }
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
        |model, part, first_row| item_logps(model, part, placed, first_row, &model.device()),
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

    fn step_sums(&mut self) -> Vec<f64> {
        let mut all = RewardStats::default();
        for s in self.step_stats.drain(..) {
            all.chosen.extend(s.chosen);
            all.rejected.extend(s.rejected);
            all.chosen_logps.extend(s.chosen_logps);
            all.rejected_logps.extend(s.rejected_logps);
        }
        reward_sums(&all)
    }

    fn set_step_sums(&mut self, sums: &[f64]) {
        self.step_sums = sums.to_vec();
    }

    fn step_metrics(&mut self) -> BTreeMap<String, f64> {
        reward_means(&std::mem::take(&mut self.step_sums))
    }

    fn evaluate(&mut self, model: &Llama<B::InnerBackend>, _full: bool) -> BTreeMap<String, f64> {
        let mut metrics = self.heldout.metrics(
            model,
            self.tokenizer,
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
                &self.heldout.standard,
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
