//! Byte-level BPE with Baton's reserved special tokens.
//!
//! Trained by `pretrain` with the Hugging Face `tokenizers` crate (or loaded from
//! a `tokenizer.json`), saved in every checkpoint. Byte-level means every UTF-8
//! string round-trips exactly, which is what makes bits-per-byte well defined.

use std::collections::HashSet;
use std::path::Path;

use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder, TokenizerImpl};

/// Special tokens reserved at training time, never split, in id order.
pub const SPECIAL_TOKENS: [&str; 7] = [
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
];

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: cannot load tokenizer: {reason}")]
    Load { path: String, reason: String },
    #[error("{path}: cannot save tokenizer: {reason}")]
    Save { path: String, reason: String },
    #[error("tokenizer training failed: {0}")]
    Train(String),
    #[error("{path}: tokenizer lacks the special token {token}")]
    MissingSpecial { path: String, token: String },
    #[error("tokenizer: {0}")]
    Encode(String),
}

/// Ids of the special tokens every stage uses: document start and end
/// (pretraining), padding, and the end of a chat turn (generation stops there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    pub end: u32,
}

/// The chat format a tokenizer's special tokens define.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChatFormat {
    /// Baton's own: `<|bos|>`, then `<|role|>` text `<|end|>` per message.
    Baton,
    /// ChatML, as imported models (SmolLM2, Qwen, …) carry it:
    /// `<|im_start|>role\n` text `<|im_end|>`, messages separated by `\n`.
    ChatMl,
}

impl ChatFormat {
    pub fn name(self) -> &'static str {
        match self {
            ChatFormat::Baton => "baton-chat",
            ChatFormat::ChatMl => "chatml",
        }
    }
}

/// A chat format as token ids: what the renderer writes around messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatTokens {
    pub format: ChatFormat,
    /// Written once before the first message.
    pub start: Option<u32>,
    /// The header of a system, user and assistant message.
    pub headers: [Vec<u32>; 3],
    /// Written between two messages.
    pub separator: Vec<u32>,
}

/// The token strings of the special ids, for exported tokenizer configs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialNames {
    pub bos: String,
    pub eos: String,
    pub pad: String,
    pub end: String,
}

/// A loaded tokenizer, the ids of its special tokens and its chat format.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub special: SpecialIds,
    pub chat: ChatTokens,
}

impl Tokenizer {
    /// Trains byte-level BPE on `texts` with at most `vocab_size` entries
    /// (special tokens included).
    pub fn train<'a>(
        texts: impl Iterator<Item = &'a str> + Send,
        vocab_size: usize,
    ) -> Result<Self, TokenizerError> {
        Self::train_with_specials(texts, vocab_size, &SPECIAL_TOKENS)
    }

    /// Trains with another set of special tokens (first ids, in order) — e.g.
    /// ChatML's, to exercise the ChatML format.
    pub fn train_with_specials<'a>(
        texts: impl Iterator<Item = &'a str> + Send,
        vocab_size: usize,
        special_tokens: &[&str],
    ) -> Result<Self, TokenizerError> {
        let specials: Vec<AddedToken> = special_tokens
            .iter()
            .map(|t| AddedToken::from(*t, true))
            .collect();
        let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        let mut trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(2)
            .special_tokens(specials)
            .initial_alphabet(alphabet)
            .build();
        let byte_level = ByteLevel::new(false, false, true);
        let mut tokenizer: TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel> =
            TokenizerBuilder::new()
                .with_model(BPE::default())
                .with_normalizer(None)
                .with_pre_tokenizer(Some(byte_level))
                .with_post_processor(Some(byte_level))
                .with_decoder(Some(byte_level))
                .build()
                .map_err(|e| TokenizerError::Train(e.to_string()))?;
        tokenizer
            .train(&mut trainer, texts)
            .map_err(|e| TokenizerError::Train(e.to_string()))?;
        Self::from_inner(tokenizer.into(), "<trained>")
    }

    pub fn load(path: &Path) -> Result<Self, TokenizerError> {
        let json = crate::files::read_text(path, "tokenizer", crate::files::cap::TOKENIZER)
            .map_err(|e| TokenizerError::Load {
                path: path.display().to_string(),
                reason: e.reason,
            })?;
        Self::from_json(&json, &path.display().to_string())
    }

    /// A tokenizer from `tokenizer.json` text (as built by a GGUF import).
    pub fn from_json(json: &str, origin: &str) -> Result<Self, TokenizerError> {
        let inner: tokenizers::Tokenizer =
            json.parse()
                .map_err(|e: tokenizers::Error| TokenizerError::Load {
                    path: origin.to_string(),
                    reason: e.to_string(),
                })?;
        Self::from_inner(inner, origin)
    }

    /// Finds the chat format by the special tokens present: Baton's reserved
    /// set, else ChatML's `<|im_start|>`/`<|im_end|>`; neither is an error that
    /// names the first of Baton's tokens missing.
    fn from_inner(inner: tokenizers::Tokenizer, origin: &str) -> Result<Self, TokenizerError> {
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::MissingSpecial {
                    path: origin.to_string(),
                    token: token.to_string(),
                })
        };
        let encode = |text: &str| -> Result<Vec<u32>, TokenizerError> {
            inner
                .encode_fast(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizerError::Encode(e.to_string()))
        };
        let baton: Result<Vec<u32>, _> = SPECIAL_TOKENS.iter().map(|t| id(t)).collect();
        let (special, chat) = match baton {
            Ok(ids) => (
                SpecialIds {
                    bos: ids[0],
                    eos: ids[1],
                    pad: ids[2],
                    end: ids[6],
                },
                ChatTokens {
                    format: ChatFormat::Baton,
                    start: Some(ids[0]),
                    headers: [vec![ids[3]], vec![ids[4]], vec![ids[5]]],
                    separator: Vec::new(),
                },
            ),
            Err(missing) => {
                let (Some(im_start), Some(im_end)) = (
                    inner.token_to_id("<|im_start|>"),
                    inner.token_to_id("<|im_end|>"),
                ) else {
                    return Err(match missing {
                        TokenizerError::MissingSpecial { path, token } => {
                            TokenizerError::MissingSpecial {
                                path,
                                token: format!(
                                    "{token} (and has not ChatML's <|im_start|> and <|im_end|> either)"
                                ),
                            }
                        }
                        other => other,
                    });
                };
                // Documents are delimited by <|endoftext|> where the model has it.
                let doc = inner.token_to_id("<|endoftext|>").unwrap_or(im_end);
                let header = |role: &str| -> Result<Vec<u32>, TokenizerError> {
                    let mut ids = vec![im_start];
                    ids.extend(encode(&format!("{role}\n"))?);
                    Ok(ids)
                };
                (
                    SpecialIds {
                        bos: doc,
                        eos: doc,
                        pad: doc,
                        end: im_end,
                    },
                    ChatTokens {
                        format: ChatFormat::ChatMl,
                        start: None,
                        headers: [header("system")?, header("user")?, header("assistant")?],
                        separator: encode("\n")?,
                    },
                )
            }
        };
        Ok(Self {
            inner,
            special,
            chat,
        })
    }

    /// The tokenizer as `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String, TokenizerError> {
        self.inner
            .to_string(false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// The strings of the special ids.
    pub fn special_names(&self) -> SpecialNames {
        let name = |id: u32| self.inner.id_to_token(id).unwrap_or_default();
        SpecialNames {
            bos: name(self.special.bos),
            eos: name(self.special.eos),
            pad: name(self.special.pad),
            end: name(self.special.end),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        self.inner
            .save(path, false)
            .map_err(|e| TokenizerError::Save {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
    }

    /// Entries in the vocabulary, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of plain text (special-token strings in it are *not* given
    /// their reserved ids' meaning beyond what the vocabulary does).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Encodes a long text by lines in parallel; the concatenated ids decode back
    /// to exactly `text` (the byte-level pre-tokenizer never merges across `\n`).
    pub fn encode_long(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let chunks: Vec<&str> = text.split_inclusive('\n').collect();
        let encodings = self
            .inner
            .encode_batch_fast(chunks, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encodings
            .iter()
            .flat_map(|e| e.get_ids().iter().copied())
            .collect())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Text of one token (for streaming output), special tokens included.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trained_tokenizer_round_trips_and_reserves_specials() {
        let text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind\n";
        let corpus: Vec<&str> = std::iter::repeat_n(text, 20).collect();
        let tok = Tokenizer::train(corpus.into_iter(), 300).unwrap();
        assert!(tok.vocab_size() <= 300);
        assert_ne!(tok.special.pad, tok.special.eos);
        let ids = tok.encode_long(text).unwrap();
        assert!(ids.len() < text.len(), "BPE should merge bytes");
        assert_eq!(tok.decode(&ids).unwrap(), text);
        // A special token string in text is one token.
        let ids = tok.encode("<|end|>").unwrap();
        assert_eq!(ids, vec![tok.special.end]);
        // Non-ASCII text round-trips byte-exactly.
        let odd = "naïve café — 東京\n";
        assert_eq!(tok.decode(&tok.encode_long(odd).unwrap()).unwrap(), odd);
    }
}
