//! The pretrain stage: checkpoints, bad corpora and configs, tampering, bits per byte.

use super::*;

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
