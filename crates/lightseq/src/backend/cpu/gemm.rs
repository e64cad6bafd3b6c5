use super::bias_act;
use crate::ops::Activation;

/// `y[m, n] = x[m, k] @ w[n, k]^T` with the `gemm` crate on rayon threads.
pub(crate) fn matmul_nt(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return y;
    }
    if k == 0 {
        return y;
    }
    let par = if (m * n * k) < 64 * 64 * 64 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    };
    // Row-major y (m x n): column stride 1, row stride n. x (m x k): cs 1, rs k.
    // w^T (k x n) read from row-major w (n x k): element (kk, j) = w[j * k + kk], so cs k, rs 1.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
    y
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
    let mut y = matmul_nt(x, w, m, n, k);
    bias_act(&mut y, b, act, n);
    y
}
