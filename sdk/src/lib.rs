//! Write taskhost tasks as ordinary typed Rust functions; `#[task]` exports one as the
//! component's `run`, decoding Celery's positional `args` and `kwargs` with serde.
//!
//! ```ignore
//! use taskhost_sdk::{task, TaskError};
//!
//! #[task]
//! fn add(x: i64, y: i64) -> Result<i64, TaskError> {
//!     Ok(x + y)
//! }
//! ```
//!
//! A parameter of type `&Context` receives the task's context (id, retries, logging,
//! progress, remaining time, revocation, follow-up tasks, config) and is not counted as an
//! argument. [`http`] sends HTTP requests where the manifest grants the origin; `std::fs`
//! works on granted directories, `std::net::TcpStream` on granted TCP targets.

extern crate self as taskhost_sdk;

mod args;
mod context;
mod error;
pub mod http;

pub use args::{ArgError, Args};
pub use context::{Context, LogLevel, SendOptions};
pub use error::TaskError;
pub use taskhost_sdk_macros::task;

/// Guest bindings generated from `wit/task.wit`; authors use [`task`] instead.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "task",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_task_world",
        default_bindings_module: "taskhost_sdk::bindings",
        runtime_path: "taskhost_sdk::__private::wit_bindgen::rt",
        generate_all,
    });
}

/// What `#[task]` expands to calls; not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use serde_json;
    pub use wit_bindgen;

    use crate::bindings::taskhost::task::types::TaskInfo;
    use crate::{Args, Context, TaskError};

    /// Binds the raw JSON to parameter names, calls the task, encodes its outcome.
    pub fn run_task<T: serde::Serialize>(
        info: TaskInfo,
        args: &str,
        kwargs: &str,
        names: &[&str],
        call: impl FnOnce(&Context, &mut Args) -> Result<Result<T, TaskError>, crate::ArgError>,
    ) -> Result<String, crate::bindings::taskhost::task::types::TaskError> {
        let ctx = Context::new(info);
        let outcome = Args::bind(ctx.name(), args, kwargs, names)
            .and_then(|mut bound| call(&ctx, &mut bound))
            .map_err(|e| TaskError::Fail(e.to_string()))
            .and_then(|r| r);
        match outcome {
            Ok(value) => serde_json::to_string(&value)
                .map_err(|e| TaskError::Fail(format!("result is not JSON-serializable: {e}")).into_wit()),
            Err(err) => Err(err.into_wit()),
        }
    }
}
