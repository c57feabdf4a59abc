//! Recipes (issue 19): chains checked whole before any step starts, and a
//! stage kind Baton does not know — defined here in a few lines — run in one.

use std::path::{Path, PathBuf};

use anyhow::Context;
use baton::recipe::{self, Recipe};
use baton::steps::{Mode, Registry, Resolved, StepKind};
use baton_core::backend::Device;
use baton_core::checkpoint::{self, Checkpoint, StageDir, StageKind};

use super::{repo, text_corpus};

/// A test-only stage: the parent's weights, annotated as a `note` checkpoint.
struct Note;

impl StepKind for Note {
    fn name(&self) -> &'static str {
        "note"
    }
    fn kind(&self) -> StageKind {
        StageKind {
            name: "note",
            accepts: &["pretrain"],
        }
    }
    fn resolve(
        &self,
        _step: &recipe::StepSpec,
        parent: Option<&Checkpoint>,
        out: &Path,
    ) -> anyhow::Result<Resolved> {
        let parent = parent.context("needs a parent")?;
        let train = serde_json::from_value(parent.manifest.train.clone())?;
        Ok(Resolved {
            planned: Checkpoint::planned(out, "note", &parent.manifest.model, &train),
            run_toml: String::new(),
            extra_inputs: Vec::new(),
        })
    }
    fn run(
        &self,
        _step: &recipe::StepSpec,
        parent: Option<&Checkpoint>,
        out: &Path,
        mode: Mode,
        _device: &Device,
    ) -> anyhow::Result<PathBuf> {
        let parent = parent.context("needs a parent")?;
        let stage = StageDir::open(out, false, mode.force, &[&parent.dir])?;
        for file in [
            checkpoint::MODEL_FILE,
            checkpoint::CONFIG_FILE,
            checkpoint::TOKENIZER_FILE,
        ] {
            stage.copy_from(parent, file)?;
        }
        let mut manifest = parent.manifest.clone();
        manifest.stage = "note".into();
        manifest.parents = vec![parent.as_parent("parent")];
        Ok(stage.commit(manifest)?)
    }
    fn check_kept(
        &self,
        _step: &recipe::StepSpec,
        _parent: Option<&Checkpoint>,
        _out: &Path,
    ) -> anyhow::Result<()> {
        Ok(())
    }
}

/// A pretrain step on the smoke config and `corpus`, as recipe TOML.
fn pretrain_step(name: &str, corpus: &Path, sets: &[&str]) -> String {
    format!(
        "[[step]]\nname = \"{name}\"\nstage = \"pretrain\"\nconfig = [{:?}]\nset = {sets:?}\ninputs = [{:?}]\n\n",
        repo().join("configs/smoke/pretrain.toml"),
        corpus
    )
}

fn step(name: &str, stage: &str, extra: &str) -> String {
    format!("[[step]]\nname = \"{name}\"\nstage = \"{stage}\"\n{extra}\n")
}

fn parse(dir: &Path, text: &str) -> Recipe {
    let path = dir.join("recipe.toml");
    std::fs::write(&path, text).unwrap();
    Recipe::load(&path).unwrap()
}

/// The one-line error of checking `text` (and of running it, which must fail
/// the same way before anything is written).
fn refused(dir: &Path, registry: &Registry, text: &str) -> String {
    let recipe = parse(dir, text);
    let run = dir.join("run-refused");
    let Err(err) = recipe::plan(&recipe, registry, &run) else {
        panic!("accepted:\n{text}")
    };
    let err = format!("{err:#}");
    assert!(!err.contains('\n'), "{err}");
    let device = Device::default();
    let ran = recipe::run(&recipe, registry, &run, Mode::default(), &device, |_| {});
    assert_eq!(format!("{:#}", ran.unwrap_err()), err);
    assert!(
        !run.exists(),
        "something was written before the check failed"
    );
    err
}

#[test]
fn invalid_recipes_are_refused_before_the_first_step_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = text_corpus(tmp.path(), 20_000);
    let registry = Registry::builtin();
    let head = pretrain_step("base", &corpus, &["train.steps=3"]);

    // sft after align: sft accepts pretrain or sft checkpoints.
    let text = format!(
        "{head}{}{}{}",
        step("tuned", "sft", ""),
        step("aligned", "align", ""),
        step("again", "sft", "")
    );
    let err = refused(tmp.path(), &registry, &text);
    assert!(
        err.contains("step 4 \"again\"")
            && err.contains("kind align")
            && err.contains("sft accepts pretrain or sft"),
        "{err}"
    );
    // A parent step that does not exist (or comes later).
    let text = format!("{head}{}", step("tuned", "sft", "parent = \"nowhere\""));
    let err = refused(tmp.path(), &registry, &text);
    assert!(
        err.contains("step 2 \"tuned\"") && err.contains("\"nowhere\" is not an earlier step"),
        "{err}"
    );
    // A typo in a config key of step 3, in its config file and in a set.
    std::fs::write(
        tmp.path().join("align-typo.toml"),
        "[align]\ntemprature = 0.1\n",
    )
    .unwrap();
    for extra in [
        "config = [\"align-typo.toml\"]",
        "set = [\"align.temprature=0.1\"]",
    ] {
        let text = format!(
            "{head}{}{}",
            step("tuned", "sft", ""),
            step("aligned", "align", extra)
        );
        let err = refused(tmp.path(), &registry, &text);
        assert!(
            err.contains("step 3 \"aligned\"") && err.contains("temprature"),
            "{extra}: {err}"
        );
    }
    // Continuing and branching pretrain steps plan when the parent keeps its state.
    let text = format!(
        "{}{}{}",
        pretrain_step(
            "stable",
            &corpus,
            &["train.steps=3", "train.keep_state=true"]
        ),
        pretrain_step("more", &corpus, &["train.carry_optimizer=true"]).replace(
            "stage = \"pretrain\"",
            "stage = \"pretrain\"\nparent = \"stable\""
        ),
        pretrain_step("decay", &corpus, &["train.steps=5", "train.schedule=wsd"]).replace(
            "stage = \"pretrain\"",
            "stage = \"pretrain\"\nparent = \"stable\"\nbranch = true"
        ),
    );
    let ok = parse(tmp.path(), &text);
    let planned = recipe::plan(&ok, &registry, &tmp.path().join("ok")).unwrap();
    assert_eq!(
        planned.iter().map(|p| p.parent).collect::<Vec<_>>(),
        vec![None, Some(0), Some(0)]
    );
    // An unknown stage, a repeated name, a path for a name, a branch from a
    // parent that keeps no training state, a branch by a stage that cannot,
    // a child stage with no parent, and a key a step does not have.
    for (text, want) in [
        (
            format!("{head}{}", step("x", "sfft", "")),
            "unknown stage \"sfft\"",
        ),
        (
            format!("{head}{}", step("base", "sft", "")),
            "another step has this name",
        ),
        (
            format!("{head}{}", step("../x", "sft", "")),
            "plain directory name",
        ),
        (
            format!(
                "{head}{}",
                pretrain_step("more", &corpus, &[]).replace(
                    "stage = \"pretrain\"",
                    "stage = \"pretrain\"\nparent = \"base\"\nbranch = true"
                )
            ),
            "the parent does not keep it (set train.keep_state = true there)",
        ),
        (
            format!("{head}{}", step("x", "sft", "branch = true")),
            "sft cannot branch from a training state",
        ),
        (step("first", "sft", ""), "needs a parent"),
        (
            format!("{head}{}", step("x", "sft", "parnet = \"base\"")),
            "unknown field `parnet`",
        ),
    ] {
        let recipe_err = match Recipe::parse(&text, "r.toml", tmp.path()) {
            Err(e) => format!("{e:#}"),
            Ok(_) => refused(tmp.path(), &registry, &text),
        };
        assert!(recipe_err.contains(want), "{want}: {recipe_err}");
        assert!(!recipe_err.contains('\n'), "{recipe_err}");
    }
}

#[test]
fn a_stage_kind_unknown_to_baton_runs_in_a_recipe_and_real_stages_refuse_it() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = text_corpus(tmp.path(), 20_000);
    let registry = Registry::builtin().with(Box::new(Note));
    let run = tmp.path().join("run");
    let device = Device::default();
    let two = format!(
        "{}{}",
        pretrain_step("base", &corpus, &["train.steps=3"]),
        step("annotated", "note", "")
    );

    // Chained into sft, the note step is refused while the recipe is checked.
    let err = refused(
        tmp.path(),
        &registry,
        &format!("{two}{}", step("tuned", "sft", "")),
    );
    assert!(
        err.contains("step 3 \"tuned\"")
            && err.contains("kind note")
            && err.contains("sft accepts pretrain or sft"),
        "{err}"
    );

    // Run: each step's checkpoint under <run>/<step name>, the note's parent
    // the pretrain step's checkpoint.
    let recipe = parse(tmp.path(), &two);
    let mut seen = Vec::new();
    let steps = recipe::run(&recipe, &registry, &run, Mode::default(), &device, |done| {
        seen.push(done.len())
    })
    .unwrap();
    assert_eq!(seen, [1, 2]);
    let names: Vec<&str> = steps.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["base", "annotated"]);
    let (base, note) = (&steps[0].1, &steps[1].1);
    assert_eq!(
        (base.dir.clone(), note.dir.clone()),
        (run.join("base"), run.join("annotated"))
    );
    assert_eq!(note.manifest.stage, "note");
    assert_eq!(
        note.manifest.parents[0].manifest_sha256,
        base.manifest_sha256
    );

    // --resume keeps both complete steps as they are; a changed setting of a
    // kept step is refused by name.
    let resume = Mode {
        resume: true,
        force: false,
    };
    let again = recipe::run(&recipe, &registry, &run, resume, &device, |_| {}).unwrap();
    assert_eq!(again[0].1.manifest_sha256, base.manifest_sha256);
    assert_eq!(again[1].1.manifest_sha256, note.manifest_sha256);
    let changed = parse(
        tmp.path(),
        &two.replace("\"train.steps=3\"", "\"train.steps=4\""),
    );
    let err = format!(
        "{:#}",
        recipe::run(&changed, &registry, &run, resume, &device, |_| {}).unwrap_err()
    );
    assert!(
        err.contains("step \"base\"") && err.contains("`train.steps`"),
        "{err}"
    );
    // Without --resume or --force, finished steps are not replaced.
    let err = format!(
        "{:#}",
        recipe::run(&recipe, &registry, &run, Mode::default(), &device, |_| {}).unwrap_err()
    );
    assert!(
        err.contains("step \"base\"") && err.contains("--resume"),
        "{err}"
    );
    assert_eq!(
        Checkpoint::open(&run.join("base"), &[])
            .unwrap()
            .manifest_sha256,
        base.manifest_sha256
    );
}

#[test]
fn a_recipe_step_distils_from_an_earlier_step() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = text_corpus(tmp.path(), 20_000);
    let registry = Registry::builtin();
    let big = pretrain_step("big", &corpus, &["train.steps=3"]);
    let small = pretrain_step(
        "small",
        &corpus,
        &["train.steps=3", "model.d_model=16", "model.d_ff=32"],
    )
    .replace(
        "stage = \"pretrain\"",
        "stage = \"pretrain\"\nteacher = \"big\"",
    );
    let tuned = step(
        "tuned",
        "sft",
        "parent = \"big\"\nset = [\"train.steps=2\"]",
    );
    let student = step(
        "student",
        "sft",
        "parent = \"small\"\nteacher = \"tuned\"\nset = [\"train.steps=2\"]",
    );
    let recipe = parse(tmp.path(), &format!("{big}{small}{tuned}{student}"));
    let run = tmp.path().join("run");
    let device = Device::default();
    let steps = recipe::run(&recipe, &registry, &run, Mode::default(), &device, |_| {}).unwrap();
    let by_name = |name: &str| &steps.iter().find(|(n, _)| n == name).unwrap().1;
    for (child, teacher) in [("small", "big"), ("student", "tuned")] {
        let parents = &by_name(child).manifest.parents;
        let t = parents.iter().find(|p| p.role == "teacher").unwrap();
        assert_eq!(
            t.manifest_sha256,
            by_name(teacher).manifest_sha256,
            "{child}"
        );
    }
    // --resume keeps every complete step, the teachers' hashes unchanged.
    let resume = Mode {
        resume: true,
        force: false,
    };
    let again = recipe::run(&recipe, &registry, &run, resume, &device, |_| {}).unwrap();
    assert_eq!(again.len(), 4);

    // A teacher for a stage that takes none, a later one, another vocabulary.
    let head = pretrain_step("base", &corpus, &["train.steps=3"]);
    for (text, want) in [
        (
            format!(
                "{head}{}{}",
                step("tuned", "sft", ""),
                step("aligned", "align", "teacher = \"base\"")
            ),
            "align takes no teacher",
        ),
        (
            format!("{head}{}", step("tuned", "sft", "teacher = \"later\"")),
            "teacher step \"later\" is not an earlier step",
        ),
        (
            format!(
                "{head}{}",
                pretrain_step("wide", &corpus, &["model.vocab_size=320"]).replace(
                    "stage = \"pretrain\"",
                    "stage = \"pretrain\"\nteacher = \"base\""
                )
            ),
            "has model.vocab_size 300 but this step 320",
        ),
    ] {
        let err = refused(tmp.path(), &registry, &text);
        assert!(err.contains(want), "{want}: {err}");
    }
}

/// Every shipped recipe (recipes/*.toml) is checked whole as `baton run`
/// would check it before its first step: kinds, parents and every step's
/// settings against the checkpoint its parent will write.
#[test]
fn every_shipped_recipe_plans() {
    let registry = Registry::builtin();
    let tmp = tempfile::tempdir().unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("recipes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(
        files.iter().any(|f| f.ends_with("upcycle.toml")),
        "{files:?}"
    );
    for file in &files {
        let recipe = Recipe::load(file).unwrap();
        let planned = recipe::plan(&recipe, &registry, &tmp.path().join("run"))
            .unwrap_or_else(|e| panic!("{}: {e:#}", file.display()));
        assert_eq!(planned.len(), recipe.steps.len());
    }
}
