//! LoRA: low-rank adapters on the linear maps of a frozen base model.
//!
//! `[lora] rank, alpha, dropout, targets` attaches to every targeted linear
//! map `W` (`[in, out]`) an update `(alpha / rank) · A·B` with `A`
//! (`[in, rank]`) drawn as PEFT draws `lora_A` (Kaiming-uniform, bound
//! `1/√in`) and `B` (`[rank, out]`) zero, so the adapted model starts equal
//! to the base. Only the adapters train (`train::freeze` freezes the rest).
//!
//! A stage that trains an adapter writes it as PEFT does:
//! `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight`
//! `[rank, in]` and `lora_B.weight` `[out, rank]`) and `adapter_config.json`,
//! and refers to its base checkpoint by path and manifest hash instead of
//! copying the base weights.

use std::collections::HashMap;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::WeightsError;
use crate::model::{Linear, Llama, LoraAdapter, ModelConfig, transpose};

/// The linear maps an adapter can target (PEFT's `target_modules` names).
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// PEFT's adapter files, as a checkpoint holds them.
pub const ADAPTER_FILE: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";

/// `[lora]` in a stage config. Off unless `rank` is set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// The adapters' rank; absent = no LoRA.
    pub rank: Option<usize>,
    /// Scale numerator: the update is `alpha / rank · A·B`.
    pub alpha: f64,
    /// Dropout on the adapters' input while training, in [0, 1).
    pub dropout: f64,
    /// Which linear maps get adapters.
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: None,
            alpha: 16.0,
            dropout: 0.0,
            targets: TARGETS.iter().map(|t| t.to_string()).collect(),
        }
    }
}

/// What an adapter is: its shape and scale, without the weights (recorded in
/// a manifest and in `adapter_config.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterSpec {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    /// Dropout on the adapters' input while training.
    #[serde(default)]
    pub dropout: f64,
}

impl AdapterSpec {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

impl LoraConfig {
    /// The adapter this config asks for on `model`, or `None` when LoRA is
    /// off; bad values are refused with the key named.
    pub fn spec(&self, model: &ModelConfig) -> Result<Option<AdapterSpec>, String> {
        let Some(rank) = self.rank else {
            return Ok(None);
        };
        if rank == 0 {
            return Err("lora.rank must be at least 1 (leave it out for no LoRA)".into());
        }
        if model.moe.is_some() {
            return Err(
                "[lora] is not supported on a mixture-of-experts model (its experts have no PEFT names); train it in full or freeze parts with train.freeze".into(),
            );
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err("lora.alpha must be a positive finite number".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err("lora.dropout must be in [0, 1)".into());
        }
        if self.targets.is_empty() {
            return Err(format!(
                "lora.targets is empty; name some of {}",
                TARGETS.join(", ")
            ));
        }
        let mut targets: Vec<String> = Vec::new();
        for t in &self.targets {
            if !TARGETS.contains(&t.as_str()) {
                return Err(format!(
                    "lora.targets: no layer of this model is called \"{t}\" (its linear maps are {})",
                    TARGETS.join(", ")
                ));
            }
            if !targets.contains(t) {
                targets.push(t.clone());
            }
        }
        for t in &targets {
            let (d_in, d_out) = dims_of(model, t);
            if rank > d_in.min(d_out) {
                return Err(format!(
                    "lora.rank {rank} is above the width of {t} ({d_in} → {d_out}): a rank of at most {} is a low-rank update",
                    d_in.min(d_out)
                ));
            }
        }
        Ok(Some(AdapterSpec {
            rank,
            alpha: self.alpha,
            targets,
            dropout: self.dropout,
        }))
    }
}

/// `(in, out)` of the linear map `target` in a model of `config`.
fn dims_of(config: &ModelConfig, target: &str) -> (usize, usize) {
    let (d, ff, kv) = (
        config.d_model,
        config.d_ff,
        config.n_kv_heads * config.head_dim(),
    );
    match target {
        "q_proj" | "o_proj" => (d, d),
        "k_proj" | "v_proj" => (d, kv),
        "gate_proj" | "up_proj" => (d, ff),
        _ => (ff, d),
    }
}

/// Every targeted linear map of `model` with its HF module name
/// (`model.layers.3.self_attn.q_proj`), in layer order.
fn targeted<'a, B: Backend>(
    model: &'a mut Llama<B>,
    targets: &[String],
) -> Vec<(String, &'a mut Linear<B>)> {
    let mut out = Vec::new();
    for (i, layer) in model.model.layers.iter_mut().enumerate() {
        let attn = &mut layer.self_attn;
        let mut maps = vec![
            ("self_attn.q_proj", &mut attn.q_proj),
            ("self_attn.k_proj", &mut attn.k_proj),
            ("self_attn.v_proj", &mut attn.v_proj),
            ("self_attn.o_proj", &mut attn.o_proj),
        ];
        // A sparse layer has no dense MLP (MoE models refuse adapters).
        if let Some(mlp) = &mut layer.mlp {
            maps.extend([
                ("mlp.gate_proj", &mut mlp.gate_proj),
                ("mlp.up_proj", &mut mlp.up_proj),
                ("mlp.down_proj", &mut mlp.down_proj),
            ]);
        }
        for (name, linear) in maps {
            let short = name.rsplit('.').next().unwrap_or(name);
            if targets.iter().any(|t| t == short) {
                out.push((format!("model.layers.{i}.{name}"), linear));
            }
        }
    }
    out
}

/// `model` with fresh adapters of `spec` on its targeted maps (`A` from a
/// host RNG seeded by `seed` and the module's position, `B` zero): the same
/// seed gives the same adapters on every backend, and the model's outputs
/// are unchanged.
pub fn attach<B: Backend>(
    mut model: Llama<B>,
    spec: &AdapterSpec,
    seed: u64,
    device: &B::Device,
) -> Llama<B> {
    for (k, (_, linear)) in targeted(&mut model, &spec.targets).into_iter().enumerate() {
        let [d_in, d_out] = linear.weight.dims();
        let mut rng =
            StdRng::seed_from_u64(seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(k as u64 + 1)));
        let bound = 1.0 / (d_in as f64).sqrt();
        let a: Vec<f32> = (0..d_in * spec.rank)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        linear.lora = Some(LoraAdapter {
            a: Param::from_data(TensorData::new(a, [d_in, spec.rank]), device),
            b: Param::from_tensor(Tensor::zeros([spec.rank, d_out], device)),
            scale: spec.scale(),
            dropout: spec.dropout,
        });
    }
    model
}

/// `model` with every adapter folded into its weight (`W + scale·A·B`) and
/// removed.
pub fn merge<B: Backend>(mut model: Llama<B>) -> Llama<B> {
    for (_, linear) in targeted(&mut model, &TARGETS.map(String::from)) {
        if linear.lora.is_some() {
            let merged = linear.effective_weight().detach();
            *linear = Linear::new(Param::from_tensor(merged));
        }
    }
    model
}

/// The prefix PEFT gives every tensor of an adapter file.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// The PEFT tensor names of a module's adapter.
fn peft_names(module: &str) -> [String; 2] {
    [
        format!("{PEFT_PREFIX}{module}.lora_A.weight"),
        format!("{PEFT_PREFIX}{module}.lora_B.weight"),
    ]
}

/// Splits an adapter file's tensors into whole base tensors saved beside
/// the adapter (`modules_to_save`, under their HF names and layout) and the
/// adapter's own `lora_A`/`lora_B` (under their PEFT names).
pub fn split_saved(
    tensors: HashMap<String, TensorData>,
) -> (HashMap<String, TensorData>, HashMap<String, TensorData>) {
    let (lora, saved): (HashMap<_, _>, HashMap<_, _>) =
        tensors.into_iter().partition(|(name, _)| {
            name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight")
        });
    let saved = saved
        .into_iter()
        .map(|(name, data)| {
            (
                name.strip_prefix(PEFT_PREFIX).unwrap_or(&name).to_string(),
                data,
            )
        })
        .collect();
    (saved, lora)
}

/// The adapters of `model` under PEFT's names and layouts.
pub fn adapter_tensors<B: Backend>(model: &Llama<B>) -> Vec<(String, TensorData)> {
    let mut model = model.clone();
    let mut out = Vec::new();
    for (module, linear) in targeted(&mut model, &TARGETS.map(String::from)) {
        if let Some(l) = &linear.lora {
            let [a, b] = peft_names(&module);
            out.push((a, transpose(&l.a.val().into_data().convert::<f32>())));
            out.push((b, transpose(&l.b.val().into_data().convert::<f32>())));
        }
    }
    out
}

/// Loads adapter weights saved by [`adapter_tensors`] into a model that
/// has adapters of `spec` attached; every tensor must be there with its
/// shape and none left over.
pub fn load_adapter<B: Backend>(
    mut model: Llama<B>,
    mut tensors: HashMap<String, TensorData>,
    device: &B::Device,
) -> Result<Llama<B>, WeightsError> {
    let mut errors = Vec::new();
    for (module, linear) in targeted(&mut model, &TARGETS.map(String::from)) {
        let Some(l) = &mut linear.lora else { continue };
        let [a_name, b_name] = peft_names(&module);
        for (name, param) in [(a_name, &mut l.a), (b_name, &mut l.b)] {
            let Some(data) = tensors.remove(&name) else {
                errors.push(format!("tensor {name} is missing"));
                continue;
            };
            let want = param.dims();
            if data.shape.len() != 2 || [data.shape[1], data.shape[0]] != want {
                errors.push(format!(
                    "tensor {name} has shape {:?}, expected {:?}",
                    data.shape.as_slice(),
                    [want[1], want[0]]
                ));
                continue;
            }
            let require_grad = param.is_require_grad();
            *param = Param::from_tensor(
                Tensor::from_data(transpose(&data), device).set_require_grad(require_grad),
            );
        }
    }
    let mut extra: Vec<&String> = tensors.keys().collect();
    extra.sort();
    errors.extend(extra.into_iter().map(|n| format!("unexpected tensor {n}")));
    if errors.is_empty() {
        Ok(model)
    } else {
        Err(errors.join("; ").into())
    }
}

/// PEFT's `adapter_config.json` for `spec`.
pub fn peft_config(spec: &AdapterSpec, base_name: &str) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": spec.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
    })
}

/// Whether a parameter name (as `train::freeze::param_names` gives it)
/// belongs to an adapter.
pub fn is_adapter_param(name: &str) -> bool {
    name.contains(".lora.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Inner;
    use crate::model::ModelConfig;

    fn config() -> ModelConfig {
        ModelConfig {
            vocab_size: 64,
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            d_ff: 48,
            max_seq_len: 16,
            ..ModelConfig::default()
        }
    }

    fn logits(model: &Llama<Inner>) -> Vec<f32> {
        let ids = Tensor::<Inner, 2, burn::tensor::Int>::from_data(
            TensorData::new(vec![1i64, 5, 9, 3, 7], [1, 5]),
            &Default::default(),
        );
        model.forward(ids).into_data().to_vec().unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn adapters_start_at_zero_merge_exactly_and_round_trip_through_peft_names() {
        let config = config();
        let device = Default::default();
        let base = config.init::<Inner>(3, &device);
        let spec = LoraConfig {
            rank: Some(4),
            ..LoraConfig::default()
        }
        .spec(&config)
        .unwrap()
        .unwrap();
        let attached = attach(base.clone(), &spec, 7, &device);
        assert_eq!(
            logits(&attached),
            logits(&base),
            "B = 0: the base's outputs"
        );
        let names = crate::model::param_names(&attached);
        assert_eq!(
            names.iter().filter(|n| is_adapter_param(n)).count(),
            2 * 7 * 2
        );
        assert!(names.contains(&"model.layers.1.mlp.down_proj.lora.b".to_string()));

        // Give B values, then: forward with adapters == forward of the merge.
        let mut tensors: HashMap<String, TensorData> =
            adapter_tensors(&attached).into_iter().collect();
        for (name, data) in tensors.iter_mut() {
            if name.ends_with("lora_B.weight") {
                let n = data.shape.iter().product::<usize>();
                let v: Vec<f32> = (0..n)
                    .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.01)
                    .collect();
                *data = TensorData::new(v, data.shape.clone());
            }
        }
        assert_eq!(
            tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"]
                .shape
                .as_slice(),
            &[4, 32]
        );
        assert_eq!(
            tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
                .shape
                .as_slice(),
            &[16, 4]
        );
        let loaded = load_adapter(attached, tensors.clone(), &device).unwrap();
        let adapted = logits(&loaded);
        assert!(
            max_diff(&adapted, &logits(&base)) > 1e-3,
            "B ≠ 0 changes outputs"
        );
        let merged = merge(loaded.clone());
        assert!(
            crate::model::param_names(&merged)
                .iter()
                .all(|n| !is_adapter_param(n))
        );
        assert!(max_diff(&adapted, &logits(&merged)) < 1e-5);
        let again: HashMap<String, TensorData> = adapter_tensors(&loaded).into_iter().collect();
        assert_eq!(again.len(), tensors.len());
        for (name, data) in &tensors {
            assert_eq!(
                again[name].to_vec::<f32>().unwrap(),
                data.to_vec::<f32>().unwrap()
            );
        }

        // A file lacking a tensor, or with a wrong shape, is refused by name.
        let mut missing = tensors.clone();
        missing.remove("base_model.model.model.layers.1.mlp.up_proj.lora_A.weight");
        let fresh = attach(base.clone(), &spec, 7, &device);
        let err = load_adapter(fresh.clone(), missing, &device).unwrap_err().0;
        assert!(
            err.contains("layers.1.mlp.up_proj.lora_A.weight is missing"),
            "{err}"
        );
        let mut wrong = tensors;
        wrong.insert(
            "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight".into(),
            TensorData::new(vec![0f32; 8 * 32], [8, 32]),
        );
        let err = load_adapter(fresh, wrong, &device).unwrap_err().0;
        assert!(err.contains("has shape [8, 32], expected [4, 32]"), "{err}");
    }

    /// Dropout acts only inside `with_dropout`, draws the same masks for the
    /// same seed, and different ones for another seed.
    #[test]
    fn adapter_dropout_is_seeded_and_only_on_in_training_passes() {
        let config = config();
        let device = Default::default();
        let spec = LoraConfig {
            rank: Some(4),
            dropout: 0.5,
            ..LoraConfig::default()
        }
        .spec(&config)
        .unwrap()
        .unwrap();
        let attached = attach(config.init::<Inner>(3, &device), &spec, 7, &device);
        // B away from zero so the adapter path shows in the outputs.
        let mut tensors: HashMap<String, TensorData> =
            adapter_tensors(&attached).into_iter().collect();
        for (name, data) in tensors.iter_mut() {
            if name.ends_with("lora_B.weight") {
                let n = data.shape.iter().product::<usize>();
                *data = TensorData::new(vec![0.05f32; n], data.shape.clone());
            }
        }
        let model = load_adapter(attached, tensors, &device).unwrap();
        let plain = logits(&model);
        assert_eq!(plain, logits(&model), "no dropout outside training passes");
        use crate::dropout::{dropout_seed, with_dropout};
        let a = with_dropout(1, || logits(&model));
        let b = with_dropout(1, || logits(&model));
        let c = with_dropout(2, || logits(&model));
        assert_eq!(a, b, "same seed, same masks");
        assert!(max_diff(&a, &plain) > 1e-4 && max_diff(&a, &c) > 1e-4);
        assert_eq!(dropout_seed(), None);
    }

    #[test]
    fn bad_lora_settings_are_refused_by_key() {
        let config = config();
        let spec = |f: &dyn Fn(&mut LoraConfig)| {
            let mut c = LoraConfig {
                rank: Some(4),
                ..LoraConfig::default()
            };
            f(&mut c);
            c.spec(&config)
        };
        assert_eq!(spec(&|c| c.rank = None), Ok(None));
        for (edit, words) in [
            (
                &(|c: &mut LoraConfig| c.rank = Some(0)) as &dyn Fn(&mut LoraConfig),
                "lora.rank must be at least 1",
            ),
            (
                &|c: &mut LoraConfig| c.rank = Some(17),
                "above the width of k_proj (32 → 16)",
            ),
            (
                &|c: &mut LoraConfig| c.targets = vec!["qkv_proj".into()],
                "\"qkv_proj\"",
            ),
            (&|c: &mut LoraConfig| c.alpha = -1.0, "lora.alpha"),
            (&|c: &mut LoraConfig| c.dropout = 1.0, "lora.dropout"),
        ] {
            let err = spec(edit).unwrap_err();
            assert!(err.contains(words), "{err}");
        }
        let only_q = spec(&|c| c.targets = vec!["q_proj".into(), "q_proj".into()])
            .unwrap()
            .unwrap();
        assert_eq!(only_q.targets, ["q_proj"]);
        // q_proj is 32 wide: rank 17 fits there.
        assert!(
            spec(&|c| {
                c.targets = vec!["q_proj".into()];
                c.rank = Some(17)
            })
            .is_ok()
        );
    }
}
