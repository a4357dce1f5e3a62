//! The typed f32 tensor IR: a graph of nodes in topological order, each with a static shape.
//!
//! Builders infer shapes, fold constants (an op whose inputs are all constants is evaluated
//! here, in Rust, and replaced by a constant) and refuse shape errors with a message the
//! frontend places at the offending source location. Dead code is never emitted: the backend
//! only walks what its roots need.

// Node ids and axes index vectors the builders created; every builder checks ranks and axes
// before it pushes a node, so these indexes are in range by construction (never user data).
#![allow(clippy::indexing_slicing, reason = "node ids and axes are validated by the builders")]

/// A lowered model: what every frontend hands the backend.
pub(crate) struct Model {
    pub(crate) graph: Graph,
    pub(crate) input: NodeId,
    pub(crate) output: NodeId,
    pub(crate) input_shape: Vec<usize>,
    pub(crate) output_shape: Vec<usize>,
    pub(crate) training: Option<Training>,
}

impl Model {
    /// The values the module computes: the output, and the loss and gradients when trainable.
    pub(crate) fn roots(&self) -> Vec<NodeId> {
        let mut roots = vec![self.output];
        if let Some(t) = &self.training {
            roots.push(t.loss);
            roots.extend(&t.grads);
        }
        roots
    }
}

/// The training graph: target input, scalar loss and one gradient per parameter.
pub(crate) struct Training {
    pub(crate) target: NodeId,
    pub(crate) loss: NodeId,
    pub(crate) grads: Vec<NodeId>,
}

/// A tensor shape (row-major; `[]` is a scalar).
pub(crate) type Shape = Vec<usize>;

/// Index of a node in [`Graph::nodes`].
pub(crate) type NodeId = usize;

/// Element-wise unary operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unary {
    Neg,
    Exp,
    Log,
    Tanh,
    Sqrt,
    Abs,
    /// Identity (used for broadcasts and transposes, which only change the view).
    Copy,
}

/// Element-wise binary operations with NumPy broadcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    /// 1.0 where `a >= b`, else 0.0.
    Ge,
    /// 1.0 where `a > b`, else 0.0.
    Gt,
    /// 1.0 where `a == b`, else 0.0.
    Eq,
}

/// Reductions over one axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reduce {
    Sum,
    Mean,
    Max,
}

/// A node's operation.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Op {
    /// The model input.
    Input,
    /// The training target.
    Target,
    /// A trainable parameter (index into [`Graph::params`]).
    Param(usize),
    /// A folded constant.
    Const(Vec<f32>),
    /// Element-wise unary op; the operand is broadcast to the node's shape.
    Unary(Unary, NodeId),
    /// Element-wise binary op; both operands are broadcast to the node's shape.
    Binary(Binary, NodeId, NodeId),
    /// `[m,k] @ [k,n]`.
    MatMul(NodeId, NodeId),
    /// Reduction of the operand over `axis` (the node's shape says whether dims are kept).
    Reduce(Reduce, NodeId, usize),
    /// Axis permutation: output axis `i` is input axis `perm[i]`.
    Transpose(NodeId, Vec<usize>),
    /// Same data, new shape.
    Reshape(NodeId),
    /// Operands joined along `axis` (every other axis equal).
    Concat(Vec<NodeId>, usize),
    /// Fused `[m,k] @ [k,n] + bias[n]`, then ReLU when the flag is set: built only by
    /// [`Graph::fuse`] after differentiation, so gradients never see it.
    Dense(NodeId, NodeId, NodeId, bool),
    /// `[m,k] @ [n,k]ᵀ` without materialising the transpose (rows of both operands are
    /// contiguous); `k` and `n` are multiples of 4. Built only by [`Graph::fuse`] from
    /// `MatMul(a, Transpose(b))`, which training graphs contain for every `g @ Wᵀ`.
    MatMulBt(NodeId, NodeId),
}

/// A node: its operation and its static shape.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Node {
    pub(crate) op: Op,
    pub(crate) shape: Shape,
}

/// A trainable parameter: initial values and shape.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Param {
    pub(crate) name: String,
    pub(crate) data: Vec<f32>,
    pub(crate) node: NodeId,
}

/// The graph.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Graph {
    pub(crate) nodes: Vec<Node>,
    pub(crate) params: Vec<Param>,
}

/// Most elements one tensor may have (256 MiB of f32: the runtime's memory cap). Builders
/// refuse larger results before constant folding could try to materialise them.
pub(crate) const MAX_ELEMENTS: usize = 64 << 20;

/// Number of elements of a shape.
pub(crate) fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Row-major strides (in elements) of a shape.
pub(crate) fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// NumPy broadcast of two shapes.
pub(crate) fn broadcast(a: &[usize], b: &[usize]) -> Result<Shape, String> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for (i, o) in out.iter_mut().enumerate() {
        let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
        let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
        *o = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(format!("shapes {a:?} and {b:?} do not broadcast")),
        };
    }
    too_large(&out)?;
    Ok(out)
}

/// Refuses shapes with more than [`MAX_ELEMENTS`] elements.
pub(crate) fn too_large(shape: &[usize]) -> Result<(), String> {
    match shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)) {
        Some(n) if n <= MAX_ELEMENTS => Ok(()),
        _ => Err(format!("a tensor of shape {shape:?} exceeds the limit of {MAX_ELEMENTS} elements")),
    }
}

/// Strides (in elements, aligned to `out`'s axes) for reading a tensor of shape `input`
/// broadcast to `out`: 0 along broadcast axes.
pub(crate) fn broadcast_strides(input: &[usize], out: &[usize]) -> Vec<usize> {
    let st = strides(input);
    let lead = out.len() - input.len();
    (0..out.len()).map(|i| if i < lead || input[i - lead] == 1 { 0 } else { st[i - lead] }).collect()
}

/// The operand views of an element-wise node: (operand, strides aligned to the node's axes).
pub(crate) fn map_views(graph: &Graph, id: NodeId) -> Vec<(NodeId, Vec<usize>)> {
    let node = &graph.nodes[id];
    let view = |a: NodeId| broadcast_strides(&graph.nodes[a].shape, &node.shape);
    match &node.op {
        Op::Unary(_, a) => vec![(*a, view(*a))],
        Op::Binary(_, a, b) => vec![(*a, view(*a)), (*b, view(*b))],
        Op::Transpose(a, perm) => {
            let st = strides(&graph.nodes[*a].shape);
            vec![(*a, perm.iter().map(|&p| st[p]).collect())]
        }
        _ => Vec::new(),
    }
}

/// `(outer, r, inner)` of a reduction of `shape` over `axis`.
pub(crate) fn reduce_dims(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (numel(&shape[..axis]), shape[axis], numel(&shape[axis + 1..]))
}

impl Unary {
    pub(crate) fn eval(self, x: f32) -> f32 {
        match self {
            Self::Neg => -x,
            Self::Exp => x.exp(),
            Self::Log => x.ln(),
            Self::Tanh => x.tanh(),
            Self::Sqrt => x.sqrt(),
            Self::Abs => x.abs(),
            Self::Copy => x,
        }
    }
}

impl Binary {
    pub(crate) fn eval(self, a: f32, b: f32) -> f32 {
        let flag = |c: bool| if c { 1.0 } else { 0.0 };
        match self {
            Self::Add => a + b,
            Self::Sub => a - b,
            Self::Mul => a * b,
            Self::Div => a / b,
            Self::Max => {
                if a.is_nan() || b.is_nan() {
                    f32::NAN
                } else {
                    a.max(b)
                }
            }
            Self::Min => {
                if a.is_nan() || b.is_nan() {
                    f32::NAN
                } else {
                    a.min(b)
                }
            }
            Self::Ge => flag(a >= b),
            Self::Gt => flag(a > b),
            Self::Eq => flag(a == b),
        }
    }
}

impl Graph {
    fn push(&mut self, op: Op, shape: Shape) -> NodeId {
        let id = self.nodes.len();
        self.nodes.push(Node { op, shape });
        if self.foldable(id) {
            let data = self.eval(id);
            self.nodes[id].op = Op::Const(data);
        }
        id
    }

    fn is_const(&self, id: NodeId) -> bool {
        matches!(self.nodes[id].op, Op::Const(_))
    }

    fn foldable(&self, id: NodeId) -> bool {
        match &self.nodes[id].op {
            Op::Unary(_, a) | Op::Reduce(_, a, _) | Op::Transpose(a, _) | Op::Reshape(a) => self.is_const(*a),
            Op::Binary(_, a, b) | Op::MatMul(a, b) => self.is_const(*a) && self.is_const(*b),
            Op::Concat(parts, _) => parts.iter().all(|&p| self.is_const(p)),
            Op::Input | Op::Target | Op::Param(_) | Op::Const(_) | Op::Dense(..) | Op::MatMulBt(..) => false,
        }
    }

    fn data(&self, id: NodeId) -> &[f32] {
        match &self.nodes[id].op {
            Op::Const(d) => d,
            _ => &[],
        }
    }

    /// Evaluates a node whose operands are constants (constant folding).
    fn eval(&self, id: NodeId) -> Vec<f32> {
        let node = &self.nodes[id];
        let n = numel(&node.shape);
        match &node.op {
            Op::Unary(..) | Op::Binary(..) | Op::Transpose(..) => {
                let views = map_views(self, id);
                let out_strides = strides(&node.shape);
                (0..n)
                    .map(|flat| {
                        let vals: Vec<f32> = views
                            .iter()
                            .map(|(a, st)| {
                                let mut off = 0;
                                for (ax, s) in st.iter().enumerate() {
                                    off += (flat / out_strides[ax]) % node.shape[ax] * s;
                                }
                                self.data(*a).get(off).copied().unwrap_or(f32::NAN)
                            })
                            .collect();
                        match (&node.op, vals.as_slice()) {
                            (Op::Unary(u, _), [x]) => u.eval(*x),
                            (Op::Binary(b, ..), [x, y]) => b.eval(*x, *y),
                            (_, [x]) => *x,
                            _ => f32::NAN,
                        }
                    })
                    .collect()
            }
            Op::MatMul(a, b) => {
                let (sa, sb) = (&self.nodes[*a].shape, &self.nodes[*b].shape);
                let (m, k, nn) = (sa[0], sa[1], sb[1]);
                let (da, db) = (self.data(*a), self.data(*b));
                let mut out = vec![0.0f32; m * nn];
                for i in 0..m {
                    for j in 0..nn {
                        let mut acc = 0.0f32;
                        for p in 0..k {
                            acc +=
                                da.get(i * k + p).copied().unwrap_or(0.0) * db.get(p * nn + j).copied().unwrap_or(0.0);
                        }
                        out[i * nn + j] = acc;
                    }
                }
                out
            }
            Op::Reduce(kind, a, axis) => {
                let (outer, r, inner) = reduce_dims(&self.nodes[*a].shape, *axis);
                let da = self.data(*a);
                let mut out = Vec::with_capacity(outer * inner);
                for o in 0..outer {
                    for i in 0..inner {
                        let vals = (0..r).map(|j| da.get(o * r * inner + j * inner + i).copied().unwrap_or(f32::NAN));
                        out.push(match kind {
                            Reduce::Sum => vals.sum(),
                            Reduce::Mean => vals.sum::<f32>() * (1.0 / r as f32),
                            Reduce::Max => vals.fold(f32::NEG_INFINITY, |m, v| Binary::Max.eval(m, v)),
                        });
                    }
                }
                out
            }
            Op::Reshape(a) => self.data(*a).to_vec(),
            Op::Concat(parts, axis) => {
                let outer = numel(&node.shape[..*axis]);
                let mut out = Vec::with_capacity(n);
                for o in 0..outer {
                    for &p in parts {
                        let chunk = numel(&self.nodes[p].shape[*axis..]);
                        out.extend(self.data(p).get(o * chunk..(o + 1) * chunk).unwrap_or(&[]));
                    }
                }
                out
            }
            Op::Input | Op::Target | Op::Param(_) | Op::Const(_) | Op::Dense(..) | Op::MatMulBt(..) => Vec::new(),
        }
    }

    pub(crate) fn shape(&self, id: NodeId) -> &Shape {
        &self.nodes[id].shape
    }

    pub(crate) fn input(&mut self, shape: Shape) -> NodeId {
        self.push(Op::Input, shape)
    }

    pub(crate) fn target(&mut self, shape: Shape) -> NodeId {
        self.push(Op::Target, shape)
    }

    pub(crate) fn constant(&mut self, data: Vec<f32>, shape: Shape) -> NodeId {
        self.push(Op::Const(data), shape)
    }

    pub(crate) fn scalar(&mut self, v: f32) -> NodeId {
        self.constant(vec![v], Vec::new())
    }

    pub(crate) fn param(&mut self, name: &str, data: Vec<f32>, shape: Shape) -> NodeId {
        let index = self.params.len();
        let node = self.push(Op::Param(index), shape);
        self.params.push(Param { name: name.to_owned(), data, node });
        node
    }

    pub(crate) fn unary(&mut self, u: Unary, a: NodeId) -> NodeId {
        let shape = self.shape(a).clone();
        self.push(Op::Unary(u, a), shape)
    }

    pub(crate) fn binary(&mut self, b: Binary, x: NodeId, y: NodeId) -> Result<NodeId, String> {
        let shape = broadcast(self.shape(x), self.shape(y))?;
        Ok(self.push(Op::Binary(b, x, y), shape))
    }

    pub(crate) fn broadcast_to(&mut self, a: NodeId, shape: &[usize]) -> Result<NodeId, String> {
        if self.shape(a).as_slice() == shape {
            return Ok(a);
        }
        let b = broadcast(self.shape(a), shape)?;
        if b != shape {
            return Err(format!("cannot broadcast {:?} to {shape:?}", self.shape(a)));
        }
        Ok(self.push(Op::Unary(Unary::Copy, a), b))
    }

    pub(crate) fn matmul(&mut self, a: NodeId, b: NodeId) -> Result<NodeId, String> {
        let (sa, sb) = (self.shape(a).clone(), self.shape(b).clone());
        match (sa.as_slice(), sb.as_slice()) {
            ([], _) | (_, []) => self.binary(Binary::Mul, a, b),
            ([k1], [k2]) if k1 == k2 => {
                let a2 = self.reshape(a, vec![1, *k1])?;
                let b2 = self.reshape(b, vec![*k2, 1])?;
                let m = self.matmul(a2, b2)?;
                self.reshape(m, Vec::new())
            }
            ([k1], [k2, n]) if k1 == k2 => {
                let a2 = self.reshape(a, vec![1, *k1])?;
                let m = self.matmul(a2, b)?;
                self.reshape(m, vec![*n])
            }
            ([m, k1], [k2]) if k1 == k2 => {
                let b2 = self.reshape(b, vec![*k2, 1])?;
                let r = self.matmul(a, b2)?;
                self.reshape(r, vec![*m])
            }
            ([m, k1], [k2, n]) if k1 == k2 => {
                too_large(&[*m, *n])?;
                Ok(self.push(Op::MatMul(a, b), vec![*m, *n]))
            }
            _ => Err(format!("matmul of shapes {sa:?} and {sb:?} is not supported (inner dimensions, or rank > 2)")),
        }
    }

    /// Reduction over `axis` (`None`: every axis).
    pub(crate) fn reduce(
        &mut self,
        kind: Reduce,
        a: NodeId,
        axis: Option<i64>,
        keepdims: bool,
    ) -> Result<NodeId, String> {
        let shape = self.shape(a).clone();
        match axis {
            None => {
                let flat = self.reshape(a, vec![numel(&shape)])?;
                let r = self.push(Op::Reduce(kind, flat, 0), Vec::new());
                if keepdims { self.reshape(r, vec![1; shape.len()]) } else { Ok(r) }
            }
            Some(ax) => {
                let rank = shape.len() as i64;
                let axis = if ax < 0 { ax + rank } else { ax };
                if axis < 0 || axis >= rank {
                    return Err(format!("axis {ax} is out of range for shape {shape:?}"));
                }
                let axis = axis as usize;
                if shape[axis] == 0 {
                    return Err("reduction over an empty axis".to_owned());
                }
                let mut out = shape.clone();
                if keepdims {
                    out[axis] = 1;
                } else {
                    out.remove(axis);
                }
                Ok(self.push(Op::Reduce(kind, a, axis), out))
            }
        }
    }

    pub(crate) fn transpose(&mut self, a: NodeId, perm: Option<Vec<usize>>) -> Result<NodeId, String> {
        let shape = self.shape(a).clone();
        let perm = perm.unwrap_or_else(|| (0..shape.len()).rev().collect());
        let mut seen = vec![false; shape.len()];
        if perm.len() != shape.len() || perm.iter().any(|&p| p >= shape.len() || std::mem::replace(&mut seen[p], true))
        {
            return Err(format!("axes {perm:?} are not a permutation for shape {shape:?}"));
        }
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return Ok(a);
        }
        let out = perm.iter().map(|&p| shape[p]).collect();
        Ok(self.push(Op::Transpose(a, perm), out))
    }

    pub(crate) fn reshape(&mut self, a: NodeId, shape: Shape) -> Result<NodeId, String> {
        if numel(&shape) != numel(self.shape(a)) {
            return Err(format!("cannot reshape {:?} into {shape:?}", self.shape(a)));
        }
        if self.shape(a) == &shape {
            return Ok(a);
        }
        Ok(self.push(Op::Reshape(a), shape))
    }

    /// Joins `parts` along `axis` (negative counts from the end).
    pub(crate) fn concat(&mut self, parts: &[NodeId], axis: i64) -> Result<NodeId, String> {
        let Some(&first) = parts.first() else {
            return Err("concatenation of nothing".to_owned());
        };
        let mut shape = self.shape(first).clone();
        let rank = shape.len() as i64;
        let ax = if axis < 0 { axis + rank } else { axis };
        if ax < 0 || ax >= rank {
            return Err(format!("axis {axis} is out of range for shape {shape:?}"));
        }
        let ax = ax as usize;
        for &p in &parts[1..] {
            let s = self.shape(p);
            let same_elsewhere =
                s.len() == shape.len() && s.iter().zip(&shape).enumerate().all(|(i, (a, b))| i == ax || a == b);
            if !same_elsewhere {
                return Err(format!("cannot concatenate shapes {:?} and {s:?} along axis {ax}", self.shape(first)));
            }
            shape[ax] += s[ax];
        }
        if parts.len() == 1 {
            return Ok(first);
        }
        Ok(self.push(Op::Concat(parts.to_vec(), ax), shape))
    }

    /// Operands of a node.
    pub(crate) fn operands(&self, id: NodeId) -> Vec<NodeId> {
        match &self.nodes[id].op {
            Op::Unary(_, a) | Op::Reduce(_, a, _) | Op::Transpose(a, _) | Op::Reshape(a) => vec![*a],
            Op::Binary(_, a, b) | Op::MatMul(a, b) | Op::MatMulBt(a, b) => vec![*a, *b],
            Op::Concat(parts, _) => parts.clone(),
            Op::Dense(a, b, bias, _) => vec![*a, *b, *bias],
            Op::Input | Op::Target | Op::Param(_) | Op::Const(_) => Vec::new(),
        }
    }

    /// Fuses `matmul + bias` and `relu(matmul + bias)` into [`Op::Dense`], and a product with a
    /// transposed matrix into [`Op::MatMulBt`], where the intermediate results have no other
    /// reader among the nodes `roots` need.
    ///
    /// The fused node takes the id of the outermost node it replaces, so every reader (and
    /// the roots) keeps pointing at the right value; the swallowed nodes become dead.
    pub(crate) fn fuse(&mut self, roots: &[NodeId]) {
        let live = self.live(roots);
        let mut uses = vec![0usize; self.nodes.len()];
        for &id in &live {
            for o in self.operands(id) {
                uses[o] += 1;
            }
        }
        for &r in roots {
            uses[r] += 1;
        }
        for &id in &live {
            let Some((a, b, bias)) = self.bias_add(id, &uses) else { continue };
            self.nodes[id].op = Op::Dense(a, b, bias, false);
        }
        for &id in &live {
            if let Op::MatMul(a, t) = self.nodes[id].op
                && uses[t] == 1
                && let Op::Transpose(b, ref perm) = self.nodes[t].op
                && perm[..] == [1, 0]
                && let [n, k] = self.nodes[b].shape[..]
                && n % 4 == 0
                && k % 4 == 0
            {
                self.nodes[id].op = Op::MatMulBt(a, b);
            }
        }
        for &id in &live {
            if let Op::Binary(Binary::Max, x, zero) = self.nodes[id].op
                && self.nodes[zero].op == Op::Const(vec![0.0])
                && uses[x] == 1
                && let Op::Dense(a, b, bias, false) = self.nodes[x].op
                && self.nodes[x].shape == self.nodes[id].shape
            {
                self.nodes[id].op = Op::Dense(a, b, bias, true);
            }
        }
    }

    /// `Add(MatMul(a, b), bias)` (either order) with a row bias of the product's width and
    /// a product nobody else reads.
    fn bias_add(&self, id: NodeId, uses: &[usize]) -> Option<(NodeId, NodeId, NodeId)> {
        let Op::Binary(Binary::Add, x, y) = self.nodes[id].op else { return None };
        for (m, c) in [(x, y), (y, x)] {
            if let Op::MatMul(a, b) = self.nodes[m].op
                && uses[m] == 1
                && self.nodes[m].shape == self.nodes[id].shape
                && let [_, n] = self.nodes[m].shape[..]
                && (self.nodes[c].shape == [n] || self.nodes[c].shape == [1, n])
            {
                return Some((a, b, c));
            }
        }
        None
    }

    /// Nodes the roots depend on, in topological (id) order: dead-code elimination.
    pub(crate) fn live(&self, roots: &[NodeId]) -> Vec<NodeId> {
        let mut live = vec![false; self.nodes.len()];
        let mut stack: Vec<NodeId> = roots.to_vec();
        while let Some(id) = stack.pop() {
            if !std::mem::replace(&mut live[id], true) {
                stack.extend(self.operands(id));
            }
        }
        (0..self.nodes.len()).filter(|&i| live[i]).collect()
    }
}
