//! `http.fetch(url)`: GETs a URL its manifest grants and returns the status, the body's
//! length and its sha256. Redirects come back as they are (a 3xx status).
use serde::Serialize;
use sha2::{Digest, Sha256};
use taskhost_sdk::{http, task, TaskError};

#[derive(Serialize)]
struct Fetched {
    status: u16,
    length: usize,
    sha256: String,
}

#[task]
fn fetch(url: String) -> Result<Fetched, TaskError> {
    let response = http::get(&url)?;
    Ok(Fetched { status: response.status, length: response.body.len(), sha256: hex::encode(Sha256::digest(&response.body)) })
}
