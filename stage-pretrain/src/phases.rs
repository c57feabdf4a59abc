//! Phases inside one pretrain run (`[[phases]]`): from the end of the one
//! before until `until_step`, a phase may change the training window
//! (`seq_len`, `batch_size`), the mixture of sources (`weights`) and the
//! learning-rate segment. This expresses a sequence-length curriculum and a
//! warmup–stable–decay run whose decay anneals on another mixture.

use std::collections::BTreeMap;

use baton_core::error::InvalidSetting;
use baton_core::train::TrainConfig;
use serde::{Deserialize, Serialize};

/// How a phase's learning rate goes from `lr` to `lr_end` (after its warmup).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// `lr` throughout (`lr_end` unused).
    Constant,
    Linear,
    Cosine,
    /// `lr_end + (lr - lr_end)(1 - √progress)`: falls fast, then slowly.
    Sqrt,
}

/// One `[[phases]]` entry. Unset fields keep the run's `[train]` value (and,
/// for `weights`, the sources' own).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// The phase covers steps from the previous phase's `until_step` (or 0)
    /// up to, not including, this one.
    pub until_step: u64,
    /// Tokens per training row. Validation keeps `train.seq_len`.
    #[serde(default)]
    pub seq_len: Option<usize>,
    /// Rows per micro-batch. With `seq_len` set and this unset, it is chosen
    /// to hold `train.batch_size × train.seq_len` tokens per micro-batch.
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Source weights by name (≥ 0, at least one > 0); sources left out get 0.
    #[serde(default)]
    pub weights: Option<BTreeMap<String, f64>>,
    /// The learning-rate segment: set any of these four and the phase has its
    /// own (start `lr`, default `train.lr`; end `lr_end`, default `lr`; shape
    /// `decay`, default linear; `warmup_steps` at the phase's start, default 0).
    /// Leave all four out and the `[train]` schedule runs through the phase.
    #[serde(default)]
    pub lr: Option<f64>,
    #[serde(default)]
    pub lr_end: Option<f64>,
    #[serde(default)]
    pub decay: Option<Decay>,
    #[serde(default)]
    pub warmup_steps: Option<u64>,
}

/// The settings that hold at one step.
#[derive(Clone, Debug, PartialEq)]
pub struct At<'p> {
    /// Index of the phase (None: after the last one, or no phases).
    pub phase: Option<usize>,
    pub seq_len: usize,
    pub batch_size: usize,
    pub weights: Option<&'p BTreeMap<String, f64>>,
}

/// Checks phases against the run: ascending `until_step` within
/// `train.steps`, windows within `max_seq_len`, weights that name known
/// training sources, learning rates that are positive.
pub fn validate(
    phases: &[Phase],
    train: &TrainConfig,
    max_seq_len: usize,
    train_sources: &[&str],
    all_sources: &[&str],
) -> Result<(), InvalidSetting> {
    let mut before = 0;
    for (i, p) in phases.iter().enumerate() {
        let at = format!("phases[{i}] (until_step {})", p.until_step);
        if p.until_step <= before {
            return Err(format!(
                "{at}: phases must be in order: until_step must be above {before}"
            )
            .into());
        }
        if p.until_step > train.steps {
            return Err(format!(
                "{at}: past the end of the run (train.steps = {})",
                train.steps
            )
            .into());
        }
        before = p.until_step;
        let seq_len = p.seq_len.unwrap_or(train.seq_len);
        if seq_len < 2 {
            return Err(format!("{at}: seq_len must be at least 2").into());
        }
        if seq_len > max_seq_len {
            return Err(format!(
                "{at}: seq_len {seq_len} exceeds model.max_seq_len ({max_seq_len})"
            )
            .into());
        }
        if p.batch_size == Some(0) {
            return Err(format!("{at}: batch_size must be positive").into());
        }
        if let Some(weights) = &p.weights {
            for (name, w) in weights {
                if !all_sources.contains(&name.as_str()) {
                    return Err(format!(
                        "{at}: weights name an unknown source \"{name}\" (sources: {})",
                        all_sources.join(", ")
                    )
                    .into());
                }
                if !train_sources.contains(&name.as_str()) {
                    return Err(format!(
                        "{at}: source \"{name}\" is eval_only and cannot be trained on"
                    )
                    .into());
                }
                if !(w.is_finite() && *w >= 0.0) {
                    return Err(format!(
                        "{at}: weight of \"{name}\" must be a finite number ≥ 0, got {w}"
                    )
                    .into());
                }
            }
            if !weights.values().any(|w| *w > 0.0) {
                return Err(format!("{at}: weights must give some source a weight above 0").into());
            }
        }
        for (key, value) in [("lr", p.lr), ("lr_end", p.lr_end)] {
            if let Some(v) = value
                && !(v.is_finite() && v >= 0.0)
            {
                return Err(format!("{at}: {key} must be a finite number ≥ 0, got {v}").into());
            }
        }
        if p.lr == Some(0.0) {
            return Err(format!("{at}: lr must be positive").into());
        }
        if let Some(w) = p.warmup_steps
            && w >= p.until_step - phase_start(phases, i)
        {
            return Err(format!("{at}: warmup_steps {w} fill the whole phase").into());
        }
    }
    Ok(())
}

fn phase_start(phases: &[Phase], i: usize) -> u64 {
    if i == 0 { 0 } else { phases[i - 1].until_step }
}

/// The phase holding `step` and the window and mixture it trains with.
pub fn at<'p>(phases: &'p [Phase], train: &TrainConfig, step: u64) -> At<'p> {
    match phases.iter().position(|p| step < p.until_step) {
        None => At {
            phase: None,
            seq_len: train.seq_len,
            batch_size: train.batch_size,
            weights: None,
        },
        Some(i) => {
            let p = &phases[i];
            let seq_len = p.seq_len.unwrap_or(train.seq_len);
            let batch_size = p.batch_size.unwrap_or_else(|| {
                if p.seq_len.is_some() {
                    (train.batch_size * train.seq_len / seq_len).max(1)
                } else {
                    train.batch_size
                }
            });
            // Weights carry over from the last phase that set them.
            let weights = phases[..=i].iter().rev().find_map(|p| p.weights.as_ref());
            At {
                phase: Some(i),
                seq_len,
                batch_size,
                weights,
            }
        }
    }
}

/// The learning rate at `step`: its phase's segment, or the `[train]`
/// schedule where the phase (or the step) has none.
pub fn lr_at(phases: &[Phase], train: &TrainConfig, step: u64) -> f64 {
    let Some(i) = phases.iter().position(|p| step < p.until_step) else {
        return train.lr_at(step);
    };
    let p = &phases[i];
    if p.lr.is_none() && p.lr_end.is_none() && p.decay.is_none() && p.warmup_steps.is_none() {
        return train.lr_at(step);
    }
    let start = phase_start(phases, i);
    let lr = p.lr.unwrap_or(train.lr);
    let end = p.lr_end.unwrap_or(lr);
    let warmup = p.warmup_steps.unwrap_or(0);
    let k = step - start;
    if k < warmup {
        return lr * (k + 1) as f64 / warmup as f64;
    }
    let span = (p.until_step - start - warmup).max(1) as f64;
    let progress = ((k - warmup + 1) as f64 / span).min(1.0);
    match p.decay.unwrap_or(Decay::Linear) {
        Decay::Constant => lr,
        Decay::Linear => lr + (end - lr) * progress,
        Decay::Cosine => end + 0.5 * (lr - end) * (1.0 + (std::f64::consts::PI * progress).cos()),
        Decay::Sqrt => end + (lr - end) * (1.0 - progress.sqrt()),
    }
}
