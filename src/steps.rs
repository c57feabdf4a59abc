//! The step kinds a recipe may name: each stage of the pipeline and each tool
//! that writes a checkpoint. A kind resolves a step's settings against its
//! parent (a real checkpoint, or the planned one an earlier step will write),
//! runs the step, and says whether a complete output may be kept on resume.
//!
//! Adding a stage to recipes is one `impl StepKind` here and its line in
//! [`Registry::builtin`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use baton_core::backend::{Device, Train};
use baton_core::checkpoint::{self, Checkpoint, StageKind};
use baton_core::config::{ConfigSources, to_toml};

use serde::{Deserialize, Serialize};

/// One step of a recipe, as its `[[step]]` table reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// The step's directory under the run, and how later steps name it.
    pub name: String,
    /// A step kind of the registry: `pretrain`, `sft`, `align`, `import-hf`, …
    pub stage: String,
    /// The step whose checkpoint this one starts from (default: the step before).
    #[serde(default)]
    pub parent: Option<String>,
    /// Config files over the stage's defaults.
    #[serde(default)]
    pub config: Vec<PathBuf>,
    /// `key=value` overrides.
    #[serde(default)]
    pub set: Vec<String>,
    /// Files the step reads (corpus, data, the model to import).
    #[serde(default)]
    pub inputs: Vec<PathBuf>,
    /// Continue the parent's saved training state (weights, optimizer, step)
    /// instead of only its weights: `pretrain --from-state`. The parent step
    /// must set `train.keep_state = true`.
    #[serde(default)]
    pub branch: bool,
    /// An earlier step whose checkpoint teaches this one (pretrain and sft:
    /// distillation with `[distill]`). When the step runs, the recipe runner
    /// puts that step's checkpoint directory here.
    #[serde(default)]
    pub teacher: Option<String>,
    /// The parent holds a LoRA adapter: merge it and train the full model
    /// (`--merge-adapter`).
    #[serde(default)]
    pub merge_adapter: bool,
}

impl StepSpec {
    /// The teacher checkpoint's directory while the step runs.
    pub fn teacher_dir(&self) -> Option<PathBuf> {
        self.teacher.as_ref().map(PathBuf::from)
    }
}

/// What a step will write, known before it runs.
pub struct Resolved {
    /// The checkpoint as far as it is known before training: kind, model,
    /// `[train]` (what a child step's settings are resolved against).
    pub planned: Checkpoint,
    /// The step's resolved settings, as its `run.toml` records them.
    pub run_toml: String,
    /// Files it reads beyond the parent and its inputs (e.g. a tokenizer).
    pub extra_inputs: Vec<PathBuf>,
}

/// How a step runs: fresh (replacing a Baton checkpoint only with `force`),
/// or resuming its interrupted `train_state`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mode {
    pub resume: bool,
    pub force: bool,
}

/// One kind of recipe step.
pub trait StepKind: Sync {
    /// What a recipe's `stage = "…"` names.
    fn name(&self) -> &'static str;
    /// The checkpoint kind the step writes and the parent kinds it accepts.
    fn kind(&self) -> StageKind;
    /// Whether the step may start from nothing even though it accepts
    /// parents (pretrain): then it has a parent only when the recipe names one.
    fn parent_optional(&self) -> bool {
        false
    }
    /// Whether the step can continue its parent's training state
    /// (`branch = true`).
    fn can_branch(&self) -> bool {
        false
    }
    /// Whether the step distils from a `teacher` step.
    fn takes_teacher(&self) -> bool {
        false
    }
    /// Resolves and checks the step's settings against its parent.
    fn resolve(&self, step: &StepSpec, parent: Option<&Checkpoint>, out: &Path)
    -> Result<Resolved>;
    /// The files the step reads besides its parent (hashed on resume).
    fn input_files(&self, step: &StepSpec) -> Result<Vec<PathBuf>> {
        Ok(step.inputs.clone())
    }
    /// Runs the step; returns the checkpoint directory it wrote.
    fn run(
        &self,
        step: &StepSpec,
        parent: Option<&Checkpoint>,
        out: &Path,
        mode: Mode,
        device: &Device,
    ) -> Result<PathBuf>;
    /// Whether the complete output at `out` may stand for this step on
    /// `--resume`: it ran with the settings the step resolves now and on the
    /// same inputs.
    fn check_kept(&self, step: &StepSpec, parent: Option<&Checkpoint>, out: &Path) -> Result<()> {
        let resolved = self.resolve(step, parent, out)?;
        let mut hashes: Vec<String> = parent
            .map(|p| p.manifest_sha256.clone())
            .into_iter()
            .collect();
        for path in self.input_files(step)?.iter().chain(&resolved.extra_inputs) {
            hashes.push(checkpoint::sha256_file(path)?);
        }
        if let Some(teacher) = step.teacher_dir() {
            hashes.push(Checkpoint::open(&teacher, &[])?.manifest_sha256);
        }
        same_settings(out, &resolved.run_toml, &hashes)
    }
}

/// The step kinds a recipe can use, by name.
pub struct Registry {
    kinds: Vec<Box<dyn StepKind>>,
}

impl Registry {
    /// Baton's own: the three stages, the two imports and growth.
    pub fn builtin() -> Self {
        Registry {
            kinds: vec![
                Box::new(Pretrain),
                Box::new(Sft),
                Box::new(Align),
                Box::new(ImportHf),
                Box::new(ImportGguf),
                Box::new(Grow),
                Box::new(Upcycle),
            ],
        }
    }

    /// This registry and one more kind (a kind of the same name is replaced).
    pub fn with(mut self, kind: Box<dyn StepKind>) -> Self {
        self.kinds.retain(|k| k.name() != kind.name());
        self.kinds.push(kind);
        self
    }

    pub fn get(&self, name: &str) -> Option<&dyn StepKind> {
        self.kinds
            .iter()
            .find(|k| k.name() == name)
            .map(|k| k.as_ref())
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.iter().map(|k| k.name()).collect()
    }
}

/// A step's config layers: its files and `--set`s over the stage's defaults.
pub fn sources(step: &StepSpec, env: bool) -> ConfigSources {
    ConfigSources {
        builtin: Vec::new(),
        files: step.config.clone(),
        sets: step.set.clone(),
        env,
    }
}

/// `--resume` keeps a complete step only if it ran with the settings resolved
/// for it now (its `run.toml`) and on the inputs it would get now (each of
/// `inputs`, by sha256, is in its `inputs.json`).
pub fn same_settings(dir: &Path, run_toml: &str, inputs: &[String]) -> Result<()> {
    if let Ok(text) = std::fs::read_to_string(dir.join("inputs.json"))
        && let Ok(recorded) = serde_json::from_str::<BTreeMap<String, String>>(&text)
        && let Some(missing) = inputs.iter().find(|h| !recorded.values().any(|r| r == *h))
    {
        bail!(
            "{}: this complete step ran on other inputs (nothing it read has sha256 {missing}); --resume keeps a step only with the same inputs (start over with --force)",
            dir.display()
        );
    }
    let path = dir.join("run.toml");
    let before =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    if let Some(key) = checkpoint::first_toml_difference(&before, run_toml) {
        bail!(
            "{}: this complete step ran with another `{key}`; --resume keeps a step only with the same settings (start over with --force)",
            dir.display()
        );
    }
    Ok(())
}

fn no_parent(parent: Option<&Checkpoint>) -> Result<()> {
    match parent {
        Some(p) => bail!("takes no parent checkpoint (got {})", p.dir.display()),
        None => Ok(()),
    }
}

fn the_parent(parent: Option<&Checkpoint>) -> Result<&Checkpoint> {
    parent.context("needs a parent checkpoint")
}

struct Pretrain;

impl Pretrain {
    /// The step's config, with the parent's architecture when it continues one.
    fn config(
        step: &StepSpec,
        parent: Option<&Checkpoint>,
    ) -> Result<baton_pretrain::PretrainConfig> {
        let cfg = baton_pretrain::load_config(&sources(step, true))?;
        let Some(parent) = parent else {
            if step.branch {
                bail!("branch = true needs a parent step whose training state it continues");
            }
            return Ok(cfg);
        };
        let cfg = baton_pretrain::with_parent(&cfg, parent)?;
        if parent.manifest.stage == crate::grow::GROW_KIND.name {
            cfg.grow.ramp(cfg.train.steps).map_err(anyhow::Error::msg)?;
        }
        let parent_train: baton_core::train::TrainConfig =
            serde_json::from_value(parent.manifest.train.clone())?;
        for (wanted, what) in [
            (step.branch, "branch = true"),
            (cfg.train.carry_optimizer, "train.carry_optimizer"),
        ] {
            if wanted && !parent_train.keep_state {
                bail!(
                    "{what} continues the parent's training state, but the parent does not keep it (set train.keep_state = true there)"
                );
            }
        }
        Ok(cfg)
    }
}

impl StepKind for Pretrain {
    fn name(&self) -> &'static str {
        "pretrain"
    }
    fn kind(&self) -> StageKind {
        baton_pretrain::KIND
    }
    fn parent_optional(&self) -> bool {
        true
    }
    fn can_branch(&self) -> bool {
        true
    }
    fn takes_teacher(&self) -> bool {
        true
    }
    fn resolve(
        &self,
        step: &StepSpec,
        parent: Option<&Checkpoint>,
        out: &Path,
    ) -> Result<Resolved> {
        let cfg = Self::config(step, parent)?;
        // The data: every source's files must be there before anything runs.
        baton_pretrain::input_files(&step.inputs, &cfg)?;
        Ok(Resolved {
            planned: Checkpoint::planned(out, baton_pretrain::KIND.name, &cfg.model, &cfg.train),
            run_toml: to_toml(&cfg),
            extra_inputs: cfg.tokenizer.path.iter().map(PathBuf::from).collect(),
        })
    }
    /// The step's corpus files, its config's sources, or the default corpus
    /// (fetched once with pip).
    fn input_files(&self, step: &StepSpec) -> Result<Vec<PathBuf>> {
        let cfg = baton_pretrain::load_config(&sources(step, true))?;
        baton_pretrain::input_files(&step.inputs, &cfg)
    }
    fn run(
        &self,
        step: &StepSpec,
        parent: Option<&Checkpoint>,
        out: &Path,
        mode: Mode,
        device: &Device,
    ) -> Result<PathBuf> {
        let cfg = baton_pretrain::load_config(&sources(step, true))?;
        let from = parent.map(|p| p.dir.clone());
        let opts = baton_pretrain::RunOptions {
            merge_adapter: step.merge_adapter,
            out: out.to_path_buf(),
            resume: mode.resume,
            force: mode.force,
            allow_changes: false,
            from_state: from.clone().filter(|_| step.branch),
            from: from.filter(|_| !step.branch),
            teacher: step.teacher_dir(),
        };
        baton_pretrain::run::<Train>(&step.inputs, &cfg, &opts, device)
    }
}

struct Sft;

impl StepKind for Sft {
    fn name(&self) -> &'static str {
        "sft"
    }
    fn takes_teacher(&self) -> bool {
        true
    }
    fn kind(&self) -> StageKind {
        baton_sft::KIND
    }
    fn resolve(
        &self,
        step: &StepSpec,
        parent: Option<&Checkpoint>,
        out: &Path,
    ) -> Result<Resolved> {
        let parent = the_parent(parent)?;
        let cfg = baton_sft::load_config(parent, &sources(step, false))?;
        Ok(Resolved {
            planned: Checkpoint::planned(
                out,
                baton_sft::KIND.name,
                &parent.manifest.model,
                &cfg.train,
            ),
            run_toml: to_toml(&cfg),
            extra_inputs: Vec::new(),
        })
    }
    fn run(
        &self,
        step: &StepSpec,
        parent: Option<&Checkpoint>,
        out: &Path,
        mode: Mode,
        device: &Device,
    ) -> Result<PathBuf> {
        let parent = the_parent(parent)?;
        let cfg = baton_sft::load_config(parent, &sources(step, false))?;
        let opts = baton_sft::RunOptions {
            merge_adapter: step.merge_adapter,
            out: out.to_path_buf(),
            resume: mode.resume,
            force: mode.force,
            allow_changes: false,
            data: step.inputs.clone(),
            teacher: step.teacher_dir(),
        };
        baton_sft::run::<Train>(&parent.dir, &cfg, &opts, device)
    }
}

struct Align;

impl StepKind for Align {
    fn name(&self) -> &'static str {
        "align"
    }
    fn kind(&self) -> StageKind {
        baton_align::KIND
    }
    fn resolve(
        &self,
        step: &StepSpec,
        parent: Option<&Checkpoint>,
        out: &Path,
    ) -> Result<Resolved> {
        let parent = the_parent(parent)?;
        let cfg = baton_align::load_config(parent, &sources(step, false))?;
        Ok(Resolved {
            planned: Checkpoint::planned(
                out,
                baton_align::KIND.name,
                &parent.manifest.model,
                &cfg.train,
            ),
            run_toml: to_toml(&cfg),
            extra_inputs: Vec::new(),
        })
    }
    fn run(
        &self,
        step: &StepSpec,
        parent: Option<&Checkpoint>,
        out: &Path,
        mode: Mode,
        device: &Device,
    ) -> Result<PathBuf> {
        let parent = the_parent(parent)?;
        let cfg = baton_align::load_config(parent, &sources(step, false))?;
        let opts = baton_align::RunOptions {
            merge_adapter: step.merge_adapter,
            out: out.to_path_buf(),
            resume: mode.resume,
            force: mode.force,
            allow_changes: false,
            data: step.inputs.clone(),
        };
        baton_align::run::<Train>(&parent.dir, &cfg, &opts, device)
    }
}

/// `baton grow` as a step: `set = ["layers=4", "masks=false", …]`.
struct Grow;

impl Grow {
    fn settings(step: &StepSpec) -> Result<crate::grow::GrowSettings> {
        Ok(baton_core::config::resolve(&sources(step, false))?)
    }
}

impl StepKind for Grow {
    fn name(&self) -> &'static str {
        "grow"
    }
    fn kind(&self) -> StageKind {
        crate::grow::GROW_KIND
    }
    fn resolve(
        &self,
        step: &StepSpec,
        parent: Option<&Checkpoint>,
        out: &Path,
    ) -> Result<Resolved> {
        let parent = the_parent(parent)?;
        let settings = Self::settings(step)?;
        let model = baton_core::grow::grown_config(&parent.manifest.model, &settings.to())
            .map_err(anyhow::Error::msg)?;
        let train = serde_json::from_value(parent.manifest.train.clone())?;
        Ok(Resolved {
            planned: Checkpoint::planned(out, crate::grow::GROW_KIND.name, &model, &train),
            run_toml: to_toml(&settings),
            extra_inputs: Vec::new(),
        })
    }
    fn run(
        &self,
        step: &StepSpec,
        parent: Option<&Checkpoint>,
        out: &Path,
        mode: Mode,
        _device: &Device,
    ) -> Result<PathBuf> {
        let parent = the_parent(parent)?;
        let s = Self::settings(step)?;
        crate::grow::grow(&parent.dir, &s.to(), s.masks, s.seed, out, mode.force)
    }
    /// Kept when it grew this parent to the same sizes, masks and seed.
    fn check_kept(&self, step: &StepSpec, parent: Option<&Checkpoint>, out: &Path) -> Result<()> {
        let resolved = self.resolve(step, parent, out)?;
        let s = Self::settings(step)?;
        let (done, record) = tool_output::<baton_core::model::GrowthRecord>(
            out,
            parent,
            crate::grow::GROW_KIND.name,
            checkpoint::GROW_FILE,
        )?;
        let same = done.is_some_and(|m| m.model == resolved.planned.manifest.model)
            && record.masked == s.masks
            && record.seed == s.seed;
        kept_if(same, out, "grew")
    }
}

/// `baton upcycle` as a step: `set = ["experts=4", "top_k=2", …]`.
struct Upcycle;

impl Upcycle {
    fn settings(step: &StepSpec) -> Result<crate::grow::UpcycleSettings> {
        Ok(baton_core::config::resolve(&sources(step, false))?)
    }
}

impl StepKind for Upcycle {
    fn name(&self) -> &'static str {
        "upcycle"
    }
    fn kind(&self) -> StageKind {
        crate::grow::UPCYCLE_KIND
    }
    fn resolve(
        &self,
        step: &StepSpec,
        parent: Option<&Checkpoint>,
        out: &Path,
    ) -> Result<Resolved> {
        let parent = the_parent(parent)?;
        let s = Self::settings(step)?;
        let model =
            baton_core::grow::upcycled_config(&parent.manifest.model, s.experts, s.top_k, s.every)
                .map_err(anyhow::Error::msg)?;
        let train = serde_json::from_value(parent.manifest.train.clone())?;
        Ok(Resolved {
            planned: Checkpoint::planned(out, crate::grow::UPCYCLE_KIND.name, &model, &train),
            run_toml: to_toml(&s),
            extra_inputs: Vec::new(),
        })
    }
    fn run(
        &self,
        step: &StepSpec,
        parent: Option<&Checkpoint>,
        out: &Path,
        mode: Mode,
        _device: &Device,
    ) -> Result<PathBuf> {
        let parent = the_parent(parent)?;
        crate::grow::upcycle(&parent.dir, &Self::settings(step)?, out, mode.force)
    }
    /// Kept when it upcycled this parent with the same settings.
    fn check_kept(&self, step: &StepSpec, parent: Option<&Checkpoint>, out: &Path) -> Result<()> {
        let s = Self::settings(step)?;
        let (done, record) = tool_output::<crate::grow::UpcycleSettings>(
            out,
            parent,
            crate::grow::UPCYCLE_KIND.name,
            crate::grow::UPCYCLE_FILE,
        )?;
        kept_if(done.is_some() && record == s, out, "upcycled")
    }
}

/// A complete tool step's output (`grow`, `upcycle`) and its record file:
/// the output's manifest when its parent is `parent` (else `None`), and the
/// record.
fn tool_output<T: serde::de::DeserializeOwned>(
    out: &Path,
    parent: Option<&Checkpoint>,
    kind: &str,
    record_file: &str,
) -> Result<(Option<checkpoint::Manifest>, T)> {
    let done = Checkpoint::open(out, &[kind])?;
    let record: T = serde_json::from_slice(
        &std::fs::read(out.join(record_file))
            .with_context(|| format!("{}: reading its {kind} record", out.display()))?,
    )?;
    let parent = the_parent(parent)?;
    let same_parent = done
        .manifest
        .parents
        .first()
        .is_some_and(|p| p.manifest_sha256 == parent.manifest_sha256);
    Ok((same_parent.then_some(done.manifest), record))
}

/// `Ok` when a complete tool step is `same` as asked, else the one-line
/// refusal of `--resume` (`did`: what the tool did, "grew", "upcycled").
fn kept_if(same: bool, out: &Path, did: &str) -> Result<()> {
    if !same {
        bail!(
            "{}: this complete step {did} another parent or with other settings; --resume keeps a step only with the same settings (start over with --force)",
            out.display()
        );
    }
    Ok(())
}

/// The one input of an import step (`inputs = ["path"]`).
fn single_input<'a>(step: &'a StepSpec, what: &str) -> Result<&'a Path> {
    match step.inputs.as_slice() {
        [one] => Ok(one),
        _ => bail!("needs exactly one input, the {what} (inputs = [\"…\"])"),
    }
}

/// Import steps keep a complete output when every source file it recorded is
/// unchanged.
fn import_kept(out: &Path) -> Result<()> {
    let done = Checkpoint::open(out, &[])?;
    if !checkpoint::is_imported(&done.manifest) {
        bail!("{}: not an imported checkpoint", out.display());
    }
    for data in &done.manifest.data {
        let path = [checkpoint::HF_IMPORT, checkpoint::GGUF_IMPORT]
            .iter()
            .find_map(|kind| data.source.strip_prefix(kind))
            .map(|path| PathBuf::from(path.trim_start()))
            .unwrap_or_default();
        if checkpoint::sha256_file(&path).ok().as_deref() != Some(data.sha256.as_str()) {
            bail!(
                "{}: imported from {} which has changed since; --resume keeps a step only with the same inputs (start over with --force)",
                out.display(),
                path.display()
            );
        }
    }
    Ok(())
}

struct ImportHf;

impl StepKind for ImportHf {
    fn name(&self) -> &'static str {
        "import-hf"
    }
    fn kind(&self) -> StageKind {
        crate::interop::IMPORT_KIND
    }
    fn resolve(
        &self,
        step: &StepSpec,
        parent: Option<&Checkpoint>,
        out: &Path,
    ) -> Result<Resolved> {
        no_parent(parent)?;
        let dir = single_input(step, "Hugging Face model directory")?;
        let model = crate::interop::hf::model_config_from_hf(&dir.join(checkpoint::CONFIG_FILE))?;
        let train = crate::interop::import_train_config(&model);
        Ok(Resolved {
            planned: Checkpoint::planned(out, crate::interop::IMPORT_KIND.name, &model, &train),
            run_toml: String::new(),
            extra_inputs: Vec::new(),
        })
    }
    fn run(
        &self,
        step: &StepSpec,
        _parent: Option<&Checkpoint>,
        out: &Path,
        mode: Mode,
        _device: &Device,
    ) -> Result<PathBuf> {
        let dir = single_input(step, "Hugging Face model directory")?;
        crate::interop::hf::import_hf(dir, out, mode.force)
    }
    fn check_kept(&self, _step: &StepSpec, _parent: Option<&Checkpoint>, out: &Path) -> Result<()> {
        import_kept(out)
    }
}

struct ImportGguf;

impl StepKind for ImportGguf {
    fn name(&self) -> &'static str {
        "import-gguf"
    }
    fn kind(&self) -> StageKind {
        crate::interop::IMPORT_KIND
    }
    fn resolve(
        &self,
        step: &StepSpec,
        parent: Option<&Checkpoint>,
        out: &Path,
    ) -> Result<Resolved> {
        no_parent(parent)?;
        let file = single_input(step, "GGUF file")?;
        let gguf = crate::interop::gguf::Gguf::open(file)?;
        let model = crate::interop::gguf::model_config(&gguf)?;
        let train = crate::interop::import_train_config(&model);
        Ok(Resolved {
            planned: Checkpoint::planned(out, crate::interop::IMPORT_KIND.name, &model, &train),
            run_toml: String::new(),
            extra_inputs: Vec::new(),
        })
    }
    fn run(
        &self,
        step: &StepSpec,
        _parent: Option<&Checkpoint>,
        out: &Path,
        mode: Mode,
        _device: &Device,
    ) -> Result<PathBuf> {
        let file = single_input(step, "GGUF file")?;
        crate::interop::gguf::import_gguf(file, out, mode.force)
    }
    fn check_kept(&self, _step: &StepSpec, _parent: Option<&Checkpoint>, out: &Path) -> Result<()> {
        import_kept(out)
    }
}
