//! Recipes: an ordered list of named steps, each a stage or a tool that
//! writes a checkpoint, chained by parent. A recipe is checked whole — every
//! step's settings resolved against the checkpoint its parent will write, every
//! parent kind against what the step accepts, every output path — before the
//! first step starts. Outputs go to `<run>/<step name>/`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use baton_core::backend::Device;
use baton_core::checkpoint::{self, Checkpoint, StageDir};
use serde::Deserialize;

pub use crate::steps::StepSpec;
use crate::steps::{Mode, Registry, Resolved, StepKind};

/// The recipe `baton run` runs without `--recipe`.
pub const DEFAULT: &str = include_str!("../recipes/default.toml");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipeFile {
    #[serde(default)]
    step: Vec<StepSpec>,
}

/// A parsed recipe.
#[derive(Clone, Debug)]
pub struct Recipe {
    /// Where it came from, for errors: a path, or "the default recipe".
    pub origin: String,
    pub steps: Vec<StepSpec>,
}

impl Recipe {
    /// Parses recipe TOML; relative `config` and `inputs` paths are taken
    /// relative to `base` (the recipe file's directory).
    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Recipe> {
        let file: RecipeFile = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            let message = e.message().replace('\n', " ");
            match line {
                Some(line) => anyhow!("{origin}:{line}: {message}"),
                None => anyhow!("{origin}: {message}"),
            }
        })?;
        if file.step.is_empty() {
            bail!("{origin}: no [[step]] tables (a recipe needs at least one step)");
        }
        let rebase = |paths: Vec<PathBuf>| -> Vec<PathBuf> {
            paths
                .into_iter()
                .map(|p| if p.is_absolute() { p } else { base.join(p) })
                .collect()
        };
        let steps = file
            .step
            .into_iter()
            .map(|s| StepSpec {
                config: rebase(s.config),
                inputs: rebase(s.inputs),
                ..s
            })
            .collect();
        Ok(Recipe {
            origin: origin.to_string(),
            steps,
        })
    }

    /// Reads a recipe file.
    pub fn load(path: &Path) -> Result<Recipe> {
        let text = baton_core::files::read_text(path, "recipe", baton_core::files::cap::CONFIG)?;
        let base = path.parent().unwrap_or(Path::new(""));
        Recipe::parse(&text, &path.display().to_string(), base)
    }

    /// `recipes/default.toml`, built in: pretrain → sft → align.
    pub fn default_pipeline() -> Recipe {
        Recipe::parse(DEFAULT, "the default recipe", Path::new(""))
            .expect("the built-in default recipe parses")
    }

    /// The step called `name`, for command-line overrides.
    pub fn step_mut(&mut self, name: &str) -> Result<&mut StepSpec> {
        let origin = self.origin.clone();
        self.steps
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| anyhow!("{origin} has no step named \"{name}\""))
    }
}

/// A step checked and resolved, ready to run.
pub struct Planned<'r> {
    pub step: &'r StepSpec,
    pub kind: &'r dyn StepKind,
    /// Index of the parent step.
    pub parent: Option<usize>,
    /// Index of the teacher step (distillation).
    pub teacher: Option<usize>,
    pub out: PathBuf,
    pub resolved: Resolved,
}

/// Checks the whole recipe before anything runs: unique names that are plain
/// directory names, known step kinds, parents that exist earlier in the
/// recipe and are of a kind the step accepts, and every step's settings
/// resolved against the checkpoint its parent will write. Errors name the
/// recipe, the step and the problem in one line.
pub fn plan<'r>(
    recipe: &'r Recipe,
    registry: &'r Registry,
    run: &Path,
) -> Result<Vec<Planned<'r>>> {
    let mut planned: Vec<Planned<'r>> = Vec::new();
    for (i, step) in recipe.steps.iter().enumerate() {
        let at = format!("{}: step {} \"{}\"", recipe.origin, i + 1, step.name);
        let plain = Path::new(&step.name).components().count() == 1
            && !matches!(step.name.as_str(), "" | "." | "..")
            && !step.name.contains(['/', '\\'])
            && !step.name.ends_with(".partial");
        if !plain {
            bail!("{at}: a step name must be a plain directory name");
        }
        if planned.iter().any(|p| p.step.name == step.name) {
            bail!("{at}: another step has this name");
        }
        let kind = registry.get(&step.stage).ok_or_else(|| {
            anyhow!(
                "{at}: unknown stage \"{}\" (known: {})",
                step.stage,
                registry.names().join(", ")
            )
        })?;
        if step.branch && !kind.can_branch() {
            bail!(
                "{at}: {} cannot branch from a training state (branch = true)",
                step.stage
            );
        }
        let accepts = kind.kind().accepts;
        let parent = match (&step.parent, accepts.is_empty()) {
            (Some(p), true) => bail!("{at}: {} takes no parent, but parent = \"{p}\"", step.stage),
            (None, true) => None,
            (Some(p), false) => Some(planned.iter().position(|s| &s.step.name == p).ok_or_else(
                || anyhow!("{at}: parent step \"{p}\" is not an earlier step of the recipe"),
            )?),
            (None, false) if kind.parent_optional() => None,
            (None, false) if i == 0 => bail!(
                "{at}: {} needs a parent ({}), and no step comes before it",
                step.stage,
                accepts.join(" or ")
            ),
            (None, false) => Some(i - 1),
        };
        let parent_ckpt = parent.map(|p| &planned[p].resolved.planned);
        if let (Some(p), Some(ckpt)) = (parent, parent_ckpt)
            && !accepts.contains(&ckpt.manifest.stage.as_str())
        {
            bail!(
                "{at}: {} cannot start from step \"{}\", a checkpoint of kind {} ({} accepts {})",
                step.stage,
                planned[p].step.name,
                ckpt.manifest.stage,
                step.stage,
                accepts.join(" or ")
            );
        }
        let teacher =
            match &step.teacher {
                None => None,
                Some(t) if !kind.takes_teacher() => {
                    bail!(
                        "{at}: {} takes no teacher, but teacher = \"{t}\"",
                        step.stage
                    )
                }
                Some(t) => Some(planned.iter().position(|s| &s.step.name == t).ok_or_else(
                    || anyhow!("{at}: teacher step \"{t}\" is not an earlier step of the recipe"),
                )?),
            };
        let out = run.join(&step.name);
        let resolved = kind
            .resolve(step, parent_ckpt, &out)
            .map_err(|e| anyhow!("{at}: {e:#}"))?;
        if let Some(t) = teacher {
            let (theirs, ours) = (
                planned[t].resolved.planned.manifest.model.vocab_size,
                resolved.planned.manifest.model.vocab_size,
            );
            if theirs != ours {
                bail!(
                    "{at}: its teacher \"{}\" has model.vocab_size {theirs} but this step {ours} (distillation needs the same vocabulary)",
                    planned[t].step.name
                );
            }
        }
        planned.push(Planned {
            step,
            kind,
            parent,
            teacher,
            out,
            resolved,
        });
    }
    Ok(planned)
}

/// What happens to one step's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Complete from an earlier run with the same settings: kept.
    Keep,
    /// Interrupted with a `train_state`: continued.
    Resume,
    /// Written anew.
    Run,
}

/// Runs `recipe` into the run directory `run`: checks it whole (see [`plan`])
/// and every output directory, then runs each step in order. With `resume`,
/// complete steps are kept (if their settings and inputs are unchanged) and
/// an interrupted one continues from its `train_state`. `on_step` sees each
/// step's checkpoint as soon as it exists. Returns every step's checkpoint.
pub fn run(
    recipe: &Recipe,
    registry: &Registry,
    run: &Path,
    mode: Mode,
    device: &Device,
    mut on_step: impl FnMut(&[(String, Checkpoint)]),
) -> Result<Vec<(String, Checkpoint)>> {
    let planned = plan(recipe, registry, run)?;
    let mut actions = Vec::new();
    for p in &planned {
        let action = if mode.resume && checkpoint::is_complete(&p.out) {
            Action::Keep
        } else if mode.resume
            && checkpoint::partial_dir(&p.out)
                .join("train_state/state.json")
                .is_file()
        {
            Action::Resume
        } else {
            Action::Run
        };
        if action != Action::Keep {
            let parent_dir = p.parent.map(|i| planned[i].out.clone());
            let teacher_dir = p.teacher.map(|i| planned[i].out.clone());
            let mut inputs: Vec<&Path> = parent_dir.as_deref().into_iter().collect();
            inputs.extend(teacher_dir.as_deref());
            inputs.extend(p.step.inputs.iter().map(PathBuf::as_path));
            StageDir::check(&p.out, action == Action::Resume, mode.force, &inputs).map_err(|e| {
                anyhow!(
                    "step \"{}\": {e} (baton run: pass --resume to continue the run or --force to start it over)",
                    p.step.name
                )
            })?;
        }
        actions.push(action);
    }
    let mut done: Vec<(String, Checkpoint)> = Vec::new();
    for (p, action) in planned.iter().zip(actions) {
        let parent = p.parent.map(|i| &done[i].1);
        let at = || format!("step \"{}\" ({})", p.step.name, p.step.stage);
        // The teacher step's name becomes its checkpoint directory.
        let spec = StepSpec {
            teacher: p.teacher.map(|i| done[i].1.dir.display().to_string()),
            ..p.step.clone()
        };
        match action {
            Action::Keep => {
                p.kind.check_kept(&spec, parent, &p.out).with_context(at)?;
                eprintln!("baton: {} is complete; kept", at());
            }
            Action::Resume | Action::Run => {
                let step_mode = Mode {
                    resume: action == Action::Resume,
                    force: mode.force,
                };
                p.kind
                    .run(&spec, parent, &p.out, step_mode, device)
                    .with_context(at)?;
            }
        }
        let ckpt = Checkpoint::open(&p.out, &[]).with_context(at)?;
        done.push((p.step.name.clone(), ckpt));
        on_step(&done);
    }
    Ok(done)
}
