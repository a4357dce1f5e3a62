//! `referee compile`: frontend → validated wasm → sealed `.muscle`.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use referee_compiler::SourceKind;
use referee_muscle::{
    ABI_V1, Binding, DType, Delivery, KeyId, Limits, MuscleId, MuscleSpec, SealOptions, Suite, TensorSpec,
    limits::MAX_PAYLOAD_LEN, seal,
};
use referee_trust::{Home, read_referee_public};
use serde_json::json;

use crate::cli::{CompileArgs, ModeArg, SuiteArg};

/// Parses "65536", "64KiB", "64K", "16MiB", "1GiB" (binary units).
fn parse_bytes(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 =
        digits.parse().with_context(|| format!("memory limit {text:?} is not a number with an optional unit"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        other => bail!("unknown unit {other:?} in memory limit {text:?}; use B, KiB, MiB or GiB"),
    };
    n.checked_mul(1 << shift).with_context(|| format!("memory limit {text:?} is too large"))
}

fn parse_shape(name: &str, text: &str) -> Result<TensorSpec> {
    let dims = text
        .split(',')
        .map(|d| d.trim().parse::<u32>().with_context(|| format!("shape {text:?}: {d:?} is not a dimension")))
        .collect::<Result<Vec<_>>>()?;
    Ok(TensorSpec { name: name.into(), dtype: DType::F32, dims })
}

fn shape_or(name: &str, flag: Option<&str>, inferred: Option<&Vec<u32>>) -> Result<Vec<TensorSpec>> {
    Ok(match (flag, inferred) {
        (Some(text), _) => vec![parse_shape(name, text)?],
        (None, Some(dims)) => vec![TensorSpec { name: name.into(), dtype: DType::F32, dims: dims.clone() }],
        (None, None) => Vec::new(),
    })
}

/// A valid muscle name from a file name: lowercase, other characters become '-'.
fn name_from_path(path: &Path) -> String {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("muscle");
    let mut name: String = stem
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' })
        .take(64)
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        name.insert(0, 'm');
        name.truncate(64);
    }
    name
}

fn binding(args: &CompileArgs) -> Result<Option<Binding>> {
    if args.bind.is_empty() {
        return Ok(None);
    }
    if args.bind.iter().any(|b| b == "any") {
        if args.bind.len() > 1 {
            bail!("--bind any cannot be combined with referee ids");
        }
        return Ok(Some(Binding::Any));
    }
    let ids = args
        .bind
        .iter()
        .map(|b| KeyId::from_hex(b).with_context(|| format!("--bind {b}")))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(Binding::Referees(ids)))
}

pub(crate) fn compile(home: &Home, args: &CompileArgs, json: bool) -> Result<()> {
    let input = &args.input;
    // Refuse an unknown extension before touching the file.
    SourceKind::from_path(input).with_context(|| format!("compile {}", input.display()))?;
    let size = std::fs::metadata(input).with_context(|| format!("read {}", input.display()))?.len();
    if size > MAX_PAYLOAD_LEN {
        bail!("{} is {size} bytes; muscles hold at most {MAX_PAYLOAD_LEN} bytes", input.display());
    }
    let module = compile_with_progress(input, size, json)?;

    let name = args.name.clone().unwrap_or_else(|| name_from_path(input));
    let capabilities = if args.capabilities.is_empty() { module.capabilities() } else { args.capabilities.clone() };
    let mut spec = MuscleSpec {
        name,
        muscle_id: args.muscle_id.as_deref().map(MuscleId::from_hex).transpose().context("--muscle-id")?,
        version: args.version,
        created_at: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        binding: binding(args)?,
        abi: ABI_V1.into(),
        capabilities,
        limits: Limits { memory_bytes: parse_bytes(&args.memory)?, time_ms: args.time_ms, fuel: args.fuel },
        // Flags win; otherwise the shapes the frontend inferred (Python/ONNX models).
        inputs: shape_or("x", args.input_shape.as_deref(), module.input_shape.as_ref())?,
        outputs: shape_or("y", args.output_shape.as_deref(), module.output_shape.as_ref())?,
        extensions: vec![],
    };
    spec.declare_nan_blind(module.nan_blind);
    let publisher = home.publisher_secret()?;
    let options = SealOptions {
        suite: match args.suite {
            SuiteArg::Aes256Gcm => Suite::Aes256Gcm,
            SuiteArg::ChaCha20Poly1305 => Suite::ChaCha20Poly1305,
        },
        post_quantum: args.pq,
    };
    let blob = match args.mode {
        ModeArg::Master => {
            if !args.recipients.is_empty() {
                bail!("--recipient needs --mode recipient");
            }
            let master = home.master_key()?;
            seal(&spec, &module.bytes, &publisher, Delivery::MasterKey(&master), options)
        }
        ModeArg::Recipient => {
            let files =
                if args.recipients.is_empty() { vec![home.referee_pub_path()] } else { args.recipients.clone() };
            let recipients = files
                .iter()
                .map(|f| read_referee_public(f).with_context(|| format!("--recipient {}", f.display())))
                .collect::<Result<Vec<_>>>()?;
            seal(&spec, &module.bytes, &publisher, Delivery::Recipients(&recipients), options)
        }
    }
    .context("seal")?;
    write_atomically(&args.output, &blob)?;

    let sealed = referee_muscle::SealedMuscle::parse(&blob).context("re-reading the sealed muscle")?;
    let value = json!({
        "output": args.output,
        "bytes": blob.len(),
        "header": crate::output::header(&sealed.header),
        "key_delivery": crate::output::delivery(&sealed.delivery),
        "exports": module.exports,
        "summary": module.summary.as_ref().map(|m| json!({
            "parameters": m.parameters,
            "trainable_parameters": m.trainable_parameters,
            "entry_points": m.entry_points,
            "code_bytes": m.code_bytes,
        })),
    });
    super::print(json, &value, || {
        let dims = |t: &[TensorSpec]| t.first().map_or_else(|| "-".to_owned(), |t| format!("{:?}", t.dims));
        let mut text = format!(
            "sealed {} v{} → {} ({} bytes; payload {} bytes; input {} → output {}; exports: {})",
            sealed.header.name,
            sealed.header.version,
            args.output.display(),
            blob.len(),
            sealed.header.payload_len,
            dims(&sealed.header.inputs),
            dims(&sealed.header.outputs),
            module.exports.join(", ")
        );
        if let Some(m) = &module.summary {
            text.push_str(&format!(
                "\n{} parameters ({} trainable), {} bytes of code, entry points: {}",
                m.parameters,
                m.trainable_parameters,
                m.code_bytes,
                m.entry_points.join(", ")
            ));
        }
        text
    });
    Ok(())
}

/// Sources at least this large show a progress bar on an interactive stderr.
const PROGRESS_FROM_BYTES: u64 = 256 << 10;

/// Compiles `input`; large models show a progress bar (never with `--json`, never when stderr
/// is not a terminal).
fn compile_with_progress(input: &Path, size: u64, json: bool) -> Result<referee_compiler::WasmModule> {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    use referee_compiler::{Progress, Stage};

    let bar = if json || size < PROGRESS_FROM_BYTES {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr_with_hz(10))
    };
    if let Ok(style) = ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} nodes {elapsed}") {
        bar.set_style(style.progress_chars("=> "));
    }
    let report = |p: Progress| {
        let stage = match p.stage {
            Stage::Lowering => "lowering",
            Stage::Emitting => "emitting",
            Stage::Validating => "validating",
        };
        bar.set_message(stage);
        bar.set_length(p.total);
        bar.set_position(p.done);
    };
    let module = referee_compiler::compile_path_with_progress(input, &report)
        .with_context(|| format!("compile {}", input.display()));
    bar.finish_and_clear();
    module
}

/// Writes next to the target, syncs, renames and syncs the directory: a reader never sees half
/// a muscle, and once this returns the muscle survives a crash or power loss.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    let file_name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp.{}", file_name.to_string_lossy(), std::process::id()));
    let written = std::fs::File::create(&tmp).and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
    let renamed = written
        .with_context(|| format!("write {}", tmp.display()))
        .and_then(|()| std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display())));
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    renamed?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("sync {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse_with_binary_units() -> Result<()> {
        assert_eq!(parse_bytes("0")?, 0);
        assert_eq!(parse_bytes("65536")?, 65536);
        assert_eq!(parse_bytes("64KiB")?, 64 * 1024);
        assert_eq!(parse_bytes("16M")?, 16 << 20);
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("99999999999999GiB").is_err());
        Ok(())
    }

    #[test]
    fn names_from_paths_are_valid_muscle_names() {
        for (path, name) in [("Feanor.wat", "feanor"), ("my model.wasm", "my-model"), ("_x.wat", "m_x")] {
            assert_eq!(name_from_path(Path::new(path)), name);
            assert!(referee_muscle::Header::validate_name(&name_from_path(Path::new(path))).is_ok());
        }
    }
}
