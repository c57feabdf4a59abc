//! The align stage's settings: `[align]` (loss and parameters), `[pairs]`
//! (on-policy sampling), `[eval]`, over the parent's `[train]`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use baton_core::checkpoint::Checkpoint;
use baton_core::config::ConfigSources;
use baton_core::config::child_config;
use baton_core::tasks::TasksConfig;
use baton_core::train::TrainConfig;
use serde::{Deserialize, Serialize};

use crate::loss::{LossParams, LossSpec};

/// The shipped defaults (`configs/align.toml`), applied over the parent's `[train]`.
pub const BUILTIN_CONFIG: &str = include_str!("../../configs/align.toml");

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlignConfig {
    pub train: TrainConfig,
    pub align: AlignSection,
    pub pairs: PairsConfig,
    pub tasks: TasksConfig,
    /// A second, harder difficulty of the same task families: a share of the
    /// pair prompts, and a second held-out set (`harder/…` metrics).
    pub harder: HarderConfig,
    /// `align.method = "grpo"` or `"rloo"`: RL with the task checkers as reward.
    pub grpo: GrpoConfig,
    pub eval: EvalConfig,
    /// LoRA adapters instead of training every weight (off unless `rank`
    /// is set).
    pub lora: baton_core::lora::LoraConfig,
}

/// How align trains: on preference pairs, or by RL with verifiable rewards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Pairs and `align.loss` (DPO and the rest).
    #[default]
    Preference,
    /// Group-normalised advantages: (r − mean) / std within each prompt's group.
    Grpo,
    /// Leave-one-out baseline: r − the mean of the group's other rewards.
    Rloo,
}

/// `[grpo]`: sampling and the clipped policy-gradient objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    /// Replies sampled per prompt (the group).
    pub group: usize,
    /// Prompts per sampled batch.
    pub prompts: usize,
    pub temperature: f64,
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// ε of the clipped ratio: min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A).
    pub clip: f64,
    /// β of the k3 KL penalty to the reference (the parent).
    pub kl: f64,
    /// Optimizer steps on each sampled batch (the ratio ρ is to the policy that sampled it).
    pub inner_steps: usize,
    /// Reward added to a reply that ends with the end-of-turn token.
    pub stop_reward: f64,
    /// γ of an NLL anchor: each step also trains on gold replies of
    /// `sft_rows` training tasks at `[tasks]`' difficulty, drawn past the
    /// first `tasks.count` of the stream (not the prompts GRPO samples),
    /// weighted γ against the per-token policy-gradient loss (InstructGPT's
    /// PPO-ptx). 0: off.
    pub sft_weight: f64,
    /// Gold task replies per step in the anchor.
    pub sft_rows: usize,
    pub seed: u64,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            group: 8,
            prompts: 8,
            temperature: 1.0,
            top_k: 0,
            max_new_tokens: 24,
            clip: 0.2,
            kl: 0.04,
            inner_steps: 2,
            stop_reward: 0.0,
            sft_weight: 0.0,
            sft_rows: 16,
            seed: 17,
        }
    }
}

/// `[harder]`: the generated tasks past the SFT distribution (more digits,
/// longer lists and strings). Off while `digits` and `length` are 0.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HarderConfig {
    /// Digits per operand (0: `tasks.digits`).
    pub digits: usize,
    /// Letters, numbers, keys or words per instance (0: `tasks.length`).
    pub length: usize,
    /// Share of the on-policy pair prompts drawn at this difficulty.
    pub prompt_share: f64,
}

impl HarderConfig {
    /// The harder tasks: `[tasks]` with this difficulty, or `None` when off.
    pub fn tasks(&self, base: &TasksConfig) -> Option<TasksConfig> {
        (self.digits > 0 || self.length > 0).then(|| TasksConfig {
            digits: if self.digits > 0 {
                self.digits
            } else {
                base.digits
            },
            length: if self.length > 0 {
                self.length
            } else {
                base.length
            },
            ..base.clone()
        })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reference {
    /// Reference log-probs computed once into a file, the model then dropped.
    #[default]
    Cached,
    /// The reference model stays in memory and scores every batch.
    Online,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlignSection {
    /// Preference pairs, or RL with verifiable rewards (`grpo`, `rloo`).
    pub method: Method,
    pub loss: String,
    pub temperature: f64,
    pub align_weight: f64,
    pub margin: f64,
    pub label_smoothing: f64,
    pub reference: Reference,
    /// Reference cache path; empty = `reference_logps.json` in the checkpoint.
    pub reference_cache: String,
    /// Pairs held out of training for reward metrics.
    pub heldout_pairs: usize,
    /// Which reply tokens a pair is scored on.
    pub score_tokens: ScoreTokens,
    /// On-policy rounds (preference pairs without `--data`): each samples
    /// fresh pairs from the policy as the round starts, trains
    /// `train.steps` steps on them and evaluates.
    pub rounds: usize,
    /// The reference of every round after the first.
    pub reference_update: ReferenceUpdate,
}

/// Which model a round after the first measures its log-ratios against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReferenceUpdate {
    /// The parent, in every round.
    #[default]
    Fixed,
    /// The policy the round started from (the previous round's result).
    Previous,
}

/// Which reply tokens a chosen/rejected pair is scored on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreTokens {
    /// Every reply token and the end-of-turn token.
    #[default]
    All,
    /// The tokens up to and including the first one where chosen and rejected
    /// differ. The shared prefix cancels in every log-ratio; the tokens after
    /// the first difference follow different prefixes, so a preference on them
    /// is not a preference between the two replies' next tokens. This is
    /// Step-DPO's credit assignment (Lai et al. 2024) with a token as the step.
    ToDivergence,
}

impl Default for AlignSection {
    fn default() -> Self {
        let p = LossParams::default();
        Self {
            method: Method::Preference,
            loss: "dpo".into(),
            temperature: p.temperature,
            align_weight: p.align_weight,
            margin: p.margin,
            label_smoothing: p.label_smoothing,
            reference: Reference::Cached,
            reference_cache: String::new(),
            heldout_pairs: 64,
            score_tokens: ScoreTokens::All,
            rounds: 1,
            reference_update: ReferenceUpdate::Fixed,
        }
    }
}

impl AlignSection {
    pub fn spec(&self) -> Result<LossSpec> {
        LossSpec::parse(&self.loss).map_err(|e| anyhow::anyhow!("align.loss: {e}"))
    }

    pub fn params(&self) -> LossParams {
        LossParams {
            temperature: self.temperature,
            align_weight: self.align_weight,
            margin: self.margin,
            label_smoothing: self.label_smoothing,
        }
    }
}

/// How on-policy pairs are sampled from the parent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PairsConfig {
    /// Task prompts to sample on (from the training split of `[tasks]`).
    pub prompts: usize,
    /// Replies sampled per prompt.
    pub samples: usize,
    pub temperature: f64,
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// When no sampled reply is correct, use the task's answer as chosen.
    pub gold_fallback: bool,
    /// Make the first reply of each prompt the greedy one.
    pub include_greedy: bool,
    pub seed: u64,
}

impl Default for PairsConfig {
    fn default() -> Self {
        Self {
            prompts: 3000,
            samples: 4,
            temperature: 1.0,
            top_k: 0,
            max_new_tokens: 24,
            gold_fallback: true,
            include_greedy: true,
            seed: 11,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    pub max_new_tokens: usize,
    /// Held-out prompts sampled for the KL-to-reference estimate.
    pub kl_prompts: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 24,
            kl_prompts: 60,
        }
    }
}

/// Resolves the align config: the parent's `[train]`, the built-in defaults,
/// then the user's layers; checks the loss name and parameter ranges.
pub fn load_config(parent: &Checkpoint, user: &ConfigSources) -> Result<AlignConfig> {
    let cfg = child_config(
        parent,
        user,
        ("align", BUILTIN_CONFIG),
        |train| AlignConfig {
            train,
            ..AlignConfig::default()
        },
        |c| &c.train,
    )?;
    let spec = cfg.align.spec()?;
    cfg.align.params().validate().map_err(anyhow::Error::msg)?;
    let one_stage = !spec.needs_reference() && cfg.align.method == Method::Preference;
    if parent.manifest.stage == "pretrain" && parent.manifest.chat_template.is_none() && !one_stage
    {
        bail!(
            "{}: a base model (no chat template) is aligned in one stage only with a reference-free loss (orpo, asft, simpo, nll); for this loss run sft first",
            parent.dir.display()
        );
    }
    if cfg.tasks.families.is_empty() {
        bail!("tasks.families is empty");
    }
    check_rounds(&cfg.align, &cfg.lora)?;
    cfg.tasks.check_weights().map_err(anyhow::Error::msg)?;
    if !(cfg.pairs.temperature.is_finite() && cfg.pairs.temperature >= 0.0) {
        bail!(
            "pairs.temperature must be a finite number ≥ 0 (0 = greedy; got {})",
            cfg.pairs.temperature
        );
    }
    let share = cfg.harder.prompt_share;
    if !(0.0..=1.0).contains(&share) {
        bail!("harder.prompt_share must be in [0, 1], not {share}");
    }
    if share > 0.0 && cfg.harder.tasks(&cfg.tasks).is_none() {
        bail!(
            "harder.prompt_share is {share} but [harder] sets no difficulty (harder.digits or harder.length)"
        );
    }
    let g = &cfg.grpo;
    if cfg.align.method != Method::Preference {
        if g.group < 2 || g.prompts == 0 || g.inner_steps == 0 || g.max_new_tokens == 0 {
            bail!(
                "grpo.group must be at least 2, and grpo.prompts, grpo.inner_steps and grpo.max_new_tokens at least 1"
            );
        }
        if !(g.clip > 0.0 && g.clip < 1.0 && g.kl >= 0.0 && g.kl.is_finite()) {
            bail!("grpo.clip must be in (0, 1) and grpo.kl a finite number ≥ 0");
        }
        if !(g.temperature > 0.0 && g.temperature.is_finite()) {
            bail!("grpo.temperature must be positive (RL samples; greedy replies would all agree)");
        }
        if !(g.sft_weight >= 0.0 && g.sft_weight.is_finite())
            || (g.sft_weight > 0.0 && g.sft_rows == 0)
        {
            bail!(
                "grpo.sft_weight must be a finite number ≥ 0 (got {}), with grpo.sft_rows at least 1 when it is on",
                g.sft_weight
            );
        }
    }
    if cfg.pairs.samples < 2 && !cfg.pairs.gold_fallback {
        bail!("pairs.samples must be at least 2 (or pairs.gold_fallback = true)");
    }
    Ok(cfg)
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub out: PathBuf,
    pub resume: bool,
    pub force: bool,
    /// With `resume`: continue even if the settings or data changed.
    pub allow_changes: bool,
    /// Preference JSONL files; empty = on-policy pairs from the parent.
    pub data: Vec<PathBuf>,
    /// The parent holds a LoRA adapter: merge it and train the full model.
    pub merge_adapter: bool,
}

/// `align.rounds`: 1 to 100, and more than one only where each round can
/// sample its own pairs and keep its own reference cache.
fn check_rounds(align: &AlignSection, lora: &baton_core::lora::LoraConfig) -> Result<()> {
    if !(1..=100).contains(&align.rounds) {
        bail!("align.rounds = {} must be between 1 and 100", align.rounds);
    }
    if align.rounds == 1 {
        return Ok(());
    }
    if align.method != Method::Preference {
        bail!(
            "align.rounds = {} applies to preference pairs (align.method = \"preference\"); grpo and rloo sample on-policy every step already",
            align.rounds
        );
    }
    if !align.reference_cache.is_empty() {
        bail!(
            "align.reference_cache names one file, but align.rounds = {} scores a reference per round (leave it empty)",
            align.rounds
        );
    }
    if lora.rank.is_some() {
        bail!(
            "align.rounds = {} trains the full model for now; leave [lora] out",
            align.rounds
        );
    }
    Ok(())
}
