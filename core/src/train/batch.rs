//! Micro-batches: token ids, targets and loss weights, and rows packed with
//! several documents (per-document positions and a block-diagonal mask).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand::Rng;

use crate::chat::Rendered;
use crate::model::{AttentionMask, Llama, Positions, token_logprobs};

/// One micro-batch, host-side: `batch × seq` token ids, next-token targets and
/// per-position loss weights (1 = supervised). `positions`/`doc_ids` describe
/// packed documents; when absent, each row is one causal sequence from 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
    pub positions: Option<Vec<u32>>,
    pub doc_ids: Option<Vec<u32>>,
}

impl Batch {
    /// A plain language-modelling batch: every position supervised.
    pub fn dense(batch: usize, seq: usize, inputs: Vec<u32>, targets: Vec<u32>) -> Self {
        Self {
            batch,
            seq,
            weights: vec![1.0; inputs.len()],
            inputs,
            targets,
            positions: None,
            doc_ids: None,
        }
    }

    /// Real (non-padding) tokens: those in a document when the batch is packed.
    pub fn tokens(&self) -> u64 {
        match &self.doc_ids {
            Some(docs) => {
                let mut n = 0;
                for row in docs.chunks(self.seq) {
                    // Padding positions carry ids counting down from u32::MAX.
                    n += row.iter().filter(|&&d| d < u32::MAX / 2).count() as u64;
                }
                n
            }
            None => self.inputs.len() as u64,
        }
    }

    /// The rows split into `parts` consecutive groups (sizes differ by at
    /// most one; no group is empty, so fewer than `parts` when rows are few).
    pub fn split_rows(&self, parts: usize) -> Vec<Batch> {
        let parts = parts.clamp(1, self.batch.max(1));
        let mut out = Vec::with_capacity(parts);
        let mut from = 0;
        for i in 0..parts {
            let to = from + self.batch / parts + usize::from(i < self.batch % parts);
            out.push(self.rows(from, to));
            from = to;
        }
        out
    }

    /// Rows `from..to` as a batch of their own, with the same `seq`.
    pub fn rows(&self, from: usize, to: usize) -> Batch {
        let per_row = |v: &[u32]| v[from * self.seq..to * self.seq].to_vec();
        Batch {
            batch: to - from,
            seq: self.seq,
            inputs: per_row(&self.inputs),
            targets: per_row(&self.targets),
            weights: self.weights[from * self.seq..to * self.seq].to_vec(),
            positions: self.positions.as_ref().map(|p| per_row(p)),
            doc_ids: self.doc_ids.as_ref().map(|d| per_row(d)),
        }
    }

    /// The documents of the batch as `(row, start, len)` spans: the packed
    /// documents of each row, or each whole row when the batch is not packed.
    pub fn documents(&self) -> Vec<(usize, usize, usize)> {
        let Some(docs) = &self.doc_ids else {
            return (0..self.batch).map(|r| (r, 0, self.seq)).collect();
        };
        let mut out = Vec::new();
        for (r, row) in docs.chunks(self.seq).enumerate() {
            let mut start = 0;
            while start < self.seq {
                let mut end = start + 1;
                while end < self.seq && row[end] == row[start] {
                    end += 1;
                }
                if row[start] < u32::MAX / 2 {
                    out.push((r, start, end - start));
                }
                start = end;
            }
        }
        out
    }

    /// Mean NLL over each document's supervised positions (in [`Batch::documents`]
    /// order), from the batch's token log-probabilities laid out `[batch, seq]`;
    /// a document with nothing supervised scores 0.
    pub fn document_losses(&self, logprobs: &[f32]) -> Vec<f64> {
        self.documents()
            .into_iter()
            .map(|(r, start, len)| {
                let at = r * self.seq + start;
                let (mut nll, mut weight) = (0.0, 0.0);
                for (lp, w) in logprobs[at..at + len]
                    .iter()
                    .zip(&self.weights[at..at + len])
                {
                    nll -= *lp as f64 * *w as f64;
                    weight += *w as f64;
                }
                if weight > 0.0 { nll / weight } else { 0.0 }
            })
            .collect()
    }

    /// A batch of the documents `keep` marks (in [`Batch::documents`] order),
    /// packed anew, in order, into as few rows of `seq` as hold them; each
    /// keeps its tokens, targets, weights and positions.
    pub fn with_documents(&self, keep: &[bool]) -> Batch {
        let spans: Vec<_> = self
            .documents()
            .into_iter()
            .zip(keep)
            .filter(|(_, k)| **k)
            .map(|(span, _)| span)
            .collect();
        let mut rows: Vec<Vec<(usize, usize, usize)>> = Vec::new();
        let mut used = self.seq;
        for span in spans {
            if used + span.2 > self.seq {
                rows.push(Vec::new());
                used = 0;
            }
            rows.last_mut().expect("a row was opened").push(span);
            used += span.2;
        }
        let n = rows.len();
        let mut out = Batch {
            batch: n,
            seq: self.seq,
            inputs: vec![0; n * self.seq],
            targets: vec![0; n * self.seq],
            weights: vec![0.0; n * self.seq],
            positions: Some(vec![0; n * self.seq]),
            doc_ids: Some(vec![0; n * self.seq]),
        };
        let positions = out.positions.as_mut().expect("set above");
        let doc_ids = out.doc_ids.as_mut().expect("set above");
        for (r, row) in rows.iter().enumerate() {
            let mut at = r * self.seq;
            for (d, &(from_row, start, len)) in row.iter().enumerate() {
                let from = from_row * self.seq + start;
                out.inputs[at..at + len].copy_from_slice(&self.inputs[from..from + len]);
                out.targets[at..at + len].copy_from_slice(&self.targets[from..from + len]);
                out.weights[at..at + len].copy_from_slice(&self.weights[from..from + len]);
                for k in 0..len {
                    positions[at + k] = match &self.positions {
                        Some(p) => p[from + k],
                        None => k as u32,
                    };
                    doc_ids[at + k] = d as u32;
                }
                at += len;
            }
            // Padding: each pad position its own document, as packed_batch lays it.
            for k in (at - r * self.seq)..self.seq {
                doc_ids[r * self.seq + k] = u32::MAX - k as u32;
            }
        }
        out
    }

    pub fn supervised_tokens(&self) -> f64 {
        self.weights.iter().map(|&w| w as f64).sum()
    }

    /// Summed NLL over the supervised positions (a scalar tensor). An MoE
    /// model in training (with a [`crate::moe::Balance`]) adds its auxiliary
    /// loss once per supervised token, so after the step's normalisation it
    /// weighs as `balance_weight · LBL` per token.
    pub fn nll_sum<B: Backend>(&self, model: &Llama<B>, device: &B::Device) -> Tensor<B, 1> {
        let weights = Tensor::<B, 2>::from_data(
            TensorData::new(self.weights.clone(), [self.batch, self.seq]),
            device,
        );
        let (ids, positions, mask) = self.inputs(device);
        let (logits, aux) = model.forward_with_aux(ids, &positions, &mask);
        let targets = int_tensor::<B>(&self.targets, self.batch, self.seq, device);
        let nll = token_logprobs(logits, targets).mul(weights).sum().neg();
        match aux {
            Some(aux) => nll + aux.mul_scalar(self.supervised_tokens()),
            None => nll,
        }
    }

    /// Log-probability of every target, `[batch, seq]` (padding included:
    /// weight it out).
    pub fn token_logprobs<B: Backend>(&self, model: &Llama<B>, device: &B::Device) -> Tensor<B, 2> {
        let targets = int_tensor::<B>(&self.targets, self.batch, self.seq, device);
        token_logprobs(self.logits(model, device), targets)
    }

    /// The model's next-token logits at every position, `[batch, seq, vocab]`,
    /// with the batch's positions and document mask.
    pub fn logits<B: Backend>(&self, model: &Llama<B>, device: &B::Device) -> Tensor<B, 3> {
        let (ids, positions, mask) = self.inputs(device);
        model.forward_with(ids, &positions, &mask)
    }

    /// Runs the batch through the model's layers without the LM head (an
    /// MoE model's routing pre-pass).
    pub fn route<B: Backend>(&self, model: &Llama<B>, device: &B::Device) {
        let (ids, positions, mask) = self.inputs(device);
        let _ = model.forward_hidden(ids, &positions, &mask);
    }

    fn inputs<B: Backend>(
        &self,
        device: &B::Device,
    ) -> (Tensor<B, 2, Int>, Positions<B>, AttentionMask) {
        let ids = int_tensor::<B>(&self.inputs, self.batch, self.seq, device);
        let positions = match &self.positions {
            Some(p) => Positions::PerToken(int_tensor::<B>(p, self.batch, self.seq, device)),
            None => Positions::Contiguous {
                start: 0,
                len: self.seq,
            },
        };
        let mask = match &self.doc_ids {
            Some(docs) => AttentionMask::documents(docs, self.seq)
                .expect("packed documents are contiguous runs of positions"),
            None => AttentionMask::Causal,
        };
        (ids, positions, mask)
    }
}

pub fn int_tensor<B: Backend>(
    ids: &[u32],
    rows: usize,
    cols: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let data: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    Tensor::from_data(TensorData::new(data, [rows, cols]), device)
}

/// Block-diagonal causal mask `[batch, 1, seq, seq]` (`true` = blocked): a query
/// sees keys at or before it *in the same document*. The plain form of
/// [`AttentionMask::documents`], kept as the reference the tests compare with.
pub fn document_mask<B: Backend>(
    doc_ids: &[u32],
    batch: usize,
    seq: usize,
    device: &B::Device,
) -> Tensor<B, 4, burn::tensor::Bool> {
    let mut blocked = Vec::with_capacity(batch * seq * seq);
    for row in 0..batch {
        let docs = &doc_ids[row * seq..(row + 1) * seq];
        for q in 0..seq {
            for k in 0..seq {
                blocked.push(k > q || docs[k] != docs[q]);
            }
        }
    }
    Tensor::from_data(TensorData::new(blocked, [batch, 1, seq, seq]), device)
}

/// Draws conversations for one row until the next one does not fit in `capacity` tokens.
pub fn pack_row<'e>(
    examples: &'e [Rendered],
    capacity: usize,
    rng: &mut rand::rngs::StdRng,
) -> Vec<&'e Rendered> {
    let mut row = Vec::new();
    let mut used = 0;
    loop {
        let example = &examples[rng.random_range(0..examples.len())];
        if used + example.ids.len() > capacity && !row.is_empty() {
            return row;
        }
        used += example.ids.len();
        row.push(example);
        if used >= capacity {
            return row;
        }
    }
}

/// Lays rows of conversations out as a batch of `seq` positions: each
/// conversation is shifted on its own (no prediction across a boundary), its
/// positions restart at zero and its tokens attend only within it; the rest is
/// padding with no loss.
pub fn packed_batch(rows: &[Vec<&Rendered>], seq: usize, pad: u32) -> Batch {
    let n = rows.len();
    let mut inputs = vec![pad; n * seq];
    let mut targets = vec![pad; n * seq];
    let mut weights = vec![0.0; n * seq];
    let mut positions = vec![0u32; n * seq];
    let mut doc_ids = vec![u32::MAX; n * seq];
    for (r, row) in rows.iter().enumerate() {
        let mut at = 0;
        for (d, conversation) in row.iter().enumerate() {
            let (i, t, w) = conversation.shifted();
            let take = i.len().min(seq - at);
            for k in 0..take {
                let slot = r * seq + at + k;
                inputs[slot] = i[k];
                targets[slot] = t[k];
                weights[slot] = w[k];
                positions[slot] = k as u32;
                doc_ids[slot] = d as u32;
            }
            at += take;
            if at == seq {
                break;
            }
        }
        // Padding: each pad position its own document, position 0.
        for k in at..seq {
            doc_ids[r * seq + k] = u32::MAX - k as u32;
        }
    }
    Batch {
        batch: n,
        seq,
        inputs,
        targets,
        weights,
        positions: Some(positions),
        doc_ids: Some(doc_ids),
    }
}
