//! The `pretrain` stage: raw text in, a language model checkpoint out. It
//! trains from scratch, or goes on from a checkpoint (`--from`, continual
//! pretraining) or from a saved training state (`--from-state`, e.g. a decay
//! branched from a stable phase), over one or more weighted data sources and
//! phases that change the window, the mixture and the learning rate.

pub mod phases;
pub mod sources;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use baton_core::burn::module::AutodiffModule;
use baton_core::burn::optim::GradientsParams;
use baton_core::burn::tensor::ElementConversion;
use baton_core::burn::tensor::backend::{AutodiffBackend, Backend};
use baton_core::checkpoint::{self, Checkpoint, Manifest, StageDir, StageKind, TrainState};
use baton_core::data::{Corpus, DataError, TokenStream, step_rng};
use baton_core::error::InvalidSetting;
use baton_core::model::{Llama, ModelConfig};
use baton_core::moe::{Balance, MoeTrainConfig};
use baton_core::tokenizer::Tokenizer;
use baton_core::train::distill::{self, DistillConfig, Distiller};
use baton_core::train::{Batch, Start, TrainConfig, TrainOutcome, TrainTask, train_from};
use serde::{Deserialize, Serialize};

use phases::Phase;
use sources::{Source, SourceConfig};

/// This stage's checkpoint kind: `pretrain`. It starts from nothing, or
/// continues a pretrained or imported model (`--from`).
pub const KIND: StageKind = StageKind {
    name: "pretrain",
    accepts: &["pretrain", "merge", "grow", "upcycle"],
};

/// `configs/pretrain.toml` in Rust: what runs when nothing is configured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    pub model: ModelConfig,
    pub tokenizer: TokenizerConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    /// Phases of the run, in order (see [`phases`]).
    pub phases: Vec<Phase>,
    /// Distillation from `--teacher` (ignored without one).
    pub distill: DistillConfig,
    /// LoRA adapters for continual pretraining (`--from`; off unless `rank`
    /// is set).
    pub lora: baton_core::lora::LoraConfig,
    /// How a model `baton grow` wrote takes on its new structure (used only
    /// `--from` such a checkpoint).
    pub grow: GrowConfig,
    /// The auxiliary losses of a mixture-of-experts model (`model.moe`, or
    /// a parent written by `baton upcycle`); ignored for a dense one.
    pub moe: MoeTrainConfig,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrowConfig {
    /// Optimizer steps over which the growth masks ramp from 0 to 1 (then
    /// the model is an ordinary one). Default: a tenth of `train.steps`.
    pub ramp_steps: Option<u64>,
}

impl GrowConfig {
    /// The ramp of a run of `steps`, checked: at least 1, at most `steps`
    /// (the stage's checkpoint must be an ordinary model).
    pub fn ramp(&self, steps: u64) -> Result<u64, InvalidSetting> {
        let ramp = self.ramp_steps.unwrap_or(steps.div_ceil(10)).max(1);
        if self.ramp_steps == Some(0) || ramp > steps {
            return Err(format!(
                "grow.ramp_steps = {} must be between 1 and train.steps ({steps}): the masks must reach 1 within this stage",
                self.ramp_steps.unwrap_or(ramp)
            )
            .into());
        }
        Ok(ramp)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerConfig {
    /// An existing `tokenizer.json` to use instead of training one. It must hold
    /// Baton's special tokens.
    pub path: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Share of each source (its last bytes) held out for validation.
    pub val_fraction: f64,
    /// Named, weighted sources (see [`sources`]). Empty: the `--corpus` files
    /// (or the default corpus) as the one source `corpus`.
    pub sources: Vec<SourceConfig>,
    /// How sources mix: `rows` (each row of a micro-batch drawn from a
    /// source by weight; the default) or `micro` (all rows of a micro-batch
    /// from one source, drawn by weight).
    pub mix: Mix,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mix {
    #[default]
    Rows,
    Micro,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            val_fraction: 0.1,
            sources: Vec::new(),
            mix: Mix::Rows,
        }
    }
}

impl PretrainConfig {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        self.model.validate()?;
        self.train.validate()?;
        self.distill.validate()?;
        self.moe.validate()?;
        if self.train.seq_len > self.model.max_seq_len {
            return Err(format!(
                "train.seq_len ({}) exceeds model.max_seq_len ({})",
                self.train.seq_len, self.model.max_seq_len
            )
            .into());
        }
        if !(self.data.val_fraction > 0.0 && self.data.val_fraction < 1.0) {
            return Err("data.val_fraction must be in (0, 1)".into());
        }
        if self.model.vocab_size < 256 + baton_core::tokenizer::SPECIAL_TOKENS.len() {
            return Err(
                "model.vocab_size must be at least 263 (256 bytes + 7 special tokens)".into(),
            );
        }
        let (train_names, all_names) = if self.data.sources.is_empty() {
            (vec![sources::CORPUS], vec![sources::CORPUS])
        } else {
            sources::validate(&self.data.sources)?;
            let names = |eval: bool| {
                self.data
                    .sources
                    .iter()
                    .filter(|s| eval || !s.eval_only)
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
            };
            (names(false), names(true))
        };
        phases::validate(
            &self.phases,
            &self.train,
            self.model.max_seq_len,
            &train_names,
            &all_names,
        )
    }
}

/// Where a pretrain run writes, what it starts from, and how it treats what
/// is there.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub out: PathBuf,
    pub resume: bool,
    pub force: bool,
    /// With `resume`: continue even if the settings or corpus changed.
    pub allow_changes: bool,
    /// Continue training this checkpoint (its architecture and tokenizer).
    pub from: Option<PathBuf>,
    /// Continue this checkpoint's saved `train_state` (weights, optimizer,
    /// step) under this run's settings.
    pub from_state: Option<PathBuf>,
    /// Distil from this checkpoint with `[distill]`: the student takes its
    /// tokenizer (and must have its vocabulary size).
    pub teacher: Option<PathBuf>,
    /// `--from` holds a LoRA adapter: merge it and train the full model.
    pub merge_adapter: bool,
}

impl RunOptions {
    /// The checkpoint the run starts from, if any, and how (`--from` or
    /// `--from-state`).
    fn parent(&self) -> Result<Option<(&Path, &'static str)>> {
        match (&self.from, &self.from_state) {
            (Some(_), Some(_)) => bail!("--from and --from-state: give one of them"),
            (Some(p), None) => Ok(Some((p, "parent"))),
            (None, Some(p)) => Ok(Some((p, "state"))),
            (None, None) => Ok(None),
        }
    }
}

/// The data files a run reads: `corpus` (default: the Shakespeare corpus)
/// when `cfg` names no sources, else every source's files.
pub fn input_files(corpus: &[PathBuf], cfg: &PretrainConfig) -> Result<Vec<PathBuf>> {
    Ok(source_files(corpus, cfg)?
        .into_iter()
        .flat_map(|(_, files)| files)
        .collect())
}

fn source_files(
    corpus: &[PathBuf],
    cfg: &PretrainConfig,
) -> Result<Vec<(SourceConfig, Vec<PathBuf>)>> {
    if cfg.data.sources.is_empty() {
        let files = if corpus.is_empty() {
            baton_core::data::default_corpus()?
        } else {
            corpus.to_vec()
        };
        let one = SourceConfig {
            name: sources::CORPUS.into(),
            path: String::new(),
            weight: Some(1.0),
            eval_only: false,
        };
        return Ok(vec![(one, files)]);
    }
    if !corpus.is_empty() {
        bail!("--corpus and [[data.sources]] both name the data: give one of them");
    }
    cfg.data
        .sources
        .iter()
        .map(|s| Ok((s.clone(), sources::files(s)?)))
        .collect()
}

/// Trains a model on `corpus` (or the config's `[[data.sources]]`) and writes
/// a `pretrain` checkpoint to `opts.out`: from scratch with a tokenizer
/// trained on the training text, or from the checkpoint `opts.from` /
/// `opts.from_state` names. Returns the checkpoint directory.
pub fn run<B: AutodiffBackend>(
    corpus: &[PathBuf],
    cfg: &PretrainConfig,
    opts: &RunOptions,
    device: &B::Device,
) -> Result<PathBuf> {
    // 1. Read the parent, the data and the config before touching the output.
    let parent = open_parent(opts, cfg)?;
    let teacher = opts
        .teacher
        .as_deref()
        .map(distill::open_teacher)
        .transpose()?;
    let cfg = &match &parent {
        Some((p, _)) => with_parent(cfg, p)?,
        None => {
            let cfg = match &teacher {
                Some(t) => with_teacher_vocabulary(cfg, t),
                None => cfg.clone(),
            };
            cfg.validate().map_err(anyhow::Error::msg)?;
            cfg
        }
    };
    if let Some(t) = &teacher {
        check_student_of(t, cfg, parent.as_ref().map(|(p, _)| p))?;
    }
    // A grown parent's masks ramp in over `grow.ramp_steps` of this run.
    let ramp = match &parent {
        Some((p, "parent")) if p.growth()?.is_some() => {
            if cfg.lora.rank.is_some() {
                bail!(
                    "{}: a grown model ramps its masks in full training; [lora] would keep the masked weights as its base (leave [lora] out)",
                    p.dir.display()
                );
            }
            Some(cfg.grow.ramp(cfg.train.steps).map_err(anyhow::Error::msg)?)
        }
        _ => None,
    };
    let adapter = match &parent {
        Some((p, "parent")) => baton_core::stage_model::plan(p, &cfg.lora, opts.merge_adapter)?,
        _ if cfg.lora.rank.is_some() || opts.merge_adapter => bail!(
            "[lora] and --merge-adapter apply to continual pretraining (--from a checkpoint), not to {}",
            if parent.is_some() {
                "--from-state"
            } else {
                "a model trained from scratch"
            }
        ),
        _ => None,
    };
    let spec = adapter.as_ref().map(|a| a.spec());
    baton_core::train::freeze::check(&cfg.train, &cfg.model, spec.as_ref())
        .map_err(anyhow::Error::msg)?;
    let mut read = Vec::new();
    for (spec, files) in source_files(corpus, cfg)? {
        let corpus = Corpus::read(&files).map_err(|e| match spec.path.as_str() {
            "" => anyhow::Error::new(e),
            _ => anyhow::anyhow!("data source \"{}\": {e}", spec.name),
        })?;
        read.push((spec, files, corpus));
    }
    let mut inputs: Vec<&Path> = read
        .iter()
        .flat_map(|(_, files, _)| files.iter().map(PathBuf::as_path))
        .chain(cfg.tokenizer.path.as_deref())
        .collect();
    inputs.extend(parent.as_ref().map(|(p, _)| p.dir.as_path()));
    inputs.extend(opts.teacher.as_deref());
    // How the run starts, checked before anything is written.
    let start = match &parent {
        _ if opts.resume => Start::Resume,
        None => Start::Fresh,
        Some((p, "state")) => Start::Branch(p.dir.clone()),
        Some((p, _)) => Start::for_child(false, p, &cfg.train)?,
    };
    let stage = StageDir::open(&opts.out, opts.resume, opts.force, &inputs)?;

    // 2. Tokenizer: the parent's, or trained on the training splits only (or
    //    loaded); then every source split and tokenised.
    let splits: Vec<(&str, &str)> = read
        .iter()
        .map(|(_, _, c)| c.split(cfg.data.val_fraction))
        .collect();
    let tokenizer = match &parent {
        Some((p, _)) => {
            if !opts.resume {
                stage.copy_from(p, checkpoint::TOKENIZER_FILE)?;
            }
            p.tokenizer()?
        }
        None => {
            let train_texts: Vec<&str> = read
                .iter()
                .zip(&splits)
                .filter(|((s, _, _), _)| !s.eval_only)
                .map(|(_, (train, _))| *train)
                .collect();
            tokenizer_for(
                cfg,
                opts,
                &stage,
                &read[0].2,
                &train_texts,
                teacher.as_ref(),
            )?
        }
    };
    let mut tokenized = Vec::new();
    for ((_, _, corpus), (train_text, val_text)) in read.iter().zip(&splits) {
        let (train, val) = tokenize(&tokenizer, corpus, [train_text, val_text], cfg)?;
        tokenized.push((train, val, val_text.len()));
    }
    let mut data = Vec::new();
    for ((spec, _, corpus), (train, val, val_bytes)) in read.into_iter().zip(tokenized) {
        data.push(Source {
            weight: spec.weight.unwrap_or(0.0),
            name: spec.name,
            eval_only: spec.eval_only,
            corpus,
            train,
            val,
            val_bytes,
        });
    }
    let longest = cfg
        .phases
        .iter()
        .filter_map(|p| p.seq_len)
        .chain([cfg.train.seq_len])
        .max()
        .unwrap_or(cfg.train.seq_len);
    sources::check_long_enough(&data, longest)?;
    let all_refs: Vec<checkpoint::DataRef> = data.iter().flat_map(Source::data_refs).collect();
    let mut run_inputs = checkpoint::run_inputs(parent.as_ref().map(|(p, _)| p), &all_refs);
    if let Some(path) = &cfg.tokenizer.path {
        run_inputs.push((path.display().to_string(), checkpoint::sha256_file(path)?));
    }
    run_inputs.extend(teacher.as_ref().map(distill::teacher_input));
    stage.record_run(
        &baton_core::config::to_toml(cfg),
        &run_inputs,
        opts.resume,
        opts.allow_changes,
    )?;

    // 3. Train with the loop every stage shares.
    let model = match &parent {
        None => cfg.model.init::<B>(cfg.train.seed, device),
        Some((p, "parent")) => {
            baton_core::stage_model::stage_model::<B>(p, adapter.as_ref(), cfg.train.seed, device)?
        }
        Some((p, _)) => p.model::<B>(device)?,
    };
    let mut model = model;
    if let Some(moe) = &cfg.model.moe {
        tracing::info!(
            "mixture of experts: {} experts, top {}, every {} layer(s); balance {:?} weight {}, z-loss weight {}",
            moe.experts,
            moe.top_k,
            moe.every,
            cfg.moe.balance,
            cfg.moe.balance_weight,
            cfg.moe.z_weight
        );
        model.balance = Some(Balance::new(cfg.moe.clone()));
    }
    if let (Some(growth), Some(ramp)) = (&mut model.growth, ramp) {
        growth.ramp_steps = ramp;
        tracing::info!(
            "grown from {} layers, d_model {}, d_ff {}: the new structure ramps in over {ramp} steps",
            growth.spec.layers,
            growth.spec.d_model,
            growth.spec.d_ff
        );
    }
    tracing::info!(
        "model: {} parameters, {} layers, d_model {}, backend {}",
        cfg.model.num_params(),
        cfg.model.n_layers,
        cfg.model.d_model,
        B::name(device)
    );
    let mut task = PretrainTask::<B> {
        continues: parent.is_some(),
        mix: cfg.data.mix,
        sources: data,
        phases: cfg.phases.clone(),
        cfg: cfg.train.clone(),
        device: device.clone(),
        distiller: None,
    };
    if let Some(teacher) = &teacher {
        let distiller = Distiller::prepare(
            teacher,
            &cfg.distill,
            stage.path(distill::DEFAULT_CACHE),
            cfg.train.steps,
            |step| task.batches(step),
            device,
        )?;
        task.distiller = Some(distiller);
    }
    let outcome = train_from(model, &cfg.train, &mut task, &stage.work, &start, device)?;

    // 4. Hand the baton to `sft`.
    let adapter = stage.write_trained(
        &outcome.model.valid(),
        adapter,
        outcome.trained.as_deref(),
        &cfg.model,
        &tokenizer.special,
    )?;
    let mut manifest = manifest(cfg, &outcome, &tokenizer, &task.sources, &stage, &parent)?;
    manifest.adapter = adapter;
    manifest
        .parents
        .extend(teacher.iter().map(|t| t.as_parent("teacher")));
    Ok(stage.commit(manifest)?)
}

/// The checkpoint `--from` or `--from-state` names, opened and checked: a
/// kind pretrain continues, a tokenizer that is `tokenizer.path`'s if that is
/// set, and for `--from-state` a saved training state.
fn open_parent(
    opts: &RunOptions,
    cfg: &PretrainConfig,
) -> Result<Option<(Checkpoint, &'static str)>> {
    let Some((dir, role)) = opts.parent()? else {
        return Ok(None);
    };
    let flag = if role == "state" {
        "--from-state"
    } else {
        "--from"
    };
    let parent =
        Checkpoint::open(dir, KIND.accepts).with_context(|| format!("{flag} {}", dir.display()))?;
    if let Some(path) = &cfg.tokenizer.path {
        let sha = checkpoint::sha256_file(path)?;
        if sha != parent.manifest.tokenizer_sha256 {
            bail!(
                "{}: tokenizer.path differs from the tokenizer of {} (continued training keeps the parent's tokenizer; leave tokenizer.path out)",
                path.display(),
                parent.dir.display()
            );
        }
    }
    if role == "state" {
        match TrainState::peek(&parent.dir)? {
            Some(state) if state.step >= cfg.train.steps => bail!(
                "{}: its train_state is at step {}, not before train.steps ({}): nothing to train",
                parent.dir.display(),
                state.step,
                cfg.train.steps
            ),
            Some(state) => tracing::info!(
                "--from-state: {} holds a train_state at step {}",
                parent.dir.display(),
                state.step
            ),
            None => bail!(
                "{}: no train_state to continue (--from-state needs one: train with train.keep_state = true, or save_every)",
                parent.dir.display()
            ),
        }
    }
    Ok(Some((parent, role)))
}

/// A from-scratch student of `teacher` takes the teacher's vocabulary size
/// when the config leaves `model.vocab_size` at its default.
fn with_teacher_vocabulary(cfg: &PretrainConfig, teacher: &Checkpoint) -> PretrainConfig {
    let mut cfg = cfg.clone();
    let theirs = teacher.manifest.model.vocab_size;
    if cfg.model.vocab_size == ModelConfig::default().vocab_size && cfg.model.vocab_size != theirs {
        tracing::info!("model.vocab_size = {theirs}, the teacher's");
        cfg.model.vocab_size = theirs;
    }
    cfg
}

/// Checks that `teacher` can teach this run's model: the same vocabulary
/// size, and the same tokenizer as the parent (continued pretraining) or as
/// `tokenizer.path` (a from-scratch student otherwise takes the teacher's).
fn check_student_of(
    teacher: &Checkpoint,
    cfg: &PretrainConfig,
    parent: Option<&Checkpoint>,
) -> Result<()> {
    let tokenizer_sha = match (parent, &cfg.tokenizer.path) {
        (Some(p), _) => p.manifest.tokenizer_sha256.clone(),
        (None, Some(path)) => checkpoint::sha256_file(path)?,
        (None, None) => teacher.manifest.tokenizer_sha256.clone(),
    };
    distill::check_teacher(teacher, &tokenizer_sha, cfg.model.vocab_size)
}

/// The config of a run that continues `parent`: the parent's architecture (a
/// `[model]` the user changed from the defaults must equal it), checked.
pub fn with_parent(cfg: &PretrainConfig, parent: &Checkpoint) -> Result<PretrainConfig> {
    let cfg = adopt_parent_model(cfg, parent)?;
    cfg.validate().map_err(anyhow::Error::msg)?;
    Ok(cfg)
}

fn adopt_parent_model(cfg: &PretrainConfig, parent: &Checkpoint) -> Result<PretrainConfig> {
    let theirs = &parent.manifest.model;
    if cfg.model != ModelConfig::default() && cfg.model != *theirs {
        let key = checkpoint::first_toml_difference(
            &baton_core::config::to_toml(&cfg.model),
            &baton_core::config::to_toml(theirs),
        )
        .unwrap_or_default();
        bail!(
            "model.{key} differs from the architecture of {} (continued training keeps the parent's [model]; leave it out)",
            parent.dir.display()
        );
    }
    let mut cfg = cfg.clone();
    cfg.model = theirs.clone();
    Ok(cfg)
}

/// The run's tokenizer: the one saved before an interruption, the user's
/// (`tokenizer.path`), or a byte-level BPE trained on the training splits;
/// saved into the checkpoint.
fn tokenizer_for(
    cfg: &PretrainConfig,
    opts: &RunOptions,
    stage: &StageDir,
    corpus: &Corpus,
    train_texts: &[&str],
    teacher: Option<&Checkpoint>,
) -> Result<Tokenizer> {
    let tokenizer_path = stage.path(checkpoint::TOKENIZER_FILE);
    let tokenizer = if opts.resume {
        Tokenizer::load(&tokenizer_path)?
    } else {
        let tokenizer = match (&cfg.tokenizer.path, teacher) {
            (Some(path), _) => Tokenizer::load(path)?,
            (None, Some(teacher)) => {
                tracing::info!("the teacher's tokenizer ({})", teacher.dir.display());
                teacher.tokenizer()?
            }
            (None, None) => {
                tracing::info!(
                    "training a {}-entry byte-level BPE on {}",
                    cfg.model.vocab_size,
                    corpus.describe()
                );
                Tokenizer::train(
                    train_texts.iter().flat_map(|t| t.split_inclusive('\n')),
                    cfg.model.vocab_size,
                )?
            }
        };
        tokenizer.save(&tokenizer_path)?;
        tokenizer
    };
    if tokenizer.vocab_size() > cfg.model.vocab_size {
        bail!(
            "{}: tokenizer has {} entries, more than model.vocab_size {}",
            tokenizer_path.display(),
            tokenizer.vocab_size(),
            cfg.model.vocab_size
        );
    }
    Ok(tokenizer)
}

/// A source's training and validation splits as tokens, each checked to be
/// long enough (a training window, two validation tokens).
fn tokenize(
    tokenizer: &Tokenizer,
    corpus: &Corpus,
    [train_text, val_text]: [&str; 2],
    cfg: &PretrainConfig,
) -> Result<(TokenStream, TokenStream)> {
    let train_tokens = TokenStream {
        tokens: tokenizer.encode_long(train_text)?,
    };
    let val_tokens = TokenStream {
        tokens: tokenizer.encode_long(val_text)?,
    };
    let needed = cfg.train.seq_len + 1;
    for (what, stream, min) in [
        ("the training split", &train_tokens, needed),
        ("the validation split", &val_tokens, 2),
    ] {
        if stream.tokens.len() < min {
            return Err(DataError::TooSmall {
                paths: corpus.describe(),
                what,
                tokens: stream.tokens.len(),
                needed: min,
            }
            .into());
        }
    }
    tracing::info!(
        "{}: {} bytes → {} training / {} validation tokens ({:.3} tokens per byte)",
        corpus.describe(),
        corpus.text.len(),
        train_tokens.tokens.len(),
        val_tokens.tokens.len(),
        val_tokens.tokens.len() as f64 / val_text.len() as f64
    );
    Ok((train_tokens, val_tokens))
}

/// The pretrain checkpoint's manifest: the data files (tokens counted), the
/// config, the parent when it continued one, and the run's metrics with
/// `val_bpb` and `params`.
fn manifest<B: AutodiffBackend>(
    cfg: &PretrainConfig,
    outcome: &TrainOutcome<B>,
    tokenizer: &Tokenizer,
    sources: &[Source],
    stage: &StageDir,
    parent: &Option<(Checkpoint, &'static str)>,
) -> Result<Manifest> {
    let mut data = Vec::new();
    for source in sources {
        for (file, text) in source.corpus.sources.iter().zip(source.corpus.file_texts()) {
            let mut file = file.clone();
            file.tokens = tokenizer.encode_long(text)?.len() as u64;
            data.push(file);
        }
    }
    let mut metrics = outcome.manifest_metrics();
    let val_bpb = metrics.get("val/bpb").copied().unwrap_or(f64::NAN);
    metrics.insert("val_bpb".into(), val_bpb);
    metrics.insert("params".into(), cfg.model.num_params() as f64);
    Ok(Manifest {
        format_version: checkpoint::FORMAT_VERSION,
        stage: KIND.name.to_string(),
        baton_version: baton_core::VERSION.to_string(),
        created_at: baton_core::now_rfc3339(),
        model: cfg.model.clone(),
        tokenizer_sha256: checkpoint::sha256_file(&stage.path(checkpoint::TOKENIZER_FILE))?,
        chat_template: parent
            .as_ref()
            .and_then(|(p, _)| p.manifest.chat_template.clone()),
        parents: parent.iter().map(|(p, role)| p.as_parent(role)).collect(),
        data,
        train: serde_json::to_value(&cfg.train)?,
        step: outcome.step,
        tokens_seen: outcome.tokens_seen,
        metrics,
        files: BTreeMap::new(),
        trained: outcome.trained.clone(),
        adapter: None,
    })
}

/// Windows drawn from the sources by the mixture of the step's phase;
/// validation loss and bits per byte, per source and over the training ones.
struct PretrainTask<B: AutodiffBackend> {
    /// Whether the run continues a checkpoint (it then evaluates at its start).
    continues: bool,
    sources: Vec<Source>,
    phases: Vec<Phase>,
    cfg: TrainConfig,
    device: B::Device,
    /// The teacher, when distilling.
    distiller: Option<Distiller<B>>,
    /// How a micro-batch's rows draw their sources.
    mix: Mix,
}

impl<B: AutodiffBackend> TrainTask<B> for PretrainTask<B> {
    fn row_parallel(&self) -> bool {
        true
    }

    fn loss_grads(
        &mut self,
        model: &Llama<B>,
        _micro: usize,
        batch: &Batch,
        workers: usize,
        scale: f64,
        device: &B::Device,
    ) -> (f64, GradientsParams) {
        let distiller = self.distiller.as_mut();
        distill::loss_grads(distiller, model, batch, workers, scale, device)
    }

    fn lr_at(&self, cfg: &TrainConfig, step: u64) -> f64 {
        phases::lr_at(&self.phases, cfg, step)
    }

    fn eval_before_training(&self) -> bool {
        self.continues
    }

    fn batches(&mut self, step: u64) -> Vec<Batch> {
        let at = phases::at(&self.phases, &self.cfg, step);
        let weights = sources::mixture(&self.sources, at.weights);
        (0..self.cfg.grad_accum as u64)
            .map(|micro| {
                let mut rng = step_rng(self.cfg.seed, 0, step, micro);
                let sample = match self.mix {
                    Mix::Rows => sources::sample,
                    Mix::Micro => sources::sample_one_source,
                };
                let (inputs, targets) =
                    sample(&self.sources, &weights, at.batch_size, at.seq_len, &mut rng);
                Batch::dense(at.batch_size, at.seq_len, inputs, targets)
            })
            .collect()
    }

    fn evaluate(&mut self, model: &Llama<B::InnerBackend>, full: bool) -> BTreeMap<String, f64> {
        let limit = if full { 0 } else { self.cfg.eval_tokens };
        let mut metrics = BTreeMap::new();
        let (mut nll_all, mut count_all, mut bits_all, mut bytes_all) = (0.0, 0.0, 0.0, 0.0);
        let mut only = None;
        let trained = self.sources.iter().filter(|s| !s.eval_only).count();
        // An MoE model's final evaluation also counts how each source's
        // held-out tokens spread over the experts.
        let balance = model.balance.as_ref().filter(|_| full);
        let mut shares: Vec<Vec<Vec<f64>>> = Vec::new();
        for source in &self.sources {
            let eval = || {
                evaluate_stream(
                    model,
                    &source.val,
                    self.cfg.seq_len,
                    self.cfg.batch_size,
                    limit,
                    &self.device,
                )
            };
            let (nll, count) = match balance {
                Some(balance) => {
                    let mut result = (0.0, 0.0);
                    let counts = balance.count(|| result = eval());
                    let layers = baton_core::moe::shares_per_layer(&counts);
                    for (l, layer) in layers.iter().enumerate() {
                        for (j, share) in layer.iter().enumerate() {
                            metrics.insert(format!("moe/share/{}/{l}/{j}", source.name), *share);
                        }
                    }
                    shares.push(layers);
                    result
                }
                None => eval(),
            };
            let loss = nll / count.max(1.0);
            let bpb = bits_per_byte(loss, source.val.tokens.len(), source.val_bytes);
            if self.sources.len() > 1 {
                metrics.insert(format!("val/loss/{}", source.name), loss);
                metrics.insert(format!("val/bpb/{}", source.name), bpb);
            }
            if !source.eval_only && trained == 1 {
                only = Some((loss, bpb));
            }
            if !source.eval_only {
                nll_all += nll;
                count_all += count;
                bits_all += bpb * source.val_bytes as f64;
                bytes_all += source.val_bytes as f64;
            }
        }
        if shares.len() > 1 {
            metrics.insert(
                "moe/specialisation".into(),
                baton_core::moe::specialisation(&shares),
            );
        }
        // Over the training sources: per-source bits weighted by bytes.
        let (loss, bpb) =
            only.unwrap_or((nll_all / count_all.max(1.0), bits_all / bytes_all.max(1.0)));
        metrics.insert("val/loss".into(), loss);
        metrics.insert("val/bpb".into(), bpb);
        metrics
    }
}

/// `val_bpb` = mean loss in nats per token × tokens ÷ bytes ÷ ln 2.
pub fn bits_per_byte(loss_nats_per_token: f64, tokens: usize, bytes: usize) -> f64 {
    loss_nats_per_token * (tokens as f64 / bytes as f64) / std::f64::consts::LN_2
}

/// Summed NLL and number of predicted tokens over `stream` in consecutive
/// windows of `seq_len`; `limit_tokens > 0` evaluates an evenly spread subset.
pub fn evaluate_stream<B: Backend>(
    model: &Llama<B>,
    stream: &TokenStream,
    seq_len: usize,
    batch_size: usize,
    limit_tokens: usize,
    device: &B::Device,
) -> (f64, f64) {
    let mut windows = stream.windows(seq_len);
    if limit_tokens > 0 {
        let wanted = limit_tokens.div_ceil(seq_len).max(1);
        if wanted < windows.len() {
            let stride = windows.len() as f64 / wanted as f64;
            windows = (0..wanted)
                .map(|i| windows[(i as f64 * stride) as usize].clone())
                .collect();
        }
    }
    let mut nll = 0.0;
    let mut count = 0.0;
    // Full-length windows in batches; the (at most one) short tail alone.
    let (full, short): (Vec<_>, Vec<_>) =
        windows.into_iter().partition(|(i, _)| i.len() == seq_len);
    for chunk in full.chunks(batch_size) {
        let inputs: Vec<u32> = chunk.iter().flat_map(|(i, _)| i.iter().copied()).collect();
        let targets: Vec<u32> = chunk.iter().flat_map(|(_, t)| t.iter().copied()).collect();
        let batch = Batch::dense(chunk.len(), seq_len, inputs, targets);
        nll += batch.nll_sum(model, device).into_scalar().elem::<f64>();
        count += batch.supervised_tokens();
    }
    for (inputs, targets) in short {
        let batch = Batch::dense(1, inputs.len(), inputs, targets);
        nll += batch.nll_sum(model, device).into_scalar().elem::<f64>();
        count += batch.supervised_tokens();
    }
    (nll, count)
}

/// Bits per byte of `model` (with `tokenizer`) on a text, evaluated in windows
/// of the model's maximum length.
pub fn text_bpb<B: Backend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    text: &str,
    device: &B::Device,
) -> Result<(f64, usize, usize)> {
    let stream = TokenStream {
        tokens: tokenizer.encode_long(text)?,
    };
    if stream.tokens.len() < 2 {
        bail!(
            "text too short to evaluate ({} tokens)",
            stream.tokens.len()
        );
    }
    let (nll, count) = evaluate_stream(model, &stream, model.max_seq_len(), 8, 0, device);
    let bpb = bits_per_byte(nll / count, stream.tokens.len(), text.len());
    Ok((bpb, text.len(), stream.tokens.len()))
}

/// Loads a config from layered sources with the stage's checks applied.
pub fn load_config(sources: &baton_core::config::ConfigSources) -> Result<PretrainConfig> {
    let cfg: PretrainConfig = baton_core::config::resolve(sources)?;
    cfg.validate().map_err(anyhow::Error::msg)?;
    Ok(cfg)
}
