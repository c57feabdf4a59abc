//! The one chat renderer: messages → `(ids, loss_mask)` with the tokenizer's
//! special tokens. Used by SFT training, evaluation, alignment and `baton chat`.
//!
//! Template `baton-chat` v1 (models Baton trained from scratch):
//!
//! ```text
//! <|bos|> ( <|system|> text <|end|> | <|user|> text <|end|> | <|assistant|> text <|end|> )*
//! ```
//!
//! Template `chatml` v1 (imported models whose tokenizer has ChatML's tokens):
//!
//! ```text
//! <|im_start|>role\n text <|im_end|> ( \n <|im_start|>role\n text <|im_end|> )*
//! ```
//!
//! Only assistant text and the end-of-turn token after it carry loss; a prompt
//! for generation ends with the assistant header and the model stops at the
//! end-of-turn token. Each message's text is tokenised on its own, so rendering
//! a prompt and then a reply gives exactly the ids of rendering the whole
//! conversation.

use serde::{Deserialize, Serialize};

use crate::checkpoint::ChatTemplate;
use crate::tokenizer::{Tokenizer, TokenizerError};

pub const TEMPLATE_VERSION: u32 = 1;

/// The template a tokenizer's chat format renders, as the manifest records it.
pub fn template(tokenizer: &Tokenizer) -> ChatTemplate {
    ChatTemplate {
        name: tokenizer.chat.format.name().to_string(),
        version: TEMPLATE_VERSION,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// Which assistant turns carry loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Supervise {
    #[default]
    AllAssistant,
    LastAssistant,
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("conversation has no assistant turn")]
    NoAssistant,
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// Token ids and, per id, whether predicting it carries loss.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rendered {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

impl Rendered {
    fn push(&mut self, id: u32, supervised: bool) {
        self.ids.push(id);
        self.loss_mask.push(supervised);
    }

    fn extend(&mut self, ids: &[u32], supervised: bool) {
        self.ids.extend_from_slice(ids);
        self.loss_mask
            .extend(std::iter::repeat_n(supervised, ids.len()));
    }

    /// Next-token training triple `(inputs, targets, weights)`: the one-token
    /// shift, with the mask following its target.
    pub fn shifted(&self) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
        let n = self.ids.len();
        let inputs = self.ids[..n.saturating_sub(1)].to_vec();
        let targets = self.ids[1.min(n)..].to_vec();
        let weights = self.loss_mask[1.min(n)..]
            .iter()
            .map(|&m| if m { 1.0 } else { 0.0 })
            .collect();
        (inputs, targets, weights)
    }

    pub fn supervised(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m).count()
    }
}

/// Renders conversations with a tokenizer's special tokens.
pub struct ChatRenderer<'a> {
    tokenizer: &'a Tokenizer,
}

impl<'a> ChatRenderer<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self { tokenizer }
    }

    fn header(&self, role: Role) -> &[u32] {
        let headers = &self.tokenizer.chat.headers;
        match role {
            Role::System => &headers[0],
            Role::User => &headers[1],
            Role::Assistant => &headers[2],
        }
    }

    /// Start token or separator, then the message's header: all unsupervised.
    fn open(&self, out: &mut Rendered, first: bool, role: Role) {
        if first {
            if let Some(start) = self.tokenizer.chat.start {
                out.push(start, false);
            }
        } else {
            out.extend(&self.tokenizer.chat.separator, false);
        }
        out.extend(self.header(role), false);
    }

    /// The whole conversation; assistant turns supervised per `supervise`.
    pub fn render(
        &self,
        messages: &[Message],
        supervise: Supervise,
    ) -> Result<Rendered, ChatError> {
        let last_assistant = messages
            .iter()
            .rposition(|m| m.role == Role::Assistant)
            .ok_or(ChatError::NoAssistant)?;
        let mut out = Rendered::default();
        for (i, message) in messages.iter().enumerate() {
            let supervised = message.role == Role::Assistant
                && (supervise == Supervise::AllAssistant || i == last_assistant);
            self.open(&mut out, i == 0, message.role);
            out.extend(&self.tokenizer.encode(&message.content)?, supervised);
            out.push(self.tokenizer.special.end, supervised);
        }
        Ok(out)
    }

    /// A generation prompt: the conversation so far, then the assistant header.
    pub fn render_prompt(&self, messages: &[Message]) -> Result<Vec<u32>, ChatError> {
        let mut out = Rendered::default();
        for (i, message) in messages.iter().enumerate() {
            self.open(&mut out, i == 0, message.role);
            out.extend(&self.tokenizer.encode(&message.content)?, false);
            out.push(self.tokenizer.special.end, false);
        }
        self.open(&mut out, messages.is_empty(), Role::Assistant);
        Ok(out.ids)
    }

    /// The ids that follow a prompt for `reply`: its text and the end-of-turn
    /// token, all supervised.
    pub fn render_reply(&self, reply: &str) -> Result<Rendered, ChatError> {
        let mut out = Rendered::default();
        out.extend(&self.tokenizer.encode(reply)?, true);
        out.push(self.tokenizer.special.end, true);
        Ok(out)
    }

    /// Text of generated reply ids, without the end-of-turn token.
    pub fn decode_reply(&self, ids: &[u32]) -> Result<String, ChatError> {
        let end = ids
            .iter()
            .position(|&id| id == self.tokenizer.special.end)
            .unwrap_or(ids.len());
        Ok(self.tokenizer.decode(&ids[..end])?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::{ChatFormat, Tokenizer};

    const TEXT: &str = "What is 12 + 30? The answer is 42.\nReverse the letters: a b c\nc b a\n";

    /// One tokenizer per chat format: Baton's reserved tokens, and ChatML's.
    fn tokenizers() -> Vec<Tokenizer> {
        let texts = || std::iter::repeat_n(TEXT, 30);
        let chatml = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
        vec![
            Tokenizer::train(texts(), 300).unwrap(),
            Tokenizer::train_with_specials(texts(), 300, &chatml).unwrap(),
        ]
    }

    fn conversation(turns: usize, system: bool) -> Vec<Message> {
        let mut out = Vec::new();
        if system {
            out.push(Message::new(Role::System, "Be brief."));
        }
        for i in 0..turns {
            out.push(Message::new(Role::User, format!("What is {i} + 30?")));
            out.push(Message::new(Role::Assistant, format!("{}", i + 30)));
        }
        out
    }

    #[test]
    fn renderer_properties_hold_over_many_conversations() {
        let toks = tokenizers();
        assert_eq!(toks[0].chat.format, ChatFormat::Baton);
        assert_eq!(toks[1].chat.format, ChatFormat::ChatMl);
        assert_ne!(
            toks[0].special.pad, toks[0].special.eos,
            "pad never equals eos"
        );
        for tok in &toks {
            let r = ChatRenderer::new(tok);
            let s = tok.special;
            let assistant = &tok.chat.headers[2];
            for turns in 1..5 {
                for system in [false, true] {
                    let msgs = conversation(turns, system);
                    for supervise in [Supervise::AllAssistant, Supervise::LastAssistant] {
                        let out = r.render(&msgs, supervise).unwrap();
                        assert_eq!(out.ids.len(), out.loss_mask.len());
                        // At most one start token, and only first; then the first header.
                        let mut rest = &out.ids[..];
                        if let Some(start) = tok.chat.start {
                            assert_eq!(out.ids[0], start);
                            assert_eq!(out.ids.iter().filter(|&&i| i == start).count(), 1);
                            rest = &rest[1..];
                        }
                        assert!(rest.starts_with(r.header(msgs[0].role)));
                        // Supervised tokens come in runs: each right after an
                        // assistant header, ending in its only end-of-turn token.
                        let mut runs = 0;
                        let mut k = 0;
                        while k < out.ids.len() {
                            if !out.loss_mask[k] {
                                k += 1;
                                continue;
                            }
                            let begin = k;
                            while k < out.ids.len() && out.loss_mask[k] {
                                k += 1;
                            }
                            let run = &out.ids[begin..k];
                            assert!(out.ids[..begin].ends_with(assistant), "run at {begin}");
                            assert_eq!(run.last(), Some(&s.end));
                            assert_eq!(run.iter().filter(|&&i| i == s.end).count(), 1);
                            runs += 1;
                        }
                        let expected = match supervise {
                            Supervise::AllAssistant => turns,
                            Supervise::LastAssistant => 1,
                        };
                        assert_eq!(runs, expected);
                        // Every message ends with an end-of-turn token.
                        let ends = out.ids.iter().filter(|&&i| i == s.end).count();
                        assert_eq!(ends, msgs.len());

                        // Prompt-then-completion equals the whole conversation.
                        let (head, last) = msgs.split_at(msgs.len() - 1);
                        let mut joined = r.render_prompt(head).unwrap();
                        joined.extend(r.render_reply(&last[0].content).unwrap().ids);
                        assert_eq!(joined, out.ids);

                        // After the one-token shift the mask follows its target.
                        let (inputs, targets, weights) = out.shifted();
                        assert_eq!(inputs.len(), targets.len());
                        assert_eq!(targets.len(), weights.len());
                        for k in 0..targets.len() {
                            assert_eq!(inputs[k], out.ids[k]);
                            assert_eq!(targets[k], out.ids[k + 1]);
                            assert_eq!(weights[k] == 1.0, out.loss_mask[k + 1]);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn chatml_renders_as_its_text_would_tokenize() {
        let toks = tokenizers();
        let tok = &toks[1];
        let r = ChatRenderer::new(tok);
        let msgs = conversation(1, true);
        let out = r.render(&msgs, Supervise::AllAssistant).unwrap();
        let text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 0 + 30?<|im_end|>\n<|im_start|>assistant\n30<|im_end|>";
        assert_eq!(tok.decode(&out.ids).unwrap(), text);
        assert_eq!(out.ids, tok.encode(text).unwrap());
    }

    #[test]
    fn a_conversation_without_an_assistant_turn_is_refused() {
        for tok in &tokenizers() {
            let r = ChatRenderer::new(tok);
            let msgs = vec![Message::new(Role::User, "hi")];
            assert!(matches!(
                r.render(&msgs, Supervise::AllAssistant),
                Err(ChatError::NoAssistant)
            ));
            let reply = r.render_reply("42").unwrap();
            assert_eq!(r.decode_reply(&reply.ids).unwrap(), "42");
        }
    }
}
