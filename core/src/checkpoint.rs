//! The checkpoint contract: the only thing that passes between stages.
//!
//! ```text
//! <run>/<stage>/
//!   manifest.json      written LAST; its presence means complete
//!   config.json        HF LlamaConfig-compatible model config
//!   model.safetensors  weights, HF names
//!   tokenizer.json
//!   run.toml           fully resolved config this stage ran with
//!   metrics.jsonl      one JSON object per logged step / eval
//!   train_state/       optimizer moments, step — for --resume of this stage only
//! ```
//!
//! A stage works in `<stage>.partial/` and renames it into place once the
//! manifest (written last, after every other file is synced) is there, so a
//! crash never leaves a directory the next stage accepts. This module is the
//! only code that reads or writes weights on disk.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::WeightsError;
use crate::files::{self, FileError, Mode, OutputDir, OutputKind};
use crate::model::{Growth, GrowthRecord, GrowthSpec, Llama, ModelConfig, transpose};
use crate::optim::AdamW;

/// Version 2 added `self_sha256` (the manifest's hash of itself); version 1
/// manifests are still read.
pub const FORMAT_VERSION: u32 = 2;
/// The manifest key holding the sha256 of the manifest's own bytes, taken with
/// this key's value set to 64 zeros.
pub const SELF_HASH_KEY: &str = "self_sha256";
const ZEROS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
pub const MANIFEST: &str = files::MANIFEST;
pub const MODEL_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const CONFIG_FILE: &str = "config.json";
pub const TRAIN_STATE_DIR: &str = "train_state";
/// In a checkpoint `baton grow` wrote: what grew ([`GrowthRecord`]).
pub const GROW_FILE: &str = "grow.json";

/// A checkpoint kind: the name its writer records as the manifest's `stage`,
/// and the kinds it accepts as a parent. Core keeps no list of kinds: each
/// stage crate (or tool that writes checkpoints) declares its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageKind {
    pub name: &'static str,
    /// Parent kinds this one trains from (empty: it takes no parent).
    pub accepts: &'static [&'static str],
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatTemplate {
    pub name: String,
    pub version: u32,
}

/// One parent in a checkpoint's lineage: what it was to this checkpoint
/// (`role`: "parent", later e.g. "teacher" or "model"), its kind, where it
/// was, and its manifest's hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParentRef {
    pub role: String,
    pub stage: String,
    pub path: String,
    pub manifest_sha256: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataRef {
    pub source: String,
    pub sha256: String,
    pub bytes: u64,
    pub tokens: u64,
}

/// `manifest.json`: what a checkpoint is, where it came from, and the hash of
/// every file it holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// The kind name of the stage or tool that wrote it (its `StageKind`).
    pub stage: String,
    pub baton_version: String,
    pub created_at: String,
    pub model: ModelConfig,
    pub tokenizer_sha256: String,
    pub chat_template: Option<ChatTemplate>,
    /// The lineage: one parent for a stage, several for a merge or a teacher.
    /// (Format-1 manifests hold one `parent` or `null`; they read as a list.)
    pub parents: Vec<ParentRef>,
    pub data: Vec<DataRef>,
    pub train: serde_json::Value,
    pub step: u64,
    pub tokens_seen: u64,
    pub metrics: BTreeMap<String, f64>,
    pub files: BTreeMap<String, String>,
    /// The tensors this stage trained, when it froze the others
    /// (`train.freeze`/`train.train_only`); absent when all trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained: Option<Vec<String>>,
    /// Set when the checkpoint holds a LoRA adapter (PEFT's files) instead
    /// of `model.safetensors`: the base it applies to and its shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterRef>,
}

impl Manifest {
    /// The manifest of a checkpoint a tool writes without training (a
    /// merge, a growth): `model`, and `from`'s tokenizer, chat format and
    /// training settings (what children inherit), with `parents` as its
    /// lineage; no data, step 0, no metrics.
    pub fn tool(
        stage: &str,
        model: ModelConfig,
        from: &Checkpoint,
        parents: Vec<ParentRef>,
    ) -> Self {
        Self {
            created_at: crate::now_rfc3339(),
            tokenizer_sha256: from.manifest.tokenizer_sha256.clone(),
            chat_template: from.manifest.chat_template.clone(),
            parents,
            ..Self::bare(stage, model, from.manifest.train.clone())
        }
    }

    /// A manifest of `stage`, `model` and `train` with nothing else yet.
    fn bare(stage: &str, model: ModelConfig, train: serde_json::Value) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            stage: stage.to_string(),
            baton_version: crate::VERSION.to_string(),
            created_at: String::new(),
            model,
            tokenizer_sha256: String::new(),
            chat_template: None,
            parents: Vec::new(),
            data: Vec::new(),
            train,
            step: 0,
            tokens_seen: 0,
            metrics: BTreeMap::new(),
            files: BTreeMap::new(),
            trained: None,
            adapter: None,
        }
    }
}

/// The base checkpoint of an adapter (by absolute path and manifest hash)
/// and the adapter's rank, alpha and targets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterRef {
    pub base: ParentRef,
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    #[serde(default)]
    pub dropout: f64,
    /// Base tensors trained beside the adapter (`train.train_only`), stored
    /// in the adapter file under their PEFT names (`modules_to_save`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules_to_save: Vec<String>,
}

impl AdapterRef {
    /// This adapter as a run that trained `trained` leaves it: the base
    /// tensors among them join `modules_to_save`.
    pub fn saving(mut self, trained: Option<&[String]>) -> Self {
        for name in trained.unwrap_or_default() {
            if !crate::lora::is_adapter_param(name) && !self.modules_to_save.contains(name) {
                self.modules_to_save.push(name.clone());
            }
        }
        self.modules_to_save.sort();
        self
    }

    pub fn spec(&self) -> crate::lora::AdapterSpec {
        crate::lora::AdapterSpec {
            rank: self.rank,
            alpha: self.alpha,
            targets: self.targets.clone(),
            dropout: self.dropout,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: no checkpoint here (directory does not exist)")]
    NotFound { path: PathBuf },
    #[error("{path}: incomplete checkpoint (no manifest.json; was the stage interrupted?)")]
    Incomplete { path: PathBuf },
    #[error("{path}: unreadable manifest: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    #[error("{path}: format_version {found}, this Baton reads 1 to {expected}")]
    FormatVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("{path}: is a {found} checkpoint, expected {expected}")]
    WrongStage {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{path}: file {file} listed in the manifest is missing")]
    MissingFile { path: PathBuf, file: String },
    #[error("{path}: {file} does not match its sha256 in the manifest (corrupt or modified)")]
    HashMismatch { path: PathBuf, file: String },
    #[error("{path}: tokenizer.json hash differs from the manifest's tokenizer_sha256")]
    TokenizerHash { path: PathBuf },
    #[error("{path}: tokenizer has {tokenizer} entries but the model's vocab_size is {model}")]
    VocabMismatch {
        path: PathBuf,
        tokenizer: usize,
        model: usize,
    },
    #[error("{path}: bad weights: {reason}")]
    Weights { path: PathBuf, reason: String },
    #[error("{path}: holds a LoRA adapter whose base {base} {reason}")]
    AdapterBase {
        path: PathBuf,
        base: String,
        reason: String,
    },
    #[error("{path}: train_state does not fit this run: {reason}")]
    TrainState { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error(transparent)]
    File(#[from] FileError),
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

pub fn sha256_bytes(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

pub fn sha256_file(path: &Path) -> Result<String, CheckpointError> {
    let mut file = fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| io_err(path, e))?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// Writes `bytes` to `path` through a temporary file beside it (a dot-name
/// no user file shares) and a rename, synced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let tmp = crate::files::tmp_path(path);
    let mut file = fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    file.write_all(bytes).map_err(|e| io_err(&tmp, e))?;
    file.sync_all().map_err(|e| io_err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

use crate::files::sync_dir;

pub use crate::files::partial_dir;

pub fn is_complete(dir: &Path) -> bool {
    dir.join(MANIFEST).is_file()
}

// ---------------------------------------------------------------- weights

/// Linear weights are `[in, out]` in memory and `[out, in]` (HF) on disk.
fn is_linear(name: &str) -> bool {
    name.ends_with("_proj.weight")
        || name == "lm_head.weight"
        || name.ends_with(".block_sparse_moe.gate.weight")
        || (name.contains(".block_sparse_moe.experts.")
            && [".w1.weight", ".w2.weight", ".w3.weight"]
                .iter()
                .any(|w| name.ends_with(w)))
}

/// Visits float parameters with their dotted module path.
struct NamedParams<F> {
    path: Vec<String>,
    visit: F,
}

impl<B: Backend, F: FnMut(String, TensorData)> ModuleVisitor<B> for NamedParams<F> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        (self.visit)(self.path.join("."), param.val().into_data());
    }
}

/// The float parameters of `module` as `(name, data)`, in visiting order,
/// converted to their on-disk (HF) layout.
pub fn named_tensors<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, TensorData)> {
    let mut out = Vec::new();
    let mut visitor = NamedParams {
        path: Vec::new(),
        visit: |name: String, data: TensorData| out.push((name, data)),
    };
    module.visit(&mut visitor);
    out.into_iter()
        .map(|(name, data)| {
            // Checkpoints and exports are f32 whatever the training dtype.
            let data = data.convert::<f32>();
            let data = if is_linear(&name) {
                transpose(&data)
            } else {
                data
            };
            (name, data)
        })
        .collect()
}

/// How an imported checkpoint's data entry names its source.
pub const HF_IMPORT: &str = "hf import";
/// See [`HF_IMPORT`].
pub const GGUF_IMPORT: &str = "gguf import";

/// Whether a checkpoint was written by `import hf` or `import gguf`.
pub fn is_imported(manifest: &Manifest) -> bool {
    manifest
        .data
        .iter()
        .any(|d| d.source.starts_with(HF_IMPORT) || d.source.starts_with(GGUF_IMPORT))
}

/// How weights are stored in a safetensors file Baton writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    /// bfloat16, rounded to nearest even.
    Bf16,
}

impl std::str::FromStr for WeightDtype {
    type Err = crate::error::InvalidSetting;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" | "float32" => Ok(WeightDtype::F32),
            "bf16" | "bfloat16" => Ok(WeightDtype::Bf16),
            other => Err(format!("unknown dtype \"{other}\" (f32 or bf16)").into()),
        }
    }
}

/// The one safetensors writer: named f32 tensors stored as `dtype`, with
/// `{"format": "pt"}` metadata (what transformers expects). The bytes depend
/// only on the tensors, not on the order they come in.
pub fn safetensors_bytes<'a>(
    tensors: impl IntoIterator<Item = (&'a String, &'a TensorData)>,
    dtype: WeightDtype,
) -> Result<Vec<u8>, WeightsError> {
    let encoded: Vec<(&String, &TensorData, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, data)| {
            let bytes = match dtype {
                WeightDtype::F32 => Vec::new(),
                WeightDtype::Bf16 => data
                    .iter::<f32>()
                    .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
                    .collect(),
            };
            (name, data, bytes)
        })
        .collect();
    let st_dtype = match dtype {
        WeightDtype::F32 => Dtype::F32,
        WeightDtype::Bf16 => Dtype::BF16,
    };
    let views: Vec<(String, TensorView<'_>)> = encoded
        .iter()
        .map(|(name, data, bf16)| {
            let bytes = match dtype {
                WeightDtype::F32 => data.as_bytes(),
                WeightDtype::Bf16 => bf16.as_slice(),
            };
            TensorView::new(st_dtype, data.shape.to_vec(), bytes)
                .map(|v| (name.to_string(), v))
                .map_err(|e| WeightsError(format!("{name}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata)).map_err(|e| WeightsError(e.to_string()))
}

/// Reads every tensor of a safetensors file as f32 (f32, bf16 and f16 accepted).
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, TensorData>, CheckpointError> {
    let bytes = files::read_bounded(path, "safetensors", files::cap::WEIGHTS)?;
    parse_safetensors(&bytes).map_err(|e| CheckpointError::Weights {
        path: path.to_path_buf(),
        reason: e.0,
    })
}

/// Parses safetensors bytes into f32 tensors (f32, bf16 and f16 accepted).
pub fn parse_safetensors(bytes: &[u8]) -> Result<HashMap<String, TensorData>, WeightsError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let Some(values) = floats_of(view.dtype(), raw) else {
            return Err(format!("{name}: unsupported dtype {:?}", view.dtype()).into());
        };
        let elements = view
            .shape()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d));
        if elements != Some(values.len()) {
            return Err(format!(
                "{name}: shape {:?} does not match its {} values",
                view.shape(),
                values.len()
            )
            .into());
        }
        out.insert(name, TensorData::new(values, view.shape().to_vec()));
    }
    Ok(out)
}

/// Raw little-endian float bytes of `dtype` as f32 values.
fn floats_of(dtype: Dtype, raw: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => raw
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => raw
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// Where one tensor of a [`TensorFile`] is: its dtype, shape and byte range.
struct TensorAt {
    dtype: Dtype,
    shape: Vec<usize>,
    from: u64,
    to: u64,
}

/// A safetensors file read one tensor at a time: the header is parsed on
/// opening, each tensor's bytes are read when asked for, so a tool that
/// combines several models (a merge) holds one tensor of each, not n models.
pub struct TensorFile {
    path: PathBuf,
    file: fs::File,
    tensors: BTreeMap<String, TensorAt>,
}

impl TensorFile {
    /// Opens `path` and checks its header: every tensor a float type, its
    /// byte range inside the file and of the size its shape says.
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        use std::io::Read;
        let bad = |reason: String| CheckpointError::Weights {
            path: path.to_path_buf(),
            reason,
        };
        let len = files::regular_file(path, "safetensors")?;
        let mut file = fs::File::open(path).map_err(|e| io_err(path, e))?;
        let mut n = [0u8; 8];
        file.read_exact(&mut n)
            .map_err(|_| bad("shorter than a safetensors header".into()))?;
        let header_len = u64::from_le_bytes(n);
        if header_len > (100 << 20) || 8 + header_len > len {
            return Err(bad(format!(
                "header length {header_len} does not fit the file"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(|e| io_err(path, e))?;
        let entries: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("unreadable safetensors header: {e}")))?;
        let data_start = 8 + header_len;
        let mut tensors = BTreeMap::new();
        for (name, entry) in entries {
            if name == "__metadata__" {
                continue;
            }
            let dtype: Dtype = serde_json::from_value(entry["dtype"].clone())
                .map_err(|_| bad(format!("{name}: unknown dtype {}", entry["dtype"])))?;
            if floats_of(dtype, &[]).is_none() {
                return Err(bad(format!("{name}: unsupported dtype {dtype:?}")));
            }
            let shape: Vec<usize> = serde_json::from_value(entry["shape"].clone())
                .map_err(|_| bad(format!("{name}: unreadable shape")))?;
            let (from, to): (u64, u64) = serde_json::from_value(entry["data_offsets"].clone())
                .map_err(|_| bad(format!("{name}: unreadable data_offsets")))?;
            let elements = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
            let size = elements.and_then(|e| e.checked_mul((dtype.bitsize() / 8) as u64));
            if from > to || data_start + to > len || size != Some(to - from) {
                return Err(bad(format!(
                    "{name}: byte range {from}..{to} does not hold shape {shape:?} of {dtype:?} inside the file"
                )));
            }
            let (from, to) = (data_start + from, data_start + to);
            tensors.insert(
                name,
                TensorAt {
                    dtype,
                    shape,
                    from,
                    to,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            tensors,
        })
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// The tensor `name` as f32 values (f32, bf16 and f16 stored).
    pub fn read(&mut self, name: &str) -> Result<Vec<f32>, CheckpointError> {
        use std::io::{Read, Seek, SeekFrom};
        let Some(&TensorAt {
            dtype, from, to, ..
        }) = self.tensors.get(name)
        else {
            return Err(CheckpointError::Weights {
                path: self.path.clone(),
                reason: format!("tensor {name} is missing"),
            });
        };
        let mut raw = vec![0u8; (to - from) as usize];
        self.file
            .seek(SeekFrom::Start(from))
            .and_then(|_| self.file.read_exact(&mut raw))
            .map_err(|e| io_err(&self.path, e))?;
        Ok(floats_of(dtype, &raw).expect("dtype checked on opening"))
    }
}

/// Replaces every float parameter with the tensor of the same name.
struct LoadNamed<'a, B: Backend> {
    path: Vec<String>,
    tensors: &'a mut HashMap<String, TensorData>,
    device: B::Device,
    errors: Vec<String>,
}

impl<B: Backend> ModuleMapper<B> for LoadNamed<'_, B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let name = self.path.join(".");
        let (id, tensor, mapper) = param.consume();
        let expected = tensor.dims();
        let Some(data) = self.tensors.remove(&name) else {
            self.errors.push(format!("tensor {name} is missing"));
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let data = if is_linear(&name) && data.shape.len() == 2 {
            transpose(&data)
        } else {
            data
        };
        if data.shape.as_slice() != expected.as_slice() {
            self.errors.push(format!(
                "tensor {name} has shape {:?}, expected {:?}",
                data.shape.as_slice(),
                expected
            ));
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let require_grad = tensor.is_require_grad();
        let loaded = Tensor::<B, D>::from_data(data, &self.device).set_require_grad(require_grad);
        Param::from_mapped_value(id, loaded, mapper)
    }
}

/// Loads named tensors into `module`; every tensor must be present with the
/// right shape and no tensor may be left over.
pub fn load_named<B: Backend, M: Module<B>>(
    module: M,
    mut tensors: HashMap<String, TensorData>,
    device: &B::Device,
) -> Result<M, WeightsError> {
    let mut loader = LoadNamed::<B> {
        path: Vec::new(),
        tensors: &mut tensors,
        device: device.clone(),
        errors: Vec::new(),
    };
    let module = module.map(&mut loader);
    let mut errors = loader.errors;
    let mut extra: Vec<&String> = tensors.keys().collect();
    extra.sort();
    errors.extend(extra.into_iter().map(|n| format!("unexpected tensor {n}")));
    if errors.is_empty() {
        Ok(module)
    } else {
        Err(errors.join("; ").into())
    }
}

/// Safetensors bytes of a model's weights under HF names.
pub fn model_bytes<B: Backend>(model: &Llama<B>) -> Result<Vec<u8>, WeightsError> {
    safetensors_bytes(
        named_tensors(model).iter().map(|(n, d)| (n, d)),
        WeightDtype::F32,
    )
}

/// Builds a model of `config` with the weights in `path`.
pub fn load_model<B: Backend>(
    config: &ModelConfig,
    path: &Path,
    device: &B::Device,
) -> Result<Llama<B>, CheckpointError> {
    let tensors = read_safetensors(path)?;
    model_from_tensors(config, tensors, device).map_err(|e| CheckpointError::Weights {
        path: path.to_path_buf(),
        reason: e.0,
    })
}

/// Builds a model of `config` from named tensors (HF names and layout). The
/// config's limits and every tensor's shape are checked before the model is
/// allocated, so a config claiming huge dimensions fails at once.
pub fn model_from_tensors<B: Backend>(
    config: &ModelConfig,
    tensors: HashMap<String, TensorData>,
    device: &B::Device,
) -> Result<Llama<B>, WeightsError> {
    config.validate().map_err(|e| WeightsError(e.0))?;
    let expected = config.hf_shapes();
    let mut errors = Vec::new();
    for (name, shape) in &expected {
        match tensors.get(name) {
            None => errors.push(format!("tensor {name} is missing")),
            Some(t) if t.shape.as_slice() != shape.as_slice() => errors.push(format!(
                "tensor {name} has shape {:?}, the config needs {shape:?}",
                t.shape.as_slice()
            )),
            Some(_) => {}
        }
    }
    let mut extra: Vec<&String> = tensors
        .keys()
        .filter(|n| !expected.iter().any(|(e, _)| e == *n))
        .collect();
    extra.sort();
    errors.extend(extra.into_iter().map(|n| format!("unexpected tensor {n}")));
    if !errors.is_empty() {
        errors.truncate(3);
        return Err(errors.join("; ").into());
    }
    load_named(config.init::<B>(0, device), tensors, device)
}

/// HF `LlamaConfig`-compatible `config.json` for a model config.
pub fn hf_config(
    config: &ModelConfig,
    special: &crate::tokenizer::SpecialIds,
) -> serde_json::Value {
    let mut out = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "intermediate_size": config.d_ff,
        "max_position_embeddings": config.max_seq_len,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "pad_token_id": special.pad,
        "torch_dtype": "float32",
    });
    if let Some(moe) = &config.moe {
        // HF `MixtralConfig`: every layer sparse, renormalised top-k gates.
        // A model with dense layers between the sparse ones (`every` > 1) is
        // described the same way with Qwen2-MoE's `decoder_sparse_step`;
        // transformers has no class for it, and export refuses it.
        out["architectures"] = serde_json::json!(["MixtralForCausalLM"]);
        out["model_type"] = "mixtral".into();
        out["num_local_experts"] = moe.experts.into();
        out["num_experts_per_tok"] = moe.top_k.into();
        out["sliding_window"] = serde_json::Value::Null;
        out["router_jitter_noise"] = 0.0.into();
        out["output_router_logits"] = false.into();
        if moe.every > 1 {
            out["decoder_sparse_step"] = moe.every.into();
        }
        if let Some(map) = out.as_object_mut() {
            map.remove("attention_bias");
            map.remove("mlp_bias");
        }
    }
    out
}

// ---------------------------------------------------------------- writing

/// What a checkpoint output may replace (with `--force`): a complete checkpoint.
pub const CHECKPOINT_OUTPUT: OutputKind = OutputKind {
    noun: "checkpoint",
    is_ours: is_complete,
    resumable: true,
};

/// A stage's working directory, `<dir>.partial/` (locked while the stage
/// runs), committed into `<dir>` by [`StageDir::commit`].
#[derive(Debug)]
pub struct StageDir {
    pub final_dir: PathBuf,
    pub work: PathBuf,
    out: OutputDir,
    /// The output the user named (a data-parallel rank other than 0 writes
    /// elsewhere, see [`crate::dist::scratch_out`]), for messages.
    named: PathBuf,
}

impl StageDir {
    /// Prepares `<dir>.partial/` for a fresh run or a resume, under its lock.
    ///
    /// Fresh: refuses a complete checkpoint at `<dir>` or an interrupted run in
    /// `<dir>.partial` unless `force`, and anything at either path that Baton
    /// did not write even then. Resume: requires `<dir>.partial/train_state`.
    /// `inputs` (parent checkpoint, sources) may be neither `<dir>` nor in it.
    pub fn open(
        dir: &Path,
        resume: bool,
        force: bool,
        inputs: &[&Path],
    ) -> Result<Self, CheckpointError> {
        if let Some(scratch) = crate::dist::scratch_out(dir) {
            return Self::open_scratch(dir, &scratch, resume);
        }
        Self::check(dir, resume, force, inputs)?;
        let mode = if resume {
            Mode::Resume
        } else {
            Mode::Fresh { force }
        };
        let out = OutputDir::open(dir, CHECKPOINT_OUTPUT, mode, inputs)?;
        if resume {
            recover_train_state(&out.work);
        }
        Ok(Self {
            final_dir: out.final_dir.clone(),
            work: out.work.clone(),
            out,
            named: dir.to_path_buf(),
        })
    }

    /// A data-parallel rank other than 0 runs the stage in `scratch` (rank 0
    /// alone writes `dir`); resuming, it starts from copies of rank 0's files
    /// (tokenizer, pairs, caches) and reads rank 0's `train_state`.
    fn open_scratch(dir: &Path, scratch: &Path, resume: bool) -> Result<Self, CheckpointError> {
        let out = OutputDir::open(scratch, CHECKPOINT_OUTPUT, Mode::Fresh { force: true }, &[])?;
        if resume {
            let leader = files::partial_dir(dir);
            crate::dist::set_state_dir(leader.clone());
            let entries = fs::read_dir(&leader).map_err(|e| {
                io_err(
                    &leader,
                    format!(
                        "a resumed rank reads rank 0's working directory, which it cannot: {e}"
                    ),
                )
            })?;
            for entry in entries.flatten() {
                let name = entry.file_name();
                if entry.path().is_file() && !name.to_string_lossy().starts_with('.') {
                    fs::copy(entry.path(), out.work.join(&name))
                        .map_err(|e| io_err(&entry.path(), e))?;
                }
            }
        }
        Ok(Self {
            final_dir: out.final_dir.clone(),
            work: out.work.clone(),
            out,
            named: dir.to_path_buf(),
        })
    }

    /// What [`StageDir::open`] would refuse, checked without touching anything
    /// (so a stage can fail before its slow preparations). Rank 0 checks for
    /// a data-parallel run.
    pub fn check(
        dir: &Path,
        resume: bool,
        force: bool,
        inputs: &[&Path],
    ) -> Result<(), CheckpointError> {
        if crate::dist::scratch_out(dir).is_some() {
            return Ok(());
        }
        let mode = if resume {
            Mode::Resume
        } else {
            Mode::Fresh { force }
        };
        let (_, work) = files::check_output_dir(dir, &CHECKPOINT_OUTPUT, mode, inputs)?;
        if resume && !resumable(&work) {
            return Err(io_err(
                dir,
                "nothing to resume: no complete train_state (in .partial) from an interrupted run",
            ));
        }
        Ok(())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    /// Copies the file `name` of `parent` (e.g. its tokenizer) into this
    /// checkpoint under the same name.
    pub fn copy_from(&self, parent: &Checkpoint, name: &str) -> Result<(), CheckpointError> {
        fs::copy(parent.dir.join(name), self.path(name))
            .map(drop)
            .map_err(|e| io_err(&self.path(name), e))
    }

    /// Writes a trained adapter as PEFT does (`adapter_model.safetensors`,
    /// `adapter_config.json`) and the HF `config.json` of its base, instead
    /// of the full weights.
    pub fn write_adapter<B: Backend>(
        &self,
        model: &Llama<B>,
        adapter: &AdapterRef,
        special: &crate::tokenizer::SpecialIds,
        config: &ModelConfig,
    ) -> Result<(), CheckpointError> {
        let mut tensors = crate::lora::adapter_tensors(model);
        tensors.extend(
            named_tensors(model)
                .into_iter()
                .filter(|(name, _)| adapter.modules_to_save.contains(name))
                .map(|(name, data)| (format!("{}{name}", crate::lora::PEFT_PREFIX), data)),
        );
        let bytes = safetensors_bytes(tensors.iter().map(|(n, d)| (n, d)), WeightDtype::F32)
            .map_err(|e| CheckpointError::Weights {
                path: self.work.clone(),
                reason: e.0,
            })?;
        write_atomic(&self.path(crate::lora::ADAPTER_FILE), &bytes)?;
        let mut peft = crate::lora::peft_config(&adapter.spec(), &adapter.base.path);
        if !adapter.modules_to_save.is_empty() {
            let modules: Vec<&str> = adapter
                .modules_to_save
                .iter()
                .map(|n| n.strip_suffix(".weight").unwrap_or(n))
                .collect();
            peft["modules_to_save"] = serde_json::json!(modules);
        }
        let json = serde_json::to_string_pretty(&peft).map_err(|e| io_err(&self.work, e))?;
        write_atomic(
            &self.path(crate::lora::ADAPTER_CONFIG_FILE),
            json.as_bytes(),
        )?;
        let json = serde_json::to_string_pretty(&hf_config(config, special))
            .map_err(|e| io_err(&self.work, e))?;
        write_atomic(&self.path(CONFIG_FILE), json.as_bytes())
    }

    /// Writes what a stage trained: its adapter when it trained one
    /// ([`StageDir::write_adapter`], with the base tensors among `trained`
    /// saved beside it), else the full weights. Returns the adapter as the
    /// manifest records it.
    pub fn write_trained<B: Backend>(
        &self,
        model: &Llama<B>,
        adapter: Option<AdapterRef>,
        trained: Option<&[String]>,
        config: &ModelConfig,
        special: &crate::tokenizer::SpecialIds,
    ) -> Result<Option<AdapterRef>, CheckpointError> {
        match adapter {
            Some(a) => {
                let a = a.saving(trained);
                self.write_adapter(model, &a, special, config)?;
                Ok(Some(a))
            }
            None => self.write_model(model, config, special).map(|()| None),
        }
    }

    /// Writes `model.safetensors` and the HF `config.json` of a finished model.
    pub fn write_model<B: Backend>(
        &self,
        model: &Llama<B>,
        config: &ModelConfig,
        special: &crate::tokenizer::SpecialIds,
    ) -> Result<(), CheckpointError> {
        let bytes = model_bytes(model).map_err(|e| CheckpointError::Weights {
            path: self.work.clone(),
            reason: e.0,
        })?;
        write_atomic(&self.path(MODEL_FILE), &bytes)?;
        let json = serde_json::to_string_pretty(&hf_config(config, special))
            .map_err(|e| io_err(&self.work, e))?;
        write_atomic(&self.path(CONFIG_FILE), json.as_bytes())
    }

    /// Records what this run was started with (`run.toml`, and the hashes of
    /// its inputs in `inputs.json`). On a resume, refuses settings or inputs
    /// that differ from the interrupted run's, naming the first difference,
    /// unless `allow_changes`.
    pub fn record_run(
        &self,
        run_toml: &str,
        inputs: &[(String, String)],
        resume: bool,
        allow_changes: bool,
    ) -> Result<(), CheckpointError> {
        let toml_path = self.path("run.toml");
        let inputs_path = self.path("inputs.json");
        let inputs_json: BTreeMap<&str, &str> = inputs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if resume && !allow_changes {
            if let Ok(before) = fs::read_to_string(&toml_path)
                && let Some(key) = first_toml_difference(&before, run_toml)
            {
                return Err(io_err(
                    &self.final_dir,
                    format!(
                        "--resume with a changed setting `{key}` (the interrupted run used other settings; pass --allow-changes to resume anyway, or --force to start over)"
                    ),
                ));
            }
            if let Ok(before) = fs::read_to_string(&inputs_path)
                && let Ok(before) = serde_json::from_str::<BTreeMap<String, String>>(&before)
            {
                // Compared by content: the same file under another spelling
                // of its path is no change.
                let old: Vec<&String> = before.values().collect();
                let new: Vec<&str> = inputs_json.values().copied().collect();
                let changed = inputs_json
                    .iter()
                    .find(|(_, v)| !old.iter().any(|o| o.as_str() == **v))
                    .map(|(k, _)| k.to_string())
                    .or_else(|| {
                        before
                            .iter()
                            .find(|(_, v)| !new.contains(&v.as_str()))
                            .map(|(k, _)| format!("{k} (no longer given)"))
                    });
                if let Some(input) = changed {
                    return Err(io_err(
                        &self.final_dir,
                        format!(
                            "--resume with a changed input {input} (its content differs from the interrupted run's; pass --allow-changes to resume anyway, or --force to start over)"
                        ),
                    ));
                }
            }
        }
        write_atomic(&toml_path, run_toml.as_bytes())?;
        let json = serde_json::to_vec_pretty(&inputs_json).map_err(|e| io_err(&self.work, e))?;
        write_atomic(&inputs_path, &json)?;
        // A data-parallel run starts here: every rank must have the same
        // settings, inputs and tokenizer as rank 0.
        let mut run = format!("{run_toml}\n");
        let mut hashes: Vec<&str> = inputs_json.values().copied().collect();
        hashes.sort_unstable();
        run.push_str(&hashes.join("\n"));
        if let Ok(tokenizer) = sha256_file(&self.path(TOKENIZER_FILE)) {
            run.push_str(&format!("\ntokenizer {tokenizer}"));
        }
        crate::dist::join(&sha256_bytes(run.as_bytes())).map_err(|e| io_err(&self.named, e))
    }

    /// Writes the manifest (last, after hashing every file) and puts the
    /// working directory in place (an atomic exchange when replacing a
    /// checkpoint). Returns the final directory.
    pub fn commit(self, mut manifest: Manifest) -> Result<PathBuf, CheckpointError> {
        let mut files = BTreeMap::new();
        for entry in fs::read_dir(&self.work).map_err(|e| io_err(&self.work, e))? {
            let entry = entry.map_err(|e| io_err(&self.work, e))?;
            let name = entry.file_name().to_string_lossy().to_string();
            // Dot files are Baton's own bookkeeping (the lock, temporaries).
            if entry.path().is_file() && name != MANIFEST && !name.starts_with('.') {
                files.insert(name, sha256_file(&entry.path())?);
            }
        }
        manifest.files = files;
        write_atomic(&self.work.join(MANIFEST), &manifest_bytes(&manifest)?)?;
        Ok(self.out.commit()?)
    }
}

/// `(name, sha256)` of a run's inputs for [`StageDir::record_run`]: its
/// parent checkpoint (if any) and data sources.
pub fn run_inputs(parent: Option<&Checkpoint>, data: &[DataRef]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = parent
        .map(|p| {
            (
                format!("parent checkpoint {}", p.dir.display()),
                p.manifest_sha256.clone(),
            )
        })
        .into_iter()
        .collect();
    out.extend(data.iter().map(|d| (d.source.clone(), d.sha256.clone())));
    out
}

/// The first dotted key whose value differs between two TOML documents.
pub fn first_toml_difference(a: &str, b: &str) -> Option<String> {
    fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let parse = |text: &str| {
        let mut out = BTreeMap::new();
        match text.parse::<toml::Table>() {
            Ok(t) => flatten("", &toml::Value::Table(t), &mut out),
            Err(_) => {
                out.insert("(run.toml)".to_string(), text.to_string());
            }
        }
        out
    };
    let (a, b) = (parse(a), parse(b));
    a.iter()
        .find(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .or_else(|| b.keys().find(|k| !a.contains_key(*k)).cloned())
}

/// Where a run stands between optimizer steps. Saved in `train_state/` with
/// the weights and the optimizer's moments, it is what `--resume` continues
/// from, bit-exactly.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub step: u64,
    pub tokens_seen: u64,
    pub wall_seconds: f64,
    pub skipped_steps: u64,
    /// Non-finite steps in a row (training stops at `train.max_bad_steps`).
    pub bad_in_a_row: u32,
    /// What the stage's task carries between steps (e.g. a running loss
    /// threshold), so a resumed run continues exactly.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub task: serde_json::Value,
}

impl TrainState {
    /// Saves this state, `model` and `optim` to `<work>/train_state/`,
    /// atomically (see [`save_train_state`]).
    pub fn save<B: AutodiffBackend>(
        &self,
        work: &Path,
        model: &Llama<B>,
        optim: &AdamW<B::InnerBackend>,
    ) -> Result<(), CheckpointError> {
        let bad = |e: WeightsError| CheckpointError::TrainState {
            path: work.join(TRAIN_STATE_DIR),
            reason: e.0,
        };
        let weights = model_bytes(model).map_err(bad)?;
        let moments = safetensors_bytes(
            optim.state_tensors().iter().map(|(n, d)| (n, d)),
            WeightDtype::F32,
        )
        .map_err(bad)?;
        let json = serde_json::to_value(self).map_err(|e| bad(WeightsError(e.to_string())))?;
        save_train_state(
            work,
            &json,
            &[
                ("model.safetensors", weights),
                ("optim.safetensors", moments),
            ],
        )
    }

    /// The state saved in `<dir>/train_state/` without its tensors (its step,
    /// counters), or `None` when there is none.
    pub fn peek(dir: &Path) -> Result<Option<TrainState>, CheckpointError> {
        let path = dir.join(TRAIN_STATE_DIR).join("state.json");
        if !path.is_file() {
            return Ok(None);
        }
        let bytes = fs::read(&path).map_err(|e| io_err(&path, e))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| CheckpointError::BadManifest {
                path,
                reason: e.to_string(),
            })
    }

    /// Loads `<work>/train_state/` (every file checked against its hash) into
    /// `model` and `optim`; returns the state and the model.
    pub fn load<B: AutodiffBackend>(
        work: &Path,
        model: Llama<B>,
        optim: &mut AdamW<B::InnerBackend>,
        device: &B::Device,
    ) -> Result<(TrainState, Llama<B>), CheckpointError> {
        let (json, files) = load_train_state(work)?;
        let bad = |e: WeightsError| CheckpointError::TrainState {
            path: work.join(TRAIN_STATE_DIR),
            reason: e.0,
        };
        let tensors = |name: &str| {
            let bytes = files
                .get(name)
                .ok_or_else(|| WeightsError(format!("{name} missing")))?;
            parse_safetensors(bytes).map_err(|e| WeightsError(format!("{name}: {e}")))
        };
        let state: TrainState =
            serde_json::from_value(json).map_err(|e| bad(WeightsError(e.to_string())))?;
        let model =
            load_named(model, tensors("model.safetensors").map_err(bad)?, device).map_err(bad)?;
        optim
            .load_state(
                tensors("optim.safetensors").map_err(bad)?,
                state.step - state.skipped_steps,
                device,
            )
            .map_err(bad)?;
        Ok((state, model))
    }
}

/// Saves a train-state directory atomically: written to `train_state.next/`,
/// then swapped in. A crash at any point leaves either the old or the new one
/// complete; [`recover_train_state`] finishes an interrupted swap.
fn save_train_state(
    work: &Path,
    state_json: &serde_json::Value,
    files: &[(&str, Vec<u8>)],
) -> Result<(), CheckpointError> {
    let next = work.join("train_state.next");
    let current = work.join(TRAIN_STATE_DIR);
    let old = work.join("train_state.old");
    let _ = fs::remove_dir_all(&next);
    fs::create_dir_all(&next).map_err(|e| io_err(&next, e))?;
    let mut hashes = BTreeMap::new();
    for (name, bytes) in files {
        write_atomic(&next.join(name), bytes)?;
        hashes.insert(name.to_string(), sha256_bytes(bytes));
    }
    let mut state = state_json.clone();
    state["files"] = serde_json::to_value(hashes).map_err(|e| io_err(&next, e))?;
    let json = serde_json::to_vec_pretty(&state).map_err(|e| io_err(&next, e))?;
    write_atomic(&next.join("state.json"), &json)?;
    sync_dir(&next);
    let _ = fs::remove_dir_all(&old);
    if current.exists() {
        fs::rename(&current, &old).map_err(|e| io_err(&current, e))?;
    }
    files::fault_point("train-state-swap");
    fs::rename(&next, &current).map_err(|e| io_err(&current, e))?;
    sync_dir(work);
    let _ = fs::remove_dir_all(&old);
    files::fault_point("train-state-saved");
    Ok(())
}

/// Completes a train-state swap a crash interrupted.
fn recover_train_state(work: &Path) {
    let current = work.join(TRAIN_STATE_DIR);
    let old = work.join("train_state.old");
    if !current.join("state.json").is_file() && old.join("state.json").is_file() {
        let _ = fs::remove_dir_all(&current);
        let _ = fs::rename(&old, &current);
    }
}

/// Reads `train_state/`, verifying each file against the hashes in `state.json`.
fn load_train_state(
    work: &Path,
) -> Result<(serde_json::Value, HashMap<String, Vec<u8>>), CheckpointError> {
    let dir = work.join(TRAIN_STATE_DIR);
    let state_path = dir.join("state.json");
    let bytes = fs::read(&state_path).map_err(|e| io_err(&state_path, e))?;
    let state: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| CheckpointError::BadManifest {
            path: state_path.clone(),
            reason: e.to_string(),
        })?;
    let hashes: BTreeMap<String, String> =
        serde_json::from_value(state["files"].clone()).map_err(|e| {
            CheckpointError::BadManifest {
                path: state_path.clone(),
                reason: format!("files: {e}"),
            }
        })?;
    let mut files = HashMap::new();
    for (name, hash) in hashes {
        let path = dir.join(&name);
        let bytes = fs::read(&path).map_err(|_| CheckpointError::MissingFile {
            path: dir.clone(),
            file: name.clone(),
        })?;
        if sha256_bytes(&bytes) != hash {
            return Err(CheckpointError::HashMismatch {
                path: dir,
                file: name,
            });
        }
        files.insert(name, bytes);
    }
    Ok((state, files))
}

/// A manifest's bytes as written: pretty JSON whose last key, `self_sha256`,
/// is the sha256 of these bytes with that value set to 64 zeros, so any edit
/// (stage, model, file list) is detected on reading.
pub fn manifest_bytes(manifest: &Manifest) -> Result<Vec<u8>, CheckpointError> {
    // JSON has no NaN: a metric that could not be computed is left out
    // (serde_json would write null, which no reader takes as a number).
    let mut manifest = manifest.clone();
    manifest.metrics.retain(|_, v| v.is_finite());
    let text =
        serde_json::to_string_pretty(&manifest).map_err(|e| io_err(Path::new(MANIFEST), e))?;
    let body = text
        .strip_suffix("\n}")
        .ok_or_else(|| io_err(Path::new(MANIFEST), "unexpected JSON layout"))?;
    let unsigned = format!("{body},\n  \"{SELF_HASH_KEY}\": \"{ZEROS}\"\n}}\n");
    let hash = sha256_bytes(unsigned.as_bytes());
    let at = unsigned.rfind(ZEROS).expect("placeholder just written");
    let mut signed = unsigned.into_bytes();
    signed[at..at + 64].copy_from_slice(hash.as_bytes());
    Ok(signed)
}

/// Checks a manifest's `self_sha256` against its bytes: `Ok(false)` when it
/// has none, an error when it does not match.
fn check_self_hash(bytes: &[u8]) -> Result<bool, String> {
    let key = format!("\"{SELF_HASH_KEY}\": \"");
    let Some(at) = bytes
        .windows(key.len())
        .rposition(|w| w == key.as_bytes())
        .map(|i| i + key.len())
    else {
        return Ok(false);
    };
    let Some(stored) = bytes.get(at..at + 64) else {
        return Err(format!("{SELF_HASH_KEY} is cut short"));
    };
    let mut unsigned = bytes.to_vec();
    unsigned[at..at + 64].copy_from_slice(ZEROS.as_bytes());
    if sha256_bytes(&unsigned).as_bytes() != stored {
        return Err(format!(
            "manifest.json was changed after it was written (its {SELF_HASH_KEY} does not match its content)"
        ));
    }
    Ok(true)
}

// ---------------------------------------------------------------- loading

/// A verified checkpoint: its manifest and where its files are.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub manifest_sha256: String,
}

impl Checkpoint {
    /// Opens and verifies a checkpoint: format version, stage (one of
    /// `expected`, or any stage when empty), every file's sha256, the tokenizer
    /// hash and vocabulary size.
    pub fn open(dir: &Path, expected: &[&str]) -> Result<Self, CheckpointError> {
        let path = dir.to_path_buf();
        if !dir.is_dir() {
            return Err(CheckpointError::NotFound { path });
        }
        let manifest_path = dir.join(MANIFEST);
        if !manifest_path.is_file() {
            return Err(CheckpointError::Incomplete { path });
        }
        let bytes = files::read_bounded(&manifest_path, "manifest", files::cap::JSON)?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| CheckpointError::BadManifest {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let found_version = value["format_version"].as_u64().unwrap_or(0) as u32;
        if !(1..=FORMAT_VERSION).contains(&found_version) {
            return Err(CheckpointError::FormatVersion {
                path,
                found: found_version,
                expected: FORMAT_VERSION,
            });
        }
        let signed = check_self_hash(&bytes).map_err(|reason| CheckpointError::BadManifest {
            path: path.clone(),
            reason,
        })?;
        if found_version >= 2 && !signed {
            return Err(CheckpointError::BadManifest {
                path,
                reason: format!("no {SELF_HASH_KEY} (format_version {found_version} requires it)"),
            });
        }
        let mut value = value;
        if value.get("parents").is_none()
            && let Some(object) = value.as_object_mut()
        {
            // Format 1: one `parent` (or null), without a role.
            let parents = match object.remove("parent") {
                Some(serde_json::Value::Object(mut parent)) => {
                    parent.insert("role".into(), "parent".into());
                    vec![serde_json::Value::Object(parent)]
                }
                _ => Vec::new(),
            };
            object.insert("parents".into(), parents.into());
        }
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|e| CheckpointError::BadManifest {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if !expected.is_empty() && !expected.contains(&manifest.stage.as_str()) {
            return Err(CheckpointError::WrongStage {
                path,
                found: manifest.stage,
                expected: expected.join(" or "),
            });
        }
        for (file, hash) in &manifest.files {
            let file_path = dir.join(file);
            if !file_path.is_file() {
                return Err(CheckpointError::MissingFile {
                    path,
                    file: file.clone(),
                });
            }
            if &sha256_file(&file_path)? != hash {
                return Err(CheckpointError::HashMismatch {
                    path,
                    file: file.clone(),
                });
            }
        }
        let weights = match manifest.adapter {
            None => [MODEL_FILE, MODEL_FILE],
            Some(_) => [crate::lora::ADAPTER_FILE, crate::lora::ADAPTER_CONFIG_FILE],
        };
        for required in weights.into_iter().chain([TOKENIZER_FILE, CONFIG_FILE]) {
            if !manifest.files.contains_key(required) {
                return Err(CheckpointError::MissingFile {
                    path,
                    file: required.to_string(),
                });
            }
        }
        if sha256_file(&dir.join(TOKENIZER_FILE))? != manifest.tokenizer_sha256 {
            return Err(CheckpointError::TokenizerHash { path });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            manifest_sha256: sha256_bytes(&bytes),
        })
    }

    pub fn tokenizer(&self) -> Result<crate::tokenizer::Tokenizer, CheckpointError> {
        let path = self.dir.join(TOKENIZER_FILE);
        let tokenizer =
            crate::tokenizer::Tokenizer::load(&path).map_err(|e| CheckpointError::Io {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if tokenizer.vocab_size() > self.manifest.model.vocab_size {
            return Err(CheckpointError::VocabMismatch {
                path: self.dir.clone(),
                tokenizer: tokenizer.vocab_size(),
                model: self.manifest.model.vocab_size,
            });
        }
        Ok(tokenizer)
    }

    /// The model, with an adapter (if the checkpoint holds one) merged into
    /// its base's weights: what inference, evaluation and export use.
    /// A grown model comes with its masks at 0 ([`Checkpoint::growth`]).
    pub fn model<B: Backend>(&self, device: &B::Device) -> Result<Llama<B>, CheckpointError> {
        let mut model = match self.manifest.adapter {
            None => load_model(&self.manifest.model, &self.dir.join(MODEL_FILE), device)?,
            Some(_) => crate::lora::merge(self.model_with_adapter(device)?),
        };
        model.growth = self.growth()?.map(|spec| Growth::new(spec, 0));
        Ok(model)
    }

    /// What a checkpoint `baton grow` wrote with masks added to its parent
    /// (`grow.json`); `None` for every other checkpoint.
    pub fn growth(&self) -> Result<Option<GrowthSpec>, CheckpointError> {
        let path = self.dir.join(GROW_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let bytes = files::read_bounded(&path, "grow record", files::cap::JSON)?;
        let record: GrowthRecord =
            serde_json::from_slice(&bytes).map_err(|e| CheckpointError::BadManifest {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        Ok(record.masked.then_some(record.parent))
    }

    /// Refuses a grown checkpoint whose new structure is still masked: its
    /// weights alone are not its function, so `what` (an export, a merge)
    /// cannot take them.
    pub fn require_unmasked(&self, what: &str) -> Result<(), CheckpointError> {
        match self.growth()? {
            None => Ok(()),
            Some(_) => Err(CheckpointError::Io {
                path: self.dir.clone(),
                reason: format!(
                    "a grown model whose new structure is still masked; {what} needs the weights of an ordinary model: continue pretraining from it first (pretrain --from), which ramps the masks to 1"
                ),
            }),
        }
    }

    /// The model with its adapter kept apart (base weights plus `A`, `B`),
    /// for a stage that goes on training the adapter; [`Checkpoint::model`]
    /// for a checkpoint without one.
    pub fn model_with_adapter<B: Backend>(
        &self,
        device: &B::Device,
    ) -> Result<Llama<B>, CheckpointError> {
        let (Some(adapter), Some(base)) = (&self.manifest.adapter, self.adapter_base()?) else {
            return self.model(device);
        };
        let path = self.dir.join(crate::lora::ADAPTER_FILE);
        let bad = |reason: String| CheckpointError::Weights {
            path: path.clone(),
            reason,
        };
        // Base tensors trained beside the adapter replace the base's.
        let (saved, lora_tensors) = crate::lora::split_saved(read_safetensors(&path)?);
        let mut weights = base.weights()?;
        for (name, data) in saved {
            if !adapter.modules_to_save.contains(&name) {
                return Err(bad(format!("unexpected tensor base_model.model.{name}")));
            }
            weights.insert(name, data);
        }
        let model =
            model_from_tensors(&self.manifest.model, weights, device).map_err(|e| bad(e.0))?;
        let model = crate::lora::attach(model, &adapter.spec(), 0, device);
        crate::lora::load_adapter(model, lora_tensors, device).map_err(|e| bad(e.0))
    }

    /// The checkpoint whose weights an adapter applies to, checked against
    /// the manifest hash recorded when the adapter was trained; `None`
    /// without an adapter.
    pub fn adapter_base(&self) -> Result<Option<Checkpoint>, CheckpointError> {
        let Some(adapter) = &self.manifest.adapter else {
            return Ok(None);
        };
        let fail = |reason: String| CheckpointError::AdapterBase {
            path: self.dir.clone(),
            base: adapter.base.path.clone(),
            reason,
        };
        let base = Checkpoint::open(Path::new(&adapter.base.path), &[]).map_err(|e| {
            fail(format!(
                "cannot be opened ({e}); the adapter refers to its base by path, so keep the base where it was"
            ))
        })?;
        if base.manifest_sha256 != adapter.base.manifest_sha256 {
            return Err(fail(
                "has changed since the adapter was trained (its manifest hash differs)".into(),
            ));
        }
        if base.manifest.adapter.is_some() || base.manifest.model != self.manifest.model {
            return Err(fail("is not a full model of this architecture".into()));
        }
        Ok(Some(base))
    }

    /// Every weight under HF names and layout, an adapter merged in (for
    /// exports).
    pub fn weights(&self) -> Result<HashMap<String, TensorData>, CheckpointError> {
        self.require_unmasked("an export")?;
        match self.manifest.adapter {
            None => read_safetensors(&self.dir.join(MODEL_FILE)),
            Some(_) => {
                let model = self.model::<crate::backend::Inner>(&Default::default())?;
                Ok(named_tensors(&model).into_iter().collect())
            }
        }
    }

    /// An [`AdapterRef`] naming this checkpoint as the base of an adapter of
    /// `spec` (its absolute path, so the adapter resolves from anywhere).
    pub fn as_adapter_base(&self, spec: &crate::lora::AdapterSpec) -> AdapterRef {
        let mut base = self.as_parent("base");
        if let Ok(abs) = fs::canonicalize(&self.dir) {
            base.path = abs.display().to_string();
        }
        AdapterRef {
            base,
            rank: spec.rank,
            alpha: spec.alpha,
            targets: spec.targets.clone(),
            dropout: spec.dropout,
            modules_to_save: Vec::new(),
        }
    }

    /// The checkpoint a stage will write at `dir`, as far as the next stage's
    /// config depends on it (architecture and training settings), so that
    /// config can be checked before anything trains. Not on disk.
    pub fn planned(
        dir: &Path,
        stage: &str,
        model: &ModelConfig,
        train: &crate::train::config::TrainConfig,
    ) -> Self {
        Self {
            dir: dir.to_path_buf(),
            manifest: Manifest::bare(
                stage,
                model.clone(),
                serde_json::to_value(train).unwrap_or_default(),
            ),
            manifest_sha256: String::new(),
        }
    }

    /// A reference to this checkpoint for a child's manifest, in `role`.
    pub fn as_parent(&self, role: &str) -> ParentRef {
        ParentRef {
            role: role.to_string(),
            stage: self.manifest.stage.clone(),
            path: self.dir.display().to_string(),
            manifest_sha256: self.manifest_sha256.clone(),
        }
    }
}

/// Whether `work` (a stage's `<out>.partial`) holds what `--resume` continues:
/// a train_state, or a `round-<r>/` directory of a stage that trains in
/// rounds (align.rounds) with a train_state or a finished round.
pub fn resumable(work: &Path) -> bool {
    let has_state = |w: &Path| {
        w.join(TRAIN_STATE_DIR).join("state.json").is_file()
            || w.join("train_state.old").join("state.json").is_file()
    };
    let in_rounds = fs::read_dir(work).into_iter().flatten().flatten().any(|e| {
        e.file_name().to_string_lossy().starts_with("round-")
            && (has_state(&e.path()) || e.path().join("round.json").is_file())
    });
    has_state(work) || in_rounds
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Inner;

    #[test]
    fn half_precision_weights_read_and_write_at_known_values() {
        // f16 bits as a file stores them → the f32 values they are.
        let f16_bits: [u16; 5] = [0x3c00, 0xc000, 0x3555, 0x0001, 0x7c00];
        let raw: Vec<u8> = f16_bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let view = TensorView::new(Dtype::F16, vec![5], &raw).unwrap();
        let bytes = safetensors::serialize([("w".to_string(), view)], None).unwrap();
        let read: Vec<f32> = parse_safetensors(&bytes).unwrap()["w"].to_vec().unwrap();
        assert_eq!(&read[..4], &[1.0, -2.0, 0.333_251_95, 5.960_464_5e-8]);
        assert!(read[4].is_infinite());
        // bf16 writes round to nearest even: 1 + 2⁻⁸ is a tie that goes down
        // to 1, 1 + 3·2⁻⁸ a tie that goes up to 1 + 2⁻⁶.
        let values = vec![1.0f32, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -2.5];
        let name = "w".to_string();
        let data = TensorData::new(values, [4]);
        let bytes = safetensors_bytes([(&name, &data)], WeightDtype::Bf16).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor("w").unwrap();
        assert_eq!(view.dtype(), Dtype::BF16);
        let bits: Vec<u16> = view
            .data()
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(bits, [0x3f80, 0x3f80, 0x3f82, 0xc020]);
    }

    #[test]
    fn weights_round_trip_with_hf_names_and_layout() {
        let device = Default::default();
        let config = ModelConfig {
            vocab_size: 32,
            d_model: 16,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            d_ff: 24,
            max_seq_len: 8,
            tie_embeddings: false,
            ..ModelConfig::default()
        };
        let model = config.init::<Inner>(7, &device);
        let named = named_tensors(&model);
        let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"model.embed_tokens.weight"));
        assert!(names.contains(&"model.layers.1.self_attn.k_proj.weight"));
        assert!(names.contains(&"model.layers.0.mlp.down_proj.weight"));
        assert!(names.contains(&"model.layers.0.post_attention_layernorm.weight"));
        assert!(names.contains(&"model.norm.weight"));
        assert!(names.contains(&"lm_head.weight"));
        assert_eq!(named.len(), 1 + 2 * 9 + 1 + 1);
        let k = &named
            .iter()
            .find(|(n, _)| n == "model.layers.1.self_attn.k_proj.weight")
            .unwrap()
            .1;
        assert_eq!(k.shape.as_slice(), &[8, 16], "HF layout is [out, in]");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        fs::write(&path, model_bytes(&model).unwrap()).unwrap();
        let loaded = load_model::<Inner>(&config, &path, &device).unwrap();
        let before = model_bytes(&model).unwrap();
        let after = model_bytes(&loaded).unwrap();
        assert_eq!(before, after);

        // A missing tensor is named.
        let mut tensors = read_safetensors(&path).unwrap();
        tensors.remove("model.norm.weight");
        let err = load_named(config.init::<Inner>(0, &device), tensors, &device).unwrap_err();
        assert!(err.0.contains("model.norm.weight is missing"), "{err}");
    }

    #[test]
    fn random_and_mutated_safetensors_never_panic_or_allocate_beyond_a_bound() {
        use crate::alloc_probe::{largest_allocation, mutate};
        let device = Default::default();
        let config = ModelConfig {
            vocab_size: 40,
            d_model: 16,
            n_layers: 1,
            n_heads: 2,
            n_kv_heads: 1,
            d_ff: 24,
            max_seq_len: 8,
            ..ModelConfig::default()
        };
        let valid = model_bytes(&config.init::<Inner>(3, &device)).unwrap();
        let read = |bytes: &[u8]| -> Result<(), WeightsError> {
            let tensors = parse_safetensors(bytes)?;
            model_from_tensors::<Inner>(&config, tensors, &device).map(|_| ())
        };
        read(&valid).unwrap();
        let mut refused = 0;
        for i in 0..2000u64 {
            let bytes = mutate(&valid, i);
            let (result, largest) =
                largest_allocation(|| std::panic::catch_unwind(|| read(&bytes)));
            let result = result.unwrap_or_else(|_| panic!("case {i} panicked"));
            assert!(largest < 16 << 20, "case {i}: allocated {largest} bytes");
            if let Err(e) = result {
                refused += 1;
                assert!(!e.0.contains('\n'), "case {i}: {e}");
            }
        }
        assert!(refused > 1000, "only {refused} of 2000 mutations refused");
    }

    #[test]
    fn an_edited_manifest_fails_its_own_hash() {
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            stage: "pretrain".into(),
            baton_version: "test".into(),
            created_at: "2026-01-01T00:00:00Z".into(),
            model: ModelConfig::default(),
            tokenizer_sha256: "ab".into(),
            chat_template: None,
            parents: Vec::new(),
            data: Vec::new(),
            train: serde_json::json!({"lr": 0.001}),
            step: 7,
            tokens_seen: 100,
            metrics: BTreeMap::from([("val_bpb".to_string(), 2.25)]),
            files: BTreeMap::from([("model.safetensors".to_string(), "cd".to_string())]),
            trained: None,
            adapter: None,
        };
        let bytes = manifest_bytes(&manifest).unwrap();
        assert_eq!(check_self_hash(&bytes), Ok(true));
        let parsed: Manifest = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(parsed, manifest);
        let text = String::from_utf8(bytes).unwrap();
        for (from, to) in [
            ("\"step\": 7", "\"step\": 8"),
            (
                "\"model.safetensors\": \"cd\"",
                "\"model.safetensors\": \"ce\"",
            ),
            ("\"stage\": \"pretrain\"", "\"stage\": \"sft\""),
        ] {
            let edited = text.replace(from, to);
            assert_ne!(edited, text);
            assert!(check_self_hash(edited.as_bytes()).is_err(), "{from}");
        }
        // Without the key: reported as unsigned (format 1 manifests).
        assert_eq!(check_self_hash(b"{\"step\": 7}"), Ok(false));
    }
}
