//! Dropout on LoRA adapters' inputs, seeded so a training step's masks are a
//! pure function of the run's seed (what keeps resume exact): the training
//! loop opens a scope per micro-batch and row part ([`with_dropout`]) and
//! each adapter call inside it draws the next mask ([`dropout_mask`]).

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

thread_local! {
    /// The seed of this thread's adapter-dropout masks and how many it has
    /// drawn, while a training forward pass runs ([`with_dropout`]).
    static DROPOUT: std::cell::Cell<Option<(u64, u64)>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with adapter dropout on (on this thread): each adapter call
/// draws its mask from `seed` and its position in the order of calls, so a
/// training step's masks are a pure function of the seed (exact resume).
/// Outside it (evaluation, sampling, inference) adapters drop nothing.
pub fn with_dropout<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    let before = DROPOUT.with(|d| d.replace(Some((seed, 0))));
    let out = f();
    DROPOUT.with(|d| d.set(before));
    out
}

/// The seed [`with_dropout`] set on this thread, if any.
pub fn dropout_seed() -> Option<u64> {
    DROPOUT.with(|d| d.get().map(|(seed, _)| seed))
}

/// A seed derived from `seed` and `parts` (SplitMix64 steps).
pub fn mix_seed(seed: u64, parts: &[u64]) -> u64 {
    parts.iter().fold(seed, |h, &p| {
        let mut z = h ^ p.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// The next dropout mask for an adapter input shaped like `x` (entries 0 or
/// 1/(1 − p)), or `None` when dropout is off or no training pass is running.
pub fn dropout_mask<B: Backend, const D: usize>(x: &Tensor<B, D>, p: f64) -> Option<Tensor<B, D>> {
    if p <= 0.0 {
        return None;
    }
    let (seed, call) = DROPOUT.with(|d| {
        let current = d.get()?;
        d.set(Some((current.0, current.1 + 1)));
        Some(current)
    })?;
    let mut rng = StdRng::seed_from_u64(mix_seed(seed, &[call]));
    let n: usize = x.dims().iter().product();
    let keep = (1.0 / (1.0 - p)) as f32;
    let values: Vec<f32> = (0..n)
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
        .collect();
    Some(Tensor::from_data(
        TensorData::new(values, x.dims()),
        &x.device(),
    ))
}
