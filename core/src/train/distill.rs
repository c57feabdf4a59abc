//! Knowledge distillation: a student trained on a teacher's soft labels as
//! well as the data's hard ones ("FitNets: Hints for Thin Deep Nets";
//! "Towards the Fundamental Limits of Knowledge Transfer over Finite Domains"):
//!
//! loss = (1 − α)·CE + α·τ²·KL(p_T^τ ‖ p_S^τ), summed over the supervised tokens,
//!
//! where p^τ is the softmax of the logits divided by the temperature τ (the τ²
//! keeps the soft term's gradients on the scale of the hard term's).
//!
//! The teacher's distribution at a position is kept as its `top_k` log-probs
//! at τ (`top_k = 0`: the whole vocabulary, the exact KL). The mass outside
//! them is one more outcome (`tail`, the default), matched by the student's
//! mass outside the same tokens; or the k are renormalised. They come from the teacher model run beside the student
//! (`online`) or from a cache computed once (`cached`): a file keyed by the
//! teacher's manifest hash, the exact token windows of every step, the
//! tokenizer, k and τ, so the teacher need not be resident while the student
//! trains, and a second student with the same data reuses it. Both give the
//! same loss (tests).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Batch, int_tensor, row_grads};
use crate::checkpoint::Checkpoint;
use crate::error::InvalidSetting;
use crate::model::{Llama, token_logprobs};

/// `[distill]`: used when a stage is given `--teacher`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillConfig {
    /// Weight of the teacher term: (1 − α)·CE + α·τ²·KL. 1 = the teacher's
    /// soft labels alone.
    pub alpha: f64,
    /// Softmax temperature τ of both distributions in the KL term.
    pub temperature: f64,
    /// Teacher tokens kept per position (0 = the whole vocabulary).
    pub top_k: usize,
    /// With `top_k` below the vocabulary: the teacher's remaining mass
    /// 1 − Σ_top-k p_T is one more category, matched by the student's mass
    /// outside the same k tokens (KL over k + 1 outcomes). Off: the k
    /// probabilities are renormalised to sum to one.
    pub tail: bool,
    /// Where the teacher's top-k come from.
    pub teacher: TeacherMode,
    /// The cache file (`cached`): read when it exists and its key matches this
    /// run, written when it does not exist. Empty: `teacher_topk.bin` in the
    /// checkpoint being written.
    pub cache: String,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            alpha: 0.5,
            temperature: 1.0,
            top_k: 64,
            tail: true,
            teacher: TeacherMode::Online,
            cache: String::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeacherMode {
    /// The teacher model stays in memory and scores each micro-batch.
    #[default]
    Online,
    /// The teacher scores every step's batches once, into a hashed cache file;
    /// training reads it and the teacher is not kept.
    Cached,
}

impl DistillConfig {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(format!("distill.alpha must be in [0, 1], not {}", self.alpha).into());
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "distill.temperature must be positive, not {}",
                self.temperature
            )
            .into());
        }
        Ok(())
    }

    /// Teacher tokens per position for a vocabulary of `vocab`.
    pub fn k(&self, vocab: usize) -> usize {
        if self.top_k == 0 {
            vocab
        } else {
            self.top_k.min(vocab)
        }
    }
}

/// Opens the checkpoint `--teacher` names (any kind).
pub fn open_teacher(dir: &Path) -> Result<Checkpoint> {
    Checkpoint::open(dir, &[]).with_context(|| format!("--teacher {}", dir.display()))
}

/// The run-input record of a teacher (a resumed run with another teacher is
/// a changed run).
pub fn teacher_input(teacher: &Checkpoint) -> (String, String) {
    (
        format!("teacher checkpoint {}", teacher.dir.display()),
        teacher.manifest_sha256.clone(),
    )
}

/// Checks that `teacher` can teach a student with this tokenizer and
/// vocabulary: the same tokenizer file, the same number of logits.
pub fn check_teacher(
    teacher: &Checkpoint,
    student_tokenizer_sha256: &str,
    student_vocab: usize,
) -> Result<()> {
    if teacher.manifest.tokenizer_sha256 != student_tokenizer_sha256 {
        bail!(
            "{}: the teacher's tokenizer differs from the student's (distillation needs the same tokenizer)",
            teacher.dir.display()
        );
    }
    if teacher.manifest.model.vocab_size != student_vocab {
        bail!(
            "{}: the teacher has model.vocab_size {} but the student {} (distillation needs the same vocabulary)",
            teacher.dir.display(),
            teacher.manifest.model.vocab_size,
            student_vocab
        );
    }
    Ok(())
}

/// The teacher's top-k log-probs (at τ, not renormalised) at every
/// supervised position of one micro-batch, in position order.
#[derive(Clone, Debug, PartialEq)]
pub struct TeacherTargets {
    pub k: usize,
    /// `[supervised × k]` token ids, most probable first.
    pub indices: Vec<u32>,
    /// `[supervised × k]` their log-probabilities.
    pub logprobs: Vec<f32>,
}

impl TeacherTargets {
    /// Scores `batch` with `teacher`: log-softmax of the logits / τ in f64 at
    /// every position with a positive weight, keeping the `k` largest (ties
    /// to the lower id, so the choice is deterministic).
    pub fn compute<B: Backend>(
        teacher: &Llama<B>,
        batch: &Batch,
        k: usize,
        temperature: f64,
        device: &B::Device,
    ) -> Self {
        let logits = batch.logits(teacher, device);
        let vocab = logits.dims()[2];
        let host: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("logits convert to f32");
        let k = k.clamp(1, vocab);
        let mut out = Self {
            k,
            indices: Vec::new(),
            logprobs: Vec::new(),
        };
        let mut order: Vec<u32> = Vec::with_capacity(vocab);
        for (at, &w) in batch.weights.iter().enumerate() {
            if w <= 0.0 {
                continue;
            }
            let row = &host[at * vocab..(at + 1) * vocab];
            let scaled = |i: u32| row[i as usize] as f64 / temperature;
            let max = (0..vocab as u32)
                .map(scaled)
                .fold(f64::NEG_INFINITY, f64::max);
            let lse = max
                + (0..vocab as u32)
                    .map(|i| (scaled(i) - max).exp())
                    .sum::<f64>()
                    .ln();
            order.clear();
            order.extend(0..vocab as u32);
            let by_value =
                |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
            if k < vocab {
                order.select_nth_unstable_by(k - 1, by_value);
                order.truncate(k);
                order.sort_unstable_by(by_value);
            }
            for &i in &order {
                out.indices.push(i);
                out.logprobs.push((scaled(i) - lse) as f32);
            }
        }
        out
    }

    fn positions(&self) -> usize {
        self.indices.len() / self.k
    }

    /// The dense targets of rows `first_row..first_row + part.batch` of
    /// `batch`: token ids and q·w (`[rows, seq, k]`; zero where nothing is
    /// supervised), the tail's q·w (`[rows, seq]`), and Σ w·q·ln q (the
    /// KL's constant part). With `tail`, q is the teacher's probability and
    /// the tail holds 1 − Σ q; without, q is renormalised over the k tokens.
    fn dense(&self, batch: &Batch, first_row: usize, rows: usize, tail: bool) -> Dense {
        let (seq, k) = (batch.seq, self.k);
        let mut ids = vec![0i32; rows * seq * k];
        let mut qw = vec![0f32; rows * seq * k];
        let mut tail_qw = vec![0f32; rows * seq];
        let mut constant = 0.0;
        let mut ordinal = batch.weights[..first_row * seq]
            .iter()
            .filter(|&&w| w > 0.0)
            .count();
        for at in 0..rows * seq {
            let w = batch.weights[first_row * seq + at];
            if w <= 0.0 {
                continue;
            }
            let lp = &self.logprobs[ordinal * k..(ordinal + 1) * k];
            let lse = if tail {
                0.0
            } else {
                let max = lp.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                max + lp.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln()
            };
            if tail {
                let rest = 1.0 - lp.iter().map(|&l| (l as f64).exp()).sum::<f64>();
                if rest > 0.0 {
                    tail_qw[at] = (rest * w as f64) as f32;
                    constant += w as f64 * rest * rest.ln();
                }
            }
            for j in 0..k {
                let log_q = lp[j] as f64 - lse;
                let q = log_q.exp();
                ids[at * k + j] = self.indices[ordinal * k + j] as i32;
                qw[at * k + j] = (q * w as f64) as f32;
                if q > 0.0 {
                    constant += w as f64 * q * log_q;
                }
            }
            ordinal += 1;
        }
        Dense {
            ids,
            qw,
            tail_qw,
            constant,
        }
    }
}

struct Dense {
    ids: Vec<i32>,
    qw: Vec<f32>,
    tail_qw: Vec<f32>,
    constant: f64,
}

/// The summed distillation loss of `part` (rows `first_row…` of `batch`):
/// (1 − α)·Σ w·(−ln p_S(target)) + α·τ²·Σ w·KL(q ‖ p_S^τ) over its positions.
pub fn distill_loss<B: Backend>(
    model: &Llama<B>,
    part: &Batch,
    batch: &Batch,
    first_row: usize,
    targets: &TeacherTargets,
    cfg: &DistillConfig,
    device: &B::Device,
) -> Tensor<B, 1> {
    let logits = part.logits(model, device);
    let [rows, seq, _] = logits.dims();
    let weights =
        Tensor::<B, 2>::from_data(TensorData::new(part.weights.clone(), [rows, seq]), device);
    let target_ids = int_tensor::<B>(&part.targets, rows, seq, device);
    let ce = token_logprobs(logits.clone(), target_ids)
        .mul(weights)
        .sum()
        .neg();
    let k = targets.k;
    let tail = cfg.tail && k < logits.dims()[2];
    let dense = targets.dense(batch, first_row, rows, tail);
    let ids = Tensor::<B, 3, Int>::from_data(TensorData::new(dense.ids, [rows, seq, k]), device);
    let qw = Tensor::<B, 3>::from_data(TensorData::new(dense.qw, [rows, seq, k]), device);
    let scaled = if cfg.temperature == 1.0 {
        logits
    } else {
        logits.div_scalar(cfg.temperature)
    };
    let log_p = burn::tensor::activation::log_softmax(scaled, 2);
    let gathered = log_p.gather(2, ids);
    let mut cross = gathered.clone().mul(qw).sum();
    if tail {
        // ln(1 − Σ_top-k p_S), kept finite where the k tokens hold it all.
        let rest = gathered.exp().sum_dim(2).neg().add_scalar(1.0);
        let log_rest = rest.clamp_min(1e-12).log().reshape([rows, seq]);
        let tail_qw =
            Tensor::<B, 2>::from_data(TensorData::new(dense.tail_qw, [rows, seq]), device);
        cross = cross.add(log_rest.mul(tail_qw).sum());
    }
    let kl = cross.neg().add_scalar(dense.constant);
    let tau2 = cfg.temperature * cfg.temperature;
    ce.mul_scalar(1.0 - cfg.alpha)
        .add(kl.mul_scalar(cfg.alpha * tau2))
}

/// The teacher of a run: a model scoring each micro-batch, or a cache.
pub struct Distiller<B: AutodiffBackend> {
    pub cfg: DistillConfig,
    source: Source<B>,
}

enum Source<B: AutodiffBackend> {
    Online(Box<Llama<B::InnerBackend>>),
    Cached(TeacherCache),
}

impl<B: AutodiffBackend> Distiller<B> {
    /// Prepares the teacher of a run of `steps` optimizer steps whose
    /// micro-batches `batches(step)` gives: the model (`online`), or the cache
    /// at `cfg.cache` (else `default_cache`), read if it exists and matches
    /// this run, else computed with the teacher and written.
    pub fn prepare(
        teacher: &Checkpoint,
        cfg: &DistillConfig,
        default_cache: PathBuf,
        steps: u64,
        mut batches: impl FnMut(u64) -> Vec<Batch>,
        device: &B::Device,
    ) -> Result<Self> {
        let vocab = teacher.manifest.model.vocab_size;
        let source = match cfg.teacher {
            TeacherMode::Online => {
                Source::Online(Box::new(teacher.model::<B::InnerBackend>(device)?))
            }
            TeacherMode::Cached => {
                let path = if cfg.cache.is_empty() {
                    default_cache
                } else {
                    PathBuf::from(&cfg.cache)
                };
                let mut hasher = Sha256::new();
                let mut entries = 0;
                for step in 0..steps {
                    for batch in batches(step) {
                        hasher.update(batch_hash(&batch));
                        entries += 1;
                    }
                }
                let key = CacheKey {
                    teacher_manifest_sha256: teacher.manifest_sha256.clone(),
                    batches_sha256: hex(&hasher.finalize()),
                    tokenizer_sha256: teacher.manifest.tokenizer_sha256.clone(),
                    top_k: cfg.k(vocab),
                    temperature: cfg.temperature,
                    entries,
                };
                if !path.exists() {
                    let model = teacher.model::<B::InnerBackend>(device)?;
                    tracing::info!(
                        "scoring {entries} micro-batches with the teacher into {}",
                        path.display()
                    );
                    TeacherCache::write(&path, &key, |emit| {
                        for step in 0..steps {
                            for batch in batches(step) {
                                let t = TeacherTargets::compute(
                                    &model,
                                    &batch,
                                    key.top_k,
                                    cfg.temperature,
                                    device,
                                );
                                emit(&batch, &t)?;
                            }
                        }
                        Ok(())
                    })?;
                } else {
                    tracing::info!("teacher top-{} from {}", key.top_k, path.display());
                }
                Source::Cached(TeacherCache::open(&path, &key, vocab)?)
            }
        };
        Ok(Self {
            cfg: cfg.clone(),
            source,
        })
    }

    /// A distiller scoring with `teacher` in memory.
    pub fn online(teacher: Llama<B::InnerBackend>, cfg: &DistillConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            source: Source::Online(Box::new(teacher)),
        }
    }

    /// The teacher's targets for `batch`.
    pub fn targets(&mut self, batch: &Batch, device: &B::Device) -> Result<TeacherTargets> {
        match &mut self.source {
            Source::Online(teacher) => {
                let vocab = teacher.model.embed_tokens.weight.dims()[0];
                Ok(TeacherTargets::compute(
                    teacher,
                    batch,
                    self.cfg.k(vocab),
                    self.cfg.temperature,
                    device,
                ))
            }
            Source::Cached(cache) => cache.read(batch),
        }
    }

    /// The summed distillation loss of `batch` and its gradients divided by
    /// `scale`, rows split among `workers` threads.
    pub fn loss_grads(
        &mut self,
        model: &Llama<B>,
        batch: &Batch,
        workers: usize,
        scale: f64,
        device: &B::Device,
    ) -> (f64, GradientsParams) {
        let targets = self
            .targets(batch, device)
            .unwrap_or_else(|e| panic!("the teacher's targets: {e:#}"));
        let cfg = &self.cfg;
        row_grads(model, batch, workers, scale, |model, part, first_row| {
            distill_loss(
                model,
                part,
                batch,
                first_row,
                &targets,
                cfg,
                &model.device(),
            )
        })
    }
}

/// The gradients of a stage that may distil: `distiller`'s loss when it has
/// one, else the next-token NLL ([`super::nll_grads`]).
pub fn loss_grads<B: AutodiffBackend>(
    distiller: Option<&mut Distiller<B>>,
    model: &Llama<B>,
    batch: &Batch,
    workers: usize,
    scale: f64,
    device: &B::Device,
) -> (f64, GradientsParams) {
    match distiller {
        Some(distiller) => distiller.loss_grads(model, batch, workers, scale, device),
        None => super::nll_grads(model, batch, workers, scale, device),
    }
}

// ---------------------------------------------------------------------------
// Cache file
// ---------------------------------------------------------------------------

/// What a teacher cache is valid for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheKey {
    pub teacher_manifest_sha256: String,
    /// Hash of every micro-batch of every step (ids, targets, weights,
    /// positions): the data, its tokenisation, the seed and the batch shapes.
    pub batches_sha256: String,
    pub tokenizer_sha256: String,
    pub top_k: usize,
    pub temperature: f64,
    /// Micro-batches in the file.
    pub entries: usize,
}

#[derive(Serialize, Deserialize)]
struct Trailer {
    format: String,
    key: CacheKey,
    payload_sha256: String,
}

const FORMAT: &str = "baton-teacher-topk/1";
/// The cache's file name in the checkpoint being written, by default.
pub const DEFAULT_CACHE: &str = "teacher_topk.bin";
const MAGIC: &[u8; 8] = b"BATONTK1";

/// A teacher cache opened for reading: `MAGIC`, one entry per micro-batch
/// (its hash, its supervised positions n as u32 LE, n·k ids u32 LE, n·k
/// log-probs f32 LE), a JSON trailer (format, key, payload hash) and the
/// trailer's length as u64 LE.
pub struct TeacherCache {
    path: PathBuf,
    file: BufReader<File>,
    k: usize,
    /// Each micro-batch's hash → (offset of its ids, supervised positions).
    index: HashMap<[u8; 32], (u64, usize)>,
}

impl TeacherCache {
    /// Writes a cache: `fill` emits every micro-batch with its targets in
    /// order. Written to a hidden temporary beside `path` and renamed.
    pub fn write(
        path: &Path,
        key: &CacheKey,
        fill: impl FnOnce(&mut dyn FnMut(&Batch, &TeacherTargets) -> Result<()>) -> Result<()>,
    ) -> Result<()> {
        let name = path
            .file_name()
            .with_context(|| format!("{}: not a file path", path.display()))?;
        let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
        let file =
            File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        let mut out = BufWriter::new(file);
        let mut hasher = Sha256::new();
        out.write_all(MAGIC)?;
        let mut written = 0;
        let mut emit = |batch: &Batch, t: &TeacherTargets| -> Result<()> {
            if t.k != key.top_k {
                bail!(
                    "teacher targets with k = {} in a top-{} cache",
                    t.k,
                    key.top_k
                );
            }
            let mut bytes = Vec::with_capacity(36 + t.indices.len() * 8);
            bytes.extend_from_slice(&batch_hash(batch));
            bytes.extend_from_slice(&(t.positions() as u32).to_le_bytes());
            for i in &t.indices {
                bytes.extend_from_slice(&i.to_le_bytes());
            }
            for l in &t.logprobs {
                bytes.extend_from_slice(&l.to_le_bytes());
            }
            hasher.update(&bytes);
            out.write_all(&bytes)?;
            written += 1;
            Ok(())
        };
        let filled = fill(&mut emit);
        let finish = filled.and_then(|()| {
            if written != key.entries {
                bail!("{written} micro-batches scored, {} expected", key.entries);
            }
            let trailer = serde_json::to_vec(&Trailer {
                format: FORMAT.into(),
                key: key.clone(),
                payload_sha256: hex(&hasher.finalize()),
            })?;
            out.write_all(&trailer)?;
            out.write_all(&(trailer.len() as u64).to_le_bytes())?;
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            Ok(())
        });
        if let Err(e) = finish {
            let _ = fs::remove_file(&tmp);
            return Err(e.context(format!("writing the teacher cache {}", path.display())));
        }
        fs::rename(&tmp, path)
            .with_context(|| format!("{}: cannot write the teacher cache", path.display()))
    }

    /// Opens a cache, refusing it unless its key equals `key` (a stale
    /// cache: the field that differs is named) and its payload hashes to the
    /// trailer's hash with every id below `vocab` (a tampered cache).
    pub fn open(path: &Path, key: &CacheKey, vocab: usize) -> Result<Self> {
        let shown = path.display();
        let corrupt = |why: &str| anyhow::anyhow!("{shown}: teacher cache is corrupt ({why})");
        let len = crate::files::regular_file(path, "teacher cache")?;
        let mut file =
            BufReader::new(File::open(path).with_context(|| format!("{shown}: cannot open"))?);
        let mut magic = [0u8; 8];
        if len < 16 || file.read_exact(&mut magic).is_err() || &magic != MAGIC {
            bail!("{shown}: not a teacher cache");
        }
        file.seek(SeekFrom::End(-8))?;
        let mut n = [0u8; 8];
        file.read_exact(&mut n)?;
        let trailer_len = u64::from_le_bytes(n);
        if trailer_len > (1 << 20) || trailer_len + 16 > len {
            return Err(corrupt("bad trailer length"));
        }
        let payload_end = len - 8 - trailer_len;
        file.seek(SeekFrom::Start(payload_end))?;
        let mut trailer = vec![0u8; trailer_len as usize];
        file.read_exact(&mut trailer)?;
        let trailer: Trailer =
            serde_json::from_slice(&trailer).map_err(|_| corrupt("unreadable trailer"))?;
        if trailer.format != FORMAT {
            bail!(
                "{shown}: teacher cache format {} (expected {FORMAT})",
                trailer.format
            );
        }
        let (have, want) = (
            serde_json::to_value(&trailer.key)?,
            serde_json::to_value(key)?,
        );
        if let (Some(have), Some(want)) = (have.as_object(), want.as_object()) {
            for (name, v) in want {
                if have.get(name) != Some(v) {
                    bail!(
                        "{shown}: stale teacher cache: {name} is {} but this run has {v}; delete it or set another distill.cache",
                        have.get(name).cloned().unwrap_or_default()
                    );
                }
            }
        }
        // One pass over the payload: its hash, the entries' index, the ids' range.
        file.seek(SeekFrom::Start(8))?;
        let mut hasher = Sha256::new();
        let mut index = HashMap::new();
        let mut at = 8u64;
        let k = key.top_k;
        while at < payload_end {
            let mut head = [0u8; 36];
            if at + 36 > payload_end || file.read_exact(&mut head).is_err() {
                return Err(corrupt("truncated entry"));
            }
            hasher.update(head);
            let hash: [u8; 32] = head[..32].try_into().expect("32 bytes");
            let positions = u32::from_le_bytes(head[32..].try_into().expect("4 bytes")) as usize;
            let body = (positions * k * 8) as u64;
            if at + 36 + body > payload_end {
                return Err(corrupt("truncated entry"));
            }
            let mut bytes = vec![0u8; body as usize];
            file.read_exact(&mut bytes)?;
            hasher.update(&bytes);
            let (ids, lps) = bytes.split_at(positions * k * 4);
            let bad_id = ids
                .chunks_exact(4)
                .any(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as usize >= vocab);
            let bad_lp = lps.chunks_exact(4).any(|c| {
                let v = f32::from_le_bytes(c.try_into().expect("4 bytes"));
                !(v.is_finite() && v <= 1e-4)
            });
            if bad_id || bad_lp {
                return Err(corrupt("a token id or log-prob out of range"));
            }
            index.insert(hash, (at + 36, positions));
            at += 36 + body;
        }
        if hex(&hasher.finalize()) != trailer.payload_sha256 {
            return Err(corrupt("checksum mismatch"));
        }
        if index.len() != key.entries {
            return Err(corrupt("wrong number of entries"));
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            k,
            index,
        })
    }

    /// The targets of `batch` (looked up by its hash).
    pub fn read(&mut self, batch: &Batch) -> Result<TeacherTargets> {
        let Some(&(offset, positions)) = self.index.get(&batch_hash(batch)) else {
            bail!(
                "{}: the teacher cache holds no entry for this micro-batch",
                self.path.display()
            );
        };
        let supervised = batch.weights.iter().filter(|&&w| w > 0.0).count();
        if supervised != positions {
            bail!(
                "{}: entry with {positions} positions for a batch with {supervised}",
                self.path.display()
            );
        }
        let n = positions * self.k;
        let mut bytes = vec![0u8; n * 8];
        self.file.seek(SeekFrom::Start(offset))?;
        self.file.read_exact(&mut bytes)?;
        let (ids, lps) = bytes.split_at(n * 4);
        Ok(TeacherTargets {
            k: self.k,
            indices: ids
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
            logprobs: lps
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
        })
    }
}

/// SHA-256 of everything the loss of a micro-batch depends on but the model.
fn batch_hash(batch: &Batch) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((batch.batch as u64).to_le_bytes());
    h.update((batch.seq as u64).to_le_bytes());
    let mut words = |v: &[u32]| {
        h.update((v.len() as u64).to_le_bytes());
        for x in v {
            h.update(x.to_le_bytes());
        }
    };
    words(&batch.inputs);
    words(&batch.targets);
    words(
        &batch
            .weights
            .iter()
            .map(|w| w.to_bits())
            .collect::<Vec<_>>(),
    );
    words(batch.positions.as_deref().unwrap_or(&[]));
    words(batch.doc_ids.as_deref().unwrap_or(&[]));
    h.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Inner, Train};
    use crate::model::ModelConfig;
    use burn::tensor::ElementConversion;

    fn config(d_model: usize) -> ModelConfig {
        ModelConfig {
            vocab_size: 40,
            d_model,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            d_ff: 48,
            max_seq_len: 16,
            ..ModelConfig::default()
        }
    }

    /// Two rows of 6 tokens, the first position of each unsupervised.
    fn batch() -> Batch {
        let inputs: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 40).collect();
        let targets: Vec<u32> = (0..12).map(|i| (i * 11 + 5) % 40).collect();
        let mut b = Batch::dense(2, 6, inputs, targets);
        b.weights[0] = 0.0;
        b.weights[6] = 0.0;
        b
    }

    fn value(t: Tensor<Inner, 1>) -> f64 {
        t.into_scalar().elem::<f64>()
    }

    /// The loss from host-side log-softmaxes of both models' logits.
    fn reference_loss(
        student: &Llama<Inner>,
        teacher: &Llama<Inner>,
        batch: &Batch,
        cfg: &DistillConfig,
    ) -> f64 {
        let device = Default::default();
        let host = |m: &Llama<Inner>| -> Vec<f32> {
            batch
                .logits(m, &device)
                .into_data()
                .convert::<f32>()
                .into_vec()
                .unwrap()
        };
        let (s, t) = (host(student), host(teacher));
        let v = 40;
        let log_softmax = |row: &[f32], tau: f64| -> Vec<f64> {
            let x: Vec<f64> = row.iter().map(|&z| z as f64 / tau).collect();
            let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + x.iter().map(|z| (z - m).exp()).sum::<f64>().ln();
            x.iter().map(|z| z - lse).collect()
        };
        let mut total = 0.0;
        for (at, &w) in batch.weights.iter().enumerate() {
            let (srow, trow) = (&s[at * v..(at + 1) * v], &t[at * v..(at + 1) * v]);
            let ce = -log_softmax(srow, 1.0)[batch.targets[at] as usize];
            let (ls, lt) = (
                log_softmax(srow, cfg.temperature),
                log_softmax(trow, cfg.temperature),
            );
            let k = cfg.k(v);
            let mut top: Vec<usize> = (0..v).collect();
            top.sort_by(|&a, &b| lt[b].total_cmp(&lt[a]).then(a.cmp(&b)));
            top.truncate(k);
            let q_top: f64 = top.iter().map(|&i| lt[i].exp()).sum();
            let p_top: f64 = top.iter().map(|&i| ls[i].exp()).sum();
            let kl: f64 = if k == v || cfg.tail {
                let head: f64 = top.iter().map(|&i| lt[i].exp() * (lt[i] - ls[i])).sum();
                let rest = 1.0 - q_top;
                head + if k < v && rest > 0.0 {
                    rest * (rest.ln() - (1.0 - p_top).ln())
                } else {
                    0.0
                }
            } else {
                top.iter()
                    .map(|&i| {
                        let q = lt[i].exp() / q_top;
                        q * (q.ln() - ls[i])
                    })
                    .sum()
            };
            let tau2 = cfg.temperature * cfg.temperature;
            total += w as f64 * ((1.0 - cfg.alpha) * ce + cfg.alpha * tau2 * kl);
        }
        total
    }

    #[test]
    fn full_vocabulary_loss_is_the_exact_kl() {
        let device = Default::default();
        let student = config(16).init::<Inner>(1, &device);
        let teacher = config(32).init::<Inner>(2, &device);
        let b = batch();
        for (alpha, temperature) in [(0.5, 1.0), (1.0, 2.0), (0.0, 1.0), (0.7, 0.5)] {
            let cfg = DistillConfig {
                alpha,
                temperature,
                top_k: 0,
                ..DistillConfig::default()
            };
            let t = TeacherTargets::compute(&teacher, &b, cfg.k(40), temperature, &device);
            assert_eq!(t.indices.len(), 10 * 40);
            let got = value(distill_loss(&student, &b, &b, 0, &t, &cfg, &device));
            let want = reference_loss(&student, &teacher, &b, &cfg);
            assert!(
                (got - want).abs() < 1e-4 * want.abs().max(1.0),
                "α {alpha} τ {temperature}: {got} vs {want}"
            );
        }
        // Top-k, with the tail as one more outcome or renormalised.
        for tail in [true, false] {
            let cfg = DistillConfig {
                alpha: 0.8,
                temperature: 1.5,
                top_k: 5,
                tail,
                ..DistillConfig::default()
            };
            let t = TeacherTargets::compute(&teacher, &b, 5, 1.5, &device);
            let got = value(distill_loss(&student, &b, &b, 0, &t, &cfg, &device));
            let want = reference_loss(&student, &teacher, &b, &cfg);
            assert!(
                (got - want).abs() < 1e-4 * want.abs().max(1.0),
                "tail {tail}: {got} vs {want}"
            );
        }
        // A student that is its teacher has nothing left to learn from it.
        let cfg = DistillConfig {
            alpha: 1.0,
            top_k: 0,
            temperature: 2.0,
            ..DistillConfig::default()
        };
        let t = TeacherTargets::compute(&teacher, &b, 40, 2.0, &device);
        let kl = value(distill_loss(&teacher, &b, &b, 0, &t, &cfg, &device));
        assert!(kl.abs() < 1e-4, "KL of a model with itself: {kl}");
        // With the tail so at top-k too; renormalising over k tokens is not
        // zero there (it pushes the student to put all its mass on them).
        let t = TeacherTargets::compute(&teacher, &b, 5, 2.0, &device);
        for (tail, zero) in [(true, true), (false, false)] {
            let cfg = DistillConfig {
                top_k: 5,
                tail,
                ..cfg.clone()
            };
            let kl = value(distill_loss(&teacher, &b, &b, 0, &t, &cfg, &device));
            assert_eq!(kl.abs() < 1e-4, zero, "tail {tail}: KL with itself {kl}");
        }
    }

    #[test]
    fn top_k_keeps_the_most_probable_tokens_and_rows_split_exactly() {
        let device = Default::default();
        let student = config(16).init::<Inner>(1, &device);
        let teacher = config(32).init::<Inner>(2, &device);
        let b = batch();
        let full = TeacherTargets::compute(&teacher, &b, 40, 1.0, &device);
        let top = TeacherTargets::compute(&teacher, &b, 5, 1.0, &device);
        assert_eq!(top.indices.len(), 10 * 5);
        for p in 0..10 {
            let mut row: Vec<(f32, u32)> = (0..40)
                .map(|j| (full.logprobs[p * 40 + j], full.indices[p * 40 + j]))
                .collect();
            row.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let want: Vec<u32> = row[..5].iter().map(|r| r.1).collect();
            assert_eq!(top.indices[p * 5..p * 5 + 5], want[..]);
        }
        // The loss of the whole batch is the sum of its row parts'.
        let cfg = DistillConfig {
            top_k: 5,
            ..DistillConfig::default()
        };
        let whole = value(distill_loss(&student, &b, &b, 0, &top, &cfg, &device));
        let parts = b.split_rows(2);
        let split: f64 = parts
            .iter()
            .zip([0, 1])
            .map(|(p, first)| value(distill_loss(&student, p, &b, first, &top, &cfg, &device)))
            .sum();
        assert!(
            (whole - split).abs() < 1e-4 * whole.abs(),
            "{whole} vs {split}"
        );
        // Top-k renormalised is not the full KL, but close to it for large k.
        let at_full = value(distill_loss(&student, &b, &b, 0, &full, &cfg, &device));
        assert!((whole - at_full).abs() > 1e-6);
    }

    #[test]
    fn cached_and_online_teachers_give_the_same_loss_and_gradients() {
        let device = Default::default();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.bin");
        let teacher = config(32).init::<Inner>(2, &device);
        let student = config(16).init::<Train>(1, &device);
        let cfg = DistillConfig {
            top_k: 8,
            temperature: 2.0,
            ..DistillConfig::default()
        };
        let batches = [batch(), {
            let mut b = batch();
            b.inputs.reverse();
            b
        }];
        let key = CacheKey {
            teacher_manifest_sha256: "t".into(),
            batches_sha256: "b".into(),
            tokenizer_sha256: "tok".into(),
            top_k: 8,
            temperature: 2.0,
            entries: 2,
        };
        TeacherCache::write(&path, &key, |emit| {
            for b in &batches {
                emit(b, &TeacherTargets::compute(&teacher, b, 8, 2.0, &device))?;
            }
            Ok(())
        })
        .unwrap();
        let mut cached = Distiller::<Train> {
            cfg: cfg.clone(),
            source: Source::Cached(TeacherCache::open(&path, &key, 40).unwrap()),
        };
        let mut online = Distiller::<Train>::online(teacher, &cfg);
        for b in batches.iter().rev() {
            assert_eq!(
                cached.targets(b, &device).unwrap(),
                online.targets(b, &device).unwrap()
            );
            let (a, ga) = cached.loss_grads(&student, b, 2, 10.0, &device);
            let (o, go) = online.loss_grads(&student, b, 1, 10.0, &device);
            assert!((a - o).abs() < 1e-4 * o.abs(), "{a} vs {o}");
            let grad = |g: &GradientsParams| -> Vec<f32> {
                let w = &student.model.embed_tokens.weight;
                g.get::<Inner, 2>(w.id)
                    .unwrap()
                    .into_data()
                    .convert::<f32>()
                    .into_vec()
                    .unwrap()
            };
            let (ga, go) = (grad(&ga), grad(&go));
            let diff = ga
                .iter()
                .zip(&go)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "gradients differ by {diff}");
            assert!(
                go.iter().any(|g| g.abs() > 1e-7),
                "the gradient must not vanish"
            );
        }
        // A batch the cache was not built for is refused, not guessed.
        let mut other = batch();
        other.inputs[3] = 9;
        assert!(cached.targets(&other, &device).is_err());
    }

    #[test]
    fn stale_and_tampered_caches_are_refused() {
        let device = Default::default();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.bin");
        let teacher = config(16).init::<Inner>(2, &device);
        let key = CacheKey {
            teacher_manifest_sha256: "t".into(),
            batches_sha256: "b".into(),
            tokenizer_sha256: "tok".into(),
            top_k: 4,
            temperature: 1.0,
            entries: 1,
        };
        let b = batch();
        TeacherCache::write(&path, &key, |emit| {
            emit(&b, &TeacherTargets::compute(&teacher, &b, 4, 1.0, &device))
        })
        .unwrap();
        assert!(TeacherCache::open(&path, &key, 40).is_ok());
        let stale = CacheKey {
            teacher_manifest_sha256: "another".into(),
            ..key.clone()
        };
        let err = TeacherCache::open(&path, &stale, 40)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("stale teacher cache: teacher_manifest_sha256"),
            "{err}"
        );
        let hotter = CacheKey {
            temperature: 2.0,
            ..key.clone()
        };
        let err = TeacherCache::open(&path, &hotter, 40)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("temperature"), "{err}");
        // Flip one log-prob's low byte: the checksum catches it.
        let mut bytes = fs::read(&path).unwrap();
        bytes[8 + 36 + 10 * 4 * 4 + 1] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let err = TeacherCache::open(&path, &key, 40)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("corrupt"), "{err}");
        fs::write(&path, b"{\"not\": \"a cache\"}").unwrap();
        let err = TeacherCache::open(&path, &key, 40)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not a teacher cache"), "{err}");
        // A failed write leaves no file and no temporary behind.
        let fresh = dir.path().join("fresh.bin");
        let failed = TeacherCache::write(&fresh, &key, |_| bail!("teacher crashed"));
        assert!(failed.is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
