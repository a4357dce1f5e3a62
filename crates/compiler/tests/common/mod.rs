//! Shared by the compiler's integration tests: a referee home + runtime in a temporary
//! directory, deterministic test data, tolerance checks and the Python reference drivers.

// Test helpers: as clippy.toml says for #[test] code, a failed unwrap, index or panic here is
// a failed test. Not every test binary uses every helper.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    clippy::indexing_slicing,
    dead_code,
    unreachable_pub,
    missing_docs,
    reason = "test helpers shared by several test binaries"
)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use referee_compiler::WasmModule;
use referee_muscle::{Delivery, MuscleSpec, SealOptions, seal};
use referee_runtime::{Policy, Runtime, RuntimeOptions};
use referee_trust::Home;
use serde_json::Value;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

pub const NUMPY_PIN: &str = "numpy==2.4.6";

pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// A referee home and runtime in a temporary directory.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub home: Home,
    pub runtime: Runtime,
}

impl Harness {
    pub fn new() -> Result<Self, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let home = Home::new(dir.path().join("home"));
        home.keygen()?;
        let runtime = Runtime::open(&home, RuntimeOptions { policy: Policy::permissive_default() })?;
        Ok(Self { dir, home, runtime })
    }

    pub fn load(&self, name: &str, module: &WasmModule) -> TestResult {
        let input = module.input_shape.clone().ok_or("no input shape")?;
        let output = module.output_shape.clone().ok_or("no output shape")?;
        let mut spec = MuscleSpec::new(name, &input, &output);
        spec.declare_nan_blind(module.nan_blind);
        let blob = seal(
            &spec,
            &module.bytes,
            &self.home.publisher_secret()?,
            Delivery::MasterKey(&self.home.master_key()?),
            SealOptions::default(),
        )?;
        self.runtime.load(&blob)?;
        Ok(())
    }

    /// Writes a model source (and compiles it from its path).
    pub fn write(&self, file: &str, source: &str) -> Result<PathBuf, Box<dyn std::error::Error>> {
        let path = self.dir.path().join(file);
        std::fs::write(&path, source)?;
        Ok(path)
    }
}

/// Runs a reference script from `tests/` with `args`, feeding `jobs` as JSON on stdin, and
/// parses its JSON output. `pins` names what to `pip install` when it fails.
pub fn reference(script: &str, args: &[&str], jobs: &Value, pins: &str) -> Value {
    let driver = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(script);
    let child = Command::new("python3")
        .arg(driver)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => panic!("python3 is required for the reference ({e}); install python3 and `pip install {pins}`"),
    };
    child.stdin.take().unwrap().write_all(jobs.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the reference {script} failed (are its packages installed? `pip install {pins}`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs the NumPy reference over `jobs` (see `numpy_ref.py`).
pub fn numpy(jobs: &Value) -> Vec<Vec<Value>> {
    serde_json::from_value(reference("numpy_ref.py", &[], jobs, NUMPY_PIN)).unwrap()
}

/// A JSON array of numbers as f64 (`null`, NumPy's NaN/inf spelling aside, becomes NaN).
pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|v| v.as_f64().unwrap_or(f64::NAN)).collect()
}

/// splitmix64: deterministic test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }

    /// A NumPy literal of the given shape.
    pub fn literal(&mut self, shape: &[usize]) -> String {
        match shape {
            [] => format!("{:.6}", self.next()),
            [n, rest @ ..] => format!("[{}]", (0..*n).map(|_| self.literal(rest)).collect::<Vec<_>>().join(", ")),
        }
    }
}

pub fn close(got: f32, want: f64, tol: f64) -> bool {
    let d = (f64::from(got) - want).abs();
    d <= tol || d <= tol * want.abs() || (got.is_nan() && want.is_nan())
}
