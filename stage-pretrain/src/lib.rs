//! The `pretrain` stage: raw text in, a language model checkpoint out.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Result, bail};
use baton_core::burn::module::AutodiffModule;
use baton_core::burn::tensor::ElementConversion;
use baton_core::burn::tensor::backend::{AutodiffBackend, Backend};
use baton_core::checkpoint::{self, Manifest, StageDir, StageKind};
use baton_core::data::{Corpus, DataError, TokenStream, step_rng};
use baton_core::error::InvalidSetting;
use baton_core::model::{Llama, ModelConfig};
use baton_core::tokenizer::Tokenizer;
use baton_core::train::{Batch, TrainConfig, TrainOutcome, TrainTask, train};
use serde::{Deserialize, Serialize};

/// This stage's checkpoint kind: `pretrain`; it takes no parent.
pub const KIND: StageKind = StageKind {
    name: "pretrain",
    accepts: &[],
};

/// `configs/pretrain.toml` in Rust: what runs when nothing is configured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    pub model: ModelConfig,
    pub tokenizer: TokenizerConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
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
    /// Share of the corpus (its last bytes) held out for validation.
    pub val_fraction: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self { val_fraction: 0.1 }
    }
}

impl PretrainConfig {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        self.model.validate()?;
        self.train.validate()?;
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
        Ok(())
    }
}

/// Where a pretrain run writes, and how it treats what is there.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub out: PathBuf,
    pub resume: bool,
    pub force: bool,
    /// With `resume`: continue even if the settings or corpus changed.
    pub allow_changes: bool,
}

/// Trains a tokenizer and a model on `corpus` and writes a `pretrain` checkpoint
/// to `opts.out`. Returns the checkpoint directory.
pub fn run<B: AutodiffBackend>(
    corpus: &[PathBuf],
    cfg: &PretrainConfig,
    opts: &RunOptions,
    device: &B::Device,
) -> Result<PathBuf> {
    // 1. Read the corpus and check the config before touching the output.
    cfg.validate().map_err(anyhow::Error::msg)?;
    let corpus_paths = corpus;
    let corpus = Corpus::read(corpus_paths)?;
    let inputs: Vec<&std::path::Path> = corpus_paths
        .iter()
        .map(PathBuf::as_path)
        .chain(cfg.tokenizer.path.as_deref())
        .collect();
    let stage = StageDir::open(&opts.out, opts.resume, opts.force, &inputs)?;

    // 2. Tokenizer: trained on the training split only (or loaded), then the split tokenised.
    let (train_text, val_text) = corpus.split(cfg.data.val_fraction);
    let tokenizer = tokenizer_for(cfg, opts, &stage, &corpus, train_text)?;
    let (train_tokens, val_tokens) = tokenize(&tokenizer, &corpus, [train_text, val_text], cfg)?;
    let mut run_inputs = checkpoint::run_inputs(None, &corpus.sources);
    if let Some(path) = &cfg.tokenizer.path {
        run_inputs.push((path.display().to_string(), checkpoint::sha256_file(path)?));
    }
    stage.record_run(
        &baton_core::config::to_toml(cfg),
        &run_inputs,
        opts.resume,
        opts.allow_changes,
    )?;

    // 3. Train with the loop every stage shares.
    let model = cfg.model.init::<B>(cfg.train.seed, device);
    tracing::info!(
        "model: {} parameters, {} layers, d_model {}, backend {}",
        cfg.model.num_params(),
        cfg.model.n_layers,
        cfg.model.d_model,
        B::name(device)
    );
    let mut task = PretrainTask::<B> {
        train: train_tokens,
        val: val_tokens,
        val_bytes: val_text.len(),
        cfg: cfg.train.clone(),
        device: device.clone(),
    };
    let outcome = train(
        model,
        &cfg.train,
        &mut task,
        &stage.work,
        opts.resume,
        device,
    )?;

    // 4. Hand the baton to `sft`.
    stage.write_model(&outcome.model.valid(), &cfg.model, &tokenizer.special)?;
    let manifest = manifest(cfg, &outcome, &tokenizer, &corpus, &stage)?;
    Ok(stage.commit(manifest)?)
}

/// The run's tokenizer: the one saved before an interruption, the user's
/// (`tokenizer.path`), or a byte-level BPE trained on the training split;
/// saved into the checkpoint.
fn tokenizer_for(
    cfg: &PretrainConfig,
    opts: &RunOptions,
    stage: &StageDir,
    corpus: &Corpus,
    train_text: &str,
) -> Result<Tokenizer> {
    let tokenizer_path = stage.path(checkpoint::TOKENIZER_FILE);
    let tokenizer = if opts.resume {
        Tokenizer::load(&tokenizer_path)?
    } else {
        let tokenizer = match &cfg.tokenizer.path {
            Some(path) => Tokenizer::load(path)?,
            None => {
                tracing::info!(
                    "training a {}-entry byte-level BPE on {}",
                    cfg.model.vocab_size,
                    corpus.describe()
                );
                Tokenizer::train(train_text.split_inclusive('\n'), cfg.model.vocab_size)?
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

/// The training and validation splits as tokens, each checked to be long
/// enough (a training window, two validation tokens).
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
        "corpus: {} bytes → {} training / {} validation tokens ({:.3} tokens per byte)",
        corpus.text.len(),
        train_tokens.tokens.len(),
        val_tokens.tokens.len(),
        val_tokens.tokens.len() as f64 / val_text.len() as f64
    );
    Ok((train_tokens, val_tokens))
}

/// The pretrain checkpoint's manifest: the corpus files (tokens counted),
/// the config, and the run's metrics with `val_bpb` and `params`.
fn manifest<B: AutodiffBackend>(
    cfg: &PretrainConfig,
    outcome: &TrainOutcome<B>,
    tokenizer: &Tokenizer,
    corpus: &Corpus,
    stage: &StageDir,
) -> Result<Manifest> {
    let mut data = Vec::new();
    for (source, text) in corpus.sources.iter().zip(corpus.file_texts()) {
        let mut source = source.clone();
        source.tokens = tokenizer.encode_long(text)?.len() as u64;
        data.push(source);
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
        chat_template: None,
        parents: Vec::new(),
        data,
        train: serde_json::to_value(&cfg.train)?,
        step: outcome.step,
        tokens_seen: outcome.tokens_seen,
        metrics,
        files: BTreeMap::new(),
    })
}

/// Random windows from the training split; validation loss and bits per byte.
struct PretrainTask<B: AutodiffBackend> {
    train: TokenStream,
    val: TokenStream,
    val_bytes: usize,
    cfg: TrainConfig,
    device: B::Device,
}

impl<B: AutodiffBackend> TrainTask<B> for PretrainTask<B> {
    fn row_parallel(&self) -> bool {
        true
    }

    fn batches(&mut self, step: u64) -> Vec<Batch> {
        (0..self.cfg.grad_accum as u64)
            .map(|micro| {
                let mut rng = step_rng(self.cfg.seed, 0, step, micro);
                let (inputs, targets) =
                    self.train
                        .sample(self.cfg.batch_size, self.cfg.seq_len, &mut rng);
                Batch::dense(self.cfg.batch_size, self.cfg.seq_len, inputs, targets)
            })
            .collect()
    }

    fn evaluate(&mut self, model: &Llama<B::InnerBackend>, full: bool) -> BTreeMap<String, f64> {
        let limit = if full { 0 } else { self.cfg.eval_tokens };
        let (nll, count) = evaluate_stream(
            model,
            &self.val,
            self.cfg.seq_len,
            self.cfg.batch_size,
            limit,
            &self.device,
        );
        let loss = nll / count.max(1.0);
        let bpb = bits_per_byte(loss, self.val.tokens.len(), self.val_bytes);
        BTreeMap::from([("val/loss".to_string(), loss), ("val/bpb".to_string(), bpb)])
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
