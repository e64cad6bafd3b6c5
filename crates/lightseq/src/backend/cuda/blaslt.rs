//! GEMMs through cuBLASLt: `y[m, n] = x[m, k] @ w[n, k]^T (+ bias[n])`, row-major, f32
//! accumulation for every dtype (true f32 for f32 inputs: no TF32, for parity).

use super::cuda_err;
use crate::error::Result;
use crate::tensor::DType;
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

const WORKSPACE_BYTES: usize = 32 << 20;

type AlgoKey = (DType, usize, usize, usize, bool);

pub(crate) struct BlasLt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    algos: Mutex<HashMap<AlgoKey, sys::cublasLtMatmulAlgo_t>>,
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
        // SAFETY: each was created once in `Descs::new`.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
        }
    }
}

impl Descs {
    fn new(dt: DType, m: usize, n: usize, k: usize, bias: Option<u64>) -> Result<Self> {
        let e = |e| cuda_err("cuBLASLt descriptor", e);
        let ty = data_type(dt);
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(e)?;
        // Column-major view: C (n x m) = W^T-op (n x k) * X (k x m).
        let a = lt::create_matrix_layout(ty, k as u64, n as u64, k as i64).map_err(e)?;
        let b = lt::create_matrix_layout(ty, k as u64, m as u64, k as i64).map_err(e)?;
        let c = lt::create_matrix_layout(ty, n as u64, m as u64, n as i64).map_err(e)?;
        let d = Descs {
            desc,
            layouts: [a, b, c],
        };
        let trans_a: i32 = 1;
        let epilogue = if bias.is_some() {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        } else {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        // SAFETY: attribute values point at locals of the sizes given.
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
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epilogue as *const _ as *const c_void,
                std::mem::size_of::<sys::cublasLtEpilogue_t>(),
            )
            .map_err(e)?;
            if let Some(ptr) = bias {
                lt::set_matmul_desc_attribute(
                    d.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &ptr as *const u64 as *const c_void,
                    std::mem::size_of::<u64>(),
                )
                .map_err(e)?;
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

    /// Enqueues `y = x @ w^T (+ bias)` on `stream`. Pointers are device addresses of
    /// contiguous row-major buffers of dtype `dt`: x [m, k], w [n, k], bias [n], y [m, n].
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
        bias: Option<u64>,
        y: u64,
    ) -> Result<()> {
        let d = Descs::new(dt, m, n, k, bias)?;
        let key = (dt, m, n, k, bias.is_some());
        let algo = {
            let mut algos = self.algos.lock().unwrap();
            match algos.get(&key) {
                Some(a) => *a,
                None => {
                    let a = self.heuristic(&d)?;
                    algos.insert(key, a);
                    a
                }
            }
        };
        let (alpha, beta) = (1f32, 0f32);
        let (ws, _sync) = self.workspace.device_ptr(stream);
        // SAFETY: the caller guarantees the buffers' sizes; descriptors live until return.
        unsafe {
            lt::matmul(
                self.handle,
                d.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                w as *const c_void,
                d.layouts[0],
                x as *const c_void,
                d.layouts[1],
                y as *const c_void,
                d.layouts[2],
                y as *mut c_void,
                d.layouts[2],
                &algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as *mut _,
            )
        }
        .map_err(|e| cuda_err(&format!("cuBLASLt matmul {m}x{n}x{k} {dt}"), e))
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
