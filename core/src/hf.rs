//! Hugging Face interoperability: export a checkpoint as a directory that
//! `transformers` loads (`AutoModelForCausalLM`, `AutoTokenizer`), and the
//! logits of a prompt as JSON for parity checks.
//!
//! Checkpoints already hold HF Llama tensor names in HF layout and an HF
//! `config.json`, so export is mostly a matter of the tokenizer files, the
//! chat template and the dtype.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use safetensors::{Dtype, tensor::TensorView};

use crate::checkpoint::{self, Checkpoint, CheckpointError};
use crate::model::Llama;
use crate::tokenizer::{SPECIAL_TOKENS, Tokenizer};
use crate::train::int_tensor;

/// Floating-point type of exported weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    Bf16,
}

impl std::str::FromStr for ExportDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(ExportDtype::F32),
            "bf16" | "bfloat16" => Ok(ExportDtype::Bf16),
            other => Err(format!("unknown dtype \"{other}\" (f32 or bf16)")),
        }
    }
}

/// The Jinja chat template equivalent to `chat::ChatRenderer` (baton-chat v1).
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}";

/// Writes `checkpoint` to `to` as a Hugging Face model directory: `config.json`,
/// `model.safetensors` (f32 or bf16), `generation_config.json`, `tokenizer.json`,
/// `tokenizer_config.json`, `special_tokens_map.json`. Refuses a non-empty
/// `to` unless `force`. Written to `<to>.partial` and renamed into place.
pub fn export(
    checkpoint: &Checkpoint,
    to: &Path,
    dtype: ExportDtype,
    force: bool,
) -> Result<PathBuf, CheckpointError> {
    let io = |path: &Path, e: &dyn std::fmt::Display| CheckpointError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    if to.exists()
        && fs::read_dir(to)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
        && !force
    {
        return Err(io(
            to,
            &"already exists and is not empty (pass --force to replace it)",
        ));
    }
    let work = checkpoint::partial_dir(to);
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(|e| io(&work, &e))?;

    let tokenizer = checkpoint.tokenizer()?;
    let special = tokenizer.special;
    let mut config = checkpoint::hf_config(&checkpoint.manifest.model, &special);
    config["torch_dtype"] = match dtype {
        ExportDtype::F32 => "float32",
        ExportDtype::Bf16 => "bfloat16",
    }
    .into();
    let chat = checkpoint.manifest.chat_template.is_some();
    if chat {
        // A chat model's turns end with <|end|>.
        config["eos_token_id"] = special.end.into();
    }
    let write_json = |name: &str, value: &serde_json::Value| {
        let path = work.join(name);
        let text = serde_json::to_string_pretty(value).map_err(|e| io(&path, &e))?;
        checkpoint::write_atomic(&path, text.as_bytes())
    };
    write_json("config.json", &config)?;
    write_json(
        "generation_config.json",
        &serde_json::json!({
            "bos_token_id": special.bos,
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": special.pad,
        }),
    )?;

    let weights_path = checkpoint.dir.join(checkpoint::MODEL_FILE);
    let tensors = checkpoint::read_safetensors(&weights_path)?;
    let bytes =
        safetensors_with_dtype(&tensors, dtype).map_err(|reason| CheckpointError::Weights {
            path: weights_path.clone(),
            reason,
        })?;
    checkpoint::write_atomic(&work.join("model.safetensors"), &bytes)?;

    let tokenizer_src = checkpoint.dir.join(checkpoint::TOKENIZER_FILE);
    fs::copy(&tokenizer_src, work.join("tokenizer.json")).map_err(|e| io(&tokenizer_src, &e))?;
    let eos = if chat { "<|end|>" } else { "<|eos|>" };
    let mut tokenizer_config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": eos,
        "pad_token": "<|pad|>",
        "add_bos_token": false,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": checkpoint.manifest.model.max_seq_len,
        "additional_special_tokens": SPECIAL_TOKENS[3..].to_vec(),
    });
    if chat {
        tokenizer_config["chat_template"] = CHAT_TEMPLATE.into();
    }
    write_json("tokenizer_config.json", &tokenizer_config)?;
    write_json(
        "special_tokens_map.json",
        &serde_json::json!({
            "bos_token": "<|bos|>",
            "eos_token": eos,
            "pad_token": "<|pad|>",
            "additional_special_tokens": SPECIAL_TOKENS[3..].to_vec(),
        }),
    )?;
    if to.exists() {
        fs::remove_dir_all(to).map_err(|e| io(to, &e))?;
    }
    fs::rename(&work, to).map_err(|e| io(to, &e))?;
    Ok(to.to_path_buf())
}

/// Safetensors bytes with every tensor stored as `dtype` (sorted names).
pub fn safetensors_with_dtype(
    tensors: &HashMap<String, TensorData>,
    dtype: ExportDtype,
) -> Result<Vec<u8>, String> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = names
        .into_iter()
        .map(|name| {
            let data = &tensors[name];
            let values: Vec<f32> = data.to_vec().map_err(|e| format!("{name}: {e:?}"))?;
            let bytes = match dtype {
                ExportDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ExportDtype::Bf16 => values
                    .iter()
                    .flat_map(|&v| f32_to_bf16(v).to_le_bytes())
                    .collect(),
            };
            Ok((name.clone(), data.shape.to_vec(), bytes))
        })
        .collect::<Result<_, String>>()?;
    let st_dtype = match dtype {
        ExportDtype::F32 => Dtype::F32,
        ExportDtype::Bf16 => Dtype::BF16,
    };
    let views: Vec<(String, TensorView<'_>)> = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(st_dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| format!("{name}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())
}

/// f32 → bf16, rounding to nearest even (NaN stays NaN).
pub fn f32_to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    ((bits + rounding) >> 16) as u16
}

/// The prompt's token ids (`<|bos|>` then the text) and the model's f32 logits
/// at every position, `[len][vocab]`.
pub fn prompt_logits<B: Backend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    prompt: &str,
    device: &B::Device,
) -> Result<(Vec<u32>, Vec<Vec<f32>>), String> {
    let mut ids = vec![tokenizer.special.bos];
    ids.extend(tokenizer.encode(prompt).map_err(|e| e.to_string())?);
    if ids.len() > model.max_seq_len() {
        return Err(format!(
            "the prompt is {} tokens; the model's context is {}",
            ids.len(),
            model.max_seq_len()
        ));
    }
    Ok((ids.clone(), logits_of(model, &ids, device)))
}

/// Logits `[len][vocab]` of one sequence of ids.
pub fn logits_of<B: Backend>(model: &Llama<B>, ids: &[u32], device: &B::Device) -> Vec<Vec<f32>> {
    let logits: Tensor<B, 3> = model.forward(int_tensor::<B>(ids, 1, ids.len(), device));
    let [_, seq, vocab] = logits.dims();
    let flat: Vec<f32> = logits.into_data().to_vec().unwrap_or_default();
    (0..seq)
        .map(|i| flat[i * vocab..(i + 1) * vocab].to_vec())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Inner;
    use crate::model::ModelConfig;

    /// The model behind `tests/golden/tiny-logits.json`: weights from a seeded
    /// init (the same on every machine), exported with `BATON_WRITE_GOLDEN`.
    fn tiny() -> ModelConfig {
        ModelConfig {
            vocab_size: 64,
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            d_ff: 48,
            max_seq_len: 32,
            tie_embeddings: false,
            ..ModelConfig::default()
        }
    }

    const IDS: [u32; 12] = [0, 17, 5, 33, 63, 2, 8, 8, 41, 12, 29, 50];

    #[test]
    fn logits_match_transformers_on_the_golden_model() {
        let device = Default::default();
        let model = tiny().init::<Inner>(2024, &device);
        let golden_path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/tiny-logits.json");
        if let Ok(dir) = std::env::var("BATON_WRITE_GOLDEN") {
            // Regenerate: export the weights for scripts/parity.py to score.
            let dir = PathBuf::from(dir);
            fs::create_dir_all(&dir).unwrap();
            let tensors: HashMap<String, TensorData> =
                checkpoint::named_tensors(&model).into_iter().collect();
            fs::write(
                dir.join("model.safetensors"),
                safetensors_with_dtype(&tensors, ExportDtype::F32).unwrap(),
            )
            .unwrap();
            let special = crate::tokenizer::SpecialIds {
                bos: 0,
                eos: 1,
                pad: 2,
                system: 3,
                user: 4,
                assistant: 5,
                end: 6,
            };
            fs::write(
                dir.join("config.json"),
                serde_json::to_string_pretty(&checkpoint::hf_config(&tiny(), &special)).unwrap(),
            )
            .unwrap();
            fs::write(dir.join("ids.json"), serde_json::to_string(&IDS).unwrap()).unwrap();
            return;
        }
        let golden: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&golden_path).unwrap()).unwrap();
        let ids: Vec<u32> = serde_json::from_value(golden["ids"].clone()).unwrap();
        assert_eq!(ids, IDS);
        let want: Vec<Vec<f32>> = serde_json::from_value(golden["logits"].clone()).unwrap();
        let got = logits_of(&model, &ids, &device);
        assert_eq!((got.len(), got[0].len()), (want.len(), want[0].len()));
        let max_diff = got
            .iter()
            .flatten()
            .zip(want.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            max_diff <= 1e-4,
            "max |Δlogit| vs transformers = {max_diff}"
        );
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between two bf16 values: rounds to the even one (1.0).
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway too: rounds up to the even 1 + 2^-6.
        assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(f32::from_bits((f32_to_bf16(-2.5) as u32) << 16), -2.5);
    }
}
