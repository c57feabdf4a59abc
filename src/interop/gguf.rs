//! GGUF, llama.cpp's model format: reading, dequantization and import.
//!
//! A GGUF file is a little-endian header — magic `GGUF`, version, tensor and
//! metadata counts, typed key/value metadata, tensor infos (name, dims with
//! the fastest-varying first, ggml type, offset) — then the tensor data,
//! aligned to `general.alignment` (32 by default). Quantized types store
//! blocks of 32 values with an f16 scale (and minimum), or K-quant
//! super-blocks of 256 with packed per-32 scales; [`dequantize`] turns F32,
//! F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K into f32 (what
//! a llama.cpp `Q4_K_M` file holds) and refuses any other type by name.
//!
//! [`import_gguf`] reads a Llama-architecture model: the config from the
//! `llama.*` keys, the weights under HF names (undoing llama.cpp's
//! interleaving of the query/key rows for its RoPE layout) and the embedded
//! GPT-2-style BPE tokenizer rebuilt as a `tokenizer.json`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use baton_core::burn::tensor::TensorData;

use crate::interop::hf::Imported;
use baton_core::model::ModelConfig;

pub(crate) const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value (integers widened, floats as f64).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Uint(v) => Some(v),
            Value::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Float(v) => Some(v),
            Value::Uint(v) => Some(v as f64),
            Value::Int(v) => Some(v as f64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's entry in the header.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: the fastest-varying dimension first (the reverse of a
    /// row-major shape).
    pub dims: Vec<u64>,
    pub kind: u32,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The number of values (the header parser has checked it does not overflow).
    pub fn elements(&self) -> u64 {
        self.dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .unwrap_or(u64::MAX)
    }

    /// Row-major shape (`dims` reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// Name, block length (values) and block size (bytes) of a ggml type.
fn layout(kind: u32) -> (&'static str, Option<(u64, u64)>) {
    match kind {
        0 => ("F32", Some((1, 4))),
        1 => ("F16", Some((1, 2))),
        2 => ("Q4_0", Some((32, 18))),
        3 => ("Q4_1", Some((32, 20))),
        6 => ("Q5_0", Some((32, 22))),
        7 => ("Q5_1", Some((32, 24))),
        8 => ("Q8_0", Some((32, 34))),
        30 => ("BF16", Some((1, 2))),
        12 => ("Q4_K", Some((256, 144))),
        13 => ("Q5_K", Some((256, 176))),
        14 => ("Q6_K", Some((256, 210))),
        // Known but not dequantized here.
        9 => ("Q8_1", None),
        10 => ("Q2_K", None),
        11 => ("Q3_K", None),
        15 => ("Q8_K", None),
        16 => ("IQ2_XXS", None),
        17 => ("IQ2_XS", None),
        18 => ("IQ3_XXS", None),
        19 => ("IQ1_S", None),
        20 => ("IQ4_NL", None),
        21 => ("IQ3_S", None),
        22 => ("IQ2_S", None),
        23 => ("IQ4_XS", None),
        24 => ("I8", None),
        25 => ("I16", None),
        26 => ("I32", None),
        27 => ("I64", None),
        28 => ("F64", None),
        29 => ("IQ1_M", None),
        34 => ("TQ1_0", None),
        35 => ("TQ2_0", None),
        39 => ("MXFP4", None),
        _ => ("unknown", None),
    }
}

/// Name of a ggml type id (`"Q4_K"`, or `"type 99"` for an unknown one).
pub fn type_name(kind: u32) -> String {
    match layout(kind).0 {
        "unknown" => format!("type {kind}"),
        name => name.to_string(),
    }
}

/// Bytes `n` values of `kind` take, or why they cannot be read.
fn byte_len(kind: u32, n: u64) -> Result<u64, String> {
    let (name, Some((block, bytes))) = layout(kind) else {
        return Err(format!(
            "unsupported GGUF quantization type {} (Baton reads F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)",
            type_name(kind)
        ));
    };
    if !n.is_multiple_of(block) {
        return Err(format!(
            "{n} values is not a whole number of {name} blocks of {block}"
        ));
    }
    (n / block)
        .checked_mul(bytes)
        .ok_or_else(|| format!("{n} values of {name} overflow a byte count"))
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// `n` values of ggml type `kind` from their bytes, as f32 (ggml's reference
/// dequantization: per block of 32, value = d·q (− offset) (+ m)).
pub fn dequantize(kind: u32, bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
    let need = byte_len(kind, n as u64)? as usize;
    if bytes.len() != need {
        return Err(format!(
            "{} bytes for {n} {} values, expected {need}",
            bytes.len(),
            type_name(kind)
        ));
    }
    let mut out = Vec::with_capacity(n);
    match kind {
        0 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        1 => out.extend(bytes.chunks_exact(2).map(|b| f16_at(b, 0))),
        30 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)),
        ),
        8 => {
            for b in bytes.chunks_exact(34) {
                let d = f16_at(b, 0);
                out.extend(b[2..].iter().map(|&q| d * q as i8 as f32));
            }
        }
        2 | 3 => {
            // Q4_0: d, 16 bytes of nibbles, value (q − 8)·d. Q4_1: d, m, nibbles,
            // value q·d + m. Low nibbles are values 0..16, high nibbles 16..32.
            let (head, offset) = if kind == 2 { (2, 8.0) } else { (4, 0.0) };
            for b in bytes.chunks_exact(head + 16) {
                let d = f16_at(b, 0);
                let m = if kind == 3 { f16_at(b, 2) } else { 0.0 };
                let qs = &b[head..];
                out.extend(qs.iter().map(|&q| ((q & 0x0f) as f32 - offset) * d + m));
                out.extend(qs.iter().map(|&q| ((q >> 4) as f32 - offset) * d + m));
            }
        }
        6 | 7 => {
            // Q5_0: d, 32 high bits, nibbles; value (q − 16)·d. Q5_1: d, m, high
            // bits, nibbles; value q·d + m. Bit j of the high bits is value j's fifth bit.
            let (head, offset) = if kind == 6 { (2, 16.0) } else { (4, 0.0) };
            for b in bytes.chunks_exact(head + 20) {
                let d = f16_at(b, 0);
                let m = if kind == 7 { f16_at(b, 2) } else { 0.0 };
                let qh = u32::from_le_bytes([b[head], b[head + 1], b[head + 2], b[head + 3]]);
                let qs = &b[head + 4..];
                let value = |low: u8, bit: usize| {
                    let q = low as u32 | (((qh >> bit) & 1) << 4);
                    (q as f32 - offset) * d + m
                };
                out.extend(qs.iter().enumerate().map(|(j, &q)| value(q & 0x0f, j)));
                out.extend(qs.iter().enumerate().map(|(j, &q)| value(q >> 4, j + 16)));
            }
        }
        12 | 13 => {
            // Super-blocks of 256: d, dmin, 12 bytes of packed 6-bit scales and
            // mins for eight sub-blocks of 32, (Q5_K: 32 bytes of fifth bits),
            // 128 bytes of nibbles. Value = d·scale·q − dmin·min.
            let five = kind == 13;
            let size = if five { 176 } else { 144 };
            for b in bytes.chunks_exact(size) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let (qh, qs) = if five {
                    (&b[16..48], &b[48..176])
                } else {
                    (&b[0..0], &b[16..144])
                };
                for chunk in 0..4 {
                    let q = &qs[chunk * 32..chunk * 32 + 32];
                    for (half, shift) in [(0, 0u32), (1, 4)] {
                        let (sc, m) = k4_scale_min(chunk * 2 + half, scales);
                        let (dl, ml) = (d * sc as f32, dmin * m as f32);
                        let bit = 2 * chunk + half;
                        out.extend(q.iter().enumerate().map(|(l, &byte)| {
                            let mut v = (byte >> shift) & 0x0f;
                            if five && qh[l] & (1 << bit) != 0 {
                                v += 16;
                            }
                            dl * v as f32 - ml
                        }));
                    }
                }
            }
        }
        14 => {
            // Q6_K: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 signed
            // 8-bit scales (one per 16 values), then d. Value = d·scale·(q − 32).
            for b in bytes.chunks_exact(210) {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                let mut y = [0f32; 256];
                for n in 0..2 {
                    let (ql, qh, sc, y) = (
                        &ql[n * 64..],
                        &qh[n * 32..],
                        &sc[n * 8..],
                        &mut y[n * 128..],
                    );
                    for l in 0..32 {
                        let is = l / 16;
                        let q = |low: u8, high: u8| (low as i32 | ((high as i32 & 3) << 4)) - 32;
                        let q1 = q(ql[l] & 0x0f, qh[l]);
                        let q2 = q(ql[l + 32] & 0x0f, qh[l] >> 2);
                        let q3 = q(ql[l] >> 4, qh[l] >> 4);
                        let q4 = q(ql[l + 32] >> 4, qh[l] >> 6);
                        let s = |k: usize| d * sc[is + k] as i8 as f32;
                        y[l] = s(0) * q1 as f32;
                        y[l + 32] = s(2) * q2 as f32;
                        y[l + 64] = s(4) * q3 as f32;
                        y[l + 96] = s(6) * q4 as f32;
                    }
                }
                out.extend_from_slice(&y);
            }
        }
        _ => unreachable!("byte_len accepted only the types above"),
    }
    Ok(out)
}

/// Scale and min of sub-block `j` (0..8) from K-quants' 12 packed bytes: the
/// first four pairs are the low 6 bits of bytes `j` and `j + 4`; the last four
/// take 4 bits from bytes 8..12 and their top 2 bits from bytes 0..8.
fn k4_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Metadata arrays may hold arrays this many levels deep (llama.cpp writes one).
const MAX_ARRAY_DEPTH: usize = 4;

/// A parsed GGUF header; tensors are read on demand.
pub struct Gguf {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_start: u64,
    file_len: u64,
}

/// Reads the header, counting bytes and refusing lengths the file cannot hold.
struct Header<R> {
    inner: R,
    pos: u64,
    file_len: u64,
}

impl<R: Read> Header<R> {
    fn bytes(&mut self, n: u64) -> Result<Vec<u8>, String> {
        // `pos` never passes `file_len`, so this cannot overflow.
        if n > self.file_len - self.pos {
            return Err(format!(
                "truncated header: needs {n} bytes at offset {}, the file has {}",
                self.pos, self.file_len
            ));
        }
        let mut buf = vec![0u8; n as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| format!("cannot read at offset {}: {e}", self.pos))?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let b = self.bytes(N as u64)?;
        Ok(b.try_into().expect("length checked"))
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }

    fn string(&mut self) -> Result<String, String> {
        let n = self.u64()?;
        let b = self.bytes(n)?;
        String::from_utf8(b).map_err(|_| format!("invalid UTF-8 string before offset {}", self.pos))
    }

    fn value(&mut self, kind: u32, depth: usize) -> Result<Value, String> {
        Ok(match kind {
            0 => Value::Uint(self.array::<1>()?[0] as u64),
            1 => Value::Int(self.array::<1>()?[0] as i8 as i64),
            2 => Value::Uint(u16::from_le_bytes(self.array()?) as u64),
            3 => Value::Int(i16::from_le_bytes(self.array()?) as i64),
            4 => Value::Uint(self.u32()? as u64),
            5 => Value::Int(i32::from_le_bytes(self.array()?) as i64),
            // Through its shortest decimal: an f32 1e-5 reads as 1e-5, not 9.99999974e-6.
            6 => Value::Float(
                f32::from_le_bytes(self.array()?)
                    .to_string()
                    .parse()
                    .unwrap_or(f64::NAN),
            ),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!(
                        "arrays nested deeper than {MAX_ARRAY_DEPTH} levels"
                    ));
                }
                let item = self.u32()?;
                let n = self.u64()?;
                if n > self.file_len - self.pos {
                    return Err(format!("array of {n} items cannot fit in the file"));
                }
                // Grown as items are read: a count is only a claim.
                let mut items = Vec::with_capacity((n as usize).min(1 << 16));
                for _ in 0..n {
                    items.push(self.value(item, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::Uint(self.u64()?),
            11 => Value::Int(i64::from_le_bytes(self.array()?)),
            12 => Value::Float(f64::from_le_bytes(self.array()?)),
            other => return Err(format!("unknown metadata value type {other}")),
        })
    }
}

impl Gguf {
    /// Parses the header of `path`; errors name the file.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        baton_core::files::regular_file(path, "GGUF")?;
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let file_len = file.metadata()?.len();
        if file_len > baton_core::files::cap::WEIGHTS {
            bail!(
                "{}: is {}, more than the {} Baton reads as a GGUF file",
                path.display(),
                baton_core::files::human_bytes(file_len),
                baton_core::files::human_bytes(baton_core::files::cap::WEIGHTS)
            );
        }
        let mut h = Header {
            inner: BufReader::new(file),
            pos: 0,
            file_len,
        };
        let parse = |h: &mut Header<BufReader<File>>| -> Result<_, String> {
            let magic = h.array::<4>()?;
            if &magic != MAGIC {
                return Err(format!("not a GGUF file (magic {magic:02x?})"));
            }
            let version = h.u32()?;
            if !(2..=3).contains(&version) {
                return Err(format!(
                    "GGUF version {version} is not supported (2 and 3 are)"
                ));
            }
            let n_tensors = h.u64()?;
            let n_kv = h.u64()?;
            let mut metadata = BTreeMap::new();
            for _ in 0..n_kv {
                let key = h.string()?;
                let kind = h.u32()?;
                let value = h
                    .value(kind, 0)
                    .map_err(|e| format!("metadata {key}: {e}"))?;
                metadata.insert(key, value);
            }
            let mut tensors = Vec::new();
            for _ in 0..n_tensors {
                let name = h.string()?;
                let n_dims = h.u32()?;
                if n_dims > 8 {
                    return Err(format!("tensor {name}: {n_dims} dimensions"));
                }
                let dims: Vec<u64> = (0..n_dims).map(|_| h.u64()).collect::<Result<_, _>>()?;
                let elements = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
                if elements.is_none_or(|n| n > h.file_len.saturating_mul(8)) {
                    return Err(format!(
                        "tensor {name}: dimensions {dims:?} hold more values than the file could"
                    ));
                }
                let kind = h.u32()?;
                let offset = h.u64()?;
                tensors.push(TensorInfo {
                    name,
                    dims,
                    kind,
                    offset,
                });
            }
            Ok((version, metadata, tensors))
        };
        let (version, metadata, tensors) =
            parse(&mut h).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_ALIGNMENT);
        if !(1..=1 << 20).contains(&alignment) {
            bail!(
                "{}: general.alignment = {alignment} is not a sane alignment",
                path.display()
            );
        }
        let data_start = h.pos.div_ceil(alignment) * alignment;
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
            file_len,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// Where a tensor's bytes start and how many there are, after checking its
    /// type is readable, its rows are whole blocks and the file holds it all.
    fn extent(&self, info: &TensorInfo) -> anyhow::Result<(u64, u64)> {
        let at = |e: String| anyhow!("{}: tensor {}: {e}", self.path.display(), info.name);
        let len = byte_len(info.kind, info.elements()).map_err(at)?;
        // Blocks never span rows: a row is a whole number of them.
        let row = info.dims.first().copied().unwrap_or(1);
        byte_len(info.kind, row).map_err(|e| at(format!("rows of {row}: {e}")))?;
        let end = self
            .data_start
            .checked_add(info.offset)
            .and_then(|start| start.checked_add(len));
        let start = self.data_start.saturating_add(info.offset);
        if end.is_none_or(|end| end > self.file_len) {
            return Err(at(format!(
                "truncated: its data would end past byte {}, the file has {}",
                start.saturating_add(len),
                self.file_len
            )));
        }
        Ok((start, len))
    }

    /// Checks every tensor's type and extent without reading data, so a bad
    /// file fails before any dequantization work.
    pub fn check_tensors(&self) -> anyhow::Result<()> {
        self.tensors
            .iter()
            .try_for_each(|t| self.extent(t).map(|_| ()))
    }

    /// A tensor's values as f32, row-major in [`TensorInfo::shape`].
    pub fn read(&self, info: &TensorInfo) -> anyhow::Result<Vec<f32>> {
        let at = |e: String| anyhow!("{}: tensor {}: {e}", self.path.display(), info.name);
        let n = info.elements();
        let (start, len) = self.extent(info)?;
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = vec![0u8; len as usize];
        file.read_exact(&mut bytes)?;
        dequantize(info.kind, &bytes, n as usize).map_err(at)
    }
}

/// llama.cpp's names of the tensors outside the blocks, with their HF names.
pub(crate) const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// llama.cpp's names of a block's tensors (after `blk.N.`), with their HF
/// names (after `model.layers.N.`).
pub(crate) const BLOCK_NAMES: [(&str, &str); 9] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// Renames a tensor between llama.cpp's and HF's Llama names, towards
/// HF's when `to_hf` (the inverse of each other).
pub(crate) fn rename(name: &str, to_hf: bool) -> Option<String> {
    let pick = |(gg, hf): (&'static str, &'static str)| if to_hf { (gg, hf) } else { (hf, gg) };
    if let Some((_, to)) = GLOBAL_NAMES
        .map(pick)
        .into_iter()
        .find(|(from, _)| *from == name)
    {
        return Some(to.to_string());
    }
    let (prefix, out_prefix) = pick(("blk.", "model.layers."));
    let (layer, part) = name.strip_prefix(prefix)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, to) = BLOCK_NAMES
        .map(pick)
        .into_iter()
        .find(|(from, _)| *from == part)?;
    Some(format!("{out_prefix}{layer}.{to}"))
}

/// The HF name of a llama.cpp tensor name (`blk.3.attn_q.weight` →
/// `model.layers.3.self_attn.q_proj.weight`).
pub fn hf_name(name: &str) -> Option<String> {
    rename(name, true)
}

/// Undoes llama.cpp's permutation of a query/key projection: within each head
/// llama.cpp stores the rows of the two RoPE halves interleaved (row `2j + i`
/// holds HF row `i·hd/2 + j`).
pub fn unpermute_rows(values: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    move_rows(values, rows, heads, false)
}

/// The inverse of [`unpermute_rows`] (what llama.cpp's converter does).
pub fn permute_rows(values: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    move_rows(values, rows, heads, true)
}

/// Moves rows between HF order (`h·hd + i·hd/2 + j`) and llama.cpp's
/// interleaved order (`h·hd + 2j + i`), towards llama.cpp's when `to_gguf`.
fn move_rows(values: &[f32], rows: usize, heads: usize, to_gguf: bool) -> Vec<f32> {
    let cols = values.len() / rows;
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..half {
                let hf = h * hd + i * half + j;
                let gg = h * hd + 2 * j + i;
                let (from, to) = if to_gguf { (hf, gg) } else { (gg, hf) };
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// The model config in a GGUF's `<arch>.*` keys; only `llama` is accepted.
pub fn model_config(g: &Gguf) -> anyhow::Result<ModelConfig> {
    let file = g.path.display();
    let arch = g
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("{file}: no general.architecture"))?;
    if arch != "llama" {
        bail!("{file}: unsupported architecture \"{arch}\"; Baton imports Llama-architecture GGUF");
    }
    let int = |key: &str| -> anyhow::Result<usize> {
        g.get(&format!("llama.{key}"))
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| anyhow!("{file}: missing or non-integer llama.{key}"))
    };
    let n_heads = int("attention.head_count")?;
    let d_model = int("embedding_length")?;
    let vocab_size = match int("vocab_size") {
        Ok(v) => v,
        Err(_) => g
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .map(<[Value]>::len)
            .ok_or_else(|| anyhow!("{file}: neither llama.vocab_size nor tokenizer.ggml.tokens"))?,
    };
    let config = ModelConfig {
        vocab_size,
        d_model,
        n_layers: int("block_count")?,
        n_heads,
        n_kv_heads: int("attention.head_count_kv").unwrap_or(n_heads),
        d_ff: int("feed_forward_length")?,
        max_seq_len: int("context_length")?,
        rope_theta: g
            .get("llama.rope.freq_base")
            .and_then(Value::as_f64)
            .unwrap_or(10_000.0),
        norm_eps: g
            .get("llama.attention.layer_norm_rms_epsilon")
            .and_then(Value::as_f64)
            .unwrap_or(1e-5),
        tie_embeddings: !g.tensors.iter().any(|t| t.name == "output.weight"),
        moe: None,
    };
    if let Ok(rot) = int("rope.dimension_count")
        && rot != config.head_dim()
    {
        bail!(
            "{file}: unsupported llama.rope.dimension_count = {rot} (Baton rotates the whole head of {})",
            config.head_dim()
        );
    }
    if let Some(kind) = g.get("llama.rope.scaling.type").and_then(Value::as_str)
        && kind != "none"
    {
        bail!("{file}: unsupported llama.rope.scaling.type = \"{kind}\" (Baton has plain RoPE)");
    }
    config.validate().map_err(|e| anyhow!("{file}: {e}"))?;
    Ok(config)
}

/// Pre-tokenizers (`tokenizer.ggml.pre`) that split digits one by one before
/// GPT-2's byte-level regex, as llama.cpp defines them.
pub(crate) const DIGIT_SPLIT_PRE: [&str; 5] =
    ["smollm", "starcoder", "refact", "codeshell", "command-r"];

/// The embedded tokenizer as `tokenizer.json` text. GPT-2-style BPE
/// (`tokenizer.ggml.model = "gpt2"`) with the `default`/`gpt2` or a
/// digit-splitting pre-tokenizer; control and user-defined tokens become
/// added (never split) tokens.
pub fn tokenizer_json(g: &Gguf) -> anyhow::Result<String> {
    let file = g.path.display();
    let model = g
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("{file}: no embedded tokenizer (tokenizer.ggml.model)"))?;
    if model != "gpt2" {
        bail!(
            "{file}: unsupported tokenizer model \"{model}\" (Baton reads GPT-2-style BPE, \"gpt2\")"
        );
    }
    let strings = |key: &str| -> anyhow::Result<Vec<&str>> {
        g.get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("{file}: missing {key}"))?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| anyhow!("{file}: {key} holds a non-string"))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<u64> = g
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
        .unwrap_or_default();
    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let byte_level = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    let pre_tokenizer = if pre == "default" || pre == "gpt2" {
        byte_level.clone()
    } else if DIGIT_SPLIT_PRE.contains(&pre) {
        serde_json::json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level],
        })
    } else {
        bail!(
            "{file}: unsupported tokenizer.ggml.pre = \"{pre}\" (Baton knows default, gpt2, {})",
            DIGIT_SPLIT_PRE.join(", ")
        );
    };
    // 3 = control, 4 = user-defined: whole tokens, never split by BPE.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3 | 4)))
        .map(|(i, t)| {
            serde_json::json!({
                "id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": types[i] == 3,
            })
        })
        .collect();
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i.into()))
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    });
    Ok(serde_json::to_string(&json)?)
}

/// Every weight of a Llama GGUF under HF names, dequantized to f32 and with
/// the query/key rows back in HF order.
pub fn read_weights(g: &Gguf, config: &ModelConfig) -> anyhow::Result<HashMap<String, TensorData>> {
    let mut out = HashMap::new();
    for info in &g.tensors {
        let name = hf_name(&info.name).ok_or_else(|| {
            anyhow!(
                "{}: unexpected tensor {} in a Llama model",
                g.path.display(),
                info.name
            )
        })?;
        let shape = info.shape();
        let mut values = g.read(info)?;
        let heads = if name.ends_with("q_proj.weight") {
            Some(config.n_heads)
        } else if name.ends_with("k_proj.weight") {
            Some(config.n_kv_heads)
        } else {
            None
        };
        if let Some(heads) = heads {
            let rows = shape[0];
            if shape.len() != 2 || rows % heads != 0 || (rows / heads) % 2 != 0 {
                bail!(
                    "{}: tensor {} has shape {shape:?}, not {heads} heads of even size",
                    g.path.display(),
                    info.name
                );
            }
            values = unpermute_rows(&values, rows, heads);
        }
        out.insert(name, TensorData::new(values, shape));
    }
    Ok(out)
}

/// Imports a Llama-architecture GGUF as a `pretrain` checkpoint that `sft`
/// and `align` accept; the manifest records the file's sha256.
pub fn import_gguf(file: &Path, out: &Path, force: bool) -> anyhow::Result<PathBuf> {
    baton_core::checkpoint::StageDir::check(out, false, force, &[file])?;
    let g = Gguf::open(file)?;
    let config = model_config(&g)?;
    let tokenizer_json = tokenizer_json(&g)?;
    g.check_tensors()?;
    let tensors = read_weights(&g, &config)?;
    Imported {
        origin: file,
        kind: crate::interop::hf::GGUF_IMPORT,
        config,
        tensors,
        tokenizer_json,
        sources: vec![file.to_path_buf()],
    }
    .write(out, force)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interop::gguf_export::{Writer, put_str};
    use baton_core::backend::Inner;
    use baton_core::checkpoint::{self, Checkpoint};
    use baton_core::tokenizer::{ChatFormat, Tokenizer};

    const F32: u32 = 0;
    const F16: u32 = 1;
    const Q4_0: u32 = 2;
    const Q4_1: u32 = 3;
    const Q5_0: u32 = 6;
    const Q5_1: u32 = 7;
    const Q8_0: u32 = 8;
    const BF16: u32 = 30;
    const Q4_K: u32 = 12;
    const Q5_K: u32 = 13;
    const Q6_K: u32 = 14;

    /// The bytes and values of the K-quant golden blocks of `kind`.
    fn golden_kquant(kind: u32) -> (Vec<u8>, Vec<f32>) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/kquants.json");
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let case = &golden["types"][type_name(kind)];
        let hex = case["hex"].as_str().unwrap();
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        (
            bytes,
            serde_json::from_value(case["values"].clone()).unwrap(),
        )
    }

    fn h(x: f32) -> [u8; 2] {
        half::f16::from_f32(x).to_le_bytes()
    }

    /// ggml's reference quantizers (`quantize_row_*_ref`), one block of 32.
    fn quantize(kind: u32, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        match kind {
            F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
            F16 => values.iter().for_each(|&v| out.extend(h(v))),
            BF16 => values
                .iter()
                .for_each(|&v| out.extend(half::bf16::from_f32(v).to_le_bytes())),
            Q4_K | Q5_K | Q6_K => {
                // No K-quantizer here: values must be gguf-py's golden blocks
                // (tiled), and the golden bytes are written for them.
                let (bytes, golden) = golden_kquant(kind);
                for chunk in values.chunks(golden.len()) {
                    assert_eq!(
                        chunk,
                        golden.as_slice(),
                        "K-quant data must be the golden blocks"
                    );
                    out.extend(&bytes);
                }
            }
            _ => {
                for x in values.chunks(32) {
                    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let signed_max = *x.iter().find(|v| v.abs() == amax).unwrap();
                    let (min, max) = x
                        .iter()
                        .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                    let inv = |d: f32| if d != 0.0 { 1.0 / d } else { 0.0 };
                    match kind {
                        Q8_0 => {
                            let d = amax / 127.0;
                            out.extend(h(d));
                            out.extend(x.iter().map(|v| (v * inv(d)).round() as i8 as u8));
                        }
                        Q4_0 | Q4_1 => {
                            let (d, base, bias) = if kind == Q4_0 {
                                (signed_max / -8.0, 0.0, 8.5)
                            } else {
                                ((max - min) / 15.0, min, 0.5)
                            };
                            out.extend(h(d));
                            if kind == Q4_1 {
                                out.extend(h(min));
                            }
                            let q = |v: f32| (((v - base) * inv(d) + bias) as i8).min(15) as u8;
                            out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
                        }
                        Q5_0 | Q5_1 => {
                            let (d, base, bias) = if kind == Q5_0 {
                                (signed_max / -16.0, 0.0, 16.5)
                            } else {
                                ((max - min) / 31.0, min, 0.5)
                            };
                            out.extend(h(d));
                            if kind == Q5_1 {
                                out.extend(h(min));
                            }
                            let q: Vec<u32> = x
                                .iter()
                                .map(|&v| (((v - base) * inv(d) + bias) as i8).min(31) as u32)
                                .collect();
                            let qh = (0..32).fold(0u32, |acc, j| acc | ((q[j] >> 4) << j));
                            out.extend(qh.to_le_bytes());
                            out.extend((0..16).map(|j| (q[j] & 15 | (q[j + 16] & 15) << 4) as u8));
                        }
                        _ => panic!("no quantizer for {kind}"),
                    }
                }
            }
        }
        out
    }

    #[test]
    fn blocks_dequantize_to_their_closed_form() {
        let nibbles: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        // Q4_0: d = 0.25, value = (q − 8)·d.
        let mut b = h(0.25).to_vec();
        b.extend(&nibbles);
        let v = dequantize(Q4_0, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(v[j], (j as f32 - 8.0) * 0.25);
            assert_eq!(v[16 + j], (15.0 - j as f32 - 8.0) * 0.25);
        }
        // Q4_1: d = 0.5, m = −1, value = q·d + m.
        let mut b = h(0.5).to_vec();
        b.extend(h(-1.0));
        b.extend(&nibbles);
        let v = dequantize(Q4_1, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(v[j], j as f32 * 0.5 - 1.0);
            assert_eq!(v[16 + j], (15 - j) as f32 * 0.5 - 1.0);
        }
        // Q8_0: d = 0.5, q = j − 16.
        let mut b = h(0.5).to_vec();
        b.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let v = dequantize(Q8_0, &b, 32).unwrap();
        assert!((0..32).all(|j| v[j] == (j as f32 - 16.0) * 0.5));
        // Q5_0 / Q5_1: the fifth bit of value k is bit k of qh (set for odd k).
        let qh = 0xAAAA_AAAAu32;
        let low: Vec<u8> = (0..16u8).map(|j| j | (3 << 4)).collect();
        for (kind, d, m, offset) in [(Q5_0, 1.0, 0.0, 16.0), (Q5_1, 0.5, 2.0, 0.0)] {
            let mut b = h(d).to_vec();
            if kind == Q5_1 {
                b.extend(h(m));
            }
            b.extend(qh.to_le_bytes());
            b.extend(&low);
            let v = dequantize(kind, &b, 32).unwrap();
            for (k, &value) in v.iter().enumerate() {
                let low = if k < 16 { k as f32 } else { 3.0 };
                let high = if k % 2 == 1 { 16.0 } else { 0.0 };
                assert_eq!(
                    value,
                    (low + high - offset) * d + m,
                    "type {kind} value {k}"
                );
            }
        }
        // Plain floats.
        assert_eq!(
            dequantize(F16, &[0x00, 0x3c, 0x00, 0xc0], 2).unwrap(),
            [1.0, -2.0]
        );
        assert_eq!(
            dequantize(BF16, &[0x80, 0x3f, 0x20, 0xc0], 2).unwrap(),
            [1.0, -2.5]
        );
        assert_eq!(dequantize(F32, &1.5f32.to_le_bytes(), 1).unwrap(), [1.5]);
        // Refusals name the problem.
        let err = dequantize(10, &[0; 84], 256).unwrap_err();
        assert!(err.contains("Q2_K"), "{err}");
        assert!(
            dequantize(Q8_0, &[0; 33], 32)
                .unwrap_err()
                .contains("expected 34")
        );
        assert!(
            dequantize(Q4_0, &[0; 18], 31)
                .unwrap_err()
                .contains("blocks of 32")
        );
    }

    /// K-quant blocks against gguf-py's dequantization of the same bytes
    /// (`tests/golden/kquants.json`, from `scripts/kquants_golden.py`).
    #[test]
    fn k_quants_match_gguf_py() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/kquants.json");
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for (name, kind) in [("Q4_K", 12), ("Q5_K", 13), ("Q6_K", 14)] {
            let case = &golden["types"][name];
            let hex = case["hex"].as_str().unwrap();
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            let want: Vec<f32> = serde_json::from_value(case["values"].clone()).unwrap();
            let got = dequantize(kind, &bytes, want.len()).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "{name} value {i}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn reference_quantization_round_trips_within_its_step() {
        let values: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0 * if i < 128 { 1.0 } else { 0.01 })
            .collect();
        for kind in [Q8_0, Q4_0, Q4_1, Q5_0, Q5_1] {
            let bytes = quantize(kind, &values);
            let back = dequantize(kind, &bytes, values.len()).unwrap();
            let levels = match kind {
                Q8_0 => 254.0,
                Q4_0 | Q4_1 => 15.0,
                _ => 31.0,
            };
            for (block, (x, y)) in values.chunks(32).zip(back.chunks(32)).enumerate() {
                let (lo, hi) = x
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                let amax = lo.abs().max(hi.abs());
                let range = if matches!(kind, Q4_1 | Q5_1) {
                    hi - lo
                } else {
                    2.0 * amax
                };
                let step = range / levels;
                for (a, b) in x.iter().zip(y) {
                    assert!(
                        (a - b).abs() <= 1.05 * step,
                        "type {kind} block {block}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn rope_row_permutation_matches_llama_cpp() {
        // One head of 4 rows: llama.cpp interleaves the halves (r0 r2 r1 r3).
        let rows: Vec<f32> = vec![0.0, 0.1, 1.0, 1.1, 2.0, 2.1, 3.0, 3.1];
        let gg = permute_rows(&rows, 4, 1);
        assert_eq!(gg, [0.0, 0.1, 2.0, 2.1, 1.0, 1.1, 3.0, 3.1]);
        assert_eq!(unpermute_rows(&gg, 4, 1), rows);
        let many: Vec<f32> = (0..96).map(|i| i as f32).collect();
        assert_eq!(unpermute_rows(&permute_rows(&many, 24, 3), 24, 3), many);
        assert_eq!(
            hf_name("blk.3.ffn_gate.weight").as_deref(),
            Some("model.layers.3.mlp.gate_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.attn_output.weight").as_deref(),
            Some("model.layers.0.self_attn.o_proj.weight")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    fn chatml_tokenizer() -> Tokenizer {
        let text = "What is 12 + 30? The answer is 42.\nReverse the letters: a b c\nc b a\n";
        let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
        Tokenizer::train_with_specials(std::iter::repeat_n(text, 30), 300, &specials).unwrap()
    }

    fn config(vocab_size: usize) -> ModelConfig {
        ModelConfig {
            vocab_size,
            d_model: 64,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            d_ff: 96,
            max_seq_len: 64,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            tie_embeddings: false,
            moe: None,
        }
    }

    /// Writes `model` (HF-named tensors) and `tokenizer` as a llama GGUF,
    /// storing each tensor as `kind(name)`; `skip` leaves a tensor out.
    fn write_gguf(
        tensors: &HashMap<String, TensorData>,
        config: &ModelConfig,
        tokenizer: &Tokenizer,
        kind: impl Fn(usize) -> u32,
        arch: &str,
        skip: Option<&str>,
    ) -> Vec<u8> {
        let mut w = Writer::default();
        w.str("general.architecture", arch);
        w.u32("general.alignment", 32);
        w.u32("llama.block_count", config.n_layers as u32);
        w.u32("llama.context_length", config.max_seq_len as u32);
        w.u32("llama.embedding_length", config.d_model as u32);
        w.u32("llama.feed_forward_length", config.d_ff as u32);
        w.u32("llama.attention.head_count", config.n_heads as u32);
        w.u32("llama.attention.head_count_kv", config.n_kv_heads as u32);
        w.f32("llama.rope.freq_base", config.rope_theta as f32);
        w.f32(
            "llama.attention.layer_norm_rms_epsilon",
            config.norm_eps as f32,
        );
        w.str("tokenizer.ggml.model", "gpt2");
        w.str("tokenizer.ggml.pre", "default");
        let json: serde_json::Value = serde_json::from_str(&tokenizer.to_json().unwrap()).unwrap();
        let vocab = json["model"]["vocab"].as_object().unwrap();
        let mut tokens = vec![String::new(); vocab.len()];
        for (t, id) in vocab {
            tokens[id.as_u64().unwrap() as usize] = t.clone();
        }
        let merges: Vec<String> = json["model"]["merges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| match m.as_array() {
                Some(pair) => format!(
                    "{} {}",
                    pair[0].as_str().unwrap(),
                    pair[1].as_str().unwrap()
                ),
                None => m.as_str().unwrap().to_string(),
            })
            .collect();
        let types: Vec<i32> = (0..tokens.len())
            .map(|i| if i < 3 { 3 } else { 1 })
            .collect();
        w.strs("tokenizer.ggml.tokens", &tokens);
        w.strs("tokenizer.ggml.merges", &merges);
        w.i32s("tokenizer.ggml.token_type", &types);
        // Every llama.cpp name, in the converter's order.
        let mut names = vec!["token_embd.weight".to_string()];
        for l in 0..config.n_layers {
            for part in [
                "attn_norm",
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            ] {
                names.push(format!("blk.{l}.{part}.weight"));
            }
        }
        names.extend([
            "output_norm.weight".to_string(),
            "output.weight".to_string(),
        ]);
        let mut matrices = 0;
        for name in names.iter().filter(|n| Some(n.as_str()) != skip) {
            let hf = hf_name(name).unwrap();
            let data = &tensors[&hf];
            let mut values: Vec<f32> = data.to_vec().unwrap();
            let shape = data.shape.clone();
            if name.ends_with("attn_q.weight") {
                values = permute_rows(&values, shape[0], config.n_heads);
            } else if name.ends_with("attn_k.weight") {
                values = permute_rows(&values, shape[0], config.n_kv_heads);
            }
            let k = if shape.len() == 1 {
                F32
            } else {
                matrices += 1;
                kind(matrices - 1)
            };
            w.tensor(name, &shape, k, &quantize(k, &values));
        }
        w.bytes()
    }

    fn seeded(
        config: &ModelConfig,
    ) -> (baton_core::model::Llama<Inner>, HashMap<String, TensorData>) {
        let model = config.init::<Inner>(11, &Default::default());
        let tensors = checkpoint::named_tensors(&model).into_iter().collect();
        (model, tensors)
    }

    #[test]
    fn an_f32_gguf_imports_to_the_same_model_and_tokenizer() {
        let tok = chatml_tokenizer();
        let config = config(tok.vocab_size());
        let (model, tensors) = seeded(&config);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tiny.gguf");
        std::fs::write(
            &file,
            write_gguf(&tensors, &config, &tok, |_| F32, "llama", None),
        )
        .unwrap();
        let out = dir.path().join("pretrain");
        import_gguf(&file, &out, false).unwrap();

        let ck = Checkpoint::open(&out, &["pretrain"]).unwrap();
        assert_eq!(ck.manifest.model, config);
        assert_eq!(
            ck.manifest.data[0].sha256,
            checkpoint::sha256_file(&file).unwrap()
        );
        let imported_tok = ck.tokenizer().unwrap();
        assert_eq!(imported_tok.chat.format, ChatFormat::ChatMl);
        let text = "What is 12 + 30?\nReverse: c b a";
        assert_eq!(
            imported_tok.encode(text).unwrap(),
            tok.encode(text).unwrap()
        );
        assert_eq!(imported_tok.special, tok.special);

        let device = Default::default();
        let imported = ck.model::<Inner>(&device).unwrap();
        let ids: Vec<u32> = tok.encode("What is 12 + 30? The answer is 42.").unwrap();
        let want = crate::interop::hf::logits_of(&model, &ids, &device);
        let got = crate::interop::hf::logits_of(&imported, &ids, &device);
        let diff = want
            .iter()
            .flatten()
            .zip(got.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-5, "max |Δlogit| = {diff}");
        // A finished checkpoint is not overwritten without --force.
        assert!(import_gguf(&file, &out, false).is_err());
    }

    #[test]
    fn quantized_tensors_import_within_their_quantization_step() {
        let tok = chatml_tokenizer();
        let config = config(tok.vocab_size());
        let (_, tensors) = seeded(&config);
        let kinds = [F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1];
        let kind_of = |i: usize| kinds[i % kinds.len()];
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("q.gguf");
        std::fs::write(
            &file,
            write_gguf(&tensors, &config, &tok, kind_of, "llama", None),
        )
        .unwrap();
        let out = dir.path().join("pretrain");
        import_gguf(&file, &out, false).unwrap();
        let got = checkpoint::read_safetensors(&out.join(checkpoint::MODEL_FILE)).unwrap();
        let g = Gguf::open(&file).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for info in &g.tensors {
            seen.insert(type_name(info.kind));
            let name = hf_name(&info.name).unwrap();
            let want: Vec<f32> = tensors[&name].to_vec().unwrap();
            let have: Vec<f32> = got[&name].to_vec().unwrap();
            assert_eq!(got[&name].shape, tensors[&name].shape, "{name}");
            // Rows compared in HF order: a wrong unpermute or block layout fails here.
            let cols = *tensors[&name].shape.last().unwrap();
            for (row, (a, b)) in want.chunks(cols).zip(have.chunks(cols)).enumerate() {
                let amax = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                let step = match info.kind {
                    F32 => 0.0,
                    F16 => amax / 1024.0,
                    BF16 => amax / 128.0,
                    Q8_0 => amax / 127.0,
                    Q4_0 | Q4_1 => amax * 2.0 / 15.0,
                    _ => amax * 2.0 / 31.0,
                };
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= 1.05 * step + 1e-7,
                        "{name} ({}) row {row}: {x} vs {y}",
                        type_name(info.kind)
                    );
                }
            }
        }
        assert_eq!(
            seen.len(),
            kinds.len() + 1,
            "every type exercised: {seen:?}"
        );
    }

    #[test]
    fn bad_gguf_files_are_refused_by_name_and_nothing_is_written() {
        let tok = chatml_tokenizer();
        let config = config(tok.vocab_size());
        let (_, tensors) = seeded(&config);
        let dir = tempfile::tempdir().unwrap();
        let good = write_gguf(&tensors, &config, &tok, |_| Q8_0, "llama", None);
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("truncated", good[..good.len() - 100].to_vec(), "truncated"),
            ("header", good[..60].to_vec(), "truncated header"),
            (
                "magic",
                b"not a gguf file at all".to_vec(),
                "not a GGUF file",
            ),
            (
                "arch",
                write_gguf(&tensors, &config, &tok, |_| Q8_0, "qwen2", None),
                "unsupported architecture \"qwen2\"",
            ),
            (
                "missing",
                write_gguf(
                    &tensors,
                    &config,
                    &tok,
                    |_| Q8_0,
                    "llama",
                    Some("blk.1.ffn_up.weight"),
                ),
                "model.layers.1.mlp.up_proj.weight",
            ),
            (
                "k-quant",
                {
                    // Retype the first 2-D tensor as Q2_K (10), which Baton
                    // does not read, keeping its bytes.
                    let mut w = write_gguf(&tensors, &config, &tok, |_| Q8_0, "llama", None);
                    let g = b"token_embd.weight";
                    let at = w.windows(g.len()).position(|x| x == g).unwrap() + g.len() + 4 + 16;
                    w[at..at + 4].copy_from_slice(&10u32.to_le_bytes());
                    w
                },
                "unsupported GGUF quantization type Q2_K",
            ),
        ];
        for (case, bytes, needle) in cases {
            let file = dir.path().join(format!("{case}.gguf"));
            std::fs::write(&file, bytes).unwrap();
            let out = dir.path().join(format!("{case}-out"));
            let err = format!("{:#}", import_gguf(&file, &out, false).unwrap_err());
            assert!(err.contains(needle), "{case}: {err}");
            assert!(
                err.contains(&file.display().to_string()),
                "{case} names the file: {err}"
            );
            assert!(!out.exists(), "{case}: nothing written");
        }
    }

    /// Everything an import reads from a GGUF file, up to writing.
    fn read_all(path: &Path) -> anyhow::Result<()> {
        let g = Gguf::open(path)?;
        let config = model_config(&g)?;
        let json = tokenizer_json(&g)?;
        Tokenizer::from_json(&json, "fuzz")?;
        g.check_tensors()?;
        let tensors = read_weights(&g, &config)?;
        checkpoint::model_from_tensors::<Inner>(&config, tensors, &Default::default())
            .map_err(|e| anyhow!(e))?;
        Ok(())
    }

    fn valid_gguf() -> Vec<u8> {
        let tok = chatml_tokenizer();
        let config = config(tok.vocab_size());
        let (_, tensors) = seeded(&config);
        write_gguf(&tensors, &config, &tok, |_| Q8_0, "llama", None)
    }

    #[test]
    fn crafted_headers_fail_with_one_line_before_any_large_allocation() {
        use baton_core::alloc_probe::largest_allocation;
        let dir = tempfile::tempdir().unwrap();
        let head = |n_tensors: u64, n_kv: u64| {
            let mut b = b"GGUF".to_vec();
            b.extend(3u32.to_le_bytes());
            b.extend(n_tensors.to_le_bytes());
            b.extend(n_kv.to_le_bytes());
            b
        };
        // A key length near 2^64 (the old bounds check `pos + n` wrapped).
        let mut huge_key = head(0, 1);
        huge_key.extend((u64::MAX - 3).to_le_bytes());
        huge_key.extend([0u8; 64]);
        // 300 000 nested arrays (the old parser recursed once per level).
        let mut nested = head(0, 1);
        put_str(&mut nested, "deep");
        nested.extend(9u32.to_le_bytes());
        for _ in 0..300_000 {
            nested.extend(9u32.to_le_bytes());
            nested.extend(1u64.to_le_bytes());
        }
        // A 4 KB file claiming a model of 10^12 parameters.
        let mut w = Writer::default();
        w.str("general.architecture", "llama");
        for (key, v) in [
            ("llama.vocab_size", 1000),
            ("llama.block_count", 1000),
            ("llama.context_length", 4096),
            ("llama.embedding_length", 65536),
            ("llama.feed_forward_length", 200_000),
            ("llama.attention.head_count", 512),
            ("llama.attention.head_count_kv", 512),
        ] {
            w.u32(key, v);
        }
        w.tensor("token_embd.weight", &[4, 8], F32, &[0u8; 128]);
        let huge_dims = w.bytes();
        // A tensor whose dimensions multiply past 2^64.
        let mut w = Writer::default();
        w.str("general.architecture", "llama");
        put_str(&mut w.infos, "token_embd.weight");
        w.infos.extend(2u32.to_le_bytes());
        w.infos.extend((1u64 << 40).to_le_bytes());
        w.infos.extend((1u64 << 40).to_le_bytes());
        w.infos.extend(F32.to_le_bytes());
        w.infos.extend(0u64.to_le_bytes());
        w.n_tensors = 1;
        let overflow_dims = w.bytes();
        let cases = [
            ("key.gguf", huge_key, "truncated header"),
            ("nested.gguf", nested, "nested deeper than 4"),
            ("dims.gguf", huge_dims, "above Baton's limit"),
            (
                "overflow.gguf",
                overflow_dims,
                "more values than the file could",
            ),
        ];
        for (name, bytes, expected) in cases {
            let file = dir.path().join(name);
            std::fs::write(&file, &bytes).unwrap();
            let (result, largest) = largest_allocation(|| read_all(&file));
            let err = format!("{:#}", result.unwrap_err());
            assert!(err.contains(expected), "{name}: {err}");
            assert!(err.contains(name) && !err.contains('\n'), "{name}: {err}");
            assert!(largest < 16 << 20, "{name}: allocated {largest} bytes");
        }
    }

    #[test]
    fn random_and_mutated_files_never_panic_or_allocate_beyond_a_bound() {
        use baton_core::alloc_probe::{largest_allocation, mutate};
        let valid = valid_gguf();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fuzz.gguf");
        std::fs::write(&file, &valid).unwrap();
        read_all(&file).unwrap();
        let bound = 64 << 20;
        let mut refused = 0;
        for i in 0..1200u64 {
            let bytes = mutate(&valid, i);
            std::fs::write(&file, &bytes).unwrap();
            let (result, largest) = largest_allocation(|| {
                std::panic::catch_unwind(|| read_all(&file).map_err(|e| format!("{e:#}")))
            });
            let result = result.unwrap_or_else(|_| panic!("case {i} panicked"));
            assert!(largest < bound, "case {i}: allocated {largest} bytes");
            if let Err(e) = result {
                refused += 1;
                assert!(!e.contains('\n'), "case {i}: {e}");
            }
        }
        assert!(refused > 600, "only {refused} of 1200 mutations refused");
    }

    /// A file whose every matrix is K-quantized (one type per file, as in a
    /// llama.cpp `Q4_K_S`-style file), imported whole: each matrix reads back
    /// as gguf-py dequantizes the same blocks.
    #[test]
    fn whole_k_quant_files_import_as_gguf_py_reads_them() {
        let tok = chatml_tokenizer();
        let dir = tempfile::tempdir().unwrap();
        for kind in [Q4_K, Q5_K, Q6_K] {
            let (_, golden) = golden_kquant(kind);
            let width = golden.len();
            let config = ModelConfig {
                vocab_size: tok.vocab_size(),
                d_model: width,
                n_layers: 1,
                n_heads: 8,
                n_kv_heads: 8,
                d_ff: width,
                max_seq_len: 16,
                ..config(tok.vocab_size())
            };
            let tensors: HashMap<String, TensorData> = config
                .hf_shapes()
                .into_iter()
                .map(|(name, shape)| {
                    let n: usize = shape.iter().product();
                    let values: Vec<f32> = if shape.len() == 2 {
                        golden.iter().copied().cycle().take(n).collect()
                    } else {
                        vec![1.0; n]
                    };
                    (name, TensorData::new(values, shape))
                })
                .collect();
            let file = dir.path().join(format!("{}.gguf", type_name(kind)));
            std::fs::write(
                &file,
                write_gguf(&tensors, &config, &tok, |_| kind, "llama", None),
            )
            .unwrap();
            let out = dir.path().join(type_name(kind));
            import_gguf(&file, &out, false).unwrap();
            let got = checkpoint::read_safetensors(&out.join(checkpoint::MODEL_FILE)).unwrap();
            assert_eq!(got.len(), tensors.len());
            for (name, want) in &tensors {
                let (a, b): (Vec<f32>, Vec<f32>) =
                    (want.to_vec().unwrap(), got[name].to_vec().unwrap());
                assert_eq!(got[name].shape, want.shape, "{name}");
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x - y).abs() <= 1e-5 * x.abs().max(1.0),
                        "{name}: {x} vs {y}"
                    );
                }
            }
            let g = Gguf::open(&file).unwrap();
            let kinds: std::collections::BTreeSet<u32> = g
                .tensors
                .iter()
                .filter(|t| t.dims.len() == 2)
                .map(|t| t.kind)
                .collect();
            assert_eq!(kinds, [kind].into(), "every matrix {}", type_name(kind));
        }
    }

    /// GGUF version 2 (same layout as 3) reads the same; a tied head (no
    /// `output.weight`) imports as a tied model; a SentencePiece tokenizer is
    /// refused by name.
    #[test]
    fn version_2_and_tied_heads_import_and_sentencepiece_is_refused() {
        let tok = chatml_tokenizer();
        let dir = tempfile::tempdir().unwrap();
        let config = config(tok.vocab_size());
        let (_, tensors) = seeded(&config);
        let v3 = write_gguf(&tensors, &config, &tok, |_| F32, "llama", None);
        let mut v2 = v3.clone();
        v2[4..8].copy_from_slice(&2u32.to_le_bytes());
        let weights = |bytes: &[u8], name: &str| {
            let file = dir.path().join(format!("{name}.gguf"));
            std::fs::write(&file, bytes).unwrap();
            let out = dir.path().join(name);
            import_gguf(&file, &out, false).unwrap();
            (
                std::fs::read(out.join(checkpoint::MODEL_FILE)).unwrap(),
                Checkpoint::open(&out, &[]).unwrap().manifest.model,
            )
        };
        let (a, _) = weights(&v3, "v3");
        let (b, _) = weights(&v2, "v2");
        assert!(a == b, "version 2 reads as version 3");
        assert_eq!(Gguf::open(&dir.path().join("v2.gguf")).unwrap().version, 2);

        let tied_config = ModelConfig {
            tie_embeddings: true,
            ..config.clone()
        };
        let (tied_model, tied) = seeded(&tied_config);
        assert!(!tied.contains_key("lm_head.weight"));
        let bytes = write_gguf(
            &tied,
            &tied_config,
            &tok,
            |_| F32,
            "llama",
            Some("output.weight"),
        );
        let (_, model) = weights(&bytes, "tied");
        assert!(model.tie_embeddings, "no output.weight: a tied head");
        let ck = Checkpoint::open(&dir.path().join("tied"), &[]).unwrap();
        let device = Default::default();
        let imported = ck.model::<Inner>(&device).unwrap();
        let ids = [1u32, 5, 9, 2];
        assert_eq!(
            crate::interop::hf::logits_of(&imported, &ids, &device),
            crate::interop::hf::logits_of(&tied_model, &ids, &device)
        );

        let mut w = Writer::default();
        w.str("general.architecture", "llama");
        w.str("tokenizer.ggml.model", "llama");
        let file = dir.path().join("spm.gguf");
        std::fs::write(&file, w.bytes()).unwrap();
        let g = Gguf::open(&file).unwrap();
        let err = format!("{:#}", tokenizer_json(&g).unwrap_err());
        assert!(
            err.contains("unsupported tokenizer model \"llama\""),
            "{err}"
        );
    }
}
