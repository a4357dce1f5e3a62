//! The referee: load sealed muscles, invoke them in cells, contain faults, audit everything.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use redb::Database;
use referee_muscle::{Header, RefereeKeys, open};
use referee_trust::{Home, TrustStore};
use serde_json::json;
use wasmtime::{InstancePre, Module};

use crate::audit::AuditLog;
use crate::cell::{CallBudget, Cell};
use crate::engine::{EngineKind, Engines, MAX_CELL_MEMORY, TICK};
use crate::error::{Fault, RuntimeError};
use crate::host::{CellState, LogLine, LogRing, MuscleContext, linker};
use crate::kv::{Kv, namespace};
use crate::policy::{Grant, Policy};

/// What a loaded muscle looks like from outside.
#[derive(Clone, Debug)]
pub struct MuscleInfo {
    /// The authenticated header.
    pub header: Header,
    /// What policy granted.
    pub grant: Grant,
    /// Whether it has a `train` entry (and therefore one serialised, persistent cell).
    pub trainable: bool,
    /// Whether it is quarantined.
    pub quarantined: bool,
    /// Successful calls so far.
    pub calls: u64,
    /// Faults so far.
    pub faults: u64,
}

/// A resolved, loaded muscle (see [`Runtime::handle`]). Cheap to clone.
#[derive(Clone)]
pub struct MuscleHandle {
    muscle: Arc<Loaded>,
}

impl std::fmt::Debug for MuscleHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MuscleHandle({} v{})", self.muscle.header.name, self.muscle.header.version)
    }
}

impl MuscleHandle {
    /// The muscle's authenticated header.
    pub fn header(&self) -> &Header {
        &self.muscle.header
    }
}

/// Which entry point to call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// `forward`: inference.
    Forward,
    /// `train`: one SGD step; returns the loss.
    Train,
}

/// Cells and waiting callers of one muscle.
struct Slots {
    /// Boxed so checkout and checkin move a pointer, not the whole cell.
    #[allow(clippy::vec_box, reason = "cells move in and out on every call; a box moves 8 bytes, a cell 192")]
    idle: Vec<Box<Cell>>,
    busy: usize,
    waiting: usize,
}

struct Loaded {
    header: Header,
    ctx: Arc<MuscleContext>,
    pre: InstancePre<CellState>,
    trainable: bool,
    inputs: usize,
    outputs: usize,
    slots: Mutex<Slots>,
    freed: Condvar,
    /// Last good parameters of a trainable muscle, restored into a replacement cell.
    last_state: Mutex<Option<Vec<u8>>>,
    recent_faults: Mutex<VecDeque<Instant>>,
    quarantined: AtomicBool,
    calls: AtomicU64,
    faults: AtomicU64,
}

impl Loaded {
    fn budget(&self) -> CallBudget {
        CallBudget {
            ticks: u64::from(self.ctx.grant.time_ms).div_ceil(TICK.as_millis() as u64) + 1,
            fuel: self.ctx.grant.fuel,
        }
    }

    fn info(&self) -> MuscleInfo {
        MuscleInfo {
            header: self.header.clone(),
            grant: self.ctx.grant.clone(),
            trainable: self.trainable,
            quarantined: self.quarantined.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
            faults: self.faults.load(Ordering::Relaxed),
        }
    }

    fn new_cell(&self) -> Result<Box<Cell>, RuntimeError> {
        let mut cell =
            Box::new(Cell::new(&self.header.name, &self.pre, CellState::new(self.ctx.clone()), self.budget())?);
        if let Ok(state) = self.last_state.lock()
            && let Some(bytes) = state.as_ref()
        {
            cell.set_state(bytes);
        }
        Ok(cell)
    }

    /// Takes an idle cell or makes one, waiting while all `concurrency` cells are busy.
    fn checkout(&self, queue: usize) -> Result<Option<Box<Cell>>, RuntimeError> {
        let limit = if self.trainable { 1 } else { self.ctx.grant.concurrency };
        let mut slots = self.slots.lock().map_err(|_| RuntimeError::ShuttingDown)?;
        if slots.busy >= limit {
            if slots.waiting >= queue {
                return Err(RuntimeError::Busy { name: self.header.name.clone(), queued: slots.waiting });
            }
            slots.waiting += 1;
            while slots.busy >= limit {
                slots = self.freed.wait(slots).map_err(|_| RuntimeError::ShuttingDown)?;
            }
            slots.waiting -= 1;
        }
        slots.busy += 1;
        Ok(slots.idle.pop())
    }

    /// Returns a healthy cell to the pool, or just frees the slot after a fault.
    fn checkin(&self, cell: Option<Box<Cell>>) {
        let waiting = match self.slots.lock() {
            Ok(mut slots) => {
                slots.busy -= 1;
                if let Some(cell) = cell {
                    slots.idle.push(cell);
                }
                slots.waiting
            }
            Err(_) => 1,
        };
        if waiting > 0 {
            self.freed.notify_one();
        }
    }
}

/// How to open a [`Runtime`].
#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    /// The operator's policy.
    pub policy: Policy,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self { policy: Policy::permissive_default() }
    }
}

/// A referee: the muscles loaded from one home directory.
///
/// Cheap to share across threads (`&Runtime` is `Sync`); calls to different muscles run in
/// parallel, calls to one muscle are bounded by its granted concurrency.
pub struct Runtime {
    engines: Engines,
    keys: RefereeKeys,
    trust: TrustStore,
    policy: Policy,
    audit: AuditLog,
    kv: Kv,
    logs: Arc<LogRing>,
    /// Read on every by-name call, replaced on load and unload: a snapshot readers take
    /// without a lock or a reference count.
    muscles: ArcSwap<BTreeMap<String, Arc<Loaded>>>,
    compiled: Mutex<HashMap<([u8; 32], EngineKind), Module>>,
    started: Instant,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("keys", &self.keys).finish_non_exhaustive()
    }
}

fn fault_event(kind: &str, header: &Header, detail: serde_json::Value) -> serde_json::Value {
    json!({
        "kind": kind,
        "muscle": header.name,
        "version": header.version,
        "publisher": header.publisher.to_string(),
        "code_hash": hex::encode(header.code_hash),
        "detail": detail,
    })
}

impl Runtime {
    /// Opens the referee of `home` (keys, trust store, state database with audit log and kv).
    pub fn open(home: &Home, options: RuntimeOptions) -> Result<Self, RuntimeError> {
        let keys = home.referee_keys()?;
        let trust = home.trust_store()?;
        let state_path = state_db_path(home);
        let db = Arc::new(
            Database::create(&state_path).map_err(|e| RuntimeError::Store(format!("{}: {e}", state_path.display())))?,
        );
        // The audit log and every muscle's kv: the owner's only, whatever the umask.
        std::fs::set_permissions(&state_path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| RuntimeError::Store(format!("chmod 600 {}: {e}", state_path.display())))?;
        let audit = AuditLog::new(db.clone())?;
        let kv = Kv::new(db)?;
        let runtime = Self {
            engines: Engines::new()?,
            keys,
            trust,
            policy: options.policy,
            audit,
            kv,
            logs: Arc::new(LogRing::default()),
            muscles: ArcSwap::from_pointee(BTreeMap::new()),
            compiled: Mutex::new(HashMap::new()),
            started: Instant::now(),
        };
        runtime.audit.append(&json!({
            "kind": "referee_start",
            "referee": runtime.keys.identity.key_id().to_string(),
            "version": env!("CARGO_PKG_VERSION"),
            "policy_sha256": hex::encode(runtime.policy.digest()),
        }))?;
        Ok(runtime)
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// This referee's keys (identity signs attestation reports).
    pub fn keys(&self) -> &RefereeKeys {
        &self.keys
    }

    /// The trust store.
    pub fn trust(&self) -> &TrustStore {
        &self.trust
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Log lines muscles wrote since the last call.
    pub fn drain_logs(&self) -> Vec<LogLine> {
        self.logs.drain()
    }

    /// Verifies, decrypts, checks and compiles a sealed muscle, then makes it callable under
    /// its name (replacing an older version of the same name). Every outcome is audited.
    pub fn load(&self, sealed: &[u8]) -> Result<MuscleInfo, RuntimeError> {
        let result = self.load_inner(sealed);
        let event = match &result {
            Ok(info) => fault_event("load", &info.header, json!({ "capabilities": info.grant.capabilities })),
            Err(e) => {
                let header = referee_muscle::SealedMuscle::parse(sealed).ok().map(|s| s.header);
                let code = header.as_ref().map(|h| hex::encode(h.code_hash));
                json!({
                    "kind": "load_refused",
                    "muscle": header.as_ref().map(|h| h.name.clone()),
                    "version": header.as_ref().map(|h| h.version),
                    "code_hash": code,
                    "reason": e.to_string(),
                })
            }
        };
        self.audit.append(&event)?;
        result
    }

    fn load_inner(&self, sealed: &[u8]) -> Result<MuscleInfo, RuntimeError> {
        let opened = open(sealed, &self.keys, &self.trust)?;
        let header = opened.header.clone();
        if header.abi != referee_muscle::ABI_V1 {
            return Err(RuntimeError::Abi {
                muscle: header.name.clone(),
                why: format!("unknown ABI id `{}`", header.abi),
            });
        }
        let abi = |why: &str| RuntimeError::Abi { muscle: header.name.clone(), why: why.into() };
        if header.inputs.is_empty() || header.outputs.is_empty() {
            return Err(abi(
                "the header must declare input and output shapes (compile with --input-shape/--output-shape)",
            ));
        }
        let inputs = header.inputs.iter().map(|t| t.elements()).sum::<u64>() as usize;
        let outputs = header.outputs.iter().map(|t| t.elements()).sum::<u64>() as usize;

        let mut grant = self.policy.grant(&header);
        grant.memory_bytes = grant.memory_bytes.min(MAX_CELL_MEMORY);
        let kind = EngineKind { fueled: grant.fuel.is_some(), canonical_nans: grant.canonicalize_every_nan };
        let engine = self.engines.get(kind);
        let module = self.compile(&header, &opened.payload, kind)?;

        for import in module.imports() {
            let name = import.name();
            let reason = if import.module() != "referee" || !header.capabilities.iter().any(|c| c == name) {
                Some("not requested in its header")
            } else if !grant.capabilities.iter().any(|c| c == name) {
                Some("not granted by policy")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(RuntimeError::CapabilityDenied {
                    muscle: header.name.clone(),
                    capability: format!("{}.{}", import.module(), name),
                    reason,
                });
            }
        }
        let compile_err =
            |e: wasmtime::Error| RuntimeError::Compile { muscle: header.name.clone(), why: e.to_string() };
        let pre = linker(engine, &grant)?.instantiate_pre(&module).map_err(compile_err)?;
        let ctx = Arc::new(MuscleContext {
            name: header.name.clone(),
            namespace: namespace(&header.publisher, &header.name),
            code_hash: header.code_hash,
            grant,
            kv: self.kv.clone(),
            audit: self.audit.clone(),
            logs: self.logs.clone(),
            started: self.started,
        });
        let loaded = Loaded {
            header: header.clone(),
            ctx,
            pre,
            trainable: false,
            inputs,
            outputs,
            slots: Mutex::new(Slots { idle: Vec::new(), busy: 0, waiting: 0 }),
            freed: Condvar::new(),
            last_state: Mutex::new(None),
            recent_faults: Mutex::new(VecDeque::new()),
            quarantined: AtomicBool::new(false),
            calls: AtomicU64::new(0),
            faults: AtomicU64::new(0),
        };
        // Instantiate once now: ABI errors, oversized data segments and memory beyond the
        // limit are refused at load, not at the first call.
        let probe = loaded.new_cell()?;
        let trainable = probe.has_train();
        let mut state = None;
        if trainable {
            probe.copy_state_into(&mut state);
        }
        let loaded = Loaded {
            trainable,
            last_state: Mutex::new(state),
            slots: Mutex::new(Slots { idle: vec![probe], busy: 0, waiting: 0 }),
            ..loaded
        };
        self.trust.record_accepted(&header).map_err(|e| RuntimeError::Store(e.to_string()))?;
        let info = loaded.info();
        let loaded = Arc::new(loaded);
        self.edit_muscles(|muscles| drop(muscles.insert(header.name.clone(), loaded.clone())));
        Ok(info)
    }

    /// Compiles (or reuses, by code hash) the module.
    fn compile(&self, header: &Header, wasm: &[u8], kind: EngineKind) -> Result<Module, RuntimeError> {
        let key = (header.code_hash, kind);
        if let Some(module) = self.compiled.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(module);
        }
        let module = Module::new(self.engines.get(kind), wasm)
            .map_err(|e| RuntimeError::Compile { muscle: header.name.clone(), why: e.to_string() })?;
        if let Ok(mut cache) = self.compiled.lock() {
            cache.insert(key, module.clone());
        }
        Ok(module)
    }

    fn get(&self, name: &str) -> Result<Arc<Loaded>, RuntimeError> {
        lookup(&self.muscles.load(), name).cloned()
    }

    /// Replaces the muscle table with an edited copy (retried if another edit raced it);
    /// returns the table the edit was applied to.
    fn edit_muscles(&self, edit: impl Fn(&mut BTreeMap<String, Arc<Loaded>>)) -> Arc<BTreeMap<String, Arc<Loaded>>> {
        self.muscles.rcu(|muscles| {
            let mut muscles = BTreeMap::clone(muscles);
            edit(&mut muscles);
            muscles
        })
    }

    /// Loaded muscles, by name.
    pub fn list(&self) -> Vec<MuscleInfo> {
        self.muscles.load().values().map(|l| l.info()).collect()
    }

    /// Information about one loaded muscle.
    pub fn info(&self, name: &str) -> Result<MuscleInfo, RuntimeError> {
        Ok(self.get(name)?.info())
    }

    /// Runs `forward` on a flat f32 input of the declared input size.
    pub fn invoke(&self, name: &str, input: &[f32]) -> Result<Vec<f32>, RuntimeError> {
        // Borrowed from the snapshot, not cloned: no reference count on the hot path.
        let muscles = self.muscles.load();
        let muscle = lookup(&muscles, name)?;
        // Not `vec![0.0; n]`: that is `calloc`, which glibc serves without its thread cache.
        let mut out = Vec::with_capacity(muscle.outputs);
        out.resize(muscle.outputs, 0.0);
        self.forward_into(muscle, input, &mut out)?;
        Ok(out)
    }

    /// Resolves a muscle once, for callers that invoke it often (skips the by-name lookup).
    /// A handle keeps calling the version it resolved until dropped, even if a newer version
    /// replaces it under the same name.
    pub fn handle(&self, name: &str) -> Result<MuscleHandle, RuntimeError> {
        Ok(MuscleHandle { muscle: self.get(name)? })
    }

    /// The allocation-free hot path: `forward` on `input`, outputs written to `out`
    /// (whose length must be the declared output size).
    pub fn invoke_into(&self, handle: &MuscleHandle, input: &[f32], out: &mut [f32]) -> Result<(), RuntimeError> {
        self.forward_into(&handle.muscle, input, out)
    }

    fn forward_into(&self, muscle: &Loaded, input: &[f32], out: &mut [f32]) -> Result<(), RuntimeError> {
        if input.len() != muscle.inputs || out.len() != muscle.outputs {
            return Err(RuntimeError::BadInput {
                muscle: muscle.header.name.clone(),
                why: format!(
                    "expected {} values (shape {:?}) and room for {} outputs, got {} and {}",
                    muscle.inputs,
                    shapes(&muscle.header.inputs),
                    muscle.outputs,
                    input.len(),
                    out.len()
                ),
            });
        }
        self.call(muscle, false, |cell, budget| cell.forward(input, out, budget))?;
        if !muscle.ctx.grant.canonicalize_every_nan {
            canonicalize_nans(out);
        }
        Ok(())
    }

    /// Runs one training step (`train`) and returns the loss; parameters stay in the cell.
    pub fn train(&self, name: &str, x: &[f32], y: &[f32], lr: f32) -> Result<f32, RuntimeError> {
        let muscle = self.get(name)?;
        if !muscle.trainable {
            return Err(RuntimeError::NoEntry { muscle: name.into(), entry: "train".into() });
        }
        if x.len() != muscle.inputs || y.len() != muscle.outputs {
            return Err(RuntimeError::BadInput {
                muscle: name.into(),
                why: format!(
                    "train expects {} inputs and {} targets, got {} and {}",
                    muscle.inputs,
                    muscle.outputs,
                    x.len(),
                    y.len()
                ),
            });
        }
        let loss = self.call(&muscle, true, |cell, budget| cell.train(x, y, lr, budget))?;
        // A NaN-blind muscle's loss may carry any NaN bits; every other engine already
        // canonicalised it, so this is exact either way.
        Ok(if loss.is_nan() { f32::NAN } else { loss })
    }

    /// A trainable muscle's current parameters (its declared state region).
    pub fn snapshot(&self, name: &str) -> Result<Vec<u8>, RuntimeError> {
        let muscle = self.get(name)?;
        let state = muscle.last_state.lock().map_err(|_| RuntimeError::ShuttingDown)?;
        state.clone().ok_or_else(|| RuntimeError::NoEntry { muscle: name.into(), entry: "state_ptr/state_len".into() })
    }

    /// Replaces a trainable muscle's parameters (its state region) with a snapshot taken by
    /// [`Self::snapshot`]; the bytes must have the region's exact size.
    pub fn restore(&self, name: &str, state: &[u8]) -> Result<(), RuntimeError> {
        let muscle = self.get(name)?;
        let expected = muscle.last_state.lock().map_err(|_| RuntimeError::ShuttingDown)?.as_ref().map(Vec::len);
        if expected != Some(state.len()) {
            return Err(RuntimeError::BadInput {
                muscle: name.into(),
                why: format!("snapshot is {} bytes, the state region is {expected:?}", state.len()),
            });
        }
        self.call(&muscle, false, |cell, _| {
            if cell.set_state(state) { Ok(()) } else { Err(Fault::Other("state region moved".into())) }
        })?;
        *muscle.last_state.lock().map_err(|_| RuntimeError::ShuttingDown)? = Some(state.to_vec());
        self.audit.append(&fault_event("restore", &muscle.header, json!({ "bytes": state.len() })))?;
        Ok(())
    }

    /// Runs `run` in a checked-out cell. With `keeps_state` (a `train` step), the parameters a
    /// successful call leaves behind become the muscle's last good state; `forward` never
    /// changes them, so it does not pay for the copy.
    fn call<T>(
        &self,
        muscle: &Loaded,
        keeps_state: bool,
        run: impl FnOnce(&mut Cell, CallBudget) -> Result<T, Fault>,
    ) -> Result<T, RuntimeError> {
        if muscle.quarantined.load(Ordering::Acquire) {
            return Err(RuntimeError::Quarantined {
                name: muscle.header.name.clone(),
                faults: muscle.ctx.grant.faults_before_quarantine,
            });
        }
        let queue = muscle.ctx.grant.queue;
        let cell = muscle.checkout(queue)?;
        let mut cell = match cell {
            Some(c) => c,
            None => match muscle.new_cell() {
                Ok(c) => c,
                Err(e) => {
                    muscle.checkin(None);
                    return Err(e);
                }
            },
        };
        match run(&mut cell, muscle.budget()) {
            Ok(value) => {
                if keeps_state && let Ok(mut last) = muscle.last_state.lock() {
                    cell.copy_state_into(&mut last);
                }
                muscle.calls.fetch_add(1, Ordering::Relaxed);
                let reuse = muscle.trainable || !muscle.ctx.grant.fresh_cells;
                muscle.checkin(reuse.then_some(cell));
                Ok(value)
            }
            Err(fault) => {
                // The cell may be in any state after a trap: drop it; the next call gets a
                // fresh one (with the last good parameters for a trainable muscle).
                drop(cell);
                muscle.checkin(None);
                self.record_fault(muscle, &fault)?;
                Err(RuntimeError::Fault { muscle: muscle.header.name.clone(), fault })
            }
        }
    }

    fn record_fault(&self, muscle: &Loaded, fault: &Fault) -> Result<(), RuntimeError> {
        muscle.faults.fetch_add(1, Ordering::Relaxed);
        self.audit.append(&fault_event(
            "fault",
            &muscle.header,
            json!({ "fault": fault.code(), "message": fault.to_string() }),
        ))?;
        let grant = &muscle.ctx.grant;
        let window = Duration::from_secs(grant.fault_window_secs);
        let count = {
            let mut recent = muscle.recent_faults.lock().map_err(|_| RuntimeError::ShuttingDown)?;
            let now = Instant::now();
            recent.push_back(now);
            while recent.front().is_some_and(|t| now.duration_since(*t) > window) {
                recent.pop_front();
            }
            recent.len()
        };
        if count >= grant.faults_before_quarantine as usize && !muscle.quarantined.swap(true, Ordering::AcqRel) {
            self.audit.append(&fault_event(
                "quarantine",
                &muscle.header,
                json!({ "faults": count, "window_secs": grant.fault_window_secs }),
            ))?;
        }
        Ok(())
    }

    /// Lifts a quarantine (operator action).
    pub fn release(&self, name: &str) -> Result<(), RuntimeError> {
        let muscle = self.get(name)?;
        if let Ok(mut recent) = muscle.recent_faults.lock() {
            recent.clear();
        }
        muscle.quarantined.store(false, Ordering::Release);
        self.audit.append(&fault_event("release", &muscle.header, json!({})))?;
        Ok(())
    }

    /// Unloads a muscle; calls in flight finish on their cells.
    pub fn unload(&self, name: &str) -> Result<(), RuntimeError> {
        let before = self.edit_muscles(|muscles| drop(muscles.remove(name)));
        let muscle = lookup(&before, name)?;
        self.audit.append(&fault_event("unload", &muscle.header, json!({})))?;
        Ok(())
    }

    /// Drops cached compiled code, so the next load compiles again (cold-load benchmarks,
    /// memory pressure).
    pub fn forget_compiled(&self) {
        if let Ok(mut cache) = self.compiled.lock() {
            cache.clear();
        }
    }

    /// Creates and drops one cell of a loaded muscle: measures instantiation from the pool.
    pub fn instantiate_cell(&self, name: &str) -> Result<(), RuntimeError> {
        self.get(name)?.new_cell().map(drop)
    }

    /// Seconds since the runtime opened.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

/// The state database (audit log, kv) of a home.
pub fn state_db_path(home: &Home) -> std::path::PathBuf {
    home.root().join("state.redb")
}

/// The muscle called `name` in a table snapshot, or [`RuntimeError::NotLoaded`].
fn lookup<'a>(muscles: &'a BTreeMap<String, Arc<Loaded>>, name: &str) -> Result<&'a Arc<Loaded>, RuntimeError> {
    muscles.get(name).ok_or_else(|| RuntimeError::NotLoaded(name.into()))
}

/// Rewrites every NaN to the canonical quiet NaN (the bits Cranelift's canonicalisation uses),
/// so a `nan-blind` muscle's outputs are bit-identical on every machine.
fn canonicalize_nans(values: &mut [f32]) {
    for v in values.iter_mut().filter(|v| v.is_nan()) {
        *v = f32::NAN;
    }
}

fn shapes(specs: &[referee_muscle::TensorSpec]) -> Vec<Vec<u32>> {
    specs.iter().map(|s| s.dims.clone()).collect()
}
