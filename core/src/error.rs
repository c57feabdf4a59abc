//! Core's error types for failures that are not about one file: a setting out
//! of range, tensors that do not make the weights they should, a backend
//! without a usable device. (Errors about a file carry its path:
//! `files::FileError`, `checkpoint::CheckpointError`, `data::DataError`,
//! `conversations::ConversationError`, `config::ConfigError`.)

/// A setting outside what Baton accepts; the message names the key.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSetting(pub String);

/// Tensors that do not make the weights they should: missing, extra, of the
/// wrong shape or type, or bytes that are not safetensors.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct WeightsError(pub String);

/// The compiled-in backend has no usable device.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct DeviceError(pub String);

impl From<String> for InvalidSetting {
    fn from(message: String) -> Self {
        InvalidSetting(message)
    }
}

impl From<&str> for InvalidSetting {
    fn from(message: &str) -> Self {
        InvalidSetting(message.to_string())
    }
}

impl From<String> for WeightsError {
    fn from(message: String) -> Self {
        WeightsError(message)
    }
}

impl From<&str> for WeightsError {
    fn from(message: &str) -> Self {
        WeightsError(message.to_string())
    }
}
