//! The one place `bindgen!` runs: host-side types for `wit/task.wit` (the current world,
//! 0.3.0) and, for components built against them, the 0.2.0 and 0.1.0 worlds (`wit/v0.*`).

wasmtime::component::bindgen!({
    world: "task",
    path: "../wit",
    imports: { default: trappable },
    exports: { default: async },
});

/// `taskhost:task@0.2.0`: its `host` interface is linked from here, and its export (whose
/// `task-error` has no `exception` case) is called through its own `TaskPre`.
pub mod v0_2 {
    wasmtime::component::bindgen!({
        world: "task",
        path: "../wit/v0.2.0",
        imports: { default: trappable },
        exports: { default: async },
    });
}

/// `taskhost:task@0.1.0`: only its `host` interface is linked from here. Its export has
/// the same shape as 0.2.0's, so 0.2.0's `TaskPre` serves components of both.
pub mod v0_1 {
    wasmtime::component::bindgen!({
        world: "task",
        path: "../wit/v0.1.0",
        imports: { default: trappable },
        exports: { default: async },
    });
}

/// A linked component of either export shape: the current world's, or 0.2.0's (which
/// 0.1.0 components share).
pub enum AnyTaskPre<T: 'static> {
    Current(TaskPre<T>),
    V0_2(v0_2::TaskPre<T>),
}

impl<T: 'static> Clone for AnyTaskPre<T> {
    fn clone(&self) -> Self {
        match self {
            AnyTaskPre::Current(p) => AnyTaskPre::Current(p.clone()),
            AnyTaskPre::V0_2(p) => AnyTaskPre::V0_2(p.clone()),
        }
    }
}

impl<T: Send + 'static> AnyTaskPre<T> {
    /// The current shape if the component exports it, else 0.2.0's; the current shape's
    /// complaint if neither fits.
    pub fn new(pre: wasmtime::component::InstancePre<T>) -> wasmtime::Result<Self> {
        match TaskPre::new(pre.clone()) {
            Ok(current) => Ok(AnyTaskPre::Current(current)),
            Err(why) => v0_2::TaskPre::new(pre).map(AnyTaskPre::V0_2).map_err(|_| why),
        }
    }

    /// Instantiates (then calls `instantiated`) and calls `run`; an older component's
    /// ending comes back in the current world's types.
    pub async fn run(
        &self,
        mut store: &mut wasmtime::Store<T>,
        info: &TaskInfo,
        args: &str,
        kwargs: &str,
        instantiated: impl FnOnce(),
    ) -> wasmtime::Result<Result<String, TaskError>> {
        match self {
            AnyTaskPre::Current(pre) => {
                let task = pre.instantiate_async(&mut store).await?;
                instantiated();
                task.call_run(&mut store, info, args, kwargs).await
            }
            AnyTaskPre::V0_2(pre) => {
                let task = pre.instantiate_async(&mut store).await?;
                instantiated();
                let info = v0_2::TaskInfo {
                    id: info.id.clone(),
                    name: info.name.clone(),
                    version: info.version.clone(),
                    retries: info.retries,
                    queue: info.queue.clone(),
                    eta: info.eta.clone(),
                    hard_limit_ms: info.hard_limit_ms,
                    soft_limit_ms: info.soft_limit_ms,
                    parent_id: info.parent_id.clone(),
                    root_id: info.root_id.clone(),
                };
                Ok(task.call_run(&mut store, &info, args, kwargs).await?.map_err(|e| match e {
                    v0_2::TaskError::Fail(message) => TaskError::Fail(message),
                    v0_2::TaskError::Retry(r) => TaskError::Retry(taskhost::task::types::RetryRequest { reason: r.reason, countdown: r.countdown }),
                    v0_2::TaskError::Reject(reason) => TaskError::Reject(reason),
                }))
            }
        }
    }
}
