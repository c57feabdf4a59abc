//! AdamW with decoupled weight decay on matrices only, the learning-rate
//! schedules, and global gradient-norm clipping.
//!
//! Written here rather than taken from `burn-optim` because Baton needs three
//! things Burn's AdamW does not give: decay on matrices only, a *global* clip
//! norm, and moments that save and load bit-exactly by parameter name (so a
//! resumed run continues exactly).

use std::collections::HashMap;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorData};
use serde::{Deserialize, Serialize};

/// Learning-rate schedule after linear warmup.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Cosine decay from `lr` to `lr * min_lr_ratio` over the remaining steps.
    Cosine,
    /// Warmup-stable-decay: constant `lr`, then a linear decay to
    /// `lr * min_lr_ratio` over the last `decay_fraction` of the steps.
    Wsd,
    /// Constant after warmup.
    Constant,
}

/// Learning rate at `step` (0-based) of `total` steps.
pub fn learning_rate(
    schedule: Schedule,
    lr: f64,
    min_lr_ratio: f64,
    warmup: u64,
    decay_fraction: f64,
    step: u64,
    total: u64,
) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let min_lr = lr * min_lr_ratio;
    match schedule {
        Schedule::Constant => lr,
        Schedule::Cosine => {
            let span = total.saturating_sub(warmup).max(1) as f64;
            let progress = ((step - warmup) as f64 / span).min(1.0);
            min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
        }
        Schedule::Wsd => {
            let decay_steps = ((total as f64) * decay_fraction).round() as u64;
            let decay_start = total.saturating_sub(decay_steps).max(warmup);
            if step < decay_start {
                lr
            } else {
                let span = total.saturating_sub(decay_start).max(1) as f64;
                let progress = ((step - decay_start + 1) as f64 / span).min(1.0);
                lr + (min_lr - lr) * progress
            }
        }
    }
}

/// AdamW hyper-parameters, all explicit.
#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

struct Moments<B: Backend> {
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
}

/// AdamW state: first and second moments per parameter name, and the step count.
pub struct AdamW<B: Backend> {
    config: AdamWConfig,
    moments: HashMap<String, Moments<B>>,
    pub steps_taken: u64,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            moments: HashMap::new(),
            steps_taken: 0,
        }
    }

    /// Moments as named tensors (`m.<param>`, `v.<param>`) for `train_state`.
    /// Drops the moments of every parameter `keep` refuses (frozen ones).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.moments.retain(|name, _| keep(name));
    }

    pub fn state_tensors(&self) -> Vec<(String, TensorData)> {
        let mut names: Vec<&String> = self.moments.keys().collect();
        names.sort();
        let mut out = Vec::with_capacity(names.len() * 2);
        for name in names {
            let m = &self.moments[name];
            out.push((format!("m.{name}"), m.m.to_data()));
            out.push((format!("v.{name}"), m.v.to_data()));
        }
        out
    }

    /// Restores moments saved by [`AdamW::state_tensors`].
    pub fn load_state(
        &mut self,
        mut tensors: HashMap<String, TensorData>,
        steps_taken: u64,
        device: &B::Device,
    ) -> Result<(), crate::error::WeightsError> {
        let names: Vec<String> = tensors
            .keys()
            .filter_map(|k| k.strip_prefix("m.").map(str::to_string))
            .collect();
        for name in names {
            let m = tensors
                .remove(&format!("m.{name}"))
                .unwrap_or_else(|| unreachable!());
            let v = tensors
                .remove(&format!("v.{name}"))
                .ok_or_else(|| format!("optimizer state lacks v.{name}"))?;
            self.moments.insert(
                name,
                Moments {
                    m: Tensor::from_data(m, device),
                    v: Tensor::from_data(v, device),
                },
            );
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(format!("unexpected optimizer tensor {extra}").into());
        }
        self.steps_taken = steps_taken;
        Ok(())
    }
}

/// Global L2 norm of all gradients of `module`.
pub fn global_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> f64 {
    struct SumSquares<'a, B: AutodiffBackend> {
        grads: &'a GradientsParams,
        total: Option<Tensor<B::InnerBackend, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for SumSquares<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                let s = g.square().sum();
                self.total = Some(match self.total.take() {
                    Some(t) => t + s,
                    None => s,
                });
            }
        }
    }
    let mut visitor = SumSquares::<B> { grads, total: None };
    module.visit(&mut visitor);
    visitor
        .total
        .map_or(0.0, |t| t.into_scalar().elem::<f64>().sqrt())
}

/// Every gradient of `module`, flattened in parameter order (a parameter
/// without a gradient adds nothing): what tests compare two ways of computing
/// gradients by.
pub fn grad_values<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> Vec<f32> {
    struct Flatten<'a> {
        grads: &'a GradientsParams,
        values: Vec<f32>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                let data = g.into_data().convert::<f32>();
                self.values.extend(data.to_vec::<f32>().unwrap_or_default());
            }
        }
    }
    let mut visitor = Flatten {
        grads,
        values: Vec::new(),
    };
    module.visit(&mut visitor);
    visitor.values
}

/// The largest absolute difference between two gradient vectors from
/// [`grad_values`]; `None` when their lengths differ.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> Option<f32> {
    (a.len() == b.len()).then(|| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    })
}

struct Step<'a, B: AutodiffBackend> {
    optim: &'a mut AdamW<B::InnerBackend>,
    grads: &'a mut GradientsParams,
    lr: f64,
    grad_scale: f64,
    bias1: f64,
    bias2: f64,
    path: Vec<String>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Step<'_, B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<B::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let cfg = self.optim.config;
        let dims = tensor.dims();
        let numel: usize = dims.iter().product();
        let name = self.path.join(".");
        let grad = grad.reshape([numel]).mul_scalar(self.grad_scale);
        let device = grad.device();
        let moments = self.optim.moments.remove(&name).unwrap_or_else(|| Moments {
            m: Tensor::zeros([numel], &device),
            v: Tensor::zeros([numel], &device),
        });
        let m = moments.m.mul_scalar(cfg.beta1) + grad.clone().mul_scalar(1.0 - cfg.beta1);
        let v = moments.v.mul_scalar(cfg.beta2) + grad.square().mul_scalar(1.0 - cfg.beta2);
        let update = m
            .clone()
            .div_scalar(self.bias1)
            .div(v.clone().div_scalar(self.bias2).sqrt().add_scalar(cfg.eps));
        let mut value = tensor.inner().reshape([numel]);
        // Decoupled weight decay, on matrices only (not norms' gains).
        if D >= 2 && cfg.weight_decay > 0.0 {
            value = value.mul_scalar(1.0 - self.lr * cfg.weight_decay);
        }
        let value = value - update.mul_scalar(self.lr);
        self.optim.moments.insert(name, Moments { m, v });
        let value = Tensor::<B, D>::from_inner(value.reshape(dims)).require_grad();
        Param::from_mapped_value(id, value, mapper)
    }
}

impl<B: Backend> AdamW<B> {
    /// One optimizer step on `module` with `grads`, whose global norm is
    /// `grad_norm`; gradients are scaled down to `clip` when it is exceeded
    /// (`clip <= 0` disables clipping).
    pub fn step<AB, M>(
        &mut self,
        module: M,
        mut grads: GradientsParams,
        lr: f64,
        grad_norm: f64,
        clip: f64,
    ) -> M
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        self.steps_taken += 1;
        let t = self.steps_taken as i32;
        let grad_scale = if clip > 0.0 && grad_norm > clip {
            clip / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let mut stepper = Step::<AB> {
            bias1: 1.0 - self.config.beta1.powi(t),
            bias2: 1.0 - self.config.beta2.powi(t),
            optim: self,
            grads: &mut grads,
            lr,
            grad_scale,
            path: Vec::new(),
        };
        module.map(&mut stepper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_then_decay_to_the_floor() {
        let lr = |s, step| learning_rate(s, 1.0, 0.1, 10, 0.2, step, 100);
        assert!((lr(Schedule::Cosine, 0) - 0.1).abs() < 1e-12);
        assert!((lr(Schedule::Cosine, 9) - 1.0).abs() < 1e-12);
        assert!((lr(Schedule::Cosine, 100) - 0.1).abs() < 1e-9);
        assert!(lr(Schedule::Cosine, 50) < 1.0 && lr(Schedule::Cosine, 50) > 0.1);
        assert_eq!(lr(Schedule::Wsd, 50), 1.0);
        assert_eq!(lr(Schedule::Wsd, 79), 1.0);
        assert!(lr(Schedule::Wsd, 85) < 1.0);
        assert!((lr(Schedule::Wsd, 99) - 0.1).abs() < 1e-12);
        assert_eq!(lr(Schedule::Constant, 99), 1.0);
    }

    /// AdamW by hand, in f64: decoupled decay on matrices only, bias
    /// correction, and gradients scaled to the global clip norm.
    #[test]
    fn adamw_matches_the_update_computed_by_hand() {
        use crate::backend::Train;
        use burn::module::Module;

        #[derive(Module, Debug)]
        struct Tiny<B: Backend> {
            w: Param<Tensor<B, 2>>,
            g: Param<Tensor<B, 1>>,
        }

        let device = Default::default();
        let w0 = [0.5f64, -1.0, 2.0, 0.25];
        let g0 = [1.0f64, 0.75];
        // d loss / d w = cw, d loss / d g = cg (a linear loss).
        let cw = [0.3f64, -0.1, 0.8, 0.05];
        let cg = [-0.4f64, 0.2];
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let mut model = Tiny::<Train> {
            w: Param::from_data(TensorData::new(f32s(&w0), [2, 2]), &device),
            g: Param::from_data(TensorData::new(f32s(&g0), [2]), &device),
        };
        let config = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut optim = AdamW::<crate::backend::Inner>::new(config);
        let (lr, clip) = (0.01, 0.5);
        // By hand: every parameter as one list, matrices first.
        let mut value: Vec<f64> = w0.iter().chain(&g0).copied().collect();
        let grad: Vec<f64> = cw.iter().chain(&cg).copied().collect();
        let (mut m, mut v) = (vec![0.0; 6], vec![0.0; 6]);
        let norm = grad.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(norm > clip, "the test must exercise clipping");
        // Gradients of changing size: clipped, not clipped, clipped. (Adam is
        // blind to one constant scale, so only a mix shows the clip.)
        for (t, k) in [(1, 1.0f64), (2, 0.1), (3, 2.0)] {
            let scaled = |c: &[f64]| c.iter().map(|x| x * k).collect::<Vec<f64>>();
            let loss = (model.w.val()
                * Tensor::from_data(TensorData::new(f32s(&scaled(&cw)), [2, 2]), &device))
            .sum()
                + (model.g.val()
                    * Tensor::from_data(TensorData::new(f32s(&scaled(&cg)), [2]), &device))
                .sum();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let grad_norm = global_grad_norm(&model, &grads);
            assert!((grad_norm - k * norm).abs() < 1e-6);
            model = optim.step(model, grads, lr, grad_norm, clip);

            let norm = k * norm;
            let scale = if norm > clip {
                clip / (norm + 1e-6)
            } else {
                1.0
            };
            for i in 0..6 {
                let g = k * grad[i] * scale;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.95 * v[i] + 0.05 * g * g;
                let m_hat = m[i] / (1.0 - 0.9f64.powi(t));
                let v_hat = v[i] / (1.0 - 0.95f64.powi(t));
                if i < 4 {
                    value[i] *= 1.0 - lr * 0.1;
                }
                value[i] -= lr * m_hat / (v_hat.sqrt() + 1e-8);
            }
            let got: Vec<f32> = model
                .w
                .val()
                .into_data()
                .to_vec::<f32>()
                .unwrap()
                .into_iter()
                .chain(model.g.val().into_data().to_vec::<f32>().unwrap())
                .collect();
            for (i, (a, b)) in got.iter().zip(&value).enumerate() {
                assert!(
                    (*a as f64 - b).abs() < 1e-6,
                    "step {t}, value {i}: {a} vs {b} by hand"
                );
            }
        }
        assert_eq!(optim.steps_taken, 3);
    }
}
