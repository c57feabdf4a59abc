//! Distillation (issue 21): `--teacher` in pretrain and sft, a cached teacher
//! that trains the same student as an online one, and teachers or caches
//! that do not fit refused in one line with nothing written.

use super::*;
use baton_core::checkpoint;

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join(checkpoint::MODEL_FILE)).unwrap()
}

/// A half-width student of a smoke teacher, pretrained from scratch.
fn student(corpus: &Path, teacher: &Path, out: &Path, sets: &[&str]) -> anyhow::Result<PathBuf> {
    let mut all = vec!["train.steps=3", "model.d_model=16", "model.d_ff=32"];
    all.extend_from_slice(sets);
    let options = RunOptions {
        teacher: Some(teacher.to_path_buf()),
        ..opts(out)
    };
    pretrain(corpus, &smoke_config(&all), &options)
}

fn sft_student(from: &Path, teacher: &Path, out: &Path, sets: &[&str]) -> anyhow::Result<PathBuf> {
    let parent = Checkpoint::open(from, &[]).unwrap();
    let mut all = vec!["train.steps=3"];
    all.extend_from_slice(sets);
    let cfg = sft_config(&parent, &all)?;
    let options = baton_sft::RunOptions {
        teacher: Some(teacher.to_path_buf()),
        ..sft_opts(out, vec![])
    };
    baton_sft::run::<Train>(from, &cfg, &options, &Default::default())
}

fn err_of<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.unwrap_err())
}

#[test]
fn cached_and_online_teachers_train_the_same_student_and_are_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = tiny_pretrain(tmp.path());
    let corpus = tmp.path().join("corpus.txt");
    let out = |name: &str| tmp.path().join(name);

    let online = student(&corpus, &teacher, &out("online"), &["distill.top_k=8"]).unwrap();
    let cached = student(
        &corpus,
        &teacher,
        &out("cached"),
        &["distill.top_k=8", "distill.teacher=\"cached\""],
    )
    .unwrap();
    assert_eq!(weights(&online), weights(&cached));
    // Distilling changes the student: α = 0 is plain next-token training.
    let plain = student(&corpus, &teacher, &out("plain"), &["distill.alpha=0"]).unwrap();
    assert_ne!(weights(&online), weights(&plain));

    // The student takes the teacher's tokenizer; the teacher is a parent.
    let read = |dir: &Path, f: &str| std::fs::read(dir.join(f)).unwrap();
    assert_eq!(
        read(&online, "tokenizer.json"),
        read(&teacher, "tokenizer.json")
    );
    let manifest = Checkpoint::open(&cached, &[]).unwrap().manifest;
    let teacher_sha = Checkpoint::open(&teacher, &[]).unwrap().manifest_sha256;
    let roles: Vec<(&str, &str)> = manifest
        .parents
        .iter()
        .map(|p| (p.role.as_str(), p.manifest_sha256.as_str()))
        .collect();
    assert_eq!(roles, vec![("teacher", teacher_sha.as_str())]);
    assert!(manifest.files.contains_key("teacher_topk.bin"));

    // A second student with the same data reads the cache instead of the teacher.
    let cache = cached.join("teacher_topk.bin");
    let set_cache = format!("distill.cache={:?}", cache.display().to_string());
    let reused = student(
        &corpus,
        &teacher,
        &out("reused"),
        &["distill.top_k=8", "distill.teacher=\"cached\"", &set_cache],
    )
    .unwrap();
    assert_eq!(weights(&reused), weights(&cached));

    // Stale: another temperature. Tampered: one flipped byte. Neither writes.
    let err = err_of(student(
        &corpus,
        &teacher,
        &out("stale"),
        &[
            "distill.top_k=8",
            "distill.teacher=\"cached\"",
            "distill.temperature=2.0",
            &set_cache,
        ],
    ));
    assert!(err.contains("stale teacher cache: temperature"), "{err}");
    assert!(!out("stale").exists());
    let tampered = out("tampered.bin");
    let mut bytes = std::fs::read(&cache).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&tampered, &bytes).unwrap();
    let err = err_of(student(
        &corpus,
        &teacher,
        &out("from-tampered"),
        &[
            "distill.top_k=8",
            "distill.teacher=\"cached\"",
            &format!("distill.cache={:?}", tampered.display().to_string()),
        ],
    ));
    assert!(err.contains("teacher cache is corrupt"), "{err}");
    assert!(!out("from-tampered").exists());
    assert_eq!(std::fs::read(&tampered).unwrap(), bytes);

    // SFT: an SFT teacher, its student from the same base; cached == online.
    let sft_teacher = sft_child_of(&teacher, &out("sft-teacher"));
    let a = sft_student(&teacher, &sft_teacher, &out("sft-online"), &[]).unwrap();
    let b = sft_student(
        &teacher,
        &sft_teacher,
        &out("sft-cached"),
        &["distill.teacher=\"cached\"", "distill.top_k=0"],
    )
    .unwrap();
    let c = sft_student(
        &teacher,
        &sft_teacher,
        &out("sft-online-full"),
        &["distill.top_k=0"],
    )
    .unwrap();
    assert_eq!(weights(&b), weights(&c));
    assert_ne!(weights(&a), weights(&c), "top-64 and full differ");
    let parents = Checkpoint::open(&b, &[]).unwrap().manifest.parents;
    assert_eq!(parents.len(), 2);
    assert_eq!(
        (parents[0].role.as_str(), parents[1].role.as_str()),
        ("parent", "teacher")
    );
}

fn sft_child_of(base: &Path, out: &Path) -> PathBuf {
    let parent = Checkpoint::open(base, &[]).unwrap();
    let cfg = sft_config(&parent, &["train.steps=4"]).unwrap();
    baton_sft::run::<Train>(base, &cfg, &sft_opts(out, vec![]), &Default::default()).unwrap()
}

#[test]
fn a_teacher_with_another_tokenizer_or_vocabulary_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_pretrain(tmp.path());
    let other_dir = tmp.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other_corpus = text_corpus(&other_dir, 12_000);
    let other = pretrain(
        &other_corpus,
        &smoke_config(&["train.steps=2"]),
        &opts(&other_dir.join("pretrain")),
    )
    .unwrap();
    let sha = |d: &Path| Checkpoint::open(d, &[]).unwrap().manifest.tokenizer_sha256;
    assert_ne!(sha(&base), sha(&other), "the test needs two tokenizers");
    let out = |name: &str| tmp.path().join(name);
    let corpus = tmp.path().join("corpus.txt");

    // Continued pretraining and SFT keep the parent's tokenizer: refused.
    let continued = RunOptions {
        from: Some(base.clone()),
        teacher: Some(other.clone()),
        ..opts(&out("continued"))
    };
    let err = err_of(pretrain(
        &corpus,
        &smoke_config(&["train.steps=2"]),
        &continued,
    ));
    assert!(err.contains("the teacher's tokenizer differs"), "{err}");
    let err = err_of(sft_student(&base, &other, &out("sft"), &[]));
    assert!(err.contains("the teacher's tokenizer differs"), "{err}");
    // From scratch with a tokenizer.path that is not the teacher's: refused.
    let path = format!(
        "tokenizer.path={:?}",
        base.join("tokenizer.json").display().to_string()
    );
    let err = err_of(student(&corpus, &other, &out("scratch"), &[&path]));
    assert!(err.contains("the teacher's tokenizer differs"), "{err}");
    // Another vocabulary size: refused.
    let err = err_of(student(
        &corpus,
        &base,
        &out("vocab"),
        &["model.vocab_size=320"],
    ));
    assert!(
        err.contains("model.vocab_size 300 but the student 320"),
        "{err}"
    );
    for name in ["continued", "sft", "scratch", "vocab"] {
        assert!(!out(name).exists(), "{name} was written");
    }
    // A bad distill setting is one line too.
    let err = err_of(baton_pretrain::load_config(&ConfigSources {
        builtin: Vec::new(),
        files: vec![repo().join("configs/smoke/pretrain.toml")],
        sets: vec!["distill.alpha=1.5".into()],
        env: false,
    }));
    assert!(err.contains("distill.alpha must be in [0, 1]"), "{err}");
}
