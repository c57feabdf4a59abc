//! Never lose a user's files (issue 18): each case a hostile user tried
//! against Baton, reproduced. Every test here failed before the output
//! discipline of `core::files` (or deleted what it asserts still exists).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::time::Duration;

use super::*;
use baton_core::checkpoint::{self, StageDir};
use baton_core::files;

/// Runs `child_stage_process` (a pretrain of the smoke config) in another
/// process with `cwd` as its working directory.
fn child(out: &str, corpus: &Path, sets: &[&str], env: &[(&str, &str)], cwd: &Path) -> Output {
    let mut command = child_command(Path::new(out), sets);
    command
        .current_dir(cwd)
        .env("BATON_E2E_CHILD_CORPUS", corpus);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

fn tiny_sets() -> [&'static str; 1] {
    ["train.steps=3"]
}

fn user_files(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let notes = dir.join("notes.txt");
    std::fs::write(&notes, "the user's own").unwrap();
    notes
}

fn err_of<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.unwrap_err())
}

/// `f` on another thread, failed if it takes longer than `secs` (a FIFO or
/// `/dev/zero` used to hang or exhaust memory).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("the reader hung")
}

#[test]
fn out_dot_and_dotdot_are_refused_and_the_directories_survive() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = text_corpus(tmp.path(), 20_000);
    let home = tmp.path().join("work");
    let sub = home.join("sub");
    let notes = user_files(&home);
    std::fs::create_dir_all(&sub).unwrap();
    for (cwd, out) in [(&home, "."), (&sub, ".."), (&home, "../work")] {
        let output = child(out, &corpus, &tiny_sets(), &[], cwd);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "--out {out} was accepted");
        assert!(
            stderr.contains("current directory or one above it"),
            "--out {out}: {stderr}"
        );
        assert!(notes.exists(), "--out {out} deleted the user's file");
        assert!(sub.is_dir());
    }
    // Nothing was created beside them either.
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn a_users_directory_is_never_replaced_force_included() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = text_corpus(tmp.path(), 20_000);
    let cfg = smoke_config(&tiny_sets());
    // `baton run --out R` with R/pretrain/notes.txt: the stage's --out.
    let stage_out = tmp.path().join("R/pretrain");
    let notes = user_files(&stage_out);
    for force in [false, true] {
        let err = err_of(pretrain(
            &corpus,
            &cfg,
            &RunOptions {
                force,
                ..opts(&stage_out)
            },
        ));
        assert!(err.contains("is not a Baton checkpoint"), "{err}");
        assert!(notes.exists());
    }
    // An output that is a file, and one that is the corpus itself.
    let err = err_of(pretrain(&corpus, &cfg, &opts(&notes)));
    assert!(err.contains("not a Baton checkpoint"), "{err}");
    let err = err_of(pretrain(&corpus, &cfg, &opts(&corpus)));
    assert!(err.contains("an input of this command"), "{err}");

    // import hf: into a user's directory, and into the source directory itself.
    let hf = chatml_hf_dir(tmp.path());
    let user = tmp.path().join("mine");
    let mine = user_files(&user);
    for force in [false, true] {
        let err = err_of(baton::interop::hf::import_hf(&hf, &user, force));
        assert!(err.contains("is not a Baton checkpoint"), "{err}");
        let err = err_of(baton::interop::hf::import_hf(&hf, &hf, force));
        assert!(err.contains("an input of this command"), "{err}");
    }
    assert!(mine.exists() && hf.join("model.safetensors").exists());

    // A stage writing over its own parent, or into it.
    let parent = baton::interop::hf::import_hf(&hf, &tmp.path().join("parent"), false).unwrap();
    let ckpt = Checkpoint::open(&parent, &[]).unwrap();
    let sft_cfg = sft_config(&ckpt, &[]).unwrap();
    for (out, expected) in [
        (parent.clone(), "an input of this command"),
        (parent.join("sft"), "an input of this command"),
    ] {
        let err = err_of(baton_sft::run::<Train>(
            &parent,
            &sft_cfg,
            &baton_sft::RunOptions {
                force: true,
                ..sft_opts(&out, vec![])
            },
            &Default::default(),
        ));
        assert!(err.contains(expected), "{}: {err}", out.display());
    }
    Checkpoint::open(&parent, &[]).unwrap();
}

#[test]
fn force_replaces_the_checkpoint_and_never_a_sibling() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = text_corpus(tmp.path(), 20_000);
    let cfg = smoke_config(&tiny_sets());
    let m = tmp.path().join("M");
    let v1 = tmp.path().join("model.v1");
    // Names the old code used for its backup: `M.old` and `model.old`.
    let siblings = [
        user_files(&tmp.path().join("M.old")),
        user_files(&tmp.path().join("model.old")),
        user_files(&tmp.path().join("M.baton-old")),
    ];
    for out in [&m, &v1] {
        pretrain(&corpus, &cfg, &opts(out)).unwrap();
        let first = checkpoint::sha256_file(&out.join("manifest.json")).unwrap();
        let err = err_of(pretrain(&corpus, &cfg, &opts(out)));
        assert!(err.contains("pass --force"), "{err}");
        let forced = RunOptions {
            force: true,
            ..opts(out)
        };
        pretrain(&corpus, &smoke_config(&["train.steps=4"]), &forced).unwrap();
        let second = Checkpoint::open(out, &[]).unwrap();
        assert_eq!(second.manifest.step, 4);
        assert_ne!(second.manifest_sha256, first);
        assert!(!checkpoint::partial_dir(out).exists());
    }
    for file in siblings {
        assert!(file.exists(), "{} was removed", file.display());
    }
}

#[test]
fn export_never_removes_a_users_partial_or_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = chatml_hf_dir(tmp.path());
    let parent = baton::interop::hf::import_hf(&hf, &tmp.path().join("ckpt"), false).unwrap();
    let ckpt = Checkpoint::open(&parent, &[]).unwrap();
    let to = tmp.path().join("export");
    let theirs = user_files(&checkpoint::partial_dir(&to));
    let f32 = baton::interop::hf::ExportDtype::F32;
    for force in [false, true] {
        let err = baton::interop::hf::export(&ckpt, &to, f32, force)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not Baton's working directory"), "{err}");
    }
    assert!(theirs.exists());
    std::fs::remove_dir_all(checkpoint::partial_dir(&to)).unwrap();
    // A user's directory is never replaced; an earlier export is, with --force.
    let mine = user_files(&to);
    let err = baton::interop::hf::export(&ckpt, &to, f32, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not a Baton export"), "{err}");
    assert!(mine.exists());
    std::fs::remove_dir_all(&to).unwrap();
    baton::interop::hf::export(&ckpt, &to, f32, false).unwrap();
    baton::interop::hf::export(&ckpt, &to, f32, true).unwrap();
    // Never into the checkpoint it reads.
    let err = baton::interop::hf::export(&ckpt, &parent.join("hf"), f32, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("an input of this command"), "{err}");
}

#[test]
fn single_file_outputs_refuse_existing_files_and_checkpoint_insides() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = chatml_hf_dir(tmp.path());
    let ckpt = baton::interop::hf::import_hf(&hf, &tmp.path().join("ckpt"), false).unwrap();
    // `data tasks --out existing.jsonl`
    let existing = tmp.path().join("existing.jsonl");
    std::fs::write(&existing, "mine\n").unwrap();
    let err = files::write_new_file(&existing, b"tasks\n", false, &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists (pass --force"), "{err}");
    assert_eq!(std::fs::read_to_string(&existing).unwrap(), "mine\n");
    // `data tasks --out CKPT/model.safetensors`, `logits --out CKPT/manifest.json`.
    for name in ["model.safetensors", "manifest.json", "logits.json"] {
        let err = files::write_new_file(&ckpt.join(name), b"{}", true, &[&hf])
            .unwrap_err()
            .to_string();
        assert!(err.contains("inside the checkpoint"), "{name}: {err}");
    }
    Checkpoint::open(&ckpt, &[]).unwrap();
}

#[test]
fn a_second_writer_is_refused_naming_the_pid_and_a_stale_lock_is_taken_over() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = text_corpus(tmp.path(), 20_000);
    let out = tmp.path().join("pretrain");
    // A live run holds the output (as a training stage does for its whole run).
    let live = StageDir::open(&out, false, false, &[]).unwrap();
    std::fs::write(live.path("run.toml"), "live").unwrap();
    let pid = std::process::id().to_string();
    for force in [false, true] {
        let err = err_of(pretrain(
            &corpus,
            &smoke_config(&tiny_sets()),
            &RunOptions {
                force,
                ..opts(&out)
            },
        ));
        assert!(
            err.contains("another Baton run") && err.contains(&pid),
            "{err}"
        );
    }
    let hf = chatml_hf_dir(tmp.path());
    let err = err_of(baton::interop::hf::import_hf(&hf, &out, true));
    assert!(err.contains(&pid), "{err}");
    assert_eq!(
        std::fs::read_to_string(live.path("run.toml")).unwrap(),
        "live"
    );
    drop(live);
    // The lock file of a process that is gone is stale: taken over.
    std::fs::write(
        checkpoint::partial_dir(&out).join(files::LOCK_FILE),
        "4194999\n",
    )
    .unwrap();
    let forced = RunOptions {
        force: true,
        ..opts(&out)
    };
    pretrain(&corpus, &smoke_config(&tiny_sets()), &forced).unwrap();
    Checkpoint::open(&out, &[]).unwrap();
}

#[test]
fn fifos_and_devices_fail_at_once_for_every_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    for special in [fifo, PathBuf::from("/dev/zero")] {
        let what = special.display().to_string();
        let expected = if what.contains("fifo") {
            "FIFO"
        } else {
            "a device"
        };
        let check = |name: &str, err: String| {
            assert!(
                err.contains(expected) && err.contains(&what),
                "{name}: {err}"
            );
        };
        let s = special.clone();
        check(
            "--config",
            within(10, move || {
                err_of(baton_pretrain::load_config(&ConfigSources {
                    files: vec![s],
                    ..Default::default()
                }))
            }),
        );
        let s = special.clone();
        check(
            "tokenizer.path",
            within(10, move || {
                baton_core::tokenizer::Tokenizer::load(&s)
                    .err()
                    .unwrap()
                    .to_string()
            }),
        );
        let s = special.clone();
        check(
            "sft --data",
            within(10, move || {
                baton_core::conversations::read_jsonl(&s, false)
                    .err()
                    .unwrap()
                    .to_string()
            }),
        );
        let s = special.clone();
        check(
            "align --data",
            within(10, move || {
                baton_align::prefs::read_preferences(&s)
                    .err()
                    .unwrap()
                    .to_string()
            }),
        );
        let s = special.clone();
        check(
            "--tasks",
            within(10, move || err_of(baton_align::read_tasks(&s))),
        );
        let s = special.clone();
        check(
            "--corpus",
            within(10, move || {
                baton_core::data::Corpus::read(&[s])
                    .err()
                    .unwrap()
                    .to_string()
            }),
        );
        let s = special.clone();
        let out = tmp.path().join("never");
        check(
            "import gguf --file",
            within(10, move || {
                err_of(baton::interop::gguf::import_gguf(&s, &out, false))
            }),
        );
    }
    // A directory is named as one, not "not found".
    let err = baton_core::data::Corpus::read(&[tmp.path().to_path_buf()])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("is a directory"), "{err}");
}

#[test]
fn configs_claiming_huge_models_fail_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    // An HF config.json of a 10^12-parameter model beside tiny weights.
    let hf = chatml_hf_dir(tmp.path());
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    config["hidden_size"] = 65536.into();
    config["num_hidden_layers"] = 1000.into();
    config["num_attention_heads"] = 512.into();
    config["num_key_value_heads"] = 512.into();
    std::fs::write(hf.join("config.json"), config.to_string()).unwrap();
    let err = err_of(baton::interop::hf::import_hf(
        &hf,
        &tmp.path().join("x"),
        false,
    ));
    assert!(err.contains("above Baton's limit"), "{err}");
    // Within the limits but not what the weights hold: the shapes are
    // compared before the model is built.
    config["hidden_size"] = 8192.into();
    config["num_hidden_layers"] = 8.into();
    config["intermediate_size"] = 28672.into();
    config["num_attention_heads"] = 64.into();
    config["num_key_value_heads"] = 8.into();
    std::fs::write(hf.join("config.json"), config.to_string()).unwrap();
    let err = err_of(baton::interop::hf::import_hf(
        &hf,
        &tmp.path().join("x"),
        false,
    ));
    assert!(err.contains("the config needs"), "{err}");
    // A checkpoint's model config, as the manifest states it.
    std::fs::create_dir(tmp.path().join("good")).unwrap();
    let good = chatml_hf_dir(&tmp.path().join("good"));
    let ckpt_dir = baton::interop::hf::import_hf(&good, &tmp.path().join("ckpt"), false).unwrap();
    let mut manifest = Checkpoint::open(&ckpt_dir, &[]).unwrap().manifest;
    manifest.model.d_model = 8192;
    manifest.model.n_layers = 40;
    std::fs::write(
        ckpt_dir.join("manifest.json"),
        checkpoint::manifest_bytes(&manifest).unwrap(),
    )
    .unwrap();
    let err = Checkpoint::open(&ckpt_dir, &[])
        .unwrap()
        .model::<Inner>(&Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("the config needs"), "{err}");
    // Huge values in a pretrain config: one line, no abort.
    for (set, expected) in [
        ("model.d_model=100000000", "model.d_model"),
        ("model.vocab_size=4000000000", "model.vocab_size"),
        ("train.batch_size=100000000000", "train.batch_size"),
    ] {
        let err = err_of(baton_pretrain::load_config(&ConfigSources {
            sets: vec![set.to_string()],
            ..Default::default()
        }));
        assert!(
            err.contains(expected) && !err.contains('\n'),
            "{set}: {err}"
        );
    }
}

#[test]
fn nan_and_out_of_range_values_are_refused_naming_key_and_source() {
    let tmp = tempfile::tempdir().unwrap();
    let load = |sets: &[&str], files: Vec<PathBuf>| {
        err_of(baton_pretrain::load_config(&ConfigSources {
            files,
            sets: sets.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }))
    };
    for (set, key) in [
        ("train.grad_clip=nan", "train.grad_clip"),
        ("train.weight_decay=nan", "train.weight_decay"),
        ("train.lr=inf", "train.lr"),
        ("model.rope_theta=nan", "model.rope_theta"),
        ("data.val_fraction=nan", "data.val_fraction"),
    ] {
        let err = load(&[set], vec![]);
        assert!(
            err.contains(key) && err.contains(&format!("--set {set}")),
            "{set}: {err}"
        );
    }
    let file = tmp.path().join("nan.toml");
    std::fs::write(&file, "[train]\nbeta1 = nan\n").unwrap();
    let err = load(&[], vec![file.clone()]);
    assert!(
        err.contains("train.beta1") && err.contains("nan.toml"),
        "{err}"
    );
    for (set, key) in [
        ("train.eps=-1", "train.eps"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("train.weight_decay=-0.1", "train.weight_decay"),
    ] {
        let err = load(&[set], vec![]);
        assert!(err.contains(key), "{set}: {err}");
    }
    // A wrong type from the environment is blamed on the variable, not a file.
    std::fs::write(&file, "[train]\nlr = 0.001\n").unwrap();
    // SAFETY: no other test reads this variable (they resolve with env: false).
    unsafe { std::env::set_var("BATON__TRAIN__MAX_BAD_STEPS", "many") };
    let err = err_of(baton_pretrain::load_config(&ConfigSources {
        files: vec![file],
        env: true,
        ..Default::default()
    }));
    unsafe { std::env::remove_var("BATON__TRAIN__MAX_BAD_STEPS") };
    assert!(
        err.contains("environment BATON__TRAIN__MAX_BAD_STEPS") && !err.contains("nan.toml"),
        "{err}"
    );
    // Align's pair-sampling temperature, over a planned parent.
    let base = PretrainConfig::default();
    let sft = baton_sft::load_config(
        &Checkpoint::planned(Path::new("p"), "pretrain", &base.model, &base.train),
        &ConfigSources::default(),
    )
    .unwrap();
    let parent = Checkpoint::planned(Path::new("s"), "sft", &base.model, &sft.train);
    let err = err_of(baton_align::load_config(
        &parent,
        &ConfigSources {
            sets: vec!["pairs.temperature=-1".into()],
            ..Default::default()
        },
    ));
    assert!(err.contains("pairs.temperature"), "{err}");
    // Sampling flags.
    use baton_core::generate::check_sampling;
    assert!(
        check_sampling(f64::NAN, 1.0)
            .unwrap_err()
            .0
            .contains("--temperature")
    );
    assert!(
        check_sampling(0.8, f64::NAN)
            .unwrap_err()
            .0
            .contains("--top-p")
    );
    assert!(check_sampling(-1.0, 1.0).is_err() && check_sampling(0.0, 1.0).is_ok());
}

#[test]
fn weak_inputs_get_messages_that_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    // A UTF-8 byte-order mark before JSONL is accepted.
    let bom = tmp.path().join("bom.jsonl");
    std::fs::write(
        &bom,
        "\u{feff}{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n",
    )
    .unwrap();
    let loaded = baton_core::conversations::read_jsonl(&bom, false).unwrap();
    assert_eq!(loaded.conversations.len(), 1);
    let prefs = tmp.path().join("prefs.jsonl");
    std::fs::write(
        &prefs,
        "\u{feff}{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"b\"}\n",
    )
    .unwrap();
    assert_eq!(
        baton_align::prefs::read_preferences(&prefs)
            .unwrap()
            .pairs
            .len(),
        1
    );
    // A whitespace-only corpus does not train.
    let blank = tmp.path().join("blank.txt");
    std::fs::write(&blank, " \n\t\n").unwrap();
    let err = baton_core::data::Corpus::read(std::slice::from_ref(&blank))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("blank.txt") && err.contains("only whitespace"),
        "{err}"
    );
}

#[test]
fn an_edited_manifest_is_refused_and_resume_refuses_changed_settings_or_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = text_corpus(tmp.path(), 20_000);
    let hf = chatml_hf_dir(tmp.path());
    let dir = baton::interop::hf::import_hf(&hf, &tmp.path().join("ckpt"), false).unwrap();
    let original = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    // A file's entry removed from the list: the manifest no longer matches itself.
    let manifest: serde_json::Value = serde_json::from_str(&original).unwrap();
    let config_hash = manifest["files"]["config.json"].as_str().unwrap();
    let edited = original.replace(&format!("\"config.json\": \"{config_hash}\",\n"), "");
    assert_ne!(edited, original);
    for text in [
        edited,
        original.replace("\"stage\": \"pretrain\"", "\"stage\": \"sft\""),
        original.replace("\"n_layers\": 2", "\"n_layers\": 3"),
    ] {
        std::fs::write(dir.join("manifest.json"), text).unwrap();
        let err = Checkpoint::open(&dir, &[]).unwrap_err().to_string();
        assert!(err.contains("changed after it was written"), "{err}");
    }
    std::fs::write(dir.join("manifest.json"), &original).unwrap();
    Checkpoint::open(&dir, &[]).unwrap();

    // An interrupted run (the child aborts right after its first train_state save).
    let out = tmp.path().join("run");
    let sets = ["train.steps=12", "train.save_every=4"];
    let output = child(
        out.to_str().unwrap(),
        &corpus,
        &sets,
        &[("BATON_FAULT", "train-state-saved")],
        tmp.path(),
    );
    assert!(!output.status.success());
    let resume = |sets: &[&str], corpus: &Path, allow_changes: bool| {
        pretrain(
            corpus,
            &smoke_config(sets),
            &RunOptions {
                resume: true,
                allow_changes,
                ..opts(&out)
            },
        )
    };
    let err = err_of(resume(
        &["train.steps=12", "train.save_every=4", "train.lr=0.001"],
        &corpus,
        false,
    ));
    assert!(err.contains("changed setting `train.lr`"), "{err}");
    let other = tmp.path().join("other.txt");
    let mut text = std::fs::read_to_string(&corpus).unwrap();
    text.push_str("\nmore words\n");
    std::fs::write(&other, text).unwrap();
    let err = err_of(resume(&sets, &other, false));
    assert!(
        err.contains("changed input") && err.contains("other.txt"),
        "{err}"
    );
    resume(&sets, &corpus, false).unwrap();
    assert_eq!(Checkpoint::open(&out, &[]).unwrap().manifest.step, 12);
}

#[test]
fn a_crash_between_the_renames_leaves_a_complete_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = text_corpus(tmp.path(), 20_000);
    let out = tmp.path().join("M");
    pretrain(&corpus, &smoke_config(&tiny_sets()), &opts(&out)).unwrap();
    let old = Checkpoint::open(&out, &[]).unwrap().manifest_sha256;
    for (fault, expect_new) in [("commit-before-swap", false), ("commit-after-swap", true)] {
        let output = child(
            out.to_str().unwrap(),
            &corpus,
            &["train.steps=4"],
            &[("BATON_FAULT", fault), ("BATON_E2E_CHILD_FORCE", "1")],
            tmp.path(),
        );
        assert!(!output.status.success(), "{fault}: the fault did not fire");
        let now = Checkpoint::open(&out, &[]).unwrap();
        assert_eq!(now.manifest.step, if expect_new { 4 } else { 3 }, "{fault}");
        if !expect_new {
            assert_eq!(now.manifest_sha256, old);
        }
        // The leftover working directory is Baton's own: the next --force clears it.
        assert!(checkpoint::partial_dir(&out).exists());
        pretrain(
            &corpus,
            &smoke_config(&tiny_sets()),
            &RunOptions {
                force: true,
                ..opts(&out)
            },
        )
        .unwrap();
        assert!(!checkpoint::partial_dir(&out).exists());
    }
}
