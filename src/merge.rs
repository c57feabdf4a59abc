//! `baton merge`: one checkpoint from several that share an architecture and
//! a tokenizer, without training.
//!
//! - `linear`: θ = Σᵢ wᵢ·θᵢ;
//! - `task-arithmetic` ("Editing Models with Task Arithmetic"): with task
//!   vectors τᵢ = θᵢ − θ_base, θ = θ_base + Σᵢ λᵢ·τᵢ (a negative λ removes
//!   what a model learned);
//! - `ties` (TIES-merging): each λᵢ·τᵢ trimmed to its largest `density`
//!   share by magnitude, a sign elected per parameter (the sign of the
//!   trimmed sum), and the values that agree with it averaged.
//!
//! Trimming is per tensor (so the merge streams tensor by tensor: the output
//! model plus one tensor of each parent are in memory, never n models).
//! Values are accumulated in f64 and rounded to f32 once, so λ = 0 returns
//! the base and a single model at scale 1 returns that model, byte for byte.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use baton_core::burn::tensor::TensorData;
use baton_core::checkpoint::{
    self, Checkpoint, Manifest, StageDir, StageKind, TensorFile, WeightDtype,
};
use serde::Serialize;

/// What a merge writes. It names no parent kinds: any checkpoint merges.
pub const MERGE_KIND: StageKind = StageKind {
    name: "merge",
    accepts: &[],
};

/// The file in a merge checkpoint that records how it was made.
pub const MERGE_FILE: &str = "merge.json";

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum Method {
    /// Σ wᵢ·θᵢ.
    Linear { weights: Vec<f64> },
    /// θ_base + Σ λᵢ·(θᵢ − θ_base).
    TaskArithmetic { scales: Vec<f64> },
    /// θ_base + disjoint mean of the trimmed, sign-elected λᵢ·τᵢ.
    Ties { scales: Vec<f64>, density: f64 },
}

/// A merge as the command line gives it.
#[derive(Clone, Debug)]
pub struct MergeSpec {
    pub method: Method,
    pub base: Option<PathBuf>,
    pub models: Vec<PathBuf>,
}

impl MergeSpec {
    /// Builds a spec from the flags, checking counts and ranges: `weights`
    /// (linear; default equal shares), `scales` (task arithmetic and TIES;
    /// default 1 each), `density` (TIES, in (0, 1]).
    pub fn from_flags(
        method: &str,
        base: Option<PathBuf>,
        models: Vec<PathBuf>,
        weights: Option<Vec<f64>>,
        scales: Option<Vec<f64>>,
        density: Option<f64>,
    ) -> Result<Self> {
        if models.is_empty() {
            bail!("--models: give at least one checkpoint");
        }
        let n = models.len();
        let counted = |flag: &str, values: Option<Vec<f64>>, default: f64| -> Result<Vec<f64>> {
            let values = values.unwrap_or_else(|| vec![default; n]);
            if values.len() != n {
                bail!(
                    "{flag}: {} values for {n} models (one per --models entry)",
                    values.len()
                );
            }
            if let Some(v) = values.iter().find(|v| !v.is_finite()) {
                bail!("{flag}: {v} is not a finite number");
            }
            Ok(values)
        };
        let unused = |flag: &str, given: bool| -> Result<()> {
            if given {
                bail!("{flag} is not used by --method {method}");
            }
            Ok(())
        };
        let method = match method {
            "linear" => {
                unused("--base", base.is_some())?;
                unused("--scales", scales.is_some())?;
                unused("--density", density.is_some())?;
                Method::Linear {
                    weights: counted("--weights", weights, 1.0 / n as f64)?,
                }
            }
            "task-arithmetic" | "ties" => {
                if base.is_none() {
                    bail!("--method {method} needs --base (the model the task vectors start from)");
                }
                unused("--weights", weights.is_some())?;
                let scales = counted("--scales", scales, 1.0)?;
                if method == "ties" {
                    let density = density.unwrap_or(0.2);
                    if !(density > 0.0 && density <= 1.0) {
                        bail!("--density {density} is outside (0, 1]");
                    }
                    Method::Ties { scales, density }
                } else {
                    unused("--density", density.is_some())?;
                    Method::TaskArithmetic { scales }
                }
            }
            other => bail!("--method {other}: unknown (linear, task-arithmetic or ties)"),
        };
        Ok(Self {
            method,
            base,
            models,
        })
    }
}

/// The first way `other` cannot be merged with `first`: its architecture (the
/// first differing `model.<field>`), tokenizer, or chat format.
fn difference(first: &Checkpoint, other: &Checkpoint) -> Option<String> {
    let a = serde_json::to_value(&first.manifest.model).unwrap_or_default();
    let b = serde_json::to_value(&other.manifest.model).unwrap_or_default();
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        for (key, value) in a {
            if b.get(key) != Some(value) {
                return Some(format!(
                    "model.{key} is {} here but {} in {}",
                    b.get(key).cloned().unwrap_or_default(),
                    value,
                    first.dir.display()
                ));
            }
        }
    }
    if first.manifest.tokenizer_sha256 != other.manifest.tokenizer_sha256 {
        return Some(format!(
            "its tokenizer differs from that of {} (merged models must share one)",
            first.dir.display()
        ));
    }
    None
}

/// The chat format of the merge: the one every parent that has one shares (a
/// pretrained base has none).
fn chat_template(parents: &[&Checkpoint]) -> Result<Option<checkpoint::ChatTemplate>> {
    let mut found: Option<&Checkpoint> = None;
    for &parent in parents {
        let Some(template) = &parent.manifest.chat_template else {
            continue;
        };
        match found {
            Some(first) if first.manifest.chat_template.as_ref() != Some(template) => {
                let first_template = first.manifest.chat_template.as_ref().expect("has one");
                bail!(
                    "{}: chat format {} v{} differs from {} v{} of {}",
                    parent.dir.display(),
                    template.name,
                    template.version,
                    first_template.name,
                    first_template.version,
                    first.dir.display()
                );
            }
            Some(_) => {}
            None => found = Some(parent),
        }
    }
    Ok(found.and_then(|p| p.manifest.chat_template.clone()))
}

/// Keeps the `keep` entries of `values` largest in magnitude (ties broken by
/// position, so the set is deterministic) and zeroes the rest.
fn trim(values: &mut [f64], keep: usize) {
    if keep >= values.len() {
        return;
    }
    let mut order: Vec<usize> = (0..values.len()).collect();
    let by_magnitude =
        |a: &usize, b: &usize| values[*b].abs().total_cmp(&values[*a].abs()).then(a.cmp(b));
    order.select_nth_unstable_by(keep, by_magnitude);
    for &i in &order[keep..] {
        values[i] = 0.0;
    }
}

/// One tensor of a TIES merge: the parameter-wise mean of the trimmed task
/// vectors that agree with the elected sign (0 where none does).
pub fn ties_delta(mut deltas: Vec<Vec<f64>>, density: f64) -> Vec<f64> {
    let len = deltas.first().map_or(0, Vec::len);
    let keep = ((density * len as f64).ceil() as usize).clamp(1, len.max(1));
    for delta in &mut deltas {
        trim(delta, keep);
    }
    (0..len)
        .map(|j| {
            let elected = deltas.iter().map(|d| d[j]).sum::<f64>().signum();
            let (mut sum, mut count) = (0.0, 0u32);
            for d in &deltas {
                if d[j] != 0.0 && d[j].signum() == elected {
                    sum += d[j];
                    count += 1;
                }
            }
            if count > 0 { sum / count as f64 } else { 0.0 }
        })
        .collect()
}

/// The merged values of one tensor, from the base's (if any) and each
/// model's, in f64.
fn merge_tensor(method: &Method, base: Option<&[f32]>, models: &[Vec<f32>]) -> Vec<f64> {
    let len = models[0].len();
    let delta = |i: usize| -> Vec<f64> {
        let base = base.expect("checked: this method has a base");
        models[i]
            .iter()
            .zip(base)
            .map(|(&m, &b)| m as f64 - b as f64)
            .collect()
    };
    let plus_base = |deltas: Vec<f64>| -> Vec<f64> {
        let base = base.expect("checked: this method has a base");
        base.iter()
            .zip(deltas)
            .map(|(&b, d)| b as f64 + d)
            .collect()
    };
    match method {
        Method::Linear { weights } => {
            let mut out = vec![0.0f64; len];
            for (model, &w) in models.iter().zip(weights) {
                for (o, &v) in out.iter_mut().zip(model) {
                    *o += w * v as f64;
                }
            }
            out
        }
        Method::TaskArithmetic { scales } => {
            let mut sum = vec![0.0f64; len];
            for (i, &s) in scales.iter().enumerate() {
                for (o, d) in sum.iter_mut().zip(delta(i)) {
                    *o += s * d;
                }
            }
            plus_base(sum)
        }
        Method::Ties { scales, density } => {
            let deltas = scales
                .iter()
                .enumerate()
                .map(|(i, &s)| delta(i).into_iter().map(|d| s * d).collect())
                .collect();
            plus_base(ties_delta(deltas, *density))
        }
    }
}

#[derive(Serialize)]
struct Record<'a> {
    #[serde(flatten)]
    method: &'a Method,
    base: Option<String>,
    models: Vec<String>,
}

/// Merges per `spec` into a `merge` checkpoint at `out` (refusing a finished
/// one unless `force`). Every parent is verified, and all must share the
/// architecture, tokenizer and chat format. Returns the checkpoint's directory.
pub fn merge(spec: &MergeSpec, out: &Path, force: bool) -> Result<PathBuf> {
    let open = |dir: &PathBuf, flag: &str| {
        Checkpoint::open(dir, &[]).with_context(|| format!("{flag} {}", dir.display()))
    };
    let base = spec.base.as_ref().map(|b| open(b, "--base")).transpose()?;
    let models = spec
        .models
        .iter()
        .map(|m| open(m, "--models"))
        .collect::<Result<Vec<_>>>()?;
    let parents: Vec<&Checkpoint> = base.iter().chain(&models).collect();
    let first = parents[0];
    if let Some(c) = parents.iter().find(|c| c.manifest.adapter.is_some()) {
        bail!(
            "{}: holds a LoRA adapter, not full weights; merging needs full weights (baton export merges the adapter; import that export)",
            c.dir.display()
        );
    }
    for parent in &parents {
        parent.require_unmasked("a merge")?;
    }
    for other in &parents[1..] {
        if let Some(why) = difference(first, other) {
            bail!("{}: cannot merge: {why}", other.dir.display());
        }
    }
    let template = chat_template(&parents)?;
    let inputs: Vec<&Path> = parents.iter().map(|c| c.dir.as_path()).collect();
    StageDir::check(out, false, force, &inputs)?;

    let weights_of = |c: &Checkpoint| TensorFile::open(&c.dir.join(checkpoint::MODEL_FILE));
    let mut base_file = base.as_ref().map(weights_of).transpose()?;
    let mut model_files = models
        .iter()
        .map(weights_of)
        .collect::<Result<Vec<_>, _>>()?;
    let reference = base_file.as_ref().unwrap_or(&model_files[0]);
    let names: Vec<String> = reference.names().cloned().collect();
    let shapes: Vec<Vec<usize>> = names
        .iter()
        .map(|n| reference.shape(n).expect("listed").to_vec())
        .collect();
    for (file, ckpt) in model_files.iter().zip(&models) {
        let theirs: Vec<&String> = file.names().collect();
        if theirs.len() != names.len()
            || names
                .iter()
                .zip(&shapes)
                .any(|(n, s)| file.shape(n) != Some(s.as_slice()))
        {
            bail!(
                "{}: cannot merge: its tensors differ in names or shapes from the first parent's",
                ckpt.dir.display()
            );
        }
    }

    let mut merged: BTreeMap<String, TensorData> = BTreeMap::new();
    for (name, shape) in names.iter().zip(&shapes) {
        let base_values = base_file.as_mut().map(|f| f.read(name)).transpose()?;
        let values = model_files
            .iter_mut()
            .map(|f| f.read(name))
            .collect::<Result<Vec<_>, _>>()?;
        let out_values: Vec<f32> = merge_tensor(&spec.method, base_values.as_deref(), &values)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        if let Some(bad) = out_values.iter().find(|v| !v.is_finite()) {
            bail!("{name}: the merge produced {bad} (weights or scales too large)");
        }
        merged.insert(name.clone(), TensorData::new(out_values, shape.clone()));
    }

    let stage = StageDir::open(out, false, force, &inputs)?;
    // Same architecture and tokenizer: the first parent's config.json is the merge's.
    for file in [checkpoint::TOKENIZER_FILE, checkpoint::CONFIG_FILE] {
        stage.copy_from(first, file)?;
    }
    let bytes = checkpoint::safetensors_bytes(&merged, WeightDtype::F32)
        .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    drop(merged);
    checkpoint::write_atomic(&stage.path(checkpoint::MODEL_FILE), &bytes)?;
    drop(bytes);
    let record = Record {
        method: &spec.method,
        base: base.as_ref().map(|b| b.dir.display().to_string()),
        models: models.iter().map(|m| m.dir.display().to_string()).collect(),
    };
    checkpoint::write_atomic(
        &stage.path(MERGE_FILE),
        serde_json::to_string_pretty(&record)?.as_bytes(),
    )?;
    let mut lineage: Vec<_> = base.iter().map(|b| b.as_parent("base")).collect();
    lineage.extend(models.iter().map(|m| m.as_parent("model")));
    // Same architecture and tokenizer as the first parent; children inherit
    // the first model's training settings.
    let mut manifest = Manifest::tool(
        MERGE_KIND.name,
        first.manifest.model.clone(),
        &models[0],
        lineage,
    );
    manifest.chat_template = template;
    Ok(stage.commit(manifest)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_trims_elects_a_sign_and_averages_the_agreeing_values() {
        // Three task vectors of one 4-parameter tensor; density 0.5 keeps the
        // two largest of each.
        let deltas = vec![
            vec![3.0, -1.0, 0.5, 2.0],  // keeps 3, 2
            vec![-2.0, -4.0, 1.0, 0.1], // keeps -2, -4
            vec![1.0, 0.2, -3.0, 0.3],  // keeps 1, -3
        ];
        let merged = ties_delta(deltas, 0.5);
        // p0: 3, -2, 1 → sum 2 > 0 → mean(3, 1) = 2
        // p1: 0, -4, 0 → -4
        // p2: 0, 0, -3 → -3
        // p3: 2, 0, 0 → 2
        assert_eq!(merged, vec![2.0, -4.0, -3.0, 2.0]);
        // Density 1 and one model: the task vector itself.
        assert_eq!(ties_delta(vec![vec![1.5, -0.5]], 1.0), vec![1.5, -0.5]);
    }

    #[test]
    fn trimming_keeps_a_fixed_count_even_among_equal_magnitudes() {
        let mut v = vec![1.0, -1.0, 1.0, 0.5, -1.0];
        trim(&mut v, 2);
        assert_eq!(v, vec![1.0, -1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn flags_are_checked_before_anything_is_opened() {
        let m = |n: usize| (0..n).map(|i| PathBuf::from(format!("m{i}"))).collect();
        let err = |r: Result<MergeSpec>| r.unwrap_err().to_string();
        assert!(
            err(MergeSpec::from_flags(
                "linear",
                None,
                m(2),
                Some(vec![1.0]),
                None,
                None
            ))
            .contains("--weights: 1 values for 2 models")
        );
        assert!(
            err(MergeSpec::from_flags(
                "task-arithmetic",
                Some("b".into()),
                m(2),
                None,
                Some(vec![1.0, 1.0, 1.0]),
                None
            ))
            .contains("--scales: 3 values for 2 models")
        );
        for density in [0.0, 1.5, -0.1, f64::NAN] {
            assert!(
                err(MergeSpec::from_flags(
                    "ties",
                    Some("b".into()),
                    m(2),
                    None,
                    None,
                    Some(density)
                ))
                .contains("outside (0, 1]"),
                "{density}"
            );
        }
        assert!(
            err(MergeSpec::from_flags("ties", None, m(2), None, None, None))
                .contains("needs --base")
        );
        assert!(
            err(MergeSpec::from_flags("mean", None, m(2), None, None, None)).contains("unknown")
        );
        let spec = MergeSpec::from_flags("linear", None, m(4), None, None, None).unwrap();
        assert_eq!(
            spec.method,
            Method::Linear {
                weights: vec![0.25; 4]
            }
        );
    }
}
