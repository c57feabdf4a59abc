//! The one file that names a concrete backend.
//!
//! Features are additive; when several are on, the precedence is
//! `cuda` > `wgpu` > `flex` > `ndarray`. Everything else in Baton is generic over
//! `B: Backend` / `B: AutodiffBackend` and only binaries and test harnesses use
//! the aliases below.

use burn::backend::Autodiff;

use crate::error::DeviceError;

#[cfg(feature = "cuda")]
mod chosen {
    pub type Inner = burn::backend::Cuda<f32, i32>;
    pub const NAME: &str = "cuda";
    /// GPU `LOCAL_RANK` under a launcher (one GPU per process, as
    /// torchrun's users expect), else GPU 0.
    pub fn device() -> burn::backend::cuda::CudaDevice {
        let index = crate::dist::World::from_env()
            .ok()
            .flatten()
            .map_or(0, |world| world.local_rank);
        device_at(index)
    }
    pub fn device_at(index: usize) -> burn::backend::cuda::CudaDevice {
        burn::backend::cuda::CudaDevice::new(index)
    }
}

#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
mod chosen {
    pub type Inner = burn::backend::Wgpu<f32, i32>;
    pub const NAME: &str = "wgpu";
    pub fn device() -> burn::backend::wgpu::WgpuDevice {
        burn::backend::wgpu::WgpuDevice::default()
    }
}

#[cfg(all(feature = "flex", not(any(feature = "cuda", feature = "wgpu"))))]
mod chosen {
    pub type Inner = burn::backend::Flex;
    pub const NAME: &str = "flex";
    pub fn device() -> burn::backend::flex::FlexDevice {
        burn::backend::flex::FlexDevice
    }
}

#[cfg(all(
    feature = "ndarray",
    not(any(feature = "cuda", feature = "wgpu", feature = "flex"))
))]
mod chosen {
    pub type Inner = burn::backend::NdArray<f32, i32>;
    pub const NAME: &str = "ndarray";
    pub fn device() -> burn::backend::ndarray::NdArrayDevice {
        burn::backend::ndarray::NdArrayDevice::Cpu
    }
}

#[cfg(not(any(
    feature = "cuda",
    feature = "wgpu",
    feature = "flex",
    feature = "ndarray"
)))]
compile_error!("enable one backend feature: flex (default), ndarray, wgpu or cuda");

/// The non-autodiff backend: inference, evaluation, reference models.
pub type Inner = chosen::Inner;
/// The training backend.
pub type Train = Autodiff<Inner>;
/// Device type of the chosen backend.
pub type Device = <Inner as burn::tensor::backend::BackendTypes>::Device;
/// Human-readable name of the compiled-in backend (`flex`, `ndarray`, `wgpu`, `cuda`).
pub const NAME: &str = chosen::NAME;

/// Whether `B` is one of the cubecl GPU backends (`cuda`, `wgpu`): they want
/// whole matmuls, compile kernels on first use, and gain nothing from
/// splitting a micro-batch between threads.
/// Decided by type (the compiled-in GPU backend, or it under autodiff).
pub fn is_gpu<B: burn::tensor::backend::Backend>() -> bool {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        let id = std::any::TypeId::of::<B>();
        id == std::any::TypeId::of::<Inner>() || id == std::any::TypeId::of::<Train>()
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        false
    }
}

/// The default device of the compiled-in backend, checked to be usable.
///
/// GPU backends panic deep inside their runtime when no device or driver is
/// present; this turns that into an error a user can read.
pub fn device() -> Result<Device, DeviceError> {
    device_with_float(burn::tensor::FloatDType::F32)
}

/// [`device`], with `float` as the element type of every float tensor created
/// on it (parameters, activations, optimizer state): `BF16` trains in pure
/// bfloat16 on a GPU backend. Must be called before any tensor exists on the
/// device; a backend without that type is an error.
#[allow(clippy::clone_on_copy)] // Copy on flex, not on every backend
pub fn device_with_float(float: burn::tensor::FloatDType) -> Result<Device, DeviceError> {
    let device = chosen::device();
    if float != burn::tensor::FloatDType::F32 {
        use burn::tensor::{Element, IntDType, backend::BackendTypes};
        let int: IntDType = <<Inner as BackendTypes>::IntElem as Element>::dtype().into();
        burn::tensor::set_default_dtypes::<Inner>(&device, float, int).map_err(|e| {
            DeviceError(format!(
                "the {NAME} backend cannot train in {float:?}: {e:?}"
            ))
        })?;
    }
    probe(&device)?;
    Ok(device)
}

/// Checks that `device` runs a tensor operation.
#[allow(clippy::clone_on_copy)] // Copy on flex, not on every backend
fn probe(device: &Device) -> Result<(), DeviceError> {
    let probe = device.clone();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let usable = std::panic::catch_unwind(move || {
        let t = burn::tensor::Tensor::<Inner, 1>::from_floats([1.0f32, 2.0], &probe);
        t.sum().into_scalar()
    });
    std::panic::set_hook(hook);
    match usable {
        Ok(_) => Ok(()),
        Err(_) => Err(DeviceError(format!(
            "the {NAME} backend found no usable device {device:?} (is a GPU and its driver present?); \
             rebuild with the default `flex` feature to run on the CPU"
        ))),
    }
}

/// The devices a training step's rows are split among (`train.devices`),
/// GPU 0 first, each checked to be usable. More than one needs a CUDA build
/// with the `nccl` feature (Burn's `distributed`: NCCL sums the gradients)
/// and one process (not a data-parallel rank).
pub fn step_devices(count: usize) -> Result<Vec<Device>, DeviceError> {
    if count <= 1 {
        return Ok(vec![device()?]);
    }
    if !cfg!(feature = "nccl") {
        return Err(DeviceError(format!(
            "train.devices = {count} needs a CUDA build with the `nccl` feature \
             (cargo build --release --no-default-features --features nccl); this build's backend is {NAME}"
        )));
    }
    if crate::dist::World::from_env().ok().flatten().is_some() {
        return Err(DeviceError(format!(
            "train.devices = {count} splits steps among the GPUs of one process; \
             under a launcher each rank uses one GPU (set train.devices = 1)"
        )));
    }
    #[cfg(feature = "nccl")]
    {
        let devices: Vec<Device> = (0..count).map(chosen::device_at).collect();
        for device in &devices {
            probe(device)?;
        }
        Ok(devices)
    }
    #[cfg(not(feature = "nccl"))]
    unreachable!("refused above")
}
