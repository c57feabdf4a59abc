//! The `baton` tool package: what runs stages and what surrounds them.
//!
//! - [`recipe`]: recipes (ordered steps, each a stage or a checkpoint-writing
//!   tool), checked whole before the first step runs, and the run loop;
//! - [`steps`]: the registry of step kinds a recipe may name;
//! - [`interop`]: Hugging Face and GGUF models in and out;
//! - [`launch`]: a data-parallel stage on several processes, like torchrun;
//! - [`eft`]: one model or emulated fine-tuning's three, for sampling;
//! - [`merge`]: several checkpoints into one (linear, task arithmetic, TIES);
//! - [`grow`]: a bigger model from a checkpoint (masked structural growth);
//! - [`report`]: the run report, built from manifests and `metrics.jsonl`.

pub mod eft;
pub mod grow;
pub mod interop;
pub mod launch;
pub mod merge;
pub mod recipe;
pub mod report;
pub mod steps;

#[cfg(test)]
#[global_allocator]
static PROBE: baton_core::alloc_probe::Probe = baton_core::alloc_probe::Probe;
