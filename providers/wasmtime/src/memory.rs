//! Memory budgets: what a container's guests may allocate together, like a memory cgroup.
//!
//! Start at [`MemoryBudget`]: one per container, shared by every store of that container (its
//! running instance, its execs, exec probes and hooks, and each HTTP request's instance). Every
//! store's [`Limiter`] charges the budget for what the store allocates — each linear memory's
//! bytes, each table's elements at their host size ([`TABLE_ELEMENT_BYTES`]) — and gives it
//! back when the store is dropped. A growth that would take the container over its
//! `limits.memory` is refused: the store asking traps (OOMKilled for the running instance, a
//! failed exec, a 503/500 for a request), the other stores run on, as when the cgroup's OOM
//! killer picks one process.
//!
//! Every budget also charges the node's [`NodeMemory`]: all guests on the node together, with or
//! without limits. Its ceiling (the memory the node gives pods, as the kubelet's `kubepods`
//! cgroup) is the last guard that keeps the agent (and with it every pod) out of the kernel's
//! OOM killer; the eviction manager acts before it, on [`NodeMemory::used`].
//!
//! Bounds that do not go through the limiter are set per store ([`Limiter`]'s caps on
//! instances, memories and tables).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use wasmtime::ResourceLimiter;

/// Host bytes of one table element: wasmtime keeps a funcref (and, in 64-bit hosts, any
/// reference it may store) as one pointer-sized slot; counting 8 bytes charges what the host
/// really allocates for a `table.grow` (a 100M-element table is 800 MB of host memory).
pub const TABLE_ELEMENT_BYTES: u64 = 8;

/// At most this many instances per store. A core module is one instance; a component is one
/// core instance per core module it embeds plus the adapter shims wit-component adds (a
/// componentize-py component has about a dozen). 64 leaves room for any toolchain we know,
/// while keeping what a store can make (each instance's `vmctx`, never charged byte by byte)
/// far below wasmtime's default of 10,000.
pub const MAX_INSTANCES_PER_STORE: usize = 64;
/// At most this many linear memories per store: a component has about one per core module
/// that defines one (usually one or two); multi-memory modules declare a few. Each memory
/// reserves its own 4 GiB+ of address space, so 16 bound a store's reservation to ~70 GiB of
/// the 128 TiB a process may address (wasmtime's default, 10,000, would be ~40 TiB).
pub const MAX_MEMORIES_PER_STORE: usize = 16;
/// At most this many tables per store: each core instance of a component usually has one
/// (the shims use them for indirect calls), so as many as instances.
pub const MAX_TABLES_PER_STORE: usize = MAX_INSTANCES_PER_STORE;

/// All guests on the node together: how much they hold and the ceiling they may not pass.
#[derive(Debug, Default)]
pub struct NodeMemory {
    used: AtomicU64,
    /// `None`: no ceiling (unit tests, a node that could not measure its memory).
    ceiling: Option<u64>,
}

impl NodeMemory {
    /// The node's guests may hold `ceiling` bytes together (`None`: unbounded).
    pub fn new(ceiling: Option<u64>) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicU64::new(0),
            ceiling,
        })
    }

    /// Bytes every guest on the node holds now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn ceiling(&self) -> Option<u64> {
        self.ceiling
    }
}

/// Why a charge was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The container's own limit.
    Container { limit: u64 },
    /// The node's ceiling for all guests.
    Node { ceiling: u64 },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Container { limit } => write!(f, "memory limit of {limit} bytes exceeded"),
            Refusal::Node { ceiling } => {
                write!(f, "the node's memory for pods ({ceiling} bytes) is used up")
            }
        }
    }
}

/// One container's budget (see the module docs).
#[derive(Debug)]
pub struct MemoryBudget {
    limit: Option<u64>,
    used: AtomicU64,
    node: Arc<NodeMemory>,
}

impl MemoryBudget {
    /// A budget of `limit` bytes (`None`: unlimited, still counted on `node`).
    pub fn new(limit: Option<u64>, node: Arc<NodeMemory>) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicU64::new(0),
            node,
        })
    }

    /// A budget on a node of its own with no ceiling (tests, tools).
    pub fn standalone(limit: Option<u64>) -> Arc<Self> {
        Self::new(limit, NodeMemory::new(None))
    }

    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Bytes the container's stores hold now, together.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `bytes` from the container's budget and the node's, or neither.
    pub fn try_charge(&self, bytes: u64) -> Result<(), Refusal> {
        if bytes == 0 {
            return Ok(());
        }
        charge(&self.used, bytes, self.limit).map_err(|limit| Refusal::Container { limit })?;
        if let Err(ceiling) = charge(&self.node.used, bytes, self.node.ceiling) {
            self.used.fetch_sub(bytes, Ordering::Relaxed);
            return Err(Refusal::Node { ceiling });
        }
        Ok(())
    }

    /// Gives back `bytes` taken by [`MemoryBudget::try_charge`].
    pub fn release(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        self.used.fetch_sub(bytes, Ordering::Relaxed);
        self.node.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Adds `bytes` to `used` unless that passes `limit` (returned as the error); atomic against
/// every other store charging at once.
fn charge(used: &AtomicU64, bytes: u64, limit: Option<u64>) -> Result<(), u64> {
    let Some(limit) = limit else {
        used.fetch_add(bytes, Ordering::Relaxed);
        return Ok(());
    };
    used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
        now.checked_add(bytes).filter(|total| *total <= limit)
    })
    .map(drop)
    .map_err(|_| limit)
}

/// One store's limiter: charges the container's [`MemoryBudget`] for every memory and table
/// growth (trapping on a refused one, so the guest cannot go on without memory it asked for),
/// caps instances, memories and tables per store, remembers why a growth was refused, and
/// gives everything back when dropped (the store is gone).
#[derive(Debug)]
pub struct Limiter {
    budget: Arc<MemoryBudget>,
    held: u64,
    refused: Option<Refusal>,
}

impl Limiter {
    pub fn new(budget: Arc<MemoryBudget>) -> Self {
        Self {
            budget,
            held: 0,
            refused: None,
        }
    }

    /// Why a growth was refused, if one was.
    pub fn refused(&self) -> Option<Refusal> {
        self.refused
    }

    /// Bytes this store holds.
    pub fn held(&self) -> u64 {
        self.held
    }

    fn grow(&mut self, bytes: u64) -> wasmtime::Result<bool> {
        match self.budget.try_charge(bytes) {
            Ok(()) => {
                self.held += bytes;
                Ok(true)
            }
            Err(refusal) => {
                self.refused = Some(refusal);
                // A trap, not `Ok(false)`: a guest told "no" by memory.grow's -1 could go on
                // and keep asking; the cgroup analogue kills it.
                Err(wasmtime::Error::msg(refusal.to_string()))
            }
        }
    }
}

impl Drop for Limiter {
    fn drop(&mut self) {
        self.budget.release(std::mem::take(&mut self.held));
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grow(desired.saturating_sub(current) as u64)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let elements = desired.saturating_sub(current) as u64;
        self.grow(elements.saturating_mul(TABLE_ELEMENT_BYTES))
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES_PER_STORE
    }

    fn tables(&self) -> usize {
        MAX_TABLES_PER_STORE
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES_PER_STORE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::{Engine, Instance, Module, Store};

    const MIB: u64 = 1 << 20;

    /// A module whose `grow` export grows memory `memory` by `pages` 64 KiB pages and returns
    /// the old size (or -1), and whose `grow_table` grows its table.
    fn module(engine: &Engine) -> Module {
        let wat = r#"(module
            (memory 1) (memory 0)
            (table 0 funcref)
            (func (export "grow") (param i32) (result i32) (memory.grow 1 (local.get 0)))
            (func (export "grow_table") (param i32) (result i32) (table.grow 0 (ref.null func) (local.get 0))))"#;
        Module::new(engine, wat::parse_str(wat).unwrap()).unwrap()
    }

    fn store(engine: &Engine, budget: &Arc<MemoryBudget>) -> (Store<Limiter>, Instance) {
        let mut store = Store::new(engine, Limiter::new(budget.clone()));
        store.limiter(|l| l as &mut dyn ResourceLimiter);
        let instance = Instance::new(&mut store, &module(engine), &[]).unwrap();
        (store, instance)
    }

    fn grow(store: &mut Store<Limiter>, instance: &Instance, bytes: u64) -> wasmtime::Result<i32> {
        let f = instance
            .get_typed_func::<i32, i32>(&mut *store, "grow")
            .unwrap();
        f.call(&mut *store, (bytes / 65536) as i32)
    }

    #[test]
    fn two_stores_share_one_budget() {
        let engine = Engine::default();
        let budget = MemoryBudget::standalone(Some(10 * MIB));
        let (mut a, ia) = store(&engine, &budget);
        let (mut b, ib) = store(&engine, &budget);
        // Each store's first memory (1 page) is charged at instantiation.
        assert_eq!(budget.used(), 2 * 65536);
        grow(&mut a, &ia, 6 * MIB).unwrap();
        // 6 MiB more in the other store would pass the 10 MiB they share: refused, a trap.
        let err = grow(&mut b, &ib, 6 * MIB).unwrap_err();
        assert!(
            format!("{err:#}").contains("memory limit of 10485760 bytes exceeded"),
            "{err:#}"
        );
        assert_eq!(
            b.data().refused(),
            Some(Refusal::Container { limit: 10 * MIB })
        );
        assert_eq!(
            a.data().refused(),
            None,
            "the store that did not ask runs on"
        );
        grow(&mut b, &ib, 3 * MIB).unwrap();
        // Dropping a store gives its memory back to the budget.
        drop(a);
        assert_eq!(budget.used(), 65536 + 3 * MIB);
        grow(&mut b, &ib, 6 * MIB).unwrap();
    }

    #[test]
    fn tables_count_at_their_host_size() {
        let engine = Engine::default();
        let budget = MemoryBudget::standalone(Some(MIB));
        let (mut s, i) = store(&engine, &budget);
        let f = i.get_typed_func::<i32, i32>(&mut s, "grow_table").unwrap();
        // 100,000 elements are 800,000 bytes: fit in 1 MiB with the first page...
        f.call(&mut s, 100_000).unwrap();
        assert_eq!(budget.used(), 65536 + 100_000 * TABLE_ELEMENT_BYTES);
        // ...100,000 more do not.
        assert!(f.call(&mut s, 100_000).is_err());
        assert!(matches!(
            s.data().refused(),
            Some(Refusal::Container { .. })
        ));
    }

    #[test]
    fn the_node_ceiling_holds_every_container_together() {
        let engine = Engine::default();
        let node = NodeMemory::new(Some(8 * MIB));
        let unlimited = MemoryBudget::new(None, node.clone());
        let limited = MemoryBudget::new(Some(100 * MIB), node.clone());
        let (mut a, ia) = store(&engine, &unlimited);
        let (mut b, ib) = store(&engine, &limited);
        grow(&mut a, &ia, 5 * MIB).unwrap();
        let err = grow(&mut b, &ib, 4 * MIB).unwrap_err();
        assert!(
            format!("{err:#}").contains("the node's memory for pods"),
            "{err:#}"
        );
        assert_eq!(b.data().refused(), Some(Refusal::Node { ceiling: 8 * MIB }));
        // The refused charge left neither budget holding it.
        assert_eq!(limited.used(), 65536);
        assert_eq!(node.used(), 2 * 65536 + 5 * MIB);
    }

    #[test]
    fn a_store_may_not_declare_more_memories_than_the_cap() {
        let engine = Engine::default();
        let memories: String = (0..=MAX_MEMORIES_PER_STORE).map(|_| "(memory 0)").collect();
        let module = Module::new(
            &engine,
            wat::parse_str(format!("(module {memories})")).unwrap(),
        )
        .unwrap();
        let mut store = Store::new(&engine, Limiter::new(MemoryBudget::standalone(None)));
        store.limiter(|l| l as &mut dyn ResourceLimiter);
        let err = Instance::new(&mut store, &module, &[]).unwrap_err();
        assert!(format!("{err:#}").contains("memory"), "{err:#}");
    }
}
