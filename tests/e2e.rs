//! End-to-end tests: the stage `run` functions in-process on tiny configs in a
//! temp dir, plus a real SIGKILL of a child process for the resume contract.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use baton_core::backend::{Inner, Train};
use baton_core::checkpoint::{Checkpoint, CheckpointError};
use baton_core::config::ConfigSources;
use baton_pretrain::{PretrainConfig, RunOptions};

mod align;
mod architecture;
mod continual;
mod dist;
mod distill;
mod eft;
mod freeze;
mod grow;
mod interop;
mod lora;
mod merge;
mod moe;
mod pretrain;
mod recipes;
mod resume;
mod safety;
mod sft;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn smoke_config(sets: &[&str]) -> PretrainConfig {
    baton_pretrain::load_config(&ConfigSources {
        builtin: Vec::new(),
        files: vec![repo().join("configs/smoke/pretrain.toml")],
        sets: sets.iter().map(|s| s.to_string()).collect(),
        env: false,
    })
    .unwrap()
}

/// A slice of real text: Tiny Shakespeare from ../shared/data when present,
/// else this repository's own docs (the README must work without shared/).
fn text_corpus(dir: &Path, bytes: usize) -> PathBuf {
    let shared = repo().join("../shared/data/tinyshakespeare.txt");
    let text = std::fs::read_to_string(&shared).unwrap_or_else(|_| {
        let mut t = String::new();
        for f in [
            "README.md",
            "ARCHITECTURE.md",
            "core/src/model.rs",
            "core/src/train.rs",
        ] {
            t.push_str(&std::fs::read_to_string(repo().join(f)).unwrap_or_default());
        }
        t
    });
    let mut cut = bytes.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let path = dir.join("corpus.txt");
    std::fs::write(&path, &text[..cut]).unwrap();
    path
}

fn opts(out: &Path) -> RunOptions {
    RunOptions {
        out: out.to_path_buf(),
        ..RunOptions::default()
    }
}

fn pretrain(corpus: &Path, cfg: &PretrainConfig, opts: &RunOptions) -> anyhow::Result<PathBuf> {
    baton_pretrain::run::<Train>(&[corpus.to_path_buf()], cfg, opts, &Default::default())
}

/// Entry point of the child processes the resume and safety tests start (the
/// test binary re-running itself with `--ignored --exact`): a stage run from
/// `BATON_E2E_CHILD_*` — pretrain on `…_CORPUS`, or sft / align (`…_STAGE`)
/// from `…_FROM`. Not a test of its own, so it is ignored in a plain run.
#[test]
#[ignore = "the child process of the SIGKILL and crash tests; they run it"]
fn child_stage_process() {
    let var = |name: &str| std::env::var(format!("BATON_E2E_CHILD_{name}"));
    let out = PathBuf::from(var("OUT").expect("run by the SIGKILL and crash tests"));
    let sets: Vec<String> = var("SETS")
        .unwrap()
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let (resume, force) = (var("RESUME").is_ok(), var("FORCE").is_ok());
    let device = Default::default();
    match var("STAGE").as_deref() {
        Ok("default-corpus") => {
            let files = baton_core::data::default_corpus().unwrap_or_else(|e| panic!("{e}"));
            println!("{} files", files.len());
        }
        Ok("sft") => {
            let from = PathBuf::from(var("FROM").unwrap());
            let cfg = sft_config(&Checkpoint::open(&from, &[]).unwrap(), &sets).unwrap();
            let opts = baton_sft::RunOptions {
                resume,
                force,
                ..sft_opts(&out, vec![])
            };
            baton_sft::run::<Train>(&from, &cfg, &opts, &device).unwrap();
        }
        Ok("align") => {
            let from = PathBuf::from(var("FROM").unwrap());
            let cfg = align_config(&Checkpoint::open(&from, &[]).unwrap(), &sets).unwrap();
            let opts = baton_align::RunOptions {
                resume,
                force,
                ..align_opts(&out, vec![])
            };
            baton_align::run::<Train>(&from, &cfg, &opts, &device).unwrap();
        }
        _ => {
            let options = RunOptions {
                resume,
                force,
                from: var("FROM").ok().map(PathBuf::from),
                ..opts(&out)
            };
            match var("CONFIG") {
                // Data from the config's sources.
                Ok(file) => {
                    let cfg = baton_pretrain::load_config(&ConfigSources {
                        builtin: Vec::new(),
                        files: vec![repo().join("configs/smoke/pretrain.toml"), file.into()],
                        sets: sets.iter().map(|s| s.to_string()).collect(),
                        env: false,
                    })
                    .unwrap();
                    baton_pretrain::run::<Train>(&[], &cfg, &options, &device).unwrap();
                }
                Err(_) => {
                    let corpus = PathBuf::from(var("CORPUS").unwrap());
                    let mut cfg = smoke_config(&sets);
                    if options.from.is_some() {
                        // Continued training takes the parent's architecture.
                        cfg.model = Default::default();
                    }
                    pretrain(&corpus, &cfg, &options).unwrap();
                }
            }
        }
    }
}

/// This test binary re-run as [`child_stage_process`] with `sets` and
/// `BATON_E2E_CHILD_OUT = out` (the caller adds the rest of its environment).
fn child_command(out: &Path, sets: &[&str]) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "child_stage_process",
            "--ignored",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("BATON_E2E_CHILD_OUT", out)
        .env("BATON_E2E_CHILD_SETS", sets.join(" "))
        .env("RUST_LOG", "off");
    command
}

fn sft_config(parent: &Checkpoint, sets: &[&str]) -> anyhow::Result<baton_sft::SftConfig> {
    baton_sft::load_config(
        parent,
        &ConfigSources {
            builtin: Vec::new(),
            files: vec![repo().join("configs/smoke/sft.toml")],
            sets: sets.iter().map(|s| s.to_string()).collect(),
            env: false,
        },
    )
}

fn sft_opts(out: &Path, data: Vec<PathBuf>) -> baton_sft::RunOptions {
    baton_sft::RunOptions {
        out: out.to_path_buf(),
        resume: false,
        force: false,
        allow_changes: false,
        data,
        teacher: None,
        merge_adapter: false,
    }
}

/// `train/loss` of each logged step of a finished stage.
fn train_losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["train/loss"].as_f64())
        .collect()
}

/// A tiny pretrain checkpoint shared by the SFT tests of one test function.
fn tiny_pretrain(dir: &Path) -> PathBuf {
    let corpus = text_corpus(dir, 30_000);
    let out = dir.join("pretrain");
    pretrain(&corpus, &smoke_config(&["train.steps=3"]), &opts(&out)).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

// ----------------------------------------------------------------- align

fn align_config(parent: &Checkpoint, sets: &[&str]) -> anyhow::Result<baton_align::AlignConfig> {
    baton_align::load_config(
        parent,
        &ConfigSources {
            builtin: Vec::new(),
            files: vec![repo().join("configs/smoke/align.toml")],
            sets: sets.iter().map(|s| s.to_string()).collect(),
            env: false,
        },
    )
}

fn align_opts(out: &Path, data: Vec<PathBuf>) -> baton_align::RunOptions {
    baton_align::RunOptions {
        out: out.to_path_buf(),
        resume: false,
        force: false,
        allow_changes: false,
        data,
        merge_adapter: false,
    }
}

/// Training losses of 30 align steps with `loss` from `sft` on `examples`
/// (prompt, good reply, bad reply): as chosen/rejected pairs, or for `kto`
/// as unpaired replies labelled good or bad.
fn align_losses(
    dir: &Path,
    sft: &Checkpoint,
    loss: &str,
    examples: &[(&str, &str, &str)],
) -> Vec<f64> {
    let data = dir.join(format!("{loss}.jsonl"));
    let mut text = String::new();
    for (prompt, good, bad) in examples {
        let lines = if loss == "kto" {
            vec![
                serde_json::json!({"prompt": prompt, "completion": good, "label": true}),
                serde_json::json!({"prompt": prompt, "completion": bad, "label": false}),
            ]
        } else {
            vec![serde_json::json!({"prompt": prompt, "chosen": good, "rejected": bad})]
        };
        for line in lines {
            text.push_str(&line.to_string());
            text.push('\n');
        }
    }
    std::fs::write(&data, text).unwrap();
    let loss_set = format!("align.loss=\"{loss}\"");
    let sets = [
        "train.steps=30",
        "train.lr=3e-3",
        "train.warmup_steps=1",
        "train.batch_size=4",
        "align.heldout_pairs=0",
        &loss_set,
    ];
    let cfg = align_config(sft, &sets).unwrap();
    let out = baton_align::run::<Train>(
        &sft.dir,
        &cfg,
        &align_opts(&dir.join(format!("{loss}-overfit")), vec![data]),
        &Default::default(),
    )
    .unwrap();
    train_losses(&out)
}

/// Tiny pretrain → sft, for the align tests of one test function.
fn tiny_sft(dir: &Path) -> PathBuf {
    let pretrain_dir = tiny_pretrain(dir);
    let parent = Checkpoint::open(&pretrain_dir, &[]).unwrap();
    let cfg = sft_config(&parent, &["train.steps=3"]).unwrap();
    baton_sft::run::<Train>(
        &pretrain_dir,
        &cfg,
        &sft_opts(&dir.join("sft"), vec![]),
        &Default::default(),
    )
    .unwrap()
}

/// An HF model directory whose tokenizer speaks ChatML (as SmolLM2's and
/// Qwen's do): a seeded tiny Llama and a BPE trained with ChatML's tokens.
fn chatml_hf_dir(dir: &Path) -> PathBuf {
    use baton_core::tokenizer::Tokenizer;
    let corpus = std::fs::read_to_string(text_corpus(dir, 20_000)).unwrap();
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let tok = Tokenizer::train_with_specials(corpus.lines(), 400, &specials).unwrap();
    let config = baton_core::model::ModelConfig {
        vocab_size: tok.vocab_size(),
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        d_ff: 64,
        max_seq_len: 128,
        ..Default::default()
    };
    let model = config.init::<Inner>(5, &Default::default());
    let hf = dir.join("chatml-hf");
    std::fs::create_dir_all(&hf).unwrap();
    let tensors = baton_core::checkpoint::named_tensors(&model);
    let bytes = baton_core::checkpoint::safetensors_bytes(
        tensors.iter().map(|(n, d)| (n, d)),
        baton::interop::hf::ExportDtype::F32,
    )
    .unwrap();
    std::fs::write(hf.join("model.safetensors"), bytes).unwrap();
    let hf_config = baton_core::checkpoint::hf_config(&config, &tok.special);
    std::fs::write(hf.join("config.json"), hf_config.to_string()).unwrap();
    std::fs::write(hf.join("tokenizer.json"), tok.to_json().unwrap()).unwrap();
    hf
}

/// The chat template an export wrote, rendered as transformers would (Jinja,
/// by minijinja) on several conversations, tokenizes to the ids Baton's
/// `ChatRenderer` trains and samples with: generation prompts exactly, whole
/// conversations up to ChatML's trailing newline.
fn template_renders_like_the_renderer(export: &Path, tok: &baton_core::tokenizer::Tokenizer) {
    use baton_core::chat::{ChatRenderer, Message, Role, Supervise};
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(export.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    let template = config["chat_template"].as_str().expect("a chat template");
    let mut env = minijinja::Environment::new();
    env.add_template("chat", template).unwrap();
    let jinja = env.get_template("chat").unwrap();
    let renderer = ChatRenderer::new(tok);
    let m = |role, text: &str| Message::new(role, text);
    let conversations = [
        vec![m(Role::User, "What is 12 + 30?"), m(Role::Assistant, "42")],
        vec![
            m(Role::System, "Answer briefly."),
            m(Role::User, "Reverse: a b c"),
            m(Role::Assistant, "c b a"),
        ],
        vec![
            m(Role::User, "Hi"),
            m(Role::Assistant, "Hello, friend."),
            m(Role::User, "Count the r in \"berry\" \n please"),
            m(Role::Assistant, "2"),
        ],
    ];
    let role = |r: Role| match r {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    };
    for conversation in &conversations {
        let render = |messages: &[Message], add_generation_prompt: bool| {
            let messages: Vec<_> = messages
                .iter()
                .map(|msg| minijinja::context! { role => role(msg.role), content => msg.content.clone() })
                .collect();
            jinja
                .render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => config["bos_token"].as_str().unwrap(),
                    eos_token => config["eos_token"].as_str().unwrap(),
                })
                .unwrap()
        };
        let prompt = &conversation[..conversation.len() - 1];
        let text = render(prompt, true);
        assert_eq!(
            tok.encode(&text).unwrap(),
            renderer.render_prompt(prompt).unwrap(),
            "generation prompt {text:?}"
        );
        let text = render(conversation, false);
        let whole = renderer
            .render(conversation, Supervise::AllAssistant)
            .unwrap();
        assert_eq!(
            tok.encode(text.strip_suffix('\n').unwrap_or(&text))
                .unwrap(),
            whole.ids,
            "conversation {text:?}"
        );
    }
}
