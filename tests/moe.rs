//! Mixtures of experts (issue 22): `baton upcycle` keeps its dense parent's
//! function, continual pretraining trains the experts with the balancing
//! loss and logs the routing, global balancing counts the whole step, a run
//! killed mid-way resumes to the same bytes, the export is one transformers
//! loads as Mixtral, and what cannot be done is refused in one line with
//! nothing written.

use super::*;
use baton::grow::{UpcycleSettings, upcycle};
use baton_core::model::ModelConfig;

fn settings(experts: usize, top_k: usize) -> UpcycleSettings {
    UpcycleSettings {
        experts,
        top_k,
        ..UpcycleSettings::default()
    }
}

/// The continued run's config: smoke training settings, the parent's model.
fn continued(sets: &[&str]) -> PretrainConfig {
    PretrainConfig {
        model: ModelConfig::default(),
        ..smoke_config(sets)
    }
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn first_val_loss(dir: &Path) -> f64 {
    metrics(dir)[0]["val/loss"].as_f64().unwrap()
}

#[test]
fn an_upcycled_model_starts_as_its_parent_and_trains_its_experts() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = tiny_pretrain(tmp.path());
    let corpus = tmp.path().join("corpus.txt");
    let up = upcycle(&parent, &settings(4, 2), &tmp.path().join("up"), false).unwrap();
    let ckpt = Checkpoint::open(&up, &[]).unwrap();
    assert_eq!(ckpt.manifest.stage, "upcycle");
    let moe = ckpt.manifest.model.moe.clone().unwrap();
    assert_eq!((moe.experts, moe.top_k, moe.every), (4, 2, 1));

    // Continued from the upcycled model and from the parent, the
    // evaluations before training agree.
    let sets = ["train.steps=4", "train.eval_every=2", "train.log_every=1"];
    let run = |from: &Path, out: &str, extra: &[&str]| {
        let opts = RunOptions {
            from: Some(from.to_path_buf()),
            ..opts(&tmp.path().join(out))
        };
        let sets: Vec<&str> = sets.iter().chain(extra).copied().collect();
        pretrain(&corpus, &continued(&sets), &opts).unwrap()
    };
    let on_parent = run(&parent, "on-parent", &[]);
    let on_up = run(&up, "on-up", &[]);
    let (p, u) = (first_val_loss(&on_parent), first_val_loss(&on_up));
    assert!(
        (p - u).abs() <= 1e-5 * p,
        "step-0 val/loss {u} against the parent's {p}"
    );
    // Every logged step has the routing metrics; the parent's run none.
    let steps: Vec<serde_json::Value> = metrics(&on_up)
        .into_iter()
        .filter(|m| m.get("train/loss").is_some())
        .collect();
    assert_eq!(steps.len(), 4);
    for m in &steps {
        let lbl = m["moe/lbl"].as_f64().unwrap();
        // E·Σ f·p is 1 when balanced and at most E.
        assert!((0.99..=4.0).contains(&lbl), "moe/lbl {lbl}");
        let (lo, hi) = (
            m["moe/load_min/0"].as_f64().unwrap(),
            m["moe/load_max/0"].as_f64().unwrap(),
        );
        assert!(lo <= 0.25 && hi >= 0.25 && lo >= 0.0 && hi <= 1.0, "{m}");
        assert!(m["moe/entropy"].as_f64().unwrap() > 0.0);
    }
    assert!(
        metrics(&on_parent)
            .iter()
            .all(|m| m.get("moe/lbl").is_none())
    );
    // The experts were copies; training made them differ.
    let trained = Checkpoint::open(&on_up, &[]).unwrap().weights().unwrap();
    let w = |j: usize| {
        trained[&format!("model.layers.0.block_sparse_moe.experts.{j}.w1.weight")]
            .to_vec::<f32>()
            .unwrap()
    };
    assert_ne!(w(0), w(1), "the experts are still copies of each other");
    assert_eq!(
        Checkpoint::open(&on_up, &[]).unwrap().manifest.model.moe,
        Some(moe)
    );

    // The HF export is a Mixtral model; importing it gives the same model back.
    let out = Checkpoint::open(&on_up, &[]).unwrap();
    let to = tmp.path().join("hf");
    baton::interop::hf::export(&out, &to, baton::interop::hf::ExportDtype::F32, false).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(to.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "MixtralForCausalLM");
    assert_eq!(config["num_local_experts"], 4);
    let back = baton::interop::hf::import_hf(&to, &tmp.path().join("back"), false).unwrap();
    assert_eq!(
        Checkpoint::open(&back, &[]).unwrap().manifest.model,
        out.manifest.model
    );
}

#[test]
fn a_moe_run_killed_mid_way_resumes_to_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = tiny_pretrain(tmp.path());
    let corpus = tmp.path().join("corpus.txt");
    let up = upcycle(&parent, &settings(3, 2), &tmp.path().join("up"), false).unwrap();
    // Global balancing over 2 micro-batches: the pre-pass runs every step.
    let sets = [
        "train.steps=6",
        "train.save_every=2",
        "train.grad_accum=2",
        "moe.balance_weight=0.1",
        "moe.z_weight=0.001",
    ];
    let from = |out: &Path, resume: bool| RunOptions {
        from: Some(up.clone()),
        resume,
        ..opts(out)
    };
    let straight = tmp.path().join("straight");
    pretrain(&corpus, &continued(&sets), &from(&straight, false)).unwrap();
    assert!(
        metrics(&straight)
            .iter()
            .any(|m| m["moe/z"].as_f64().is_some())
    );
    let killed = tmp.path().join("killed");
    let status = child_command(&killed, &sets)
        .env("BATON_E2E_CHILD_CORPUS", &corpus)
        .env("BATON_E2E_CHILD_FROM", &up)
        .env("BATON_FAULT", "step-3")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the injected fault did not fire");
    let dir = pretrain(&corpus, &continued(&sets), &from(&killed, true)).unwrap();
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        std::fs::read(straight.join("model.safetensors")).unwrap(),
        "the resumed MoE run differs from the uninterrupted one"
    );
}

/// Global and per-micro-batch balancing train differently (the counts they
/// use differ once micro-batches differ), and both differ from no balancing.
#[test]
fn global_and_micro_batch_balancing_are_different_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = tiny_pretrain(tmp.path());
    let corpus = tmp.path().join("corpus.txt");
    let up = upcycle(&parent, &settings(4, 1), &tmp.path().join("up"), false).unwrap();
    let run = |out: &str, extra: &[&str]| {
        let opts = RunOptions {
            from: Some(up.clone()),
            ..opts(&tmp.path().join(out))
        };
        let mut sets = vec!["train.steps=2", "train.grad_accum=4", "train.batch_size=2"];
        sets.extend(extra);
        let dir = pretrain(&corpus, &continued(&sets), &opts).unwrap();
        std::fs::read(dir.join("model.safetensors")).unwrap()
    };
    let global = run("global", &["moe.balance_weight=1.0"]);
    let micro = run(
        "micro",
        &["moe.balance_weight=1.0", "moe.balance=\"micro\""],
    );
    let none = run("none", &["moe.balance_weight=0.0"]);
    assert_ne!(
        global, micro,
        "global and micro balancing trained the same weights"
    );
    assert_ne!(global, none);
    assert_ne!(micro, none);
}

#[test]
fn moe_work_that_cannot_be_done_is_refused_in_one_line_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = tiny_pretrain(tmp.path());
    let corpus = tmp.path().join("corpus.txt");
    let out = tmp.path().join("out");
    let refused = |s: UpcycleSettings, from: &Path, want: &str| {
        let err = format!("{:#}", upcycle(from, &s, &out, false).unwrap_err());
        assert!(err.contains(want), "{err}");
        assert!(!err.contains('\n'), "not one line: {err}");
        assert!(!out.exists() && !tmp.path().join("out.partial").exists());
    };
    refused(
        settings(4, 5),
        &parent,
        "--top-k must be between 1 and --experts (4)",
    );
    refused(settings(1, 1), &parent, "--experts must be at least 2");
    let up = upcycle(&parent, &settings(4, 2), &tmp.path().join("up"), false).unwrap();
    refused(
        settings(4, 2),
        &up,
        "is a upcycle checkpoint, expected pretrain or merge",
    );
    // An MoE model after pretraining: a kind upcycle accepts, but sparse.
    let trained = RunOptions {
        from: Some(up.clone()),
        ..opts(&tmp.path().join("trained"))
    };
    let trained = pretrain(&corpus, &continued(&["train.steps=1"]), &trained).unwrap();
    refused(
        settings(8, 2),
        &trained,
        "already a mixture-of-experts model",
    );

    // A negative balance weight: refused before anything is written.
    let opts = RunOptions {
        from: Some(up.clone()),
        ..opts(&out)
    };
    let err = baton_pretrain::load_config(&ConfigSources {
        builtin: Vec::new(),
        files: vec![repo().join("configs/smoke/pretrain.toml")],
        sets: vec!["moe.balance_weight=-0.5".into()],
        env: false,
    })
    .map(|cfg| pretrain(&corpus, &cfg, &opts))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("moe.balance_weight must be a finite number ≥ 0"),
        "{err}"
    );
    assert!(!out.exists());

    // Growth, LoRA and GGUF refuse an MoE model.
    let err = format!(
        "{:#}",
        baton::grow::grow(
            &trained,
            &baton_core::grow::GrowTo {
                layers: Some(4),
                ..Default::default()
            },
            true,
            0,
            &out,
            false
        )
        .unwrap_err()
    );
    assert!(err.contains("mixture-of-experts"), "{err}");
    let lora = RunOptions {
        from: Some(up.clone()),
        ..opts.clone()
    };
    let err = pretrain(&corpus, &continued(&["lora.rank=4"]), &lora)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not supported on a mixture-of-experts"),
        "{err}"
    );
    assert!(!out.exists() && !tmp.path().join("out.partial").exists());
    let gguf = tmp.path().join("x.gguf");
    let err = baton::interop::gguf_export::export_gguf(
        &Checkpoint::open(&up, &[]).unwrap(),
        &gguf,
        baton::interop::gguf_export::GgufDtype::F32,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("does not export to GGUF"), "{err}");
    assert!(!gguf.exists());
}

/// Two sources in single-source micro-batches: the final evaluation reports
/// each source's expert shares and how specialised the experts are.
#[test]
fn a_moe_run_on_two_sources_reports_each_sources_expert_shares() {
    use baton_pretrain::sources::SourceConfig;
    let tmp = tempfile::tempdir().unwrap();
    let parent = tiny_pretrain(tmp.path());
    let prose = tmp.path().join("corpus.txt");
    let code = tmp.path().join("code.txt");
    std::fs::write(
        &code,
        std::fs::read_to_string(repo().join("core/src/model.rs")).unwrap(),
    )
    .unwrap();
    let up = upcycle(&parent, &settings(4, 2), &tmp.path().join("up"), false).unwrap();
    let mut cfg = continued(&["train.steps=2", "train.grad_accum=2", "data.mix=\"micro\""]);
    cfg.data.sources = [("prose", &prose), ("code", &code)]
        .into_iter()
        .map(|(name, path)| SourceConfig {
            name: name.into(),
            path: path.display().to_string(),
            weight: Some(1.0),
            eval_only: false,
        })
        .collect();
    let opts = RunOptions {
        from: Some(up),
        ..opts(&tmp.path().join("mix"))
    };
    let dir = baton_pretrain::run::<Train>(&[], &cfg, &opts, &Default::default()).unwrap();
    let last = metrics(&dir).pop().unwrap();
    for source in ["prose", "code"] {
        let total: f64 = (0..4)
            .map(|j| last[format!("moe/share/{source}/0/{j}")].as_f64().unwrap())
            .sum();
        assert!(
            (total - 1.0).abs() < 1e-9,
            "{source}: shares sum to {total}"
        );
    }
    let spec = last["moe/specialisation"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&spec), "{spec}");
}

/// An MoE model goes down the rest of the chain: sft trains it (experts
/// and router, with the balancing loss), and align takes the sft checkpoint.
#[test]
fn a_moe_model_takes_the_sft_and_align_stages() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = tiny_pretrain(tmp.path());
    let corpus = tmp.path().join("corpus.txt");
    let up = upcycle(&parent, &settings(3, 2), &tmp.path().join("up"), false).unwrap();
    let opts_from = |out: &str| RunOptions {
        from: Some(up.clone()),
        ..opts(&tmp.path().join(out))
    };
    let moe = pretrain(&corpus, &continued(&["train.steps=2"]), &opts_from("moe")).unwrap();
    let ckpt = Checkpoint::open(&moe, &[]).unwrap();
    let cfg = sft_config(&ckpt, &["train.steps=2"]).unwrap();
    let sft = baton_sft::run::<Train>(
        &moe,
        &cfg,
        &sft_opts(&tmp.path().join("sft"), vec![]),
        &Default::default(),
    )
    .unwrap();
    let tuned = Checkpoint::open(&sft, &[]).unwrap();
    assert_eq!(tuned.manifest.model.moe, ckpt.manifest.model.moe);
    let (before, after) = (ckpt.weights().unwrap(), tuned.weights().unwrap());
    let name = "model.layers.1.block_sparse_moe.gate.weight";
    assert_ne!(before[name], after[name], "sft left the router alone");
    // sft balances the experts as pretrain does.
    assert!(
        metrics(&sft)
            .iter()
            .any(|m| m["moe/lbl"].as_f64().is_some()),
        "sft logged no balancing loss"
    );
    let cfg = align_config(&tuned, &["train.steps=1"]).unwrap();
    baton_align::run::<Train>(
        &sft,
        &cfg,
        &align_opts(&tmp.path().join("align"), vec![]),
        &Default::default(),
    )
    .unwrap();
}
