//! The reference model's reply log-probs, computed once into a hashed cache.

use std::path::Path;

use anyhow::{Context, Result, bail};
use baton_core::checkpoint::{self};
use serde::{Deserialize, Serialize};

use crate::config::*;

// ---------------------------------------------------------------------------
// Reference cache
// ---------------------------------------------------------------------------

/// What a reference cache is valid for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKey {
    pub reference_manifest_sha256: String,
    pub data_sha256: String,
    pub tokenizer_sha256: String,
    pub chat_template: String,
    pub seq_len: usize,
    pub items: usize,
    /// `align.score_tokens`: which reply tokens were scored.
    pub score_tokens: ScoreTokens,
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    format: String,
    key: CacheKey,
    logps: Vec<f32>,
}

const CACHE_FORMAT: &str = "baton-reference-logps/1";

/// Reads a reference cache, refusing it unless its key equals `key`.
pub fn read_reference_cache(path: &Path, key: &CacheKey) -> Result<Vec<f32>> {
    let text = baton_core::files::read_text(path, "reference cache", baton_core::files::cap::TEXT)?;
    let file: CacheFile = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not a reference cache: {e}", path.display()))?;
    if file.format != CACHE_FORMAT {
        bail!(
            "{}: reference cache format {} (expected {CACHE_FORMAT})",
            path.display(),
            file.format
        );
    }
    let (have, want) = (serde_json::to_value(&file.key)?, serde_json::to_value(key)?);
    if let (Some(have), Some(want)) = (have.as_object(), want.as_object()) {
        for (k, v) in want {
            if have.get(k) != Some(v) {
                bail!(
                    "{}: stale reference cache: {k} is {} but this run has {v}; delete it or pass another align.reference_cache",
                    path.display(),
                    have.get(k).cloned().unwrap_or_default()
                );
            }
        }
    }
    if file.logps.len() != key.items || file.logps.iter().any(|v| !v.is_finite()) {
        bail!("{}: reference cache is corrupt", path.display());
    }
    Ok(file.logps)
}

pub fn write_reference_cache(path: &Path, key: &CacheKey, logps: &[f32]) -> Result<()> {
    let file = CacheFile {
        format: CACHE_FORMAT.into(),
        key: key.clone(),
        logps: logps.to_vec(),
    };
    checkpoint::write_atomic(path, serde_json::to_string(&file)?.as_bytes())
        .with_context(|| format!("writing the reference cache {}", path.display()))?;
    Ok(())
}
