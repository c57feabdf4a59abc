//! Models in and out: Hugging Face directories (`hf`) and llama.cpp GGUF
//! files (`gguf`), each to or from a Baton checkpoint.

pub mod gguf;
pub mod gguf_export;
pub mod hf;

use baton_core::checkpoint::StageKind;
use baton_core::model::ModelConfig;
use baton_core::train::TrainConfig;

/// What an import writes: a `pretrain` checkpoint (an imported model stands
/// where a pretrained one would), from no parent.
pub const IMPORT_KIND: StageKind = StageKind {
    name: "pretrain",
    accepts: &[],
};

/// The `[train]` an imported checkpoint records (what its children inherit):
/// the defaults, with the context no longer than the model's.
pub fn import_train_config(model: &ModelConfig) -> TrainConfig {
    TrainConfig {
        seq_len: TrainConfig::default().seq_len.min(model.max_seq_len),
        ..Default::default()
    }
}
