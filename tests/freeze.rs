//! Freezing (`train.freeze`, `train.train_only`): frozen tensors leave a stage
//! bit for bit as they came, hold no optimizer state, are listed in the
//! manifest, are not inherited, resume exactly after the process dies, and bad globs
//! are refused before anything is written.

use super::*;

/// Every weight of a checkpoint as its f32 bit patterns.
fn tensors(dir: &Path) -> std::collections::HashMap<String, Vec<u32>> {
    baton_core::checkpoint::read_safetensors(&dir.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(name, data)| {
            let bits = data
                .to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            (name, bits)
        })
        .collect()
}

#[test]
fn frozen_tensors_stay_bitwise_hold_no_moments_and_are_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let pretrain_dir = tiny_pretrain(tmp.path());
    let parent = Checkpoint::open(&pretrain_dir, &[]).unwrap();
    let before = tensors(&pretrain_dir);
    let device = Default::default();
    let run = |name: &str, sets: &[&str]| {
        let cfg = sft_config(&parent, sets)?;
        baton_sft::run::<Train>(
            &pretrain_dir,
            &cfg,
            &sft_opts(&tmp.path().join(name), vec![]),
            &device,
        )
    };

    let frozen_sets = [
        "train.steps=4",
        "train.keep_state=true",
        r#"train.freeze=["model.embed_tokens.*","model.layers.0.*"]"#,
    ];
    let dir = run("frozen", &frozen_sets).unwrap();
    let after = tensors(&dir);
    let is_frozen =
        |n: &str| n.starts_with("model.embed_tokens.") || n.starts_with("model.layers.0.");
    let mut expected_trained = Vec::new();
    for (name, bytes) in &after {
        if is_frozen(name) {
            assert_eq!(bytes, &before[name], "{name} is frozen but changed");
        } else {
            assert_ne!(bytes, &before[name], "{name} trains but did not change");
            expected_trained.push(name.clone());
        }
    }
    expected_trained.sort();
    let ck = Checkpoint::open(&dir, &["sft"]).unwrap();
    assert_eq!(ck.manifest.trained.as_ref(), Some(&expected_trained));
    // The optimizer holds moments for the trained tensors only.
    let optim =
        baton_core::checkpoint::read_safetensors(&dir.join("train_state/optim.safetensors"))
            .unwrap();
    let mut moment_names: Vec<String> = optim
        .keys()
        .filter_map(|n| n.strip_prefix("m.").map(str::to_string))
        .collect();
    moment_names.sort();
    assert_eq!(moment_names, expected_trained);

    // A child stage does not inherit the frozen set.
    let child_cfg = sft_config(&ck, &["train.steps=1"]).unwrap();
    assert!(child_cfg.train.freeze.is_empty());
    let child = baton_sft::run::<Train>(
        &dir,
        &child_cfg,
        &sft_opts(&tmp.path().join("child"), vec![]),
        &device,
    )
    .unwrap();
    assert!(
        Checkpoint::open(&child, &[])
            .unwrap()
            .manifest
            .trained
            .is_none()
    );
    let child_tensors = tensors(&child);
    assert_ne!(
        child_tensors["model.embed_tokens.weight"],
        after["model.embed_tokens.weight"]
    );

    // train_only: only the final norm trains.
    let dir = run(
        "only-norm",
        &["train.steps=2", r#"train.train_only=["model.norm.weight"]"#],
    )
    .unwrap();
    for (name, bytes) in tensors(&dir) {
        assert_eq!(
            bytes != before[&name],
            name == "model.norm.weight",
            "{name}"
        );
    }

    // Bad globs: one line naming the key and pattern; nothing written.
    for (sets, words) in [
        (
            vec![r#"train.freeze=["model.layer.*"]"#],
            ["train.freeze", "model.layer.*"],
        ),
        (
            vec![r#"train.freeze=["*"]"#],
            ["train.freeze", "no tensor to train"],
        ),
        (
            vec![r#"train.train_only=["*lora_A*"]"#],
            ["train.train_only", "lora_A"],
        ),
    ] {
        let out = tmp.path().join("never");
        let err = format!("{:#}", run("never", &sets).unwrap_err());
        assert!(!err.contains('\n'), "{err}");
        for w in words {
            assert!(err.contains(w), "{err} lacks {w}");
        }
        assert!(!out.exists());
    }
}

/// An sft run with a frozen set, killed (aborted) after a train_state save and
/// resumed, ends byte-identical to an uninterrupted one.
#[test]
fn a_killed_run_with_frozen_layers_resumes_byte_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let pretrain_dir = tiny_pretrain(tmp.path());
    let parent = Checkpoint::open(&pretrain_dir, &[]).unwrap();
    let sets = [
        "train.steps=16",
        "train.save_every=2",
        r#"train.freeze=["model.layers.1.*","model.norm.weight"]"#,
    ];
    let cfg = sft_config(&parent, &sets).unwrap();
    let device = Default::default();
    let straight = baton_sft::run::<Train>(
        &pretrain_dir,
        &cfg,
        &sft_opts(&tmp.path().join("straight"), vec![]),
        &device,
    )
    .unwrap();

    let killed = tmp.path().join("killed");
    kill_after_a_save(&killed, &pretrain_dir, &sets);
    let resumed = baton_sft::run::<Train>(
        &pretrain_dir,
        &cfg,
        &baton_sft::RunOptions {
            resume: true,
            ..sft_opts(&killed, vec![])
        },
        &device,
    )
    .unwrap();
    assert!(
        std::fs::read(resumed.join("model.safetensors")).unwrap()
            == std::fs::read(straight.join("model.safetensors")).unwrap(),
        "resumed model differs from the uninterrupted run's"
    );
}

/// Runs an sft child process from `from` with `sets` writing `out` that
/// dies (aborts, as a kill would) right after its first train_state save,
/// a deterministic point where polling for a SIGKILL would race the run.
pub(super) fn kill_after_a_save(out: &Path, from: &Path, sets: &[&str]) {
    let output = child_command(out, sets)
        .env("BATON_E2E_CHILD_STAGE", "sft")
        .env("BATON_E2E_CHILD_FROM", from)
        .env("BATON_FAULT", "train-state-saved")
        .output()
        .unwrap();
    assert!(!output.status.success(), "the fault did not fire");
    let work = baton_core::checkpoint::partial_dir(out);
    assert!(!out.join("manifest.json").exists(), "killed too late");
    assert!(
        work.join("train_state/state.json").is_file(),
        "killed before a save"
    );
}
