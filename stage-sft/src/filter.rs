//! Loss-threshold filtering ("Efficient NLP Model Finetuning via Multistage
//! Data Filtering"): each micro-batch's examples first run forward without
//! gradients, and those whose loss is below the running p-th percentile of
//! recent example losses are left out of the backward pass.

use std::collections::VecDeque;

use baton_core::burn::tensor::backend::AutodiffBackend;
use baton_core::model::Llama;
use baton_core::train::{Batch, scored_logprobs};
use serde::{Deserialize, Serialize};

/// `data.filter = { percentile = p, warmup = n }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterConfig {
    /// Examples whose loss is below this percentile (0–100) of the recent
    /// losses skip the backward pass; 0 turns filtering off.
    pub percentile: f64,
    /// Steps that train on everything while the loss history fills.
    pub warmup: u64,
    /// How many recent example losses the percentile is taken over.
    pub window: usize,
}

impl Default for FilterConfig {
    fn default() -> Self {
        Self {
            percentile: 0.0,
            warmup: 0,
            window: 1024,
        }
    }
}

impl FilterConfig {
    /// Whether filtering is on (`percentile` > 0).
    pub fn on(&self) -> bool {
        self.percentile > 0.0
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.percentile.is_finite() && (0.0..100.0).contains(&self.percentile)) {
            return Err(format!(
                "data.filter.percentile must be in [0, 100), got {}",
                self.percentile
            ));
        }
        if self.window == 0 {
            return Err("data.filter.window must be positive".into());
        }
        Ok(())
    }
}

/// The running state: recent losses and what was skipped so far (saved in
/// `train_state`, so a resumed run filters exactly as an uninterrupted one).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Filter {
    history: VecDeque<f64>,
    pub seen: u64,
    pub skipped: u64,
    /// Skipped share of the last step's examples.
    #[serde(skip)]
    pub last_share: f64,
}

impl Filter {
    /// The loss below which an example is skipped now (None while warming up).
    fn threshold(&self, cfg: &FilterConfig, step: u64) -> Option<f64> {
        if step < cfg.warmup || self.history.is_empty() {
            return None;
        }
        let mut sorted: Vec<f64> = self.history.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let rank = (cfg.percentile / 100.0 * (sorted.len() - 1) as f64).round() as usize;
        Some(sorted[rank])
    }

    /// Scores each micro-batch's examples with `model` (no gradients) and
    /// returns the batches of those at or above the threshold. A micro-batch
    /// keeps at least its hardest example.
    pub fn select<B: AutodiffBackend>(
        &mut self,
        cfg: &FilterConfig,
        (model, workers): (&Llama<B>, usize),
        step: u64,
        batches: Vec<Batch>,
        device: &B::Device,
    ) -> Vec<Batch> {
        let threshold = self.threshold(cfg, step);
        let (mut seen, mut skipped) = (0u64, 0u64);
        let mut scored = Vec::new();
        let out = batches
            .into_iter()
            .map(|batch| {
                let logprobs = scored_logprobs(model, &batch, workers, device);
                let losses = batch.document_losses(&logprobs);
                let mut keep: Vec<bool> = losses
                    .iter()
                    .map(|&l| threshold.is_none_or(|t| l >= t))
                    .collect();
                if !keep.iter().any(|k| *k)
                    && let Some(hardest) =
                        (0..losses.len()).max_by(|&a, &b| losses[a].total_cmp(&losses[b]))
                {
                    keep[hardest] = true;
                }
                seen += keep.len() as u64;
                skipped += keep.iter().filter(|k| !**k).count() as u64;
                scored.extend(losses);
                batch.with_documents(&keep)
            })
            .collect();
        for loss in scored {
            if self.history.len() == cfg.window {
                self.history.pop_front();
            }
            self.history.push_back(loss);
        }
        self.seen += seen;
        self.skipped += skipped;
        self.last_share = skipped as f64 / seen.max(1) as f64;
        out
    }

    /// Share of all examples so far that skipped the backward pass.
    pub fn skipped_share(&self) -> f64 {
        self.skipped as f64 / self.seen.max(1) as f64
    }
}
