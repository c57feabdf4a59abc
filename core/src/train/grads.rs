//! Gradients of a micro-batch with its rows split among threads (the sum of
//! the parts' gradients is the whole batch's).

use std::any::Any;
use std::cell::RefCell;

use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorData};

use super::{Batch, TrainConfig};
use crate::model::Llama;

/// Threads [`nll_grads`] should use for `cfg` on `device`'s backend: GPU
/// backends run one micro-batch at a time, and gain nothing from more.
pub fn workers_for<B: Backend>(cfg: &TrainConfig, _device: &B::Device) -> usize {
    if crate::backend::is_gpu::<B>() {
        1
    } else {
        cfg.workers.max(1)
    }
}

thread_local! {
    /// The devices this thread's training passes split rows among (see
    /// [`StepDevices`]): a `Vec` of the backend's device type.
    static STEP_DEVICES: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
    /// The weights' copies on the devices after the first, kept from the
    /// first training pass after the weights last changed (a `Vec` of
    /// `Llama<B>`): a step's micro-batches share them.
    static REPLICAS: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// Drops the weights' copies on the other devices: the training loop calls
/// it whenever the model's weights may have changed (its start, every
/// optimizer step), so the next training pass copies them afresh.
pub fn weights_changed() {
    REPLICAS.with(|r| *r.borrow_mut() = None);
}

/// The weights' copies on `devices` (after the first), from the cache of
/// this thread's current weights, or forked from `model` and cached.
fn replicas<B: AutodiffBackend>(model: &Llama<B>, devices: &[B::Device]) -> Vec<Llama<B>> {
    let cached = REPLICAS.with(|r| {
        r.borrow()
            .as_ref()
            .and_then(|any| any.downcast_ref::<Vec<Llama<B>>>())
            .filter(|copies| copies.len() == devices.len())
            .cloned()
    });
    cached.unwrap_or_else(|| {
        // Fresh leaves with the same ParamIds on each device (`fork`;
        // mapping the inner model would drop `require_grad`).
        let copies: Vec<Llama<B>> = devices.iter().map(|d| model.clone().fork(d)).collect();
        REPLICAS.with(|r| *r.borrow_mut() = Some(Box::new(copies.clone())));
        copies
    })
}

/// While alive, the training passes of this thread ([`nll_grads`],
/// [`row_grads`], [`split_grads`]) split each micro-batch's rows among
/// `devices` (`train.devices`): part i runs forward and backward on a copy
/// of the weights on device i, and the parts' gradients are summed onto the
/// first device, where the model and the optimizer live. The sum is NCCL's
/// on CUDA builds with the `nccl` feature; otherwise (a test naming the CPU
/// twice) each part's gradients move to the first device and add in part
/// order.
pub struct StepDevices {
    previous: Option<Box<dyn Any>>,
}

impl StepDevices {
    pub fn enter<D: Clone + 'static>(devices: Vec<D>) -> Self {
        let previous = STEP_DEVICES.with(|d| d.replace(Some(Box::new(devices))));
        weights_changed();
        Self { previous }
    }
}

impl Drop for StepDevices {
    fn drop(&mut self) {
        let previous = self.previous.take();
        STEP_DEVICES.with(|d| *d.borrow_mut() = previous);
        weights_changed();
    }
}

/// The devices of [`StepDevices`] for backend `B`, when there are several.
fn current_devices<B: Backend>() -> Option<Vec<B::Device>> {
    STEP_DEVICES.with(|d| {
        d.borrow()
            .as_ref()?
            .downcast_ref::<Vec<B::Device>>()
            .filter(|devices| devices.len() > 1)
            .cloned()
    })
}

/// How many parts [`on_row_parts`] splits a micro-batch's rows into: the
/// devices of [`StepDevices`], else `workers`.
pub(crate) fn row_ways<B: Backend>(workers: usize) -> usize {
    current_devices::<B>().map_or(workers, |devices| devices.len())
}

/// Runs `job(model, part, first_row)` for every row part of `batch` split
/// `workers` ways and returns the results in row order. The parts run as
/// tasks of rayon's pool, the pool flex's matmuls parallelise on: a matmul
/// inside a busy task then runs on its own thread instead of waking more
/// threads than there are cores (flex runs its elementwise kernels on one
/// core, so a second thread keeps the second core busy).
///
/// Under [`StepDevices`] the rows are split among the devices instead, one
/// thread each, and part i's job runs on a copy of the weights on device i
/// (the job must build its tensors on its model's device).
fn on_row_parts<B, T, F>(model: &Llama<B>, batch: &Batch, workers: usize, job: F) -> Vec<T>
where
    B: AutodiffBackend,
    T: Send,
    F: Fn(&Llama<B>, &Batch, usize) -> T + Sync,
{
    let devices = current_devices::<B>();
    let ways = row_ways::<B>(workers);
    if ways <= 1 || batch.batch < 2 {
        return vec![job(model, batch, 0)];
    }
    let parts = batch.split_rows(ways);
    let first_rows: Vec<usize> = parts
        .iter()
        .scan(0, |row, p| {
            let first = *row;
            *row += p.batch;
            Some(first)
        })
        .collect();
    let mut results: Vec<Option<T>> = parts.iter().map(|_| None).collect();
    // Adapter dropout (training passes only): each part draws its masks
    // from the step's seed and its first row, on whichever thread runs it.
    let dropout = crate::dropout::dropout_seed();
    let job = move |model: &Llama<B>, part: &Batch, first: usize| match dropout {
        Some(seed) => {
            crate::dropout::with_dropout(crate::dropout::mix_seed(seed, &[first as u64]), || {
                job(model, part, first)
            })
        }
        None => job(model, part, first),
    };
    let job = &job;
    let (head, rest) = results.split_first_mut().expect("at least one part");
    let others = parts[1..].iter().zip(&first_rows[1..]).zip(rest);
    match devices {
        Some(devices) => std::thread::scope(|scope| {
            let copies = replicas(model, &devices[1..]);
            for (((part, &first), slot), model) in others.zip(copies) {
                scope.spawn(move || *slot = Some(job(&model, part, first)));
            }
            *head = Some(job(model, &parts[0], 0));
        }),
        None => rayon::scope(|scope| {
            for ((part, &first), slot) in others {
                // Parameters as fresh autodiff leaves (same ParamIds): each
                // worker builds its own graph. Workers sharing the leaves
                // share one graph, and Burn's graph locking can deadlock
                // when two threads register and run backward on it.
                let model = Llama::<B>::from_inner(model.valid());
                scope.spawn(move |_| *slot = Some(job(&model, part, first)));
            }
            *head = Some(job(model, &parts[0], 0));
        }),
    }
    results
        .into_iter()
        .map(|r| r.expect("a training worker panicked"))
        .collect()
}

/// Sums per-part gradients (part i from [`on_row_parts`]'s part i) in part
/// order, so the result does not depend on scheduling. Under
/// [`StepDevices`] the sum lands on the first device.
fn sum_grads<B: AutodiffBackend>(model: &Llama<B>, parts: Vec<GradientsParams>) -> GradientsParams {
    let parts = match current_devices::<B>() {
        Some(devices) if parts.len() > 1 => {
            #[cfg(feature = "nccl")]
            if crate::dist::nccl::usable::<B>() {
                let devices = &devices[..parts.len()];
                return crate::dist::nccl::sum_on_first(model, parts, devices);
            }
            let first = &devices[0];
            parts
                .into_iter()
                .map(|grads| grads.to_device(first, model))
                .collect()
        }
        _ => parts,
    };
    let mut accumulator = GradientsAccumulator::<Llama<B>>::new();
    for grads in parts {
        accumulator.accumulate(model, grads);
    }
    accumulator.grads()
}

/// The summed next-token NLL of `batch` and the gradients of that sum divided
/// by `scale`. With `workers` > 1 the rows are split among that many threads,
/// each running forward and backward on its part of the rows.
pub fn nll_grads<B: AutodiffBackend>(
    model: &Llama<B>,
    batch: &Batch,
    workers: usize,
    scale: f64,
    _device: &B::Device,
) -> (f64, GradientsParams) {
    // Each part on its model's device (a copy's under StepDevices).
    row_grads(model, batch, workers, scale, |model, part, _| {
        part.nll_sum(model, &model.device())
    })
}

/// A loss that is a sum over rows: `loss(model, part, first_row)` is the
/// summed loss of the rows of `part`, which start at row `first_row` of
/// `batch`. Returns the whole batch's loss and the gradients of loss /
/// `scale`, with the rows split among `workers` threads (each its own graph).
pub fn row_grads<B, F>(
    model: &Llama<B>,
    batch: &Batch,
    workers: usize,
    scale: f64,
    loss: F,
) -> (f64, GradientsParams)
where
    B: AutodiffBackend,
    F: Fn(&Llama<B>, &Batch, usize) -> Tensor<B, 1> + Sync,
{
    let results = on_row_parts(model, batch, workers, |model, part, first_row| {
        let loss = loss(model, part, first_row);
        let value = loss.clone().into_scalar().elem::<f64>();
        let grads = GradientsParams::from_grads(loss.div_scalar(scale).backward(), model);
        (value, grads)
    });
    let total = results.iter().map(|(v, _)| v).sum();
    (
        total,
        sum_grads(model, results.into_iter().map(|(_, g)| g).collect()),
    )
}

/// Log-probability of every target of `batch`, `[batch, seq]` flattened,
/// without gradients; with `workers` > 1 the rows are split among that many
/// threads (e.g. to score examples before choosing which to train on).
pub fn scored_logprobs<B: AutodiffBackend>(
    model: &Llama<B>,
    batch: &Batch,
    workers: usize,
    device: &B::Device,
) -> Vec<f32> {
    inference_logprobs(&model.valid(), batch, workers, device)
}

/// [`scored_logprobs`] for a model outside autodiff (a reference or a
/// teacher): the rows split among `workers` threads, each scoring its part.
pub fn inference_logprobs<B: Backend>(
    model: &Llama<B>,
    batch: &Batch,
    workers: usize,
    device: &B::Device,
) -> Vec<f32> {
    let score = |part: &Batch| {
        part.token_logprobs(model, device)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("log-probabilities convert to f32")
    };
    if workers <= 1 || batch.batch < 2 {
        return score(batch);
    }
    let parts = batch.split_rows(workers);
    let mut scored: Vec<Vec<f32>> = vec![Vec::new(); parts.len()];
    rayon::scope(|scope| {
        for (part, slot) in parts.iter().zip(scored.iter_mut()) {
            let score = &score;
            scope.spawn(move |_| *slot = score(part));
        }
    });
    scored.concat()
}

/// A loss that is a function of per-row-part values: `inner(model, part,
/// first_row)` maps each row part of `batch` to a vector (e.g. the summed
/// log-probs of the replies in those rows), and `outer` maps their
/// concatenation, in row order, to the scalar loss (and a by-product `T`).
/// Returns the loss, the gradients of loss / `scale`, and the by-product.
///
/// The inner values of the parts are computed on `workers` threads, each on
/// its own graph. `outer` runs once on a leaf holding their concatenation,
/// which yields g = ∂loss/∂values; then each thread back-propagates Σ gᵢ·valueᵢ
/// through its part. By the chain rule the summed gradients are those of
/// `outer` applied to the whole batch on one thread.
pub fn split_grads<B, T, F>(
    model: &Llama<B>,
    batch: &Batch,
    workers: usize,
    scale: f64,
    device: &B::Device,
    inner: F,
    outer: impl FnOnce(Tensor<B, 1>) -> (Tensor<B, 1>, T),
) -> (f64, GradientsParams, T)
where
    B: AutodiffBackend,
    F: Fn(&Llama<B>, &Batch, usize) -> Tensor<B, 1> + Sync,
{
    let parts = on_row_parts(model, batch, workers, |model, part, first_row| {
        let values = inner(model, part, first_row);
        let host: Vec<f32> = values
            .clone()
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap_or_default();
        // The part's parameter leaves (a clone shares them): its gradients
        // are found through them.
        (values, host, model.clone())
    });
    let gathered: Vec<f32> = parts
        .iter()
        .flat_map(|(_, h, _)| h.iter().copied())
        .collect();
    let n = gathered.len();
    let leaf = Tensor::<B, 1>::from_data(TensorData::new(gathered, [n]), device).require_grad();
    let (loss, by_product) = outer(leaf.clone());
    let value = loss.clone().into_scalar().elem::<f64>();
    let outer_grads = loss.div_scalar(scale).backward();
    let g: Vec<f32> = match leaf.grad(&outer_grads) {
        Some(g) => g.into_data().convert::<f32>().to_vec().unwrap_or_default(),
        None => vec![0.0; n],
    };
    // Each part's slice of g, back-propagated through that part's graph on
    // the thread pool; parts without values add nothing.
    let mut offset = 0;
    let jobs: Vec<(Tensor<B, 1>, Vec<f32>, Llama<B>)> = parts
        .into_iter()
        .map(|(values, host, leaves)| {
            let slice = g[offset..offset + host.len()].to_vec();
            offset += host.len();
            (values, slice, leaves)
        })
        .collect();
    let mut results: Vec<Option<GradientsParams>> = jobs.iter().map(|_| None).collect();
    rayon::scope(|scope| {
        for ((values, slice, leaves), slot) in jobs.into_iter().zip(results.iter_mut()) {
            scope.spawn(move |_| {
                if slice.is_empty() {
                    return;
                }
                let k = slice.len();
                let g = Tensor::<B, 1>::from_data(TensorData::new(slice, [k]), &values.device());
                let grads = values.mul(g).sum().backward();
                *slot = Some(GradientsParams::from_grads(grads, &leaves));
            });
        }
    });
    // A part without values adds nothing (but keeps its place: part i is
    // device i's under StepDevices).
    let grads = sum_grads(
        model,
        results.into_iter().map(Option::unwrap_or_default).collect(),
    );
    (value, grads, by_product)
}
