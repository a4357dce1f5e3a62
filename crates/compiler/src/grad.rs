//! Training: the loss on top of the forward graph and its reverse-mode derivative, built at
//! compile time as more IR nodes (so the backend compiles the backward pass like any other).

#![allow(clippy::indexing_slicing, reason = "node ids and axes are validated by the builders")]

use std::collections::BTreeMap;

use crate::ir::{Binary, Graph, NodeId, Op, Reduce, Unary, numel};

/// Which loss `LOSS = "..."` selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Loss {
    /// Mean of squared errors over every element.
    Mse,
    /// Softmax cross-entropy on logits over the last axis, averaged over the other axes.
    CrossEntropy,
}

/// Adds the loss of `pred` against a new target node; returns (target, scalar loss).
pub(crate) fn loss(g: &mut Graph, loss: Loss, pred: NodeId) -> Result<(NodeId, NodeId), String> {
    let shape = g.shape(pred).clone();
    let y = g.target(shape.clone());
    let l = match loss {
        Loss::Mse => {
            let d = g.binary(Binary::Sub, pred, y)?;
            let sq = g.binary(Binary::Mul, d, d)?;
            g.reduce(Reduce::Mean, sq, None, false)?
        }
        Loss::CrossEntropy => {
            if shape.is_empty() {
                return Err("cross_entropy needs logits with at least one axis".to_owned());
            }
            let rows = numel(&shape) / shape.last().copied().unwrap_or(1).max(1);
            let m = g.reduce(Reduce::Max, pred, Some(-1), true)?;
            let z = g.binary(Binary::Sub, pred, m)?;
            let e = g.unary(Unary::Exp, z);
            let s = g.reduce(Reduce::Sum, e, Some(-1), true)?;
            let lse = g.unary(Unary::Log, s);
            let logp = g.binary(Binary::Sub, z, lse)?;
            let yl = g.binary(Binary::Mul, y, logp)?;
            let total = g.reduce(Reduce::Sum, yl, None, false)?;
            let scale = g.scalar(-1.0 / rows as f32);
            g.binary(Binary::Mul, total, scale)?
        }
    };
    Ok((y, l))
}

/// Sums `grad` over the axes along which a tensor of `shape` was broadcast.
fn sum_to(g: &mut Graph, grad: NodeId, shape: &[usize]) -> Result<NodeId, String> {
    let mut cur = grad;
    while g.shape(cur).len() > shape.len() {
        cur = g.reduce(Reduce::Sum, cur, Some(0), false)?;
    }
    for (axis, &d) in shape.iter().enumerate() {
        if d == 1 && g.shape(cur)[axis] != 1 {
            cur = g.reduce(Reduce::Sum, cur, Some(axis as i64), true)?;
        }
    }
    Ok(cur)
}

/// Reverse-mode differentiation of the scalar `loss` with respect to every parameter.
/// Returns one gradient node per parameter, in parameter order.
pub(crate) fn gradients(g: &mut Graph, loss: NodeId) -> Result<Vec<NodeId>, String> {
    // Which nodes depend on a parameter (only those need adjoints).
    let n = g.nodes.len();
    let mut needs = vec![false; n];
    for id in 0..n {
        needs[id] = matches!(g.nodes[id].op, Op::Param(_)) || g.operands(id).iter().any(|&o| needs[o]);
    }
    let mut adj: BTreeMap<NodeId, NodeId> = BTreeMap::new();
    adj.insert(loss, g.scalar(1.0));
    for id in (0..=loss).rev() {
        let Some(&gy) = adj.get(&id) else { continue };
        if !needs[id] {
            continue;
        }
        let node = g.nodes[id].clone();
        let mut contrib: Vec<(NodeId, NodeId)> = Vec::new();
        match node.op {
            Op::Input | Op::Target | Op::Param(_) | Op::Const(_) => {}
            Op::Unary(u, a) => {
                let d = match u {
                    Unary::Copy => gy,
                    Unary::Neg => g.unary(Unary::Neg, gy),
                    Unary::Exp => g.binary(Binary::Mul, gy, id)?,
                    Unary::Log => g.binary(Binary::Div, gy, a)?,
                    Unary::Tanh => {
                        let sq = g.binary(Binary::Mul, id, id)?;
                        let one = g.scalar(1.0);
                        let d = g.binary(Binary::Sub, one, sq)?;
                        g.binary(Binary::Mul, gy, d)?
                    }
                    Unary::Sqrt => {
                        let half = g.scalar(0.5);
                        let h = g.binary(Binary::Mul, gy, half)?;
                        g.binary(Binary::Div, h, id)?
                    }
                    Unary::Abs => {
                        let zero = g.scalar(0.0);
                        let pos = g.binary(Binary::Gt, a, zero)?;
                        let neg = g.binary(Binary::Gt, zero, a)?;
                        let sign = g.binary(Binary::Sub, pos, neg)?;
                        g.binary(Binary::Mul, gy, sign)?
                    }
                };
                contrib.push((a, d));
            }
            Op::Binary(b, x, y) => {
                let (dx, dy) = match b {
                    Binary::Add => (gy, gy),
                    Binary::Sub => (gy, g.unary(Unary::Neg, gy)),
                    Binary::Mul => (g.binary(Binary::Mul, gy, y)?, g.binary(Binary::Mul, gy, x)?),
                    Binary::Div => {
                        let dx = g.binary(Binary::Div, gy, y)?;
                        let t = g.binary(Binary::Mul, dx, id)?;
                        (dx, g.unary(Unary::Neg, t))
                    }
                    Binary::Max | Binary::Min => {
                        // The chosen operand gets the gradient (x on ties, like the forward pass).
                        let (mx, my) = if b == Binary::Max {
                            (g.binary(Binary::Ge, x, y)?, g.binary(Binary::Gt, y, x)?)
                        } else {
                            (g.binary(Binary::Ge, y, x)?, g.binary(Binary::Gt, x, y)?)
                        };
                        (g.binary(Binary::Mul, gy, mx)?, g.binary(Binary::Mul, gy, my)?)
                    }
                    Binary::Ge | Binary::Gt | Binary::Eq => continue,
                };
                let sx = g.shape(x).clone();
                let sy = g.shape(y).clone();
                contrib.push((x, sum_to(g, dx, &sx)?));
                contrib.push((y, sum_to(g, dy, &sy)?));
            }
            Op::MatMul(a, b) => {
                let bt = g.transpose(b, None)?;
                let at = g.transpose(a, None)?;
                contrib.push((a, g.matmul(gy, bt)?));
                contrib.push((b, g.matmul(at, gy)?));
            }
            Op::Reduce(kind, a, axis) => {
                let sa = g.shape(a).clone();
                let mut kept = sa.clone();
                kept[axis] = 1;
                let gk = g.reshape(gy, kept.clone())?;
                let gb = g.broadcast_to(gk, &sa)?;
                let d = match kind {
                    Reduce::Sum => gb,
                    Reduce::Mean => {
                        let s = g.scalar(1.0 / sa[axis] as f32);
                        g.binary(Binary::Mul, gb, s)?
                    }
                    Reduce::Max => {
                        let yk = g.reshape(id, kept)?;
                        let mask = g.binary(Binary::Eq, a, yk)?;
                        g.binary(Binary::Mul, gb, mask)?
                    }
                };
                contrib.push((a, d));
            }
            Op::Transpose(a, perm) => {
                let mut inv = vec![0; perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    inv[p] = i;
                }
                contrib.push((a, g.transpose(gy, Some(inv))?));
            }
            Op::Reshape(a) => {
                let sa = g.shape(a).clone();
                contrib.push((a, g.reshape(gy, sa)?));
            }
            Op::Concat(..) => return Err("training through a concatenation is not supported".to_owned()),
            Op::Dense(..) | Op::MatMulBt(..) => {
                return Err("internal: fused nodes are built after differentiation".to_owned());
            }
        }
        for (target, d) in contrib {
            if !needs[target] {
                continue;
            }
            let total = match adj.get(&target) {
                Some(&prev) => g.binary(Binary::Add, prev, d)?,
                None => d,
            };
            adj.insert(target, total);
        }
    }
    let params: Vec<(NodeId, Vec<usize>)> = g.params.iter().map(|p| (p.node, g.shape(p.node).clone())).collect();
    params
        .into_iter()
        .map(|(node, shape)| match adj.get(&node) {
            Some(&d) => Ok(d),
            None => Ok(g.constant(vec![0.0; numel(&shape)], shape)),
        })
        .collect()
}
