//! `baton grow` and `baton upcycle`: a bigger model from a checkpoint,
//! without training, which continual pretraining (`pretrain --from`) takes on.
//!
//! The new structure enters behind masked structural growth's masks
//! ([`baton_core::model::Growth`]): the `grow` checkpoint computes its
//! parent's function exactly, and the next pretrain stage ramps the masks
//! to 1 over `grow.ramp_steps`, after which they are gone. `--no-masks` adds
//! the same new weights at full strength instead: the naive control, which
//! does not preserve the function.
//!
//! `baton upcycle` turns a dense model into a mixture of experts: each dense
//! FFN is copied into every expert of its layer behind a fresh router, which
//! also computes the parent's function exactly (the chosen gates sum to 1).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use baton_core::checkpoint::{self, Checkpoint, Manifest, StageDir, StageKind, WeightDtype};
use baton_core::grow::{
    GrowTo, grow_tensors, grown_config, spec_of, upcycle_tensors, upcycled_config,
};
use baton_core::model::GrowthRecord;
use serde::{Deserialize, Serialize};

/// What `baton grow` writes, from a base model (what continual pretraining
/// takes: pretrained, imported or merged).
pub const GROW_KIND: StageKind = StageKind {
    name: "grow",
    accepts: &["pretrain", "merge"],
};

/// What `baton upcycle` writes, from the same base models.
pub const UPCYCLE_KIND: StageKind = StageKind {
    name: "upcycle",
    accepts: &["pretrain", "merge"],
};

/// `upcycle.json` in an `upcycle` checkpoint: the routing asked for and the
/// router's seed.
pub const UPCYCLE_FILE: &str = "upcycle.json";

/// `baton upcycle`'s flags, and a recipe's `upcycle` step settings
/// (`set = ["experts=4", "top_k=2"]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpcycleSettings {
    pub experts: usize,
    pub top_k: usize,
    pub every: usize,
    pub seed: u64,
}

impl Default for UpcycleSettings {
    fn default() -> Self {
        Self {
            experts: 4,
            top_k: 2,
            every: 1,
            seed: 0,
        }
    }
}

/// A recipe's `grow` step settings (its `set = ["layers=4", …]`): what
/// `baton grow`'s flags say.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrowSettings {
    pub layers: Option<usize>,
    pub d_model: Option<usize>,
    pub d_ff: Option<usize>,
    pub heads: Option<usize>,
    /// `false`: the naive control (`--no-masks`).
    pub masks: bool,
    pub seed: u64,
}

impl Default for GrowSettings {
    fn default() -> Self {
        Self {
            layers: None,
            d_model: None,
            d_ff: None,
            heads: None,
            masks: true,
            seed: 0,
        }
    }
}

impl GrowSettings {
    pub fn to(&self) -> GrowTo {
        GrowTo {
            layers: self.layers,
            d_model: self.d_model,
            d_ff: self.d_ff,
            heads: self.heads,
        }
    }
}

/// Grows the checkpoint at `from` to `to`'s sizes into a `grow` checkpoint at
/// `out` (a finished one is replaced only with `force`). New weights are drawn
/// with `seed`. Returns the checkpoint's directory.
pub fn grow(
    from: &Path,
    to: &GrowTo,
    masked: bool,
    seed: u64,
    out: &Path,
    force: bool,
) -> Result<PathBuf> {
    let parent = full_weights_parent(from, &GROW_KIND, "growth")?;
    let child = grown_config(&parent.manifest.model, to)
        .map_err(|e| anyhow::anyhow!("{}: cannot grow: {e}", parent.dir.display()))?;
    StageDir::check(out, false, force, &[parent.dir.as_path()])?;

    let weights = parent.weights()?;
    let tensors = grow_tensors(&child, &weights, seed)
        .map_err(|e| anyhow::anyhow!("{}: {e}", parent.dir.display()))?;
    drop(weights);
    let record = GrowthRecord {
        parent: spec_of(&parent.manifest.model),
        masked,
        seed,
    };
    let record = (checkpoint::GROW_FILE, serde_json::to_vec_pretty(&record)?);
    write_tool_checkpoint(&parent, GROW_KIND.name, child, tensors, record, out, force)
}

/// Upcycles the dense checkpoint at `from` into an `upcycle` checkpoint at
/// `out` (a finished one is replaced only with `force`): `s.experts` copies
/// of each sparse layer's FFN, routed `s.top_k` at a time, in every
/// `s.every`-th layer; the routers are drawn with `s.seed`.
pub fn upcycle(from: &Path, s: &UpcycleSettings, out: &Path, force: bool) -> Result<PathBuf> {
    let parent = full_weights_parent(from, &UPCYCLE_KIND, "upcycling")?;
    let child = upcycled_config(&parent.manifest.model, s.experts, s.top_k, s.every)
        .map_err(|e| anyhow::anyhow!("{}: cannot upcycle: {e}", parent.dir.display()))?;
    StageDir::check(out, false, force, &[parent.dir.as_path()])?;
    let weights = parent.weights()?;
    let tensors = upcycle_tensors(&child, &weights, s.seed)
        .map_err(|e| anyhow::anyhow!("{}: {e}", parent.dir.display()))?;
    drop(weights);
    let record = (UPCYCLE_FILE, serde_json::to_vec_pretty(s)?);
    write_tool_checkpoint(
        &parent,
        UPCYCLE_KIND.name,
        child,
        tensors,
        record,
        out,
        force,
    )
}

/// The checkpoint at `from`, of a kind `kind` accepts, holding full weights.
fn full_weights_parent(from: &Path, kind: &StageKind, what: &str) -> Result<Checkpoint> {
    let parent = Checkpoint::open(from, kind.accepts)
        .with_context(|| format!("--from {}", from.display()))?;
    if parent.manifest.adapter.is_some() {
        bail!(
            "{}: holds a LoRA adapter, not full weights; {what} needs full weights (train on with --merge-adapter, or export and import)",
            parent.dir.display()
        );
    }
    Ok(parent)
}

/// Writes a checkpoint of kind `kind` made from `parent` without training:
/// the parent's tokenizer, `child`'s config, `tensors`, and the tool's
/// `record` file; the continuing stage inherits the parent's training
/// settings.
fn write_tool_checkpoint(
    parent: &Checkpoint,
    kind: &'static str,
    child: baton_core::model::ModelConfig,
    tensors: std::collections::HashMap<String, baton_core::burn::tensor::TensorData>,
    (record_name, record): (&str, Vec<u8>),
    out: &Path,
    force: bool,
) -> Result<PathBuf> {
    let stage = StageDir::open(out, false, force, &[parent.dir.as_path()])?;
    stage.copy_from(parent, checkpoint::TOKENIZER_FILE)?;
    let tokenizer = parent.tokenizer()?;
    let config = checkpoint::hf_config(&child, &tokenizer.special);
    checkpoint::write_atomic(
        &stage.path(checkpoint::CONFIG_FILE),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    let bytes = checkpoint::safetensors_bytes(&tensors, WeightDtype::F32)
        .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    drop(tensors);
    checkpoint::write_atomic(&stage.path(checkpoint::MODEL_FILE), &bytes)?;
    drop(bytes);
    checkpoint::write_atomic(&stage.path(record_name), &record)?;
    let mut metrics = std::collections::BTreeMap::new();
    metrics.insert("params".into(), child.num_params() as f64);
    metrics.insert("active_params".into(), child.active_params() as f64);
    metrics.insert(
        "parent_params".into(),
        parent.manifest.model.num_params() as f64,
    );
    let mut manifest = Manifest::tool(kind, child, parent, vec![parent.as_parent("parent")]);
    manifest.tokens_seen = parent.manifest.tokens_seen;
    manifest.metrics = metrics;
    Ok(stage.commit(manifest)?)
}
