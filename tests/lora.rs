//! LoRA through the stages: an adapter checkpoint holds PEFT's files and a
//! reference to its base (no base weights), children keep training it or
//! merge it, exports merge it or write it beside the base, align trains one,
//! and bad settings or a changed base are refused by name.

use super::*;

fn run_sft(from: &Path, out: &Path, sets: &[&str], merge_adapter: bool) -> anyhow::Result<PathBuf> {
    let parent = Checkpoint::open(from, &[]).unwrap();
    let cfg = sft_config(&parent, sets)?;
    baton_sft::run::<Train>(
        from,
        &cfg,
        &baton_sft::RunOptions {
            merge_adapter,
            ..sft_opts(out, vec![])
        },
        &Default::default(),
    )
}

fn logits(ck: &Checkpoint) -> Vec<Vec<f32>> {
    let device = Default::default();
    let ids = [0u32, 9, 17, 33, 5, 71, 2];
    baton::interop::hf::logits_of(&ck.model::<Inner>(&device).unwrap(), &ids, &device)
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn adapters_train_alone_are_stored_as_peft_and_carry_through_stages_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let base_dir = tiny_pretrain(tmp.path());
    let base = Checkpoint::open(&base_dir, &[]).unwrap();
    let lora_sets = [
        "train.steps=4",
        "train.lr=1e-2",
        "lora.rank=4",
        "lora.alpha=8",
    ];
    let sft_dir = run_sft(&base_dir, &tmp.path().join("sft-lora"), &lora_sets, false).unwrap();
    let sft = Checkpoint::open(&sft_dir, &["sft"]).unwrap();

    // PEFT's files, no base weights, the base named by path and hash.
    assert!(!sft_dir.join("model.safetensors").exists());
    let adapter = sft.manifest.adapter.clone().unwrap();
    assert_eq!((adapter.rank, adapter.alpha), (4, 8.0));
    assert_eq!(adapter.base.manifest_sha256, base.manifest_sha256);
    assert!(Path::new(&adapter.base.path).is_absolute());
    let peft: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(sft_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (peft["peft_type"].as_str(), peft["r"].as_u64()),
        (Some("LORA"), Some(4))
    );
    let tensors =
        baton_core::checkpoint::read_safetensors(&sft_dir.join("adapter_model.safetensors"))
            .unwrap();
    let layers = sft.manifest.model.n_layers;
    assert_eq!(tensors.len(), layers * 7 * 2);
    assert!(tensors.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    // Only adapters trained; they moved the model.
    let trained = sft.manifest.trained.clone().unwrap();
    assert_eq!(trained.len(), layers * 7 * 2);
    assert!(trained.iter().all(|n| n.contains(".lora.")));
    assert!(max_diff(&logits(&sft), &logits(&base)) > 1e-3);

    // A child keeps training the adapter on the same base...
    let child_dir = run_sft(
        &sft_dir,
        &tmp.path().join("child"),
        &["train.steps=2"],
        false,
    )
    .unwrap();
    let child = Checkpoint::open(&child_dir, &[]).unwrap();
    assert_eq!(child.manifest.adapter.as_ref().unwrap().base, adapter.base);
    assert!(max_diff(&logits(&child), &logits(&sft)) > 0.0);
    // ...or merges it and trains every weight.
    let merged_dir = run_sft(
        &sft_dir,
        &tmp.path().join("merged"),
        &["train.steps=1", "train.lr=1e-9"],
        true,
    )
    .unwrap();
    let merged = Checkpoint::open(&merged_dir, &[]).unwrap();
    assert!(merged.manifest.adapter.is_none() && merged_dir.join("model.safetensors").exists());
    assert!(max_diff(&logits(&merged), &logits(&sft)) < 1e-3);

    // Base tensors unfrozen beside the adapter are saved with it (PEFT's
    // modules_to_save), applied on load and kept by a child.
    let with_embed = run_sft(
        &base_dir,
        &tmp.path().join("sft-lora-embed"),
        &[
            "train.steps=3",
            "train.lr=1e-2",
            "lora.rank=2",
            "train.train_only=[\"model.embed_tokens.weight\"]",
        ],
        false,
    )
    .unwrap();
    let with_embed = Checkpoint::open(&with_embed, &[]).unwrap();
    let saved = with_embed
        .manifest
        .adapter
        .as_ref()
        .unwrap()
        .modules_to_save
        .clone();
    assert_eq!(saved, ["model.embed_tokens.weight"]);
    let file =
        baton_core::checkpoint::read_safetensors(&with_embed.dir.join("adapter_model.safetensors"))
            .unwrap();
    let base_embed = &base.weights().unwrap()["model.embed_tokens.weight"];
    let trained_embed = &file["base_model.model.model.embed_tokens.weight"];
    assert_ne!(
        trained_embed.to_vec::<f32>().unwrap(),
        base_embed.to_vec::<f32>().unwrap()
    );
    assert_eq!(
        with_embed.weights().unwrap()["model.embed_tokens.weight"]
            .to_vec::<f32>()
            .unwrap(),
        trained_embed.to_vec::<f32>().unwrap(),
        "the saved embedding replaces the base's"
    );
    let peft: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(with_embed.dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        peft["modules_to_save"],
        serde_json::json!(["model.embed_tokens"])
    );
    let kept = run_sft(
        &with_embed.dir,
        &tmp.path().join("kept"),
        &["train.steps=1"],
        false,
    )
    .unwrap();
    let kept = Checkpoint::open(&kept, &[]).unwrap();
    assert_eq!(
        kept.manifest.adapter.as_ref().unwrap().modules_to_save,
        saved
    );
    assert_eq!(
        kept.weights().unwrap()["model.embed_tokens.weight"]
            .to_vec::<f32>()
            .unwrap(),
        trained_embed.to_vec::<f32>().unwrap(),
        "a child that freezes it keeps the parent's trained embedding"
    );

    // Align trains a LoRA adapter on a full SFT parent.
    let full_sft = run_sft(
        &base_dir,
        &tmp.path().join("sft-full"),
        &["train.steps=2"],
        false,
    )
    .unwrap();
    let parent = Checkpoint::open(&full_sft, &[]).unwrap();
    let cfg = align_config(
        &parent,
        &[
            "train.steps=2",
            "lora.rank=2",
            "lora.targets=[\"q_proj\",\"v_proj\"]",
        ],
    )
    .unwrap();
    let aligned = baton_align::run::<Train>(
        &full_sft,
        &cfg,
        &align_opts(&tmp.path().join("align-lora"), vec![]),
        &Default::default(),
    )
    .unwrap();
    let aligned = Checkpoint::open(&aligned, &["align"]).unwrap();
    let a = aligned.manifest.adapter.as_ref().unwrap();
    assert_eq!(
        (a.rank, a.targets.clone()),
        (2, vec!["q_proj".to_string(), "v_proj".to_string()])
    );
    assert_eq!(a.base.manifest_sha256, parent.manifest_sha256);

    // GRPO with an adapter: its reference is the policy at the start.
    let cfg = align_config(
        &parent,
        &[
            "train.steps=2",
            "align.method=\"grpo\"",
            "grpo.group=4",
            "grpo.prompts=2",
            "grpo.max_new_tokens=4",
            "lora.rank=2",
        ],
    )
    .unwrap();
    let rl = baton_align::run::<Train>(
        &full_sft,
        &cfg,
        &align_opts(&tmp.path().join("grpo-lora"), vec![]),
        &Default::default(),
    )
    .unwrap();
    let rl = Checkpoint::open(&rl, &["align"]).unwrap();
    assert_eq!(rl.manifest.adapter.as_ref().unwrap().rank, 2);
    assert!(rl.manifest.metrics.contains_key("parent_task_accuracy"));

    // Exports: merged by default; --adapter-only writes the base and PEFT's files.
    let hf = tmp.path().join("hf");
    baton::interop::hf::export(&sft, &hf, baton::interop::hf::ExportDtype::F32, false).unwrap();
    let imported = baton::interop::hf::import_hf(&hf, &tmp.path().join("imported"), false).unwrap();
    let imported = Checkpoint::open(&imported, &[]).unwrap();
    assert!(max_diff(&logits(&imported), &logits(&sft)) < 1e-5);
    let split = tmp.path().join("hf-adapter");
    baton::interop::hf::export_as(
        &sft,
        &split,
        baton::interop::hf::ExportDtype::F32,
        false,
        true,
    )
    .unwrap();
    assert!(split.join("adapter/adapter_model.safetensors").is_file());
    assert!(split.join("adapter/adapter_config.json").is_file());
    let base_only =
        baton::interop::hf::import_hf(&split, &tmp.path().join("base-only"), false).unwrap();
    assert_eq!(
        logits(&Checkpoint::open(&base_only, &[]).unwrap()),
        logits(&base),
        "--adapter-only exports the base unmerged"
    );
    let err = baton::interop::hf::export_as(
        &base,
        &tmp.path().join("x"),
        baton::interop::hf::ExportDtype::F32,
        false,
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("holds no LoRA adapter"), "{err}");

    // Bad settings: one line naming the key; nothing written.
    for (sets, words, merge) in [
        (vec!["lora.rank=0"], "lora.rank must be at least 1", false),
        (
            vec!["lora.rank=4", "lora.targets=[\"qkv_proj\"]"],
            "\"qkv_proj\"",
            false,
        ),
        (vec!["lora.rank=4096"], "above the width", false),
        (
            vec![
                "lora.rank=2",
                "train.train_only=[\"model.layers.0.self_attn.q_proj.weight\"]",
            ],
            "carries a LoRA adapter",
            false,
        ),
        (vec![], "holds no LoRA adapter to merge", true),
    ] {
        let out = tmp.path().join("never");
        let err = format!("{:#}", run_sft(&base_dir, &out, &sets, merge).unwrap_err());
        assert!(!err.contains('\n') && err.contains(words), "{err}");
        assert!(!out.exists());
    }
    let err = format!(
        "{:#}",
        run_sft(&sft_dir, &tmp.path().join("never"), &["lora.rank=8"], false).unwrap_err()
    );
    assert!(err.contains("holds an adapter of rank 4"), "{err}");

    // A base that changed since: the adapter is refused by name, not applied.
    let corpus = text_corpus(tmp.path(), 30_000);
    pretrain(
        &corpus,
        &smoke_config(&["train.steps=3", "train.seed=99"]),
        &RunOptions {
            force: true,
            ..opts(&base_dir)
        },
    )
    .unwrap();
    let err = format!(
        "{:#}",
        Checkpoint::open(&sft_dir, &[])
            .unwrap()
            .model::<Inner>(&Default::default())
            .unwrap_err()
    );
    assert!(
        err.contains("has changed since the adapter was trained"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        run_sft(
            &sft_dir,
            &tmp.path().join("never"),
            &["train.steps=1"],
            false
        )
        .unwrap_err()
    );
    assert!(
        err.contains("has changed since the adapter was trained"),
        "{err}"
    );
}

/// A LoRA run killed (aborted) after a train_state save and resumed ends with the
/// same adapter bytes as an uninterrupted run.
#[test]
fn a_killed_lora_run_resumes_byte_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let base_dir = tiny_pretrain(tmp.path());
    let sets = [
        "train.steps=16",
        "train.save_every=2",
        "lora.rank=4",
        "lora.dropout=0.1",
    ];
    let straight = run_sft(&base_dir, &tmp.path().join("straight"), &sets, false).unwrap();
    // Dropout is on in these training passes: without it the adapter differs.
    let no_dropout = run_sft(&base_dir, &tmp.path().join("no-dropout"), &sets[..3], false).unwrap();
    assert_ne!(
        std::fs::read(no_dropout.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(straight.join("adapter_model.safetensors")).unwrap()
    );
    let killed = tmp.path().join("killed");
    super::freeze::kill_after_a_save(&killed, &base_dir, &sets);
    let parent = Checkpoint::open(&base_dir, &[]).unwrap();
    let resumed = baton_sft::run::<Train>(
        &base_dir,
        &sft_config(&parent, &sets).unwrap(),
        &baton_sft::RunOptions {
            resume: true,
            ..sft_opts(&killed, vec![])
        },
        &Default::default(),
    )
    .unwrap();
    assert!(
        std::fs::read(resumed.join("adapter_model.safetensors")).unwrap()
            == std::fs::read(straight.join("adapter_model.safetensors")).unwrap(),
        "resumed adapter differs from the uninterrupted run's"
    );
}
