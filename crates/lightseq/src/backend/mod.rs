//! Op bodies, one folder per device: `cpu` (the semantic reference) and `cuda`.

pub(crate) mod cpu;
pub mod cuda;

/// Where the matrices of a batched row-major GEMM `C_i = op(A_i) @ op(B_i)` sit in their
/// buffers, in elements: the row stride (leading dimension) of each operand as stored and
/// the distance between consecutive matrices of the batch. Strides other than the packed
/// ones let attention read and write heads inside [tokens, heads * head_dim] activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct GemmStrides {
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub batch_a: usize,
    pub batch_b: usize,
    pub batch_c: usize,
}

impl GemmStrides {
    /// Contiguous batches of contiguous matrices: A [m, k] (or [k, m] when `ta`), B [k, n]
    /// (or [n, k] when `tb`), C [m, n].
    pub fn packed(ta: bool, tb: bool, m: usize, n: usize, k: usize) -> Self {
        GemmStrides {
            lda: if ta { m } else { k },
            ldb: if tb { k } else { n },
            ldc: n,
            batch_a: m * k,
            batch_b: k * n,
            batch_c: m * n,
        }
    }

    /// Elements a buffer needs to hold every matrix of the batch (rows x cols as stored).
    pub fn extent(ld: usize, batch_stride: usize, batch: usize, rows: usize, cols: usize) -> usize {
        if batch == 0 || rows == 0 || cols == 0 {
            0
        } else {
            (batch - 1) * batch_stride + (rows - 1) * ld + cols
        }
    }
}
