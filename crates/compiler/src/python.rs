//! The Python (NumPy subset) frontend: source → IR. The subset is documented in
//! `docs/python-subset.md`; everything outside it is an error at `file:line:column` naming the
//! construct.

use std::collections::BTreeMap;
use std::path::Path;

use ruff_python_ast::{self as ast, Expr, Number, Operator, Stmt, UnaryOp};
use ruff_text_size::{Ranged, TextRange};

use crate::CompileError;
use crate::grad::{self, Loss};
use crate::ir::{Binary, Graph, Model, NodeId, Reduce, Training, Unary, numel};

/// Most elements one `np.array` literal may hold.
pub(crate) const MAX_LITERAL_ELEMENTS: usize = 1 << 20;
/// Deepest helper-function inlining.
const MAX_CALL_DEPTH: usize = 32;
/// Deepest expression nesting (`-(-(-x))`, `a + a + ...`, nested list literals).
pub(crate) const MAX_EXPR_DEPTH: usize = 512;

struct Ctx<'a> {
    file: &'a str,
    source: &'a str,
    base_dir: Option<&'a Path>,
    graph: Graph,
    np: Option<String>,
    globals: BTreeMap<String, NodeId>,
    functions: BTreeMap<String, &'a ast::StmtFunctionDef>,
    stack: Vec<String>,
    trainable: bool,
    depth: usize,
}

type Env = BTreeMap<String, NodeId>;

/// Compiles a Python source into the IR.
pub(crate) fn lower(file: &str, source: &str, base_dir: Option<&Path>) -> Result<Model, CompileError> {
    let parsed = ruff_python_parser::parse_module(source).map_err(|e| {
        let (line, column) = line_col(source, e.location.start().to_usize());
        CompileError::Python { file: file.to_owned(), line, column, message: format!("syntax error: {}", e.error) }
    })?;
    let module = parsed.syntax();
    let mut ctx = Ctx {
        file,
        source,
        base_dir,
        graph: Graph::default(),
        np: None,
        globals: BTreeMap::new(),
        functions: BTreeMap::new(),
        stack: Vec::new(),
        trainable: false,
        depth: 0,
    };
    let mut input_shape: Option<Vec<usize>> = None;
    let mut loss: Option<Loss> = None;
    // First pass: LOSS decides whether module-level arrays are trainable parameters.
    for stmt in &module.body {
        if let Stmt::Assign(a) = stmt
            && let [Expr::Name(n)] = a.targets.as_slice()
            && n.id.as_str() == "LOSS"
        {
            loss = Some(match a.value.as_ref() {
                Expr::StringLiteral(s) if s.value.to_str() == "mse" => Loss::Mse,
                Expr::StringLiteral(s) if s.value.to_str() == "cross_entropy" => Loss::CrossEntropy,
                other => return Err(ctx.err(other.range(), "LOSS must be \"mse\" or \"cross_entropy\"")),
            });
        }
    }
    ctx.trainable = loss.is_some();
    for stmt in &module.body {
        match stmt {
            Stmt::Import(imp) => {
                for alias in &imp.names {
                    if alias.name.as_str() != "numpy" {
                        return Err(ctx.err(
                            alias.range,
                            format!("import of `{}` is not supported; only `import numpy as np`", alias.name.as_str()),
                        ));
                    }
                    ctx.np = Some(alias.asname.as_ref().map_or("numpy", |a| a.as_str()).to_owned());
                }
            }
            Stmt::FunctionDef(f) => {
                if f.is_async || !f.decorator_list.is_empty() {
                    return Err(ctx.err(f.range, "async or decorated functions are not supported"));
                }
                ctx.functions.insert(f.name.as_str().to_owned(), f);
            }
            Stmt::If(i) if is_main_guard(&i.test) => {}
            Stmt::Expr(e) if matches!(e.value.as_ref(), Expr::StringLiteral(_)) => {}
            Stmt::Assign(a) => {
                let [Expr::Name(target)] = a.targets.as_slice() else {
                    return Err(ctx.err(a.range, "only assignments to a single name are supported"));
                };
                match target.id.as_str() {
                    "LOSS" => {}
                    "INPUT_SHAPE" => input_shape = Some(ctx.shape_literal(&a.value)?),
                    name => {
                        let value = ctx.module_value(name, &a.value)?;
                        ctx.globals.insert(name.to_owned(), value);
                    }
                }
            }
            other => {
                return Err(ctx.err(other.range(), format!("{} is not supported at module level", stmt_name(other))));
            }
        }
    }
    let forward = *ctx
        .functions
        .get("forward")
        .ok_or_else(|| ctx.err(TextRange::default(), "the model must define `def forward(x)`"))?;
    let input_shape = match input_shape {
        Some(s) => s,
        None => ctx.infer_input_shape(forward)?,
    };
    let input = ctx.graph.input(input_shape.clone());
    let output = ctx.call(forward, &[input], forward.range)?;
    let output_shape = ctx.graph.shape(output).clone();
    let training = match loss {
        None => None,
        Some(kind) => {
            let pred = match ctx.functions.get("logits").copied() {
                Some(f) if kind == Loss::CrossEntropy => ctx.call(f, &[input], f.range)?,
                _ => output,
            };
            let (target, l) = grad::loss(&mut ctx.graph, kind, pred).map_err(|m| ctx.err(forward.range, m))?;
            if ctx.graph.shape(target) != &output_shape {
                return Err(ctx.err(forward.range, "`logits(x)` and `forward(x)` must have the same shape"));
            }
            let grads = grad::gradients(&mut ctx.graph, l).map_err(|m| ctx.err(forward.range, m))?;
            Some(Training { target, loss: l, grads })
        }
    };
    Ok(Model { graph: ctx.graph, input, output, input_shape, output_shape, training })
}

fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn is_main_guard(test: &Expr) -> bool {
    let Expr::Compare(c) = test else { return false };
    matches!(c.left.as_ref(), Expr::Name(n) if n.id.as_str() == "__name__")
        && matches!(c.comparators.first(), Some(Expr::StringLiteral(s)) if s.value.to_str() == "__main__")
}

fn stmt_name(stmt: &Stmt) -> &'static str {
    match stmt {
        Stmt::For(_) => "a `for` loop",
        Stmt::While(_) => "a `while` loop",
        Stmt::If(_) => "an `if` statement",
        Stmt::ClassDef(_) => "a class definition",
        Stmt::ImportFrom(_) => "`from ... import`",
        Stmt::AugAssign(_) => "an augmented assignment (`+=` etc.)",
        Stmt::AnnAssign(_) => "an annotated assignment",
        Stmt::With(_) => "a `with` statement",
        Stmt::Try(_) => "a `try` statement",
        Stmt::Raise(_) => "a `raise` statement",
        Stmt::Global(_) | Stmt::Nonlocal(_) => "a `global`/`nonlocal` declaration",
        Stmt::FunctionDef(_) => "a nested function",
        Stmt::Return(_) => "`return` outside a function",
        _ => "this statement",
    }
}

fn expr_name(expr: &Expr) -> &'static str {
    match expr {
        Expr::Lambda(_) => "a lambda",
        Expr::If(_) => "a conditional expression",
        Expr::ListComp(_) | Expr::SetComp(_) | Expr::DictComp(_) | Expr::Generator(_) => "a comprehension",
        Expr::Subscript(_) => "indexing/slicing (`a[...]`)",
        Expr::Compare(_) => "a comparison",
        Expr::BoolOp(_) => "`and`/`or`",
        Expr::Dict(_) => "a dict",
        Expr::StringLiteral(_) => "a string",
        Expr::List(_) => "a list outside `np.array(...)`",
        Expr::Tuple(_) => "a tuple",
        Expr::BooleanLiteral(_) => "a boolean",
        Expr::NoneLiteral(_) => "`None`",
        _ => "this expression",
    }
}

fn int_literal(expr: &Expr) -> Option<i64> {
    match expr {
        Expr::NumberLiteral(n) => match &n.value {
            Number::Int(i) => i.as_i64(),
            _ => None,
        },
        Expr::UnaryOp(u) if u.op == UnaryOp::USub => int_literal(&u.operand).map(|v| -v),
        _ => None,
    }
}

fn number_literal(expr: &Expr) -> Option<f64> {
    match expr {
        Expr::NumberLiteral(n) => match &n.value {
            Number::Int(i) => i.as_i64().map(|v| v as f64),
            Number::Float(f) => Some(*f),
            Number::Complex { .. } => None,
        },
        Expr::UnaryOp(u) if u.op == UnaryOp::USub => number_literal(&u.operand).map(|v| -v),
        Expr::UnaryOp(u) if u.op == UnaryOp::UAdd => number_literal(&u.operand),
        _ => None,
    }
}

impl<'a> Ctx<'a> {
    fn err(&self, range: TextRange, message: impl Into<String>) -> CompileError {
        let (line, column) = line_col(self.source, range.start().to_usize());
        CompileError::Python { file: self.file.to_owned(), line, column, message: message.into() }
    }

    fn shape_err(&self, range: TextRange) -> impl Fn(String) -> CompileError + '_ {
        move |m| self.err(range, m)
    }

    fn shape_literal(&self, expr: &Expr) -> Result<Vec<usize>, CompileError> {
        let elts: Vec<&Expr> = match expr {
            Expr::Tuple(t) => t.elts.iter().collect(),
            Expr::List(l) => l.elts.iter().collect(),
            other => vec![other],
        };
        elts.iter()
            .map(|e| {
                int_literal(e)
                    .and_then(|v| usize::try_from(v).ok())
                    .filter(|&v| v > 0 && v <= MAX_LITERAL_ELEMENTS)
                    .ok_or_else(|| self.err(e.range(), "a shape must be a tuple of positive integer literals"))
            })
            .collect()
    }

    fn is_np(&self, expr: &Expr) -> bool {
        matches!(expr, Expr::Name(n) if Some(n.id.as_str()) == self.np.as_deref())
    }

    /// `np.<name>` → `Some(name)`.
    fn np_attr<'e>(&self, expr: &'e Expr) -> Option<&'e str> {
        match expr {
            Expr::Attribute(a) if self.is_np(&a.value) => Some(a.attr.as_str()),
            _ => None,
        }
    }

    fn module_value(&mut self, name: &str, value: &Expr) -> Result<NodeId, CompileError> {
        if let Expr::Call(call) = value
            && let Some(f) = self.np_attr(&call.func)
        {
            let array = match f {
                "array" | "asarray" => Some(self.array_literal(call)?),
                "load" => Some(self.np_load(call)?),
                _ => None,
            };
            if let Some((data, shape)) = array {
                return Ok(if self.trainable {
                    self.graph.param(name, data, shape)
                } else {
                    self.graph.constant(data, shape)
                });
            }
        }
        let env = Env::new();
        self.expr(value, &env)
    }

    fn array_literal(&self, call: &ast::ExprCall) -> Result<(Vec<f32>, Vec<usize>), CompileError> {
        for kw in &call.arguments.keywords {
            match kw.arg.as_ref().map(|a| a.as_str()) {
                Some("dtype") if self.np_attr(&kw.value).is_some_and(|t| t == "float32" || t == "float64") => {}
                _ => return Err(self.err(kw.range, "only `dtype=np.float32` (or np.float64) is supported here")),
            }
        }
        let [arg] = &*call.arguments.args else {
            return Err(self.err(call.range(), "np.array takes one nested list literal"));
        };
        let mut data = Vec::new();
        let shape = self.nested(arg, &mut data, 0)?;
        Ok((data, shape))
    }

    fn nested(&self, expr: &Expr, data: &mut Vec<f32>, depth: usize) -> Result<Vec<usize>, CompileError> {
        if depth > 8 {
            return Err(self.err(expr.range(), "array literal nests deeper than 8 levels"));
        }
        if let Some(v) = number_literal(expr) {
            if data.len() >= MAX_LITERAL_ELEMENTS {
                return Err(self.err(
                    expr.range(),
                    format!("array literal has more than {MAX_LITERAL_ELEMENTS} elements; use np.load(\"file.npy\")"),
                ));
            }
            data.push(v as f32);
            return Ok(Vec::new());
        }
        let elts = match expr {
            Expr::List(l) => &l.elts,
            Expr::Tuple(t) => &t.elts,
            other => {
                return Err(self.err(
                    other.range(),
                    format!("{} inside np.array; only numbers and nested lists", expr_name(other)),
                ));
            }
        };
        let mut inner: Option<Vec<usize>> = None;
        for e in elts {
            let s = self.nested(e, data, depth + 1)?;
            match &inner {
                Some(prev) if prev != &s => {
                    return Err(self.err(e.range(), "ragged nested list: every row must have the same shape"));
                }
                _ => inner = Some(s),
            }
        }
        let mut shape = vec![elts.len()];
        shape.extend(inner.unwrap_or_default());
        Ok(shape)
    }

    fn np_load(&self, call: &ast::ExprCall) -> Result<(Vec<f32>, Vec<usize>), CompileError> {
        let [Expr::StringLiteral(s)] = &*call.arguments.args else {
            return Err(self.err(call.range(), "np.load takes one string literal path"));
        };
        let rel = s.value.to_str();
        let Some(base) = self.base_dir else {
            return Err(self.err(call.range(), "np.load needs the source file's location: compile with compile_path"));
        };
        let path = base.join(rel);
        let bytes =
            std::fs::read(&path).map_err(|e| self.err(call.range(), format!("cannot read {}: {e}", path.display())))?;
        let array =
            crate::npy::parse(&bytes).map_err(|e| self.err(call.range(), format!("{}: {e}", path.display())))?;
        Ok((array.data, array.shape))
    }

    fn infer_input_shape(&self, forward: &ast::StmtFunctionDef) -> Result<Vec<usize>, CompileError> {
        let mut found = None;
        self.infer_in(forward, 0, &mut found, 0);
        found.ok_or_else(|| {
            self.err(forward.range, "cannot infer the input shape (x is not directly multiplied by a 2-D parameter); add INPUT_SHAPE = (...)")
        })
    }

    /// Looks for `<param #arg> @ W` in `f`, following helper calls that pass the parameter on.
    fn infer_in(&self, f: &ast::StmtFunctionDef, arg: usize, found: &mut Option<Vec<usize>>, depth: usize) {
        let Some(x) = f.parameters.args.get(arg).map(|p| p.parameter.name.as_str()) else { return };
        if depth > MAX_CALL_DEPTH {
            return;
        }
        for stmt in &f.body {
            let value = match stmt {
                Stmt::Assign(a) => Some(a.value.as_ref()),
                Stmt::Return(r) => r.value.as_deref(),
                _ => None,
            };
            if let Some(v) = value {
                self.find_matmul(v, x, found, depth);
            }
        }
    }

    fn find_matmul(&self, expr: &Expr, x: &str, found: &mut Option<Vec<usize>>, depth: usize) {
        if found.is_some() {
            return;
        }
        let pair = match expr {
            Expr::BinOp(b) if b.op == Operator::MatMult => Some((b.left.as_ref(), b.right.as_ref())),
            Expr::Call(c) if matches!(self.np_attr(&c.func), Some("dot" | "matmul")) => match &*c.arguments.args {
                [l, r] => Some((l, r)),
                _ => None,
            },
            _ => None,
        };
        if let Some((Expr::Name(l), Expr::Name(r))) = pair
            && l.id.as_str() == x
            && let Some(&w) = self.globals.get(r.id.as_str())
            && let [k, _] = self.graph.shape(w).as_slice()
        {
            *found = Some(vec![1, *k]);
            return;
        }
        match expr {
            Expr::BinOp(b) => {
                self.find_matmul(&b.left, x, found, depth);
                self.find_matmul(&b.right, x, found, depth);
            }
            Expr::UnaryOp(u) => self.find_matmul(&u.operand, x, found, depth),
            Expr::Call(c) => {
                if let Expr::Name(n) = c.func.as_ref()
                    && let Some(f) = self.functions.get(n.id.as_str())
                {
                    for (i, a) in c.arguments.args.iter().enumerate() {
                        if matches!(a, Expr::Name(an) if an.id.as_str() == x) {
                            self.infer_in(f, i, found, depth + 1);
                        }
                    }
                }
                c.arguments.args.iter().for_each(|a| self.find_matmul(a, x, found, depth));
            }
            Expr::Attribute(a) => self.find_matmul(&a.value, x, found, depth),
            _ => {}
        }
    }

    /// Inlines a user function.
    fn call(&mut self, f: &'a ast::StmtFunctionDef, args: &[NodeId], at: TextRange) -> Result<NodeId, CompileError> {
        let name = f.name.as_str().to_owned();
        if self.stack.contains(&name) {
            return Err(self.err(at, format!("recursion through `{name}` is not supported")));
        }
        if self.stack.len() >= MAX_CALL_DEPTH {
            return Err(self.err(at, "helper calls nest too deeply"));
        }
        let p = &f.parameters;
        if !p.posonlyargs.is_empty() || p.vararg.is_some() || !p.kwonlyargs.is_empty() || p.kwarg.is_some() {
            return Err(self.err(p.range, "only plain positional parameters are supported"));
        }
        if p.args.len() != args.len() || p.args.iter().any(|a| a.default.is_some()) {
            return Err(self.err(
                at,
                format!("`{name}` takes {} argument(s) without defaults; called with {}", p.args.len(), args.len()),
            ));
        }
        let mut env: Env =
            p.args.iter().map(|a| a.parameter.name.as_str().to_owned()).zip(args.iter().copied()).collect();
        self.stack.push(name.clone());
        let mut result = None;
        for stmt in &f.body {
            if result.is_some() {
                return Err(self.err(stmt.range(), "code after `return` is not supported"));
            }
            match stmt {
                Stmt::Assign(a) => {
                    let [Expr::Name(t)] = a.targets.as_slice() else {
                        return Err(self.err(a.range, "only assignments to a single name are supported"));
                    };
                    let v = self.expr(&a.value, &env)?;
                    env.insert(t.id.as_str().to_owned(), v);
                }
                Stmt::Return(r) => {
                    let Some(v) = &r.value else { return Err(self.err(r.range, "`return` needs a value")) };
                    result = Some(self.expr(v, &env)?);
                }
                Stmt::Expr(e) if matches!(e.value.as_ref(), Expr::StringLiteral(_)) => {}
                Stmt::Pass(_) => {}
                other => {
                    return Err(self.err(other.range(), format!("{} is not supported in a function", stmt_name(other))));
                }
            }
        }
        self.stack.pop();
        result.ok_or_else(|| self.err(f.range, format!("`{name}` must end with `return <expression>`")))
    }

    fn expr(&mut self, expr: &Expr, env: &Env) -> Result<NodeId, CompileError> {
        if self.depth >= MAX_EXPR_DEPTH {
            return Err(self.err(expr.range(), format!("expression nests deeper than {MAX_EXPR_DEPTH} levels")));
        }
        self.depth += 1;
        let result = self.expr_inner(expr, env);
        self.depth -= 1;
        result
    }

    fn expr_inner(&mut self, expr: &Expr, env: &Env) -> Result<NodeId, CompileError> {
        let range = expr.range();
        match expr {
            Expr::Name(n) => env
                .get(n.id.as_str())
                .or_else(|| self.globals.get(n.id.as_str()))
                .copied()
                .ok_or_else(|| self.err(range, format!("unknown name `{}`", n.id.as_str()))),
            Expr::NumberLiteral(_) => match number_literal(expr) {
                Some(v) => Ok(self.graph.scalar(v as f32)),
                None => Err(self.err(range, "only real numbers are supported")),
            },
            Expr::UnaryOp(u) => {
                let a = self.expr(&u.operand, env)?;
                match u.op {
                    UnaryOp::USub => Ok(self.graph.unary(Unary::Neg, a)),
                    UnaryOp::UAdd => Ok(a),
                    _ => Err(self.err(range, "unary `not`/`~` is not supported")),
                }
            }
            Expr::BinOp(b) => {
                let l = self.expr(&b.left, env)?;
                let r = self.expr(&b.right, env)?;
                let op = match b.op {
                    Operator::Add => Binary::Add,
                    Operator::Sub => Binary::Sub,
                    Operator::Mult => Binary::Mul,
                    Operator::Div => Binary::Div,
                    Operator::MatMult => return self.graph.matmul(l, r).map_err(self.shape_err(range)),
                    other => return Err(self.err(range, format!("operator `{}` is not supported", other.as_str()))),
                };
                self.graph.binary(op, l, r).map_err(self.shape_err(range))
            }
            Expr::Attribute(a) if a.attr.as_str() == "T" => {
                let v = self.expr(&a.value, env)?;
                self.graph.transpose(v, None).map_err(self.shape_err(range))
            }
            Expr::Call(c) => self.call_expr(c, env),
            Expr::Attribute(a) => Err(self.err(range, format!("attribute `.{}` is not supported", a.attr.as_str()))),
            other => Err(self.err(range, format!("{} is not supported", expr_name(other)))),
        }
    }

    fn call_expr(&mut self, c: &ast::ExprCall, env: &Env) -> Result<NodeId, CompileError> {
        let range = c.range();
        // User helper function.
        if let Expr::Name(n) = c.func.as_ref() {
            let Some(&f) = self.functions.get(n.id.as_str()) else {
                return Err(self.err(range, format!("call of unknown function `{}`", n.id.as_str())));
            };
            if !c.arguments.keywords.is_empty() {
                return Err(self.err(range, "keyword arguments to helper functions are not supported"));
            }
            let args = c.arguments.args.iter().map(|a| self.expr(a, env)).collect::<Result<Vec<_>, _>>()?;
            return self.call(f, &args, range);
        }
        // Method: x.reshape(...)
        if let Expr::Attribute(a) = c.func.as_ref()
            && !self.is_np(&a.value)
        {
            if a.attr.as_str() != "reshape" {
                return Err(self.err(range, format!("method `.{}()` is not supported", a.attr.as_str())));
            }
            let v = self.expr(&a.value, env)?;
            let dims: Vec<&Expr> = match &*c.arguments.args {
                [Expr::Tuple(t)] => t.elts.iter().collect(),
                args => args.iter().collect(),
            };
            return self.reshape(v, &dims, range);
        }
        let Some(f) = self.np_attr(&c.func) else {
            return Err(
                self.err(range, "only calls of `np.<function>`, `x.reshape(...)` and helper functions are supported")
            );
        };
        let f = f.to_owned();
        let mut kw: BTreeMap<&str, &Expr> = BTreeMap::new();
        let allowed: &[&str] = match f.as_str() {
            "sum" | "mean" | "max" => &["axis", "keepdims"],
            "transpose" => &["axes"],
            "array" | "asarray" => &["dtype"],
            _ => &[],
        };
        for k in &c.arguments.keywords {
            match k.arg.as_ref().map(|a| a.as_str()) {
                Some(name) if allowed.contains(&name) => {
                    kw.insert(allowed.iter().find(|a| **a == name).copied().unwrap_or(""), &k.value);
                }
                _ => return Err(self.err(k.range, format!("this keyword argument is not supported by np.{f}"))),
            }
        }
        let args = &*c.arguments.args;
        let arity = |n: usize| -> Result<(), CompileError> {
            if args.len() == n {
                Ok(())
            } else {
                Err(self.err(range, format!("np.{f} takes {n} positional argument(s) here")))
            }
        };
        let unary = match f.as_str() {
            "tanh" => Some(Unary::Tanh),
            "exp" => Some(Unary::Exp),
            "log" => Some(Unary::Log),
            "sqrt" => Some(Unary::Sqrt),
            "abs" | "absolute" => Some(Unary::Abs),
            "negative" => Some(Unary::Neg),
            _ => None,
        };
        if let Some(u) = unary {
            arity(1)?;
            let a = self.expr(args.first().ok_or_else(|| self.err(range, "missing argument"))?, env)?;
            return Ok(self.graph.unary(u, a));
        }
        let vals = |this: &mut Self, n: usize| -> Result<Vec<NodeId>, CompileError> {
            if args.len() != n {
                return Err(this.err(range, format!("np.{f} takes {n} positional argument(s) here")));
            }
            args.iter().map(|a| this.expr(a, env)).collect()
        };
        let shape_err = |this: &Self, m: String| this.err(range, m);
        match f.as_str() {
            "dot" | "matmul" => {
                let v = vals(self, 2)?;
                let (a, b) = (v.first().copied().unwrap_or(0), v.get(1).copied().unwrap_or(0));
                self.graph.matmul(a, b).map_err(|m| shape_err(self, m))
            }
            "maximum" | "minimum" | "add" | "subtract" | "multiply" | "divide" => {
                let v = vals(self, 2)?;
                let op = match f.as_str() {
                    "maximum" => Binary::Max,
                    "minimum" => Binary::Min,
                    "add" => Binary::Add,
                    "subtract" => Binary::Sub,
                    "multiply" => Binary::Mul,
                    _ => Binary::Div,
                };
                let (a, b) = (v.first().copied().unwrap_or(0), v.get(1).copied().unwrap_or(0));
                self.graph.binary(op, a, b).map_err(|m| shape_err(self, m))
            }
            "clip" => {
                let v = vals(self, 3)?;
                let (a, lo, hi) =
                    (v.first().copied().unwrap_or(0), v.get(1).copied().unwrap_or(0), v.get(2).copied().unwrap_or(0));
                let m = self.graph.binary(Binary::Max, a, lo).map_err(|m| shape_err(self, m))?;
                self.graph.binary(Binary::Min, m, hi).map_err(|m| shape_err(self, m))
            }
            "sum" | "mean" | "max" => {
                let v = vals(self, 1)?;
                let axis = match kw.get("axis") {
                    None | Some(Expr::NoneLiteral(_)) => None,
                    Some(e) => Some(
                        int_literal(e).ok_or_else(|| self.err(e.range(), "axis must be an integer literal or None"))?,
                    ),
                };
                let keepdims = match kw.get("keepdims") {
                    None => false,
                    Some(Expr::BooleanLiteral(b)) => b.value,
                    Some(e) => return Err(self.err(e.range(), "keepdims must be True or False")),
                };
                let kind = match f.as_str() {
                    "sum" => Reduce::Sum,
                    "mean" => Reduce::Mean,
                    _ => Reduce::Max,
                };
                self.graph.reduce(kind, v.first().copied().unwrap_or(0), axis, keepdims).map_err(|m| shape_err(self, m))
            }
            "transpose" => {
                let v = vals(self, 1)?;
                let perm = match kw.get("axes") {
                    None | Some(Expr::NoneLiteral(_)) => None,
                    Some(e) => {
                        let elts: Vec<&Expr> = match e {
                            Expr::Tuple(t) => t.elts.iter().collect(),
                            Expr::List(l) => l.elts.iter().collect(),
                            other => vec![*other],
                        };
                        let perm = elts
                            .iter()
                            .map(|x| int_literal(x).and_then(|i| usize::try_from(i).ok()))
                            .collect::<Option<Vec<usize>>>()
                            .ok_or_else(|| {
                                self.err(e.range(), "axes must be a tuple of non-negative integer literals")
                            })?;
                        Some(perm)
                    }
                };
                self.graph.transpose(v.first().copied().unwrap_or(0), perm).map_err(|m| shape_err(self, m))
            }
            "reshape" => {
                let [a, shape] = args else { return Err(self.err(range, "np.reshape takes (array, shape)")) };
                let v = self.expr(a, env)?;
                let dims: Vec<&Expr> = match shape {
                    Expr::Tuple(t) => t.elts.iter().collect(),
                    Expr::List(l) => l.elts.iter().collect(),
                    other => vec![other],
                };
                self.reshape(v, &dims, range)
            }
            "array" | "asarray" => {
                let (data, shape) = self.array_literal(c)?;
                Ok(self.graph.constant(data, shape))
            }
            other => Err(self.err(range, format!("`np.{other}` is not supported"))),
        }
    }

    fn reshape(&mut self, v: NodeId, dims: &[&Expr], range: TextRange) -> Result<NodeId, CompileError> {
        let total = numel(self.graph.shape(v));
        let mut shape = Vec::new();
        let mut infer = None;
        for (i, d) in dims.iter().enumerate() {
            match int_literal(d) {
                Some(-1) if infer.is_none() => {
                    infer = Some(i);
                    shape.push(1);
                }
                Some(n) if n > 0 => {
                    shape.push(usize::try_from(n).map_err(|_| self.err(d.range(), "dimension too large"))?)
                }
                _ => {
                    return Err(
                        self.err(d.range(), "reshape dimensions must be positive integer literals (one may be -1)")
                    );
                }
            }
        }
        if let Some(i) = infer {
            let known = numel(&shape).max(1);
            if let Some(slot) = shape.get_mut(i) {
                *slot = total / known;
            }
        }
        self.graph.reshape(v, shape).map_err(|m| self.err(range, m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(src: &str) -> String {
        match lower("m.py", src, None) {
            Ok(_) => "compiled".to_owned(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn unsupported_constructs_are_located_and_named() {
        let head = "import numpy as np\nW = np.array([[1.0], [2.0]])\nINPUT_SHAPE = (1, 2)\n";
        let cases: &[(&str, &str)] = &[
            (
                "def forward(x):\n    for i in x:\n        pass\n    return x\n",
                "m.py:5:5: a `for` loop is not supported in a function",
            ),
            ("def forward(x):\n    while True:\n        pass\n    return x\n", "m.py:5:5: a `while` loop"),
            ("def forward(x):\n    return x[0]\n", "m.py:5:12: indexing/slicing"),
            ("def forward(x):\n    return x ** 2\n", "m.py:5:12: operator `**`"),
            ("def forward(x):\n    return np.sin(x)\n", "m.py:5:12: `np.sin` is not supported"),
            ("def forward(x):\n    return f(x)\ndef f(y):\n    return f(y)\n", "recursion through `f`"),
            ("def forward(x):\n    return lambda y: y\n", "m.py:5:12: a lambda"),
            ("def forward(x):\n    return y\n", "m.py:5:12: unknown name `y`"),
            ("def forward(x):\n    return x.sum()\n", "m.py:5:12: method `.sum()`"),
            ("def forward(x):\n    return x.shape\n", "m.py:5:12: attribute `.shape`"),
            ("def forward(x):\n    return np.float32(x)\n", "m.py:5:12: `np.float32` is not supported"),
            ("def forward(x):\n    return x > 0\n", "m.py:5:12: a comparison"),
            ("def forward(x):\n    return [x]\n", "m.py:5:12: a list outside"),
            ("def forward(x):\n    return np.sum(x, axis=(0, 1))\n", "m.py:5:27: axis must be an integer literal"),
            (
                "def forward(x):\n    return np.sum(x, where=x)\n",
                "m.py:5:22: this keyword argument is not supported by np.sum",
            ),
            ("def forward(x):\n    x += 1\n    return x\n", "m.py:5:5: an augmented assignment"),
            ("def forward(x):\n    if x:\n        return x\n    return x\n", "m.py:5:5: an `if` statement"),
            ("def forward(x, y):\n    return x\n", "`forward` takes 2 argument(s)"),
            ("import os\ndef forward(x):\n    return x\n", "m.py:4:8: import of `os`"),
            ("class A:\n    pass\n", "m.py:4:1: a class definition is not supported at module level"),
            (
                "def forward(x):\n    return x @ np.array([[1.0, 2.0, 3.0]])\n",
                "m.py:5:12: matmul of shapes [1, 2] and [1, 3]",
            ),
            ("def forward(x):\n    return x + np.array([1.0, 2.0, 3.0])\n", "do not broadcast"),
            ("def forward(x):\n    return np.sum(x, axis=5)\n", "axis 5 is out of range"),
            ("def forward(x):\n    return x if x else x\n", "a conditional expression"),
            ("def forward(x):\n    return x @ W\nLOSS = \"hinge\"\n", "m.py:6:8: LOSS must be"),
            ("V = np.array([[1.0], [2.0, 3.0]])\ndef forward(x):\n    return x @ W\n", "m.py:4:22: ragged"),
            ("def forward(x):\n    return x +\n", "m.py:5:"),
            ("def forward(x):\n    return np.load(\"w.npy\")\n", "np.load"),
        ];
        for (body, want) in cases {
            let got = error_of(&format!("{head}{body}"));
            assert!(got.contains(want), "for {body:?}\n got: {got}\nwant: {want}");
        }
        assert!(error_of("import numpy as np\n").contains("def forward(x)"));
    }

    proptest::proptest! {
        /// Token soup from the subset's vocabulary: every outcome is Ok or a located error.
        #[test]
        fn arbitrary_sources_never_panic(tokens in proptest::collection::vec(0usize..TOKENS.len(), 0..60)) {
            let body: String = tokens.iter().map(|&t| TOKENS[t]).collect();
            let src = format!("import numpy as np\nW = np.array([[1.0, 2.0], [3.0, 4.0]])\ndef forward(x):\n    return {body}\n");
            if let Err(e) = lower("m.py", &src, None) {
                proptest::prop_assert!(e.to_string().starts_with("m.py:"), "{e}");
            }
        }
    }

    const TOKENS: &[&str] = &[
        "x",
        "W",
        " @ ",
        " + ",
        " - ",
        " * ",
        " / ",
        "(",
        ")",
        "[",
        "]",
        ", ",
        "np.maximum(",
        "np.sum(",
        "axis=1",
        "axis=-1",
        "keepdims=True",
        ".T",
        ".reshape(",
        "-1",
        "2",
        "0.5",
        "np.exp(",
        "np.tanh(",
        "np.transpose(",
        "np.dot(",
        "np.clip(",
        "np.array(",
        "np.max(",
        "np.mean(",
        "np.log(",
        "np.sqrt(",
        "np.abs(",
        "-",
        "np.load(",
        "\"a.npy\"",
        "**",
        "x[0]",
    ];

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        // Through `compile`, which runs the frontend on its own deep stack.
        let compile = |src: String| match crate::compile(crate::SourceKind::Python, src.as_bytes()) {
            Ok(_) => "compiled".to_owned(),
            Err(e) => e.to_string(),
        };
        let unary =
            format!("import numpy as np\nINPUT_SHAPE = (2,)\ndef forward(x):\n    return {}x\n", "-".repeat(5000));
        assert!(compile(unary).contains("nests deeper"));
        let chain =
            format!("import numpy as np\nINPUT_SHAPE = (2,)\ndef forward(x):\n    return x{}\n", " + x".repeat(5000));
        assert!(compile(chain).contains("nests deeper"));
    }

    #[test]
    fn literal_size_is_limited() {
        let big = format!(
            "import numpy as np\nW = np.array([{}])\ndef forward(x):\n    return x\n",
            "1.0,".repeat(MAX_LITERAL_ELEMENTS + 1)
        );
        assert!(error_of(&big).contains("more than"));
    }

    #[test]
    fn constants_fold_and_shapes_infer() {
        let m = lower(
            "m.py",
            "import numpy as np\nW = np.array([[1.0, 2.0], [3.0, 4.0]])\nB = W.T * 2 + 1\ndef forward(x):\n    return np.maximum(x @ W @ B, 0.0)\n",
            None,
        )
        .unwrap();
        assert_eq!(m.input_shape, vec![1, 2]);
        assert_eq!(m.output_shape, vec![1, 2]);
        let b = m.graph.nodes.iter().find(|n| n.op == crate::ir::Op::Const(vec![3.0, 7.0, 5.0, 9.0]));
        assert!(b.is_some(), "W.T * 2 + 1 was folded");
    }
}
