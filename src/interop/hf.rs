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

use baton_core::burn::tensor::backend::Backend;
use baton_core::burn::tensor::{Tensor, TensorData};

use baton_core::checkpoint::{self, Checkpoint, CheckpointError};
use baton_core::model::{Llama, ModelConfig};
use baton_core::tokenizer::{ChatFormat, SPECIAL_TOKENS, Tokenizer};
use baton_core::train::int_tensor;

/// Floating-point type of exported weights.
pub use baton_core::checkpoint::WeightDtype as ExportDtype;

/// The Jinja chat template equivalent to `chat::ChatRenderer` with ChatML
/// tokens (chatml v1; the renderer leaves off the final `\n`, which changes no
/// generation prompt).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The Jinja chat template equivalent to `chat::ChatRenderer` (baton-chat v1).
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}";

/// The files an export writes; a directory holding only these (and at least
/// `config.json` and `model.safetensors`) is one `--force` may replace.
pub const EXPORT_FILES: [&str; 6] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
];

fn is_export_dir(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    let names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.iter().any(|n| n == "config.json")
        && names.iter().any(|n| n == "model.safetensors")
        && names
            .iter()
            .all(|n| EXPORT_FILES.contains(&n.as_str()) || n == ADAPTER_DIR || n.starts_with('.'))
}

/// Where `export --adapter-only` puts the PEFT adapter, inside the export of
/// its base.
pub const ADAPTER_DIR: &str = "adapter";

/// What an export may replace (with `--force`): an earlier export.
pub const EXPORT_OUTPUT: baton_core::files::OutputKind = baton_core::files::OutputKind {
    noun: "export (a directory of only the files an export writes)",
    is_ours: is_export_dir,
    resumable: false,
};

/// Writes `checkpoint` to `to` as a Hugging Face model directory: `config.json`,
/// `model.safetensors` (f32 or bf16), `generation_config.json`, `tokenizer.json`,
/// `tokenizer_config.json`, `special_tokens_map.json`. Replaces only an
/// earlier export (with `force`) or an empty directory. Written to
/// `<to>.partial` (locked) and swapped into place.
pub fn export(
    checkpoint: &Checkpoint,
    to: &Path,
    dtype: ExportDtype,
    force: bool,
) -> Result<PathBuf, CheckpointError> {
    export_as(checkpoint, to, dtype, force, false)
}

/// [`export`]; with `adapter_only` (a checkpoint holding a LoRA adapter),
/// the directory holds the base model's weights (not merged) and the PEFT
/// adapter in `adapter/` (`adapter_model.safetensors`, `adapter_config.json`),
/// which `PeftModel.from_pretrained(base, "<to>/adapter")` loads.
pub fn export_as(
    checkpoint: &Checkpoint,
    to: &Path,
    dtype: ExportDtype,
    force: bool,
    adapter_only: bool,
) -> Result<PathBuf, CheckpointError> {
    checkpoint.require_unmasked("an export")?;
    if let Some(moe) = &checkpoint.manifest.model.moe
        && moe.every > 1
    {
        return Err(CheckpointError::Io {
            path: checkpoint.dir.clone(),
            reason: format!(
                "an export to Hugging Face needs every layer sparse (Mixtral), but model.moe.every = {}",
                moe.every
            ),
        });
    }
    let base = match checkpoint.adapter_base()? {
        Some(base) => Some(base),
        None if adapter_only => {
            return Err(CheckpointError::Io {
                path: checkpoint.dir.clone(),
                reason: "--adapter-only: this checkpoint holds no LoRA adapter".into(),
            });
        }
        None => None,
    };
    let io = |path: &Path, e: &dyn std::fmt::Display| CheckpointError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let out = baton_core::files::OutputDir::open(
        to,
        EXPORT_OUTPUT,
        baton_core::files::Mode::Fresh { force },
        &[&checkpoint.dir],
    )?;
    let work = out.work.clone();

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
        // A chat model's turns end with the end-of-turn token.
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
    let tensors = match &base {
        Some(base) if adapter_only => base.weights()?,
        _ => checkpoint.weights()?,
    };
    let bytes =
        checkpoint::safetensors_bytes(&tensors, dtype).map_err(|e| CheckpointError::Weights {
            path: weights_path.clone(),
            reason: e.0,
        })?;
    checkpoint::write_atomic(&work.join("model.safetensors"), &bytes)?;

    let tokenizer_src = checkpoint.dir.join(checkpoint::TOKENIZER_FILE);
    fs::copy(&tokenizer_src, work.join("tokenizer.json")).map_err(|e| io(&tokenizer_src, &e))?;
    let names = tokenizer.special_names();
    let eos = if chat { &names.end } else { &names.eos };
    let (template, additional) = match tokenizer.chat.format {
        ChatFormat::Baton => (CHAT_TEMPLATE, SPECIAL_TOKENS[3..].to_vec()),
        ChatFormat::ChatMl => (CHATML_TEMPLATE, vec!["<|im_start|>", "<|im_end|>"]),
    };
    let mut tokenizer_config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names.bos,
        "eos_token": eos,
        "pad_token": names.pad,
        "add_bos_token": false,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": checkpoint.manifest.model.max_seq_len,
        "additional_special_tokens": additional,
    });
    if chat {
        tokenizer_config["chat_template"] = template.into();
    }
    write_json("tokenizer_config.json", &tokenizer_config)?;
    write_json(
        "special_tokens_map.json",
        &serde_json::json!({
            "bos_token": names.bos,
            "eos_token": eos,
            "pad_token": names.pad,
            "additional_special_tokens": additional,
        }),
    )?;
    if adapter_only {
        let dir = work.join(ADAPTER_DIR);
        fs::create_dir_all(&dir).map_err(|e| io(&dir, &e))?;
        for name in [
            baton_core::lora::ADAPTER_FILE,
            baton_core::lora::ADAPTER_CONFIG_FILE,
        ] {
            let src = checkpoint.dir.join(name);
            fs::copy(&src, dir.join(name)).map_err(|e| io(&src, &e))?;
        }
    }
    Ok(out.commit()?)
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

/// What `baton logits` writes and `scripts/parity.py compare` reads:
/// `{"prompt", "ids": [n], "logits": [n][vocab]}`.
pub fn logits_json(prompt: &str, ids: &[u32], logits: &[Vec<f32>]) -> serde_json::Value {
    serde_json::json!({"prompt": prompt, "ids": ids, "logits": logits})
}

/// The architecture in a Hugging Face `config.json`, as a Baton model config.
/// Anything Baton's decoder does not implement is refused by name.
pub fn model_config_from_hf(path: &Path) -> anyhow::Result<ModelConfig> {
    use anyhow::bail;
    let text = baton_core::files::read_text(path, "config.json", baton_core::files::cap::JSON)?;
    let c: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", path.display()))?;
    let architectures: Vec<String> = c["architectures"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let model_type = c["model_type"].as_str().unwrap_or("");
    let is = |ty: &str, class: &str| model_type == ty || architectures.iter().any(|a| a == class);
    let mixtral = is("mixtral", "MixtralForCausalLM");
    if !mixtral && !is("llama", "LlamaForCausalLM") {
        bail!(
            "{}: unsupported architecture {} (model_type \"{model_type}\"); Baton imports Llama-family models (LlamaForCausalLM) and Mixtral (MixtralForCausalLM)",
            path.display(),
            if architectures.is_empty() {
                "(none)".to_string()
            } else {
                architectures.join(", ")
            }
        );
    }
    let field = |name: &str| -> anyhow::Result<usize> {
        c[name]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| anyhow::anyhow!("{}: missing or non-integer \"{name}\"", path.display()))
    };
    let n_heads = field("num_attention_heads")?;
    let config = ModelConfig {
        vocab_size: field("vocab_size")?,
        d_model: field("hidden_size")?,
        n_layers: field("num_hidden_layers")?,
        n_heads,
        n_kv_heads: c["num_key_value_heads"]
            .as_u64()
            .map_or(n_heads, |v| v as usize),
        d_ff: field("intermediate_size")?,
        max_seq_len: field("max_position_embeddings")?,
        rope_theta: c["rope_theta"].as_f64().unwrap_or(10_000.0),
        norm_eps: c["rms_norm_eps"].as_f64().unwrap_or(1e-6),
        tie_embeddings: c["tie_word_embeddings"].as_bool().unwrap_or(false),
        moe: if mixtral {
            Some(baton_core::moe::MoeConfig {
                experts: field("num_local_experts")?,
                top_k: field("num_experts_per_tok")?,
                every: 1,
            })
        } else {
            None
        },
    };
    if mixtral
        && let Some(window) = c["sliding_window"].as_u64()
        && (window as usize) < config.max_seq_len
    {
        bail!(
            "{}: unsupported sliding_window = {window} (Baton's attention sees the whole context of {})",
            path.display(),
            config.max_seq_len
        );
    }
    let unsupported = [
        ("rope_scaling", !c["rope_scaling"].is_null()),
        (
            "attention_bias",
            c["attention_bias"].as_bool() == Some(true),
        ),
        ("mlp_bias", c["mlp_bias"].as_bool() == Some(true)),
        (
            "hidden_act",
            c["hidden_act"].as_str().is_some_and(|a| a != "silu"),
        ),
        (
            "head_dim",
            c["head_dim"]
                .as_u64()
                .is_some_and(|h| h as usize * n_heads != config.d_model),
        ),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, bad)| *bad) {
        bail!(
            "{}: unsupported {name} = {} (Baton's decoder has plain RoPE, no biases, SiLU, head_dim = hidden_size / heads)",
            path.display(),
            c[*name]
        );
    }
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(config)
}

/// Every tensor of an HF model directory: `model.safetensors`, or the shards
/// named by `model.safetensors.index.json`. f32, bf16 and f16 are read as f32.
pub fn read_hf_weights(dir: &Path) -> anyhow::Result<HashMap<String, TensorData>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        let text =
            baton_core::files::read_text(&index, "shard index", baton_core::files::cap::JSON)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", index.display()))?;
        let map = v["weight_map"]
            .as_object()
            .ok_or_else(|| anyhow::anyhow!("{}: no weight_map", index.display()))?;
        let mut shards: Vec<String> = map
            .values()
            .filter_map(|s| s.as_str().map(String::from))
            .collect();
        shards.sort();
        shards.dedup();
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else if single.exists() {
        vec![single]
    } else {
        anyhow::bail!(
            "{}: no model.safetensors or model.safetensors.index.json",
            dir.display()
        );
    };
    let mut tensors = HashMap::new();
    for file in files {
        tensors.extend(checkpoint::read_safetensors(&file)?);
    }
    Ok(tensors)
}

/// Imports a Hugging Face Llama-family model directory as a `pretrain`
/// checkpoint that `sft` and `align` accept. The tokenizer must carry Baton's
/// reserved special tokens or ChatML's (the chat renderer maps either); the
/// manifest records the sha256 of every file read.
pub fn import_hf(dir: &Path, out: &Path, force: bool) -> anyhow::Result<PathBuf> {
    checkpoint::StageDir::check(out, false, force, &[dir])?;
    let config_path = dir.join(checkpoint::CONFIG_FILE);
    if !config_path.exists() {
        anyhow::bail!(
            "{}: no config.json: not a Hugging Face model directory",
            dir.display()
        );
    }
    let config = model_config_from_hf(&config_path)?;
    let tokenizer_path = dir.join(checkpoint::TOKENIZER_FILE);
    let tokenizer_json = baton_core::files::read_text(
        &tokenizer_path,
        "tokenizer",
        baton_core::files::cap::TOKENIZER,
    )?;
    let mut tensors = read_hf_weights(dir)?;
    if config.tie_embeddings {
        // Tied checkpoints often store the head too; it is the embedding.
        tensors.remove("lm_head.weight");
    }
    let mut sources: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(".json") || n.ends_with(".safetensors"))
        })
        .collect();
    sources.sort();
    let imported = Imported {
        origin: dir,
        kind: HF_IMPORT,
        config,
        tensors,
        tokenizer_json,
        sources,
    };
    imported.write(out, force)
}

/// How an import's manifest names its sources (`"<kind> <path>"`), so later
/// stages can tell an imported parent.
pub use baton_core::checkpoint::{GGUF_IMPORT, HF_IMPORT, is_imported};

/// A model read from another format, ready to be written as a checkpoint.
pub struct Imported<'a> {
    /// The directory or file imported (named in errors).
    pub origin: &'a Path,
    /// How the manifest's data entries name the source ([`HF_IMPORT`], [`GGUF_IMPORT`]).
    pub kind: &'a str,
    pub config: ModelConfig,
    /// Every weight under Baton's (HF Llama) names, f32.
    pub tensors: HashMap<String, TensorData>,
    pub tokenizer_json: String,
    /// Files read, recorded with their sha256 in the manifest.
    pub sources: Vec<PathBuf>,
}

impl Imported<'_> {
    /// Checks the tokenizer and every tensor against the config, then writes a
    /// `pretrain` checkpoint at `out` (refusing a finished one unless `force`).
    pub fn write(self, out: &Path, force: bool) -> anyhow::Result<PathBuf> {
        use baton_core::checkpoint::{DataRef, Manifest, StageDir};
        let origin = self.origin.display().to_string();
        let tokenizer = Tokenizer::from_json(&self.tokenizer_json, &origin)?;
        let config = self.config;
        if tokenizer.vocab_size() > config.vocab_size {
            anyhow::bail!(
                "{origin}: the tokenizer has {} tokens but the model's vocab_size is {}",
                tokenizer.vocab_size(),
                config.vocab_size
            );
        }
        let device = Default::default();
        let model = checkpoint::model_from_tensors::<baton_core::backend::Inner>(
            &config,
            self.tensors,
            &device,
        )
        .map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;

        let stage = StageDir::open(out, false, force, &[self.origin])?;
        let tokenizer_path = stage.path(checkpoint::TOKENIZER_FILE);
        checkpoint::write_atomic(&tokenizer_path, self.tokenizer_json.as_bytes())?;
        stage.write_model(&model, &config, &tokenizer.special)?;
        let mut data = Vec::new();
        for path in &self.sources {
            data.push(DataRef {
                source: format!("{} {}", self.kind, path.display()),
                sha256: checkpoint::sha256_file(path)?,
                bytes: fs::metadata(path)?.len(),
                tokens: 0,
            });
        }
        let train = super::import_train_config(&config);
        let manifest = Manifest {
            format_version: checkpoint::FORMAT_VERSION,
            stage: super::IMPORT_KIND.name.into(),
            baton_version: baton_core::VERSION.to_string(),
            created_at: baton_core::now_rfc3339(),
            model: config,
            tokenizer_sha256: checkpoint::sha256_file(&tokenizer_path)?,
            chat_template: None,
            parents: Vec::new(),
            data,
            train: serde_json::to_value(&train)?,
            step: 0,
            tokens_seen: 0,
            metrics: Default::default(),
            files: Default::default(),
            trained: None,
            adapter: None,
        };
        Ok(stage.commit(manifest)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::backend::Inner;
    use baton_core::model::ModelConfig;

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

    /// The seeded tiny model with RMSNorm gains away from one (1 + 0.3·sin),
    /// so transformers' norm application is checked, not just its shape.
    fn golden_model() -> baton_core::model::Llama<Inner> {
        golden_model_of(&tiny())
    }

    /// [`golden_model`] of any config. A router's weights are scaled up
    /// (std 1.6) so no token's top-k choice is a near tie that rounding
    /// could flip between implementations.
    fn golden_model_of(config: &ModelConfig) -> baton_core::model::Llama<Inner> {
        let device = &Default::default();
        let mut tensors: HashMap<String, TensorData> =
            checkpoint::named_tensors(&config.init::<Inner>(2024, device))
                .into_iter()
                .collect();
        for (name, data) in tensors.iter_mut() {
            if name.ends_with("norm.weight") {
                let n = data.shape[0];
                let gains: Vec<f32> = (0..n)
                    .map(|i| 1.0 + 0.3 * ((i + name.len()) as f32).sin())
                    .collect();
                *data = TensorData::new(gains, [n]);
            }
            if name.ends_with("block_sparse_moe.gate.weight") {
                let v: Vec<f32> = data.to_vec().unwrap();
                let v: Vec<f32> = v.iter().map(|x| x * 80.0).collect();
                *data = TensorData::new(v, data.shape.clone());
            }
        }
        checkpoint::model_from_tensors(config, tensors, device).unwrap()
    }

    /// The tiny model with every layer sparse: 4 experts, top 2.
    fn tiny_moe() -> ModelConfig {
        ModelConfig {
            moe: Some(baton_core::moe::MoeConfig {
                experts: 4,
                top_k: 2,
                every: 1,
            }),
            ..tiny()
        }
    }

    /// Writes `model` as an HF model directory (weights and config.json).
    fn write_hf_dir(model: &baton_core::model::Llama<Inner>, dir: &Path) {
        write_hf_dir_of(model, &tiny(), dir)
    }

    fn write_hf_dir_of(model: &baton_core::model::Llama<Inner>, config: &ModelConfig, dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        let tensors: HashMap<String, TensorData> =
            checkpoint::named_tensors(model).into_iter().collect();
        fs::write(
            dir.join("model.safetensors"),
            checkpoint::safetensors_bytes(&tensors, ExportDtype::F32).unwrap(),
        )
        .unwrap();
        let special = baton_core::tokenizer::SpecialIds {
            bos: 0,
            eos: 1,
            pad: 2,
            end: 6,
        };
        fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&checkpoint::hf_config(config, &special)).unwrap(),
        )
        .unwrap();
    }

    /// The golden model, written as an HF directory and read back through the
    /// import path (config.json and safetensors in HF layout), gives
    /// transformers' logits on the same files (`tests/golden/tiny-logits.json`).
    #[test]
    fn logits_match_transformers_on_the_golden_model() {
        golden_round_trip(&tiny(), "tiny-logits.json", "BATON_WRITE_GOLDEN");
    }

    /// The same for a Mixtral-style model (`tests/golden/moe-logits.json`):
    /// the export's names and config are what `MixtralForCausalLM` loads, and
    /// its routing (softmax, top-2, renormalised gates) is transformers'.
    #[test]
    fn moe_logits_match_transformers_mixtral_on_the_golden_model() {
        golden_round_trip(&tiny_moe(), "moe-logits.json", "BATON_WRITE_GOLDEN_MOE");
    }

    fn golden_round_trip(want_config: &ModelConfig, golden: &str, env: &str) {
        let device = Default::default();
        let model = golden_model_of(want_config);
        let golden_path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(golden);
        if let Ok(dir) = std::env::var(env) {
            // Regenerate: write the files for scripts/parity.py to score.
            let dir = PathBuf::from(dir);
            write_hf_dir_of(&model, want_config, &dir);
            fs::write(dir.join("ids.json"), serde_json::to_string(&IDS).unwrap()).unwrap();
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        write_hf_dir_of(&model, want_config, tmp.path());
        let config = model_config_from_hf(&tmp.path().join("config.json")).unwrap();
        assert_eq!(&config, want_config);
        let tensors = read_hf_weights(tmp.path()).unwrap();
        let imported = checkpoint::model_from_tensors::<Inner>(&config, tensors, &device).unwrap();

        let golden: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&golden_path).unwrap()).unwrap();
        let ids: Vec<u32> = serde_json::from_value(golden["ids"].clone()).unwrap();
        assert_eq!(ids, IDS);
        let want: Vec<Vec<f32>> = serde_json::from_value(golden["logits"].clone()).unwrap();
        let got = logits_of(&imported, &ids, &device);
        assert_eq!((got.len(), got[0].len()), (want.len(), want[0].len()));
        let max_diff = got
            .iter()
            .flatten()
            .zip(want.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{}: max |Δlogit| vs transformers = {max_diff}",
            golden_path.display()
        );
        assert!(
            max_diff <= 1e-4,
            "max |Δlogit| vs transformers = {max_diff}"
        );
        assert_eq!(
            got,
            logits_of(&model, &ids, &device),
            "the HF round trip is exact"
        );
    }

    /// The golden model with a rank-4 adapter on every linear map (`B` set
    /// away from zero), as `export --adapter-only` writes it: transformers +
    /// peft's logits for the base and the adapter directory are
    /// `tests/golden/lora-logits.json`.
    #[test]
    fn lora_logits_match_transformers_and_peft_on_the_golden_model() {
        use baton_core::lora;
        let device = Default::default();
        let base = golden_model();
        let spec = lora::AdapterSpec {
            rank: 4,
            alpha: 8.0,
            targets: lora::TARGETS.iter().map(|t| t.to_string()).collect(),
            dropout: 0.0,
        };
        let attached = lora::attach(base.clone(), &spec, 5, &device);
        let mut tensors: HashMap<String, TensorData> =
            lora::adapter_tensors(&attached).into_iter().collect();
        for (name, data) in tensors.iter_mut() {
            if name.ends_with("lora_B.weight") {
                let n = data.shape.iter().product::<usize>();
                let v: Vec<f32> = (0..n)
                    .map(|i| ((i * 37 + name.len()) % 23) as f32 * 0.01 - 0.11)
                    .collect();
                *data = TensorData::new(v, data.shape.clone());
            }
        }
        let adapted = lora::load_adapter(attached, tensors.clone(), &device).unwrap();
        if let Ok(dir) = std::env::var("BATON_WRITE_GOLDEN_LORA") {
            let dir = PathBuf::from(dir);
            write_hf_dir(&base, &dir);
            let adapter = dir.join(ADAPTER_DIR);
            fs::create_dir_all(&adapter).unwrap();
            let named: Vec<(String, TensorData)> = tensors.into_iter().collect();
            fs::write(
                adapter.join(lora::ADAPTER_FILE),
                checkpoint::safetensors_bytes(named.iter().map(|(n, d)| (n, d)), ExportDtype::F32)
                    .unwrap(),
            )
            .unwrap();
            fs::write(
                adapter.join(lora::ADAPTER_CONFIG_FILE),
                serde_json::to_string_pretty(&lora::peft_config(&spec, "..")).unwrap(),
            )
            .unwrap();
            fs::write(dir.join("ids.json"), serde_json::to_string(&IDS).unwrap()).unwrap();
            return;
        }
        let golden_path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/lora-logits.json");
        let golden: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&golden_path).unwrap()).unwrap();
        let ids: Vec<u32> = serde_json::from_value(golden["ids"].clone()).unwrap();
        let want: Vec<Vec<f32>> = serde_json::from_value(golden["logits"].clone()).unwrap();
        let max_diff = |got: &[Vec<f32>]| {
            got.iter()
                .flatten()
                .zip(want.iter().flatten())
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
        };
        let unmerged = max_diff(&logits_of(&adapted, &ids, &device));
        let merged = max_diff(&logits_of(&lora::merge(adapted), &ids, &device));
        let without = max_diff(&logits_of(&base, &ids, &device));
        eprintln!(
            "LoRA vs transformers + peft: max |Δlogit| {unmerged} (adapter), {merged} (merged), {without} (base alone)"
        );
        assert!(
            unmerged <= 1e-4,
            "adapter vs peft: max |Δlogit| = {unmerged}"
        );
        assert!(merged <= 1e-4, "merged vs peft: max |Δlogit| = {merged}");
        assert!(without > 1e-2, "the adapter must matter ({without})");
    }
}
