//! The one place `bindgen!` runs: host-side types for `wit/task.wit`.

wasmtime::component::bindgen!({
    world: "task",
    path: "../wit",
    imports: { default: trappable },
    exports: { default: async },
});
