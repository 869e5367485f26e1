//! Native CPU kernels for the Conv-4 operations on Flex (f32 and f64).
//!
//! Convolution is im2col + one matrix product per (image, group, block of
//! output channels), with gemm's own micro-kernels: the 3×3, padding-1 im2col
//! is a handful of row copies (a strided one gathers), each worker reuses one scratch buffer, and work
//! is spread over images × groups × channel blocks so that two cores stay busy
//! even for five images. The input gradient is the same convolution with the
//! weights transposed and flipped; the weight gradient accumulates one matrix
//! product per image into at most four partial sums over fixed image ranges
//! (so its rounding does not depend on the core count). Batch norm, the ReLU
//! mask and pooling are one or two passes over the data, parallel over
//! channels or planes, and no output is zeroed before it is written.

use std::borrow::Cow;
use std::cell::RefCell;
use std::mem::MaybeUninit;

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::{DType, Shape, TensorData, TensorMetadata};
use rayon::prelude::*;

use super::{Conv3x3Shape, ConvNetOps, KernelSettings, count_convolution};

/// Workers a kernel may use: the pool's, unless the caller already runs one
/// task per core (then a kernel stays on its own thread: handing work to the
/// pool from every task thread costs more than it gains).
fn workers() -> usize {
    if KernelSettings::current().serial { 1 } else { rayon::current_num_threads() }
}

/// `f(i, chunk)` for each `chunk`-sized piece of `data`, over the workers.
fn for_each_chunk<E: Send>(data: &mut [E], chunk: usize, f: impl Fn(usize, &mut [E]) + Sync + Send) {
    if workers() > 1 {
        data.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        data.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// `f(i, a_chunk, b_chunk)` for matching pieces of two outputs, over the workers.
fn for_each_chunk2<A: Send, B: Send>(
    a: &mut [A],
    b: &mut [B],
    chunk: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync + Send,
) {
    if workers() > 1 {
        a.par_chunks_mut(chunk).zip(b.par_chunks_mut(chunk)).enumerate().for_each(|(i, (x, y))| f(i, x, y));
    } else {
        a.chunks_mut(chunk).zip(b.chunks_mut(chunk)).enumerate().for_each(|(i, (x, y))| f(i, x, y));
    }
}

/// A vector of `len` elements written chunk by chunk by `fill` (over the
/// workers) without being zeroed first: zeroing outputs that are overwritten
/// anyway was 6 % of a Hessian-vector product's time.
fn filled<T: Copy + Send>(len: usize, chunk: usize, fill: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync + Send) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(len);
    for_each_chunk(&mut v.spare_capacity_mut()[..len], chunk, fill);
    // SAFETY: every caller's `fill` writes every element of its chunk.
    unsafe { v.set_len(len) };
    v
}

/// An initialised slice seen as one that may be (re)written: always sound.
fn as_uninit<T>(s: &mut [T]) -> &mut [MaybeUninit<T>] {
    // SAFETY: MaybeUninit<T> has T's layout, and only initialised values are written through it.
    unsafe { &mut *(s as *mut [T] as *mut [MaybeUninit<T>]) }
}

/// `[f(0), .., f(n − 1)]` over the workers.
fn map_range<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    if workers() > 1 { (0..n).into_par_iter().map(f).collect() } else { (0..n).map(f).collect() }
}

/// The float types the kernels run in.
trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::AddAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn values(t: &FlexTensor) -> Cow<'_, [Self]>;
    fn tensor(values: Vec<Self>, dims: &[usize]) -> FlexTensor;
    /// This thread's scratch buffer of at least `len` elements.
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
}

macro_rules! real {
    ($t:ty, $scratch:ident) => {
        thread_local! {
            static $scratch: RefCell<Vec<$t>> = const { RefCell::new(Vec::new()) };
        }
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn values(t: &FlexTensor) -> Cow<'_, [Self]> {
                match t.as_slice::<$t>() {
                    Some(s) => Cow::Borrowed(s),
                    None => Cow::Owned(t.to_contiguous().as_slice::<$t>().expect("a contiguous tensor of its own dtype").to_vec()),
                }
            }
            fn tensor(values: Vec<Self>, dims: &[usize]) -> FlexTensor {
                FlexTensor::from_data(TensorData::new(values, Shape::from(dims.to_vec())))
            }
            fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
                $scratch.with(|s| {
                    let mut s = s.borrow_mut();
                    if s.len() < len {
                        s.resize(len, 0.0);
                    }
                    f(&mut s[..len])
                })
            }
        }
    };
}
real!(f32, SCRATCH_F32);
real!(f64, SCRATCH_F64);

fn dims(t: &FlexTensor) -> Vec<usize> {
    t.shape().to_vec()
}

/// Runs the f32 or f64 instance of a kernel for the dtype of `t`.
macro_rules! by_dtype {
    ($t:expr, $kernel:ident ( $($arg:expr),* )) => {
        match $t.dtype() {
            DType::F32 => $kernel::<f32>($($arg),*),
            DType::F64 => $kernel::<f64>($($arg),*),
            other => panic!("Conv-4 kernels run in f32 or f64, not {other:?}"),
        }
    };
}

/// C[m×n] (row stride `ldc`) = or += A[m×k] (row stride `lda`) · B, with B
/// read through explicit strides, on this thread.
#[allow(clippy::too_many_arguments)]
fn matmul<E: Real>(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [MaybeUninit<E>],
    ldc: usize,
    accumulate: bool,
    a: &[E],
    lda: usize,
    b: &[E],
    b_row_stride: usize,
    b_col_stride: usize,
) {
    assert!(m == 0 || c.len() >= (m - 1) * ldc + n);
    assert!(m == 0 || a.len() >= (m - 1) * lda + k);
    assert!(k == 0 || n == 0 || b.len() > (k - 1) * b_row_stride + (n - 1) * b_col_stride);
    // SAFETY: the asserts above bound every element gemm touches inside the
    // three slices, and `c` is borrowed mutably, so nothing else aliases it.
    // gemm writes all m × n elements of `c`, and reads them only when
    // `accumulate` says they hold values.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr() as *mut E,
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            1,
            lda as isize,
            b.as_ptr(),
            b_col_stride as isize,
            b_row_stride as isize,
            E::ONE,
            E::ONE,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// im2col for a 3×3 kernel with padding 1: `x` [C, H, W] to `col` [C·9, H·W].
fn im2col<E: Real>(x: &[E], c: usize, h: usize, w: usize, col: &mut [E]) {
    let hw = h * w;
    for ch in 0..c {
        let plane = &x[ch * hw..(ch + 1) * hw];
        for ki in 0..3 {
            for kj in 0..3 {
                let row = &mut col[(ch * 9 + ki * 3 + kj) * hw..][..hw];
                for i in 0..h {
                    let out = &mut row[i * w..(i + 1) * w];
                    let si = i as isize + ki as isize - 1;
                    if si < 0 || si >= h as isize {
                        out.fill(E::ZERO);
                        continue;
                    }
                    let src = &plane[si as usize * w..(si as usize + 1) * w];
                    match kj {
                        0 => {
                            out[0] = E::ZERO;
                            out[1..].copy_from_slice(&src[..w - 1]);
                        }
                        1 => out.copy_from_slice(src),
                        _ => {
                            out[..w - 1].copy_from_slice(&src[1..]);
                            out[w - 1] = E::ZERO;
                        }
                    }
                }
            }
        }
    }
}

/// im2col for a 3×3 kernel with padding 1 and any stride: `x` [C, H, W] to
/// `col` [C·9, h·w] for the output size [h, w]. Stride 1 takes the row-copy
/// path above.
fn im2col_shaped<E: Real>(x: &[E], c: usize, shape: &Conv3x3Shape, col: &mut [E]) {
    let ([h, w], s) = (shape.input, shape.stride);
    if s == 1 {
        return im2col(x, c, h, w, col);
    }
    let [ho, wo] = shape.output();
    let (hw, out_hw) = (h * w, ho * wo);
    for ch in 0..c {
        let plane = &x[ch * hw..(ch + 1) * hw];
        for ki in 0..3 {
            for kj in 0..3 {
                let row = &mut col[(ch * 9 + ki * 3 + kj) * out_hw..][..out_hw];
                for (i, out) in row.chunks_exact_mut(wo).enumerate() {
                    // Input row and column s·i + k − 1 (padding 1).
                    let Some(si) = (s * i + ki).checked_sub(1).filter(|&r| r < h) else {
                        out.fill(E::ZERO);
                        continue;
                    };
                    let src = &plane[si * w..(si + 1) * w];
                    for (j, o) in out.iter_mut().enumerate() {
                        *o = (s * j + kj).checked_sub(1).filter(|&q| q < w).map_or(E::ZERO, |q| src[q]);
                    }
                }
            }
        }
    }
}

/// The adjoint of `im2col_shaped` for stride > 1: `col` [C·9, h·w] added
/// into `dx` [C, H, W] at the positions it was read from.
fn col2im_strided<E: Real>(col: &[E], c: usize, shape: &Conv3x3Shape, dx: &mut [E]) {
    let ([h, w], s, [ho, wo]) = (shape.input, shape.stride, shape.output());
    let (hw, out_hw) = (h * w, ho * wo);
    for ch in 0..c {
        let plane = &mut dx[ch * hw..(ch + 1) * hw];
        for ki in 0..3 {
            for kj in 0..3 {
                let row = &col[(ch * 9 + ki * 3 + kj) * out_hw..][..out_hw];
                for (i, grad) in row.chunks_exact(wo).enumerate() {
                    let Some(si) = (s * i + ki).checked_sub(1).filter(|&r| r < h) else { continue };
                    let dst = &mut plane[si * w..(si + 1) * w];
                    for (j, &g) in grad.iter().enumerate() {
                        if let Some(q) = (s * j + kj).checked_sub(1).filter(|&q| q < w) {
                            dst[q] += g;
                        }
                    }
                }
            }
        }
    }
}

/// How many blocks to split `rows` output channels into so that `items`
/// independent products keep every worker busy (at least 8 rows a block).
fn row_blocks(items: usize, rows: usize) -> usize {
    let workers = workers();
    let mut blocks = 1;
    while workers > 1 && items * blocks < 4 * workers && rows.is_multiple_of(blocks * 2) && rows / (blocks * 2) >= 8 {
        blocks *= 2;
    }
    blocks
}

/// x [N, G·Ci, H, W] ⋆ w [G·Co, Ci, 3, 3] → [N, G·Co, h, w].
fn conv3x3_kernel<E: Real>(x: &FlexTensor, w: &FlexTensor, shape: &Conv3x3Shape) -> FlexTensor {
    let ([n, cin, h, wd], [cout, ci, _, _]) = (dims4(x), dims4(w));
    assert_eq!([h, wd], shape.input, "conv3x3: input {:?} does not match the geometry {shape:?}", dims(x));
    let (g, hw, [ho, wo]) = (shape.groups, h * wd, shape.output());
    let (co, out_hw) = (cout / g, ho * wo);
    assert_eq!(cin, g * ci, "conv3x3: input channels {cin} do not match the weight [{cout}, {ci}, 3, 3] in {g} groups");
    let (xv, wv) = (E::values(x), E::values(w));
    let blocks = row_blocks(n * g, co);
    let rows = co / blocks;
    let k = ci * 9;
    let y = filled(n * cout * out_hw, rows * out_hw, |item, out| {
        let (image, rest) = (item / (g * blocks), item % (g * blocks));
        let (group, block) = (rest / blocks, rest % blocks);
        let input = &xv[(image * cin + group * ci) * hw..][..ci * hw];
        let weights = &wv[(group * co + block * rows) * k..][..rows * k];
        E::with_scratch(k * out_hw, |col| {
            im2col_shaped(input, ci, shape, col);
            matmul(rows, out_hw, k, out, out_hw, false, weights, k, col, out_hw, 1);
        });
    });
    E::tensor(y, &[n, cout, ho, wo])
}

/// The input gradient of a strided convolution: per image and group,
/// wᵀ [Ci·9, Co] · dy [Co, h·w] as columns, added back into the image by
/// `col2im_strided` (the flipped-kernel convolution of stride 1 has no
/// equivalent here: the output grid skips input positions).
fn conv3x3_input_grad_strided<E: Real>(dy: &FlexTensor, w: &FlexTensor, shape: &Conv3x3Shape) -> FlexTensor {
    let ([n, cout, ho, wo], [_, ci, _, _]) = (dims4(dy), dims4(w));
    assert_eq!([ho, wo], shape.output(), "conv3x3_input_grad: dy {:?} does not match the geometry {shape:?}", dims(dy));
    let (g, [h, wd]) = (shape.groups, shape.input);
    let (co, k, hw, out_hw) = (cout / g, ci * 9, h * wd, ho * wo);
    let wv = E::values(w);
    // wᵀ per group, [G, Ci·9, Co].
    let mut transposed = vec![E::ZERO; g * k * co];
    for group in 0..g {
        for o in 0..co {
            for r in 0..k {
                transposed[(group * k + r) * co + o] = wv[(group * co + o) * k + r];
            }
        }
    }
    let dyv = E::values(dy);
    let mut dx = vec![E::ZERO; n * g * ci * hw];
    for_each_chunk(&mut dx, ci * hw, |item, out| {
        let (image, group) = (item / g, item % g);
        let grad = &dyv[(image * cout + group * co) * out_hw..][..co * out_hw];
        E::with_scratch(k * out_hw, |col| {
            matmul(k, out_hw, co, as_uninit(col), out_hw, false, &transposed[group * k * co..][..k * co], co, grad, out_hw, 1);
            col2im_strided(col, ci, shape, out);
        });
    });
    E::tensor(dx, &[n, g * ci, h, wd])
}

/// The weights of the input gradient: w [G·Co, Ci, 3, 3] → [G·Ci, Co, 3, 3]
/// with each 3×3 kernel flipped.
fn transpose_flip<E: Real>(w: &FlexTensor, groups: usize) -> FlexTensor {
    let [cout, ci, _, _] = dims4(w);
    let co = cout / groups;
    let wv = E::values(w);
    let mut out = vec![E::ZERO; wv.len()];
    for g in 0..groups {
        for o in 0..co {
            for c in 0..ci {
                let src = &wv[((g * co + o) * ci + c) * 9..][..9];
                let dst = &mut out[((g * ci + c) * co + o) * 9..][..9];
                for t in 0..9 {
                    dst[t] = src[8 - t];
                }
            }
        }
    }
    E::tensor(out, &[groups * ci, co, 3, 3])
}

/// Σ over images of dy_n [Co, h·w] · im2col(x_n)ᵀ, per group → [G·Co, Ci, 3, 3].
fn conv3x3_weight_grad_kernel<E: Real>(x: &FlexTensor, dy: &FlexTensor, shape: &Conv3x3Shape) -> FlexTensor {
    let ([n, cin, h, wd], [_, cout, ho, wo]) = (dims4(x), dims4(dy));
    assert!(
        [h, wd] == shape.input && [ho, wo] == shape.output(),
        "conv3x3_weight_grad: x {:?} and dy {:?} do not match the geometry {shape:?}",
        dims(x),
        dims(dy)
    );
    let (g, hw, out_hw) = (shape.groups, h * wd, ho * wo);
    let (ci, co) = (cin / g, cout / g);
    let k = ci * 9;
    let (xv, dyv) = (E::values(x), E::values(dy));
    // One group's gradient over a range of images, added into `out` [Co, Ci·9].
    let accumulate = |group: usize, images: std::ops::Range<usize>, out: &mut [E]| {
        E::with_scratch(k * out_hw, |col| {
            for image in images {
                im2col_shaped(&xv[(image * cin + group * ci) * hw..][..ci * hw], ci, shape, col);
                let grad = &dyv[(image * cout + group * co) * out_hw..][..co * out_hw];
                matmul(co, k, out_hw, as_uninit(out), k, true, grad, out_hw, col, 1, out_hw);
            }
        })
    };
    // Each group's sum over images is split into at most four partial sums
    // over fixed image ranges, added in order: the workers run them in
    // parallel, and the rounding does not depend on how many workers there are.
    let parts = n.clamp(1, 4);
    let partial: Vec<Vec<E>> = map_range(g * parts, |item| {
        let (group, p) = (item / parts, item % parts);
        let mut acc = vec![E::ZERO; co * k];
        accumulate(group, p * n / parts..(p + 1) * n / parts, &mut acc);
        acc
    });
    let mut dw = Vec::with_capacity(cout * k);
    for sums in partial.chunks(parts) {
        let mut total = sums[0].clone();
        for more in &sums[1..] {
            total.iter_mut().zip(more).for_each(|(t, &m)| *t += m);
        }
        dw.extend(total);
    }
    E::tensor(dw, &[cout, ci, 3, 3])
}

fn dims4(t: &FlexTensor) -> [usize; 4] {
    let d = dims(t);
    assert_eq!(d.len(), 4, "Conv-4 kernels take [N, C, H, W] tensors, got {d:?}");
    [d[0], d[1], d[2], d[3]]
}

/// Σ term(a[i], b[i]) in f64, accurate and fast: blocks of 256 are summed in
/// `E` over 8 independent lanes (which vectorise), the block sums in f64.
fn sum_f64<E: Real>(a: &[E], b: &[E], term: impl Fn(E, E) -> E) -> f64 {
    let mut total = 0.0;
    for (a, b) in a.chunks(256).zip(b.chunks(256)) {
        let mut lanes = [E::ZERO; 8];
        let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
        let (ra, rb) = (a8.remainder(), b8.remainder());
        for (x, y) in a8.zip(b8) {
            for l in 0..8 {
                lanes[l] += term(x[l], y[l]);
            }
        }
        let mut block = E::ZERO;
        for (&x, &y) in ra.iter().zip(rb) {
            block += term(x, y);
        }
        for lane in lanes {
            block += lane;
        }
        total += block.to_f64();
    }
    total
}

/// Mean and 1/sqrt(var + eps) of each channel of x [N, C, H·W] (two passes,
/// as the reference computes them). Channel sums run over thousands of
/// elements, so they accumulate in f64 whatever the precision.
fn channel_stats<E: Real>(x: &[E], n: usize, c: usize, hw: usize, eps: f64) -> Vec<(E, E)> {
    let m = 1.0 / (n * hw) as f64;
    map_range(c, |ch| {
        let plane = |i: usize| &x[(i * c + ch) * hw..][..hw];
        let mean = (0..n).map(|i| sum_f64(plane(i), plane(i), |v, _| v)).sum::<f64>() * m;
        let shift = E::from_f64(mean);
        let var = (0..n).map(|i| sum_f64(plane(i), plane(i), |v, _| (v - shift) * (v - shift))).sum::<f64>() * m;
        (shift, E::from_f64(1.0 / (var + eps).sqrt()))
    })
}

fn batch_norm_kernel<E: Real>(x: &FlexTensor, gamma: &FlexTensor, beta: &FlexTensor, eps: f64) -> FlexTensor {
    let [n, c, h, w] = dims4(x);
    let hw = h * w;
    let (xv, gv, bv) = (E::values(x), E::values(gamma), E::values(beta));
    let stats = channel_stats(&xv, n, c, hw, eps);
    let y = filled(xv.len(), hw, |plane, out| {
        let ch = plane % c;
        let inp = &xv[plane * hw..][..hw];
        let (mean, inv) = stats[ch];
        let (scale, shift) = (gv[ch] * inv, bv[ch]);
        out.iter_mut().zip(inp).for_each(|(o, &v)| {
            o.write((v - mean) * scale + shift);
        });
    });
    E::tensor(y, &[n, c, h, w])
}

fn batch_norm_grad_kernel<E: Real>(x: &FlexTensor, gamma: &FlexTensor, dy: &FlexTensor, eps: f64) -> [FlexTensor; 3] {
    let [n, c, h, w] = dims4(x);
    let hw = h * w;
    let (xv, gv, dyv) = (E::values(x), E::values(gamma), E::values(dy));
    let stats = channel_stats(&xv, n, c, hw, eps);
    // Per channel: Σ dy and Σ dy·x̂ (in f64, as the statistics).
    let sums: Vec<(E, E)> = map_range(c, |ch| {
        let (mean, inv) = stats[ch];
        let (mut d_beta, mut d_gamma) = (0.0f64, 0.0f64);
        for i in 0..n {
            let at = (i * c + ch) * hw;
            let (x, g) = (&xv[at..at + hw], &dyv[at..at + hw]);
            d_beta += sum_f64(g, g, |g, _| g);
            d_gamma += sum_f64(x, g, |v, g| g * ((v - mean) * inv));
        }
        (E::from_f64(d_beta), E::from_f64(d_gamma))
    });
    let m = E::from_f64(1.0 / (n * hw) as f64);
    let dx = filled(xv.len(), hw, |plane, out| {
        let ch = plane % c;
        let ((mean, inv), (d_beta, d_gamma)) = (stats[ch], sums[ch]);
        let (scale, shift, slope) = (gv[ch] * inv, d_beta * m, d_gamma * m);
        let at = plane * hw;
        for ((o, &v), &g) in out.iter_mut().zip(&xv[at..at + hw]).zip(&dyv[at..at + hw]) {
            o.write(scale * (g - shift - (v - mean) * inv * slope));
        }
    });
    let (d_beta, d_gamma): (Vec<E>, Vec<E>) = sums.into_iter().unzip();
    [E::tensor(dx, &[n, c, h, w]), E::tensor(d_gamma, &[c]), E::tensor(d_beta, &[c])]
}

fn mask_positive_kernel<E: Real>(v: &FlexTensor, x: &FlexTensor) -> FlexTensor {
    let (vv, xv) = (E::values(v), E::values(x));
    assert_eq!(vv.len(), xv.len(), "mask_positive: {:?} and {:?} differ", dims(v), dims(x));
    let out = filled(vv.len(), 1 << 14, |chunk, out| {
        let at = chunk << 14;
        for ((o, &v), &x) in out.iter_mut().zip(&vv[at..]).zip(&xv[at..]) {
            o.write(if x > E::ZERO { v } else { E::ZERO });
        }
    });
    E::tensor(out, &dims(v))
}

fn max_pool_kernel<E: Real>(x: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let [n, c, h, w] = dims4(x);
    let (ho, wo) = (h / 2, w / 2);
    let xv = E::values(x);
    let len = n * c * ho * wo;
    let (mut y, mut at) = (Vec::<E>::with_capacity(len), Vec::<i32>::with_capacity(len));
    for_each_chunk2(&mut y.spare_capacity_mut()[..len], &mut at.spare_capacity_mut()[..len], ho * wo, |plane, out, idx| {
        let p = &xv[plane * h * w..][..h * w];
        for i in 0..ho {
            let (top, bottom) = (&p[2 * i * w..][..w], &p[(2 * i + 1) * w..][..w]);
            let (out, idx) = (&mut out[i * wo..][..wo], &mut idx[i * wo..][..wo]);
            for j in 0..wo {
                // The first maximum in row-major window order, as Burn's pooling
                // picks it; selects rather than branches (the comparisons are
                // data-dependent and would mispredict half the time).
                let (a, b, c, d) = (top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]);
                let (ab, at_ab) = if b > a { (b, 1) } else { (a, 0) };
                let (cd, at_cd) = if d > c { (d, w + 1) } else { (c, w) };
                let (best, at) = if cd > ab { (cd, at_cd) } else { (ab, at_ab) };
                out[j].write(best);
                idx[j].write((2 * i * w + 2 * j + at) as i32);
            }
        }
    });
    // SAFETY: the loops above wrote all ho × wo outputs of every plane.
    unsafe {
        y.set_len(len);
        at.set_len(len);
    }
    (E::tensor(y, &[n, c, ho, wo]), FlexTensor::from_data(TensorData::new(at, Shape::from(vec![n, c, ho, wo]))))
}

fn positions(indices: &FlexTensor) -> Cow<'_, [i32]> {
    match indices.as_slice::<i32>() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(
            FlexTensor::from_data(indices.clone().into_data().convert::<i32>()).as_slice::<i32>().expect("i32 positions").to_vec(),
        ),
    }
}

fn pool_gather_kernel<E: Real>(x: &FlexTensor, indices: &FlexTensor) -> FlexTensor {
    let ([_, _, h, w], [n, c, ho, wo]) = (dims4(x), dims4(indices));
    let (xv, at) = (E::values(x), positions(indices));
    let y = filled(n * c * ho * wo, ho * wo, |plane, out| {
        let p = &xv[plane * h * w..][..h * w];
        let idx = &at[plane * ho * wo..][..ho * wo];
        out.iter_mut().zip(idx).for_each(|(o, &i)| {
            o.write(p[i as usize]);
        });
    });
    E::tensor(y, &[n, c, ho, wo])
}

fn pool_scatter_kernel<E: Real>(dy: &FlexTensor, indices: &FlexTensor, h: usize, w: usize) -> FlexTensor {
    let [n, c, ho, wo] = dims4(dy);
    let (dyv, at) = (E::values(dy), positions(indices));
    let mut dx = vec![E::ZERO; n * c * h * w];
    for_each_chunk(&mut dx, h * w, |plane, out| {
        let (grad, idx) = (&dyv[plane * ho * wo..][..ho * wo], &at[plane * ho * wo..][..ho * wo]);
        grad.iter().zip(idx).for_each(|(&g, &i)| out[i as usize] += g);
    });
    E::tensor(dx, &[n, c, h, w])
}

/// Multiply-adds × 2 of a 3×3 convolution of `n` images from `inputs` to
/// `outputs` channels in all (the three operations cost the same).
fn conv_flop(n: usize, inputs: usize, outputs: usize, shape: &Conv3x3Shape) -> usize {
    let [h, w] = shape.output();
    2 * n * inputs * (outputs / shape.groups) * 9 * h * w
}

impl ConvNetOps for Flex {
    const NATIVE: bool = true;

    fn conv3x3(x: FlexTensor, w: FlexTensor, shape: Conv3x3Shape) -> FlexTensor {
        let flop = conv_flop(dims4(&x)[0], dims4(&x)[1], dims4(&w)[0], &shape);
        count_convolution(flop, workers(), || by_dtype!(x, conv3x3_kernel(&x, &w, &shape)))
    }

    fn conv3x3_input_grad(dy: FlexTensor, w: FlexTensor, shape: Conv3x3Shape) -> FlexTensor {
        let flop = conv_flop(dims4(&dy)[0], dims4(&w)[1] * shape.groups, dims4(&dy)[1], &shape);
        count_convolution(flop, workers(), || {
            if shape.stride > 1 {
                return by_dtype!(dy, conv3x3_input_grad_strided(&dy, &w, &shape));
            }
            // Stride 1: the same convolution of dy with the flipped, transposed kernels.
            let flipped = by_dtype!(w, transpose_flip(&w, shape.groups));
            by_dtype!(dy, conv3x3_kernel(&dy, &flipped, &shape))
        })
    }

    fn conv3x3_weight_grad(x: FlexTensor, dy: FlexTensor, shape: Conv3x3Shape) -> FlexTensor {
        let flop = conv_flop(dims4(&x)[0], dims4(&x)[1], dims4(&dy)[1], &shape);
        count_convolution(flop, workers(), || by_dtype!(x, conv3x3_weight_grad_kernel(&x, &dy, &shape)))
    }

    fn batch_norm_on_batch(x: FlexTensor, gamma: FlexTensor, beta: FlexTensor, eps: f64) -> FlexTensor {
        by_dtype!(x, batch_norm_kernel(&x, &gamma, &beta, eps))
    }

    fn batch_norm_on_batch_grad(x: FlexTensor, gamma: FlexTensor, dy: FlexTensor, eps: f64) -> [FlexTensor; 3] {
        by_dtype!(x, batch_norm_grad_kernel(&x, &gamma, &dy, eps))
    }

    fn mask_positive(v: FlexTensor, x: FlexTensor) -> FlexTensor {
        by_dtype!(v, mask_positive_kernel(&v, &x))
    }

    fn max_pool2x2(x: FlexTensor) -> (FlexTensor, FlexTensor) {
        by_dtype!(x, max_pool_kernel(&x))
    }

    fn pool_gather(x: FlexTensor, indices: FlexTensor) -> FlexTensor {
        by_dtype!(x, pool_gather_kernel(&x, &indices))
    }

    fn pool_scatter(dy: FlexTensor, indices: FlexTensor, height: usize, width: usize) -> FlexTensor {
        by_dtype!(dy, pool_scatter_kernel(&dy, &indices, height, width))
    }
}
