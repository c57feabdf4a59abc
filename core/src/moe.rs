//! Mixture-of-experts feed-forward blocks (Mixtral-style) and their
//! load-balancing losses.
//!
//! A sparse layer routes every token to the `top_k` of `experts` SwiGLU
//! experts with the highest router probability; the chosen gates are
//! renormalised to sum to one (so copies of one dense FFN behind any router
//! compute that FFN exactly, which is what `baton upcycle` relies on). No
//! token is ever dropped: capacity is unlimited. Tokens are gathered per
//! expert and each expert runs one GEMM per projection over its tokens.
//!
//! Field names mirror HF `MixtralForCausalLM` (`block_sparse_moe.gate`,
//! `experts.{j}.w1/w2/w3`), so a parameter's module path is its HF name.
//!
//! Balancing ("Demons in the Detail", after Switch): `LBL = E · Σᵢ fᵢ·pᵢ`,
//! with `fᵢ` the share of the token→expert assignments that went to expert
//! `i` (Σ fᵢ = 1, so a balanced router scores 1) and `pᵢ` the mean router
//! probability of `i` over the pass's tokens. `fᵢ` is a count, without a
//! gradient; it is taken over the micro-batch (`micro`) or over every
//! micro-batch of the optimizer step (`global`). The global count needs the
//! whole step's routing before the first backward pass, so the training loop
//! routes the step's micro-batches once without gradients first
//! ([`Balance::prepass`]).

use std::sync::{Arc, Mutex};

use burn::module::{Module, Param};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::kernels;

/// `model.moe`: which layers are sparse and how they route.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    /// Experts per sparse layer (≥ 2).
    pub experts: usize,
    /// Experts each token goes to (1..=experts).
    pub top_k: usize,
    /// Every `every`-th layer is sparse: layer `i` when `(i + 1) % every == 0`
    /// (1: all of them, as Mixtral).
    #[serde(default = "one")]
    pub every: usize,
}

fn one() -> usize {
    1
}

impl MoeConfig {
    pub fn is_sparse(&self, layer: usize) -> bool {
        (layer + 1).is_multiple_of(self.every.max(1))
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.experts < 2 {
            return Err(format!(
                "model.moe.experts must be at least 2, got {}",
                self.experts
            ));
        }
        if self.experts > 256 {
            return Err(format!(
                "model.moe.experts = {} is above Baton's limit of 256",
                self.experts
            ));
        }
        if self.top_k == 0 || self.top_k > self.experts {
            return Err(format!(
                "model.moe.top_k must be between 1 and model.moe.experts ({}), got {}",
                self.experts, self.top_k
            ));
        }
        if self.every == 0 {
            return Err("model.moe.every must be at least 1".into());
        }
        Ok(())
    }
}

/// One expert's weight matrix, `[in, out]` (HF's `[out, in]` on disk).
#[derive(Module, Debug)]
pub struct ExpertWeight<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
}

/// A SwiGLU expert under Mixtral's names: `w2(silu(w1·x) * w3·x)`.
#[derive(Module, Debug)]
pub struct Expert<B: Backend> {
    pub w1: ExpertWeight<B>,
    pub w2: ExpertWeight<B>,
    pub w3: ExpertWeight<B>,
}

impl<B: Backend> Expert<B> {
    /// `gate`, `down`, `up` as `[in, out]` matrices.
    pub fn new(
        gate: Param<Tensor<B, 2>>,
        down: Param<Tensor<B, 2>>,
        up: Param<Tensor<B, 2>>,
    ) -> Self {
        Self {
            w1: ExpertWeight { weight: gate },
            w2: ExpertWeight { weight: down },
            w3: ExpertWeight { weight: up },
        }
    }

    /// Rows `[n, d]` → `[n, d]`.
    fn forward(&self, rows: Tensor<B, 2>) -> Tensor<B, 2> {
        let [n, _] = rows.dims();
        let gate = rows.clone().matmul(self.w1.weight.val());
        let up = rows.matmul(self.w3.weight.val());
        let ff = gate.dims()[1];
        let hidden = kernels::swiglu(gate.reshape([1, n, ff]), up.reshape([1, n, ff]));
        hidden.reshape([n, ff]).matmul(self.w2.weight.val())
    }
}

/// The router, `[d_model, experts]`.
#[derive(Module, Debug)]
pub struct Router<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
}

/// A sparse feed-forward block (`MixtralSparseMoeBlock`).
#[derive(Module, Debug)]
pub struct SparseMoe<B: Backend> {
    pub gate: Router<B>,
    pub experts: Vec<Expert<B>>,
    pub top_k: usize,
}

/// What one sparse layer's forward pass adds to the loss while training.
pub struct LayerAux<B: Backend> {
    /// `balance_weight · LBL + z_weight · z`, for this layer.
    pub loss: Tensor<B, 1>,
}

impl<B: Backend> SparseMoe<B> {
    pub fn num_experts(&self) -> usize {
        self.experts.len()
    }

    /// `x: [batch, seq, d]` → `[batch, seq, d]`. `layer` is this layer's index
    /// among the sparse ones (for the balance statistics); with `balance`
    /// the pass records its routing and, under autodiff, returns its share
    /// of the auxiliary loss.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        layer: usize,
        balance: Option<&Balance>,
    ) -> (Tensor<B, 3>, Option<LayerAux<B>>) {
        let [b, s, d] = x.dims();
        let n = b * s;
        let e = self.num_experts();
        let k = self.top_k.min(e);
        let device = x.device();
        let rows = x.reshape([n, d]);
        let logits = rows.clone().matmul(self.gate.weight.val());
        let probs = softmax(logits.clone(), 1);
        let host: Vec<f32> = probs
            .clone()
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("router probabilities convert to f32");
        let route = Routing::top_k(&host, e, k);
        let mask = Tensor::<B, 2>::from_data(TensorData::new(route.mask.clone(), [n, e]), &device);
        // Renormalised gates: the chosen probabilities over their sum.
        let chosen = probs.clone().mul(mask);
        let gates = chosen.clone().div(chosen.sum_dim(1));
        let mut indices = Vec::with_capacity(e);
        let mut outputs = Vec::with_capacity(e);
        for (j, expert) in self.experts.iter().enumerate() {
            let tokens = &route.tokens[j];
            if tokens.is_empty() {
                continue;
            }
            let idx = Tensor::<B, 1, Int>::from_data(
                TensorData::new(tokens.iter().map(|&t| t as i32).collect(), [tokens.len()]),
                &device,
            );
            let gate = gates.clone().slice([0..n, j..j + 1]).select(0, idx.clone());
            outputs.push(
                expert
                    .forward(rows.clone().select(0, idx.clone()))
                    .mul(gate),
            );
            indices.push(idx);
        }
        let out = Tensor::<B, 2>::zeros([n, d], &device).select_assign(
            0,
            Tensor::cat(indices, 0),
            Tensor::cat(outputs, 0),
            IndexingUpdateOp::Add,
        );
        let out = out.reshape([b, s, d]);
        let aux = balance.and_then(|bal| {
            let training = B::ad_enabled(&device);
            let entropy = route.entropy(&host, e);
            let f = bal.observe(layer, &route.counts, entropy, training)?;
            let p = probs.mean_dim(0).reshape([e]);
            let f = Tensor::<B, 1>::from_data(TensorData::new(f, [e]), &device);
            let lbl = p.mul(f).sum().mul_scalar(e as f64);
            let settings = bal.settings();
            let mut loss = lbl.clone().mul_scalar(settings.balance_weight);
            if settings.z_weight > 0.0 {
                // Router z-loss: the mean squared log-partition of the logits.
                let lse = logits
                    .clone()
                    .sub(log_softmax(logits, 1))
                    .slice([0..n, 0..1]);
                let z = lse.powi_scalar(2).mean().reshape([1]);
                bal.record_z(z.clone().into_scalar_f64());
                loss = loss + z.mul_scalar(settings.z_weight);
            }
            bal.record_lbl(lbl.into_scalar_f64());
            Some(LayerAux { loss })
        });
        (out, aux)
    }
}

trait ScalarF64 {
    fn into_scalar_f64(self) -> f64;
}

impl<B: Backend> ScalarF64 for Tensor<B, 1> {
    fn into_scalar_f64(self) -> f64 {
        self.into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .unwrap_or_default()[0]
    }
}

/// One pass's routing decisions, made on the host from the probabilities.
struct Routing {
    /// `[n, e]`: 1 where a token chose an expert.
    mask: Vec<f32>,
    /// The tokens of each expert, ascending.
    tokens: Vec<Vec<usize>>,
    /// Assignments per expert.
    counts: Vec<f64>,
}

impl Routing {
    /// Each row's `k` largest probabilities (ties to the lower index).
    fn top_k(probs: &[f32], e: usize, k: usize) -> Self {
        let n = probs.len() / e.max(1);
        let mut mask = vec![0f32; n * e];
        let mut tokens = vec![Vec::new(); e];
        let mut order: Vec<usize> = (0..e).collect();
        for t in 0..n {
            let row = &probs[t * e..(t + 1) * e];
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            for &j in &order[..k] {
                mask[t * e + j] = 1.0;
            }
        }
        for t in 0..n {
            for j in 0..e {
                if mask[t * e + j] > 0.0 {
                    tokens[j].push(t);
                }
            }
        }
        let counts = tokens.iter().map(|t| t.len() as f64).collect();
        Self {
            mask,
            tokens,
            counts,
        }
    }

    /// Mean router entropy (nats) over the tokens.
    fn entropy(&self, probs: &[f32], e: usize) -> f64 {
        let n = probs.len() / e.max(1);
        let total: f64 = probs
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|&p| -(p as f64) * (p as f64).ln())
            .sum();
        total / n.max(1) as f64
    }
}

/// Where the count `fᵢ` of the balancing loss is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BalanceScope {
    /// Over all micro-batches of an optimizer step (the global batch).
    Global,
    /// Over each micro-batch alone.
    Micro,
}

/// `[moe]`: the auxiliary losses of a stage that trains an MoE model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeTrainConfig {
    /// `global` (default) or `micro`.
    #[serde(default = "global")]
    pub balance: BalanceScope,
    /// Weight of the load-balancing loss (0 turns it off; default 0.01).
    #[serde(default = "balance_weight")]
    pub balance_weight: f64,
    /// Weight of the router z-loss (default 0: off).
    #[serde(default)]
    pub z_weight: f64,
}

fn global() -> BalanceScope {
    BalanceScope::Global
}

fn balance_weight() -> f64 {
    0.01
}

impl Default for MoeTrainConfig {
    fn default() -> Self {
        Self {
            balance: BalanceScope::Global,
            balance_weight: balance_weight(),
            z_weight: 0.0,
        }
    }
}

impl MoeTrainConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (key, value) in [
            ("moe.balance_weight", self.balance_weight),
            ("moe.z_weight", self.z_weight),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(format!("{key} must be a finite number ≥ 0, got {value}"));
            }
        }
        Ok(())
    }
}

/// A training run's balancing state, attached to the model it trains (not a
/// parameter; every clone of the model shares it). It holds the settings,
/// the pre-pass counts of the current step, and the step's statistics for
/// `metrics.jsonl`.
#[derive(Clone, Debug)]
pub struct Balance {
    settings: MoeTrainConfig,
    state: Arc<Mutex<BalanceState>>,
}

#[derive(Debug, Default)]
struct BalanceState {
    /// Counting the step's routing without gradients (the pre-pass).
    counting: bool,
    /// The micro-batch being computed.
    micro: usize,
    /// Pre-pass counts: `[micro][sparse layer][expert]`.
    pre: Vec<Vec<Vec<f64>>>,
    /// The step's counts over every process of a data-parallel run
    /// (`[sparse layer][expert]`), when they were summed.
    global: Option<Vec<Vec<f64>>>,
    /// The step's statistics, over its training passes.
    stats: StepStats,
}

#[derive(Debug, Default)]
struct StepStats {
    /// `[sparse layer][expert]` assignments.
    load: Vec<Vec<f64>>,
    lbl: Vec<f64>,
    z: Vec<f64>,
    entropy: Vec<f64>,
}

fn add_counts(into: &mut Vec<Vec<f64>>, layer: usize, counts: &[f64]) {
    if into.len() <= layer {
        into.resize(layer + 1, Vec::new());
    }
    let slot = &mut into[layer];
    if slot.len() < counts.len() {
        slot.resize(counts.len(), 0.0);
    }
    for (s, c) in slot.iter_mut().zip(counts) {
        *s += c;
    }
}

fn shares(counts: &[f64]) -> Vec<f32> {
    let total: f64 = counts.iter().sum();
    counts
        .iter()
        .map(|&c| (c / total.max(1.0)) as f32)
        .collect()
}

impl Balance {
    pub fn new(settings: MoeTrainConfig) -> Self {
        Self {
            settings,
            state: Arc::new(Mutex::new(BalanceState::default())),
        }
    }

    pub fn settings(&self) -> &MoeTrainConfig {
        &self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BalanceState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a step needs its routing counted before its training passes:
    /// always for the global count, and for the per-micro-batch count when a
    /// micro-batch is split among threads (each thread sees only its rows).
    pub fn needs_prepass(&self, workers: usize, rows: usize) -> bool {
        self.settings.balance_weight > 0.0
            && (self.settings.balance == BalanceScope::Global || (workers > 1 && rows > 1))
    }

    /// Starts the pre-pass of a step with `micros` micro-batches.
    pub fn begin_prepass(&self, micros: usize) {
        let mut s = self.lock();
        s.counting = true;
        s.pre = vec![Vec::new(); micros];
        s.global = None;
    }

    /// The pre-pass counts summed over this process's micro-batches,
    /// flattened `[sparse layer][expert]`, with the layer count: what a
    /// data-parallel run sums over its processes for the global count.
    pub fn step_counts(&self) -> (usize, Vec<f64>) {
        let s = self.lock();
        let mut total: Vec<Vec<f64>> = Vec::new();
        for micro in &s.pre {
            for (layer, counts) in micro.iter().enumerate() {
                add_counts(&mut total, layer, counts);
            }
        }
        (total.len(), total.concat())
    }

    /// The step's counts over every process ([`Balance::step_counts`]
    /// summed), which the global loss then uses.
    pub fn set_step_counts(&self, layers: usize, flat: Vec<f64>) {
        let per = flat.len() / layers.max(1);
        let counts = flat.chunks(per.max(1)).map(<[f64]>::to_vec).collect();
        self.lock().global = Some(counts);
    }

    /// Ends the pre-pass: the training passes use its counts.
    pub fn end_prepass(&self) {
        self.lock().counting = false;
    }

    /// Forgets the pre-pass counts (a step without one).
    pub fn clear_prepass(&self) {
        let mut s = self.lock();
        s.counting = false;
        s.pre.clear();
        s.global = None;
    }

    /// The micro-batch the next passes belong to.
    pub fn set_micro(&self, micro: usize) {
        self.lock().micro = micro;
    }

    /// Records one pass's routing of sparse layer `layer` (`counts` over
    /// `assignments`) and returns the `fᵢ` its loss should use, or `None`
    /// when the pass adds no loss (a pass without gradients).
    fn observe(
        &self,
        layer: usize,
        counts: &[f64],
        entropy: f64,
        training: bool,
    ) -> Option<Vec<f32>> {
        let mut s = self.lock();
        if !training {
            if s.counting {
                let micro = s.micro;
                if let Some(slot) = s.pre.get_mut(micro) {
                    add_counts(slot, layer, counts);
                }
            }
            return None;
        }
        add_counts(&mut s.stats.load, layer, counts);
        s.stats.entropy.push(entropy);
        let counted = |per: &Vec<Vec<f64>>| per.get(layer).filter(|c| !c.is_empty()).cloned();
        let f = match self.settings.balance {
            BalanceScope::Global if s.global.is_some() => {
                s.global.as_ref().and_then(|g| g.get(layer)).cloned()
            }
            BalanceScope::Global if !s.pre.is_empty() => {
                let mut total: Vec<Vec<f64>> = Vec::new();
                for micro in &s.pre {
                    if let Some(c) = micro.get(layer) {
                        add_counts(&mut total, 0, c);
                    }
                }
                total.pop()
            }
            BalanceScope::Micro => s.pre.get(s.micro).and_then(counted),
            BalanceScope::Global => None,
        };
        Some(shares(f.as_deref().unwrap_or(counts)))
    }

    fn record_lbl(&self, value: f64) {
        self.lock().stats.lbl.push(value);
    }

    fn record_z(&self, value: f64) {
        self.lock().stats.z.push(value);
    }

    /// The statistics of the steps since the last call, then cleared: `moe/lbl` and `moe/z` (means
    /// over sparse layers and passes), `moe/entropy` (mean router entropy,
    /// nats), and per sparse layer `L` the smallest and largest expert share
    /// of the step's assignments, `moe/load_min/L` and `moe/load_max/L`.
    pub fn take_metrics(&self) -> Vec<(String, f64)> {
        let mut s = self.lock();
        let stats = std::mem::take(&mut s.stats);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let mut out = Vec::new();
        if !stats.lbl.is_empty() {
            out.push(("moe/lbl".to_string(), mean(&stats.lbl)));
        }
        if !stats.z.is_empty() {
            out.push(("moe/z".to_string(), mean(&stats.z)));
        }
        if !stats.entropy.is_empty() {
            out.push(("moe/entropy".to_string(), mean(&stats.entropy)));
        }
        for (layer, counts) in stats.load.iter().enumerate() {
            let share = shares(counts);
            let min = share.iter().copied().fold(f32::INFINITY, f32::min);
            let max = share.iter().copied().fold(0f32, f32::max);
            out.push((format!("moe/load_min/{layer}"), min as f64));
            out.push((format!("moe/load_max/{layer}"), max as f64));
        }
        out
    }

    /// The routing counts (`[sparse layer][expert]` assignments) of the
    /// passes without gradients that `pass` runs: how a text spreads over
    /// the experts (`baton eval --text` on an MoE model).
    pub fn count(&self, pass: impl FnOnce()) -> Vec<Vec<f64>> {
        self.begin_prepass(1);
        self.set_micro(0);
        pass();
        let mut s = self.lock();
        s.counting = false;
        let counts = s.pre.pop().unwrap_or_default();
        s.pre.clear();
        counts
    }
}

/// Each sparse layer's expert shares of its assignments, from counts
/// `[layer][expert]`.
pub fn shares_per_layer(counts: &[Vec<f64>]) -> Vec<Vec<f64>> {
    counts
        .iter()
        .map(|layer| {
            let total = layer.iter().sum::<f64>().max(1.0);
            layer.iter().map(|c| c / total).collect()
        })
        .collect()
}

/// How differently sources are routed: the total-variation distance
/// `½ Σⱼ |aⱼ − bⱼ|` between two sources' expert shares, averaged over sparse
/// layers and source pairs. 0: every source spreads over the experts alike;
/// 1: sources use disjoint experts.
pub fn specialisation(per_source: &[Vec<Vec<f64>>]) -> f64 {
    let mut total = 0.0;
    let mut n = 0usize;
    for (i, a) in per_source.iter().enumerate() {
        for b in &per_source[i + 1..] {
            for (la, lb) in a.iter().zip(b) {
                total += 0.5 * la.iter().zip(lb).map(|(x, y)| (x - y).abs()).sum::<f64>();
                n += 1;
            }
        }
    }
    total / n.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specialisation_is_zero_for_alike_routing_and_one_for_disjoint() {
        let a = vec![vec![0.5, 0.5, 0.0, 0.0]];
        let b = vec![vec![0.0, 0.0, 0.5, 0.5]];
        assert_eq!(specialisation(&[a.clone(), a.clone()]), 0.0);
        assert_eq!(specialisation(&[a.clone(), b]), 1.0);
        assert_eq!(shares_per_layer(&[vec![1.0, 3.0]]), vec![vec![0.25, 0.75]]);
    }

    #[test]
    fn top_k_picks_the_largest_and_breaks_ties_low() {
        let probs = [0.1, 0.6, 0.3, 0.25, 0.25, 0.5];
        let r = Routing::top_k(&probs, 3, 2);
        assert_eq!(r.mask, vec![0.0, 1.0, 1.0, 1.0, 0.0, 1.0]);
        assert_eq!(r.tokens, vec![vec![1], vec![0], vec![0, 1]]);
        assert_eq!(r.counts, vec![1.0, 1.0, 2.0]);
    }

    #[test]
    fn config_refuses_bad_routing() {
        let ok = MoeConfig {
            experts: 4,
            top_k: 2,
            every: 1,
        };
        assert!(ok.validate().is_ok());
        let e = MoeConfig {
            top_k: 5,
            ..ok.clone()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("top_k"), "{e}");
        let e = MoeConfig {
            experts: 1,
            top_k: 1,
            ..ok.clone()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("at least 2"), "{e}");
        let e = MoeTrainConfig {
            balance_weight: -0.1,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("moe.balance_weight"), "{e}");
        assert!(ok.is_sparse(0) && ok.is_sparse(1));
        let every2 = MoeConfig { every: 2, ..ok };
        assert!(!every2.is_sparse(0) && every2.is_sparse(1) && !every2.is_sparse(2));
    }
}
