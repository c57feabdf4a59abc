//! EFT sampling (issue 21): three checkpoints combined per token, checked to
//! share one tokenizer, and at β = 0 the large base's own behaviour.

use super::*;
use baton::eft::{EftArgs, Sampler};
use baton_core::tasks::{TasksConfig, task_metrics, task_metrics_with};

fn eft(large: &Path, ft: &Path, small: &Path, beta: f64) -> EftArgs {
    EftArgs {
        eft_large_base: Some(large.to_path_buf()),
        eft_small_ft: Some(ft.to_path_buf()),
        eft_small_base: Some(small.to_path_buf()),
        eft_beta: beta,
    }
}

#[test]
fn eft_evaluates_tasks_and_refuses_models_with_another_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let small_ft = tiny_sft(tmp.path());
    let small = tmp.path().join("pretrain");
    // A "large" base: another seed and width, the same tokenizer.
    let corpus = tmp.path().join("corpus.txt");
    let tok = format!(
        "tokenizer.path={:?}",
        small.join("tokenizer.json").display().to_string()
    );
    let large = pretrain(
        &corpus,
        &smoke_config(&["train.steps=3", "model.d_model=48", "train.seed=5", &tok]),
        &opts(&tmp.path().join("large")),
    )
    .unwrap();
    let device = Default::default();
    let tasks = TasksConfig {
        heldout: 2,
        ..TasksConfig::default()
    }
    .heldout();
    let sampler =
        Sampler::<Inner>::load(None, &eft(&large, &small_ft, &small, 0.0), &device).unwrap();
    let at_zero = task_metrics_with(&sampler.policy(), &sampler.tokenizer, &tasks, 8, &device);
    let large_model = Checkpoint::open(&large, &[])
        .unwrap()
        .model::<Inner>(&device)
        .unwrap();
    let alone = task_metrics(&large_model, &sampler.tokenizer, &tasks, 8, &device);
    assert_eq!(at_zero, alone, "β = 0 is the large base");
    assert!(at_zero.contains_key("stop_rate"));
    let at_one =
        Sampler::<Inner>::load(None, &eft(&large, &small_ft, &small, 1.0), &device).unwrap();
    let m = task_metrics_with(&at_one.policy(), &at_one.tokenizer, &tasks, 8, &device);
    assert!(m.contains_key("task_accuracy"));
    assert!(at_one.single("eval --text").is_err());

    // A model with another tokenizer is refused, named, before any sampling.
    let other_dir = tmp.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other = pretrain(
        &text_corpus(&other_dir, 12_000),
        &smoke_config(&["train.steps=2"]),
        &opts(&other_dir.join("pretrain")),
    )
    .unwrap();
    let err = format!(
        "{:#}",
        Sampler::<Inner>::load(None, &eft(&other, &small_ft, &small, 1.0), &device)
            .err()
            .unwrap()
    );
    assert!(err.contains("its tokenizer differs"), "{err}");
    let err = format!(
        "{:#}",
        Sampler::<Inner>::load(None, &eft(&large, &small_ft, &small, f64::NAN), &device)
            .err()
            .unwrap()
    );
    assert!(err.contains("--eft-beta"), "{err}");
}
