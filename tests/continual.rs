//! Continual pretraining (`--from`, `--from-state`, carried optimizer),
//! weighted data sources, phases, and loss-threshold filtering in SFT.

use super::*;
use baton_pretrain::{phases, sources};

/// Two real texts of different kinds: English prose (corpus A) and Rust
/// source (corpus B), as separate files.
fn two_corpora(dir: &Path) -> (PathBuf, PathBuf) {
    let a = text_corpus(dir, 30_000);
    let a_path = dir.join("a.txt");
    std::fs::rename(&a, &a_path).unwrap();
    let mut code = String::new();
    for f in ["core/src/model.rs", "core/src/checkpoint.rs"] {
        code.push_str(&std::fs::read_to_string(repo().join(f)).unwrap());
    }
    let b_path = dir.join("b.txt");
    std::fs::write(&b_path, &code[..30_000]).unwrap();
    (a_path, b_path)
}

/// A config file over the smoke config; returns its path.
fn config_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn load(files: &[PathBuf], sets: &[&str]) -> anyhow::Result<PretrainConfig> {
    let mut all = vec![repo().join("configs/smoke/pretrain.toml")];
    all.extend(files.iter().cloned());
    baton_pretrain::load_config(&ConfigSources {
        builtin: Vec::new(),
        files: all,
        sets: sets.iter().map(|s| s.to_string()).collect(),
        env: false,
    })
}

fn sources_toml(a: &Path, b: &Path, wa: &str, wb: &str) -> String {
    format!(
        "[[data.sources]]\nname = \"prose\"\npath = \"{}\"\n{wa}\n\n[[data.sources]]\nname = \"code\"\npath = \"{}\"\n{wb}\n",
        a.display(),
        b.display()
    )
}

#[test]
fn mixture_draws_rows_by_weight_as_a_pure_function_of_the_step() {
    use baton_core::data::{Corpus, TokenStream, step_rng};
    let source = |name: &str, base: u32| sources::Source {
        name: name.into(),
        eval_only: false,
        weight: 1.0,
        corpus: Corpus {
            text: String::new(),
            sources: Vec::new(),
        },
        train: TokenStream {
            tokens: (base..base + 500).collect(),
        },
        val: TokenStream { tokens: vec![0, 1] },
        val_bytes: 2,
    };
    let both = [source("a", 0), source("b", 10_000)];
    let draw = |weights: &[f64], step: u64| {
        sources::sample(&both, weights, 400, 4, &mut step_rng(9, 0, step, 0))
    };
    let (inputs, _) = draw(&[0.8, 0.2], 3);
    let from_a = inputs.chunks(4).filter(|row| row[0] < 10_000).count() as f64 / 400.0;
    assert!((0.74..0.86).contains(&from_a), "share from a: {from_a}");
    assert_eq!(draw(&[0.8, 0.2], 3), draw(&[0.8, 0.2], 3));
    assert_ne!(draw(&[0.8, 0.2], 3), draw(&[0.8, 0.2], 4));
    // A single source with weight draws no source: exactly a plain stream's rows.
    assert_eq!(
        draw(&[0.0, 1.0], 5),
        both[1].train.sample(400, 4, &mut step_rng(9, 0, 5, 0))
    );
}

#[test]
fn phases_set_the_window_the_mixture_and_the_learning_rate_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = two_corpora(tmp.path());
    let file = config_file(
        tmp.path(),
        "p.toml",
        &format!(
            "{}\n[[phases]]\nuntil_step = 4\nseq_len = 8\n\n[[phases]]\nuntil_step = 10\nweights = {{ code = 1.0 }}\nlr = 2e-3\nlr_end = 1e-4\ndecay = \"linear\"\nwarmup_steps = 2\n",
            sources_toml(&a, &b, "weight = 1.0", "weight = 1.0")
        ),
    );
    let cfg = load(&[file], &[]).unwrap();
    let t = &cfg.train;
    let at = |s| phases::at(&cfg.phases, t, s);
    assert_eq!((at(0).seq_len, at(0).batch_size), (8, 16)); // 4 × 32 tokens held
    assert_eq!((at(4).seq_len, at(4).batch_size), (32, 4));
    assert_eq!(at(5).weights.unwrap()["code"], 1.0);
    assert_eq!(at(11).phase, None);
    let lr = |s| phases::lr_at(&cfg.phases, t, s);
    assert_eq!(lr(0), t.lr_at(0)); // the first phase sets no segment
    assert!((lr(4) - 1e-3).abs() < 1e-12 && (lr(5) - 2e-3).abs() < 1e-12); // warmup
    assert!((lr(9) - 1e-4).abs() < 1e-12); // the segment ends at lr_end
    assert!(lr(6) > lr(7) && lr(7) > lr(8));
    assert_eq!(lr(10), t.lr_at(10));

    // The run trains on what the phases say: 4 steps of 16×8, 8 of 4×32 tokens.
    let out = baton_pretrain::run::<Train>(
        &[],
        &cfg,
        &opts(&tmp.path().join("run")),
        &Default::default(),
    )
    .unwrap();
    let ckpt = Checkpoint::open(&out, &[]).unwrap();
    assert_eq!(ckpt.manifest.tokens_seen, 4 * 16 * 8 + 8 * 4 * 32);
    let m = &ckpt.manifest.metrics;
    for key in ["val/bpb/prose", "val/bpb/code", "val/bpb"] {
        assert!(m[key].is_finite() && m[key] > 0.0, "{key}");
    }
    let (lo, hi) = (
        m["val/bpb/prose"].min(m["val/bpb/code"]),
        m["val/bpb/prose"].max(m["val/bpb/code"]),
    );
    assert!(lo <= m["val/bpb"] && m["val/bpb"] <= hi);
    // Every periodic evaluation reports each source.
    let evals = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("val/bpb/code") && l.contains("val/bpb/prose"))
        .count();
    assert_eq!(evals, 2); // step 6 and the end
}

#[test]
fn continued_pretraining_keeps_the_parent_and_can_carry_its_optimizer() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = two_corpora(tmp.path());
    let device = Default::default();
    let base_cfg = smoke_config(&["train.steps=6", "train.keep_state=true"]);
    let base = pretrain(&a, &base_cfg, &opts(&tmp.path().join("base"))).unwrap();
    let plain = pretrain(
        &a,
        &smoke_config(&["train.steps=6"]),
        &opts(&tmp.path().join("plain")),
    )
    .unwrap();
    let base_ckpt = Checkpoint::open(&base, &[]).unwrap();

    let from = |parent: &Path, out: &str, sets: &[&str]| {
        let options = RunOptions {
            from: Some(parent.to_path_buf()),
            ..opts(&tmp.path().join(out))
        };
        baton_pretrain::run::<Train>(
            std::slice::from_ref(&b),
            &smoke_config(sets),
            &options,
            &device,
        )
    };
    let fresh = from(&base, "fresh", &["train.steps=4"]).unwrap();
    let carried = from(
        &base,
        "carried",
        &["train.steps=4", "train.carry_optimizer=true"],
    )
    .unwrap();
    let fresh_ckpt = Checkpoint::open(&fresh, &[]).unwrap();
    assert_eq!(fresh_ckpt.manifest.parents.len(), 1);
    assert_eq!(fresh_ckpt.manifest.parents[0].role, "parent");
    assert_eq!(
        fresh_ckpt.manifest.parents[0].manifest_sha256,
        base_ckpt.manifest_sha256
    );
    assert_eq!(
        fresh_ckpt.manifest.tokenizer_sha256,
        base_ckpt.manifest.tokenizer_sha256
    );
    // The curve starts where the parent stopped: an evaluation at step 0.
    let first = std::fs::read_to_string(fresh.join("metrics.jsonl")).unwrap();
    assert!(
        first.lines().next().unwrap().starts_with("{\"step\":0"),
        "{first}"
    );
    // Carried moments change the result; fresh ones do not depend on them.
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_ne!(weights(&fresh), weights(&carried));

    // Without a kept state the optimizer cannot be carried: one line, nothing written.
    let err = from(
        &plain,
        "refused",
        &["train.steps=4", "train.carry_optimizer=true"],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("carry_optimizer") && err.contains("keep_state") && !err.contains('\n'),
        "{err}"
    );
    assert!(!tmp.path().join("refused").exists() && !partial_exists(&tmp.path().join("refused")));
}

/// A decay branched from a saved stable phase (`--from-state`) is the very
/// run that trained straight through: same bytes.
#[test]
fn a_decay_branched_from_a_stable_state_equals_the_straight_run() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = text_corpus(tmp.path(), 30_000);
    let wsd = [
        "train.steps=12",
        "train.schedule=wsd",
        "train.decay_fraction=0.34",
    ];
    let straight = pretrain(
        &corpus,
        &smoke_config(&wsd),
        &opts(&tmp.path().join("straight")),
    )
    .unwrap();
    let stable = pretrain(
        &corpus,
        &smoke_config(&[
            "train.steps=8",
            "train.schedule=constant",
            "train.keep_state=true",
        ]),
        &opts(&tmp.path().join("stable")),
    )
    .unwrap();
    let branch = RunOptions {
        from_state: Some(stable.clone()),
        ..opts(&tmp.path().join("branch"))
    };
    let branched = baton_pretrain::run::<Train>(
        std::slice::from_ref(&corpus),
        &smoke_config(&wsd),
        &branch,
        &Default::default(),
    )
    .unwrap();
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(
        weights(&branched) == weights(&straight),
        "the branch differs from the straight run"
    );
    let m = Checkpoint::open(&branched, &[]).unwrap().manifest;
    assert_eq!((m.step, m.parents[0].role.as_str()), (12, "state"));
    assert_eq!(m.tokens_seen, 12 * 4 * 32);
}

/// Each bad input is refused in one line that names it, before anything is
/// written: the output directory is not created, and a checkpoint already
/// there (with --force) is left as it was.
#[test]
fn bad_sources_phases_and_parents_are_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = two_corpora(tmp.path());
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let base = pretrain(
        &a,
        &smoke_config(&["train.steps=2"]),
        &opts(&tmp.path().join("base")),
    )
    .unwrap();
    let other_tok = tmp.path().join("other-tokenizer.json");
    baton_core::tokenizer::Tokenizer::train(["a different tokenizer\n"; 50].into_iter(), 300)
        .unwrap()
        .save(&other_tok)
        .unwrap();
    let src = |wa: &str, wb: &str| sources_toml(&a, &b, wa, wb);
    let w1 = "weight = 1.0";
    // (what, config text, --from, --corpus, the message)
    type Case<'a> = (&'a str, String, Option<&'a Path>, Vec<PathBuf>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "weight 0",
            src("weight = 0.0", w1),
            None,
            vec![],
            "weight must be a positive finite number",
        ),
        (
            "weight < 0",
            src("weight = -1.0", w1),
            None,
            vec![],
            "weight must be a positive finite number",
        ),
        (
            "weight NaN",
            src("weight = nan", w1),
            None,
            vec![],
            "weight must be a positive finite number",
        ),
        (
            "weight missing",
            src("", w1),
            None,
            vec![],
            "weight is missing",
        ),
        (
            "two sources, one name",
            src(w1, w1).replace("\"code\"", "\"prose\""),
            None,
            vec![],
            "two sources have this name",
        ),
        (
            "phase names an unknown source",
            format!(
                "{}\n[[phases]]\nuntil_step = 4\nweights = {{ poetry = 1.0 }}\n",
                src(w1, w1)
            ),
            None,
            vec![],
            "unknown source \"poetry\"",
        ),
        (
            "phases out of order",
            "[[phases]]\nuntil_step = 6\n\n[[phases]]\nuntil_step = 3\n".into(),
            None,
            vec![a.clone()],
            "phases must be in order",
        ),
        (
            "phase past train.steps",
            "[[phases]]\nuntil_step = 13\n".into(),
            None,
            vec![a.clone()],
            "past the end of the run (train.steps = 12)",
        ),
        (
            "phase seq_len above max_seq_len",
            "[[phases]]\nuntil_step = 4\nseq_len = 64\n".into(),
            None,
            vec![a.clone()],
            "seq_len 64 exceeds model.max_seq_len (32)",
        ),
        (
            "an empty source",
            sources_toml(&empty, &b, w1, w1),
            None,
            vec![],
            "empty.txt: corpus file is empty",
        ),
        (
            "--from with another tokenizer.path",
            String::new(),
            Some(base.as_path()),
            vec![b.clone()],
            "tokenizer.path differs from the tokenizer of",
        ),
        (
            "--corpus and sources",
            src(w1, w1),
            None,
            vec![a.clone()],
            "--corpus and [[data.sources]] both name the data",
        ),
    ];
    // A checkpoint already at the output: --force must not lose it to a refused run.
    let kept = tmp.path().join("kept");
    copy_dir(&base, &kept);
    let before = std::fs::read(kept.join("manifest.json")).unwrap();
    for (what, text, from, corpus, expected) in cases {
        let file = config_file(tmp.path(), "case.toml", &text);
        let tok = format!("tokenizer.path={}", other_tok.display());
        let sets: Vec<&str> = from.map(|_| tok.as_str()).into_iter().collect();
        let device = Default::default();
        let result = load(&[file], &sets).and_then(|cfg| {
            for out in [tmp.path().join("never"), kept.clone()] {
                let options = RunOptions {
                    from: from.map(Path::to_path_buf),
                    force: out == kept,
                    ..opts(&out)
                };
                baton_pretrain::run::<Train>(&corpus, &cfg, &options, &device)?;
            }
            Ok(())
        });
        let err = format!("{:#}", result.expect_err(what));
        assert!(
            err.contains(expected) && !err.contains('\n'),
            "{what}: {err}"
        );
        assert!(!tmp.path().join("never").exists(), "{what}: output created");
        assert!(!partial_exists(&tmp.path().join("never")), "{what}");
        assert_eq!(
            std::fs::read(kept.join("manifest.json")).unwrap(),
            before,
            "{what}"
        );
    }

    // --from-state on a checkpoint that kept no state.
    let options = RunOptions {
        from_state: Some(base.clone()),
        ..opts(&tmp.path().join("never"))
    };
    let err = baton_pretrain::run::<Train>(
        std::slice::from_ref(&b),
        &smoke_config(&[]),
        &options,
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("no train_state to continue") && !err.contains('\n'),
        "{err}"
    );
    assert!(!tmp.path().join("never").exists() && !partial_exists(&tmp.path().join("never")));
    // --from-state on a state at or past train.steps: nothing to train.
    let kept_state = pretrain(
        &a,
        &smoke_config(&["train.steps=4", "train.keep_state=true"]),
        &opts(&tmp.path().join("kept-state")),
    )
    .unwrap();
    let options = RunOptions {
        from_state: Some(kept_state),
        ..opts(&tmp.path().join("never"))
    };
    let cfg = smoke_config(&["train.steps=4"]);
    let err = baton_pretrain::run::<Train>(
        std::slice::from_ref(&b),
        &cfg,
        &options,
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("not before train.steps (4)") && !err.contains('\n'),
        "{err}"
    );
    assert!(!tmp.path().join("never").exists() && !partial_exists(&tmp.path().join("never")));
}

fn partial_exists(out: &Path) -> bool {
    baton_core::checkpoint::partial_dir(out).exists()
}

/// A mixture with phases killed after a train_state save resumes to the bytes
/// of the uninterrupted run.
#[test]
fn a_killed_mixture_with_phases_resumes_byte_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = two_corpora(tmp.path());
    let file = config_file(
        tmp.path(),
        "mix.toml",
        &format!(
            "{}\n[[phases]]\nuntil_step = 5\nseq_len = 16\n\n[[phases]]\nuntil_step = 9\nweights = {{ code = 1.0 }}\ndecay = \"cosine\"\nlr_end = 1e-4\n",
            sources_toml(&a, &b, "weight = 0.7", "weight = 0.3")
        ),
    );
    let sets = ["train.save_every=3", "train.eval_every=4"];
    let cfg = load(std::slice::from_ref(&file), &sets).unwrap();
    let straight = baton_pretrain::run::<Train>(
        &[],
        &cfg,
        &opts(&tmp.path().join("straight")),
        &Default::default(),
    )
    .unwrap();
    let killed = tmp.path().join("killed");
    for resume in [false, true] {
        let mut command = child_command(&killed, &sets);
        command
            .env("BATON_E2E_CHILD_CONFIG", &file)
            .env("BATON_FAULT", "train-state-saved");
        if resume {
            command.env("BATON_E2E_CHILD_RESUME", "1");
        }
        let output = command.output().unwrap();
        assert!(!output.status.success(), "the fault did not fire");
    }
    let resume = RunOptions {
        resume: true,
        ..opts(&killed)
    };
    let resumed = baton_pretrain::run::<Train>(&[], &cfg, &resume, &Default::default()).unwrap();
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(
        weights(&resumed) == weights(&straight),
        "resumed mixture differs"
    );
}

/// Filtering scores examples without gradients and leaves the easy ones out
/// of the backward pass; repacking keeps each kept example's loss.
#[test]
fn loss_threshold_filtering_skips_easy_examples_and_keeps_the_rest_intact() {
    use baton_core::chat::{ChatRenderer, Message, Role, Supervise};
    use baton_core::train::packed_batch;
    let tmp = tempfile::tempdir().unwrap();
    let pretrain_dir = tiny_pretrain(tmp.path());
    let parent = Checkpoint::open(&pretrain_dir, &[]).unwrap();
    let tokenizer = parent.tokenizer().unwrap();
    let model = parent.model::<Inner>(&Default::default()).unwrap();
    let renderer = ChatRenderer::new(&tokenizer);
    let rendered: Vec<_> = ["one", "two two", "three three three", "four", "five five"]
        .iter()
        .map(|t| {
            renderer
                .render(
                    &[
                        Message::new(Role::User, "say"),
                        Message::new(Role::Assistant, *t),
                    ],
                    Supervise::AllAssistant,
                )
                .unwrap()
        })
        .collect();
    let rows = vec![
        vec![&rendered[0], &rendered[1]],
        vec![&rendered[2], &rendered[3], &rendered[4]],
    ];
    let batch = packed_batch(&rows, 32, tokenizer.special.pad);
    let device = Default::default();
    let nll = |b: &baton_core::train::Batch| {
        use baton_core::burn::tensor::ElementConversion;
        b.nll_sum(&model, &device).into_scalar().elem::<f64>()
    };
    let logprobs: Vec<f32> = batch
        .token_logprobs(&model, &device)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    let losses = batch.document_losses(&logprobs);
    assert_eq!(losses.len(), 5);
    let all = batch.with_documents(&[true; 5]);
    assert!((nll(&all) - nll(&batch)).abs() < 1e-4 * nll(&batch));
    let keep = [false, true, false, true, true];
    let some = batch.with_documents(&keep);
    assert!(some.batch <= batch.batch && some.tokens() < batch.tokens());
    let one = |i: usize| {
        let mut k = [false; 5];
        k[i] = true;
        nll(&batch.with_documents(&k))
    };
    let expected: f64 = [1, 3, 4].iter().map(|&i| one(i)).sum();
    assert!(
        (nll(&some) - expected).abs() < 1e-4 * expected,
        "{} vs {expected}",
        nll(&some)
    );

    // In SFT: about the percentile's share of examples skips the backward pass.
    let run = |name: &str, sets: &[&str]| {
        let cfg = sft_config(&parent, sets).unwrap();
        baton_sft::run::<Train>(
            &pretrain_dir,
            &cfg,
            &sft_opts(&tmp.path().join(name), vec![]),
            &device,
        )
        .unwrap()
    };
    let base = ["train.steps=8", "train.eval_every=0"];
    let plain = run("plain", &base);
    let filtered = run(
        "filtered",
        &[
            &base[..],
            &["data.filter.percentile=60", "data.filter.warmup=2"],
        ]
        .concat(),
    );
    let (p, f) = (
        Checkpoint::open(&plain, &[]).unwrap().manifest,
        Checkpoint::open(&filtered, &[]).unwrap().manifest,
    );
    let share = f.metrics["filter_skipped_share"];
    assert!((0.25..0.7).contains(&share), "skipped share {share}");
    assert!(
        f.tokens_seen < p.tokens_seen,
        "{} vs {}",
        f.tokens_seen,
        p.tokens_seen
    );
    assert!(!p.metrics.contains_key("filter_skipped_share"));
    let skipped_lines = std::fs::read_to_string(filtered.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("filter/skipped"))
        .count();
    assert!(skipped_lines >= 4);
    let err = sft_config(&parent, &["data.filter.percentile=100"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data.filter.percentile must be in [0, 100)"),
        "{err}"
    );
}

/// An imported model (HF) continues pretraining like any pretrain checkpoint:
/// its architecture and tokenizer are kept, its lineage recorded.
#[test]
fn an_imported_model_is_a_valid_parent_for_continued_pretraining() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = chatml_hf_dir(tmp.path());
    let imported = baton::interop::hf::import_hf(&hf, &tmp.path().join("imported"), false).unwrap();
    let parent = Checkpoint::open(&imported, &[]).unwrap();
    let (_, code) = two_corpora(tmp.path());
    let options = RunOptions {
        from: Some(imported.clone()),
        ..opts(&tmp.path().join("continued"))
    };
    // The smoke [train], no [model]: the architecture is the import's.
    let cfg = PretrainConfig {
        train: smoke_config(&["train.steps=3"]).train,
        ..PretrainConfig::default()
    };
    let out = baton_pretrain::run::<Train>(&[code], &cfg, &options, &Default::default()).unwrap();
    let m = Checkpoint::open(&out, &[]).unwrap().manifest;
    assert_eq!(m.model, parent.manifest.model);
    assert_eq!(m.tokenizer_sha256, parent.manifest.tokenizer_sha256);
    assert_eq!(m.parents[0].manifest_sha256, parent.manifest_sha256);
    assert_eq!(m.step, 3);
}
