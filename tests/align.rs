//! The align stage: on-policy pairs, the losses, the reference cache, lineage, bad inputs; stage kinds.

use super::*;

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
    // The means add up (they travel as sums and counts, summed over the
    // ranks of a data-parallel run): over pairs, the mean margin is the
    // chosen mean less the rejected one. The last step's line, as at the
    // first the policy is its reference and every reward is 0.
    let last_step = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .rfind(|v| v["rewards/margins"].is_number())
        .unwrap();
    let at = |key: &str| last_step[key].as_f64().unwrap();
    assert!(at("rewards/chosen") != 0.0, "{last_step}");
    assert!(
        (at("rewards/margins") - (at("rewards/chosen") - at("rewards/rejected"))).abs()
            < 1e-3 * at("rewards/chosen").abs().max(at("rewards/rejected").abs()),
        "{last_step}"
    );
    assert!(
        (0.0..=1.0).contains(&at("rewards/accuracies")),
        "{last_step}"
    );
    assert!(
        at("logps/chosen") < 0.0 && at("logps/rejected") < 0.0,
        "{last_step}"
    );
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

    // A base model (no chat template) takes a reference-free loss only.
    let err = run(&tmp.path().join("pretrain"), &cfg, vec![]);
    assert!(
        err.contains("parent has no chat template") && err.contains("reference-free loss"),
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
fn a_harder_difficulty_draws_pair_prompts_and_is_evaluated_beside_the_standard_set() {
    let tmp = tempfile::tempdir().unwrap();
    let sft_dir = tiny_sft(tmp.path());
    let sft = Checkpoint::open(&sft_dir, &["sft"]).unwrap();
    let sets = [
        "harder.digits=4",
        "harder.length=6",
        "harder.prompt_share=0.5",
    ];
    let cfg = align_config(&sft, &sets).unwrap();
    // Half the 12 pair prompts at the harder difficulty: 4-digit operands.
    let prompts = baton_align::default_pair_tasks(&cfg);
    assert_eq!(prompts.len(), 12);
    let digits = |t: &baton_core::tasks::Task| {
        t.prompt
            .split(|c: char| !c.is_ascii_digit())
            .map(str::len)
            .max()
            .unwrap_or(0)
    };
    let arithmetic =
        |t: &&baton_core::tasks::Task| matches!(t.family.name(), "add" | "sub" | "mul");
    assert!(
        prompts[..6]
            .iter()
            .filter(arithmetic)
            .all(|t| digits(t) <= 2)
    );
    assert!(
        prompts[6..]
            .iter()
            .filter(arithmetic)
            .any(|t| digits(t) == 4)
    );
    let out = tmp.path().join("align");
    let dir = baton_align::run::<Train>(
        &sft_dir,
        &cfg,
        &align_opts(&out, vec![]),
        &Default::default(),
    )
    .unwrap();
    let metrics = Checkpoint::open(&dir, &[]).unwrap().manifest.metrics;
    for key in [
        "task_accuracy",
        "harder/task_accuracy",
        "parent_task_accuracy",
        "parent_harder/task_accuracy",
        "harder/stop_rate",
    ] {
        assert!(metrics.contains_key(key), "{key} missing: {metrics:?}");
    }
    // A share without a harder difficulty, or outside [0, 1], is refused.
    for (set, want) in [
        ("harder.prompt_share=0.5", "sets no difficulty"),
        ("harder.prompt_share=1.5", "must be in [0, 1]"),
    ] {
        let err = format!(
            "{:#}",
            align_config(&sft, &[set, "harder.digits=0"]).unwrap_err()
        );
        assert!(err.contains(want), "{set}: {err}");
    }
}

#[test]
fn grpo_and_rloo_sample_reward_and_train_from_an_sft_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let sft_dir = tiny_sft(tmp.path());
    let sft = Checkpoint::open(&sft_dir, &["sft"]).unwrap();
    for method in ["grpo", "rloo"] {
        let method_set = format!("align.method=\"{method}\"");
        // RLOO also trains the NLL anchor on gold task replies.
        let anchored = method == "rloo";
        let anchor_set = if anchored {
            "grpo.sft_weight=0.5"
        } else {
            "grpo.sft_weight=0"
        };
        let sets = [
            method_set.as_str(),
            "grpo.group=4",
            "grpo.prompts=3",
            "grpo.max_new_tokens=6",
            "grpo.inner_steps=2",
            "grpo.stop_reward=0.5",
            "grpo.sft_rows=2",
            anchor_set,
            "train.lr=1e-3",
        ];
        let cfg = align_config(&sft, &sets).unwrap();
        let out = tmp.path().join(method);
        let dir = baton_align::run::<Train>(
            &sft_dir,
            &cfg,
            &align_opts(&out, vec![]),
            &Default::default(),
        )
        .unwrap();
        let ckpt = Checkpoint::open(&dir, &["align"]).unwrap();
        let m = &ckpt.manifest.metrics;
        for key in ["task_accuracy", "parent_task_accuracy", "sample_seconds"] {
            assert!(m.contains_key(key), "{method}: {key} missing");
        }
        assert!(m["generate_seconds"] <= m["sample_seconds"], "{m:?}");
        assert!(m["generate_tokens_per_second"] > 0.0, "{m:?}");
        // KL to the parent, a Monte-Carlo estimate on held-out prompts (on a
        // model this small it can come out slightly negative): the policy moved.
        let kl = m["kl_to_reference"];
        assert!(kl.is_finite() && kl != 0.0, "{method}: KL {kl}");
        assert_ne!(
            std::fs::read(dir.join("model.safetensors")).unwrap(),
            std::fs::read(sft_dir.join("model.safetensors")).unwrap(),
            "{method}: training changed nothing"
        );
        let log = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        let rewards: Vec<f64> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["grpo/reward"].as_f64())
            .collect();
        assert_eq!(rewards.len(), 4, "{method}: one reward per logged step");
        // The anchor's NLL is logged when it is on, and only then; on a
        // barely trained model gold replies are far from certain.
        let anchor: Vec<f64> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["grpo/anchor_nll"].as_f64())
            .collect();
        if anchored {
            assert_eq!(anchor.len(), 4, "{method}: {anchor:?}");
            assert!(
                anchor.iter().all(|&n| n.is_finite() && n > 0.01),
                "{anchor:?}"
            );
        } else {
            assert!(anchor.is_empty(), "{method}: anchor logged while off");
        }
        // Rewards are a checker's 0/1 plus 0.5 for stopping: within [0, 1.5].
        assert!(
            rewards.iter().all(|r| (0.0..=1.5).contains(r)),
            "{rewards:?}"
        );
        if anchored {
            // `train.grad_accum` splits the sampled rows into micro-batches
            // of whole prompt groups (3 prompts: one each), then the anchor:
            // the first step's loss and gradient norm are those of one
            // micro-batch, up to the order floats are summed in. (Later
            // steps are not compared: Adam turns float noise in near-zero
            // gradients into steps of lr's size.)
            let first_step = |accum: &str| {
                let one_step: Vec<&str> = sets
                    .iter()
                    .copied()
                    .chain(["train.steps=1", "train.log_every=1", accum])
                    .collect();
                let cfg = align_config(&sft, &one_step).unwrap();
                let out = tmp.path().join(format!("rloo-{accum}"));
                let dir = baton_align::run::<Train>(
                    &sft_dir,
                    &cfg,
                    &align_opts(&out, vec![]),
                    &Default::default(),
                )
                .unwrap();
                let log = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
                let line: serde_json::Value = log
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .find(|v| v["step"] == 1 && v.get("train/loss").is_some())
                    .expect("step 1 logged");
                let value = |k: &str| line[k].as_f64().expect(k);
                (value("train/loss"), value("grad_norm"))
            };
            let (loss, norm) = first_step("train.grad_accum=1");
            let (split_loss, split_norm) = first_step("train.grad_accum=3");
            assert!(norm > 0.0, "no gradient at step 1");
            assert!(
                (loss - split_loss).abs() < 1e-5 * loss.abs().max(1.0)
                    && (norm - split_norm).abs() < 1e-4 * norm,
                "grad_accum 3 against 1: loss {split_loss} vs {loss}, grad norm {split_norm} vs {norm}"
            );
        }
    }
    // Replies longer than the window leaves after a prompt are cut at the
    // window, not refused: the tiny model has 32 positions.
    let cfg = align_config(
        &sft,
        &[
            "align.method=\"grpo\"",
            "grpo.group=2",
            "grpo.prompts=2",
            "grpo.max_new_tokens=64",
            "train.steps=2",
        ],
    )
    .unwrap();
    let out = tmp.path().join("long-replies");
    baton_align::run::<Train>(
        &sft_dir,
        &cfg,
        &align_opts(&out, vec![]),
        &Default::default(),
    )
    .unwrap();
    // Preference files are for preference methods.
    let cfg = align_config(&sft, &["align.method=\"grpo\""]).unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    std::fs::write(&pairs, "{}\n").unwrap();
    let out = tmp.path().join("with-data");
    let err = format!(
        "{:#}",
        baton_align::run::<Train>(
            &sft_dir,
            &cfg,
            &align_opts(&out, vec![pairs]),
            &Default::default()
        )
        .unwrap_err()
    );
    assert!(err.contains("samples its own replies"), "{err}");
    assert!(!out.exists());
    // Settings that cannot work are refused in one line.
    for (set, want) in [
        ("grpo.group=1", "grpo.group must be at least 2"),
        ("grpo.clip=1.5", "grpo.clip must be in (0, 1)"),
        ("grpo.temperature=0", "grpo.temperature must be positive"),
        (
            "grpo.sft_weight=-1",
            "grpo.sft_weight must be a finite number",
        ),
    ] {
        let err = format!(
            "{:#}",
            align_config(&sft, &["align.method=\"grpo\"", set]).unwrap_err()
        );
        assert!(err.contains(want), "{set}: {err}");
    }
    // The main job's align step (recipes/default.toml) loads: GRPO with the
    // anchor, evaluated on the harder set too.
    let recipe = baton::recipe::Recipe::default_pipeline();
    let step = recipe.steps.iter().find(|s| s.stage == "align").unwrap();
    let sets: Vec<&str> = step.set.iter().map(String::as_str).collect();
    let cfg = align_config(&sft, &sets).unwrap();
    assert_eq!(cfg.align.method, baton_align::Method::Grpo, "{sets:?}");
    assert!(cfg.grpo.sft_weight > 0.0, "{sets:?}");
    assert!(cfg.harder.tasks(&cfg.tasks).is_some(), "{sets:?}");
}

/// One-stage alignment (the "blur" comparison's ORPO/ASFT arm): a base
/// model without a chat template is aligned directly with a reference-free
/// loss and comes out a chat model; a loss that needs a reference is refused
/// by name.
#[test]
fn a_base_model_aligns_in_one_stage_with_a_reference_free_loss_only() {
    let tmp = tempfile::tempdir().unwrap();
    let pretrain_dir = tiny_pretrain(tmp.path());
    let base = Checkpoint::open(&pretrain_dir, &[]).unwrap();
    assert!(base.manifest.chat_template.is_none());
    let data = tmp.path().join("pairs.jsonl");
    let lines: Vec<String> = (0..12)
        .map(|i| {
            serde_json::json!({"prompt": format!("What is {i} + 1?"), "chosen": format!("{}", i + 1), "rejected": format!("{}", i + 7)})
                .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    for loss in ["orpo", "asft"] {
        let set = format!("align.loss=\"{loss}\"");
        let cfg = align_config(&base, &["train.steps=2", &set]).unwrap();
        let out = baton_align::run::<Train>(
            &pretrain_dir,
            &cfg,
            &align_opts(&tmp.path().join(loss), vec![data.clone()]),
            &Default::default(),
        )
        .unwrap();
        let aligned = Checkpoint::open(&out, &["align"]).unwrap();
        assert!(aligned.manifest.chat_template.is_some());
        assert_eq!(aligned.manifest.parents[0].stage, "pretrain");
    }
    for loss in ["dpo", "ipo"] {
        let set = format!("align.loss=\"{loss}\"");
        let err = format!("{:#}", align_config(&base, &[&set]).unwrap_err());
        assert!(
            !err.contains('\n') && err.contains("reference-free loss"),
            "{err}"
        );
    }
}

#[test]
fn iterative_rounds_sample_fresh_pairs_log_each_round_and_resume_across_rounds() {
    let tmp = tempfile::tempdir().unwrap();
    let sft_dir = tiny_sft(tmp.path());
    let sft = Checkpoint::open(&sft_dir, &["sft"]).unwrap();
    let sets = [
        "align.rounds=2",
        "align.reference_update=previous",
        "pairs.samples=3",
        "pairs.temperature=1.5",
    ];
    let cfg = align_config(&sft, &sets).unwrap();
    let straight = tmp.path().join("straight");
    let dir = baton_align::run::<Train>(
        &sft_dir,
        &cfg,
        &align_opts(&straight, vec![]),
        &Default::default(),
    )
    .unwrap();
    let ck = Checkpoint::open(&dir, &["align"]).unwrap();
    assert_eq!(ck.manifest.step, 8, "two rounds of 4 steps");
    assert_eq!(ck.manifest.metrics["rounds"], 2.0);
    for key in ["task_accuracy", "parent_task_accuracy"] {
        assert!(ck.manifest.metrics.contains_key(key), "{key} missing");
    }
    // Each round sampled its own pairs (another seed, another policy).
    let pairs = |r: usize| std::fs::read(dir.join(format!("pairs-{r}.jsonl"))).unwrap();
    assert!(!pairs(0).is_empty() && pairs(0) != pairs(1));
    assert!(!dir.join("round-0").exists() && !dir.join("round-1").exists());
    // metrics.jsonl: round 0's steps, round 1's after them, then one summary
    // line per round with its pairs and evaluation.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<(u64, u64)> = lines
        .iter()
        .filter(|v| v.get("train/loss").is_some())
        .map(|v| (v["round"].as_u64().unwrap(), v["step"].as_u64().unwrap()))
        .collect();
    assert_eq!(steps.first(), Some(&(0, 1)));
    assert_eq!(steps.last(), Some(&(1, 8)));
    assert!(steps.windows(2).all(|w| w[0].1 < w[1].1), "{steps:?}");
    let summaries: Vec<&serde_json::Value> =
        lines.iter().filter(|v| v.get("pairs").is_some()).collect();
    assert_eq!(summaries.len(), 2);
    for (r, s) in summaries.iter().enumerate() {
        assert_eq!(s["round"], r as u64);
        assert!(s["pairs"].as_u64().unwrap() > 0);
        assert!(s["round/task_accuracy"].as_f64().is_some(), "{s}");
    }

    // Killed right after round 0: the resumed run keeps round 0 and trains
    // round 1 to the same bytes.
    let killed = tmp.path().join("killed");
    let status = child_command(&killed, &sets)
        .env("BATON_E2E_CHILD_STAGE", "align")
        .env("BATON_E2E_CHILD_FROM", &sft_dir)
        .env("BATON_FAULT", "round-0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the injected fault did not fire");
    let resumed = baton_align::run::<Train>(
        &sft_dir,
        &cfg,
        &baton_align::RunOptions {
            resume: true,
            ..align_opts(&killed, vec![])
        },
        &Default::default(),
    )
    .unwrap();
    for file in ["model.safetensors", "pairs-0.jsonl", "pairs-1.jsonl"] {
        let a = std::fs::read(dir.join(file)).unwrap();
        let b = std::fs::read(resumed.join(file)).unwrap();
        assert!(a == b, "{file} differs after resuming across rounds");
    }
    // The round summaries agree but for their wall time.
    let summaries = |d: &Path| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(d.join("rounds.json")).unwrap();
        let mut v: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        for s in &mut v {
            assert!(s["wall_seconds"].as_f64().unwrap() > 0.0);
            s.as_object_mut().unwrap().remove("wall_seconds");
        }
        v
    };
    assert_eq!(summaries(&dir), summaries(&resumed));
    let manifest = Checkpoint::open(&resumed, &[]).unwrap().manifest;
    assert_eq!(manifest.tokens_seen, ck.manifest.tokens_seen);

    // Rounds need pairs they can sample, and one reference cache per round.
    for (set, want) in [
        ("align.rounds=0", "between 1 and 100"),
        ("align.method=grpo", "applies to preference pairs"),
        (
            "align.reference_cache=ref.json",
            "scores a reference per round",
        ),
        ("lora.rank=4", "leave [lora] out"),
    ] {
        let err = format!(
            "{:#}",
            align_config(&sft, &["align.rounds=2", set]).unwrap_err()
        );
        assert!(err.contains(want), "{set}: {err}");
    }
    let out = tmp.path().join("with-data");
    let pairs_file = tmp.path().join("pairs.jsonl");
    std::fs::write(&pairs_file, pairs(0)).unwrap();
    let err = baton_align::run::<Train>(
        &sft_dir,
        &cfg,
        &align_opts(&out, vec![pairs_file]),
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--data gives fixed pairs"), "{err}");
    assert!(!out.exists());
}
