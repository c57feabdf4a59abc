//! Freezing: `train.freeze` and `train.train_only` pick, by glob over the HF
//! tensor names (`model.layers.3.mlp.up_proj.weight`), which tensors a stage
//! trains. A frozen tensor is marked as not requiring a gradient, so Burn's
//! autodiff neither computes its gradient nor (when nothing before it trains)
//! back-propagates through the layers below it; the optimizer holds no
//! moments for it, and it leaves the stage bit for bit as it came in.

use std::collections::BTreeSet;

use burn::module::{ModuleMapper, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;

use super::TrainConfig;
use crate::model::{Llama, ModelConfig};

/// Whether `name` matches the shell-style `pattern`: `*` any run of
/// characters (dots included), `?` one character, `[0-5]`/`[abc]` one of a
/// set, `[!…]` one not in it.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative matcher with one backtrack point for the last `*`.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        let step = match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
                continue;
            }
            Some('?') => Some(pi + 1),
            Some('[') => class_match(&p, pi, n[ni]),
            Some(&c) if c == n[ni] => Some(pi + 1),
            _ => None,
        };
        match (step, star) {
            (Some(next), _) => {
                pi = next;
                ni += 1;
            }
            (None, Some((sp, sn))) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            (None, None) => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Matches `c` against the class starting at `p[start] == '['`; the index
/// after the class when it matches. An unclosed `[` matches itself.
fn class_match(p: &[char], start: usize, c: char) -> Option<usize> {
    let mut i = start + 1;
    let negate = matches!(p.get(i), Some('!' | '^'));
    if negate {
        i += 1;
    }
    let first = i;
    let mut hit = false;
    while i < p.len() && (p[i] != ']' || i == first) {
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            hit |= (p[i]..=p[i + 2]).contains(&c);
            i += 3;
        } else {
            hit |= p[i] == c;
            i += 1;
        }
    }
    if i >= p.len() {
        return (c == '[').then_some(start + 1);
    }
    (hit != negate).then_some(i + 1)
}

/// The tensors a run trains, by `cfg.freeze` and `cfg.train_only` over
/// `names`: `None` when both are empty (everything trains). Every pattern
/// must match some tensor, and at least one tensor must be left to train;
/// the message names the key and the pattern.
pub fn trained_set(
    cfg: &TrainConfig,
    names: &[String],
) -> Result<Option<BTreeSet<String>>, String> {
    let adapters: BTreeSet<String> = names
        .iter()
        .filter(|n| crate::lora::is_adapter_param(n))
        .cloned()
        .collect();
    if cfg.freeze.is_empty() && cfg.train_only.is_empty() && adapters.is_empty() {
        return Ok(None);
    }
    let example = names
        .iter()
        .find(|n| n.contains("layers.0."))
        .or(names.first())
        .cloned()
        .unwrap_or_default();
    let matching = |key: &str, pattern: &String| -> Result<Vec<&String>, String> {
        let hits: Vec<&String> = names.iter().filter(|n| glob_match(pattern, n)).collect();
        if hits.is_empty() {
            return Err(format!(
                "{key}: pattern \"{pattern}\" matches no tensor of this model (names look like {example})"
            ));
        }
        Ok(hits)
    };
    let mut trained: BTreeSet<String> = if !adapters.is_empty() {
        // With adapters, they train, plus what `train_only` unfreezes of
        // the base (saved beside the adapter, as PEFT's `modules_to_save`);
        // not the weight of a map that carries an adapter.
        let mut set = adapters.clone();
        for pattern in &cfg.train_only {
            for name in matching("train.train_only", pattern)? {
                let module = name.strip_suffix(".weight").unwrap_or(name);
                if adapters
                    .iter()
                    .any(|a| a.starts_with(&format!("{module}.lora.")))
                {
                    return Err(format!(
                        "train.train_only: {name} carries a LoRA adapter; train the adapter or the weight, not both"
                    ));
                }
                if !crate::lora::is_adapter_param(name) {
                    set.insert(name.clone());
                }
            }
        }
        set
    } else if cfg.train_only.is_empty() {
        names.iter().cloned().collect()
    } else {
        let mut set = BTreeSet::new();
        for pattern in &cfg.train_only {
            set.extend(matching("train.train_only", pattern)?.into_iter().cloned());
        }
        set
    };
    for pattern in &cfg.freeze {
        for name in matching("train.freeze", pattern)? {
            trained.remove(name);
        }
    }
    if trained.is_empty() {
        return Err(
            "train.freeze and train.train_only leave no tensor to train: every tensor would be frozen"
                .into(),
        );
    }
    Ok(Some(trained))
}

/// [`trained_set`] for a model of `config` (with `adapter` attached), before
/// any weights exist (what a stage checks before it writes anything).
pub fn check(
    cfg: &TrainConfig,
    config: &ModelConfig,
    adapter: Option<&crate::lora::AdapterSpec>,
) -> Result<(), String> {
    let mut names: Vec<String> = config.hf_shapes().into_iter().map(|(n, _)| n).collect();
    if let Some(spec) = adapter {
        for i in 0..config.n_layers {
            for t in &spec.targets {
                let block = if ["gate_proj", "up_proj", "down_proj"].contains(&t.as_str()) {
                    "mlp"
                } else {
                    "self_attn"
                };
                for part in ["a", "b"] {
                    names.push(format!("model.layers.{i}.{block}.{t}.lora.{part}"));
                }
            }
        }
    }
    trained_set(cfg, &names).map(|_| ())
}

pub use crate::model::param_names;

/// `model` with every parameter outside `trained` marked as not requiring a
/// gradient (and every one inside it as requiring one).
pub fn apply<B: AutodiffBackend>(model: Llama<B>, trained: &BTreeSet<String>) -> Llama<B> {
    struct Mark<'a> {
        path: Vec<String>,
        trained: &'a BTreeSet<String>,
    }
    impl<B: AutodiffBackend> ModuleMapper<B> for Mark<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let train = self.trained.contains(&self.path.join("."));
            let (id, tensor, mapper) = param.consume();
            let tensor = if train {
                tensor.require_grad()
            } else {
                tensor.set_require_grad(false)
            };
            Param::from_mapped_value(id, tensor, mapper)
        }
    }
    burn::module::Module::map(
        model,
        &mut Mark {
            path: Vec::new(),
            trained,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_a_shell() {
        let name = "model.layers.3.mlp.up_proj.weight";
        for (pattern, want) in [
            ("model.layers.3.*", true),
            ("model.layers.[0-5].*", true),
            ("model.layers.[!0-2].*", true),
            ("model.layers.[0-2].*", false),
            ("*up_proj*", true),
            ("*.mlp.*_proj.weight", true),
            ("model.layers.?.mlp.*", true),
            ("model.layers.??.mlp.*", false),
            ("model.layers.3", false),
            ("model.layers.3.mlp.up_proj.weight", true),
            ("*", true),
            ("*.bias", false),
        ] {
            assert_eq!(glob_match(pattern, name), want, "{pattern}");
        }
        assert!(glob_match("a[", "a["));
        assert!(glob_match("**x", "abx"));
        assert!(!glob_match("a*b*c", "abcb"));
        assert!(glob_match("a*b*c", "aXbYbc"));
    }

    fn names() -> Vec<String> {
        let config = ModelConfig {
            n_layers: 3,
            ..ModelConfig::default()
        };
        config.hf_shapes().into_iter().map(|(n, _)| n).collect()
    }

    fn cfg(freeze: &[&str], train_only: &[&str]) -> TrainConfig {
        TrainConfig {
            freeze: freeze.iter().map(|s| s.to_string()).collect(),
            train_only: train_only.iter().map(|s| s.to_string()).collect(),
            ..TrainConfig::default()
        }
    }

    #[test]
    fn freeze_and_train_only_resolve_to_the_trained_set_or_a_named_error() {
        let names = names();
        assert_eq!(trained_set(&cfg(&[], &[]), &names), Ok(None));
        let trained = trained_set(
            &cfg(&["model.embed_tokens.*", "model.layers.[0-1].*"], &[]),
            &names,
        )
        .unwrap()
        .unwrap();
        assert!(trained.contains("model.layers.2.mlp.up_proj.weight"));
        assert!(trained.contains("model.norm.weight"));
        assert!(!trained.contains("model.layers.1.mlp.up_proj.weight"));
        assert!(!trained.contains("model.embed_tokens.weight"));
        assert_eq!(trained.len(), names.len() - 1 - 2 * 9);

        let only = trained_set(&cfg(&["*norm*"], &["model.layers.2.*"]), &names)
            .unwrap()
            .unwrap();
        assert_eq!(only.len(), 7, "{only:?}");
        assert!(only.iter().all(|n| n.starts_with("model.layers.2.")));

        let err = trained_set(&cfg(&["model.layer.*"], &[]), &names).unwrap_err();
        assert!(
            err.contains("train.freeze") && err.contains("model.layer.*"),
            "{err}"
        );
        let err = trained_set(&cfg(&[], &["*lora*"]), &names).unwrap_err();
        assert!(err.contains("train.train_only"), "{err}");
        let err = trained_set(&cfg(&["*"], &[]), &names).unwrap_err();
        assert!(err.contains("no tensor to train"), "{err}");
    }
}
