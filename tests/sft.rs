//! The sft stage: lineage, bad inputs named by file and line, overfitting a handful of examples.

use super::*;

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
