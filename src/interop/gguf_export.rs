//! GGUF export: a checkpoint as the Llama-architecture GGUF llama.cpp's own
//! converter writes (`convert_hf_to_gguf.py`), the inverse of
//! [`super::gguf::import_gguf`].
//!
//! The file holds the `llama.*` hyperparameters, the GPT-2-style BPE
//! tokenizer (`tokenizer.ggml.*`: tokens, merges, token types, the special
//! ids and the pre-tokenizer name) and the chat template, then every weight
//! under llama.cpp's names with the query/key rows in its interleaved RoPE
//! order. Norm gains stay f32 (as llama.cpp keeps 1-D tensors); matrices are
//! f32, f16 or q8_0. A matrix whose rows are not whole 32-value blocks falls
//! back to f16 under q8_0, as llama.cpp's converter does.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, anyhow, bail};
use baton_core::checkpoint::{self, Checkpoint};
use baton_core::model::ModelConfig;

use super::gguf::{DIGIT_SPLIT_PRE, MAGIC, permute_rows};
use super::hf::{CHAT_TEMPLATE, CHATML_TEMPLATE};
use baton_core::tokenizer::ChatFormat;

/// The ggml type of an exported matrix (`baton export --format gguf --dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufDtype {
    F32,
    F16,
    Q8_0,
}

impl FromStr for GgufDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "q8_0" => Ok(Self::Q8_0),
            other => Err(format!(
                "--dtype {other} is not a GGUF type Baton writes (f32, f16 or q8_0)"
            )),
        }
    }
}

impl GgufDtype {
    /// The ggml type id.
    fn ggml(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 8,
        }
    }

    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_*`).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
        }
    }
}

/// `values` encoded as ggml type `kind` (0 f32, 1 f16, 8 q8_0: blocks of 32
/// with an f16 scale `max|x| / 127` and rounded i8 quants, as ggml's
/// `quantize_row_q8_0_ref`).
pub fn encode(kind: u32, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    match kind {
        0 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        1 => values
            .iter()
            .for_each(|&v| out.extend(half::f16::from_f32(v).to_le_bytes())),
        8 => {
            for block in values.chunks(32) {
                let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(half::f16::from_f32(d).to_le_bytes());
                out.extend(block.iter().map(|v| (v * inv).round() as i8 as u8));
            }
        }
        other => unreachable!("no encoder for ggml type {other}"),
    }
    out
}

/// A GGUF (version 3) file built in memory: metadata, tensor infos, data.
#[derive(Default)]
pub struct Writer {
    pub(crate) kv: Vec<u8>,
    pub(crate) n_kv: u64,
    pub(crate) infos: Vec<u8>,
    pub(crate) data: Vec<u8>,
    pub(crate) n_tensors: u64,
}

pub(crate) fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend((s.len() as u64).to_le_bytes());
    buf.extend(s.as_bytes());
}

/// Data alignment of the files we write (GGUF's default).
const ALIGNMENT: usize = 32;

impl Writer {
    fn key(&mut self, key: &str, kind: u32) {
        put_str(&mut self.kv, key);
        self.kv.extend(kind.to_le_bytes());
        self.n_kv += 1;
    }
    pub fn str(&mut self, key: &str, v: &str) {
        self.key(key, 8);
        put_str(&mut self.kv, v);
    }
    pub fn u32(&mut self, key: &str, v: u32) {
        self.key(key, 4);
        self.kv.extend(v.to_le_bytes());
    }
    pub fn f32(&mut self, key: &str, v: f32) {
        self.key(key, 6);
        self.kv.extend(v.to_le_bytes());
    }
    pub fn bool(&mut self, key: &str, v: bool) {
        self.key(key, 7);
        self.kv.push(v as u8);
    }
    pub fn strs(&mut self, key: &str, items: &[String]) {
        self.key(key, 9);
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((items.len() as u64).to_le_bytes());
        items.iter().for_each(|s| put_str(&mut self.kv, s));
    }
    pub fn i32s(&mut self, key: &str, items: &[i32]) {
        self.key(key, 9);
        self.kv.extend(5u32.to_le_bytes());
        self.kv.extend((items.len() as u64).to_le_bytes());
        items.iter().for_each(|v| self.kv.extend(v.to_le_bytes()));
    }
    /// A tensor of row-major `shape` whose data (already encoded as `kind`)
    /// is `bytes`.
    pub fn tensor(&mut self, name: &str, shape: &[usize], kind: u32, bytes: &[u8]) {
        self.data
            .resize(self.data.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
        put_str(&mut self.infos, name);
        self.infos.extend((shape.len() as u32).to_le_bytes());
        shape
            .iter()
            .rev()
            .for_each(|&d| self.infos.extend((d as u64).to_le_bytes()));
        self.infos.extend(kind.to_le_bytes());
        self.infos.extend((self.data.len() as u64).to_le_bytes());
        self.data.extend(bytes);
        self.n_tensors += 1;
    }
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.infos);
        out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
        out.extend(&self.data);
        out
    }
}

/// llama.cpp's name of an HF Llama tensor (the inverse of
/// [`super::gguf::hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    super::gguf::rename(hf, false)
}

/// The tokenizer metadata of `tokenizer.json` text: tokens in id order,
/// merges as `"a b"`, token types (3 control for special added tokens, 4
/// user-defined for other added tokens, 1 normal) and llama.cpp's name for
/// the pre-tokenizer.
struct Vocab {
    tokens: Vec<String>,
    merges: Vec<String>,
    types: Vec<i32>,
    pre: &'static str,
}

fn vocab_of(json: &str, file: &Path) -> anyhow::Result<Vocab> {
    let bad = |what: &str| anyhow!("{}: tokenizer.json {what}", file.display());
    let json: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(&e.to_string()))?;
    let model = &json["model"];
    if model["type"].as_str() != Some("BPE") {
        bail!(bad(
            "is not a BPE model; GGUF export writes GPT-2-style BPE"
        ));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("has no model.vocab"))?;
    let mut tokens = vec![None; vocab.len()];
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .map(|i| i as usize)
            .filter(|&i| i < tokens.len())
            .ok_or_else(|| {
                bad(&format!(
                    "gives {token:?} the id {id}, outside the vocabulary"
                ))
            })?;
        tokens[id] = Some(token.clone());
    }
    let mut types = vec![1i32; tokens.len()];
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else {
            bail!(bad("has an added token without id or content"));
        };
        let id = id as usize;
        if id >= tokens.len() {
            tokens.resize(id + 1, None);
            types.resize(id + 1, 1);
        }
        tokens[id] = Some(content.to_string());
        types[id] = if added["special"].as_bool() == Some(true) {
            3
        } else {
            4
        };
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.ok_or_else(|| bad(&format!("has no token with id {i}"))))
        .collect::<anyhow::Result<_>>()?;
    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| bad("has no model.merges"))?
        .iter()
        .map(|m| match (m.as_str(), m.as_array()) {
            (Some(s), _) => Ok(s.to_string()),
            (_, Some(pair)) if pair.len() == 2 => Ok(format!(
                "{} {}",
                pair[0].as_str().unwrap_or_default(),
                pair[1].as_str().unwrap_or_default()
            )),
            _ => Err(bad("has a malformed merge")),
        })
        .collect::<anyhow::Result<_>>()?;
    // What `tokenizer.ggml.pre` must say for llama.cpp to split text the
    // way this tokenizer does: GPT-2's byte-level regex, with or without
    // single digits split off first.
    let pre_tok = &json["pre_tokenizer"];
    let is_byte_level = |v: &serde_json::Value| v["type"] == "ByteLevel" && v["use_regex"] != false;
    let pre = if is_byte_level(pre_tok) {
        "gpt2"
    } else if pre_tok["type"] == "Sequence"
        && matches!(pre_tok["pretokenizers"].as_array().map(Vec::as_slice),
            Some([d, b]) if d["type"] == "Digits" && d["individual_digits"] == true && is_byte_level(b))
    {
        DIGIT_SPLIT_PRE[0]
    } else {
        bail!(bad(
            "has a pre-tokenizer GGUF export cannot name (it knows GPT-2's byte-level split, with or without single digits)"
        ));
    };
    if json["normalizer"].is_object() {
        bail!(bad(
            "has a normalizer, which llama.cpp's GPT-2 tokenizer would not apply"
        ));
    }
    Ok(Vocab {
        tokens,
        merges,
        types,
        pre,
    })
}

/// The GGUF bytes of `checkpoint` with matrices as `dtype`.
pub fn gguf_bytes(checkpoint: &Checkpoint, dtype: GgufDtype) -> anyhow::Result<Vec<u8>> {
    let config: &ModelConfig = &checkpoint.manifest.model;
    let tokenizer = checkpoint.tokenizer()?;
    let tokenizer_path = checkpoint.dir.join(checkpoint::TOKENIZER_FILE);
    let tokenizer_text = std::fs::read_to_string(&tokenizer_path)
        .with_context(|| format!("{}: cannot read", tokenizer_path.display()))?;
    let vocab = vocab_of(&tokenizer_text, &tokenizer_path)?;
    let mut vocab = vocab;
    if vocab.tokens.len() > config.vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens, more than the model's {} embedding rows",
            checkpoint.dir.display(),
            vocab.tokens.len(),
            config.vocab_size
        );
    }
    // Embedding rows past the tokenizer's last id get placeholder tokens of
    // type "unused", as llama.cpp's converter pads a vocabulary.
    for i in vocab.tokens.len()..config.vocab_size {
        vocab.tokens.push(format!("[PAD{i}]"));
        vocab.types.push(5);
    }

    let mut w = Writer::default();
    w.str("general.architecture", "llama");
    let name = checkpoint
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "baton".into());
    w.str("general.name", &name);
    w.u32("general.alignment", ALIGNMENT as u32);
    w.u32("general.file_type", dtype.file_type());
    w.u32("general.quantization_version", 2);
    w.u32("llama.vocab_size", config.vocab_size as u32);
    w.u32("llama.block_count", config.n_layers as u32);
    w.u32("llama.context_length", config.max_seq_len as u32);
    w.u32("llama.embedding_length", config.d_model as u32);
    w.u32("llama.feed_forward_length", config.d_ff as u32);
    w.u32("llama.attention.head_count", config.n_heads as u32);
    w.u32("llama.attention.head_count_kv", config.n_kv_heads as u32);
    w.u32("llama.rope.dimension_count", config.head_dim() as u32);
    w.f32("llama.rope.freq_base", config.rope_theta as f32);
    w.f32(
        "llama.attention.layer_norm_rms_epsilon",
        config.norm_eps as f32,
    );

    let chat = checkpoint.manifest.chat_template.is_some();
    let special = tokenizer.special;
    w.str("tokenizer.ggml.model", "gpt2");
    w.str("tokenizer.ggml.pre", vocab.pre);
    w.strs("tokenizer.ggml.tokens", &vocab.tokens);
    w.i32s("tokenizer.ggml.token_type", &vocab.types);
    w.strs("tokenizer.ggml.merges", &vocab.merges);
    w.u32("tokenizer.ggml.bos_token_id", special.bos);
    // A chat model's turns end with the end-of-turn token: that is where
    // llama.cpp must stop generating.
    w.u32(
        "tokenizer.ggml.eos_token_id",
        if chat { special.end } else { special.eos },
    );
    w.u32("tokenizer.ggml.padding_token_id", special.pad);
    w.bool("tokenizer.ggml.add_bos_token", false);
    w.bool("tokenizer.ggml.add_eos_token", false);
    if chat {
        let template = match tokenizer.chat.format {
            ChatFormat::Baton => CHAT_TEMPLATE,
            ChatFormat::ChatMl => CHATML_TEMPLATE,
        };
        w.str("tokenizer.chat_template", template);
    }

    let weights_path = checkpoint.dir.join(checkpoint::MODEL_FILE);
    let tensors = checkpoint.weights()?;
    // In the converter's order: embeddings, each block, final norm, head.
    for (hf, shape) in config.hf_shapes() {
        let data = tensors
            .get(&hf)
            .ok_or_else(|| anyhow!("{}: tensor {hf} is missing", weights_path.display()))?;
        if data.shape.as_slice() != shape.as_slice() {
            bail!(
                "{}: tensor {hf} has shape {:?}, expected {shape:?}",
                weights_path.display(),
                data.shape
            );
        }
        let name = gguf_name(&hf).expect("every Llama tensor has a llama.cpp name");
        let mut values: Vec<f32> = data
            .to_vec()
            .map_err(|e| anyhow!("{}: tensor {hf}: {e:?}", weights_path.display()))?;
        if hf.ends_with("q_proj.weight") {
            values = permute_rows(&values, shape[0], config.n_heads);
        } else if hf.ends_with("k_proj.weight") {
            values = permute_rows(&values, shape[0], config.n_kv_heads);
        }
        let kind = match dtype {
            _ if shape.len() == 1 => 0,
            GgufDtype::Q8_0 if !shape[1].is_multiple_of(32) => GgufDtype::F16.ggml(),
            d => d.ggml(),
        };
        w.tensor(&name, &shape, kind, &encode(kind, &values));
    }
    Ok(w.bytes())
}

/// Writes `checkpoint` as a GGUF file at `to`. An existing file is replaced
/// only with `force` and only when it is a GGUF file itself (a user's other
/// file is never overwritten).
pub fn export_gguf(
    checkpoint: &Checkpoint,
    to: &Path,
    dtype: GgufDtype,
    force: bool,
) -> anyhow::Result<PathBuf> {
    checkpoint.require_unmasked("an export")?;
    if checkpoint.manifest.model.moe.is_some() {
        anyhow::bail!(
            "{}: a mixture-of-experts model does not export to GGUF yet (export it to Hugging Face, as Mixtral, instead)",
            checkpoint.dir.display()
        );
    }
    if force && let Ok(meta) = std::fs::symlink_metadata(to) {
        let mut magic = [0u8; 4];
        let is_gguf = meta.is_file()
            && std::fs::File::open(to)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
                .is_ok()
            && &magic == MAGIC;
        if !is_gguf {
            bail!(
                "{}: exists and is not a GGUF file; --force replaces only an earlier GGUF export",
                to.display()
            );
        }
    }
    // Checked before the (slow) encoding, then again as it is written.
    baton_core::files::output_path(to, &[&checkpoint.dir])?;
    if !force && to.exists() {
        bail!(
            "{}: already exists (pass --force to replace it, or choose another path)",
            to.display()
        );
    }
    let bytes = gguf_bytes(checkpoint, dtype)?;
    Ok(baton_core::files::write_new_file(
        to,
        &bytes,
        force,
        &[&checkpoint.dir],
    )?)
}
