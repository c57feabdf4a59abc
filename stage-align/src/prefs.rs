//! Preference data: TRL-style JSONL of pairs (`prompt`, `chosen`, `rejected`)
//! or labelled replies (`prompt`, `completion`, `label`), with `file:line` errors.

use std::path::{Path, PathBuf};

use baton_core::chat::{Message, Role};
use baton_core::conversations::ConversationError;
use baton_core::tasks::Task;
use serde_json::Value;

/// A prompt with a preferred and a dispreferred assistant reply.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    pub prompt: Vec<Message>,
    pub chosen: String,
    pub rejected: String,
    /// The verifiable task behind the prompt, when known.
    pub task: Option<Task>,
}

/// A prompt with one reply labelled desirable or not (KTO's data).
#[derive(Clone, Debug, PartialEq)]
pub struct Labelled {
    pub prompt: Vec<Message>,
    pub completion: String,
    pub desirable: bool,
}

/// What a preference file held.
#[derive(Debug, Default)]
pub struct Preferences {
    pub pairs: Vec<Pair>,
    pub labelled: Vec<Labelled>,
    /// Pairs whose chosen equals rejected: counted and left out.
    pub identical: usize,
}

/// Reads preference JSONL with TRL's field names: `{"prompt", "chosen",
/// "rejected"}` or `{"prompt", "completion", "label"}`. The prompt is a string
/// or a list of messages; a reply is a string or a list of messages whose last
/// assistant message is the reply. Errors name `file:line`.
pub fn read_preferences(path: &Path) -> Result<Preferences, ConversationError> {
    let bytes =
        baton_core::files::read_bounded(path, "preference JSONL", baton_core::files::cap::TEXT)
            .map_err(|e| ConversationError::Read {
                path: path.to_path_buf(),
                reason: e.reason,
            })?;
    parse_preferences(&bytes, path)
}

/// Parses preference JSONL held in memory; `path` names it in errors.
pub fn parse_preferences(bytes: &[u8], path: &Path) -> Result<Preferences, ConversationError> {
    // A leading UTF-8 byte-order mark is dropped, as most tools do.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes).map_err(|e| ConversationError::Read {
        path: path.to_path_buf(),
        reason: format!("not UTF-8 (invalid byte at offset {})", e.valid_up_to()),
    })?;
    let mut out = Preferences::default();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| ConversationError::BadLine {
            path: PathBuf::from(path),
            line: index + 1,
            reason,
        };
        match parse_preference(line).map_err(bad)? {
            Parsed::Pair(pair) if pair.chosen == pair.rejected => out.identical += 1,
            Parsed::Pair(pair) => out.pairs.push(pair),
            Parsed::Labelled(l) => out.labelled.push(l),
        }
    }
    if out.identical > 0 {
        tracing::warn!(
            "{}: {} pairs with chosen == rejected skipped",
            path.display(),
            out.identical
        );
    }
    Ok(out)
}

enum Parsed {
    Pair(Pair),
    Labelled(Labelled),
}

fn parse_preference(line: &str) -> Result<Parsed, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let object = value.as_object().ok_or("expected a JSON object per line")?;
    let prompt = match object.get("prompt") {
        None => return Err("missing field \"prompt\"".into()),
        Some(Value::String(s)) => vec![Message::new(Role::User, s.clone())],
        Some(Value::Array(_)) => {
            serde_json::from_value::<Vec<Message>>(object["prompt"].clone())
                .map_err(|e| format!("\"prompt\" is not a list of messages: {e}"))?
        }
        Some(_) => return Err("\"prompt\" must be a string or a list of messages".into()),
    };
    if prompt.is_empty() {
        return Err("\"prompt\" is empty".into());
    }
    let reply = |field: &str| -> Result<String, String> {
        let text = match object.get(field) {
            None => return Err(format!("missing field \"{field}\"")),
            Some(Value::String(s)) => s.clone(),
            Some(v @ Value::Array(_)) => {
                let messages: Vec<Message> = serde_json::from_value(v.clone())
                    .map_err(|e| format!("\"{field}\" is not a list of messages: {e}"))?;
                messages
                    .into_iter()
                    .rev()
                    .find(|m| m.role == Role::Assistant)
                    .map(|m| m.content)
                    .ok_or_else(|| format!("\"{field}\" has no assistant message"))?
            }
            Some(_) => return Err(format!("\"{field}\" must be a string or messages")),
        };
        if text.trim().is_empty() {
            return Err(format!("\"{field}\" is empty"));
        }
        Ok(text)
    };
    if object.contains_key("label") || object.contains_key("completion") {
        let desirable = object
            .get("label")
            .ok_or("missing field \"label\"")?
            .as_bool()
            .ok_or("\"label\" must be true or false")?;
        return Ok(Parsed::Labelled(Labelled {
            prompt,
            completion: reply("completion")?,
            desirable,
        }));
    }
    let task = match (object.get("family"), object.get("answer")) {
        (Some(Value::String(f)), Some(Value::String(a))) => baton_core::tasks::Family::from_name(f)
            .map(|family| Task {
                family,
                prompt: prompt
                    .iter()
                    .rev()
                    .find(|m| m.role == Role::User)
                    .map(|m| m.content.clone())
                    .unwrap_or_default(),
                answer: a.clone(),
            }),
        _ => None,
    };
    Ok(Parsed::Pair(Pair {
        prompt,
        chosen: reply("chosen")?,
        rejected: reply("rejected")?,
        task,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preference_lines_parse_or_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(
            &path,
            concat!(
                r#"{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}"#,
                "\n",
                r#"{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}], "rejected": "Go away"}"#,
                "\n\n",
                r#"{"prompt": "x", "chosen": "same", "rejected": "same"}"#,
                "\n",
                r#"{"prompt": "x", "completion": "y", "label": false}"#,
                "\n"
            ),
        )
        .unwrap();
        let p = read_preferences(&path).unwrap();
        assert_eq!(p.pairs.len(), 2);
        assert_eq!(p.pairs[1].chosen, "Hello");
        assert_eq!(p.identical, 1);
        assert_eq!(p.labelled.len(), 1);
        assert!(!p.labelled[0].desirable);
        for (line, want) in [
            (
                r#"{"prompt": "x", "chosen": "a"}"#,
                "missing field \"rejected\"",
            ),
            (
                r#"{"prompt": "x", "chosen": " ", "rejected": "b"}"#,
                "\"chosen\" is empty",
            ),
            (
                r#"{"chosen": "a", "rejected": "b"}"#,
                "missing field \"prompt\"",
            ),
            (
                r#"{"prompt": "x", "completion": "y"}"#,
                "missing field \"label\"",
            ),
            ("{oops", "invalid JSON"),
        ] {
            std::fs::write(
                &path,
                format!(
                    "{}\n{line}\n",
                    r#"{"prompt":"a","chosen":"b","rejected":"c"}"#
                ),
            )
            .unwrap();
            let err = read_preferences(&path).unwrap_err().to_string();
            assert!(
                err.contains("p.jsonl:2:") && err.contains(want),
                "{line}: {err}"
            );
        }
    }

    #[test]
    fn random_and_mutated_preference_files_never_panic_or_allocate_beyond_a_bound() {
        let valid = concat!(
            r#"{"prompt":"q","chosen":"a","rejected":"b"}"#,
            "\n",
            r#"{"prompt":[{"role":"user","content":"q"}],"completion":"a","label":true}"#,
            "\n"
        );
        baton_core::alloc_probe::check_reader(valid.as_bytes(), 2000, 1 << 20, |file, _| {
            read_preferences(file).map(drop).map_err(|e| e.to_string())
        });
    }
}

#[cfg(test)]
#[global_allocator]
static PROBE: baton_core::alloc_probe::Probe = baton_core::alloc_probe::Probe;
