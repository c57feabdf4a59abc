//! Built-in verifiable tasks: instruction/answer pairs whose answers code can
//! check, so SFT, evaluation and alignment need no downloaded data.
//!
//! Every family has a generator (difficulty is a parameter) and a checker.
//! Held-out and train sets are drawn from separate seeded streams: the held-out
//! set first (distinct instances), then training instances, redrawn whenever
//! they are held out, so the two never share an instance and training can draw
//! as many instances as a family has.

use std::collections::{BTreeMap, HashSet};

use burn::tensor::backend::Backend;
use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::chat::{ChatRenderer, Message, Role};
use crate::generate::{Policy, Sampling, generate_batch, generate_rows};
use crate::model::Llama;
use crate::tokenizer::Tokenizer;

/// A task family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Add,
    Sub,
    Mul,
    Reverse,
    SortLetters,
    SortNumbers,
    CountChar,
    KvLookup,
    WordAt,
    FormatAnswer,
}

impl Family {
    pub const ALL: [Family; 10] = [
        Family::Add,
        Family::Sub,
        Family::Mul,
        Family::Reverse,
        Family::SortLetters,
        Family::SortNumbers,
        Family::CountChar,
        Family::KvLookup,
        Family::WordAt,
        Family::FormatAnswer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Family::Add => "add",
            Family::Sub => "sub",
            Family::Mul => "mul",
            Family::Reverse => "reverse",
            Family::SortLetters => "sort_letters",
            Family::SortNumbers => "sort_numbers",
            Family::CountChar => "count_char",
            Family::KvLookup => "kv_lookup",
            Family::WordAt => "word_at",
            Family::FormatAnswer => "format_answer",
        }
    }

    pub fn from_name(name: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Draws one instance.
    pub fn generate(self, rng: &mut StdRng, difficulty: &Difficulty) -> Task {
        let number = |rng: &mut StdRng, digits: usize| -> u64 {
            let hi = 10u64.pow(digits.clamp(1, 9) as u32);
            rng.random_range(0..hi)
        };
        let letters = |rng: &mut StdRng, n: usize| -> Vec<char> {
            (0..n)
                .map(|_| (b'a' + rng.random_range(0..26u8)) as char)
                .collect()
        };
        let spaced = |chars: &[char]| {
            chars
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let length = difficulty.length.max(2);
        let (prompt, answer) = match self {
            Family::Add => {
                let (a, b) = (
                    number(rng, difficulty.digits),
                    number(rng, difficulty.digits),
                );
                (format!("What is {a} + {b}?"), (a + b).to_string())
            }
            Family::Sub => {
                let (a, b) = (
                    number(rng, difficulty.digits),
                    number(rng, difficulty.digits),
                );
                let (a, b) = (a.max(b), a.min(b));
                (format!("What is {a} - {b}?"), (a - b).to_string())
            }
            Family::Mul => {
                let a = number(rng, difficulty.digits);
                let b = rng.random_range(0..10u64);
                (format!("What is {a} * {b}?"), (a * b).to_string())
            }
            Family::Reverse => {
                let word = letters(rng, length);
                let reversed: Vec<char> = word.iter().rev().copied().collect();
                (format!("Reverse: {}", spaced(&word)), spaced(&reversed))
            }
            Family::SortLetters => {
                let word = letters(rng, length);
                let mut sorted = word.clone();
                sorted.sort();
                (format!("Sort letters: {}", spaced(&word)), spaced(&sorted))
            }
            Family::SortNumbers => {
                let nums: Vec<u64> = (0..length)
                    .map(|_| number(rng, difficulty.digits))
                    .collect();
                let mut sorted = nums.clone();
                sorted.sort();
                let show = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
                (format!("Sort numbers: {}", show(&nums)), show(&sorted))
            }
            Family::CountChar => {
                let pool: Vec<char> = letters(rng, 3);
                let word: Vec<char> = (0..length + 2)
                    .map(|_| pool[rng.random_range(0..3)])
                    .collect();
                let target = pool[rng.random_range(0..3)];
                let count = word.iter().filter(|&&c| c == target).count();
                (
                    format!("Count {target} in: {}", spaced(&word)),
                    count.to_string(),
                )
            }
            Family::KvLookup => {
                let mut keys: Vec<u32> = (0..10).collect();
                keys.shuffle(rng);
                keys.truncate(length.min(10));
                let pairs: Vec<(u32, u64)> =
                    keys.iter().map(|&k| (k, rng.random_range(0..10))).collect();
                let (key, value) = pairs[rng.random_range(0..pairs.len())];
                let context = pairs
                    .iter()
                    .map(|(k, v)| format!("k{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                (format!("{context}. What is k{key}?"), value.to_string())
            }
            Family::WordAt => {
                const WORDS: [&str; 16] = [
                    "red", "sun", "cat", "king", "sea", "moon", "tree", "rose", "lord", "fire",
                    "star", "wind", "gold", "bird", "ship", "love",
                ];
                let words: Vec<&str> = (0..length)
                    .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                    .collect();
                let n = rng.random_range(1..=words.len());
                (
                    format!("Word {n} of: {}", words.join(" ")),
                    words[n - 1].to_string(),
                )
            }
            Family::FormatAnswer => {
                let (a, b) = (
                    number(rng, difficulty.digits),
                    number(rng, difficulty.digits),
                );
                (
                    format!("What is {a} + {b}? Reply exactly Answer: <n>"),
                    format!("Answer: {}", a + b),
                )
            }
        };
        Task {
            family: self,
            prompt,
            answer,
        }
    }
}

/// Difficulty knobs: number size and sequence length.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Difficulty {
    /// Digits per operand (add, sub, mul, sort_numbers).
    pub digits: usize,
    /// Letters, numbers, keys or words per instance.
    pub length: usize,
}

impl Default for Difficulty {
    fn default() -> Self {
        Self {
            digits: 2,
            length: 3,
        }
    }
}

/// One task instance.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Task {
    pub family: Family,
    pub prompt: String,
    pub answer: String,
}

impl Task {
    /// The family's checker: exact match of the trimmed reply.
    pub fn check(&self, reply: &str) -> bool {
        reply.trim() == self.answer
    }

    pub fn messages(&self) -> Vec<Message> {
        vec![
            Message::new(Role::User, self.prompt.clone()),
            Message::new(Role::Assistant, self.answer.clone()),
        ]
    }

    /// The JSONL line `baton data tasks` writes: a `messages` conversation plus
    /// the family and answer for checking.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "messages": self.messages(),
            "family": self.family.name(),
            "answer": self.answer,
        })
    }
}

/// `count` instances cycling over `families`, from the stream `(seed, split)`;
/// instances in `exclude` are redrawn, and so are repeats when `distinct`.
/// Each result is a prefix of a longer draw with the same arguments. Fewer
/// than `count` come back only if the difficulty leaves too few allowed
/// instances.
fn draw(
    families: &[Family],
    count: usize,
    difficulty: &Difficulty,
    seed: u64,
    split: Split,
    exclude: &HashSet<Task>,
    distinct: bool,
) -> Vec<Task> {
    let mut rng = crate::data::step_rng(seed, 0x7a5c, split as u64, 0);
    let mut out = Vec::with_capacity(count);
    let mut drawn = HashSet::new();
    let mut attempts = 0usize;
    while out.len() < count && !families.is_empty() {
        let family = families[out.len() % families.len()];
        let task = family.generate(&mut rng, difficulty);
        attempts += 1;
        if attempts > count.saturating_mul(1000) {
            break;
        }
        if exclude.contains(&task) || (distinct && !drawn.insert(task.clone())) {
            continue;
        }
        out.push(task);
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Split {
    Train = 1,
    HeldOut = 2,
}

/// Parses a comma-separated family list (`all` for every family).
pub fn parse_families(list: &str) -> Result<Vec<Family>, crate::error::InvalidSetting> {
    if list.trim() == "all" {
        return Ok(Family::ALL.to_vec());
    }
    list.split(',')
        .map(|name| {
            Family::from_name(name.trim()).ok_or_else(|| {
                let known: Vec<&str> = Family::ALL.iter().map(|f| f.name()).collect();
                crate::error::InvalidSetting(format!(
                    "unknown task family `{}` (known: {})",
                    name.trim(),
                    known.join(", ")
                ))
            })
        })
        .collect()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TasksConfig {
    pub families: Vec<Family>,
    /// Relative share of each family in the training set: a family of weight
    /// 3 is drawn three times as often as one of weight 1, the default.
    /// Held-out sets are not weighted; a weight for a family not in
    /// `families` has no effect (the shipped SFT config weights count_char in
    /// its later phase, and a narrower `families` must not trip over that).
    pub weights: BTreeMap<Family, u32>,
    /// From this optimizer step on (0: never), training draws from a second
    /// set generated with `later_weights` instead of `weights`: a curriculum of
    /// two phases.
    pub later_from: u64,
    /// The shares of the later phase (families not named weigh 1).
    pub later_weights: BTreeMap<Family, u32>,
    /// Generated training conversations (when no --data is given).
    pub count: usize,
    /// Held-out instances per family for task accuracy.
    pub heldout: usize,
    pub seed: u64,
    pub digits: usize,
    pub length: usize,
}

impl Default for TasksConfig {
    fn default() -> Self {
        Self {
            families: Family::ALL.to_vec(),
            weights: BTreeMap::new(),
            later_from: 0,
            later_weights: BTreeMap::new(),
            count: 40_000,
            heldout: 30,
            seed: 7,
            digits: 2,
            length: 3,
        }
    }
}

impl TasksConfig {
    pub fn difficulty(&self) -> Difficulty {
        Difficulty {
            digits: self.digits,
            length: self.length,
        }
    }

    /// The training set and the held-out set. The held-out set is drawn
    /// first; training never repeats a held-out instance and draws from
    /// everything else, so a large `count` sees every other instance of a
    /// small family.
    pub fn sets(&self) -> (Vec<Task>, Vec<Task>) {
        let heldout = self.heldout();
        (self.train_avoiding(&heldout), heldout)
    }

    /// The training set alone (the first `count` of the training stream).
    pub fn train(&self) -> Vec<Task> {
        self.train_avoiding(&self.heldout())
    }

    /// The held-out set alone: `heldout` distinct instances per family. A
    /// smaller set is a prefix of a larger one, so `heldout` alone decides
    /// which instances training avoids.
    pub fn heldout(&self) -> Vec<Task> {
        draw(
            &self.families,
            self.heldout * self.families.len(),
            &self.difficulty(),
            self.seed,
            Split::HeldOut,
            &HashSet::new(),
            true,
        )
    }

    /// Why the weights cannot be used, if they cannot: a weight of 0.
    pub fn check_weights(&self) -> Result<(), crate::error::InvalidSetting> {
        for (key, weights) in [
            ("weights", &self.weights),
            ("later_weights", &self.later_weights),
        ] {
            for (family, &weight) in weights {
                if weight == 0 {
                    return Err(format!(
                        "tasks.{key}.{} is 0: leave the family out of tasks.families instead",
                        family.name()
                    )
                    .into());
                }
            }
        }
        Ok(())
    }

    /// The training set of the later phase, if there is one: the same
    /// families, held-out set and seed, drawn with `later_weights`.
    pub fn later_train(&self) -> Option<Vec<Task>> {
        (self.later_from > 0).then(|| {
            TasksConfig {
                weights: self.later_weights.clone(),
                later_from: 0,
                ..self.clone()
            }
            .train()
        })
    }

    fn train_avoiding(&self, heldout: &[Task]) -> Vec<Task> {
        let avoid = heldout.iter().cloned().collect();
        // Weights as repeats in the cycle the draw walks through.
        let cycle: Vec<Family> = self
            .families
            .iter()
            .flat_map(|f| std::iter::repeat_n(*f, self.weights.get(f).map_or(1, |&w| w as usize)))
            .collect();
        draw(
            &cycle,
            self.count,
            &self.difficulty(),
            self.seed,
            Split::Train,
            &avoid,
            false,
        )
    }
}

/// Prompts generated together by [`task_metrics`].
pub const EVAL_BATCH: usize = 64;

/// Exact-match accuracy per family and stop rate on held-out tasks, by greedy
/// generation with the chat renderer ([`EVAL_BATCH`] prompts at a time).
pub fn task_metrics<B: Backend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    tasks: &[Task],
    max_new_tokens: usize,
    device: &B::Device,
) -> BTreeMap<String, f64> {
    task_metrics_with(
        &Policy::One(model),
        tokenizer,
        tasks,
        max_new_tokens,
        device,
    )
}

/// [`task_metrics`] of a [`Policy`] (one model, or an EFT combination).
pub fn task_metrics_with<B: Backend>(
    policy: &Policy<B>,
    tokenizer: &Tokenizer,
    tasks: &[Task],
    max_new_tokens: usize,
    device: &B::Device,
) -> BTreeMap<String, f64> {
    let renderer = ChatRenderer::new(tokenizer);
    let sampling = Sampling {
        max_new_tokens,
        temperature: 0.0,
        stop: vec![tokenizer.special.end],
        ..Sampling::default()
    };
    let rendered = rendered_prompts(&renderer, tasks);
    let mut per_family: BTreeMap<Family, (usize, usize)> = BTreeMap::new();
    let mut stopped = 0;
    for chunk in rendered.chunks(EVAL_BATCH) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|(_, p)| p.clone()).collect();
        let replies = generate_batch(policy, &prompts, &sampling, device);
        for ((task, _), ids) in chunk.iter().zip(replies) {
            if ids.last() == Some(&tokenizer.special.end) {
                stopped += 1;
            }
            let reply = renderer.decode_reply(&ids).unwrap_or_default();
            let entry = per_family.entry(task.family).or_default();
            entry.0 += usize::from(task.check(&reply));
            entry.1 += 1;
        }
    }
    let mut metrics = BTreeMap::new();
    let total: usize = per_family.values().map(|(_, n)| n).sum();
    let correct: usize = per_family.values().map(|(c, _)| c).sum();
    if total > 0 {
        metrics.insert("task_accuracy".to_string(), correct as f64 / total as f64);
        metrics.insert("stop_rate".to_string(), stopped as f64 / total as f64);
        for (family, (c, n)) in per_family {
            metrics.insert(
                format!("task_accuracy/{}", family.name()),
                c as f64 / n as f64,
            );
        }
    }
    metrics
}

/// Each task's prompt as ids; prompts that do not render (too long for the
/// template) are left out.
fn rendered_prompts<'t>(renderer: &ChatRenderer, tasks: &'t [Task]) -> Vec<(&'t Task, Vec<u32>)> {
    tasks
        .iter()
        .filter_map(|t| Some((t, renderer.render_prompt(&t.messages()[..1]).ok()?)))
        .collect()
}

/// Sampled accuracy on `tasks`: `samples` replies per prompt with
/// `sampling` (each row seeded from its seed and the row's index; replies
/// stop at the end-of-turn token). Reports `pass@k` (the share of prompts
/// with at least one correct reply among the k) and `sample_accuracy` (the
/// share of correct replies), both also per family. pass@k is the ceiling an
/// on-policy method can sharpen greedy accuracy towards.
pub fn task_pass_at_k<B: Backend>(
    policy: &Policy<B>,
    tokenizer: &Tokenizer,
    tasks: &[Task],
    samples: usize,
    sampling: &Sampling,
    device: &B::Device,
) -> BTreeMap<String, f64> {
    let renderer = ChatRenderer::new(tokenizer);
    let rendered = rendered_prompts(&renderer, tasks);
    let mut correct = Vec::with_capacity(rendered.len());
    let per_chunk = (EVAL_BATCH / samples.max(1)).max(1);
    for (c, chunk) in rendered.chunks(per_chunk).enumerate() {
        let settings: Vec<Sampling> = (0..chunk.len() * samples)
            .map(|r| Sampling {
                stop: vec![tokenizer.special.end],
                seed: sampling
                    .seed
                    .wrapping_mul(1_000_003)
                    .wrapping_add((c * per_chunk * samples + r) as u64),
                ..sampling.clone()
            })
            .collect();
        let rows: Vec<(&[u32], &Sampling)> = settings
            .iter()
            .enumerate()
            .map(|(r, s)| (chunk[r / samples].1.as_slice(), s))
            .collect();
        let replies = generate_rows(policy, &rows, device);
        for (i, (task, _)) in chunk.iter().enumerate() {
            let right = replies[i * samples..(i + 1) * samples]
                .iter()
                .filter(|ids| task.check(&renderer.decode_reply(ids).unwrap_or_default()))
                .count();
            correct.push((task.family, right));
        }
    }
    pass_metrics(&correct, samples)
}

/// `pass@k` and `sample_accuracy`, overall and per family, from each
/// prompt's family and its number of correct replies among `k`.
pub fn pass_metrics(correct: &[(Family, usize)], k: usize) -> BTreeMap<String, f64> {
    // Per family: prompts with a correct reply, correct replies, prompts.
    let mut per_family: BTreeMap<Family, [usize; 3]> = BTreeMap::new();
    for &(family, right) in correct {
        let entry = per_family.entry(family).or_default();
        entry[0] += usize::from(right > 0);
        entry[1] += right;
        entry[2] += 1;
    }
    let mut metrics = BTreeMap::new();
    let mut add = |suffix: &str, [hit, right, n]: [usize; 3]| {
        if n > 0 {
            metrics.insert(format!("pass@{k}{suffix}"), hit as f64 / n as f64);
            let share = right as f64 / (n * k.max(1)) as f64;
            metrics.insert(format!("sample_accuracy{suffix}"), share);
        }
    };
    let mut total = [0usize; 3];
    for (family, counts) in &per_family {
        add(&format!("/{}", family.name()), *counts);
        for (t, c) in total.iter_mut().zip(counts) {
            *t += c;
        }
    }
    add("", total);
    metrics
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn pass_at_k_counts_prompts_with_any_correct_reply() {
        let m = pass_metrics(
            &[
                (Family::Add, 0),
                (Family::Add, 3),
                (Family::Sub, 1),
                (Family::Sub, 4),
            ],
            4,
        );
        assert_eq!(m["pass@4"], 0.75);
        assert_eq!(m["sample_accuracy"], 8.0 / 16.0);
        assert_eq!(m["pass@4/add"], 0.5);
        assert_eq!(m["sample_accuracy/add"], 3.0 / 8.0);
        assert_eq!(m["pass@4/sub"], 1.0);
        assert_eq!(m["sample_accuracy/sub"], 5.0 / 8.0);
        assert!(pass_metrics(&[], 4).is_empty());
    }

    #[test]
    fn every_family_checks_its_own_answers_and_rejects_others() {
        let mut rng = StdRng::seed_from_u64(3);
        let difficulty = Difficulty::default();
        for family in Family::ALL {
            for _ in 0..50 {
                let task = family.generate(&mut rng, &difficulty);
                assert!(task.check(&task.answer), "{task:?}");
                assert!(task.check(&format!(" {}\n", task.answer)));
                assert!(!task.check(&format!("{}0", task.answer)), "{task:?}");
                assert!(!task.check(""));
            }
        }
        let t = Family::Add.generate(
            &mut StdRng::seed_from_u64(1),
            &Difficulty {
                digits: 3,
                length: 3,
            },
        );
        let (a, b) = t
            .prompt
            .trim_start_matches("What is ")
            .trim_end_matches('?')
            .split_once(" + ")
            .unwrap();
        assert_eq!(
            t.answer,
            (a.parse::<u64>().unwrap() + b.parse::<u64>().unwrap()).to_string()
        );
        let f = Family::FormatAnswer.generate(&mut rng, &difficulty);
        assert!(f.answer.starts_with("Answer: "));
        assert!(!f.check(f.answer.trim_start_matches("Answer: ")));
    }

    #[test]
    fn held_out_never_shares_an_instance_with_train() {
        let cfg = TasksConfig {
            count: 40_000,
            heldout: 40,
            ..TasksConfig::default()
        };
        let (train, held) = cfg.sets();
        assert_eq!(train.len(), 40_000);
        assert_eq!(held.len(), 40 * Family::ALL.len());
        let distinct: HashSet<&Task> = held.iter().collect();
        assert_eq!(
            distinct.len(),
            held.len(),
            "held-out instances are distinct"
        );
        assert!(train.iter().all(|t| !distinct.contains(t)));
        // mul (2 digits x 1 digit) has 1000 instances, 40 held out: 4000 draws
        // from the other 960 see ~98% of them (1 - e^-4.2) and never a held-out one.
        let muls: HashSet<&Task> = train.iter().filter(|t| t.family == Family::Mul).collect();
        assert!((930..=960).contains(&muls.len()), "{}", muls.len());
        // Seeded, and a smaller held-out set is a prefix of a larger one.
        assert_eq!(cfg.sets(), (train, held.clone()));
        let fewer = TasksConfig {
            heldout: 10,
            ..cfg.clone()
        };
        assert_eq!(fewer.heldout()[..], held[..10 * Family::ALL.len()]);
        assert_eq!(
            parse_families("add, reverse").unwrap(),
            vec![Family::Add, Family::Reverse]
        );
        assert!(
            parse_families("add,divide")
                .unwrap_err()
                .0
                .contains("divide")
        );
    }

    /// 6000 training tasks from add, count_char and reverse; 20 held out each.
    fn three_families() -> TasksConfig {
        TasksConfig {
            count: 6_000,
            heldout: 20,
            families: vec![Family::Add, Family::CountChar, Family::Reverse],
            ..TasksConfig::default()
        }
    }

    /// The share of `family` among `tasks`.
    fn share(tasks: &[Task], family: Family) -> f64 {
        tasks.iter().filter(|t| t.family == family).count() as f64 / tasks.len() as f64
    }

    #[test]
    fn weights_change_the_training_share_not_the_held_out_set() {
        let plain = three_families();
        let weighted = TasksConfig {
            weights: BTreeMap::from([(Family::CountChar, 3)]),
            ..plain.clone()
        };
        weighted.check_weights().unwrap();
        assert_eq!(weighted.heldout(), plain.heldout());
        let (train, held) = weighted.sets();
        assert_eq!(train.len(), 6_000);
        assert!((share(&train, Family::CountChar) - 0.6).abs() < 0.01);
        assert!((share(&train, Family::Add) - 0.2).abs() < 0.01);
        assert!((share(&plain.train(), Family::CountChar) - 1.0 / 3.0).abs() < 0.01);
        let held: HashSet<&Task> = held.iter().collect();
        assert!(train.iter().all(|t| !held.contains(t)));
        let zero = TasksConfig {
            weights: BTreeMap::from([(Family::Add, 0)]),
            ..plain.clone()
        };
        assert!(
            zero.check_weights()
                .unwrap_err()
                .0
                .contains("tasks.weights.add is 0")
        );
        // A weight for a family that is not drawn changes nothing.
        let absent = TasksConfig {
            weights: BTreeMap::from([(Family::Mul, 2)]),
            ..plain.clone()
        };
        absent.check_weights().unwrap();
        assert_eq!(absent.sets(), plain.sets());
    }

    #[test]
    fn the_later_phase_draws_with_its_own_weights_and_the_same_held_out_set() {
        let plain = three_families();
        assert!(
            plain.later_train().is_none(),
            "later_from = 0 has no later phase"
        );
        let curriculum = TasksConfig {
            later_from: 100,
            later_weights: BTreeMap::from([(Family::Reverse, 2)]),
            ..plain.clone()
        };
        curriculum.check_weights().unwrap();
        // The first phase and the held-out set are those of the plain config.
        assert_eq!(curriculum.sets(), plain.sets());
        let later = curriculum.later_train().unwrap();
        assert_eq!(later.len(), 6_000);
        assert!((share(&later, Family::Reverse) - 0.5).abs() < 0.01);
        assert!((share(&later, Family::Add) - 0.25).abs() < 0.01);
        let held: HashSet<Task> = plain.heldout().into_iter().collect();
        assert!(later.iter().all(|t| !held.contains(t)));
        let zero = TasksConfig {
            later_weights: BTreeMap::from([(Family::Add, 0)]),
            ..curriculum
        };
        assert!(
            zero.check_weights()
                .unwrap_err()
                .0
                .contains("tasks.later_weights.add is 0")
        );
    }
}
