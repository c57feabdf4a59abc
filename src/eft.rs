//! The model a sampling command runs: one checkpoint (`--from`), or emulated
//! fine-tuning's three (`--eft-large-base`, `--eft-small-ft`,
//! `--eft-small-base`, `--eft-beta`), checked to share one tokenizer and
//! vocabulary before anything is sampled.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use baton_core::burn::tensor::backend::Backend;
use baton_core::checkpoint::Checkpoint;
use baton_core::generate::{Eft, Policy};
use baton_core::model::Llama;
use baton_core::tokenizer::Tokenizer;

/// Emulated fine-tuning: log π ∝ log π_large_base + β·(log π_small_ft −
/// log π_small_base) at each token, instead of `--from`.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct EftArgs {
    /// EFT: the large base model (with --eft-small-ft and --eft-small-base, instead of --from).
    #[arg(
        long,
        value_name = "DIR",
        requires_all = ["eft_small_ft", "eft_small_base"],
        conflicts_with = "from"
    )]
    pub eft_large_base: Option<PathBuf>,
    /// EFT: the small fine-tuned model (its chat format is used).
    #[arg(long, value_name = "DIR", requires = "eft_large_base")]
    pub eft_small_ft: Option<PathBuf>,
    /// EFT: the small base the small fine-tuned model was tuned from.
    #[arg(long, value_name = "DIR", requires = "eft_large_base")]
    pub eft_small_base: Option<PathBuf>,
    /// EFT: β, the scale of the small pair's difference (0 = the large base alone).
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub eft_beta: f64,
}

impl EftArgs {
    pub fn on(&self) -> bool {
        self.eft_large_base.is_some()
    }
}

/// The loaded model(s) and their tokenizer.
pub struct Sampler<B: Backend> {
    models: Vec<Llama<B>>,
    beta: Option<f64>,
    pub tokenizer: Tokenizer,
}

impl<B: Backend> Sampler<B> {
    /// `--from`, or the three EFT checkpoints. EFT's models must share the
    /// large base's tokenizer and vocabulary size (refused otherwise, the
    /// differing checkpoint named).
    pub fn load(from: Option<&Path>, eft: &EftArgs, device: &B::Device) -> Result<Self> {
        let Some(large) = &eft.eft_large_base else {
            let from = from.context("--from (or the --eft-* checkpoints) is required")?;
            let checkpoint = Checkpoint::open(from, &[])?;
            return Ok(Self {
                tokenizer: checkpoint.tokenizer()?,
                models: vec![checkpoint.model::<B>(device)?],
                beta: None,
            });
        };
        if !eft.eft_beta.is_finite() {
            bail!("--eft-beta {}: must be a finite number", eft.eft_beta);
        }
        let paths = [
            ("--eft-large-base", Some(large)),
            ("--eft-small-ft", eft.eft_small_ft.as_ref()),
            ("--eft-small-base", eft.eft_small_base.as_ref()),
        ];
        let mut opened = Vec::new();
        for (flag, path) in paths {
            let path = path.with_context(|| format!("{flag} is required with --eft-large-base"))?;
            let checkpoint = Checkpoint::open(path, &[])
                .with_context(|| format!("{flag} {}", path.display()))?;
            opened.push(checkpoint);
        }
        let first = &opened[0].manifest;
        for other in &opened[1..] {
            if other.manifest.tokenizer_sha256 != first.tokenizer_sha256 {
                bail!(
                    "{}: its tokenizer differs from {}'s (EFT combines per-token log-probs over one vocabulary)",
                    other.dir.display(),
                    opened[0].dir.display()
                );
            }
            if other.manifest.model.vocab_size != first.model.vocab_size {
                bail!(
                    "{}: model.vocab_size {} differs from {}'s {}",
                    other.dir.display(),
                    other.manifest.model.vocab_size,
                    opened[0].dir.display(),
                    first.model.vocab_size
                );
            }
        }
        let mut models = Vec::new();
        for checkpoint in &opened {
            models.push(checkpoint.model::<B>(device)?);
        }
        Ok(Self {
            tokenizer: opened[1].tokenizer()?,
            models,
            beta: Some(eft.eft_beta),
        })
    }

    pub fn policy(&self) -> Policy<'_, B> {
        match self.beta {
            None => Policy::One(&self.models[0]),
            Some(beta) => Policy::Eft(Eft {
                large_base: &self.models[0],
                small_ft: &self.models[1],
                small_base: &self.models[2],
                beta,
            }),
        }
    }

    /// The single model (`--from`), for what EFT does not do.
    pub fn single(&self, what: &str) -> Result<&Llama<B>> {
        match self.beta {
            None => Ok(&self.models[0]),
            Some(_) => bail!("{what} takes one model (--from), not the --eft-* flags"),
        }
    }
}
