use super::bias_act;
use crate::backend::GemmStrides;
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
    let s = GemmStrides::packed(ta, tb, m, n, k);
    matmul_strided(a, ta, b, tb, batch, m, n, k, &s, &mut c);
    c
}

/// [`matmul`] with the matrices at the strides `s`, writing C_i into `c` (elements outside
/// the C matrices are left as they are). The caller checks that the buffers hold them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_strided(
    a: &[f32],
    ta: bool,
    b: &[f32],
    tb: bool,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    s: &GemmStrides,
    c: &mut [f32],
) {
    if batch == 0 || m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..batch {
            for r in 0..m {
                let at = i * s.batch_c + r * s.ldc;
                c[at..at + n].fill(0.0);
            }
        }
        return;
    }
    let par = if (batch * m * n * k) < 64 * 64 * 64 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    };
    // Strides of op(A) (m x k) and op(B) (k x n) read from row-major storage.
    let (a_cs, a_rs) = if ta {
        (s.lda as isize, 1)
    } else {
        (1, s.lda as isize)
    };
    let (b_cs, b_rs) = if tb {
        (s.ldb as isize, 1)
    } else {
        (1, s.ldb as isize)
    };
    for i in 0..batch {
        let (ap, bp) = (&a[i * s.batch_a..], &b[i * s.batch_b..]);
        let cp = &mut c[i * s.batch_c..];
        // SAFETY: the caller checked that each buffer holds its matrices at these strides.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                cp.as_mut_ptr(),
                1,
                s.ldc as isize,
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
