//! The Llama-style decoder, top to bottom in one file.
//!
//! Token embedding → `n_layers` × (RMSNorm → grouped-query causal attention with
//! rotate-half RoPE → residual → RMSNorm → SwiGLU MLP → residual) → RMSNorm →
//! LM head (tied to the embedding or its own matrix). No biases.
//!
//! Field names mirror Hugging Face's `LlamaForCausalLM`, so the module path of
//! every parameter (`model.layers.0.self_attn.q_proj.weight`, …) *is* its HF
//! tensor name. Linear weights are held as `[in, out]` (what `x.matmul(w)`
//! wants); `checkpoint.rs` transposes them to HF's `[out, in]` on disk.

use burn::module::{Module, Param};
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use crate::kernels;
use crate::moe::{Balance, Expert, MoeConfig, Router, SparseMoe};

/// Architecture of a decoder. Stored in every manifest and (as HF `LlamaConfig`)
/// in `config.json`; downstream stages never re-declare it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_ff: usize,
    pub max_seq_len: usize,
    pub rope_theta: f64,
    pub norm_eps: f64,
    pub tie_embeddings: bool,
    /// Sparse feed-forward layers (`None`: every layer dense).
    #[serde(default)]
    pub moe: Option<MoeConfig>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vocab_size: 1024,
            d_model: 128,
            n_layers: 4,
            n_heads: 4,
            n_kv_heads: 4,
            d_ff: 384,
            max_seq_len: 128,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            // Untied: with a tied head, tokens the corpus rarely shows (digits
            // in Shakespeare) get the same push from every softmax and their
            // embeddings collapse onto one direction, which SFT on arithmetic
            // then has to undo (README, "Why the default head is untied").
            tie_embeddings: false,
            moe: None,
        }
    }
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Checks the invariants the forward pass relies on; the message names the key.
    pub fn validate(&self) -> Result<(), crate::error::InvalidSetting> {
        let positive = [
            ("model.vocab_size", self.vocab_size),
            ("model.d_model", self.d_model),
            ("model.n_layers", self.n_layers),
            ("model.n_heads", self.n_heads),
            ("model.n_kv_heads", self.n_kv_heads),
            ("model.d_ff", self.d_ff),
            ("model.max_seq_len", self.max_seq_len),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(format!("{key} must be positive").into());
            }
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(format!(
                "model.d_model ({}) must be divisible by model.n_heads ({})",
                self.d_model, self.n_heads
            )
            .into());
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err("model.d_model / model.n_heads must be even for RoPE".into());
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(format!(
                "model.n_heads ({}) must be a multiple of model.n_kv_heads ({})",
                self.n_heads, self.n_kv_heads
            )
            .into());
        }
        if !(self.rope_theta > 0.0
            && self.norm_eps > 0.0
            && self.rope_theta.is_finite()
            && self.norm_eps.is_finite())
        {
            return Err("model.rope_theta and model.norm_eps must be positive and finite".into());
        }
        // Far above any model this code trains, far below what would exhaust
        // memory before a shape is checked.
        let limits = [
            ("model.vocab_size", self.vocab_size, 1 << 21),
            ("model.d_model", self.d_model, 1 << 16),
            ("model.n_layers", self.n_layers, 1 << 10),
            ("model.n_heads", self.n_heads, 1 << 10),
            ("model.d_ff", self.d_ff, 1 << 18),
            ("model.max_seq_len", self.max_seq_len, 1 << 20),
        ];
        for (key, value, limit) in limits {
            if value > limit {
                return Err(format!("{key} = {value} is above Baton's limit of {limit}").into());
            }
        }
        if let Some(moe) = &self.moe {
            moe.validate()?;
        }
        const MAX_PARAMS: usize = 20_000_000_000;
        if self.num_params() > MAX_PARAMS {
            return Err(format!(
                "the model would have {} parameters, above Baton's limit of {MAX_PARAMS}",
                self.num_params()
            )
            .into());
        }
        Ok(())
    }

    /// Every parameter's HF name and on-disk (HF, `[out, in]`) shape.
    pub fn hf_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, ff, kv) = (self.d_model, self.d_ff, self.n_kv_heads * self.head_dim());
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, d],
        )];
        for i in 0..self.n_layers {
            let p = format!("model.layers.{i}");
            out.extend([
                (format!("{p}.self_attn.q_proj.weight"), vec![d, d]),
                (format!("{p}.self_attn.k_proj.weight"), vec![kv, d]),
                (format!("{p}.self_attn.v_proj.weight"), vec![kv, d]),
                (format!("{p}.self_attn.o_proj.weight"), vec![d, d]),
                (format!("{p}.input_layernorm.weight"), vec![d]),
                (format!("{p}.post_attention_layernorm.weight"), vec![d]),
            ]);
            match self.sparse(i) {
                Some(moe) => {
                    let m = format!("{p}.block_sparse_moe");
                    out.push((format!("{m}.gate.weight"), vec![moe.experts, d]));
                    for j in 0..moe.experts {
                        out.extend([
                            (format!("{m}.experts.{j}.w1.weight"), vec![ff, d]),
                            (format!("{m}.experts.{j}.w2.weight"), vec![d, ff]),
                            (format!("{m}.experts.{j}.w3.weight"), vec![ff, d]),
                        ]);
                    }
                }
                None => out.extend([
                    (format!("{p}.mlp.gate_proj.weight"), vec![ff, d]),
                    (format!("{p}.mlp.up_proj.weight"), vec![ff, d]),
                    (format!("{p}.mlp.down_proj.weight"), vec![d, ff]),
                ]),
            }
        }
        out.push(("model.norm.weight".to_string(), vec![d]));
        if !self.tie_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, d]));
        }
        out
    }

    /// The routing of layer `i` when it is sparse.
    pub fn sparse(&self, layer: usize) -> Option<&MoeConfig> {
        self.moe.as_ref().filter(|m| m.is_sparse(layer))
    }

    /// Number of parameters, counting a tied head once.
    pub fn num_params(&self) -> usize {
        self.params(false)
    }

    /// Parameters a token passes through: a sparse layer counts its router
    /// and `top_k` experts (what sets a step's FLOPs).
    pub fn active_params(&self) -> usize {
        self.params(true)
    }

    fn params(&self, active: bool) -> usize {
        let d = self.d_model;
        let kv = self.n_kv_heads * self.head_dim();
        let ffn = 3 * d * self.d_ff;
        let layers: usize = (0..self.n_layers)
            .map(|i| {
                let ffn = match self.sparse(i) {
                    Some(m) if active => m.top_k * ffn + m.experts * d,
                    Some(m) => m.experts * (ffn + d),
                    None => ffn,
                };
                2 * d * d + 2 * d * kv + ffn + 2 * d
            })
            .sum();
        let head = if self.tie_embeddings {
            0
        } else {
            d * self.vocab_size
        };
        self.vocab_size * d + layers + d + head
    }

    /// Builds a freshly initialised model the way LLMs are initialised: normal
    /// weights with std 0.02, residual output projections (`o_proj`, `down_proj`)
    /// scaled by 1/sqrt(2·n_layers), norms at one. The draw comes from a seeded
    /// host RNG, so the same seed gives the same weights on every backend.
    pub fn init<B: Backend>(&self, seed: u64, device: &B::Device) -> Llama<B> {
        let mut rng = StdRng::seed_from_u64(seed);
        let std = 0.02;
        let residual_std = std / (2.0 * self.n_layers as f64).sqrt();
        let d = self.d_model;
        let kv = self.n_kv_heads * self.head_dim();
        let mut linear = |d_in: usize, d_out: usize, std: f64| {
            Linear::new(Param::from_data(
                normal_data(&mut rng, [d_in, d_out], std),
                device,
            ))
        };
        let mut layers = Vec::with_capacity(self.n_layers);
        for i in 0..self.n_layers {
            // Attention is drawn before the feed-forward block (the order
            // every seed's weights depend on).
            let self_attn = Attention {
                q_proj: linear(d, d, std),
                k_proj: linear(d, kv, std),
                v_proj: linear(d, kv, std),
                o_proj: linear(d, d, residual_std),
                n_heads: self.n_heads,
                n_kv_heads: self.n_kv_heads,
            };
            let (mlp, block_sparse_moe) = match self.sparse(i) {
                None => (
                    Some(Mlp {
                        gate_proj: linear(d, self.d_ff, std),
                        up_proj: linear(d, self.d_ff, std),
                        down_proj: linear(self.d_ff, d, residual_std),
                    }),
                    None,
                ),
                Some(moe) => {
                    let gate = linear(d, moe.experts, std).weight;
                    let experts = (0..moe.experts)
                        .map(|_| {
                            let w1 = linear(d, self.d_ff, std).weight;
                            let w3 = linear(d, self.d_ff, std).weight;
                            let w2 = linear(self.d_ff, d, residual_std).weight;
                            Expert::new(w1, w2, w3)
                        })
                        .collect();
                    let moe = SparseMoe {
                        gate: Router { weight: gate },
                        experts,
                        top_k: moe.top_k,
                    };
                    (None, Some(moe))
                }
            };
            layers.push(DecoderLayer {
                self_attn,
                mlp,
                block_sparse_moe,
                input_layernorm: RmsNorm::ones(d, self.norm_eps, device),
                post_attention_layernorm: RmsNorm::ones(d, self.norm_eps, device),
            });
        }
        let lm_head = (!self.tie_embeddings).then(|| linear(d, self.vocab_size, std));
        let embed_tokens = Embedding {
            weight: Param::from_data(normal_data(&mut rng, [self.vocab_size, d], std), device),
        };
        Llama {
            model: LlamaModel {
                embed_tokens,
                layers,
                norm: RmsNorm::ones(d, self.norm_eps, device),
            },
            lm_head,
            rope: Rope::new(self.head_dim(), self.max_seq_len, self.rope_theta, device),
            growth: None,
            balance: None,
        }
    }
}

fn normal_data<const D: usize>(rng: &mut StdRng, shape: [usize; D], std: f64) -> TensorData {
    let n: usize = shape.iter().product();
    let mut values = Vec::with_capacity(n);
    while values.len() < n {
        // Box–Muller: two uniforms in (0, 1] give two independent normals.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let radius = (-2.0 * u1.ln()).sqrt() * std;
        let angle = std::f64::consts::TAU * u2;
        values.push((radius * angle.cos()) as f32);
        if values.len() < n {
            values.push((radius * angle.sin()) as f32);
        }
    }
    TensorData::new(values, shape)
}

/// Token embedding table, `[vocab, d_model]` (same layout as HF).
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
}

/// A bias-free linear map; `weight` is `[in, out]`, with an optional LoRA
/// adapter beside it (`crate::lora`).
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub lora: Option<LoraAdapter<B>>,
}

/// A low-rank update `scale · A·B` of a linear map: `a` is `[in, rank]`, `b`
/// is `[rank, out]` (the transposes of PEFT's `lora_A`/`lora_B` weights).
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    pub a: Param<Tensor<B, 2>>,
    pub b: Param<Tensor<B, 2>>,
    /// `alpha / rank`.
    pub scale: f64,
    /// Dropout on the adapter's input while training (`crate::dropout`).
    pub dropout: f64,
}

impl<B: Backend> Linear<B> {
    pub fn new(weight: Param<Tensor<B, 2>>) -> Self {
        Self { weight, lora: None }
    }

    /// `x · W`, plus `scale · (x · A) · B` with an adapter: two thin matmuls
    /// instead of forming `W + scale·A·B`, so the frozen `W` needs no
    /// gradient and the adapter's cost stays `O(rank)`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let y = rows_matmul(x.clone(), self.weight.val());
        match &self.lora {
            None => y,
            Some(l) => {
                let x = match crate::dropout::dropout_mask::<B, D>(&x, l.dropout) {
                    Some(mask) => x * mask,
                    None => x,
                };
                // The scale applies to the thin `x·A`, not the wide output.
                y + rows_matmul(rows_matmul(x, l.a.val()).mul_scalar(l.scale), l.b.val())
            }
        }
    }

    /// `W + scale·A·B` (just `W` without an adapter).
    pub fn effective_weight(&self) -> Tensor<B, 2> {
        match &self.lora {
            None => self.weight.val(),
            Some(l) => self.weight.val() + l.a.val().matmul(l.b.val()).mul_scalar(l.scale),
        }
    }
}

/// `x · w` for `x: [..., in]` and `w: [in, out]` as one 2-D matmul over all
/// leading positions. CPU backends otherwise run a batched matmul (one small
/// GEMM per batch row, and in backward a batch of weight gradients summed
/// afterwards), which is markedly slower (bench/README.md).
pub fn rows_matmul<B: Backend, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 2>) -> Tensor<B, D> {
    let mut dims = x.dims();
    let rows = dims[..D - 1].iter().product();
    let out = x.reshape([rows, dims[D - 1]]).matmul(w);
    dims[D - 1] = out.dims()[1];
    out.reshape(dims)
}

/// Root-mean-square layer norm with a learned gain.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    fn ones(d: usize, eps: f64, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([d], device)),
            eps,
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        kernels::rms_norm(x, self.weight.val(), self.eps)
    }

    /// The tensor formulation every backend without a fused kernel runs (and
    /// the reference the fused kernel is benched against).
    pub fn forward_plain(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        kernels::rms_norm_tensor(x, self.weight.val(), self.eps)
    }
}

/// Rotate-half rotary embeddings (HF Llama convention: pairs `(x[i], x[i+d/2])`),
/// so q/k weights need no permutation to load in `transformers`.
#[derive(Module, Debug)]
pub struct Rope<B: Backend> {
    /// `[max_seq_len, head_dim]`, each half repeating the same frequencies.
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
}

impl<B: Backend> Rope<B> {
    pub fn new(head_dim: usize, max_seq_len: usize, theta: f64, device: &B::Device) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_seq_len * head_dim);
        let mut sin = Vec::with_capacity(max_seq_len * head_dim);
        for pos in 0..max_seq_len {
            for i in 0..head_dim {
                let inv_freq = theta.powf(-((2 * (i % half)) as f64) / head_dim as f64);
                let angle = pos as f64 * inv_freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self {
            cos: Tensor::from_data(TensorData::new(cos, [max_seq_len, head_dim]), device),
            sin: Tensor::from_data(TensorData::new(sin, [max_seq_len, head_dim]), device),
        }
    }

    pub fn max_seq_len(&self) -> usize {
        self.cos.dims()[0]
    }

    /// `cos`/`sin` for the given positions, shaped `[batch, 1, seq, head_dim]`.
    pub fn tables(&self, positions: &Positions<B>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        match positions {
            Positions::Contiguous { start, len } => {
                let cos = self.cos.clone().narrow(0, *start, *len);
                let sin = self.sin.clone().narrow(0, *start, *len);
                (cos.unsqueeze(), sin.unsqueeze())
            }
            Positions::PerToken(ids) => {
                let [batch, seq] = ids.dims();
                let flat = ids.clone().reshape([batch * seq]);
                let hd = self.cos.dims()[1];
                let cos = self.cos.clone().select(0, flat.clone());
                let sin = self.sin.clone().select(0, flat);
                (
                    cos.reshape([batch, 1, seq, hd]),
                    sin.reshape([batch, 1, seq, hd]),
                )
            }
        }
    }

    /// `cos`/`sin` for the given positions tiled over `heads` heads, as rows
    /// that multiply a projection's output reshaped to `[batch, seq·heads·head_dim]`:
    /// `[1, …]` for contiguous positions (broadcast over the batch), `[batch, …]`
    /// per token. Two-dimensional on purpose: CPU backends broadcast a row over a
    /// matrix far faster than a table over a 4-D tensor.
    pub fn rows(&self, positions: &Positions<B>, heads: usize) -> RopeRows<B> {
        let hd = self.cos.dims()[1];
        let tile = |t: Tensor<B, 2>, rows: usize| {
            let n = t.dims()[0];
            t.unsqueeze_dim::<3>(1)
                .repeat_dim(1, heads)
                .reshape([rows, n / rows * heads * hd])
        };
        match positions {
            Positions::Contiguous { start, len } => RopeRows {
                cos: tile(self.cos.clone().narrow(0, *start, *len), 1),
                sin: tile(self.sin.clone().narrow(0, *start, *len), 1),
            },
            Positions::PerToken(ids) => {
                let [batch, seq] = ids.dims();
                let flat = ids.clone().reshape([batch * seq]);
                RopeRows {
                    cos: tile(self.cos.clone().select(0, flat.clone()), batch),
                    sin: tile(self.sin.clone().select(0, flat), batch),
                }
            }
        }
    }

    /// The tables on the host and each token's position, `[batch·seq]`, for
    /// [`kernels::attention`].
    pub fn tables_for_kernel(&self, positions: &Positions<B>, batch: usize) -> kernels::RopeTables {
        let host = |t: &Tensor<B, 2>| -> Arc<Vec<f32>> {
            Arc::new(t.to_data().convert::<f32>().to_vec().expect("f32 table"))
        };
        let positions = match positions {
            Positions::Contiguous { start, len } => (0..batch)
                .flat_map(|_| (*start..start + len).map(|p| p as u32))
                .collect(),
            Positions::PerToken(ids) => ids
                .to_data()
                .convert::<i64>()
                .to_vec::<i64>()
                .expect("integer positions")
                .into_iter()
                .map(|p| p as u32)
                .collect(),
        };
        kernels::RopeTables {
            cos: host(&self.cos),
            sin: host(&self.sin),
            head_dim: self.cos.dims()[1],
            positions: Arc::new(positions),
        }
    }

    /// `w` (`[in, heads·head_dim]`) with its output columns rotated the way
    /// `rotate_half` rotates each head: `x·rotate_cols(w) = rotate_half(x·w)`.
    /// The fast RoPE path computes the rotated projection as one more matmul
    /// instead of slicing and concatenating activations.
    pub fn rotate_cols(w: Tensor<B, 2>, heads: usize) -> Tensor<B, 2> {
        let [d_in, out] = w.dims();
        let half = out / heads / 2;
        let w = w.reshape([d_in, heads, 2, half]);
        let first = w.clone().slice([0..d_in, 0..heads, 0..1, 0..half]);
        let second = w.slice([0..d_in, 0..heads, 1..2, 0..half]);
        Tensor::cat(vec![second.neg(), first], 2).reshape([d_in, out])
    }

    /// Applies the rotation to `x: [batch, heads, seq, head_dim]` (the plain
    /// reference the fast path in [`Attention::forward`] is tested against).
    pub fn apply(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, h, t, d] = x.dims();
        let half = d / 2;
        let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..half]);
        let x2 = x.clone().slice([0..b, 0..h, 0..t, half..d]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x.mul(cos.clone()).add(rotated.mul(sin.clone()))
    }
}

/// Where each token sits in its document, for RoPE.
pub enum Positions<B: Backend> {
    /// Every row holds positions `start..start+len` (plain training, KV-cached decoding).
    Contiguous { start: usize, len: usize },
    /// Explicit positions `[batch, seq]`, e.g. restarting at zero per packed document.
    PerToken(Tensor<B, 2, Int>),
}

/// RoPE `cos`/`sin` rows for one projection width (see [`Rope::rows`]).
pub struct RopeRows<B: Backend> {
    pub cos: Tensor<B, 2>,
    pub sin: Tensor<B, 2>,
}

impl<B: Backend> RopeRows<B> {
    /// Rotates `y = x·w` given `y_rot = x·rotate_cols(w)`, both `[batch, seq, width]`.
    pub fn rotate(&self, y: Tensor<B, 3>, y_rot: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, w] = y.dims();
        let flat = |x: Tensor<B, 3>| x.reshape([b, t * w]);
        (flat(y).mul(self.cos.clone()) + flat(y_rot).mul(self.sin.clone())).reshape([b, t, w])
    }
}

/// What one forward pass shares across layers: RoPE rows for queries and keys,
/// and the mask, as the first visible key of each query for the fused kernel
/// ([`kernels::attention`]) or as an additive bias for the plain path.
pub struct LayerInputs<B: Backend> {
    pub rope_q: RopeRows<B>,
    pub rope_k: RopeRows<B>,
    /// `0`/`-1e9` added to the scores reshaped `[batch·heads, seq_q·seq_k]`:
    /// `[1, …]` for a causal mask, `[batch·heads, …]` for packed documents;
    /// `None` when nothing is blocked (one query over its whole past) or when
    /// the fused kernel runs.
    pub bias: Option<Tensor<B, 2>>,
    /// First visible key of each query (`[batch·seq]`, row-major) when the
    /// fused kernel runs this pass: the backend has one and no keys are cached.
    pub first: Option<Arc<Vec<u32>>>,
    /// RoPE tables and positions for the fused kernel, which then rotates
    /// queries and keys itself (set with `first`).
    pub rope: Option<kernels::RopeTables>,
    /// Growth masks of this pass, while they ramp.
    pub masks: Option<GrowthMasks<B>>,
}

impl<B: Backend> LayerInputs<B> {
    /// For `seq` new positions after `past` cached ones, in `batch` rows.
    /// `fused = false` keeps the plain tensor path even where a fused kernel
    /// exists (benches and tests compare the two).
    pub fn new(
        rope: &Rope<B>,
        attention: &Attention<B>,
        positions: &Positions<B>,
        mask: &AttentionMask,
        [batch, past, seq]: [usize; 3],
        fused: bool,
        device: &B::Device,
    ) -> Self {
        let seq_k = past + seq;
        // Left padding without a cache is a block-diagonal mask: a padding
        // query sees only itself (so it stays finite), a real query the row
        // from its first real key on.
        let padded_first = |pads: &[u32]| -> Arc<Vec<u32>> {
            Arc::new(
                pads.iter()
                    .flat_map(|&pad| (0..seq as u32).map(move |q| if q < pad { q } else { pad }))
                    .collect(),
            )
        };
        let mask = &match mask {
            AttentionMask::LeftPadded(pads) if past == 0 => {
                AttentionMask::Documents(padded_first(pads))
            }
            other => other.clone(),
        };
        let first = match mask {
            _ if !kernels::fused_attention::<B>(fused, past) => None,
            AttentionMask::Causal => Some(Arc::new(vec![0; batch * seq])),
            AttentionMask::Documents(first) => Some(first.clone()),
            AttentionMask::LeftPadded(_) => None,
        };
        let bias = match mask {
            _ if first.is_some() => None,
            AttentionMask::Causal if seq > 1 => {
                // `tril_mask` is `true` above the diagonal: query i (absolute
                // position past + i) sees keys up to there.
                let blocked = Tensor::<B, 2, Bool>::tril_mask([seq, seq_k], past as i64, device);
                let bias = Tensor::<B, 2>::zeros([seq, seq_k], device).mask_fill(blocked, -1e9);
                Some(bias.reshape([1, seq * seq_k]))
            }
            AttentionMask::Causal => None,
            AttentionMask::Documents(first) => {
                assert_eq!(past, 0, "packed documents are not decoded with a cache");
                let blocked: Vec<bool> = first
                    .iter()
                    .enumerate()
                    .flat_map(|(row_q, &lo)| {
                        let q = row_q % seq;
                        (0..seq).map(move |k| k > q || k < lo as usize)
                    })
                    .collect();
                let blocked = Tensor::<B, 4, Bool>::from_data(
                    TensorData::new(blocked, [batch, 1, seq, seq]),
                    device,
                );
                let bias = Tensor::<B, 4>::zeros([batch, 1, seq, seq], device)
                    .mask_fill(blocked, -1e9)
                    .repeat_dim(1, attention.n_heads);
                Some(bias.reshape([batch * attention.n_heads, seq * seq]))
            }
            AttentionMask::LeftPadded(pads) => {
                // After a cache: query i (slot past + i) of row r sees keys
                // pads[r]..=past + i.
                let blocked: Vec<bool> = pads
                    .iter()
                    .flat_map(|&pad| {
                        (0..seq).flat_map(move |q| {
                            (0..seq_k).map(move |k| k > past + q || k < pad as usize)
                        })
                    })
                    .collect();
                let blocked = Tensor::<B, 4, Bool>::from_data(
                    TensorData::new(blocked, [batch, 1, seq, seq_k]),
                    device,
                );
                let bias = Tensor::<B, 4>::zeros([batch, 1, seq, seq_k], device)
                    .mask_fill(blocked, -1e9)
                    .repeat_dim(1, attention.n_heads);
                Some(bias.reshape([batch * attention.n_heads, seq * seq_k]))
            }
        };
        let tables = first
            .as_ref()
            .map(|_| rope.tables_for_kernel(positions, batch));
        Self {
            rope_q: rope.rows(positions, attention.n_heads),
            rope_k: rope.rows(positions, attention.n_kv_heads),
            bias,
            first,
            rope: tables,
            masks: None,
        }
    }
}

/// Which keys each query may attend to.
#[derive(Clone, Debug)]
pub enum AttentionMask {
    /// Plain causal mask over the whole row.
    Causal,
    /// Packed documents, each a contiguous run of positions: entry
    /// `row·seq + q` is the first position of query `q`'s document, and the
    /// query sees keys from there up to itself (block-diagonal causal).
    Documents(Arc<Vec<u32>>),
    /// Rows of different lengths left-padded to one (batched generation):
    /// entry `r` is the number of padding slots that start row `r`, which no
    /// real query sees; causal otherwise, with or without a cache.
    LeftPadded(Arc<Vec<u32>>),
}

impl AttentionMask {
    /// [`AttentionMask::Documents`] from per-token document ids (`[batch·seq]`),
    /// where a document is a run of equal ids. `None` when an id comes back
    /// after another document started, which this mask cannot express.
    pub fn documents(doc_ids: &[u32], seq: usize) -> Option<Self> {
        let mut first = Vec::with_capacity(doc_ids.len());
        for row in doc_ids.chunks(seq) {
            let mut seen = std::collections::HashSet::new();
            let mut start = 0;
            for (q, &id) in row.iter().enumerate() {
                if q > 0 && id != row[q - 1] {
                    start = q;
                    if seen.contains(&id) {
                        return None;
                    }
                }
                seen.insert(id);
                first.push(start as u32);
            }
        }
        Some(Self::Documents(Arc::new(first)))
    }
}

/// Keys and values of earlier positions for one layer, `[batch, kv_heads, seq, head_dim]`.
#[derive(Clone, Debug)]
pub struct LayerCache<B: Backend> {
    pub keys: Tensor<B, 4>,
    pub values: Tensor<B, 4>,
}

/// Grouped-query causal self-attention.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
}

impl<B: Backend> Attention<B> {
    /// `x: [batch, seq, d_model]`. RoPE is applied in the projections' own
    /// `[batch, seq, width]` layout (one extra matmul with the rotated weight,
    /// row-broadcast multiplies) and the mask is an additive bias on the scores
    /// viewed as a matrix: the same numbers as [`Rope::apply`] and `mask_fill`,
    /// with no 4-D broadcasts, which CPU backends run slowly.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        inputs: &LayerInputs<B>,
        cache: Option<&mut Option<LayerCache<B>>>,
    ) -> Tensor<B, 3> {
        let [batch, seq, d_model] = x.dims();
        let head_dim = d_model / self.n_heads;
        let heads =
            |t: Tensor<B, 3>, n: usize| t.reshape([batch, seq, n, head_dim]).swap_dims(1, 2);
        let rotated = |proj: &Linear<B>, n: usize, rows: &RopeRows<B>| {
            let w = proj.effective_weight();
            let y = rows_matmul(x.clone(), w.clone());
            let y_rot = rows_matmul(x.clone(), Rope::rotate_cols(w, n));
            rows.rotate(y, y_rot)
        };
        if let Some(first) = &inputs.first {
            let heads_kv = [self.n_heads, self.n_kv_heads];
            let v = self.v_proj.forward(x.clone());
            let out = match cache {
                // A cache keeps rotated keys: rotate them here.
                Some(slot) => {
                    let q = rotated(&self.q_proj, self.n_heads, &inputs.rope_q);
                    let k = rotated(&self.k_proj, self.n_kv_heads, &inputs.rope_k);
                    *slot = Some(LayerCache {
                        keys: heads(k.clone(), self.n_kv_heads),
                        values: heads(v.clone(), self.n_kv_heads),
                    });
                    kernels::attention(q, k, v, heads_kv, first.clone(), None)
                }
                // The kernel rotates queries and keys itself.
                None => kernels::attention(
                    self.q_proj.forward(x.clone()),
                    self.k_proj.forward(x.clone()),
                    v,
                    heads_kv,
                    first.clone(),
                    inputs.rope.clone(),
                ),
            };
            return self.o_proj.forward(GrowthMasks::heads(inputs, out));
        }
        let q = heads(
            rotated(&self.q_proj, self.n_heads, &inputs.rope_q),
            self.n_heads,
        );
        let mut k = heads(
            rotated(&self.k_proj, self.n_kv_heads, &inputs.rope_k),
            self.n_kv_heads,
        );
        let mut v = heads(self.v_proj.forward(x.clone()), self.n_kv_heads);
        if let Some(slot) = cache {
            if let Some(past) = slot.take() {
                k = Tensor::cat(vec![past.keys, k], 2);
                v = Tensor::cat(vec![past.values, v], 2);
            }
            *slot = Some(LayerCache {
                keys: k.clone(),
                values: v.clone(),
            });
        }
        let seq_k = k.dims()[2];
        let (k, v) = (self.repeat_kv(k), self.repeat_kv(v));
        let scale = (head_dim as f64).sqrt().recip();
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
        let scores = match &inputs.bias {
            Some(bias) => scores
                .reshape([batch * self.n_heads, seq * seq_k])
                .add(bias.clone())
                .reshape([batch, self.n_heads, seq, seq_k]),
            None => scores,
        };
        let out = softmax(scores, 3).matmul(v);
        let out = out.swap_dims(1, 2).reshape([batch, seq, d_model]);
        self.o_proj.forward(GrowthMasks::heads(inputs, out))
    }

    fn repeat_kv(&self, t: Tensor<B, 4>) -> Tensor<B, 4> {
        let n_rep = self.n_heads / self.n_kv_heads;
        if n_rep == 1 {
            return t;
        }
        let [b, kvh, s, hd] = t.dims();
        t.unsqueeze_dim::<5>(2)
            .repeat_dim(2, n_rep)
            .reshape([b, kvh * n_rep, s, hd])
    }
}

/// SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_masked(x, None)
    }

    /// [`Mlp::forward`] with the hidden units multiplied by `mask` (`[d_ff]`)
    /// before the down projection: a grown model's new units.
    pub fn forward_masked(&self, x: Tensor<B, 3>, mask: Option<&Tensor<B, 1>>) -> Tensor<B, 3> {
        let (gate, up) = (self.gate_proj.forward(x.clone()), self.up_proj.forward(x));
        let hidden = kernels::swiglu(gate, up);
        let hidden = match mask {
            Some(mask) => hidden.mul(mask.clone().unsqueeze()),
            None => hidden,
        };
        self.down_proj.forward(hidden)
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    /// The dense feed-forward block (`None` in a sparse layer).
    pub mlp: Option<Mlp<B>>,
    /// The sparse one (`None` in a dense layer).
    pub block_sparse_moe: Option<SparseMoe<B>>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
}

#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

/// The whole decoder with its LM head (`LlamaForCausalLM`).
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    pub model: LlamaModel<B>,
    /// `None` when the head is tied to `model.embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    pub rope: Rope<B>,
    /// The masks of a model grown by `baton grow` while they ramp (`None`
    /// for every other model; not a parameter, never saved).
    pub growth: Option<Growth>,
    /// The load-balancing state of a training run of an MoE model (`None`
    /// otherwise; not a parameter, never saved).
    pub balance: Option<Balance>,
}

/// Rows per block of the LM head matmul (see `Llama::head`).
pub const HEAD_ROWS: usize = 256;

/// Per-layer KV cache for incremental decoding.
pub struct KvCache<B: Backend> {
    layers: Vec<Option<LayerCache<B>>>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |c| c.keys.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the rows `keep` (in that order) of every layer's keys and
    /// values: finished rows leave a batched generation.
    pub fn select_rows(&mut self, keep: &[usize]) {
        for layer in self.layers.iter_mut().flatten() {
            let device = layer.keys.device();
            let idx: Vec<i32> = keep.iter().map(|&r| r as i32).collect();
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [keep.len()]), &device);
            layer.keys = layer.keys.clone().select(0, idx.clone());
            layer.values = layer.values.clone().select(0, idx);
        }
    }
}

impl<B: Backend> Llama<B> {
    /// The device the model's tensors live on.
    pub fn device(&self) -> B::Device {
        self.rope.cos.device()
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`, causal attention,
    /// positions `0..seq`.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let seq = ids.dims()[1];
        self.forward_with(
            ids,
            &Positions::Contiguous { start: 0, len: seq },
            &AttentionMask::Causal,
        )
    }

    /// Logits with explicit positions and attention mask (packed documents).
    pub fn forward_with(
        &self,
        ids: Tensor<B, 2, Int>,
        positions: &Positions<B>,
        mask: &AttentionMask,
    ) -> Tensor<B, 3> {
        let (hidden, _) = self.hidden(ids, positions, mask, None);
        self.head(hidden)
    }

    /// [`Llama::forward_with`] and, for an MoE model being trained with a
    /// [`Balance`], its auxiliary loss (the sparse layers' mean of
    /// `balance_weight · LBL + z_weight · z`).
    pub fn forward_with_aux(
        &self,
        ids: Tensor<B, 2, Int>,
        positions: &Positions<B>,
        mask: &AttentionMask,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 1>>) {
        let (hidden, aux) = self.hidden(ids, positions, mask, None);
        (self.head(hidden), aux)
    }

    /// The final hidden states without the LM head (routing a text through
    /// an MoE model without paying for the logits).
    pub fn forward_hidden(
        &self,
        ids: Tensor<B, 2, Int>,
        positions: &Positions<B>,
        mask: &AttentionMask,
    ) -> Tensor<B, 3> {
        self.hidden(ids, positions, mask, None).0
    }

    /// [`Llama::forward_cached`] with explicit positions and mask (left-padded
    /// rows of a batched generation).
    pub fn forward_cached_with(
        &self,
        ids: Tensor<B, 2, Int>,
        positions: &Positions<B>,
        mask: &AttentionMask,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let (hidden, _) = self.hidden(ids, positions, mask, Some(cache));
        self.head(hidden)
    }

    /// Logits for `ids` appended after what `cache` holds; updates the cache.
    pub fn forward_cached(&self, ids: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Tensor<B, 3> {
        let start = cache.len();
        let len = ids.dims()[1];
        let (hidden, _) = self.hidden(
            ids,
            &Positions::Contiguous { start, len },
            &AttentionMask::Causal,
            Some(cache),
        );
        self.head(hidden)
    }

    fn hidden(
        &self,
        ids: Tensor<B, 2, Int>,
        positions: &Positions<B>,
        mask: &AttentionMask,
        mut cache: Option<&mut KvCache<B>>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 1>>) {
        let [batch, seq] = ids.dims();
        let past = cache.as_ref().map_or(0, |c| c.len());
        let inputs = match self.model.layers.first() {
            Some(l) => LayerInputs::new(
                &self.rope,
                &l.self_attn,
                positions,
                mask,
                [batch, past, seq],
                true,
                &ids.device(),
            ),
            None => {
                let x = burn::tensor::module::embedding(self.model.embed_tokens.weight.val(), ids);
                return (self.model.norm.forward(x), None);
            }
        };
        let mut x = burn::tensor::module::embedding(self.model.embed_tokens.weight.val(), ids);
        // A grown model while its masks ramp multiplies every new piece of
        // structure by the mask (see `Growth`); any other model has none.
        let masks = self
            .growth
            .as_ref()
            .and_then(|g| g.masks(self, &x.device()));
        let mut inputs = inputs;
        inputs.masks = masks.clone();
        let m = masks.as_ref();
        x = GrowthMasks::residual(m, x);
        let mut aux: Option<Tensor<B, 1>> = None;
        let mut sparse = 0;
        for (i, layer) in self.model.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            let h = GrowthMasks::norm(m, &layer.input_layernorm, x.clone());
            let out = layer.self_attn.forward(h, &inputs, slot);
            x = x + GrowthMasks::branch(m, i, out);
            let h = GrowthMasks::norm(m, &layer.post_attention_layernorm, x.clone());
            let out = match (&layer.mlp, &layer.block_sparse_moe) {
                (Some(mlp), _) => mlp.forward_masked(h, m.and_then(|m| m.ffn.as_ref())),
                (None, Some(moe)) => {
                    let (out, layer_aux) = moe.forward(h, sparse, self.balance.as_ref());
                    sparse += 1;
                    if let Some(a) = layer_aux {
                        aux = Some(match aux {
                            Some(sum) => sum + a.loss,
                            None => a.loss,
                        });
                    }
                    out
                }
                (None, None) => panic!("layer {i} has no feed-forward block"),
            };
            x = x + GrowthMasks::branch(m, i, out);
        }
        let aux = aux.map(|a| a.div_scalar(sparse.max(1) as f64));
        (GrowthMasks::norm(m, &self.model.norm, x), aux)
    }

    /// Sets a grown model's masks to their value at training step `step`
    /// (no-op for any other model).
    pub fn set_growth_step(&self, step: u64) {
        if let Some(growth) = &self.growth {
            growth.set_step(step);
        }
    }

    /// Logits `hidden · Wᵀ` for the LM head. On CPU backends the
    /// `[batch·seq, d_model]` rows go through the matmul in blocks of
    /// [`HEAD_ROWS`]: CPU GEMM runs this wide-output shape (d_model → vocab)
    /// about twice as fast in row blocks as in one call (bench/README.md).
    fn head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, d] = hidden.dims();
        let weight = match &self.lm_head {
            Some(head) => head.weight.val(),
            None => self.model.embed_tokens.weight.val().transpose(),
        };
        let vocab = weight.dims()[1];
        let rows = hidden.reshape([b * t, d]);
        let block = kernels::head_block::<B>(HEAD_ROWS).unwrap_or(b * t);
        let blocks = (b * t).div_ceil(block.max(1));
        let logits = if blocks <= 1 {
            rows.matmul(weight)
        } else {
            let parts = rows
                .chunk(blocks, 0)
                .into_iter()
                .map(|r| r.matmul(weight.clone()))
                .collect();
            Tensor::cat(parts, 0)
        };
        logits.reshape([b, t, vocab])
    }

    pub fn max_seq_len(&self) -> usize {
        self.rope.max_seq_len()
    }
}

/// What `baton grow` added to a model, as the parent's sizes: every layer at
/// index `layers` or above is new, and so are the residual columns from
/// `d_model`, the attention heads from `n_heads` and the hidden units from
/// `d_ff` on. Stored as `grow.json` in a `grow` checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrowthSpec {
    pub layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub d_ff: usize,
}

/// `grow.json`: the parent's sizes, whether the new structure is masked
/// (`baton grow --no-masks` adds it at full strength, the naive control) and
/// the seed its new weights were drawn with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrowthRecord {
    pub parent: GrowthSpec,
    pub masked: bool,
    pub seed: u64,
}

/// Masked structural growth ("2x Faster Language Model Pre-training via
/// Masked Structural Growth"): each new piece of structure enters multiplied
/// by a mask `m` that ramps from 0 to 1 over `ramp_steps` optimizer steps,
/// so at `m = 0` the grown model computes exactly its parent's function,
/// whatever the new weights are. The masks scale a new layer's two residual
/// branches, new attention heads' outputs (before `o_proj`), new hidden
/// units (before `down_proj`), and new residual columns (the embedding and
/// every branch's output); RMSNorm then averages over `d + m·(d' − d)`
/// columns instead of `d'`, so the parent's statistics hold at `m = 0`. At
/// `m = 1` the masks are gone and the model is an ordinary one.
#[derive(Clone, Debug)]
pub struct Growth {
    pub spec: GrowthSpec,
    pub ramp_steps: u64,
    /// The current mask, as f32 bits: shared by every clone of the model
    /// (the training copy and the one evaluation sees).
    value: Arc<std::sync::atomic::AtomicU32>,
}

impl Growth {
    /// Masks at 0: the parent's function.
    pub fn new(spec: GrowthSpec, ramp_steps: u64) -> Self {
        Self {
            spec,
            ramp_steps,
            value: Arc::new(std::sync::atomic::AtomicU32::new(0f32.to_bits())),
        }
    }

    pub fn mask(&self) -> f32 {
        f32::from_bits(self.value.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub fn set_mask(&self, m: f32) {
        let m = m.clamp(0.0, 1.0);
        self.value
            .store(m.to_bits(), std::sync::atomic::Ordering::Relaxed);
    }

    /// `m = min(1, step / ramp_steps)`.
    pub fn set_step(&self, step: u64) {
        let m = match self.ramp_steps {
            0 => 1.0,
            ramp => (step as f64 / ramp as f64).min(1.0),
        };
        self.set_mask(m as f32);
    }

    /// The masks of one forward pass of `model`, or `None` at `m = 1`.
    pub(crate) fn masks<B: Backend>(
        &self,
        model: &Llama<B>,
        device: &B::Device,
    ) -> Option<GrowthMasks<B>> {
        let m = self.mask();
        if m >= 1.0 {
            return None;
        }
        let spec = &self.spec;
        let d = model.model.embed_tokens.weight.dims()[1];
        let first = model.model.layers.first();
        let attn_width = first.map_or(0, |l| l.self_attn.o_proj.weight.dims()[0]);
        let head_dim = first.map_or(1, |l| attn_width / l.self_attn.n_heads);
        let d_ff = first
            .and_then(|l| l.mlp.as_ref())
            .map_or(0, |mlp| mlp.down_proj.weight.dims()[0]);
        let ramp = |old: usize, new: usize| -> Option<Tensor<B, 1>> {
            (new > old).then(|| {
                let values: Vec<f32> = (0..new).map(|i| if i < old { 1.0 } else { m }).collect();
                Tensor::from_data(TensorData::new(values, [new]), device)
            })
        };
        Some(GrowthMasks {
            m: m as f64,
            new_from: spec.layers,
            residual_cols: ramp(spec.d_model, d),
            head_cols: ramp(spec.n_heads * head_dim, attn_width),
            ffn: ramp(spec.d_ff, d_ff),
            // RMSNorm's mean over d' columns, taken over d + m·(d' − d).
            norm_ratio: d as f64 / (spec.d_model as f64 + m as f64 * (d - spec.d_model) as f64),
        })
    }
}

/// One forward pass's growth masks (see [`Growth`]).
#[derive(Clone, Debug)]
pub struct GrowthMasks<B: Backend> {
    m: f64,
    /// Layers from this index on are new.
    new_from: usize,
    residual_cols: Option<Tensor<B, 1>>,
    head_cols: Option<Tensor<B, 1>>,
    ffn: Option<Tensor<B, 1>>,
    /// `d' / (d + m·(d' − d))`: 1 unless the width grew.
    norm_ratio: f64,
}

impl<B: Backend> GrowthMasks<B> {
    /// New residual columns masked (nothing without masks).
    fn residual(masks: Option<&Self>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match masks.and_then(|m| m.residual_cols.as_ref()) {
            Some(cols) => x.mul(cols.clone().unsqueeze()),
            None => x,
        }
    }

    /// A layer's branch output as it enters the residual stream: scaled by
    /// `m` when the layer is new, new residual columns masked.
    fn branch(masks: Option<&Self>, index: usize, out: Tensor<B, 3>) -> Tensor<B, 3> {
        let out = match masks {
            Some(m) if index >= m.new_from => out.mul_scalar(m.m),
            _ => out,
        };
        Self::residual(masks, out)
    }

    /// The attention output before `o_proj`, new heads' columns masked.
    fn heads(inputs: &LayerInputs<B>, out: Tensor<B, 3>) -> Tensor<B, 3> {
        match inputs.masks.as_ref().and_then(|m| m.head_cols.as_ref()) {
            Some(mask) => out.mul(mask.clone().unsqueeze()),
            None => out,
        }
    }

    /// RMSNorm with its mean of squares over `d + m·(d' − d)` columns:
    /// `x·w / sqrt(r·ms + eps)` = `(x·w/√r) / sqrt(ms + eps/r)`, so the
    /// (fused) kernel runs with a scaled weight and epsilon. The plain norm
    /// without masks or width growth.
    pub(crate) fn norm(masks: Option<&Self>, norm: &RmsNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let r = masks.map_or(1.0, |m| m.norm_ratio);
        if r == 1.0 {
            return norm.forward(x);
        }
        let weight = norm.weight.val().div_scalar(r.sqrt());
        kernels::rms_norm(x, weight, norm.eps / r)
    }
}

/// Summed negative log-likelihood over the positions whose `weights` are non-zero.
///
/// `logits: [batch, seq, vocab]`, `targets: [batch, seq]`, `weights: [batch, seq]`
/// (1 for supervised positions, 0 elsewhere). Returns the *sum*, so the caller can
/// normalise by the global count of supervised tokens across accumulation steps.
pub fn masked_nll_sum<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
) -> Tensor<B, 1> {
    token_logprobs(logits, targets).mul(weights).sum().neg()
}

/// Log-probability of each target token, `[batch, seq]`, computed with a stable
/// log-softmax in the logits' precision ([`kernels::token_logprobs`]).
pub fn token_logprobs<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
) -> Tensor<B, 2> {
    let [batch, seq, vocab] = logits.dims();
    let flat = logits.reshape([batch * seq, vocab]);
    kernels::token_logprobs(flat, targets.reshape([batch * seq])).reshape([batch, seq])
}

/// The HF names of `model`'s float parameters, in visiting order.
pub fn param_names<B: Backend>(model: &Llama<B>) -> Vec<String> {
    struct Names {
        path: Vec<String>,
        out: Vec<String>,
    }
    impl<B: Backend> burn::module::ModuleVisitor<B> for Names {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, _: &Param<Tensor<B, D>>) {
            self.out.push(self.path.join("."));
        }
    }
    let mut names = Names {
        path: Vec::new(),
        out: Vec::new(),
    };
    burn::module::Module::visit(model, &mut names);
    names.out
}

/// A 2-D f32 tensor transposed: `[rows, cols]` → `[cols, rows]` (between
/// Baton's `[in, out]` linear layout and HF's `[out, in]`).
pub fn transpose(data: &TensorData) -> TensorData {
    let [rows, cols] = [data.shape[0], data.shape[1]];
    let values: Vec<f32> = data.to_vec().expect("f32 weights");
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    TensorData::new(out, [cols, rows])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Inner;
    use burn::tensor::Distribution;

    fn tiny() -> ModelConfig {
        ModelConfig {
            vocab_size: 40,
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            d_ff: 48,
            max_seq_len: 16,
            ..ModelConfig::default()
        }
    }

    /// Logits of row `row` when `ids` is run as the rows of one batch.
    fn logits_of(model: &Llama<Inner>, rows: &[&[i32]], row: usize) -> Vec<f32> {
        let device = Default::default();
        let seq = rows[0].len();
        let flat: Vec<i32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        let ids =
            Tensor::<Inner, 2, Int>::from_data(TensorData::new(flat, [rows.len(), seq]), &device);
        let logits: Vec<f32> = model.forward(ids).into_data().to_vec().unwrap();
        let per_row = logits.len() / rows.len();
        logits[row * per_row..(row + 1) * per_row].to_vec()
    }

    #[test]
    fn attention_is_causal() {
        let model = tiny().init::<Inner>(1, &Default::default());
        // Checked in the second row of a batch of two, so a mask that only
        // reaches the first row (or head) fails too.
        let other: &[i32] = &[8, 8, 2, 2, 6, 6];
        let a = logits_of(&model, &[other, &[3, 9, 4, 17, 5, 22]], 1);
        let b = logits_of(&model, &[other, &[3, 9, 4, 17, 30, 1]], 1);
        let vocab = 40;
        // Positions 0..4 see only tokens that are equal in both inputs.
        for (x, y) in a[..4 * vocab].iter().zip(&b[..4 * vocab]) {
            assert!((x - y).abs() < 1e-5, "future token leaked into the past");
        }
        // Position 4 sees the changed token.
        let differs = a[4 * vocab..5 * vocab]
            .iter()
            .zip(&b[4 * vocab..5 * vocab])
            .any(|(x, y)| (x - y).abs() > 1e-4);
        assert!(differs, "position 4 should see its own token");
    }

    #[test]
    fn step_zero_loss_is_near_uniform() {
        let config = tiny();
        let model = config.init::<Inner>(2, &Default::default());
        let device = Default::default();
        let ids = Tensor::<Inner, 2, Int>::from_data(
            TensorData::new(vec![1i32, 2, 3, 4, 5, 6, 7, 8], [2, 4]),
            &device,
        );
        let targets = Tensor::<Inner, 2, Int>::from_data(
            TensorData::new(vec![2i32, 3, 4, 5, 6, 7, 8, 9], [2, 4]),
            &device,
        );
        let weights = Tensor::<Inner, 2>::ones([2, 4], &device);
        let nll: f32 = masked_nll_sum(model.forward(ids), targets, weights).into_scalar();
        let mean = nll / 8.0;
        let uniform = (config.vocab_size as f32).ln();
        assert!(
            (mean - uniform).abs() < 0.3,
            "step-0 loss {mean} vs ln(vocab) {uniform}"
        );
    }

    /// The plain formulation (RoPE by slicing in 4-D, mask by `mask_fill`) the
    /// fast attention path must reproduce.
    fn reference_attention<B: Backend>(
        attn: &Attention<B>,
        rope: &Rope<B>,
        x: Tensor<B, 3>,
        positions: &Positions<B>,
        blocked: Tensor<B, 4, Bool>,
    ) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let hd = d / attn.n_heads;
        let heads = |y: Tensor<B, 3>, n: usize| y.reshape([b, t, n, hd]).swap_dims(1, 2);
        let (cos, sin) = rope.tables(positions);
        let q = Rope::apply(
            heads(attn.q_proj.forward(x.clone()), attn.n_heads),
            &cos,
            &sin,
        );
        let k = Rope::apply(
            heads(attn.k_proj.forward(x.clone()), attn.n_kv_heads),
            &cos,
            &sin,
        );
        let v = heads(attn.v_proj.forward(x), attn.n_kv_heads);
        let (k, v) = (attn.repeat_kv(k), attn.repeat_kv(v));
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar((hd as f64).sqrt().recip())
            .mask_fill(blocked, -1e9);
        let out = softmax(scores, 3)
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([b, t, d]);
        attn.o_proj.forward(out)
    }

    #[test]
    fn fast_attention_matches_the_reference_in_values_and_gradients() {
        // Head size 8 over 6 positions, and head size 32 over 40 positions (the
        // fused kernel's vector loops run whole 8-lane chunks and remainders).
        let docs = [0u32, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1];
        let pos = [0u32, 1, 2, 0, 1, 2, 0, 1, 0, 1, 2, 3];
        attention_parity(tiny(), 2, 6, &docs, &pos);
        let wide = ModelConfig {
            d_model: 128,
            max_seq_len: 64,
            ..tiny()
        };
        let lengths: [&[u32]; 2] = [&[17, 13, 10], &[25, 1, 14]];
        let (mut docs, mut pos) = (Vec::new(), Vec::new());
        for row in lengths {
            for (id, &len) in row.iter().enumerate() {
                docs.extend(std::iter::repeat_n(id as u32, len as usize));
                pos.extend(0..len);
            }
        }
        attention_parity(wide, 2, 40, &docs, &pos);
    }

    fn attention_parity(config: ModelConfig, b: usize, t: usize, docs: &[u32], pos: &[u32]) {
        type T = crate::backend::Train;
        let device = Default::default();
        let x_data = Tensor::<Inner, 3>::random(
            [b, t, config.d_model],
            Distribution::Normal(0.0, 1.0),
            &device,
        )
        .into_data();
        // (output, d out/d x, d out/d w_q) on a fresh graph: each backward
        // consumes its graph, so every run builds its own leaves.
        let run = |fast: bool, packed: bool| {
            let model = config.init::<T>(3, &device);
            let attn = &model.model.layers[0].self_attn;
            let x = Tensor::<T, 3>::from_data(x_data.clone(), &device).require_grad();
            let (positions, mask, blocked) = if packed {
                let blocked = crate::train::document_mask::<T>(docs, b, t, &device);
                let p = crate::train::int_tensor::<T>(pos, b, t, &device);
                (
                    Positions::PerToken(p),
                    AttentionMask::documents(docs, t).unwrap(),
                    blocked,
                )
            } else {
                let blocked = Tensor::<T, 2, Bool>::tril_mask([t, t], 0, &device)
                    .unsqueeze::<4>()
                    .repeat_dim(0, b);
                (
                    Positions::Contiguous { start: 0, len: t },
                    AttentionMask::Causal,
                    blocked,
                )
            };
            let out = if fast {
                let inputs = LayerInputs::new(
                    &model.rope,
                    attn,
                    &positions,
                    &mask,
                    [b, 0, t],
                    true,
                    &device,
                );
                attn.forward(x.clone(), &inputs, None)
            } else {
                reference_attention(attn, &model.rope, x.clone(), &positions, blocked)
            };
            let grads = out.clone().mul_scalar(0.5).sum().backward();
            let flat = |t: Tensor<Inner, 3>| -> Vec<f32> { t.into_data().to_vec().unwrap() };
            let gw: Vec<f32> = attn
                .q_proj
                .weight
                .val()
                .grad(&grads)
                .unwrap()
                .into_data()
                .to_vec()
                .unwrap();
            (flat(out.inner()), flat(x.grad(&grads).unwrap()), gw)
        };
        let max_diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        // Causal over contiguous positions; two packed documents per row with
        // per-token positions and a block-diagonal mask.
        for packed in [false, true] {
            let (out_f, gx_f, gw_f) = run(true, packed);
            let (out_r, gx_r, gw_r) = run(false, packed);
            assert!(max_diff(&out_f, &out_r) < 1e-5, "values, packed = {packed}");
            assert!(max_diff(&gx_f, &gx_r) < 1e-5, "d/dx, packed = {packed}");
            assert!(max_diff(&gw_f, &gw_r) < 1e-5, "d/dW_q, packed = {packed}");
            assert!(gw_f.iter().any(|&g| g != 0.0));
        }
    }

    #[test]
    fn rope_rotates_halves_like_hf() {
        // HF rotate_half: position p rotates (x[i], x[i+d/2]) by p * theta^(-2i/d).
        let device = Default::default();
        let rope = Rope::<Inner>::new(4, 8, 10_000.0, &device);
        let x = Tensor::<Inner, 4>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [1, 1, 1, 4]),
            &device,
        );
        let (cos, sin) = rope.tables(&Positions::Contiguous { start: 3, len: 1 });
        let out: Vec<f32> = Rope::apply(x, &cos, &sin).into_data().to_vec().unwrap();
        let (a0, a1) = (3.0f64, 3.0f64 * 10_000f64.powf(-0.5));
        let expected = [
            1.0 * a0.cos() - 3.0 * a0.sin(),
            2.0 * a1.cos() - 4.0 * a1.sin(),
            3.0 * a0.cos() + 1.0 * a0.sin(),
            4.0 * a1.cos() + 2.0 * a1.sin(),
        ];
        for (o, e) in out.iter().zip(expected) {
            assert!((*o as f64 - e).abs() < 1e-5, "{out:?} vs {expected:?}");
        }
    }
}
