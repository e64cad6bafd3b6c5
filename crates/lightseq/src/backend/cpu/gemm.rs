use super::bias_act;
use crate::ops::Activation;

/// For each of `batch`: C[m, n] = op(A) @ op(B); op(A) is A [m, k] or A^T with A [k, m]
/// (`ta`), op(B) is B [k, n] or B^T with B [n, k] (`tb`). Row-major, contiguous batches.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    a: &[f32],
    ta: bool,
    b: &[f32],
    tb: bool,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let mut c = vec![0f32; batch * m * n];
    if m == 0 || n == 0 || k == 0 {
        return c;
    }
    let par = if (batch * m * n * k) < 64 * 64 * 64 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    };
    // Strides of op(A) (m x k) and op(B) (k x n) read from row-major storage.
    let (a_cs, a_rs) = if ta { (m as isize, 1) } else { (1, k as isize) };
    let (b_cs, b_rs) = if tb { (k as isize, 1) } else { (1, n as isize) };
    for i in 0..batch {
        let (ap, bp) = (&a[i * m * k..], &b[i * k * n..]);
        let cp = &mut c[i * m * n..(i + 1) * m * n];
        // SAFETY: the slices hold m*k, k*n and m*n elements addressed by these strides.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                cp.as_mut_ptr(),
                1,
                n as isize,
                false,
                ap.as_ptr(),
                a_cs,
                a_rs,
                bp.as_ptr(),
                b_cs,
                b_rs,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
    }
    c
}

pub(crate) fn linear(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    act: Activation,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    // x [m, k] @ w^T, w stored [n, k].
    let mut y = matmul(x, false, w, true, 1, m, n, k);
    bias_act(&mut y, b, act, n);
    y
}
