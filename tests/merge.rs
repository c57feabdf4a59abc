//! `baton merge` (issue 21): exact edges, the lineage, children that accept
//! a merge, and parents that cannot be merged refused in one line.

use super::*;
use baton::merge::{MergeSpec, merge};
use baton_core::checkpoint::{self, TensorFile};

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join(checkpoint::MODEL_FILE)).unwrap()
}

fn spec(
    method: &str,
    base: Option<&Path>,
    models: &[&Path],
    values: Option<Vec<f64>>,
    density: Option<f64>,
) -> MergeSpec {
    let (weights, scales) = if method == "linear" {
        (values, None)
    } else {
        (None, values)
    };
    MergeSpec::from_flags(
        method,
        base.map(Path::to_path_buf),
        models.iter().map(|m| m.to_path_buf()).collect(),
        weights,
        scales,
        density,
    )
    .unwrap()
}

/// A tiny SFT child of `base` (`steps` steps, so two children differ).
fn sft_child(base: &Path, out: &Path, steps: u64) -> PathBuf {
    let parent = Checkpoint::open(base, &[]).unwrap();
    let cfg = sft_config(&parent, &[&format!("train.steps={steps}")]).unwrap();
    baton_sft::run::<Train>(base, &cfg, &sft_opts(out, vec![]), &Default::default()).unwrap()
}

#[test]
fn merges_are_exact_at_the_edges_record_their_parents_and_children_accept_them() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_pretrain(tmp.path());
    let a = sft_child(&base, &tmp.path().join("a"), 3);
    let b = sft_child(&base, &tmp.path().join("b"), 4);
    assert_ne!(weights(&a), weights(&b));
    let out = |name: &str| tmp.path().join(name);

    // λ = 0: the base, byte for byte; one model at scale 1: that model.
    let zero = merge(
        &spec(
            "task-arithmetic",
            Some(&base),
            &[&a, &b],
            Some(vec![0.0, 0.0]),
            None,
        ),
        &out("zero"),
        false,
    )
    .unwrap();
    assert_eq!(weights(&zero), weights(&base));
    let one = merge(
        &spec("task-arithmetic", Some(&base), &[&a], Some(vec![1.0]), None),
        &out("one"),
        false,
    )
    .unwrap();
    assert_eq!(weights(&one), weights(&a));
    let ties_one = merge(
        &spec("ties", Some(&base), &[&b], None, Some(1.0)),
        &out("ties-one"),
        false,
    )
    .unwrap();
    assert_eq!(weights(&ties_one), weights(&b));
    let linear_one = merge(
        &spec("linear", None, &[&a, &b], Some(vec![0.0, 1.0]), None),
        &out("linear-one"),
        false,
    )
    .unwrap();
    assert_eq!(weights(&linear_one), weights(&b));

    // An even linear merge is the mean, each value rounded once.
    let mean = merge(
        &spec("linear", None, &[&a, &b], None, None),
        &out("mean"),
        false,
    )
    .unwrap();
    let mut fa = TensorFile::open(&a.join(checkpoint::MODEL_FILE)).unwrap();
    let mut fb = TensorFile::open(&b.join(checkpoint::MODEL_FILE)).unwrap();
    let mut fm = TensorFile::open(&mean.join(checkpoint::MODEL_FILE)).unwrap();
    let names: Vec<String> = fm.names().cloned().collect();
    assert_eq!(names, fa.names().cloned().collect::<Vec<_>>());
    let mut differing = 0;
    for name in &names {
        let (va, vb, vm) = (
            fa.read(name).unwrap(),
            fb.read(name).unwrap(),
            fm.read(name).unwrap(),
        );
        for ((x, y), m) in va.iter().zip(&vb).zip(&vm) {
            assert_eq!(*m, ((*x as f64 + *y as f64) / 2.0) as f32, "{name}");
            differing += usize::from(x != y);
        }
    }
    assert!(differing > 0);

    // The lineage: every parent with its role and manifest hash.
    let merged = Checkpoint::open(&zero, &["merge"]).unwrap();
    let roles: Vec<(&str, &str)> = merged
        .manifest
        .parents
        .iter()
        .map(|p| (p.role.as_str(), p.manifest_sha256.as_str()))
        .collect();
    let hash = |dir: &Path| Checkpoint::open(dir, &[]).unwrap().manifest_sha256;
    assert_eq!(
        roles,
        vec![
            ("base", hash(&base).as_str()),
            ("model", hash(&a).as_str()),
            ("model", hash(&b).as_str())
        ]
    );
    assert!(merged.manifest.files.contains_key(baton::merge::MERGE_FILE));
    assert_eq!(
        merged.manifest.chat_template,
        Checkpoint::open(&a, &[]).unwrap().manifest.chat_template
    );

    // A merge is a parent for sft, align and continued pretraining.
    let sft = sft_child(&mean, &out("sft-of-merge"), 2);
    assert_eq!(
        Checkpoint::open(&sft, &["sft"]).unwrap().manifest.parents[0].stage,
        "merge"
    );
    let merged = Checkpoint::open(&mean, &[]).unwrap();
    let cfg = align_config(&merged, &["train.steps=1", "align.heldout_pairs=0"]).unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    std::fs::write(
        &pairs,
        "{\"prompt\": \"What is 2+2?\", \"chosen\": \"4\", \"rejected\": \"5\"}\n",
    )
    .unwrap();
    baton_align::run::<Train>(
        &mean,
        &cfg,
        &align_opts(&out("align-of-merge"), vec![pairs]),
        &Default::default(),
    )
    .unwrap();
    let corpus = text_corpus(tmp.path(), 30_000);
    let continued = pretrain(
        &corpus,
        &smoke_config(&["train.steps=2"]),
        &RunOptions {
            from: Some(mean.clone()),
            ..opts(&out("continued"))
        },
    )
    .unwrap();
    assert_eq!(
        Checkpoint::open(&continued, &[]).unwrap().manifest.parents[0].stage,
        "merge"
    );
}

/// `manifest` of the checkpoint copied from `from` to `to`, changed by
/// `edit` and signed again (a valid checkpoint that differs in one field).
fn edited_copy(from: &Path, to: &Path, edit: impl FnOnce(&mut checkpoint::Manifest)) {
    copy_dir(from, to);
    let mut manifest = Checkpoint::open(from, &[]).unwrap().manifest;
    edit(&mut manifest);
    std::fs::write(
        to.join(checkpoint::MANIFEST),
        checkpoint::manifest_bytes(&manifest).unwrap(),
    )
    .unwrap();
    Checkpoint::open(to, &[]).unwrap();
}

#[test]
fn parents_that_cannot_be_merged_are_refused_in_one_line_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_pretrain(tmp.path());
    let out = tmp.path().join("merged");
    let refused = |spec: MergeSpec, expect: &str| {
        let err = format!("{:#}", merge(&spec, &out, false).unwrap_err());
        assert!(err.contains(expect), "{err}");
        assert!(!err.contains('\n'), "{err}");
        assert!(!out.exists() && !tmp.path().join("merged.partial").exists());
    };

    // Another architecture: the first differing field is named.
    let corpus = text_corpus(tmp.path(), 30_000);
    let wider = pretrain(
        &corpus,
        &smoke_config(&["train.steps=1", "model.d_ff=40"]),
        &opts(&tmp.path().join("wider")),
    )
    .unwrap();
    refused(
        spec("linear", None, &[&base, &wider], None, None),
        "model.d_ff is 40 here",
    );
    // Another tokenizer (trained on other text), same architecture.
    let other_text = tmp.path().join("other");
    std::fs::create_dir_all(&other_text).unwrap();
    let other_corpus = text_corpus(&other_text, 12_000);
    let other = pretrain(
        &other_corpus,
        &smoke_config(&["train.steps=1"]),
        &opts(&tmp.path().join("other-tok")),
    )
    .unwrap();
    refused(
        spec("task-arithmetic", Some(&base), &[&other], None, None),
        "its tokenizer differs",
    );
    // Another chat format.
    let chat = tmp.path().join("chat-a");
    let chatml = tmp.path().join("chat-b");
    edited_copy(&base, &chat, |m| {
        m.chat_template = Some(checkpoint::ChatTemplate {
            name: "baton-chat".into(),
            version: 1,
        })
    });
    edited_copy(&base, &chatml, |m| {
        m.chat_template = Some(checkpoint::ChatTemplate {
            name: "chatml".into(),
            version: 1,
        })
    });
    refused(
        spec("ties", Some(&base), &[&chat, &chatml], None, Some(0.5)),
        "chat format chatml v1 differs from baton-chat v1",
    );
    // The output may not be one of the inputs.
    let err = format!(
        "{:#}",
        merge(
            &spec("linear", None, &[&base, &chat], None, None),
            &base,
            true
        )
        .unwrap_err()
    );
    assert!(!err.contains('\n'), "{err}");
    Checkpoint::open(&base, &["pretrain"]).unwrap();
}
