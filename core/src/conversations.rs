//! Instruction data: JSONL files of conversations in the three formats people
//! have on disk, read into one shape.
//!
//! - `{"messages": [{"role", "content"}, …]}`
//! - TRL `{"prompt", "completion"}` (strings, or lists of messages)
//! - alpaca `{"instruction", "input", "output"}`
//!
//! Extra fields are ignored, except `family`/`answer` written by `baton data
//! tasks`, which are kept so held-out sets can be checked.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::chat::{Message, Role};
use crate::tasks::{Family, Task};

#[derive(Debug, thiserror::Error)]
pub enum ConversationError {
    #[error("{path}: cannot read: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}:{line}: {reason}")]
    BadLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// One conversation, and the verifiable task it came from (if any).
#[derive(Clone, Debug, PartialEq)]
pub struct Conversation {
    pub messages: Vec<Message>,
    pub task: Option<Task>,
}

impl Conversation {
    /// A generated task as a conversation (its prompt and answer).
    pub fn of_task(task: &Task) -> Self {
        Self {
            messages: task.messages(),
            task: Some(task.clone()),
        }
    }
}

/// Conversations of a file and the number of malformed lines skipped.
pub struct Loaded {
    pub conversations: Vec<Conversation>,
    pub skipped: usize,
}

/// Reads a JSONL file. A malformed line is an error naming `file:line`, or is
/// skipped and counted when `skip_bad_lines`. Blank lines are ignored.
pub fn read_jsonl(path: &Path, skip_bad_lines: bool) -> Result<Loaded, ConversationError> {
    // Regular files only, size-capped; a leading byte-order mark is dropped.
    let text = crate::files::read_text(path, "JSONL", crate::files::cap::TEXT).map_err(|e| {
        ConversationError::Read {
            path: path.to_path_buf(),
            reason: e.reason,
        }
    })?;
    let mut conversations = Vec::new();
    let mut skipped = 0;
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line) {
            Ok(c) => conversations.push(c),
            Err(_) if skip_bad_lines => skipped += 1,
            Err(reason) => {
                return Err(ConversationError::BadLine {
                    path: path.to_path_buf(),
                    line: index + 1,
                    reason,
                });
            }
        }
    }
    Ok(Loaded {
        conversations,
        skipped,
    })
}

/// Parses one JSONL line in any of the three formats.
pub(crate) fn parse_line(line: &str) -> Result<Conversation, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let object = value.as_object().ok_or("expected a JSON object")?;
    let messages = if let Some(messages) = object.get("messages") {
        parse_messages(messages, "messages")?
    } else if object.contains_key("prompt") || object.contains_key("completion") {
        let prompt = object.get("prompt").ok_or("missing field `prompt`")?;
        let completion = object
            .get("completion")
            .ok_or("missing field `completion`")?;
        let mut messages = match prompt {
            Value::String(s) => vec![Message::new(Role::User, s.clone())],
            other => parse_messages(other, "prompt")?,
        };
        match completion {
            Value::String(s) => messages.push(Message::new(Role::Assistant, s.clone())),
            other => messages.extend(parse_messages(other, "completion")?),
        }
        messages
    } else if object.contains_key("instruction") || object.contains_key("output") {
        let field = |name: &str| -> Result<String, String> {
            match object.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(format!("field `{name}` must be a string")),
                None => Err(format!("missing field `{name}`")),
            }
        };
        let instruction = field("instruction")?;
        let input = match object.get("input") {
            None | Some(Value::Null) => String::new(),
            Some(_) => field("input")?,
        };
        let user = if input.trim().is_empty() {
            instruction
        } else {
            format!("{instruction}\n\n{input}")
        };
        vec![
            Message::new(Role::User, user),
            Message::new(Role::Assistant, field("output")?),
        ]
    } else {
        return Err(
            "expected `messages`, `prompt`/`completion` or `instruction`/`output` fields".into(),
        );
    };
    if !messages.iter().any(|m| m.role == Role::Assistant) {
        return Err("conversation has no assistant turn".into());
    }
    if messages
        .iter()
        .any(|m| m.role == Role::Assistant && m.content.trim().is_empty())
    {
        return Err("empty assistant reply".into());
    }
    let task = match (object.get("family"), object.get("answer")) {
        (Some(Value::String(family)), Some(Value::String(answer))) => {
            let family = Family::from_name(family)
                .ok_or_else(|| format!("unknown task family `{family}`"))?;
            let prompt = messages
                .iter()
                .find(|m| m.role == Role::User)
                .map(|m| m.content.clone())
                .unwrap_or_default();
            Some(Task {
                family,
                prompt,
                answer: answer.clone(),
            })
        }
        _ => None,
    };
    Ok(Conversation { messages, task })
}

fn parse_messages(value: &Value, field: &str) -> Result<Vec<Message>, String> {
    let list = value
        .as_array()
        .ok_or_else(|| format!("field `{field}` must be a string or a list of messages"))?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{field}[{i}]: missing string field `role`"))?;
            let content = m
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{field}[{i}]: missing string field `content`"))?;
            let role = match role {
                "system" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => return Err(format!("{field}[{i}]: unknown role `{other}`")),
            };
            Ok(Message::new(role, content))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_formats_read_into_one_shape() {
        let messages = parse_line(
            r#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":"u"},{"role":"assistant","content":"a"}]}"#,
        )
        .unwrap();
        assert_eq!(messages.messages.len(), 3);
        let trl = parse_line(r#"{"prompt":"u","completion":"a"}"#).unwrap();
        assert_eq!(
            trl.messages,
            vec![
                Message::new(Role::User, "u"),
                Message::new(Role::Assistant, "a")
            ]
        );
        let trl_chat = parse_line(
            r#"{"prompt":[{"role":"user","content":"u"}],"completion":[{"role":"assistant","content":"a"}]}"#,
        )
        .unwrap();
        assert_eq!(trl_chat.messages, trl.messages);
        let alpaca = parse_line(r#"{"instruction":"do","input":"this","output":"done"}"#).unwrap();
        assert_eq!(alpaca.messages[0].content, "do\n\nthis");
        assert_eq!(alpaca.messages[1], Message::new(Role::Assistant, "done"));
        let task = parse_line(
            r#"{"messages":[{"role":"user","content":"What is 1 + 2?"},{"role":"assistant","content":"3"}],"family":"add","answer":"3"}"#,
        )
        .unwrap();
        assert_eq!(task.task.unwrap().family, Family::Add);
    }

    #[test]
    fn malformed_lines_name_file_and_line_or_are_skipped() {
        for (line, reason) in [
            ("{not json", "invalid JSON"),
            (
                r#"{"messages":[{"role":"user","content":"hi"}]}"#,
                "no assistant turn",
            ),
            (r#"{"prompt":"hi"}"#, "missing field `completion`"),
            (r#"{"text":"hi"}"#, "expected `messages`"),
            (
                r#"{"messages":[{"role":"robot","content":"x"}]}"#,
                "unknown role `robot`",
            ),
        ] {
            let err = parse_line(line).unwrap_err();
            assert!(err.contains(reason), "{line}: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, "{\"prompt\":\"a\",\"completion\":\"b\"}\n\n{oops\n").unwrap();
        let err = read_jsonl(&path, false).err().unwrap().to_string();
        assert!(err.contains("d.jsonl:3: invalid JSON"), "{err}");
        let loaded = read_jsonl(&path, true).unwrap();
        assert_eq!((loaded.conversations.len(), loaded.skipped), (1, 1));
    }

    #[test]
    fn random_and_mutated_jsonl_never_panics_or_allocates_beyond_a_bound() {
        let valid = concat!(
            r#"{"messages":[{"role":"user","content":"What is 2 + 2?"},{"role":"assistant","content":"4"}]}"#,
            "\n",
            r#"{"prompt":"Reverse: a b","completion":"b a"}"#,
            "\n",
            r#"{"instruction":"Say hi","input":"","output":"hi","family":"echo","answer":"hi"}"#,
            "\n"
        );
        crate::alloc_probe::check_reader(valid.as_bytes(), 2000, 1 << 20, |file, i| {
            read_jsonl(file, i % 2 == 0)
                .map(drop)
                .map_err(|e| e.to_string())
        });
    }
}
