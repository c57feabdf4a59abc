//! Flags every stage binary shares, and logging setup.

use std::path::PathBuf;

use crate::config::ConfigSources;

/// `--config`, `--set`, `--out`, `--resume`, `--force`: the same on every stage.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct StageArgs {
    /// TOML config file(s), applied in order over the defaults.
    #[arg(long = "config", value_name = "FILE")]
    pub configs: Vec<PathBuf>,
    /// Override one key, e.g. `--set train.steps=100` (repeatable; applied last).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Checkpoint directory to write (e.g. runs/x/pretrain).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Continue an interrupted run in --out from its last saved train_state.
    #[arg(long)]
    pub resume: bool,
    /// Replace a complete checkpoint (or discard Baton's interrupted run) in
    /// --out; anything else there is never replaced.
    #[arg(long)]
    pub force: bool,
    /// With --resume: continue even if the settings or inputs differ from the
    /// interrupted run's.
    #[arg(long, requires = "resume")]
    pub allow_changes: bool,
    /// The parent holds a LoRA adapter: merge it into the weights and train
    /// the full model (without this flag a child keeps training the adapter).
    #[arg(long)]
    pub merge_adapter: bool,
}

impl StageArgs {
    pub fn sources(&self) -> ConfigSources {
        ConfigSources {
            builtin: Vec::new(),
            files: self.configs.clone(),
            sets: self.sets.clone(),
            env: true,
        }
    }
}

/// Installs the `tracing` subscriber (`RUST_LOG` overrides the `info` default).
pub fn init_logging() {
    // In a data-parallel run, rank 0 reports progress; the others warnings.
    // Burn's collective engine logs every connection at info.
    let default = if crate::dist::is_leader() {
        "info,burn_collective=warn,burn_communication=warn"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only on a terminal: a log written to a file or pipe stays plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The body of every binary's `main`: logging, then `body`; an error is printed
/// as one line (`error: …` with its causes) and the process exits with 1 (or
/// [`crate::dist::EXIT_RESTARTABLE`] when the data-parallel run as a whole failed).
pub fn run_main(body: impl FnOnce() -> anyhow::Result<()>) {
    init_logging();
    let result = crate::dist::world()
        .map_err(anyhow::Error::msg)
        .and_then(|_| body());
    crate::dist::cleanup();
    if let Err(err) = result {
        match crate::dist::world() {
            Ok(Some(world)) => eprintln!("error: rank {}: {err:#}", world.rank),
            _ => eprintln!("error: {err:#}"),
        }
        std::process::exit(crate::dist::exit_code());
    }
}

/// A progress bar for a stage's side work (sampling, scoring): `what [pos/len]`.
pub fn progress(total: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{{spinner}} {what} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}]"
    ))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}
