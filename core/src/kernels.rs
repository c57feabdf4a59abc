//! The one kernel front. Model code gets RMSNorm, SwiGLU, attention (with
//! RoPE applied inside it) and token log-probs from here; the choice between
//! Baton's fused CPU kernels ([`crate::fused`], for `flex`) and the tensor
//! formulation every other backend runs is made here, once, by backend type
//! ([`Kernels::of`]). Nothing else in the model asks which backend it runs on.

use std::sync::Arc;

use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

pub use crate::fused::RopeTables;

/// Which kernels a backend type gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// `flex`, for inference or under autodiff: the fused CPU kernels, with
    /// their own backward passes. `BATON_FUSED=off` turns them off.
    FusedCpu,
    /// A cubecl GPU backend (`cuda`, `wgpu`): the tensor formulation, with
    /// whole matmuls in one launch.
    Gpu,
    /// Any other backend (`ndarray`): the tensor formulation.
    Tensor,
}

impl Kernels {
    /// The kernels of backend `B`, by its type.
    pub fn of<B: Backend>() -> Self {
        if crate::fused::available::<B>() {
            Kernels::FusedCpu
        } else if crate::backend::is_gpu::<B>() {
            Kernels::Gpu
        } else {
            Kernels::Tensor
        }
    }

    pub fn fused(self) -> bool {
        self == Kernels::FusedCpu
    }
}

/// `x / rms(x) · weight` over the last dimension.
pub fn rms_norm<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    if Kernels::of::<B>().fused() {
        crate::fused::rms_norm(x, weight, eps)
    } else {
        rms_norm_tensor(x, weight, eps)
    }
}

/// RMSNorm as tensor operations: what every backend without a fused kernel
/// runs, and the reference the fused kernel is tested and benched against.
pub fn rms_norm_tensor<B: Backend>(
    x: Tensor<B, 3>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, 3> {
    let rms = x.clone().square().mean_dim(2).add_scalar(eps).sqrt();
    x.div(rms).mul(weight.unsqueeze())
}

/// `silu(gate) · up`.
pub fn swiglu<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
    if Kernels::of::<B>().fused() {
        crate::fused::swiglu(gate, up)
    } else {
        silu(gate).mul(up)
    }
}

/// Whether a forward pass of `B` runs attention in the fused kernel (given
/// the first visible key of each query, and RoPE inside it). The caller
/// passes `wanted = false` to keep the tensor path (benches and parity tests
/// compare the two) and the kernel does not read a KV cache (`past > 0`).
pub fn fused_attention<B: Backend>(wanted: bool, past: usize) -> bool {
    wanted && past == 0 && Kernels::of::<B>().fused()
}

/// Causal attention in the fused kernel over queries, keys and values in the
/// projections' `[batch, seq, heads·head_dim]` layout: query `i` of row `b`
/// sees keys `first[b·seq + i]..=i`. With `rope`, the kernel rotates queries
/// and keys itself. Only where [`fused_attention`] said so.
pub fn attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    [heads, kv_heads]: [usize; 2],
    first: Arc<Vec<u32>>,
    rope: Option<RopeTables>,
) -> Tensor<B, 3> {
    crate::fused::attention(q, k, v, heads, kv_heads, first, rope)
}

/// The log-probability of each row's target, `[rows]`, from logits
/// `[rows, vocab]`: a stable log-softmax in the logits' precision (fused on
/// `flex`, in f32).
pub fn token_logprobs<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    if Kernels::of::<B>().fused() {
        return crate::fused::token_logprobs(logits, targets);
    }
    let rows = targets.dims()[0];
    let log_probs = burn::tensor::activation::log_softmax(logits, 1);
    log_probs
        .gather(1, targets.reshape([rows, 1]))
        .reshape([rows])
}

/// Rows of the LM head's matmul per block: CPU backends keep the logits
/// block small (`cpu_rows`); GPU matmul kernels want the whole product in one
/// launch (`None`).
pub fn head_block<B: Backend>(cpu_rows: usize) -> Option<usize> {
    match Kernels::of::<B>() {
        Kernels::Gpu => None,
        Kernels::FusedCpu | Kernels::Tensor => Some(cpu_rows),
    }
}
