//! GEMMs through cuBLASLt: `y[m, n] = x[m, k] @ w[n, k]^T (+ bias[n])`, and the general
//! batched `C = op(A) @ op(B)` of the training path (optionally with the bias gradient of
//! a weight-gradient GEMM in its epilogue); row-major, f32 accumulation for every dtype
//! (true f32 for f32 inputs: no TF32, for parity).

use super::cuda_err;
use crate::backend::GemmStrides;
use crate::error::Result;
use crate::tensor::DType;
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

const WORKSPACE_BYTES: usize = 32 << 20;

/// What a GEMM does after the product, with the device pointer it involves.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Epilogue {
    None,
    /// Adds bias [n] to every row of C.
    Bias(u64),
    /// max(C, 0), on the f32 result before rounding (exact: rounding keeps the sign).
    Relu,
    /// max(C + bias, 0).
    BiasRelu(u64),
}

impl Epilogue {
    fn kind(self) -> u8 {
        match self {
            Epilogue::None => 0,
            Epilogue::Bias(_) => 1,
            Epilogue::Relu => 2,
            Epilogue::BiasRelu(_) => 3,
        }
    }

    /// Bias plus, with `relu`, max(., 0).
    pub(crate) fn with(bias: Option<u64>, relu: bool) -> Self {
        match (bias, relu) {
            (None, false) => Epilogue::None,
            (Some(b), false) => Epilogue::Bias(b),
            (None, true) => Epilogue::Relu,
            (Some(b), true) => Epilogue::BiasRelu(b),
        }
    }
}

/// (dtype, f32 output, ta, tb, batch, m, n, k, epilogue kind) and strides of
/// `matmul_general`.
type AlgoKey = (
    (DType, bool, bool, bool, usize, usize, usize, usize, u8),
    GemmStrides,
);

pub(crate) struct BlasLt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    /// The heuristic's first algorithm per shape; None where it found none (only kept for
    /// the ReLU epilogues, which callers replace by a separate pass).
    algos: Mutex<HashMap<AlgoKey, Option<sys::cublasLtMatmulAlgo_t>>>,
}

// SAFETY: the handle is used only from calls that enqueue on the device's one stream;
// cuBLASLt handles may be shared across threads.
unsafe impl Send for BlasLt {}
unsafe impl Sync for BlasLt {}

impl Drop for BlasLt {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

fn data_type(dt: DType) -> sys::cudaDataType_t {
    match dt {
        DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
        _ => sys::cudaDataType_t::CUDA_R_32F,
    }
}

/// Descriptors for one call, destroyed on drop.
struct Descs {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
}

impl Drop for Descs {
    fn drop(&mut self) {
        // SAFETY: each was created once in `Descs::general`.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
        }
    }
}

impl Descs {
    /// Descriptors of the column-major `C^T (n x m) = op(B)^T (n x k) @ op(A)^T (k x m)`,
    /// which is the row-major `C [m, n] = op(A) @ op(B)`; B is cuBLASLt's first operand.
    /// For `batch > 1` every layout is strided-batched at the strides `st`. `epi` as
    /// [`Epilogue`].
    #[allow(clippy::too_many_arguments)]
    fn general(
        dt: DType,
        c_f32: bool,
        ta: bool,
        tb: bool,
        batch: usize,
        m: usize,
        n: usize,
        k: usize,
        epi: Epilogue,
        st: &GemmStrides,
    ) -> Result<Self> {
        let e = |e| cuda_err("cuBLASLt descriptor", e);
        let ty = data_type(dt);
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(e)?;
        // B [k, n] row-major is column-major n x k (ld n) = op(B)^T as stored; B [n, k]
        // (tb) is column-major k x n (ld k), transposed by cuBLASLt.
        let (br, bc) = if tb { (k, n) } else { (n, k) };
        // A [m, k] row-major is column-major k x m (ld k) = op(A)^T; A [k, m] (ta) is
        // column-major m x k (ld m), transposed.
        let (ar, ac) = if ta { (m, k) } else { (k, m) };
        let mut made = Vec::with_capacity(3);
        let c_ty = if c_f32 {
            sys::cudaDataType_t::CUDA_R_32F
        } else {
            ty
        };
        let lds = [st.ldb, st.lda, st.ldc];
        for (i, (r, c)) in [(br, bc), (ar, ac), (n, m)].into_iter().enumerate() {
            let t = if i == 2 { c_ty } else { ty };
            match lt::create_matrix_layout(t, r as u64, c as u64, lds[i] as i64) {
                Ok(l) => made.push(l),
                Err(err) => {
                    // SAFETY: each was created above, destroyed once.
                    unsafe {
                        let _ = lt::destroy_matmul_desc(desc);
                        for l in made {
                            let _ = lt::destroy_matrix_layout(l);
                        }
                    }
                    return Err(e(err));
                }
            }
        }
        let d = Descs {
            desc,
            layouts: [made[0], made[1], made[2]],
        };
        let (trans_a, trans_b) = (tb as i32, ta as i32);
        // SAFETY: attribute values point at locals of the sizes given; layouts are live.
        unsafe {
            lt::set_matmul_desc_attribute(
                d.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &trans_a as *const i32 as *const c_void,
                std::mem::size_of::<i32>(),
            )
            .map_err(e)?;
            lt::set_matmul_desc_attribute(
                d.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                &trans_b as *const i32 as *const c_void,
                std::mem::size_of::<i32>(),
            )
            .map_err(e)?;
            use sys::cublasLtEpilogue_t as E;
            let (epilogue, ptr) = match epi {
                Epilogue::None => (None, None),
                Epilogue::Bias(p) => (Some(E::CUBLASLT_EPILOGUE_BIAS), Some(p)),
                Epilogue::Relu => (Some(E::CUBLASLT_EPILOGUE_RELU), None),
                Epilogue::BiasRelu(p) => (Some(E::CUBLASLT_EPILOGUE_RELU_BIAS), Some(p)),
            };
            if let Some(epilogue) = epilogue {
                lt::set_matmul_desc_attribute(
                    d.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    &epilogue as *const _ as *const c_void,
                    std::mem::size_of::<sys::cublasLtEpilogue_t>(),
                )
                .map_err(e)?;
            }
            if let Some(ptr) = ptr {
                lt::set_matmul_desc_attribute(
                    d.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &ptr as *const u64 as *const c_void,
                    std::mem::size_of::<u64>(),
                )
                .map_err(e)?;
            }
            if batch > 1 {
                let count = i32::try_from(batch)
                    .map_err(|_| crate::error::Error::Cuda(format!("batch {batch} too large")))?;
                let strides = [st.batch_b as i64, st.batch_a as i64, st.batch_c as i64];
                for (l, stride) in d.layouts.iter().zip(strides) {
                    lt::set_matrix_layout_attribute(
                        *l,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        &count as *const i32 as *const c_void,
                        std::mem::size_of::<i32>(),
                    )
                    .map_err(e)?;
                    lt::set_matrix_layout_attribute(
                        *l,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        &stride as *const i64 as *const c_void,
                        std::mem::size_of::<i64>(),
                    )
                    .map_err(e)?;
                }
            }
        }
        Ok(d)
    }
}

impl BlasLt {
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let handle = lt::create_handle().map_err(|e| cuda_err("cuBLASLt handle", e))?;
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .map_err(|e| cuda_err("cuBLASLt workspace", e))?;
        Ok(BlasLt {
            handle,
            workspace,
            algos: Mutex::new(HashMap::new()),
        })
    }

    /// Enqueues `y = epi(x @ w^T)` on `stream`. Pointers are device addresses of
    /// contiguous row-major buffers of dtype `dt`: x [m, k], w [n, k], bias [n], y [m, n].
    /// Returns false, having enqueued nothing, when no algorithm has a ReLU epilogue.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matmul_nt(
        &self,
        stream: &Arc<CudaStream>,
        dt: DType,
        m: usize,
        n: usize,
        k: usize,
        x: u64,
        w: u64,
        epi: Epilogue,
        y: u64,
    ) -> Result<bool> {
        let st = GemmStrides::packed(false, true, m, n, k);
        self.matmul_general(
            stream, dt, false, 0.0, false, true, 1, m, n, k, x, w, epi, y, &st,
        )
    }

    /// Enqueues the batched row-major `c = op(a) @ op(b)` on `stream`: for each of `batch`
    /// batches (at the strides `st`), op(a) is a [m, k] (or a^T of a stored [k, m] when `ta`) and op(b)
    /// is b [k, n] (or b^T of b stored [n, k] when `tb`); c is [m, n]. All of dtype `dt`.
    /// `m`, `n` and `k` must be non-zero. Computes `c = op(a) @ op(b) + beta * c` and the
    /// epilogue `epi`; c is f32 when `c_f32`, else of dtype `dt`. Returns false, having
    /// enqueued nothing, when no algorithm supports a ReLU epilogue for this shape.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matmul_general(
        &self,
        stream: &Arc<CudaStream>,
        dt: DType,
        c_f32: bool,
        beta: f32,
        ta: bool,
        tb: bool,
        batch: usize,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        b: u64,
        epi: Epilogue,
        c: u64,
        st: &GemmStrides,
    ) -> Result<bool> {
        let d = Descs::general(dt, c_f32, ta, tb, batch, m, n, k, epi, st)?;
        let key = ((dt, c_f32, ta, tb, batch, m, n, k, epi.kind()), *st);
        let algo = {
            let mut algos = self.algos.lock().unwrap();
            match algos.get(&key) {
                Some(a) => *a,
                None => {
                    let a = match self.heuristic(&d) {
                        Ok(a) => Some(a),
                        Err(_) if matches!(epi, Epilogue::Relu | Epilogue::BiasRelu(_)) => None,
                        Err(e) => return Err(e),
                    };
                    algos.insert(key, a);
                    a
                }
            }
        };
        let Some(algo) = algo else {
            return Ok(false);
        };
        let alpha = 1f32;
        let (ws, _sync) = self.workspace.device_ptr(stream);
        // SAFETY: the caller guarantees the buffers' sizes; descriptors live until return.
        unsafe {
            lt::matmul(
                self.handle,
                d.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                b as *const c_void,
                d.layouts[0],
                a as *const c_void,
                d.layouts[1],
                c as *const c_void,
                d.layouts[2],
                c as *mut c_void,
                d.layouts[2],
                &algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as *mut _,
            )
        }
        .map_err(|e| {
            cuda_err(
                &format!("cuBLASLt matmul {batch} x {m}x{n}x{k} (ta {ta}, tb {tb}) {dt}"),
                e,
            )
        })?;
        Ok(true)
    }

    fn heuristic(&self, d: &Descs) -> Result<sys::cublasLtMatmulAlgo_t> {
        let e = |e| cuda_err("cuBLASLt heuristic", e);
        let pref = lt::create_matmul_pref().map_err(e)?;
        let size = WORKSPACE_BYTES;
        // SAFETY: descriptors are live; the preference is destroyed below.
        let r = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &size as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            )
            .and_then(|_| {
                lt::get_matmul_algo_heuristic(
                    self.handle,
                    d.desc,
                    d.layouts[0],
                    d.layouts[1],
                    d.layouts[2],
                    d.layouts[2],
                    pref,
                )
            })
        };
        // SAFETY: created above.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        Ok(r.map_err(e)?.algo)
    }
}
