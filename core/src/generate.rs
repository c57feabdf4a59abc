//! Autoregressive sampling with a KV cache: greedy, temperature, top-k, top-p,
//! stop tokens.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use std::sync::Arc;

use crate::model::{AttentionMask, KvCache, Llama, Positions};
use crate::train::int_tensor;

/// How to pick each next token. `temperature == 0` is greedy.
#[derive(Clone, Debug)]
pub struct Sampling {
    pub max_new_tokens: usize,
    pub temperature: f64,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1 = all).
    pub top_p: f64,
    pub seed: u64,
    /// Generation ends after emitting any of these.
    pub stop: Vec<u32>,
    /// Reuse keys/values of earlier positions (false recomputes the whole
    /// prefix each token: slower, for testing the cache).
    pub use_cache: bool,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            max_new_tokens: 100,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
            use_cache: true,
        }
    }
}

/// What picks each next token: one model, or emulated fine-tuning's
/// combination of three.
pub enum Policy<'a, B: Backend> {
    One(&'a Llama<B>),
    Eft(Eft<'a, B>),
}

/// Emulated fine-tuning ("An Emulator for Fine-Tuning Large Language Models
/// using Small Language Models"): at each token,
/// log π ∝ log π_large_base + β·(log π_small_ft − log π_small_base),
/// the small pair's fine-tuning applied to the large model's knowledge. The
/// three models share a tokenizer and vocabulary; each keeps its own KV cache.
pub struct Eft<'a, B: Backend> {
    pub large_base: &'a Llama<B>,
    pub small_ft: &'a Llama<B>,
    pub small_base: &'a Llama<B>,
    pub beta: f64,
}

impl<B: Backend> Policy<'_, B> {
    fn models(&self) -> Vec<&Llama<B>> {
        match self {
            Policy::One(model) => vec![model],
            Policy::Eft(e) => vec![e.large_base, e.small_ft, e.small_base],
        }
    }

    /// The next-token scores from each model's last logits: the logits of
    /// one model, or EFT's combined log-probabilities (in f64).
    fn combine(&self, logits: Vec<Vec<f32>>) -> Vec<f32> {
        match self {
            Policy::One(_) => logits.into_iter().next().unwrap_or_default(),
            Policy::Eft(e) => {
                let [large, ft, small] = [0, 1, 2].map(|i| log_softmax(&logits[i]));
                (0..large.len())
                    .map(|i| (large[i] + e.beta * (ft[i] - small[i])) as f32)
                    .collect()
            }
        }
    }
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// Generates after `prompt`, calling `on_token` with each new id as it comes.
/// Returns the new ids (including a stop token if one ended generation).
/// The context is cut to the model's `max_seq_len` (oldest tokens dropped).
pub fn generate<B: Backend>(
    model: &Llama<B>,
    prompt: &[u32],
    sampling: &Sampling,
    device: &B::Device,
    on_token: impl FnMut(u32),
) -> Vec<u32> {
    generate_with(&Policy::One(model), prompt, sampling, device, on_token)
}

/// [`generate`] with a [`Policy`]: each model runs on the same context with
/// its own KV cache, and the context is cut to the shortest `max_seq_len`.
pub fn generate_with<B: Backend>(
    policy: &Policy<B>,
    prompt: &[u32],
    sampling: &Sampling,
    device: &B::Device,
    mut on_token: impl FnMut(u32),
) -> Vec<u32> {
    let models = policy.models();
    let max_len = models.iter().map(|m| m.max_seq_len()).min().unwrap_or(1);
    let mut rng = StdRng::seed_from_u64(sampling.seed);
    let mut context: Vec<u32> = prompt.to_vec();
    let mut out = Vec::new();
    let mut caches: Vec<Option<KvCache<B>>> = models.iter().map(|_| None).collect();
    let mut pending: Vec<u32> = Vec::new();
    for _ in 0..sampling.max_new_tokens {
        if context.len() >= max_len {
            // Slide the window: drop the oldest tokens and rebuild the caches.
            let keep = max_len - 1;
            context.drain(..context.len() - keep);
            caches.iter_mut().for_each(|c| *c = None);
        }
        if caches[0].is_none() {
            pending = context.clone();
        }
        let logits: Vec<Vec<f32>> = models
            .iter()
            .zip(caches.iter_mut())
            .map(|(model, cache)| {
                if sampling.use_cache {
                    let cache = cache.get_or_insert_with(|| KvCache::new(model.model.layers.len()));
                    let ids = int_tensor::<B>(&pending, 1, pending.len(), device);
                    last_logits(model.forward_cached(ids, cache))
                } else {
                    let ids = int_tensor::<B>(&context, 1, context.len(), device);
                    last_logits(model.forward(ids))
                }
            })
            .collect();
        let next = pick(&policy.combine(logits), sampling, &mut rng);
        on_token(next);
        out.push(next);
        context.push(next);
        pending = vec![next];
        if sampling.stop.contains(&next) {
            break;
        }
    }
    out
}

/// Generates after every prompt of `prompts` at once with one `sampling`:
/// [`generate_rows`] with the same settings for every row.
pub fn generate_batch<B: Backend>(
    policy: &Policy<B>,
    prompts: &[Vec<u32>],
    sampling: &Sampling,
    device: &B::Device,
) -> Vec<Vec<u32>> {
    let rows: Vec<(&[u32], &Sampling)> = prompts.iter().map(|p| (p.as_slice(), sampling)).collect();
    generate_rows(policy, &rows, device)
}

/// Generates after every row's prompt at once, each with its own sampling
/// settings; each row's new ids are what [`generate_with`] gives for that
/// prompt alone with those settings (each row draws from its own random
/// stream, seeded with its `seed`). The prompts are left-padded to the
/// longest, with their own positions and a mask that hides the padding; a
/// row leaves the batch (and its rows of the KV caches) when it stops or
/// reaches its `max_new_tokens`. A prompt that would run past the window
/// (prompt + `max_new_tokens` > `max_seq_len`), where the window must slide,
/// is generated on its own.
pub fn generate_rows<B: Backend>(
    policy: &Policy<B>,
    rows: &[(&[u32], &Sampling)],
    device: &B::Device,
) -> Vec<Vec<u32>> {
    let models = policy.models();
    let max_len = models.iter().map(|m| m.max_seq_len()).min().unwrap_or(1);
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); rows.len()];
    let (batched, alone): (Vec<usize>, Vec<usize>) = (0..rows.len()).partition(|&i| {
        let (prompt, sampling) = rows[i];
        !prompt.is_empty() && prompt.len() + sampling.max_new_tokens <= max_len
    });
    for i in alone {
        let (prompt, sampling) = rows[i];
        out[i] = generate_with(policy, prompt, sampling, device, |_| {});
    }
    let batched: Vec<usize> = batched
        .into_iter()
        .filter(|&i| rows[i].1.max_new_tokens > 0)
        .collect();
    if batched.is_empty() {
        return out;
    }
    let width = batched.iter().map(|&i| rows[i].0.len()).max().unwrap_or(0);
    let pads: Vec<u32> = batched
        .iter()
        .map(|&i| (width - rows[i].0.len()) as u32)
        .collect();
    let mut step_ids: Vec<u32> = batched
        .iter()
        .zip(&pads)
        .flat_map(|(&i, &pad)| {
            std::iter::repeat_n(0, pad as usize).chain(rows[i].0.iter().copied())
        })
        .collect();
    let mut caches: Vec<KvCache<B>> = models
        .iter()
        .map(|m| KvCache::new(m.model.layers.len()))
        .collect();
    let mut rngs: Vec<StdRng> = batched
        .iter()
        .map(|&i| StdRng::seed_from_u64(rows[i].1.seed))
        .collect();
    // Rows still generating, as indices into `batched`.
    let mut active: Vec<usize> = (0..batched.len()).collect();
    let (mut slot, mut step_len) = (0usize, width);
    while !active.is_empty() {
        let n = active.len();
        let positions: Vec<u32> = active
            .iter()
            .flat_map(|&a| {
                let pad = pads[a] as usize;
                (slot..slot + step_len).map(move |t| t.saturating_sub(pad) as u32)
            })
            .collect();
        let positions = Positions::PerToken(int_tensor::<B>(&positions, n, step_len, device));
        let mask = AttentionMask::LeftPadded(Arc::new(active.iter().map(|&a| pads[a]).collect()));
        let logits: Vec<Vec<f32>> = models
            .iter()
            .zip(caches.iter_mut())
            .map(|(model, cache)| {
                let ids = int_tensor::<B>(&step_ids, n, step_len, device);
                last_logits(model.forward_cached_with(ids, &positions, &mask, cache))
            })
            .collect();
        let vocab = logits[0].len() / n;
        let (mut keep, mut next_ids) = (Vec::new(), Vec::new());
        for (j, &a) in active.iter().enumerate() {
            let row: Vec<Vec<f32>> = logits
                .iter()
                .map(|l| l[j * vocab..(j + 1) * vocab].to_vec())
                .collect();
            let sampling = rows[batched[a]].1;
            let next = pick(&policy.combine(row), sampling, &mut rngs[a]);
            let reply = &mut out[batched[a]];
            reply.push(next);
            if !sampling.stop.contains(&next) && reply.len() < sampling.max_new_tokens {
                keep.push(j);
                next_ids.push(next);
            }
        }
        if keep.len() < n && !keep.is_empty() {
            caches.iter_mut().for_each(|c| c.select_rows(&keep));
        }
        active = keep.iter().map(|&j| active[j]).collect();
        (slot, step_len, step_ids) = (slot + step_len, 1, next_ids);
    }
    out
}

/// The last position's logits of every row, `[batch × vocab]` flattened.
fn last_logits<B: Backend>(logits: Tensor<B, 3>) -> Vec<f32> {
    let [batch, seq, vocab] = logits.dims();
    let last: TensorData = logits.slice([0..batch, seq - 1..seq, 0..vocab]).into_data();
    last.to_vec().unwrap_or_default()
}

/// Picks a token from logits by the sampling rule.
pub fn pick(logits: &[f32], sampling: &Sampling, rng: &mut StdRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 { (i, v) } else { best }
            })
            .0 as u32
    };
    if sampling.temperature <= 0.0 {
        return argmax();
    }
    // Most likely first, ties to the lower id; with top-k only the k are
    // sorted (a partial selection first: a full sort per token is most of a
    // small model's sampling time).
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let mut order: Vec<usize> = (0..logits.len()).collect();
    if sampling.top_k > 0 && sampling.top_k < order.len() {
        order.select_nth_unstable_by(sampling.top_k - 1, by_logit);
        order.truncate(sampling.top_k);
    }
    order.sort_unstable_by(by_logit);
    let max = logits[order[0]] as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / sampling.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if sampling.top_p < 1.0 {
        let mut cumulative = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cumulative += p;
            if cumulative >= sampling.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut draw = rng.random::<f64>() * total;
    for (p, &i) in probs.iter().zip(&order) {
        draw -= p;
        if draw <= 0.0 {
            return i as u32;
        }
    }
    order[order.len() - 1] as u32
}

/// Sampling settings from the command line, checked: a NaN or out-of-range
/// value is refused with the flag named.
pub fn check_sampling(temperature: f64, top_p: f64) -> Result<(), crate::error::InvalidSetting> {
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(format!("--temperature {temperature}: must be a finite number ≥ 0").into());
    }
    if !(top_p.is_finite() && top_p > 0.0 && top_p <= 1.0) {
        return Err(format!("--top-p {top_p}: must be in (0, 1]").into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Inner;
    use crate::model::ModelConfig;

    fn eft_models() -> [Llama<Inner>; 3] {
        let device = &Default::default();
        let config = |d_model: usize, max_seq_len: usize| ModelConfig {
            vocab_size: 50,
            d_model,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            d_ff: 48,
            max_seq_len,
            ..ModelConfig::default()
        };
        [
            config(48, 20).init::<Inner>(1, device),
            config(32, 24).init::<Inner>(2, device),
            config(32, 24).init::<Inner>(3, device),
        ]
    }

    #[test]
    fn eft_at_beta_zero_is_the_large_base_and_cancels_a_shared_base() {
        let device = Default::default();
        let [large, ft, small] = eft_models();
        let eft = |large, small, beta| {
            Policy::Eft(Eft {
                large_base: large,
                small_ft: &ft,
                small_base: small,
                beta,
            })
        };
        for temperature in [0.0, 0.9] {
            let sampling = Sampling {
                max_new_tokens: 26, // past the shortest max_seq_len: the window slides
                temperature,
                top_k: 20,
                top_p: 0.95,
                seed: 9,
                ..Sampling::default()
            };
            let run = |policy: &Policy<Inner>| {
                generate_with(policy, &[1, 7, 9], &sampling, &device, |_| {})
            };
            // β = 0: the large base alone, token for token (its window of 20).
            let large_alone = run(&eft(&large, &small, 0.0));
            let with_large_window = Policy::Eft(Eft {
                large_base: &large,
                small_ft: &large,
                small_base: &large,
                beta: 0.0,
            });
            assert_eq!(large_alone, run(&with_large_window));
            assert_eq!(
                large_alone,
                generate(&large, &[1, 7, 9], &sampling, &device, |_| {})
            );
            // A base shared by both sides cancels: β = 1 gives the fine-tuned model.
            let ft_alone = generate(&ft, &[1, 7, 9], &sampling, &device, |_| {});
            assert_eq!(run(&eft(&small, &small, 1.0)), ft_alone);
            // β matters: the combination is not one of its models.
            let mixed = run(&eft(&large, &small, 1.5));
            assert_eq!(mixed.len(), 26);
            if temperature == 0.0 {
                assert_ne!(mixed, large_alone);
            }
            // Three KV caches give what recomputing the prefix gives.
            let uncached = generate_with(
                &eft(&large, &small, 1.5),
                &[1, 7, 9],
                &Sampling {
                    use_cache: false,
                    ..sampling.clone()
                },
                &device,
                |_| {},
            );
            assert_eq!(mixed, uncached, "temperature {temperature}");
        }
    }

    #[test]
    fn batched_generation_equals_one_prompt_at_a_time() {
        let device = Default::default();
        let [large, ft, small] = eft_models();
        let prompts: Vec<Vec<u32>> = vec![
            vec![1, 7, 9],
            vec![4],
            vec![2, 8, 30, 41, 5, 6, 11],
            vec![12, 13],
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], // 14 + 8 > 20: alone
            vec![33, 3, 21, 49, 17],
        ];
        let eft = Policy::Eft(Eft {
            large_base: &large,
            small_ft: &ft,
            small_base: &small,
            beta: 1.5,
        });
        let mut stopped_early = 0;
        for policy in [Policy::One(&ft), eft] {
            for temperature in [0.0, 0.9] {
                let sampling = Sampling {
                    max_new_tokens: 8,
                    temperature,
                    top_k: 20,
                    seed: 4,
                    stop: vec![3, 17, 25, 40],
                    ..Sampling::default()
                };
                let batched = generate_batch(&policy, &prompts, &sampling, &device);
                for (prompt, got) in prompts.iter().zip(&batched) {
                    let alone = generate_with(&policy, prompt, &sampling, &device, |_| {});
                    assert_eq!(got, &alone, "prompt {prompt:?}, temperature {temperature}");
                    stopped_early += usize::from(got.len() < 8);
                }
            }
        }
        // Rows finished at different steps: the dropping of rows was exercised.
        assert!(stopped_early > 0);
        // Each row its own settings: greedy or not, seed, length.
        let settings: Vec<Sampling> = (0..prompts.len())
            .map(|i| Sampling {
                max_new_tokens: 3 + i,
                temperature: if i % 2 == 0 { 0.0 } else { 1.1 },
                top_k: 0,
                seed: 100 + i as u64,
                stop: vec![17],
                ..Sampling::default()
            })
            .collect();
        let rows: Vec<(&[u32], &Sampling)> = prompts
            .iter()
            .zip(&settings)
            .map(|(p, s)| (p.as_slice(), s))
            .collect();
        let policy = Policy::One(&large);
        for ((prompt, sampling), got) in rows.iter().zip(generate_rows(&policy, &rows, &device)) {
            let alone = generate_with(&policy, prompt, sampling, &device, |_| {});
            assert_eq!(got, alone, "prompt {prompt:?}");
        }
    }

    #[test]
    fn eft_combines_log_probs_not_logits() {
        let [large, ft, small] = eft_models();
        let policy = Policy::Eft(Eft {
            large_base: &large,
            small_ft: &ft,
            small_base: &small,
            beta: 0.5,
        });
        let logits = vec![
            vec![1.0f32, 2.0, 3.0],
            vec![0.0, 0.0, 5.0],
            vec![2.0, 2.0, 2.0],
        ];
        let got = policy.combine(logits.clone());
        let ls = |v: &[f32]| log_softmax(v);
        let (l, f, s) = (ls(&logits[0]), ls(&logits[1]), ls(&logits[2]));
        for i in 0..3 {
            let want = l[i] + 0.5 * (f[i] - s[i]);
            assert!(
                (got[i] as f64 - want).abs() < 1e-6,
                "{i}: {} vs {want}",
                got[i]
            );
        }
        // Shifting one model's logits by a constant changes nothing.
        let shifted = vec![logits[0].clone(), vec![10.0, 10.0, 15.0], logits[2].clone()];
        assert_eq!(policy.combine(shifted), got);
    }

    #[test]
    fn cached_and_uncached_generation_agree() {
        let device = Default::default();
        let config = ModelConfig {
            vocab_size: 50,
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            d_ff: 48,
            max_seq_len: 24,
            ..ModelConfig::default()
        };
        // Larger init so the random model has confident, varied predictions.
        let model = config.init::<Inner>(3, &device);
        for temperature in [0.0, 0.8] {
            let sampling = Sampling {
                max_new_tokens: 30, // runs past max_seq_len: exercises the sliding window
                temperature,
                top_k: 10,
                seed: 5,
                ..Sampling::default()
            };
            let cached = generate(&model, &[1, 7, 9], &sampling, &device, |_| {});
            let uncached = generate(
                &model,
                &[1, 7, 9],
                &Sampling {
                    use_cache: false,
                    ..sampling.clone()
                },
                &device,
                |_| {},
            );
            assert_eq!(cached.len(), 30);
            assert_eq!(cached, uncached, "temperature {temperature}");
        }
        // The cache's logits, position by position, against one full forward.
        let ids: Vec<u32> = vec![1, 7, 9, 4, 33, 12, 8, 41, 2, 19];
        let full: Vec<f32> = model
            .forward(int_tensor::<Inner>(&ids, 1, ids.len(), &device))
            .into_data()
            .to_vec()
            .unwrap();
        let mut cache = KvCache::new(config.n_layers);
        let mut max_diff = 0f32;
        let prompt = 3;
        let prefill = model.forward_cached(
            int_tensor::<Inner>(&ids[..prompt], 1, prompt, &device),
            &mut cache,
        );
        let mut rows: Vec<Vec<f32>> = prefill
            .into_data()
            .to_vec::<f32>()
            .unwrap()
            .chunks(config.vocab_size)
            .map(<[f32]>::to_vec)
            .collect();
        for &id in &ids[prompt..] {
            rows.push(last_logits(model.forward_cached(
                int_tensor::<Inner>(&[id], 1, 1, &device),
                &mut cache,
            )));
        }
        assert_eq!(rows.len(), ids.len());
        for (pos, row) in rows.iter().enumerate() {
            let want = &full[pos * config.vocab_size..(pos + 1) * config.vocab_size];
            for (a, b) in row.iter().zip(want) {
                max_diff = max_diff.max((a - b).abs());
            }
        }
        assert!(max_diff < 1e-4, "cached logits differ by {max_diff}");
    }

    #[test]
    fn top_k_one_is_greedy_and_stop_tokens_end_generation() {
        let logits = [0.1f32, 2.0, -1.0, 1.9];
        let mut rng = StdRng::seed_from_u64(0);
        let greedy = Sampling::default();
        assert_eq!(pick(&logits, &greedy, &mut rng), 1);
        let top1 = Sampling {
            temperature: 1.0,
            top_k: 1,
            ..Sampling::default()
        };
        for _ in 0..20 {
            assert_eq!(pick(&logits, &top1, &mut rng), 1);
        }
        let top_p = Sampling {
            temperature: 1.0,
            top_p: 0.5,
            ..Sampling::default()
        };
        // p(1) ≈ 0.47, so the nucleus at 0.5 is {1, 3}.
        for _ in 0..50 {
            let t = pick(&logits, &top_p, &mut rng);
            assert!(t == 1 || t == 3, "{t}");
        }

        // Stop tokens: generation ends right after the first stop token, which
        // is returned, and not before.
        let device = Default::default();
        let config = ModelConfig {
            vocab_size: 20,
            d_model: 16,
            n_layers: 1,
            n_heads: 2,
            n_kv_heads: 2,
            d_ff: 24,
            max_seq_len: 64,
            ..ModelConfig::default()
        };
        let model = config.init::<Inner>(8, &device);
        let free = generate(
            &model,
            &[3, 5],
            &Sampling {
                max_new_tokens: 40,
                ..greedy.clone()
            },
            &device,
            |_| {},
        );
        assert_eq!(free.len(), 40);
        // A token that first appears after a few others.
        let (at, stop) = free
            .iter()
            .enumerate()
            .find(|(i, t)| *i >= 2 && !free[..*i].contains(t))
            .map(|(i, &t)| (i, t))
            .expect("a fresh token in 40 greedy steps");
        let mut seen = Vec::new();
        let stopped = generate(
            &model,
            &[3, 5],
            &Sampling {
                max_new_tokens: 40,
                stop: vec![stop, 999],
                ..greedy
            },
            &device,
            |t| seen.push(t),
        );
        assert_eq!(stopped, free[..=at], "ends at the first stop token");
        assert_eq!(seen, stopped);
    }
}
