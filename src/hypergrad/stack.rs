//! Arithmetic on stacks of T tasks: every parameter holds the T tasks'
//! values stacked along its first dimension, block t being task t's.

use crate::autodiff::tensor::{Level, Tensor};

/// θ repeated for T tasks (θ itself when T = 1).
pub fn replicate<B: Level>(theta: &[Tensor<B>], tasks: usize) -> Vec<Tensor<B>> {
    if tasks == 1 {
        return theta.to_vec();
    }
    theta.iter().map(|p| Tensor::cat(&vec![p.clone(); tasks], 0)).collect()
}

/// Each stacked parameter as [T, rest].
fn rows<B: Level>(p: &Tensor<B>, tasks: usize) -> Tensor<B> {
    p.reshape(&[tasks, p.num_elements() / tasks])
}

/// Σ_t of the T blocks, in θ's shapes.
pub fn task_sum<B: Level>(stacked: &[Tensor<B>], tasks: usize) -> Vec<Tensor<B>> {
    stacked
        .iter()
        .map(|p| {
            let mut dims = p.dims();
            dims[0] /= tasks;
            rows(p, tasks).sum_dim(0).reshape(&dims)
        })
        .collect()
}

/// ⟨a_t, b_t⟩ for every task t: per-parameter sums on the device, read back
/// in one transfer and added on the host in f64.
pub fn task_dots<B: Level>(a: &[Tensor<B>], b: &[Tensor<B>], tasks: usize) -> Vec<f64> {
    task_dots_many(&[(a, b)], tasks).pop().expect("one pair")
}

/// Two lists of per-parameter tensors, paired for `task_dots_many`.
pub type ListPair<'a, B> = (&'a [Tensor<B>], &'a [Tensor<B>]);

/// `task_dots` of several pairs of lists, all in one read from the device.
pub fn task_dots_many<B: Level>(pairs: &[ListPair<B>], tasks: usize) -> Vec<Vec<f64>> {
    let partial: Vec<Tensor<B>> = pairs
        .iter()
        .flat_map(|(a, b)| a.iter().zip(*b).map(|(x, y)| rows(&x.mul(y), tasks).sum_dim(1).reshape(&[tasks])))
        .collect();
    let values = Tensor::cat(&partial, 0).to_vec();
    let mut chunks = values.chunks(tasks);
    pairs
        .iter()
        .map(|(a, _)| {
            let mut out = vec![0.0; tasks];
            for chunk in chunks.by_ref().take(a.len()) {
                for (o, v) in out.iter_mut().zip(chunk) {
                    *o += v;
                }
            }
            out
        })
        .collect()
}

/// Block t multiplied by weights[t].
pub fn scale_tasks<B: Level>(stacked: &[Tensor<B>], weights: &[f64]) -> Vec<Tensor<B>> {
    let tasks = weights.len();
    let first = &stacked[0];
    let w = Tensor::<B>::from_f64(weights, &[tasks, 1], first.precision(), &first.device());
    stacked.iter().map(|p| rows(p, tasks).mul(&w).reshape(&p.dims())).collect()
}

/// Blocks moved between stacked lists: block `to` of the result (of
/// `to_tasks`) is block `from` of `stacked` (of `from_tasks`) for each pair,
/// zeros elsewhere. A 0/1 matrix product moves them exactly (products by 1,
/// sums with 0).
fn move_tasks<B: Level>(stacked: &[Tensor<B>], from_tasks: usize, to_tasks: usize, pairs: impl Iterator<Item = (usize, usize)>) -> Vec<Tensor<B>> {
    let first = &stacked[0];
    let mut matrix = vec![0.0; to_tasks * from_tasks];
    for (to, from) in pairs {
        matrix[to * from_tasks + from] = 1.0;
    }
    let matrix = Tensor::<B>::from_f64(&matrix, &[to_tasks, from_tasks], first.precision(), &first.device());
    stacked
        .iter()
        .map(|p| {
            let mut dims = p.dims();
            dims[0] = dims[0] / from_tasks * to_tasks;
            matrix.matmul(&rows(p, from_tasks)).reshape(&dims)
        })
        .collect()
}

/// The blocks of the `chosen` tasks, in order.
pub fn select_tasks<B: Level>(stacked: &[Tensor<B>], tasks: usize, chosen: &[usize]) -> Vec<Tensor<B>> {
    move_tasks(stacked, tasks, chosen.len(), chosen.iter().copied().enumerate())
}

/// The inverse of `select_tasks`: chosen blocks placed at their tasks, zeros elsewhere.
pub fn place_tasks<B: Level>(selected: &[Tensor<B>], tasks: usize, chosen: &[usize]) -> Vec<Tensor<B>> {
    move_tasks(selected, chosen.len(), tasks, chosen.iter().enumerate().map(|(i, &t)| (t, i)))
}
