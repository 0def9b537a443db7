//! Binds Celery's positional `args` and `kwargs` to a task's named parameters,
//! with Python-like errors for missing, extra or duplicated arguments.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::fmt;

/// Why the message's arguments do not fit the task's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgError(String);

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ArgError {}

/// Arguments bound to parameter positions; each is taken once, typed.
#[derive(Debug)]
pub struct Args {
    task: String,
    names: Vec<String>,
    slots: Vec<Option<Value>>,
}

impl Args {
    /// Binds `args` (a JSON array) and `kwargs` (a JSON object) to `names`.
    pub fn bind(task: &str, args: &str, kwargs: &str, names: &[&str]) -> Result<Args, ArgError> {
        let err = |msg: String| ArgError(format!("{task}(): {msg}"));
        let positional: Vec<Value> = match serde_json::from_str(if args.trim().is_empty() { "[]" } else { args }) {
            Ok(Value::Array(items)) => items,
            Ok(Value::Null) => Vec::new(),
            Ok(other) => return Err(err(format!("args must be a JSON array, got {}", kind(&other)))),
            Err(e) => return Err(err(format!("args are not valid JSON: {e}"))),
        };
        let keywords: Map<String, Value> = match serde_json::from_str(if kwargs.trim().is_empty() { "{}" } else { kwargs }) {
            Ok(Value::Object(map)) => map,
            Ok(Value::Null) => Map::new(),
            Ok(other) => return Err(err(format!("kwargs must be a JSON object, got {}", kind(&other)))),
            Err(e) => return Err(err(format!("kwargs are not valid JSON: {e}"))),
        };
        if positional.len() > names.len() {
            return Err(err(format!(
                "takes {} positional argument{} but {} were given",
                names.len(),
                if names.len() == 1 { "" } else { "s" },
                positional.len()
            )));
        }
        let mut slots: Vec<Option<Value>> = positional.into_iter().map(Some).collect();
        slots.resize(names.len(), None);
        for (key, value) in keywords {
            match names.iter().position(|n| *n == key) {
                Some(i) if slots[i].is_some() => {
                    return Err(err(format!("got multiple values for argument '{key}'")))
                }
                Some(i) => slots[i] = Some(value),
                None => return Err(err(format!("got an unexpected keyword argument '{key}'"))),
            }
        }
        Ok(Args { task: task.to_string(), names: names.iter().map(|s| s.to_string()).collect(), slots })
    }

    /// Decodes parameter `index`; a missing one decodes from `null`, so `Option` params are optional.
    pub fn take<T: DeserializeOwned>(&mut self, index: usize) -> Result<T, ArgError> {
        let name = &self.names[index];
        match self.slots[index].take() {
            Some(value) => serde_json::from_value(value)
                .map_err(|e| ArgError(format!("{}(): argument '{name}': {e}", self.task))),
            None => serde_json::from_value(Value::Null)
                .map_err(|_| ArgError(format!("{}(): missing required argument '{name}'", self.task))),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(args: &str, kwargs: &str) -> Result<(i64, i64), ArgError> {
        let mut a = Args::bind("tasks.add", args, kwargs, &["x", "y"])?;
        Ok((a.take(0)?, a.take(1)?))
    }

    #[test]
    fn positional_and_keyword_arguments_fill_parameters() {
        assert_eq!(bind("[2, 3]", "{}").unwrap(), (2, 3));
        assert_eq!(bind("[1]", r#"{"y": 7}"#).unwrap(), (1, 7));
        assert_eq!(bind("[]", r#"{"y": 1, "x": 9}"#).unwrap(), (9, 1));
        assert_eq!(bind("", "").unwrap_err().to_string(), "tasks.add(): missing required argument 'x'");
    }

    #[test]
    fn mismatches_read_like_python() {
        assert_eq!(
            bind("[1, 2, 3]", "{}").unwrap_err().to_string(),
            "tasks.add(): takes 2 positional arguments but 3 were given"
        );
        assert_eq!(bind("[1]", "{}").unwrap_err().to_string(), "tasks.add(): missing required argument 'y'");
        assert_eq!(
            bind("[1, 2]", r#"{"x": 1}"#).unwrap_err().to_string(),
            "tasks.add(): got multiple values for argument 'x'"
        );
        assert_eq!(
            bind("[1, 2]", r#"{"z": 1}"#).unwrap_err().to_string(),
            "tasks.add(): got an unexpected keyword argument 'z'"
        );
        let wrong = bind(r#"["a", 2]"#, "{}").unwrap_err().to_string();
        assert!(wrong.starts_with("tasks.add(): argument 'x': invalid type: string \"a\""), "{wrong}");
        assert_eq!(bind("{}", "{}").unwrap_err().to_string(), "tasks.add(): args must be a JSON array, got an object");
        assert!(bind("[1,", "{}").unwrap_err().to_string().starts_with("tasks.add(): args are not valid JSON"));
    }

    #[test]
    fn option_parameters_may_be_omitted() {
        let mut a = Args::bind("t", "[]", "{}", &["limit"]).unwrap();
        assert_eq!(a.take::<Option<u32>>(0).unwrap(), None);
        let mut a = Args::bind("t", "[5]", "{}", &["limit"]).unwrap();
        assert_eq!(a.take::<Option<u32>>(0).unwrap(), Some(5));
    }

    #[test]
    fn structured_arguments_decode_with_serde() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct Size {
            w: u32,
            h: u32,
        }
        let mut a = Args::bind("t", r#"[[1, 2, 3], {"w": 4, "h": 5}]"#, "{}", &["values", "size"]).unwrap();
        assert_eq!(a.take::<Vec<f64>>(0).unwrap(), vec![1.0, 2.0, 3.0]);
        assert_eq!(a.take::<Size>(1).unwrap(), Size { w: 4, h: 5 });
    }
}
