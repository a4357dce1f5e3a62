//! `referee run`: one call into a muscle in a fresh referee.

use anyhow::{Context, Result, bail};
use referee_runtime::{Policy, Runtime, RuntimeOptions};
use referee_trust::Home;
use serde_json::{Value, json};

use crate::cli::{EntryArg, RunArgs};

/// Flattens a JSON array of numbers, flat or nested; nested arrays must match `dims`.
pub(crate) fn flatten(text: &str, dims: &[u32], what: &str) -> Result<Vec<f32>> {
    let value: Value = serde_json::from_str(text).with_context(|| format!("{what} is not JSON"))?;
    let mut out = Vec::new();
    let mut shape = Vec::new();
    collect(&value, 0, &mut out, &mut shape).with_context(|| format!("{what} must be an array of numbers"))?;
    let expected: u64 = dims.iter().map(|d| u64::from(*d)).product();
    if out.len() as u64 != expected {
        bail!("{what} has {} values; the muscle declares shape {dims:?} ({expected} values)", out.len());
    }
    let flat = shape.len() <= 1;
    let trimmed: Vec<u32> = dims.iter().copied().skip_while(|d| *d == 1).collect();
    if !flat && shape != dims && shape.iter().copied().skip_while(|d| *d == 1).collect::<Vec<_>>() != trimmed {
        bail!("{what} is nested as {shape:?}, but the muscle declares shape {dims:?}");
    }
    Ok(out)
}

fn collect(v: &Value, depth: usize, out: &mut Vec<f32>, shape: &mut Vec<u32>) -> Result<()> {
    match v {
        Value::Number(n) => {
            out.push(n.as_f64().context("not a number")? as f32);
            Ok(())
        }
        Value::Array(items) => {
            let len = u32::try_from(items.len()).context("array too long")?;
            match shape.get(depth) {
                None => shape.push(len),
                Some(l) if *l != len => bail!("ragged array: rows of different lengths"),
                Some(_) => {}
            }
            items.iter().try_for_each(|i| collect(i, depth + 1, out, shape))
        }
        _ => bail!("found {v}"),
    }
}

/// Nests a flat output to `dims` for printing.
fn nest(values: &[f32], dims: &[u32]) -> Value {
    match dims.split_first() {
        None => values.first().map_or(Value::Null, |v| json!(v)),
        Some((_, [])) => json!(values),
        Some((_, rest)) => {
            let step = rest.iter().map(|d| *d as usize).product::<usize>().max(1);
            Value::Array(values.chunks(step).map(|c| nest(c, rest)).collect())
        }
    }
}

pub(crate) fn run(home: &Home, args: &RunArgs, json: bool) -> Result<()> {
    let policy = match &args.policy {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
            Policy::from_toml(&text).with_context(|| format!("policy {}", path.display()))?
        }
        None => Policy::permissive_default(),
    };
    let runtime = Runtime::open(home, RuntimeOptions { policy }).context("open the referee")?;
    let bytes = super::muscle::read_muscle(&args.file)?;
    let info = runtime.load(&bytes).with_context(|| format!("load {}", args.file.display()))?;
    let name = info.header.name.clone();
    // One tensor: check against its shape; several: a flat array of all of them, in order.
    let single = |specs: &[referee_muscle::TensorSpec]| match specs {
        [one] => one.dims.clone(),
        many => vec![u32::try_from(many.iter().map(|t| t.elements()).sum::<u64>()).unwrap_or(u32::MAX)],
    };
    let in_dims = single(&info.header.inputs);
    let out_dims = single(&info.header.outputs);
    let input = flatten(&args.input, &in_dims, "--input")?;
    let output = match args.entry {
        EntryArg::Forward => {
            let y = runtime.invoke(&name, &input).with_context(|| format!("run {name}"))?;
            nest(&y, &out_dims)
        }
        EntryArg::Train => {
            let target = args.target.as_deref().context("--entry train needs --target JSON")?;
            let y = flatten(target, &out_dims, "--target")?;
            let loss = runtime.train(&name, &input, &y, args.lr).with_context(|| format!("train {name}"))?;
            json!({ "loss": loss })
        }
    };
    for line in runtime.drain_logs() {
        eprintln!("[{}] {}", line.muscle, line.message);
    }
    if json {
        println!(
            "{:#}",
            json!({ "muscle": name, "version": info.header.version, "entry": format!("{:?}", args.entry).to_lowercase(), "output": output })
        );
    } else {
        println!("{output}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_flat_or_nested_to_the_declared_shape() -> Result<()> {
        assert_eq!(flatten("[1, 2, 3, 4]", &[1, 4], "x")?, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(flatten("[[1, 2, 3, 4]]", &[1, 4], "x")?, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(flatten("[[1, 2], [3, 4]]", &[2, 2], "x")?, vec![1.0, 2.0, 3.0, 4.0]);
        assert!(flatten("[[1, 2, 3], [4]]", &[2, 2], "x").is_err());
        assert!(flatten("[[1, 2], [3, 4]]", &[1, 4], "x").is_err());
        assert!(flatten("[1, 2, 3]", &[1, 4], "x").is_err());
        assert!(flatten("[1, \"a\", 3, 4]", &[1, 4], "x").is_err());
        Ok(())
    }

    #[test]
    fn outputs_nest_to_their_shape() {
        assert_eq!(nest(&[1.0, 2.0, 3.0, 4.0], &[2, 2]), json!([[1.0, 2.0], [3.0, 4.0]]));
        assert_eq!(nest(&[0.5], &[1, 1]), json!([[0.5]]));
    }
}
