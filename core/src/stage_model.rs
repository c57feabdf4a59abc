//! What a stage that continues a checkpoint trains when LoRA is in play: a
//! fresh adapter on the parent, the parent's own adapter, or the merged
//! model (`--merge-adapter`).

use burn::tensor::backend::Backend;

use crate::checkpoint::{AdapterRef, Checkpoint};
use crate::lora::{LoraConfig, attach};
use crate::model::Llama;

/// The model a stage that continues `parent` trains, given the adapter
/// [`plan`] chose (`None`: full weights):
///
/// - a parent holding an adapter: its base with the adapter kept apart, to
///   train on; with `--merge-adapter` (planned `None`), the merged model;
/// - a parent with full weights: with a planned adapter, fresh adapters of
///   `seed` on it (the parent is the adapter's base); without, the parent.
pub fn stage_model<B: Backend>(
    parent: &Checkpoint,
    planned: Option<&AdapterRef>,
    seed: u64,
    device: &B::Device,
) -> anyhow::Result<Llama<B>> {
    Ok(match (&parent.manifest.adapter, planned) {
        (Some(_), Some(_)) => parent.model_with_adapter(device)?,
        (None, Some(adapter)) => attach(parent.model(device)?, &adapter.spec(), seed, device),
        (_, None) => parent.model(device)?,
    })
}

/// The adapter a stage continuing `parent` will train (see [`stage_model`]),
/// checked without loading any weights; the errors name the setting.
pub fn plan(
    parent: &Checkpoint,
    lora: &LoraConfig,
    merge_adapter: bool,
) -> anyhow::Result<Option<AdapterRef>> {
    let dir = parent.dir.display();
    let spec = lora
        .spec(&parent.manifest.model)
        .map_err(anyhow::Error::msg)?;
    match (&parent.manifest.adapter, spec) {
        (Some(_), Some(_)) if merge_adapter => anyhow::bail!(
            "--merge-adapter with [lora]: the merged model of {dir} exists nowhere on disk to be a new adapter's base; merge first (sft --merge-adapter without [lora]), then add an adapter"
        ),
        (Some(_), None) if merge_adapter => Ok(None),
        (Some(held), spec) => {
            if let Some(spec) = spec
                && spec != held.spec()
            {
                anyhow::bail!(
                    "[lora] asks for rank {} alpha {} on {:?}, but {dir} holds an adapter of rank {} alpha {} on {:?}; a child stage keeps training that adapter (leave [lora] out) or merges it (--merge-adapter)",
                    spec.rank,
                    spec.alpha,
                    spec.targets,
                    held.rank,
                    held.alpha,
                    held.targets
                );
            }
            parent.adapter_base()?;
            Ok(Some(held.clone()))
        }
        (None, _) if merge_adapter => {
            anyhow::bail!("--merge-adapter: {dir} holds no LoRA adapter to merge")
        }
        (None, Some(spec)) => Ok(Some(parent.as_adapter_base(&spec))),
        (None, None) => Ok(None),
    }
}
