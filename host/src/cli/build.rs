//! `taskhost build app.py --task NAME --version SEMVER`: a Python module of `@task`
//! functions (sdk-python) into `NAME@SEMVER.wasm` of the taskhost world, with componentize-py.

use super::CliError;
use anyhow::{anyhow, Context as _};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The world Python components are built for, and its WIT, as this binary links it.
const WORLD: &str = "taskhost:task/task@0.3.0";
const TASK_WIT: &str = include_str!("../../../wit/task.wit");
const CONFIG_WIT: &str = include_str!("../../../wit/deps/config/store.wit");
/// The SDK, bundled into every component built (so the SDK a component runs is the one
/// its builder shipped with, whatever is installed).
const SDK: &str = include_str!("../../../sdk-python/taskhost/__init__.py");
/// Imports the author's module (registering its tasks) and exports `run` through the SDK.
const ENTRY: &str = "taskhost_entry";

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The Python module defining the task with `@task` (from the taskhost SDK): a file
    /// (`app.py`) or a package directory (`app/`, with its `__init__.py`).
    pub module: PathBuf,
    /// The Celery task name it serves, e.g. `py.add`.
    #[arg(long)]
    pub task: String,
    /// The component's version (semver).
    #[arg(long)]
    pub version: semver::Version,
    /// The directory NAME@VERSION.wasm is written to (a plugins directory).
    #[arg(short = 'o', long, default_value = ".")]
    pub out: PathBuf,
    /// Pure-Python requirements to bundle (installed with pip into the component).
    #[arg(short = 'r', long)]
    pub requirements: Option<PathBuf>,
    /// A manifest to put beside the component as NAME@VERSION.toml.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// The componentize-py to run.
    #[arg(long, env = "TASKHOST_COMPONENTIZE_PY", default_value = "componentize-py")]
    pub componentize_py: PathBuf,
    /// The Python whose pip installs the requirements.
    #[arg(long, env = "TASKHOST_BUILD_PYTHON", default_value = "python3")]
    pub python: PathBuf,
}

pub fn run(args: BuildArgs) -> Result<(), CliError> {
    let file_name = format!("{}@{}.wasm", args.task, args.version);
    crate::registry::parse_file_name(&file_name)
        .map_err(|e| CliError::usage(anyhow!("--task {:?}: not a name taskhost can serve ({e})", args.task)))?;
    let module = module_name(&args.module)?;
    let module_dir = absolute(args.module.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display())).map_err(CliError::usage)?;

    let work = std::env::temp_dir().join(format!("taskhost-build-{}", uuid::Uuid::new_v4()));
    let built = build_in(&work, &args, &module, &module_dir, &file_name);
    let _ = std::fs::remove_dir_all(&work);
    let wasm = built?;
    println!("{}", wasm.display());
    Ok(())
}

fn build_in(work: &Path, args: &BuildArgs, module: &str, module_dir: &Path, file_name: &str) -> Result<PathBuf, CliError> {
    let write = |path: PathBuf, text: &str| -> Result<(), CliError> {
        std::fs::create_dir_all(path.parent().expect("a file in a directory")).map_err(CliError::failed)?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display())).map_err(CliError::failed)
    };
    write(work.join("wit/task.wit"), TASK_WIT)?;
    write(work.join("wit/deps/config/store.wit"), CONFIG_WIT)?;
    write(work.join("sdk/taskhost/__init__.py"), SDK)?;
    write(
        work.join(format!("entry/{ENTRY}.py")),
        &format!(
            "import taskhost\nimport {module}  # registers its @task functions\nimport wit_world\n\n\n\
             class WitWorld(wit_world.WitWorld):\n    def run(self, info, args, kwargs):\n        \
             return taskhost._run(info, args, kwargs)\n"
        ),
    )?;

    let mut paths = vec![work.join("entry"), module_dir.to_path_buf(), work.join("sdk")];
    if let Some(requirements) = &args.requirements {
        let site = work.join("site");
        let out = Command::new(&args.python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
            .arg(&site)
            .arg("-r")
            .arg(requirements)
            .output()
            .with_context(|| format!("running {} -m pip", args.python.display()))
            .map_err(CliError::usage)?;
        if !out.status.success() {
            return Err(CliError::failed(anyhow!(
                "installing {} failed:\n{}",
                requirements.display(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        paths.push(site);
    }

    let out_dir = absolute(&args.out)?;
    let partial = out_dir.join(format!("{file_name}.tmp"));
    let mut cmd = Command::new(&args.componentize_py);
    cmd.arg("-d").arg(work.join("wit")).args(["-w", WORLD, "componentize", ENTRY]);
    for p in &paths {
        cmd.arg("-p").arg(p);
    }
    cmd.arg("-o").arg(&partial);
    let out = cmd.output().map_err(|e| {
        CliError::usage(anyhow!(
            "cannot run {} ({e}): install it with `pip install componentize-py` or name it with --componentize-py",
            args.componentize_py.display()
        ))
    })?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&partial);
        return Err(CliError::failed(anyhow!(
            "componentize-py failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let wasm = out_dir.join(file_name);
    std::fs::rename(&partial, &wasm).map_err(CliError::failed)?;
    let manifest = wasm.with_extension("toml");
    match &args.manifest {
        Some(m) => {
            std::fs::copy(m, &manifest).with_context(|| format!("copying {}", m.display())).map_err(CliError::usage)?;
        }
        // A stale manifest of an earlier build would apply to this one.
        None => {
            let _ = std::fs::remove_file(&manifest);
        }
    }
    Ok(wasm)
}

/// `app.py` or the package `app/` → `app`, which must be importable as a module name.
fn module_name(path: &Path) -> Result<String, CliError> {
    let package = path.join("__init__.py").is_file();
    let stem = if package {
        path.file_name().and_then(|s| s.to_str())
    } else {
        (path.extension().is_some_and(|e| e == "py")).then(|| path.file_stem().and_then(|s| s.to_str())).flatten()
    }
    .ok_or_else(|| CliError::usage(anyhow!("{}: expected a Python module (NAME.py) or package (NAME/__init__.py)", path.display())))?;
    let valid = stem.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && stem.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid || stem == ENTRY || stem == "taskhost" || stem == "wit_world" {
        return Err(CliError::usage(anyhow!("{}: {stem:?} cannot be imported as a module of its own", path.display())));
    }
    if !package && !path.is_file() {
        return Err(CliError::usage(anyhow!("{}: no such file", path.display())));
    }
    Ok(stem.to_string())
}

fn absolute(path: &Path) -> Result<PathBuf, CliError> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display())).map_err(CliError::usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_importable_module_files_are_built() {
        let dir = std::env::temp_dir().join(format!("taskhost-build-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, ok) in [("app.py", true), ("my-app.py", false), ("app.txt", false), ("taskhost.py", false), ("1st.py", false)] {
            std::fs::write(dir.join(name), "").unwrap();
            assert_eq!(module_name(&dir.join(name)).is_ok(), ok, "{name}");
        }
        assert!(module_name(&dir.join("missing.py")).is_err());
        // A package: its directory, with an __init__.py.
        std::fs::create_dir_all(dir.join("reports")).unwrap();
        assert!(module_name(&dir.join("reports")).is_err(), "no __init__.py yet");
        std::fs::write(dir.join("reports/__init__.py"), "").unwrap();
        assert_eq!(module_name(&dir.join("reports")).ok().as_deref(), Some("reports"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
