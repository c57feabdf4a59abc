//! `baton grow` (issue 22): a grown checkpoint computes its parent's function,
//! continual pretraining ramps its masks to 1 and writes an ordinary model,
//! a run killed mid-ramp resumes to the same bytes, and growth that cannot be
//! done is refused in one line with nothing written.

use super::*;
use baton::grow::grow;
use baton_core::burn::tensor::{Int, Tensor, TensorData};
use baton_core::grow::GrowTo;
use baton_core::model::ModelConfig;

/// Layers 2 → 3, d_model 32 → 48 (heads 4 → 6), d_ff 64 → 96: every kind at once.
fn bigger() -> GrowTo {
    GrowTo {
        layers: Some(3),
        d_model: Some(48),
        d_ff: Some(96),
        heads: None,
    }
}

/// A tiny pretrained parent in a temp dir, its corpus, and its growth to
/// [`bigger`] with masks.
fn tiny_grown() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let parent = tiny_pretrain(tmp.path());
    let corpus = tmp.path().join("corpus.txt");
    let grown = grow(
        &parent,
        &bigger(),
        true,
        0,
        &tmp.path().join("grown"),
        false,
    )
    .unwrap();
    (tmp, parent, corpus, grown)
}

fn logits(dir: &Path) -> Vec<f32> {
    let model = Checkpoint::open(dir, &[])
        .unwrap()
        .model::<Inner>(&Default::default())
        .unwrap();
    let ids: Vec<i32> = (0..32).map(|i| (i * 13 + 5) % 300).collect();
    let ids =
        Tensor::<Inner, 2, Int>::from_data(TensorData::new(ids, [2, 16]), &Default::default());
    model.forward(ids).into_data().to_vec().unwrap()
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

#[test]
fn a_grown_model_keeps_its_parents_function_until_pretraining_ramps_its_masks_away() {
    let (tmp, parent, corpus, grown) = tiny_grown();
    let model = Checkpoint::open(&grown, &[]).unwrap().manifest.model;
    assert_eq!(
        (
            model.n_layers,
            model.d_model,
            model.n_heads,
            model.n_kv_heads,
            model.d_ff
        ),
        (3, 48, 6, 3, 96)
    );
    let (a, b) = (logits(&parent), logits(&grown));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        diff <= 1e-5,
        "grown logits differ from the parent's by {diff}"
    );

    // Its weights alone are not its function: export is refused.
    let ckpt = Checkpoint::open(&grown, &[]).unwrap();
    let to = tmp.path().join("export");
    let err = baton::interop::hf::export(&ckpt, &to, baton::interop::hf::ExportDtype::F32, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("still masked"), "{err}");
    assert!(!to.exists() && !tmp.path().join("export.partial").exists());

    // Continued from the grown model and from the parent, the evaluations
    // before training agree; the grown run's masks ramp to 1 over 4 steps.
    let sets = ["train.steps=6", "train.eval_every=3", "grow.ramp_steps=4"];
    let run = |from: &Path, out: &str| {
        let opts = RunOptions {
            from: Some(from.to_path_buf()),
            ..opts(&tmp.path().join(out))
        };
        pretrain(&corpus, &continued(&sets), &opts).unwrap()
    };
    let (on_parent, on_grown) = (run(&parent, "on-parent"), run(&grown, "on-grown"));
    let first_eval = |dir: &Path| metrics(dir)[0]["val/loss"].as_f64().unwrap();
    let (p, g) = (first_eval(&on_parent), first_eval(&on_grown));
    assert!(
        (p - g).abs() <= 1e-5 * p,
        "step-0 val/loss {g} against the parent's {p}"
    );
    let masks: Vec<f64> = metrics(&on_grown)
        .iter()
        .filter_map(|m| m["grow/mask"].as_f64())
        .collect();
    // Logged every 2 steps: the mask a step trained with, step/4.
    assert_eq!(masks, vec![0.25, 0.75, 1.0]);
    assert!(
        metrics(&on_parent)
            .iter()
            .all(|m| m.get("grow/mask").is_none())
    );
    let out = Checkpoint::open(&on_grown, &[]).unwrap();
    assert!(out.growth().unwrap().is_none() && !on_grown.join("grow.json").exists());
    assert_eq!(out.manifest.model, model);
    assert_eq!(out.manifest.parents[0].stage, "grow");
    baton::interop::hf::export(&out, &to, baton::interop::hf::ExportDtype::F32, false).unwrap();

    // The naive control: no masks, so the function changes at once.
    let naive = grow(
        &parent,
        &bigger(),
        false,
        0,
        &tmp.path().join("naive"),
        false,
    )
    .unwrap();
    assert!(
        Checkpoint::open(&naive, &[])
            .unwrap()
            .growth()
            .unwrap()
            .is_none()
    );
    let c = logits(&naive);
    let diff = a
        .iter()
        .zip(&c)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        diff > 1e-3,
        "unmasked growth left the logits alone ({diff})"
    );
}

#[test]
fn a_grown_run_killed_mid_ramp_resumes_to_the_same_bytes() {
    let (tmp, _parent, corpus, grown) = tiny_grown();
    let sets = ["train.steps=8", "train.save_every=2", "grow.ramp_steps=6"];
    let straight = tmp.path().join("straight");
    let from = |out: &Path, resume: bool| RunOptions {
        from: Some(grown.clone()),
        resume,
        ..opts(out)
    };
    pretrain(&corpus, &continued(&sets), &from(&straight, false)).unwrap();

    // Aborted after step 5 (saved at 4): the resumed run re-does step 5 at
    // mask 4/6, as the uninterrupted one did.
    let killed = tmp.path().join("killed");
    let status = child_command(&killed, &sets)
        .env("BATON_E2E_CHILD_CORPUS", &corpus)
        .env("BATON_E2E_CHILD_FROM", &grown)
        .env("BATON_FAULT", "step-5")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the injected fault did not fire");
    let dir = pretrain(&corpus, &continued(&sets), &from(&killed, true)).unwrap();
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        std::fs::read(straight.join("model.safetensors")).unwrap(),
        "the resumed grown run differs from the uninterrupted one"
    );
}

#[test]
fn growth_that_cannot_be_done_is_refused_in_one_line_and_writes_nothing() {
    let (tmp, parent, corpus, grown) = tiny_grown();
    let out = tmp.path().join("out");
    let refused = |to: GrowTo, want: &str| {
        let err = format!(
            "{:#}",
            grow(&parent, &to, true, 0, &out, false).unwrap_err()
        );
        assert!(err.contains(want), "{err}");
        assert!(!err.contains('\n'), "{err}");
        assert!(!out.exists(), "{want}: something was written");
    };
    let to = GrowTo::default;
    refused(
        GrowTo {
            layers: Some(1),
            ..to()
        },
        "--layers 1 is smaller than the parent's 2",
    );
    refused(
        GrowTo {
            d_model: Some(44),
            heads: Some(6),
            ..to()
        },
        "--d-model 44 is not divisible by --heads 6",
    );
    refused(
        GrowTo {
            d_model: Some(44),
            ..to()
        },
        "not divisible by the parent's head_dim 8",
    );
    refused(
        GrowTo {
            heads: Some(5),
            ..to()
        },
        "--heads 5 is not a multiple",
    );
    refused(to(), "nothing to grow");

    // A grown model is not grown again before it trained; a ramp longer
    // than the run is refused before anything is written.
    let err = format!(
        "{:#}",
        grow(&grown, &bigger(), true, 0, &out, false).unwrap_err()
    );
    assert!(
        err.contains("is a grow checkpoint, expected pretrain or merge"),
        "{err}"
    );
    let opts = RunOptions {
        from: Some(grown.clone()),
        ..opts(&out)
    };
    let err = pretrain(
        &corpus,
        &continued(&["train.steps=4", "grow.ramp_steps=5"]),
        &opts,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("grow.ramp_steps = 5 must be between 1 and train.steps (4)"),
        "{err}"
    );
    assert!(!out.exists());
    let err = pretrain(
        &corpus,
        &continued(&["train.steps=4", "lora.rank=2"]),
        &opts,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("leave [lora] out"), "{err}");
    assert!(!out.exists());
    // sft does not take a grown model (its masks ramp only in pretrain).
    let err = sft_config(&Checkpoint::open(&grown, &[]).unwrap(), &[])
        .map(|cfg| {
            baton_sft::run::<Train>(&grown, &cfg, &sft_opts(&out, vec![]), &Default::default())
        })
        .and_then(|r| r)
        .unwrap_err()
        .to_string();
    assert!(err.contains("grow"), "{err}");
    assert!(!out.exists());
}
