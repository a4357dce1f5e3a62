//! Wire forms of core types for `--json` and text output (core types stay serde-free).

use referee_muscle::{Binding, Header, KeyDelivery, SealedMuscle, TensorSpec};
use serde_json::{Value, json};

fn tensor(t: &TensorSpec) -> Value {
    json!({ "name": t.name, "dtype": t.dtype.label(), "dims": t.dims })
}

fn binding(b: &Binding) -> Value {
    match b {
        Binding::Any => json!("any"),
        Binding::Referees(ids) => json!(ids.iter().map(ToString::to_string).collect::<Vec<_>>()),
    }
}

/// The header as JSON.
pub(crate) fn header(h: &Header) -> Value {
    json!({
        "name": h.name,
        "version": h.version,
        "muscle_id": h.muscle_id.to_string(),
        "publisher": h.publisher.to_string(),
        "created_at": h.created_at,
        "suite": h.suite.label(),
        "key_mode": h.key_mode.label(),
        "signature_scheme": h.signature_scheme.label(),
        "binding": binding(&h.binding),
        "abi": h.abi,
        "capabilities": h.capabilities,
        "limits": { "memory_bytes": h.limits.memory_bytes, "time_ms": h.limits.time_ms, "fuel": h.limits.fuel },
        "inputs": h.inputs.iter().map(tensor).collect::<Vec<_>>(),
        "outputs": h.outputs.iter().map(tensor).collect::<Vec<_>>(),
        "code_hash": hex::encode(h.code_hash),
        "payload_len": h.payload_len,
        "extensions": h.extensions.iter().map(|e| json!({ "tag": e.tag, "len": e.data.len() })).collect::<Vec<_>>(),
    })
}

/// The key delivery record as JSON (ids only; wrapped keys are opaque).
pub(crate) fn delivery(d: &KeyDelivery) -> Value {
    match d {
        KeyDelivery::MasterKey(m) => json!({ "mode": "master-key", "master_key_id": m.master_key_id.to_string() }),
        KeyDelivery::Recipients(list) => json!({
            "mode": "recipients",
            "recipients": list.iter().map(|r| r.referee.to_string()).collect::<Vec<_>>(),
        }),
    }
}

fn shape_text(list: &[TensorSpec]) -> String {
    if list.is_empty() {
        return "-".into();
    }
    list.iter()
        .map(|t| {
            let dims = t.dims.iter().map(ToString::to_string).collect::<Vec<_>>().join("x");
            format!("{}:{}[{}]", if t.name.is_empty() { "_" } else { &t.name }, t.dtype, dims)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn or_default(v: u64, unit: &str) -> String {
    if v == 0 { "referee default".into() } else { format!("{v} {unit}") }
}

/// The header and key delivery as aligned text.
pub(crate) fn inspect_text(sealed: &SealedMuscle<'_>, file_len: usize) -> String {
    let h = &sealed.header;
    let binding = match &h.binding {
        Binding::Any => "any referee".to_owned(),
        Binding::Referees(ids) => ids.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n              "),
    };
    let delivery = match &sealed.delivery {
        KeyDelivery::MasterKey(m) => format!("master key {}", m.master_key_id),
        KeyDelivery::Recipients(list) => format!(
            "HPKE to {} referee(s): {}",
            list.len(),
            list.iter().map(|r| r.referee.short()).collect::<Vec<_>>().join(", ")
        ),
    };
    let caps = if h.capabilities.is_empty() { "none".to_owned() } else { h.capabilities.join(", ") };
    [
        format!("muscle        {} v{}", h.name, h.version),
        format!("muscle id     {}", h.muscle_id),
        format!("publisher     {}", h.publisher),
        format!("created at    {} (unix seconds)", h.created_at),
        format!("abi           {}", h.abi),
        format!("capabilities  {caps}"),
        format!("memory        {}", or_default(h.limits.memory_bytes, "bytes")),
        format!("time per call {}", or_default(u64::from(h.limits.time_ms), "ms")),
        format!("fuel per call {}", or_default(h.limits.fuel, "units")),
        format!("inputs        {}", shape_text(&h.inputs)),
        format!("outputs       {}", shape_text(&h.outputs)),
        format!("binding       {binding}"),
        format!("key delivery  {delivery}"),
        format!("cipher        {}", h.suite),
        format!("signatures    {}", h.signature_scheme),
        format!("code hash     sha256:{}", hex::encode(h.code_hash)),
        format!("payload       {} bytes (file {} bytes)", h.payload_len, file_len),
    ]
    .join("\n")
}
