//! Data-parallel training: ranks are child processes on this machine (one
//! thread each) meeting through `burn-collective` on localhost.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{
    align_config, align_opts, child_command, opts, pretrain, smoke_config, text_corpus, tiny_sft,
};

/// The tiny run every test here trains: 8 steps, a train_state save at step
/// 4, no evaluation until the end.
const SETS: [&str; 5] = [
    "train.steps=8",
    "train.save_every=4",
    "train.eval_every=0",
    "train.workers=1",
    "train.warmup_steps=2",
];

/// A base port with the run's ports (base … base + 1 + 2 · ranks) free now.
fn free_ports(ranks: usize) -> u16 {
    for _ in 0..50 {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = probe.local_addr().unwrap().port();
        drop(probe);
        if (base as usize) + 2 + 2 * ranks > u16::MAX as usize {
            continue;
        }
        let all_free = (0..2 + 2 * ranks as u16)
            .all(|i| std::net::TcpListener::bind(("0.0.0.0", base + i)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no free ports");
}

/// Rank `rank` of `world` as a child process pretraining `corpus` into `out`.
fn rank_command(
    rank: usize,
    world: usize,
    port: u16,
    corpus: &Path,
    out: &Path,
    sets: &[&str],
    tmp: &Path,
) -> Command {
    let mut command = child_command(out, sets);
    command
        .env("BATON_E2E_CHILD_CORPUS", corpus)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RAYON_NUM_THREADS", "1")
        .env("BATON_DIST_TIMEOUT", "60")
        // Scratch directories of ranks other than 0 land here.
        .env("TMPDIR", tmp)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

fn wait_all(children: Vec<Child>) -> Vec<Output> {
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

/// `world` ranks train `sets` into `out`; every rank must succeed.
///
/// burn-collective 0.21 fails now and then inside its own threads (README,
/// "Burn's engine is fragile"); such a run ends with a one-line error on
/// every rank, and is started again, up to three times in all: a fresh run
/// anew, a resumed one resumed again. Any other failure fails the test.
fn data_parallel(world: usize, corpus: &Path, out: &Path, sets: &[&str], tmp: &Path) {
    run_ranks(world, corpus, out, sets, tmp, false);
}

fn run_ranks(world: usize, corpus: &Path, out: &Path, sets: &[&str], tmp: &Path, resume: bool) {
    run_ranks_with(world, corpus, out, sets, tmp, resume, &|_| {});
}

/// [`run_ranks`], with `stage` adding to every rank's command (another stage).
fn run_ranks_with(
    world: usize,
    corpus: &Path,
    out: &Path,
    sets: &[&str],
    tmp: &Path,
    resume: bool,
    stage: &dyn Fn(&mut Command),
) {
    // One data-parallel run at a time: the engine's races grow with load.
    let _one_at_a_time = RUNS.lock().unwrap_or_else(|e| e.into_inner());
    for attempt in 1..=3 {
        let port = free_ports(world);
        let children: Vec<Child> = (0..world)
            .map(|rank| {
                let mut c = rank_command(rank, world, port, corpus, out, sets, tmp);
                stage(&mut c);
                if resume {
                    c.env("BATON_E2E_CHILD_RESUME", "1");
                } else if attempt > 1 {
                    c.env("BATON_E2E_CHILD_FORCE", "1");
                }
                c.spawn().unwrap()
            })
            .collect();
        let outputs = wait_all(children);
        if outputs.iter().all(|o| o.status.success()) {
            return;
        }
        let errors: Vec<String> = outputs.iter().map(stderr).collect();
        let engine = errors
            .iter()
            .any(|e| e.contains("Burn's collective engine") || e.contains("stuck in"));
        assert!(
            engine && attempt < 3,
            "attempt {attempt}: {}",
            errors.join("\n")
        );
        eprintln!("dist: attempt {attempt} ended in Burn's collective engine; running again");
    }
}

static RUNS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let tensors = baton_core::checkpoint::read_safetensors(&dir.join("model.safetensors")).unwrap();
    let mut named: Vec<(String, Vec<f32>)> = tensors
        .into_iter()
        .map(|(k, v)| (k, v.to_vec::<f32>().unwrap()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

fn max_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|((_, x), (_, y))| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0f32, f32::max)
}

fn model_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

fn with(extra: &[&'static str]) -> Vec<&'static str> {
    SETS.iter().chain(extra).copied().collect()
}

#[test]
fn ranks_train_what_one_process_trains_with_accumulation() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = text_corpus(tmp.path(), 40_000);
    let single = |accum: &'static str, out: &str| {
        // One thread, as each rank has.
        let cfg = smoke_config(&with(&[accum]));
        pretrain(&corpus, &cfg, &opts(&tmp.path().join(out))).unwrap()
    };
    let one_2 = single("train.grad_accum=2", "one-2");
    let two = tmp.path().join("two");
    data_parallel(2, &corpus, &two, &with(&["train.grad_accum=2"]), tmp.path());
    assert!(
        model_bytes(&two) == model_bytes(&one_2),
        "2 ranks differ from 1 process with grad_accum 2"
    );
    // Rank 0 wrote the checkpoint, with the whole run's step and tokens.
    let manifest = baton_core::checkpoint::Checkpoint::open(&two, &[])
        .unwrap()
        .manifest;
    let reference = baton_core::checkpoint::Checkpoint::open(&one_2, &[])
        .unwrap()
        .manifest;
    assert_eq!(manifest.tokens_seen, reference.tokens_seen);
    assert_eq!(manifest.step, 8);
    let metrics = std::fs::read_to_string(two.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("allreduce_seconds"), "{metrics}");

    // 4 ranks: the same micro-batches, summed in another order.
    let one_4 = single("train.grad_accum=4", "one-4");
    let four = tmp.path().join("four");
    data_parallel(
        4,
        &corpus,
        &four,
        &with(&["train.grad_accum=4"]),
        tmp.path(),
    );
    let (a, b) = (weights(&one_4), weights(&four));
    let scale = a
        .iter()
        .flat_map(|(_, v)| v.iter())
        .fold(0f32, |m, x| m.max(x.abs()));
    let diff = max_diff(&a, &b);
    assert!(
        diff <= 1e-6 * scale,
        "4 ranks differ from 1 process by {diff} (weights' scale {scale})"
    );
    let moved = max_diff(&weights(&one_2), &a);
    assert!(moved > 1e-4, "grad_accum 2 and 4 trained alike ({moved})");
}

/// GRPO on 2 ranks: each generates and scores the replies of its half of
/// the prompt groups, the halves are summed into the whole batch on both,
/// and each trains its share of the step's 3 micro-batches (2 of sampled
/// rows, then the NLL anchor's). Rank 0's run matches one process's: the
/// same rewards and anchor NLL at every step, the same first-step loss and
/// gradient norm. (Here the weights came out byte-identical too; that
/// is not asserted, since generating 8 rows at a time instead of 16 may
/// change float bits on another CPU.)
#[test]
fn ranks_share_grpo_sampling_and_train_what_one_process_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let sft = tiny_sft(tmp.path());
    let parent = baton_core::checkpoint::Checkpoint::open(&sft, &[]).unwrap();
    let steps = |dir: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("grpo/reward").is_some())
            .collect()
    };
    let generated = |dir: &Path| {
        baton_core::checkpoint::Checkpoint::open(dir, &[])
            .unwrap()
            .manifest
            .metrics["generate_tokens"]
    };
    // 4 prompt groups, 2 per rank; then 1, which rank 1 samples alone
    // while rank 0, with an empty share, still takes part in the sums.
    for prompts in ["grpo.prompts=4", "grpo.prompts=1"] {
        let sets = [
            "align.method=\"grpo\"",
            "grpo.group=4",
            prompts,
            "grpo.max_new_tokens=6",
            "grpo.stop_reward=0.5",
            "grpo.sft_weight=0.5",
            "grpo.sft_rows=2",
            "train.grad_accum=2",
            "train.steps=3",
            "train.log_every=1",
            "train.workers=1",
        ];
        let cfg = align_config(&parent, &sets).unwrap();
        let one = baton_align::run::<baton_core::backend::Train>(
            &sft,
            &cfg,
            &align_opts(&tmp.path().join(format!("one-{prompts}")), vec![]),
            &Default::default(),
        )
        .unwrap();
        let two = tmp.path().join(format!("two-{prompts}"));
        run_ranks_with(2, &sft, &two, &sets, tmp.path(), false, &|c| {
            c.env("BATON_E2E_CHILD_STAGE", "align")
                .env("BATON_E2E_CHILD_FROM", &sft);
        });
        let (a, b) = (steps(&one), steps(&two));
        assert_eq!(a.len(), 3, "{a:?}");
        assert_eq!(b.len(), 3, "{b:?}");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(
                x["grpo/reward"], y["grpo/reward"],
                "{prompts}: rewards: {x} against {y}"
            );
            assert_eq!(x["grpo/sample_accuracy"], y["grpo/sample_accuracy"]);
            // The anchor is the last micro-batch: rank 1 trains it, and
            // rank 0 logs its NLL from the step's sums.
            let (nll, logged) = (x["grpo/anchor_nll"].as_f64(), y["grpo/anchor_nll"].as_f64());
            assert!(
                matches!((nll, logged), (Some(n), Some(l)) if (n - l).abs() < 1e-5 * n),
                "{prompts}: anchor NLL: {x} against {y}"
            );
        }
        let value = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
        let (loss, split_loss) = (value(&a[0], "train/loss"), value(&b[0], "train/loss"));
        let (norm, split_norm) = (value(&a[0], "grad_norm"), value(&b[0], "grad_norm"));
        assert!(norm > 0.0, "{prompts}: no gradient at step 1");
        assert!(
            (loss - split_loss).abs() < 1e-5 * loss.abs().max(1.0)
                && (norm - split_norm).abs() < 1e-4 * norm,
            "{prompts}: 2 ranks against 1 process: loss {split_loss} vs {loss}, grad norm {split_norm} vs {norm}"
        );
        // Rank 0 generated its share of the replies, not all of them.
        let (all, share) = (generated(&one), generated(&two));
        let expected = match prompts {
            "grpo.prompts=4" => share > 0.0 && share < 0.75 * all,
            _ => share == 0.0 && all > 0.0,
        };
        assert!(
            expected,
            "{prompts}: rank 0 generated {share} of {all} tokens"
        );
    }
}

/// An MoE model balanced over the global batch: 2 ranks, one micro-batch
/// each, sum their routing counts, so they train what one process trains
/// with both micro-batches; counting per micro-batch needs no sum and agrees
/// too, and the two scopes train differently.
#[test]
fn ranks_balance_experts_over_the_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = text_corpus(tmp.path(), 40_000);
    let moe = |scope: &'static str| {
        with(&[
            "train.grad_accum=2",
            "train.steps=4",
            "model.moe.experts=4",
            "model.moe.top_k=2",
            "moe.balance_weight=0.5",
            scope,
        ])
    };
    let global = moe("moe.balance=\"global\"");
    let one = pretrain(
        &corpus,
        &smoke_config(&global),
        &opts(&tmp.path().join("one")),
    )
    .unwrap();
    let two = tmp.path().join("two");
    data_parallel(2, &corpus, &two, &global, tmp.path());
    assert!(
        model_bytes(&two) == model_bytes(&one),
        "2 ranks balanced globally differ from 1 process"
    );
    let micro = moe("moe.balance=\"micro\"");
    let one_micro = pretrain(
        &corpus,
        &smoke_config(&micro),
        &opts(&tmp.path().join("one-micro")),
    )
    .unwrap();
    let two_micro = tmp.path().join("two-micro");
    data_parallel(2, &corpus, &two_micro, &micro, tmp.path());
    assert!(model_bytes(&two_micro) == model_bytes(&one_micro));
    assert!(model_bytes(&one_micro) != model_bytes(&one));
}

/// 2 ranks train `sets` into `out`; rank `dies` aborts at step 6.
fn faulted(dies: usize, corpus: &Path, out: &Path, sets: &[&str], tmp: &Path) -> [Output; 2] {
    let _one_at_a_time = RUNS.lock().unwrap_or_else(|e| e.into_inner());
    let port = free_ports(2);
    let children: Vec<Child> = (0..2)
        .map(|rank| {
            let mut c = rank_command(rank, 2, port, corpus, out, sets, tmp);
            if rank == dies {
                c.env("BATON_FAULT", "step-6");
            }
            c.spawn().unwrap()
        })
        .collect();
    let [a, b]: [Output; 2] = wait_all(children).try_into().unwrap();
    [a, b]
}

#[test]
fn a_lost_rank_stops_the_others_and_the_run_resumes_to_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = text_corpus(tmp.path(), 40_000);
    let sets = with(&["train.grad_accum=2"]);
    let straight = tmp.path().join("straight");
    data_parallel(2, &corpus, &straight, &sets, tmp.path());

    // Rank 1 dies at step 6, after the train_state save at step 4.
    let killed = tmp.path().join("killed");
    let started = Instant::now();
    let [out0, out1] = faulted(1, &corpus, &killed, &sets, tmp.path());
    let took = started.elapsed();
    assert!(!out1.status.success(), "the faulted rank succeeded");
    assert!(!out0.status.success(), "rank 0 outlived its lost peer");
    // The survivor's status says it lost a peer: the run failed as a whole,
    // not on its input (`baton launch --max-restarts` restarts on it).
    assert_eq!(
        out0.status.code(),
        Some(baton_core::dist::EXIT_PEER_LOST),
        "{}",
        stderr(&out0)
    );
    assert!(
        took < Duration::from_secs(30),
        "the ranks took {took:?} to stop"
    );
    assert!(
        stderr(&out0).contains("rank 1 was lost"),
        "{}",
        stderr(&out0)
    );
    assert!(!killed.exists(), "an interrupted run left a checkpoint");

    // Resumed with the same world size: the uninterrupted run's bytes.
    run_ranks(2, &corpus, &killed, &sets, tmp.path(), true);
    assert!(
        model_bytes(&killed) == model_bytes(&straight),
        "the resumed run differs from the uninterrupted one"
    );

    // Killed again, resumed by one process (grad_accum 2 draws the same
    // micro-batches): the same bytes too.
    let again = tmp.path().join("again");
    let outputs = faulted(0, &corpus, &again, &sets, tmp.path());
    assert!(outputs.iter().all(|o| !o.status.success()));
    assert!(
        stderr(&outputs[1]).contains("rank 0 was lost"),
        "{}",
        stderr(&outputs[1])
    );
    let cfg = smoke_config(&sets);
    let resumed = pretrain(
        &corpus,
        &cfg,
        &baton_pretrain::RunOptions {
            resume: true,
            ..opts(&again)
        },
    )
    .unwrap();
    assert!(
        model_bytes(&resumed) == model_bytes(&straight),
        "resumed by one process, the run differs from the uninterrupted one"
    );
}

#[test]
fn a_rank_with_other_settings_is_refused_and_a_missing_rank_0_times_out() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = text_corpus(tmp.path(), 20_000);
    let out = tmp.path().join("out");
    let port = free_ports(2);
    let children: Vec<Child> = (0..2)
        .map(|rank| {
            let lr = if rank == 0 {
                "train.lr=0.003"
            } else {
                "train.lr=0.001"
            };
            rank_command(rank, 2, port, &corpus, &out, &with(&[lr]), tmp.path())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs = wait_all(children);
    for (rank, output) in outputs.iter().enumerate() {
        assert!(!output.status.success(), "rank {rank} ran");
        let err = stderr(output);
        assert!(
            err.contains("rank 1") && err.contains("other settings"),
            "rank {rank}: {err}"
        );
    }
    assert!(!out.exists(), "a refused run wrote a checkpoint");

    // Rank 1 alone: nobody listens at MASTER_PORT + 1.
    let started = Instant::now();
    let output = rank_command(1, 2, free_ports(2), &corpus, &out, &SETS, tmp.path())
        .env("BATON_DIST_TIMEOUT", "2")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("cannot reach rank 0's control channel"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}
