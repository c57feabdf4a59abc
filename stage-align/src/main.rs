//! `align`: parse arguments, install logging, pick the backend, call `run`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use baton_core::backend;
use baton_core::checkpoint::Checkpoint;
use baton_core::cli::{StageArgs, run_main};
use clap::Parser;

/// Align an sft checkpoint with a direct preference loss (DPO and family) and
/// write an `align` checkpoint.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Parent checkpoint (sft or align; a base model with a reference-free
    /// loss such as orpo or asft).
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    /// Preference JSONL: {"prompt","chosen","rejected"} or {"prompt","completion","label"}
    /// (repeatable). Without it, pairs are sampled on-policy and labelled by the task checkers.
    #[arg(long, value_name = "FILE")]
    data: Vec<PathBuf>,
    /// The loss: dpo, ipo, hinge, robust, simpo, orpo, asft, nca, cal_dpo, dpop, apo_zero, kto, nll,
    /// or a weighted mix such as "dpo+0.5*nll" (shorthand for --set align.loss=…).
    #[arg(long)]
    loss: Option<String>,
    /// Reference log-prob cache to reuse or create (shorthand for --set align.reference_cache=…).
    #[arg(long, value_name = "FILE")]
    reference_cache: Option<PathBuf>,
    #[command(flatten)]
    stage: StageArgs,
}

fn main() {
    run_main(real_main);
}

fn real_main() -> Result<()> {
    let args = Args::parse();
    let parent = Checkpoint::open(&args.from, baton_align::KIND.accepts)
        .with_context(|| format!("loading the parent checkpoint {}", args.from.display()))?;
    let mut sources = args.stage.sources();
    if let Some(loss) = &args.loss {
        sources.sets.insert(0, format!("align.loss={loss:?}"));
    }
    if let Some(path) = &args.reference_cache {
        sources.sets.insert(
            0,
            format!("align.reference_cache={:?}", path.display().to_string()),
        );
    }
    let cfg = baton_align::load_config(&parent, &sources)?;
    let device = backend::device().map_err(anyhow::Error::msg)?;
    let opts = baton_align::RunOptions {
        out: args.stage.out,
        resume: args.stage.resume,
        force: args.stage.force,
        allow_changes: args.stage.allow_changes,
        data: args.data,
        merge_adapter: args.stage.merge_adapter,
    };
    let dir = baton_align::run::<backend::Train>(&args.from, &cfg, &opts, &device)?;
    let manifest = Checkpoint::open(&dir, &[])?.manifest;
    println!("{}", dir.display());
    println!("{}", serde_json::to_string(&manifest.metrics)?);
    Ok(())
}
