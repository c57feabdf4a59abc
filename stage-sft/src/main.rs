//! `sft`: parse arguments, install logging, pick the backend, call `run`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use baton_core::backend;
use baton_core::checkpoint::Checkpoint;
use baton_core::cli::{StageArgs, run_main};
use clap::Parser;

/// Fine-tune a pretrained checkpoint to follow instructions in the chat format
/// and write an `sft` checkpoint.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Parent checkpoint (pretrain or sft).
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    /// JSONL conversations (messages, prompt/completion or alpaca; repeatable).
    /// Without it, trains on freshly generated verifiable tasks.
    #[arg(long, value_name = "FILE")]
    data: Vec<PathBuf>,
    /// Skip and count malformed JSONL lines instead of stopping at the first.
    #[arg(long)]
    skip_bad_lines: bool,
    /// Distil from this checkpoint (same tokenizer): loss = (1 − α)·CE +
    /// α·τ²·KL(teacher ‖ student) with `[distill]` alpha, temperature, top_k.
    #[arg(long, value_name = "DIR")]
    teacher: Option<PathBuf>,
    #[command(flatten)]
    stage: StageArgs,
}

fn main() {
    run_main(real_main);
}

fn real_main() -> Result<()> {
    let args = Args::parse();
    let parent = Checkpoint::open(&args.from, baton_sft::KIND.accepts)
        .with_context(|| format!("loading the parent checkpoint {}", args.from.display()))?;
    let mut cfg = baton_sft::load_config(&parent, &args.stage.sources())?;
    cfg.data.skip_bad_lines |= args.skip_bad_lines;
    let device = backend::device().map_err(anyhow::Error::msg)?;
    let opts = baton_sft::RunOptions {
        out: args.stage.out,
        resume: args.stage.resume,
        force: args.stage.force,
        allow_changes: args.stage.allow_changes,
        data: args.data,
        teacher: args.teacher,
        merge_adapter: args.stage.merge_adapter,
    };
    let dir = baton_sft::run::<backend::Train>(&args.from, &cfg, &opts, &device)?;
    let manifest = Checkpoint::open(&dir, &[])?.manifest;
    println!("{}", dir.display());
    println!("{}", serde_json::to_string(&manifest.metrics)?);
    Ok(())
}
