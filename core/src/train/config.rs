//! `[train]`: the knobs every stage shares, and how a child stage inherits
//! them from its parent checkpoint.

use serde::{Deserialize, Serialize};

use crate::optim::{Schedule, learning_rate};

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
    /// GPUs of this process that share each micro-batch (CUDA builds with
    /// the `nccl` feature): its rows are split among devices `0..devices`,
    /// each runs forward and backward on its part on a copy of the weights,
    /// and the parts' gradients are summed with NCCL onto device 0, where
    /// the optimizer runs. 1 = one device. Not inherited by a child stage.
    pub devices: usize,
    /// Start from the parent checkpoint's optimizer moments instead of fresh
    /// ones (the parent must hold its final `train_state`: train it with
    /// `train.keep_state = true`). Not inherited by a child stage.
    pub carry_optimizer: bool,
    /// Also save `train_state` at the last step, so the checkpoint can be
    /// continued with its optimizer (`carry_optimizer`) or branched from
    /// (`pretrain --from-state`). Not inherited by a child stage.
    pub keep_state: bool,
    /// Globs over HF tensor names (`model.layers.[0-5].*`) whose tensors do
    /// not train: no gradient, no optimizer state, unchanged in the output.
    /// Not inherited by a child stage.
    pub freeze: Vec<String>,
    /// When not empty, only tensors matching one of these globs train (then
    /// `freeze` removes from that set). Not inherited by a child stage.
    pub train_only: Vec<String>,
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
            devices: 1,
            carry_optimizer: false,
            keep_state: false,
            freeze: Vec::new(),
            train_only: Vec::new(),
        }
    }
}

impl TrainConfig {
    /// Checks value ranges; the message names the key.
    pub fn validate(&self) -> Result<(), crate::error::InvalidSetting> {
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
                "train.devices must be from 1 to 64",
                (1..=64).contains(&self.devices),
            ),
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
            (
                "train.devices above 1 needs a CUDA build with the `nccl` feature (cargo build --release --no-default-features --features nccl)",
                self.devices <= 1 || cfg!(feature = "nccl"),
            ),
        ];
        match checks.iter().find(|(_, ok)| !ok) {
            Some((message, _)) => Err(message.to_string().into()),
            None => Ok(()),
        }
    }

    pub fn lr_at(&self, step: u64) -> f64 {
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
