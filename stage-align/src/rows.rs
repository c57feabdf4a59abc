//! What alignment scores: prompt + reply items, packed into rows of a batch;
//! each reply's summed log-prob in one matmul over a one-hot segment matrix.

use anyhow::{Result, bail};
use baton_core::burn::tensor::backend::Backend;
use baton_core::burn::tensor::{Tensor, TensorData};
use baton_core::chat::{ChatRenderer, Message, Rendered};
use baton_core::model::Llama;
use baton_core::tokenizer::Tokenizer;
use baton_core::train::{Batch, packed_batch};

use crate::config::*;
use crate::loss::LossSpec;
use crate::prefs::Preferences;

// ---------------------------------------------------------------------------
// Items: the sequences alignment scores
// ---------------------------------------------------------------------------

/// One prompt + reply, rendered; only the reply's tokens (and its end-of-turn)
/// are scored.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub rendered: Rendered,
    pub reply_tokens: usize,
}

/// What the loss compares: a pair of items, or one labelled item.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unit {
    Pair { chosen: usize, rejected: usize },
    Single { item: usize, desirable: bool },
}

impl Unit {
    fn items(self) -> Vec<usize> {
        match self {
            Unit::Pair { chosen, rejected } => vec![chosen, rejected],
            Unit::Single { item, .. } => vec![item],
        }
    }
}

/// Items and units of a preference dataset.
#[derive(Clone, Debug, Default)]
pub struct AlignData {
    pub items: Vec<Item>,
    pub units: Vec<Unit>,
    /// Units dropped as longer than the training window.
    pub dropped: usize,
}

impl AlignData {
    /// Renders the preferences for training under `cfg`, refusing an empty
    /// set and unpaired replies when `spec` needs pairs.
    pub fn for_training(
        prefs: &Preferences,
        tokenizer: &Tokenizer,
        cfg: &AlignConfig,
        spec: &LossSpec,
    ) -> Result<AlignData> {
        let limit = cfg.train.seq_len + 1;
        let data = AlignData::render(prefs, tokenizer, limit, cfg.align.score_tokens)?;
        let pointwise_data = data.units.iter().any(|u| matches!(u, Unit::Single { .. }));
        if pointwise_data && !spec.pointwise() {
            bail!(
                "loss \"{spec}\" needs chosen/rejected pairs but the data has unpaired labelled replies (use kto or asft)"
            );
        }
        if data.units.is_empty() {
            bail!(
                "the preference set is empty after filtering ({} identical pairs skipped, {} longer than {limit} tokens dropped)",
                prefs.identical,
                data.dropped
            );
        }
        tracing::info!(
            "align data: {} units ({} items); {} identical pairs skipped, {} over-long dropped",
            data.units.len(),
            data.items.len(),
            prefs.identical,
            data.dropped
        );
        Ok(data)
    }

    /// Renders preferences with the chat renderer; units with a sequence
    /// longer than `limit` tokens are dropped. `scope` says which tokens of a
    /// pair's replies are scored (unpaired replies are always scored whole).
    pub fn render(
        prefs: &Preferences,
        tokenizer: &Tokenizer,
        limit: usize,
        scope: ScoreTokens,
    ) -> Result<Self> {
        let renderer = ChatRenderer::new(tokenizer);
        let mut data = AlignData::default();
        let item =
            |prompt: &[Message], reply: Rendered, data: &mut AlignData| -> Result<Option<usize>> {
                let mut rendered = Rendered {
                    ids: renderer.render_prompt(prompt)?,
                    ..Rendered::default()
                };
                rendered.loss_mask = vec![false; rendered.ids.len()];
                let reply_tokens = reply.ids.len();
                rendered.ids.extend(reply.ids);
                rendered.loss_mask.extend(reply.loss_mask);
                if rendered.ids.len() > limit {
                    return Ok(None);
                }
                data.items.push(Item {
                    rendered,
                    reply_tokens,
                });
                Ok(Some(data.items.len() - 1))
            };
        for pair in &prefs.pairs {
            let before = data.items.len();
            let mut chosen = renderer.render_reply(&pair.chosen)?;
            let mut rejected = renderer.render_reply(&pair.rejected)?;
            if scope == ScoreTokens::ToDivergence {
                // Both replies end with end-of-turn, so unequal replies differ
                // at some index below both lengths.
                let shared = chosen
                    .ids
                    .iter()
                    .zip(&rejected.ids)
                    .take_while(|(a, b)| a == b)
                    .count();
                for reply in [&mut chosen, &mut rejected] {
                    let keep = (shared + 1).min(reply.ids.len());
                    reply.ids.truncate(keep);
                    reply.loss_mask.truncate(keep);
                }
            }
            match (
                item(&pair.prompt, chosen, &mut data)?,
                item(&pair.prompt, rejected, &mut data)?,
            ) {
                (Some(chosen), Some(rejected)) => data.units.push(Unit::Pair { chosen, rejected }),
                _ => {
                    data.items.truncate(before);
                    data.dropped += 1;
                }
            }
        }
        for l in &prefs.labelled {
            let reply = renderer.render_reply(&l.completion)?;
            match item(&l.prompt, reply, &mut data)? {
                Some(i) => data.units.push(Unit::Single {
                    item: i,
                    desirable: l.desirable,
                }),
                None => data.dropped += 1,
            }
        }
        Ok(data)
    }

    /// Packs units, in order, into `rows` rows of `seq` positions until the
    /// next one does not fit (a pair's replies may sit in different rows).
    /// Returns the batch and where each placed item sits.
    pub(crate) fn pack(
        &self,
        units: &[usize],
        rows: usize,
        seq: usize,
        pad: u32,
    ) -> (Batch, Placed) {
        let mut layout: Vec<Vec<&Rendered>> = vec![Vec::new(); rows];
        let mut placed = Placed::default();
        let mut used = vec![0usize; rows];
        let mut row = 0;
        'units: for &u in units {
            let mut trial_row = row;
            let mut trial_used = used.clone();
            let mut slots = Vec::new();
            for i in self.units[u].items() {
                let len = self.items[i].rendered.ids.len() - 1;
                while trial_row < rows && trial_used[trial_row] + len > seq {
                    trial_row += 1;
                }
                if trial_row == rows {
                    break 'units;
                }
                slots.push((i, trial_row, trial_used[trial_row], len));
                trial_used[trial_row] += len;
            }
            for (i, r, at, len) in slots {
                placed.items.push((i, r * seq + at, len));
                layout[r].push(&self.items[i].rendered);
            }
            row = trial_row;
            used = trial_used;
            placed.units.push(u);
        }
        (packed_batch(&layout, seq, pad), placed)
    }
}

/// Where a batch's items sit.
#[derive(Clone, Debug, Default)]
pub(crate) struct Placed {
    /// `(item, first slot, length)` in the flattened `[batch * seq]` layout.
    pub(crate) items: Vec<(usize, usize, usize)>,
    pub(crate) units: Vec<usize>,
}

impl Placed {
    /// `[batch*seq, n]` one-hot weights that sum the supervised token
    /// log-probs of the `n` items in `part`, the rows `first_row..` of the
    /// packed batch (the whole batch from row 0). `pack` places items in row
    /// order, so the parts' items, concatenated in row order, are `items` in
    /// order. `None` when no item sits in `part`.
    fn segment_matrix<B: Backend>(
        &self,
        part: &Batch,
        first_row: usize,
        device: &B::Device,
    ) -> Option<Tensor<B, 2>> {
        let slots = part.batch * part.seq;
        let offset = first_row * part.seq;
        let inside: Vec<(usize, usize)> = self
            .items
            .iter()
            .filter(|&&(_, start, _)| start >= offset && start < offset + slots)
            .map(|&(_, start, len)| (start - offset, len))
            .collect();
        let n = inside.len();
        if n == 0 {
            return None;
        }
        let mut m = vec![0f32; slots * n];
        for (col, &(start, len)) in inside.iter().enumerate() {
            for slot in start..start + len {
                m[slot * n + col] = part.weights[slot];
            }
        }
        Some(Tensor::from_data(TensorData::new(m, [slots, n]), device))
    }
}

/// Summed reply log-prob of every placed item in `part`, the rows
/// `first_row..` of the packed batch: `[n]`, in placement order.
pub(crate) fn item_logps<B: Backend>(
    model: &Llama<B>,
    part: &Batch,
    placed: &Placed,
    first_row: usize,
    device: &B::Device,
) -> Tensor<B, 1> {
    let Some(segments) = placed.segment_matrix::<B>(part, first_row, device) else {
        return Tensor::zeros([0], device);
    };
    let n = segments.dims()[1];
    let slots = part.batch * part.seq;
    let lp = part
        .token_logprobs(model, device)
        .reshape([1, slots])
        .matmul(segments);
    lp.reshape([n])
}

/// Summed reply log-prob of every item under `model`, computed in packed
/// batches (the reference cache, and the policy side of the KL estimate).
pub fn reply_logps<B: Backend>(
    model: &Llama<B>,
    data: &AlignData,
    rows: usize,
    seq: usize,
    pad: u32,
    device: &B::Device,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; data.items.len()];
    let all: Vec<usize> = (0..data.units.len()).collect();
    let mut next = 0;
    let progress = baton_core::cli::progress(all.len() as u64, "reference log-probs");
    while next < all.len() {
        let (batch, placed) = data.pack(&all[next..], rows, seq, pad);
        if placed.units.is_empty() {
            break;
        }
        let values: Vec<f32> = item_logps(model, &batch, &placed, 0, device)
            .into_data()
            .to_vec()
            .unwrap_or_default();
        for (&(item, _, _), v) in placed.items.iter().zip(values) {
            out[item] = v;
        }
        next += placed.units.len();
        progress.inc(placed.units.len() as u64);
    }
    progress.finish_and_clear();
    out
}
