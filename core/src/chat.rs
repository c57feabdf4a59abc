//! The one chat renderer: messages → `(ids, loss_mask)` with the reserved
//! special tokens. Used by SFT training, evaluation, alignment and `baton chat`.
//!
//! Template `baton-chat` v1:
//!
//! ```text
//! <|bos|> ( <|system|> text <|end|> | <|user|> text <|end|> | <|assistant|> text <|end|> )*
//! ```
//!
//! Only assistant text and the `<|end|>` after it carry loss; a prompt for
//! generation ends with `<|assistant|>` and the model stops at `<|end|>`. Each
//! message's text is tokenised on its own, so rendering a prompt and then a
//! reply gives exactly the ids of rendering the whole conversation.

use serde::{Deserialize, Serialize};

use crate::checkpoint::ChatTemplate;
use crate::tokenizer::{Tokenizer, TokenizerError};

pub const TEMPLATE_NAME: &str = "baton-chat";
pub const TEMPLATE_VERSION: u32 = 1;

pub fn template() -> ChatTemplate {
    ChatTemplate {
        name: TEMPLATE_NAME.to_string(),
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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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

    fn role_id(&self, role: Role) -> u32 {
        let s = &self.tokenizer.special;
        match role {
            Role::System => s.system,
            Role::User => s.user,
            Role::Assistant => s.assistant,
        }
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
        out.push(self.tokenizer.special.bos, false);
        for (i, message) in messages.iter().enumerate() {
            let supervised = message.role == Role::Assistant
                && (supervise == Supervise::AllAssistant || i == last_assistant);
            out.push(self.role_id(message.role), false);
            out.extend(&self.tokenizer.encode(&message.content)?, supervised);
            out.push(self.tokenizer.special.end, supervised);
        }
        Ok(out)
    }

    /// A generation prompt: the conversation so far, then `<|assistant|>`.
    pub fn render_prompt(&self, messages: &[Message]) -> Result<Vec<u32>, ChatError> {
        let mut out = Rendered::default();
        out.push(self.tokenizer.special.bos, false);
        for message in messages {
            out.push(self.role_id(message.role), false);
            out.extend(&self.tokenizer.encode(&message.content)?, false);
            out.push(self.tokenizer.special.end, false);
        }
        out.push(self.tokenizer.special.assistant, false);
        Ok(out.ids)
    }

    /// The ids that follow a prompt for `reply`: its text and `<|end|>`, all supervised.
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
    use crate::tokenizer::Tokenizer;

    fn tokenizer() -> Tokenizer {
        let text = "What is 12 + 30? The answer is 42.\nReverse the letters: a b c\nc b a\n";
        Tokenizer::train(std::iter::repeat_n(text, 30), 300).unwrap()
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
        let tok = tokenizer();
        let r = ChatRenderer::new(&tok);
        let s = tok.special;
        assert_ne!(s.pad, s.eos, "pad never equals eos");
        for turns in 1..5 {
            for system in [false, true] {
                let msgs = conversation(turns, system);
                for supervise in [Supervise::AllAssistant, Supervise::LastAssistant] {
                    let out = r.render(&msgs, supervise).unwrap();
                    assert_eq!(out.ids.len(), out.loss_mask.len());
                    // Exactly one BOS, first.
                    assert_eq!(out.ids[0], s.bos);
                    assert_eq!(out.ids.iter().filter(|&&i| i == s.bos).count(), 1);
                    // Every supervised assistant turn ends with a supervised <|end|>;
                    // nothing outside assistant turns is supervised.
                    let mut in_assistant = false;
                    let mut supervised_ends = 0;
                    for (i, (&id, &m)) in out.ids.iter().zip(&out.loss_mask).enumerate() {
                        if id == s.assistant {
                            in_assistant = true;
                            assert!(!m, "role token is not supervised");
                        } else if id == s.user || id == s.system || id == s.bos {
                            assert!(!m);
                        } else if id == s.end {
                            if in_assistant && m {
                                supervised_ends += 1;
                            }
                            if !in_assistant {
                                assert!(!m, "user/system <|end|> at {i} is not supervised");
                            }
                            in_assistant = false;
                        } else {
                            assert!(!m || in_assistant, "only assistant text carries loss");
                        }
                    }
                    let expected = match supervise {
                        Supervise::AllAssistant => turns,
                        Supervise::LastAssistant => 1,
                    };
                    assert_eq!(supervised_ends, expected);

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

    #[test]
    fn a_conversation_without_an_assistant_turn_is_refused() {
        let tok = tokenizer();
        let r = ChatRenderer::new(&tok);
        let msgs = vec![Message::new(Role::User, "hi")];
        assert!(matches!(
            r.render(&msgs, Supervise::AllAssistant),
            Err(ChatError::NoAssistant)
        ));
        let reply = r.render_reply("42").unwrap();
        assert_eq!(r.decode_reply(&reply.ids).unwrap(), "42");
    }
}
