//! Several GPUs in one process (`train.devices`): the gradients of a
//! micro-batch's row parts, one part per device, summed by NCCL through
//! Burn's `distributed` feature (the `nccl` build feature).
//!
//! Burn's NCCL communicators are created inside the process (cubecl keeps
//! their unique ids in a process-wide map), so this path is one process
//! driving every GPU; across processes and machines gradients go through
//! [`super::sync::Collective`].

use std::any::{Any, TypeId};

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::distributed::{DistributedBackend, ReduceOperation};
use burn::tensor::backend::{AutodiffBackend, Backend, DeviceId, DeviceOps};
use burn::tensor::{Tensor, TensorPrimitive};

use super::sync::{gather, scatter};
use crate::backend::Inner;

/// Whether `B` computes on the compiled-in CUDA backend, the one whose
/// all-reduce runs on NCCL.
pub fn usable<B: AutodiffBackend>() -> bool {
    TypeId::of::<B::InnerBackend>() == TypeId::of::<Inner>()
}

/// Sums `parts` (part i's gradients on `devices[i]`) onto `devices[0]`.
///
/// Every part's gradients are flattened in `model`'s parameter order into
/// one buffer on its device, and one thread per device enters the same NCCL
/// all-reduce (a collective waits for all of its devices). The first
/// device's sum is returned; `B` must be [`usable`].
pub fn sum_on_first<B: AutodiffBackend, M: AutodiffModule<B> + Sync>(
    model: &M,
    parts: Vec<GradientsParams>,
    devices: &[B::Device],
) -> GradientsParams {
    assert!(usable::<B>(), "NCCL sums need the compiled-in CUDA backend");
    assert_eq!(parts.len(), devices.len(), "one gradient part per device");
    let ids: Vec<DeviceId> = devices.iter().map(DeviceOps::id).collect();
    let summed: Vec<Option<GradientsParams>> = std::thread::scope(|scope| {
        let threads: Vec<_> = parts
            .into_iter()
            .zip(devices)
            .enumerate()
            .map(|(i, (mut grads, device))| {
                let ids = ids.clone();
                scope.spawn(move || {
                    let flat = gather(model, &mut grads, device);
                    let sizes: Vec<usize> = flat.iter().map(|t| t.dims()[0]).collect();
                    let sum = all_reduce_sum(Tensor::cat(flat, 0), ids);
                    if i > 0 {
                        return None;
                    }
                    let mut offset = 0;
                    let pieces = sizes
                        .iter()
                        .map(|&len| {
                            let piece = sum.clone().narrow(0, offset, len);
                            offset += len;
                            piece
                        })
                        .collect();
                    scatter(model, &mut grads, pieces);
                    Some(grads)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("a device's all-reduce thread panicked"))
            .collect()
    });
    summed
        .into_iter()
        .next()
        .flatten()
        .expect("the first device's sum")
}

/// NCCL's sum of `flat` over the devices `ids`, on `flat`'s device (one
/// call per device, each on its own thread).
fn all_reduce_sum<IB: Backend>(flat: Tensor<IB, 1>, ids: Vec<DeviceId>) -> Tensor<IB, 1> {
    let flat: Box<dyn Any> = Box::new(flat);
    let flat = *flat
        .downcast::<Tensor<Inner, 1>>()
        .expect("the CUDA backend (checked by usable)");
    let sum = <Inner as DistributedBackend>::all_reduce(
        flat.into_primitive().tensor(),
        ReduceOperation::Sum,
        ids,
    )
    .resolve();
    let sum: Box<dyn Any> = Box::new(Tensor::<Inner, 1>::from_primitive(TensorPrimitive::Float(
        sum,
    )));
    *sum.downcast::<Tensor<IB, 1>>().expect("the same backend")
}
