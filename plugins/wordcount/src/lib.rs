//! `files.wordcount(path)`: counts the words of a file in a directory its manifest grants
//! (`/reports`, read-only); anything else is out of its reach.
use taskhost_sdk::{task, TaskError};

#[task]
fn wordcount(path: String) -> Result<usize, TaskError> {
    let text = std::fs::read_to_string(&path).map_err(|e| TaskError::fail(format!("{path}: {e}")))?;
    Ok(text.split_whitespace().count())
}
