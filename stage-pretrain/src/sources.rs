//! Named data sources with weights (`[[data.sources]]`): where each one's text
//! comes from, its own train/validation split, and the seeded draw of
//! training windows across them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use baton_core::checkpoint::DataRef;
use baton_core::data::{Corpus, TokenStream};
use baton_core::error::InvalidSetting;
use rand::Rng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

/// One `[[data.sources]]` entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// How metrics (`val/bpb/<name>`) and phases name it.
    pub name: String,
    /// A text file, a directory (its files, recursively, in name order), a
    /// glob (`data/*.txt`), or `builtin:NAME` (a corpus Baton fetches itself:
    /// `builtin:shakespeare`, `builtin:python-code`). Relative paths are
    /// relative to the working directory.
    pub path: String,
    /// Share of training rows drawn from it (relative to the others; > 0).
    /// Leave it out for an `eval_only` source.
    #[serde(default)]
    pub weight: Option<f64>,
    /// Validated on (its held-out part, `val/bpb/<name>`), never trained on:
    /// e.g. the earlier domain while continuing on a new one.
    #[serde(default)]
    pub eval_only: bool,
}

/// The name `--corpus FILE…` gives its one source.
pub const CORPUS: &str = "corpus";

/// Checks the sources: unique names, each with a weight > 0 (finite) unless
/// evaluation-only, and at least one to train on.
pub fn validate(sources: &[SourceConfig]) -> Result<(), InvalidSetting> {
    for (i, s) in sources.iter().enumerate() {
        let at = format!("data.sources[{i}] \"{}\"", s.name);
        if s.name.is_empty() || s.name.contains(['/', ' ']) {
            return Err(format!("{at}: a name must be non-empty, without '/' or spaces").into());
        }
        if sources[..i].iter().any(|t| t.name == s.name) {
            return Err(format!("{at}: two sources have this name").into());
        }
        if s.path.is_empty() {
            return Err(format!("{at}: path is empty").into());
        }
        match (s.eval_only, s.weight) {
            (true, Some(_)) => {
                return Err(format!("{at}: an eval_only source takes no weight").into());
            }
            (false, None) => {
                return Err(format!(
                    "{at}: weight is missing (a positive number; or eval_only = true)"
                )
                .into());
            }
            (false, Some(w)) if !(w.is_finite() && w > 0.0) => {
                return Err(
                    format!("{at}: weight must be a positive finite number, got {w}").into(),
                );
            }
            _ => {}
        }
    }
    if !sources.iter().any(|s| !s.eval_only) {
        return Err("data.sources: no source to train on (all are eval_only)".into());
    }
    Ok(())
}

/// The files a source's `path` names, in order.
pub fn files(source: &SourceConfig) -> Result<Vec<PathBuf>> {
    let at = |what: String| anyhow::anyhow!("data source \"{}\": {what}", source.name);
    if let Some(name) = source.path.strip_prefix("builtin:") {
        return Ok(baton_core::data::builtin_corpus(name)?);
    }
    let path = Path::new(&source.path);
    if path.is_dir() {
        let visible = |p: &Path| {
            p.file_name()
                .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        };
        let out = baton_core::data::files_under(path, &visible)
            .map_err(|e| at(format!("{}: {e}", path.display())))?;
        if out.is_empty() {
            return Err(at(format!("{}: directory holds no files", path.display())));
        }
        return Ok(out);
    }
    if source.path.contains(['*', '?', '[']) {
        let mut out: Vec<PathBuf> = glob::glob(&source.path)
            .map_err(|e| at(format!("{}: bad glob ({e})", source.path)))?
            .filter_map(|p| p.ok())
            .filter(|p| p.is_file())
            .collect();
        out.sort();
        if out.is_empty() {
            return Err(at(format!("{}: no file matches", source.path)));
        }
        return Ok(out);
    }
    Ok(vec![path.to_path_buf()])
}

/// A source read and split: its text, its training and held-out tokens.
pub struct Source {
    pub name: String,
    pub eval_only: bool,
    pub weight: f64,
    pub corpus: Corpus,
    pub train: TokenStream,
    pub val: TokenStream,
    pub val_bytes: usize,
}

impl Source {
    pub fn data_refs(&self) -> impl Iterator<Item = DataRef> + '_ {
        self.corpus.sources.iter().cloned()
    }
}

/// Training weights by source index for a mixture: `over` (a phase's
/// `weights`, by name) where given, else each source's own; 0 for
/// evaluation-only sources.
pub fn mixture(sources: &[Source], over: Option<&BTreeMap<String, f64>>) -> Vec<f64> {
    sources
        .iter()
        .map(|s| match over {
            _ if s.eval_only => 0.0,
            Some(map) => map.get(&s.name).copied().unwrap_or(0.0),
            None => s.weight,
        })
        .collect()
}

/// `rows` training windows of `seq_len + 1` tokens as `(inputs, targets)`:
/// each row's source drawn by `weights`, then its start, from `rng`. With a
/// single source of positive weight no source is drawn, so a one-source run
/// samples exactly as a plain corpus does.
pub fn sample(
    sources: &[Source],
    weights: &[f64],
    rows: usize,
    seq_len: usize,
    rng: &mut StdRng,
) -> (Vec<u32>, Vec<u32>) {
    let active: Vec<usize> = (0..sources.len()).filter(|&i| weights[i] > 0.0).collect();
    if let [only] = active.as_slice() {
        return sources[*only].train.sample(rows, seq_len, rng);
    }
    let mut inputs = Vec::with_capacity(rows * seq_len);
    let mut targets = Vec::with_capacity(rows * seq_len);
    for _ in 0..rows {
        let chosen = draw_source(&active, weights, rng);
        let (i, t) = sources[chosen].train.sample(1, seq_len, rng);
        inputs.extend(i);
        targets.extend(t);
    }
    (inputs, targets)
}

/// [`sample`] with every row of the micro-batch from one source, drawn by
/// `weights` (`data.mix = "micro"`): single-source micro-batches, the
/// setting where a per-micro-batch balancing loss pushes each micro-batch's
/// tokens to spread over all experts ("Demons in the Detail").
pub fn sample_one_source(
    sources: &[Source],
    weights: &[f64],
    rows: usize,
    seq_len: usize,
    rng: &mut StdRng,
) -> (Vec<u32>, Vec<u32>) {
    let active: Vec<usize> = (0..sources.len()).filter(|&i| weights[i] > 0.0).collect();
    let chosen = draw_source(&active, weights, rng);
    sources[chosen].train.sample(rows, seq_len, rng)
}

/// One of the `active` sources, drawn by `weights`.
fn draw_source(active: &[usize], weights: &[f64], rng: &mut StdRng) -> usize {
    let total: f64 = active.iter().map(|&i| weights[i]).sum();
    let mut pick = rng.random::<f64>() * total;
    for &i in active {
        if pick < weights[i] {
            return i;
        }
        pick -= weights[i];
    }
    *active.last().expect("a mixture has a source")
}

/// Fails unless every source that trains has a window of `seq_len + 1` tokens.
pub fn check_long_enough(sources: &[Source], seq_len: usize) -> Result<()> {
    for s in sources.iter().filter(|s| !s.eval_only) {
        if s.train.tokens.len() < seq_len + 1 {
            bail!(
                "data source \"{}\" ({}): its training split has {} tokens, one window of the run needs {}",
                s.name,
                s.corpus.describe(),
                s.train.tokens.len(),
                seq_len + 1
            );
        }
    }
    Ok(())
}
