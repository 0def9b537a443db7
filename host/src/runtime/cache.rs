//! Compiled components on disk, keyed by content digest and by the engine's
//! compatibility hash (wasmtime version + settings), written atomically and mapped on load.

use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::component::Component;
use wasmtime::Engine;

pub(super) fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub(super) struct CompileCache {
    dir: Option<PathBuf>,
    engine_key: String,
}

impl CompileCache {
    pub fn new(engine: &Engine, dir: Option<PathBuf>) -> Self {
        // DefaultHasher::new() uses fixed keys, so the key is stable across processes.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        CompileCache { dir, engine_key: format!("{:016x}", hasher.finish()) }
    }

    fn path_for(&self, digest: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{digest}-{}.cwasm", self.engine_key)))
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The cached compiled form of the component with `digest`, if there is a usable one.
    pub fn cached(&self, engine: &Engine, digest: &str) -> Option<Component> {
        let path = self.path_for(digest)?;
        if !path.exists() {
            return None;
        }
        // SAFETY: the file was written by `store` below from wasmtime's own
        // serialization, under a name bound to this engine's compatibility hash;
        // wasmtime still checks the header and refuses an incompatible artifact.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(path = %path.display(), "discarding unusable compile cache entry: {e:#}");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Loads the compiled form of `bytes`, compiling (and storing) it on a miss.
    pub fn load(&self, engine: &Engine, bytes: &[u8], digest: &str) -> wasmtime::Result<(Component, bool)> {
        let Some(path) = self.path_for(digest) else {
            return Ok((Component::new(engine, bytes)?, false));
        };
        if let Some(component) = self.cached(engine, digest) {
            return Ok((component, true));
        }
        let component = Component::new(engine, bytes)?;
        if let Err(e) = store(&path, &component.serialize()?) {
            tracing::warn!(path = %path.display(), "could not write compile cache: {e}");
            return Ok((component, false));
        }
        // Serve from the file just written: mapped code is page cache shared by every
        // worker process, where the fresh compile's code is private memory in each.
        // SAFETY: as above — our own artifact, checked again by wasmtime.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(mapped) => Ok((mapped, false)),
            Err(_) => Ok((component, false)),
        }
    }
}

fn store(path: &Path, artifact: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, artifact)?;
    std::fs::rename(&tmp, path)
}
