//! Growing a model between stages (`baton grow`): the grown architecture and
//! its weights, with the parent's inside.
//!
//! The grown model keeps the parent's `head_dim`: attention heads are added
//! together with residual width (`d_model = n_heads · head_dim`), and key/value
//! heads follow the parent's grouped-query ratio. New layers go on top. Every
//! new weight is drawn the way a fresh model of the grown size would be
//! ([`ModelConfig::init`], seeded); the parent's weights fill the top-left
//! block of each tensor. With the masks of [`crate::model::Growth`] at 0 the
//! grown model computes the parent's function exactly, whatever those new
//! weights are (the tests check it for every kind of growth).

use std::collections::HashMap;

use burn::tensor::TensorData;

use crate::backend::Inner;
use crate::checkpoint::named_tensors;
use crate::model::{GrowthSpec, ModelConfig};
use crate::moe::MoeConfig;

/// The sizes `baton grow` asks for; `None` keeps the parent's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GrowTo {
    pub layers: Option<usize>,
    pub d_model: Option<usize>,
    pub d_ff: Option<usize>,
    pub heads: Option<usize>,
}

/// The parent's sizes, as the masks of the grown model need them.
pub fn spec_of(parent: &ModelConfig) -> GrowthSpec {
    GrowthSpec {
        layers: parent.n_layers,
        d_model: parent.d_model,
        n_heads: parent.n_heads,
        d_ff: parent.d_ff,
    }
}

/// The grown architecture, checked: no size shrinks, something grows,
/// `head_dim` and the grouped-query ratio are kept. Errors name the flag.
pub fn grown_config(parent: &ModelConfig, to: &GrowTo) -> Result<ModelConfig, String> {
    if parent.moe.is_some() {
        return Err("growing a mixture-of-experts model is not supported (grow the dense model, then upcycle it)".into());
    }
    let not_smaller = |flag: &str, new: Option<usize>, old: usize| -> Result<usize, String> {
        match new {
            Some(n) if n < old => Err(format!(
                "{flag} {n} is smaller than the parent's {old} (growth only adds structure)"
            )),
            Some(n) => Ok(n),
            None => Ok(old),
        }
    };
    let n_layers = not_smaller("--layers", to.layers, parent.n_layers)?;
    let d_ff = not_smaller("--d-ff", to.d_ff, parent.d_ff)?;
    let head_dim = parent.head_dim();
    let (d_model, n_heads) = match (to.d_model, to.heads) {
        (None, None) => (parent.d_model, parent.n_heads),
        (Some(d), Some(h)) => {
            if h == 0 || !d.is_multiple_of(h) {
                return Err(format!("--d-model {d} is not divisible by --heads {h}"));
            }
            if d / h != head_dim {
                return Err(format!(
                    "--d-model {d} with --heads {h} gives head_dim {}, but growth keeps the parent's head_dim {head_dim} (use --d-model {})",
                    d / h,
                    h * head_dim
                ));
            }
            (d, h)
        }
        (Some(d), None) => {
            if !d.is_multiple_of(head_dim) {
                return Err(format!(
                    "--d-model {d} is not divisible by the parent's head_dim {head_dim} (growth adds whole heads)"
                ));
            }
            (d, d / head_dim)
        }
        (None, Some(h)) => (h * head_dim, h),
    };
    not_smaller("--d-model", Some(d_model), parent.d_model)?;
    not_smaller("--heads", Some(n_heads), parent.n_heads)?;
    let group = parent.n_heads / parent.n_kv_heads;
    if !n_heads.is_multiple_of(group) {
        return Err(format!(
            "--heads {n_heads} is not a multiple of the parent's {group} query heads per key/value head"
        ));
    }
    let child = ModelConfig {
        n_layers,
        d_model,
        n_heads,
        n_kv_heads: n_heads / group,
        d_ff,
        ..parent.clone()
    };
    if child == *parent {
        return Err(
            "nothing to grow: give --layers, --d-model, --heads or --d-ff above the parent's"
                .into(),
        );
    }
    child.validate().map_err(|e| e.0)?;
    Ok(child)
}

/// The grown model's tensors (HF names and layout): a fresh model of
/// `child` drawn with `seed`, with each of the parent's tensors copied into
/// the leading block of its namesake (leading rows and columns; a new layer
/// has no namesake and stays fresh).
pub fn grow_tensors(
    child: &ModelConfig,
    parent: &HashMap<String, TensorData>,
    seed: u64,
) -> Result<HashMap<String, TensorData>, String> {
    from_fresh(child, seed, |name, data| match parent.get(name) {
        Some(old) => embed_block(name, old, data),
        None => Ok(data),
    })
}

/// A fresh model of `child` drawn with `seed`, as named tensors (HF names
/// and layout), each passed through `fill(name, fresh)`.
fn from_fresh(
    child: &ModelConfig,
    seed: u64,
    mut fill: impl FnMut(&str, TensorData) -> Result<TensorData, String>,
) -> Result<HashMap<String, TensorData>, String> {
    let fresh = child.init::<Inner>(seed, &Default::default());
    named_tensors(&fresh)
        .into_iter()
        .map(|(name, data)| Ok((name.clone(), fill(&name, data)?)))
        .collect()
}

/// `new` with `old` written over its leading block.
fn embed_block(name: &str, old: &TensorData, new: TensorData) -> Result<TensorData, String> {
    let (old_shape, new_shape) = (old.shape.as_slice().to_vec(), new.shape.as_slice().to_vec());
    let fits =
        old_shape.len() == new_shape.len() && old_shape.iter().zip(&new_shape).all(|(o, n)| o <= n);
    if !fits || !(1..=2).contains(&old_shape.len()) {
        return Err(format!(
            "{name}: shape {old_shape:?} does not fit inside {new_shape:?}"
        ));
    }
    let old_values: Vec<f32> = old.to_vec().map_err(|e| format!("{name}: {e:?}"))?;
    let mut values: Vec<f32> = new.to_vec().map_err(|e| format!("{name}: {e:?}"))?;
    let (rows, cols) = match old_shape.as_slice() {
        [n] => (1, *n),
        [r, c] => (*r, *c),
        _ => unreachable!("checked above"),
    };
    let new_cols = *new_shape.last().expect("checked above");
    for r in 0..rows {
        values[r * new_cols..r * new_cols + cols]
            .copy_from_slice(&old_values[r * cols..(r + 1) * cols]);
    }
    Ok(TensorData::new(values, new.shape.clone()))
}

/// The upcycled architecture: the parent's, with `experts` experts routed
/// `top_k` at a time in every `every`-th layer. Errors name the flag.
pub fn upcycled_config(
    parent: &ModelConfig,
    experts: usize,
    top_k: usize,
    every: usize,
) -> Result<ModelConfig, String> {
    if parent.moe.is_some() {
        return Err("it is already a mixture-of-experts model (upcycling turns dense layers into sparse ones)".into());
    }
    let moe = MoeConfig {
        experts,
        top_k,
        every,
    };
    moe.validate().map_err(|e| {
        e.replace("model.moe.experts", "--experts")
            .replace("model.moe.top_k", "--top-k")
            .replace("model.moe.every", "--every")
    })?;
    if (0..parent.n_layers).all(|i| !moe.is_sparse(i)) {
        return Err(format!(
            "--every {every} leaves all {} layers dense",
            parent.n_layers
        ));
    }
    let child = ModelConfig {
        moe: Some(moe),
        ..parent.clone()
    };
    child.validate().map_err(|e| e.0)?;
    Ok(child)
}

/// The upcycled model's tensors (sparse upcycling, as AquilaMoE's scale-out):
/// each sparse layer's experts are copies of the parent's dense FFN (`w1`
/// its `gate_proj`, `w3` its `up_proj`, `w2` its `down_proj`) behind a fresh
/// router drawn with `seed`; everything else is the parent's. Because the
/// chosen gates are renormalised to sum to 1, the upcycled model computes
/// its parent's function, whatever the router.
pub fn upcycle_tensors(
    child: &ModelConfig,
    parent: &HashMap<String, TensorData>,
    seed: u64,
) -> Result<HashMap<String, TensorData>, String> {
    from_fresh(child, seed, |name, data| {
        let source = match name.split_once(".block_sparse_moe.experts.") {
            Some((layer, rest)) => {
                let proj = match rest.rsplit('.').nth(1) {
                    Some("w1") => "gate_proj",
                    Some("w2") => "down_proj",
                    Some("w3") => "up_proj",
                    _ => return Err(format!("{name}: not an expert weight")),
                };
                Some(format!("{layer}.mlp.{proj}.weight"))
            }
            None if name.ends_with(".block_sparse_moe.gate.weight") => None,
            None => Some(name.to_string()),
        };
        match source {
            None => Ok(data),
            Some(source) => {
                let old = parent
                    .get(&source)
                    .ok_or_else(|| format!("tensor {source} is missing"))?;
                if old.shape != data.shape {
                    return Err(format!(
                        "tensor {source} has shape {:?}, expected {:?}",
                        old.shape.as_slice(),
                        data.shape.as_slice()
                    ));
                }
                Ok(old.clone())
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::model_from_tensors;
    use crate::model::{Growth, GrowthMasks, Llama};
    use burn::tensor::{Int, Tensor};

    fn parent() -> ModelConfig {
        ModelConfig {
            vocab_size: 50,
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
        let ids: Vec<i32> = (0..24).map(|i| (i * 7 + 3) % 50).collect();
        let ids =
            Tensor::<Inner, 2, Int>::from_data(TensorData::new(ids, [2, 12]), &Default::default());
        model.forward(ids).into_data().to_vec().unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// The parent and its growth to `to`, masks at 0.
    fn grown(parent_cfg: &ModelConfig, to: &GrowTo) -> (Llama<Inner>, Llama<Inner>) {
        let parent = parent_cfg.init::<Inner>(7, &Default::default());
        // Norm weights away from 1, so a wrong statistic cannot hide.
        let mut tensors: HashMap<String, TensorData> = named_tensors(&parent).into_iter().collect();
        for (name, data) in tensors.iter_mut() {
            if name.ends_with("norm.weight") {
                let v: Vec<f32> = data.to_vec().unwrap();
                let v: Vec<f32> = v
                    .iter()
                    .enumerate()
                    .map(|(i, x)| x * (0.5 + (i % 5) as f32 * 0.3))
                    .collect();
                *data = TensorData::new(v, data.shape.clone());
            }
        }
        let parent =
            model_from_tensors::<Inner>(parent_cfg, tensors.clone(), &Default::default()).unwrap();
        let child_cfg = grown_config(parent_cfg, to).unwrap();
        let child_tensors = grow_tensors(&child_cfg, &tensors, 11).unwrap();
        let mut child =
            model_from_tensors::<Inner>(&child_cfg, child_tensors, &Default::default()).unwrap();
        child.growth = Some(Growth::new(spec_of(parent_cfg), 10));
        (parent, child)
    }

    #[test]
    fn every_kind_of_growth_preserves_the_parents_logits_at_mask_zero() {
        let cases = [
            (
                "depth",
                GrowTo {
                    layers: Some(4),
                    ..GrowTo::default()
                },
            ),
            (
                "width",
                GrowTo {
                    d_model: Some(48),
                    ..GrowTo::default()
                },
            ),
            (
                "ffn",
                GrowTo {
                    d_ff: Some(96),
                    ..GrowTo::default()
                },
            ),
            (
                "heads",
                GrowTo {
                    heads: Some(8),
                    ..GrowTo::default()
                },
            ),
            (
                "all",
                GrowTo {
                    layers: Some(3),
                    d_model: Some(64),
                    d_ff: Some(80),
                    heads: Some(8),
                },
            ),
        ];
        for tied in [false, true] {
            let cfg = ModelConfig {
                tie_embeddings: tied,
                ..parent()
            };
            for (what, to) in &cases {
                let (parent, child) = grown(&cfg, to);
                let (a, b) = (logits(&parent), logits(&child));
                let diff = max_diff(&a, &b);
                assert!(
                    diff <= 1e-5,
                    "{what} (tied {tied}): logits differ by {diff}"
                );
                // The masks matter: at 1 the new structure changes the output.
                child.growth.as_ref().unwrap().set_mask(1.0);
                let open = max_diff(&a, &logits(&child));
                assert!(
                    open > 1e-3,
                    "{what} (tied {tied}): new structure had no effect ({open})"
                );
            }
        }
    }

    #[test]
    fn width_growth_averages_rmsnorm_over_the_masked_width() {
        // Under width growth d → d', RMSNorm's mean of squares runs over
        // d + m·(d' − d) columns: d at m = 0 (the parent's statistic),
        // d' at m = 1; a plain norm over d' would shrink it by d/d' at once.
        let to = GrowTo {
            d_model: Some(64),
            ..GrowTo::default()
        };
        let (_, child) = grown(&parent(), &to);
        let growth = child.growth.clone().unwrap();
        let device = Default::default();
        let x: Vec<f32> = (0..3 * 64)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let weight: Vec<f32> = child.model.norm.weight.val().into_data().to_vec().unwrap();
        let eps = child.model.norm.eps;
        for m in [0.0f32, 0.25, 0.5] {
            growth.set_mask(m);
            let masks = growth.masks(&child, &device).expect("ramping");
            let input =
                Tensor::<Inner, 3>::from_data(TensorData::new(x.clone(), [1, 3, 64]), &device);
            let out: Vec<f32> = GrowthMasks::norm(Some(&masks), &child.model.norm, input)
                .into_data()
                .to_vec()
                .unwrap();
            let width = 32.0 + m as f64 * 32.0;
            for row in 0..3 {
                let xs = &x[row * 64..(row + 1) * 64];
                let ms = xs.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / width;
                for c in 0..64 {
                    let want = xs[c] as f64 / (ms + eps).sqrt() * weight[c] as f64;
                    let got = out[row * 64 + c] as f64;
                    assert!(
                        (want - got).abs() <= 1e-5 * want.abs().max(1.0),
                        "m {m}, row {row}, col {c}: {got} against {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn masks_at_one_are_an_ordinary_model_and_the_ramp_is_linear() {
        let to = GrowTo {
            layers: Some(3),
            d_model: Some(48),
            d_ff: Some(64),
            heads: None,
        };
        let (_, child) = grown(&parent(), &to);
        let growth = child.growth.clone().unwrap();
        growth.set_step(5);
        assert_eq!(growth.mask(), 0.5);
        growth.set_step(25);
        assert_eq!(growth.mask(), 1.0);
        let mut plain = child.clone();
        plain.growth = None;
        assert_eq!(logits(&child), logits(&plain));
    }

    #[test]
    fn growth_is_checked() {
        let p = parent();
        let err = |to: GrowTo| grown_config(&p, &to).unwrap_err();
        assert!(
            err(GrowTo {
                layers: Some(1),
                ..GrowTo::default()
            })
            .contains("--layers 1 is smaller than the parent's 2")
        );
        assert!(
            err(GrowTo {
                d_ff: Some(40),
                ..GrowTo::default()
            })
            .contains("--d-ff 40 is smaller")
        );
        assert!(
            err(GrowTo {
                d_model: Some(16),
                ..GrowTo::default()
            })
            .contains("--d-model 16 is smaller")
        );
        assert!(
            err(GrowTo {
                d_model: Some(50),
                heads: Some(6),
                ..GrowTo::default()
            })
            .contains("not divisible by --heads 6")
        );
        assert!(
            err(GrowTo {
                d_model: Some(60),
                ..GrowTo::default()
            })
            .contains("not divisible by the parent's head_dim 8")
        );
        assert!(
            err(GrowTo {
                d_model: Some(64),
                heads: Some(4),
                ..GrowTo::default()
            })
            .contains("keeps the parent's head_dim 8")
        );
        assert!(
            err(GrowTo {
                heads: Some(5),
                ..GrowTo::default()
            })
            .contains("not a multiple of the parent's 2")
        );
        assert!(err(GrowTo::default()).contains("nothing to grow"));
        assert!(
            err(GrowTo {
                layers: Some(2),
                ..GrowTo::default()
            })
            .contains("nothing to grow")
        );
        let c = grown_config(
            &p,
            &GrowTo {
                heads: Some(8),
                ..GrowTo::default()
            },
        )
        .unwrap();
        assert_eq!((c.d_model, c.n_heads, c.n_kv_heads), (64, 8, 4));
    }

    #[test]
    fn upcycled_experts_compute_the_dense_parents_function() {
        let p = parent();
        let dense = p.init::<Inner>(7, &Default::default());
        let tensors: HashMap<String, TensorData> = named_tensors(&dense).into_iter().collect();
        for (experts, top_k, every) in [(4, 2, 1), (3, 1, 2), (2, 2, 1)] {
            let child = upcycled_config(&p, experts, top_k, every).unwrap();
            let up = upcycle_tensors(&child, &tensors, 5).unwrap();
            let moe = model_from_tensors::<Inner>(&child, up, &Default::default()).unwrap();
            let d = max_diff(&logits(&dense), &logits(&moe));
            assert!(d <= 1e-5, "{experts}×top-{top_k} every {every}: {d}");
            let sparse = moe
                .model
                .layers
                .iter()
                .filter(|l| l.block_sparse_moe.is_some())
                .count();
            assert_eq!(sparse, p.n_layers / every);
        }
        // Experts that differ do change the function: the test can fail.
        let child = upcycled_config(&p, 4, 2, 1).unwrap();
        let fresh = child.init::<Inner>(3, &Default::default());
        assert!(max_diff(&logits(&dense), &logits(&fresh)) > 1e-3);
    }

    #[test]
    fn upcycling_refuses_bad_routing_and_moe_parents() {
        let p = parent();
        let err = |e, k, n| upcycled_config(&p, e, k, n).unwrap_err();
        assert!(err(4, 5, 1).contains("--top-k"), "{}", err(4, 5, 1));
        assert!(err(1, 1, 1).contains("--experts must be at least 2"));
        assert!(err(4, 0, 1).contains("--top-k"));
        assert!(err(4, 2, 3).contains("leaves all 2 layers dense"));
        let moe = upcycled_config(&p, 4, 2, 1).unwrap();
        let e = upcycled_config(&moe, 8, 2, 1).unwrap_err();
        assert!(e.contains("already a mixture-of-experts"), "{e}");
        let e = grown_config(
            &moe,
            &GrowTo {
                layers: Some(4),
                ..GrowTo::default()
            },
        )
        .unwrap_err();
        assert!(e.contains("mixture-of-experts"), "{e}");
    }

    /// The balancing loss of one pass is `E · Σ fᵢ·pᵢ` (with `fᵢ` this pass's
    /// assignment shares and `pᵢ` its mean router probabilities), and its
    /// gradient reaches the router.
    #[test]
    fn balance_loss_matches_its_formula_and_trains_the_router() {
        use crate::backend::Train;
        use crate::moe::{Balance, BalanceScope, MoeTrainConfig};
        use burn::module::AutodiffModule;
        use burn::tensor::activation::softmax;
        let cfg = upcycled_config(&parent(), 4, 2, 1).unwrap();
        let device = Default::default();
        let mut model = cfg.init::<Train>(9, &device);
        let settings = MoeTrainConfig {
            balance: BalanceScope::Micro,
            balance_weight: 1.0,
            z_weight: 0.0,
        };
        model.balance = Some(Balance::new(settings));
        let ids: Vec<i32> = (0..24).map(|i| (i * 7 + 3) % 50).collect();
        let ids = Tensor::<Train, 2, Int>::from_data(TensorData::new(ids, [2, 12]), &device);
        let seq = crate::model::Positions::Contiguous { start: 0, len: 12 };
        let (_, aux) =
            model.forward_with_aux(ids.clone(), &seq, &crate::model::AttentionMask::Causal);
        let aux = aux.expect("a balanced MoE model in training has an auxiliary loss");
        let value: f32 = aux.clone().into_scalar();

        // The same loss by hand from each layer's router input.
        let inner = model.valid();
        let mut x =
            burn::tensor::module::embedding(inner.model.embed_tokens.weight.val(), ids.inner());
        let inputs = crate::model::LayerInputs::new(
            &inner.rope,
            &inner.model.layers[0].self_attn,
            &crate::model::Positions::<Inner>::Contiguous { start: 0, len: 12 },
            &crate::model::AttentionMask::Causal,
            [2, 0, 12],
            true,
            &device,
        );
        let mut want = 0.0;
        for layer in &inner.model.layers {
            let h = layer.input_layernorm.forward(x.clone());
            x = x + layer.self_attn.forward(h, &inputs, None);
            let h = layer.post_attention_layernorm.forward(x.clone());
            let moe = layer.block_sparse_moe.as_ref().unwrap();
            let probs: Vec<f32> =
                softmax(h.clone().reshape([24, 32]).matmul(moe.gate.weight.val()), 1)
                    .into_data()
                    .to_vec()
                    .unwrap();
            let mut f = [0f64; 4];
            let mut p = [0f64; 4];
            for t in 0..24 {
                let row = &probs[t * 4..t * 4 + 4];
                let mut order: Vec<usize> = (0..4).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                for &j in &order[..2] {
                    f[j] += 1.0 / 48.0;
                }
                for j in 0..4 {
                    p[j] += row[j] as f64 / 24.0;
                }
            }
            want += 4.0 * (0..4).map(|j| f[j] * p[j]).sum::<f64>() / 2.0;
            x = x + moe.forward(h, 0, None).0;
        }
        assert!(
            (value as f64 - want).abs() < 1e-4,
            "aux {value} vs by hand {want}"
        );
        let grads = aux.backward();
        let router = &model.model.layers[0]
            .block_sparse_moe
            .as_ref()
            .unwrap()
            .gate
            .weight;
        let g: Vec<f32> = router.grad(&grads).unwrap().into_data().to_vec().unwrap();
        assert!(
            g.iter().any(|v| v.abs() > 0.0),
            "the router gets no gradient"
        );
        let stats = model.balance.as_ref().unwrap().take_metrics();
        assert!(
            stats.iter().any(|(k, _)| k == "moe/load_max/1"),
            "{stats:?}"
        );
    }
}
