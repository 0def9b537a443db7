//! What one instance of a component takes from the sandbox pool (component and core
//! instances, memories, tables), and the permits a run holds so it waits for room instead of failing.

use tokio::sync::{Semaphore, SemaphorePermit};
use wasmtime::component::Component;

/// Most core instances one component may create (componentize-py's Python components
/// need 14, 38 built with `--stub-wasi`; a Rust wasip2 component a handful).
pub(super) const CORE_INSTANCES_PER_COMPONENT: u32 = 48;
/// Most linear memories one component may define.
pub(super) const MEMORIES_PER_COMPONENT: u32 = 4;
/// Most tables one component may define.
pub(super) const TABLES_PER_COMPONENT: u32 = 32;
/// What the pool holds per sandbox, on average. Core instances cost the pool nothing
/// but a count, so every sandbox can hold the largest component; memories and tables
/// reserve address space up front, so fewer.
pub(super) const MEMORIES_PER_SANDBOX: u32 = 2;
pub(super) const TABLES_PER_SANDBOX: u32 = 16;

/// One instance of a component's take from the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Footprint {
    pub core_instances: u32,
    pub memories: u32,
    pub tables: u32,
}

impl Footprint {
    /// Counted from the binary (core `instantiate`s) and the compiled component (what
    /// its instantiation defines: memories and tables).
    pub(super) fn of(bytes: &[u8], component: &Component) -> Result<Footprint, String> {
        let mut core_instances = 0u32;
        let mut memories = 0u32;
        let mut tables = 0u32;
        for payload in wasmparser::Parser::new(0).parse_all(bytes) {
            match payload.map_err(|e| e.to_string())? {
                wasmparser::Payload::InstanceSection(reader) => {
                    for instance in reader {
                        if let wasmparser::Instance::Instantiate { .. } = instance.map_err(|e| e.to_string())? {
                            core_instances += 1;
                        }
                    }
                }
                wasmparser::Payload::MemorySection(reader) => memories += reader.count(),
                wasmparser::Payload::TableSection(reader) => tables += reader.count(),
                _ => {}
            }
        }
        // wasmtime's own sum where it can give one (each module once per instantiation);
        // the sections' count otherwise.
        if let Some(required) = component.resources_required() {
            memories = required.num_memories;
            tables = required.num_tables;
        }
        Ok(Footprint { core_instances, memories, tables })
    }

    /// Why one instance can never fit the pool, if it cannot.
    pub(super) fn never_fits(&self) -> Option<String> {
        let over = |what: &str, need: u32, most: u32| {
            (need > most).then(|| format!("it needs {need} {what} per instance; the sandbox pool allows {most}"))
        };
        over("core instances", self.core_instances, CORE_INSTANCES_PER_COMPONENT)
            .or_else(|| over("linear memories", self.memories, MEMORIES_PER_COMPONENT))
            .or_else(|| over("tables", self.tables, TABLES_PER_COMPONENT))
    }
}

/// The pool's capacity as permits: a run takes its component's footprint before it
/// instantiates, so a burst of large components waits for room (FIFO) instead of
/// failing with wasmtime's "maximum concurrent limit reached".
pub(super) struct PoolPermits {
    components: Semaphore,
    core_instances: Semaphore,
    memories: Semaphore,
    tables: Semaphore,
}

/// What a run holds while its instance exists.
pub(super) struct Held<'a> {
    _permits: [SemaphorePermit<'a>; 4],
}

impl PoolPermits {
    pub(super) fn new(sandboxes: u32) -> Self {
        PoolPermits {
            components: Semaphore::new(sandboxes as usize),
            core_instances: Semaphore::new((sandboxes * CORE_INSTANCES_PER_COMPONENT) as usize),
            memories: Semaphore::new((sandboxes * MEMORIES_PER_SANDBOX) as usize),
            tables: Semaphore::new((sandboxes * TABLES_PER_SANDBOX) as usize),
        }
    }

    /// Waits until the pool has room for one instance of `footprint`. Always in the
    /// same order, so two runs never hold part of what the other waits for.
    pub(super) async fn take(&self, footprint: &Footprint) -> Held<'_> {
        // The semaphores are never closed, so acquiring cannot fail.
        const OPEN: &str = "the pool's permits are never closed";
        let components = self.components.acquire().await.expect(OPEN);
        let core = self.core_instances.acquire_many(footprint.core_instances).await.expect(OPEN);
        let memories = self.memories.acquire_many(footprint.memories).await.expect(OPEN);
        let tables = self.tables.acquire_many(footprint.tables).await.expect(OPEN);
        Held { _permits: [components, core, memories, tables] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_footprint_over_the_per_component_maxima_never_fits() {
        let fits = Footprint { core_instances: 14, memories: 2, tables: 4 };
        assert_eq!(fits.never_fits(), None);
        let huge = Footprint { core_instances: CORE_INSTANCES_PER_COMPONENT + 1, ..fits };
        assert!(huge.never_fits().unwrap().contains("core instances"), "{:?}", huge.never_fits());
        let memories = Footprint { memories: MEMORIES_PER_COMPONENT + 1, ..fits };
        assert!(memories.never_fits().unwrap().contains("linear memories"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_run_waits_for_room_and_gets_it_when_another_ends() {
        let pool = PoolPermits::new(1);
        let big = Footprint { core_instances: CORE_INSTANCES_PER_COMPONENT, memories: 1, tables: 1 };
        let first = pool.take(&big).await;
        let waiting = pool.take(&big);
        tokio::pin!(waiting);
        assert!(futures::poll!(&mut waiting).is_pending(), "the pool has room for one");
        drop(first);
        let _second = waiting.await;
    }
}
