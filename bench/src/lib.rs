//! What the criterion benches and the `versus` harness share: the shape of a
//! shipped config, a synthetic batch, one full training step (forward,
//! backward, gradient norm, AdamW — what `core::train` does per step), the
//! FLOPs formula and a measured matmul peak.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use baton_core::burn::module::AutodiffModule;
use baton_core::burn::tensor::backend::{AutodiffBackend, Backend};
use baton_core::burn::tensor::{Distribution, ElementConversion, Tensor};
use baton_core::config::ConfigSources;
use baton_core::model::{Llama, ModelConfig};
use baton_core::optim::{AdamW, AdamWConfig, global_grad_norm};
use baton_core::train::{Batch, TrainConfig, nll_grads, workers_for};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The model and training shape of a pretrain config file.
#[derive(Clone, Debug)]
pub struct Shape {
    pub name: String,
    pub model: ModelConfig,
    pub train: TrainConfig,
}

impl Shape {
    /// Resolves a pretrain config (defaults, the file, then `key=value` sets).
    pub fn load(path: &Path, sets: &[String]) -> Result<Self> {
        let cfg = baton_pretrain::load_config(&ConfigSources {
            builtin: Vec::new(),
            files: vec![path.to_path_buf()],
            sets: sets.to_vec(),
            env: false,
        })?;
        let mut name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("config")
            .to_string();
        if !sets.is_empty() {
            name = format!("{name} [{}]", sets.join(", "));
        }
        Ok(Self {
            name,
            model: cfg.model,
            train: cfg.train,
        })
    }

    pub fn tokens_per_step(&self) -> usize {
        self.train.batch_size * self.train.seq_len
    }
}

/// A seeded language-modelling batch of uniformly random ids (the cost of a
/// step does not depend on which ids).
pub fn random_batch(vocab: usize, batch: usize, seq: usize, seed: u64) -> Batch {
    let mut rng = StdRng::seed_from_u64(seed);
    let ids: Vec<u32> = (0..batch * (seq + 1))
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    let mut inputs = Vec::with_capacity(batch * seq);
    let mut targets = Vec::with_capacity(batch * seq);
    for row in ids.chunks(seq + 1) {
        inputs.extend_from_slice(&row[..seq]);
        targets.extend_from_slice(&row[1..]);
    }
    Batch::dense(batch, seq, inputs, targets)
}

/// One model, its optimizer state and a batch: [`Stepper::step`] is one
/// training step as the training loop runs it.
pub struct Stepper<B: AutodiffBackend> {
    model: Option<Llama<B>>,
    optim: AdamW<B::InnerBackend>,
    pub batch: Batch,
    train: TrainConfig,
    device: B::Device,
}

impl<B: AutodiffBackend> Stepper<B> {
    pub fn new(shape: &Shape, seed: u64, device: &B::Device) -> Self {
        let t = &shape.train;
        Self {
            model: Some(shape.model.init::<B>(seed, device)),
            optim: AdamW::new(AdamWConfig {
                beta1: t.beta1,
                beta2: t.beta2,
                eps: t.eps,
                weight_decay: t.weight_decay,
            }),
            batch: random_batch(shape.model.vocab_size, t.batch_size, t.seq_len, seed),
            train: t.clone(),
            device: device.clone(),
        }
    }

    pub fn model(&self) -> &Llama<B> {
        self.model.as_ref().expect("model present between steps")
    }

    /// Forward and backward (rows shared among `train.workers` threads on CPU
    /// backends, as the training loop does), global gradient norm, clipped
    /// AdamW at the config's peak learning rate; returns the mean loss. Reading the loss and the
    /// norm back to the host waits for the device.
    pub fn step(&mut self) -> f64 {
        let model = self.model.take().expect("model present between steps");
        let tokens = self.batch.supervised_tokens();
        let workers = workers_for::<B>(&self.train, &self.device);
        let (nll, grads) = nll_grads(&model, &self.batch, workers, tokens, &self.device);
        let loss = nll / tokens;
        let norm = global_grad_norm(&model, &grads);
        let model =
            self.optim
                .step::<B, _>(model, grads, self.train.lr, norm, self.train.grad_clip);
        // Finish the update before the clock can stop.
        let _ = sync_model(&model);
        self.model = Some(model);
        loss
    }
}

/// Reads one value of the model back, which waits for queued work.
pub fn sync_model<B: AutodiffBackend>(model: &Llama<B>) -> f32 {
    let valid = model.valid();
    valid
        .model
        .norm
        .weight
        .val()
        .sum()
        .into_scalar()
        .elem::<f32>()
}

/// Parameters that take part in matmuls: every layer's projections and the
/// LM head (`vocab × d_model`, counted once whether or not it is tied).
pub fn matmul_params(c: &ModelConfig) -> f64 {
    let (d, f) = (c.d_model as f64, c.d_ff as f64);
    let kv = (c.n_kv_heads * c.head_dim()) as f64;
    let per_layer = d * d * 2.0 + d * kv * 2.0 + 3.0 * d * f;
    c.n_layers as f64 * per_layer + c.vocab_size as f64 * d
}

/// Training FLOPs per token: `6·N + 12·L·d·T` (N = [`matmul_params`]; the
/// second term is attention's scores and weighted sum, forward and backward,
/// over the full `T × T` square as in PaLM/nanoGPT).
pub fn flops_per_token(c: &ModelConfig, seq: usize) -> f64 {
    6.0 * matmul_params(c) + 12.0 * (c.n_layers * c.d_model * seq) as f64
}

/// Best-of-`reps` f32 FLOP/s of an `n × n` by `n × n` matmul on `device`.
pub fn matmul_peak<B: Backend>(n: usize, reps: usize, device: &B::Device) -> f64 {
    let a = Tensor::<B, 2>::random([n, n], Distribution::Normal(0.0, 1.0), device);
    let b = Tensor::<B, 2>::random([n, n], Distribution::Normal(0.0, 1.0), device);
    let sync = |t: Tensor<B, 2>| t.slice([0..1, 0..1]).into_scalar().elem::<f32>();
    sync(a.clone().matmul(b.clone()));
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        sync(a.clone().matmul(b.clone()));
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (n as f64).powi(3) / best
}

/// This process's peak resident memory in bytes (`VmHWM` of
/// `/proc/self/status`; `None` where that file does not exist).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
