//! Worknodes as gateway tools: `node_create`, `node_update`, `node_get`, `node_tree`.
//!
//! The gateway exposes every [`referee_tools::Tool`] over REST (`POST /v1/tools/{tool}`) and
//! MCP, so these four are the worknode routes and MCP tools. The gateway's own token decides
//! whether a caller may use a tool at all, and which subtrees it may touch
//! ([`CallScope::node_prefixes`], from `referee token create --node /acme`): a path outside them
//! is refused before it is even looked up, so the answer says nothing about what exists there.
//! Within its subtrees, a call acts with the authority of the worknode capability token in its
//! `token` parameter (base64, verified by the system's [`crate::Capabilities`]), or — when the
//! system has no capability root configured — with [`Authority::Subtrees`] of the caller's
//! subtrees (the whole tree for an admin).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use referee_tools::{CallScope, SharedTool, Tool, ToolAnnotations, ToolError, ToolOutput, ToolSpec};
use serde_json::{Value, json};

use crate::{
    Authority, Completion, Consistency, CreateError, MAX_IDEMPOTENCY_KEY, QueryError, SendError, System, WnPath,
    WorknodeId, WriteError,
};

/// How long `node_get` waits for queued updates of the queried worknode to apply.
const SETTLE: Duration = Duration::from_secs(5);
/// Most entries `node_tree` returns.
const MAX_TREE: usize = 10_000;

#[derive(Clone, Copy)]
enum Kind {
    Create,
    Update,
    Get,
    Tree,
}

struct NodeTool {
    system: Arc<System>,
    kind: Kind,
    spec: ToolSpec,
}

/// The four worknode tools over `system`.
pub fn worknode_tools(system: Arc<System>) -> Vec<SharedTool> {
    let token = json!({"type": "string", "description": "worknode capability token (base64); required when the referee issues worknode tokens"});
    let path = json!({"type": "string", "description": "worknode path such as /acme/research", "pattern": "^/"});
    let make = |kind, name: &str, description: &str, input: Value, output: Value, annotations| -> SharedTool {
        Arc::new(NodeTool {
            system: system.clone(),
            kind,
            spec: ToolSpec {
                name: name.to_owned(),
                description: description.to_owned(),
                input_schema: input,
                output_schema: output,
                annotations,
                torsion: 0.0,
            },
        })
    };
    let view = json!({"type": "object", "properties": {
        "id": {"type": "string"}, "path": {"type": "string"}, "kind": {"type": "string"},
        "consistency": {"type": "string"}, "version": {"type": "integer"}, "children": {"type": "integer"},
        "queued": {"type": "integer"}, "stopped": {"type": "boolean"}, "restarts": {"type": "integer"},
        "state": {"type": "object"}}});
    let read_only = ToolAnnotations { read_only: true, destructive: false, idempotent: true, open_world: false };
    vec![
        make(
            Kind::Create,
            "node_create",
            "Creates a worknode at `path` (its parent must exist) with a behaviour kind and a consistency level.",
            json!({"type": "object", "required": ["path"], "additionalProperties": false, "properties": {
                "path": path, "kind": {"type": "string", "default": "data"},
                "consistency": {"enum": ["local", "eventual"], "default": "local"}, "token": token}}),
            json!({"type": "object", "properties": {"id": {"type": "string"}, "path": {"type": "string"},
                "durable": {"const": true, "description": "the worknode is stored: it survives a crash from now on"}}}),
            ToolAnnotations { read_only: false, destructive: false, idempotent: false, open_world: false },
        ),
        make(
            Kind::Update,
            "node_update",
            "Applies a CRDT operation to a field of a worknode's state: grow, add, set, write, insert, remove, put, delete. \
             Answers once the change is durable (it survives a crash); with an idempotency_key a retry of a call whose \
             answer was lost is not applied twice.",
            json!({"type": "object", "required": ["path", "field", "op"], "additionalProperties": false, "properties": {
                "path": path, "field": {"type": "string"},
                "op": {"enum": ["grow", "add", "set", "write", "insert", "remove", "put", "delete"]},
                "args": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
                "idempotency_key": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY,
                    "description": "names this update on this worknode (a UUID): a retry with a key already stored applies nothing and answers duplicate: true with the original seq"},
                "token": token}}),
            json!({"type": "object", "properties": {
                "id": {"type": "string"},
                "durable": {"const": true, "description": "the update is committed to the event store (fsync) and survives a crash"},
                "seq": {"type": "integer", "description": "the event sequence number of the update in the worknode's log"},
                "version": {"type": "integer", "description": "the worknode's version right after the commit that holds the update (other updates may share it, so it can be above seq)"},
                "duplicate": {"type": "boolean", "description": "the idempotency key was already stored: nothing new was applied, seq is the original's"}}}),
            ToolAnnotations { read_only: false, destructive: true, idempotent: false, open_world: false },
        ),
        make(
            Kind::Get,
            "node_get",
            "Returns a worknode's metadata and CRDT state.",
            json!({"type": "object",
            "required": ["path"], "additionalProperties": false, "properties": {"path": path, "token": token}}),
            view,
            read_only,
        ),
        make(
            Kind::Tree,
            "node_tree",
            "Lists the worknodes under `path` (default the root), depth first.",
            json!({"type": "object", "additionalProperties": false, "properties": {
                "path": path, "limit": {"type": "integer", "minimum": 1, "maximum": MAX_TREE}, "token": token}}),
            json!({"type": "object", "properties": {"nodes": {"type": "array", "items": {"type": "object"}}}}),
            read_only,
        ),
    ]
}

fn text<'a>(params: &'a Value, key: &str) -> Result<Option<&'a str>, ToolError> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ToolError::InvalidParams(format!("`{key}` must be a string"))),
    }
}

fn required<'a>(params: &'a Value, key: &str) -> Result<&'a str, ToolError> {
    text(params, key)?.ok_or_else(|| ToolError::InvalidParams(format!("`{key}` is required")))
}

fn wn_path(s: &str) -> Result<WnPath, ToolError> {
    s.parse().map_err(|e| ToolError::InvalidParams(format!("path {s:?}: {e}")))
}

/// The subtrees a gateway scope allows: `None` for the whole tree. Prefixes that are not
/// worknode paths (a filesystem-style prefix the gateway accepted) can hold no worknode and are
/// dropped.
fn subtrees(scope: &CallScope) -> Option<Arc<[WnPath]>> {
    let prefixes = scope.node_prefixes.as_ref()?;
    Some(prefixes.iter().filter_map(|p| p.parse::<WnPath>().ok()).collect())
}

/// Refuses `path` unless it lies in one of `subtrees` (segment by segment).
fn covered(subtrees: Option<&[WnPath]>, path: &WnPath) -> Result<(), ToolError> {
    let Some(subtrees) = subtrees else { return Ok(()) };
    if subtrees.iter().any(|s| path.is_within(s)) {
        return Ok(());
    }
    if subtrees.is_empty() {
        return Err(ToolError::Forbidden(
            "the token has no worknode rights; mint one with `referee token create --node SUBTREE`".to_owned(),
        ));
    }
    let names: Vec<&str> = subtrees.iter().map(WnPath::as_str).collect();
    Err(ToolError::Forbidden(format!("the token's worknode subtrees {names:?} do not hold {path}")))
}

/// The tool error for a write that did not become durable.
fn write_refused(e: &WriteError) -> ToolError {
    let message = e.to_string();
    match e {
        WriteError::Send(SendError::Denied(_)) => ToolError::Forbidden(message),
        WriteError::Send(SendError::NotFound(_)) => ToolError::NotFound(message),
        WriteError::Rejected { .. } | WriteError::BadKey { .. } => ToolError::InvalidParams(message),
        WriteError::Send(SendError::Full { .. } | SendError::ShuttingDown | SendError::Stopped(_))
        | WriteError::Stopped(_)
        | WriteError::Store(_) => ToolError::Unavailable(message),
        _ => ToolError::Failed(message),
    }
}

impl NodeTool {
    fn authority(&self, params: &Value, subtrees: Option<&Arc<[WnPath]>>) -> Result<Authority, ToolError> {
        match (text(params, "token")?, self.system.capabilities()) {
            (Some(token), Some(caps)) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(token)
                    .map_err(|e| ToolError::InvalidParams(format!("`token` is not base64: {e}")))?;
                caps.verify(&bytes).map_err(|e| ToolError::Forbidden(format!("worknode token refused: {e}")))
            }
            (None, Some(_)) => {
                Err(ToolError::Forbidden("this referee issues worknode tokens: pass one in `token`".to_owned()))
            }
            (Some(_), None) => {
                Err(ToolError::InvalidParams("this referee has no worknode capability root; omit `token`".to_owned()))
            }
            (None, None) => Ok(subtrees.map_or(Authority::System, |s| Authority::Subtrees(s.clone()))),
        }
    }

    fn lookup(&self, path: &WnPath) -> Result<WorknodeId, ToolError> {
        self.system.resolve(path).ok_or_else(|| ToolError::NotFound(format!("no worknode at {path}")))
    }

    fn run(&self, params: &Value, scope: &CallScope) -> Result<Value, ToolError> {
        if !params.is_object() {
            return Err(ToolError::InvalidParams("params must be an object".to_owned()));
        }
        let subtrees = subtrees(scope);
        // The one path each call names (the new node, the target, the listed subtree), checked
        // against the caller's subtrees before anything else looks at it.
        let target = match self.kind {
            Kind::Tree => wn_path(text(params, "path")?.unwrap_or("/"))?,
            Kind::Create | Kind::Update | Kind::Get => wn_path(required(params, "path")?)?,
        };
        covered(subtrees.as_deref(), &target)?;
        let auth = self.authority(params, subtrees.as_ref())?;
        let refused = |e: &dyn std::fmt::Display| {
            let message = e.to_string();
            if message.contains("not permitted") || message.contains("capabilit") || message.contains("token") {
                ToolError::Forbidden(message)
            } else {
                ToolError::InvalidParams(message)
            }
        };
        match self.kind {
            Kind::Create => {
                let path = target;
                let (parent, name) =
                    path.split_last().ok_or_else(|| ToolError::InvalidParams("cannot create the root".to_owned()))?;
                let consistency = match text(params, "consistency")?.unwrap_or("local") {
                    "local" => Consistency::Local,
                    "eventual" => Consistency::Eventual,
                    other => {
                        return Err(ToolError::InvalidParams(format!(
                            "consistency {other:?}: use local or eventual (strong comes with the cluster)"
                        )));
                    }
                };
                let kind = text(params, "kind")?.unwrap_or("data");
                // Durable on return: the worknode's record is committed before its id is known.
                let id = self.system.create(&auth, &parent, name, kind, consistency).map_err(|e| match e {
                    // The server's disk, not the request: retry later.
                    CreateError::Store(_) => ToolError::Unavailable(e.to_string()),
                    other => refused(&other),
                })?;
                Ok(json!({"id": id.to_string(), "path": path.to_string(), "durable": true}))
            }
            Kind::Update => {
                let path = target;
                let args: Vec<String> = match params.get("args") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(items)) => items
                        .iter()
                        .map(|v| v.as_str().map(str::to_owned))
                        .collect::<Option<_>>()
                        .ok_or_else(|| ToolError::InvalidParams("`args` must be strings".to_owned()))?,
                    Some(_) => return Err(ToolError::InvalidParams("`args` must be an array".to_owned())),
                };
                let op = crate::cli::parse_op(required(params, "op")?, &args)
                    .map_err(|e| ToolError::InvalidParams(format!("{e:#}")))?;
                let key = text(params, "idempotency_key")?;
                let ops = vec![(required(params, "field")?.to_owned(), op)];
                let id = self.lookup(&path)?;
                let done = match key {
                    Some(key) => self.system.update_idempotent(&auth, id, ops, key.as_bytes()),
                    None => self.system.update(&auth, id, ops).map_err(WriteError::from),
                };
                // Answered only once durable: the gateway runs tools on its blocking pool.
                let c = done.and_then(Completion::wait).map_err(|e| write_refused(&e))?;
                Ok(
                    json!({"id": id.to_string(), "durable": true, "seq": c.seq, "version": c.version, "duplicate": c.duplicate}),
                )
            }
            Kind::Get => {
                let path = target;
                let id = self.lookup(&path)?;
                // Updates apply in the worknode's turn; let the ones queued to it land first.
                self.system.settle(id, SETTLE);
                let v = self.system.query(&auth, id, Consistency::Local).map_err(|e| match e {
                    QueryError::Unavailable(_) => ToolError::Unavailable(e.to_string()),
                    other => refused(&other),
                })?;
                Ok(json!({
                    "id": v.id.to_string(), "path": v.path.to_string(), "kind": v.kind,
                    "consistency": format!("{:?}", v.consistency).to_lowercase(), "version": v.version,
                    "children": v.children, "queued": v.queued, "stopped": v.stopped, "restarts": v.restarts,
                    "state": v.state.to_json(),
                }))
            }
            Kind::Tree => {
                let path = target;
                let limit = match params.get("limit") {
                    None | Some(Value::Null) => MAX_TREE,
                    Some(v) => v
                        .as_u64()
                        .filter(|&n| (1..=MAX_TREE as u64).contains(&n))
                        .ok_or_else(|| ToolError::InvalidParams(format!("`limit` must be 1..={MAX_TREE}")))?
                        as usize,
                };
                let nodes: Vec<Value> = self
                    .system
                    .tree(&auth, &path, limit)
                    .map_err(|e| refused(&e))?
                    .into_iter()
                    .map(|e| {
                        json!({"id": e.id.to_string(), "path": e.path.to_string(), "kind": e.kind,
                            "consistency": format!("{:?}", e.consistency).to_lowercase(), "children": e.children})
                    })
                    .collect();
                Ok(json!({ "nodes": nodes }))
            }
        }
    }
}

impl Tool for NodeTool {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    fn call(&self, params: Value, scope: &CallScope) -> Result<ToolOutput, ToolError> {
        let data = self.run(&params, scope)?;
        Ok(ToolOutput { data, reality_index: 1.0, torsion: 0.0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SystemConfig;

    fn tools() -> (Arc<System>, Vec<SharedTool>) {
        let system = Arc::new(System::start(SystemConfig::default(), None, None).unwrap());
        let tools = worknode_tools(system.clone());
        (system, tools)
    }

    fn call(tools: &[SharedTool], name: &str, params: Value) -> Result<Value, ToolError> {
        let tool = tools.iter().find(|t| t.spec().name == name).unwrap();
        tool.call(params, &CallScope::default()).map(|o| o.data)
    }

    #[test]
    fn create_update_get_and_tree_round_trip() {
        let (_system, tools) = tools();
        call(&tools, "node_create", json!({"path": "/acme"})).unwrap();
        let created =
            call(&tools, "node_create", json!({"path": "/acme/research", "consistency": "eventual"})).unwrap();
        for n in [3, 4] {
            call(
                &tools,
                "node_update",
                json!({"path": "/acme/research", "field": "hits", "op": "grow", "args": [n.to_string()]}),
            )
            .unwrap();
        }
        let view = call(&tools, "node_get", json!({"path": "/acme/research"})).unwrap();
        assert_eq!(view["id"], created["id"]);
        assert_eq!(view["state"]["hits"], json!(7), "{view}");
        assert_eq!(view["consistency"], "eventual");
        let tree = call(&tools, "node_tree", json!({"path": "/acme"})).unwrap();
        let paths: Vec<&str> = tree["nodes"].as_array().unwrap().iter().map(|n| n["path"].as_str().unwrap()).collect();
        assert!(paths.contains(&"/acme/research"), "{tree}");
    }

    #[test]
    fn bad_parameters_are_refused_with_what_to_fix() {
        let (_system, tools) = tools();
        let cases = [
            ("node_create", json!({"path": "/"}), "cannot create the root"),
            ("node_create", json!({"path": "/a", "consistency": "strong"}), "strong"),
            ("node_create", json!({"path": "/missing/child"}), ""),
            ("node_update", json!({"path": "/nope", "field": "f", "op": "grow", "args": ["1"]}), "no worknode"),
            ("node_update", json!({"path": "/", "field": "f", "op": "explode"}), "unknown operation"),
            ("node_update", json!({"path": "/", "field": "f", "op": "grow", "args": ["1", "2"]}), "takes 1 argument"),
            ("node_get", json!({"path": 7}), "must be a string"),
            ("node_tree", json!({"limit": 0}), "limit"),
            ("node_get", json!({"path": "/", "token": "abc"}), "no worknode capability root"),
        ];
        for (tool, params, want) in cases {
            let err = call(&tools, tool, params.clone()).expect_err(&format!("{tool} {params} succeeded"));
            assert!(err.to_string().contains(want), "{tool} {params}: {err}");
        }
    }

    #[test]
    fn a_scoped_caller_acts_only_inside_its_subtrees() {
        let (system, tools) = tools();
        for path in ["/acme", "/acme/research", "/acme/research2", "/beta"] {
            call(&tools, "node_create", json!({"path": path})).unwrap();
        }
        let scoped = |prefixes: &[&str]| CallScope {
            node_prefixes: Some(prefixes.iter().map(|p| (*p).to_owned()).collect()),
            ..CallScope::default()
        };
        let run = |scope: &CallScope, name: &str, params: Value| {
            let tool = tools.iter().find(|t| t.spec().name == name).unwrap();
            tool.call(params, scope).map(|o| o.data)
        };
        let research = scoped(&["/acme/research/"]);
        let grow = json!({"path": "/acme/research", "field": "hits", "op": "grow", "args": ["2"]});
        run(&research, "node_update", grow).unwrap();
        run(&research, "node_create", json!({"path": "/acme/research/x"})).unwrap();
        run(&research, "node_get", json!({"path": "/acme/research/x"})).unwrap();
        let listed = run(&research, "node_tree", json!({"path": "/acme/research"})).unwrap();
        assert_eq!(listed["nodes"].as_array().unwrap().len(), 2, "{listed}");
        let outside = [
            ("node_get", json!({"path": "/acme"})),
            ("node_get", json!({"path": "/acme/research2"})),
            ("node_get", json!({"path": "/nonexistent"})),
            ("node_update", json!({"path": "/beta", "field": "f", "op": "grow", "args": ["1"]})),
            ("node_create", json!({"path": "/acme/sales"})),
            ("node_tree", json!({})),
            ("node_tree", json!({"path": "/acme"})),
        ];
        for (name, params) in &outside {
            let err = run(&research, name, params.clone()).expect_err(&format!("{name} {params}"));
            assert!(matches!(err, ToolError::Forbidden(_)), "{name} {params}: {err}");
        }
        // No subtree at all: nothing, not even the root.
        let none = scoped(&[]);
        let err = run(&none, "node_get", json!({"path": "/"})).unwrap_err();
        assert!(err.to_string().contains("--node"), "{err}");
        // The system refuses the authority on its own, whatever the tool checked.
        let auth = Authority::Subtrees(Arc::from([wn_path("/acme/research").unwrap()]));
        let beta = system.resolve(&wn_path("/beta").unwrap()).unwrap();
        assert!(system.query(&auth, beta, Consistency::Local).is_err());
    }
}
