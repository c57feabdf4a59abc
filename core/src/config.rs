//! Layered configuration: Rust defaults → `--config FILE.toml` (repeatable) →
//! environment `BATON__SECTION__KEY` → `--set section.key=value` (repeatable).
//!
//! Every source is checked against the key tree of the defaults before merging,
//! so a typo is reported with the key *and* where it came from; a wrong type is
//! reported by the typed deserialisation with the key named. A table that is
//! empty in the defaults is a map (e.g. `tasks.weights`): its keys are checked
//! by the typed deserialisation instead.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::train::TrainConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{source_name}: unknown config key `{key}`")]
    UnknownKey { source_name: String, key: String },
    #[error("{source_name}: {reason}")]
    Invalid { source_name: String, reason: String },
    #[error("{path}: cannot read config: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("--set {arg}: expected key=value")]
    BadSet { arg: String },
}

/// Where a configuration comes from, lowest precedence first.
#[derive(Clone, Debug, Default)]
pub struct ConfigSources {
    /// Built-in TOML layers `(name, text)` applied before `files` (a stage's
    /// shipped defaults over inherited values).
    pub builtin: Vec<(String, String)>,
    pub files: Vec<PathBuf>,
    pub sets: Vec<String>,
    /// Read `BATON__…` variables from the environment.
    pub env: bool,
}

/// Resolves a typed config from its defaults and `sources`.
pub fn resolve<T: Serialize + DeserializeOwned + Default>(
    sources: &ConfigSources,
) -> Result<T, ConfigError> {
    resolve_from(&T::default(), sources)
}

/// Like [`resolve`], with explicit defaults (e.g. inherited from a parent).
pub fn resolve_from<T: Serialize + DeserializeOwned>(
    defaults: &T,
    sources: &ConfigSources,
) -> Result<T, ConfigError> {
    let known = serde_json::to_value(defaults).map_err(|e| ConfigError::Invalid {
        source_name: "defaults".into(),
        reason: e.to_string(),
    })?;
    let invalid = |source_name: &str, e: config::ConfigError| ConfigError::Invalid {
        source_name: source_name.to_string(),
        reason: e.to_string(),
    };
    let mut builder = config::Config::builder()
        .add_source(config::Config::try_from(defaults).map_err(|e| invalid("defaults", e))?);
    let mut layers: Vec<(String, String)> = sources.builtin.clone();
    for file in &sources.files {
        let text = read_config_file(file)?;
        layers.push((file.display().to_string(), text));
    }
    for (name, text) in &layers {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Read {
                path: PathBuf::from(name),
                reason: e.message().to_string(),
            })?;
        check_keys(
            &known,
            &serde_json::to_value(table).unwrap_or_default(),
            "",
            name,
        )?;
        builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
    }
    if sources.env {
        for (var, _) in std::env::vars() {
            if let Some(rest) = var.strip_prefix("BATON__") {
                let key = rest.to_lowercase().replace("__", ".");
                check_key_path(&known, &key, &format!("environment {var}"))?;
            }
        }
        builder = builder.add_source(
            config::Environment::with_prefix("BATON")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
    }
    for arg in &sources.sets {
        let (key, value) = arg
            .split_once('=')
            .ok_or_else(|| ConfigError::BadSet { arg: arg.clone() })?;
        let key = key.trim();
        check_key_path(&known, key, &format!("--set {arg}"))?;
        builder = builder
            .set_override(key, parse_value(value.trim()))
            .map_err(|e| invalid(&format!("--set {arg}"), e))?;
    }
    let merged = builder.build().map_err(|e| invalid("config", e))?;
    let resolved = merged.try_deserialize::<T>().map_err(|e| {
        // Blame the source that set the key the error names, if it names one.
        let text = e.to_string();
        let source_name = text
            .split_once("for key `")
            .and_then(|(_, rest)| rest.split_once('`'))
            .map(|(key, _)| origin_of(sources, key))
            .unwrap_or_else(|| describe(sources));
        invalid(&source_name, e)
    })?;
    let value = serde_json::to_value(&resolved).map_err(|e| ConfigError::Invalid {
        source_name: describe(sources),
        reason: e.to_string(),
    })?;
    check_finite(&known, &value, "", sources)?;
    Ok(resolved)
}

fn describe(sources: &ConfigSources) -> String {
    let mut parts: Vec<String> = sources
        .files
        .iter()
        .map(|f| f.display().to_string())
        .collect();
    if !sources.sets.is_empty() {
        parts.push("--set".into());
    }
    if parts.is_empty() {
        "config".into()
    } else {
        parts.join(", ")
    }
}

/// A `--set` value: TOML scalar if it parses as one, else a plain string.
fn parse_value(raw: &str) -> config::Value {
    let parsed: Result<toml::Table, _> = format!("v = {raw}").parse();
    match parsed.ok().and_then(|mut t| t.remove("v")) {
        Some(value) => toml_to_config(value),
        None => raw.to_string().into(),
    }
}

/// A TOML value (from `--set key=value`) as a config value; arrays and
/// inline tables included, so `--set 'tasks.families=["add","sub"]'` works.
fn toml_to_config(value: toml::Value) -> config::Value {
    match value {
        toml::Value::Integer(i) => i.into(),
        toml::Value::Float(f) => f.into(),
        toml::Value::Boolean(b) => b.into(),
        toml::Value::String(s) => s.into(),
        toml::Value::Array(items) => {
            let items: Vec<config::Value> = items.into_iter().map(toml_to_config).collect();
            items.into()
        }
        toml::Value::Table(table) => {
            let map: std::collections::HashMap<String, config::Value> = table
                .into_iter()
                .map(|(k, v)| (k, toml_to_config(v)))
                .collect();
            map.into()
        }
        toml::Value::Datetime(d) => d.to_string().into(),
    }
}

fn check_keys(
    known: &serde_json::Value,
    given: &serde_json::Value,
    prefix: &str,
    source_name: &str,
) -> Result<(), ConfigError> {
    let (Some(known), Some(given)) = (known.as_object(), given.as_object()) else {
        return Ok(());
    };
    for (key, value) in given {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match known.get(key) {
            None => {
                return Err(ConfigError::UnknownKey {
                    source_name: source_name.to_string(),
                    key: path,
                });
            }
            Some(sub) if is_open_map(sub) => {}
            Some(sub) if sub.is_object() => check_keys(sub, value, &path, source_name)?,
            Some(_) => {}
        }
    }
    Ok(())
}

fn check_key_path(
    known: &serde_json::Value,
    key: &str,
    source_name: &str,
) -> Result<(), ConfigError> {
    let mut node = known;
    for part in key.split('.') {
        // An optional table left out of the defaults (`model.moe`): its own
        // type's fields are checked when the config is read.
        if is_open_map(node) || node.is_null() {
            break;
        }
        match node.as_object().and_then(|o| o.get(part)) {
            Some(next) => node = next,
            None => {
                return Err(ConfigError::UnknownKey {
                    source_name: source_name.to_string(),
                    key: key.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// An empty table in the defaults: a map whose keys are not known in advance.
fn is_open_map(node: &serde_json::Value) -> bool {
    node.as_object().is_some_and(|o| o.is_empty())
}

/// A config file's text: a regular file, size-capped, UTF-8.
fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    crate::files::read_text(path, "config", crate::files::cap::CONFIG).map_err(|e| {
        ConfigError::Read {
            path: path.to_path_buf(),
            reason: e.reason,
        }
    })
}

/// Which source set `key` last (for messages): a `--set`, an environment
/// variable, a config file, or the defaults.
fn origin_of(sources: &ConfigSources, key: &str) -> String {
    if let Some(arg) = sources.sets.iter().rev().find(|a| {
        a.split_once('=').is_some_and(|(k, _)| {
            let k = k.trim();
            // A key inside the table named (`model.moe.experts` for `model.moe`).
            k == key
                || k.strip_prefix(key)
                    .is_some_and(|rest| rest.starts_with('.'))
        })
    }) {
        return format!("--set {arg}");
    }
    if sources.env {
        let var = format!("BATON__{}", key.to_uppercase().replace('.', "__"));
        if std::env::var_os(&var).is_some() {
            return format!("environment {var}");
        }
    }
    let sets_key = |text: &str| {
        let Ok(table) = text.parse::<toml::Table>() else {
            return false;
        };
        let mut node = &toml::Value::Table(table);
        for part in key.split('.') {
            match node.as_table().and_then(|t| t.get(part)) {
                Some(next) => node = next,
                None => return false,
            }
        }
        true
    };
    for file in sources.files.iter().rev() {
        if std::fs::read_to_string(file).is_ok_and(|t| sets_key(&t)) {
            return file.display().to_string();
        }
    }
    for (name, text) in sources.builtin.iter().rev() {
        if sets_key(text) {
            return name.clone();
        }
    }
    "defaults".to_string()
}

/// Every number that the defaults hold as a number must be finite in the
/// resolved config (serde writes NaN and infinity as `null`); the error names
/// the key and where its value came from.
fn check_finite(
    known: &serde_json::Value,
    resolved: &serde_json::Value,
    prefix: &str,
    sources: &ConfigSources,
) -> Result<(), ConfigError> {
    let (Some(known), Some(resolved)) = (known.as_object(), resolved.as_object()) else {
        return Ok(());
    };
    for (key, default) in known {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        let value = resolved.get(key).unwrap_or(&serde_json::Value::Null);
        if default.is_number() && value.is_null() {
            return Err(ConfigError::Invalid {
                source_name: origin_of(sources, &path),
                reason: format!("{path} must be a finite number (not NaN or infinity)"),
            });
        }
        if default.is_object() {
            check_finite(default, value, &path, sources)?;
        }
    }
    Ok(())
}

/// The resolved config as TOML, for `run.toml`.
pub fn to_toml<T: Serialize>(config: &T) -> String {
    toml::to_string_pretty(config).unwrap_or_else(|e| format!("# could not render config: {e}\n"))
}

/// Whether a TOML file has a top-level table named `name` (e.g. `[model]` in an
/// SFT config, which is an error).
pub fn file_has_table(path: &Path, name: &str) -> Result<bool, ConfigError> {
    let text = read_config_file(path)?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Read {
            path: path.to_path_buf(),
            reason: e.message().to_string(),
        })?;
    Ok(table.contains_key(name))
}

/// The config of a stage that continues a parent checkpoint (sft, align): the
/// parent's `[train]` as defaults, then the stage's built-in file, then the
/// user's layers. A `[model]` table is refused (the architecture is the
/// parent's), `train` is validated against the parent's context length, and
/// every training knob that differs from the parent is logged.
pub fn child_config<T: Serialize + serde::de::DeserializeOwned>(
    parent: &crate::checkpoint::Checkpoint,
    user: &ConfigSources,
    (stage, builtin): (&str, &str),
    defaults: impl FnOnce(TrainConfig) -> T,
    train_of: impl Fn(&T) -> &TrainConfig,
) -> anyhow::Result<T> {
    use anyhow::{Context, bail};
    for file in &user.files {
        if file_has_table(file, "model")? {
            bail!(
                "{}: a [model] table is not allowed in an {stage} config: the architecture comes from the parent checkpoint",
                file.display()
            );
        }
    }
    let parent_train: TrainConfig = serde_json::from_value(parent.manifest.train.clone())
        .with_context(|| {
            format!(
                "{}: parent manifest has an unreadable [train]",
                parent.dir.display()
            )
        })?;
    // Continuation switches describe how the parent was trained or started,
    // not how its child should be.
    let mut parent_train = parent_train;
    parent_train.carry_optimizer = false;
    parent_train.keep_state = false;
    // Where a stage runs, not what its parent was: a CPU build must be
    // able to continue a checkpoint trained on several GPUs.
    parent_train.devices = 1;
    parent_train.freeze.clear();
    parent_train.train_only.clear();
    let mut sources = user.clone();
    sources.builtin.insert(
        0,
        (
            format!("configs/{stage}.toml (built in)"),
            builtin.to_string(),
        ),
    );
    let cfg: T = resolve_from(&defaults(parent_train.clone()), &sources)?;
    let train = train_of(&cfg);
    train.validate().map_err(anyhow::Error::msg)?;
    if train.seq_len > parent.manifest.model.max_seq_len {
        bail!(
            "train.seq_len ({}) exceeds the parent's model.max_seq_len ({})",
            train.seq_len,
            parent.manifest.model.max_seq_len
        );
    }
    let (before, after) = (
        serde_json::to_value(&parent_train)?,
        serde_json::to_value(train)?,
    );
    if let (Some(before), Some(after)) = (before.as_object(), after.as_object()) {
        let changed: Vec<String> = after
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(v))
            .map(|(k, v)| format!("{k}: {} → {v}", before.get(k).cloned().unwrap_or_default()))
            .collect();
        tracing::info!(
            "train: {} knobs inherited from the parent; overridden: {}",
            after.len() - changed.len(),
            if changed.is_empty() {
                "none".to_string()
            } else {
                changed.join(", ")
            }
        );
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Outer {
        train: Inner,
        name: String,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        steps: u64,
        lr: f64,
    }

    impl Default for Inner {
        fn default() -> Self {
            Self { steps: 10, lr: 0.1 }
        }
    }

    /// An optional table the defaults leave out (`model.moe`): its keys are
    /// accepted from any source, and a typo inside it is named by the
    /// `--set` that made it.
    #[test]
    fn an_optional_table_takes_its_keys_and_names_a_typo_s_source() {
        #[derive(Debug, Default, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        struct Model {
            moe: Option<crate::moe::MoeConfig>,
        }
        #[derive(Debug, Default, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        struct Top {
            model: Model,
        }
        let sets = |sets: &[&str]| ConfigSources {
            sets: sets.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let top = resolve::<Top>(&sets(&["model.moe.experts=4", "model.moe.top_k=2"])).unwrap();
        assert_eq!(
            top.model.moe.map(|m| (m.experts, m.top_k, m.every)),
            Some((4, 2, 1))
        );
        let err = resolve::<Top>(&sets(&["model.moe.expert=4"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--set model.moe.expert=4") && err.contains("`expert`"),
            "{err}"
        );
    }

    #[test]
    fn layers_override_in_order_and_typos_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[train]\nsteps = 20\nlr = 0.5\n").unwrap();
        let sources = ConfigSources {
            builtin: Vec::new(),
            files: vec![file.clone()],
            sets: vec!["train.lr=0.25".into()],
            env: false,
        };
        let cfg: Outer = resolve(&sources).unwrap();
        assert_eq!(
            cfg.train,
            Inner {
                steps: 20,
                lr: 0.25
            }
        );

        std::fs::write(&file, "[train]\nstpes = 20\n").unwrap();
        let err = resolve::<Outer>(&sources).unwrap_err().to_string();
        assert!(
            err.contains("train.stpes") && err.contains("c.toml"),
            "{err}"
        );

        let sources = ConfigSources {
            builtin: Vec::new(),
            sets: vec!["train.steps=many".into()],
            ..Default::default()
        };
        let err = resolve::<Outer>(&sources).unwrap_err().to_string();
        assert!(err.contains("train.steps"), "{err}");

        // The environment sits between files and --set.
        // SAFETY: no other test reads or writes BATON__ variables.
        unsafe { std::env::set_var("BATON__TRAIN__STEPS", "77") };
        let from_env = ConfigSources {
            builtin: Vec::new(),
            files: vec![],
            sets: vec![],
            env: true,
        };
        let cfg: Outer = resolve(&from_env).unwrap();
        assert_eq!(cfg.train.steps, 77);
        let overridden = ConfigSources {
            sets: vec!["train.steps=5".into()],
            ..from_env.clone()
        };
        assert_eq!(resolve::<Outer>(&overridden).unwrap().train.steps, 5);
        unsafe { std::env::set_var("BATON__TRAIN__STPES", "1") };
        let err = resolve::<Outer>(&from_env).unwrap_err().to_string();
        unsafe {
            std::env::remove_var("BATON__TRAIN__STEPS");
            std::env::remove_var("BATON__TRAIN__STPES");
        }
        assert!(
            err.contains("BATON__TRAIN__STPES") && err.contains("train.stpes"),
            "{err}"
        );

        let sources = ConfigSources {
            builtin: Vec::new(),
            sets: vec!["train.step=3".into()],
            ..Default::default()
        };
        let err = resolve::<Outer>(&sources).unwrap_err().to_string();
        assert!(err.contains("unknown config key `train.step`"), "{err}");
    }

    #[test]
    fn set_accepts_arrays() {
        let sources = ConfigSources {
            sets: vec!["tasks.families=[\"add\", \"sub\"]".into()],
            ..ConfigSources::default()
        };
        #[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(default)]
        struct Tasks {
            families: Vec<String>,
        }
        #[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(default)]
        struct Cfg {
            tasks: Tasks,
        }
        let cfg: Cfg = resolve_from(&Cfg::default(), &sources).unwrap();
        assert_eq!(cfg.tasks.families, vec!["add", "sub"]);
    }

    #[test]
    fn a_map_takes_keys_the_defaults_do_not_list() {
        use crate::tasks::{Family, TasksConfig};
        #[derive(Debug, Default, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        struct Cfg {
            tasks: TasksConfig,
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[tasks.weights]\nmul = 2\n").unwrap();
        let sources = ConfigSources {
            files: vec![file],
            sets: vec!["tasks.weights.count_char=3".into()],
            ..ConfigSources::default()
        };
        let cfg: Cfg = resolve(&sources).unwrap();
        assert_eq!(
            cfg.tasks.weights.into_iter().collect::<Vec<_>>(),
            vec![(Family::Mul, 2), (Family::CountChar, 3)]
        );
        // A key the map's type does not take is still an error, and named.
        let typo = ConfigSources {
            sets: vec!["tasks.weights.cout_char=3".into()],
            ..ConfigSources::default()
        };
        let err = resolve::<Cfg>(&typo).unwrap_err().to_string();
        assert!(err.contains("cout_char"), "{err}");
        // Other tables are still checked key by key.
        let other = ConfigSources {
            sets: vec!["tasks.wieghts.mul=3".into()],
            ..ConfigSources::default()
        };
        let err = resolve::<Cfg>(&other).unwrap_err().to_string();
        assert!(
            err.contains("unknown config key `tasks.wieghts.mul`"),
            "{err}"
        );
    }
}
