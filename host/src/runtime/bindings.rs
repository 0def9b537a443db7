//! The one place `bindgen!` runs: host-side types for `wit/task.wit` (the current world)
//! and, for components built against it, the 0.1.0 host interface (`wit/v0.1.0`).

wasmtime::component::bindgen!({
    world: "task",
    path: "../wit",
    imports: { default: trappable },
    exports: { default: async },
});

/// `taskhost:task@0.1.0`: only its `host` interface is linked from here. Its export has
/// the same shape as the current one, so one `TaskPre` serves components of both.
pub mod v0_1 {
    wasmtime::component::bindgen!({
        world: "task",
        path: "../wit/v0.1.0",
        imports: { default: trappable },
        exports: { default: async },
    });
}
