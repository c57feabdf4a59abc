//! Reinforcement learning with verifiable rewards (`align.method = "grpo"` or
//! `"rloo"`): every `grpo.inner_steps` optimizer steps, `grpo.prompts` task
//! prompts get `grpo.group` sampled replies each from the current policy; the
//! task's checker (plus `grpo.stop_reward` for a reply that ends its turn)
//! scores each; advantages are normalised within each prompt's group (GRPO:
//! (r − mean) / std; RLOO: r − the mean of the others). The loss over reply
//! tokens is the clipped policy gradient plus a k3 KL penalty to the parent:
//!
//! −min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A) + β·(e^(ref − logp) − (ref − logp) − 1),
//!
//! ρ = π/π_sampler per token, averaged over the step's reply tokens.

use std::collections::BTreeMap;
use std::time::Instant;

use baton_core::burn::module::AutodiffModule;
use baton_core::burn::optim::GradientsParams;
use baton_core::burn::tensor::backend::AutodiffBackend;
use baton_core::burn::tensor::{Tensor, TensorData};
use baton_core::chat::{ChatRenderer, Rendered, Supervise};
use baton_core::data::step_rng;
use baton_core::generate::{Policy, Sampling, generate_rows};
use baton_core::model::Llama;
use baton_core::tasks::{Task, TasksConfig};
use baton_core::tokenizer::Tokenizer;
use baton_core::train::{
    Batch, Exchange, TrainTask, inference_logprobs, nll_grads, packed_batch, row_grads,
    scored_logprobs, workers_for,
};
use rand::seq::index::sample;
use serde::{Deserialize, Serialize};

use crate::config::{AlignConfig, Method};
use crate::task::{HeldOut, kl_estimate};

/// Advantages of one group's rewards.
pub fn advantages(method: Method, rewards: &[f64]) -> Vec<f64> {
    let n = rewards.len() as f64;
    let mean = rewards.iter().sum::<f64>() / n;
    match method {
        Method::Rloo => rewards
            .iter()
            .map(|r| {
                if n > 1.0 {
                    (r - mean) * n / (n - 1.0)
                } else {
                    0.0
                }
            })
            .collect(),
        _ => {
            let std = (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
            rewards
                .iter()
                .map(|r| {
                    if std > 0.0 {
                        (r - mean) / (std + 1e-4)
                    } else {
                        0.0
                    }
                })
                .collect()
        }
    }
}

/// One sampled batch: the replies (as prompt + reply ids), and per token
/// position the sampler's and the reference's log-probs and the advantage.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Sampled {
    /// The sampling round (step / inner_steps) this batch belongs to.
    round: u64,
    rows: Vec<Rendered>,
    old: Vec<f32>,
    reference: Vec<f32>,
    advantages: Vec<f32>,
    reward: f64,
    accuracy: f64,
    kl: f64,
    seconds: f64,
}

pub(crate) struct GrpoTask<'a, B: AutodiffBackend> {
    prompts: Vec<(Task, Vec<u32>)>,
    pub(crate) reference: Llama<B::InnerBackend>,
    tokenizer: &'a Tokenizer,
    cfg: AlignConfig,
    device: B::Device,
    current: Option<Sampled>,
    pub(crate) heldout: HeldOut,
    /// Seconds spent sampling (generating and scoring the replies), over
    /// the run (this process).
    pub(crate) sample_seconds: f64,
    /// Of those, seconds spent generating, and the reply tokens generated.
    pub(crate) generate_seconds: f64,
    pub(crate) generated_tokens: usize,
    fresh: bool,
    /// Gold replies of `[tasks]`-difficulty training tasks, for the NLL
    /// anchor (`grpo.sft_weight`; empty when off).
    anchor: Vec<Rendered>,
    /// The anchor's mean NLL at the last step.
    anchor_nll: Option<f64>,
    /// The first sampled row of each policy-gradient micro-batch of the
    /// current step (`train.grad_accum` of them, split at prompt groups);
    /// the anchor's micro-batch comes after them.
    micro_rows: Vec<usize>,
}

impl<'a, B: AutodiffBackend> GrpoTask<'a, B> {
    pub(crate) fn new(
        tasks: Vec<Task>,
        reference: Llama<B::InnerBackend>,
        tokenizer: &'a Tokenizer,
        cfg: &AlignConfig,
        device: &B::Device,
    ) -> anyhow::Result<Self> {
        let renderer = ChatRenderer::new(tokenizer);
        // A prompt and its reply are scored in one window: a reply gets at
        // most the positions its prompt leaves.
        let window = reference.max_seq_len();
        let mut prompts = Vec::with_capacity(tasks.len());
        let (mut too_long, mut shortened) = (0, 0);
        for task in tasks {
            let ids = renderer.render_prompt(&task.messages()[..1])?;
            if ids.len() >= window {
                too_long += 1;
                continue;
            }
            shortened += usize::from(ids.len() + cfg.grpo.max_new_tokens > window);
            prompts.push((task, ids));
        }
        if too_long > 0 {
            tracing::warn!(
                "{too_long} task prompts left out: they fill the model's {window} positions"
            );
        }
        if shortened > 0 {
            tracing::warn!(
                "{shortened} task prompts leave fewer than grpo.max_new_tokens = {} of the model's {window} positions: their replies stop at the window",
                cfg.grpo.max_new_tokens
            );
        }
        if prompts.is_empty() {
            anyhow::bail!(
                "no task prompts to sample on (pairs.prompts is 0, or every prompt fills the model's {window} positions)"
            );
        }
        let mut anchor = Vec::new();
        if cfg.grpo.sft_weight > 0.0 {
            // Past the first `tasks.count` of the training stream: not the
            // prompts GRPO samples, nor what an SFT with the same `[tasks]`
            // trained on, so their NLL still says something about the model.
            let gold = TasksConfig {
                count: cfg.tasks.count + cfg.pairs.prompts,
                ..cfg.tasks.clone()
            }
            .train();
            for task in gold.into_iter().skip(cfg.tasks.count) {
                let rendered = renderer.render(&task.messages(), Supervise::LastAssistant)?;
                if rendered.ids.len() <= window + 1 {
                    anchor.push(rendered);
                }
            }
            if anchor.is_empty() {
                anyhow::bail!(
                    "grpo.sft_weight is on but no gold task reply fits the model's {window} positions"
                );
            }
        }
        Ok(Self {
            prompts,
            reference,
            tokenizer,
            cfg: cfg.clone(),
            device: device.clone(),
            current: None,
            heldout: HeldOut::new(cfg),
            sample_seconds: 0.0,
            generate_seconds: 0.0,
            generated_tokens: 0,
            fresh: false,
            anchor,
            anchor_nll: None,
            micro_rows: vec![0],
        })
    }

    /// Samples round `round`'s batch with the current policy. In a
    /// data-parallel run each process generates and scores the replies of
    /// its share of the prompt groups, and `exchange` sums the shares
    /// (zeros elsewhere) into the whole batch on every process.
    fn sample(
        &mut self,
        model: &Llama<B>,
        round: u64,
        exchange: &mut dyn Exchange,
    ) -> Result<Sampled, String> {
        let started = Instant::now();
        let g = &self.cfg.grpo;
        let policy_model = model.valid();
        let n = g.prompts.min(self.prompts.len());
        let mut rng = step_rng(g.seed, 5, round, 0);
        let chosen: Vec<usize> = sample(&mut rng, self.prompts.len(), n).into_vec();
        let window = self.reference.max_seq_len();
        let settings: Vec<Sampling> = (0..n * g.group)
            .map(|r| Sampling {
                max_new_tokens: g
                    .max_new_tokens
                    .min(window - self.prompts[chosen[r / g.group]].1.len()),
                temperature: g.temperature,
                top_k: g.top_k,
                seed: g
                    .seed
                    .wrapping_mul(1_000_003)
                    .wrapping_add(round.wrapping_mul(100_003))
                    .wrapping_add(r as u64),
                stop: vec![self.tokenizer.special.end],
                ..Sampling::default()
            })
            .collect();
        let rows: Vec<(&[u32], &Sampling)> = settings
            .iter()
            .enumerate()
            .map(|(r, s)| (self.prompts[chosen[r / g.group]].1.as_slice(), s))
            .collect();
        let share = exchange.share(n);
        let mine = share.start * g.group..share.end * g.group;
        // Every process takes part in the sums, even one whose share is
        // empty (fewer prompt groups than processes).
        let alone = exchange.processes() == 1;
        let replies = generate_rows(
            &Policy::One(&policy_model),
            &rows[mine.clone()],
            &self.device,
        );
        self.generate_seconds += started.elapsed().as_secs_f64();
        self.generated_tokens += replies.iter().map(Vec::len).sum::<usize>();
        let replies = match alone {
            true => replies,
            false => gather_replies(
                exchange,
                rows.len(),
                mine.clone(),
                replies,
                g.max_new_tokens,
            )?,
        };
        let renderer = ChatRenderer::new(self.tokenizer);
        let end = self.tokenizer.special.end;
        let mut rewards = Vec::with_capacity(replies.len());
        let mut correct = 0usize;
        for (r, reply) in replies.iter().enumerate() {
            let task = &self.prompts[chosen[r / g.group]].0;
            let text = renderer.decode_reply(reply).unwrap_or_default();
            let ok = task.check(&text);
            correct += usize::from(ok);
            let stopped = reply.last() == Some(&end);
            rewards.push(f64::from(u8::from(ok)) + if stopped { g.stop_reward } else { 0.0 });
        }
        let advantages: Vec<f64> = rewards
            .chunks(g.group)
            .flat_map(|group| advantages(self.cfg.align.method, group))
            .collect();
        let rendered: Vec<Rendered> = replies
            .iter()
            .enumerate()
            .map(|(r, reply)| {
                let prompt = &self.prompts[chosen[r / g.group]].1;
                let mut ids = prompt.clone();
                ids.extend_from_slice(reply);
                let mut loss_mask = vec![false; prompt.len()];
                loss_mask.extend(std::iter::repeat_n(true, reply.len()));
                Rendered { ids, loss_mask }
            })
            .collect();
        let batch = batch_of(&rendered, self.tokenizer.special.pad);
        let workers = workers_for::<B>(&self.cfg.train, &self.device);
        let (mut old, mut reference) = (Vec::new(), Vec::new());
        if !mine.is_empty() {
            let part = batch.rows(mine.start, mine.end);
            old = scored_logprobs(model, &part, workers, &self.device);
            reference = inference_logprobs(&self.reference, &part, workers, &self.device);
        }
        let seq = batch.seq;
        if !alone {
            // Each process's rows in place, zeros elsewhere, summed.
            let len = batch.weights.len();
            let at = mine.start * seq;
            let mut both = vec![0.0; 2 * len];
            for (k, v) in old.iter().enumerate() {
                both[at + k] = f64::from(*v);
            }
            for (k, v) in reference.iter().enumerate() {
                both[len + at + k] = f64::from(*v);
            }
            sum_in_chunks(exchange, &mut both)?;
            old = both[..len].iter().map(|&v| v as f32).collect();
            reference = both[len..].iter().map(|&v| v as f32).collect();
        }
        let mut adv = vec![0f32; batch.weights.len()];
        let (mut kl, mut tokens) = (0.0, 0.0);
        for (at, &w) in batch.weights.iter().enumerate() {
            if w > 0.0 {
                adv[at] = advantages[at / seq] as f32;
                let d = (reference[at] - old[at]) as f64;
                kl += d.exp() - d - 1.0;
                tokens += 1.0;
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        self.sample_seconds += seconds;
        Ok(Sampled {
            round,
            rows: rendered,
            old,
            reference,
            advantages: adv,
            reward: rewards.iter().sum::<f64>() / rewards.len().max(1) as f64,
            accuracy: correct as f64 / replies.len().max(1) as f64,
            kl: kl / f64::max(tokens, 1.0),
            seconds,
        })
    }
}

/// Every process's replies from each process's share (`mine`, of `rows`
/// rows): a row's length and tokens in place, zeros elsewhere, summed.
fn gather_replies(
    exchange: &mut dyn Exchange,
    rows: usize,
    mine: std::ops::Range<usize>,
    replies: Vec<Vec<u32>>,
    max_new_tokens: usize,
) -> Result<Vec<Vec<u32>>, String> {
    let width = 1 + max_new_tokens;
    let mut all = vec![0.0; rows * width];
    for (row, reply) in mine.zip(&replies) {
        if reply.len() > max_new_tokens {
            return Err(format!(
                "a reply of {} tokens, past grpo.max_new_tokens = {max_new_tokens}",
                reply.len()
            ));
        }
        all[row * width] = reply.len() as f64;
        for (k, &token) in reply.iter().enumerate() {
            all[row * width + 1 + k] = f64::from(token);
        }
    }
    sum_in_chunks(exchange, &mut all)?;
    all.chunks(width)
        .map(|row| {
            let len = row[0] as usize;
            match len <= max_new_tokens && row[0].fract() == 0.0 {
                true => Ok(row[1..=len].iter().map(|&t| t as u32).collect()),
                false => Err(format!(
                    "the ranks' replies do not add up (a length of {})",
                    row[0]
                )),
            }
        })
        .collect()
}

/// [`Exchange::sum`] a million values at a time (every process calls it
/// with the same length, so with the same chunks).
fn sum_in_chunks(exchange: &mut dyn Exchange, values: &mut [f64]) -> Result<(), String> {
    for chunk in values.chunks_mut(1 << 20) {
        exchange.sum(chunk)?;
    }
    Ok(())
}

/// The replies as one unpacked batch (a row each, padded to the longest).
fn batch_of(rows: &[Rendered], pad: u32) -> Batch {
    let refs: Vec<Vec<&Rendered>> = rows.iter().map(|r| vec![r]).collect();
    let seq = rows
        .iter()
        .map(|r| r.ids.len() - 1)
        .max()
        .unwrap_or(1)
        .max(1);
    packed_batch(&refs, seq, pad)
}

/// The summed clipped-policy-gradient + k3 loss of `part` (rows from
/// `first_row` of the sampled batch), from the per-position host values.
#[allow(clippy::too_many_arguments)]
pub fn grpo_loss<B: baton_core::burn::tensor::backend::Backend>(
    model: &Llama<B>,
    part: &Batch,
    first_row: usize,
    old: &[f32],
    reference: &[f32],
    advantages: &[f32],
    clip: f64,
    beta: f64,
    device: &B::Device,
) -> Tensor<B, 1> {
    let [rows, seq] = [part.batch, part.seq];
    let range = first_row * seq..(first_row + rows) * seq;
    let host = |v: &[f32]| {
        Tensor::<B, 2>::from_data(
            TensorData::new(v[range.clone()].to_vec(), [rows, seq]),
            device,
        )
    };
    let weights =
        Tensor::<B, 2>::from_data(TensorData::new(part.weights.clone(), [rows, seq]), device);
    let logp = part.token_logprobs(model, device);
    let (old, reference, adv) = (host(old), host(reference), host(advantages));
    let ratio = logp.clone().sub(old).exp();
    let unclipped = ratio.clone().mul(adv.clone());
    let clipped = ratio.clamp(1.0 - clip, 1.0 + clip).mul(adv);
    let objective = unclipped.min_pair(clipped);
    let d = reference.sub(logp);
    let k3 = d.clone().exp().sub(d).sub_scalar(1.0);
    objective.neg().add(k3.mul_scalar(beta)).mul(weights).sum()
}

impl<B: AutodiffBackend> TrainTask<B> for GrpoTask<'_, B> {
    /// The anchor's mean NLL and 1, on the process that trained it (0, 0
    /// elsewhere), so rank 0 logs it whichever rank that was.
    fn step_sums(&mut self) -> Vec<f64> {
        match self.anchor_nll.take() {
            Some(nll) => vec![nll, 1.0],
            None => vec![0.0, 0.0],
        }
    }

    fn set_step_sums(&mut self, sums: &[f64]) {
        self.anchor_nll = (sums[1] > 0.0).then(|| sums[0] / sums[1]);
    }

    fn batches(&mut self, _step: u64) -> Vec<Batch> {
        // Sampled from the current policy in `select`.
        Vec::new()
    }

    fn select_shared(
        &mut self,
        model: &Llama<B>,
        step: u64,
        _batches: Vec<Batch>,
        exchange: &mut dyn Exchange,
    ) -> Result<Vec<Batch>, String> {
        let round = step / self.cfg.grpo.inner_steps as u64;
        if self.current.as_ref().map(|c| c.round) != Some(round) {
            self.current = Some(self.sample(model, round, exchange)?);
            self.fresh = true;
        }
        let current = self.current.as_ref().expect("sampled above");
        // `train.grad_accum` micro-batches of whole prompt groups: smaller
        // passes, and under `baton launch` the ranks share them. They are
        // row ranges of one padded batch: the sampled log-probs and
        // advantages are laid out by its `seq`.
        let group = self.cfg.grpo.group;
        let groups = current.rows.len() / group;
        let micros = self.cfg.train.grad_accum.clamp(1, groups.max(1));
        let first = |m: usize| m * groups / micros * group;
        self.micro_rows = (0..micros).map(first).collect();
        let pad = self.tokenizer.special.pad;
        let all = batch_of(&current.rows, pad);
        let mut batches: Vec<Batch> = (0..micros)
            .map(|m| all.rows(first(m), first(m + 1)))
            .collect();
        if !self.anchor.is_empty() {
            // The anchor's rows: a pure function of (seed, step).
            let rows = self.cfg.grpo.sft_rows.min(self.anchor.len());
            let mut rng = step_rng(self.cfg.grpo.seed, 6, step, 0);
            let chosen: Vec<Rendered> = sample(&mut rng, self.anchor.len(), rows)
                .into_iter()
                .map(|i| self.anchor[i].clone())
                .collect();
            batches.push(batch_of(&chosen, pad));
        }
        Ok(batches)
    }

    /// The policy-gradient micro-batches are normalised by their tokens; the
    /// anchor (the last micro-batch) by its own, in `loss_grads`, so it
    /// weighs nothing here.
    fn weight(&self, micro: usize, batch: &Batch) -> f64 {
        if micro < self.micro_rows.len() {
            batch.supervised_tokens()
        } else {
            0.0
        }
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
        let g = &self.cfg.grpo;
        if micro == self.micro_rows.len() {
            // γ · the anchor's mean NLL, whatever the step's other weight:
            // its summed NLL divided by (its tokens / γ). The value returned
            // is scaled so the logged loss adds γ · mean NLL.
            let tokens = batch.supervised_tokens().max(1.0);
            let (nll, grads) = nll_grads(model, batch, workers, tokens / g.sft_weight, device);
            self.anchor_nll = Some(nll / tokens);
            return (nll / tokens * g.sft_weight * scale, grads);
        }
        let current = self.current.as_ref().expect("select sampled the batch");
        let offset = self.micro_rows[micro];
        row_grads(model, batch, workers, scale, |model, part, first_row| {
            grpo_loss(
                model,
                part,
                offset + first_row,
                &current.old,
                &current.reference,
                &current.advantages,
                g.clip,
                g.kl,
                &model.device(),
            )
        })
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(&self.current).unwrap_or_default()
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        self.current = serde_json::from_value(state.clone())
            .map_err(|e| format!("train_state: unreadable sampled batch ({e})"))?;
        Ok(())
    }

    fn step_metrics(&mut self) -> BTreeMap<String, f64> {
        let Some(c) = &self.current else {
            return BTreeMap::new();
        };
        let mut m = BTreeMap::from([
            ("grpo/reward".to_string(), c.reward),
            ("grpo/sample_accuracy".to_string(), c.accuracy),
            ("grpo/kl_at_sampling".to_string(), c.kl),
        ]);
        if std::mem::take(&mut self.fresh) {
            m.insert("grpo/sample_seconds".into(), c.seconds);
        }
        if let Some(nll) = self.anchor_nll.take() {
            m.insert("grpo/anchor_nll".into(), nll);
        }
        m
    }

    fn evaluate(&mut self, model: &Llama<B::InnerBackend>, _full: bool) -> BTreeMap<String, f64> {
        let max = self.cfg.eval.max_new_tokens;
        let mut metrics = self
            .heldout
            .metrics(model, self.tokenizer, max, &self.device);
        let kl = kl_estimate(
            model,
            &self.reference,
            self.tokenizer,
            &self.heldout.standard,
            &self.cfg.eval,
            self.cfg.train.seq_len,
            &self.device,
        );
        metrics.insert("kl_to_reference".into(), kl);
        metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::backend::Inner;
    use baton_core::burn::tensor::ElementConversion;
    use baton_core::model::ModelConfig;

    #[test]
    fn advantages_are_normalised_within_the_group() {
        let g = advantages(Method::Grpo, &[1.0, 0.0, 0.0, 1.0]);
        for (a, want) in g.iter().zip([1.0, -1.0, -1.0, 1.0]) {
            assert!((a - want).abs() < 1e-3, "{g:?}");
        }
        assert_eq!(advantages(Method::Grpo, &[1.0, 1.0, 1.0]), vec![0.0; 3]);
        // RLOO: r_i minus the mean of the other three.
        let r = advantages(Method::Rloo, &[1.0, 0.0, 0.0, 0.0]);
        assert!(
            (r[0] - 1.0).abs() < 1e-12 && (r[1] + 1.0 / 3.0).abs() < 1e-12,
            "{r:?}"
        );
    }

    #[test]
    fn at_the_sampling_policy_the_loss_is_minus_the_advantage_sum_and_clipping_bites() {
        let device = Default::default();
        let config = ModelConfig {
            vocab_size: 40,
            d_model: 16,
            n_layers: 1,
            n_heads: 2,
            n_kv_heads: 1,
            d_ff: 32,
            max_seq_len: 16,
            ..ModelConfig::default()
        };
        let model = config.init::<Inner>(3, &device);
        let rows = vec![
            Rendered {
                ids: vec![1, 5, 9, 12, 3],
                loss_mask: vec![false, false, true, true, true],
            },
            Rendered {
                ids: vec![1, 7, 30],
                loss_mask: vec![false, true, true],
            },
        ];
        let batch = batch_of(&rows, 0);
        let logp: Vec<f32> = batch
            .token_logprobs(&model, &device)
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap();
        let adv: Vec<f32> = (0..batch.weights.len())
            .map(|at| if at < batch.seq { 0.5 } else { -1.0 })
            .collect();
        let value = |old: &[f32], reference: &[f32]| -> f64 {
            grpo_loss(&model, &batch, 0, old, reference, &adv, 0.2, 0.1, &device)
                .into_scalar()
                .elem::<f64>()
        };
        // ρ = 1 and reference = policy: −Σ w·A, the KL term zero.
        let want: f64 = -batch
            .weights
            .iter()
            .zip(&adv)
            .map(|(w, a)| (w * a) as f64)
            .sum::<f64>();
        assert!(
            (value(&logp, &logp) - want).abs() < 1e-5,
            "{} vs {want}",
            value(&logp, &logp)
        );
        // A sampler far below the policy (ρ ≫ 1): positive advantages are
        // clipped at 1 + ε, negative ones are not.
        let low: Vec<f32> = logp.iter().map(|l| l - 1.0).collect();
        let rho = std::f64::consts::E;
        let clipped: f64 = -batch
            .weights
            .iter()
            .zip(&adv)
            .map(|(w, a)| {
                let a = *a as f64;
                *w as f64 * if a > 0.0 { 1.2 * a } else { rho * a }
            })
            .sum::<f64>();
        assert!(
            (value(&low, &logp) - clipped).abs() < 1e-4,
            "{} vs {clipped}",
            value(&low, &logp)
        );
        // A reference away from the policy adds a positive penalty.
        let other: Vec<f32> = logp.iter().map(|l| l - 0.5).collect();
        assert!(value(&logp, &other) > value(&logp, &logp) + 1e-3);
    }
}
