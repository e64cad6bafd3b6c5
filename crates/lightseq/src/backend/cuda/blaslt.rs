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
use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};

thread_local! {
    /// Tuning scopes open on this thread (see [`begin_tuning_scope`]).
    static TUNING_SCOPES: Cell<usize> = const { Cell::new(0) };
}

/// Opens a scope in which the GEMMs this thread enqueues tune shapes met for the first
/// time (unless LIGHTSEQ_GEMM_TUNE says otherwise); [`end_tuning_scope`] closes it.
pub(crate) fn begin_tuning_scope() {
    TUNING_SCOPES.with(|s| s.set(s.get() + 1));
}

pub(crate) fn end_tuning_scope() {
    TUNING_SCOPES.with(|s| s.set(s.get().saturating_sub(1)));
}

/// LIGHTSEQ_GEMM_TUNE: Some(true) for 1, Some(false) for 0; None when unset or another
/// value (said once on stderr).
fn tune_env() -> Option<bool> {
    static BAD: Once = Once::new();
    match std::env::var("LIGHTSEQ_GEMM_TUNE") {
        Ok(v) if v == "1" => Some(true),
        Ok(v) if v == "0" => Some(false),
        Ok(v) => {
            BAD.call_once(|| {
                eprintln!("lightseq: LIGHTSEQ_GEMM_TUNE={v:?} is neither 0 nor 1; ignored")
            });
            None
        }
        Err(_) => None,
    }
}

/// LIGHTSEQ_GEMM_REDUCTION=inplace (an experiment): see `candidates`.
fn reduction_inplace() -> bool {
    static INPLACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::env_equals(&INPLACE, "LIGHTSEQ_GEMM_REDUCTION", "inplace")
}

/// The cuBLASLt workspace, MiB, unless LIGHTSEQ_GEMM_WORKSPACE_MB says otherwise. 4 MiB
/// ran as fast as 32 on every inference point tried (H200, docs/performance.md run 11)
/// and leaves 28 MiB to the model.
const WORKSPACE_MB: usize = 4;

/// Bytes of the cuBLASLt workspace: LIGHTSEQ_GEMM_WORKSPACE_MB (1-1024), else
/// [`WORKSPACE_MB`]. Algorithms needing more are not offered by the heuristic.
fn workspace_bytes() -> usize {
    static BYTES: OnceLock<usize> = OnceLock::new();
    *BYTES.get_or_init(|| {
        let mb = match std::env::var("LIGHTSEQ_GEMM_WORKSPACE_MB") {
            Ok(v) => match v.parse::<usize>() {
                Ok(n) if (1..=1024).contains(&n) => n,
                _ => {
                    eprintln!(
                        "lightseq: LIGHTSEQ_GEMM_WORKSPACE_MB={v:?} is not a size in 1-1024; \
                         {WORKSPACE_MB} is used"
                    );
                    WORKSPACE_MB
                }
            },
            Err(_) => WORKSPACE_MB,
        };
        mb << 20
    })
}
/// Candidates timed per tuned shape.
const TUNE_CANDIDATES: usize = 8;

/// GEMMs below this many FLOPs keep the heuristic's first algorithm: they are too short
/// to time reliably, and their shapes (decode steps) are many.
const TUNE_MIN_FLOP: f64 = (1u64 << 31) as f64;

/// Tuned choices, as indices into the heuristic's candidate list (which is the same for a
/// given cuBLASLt, GPU and workspace), kept in
/// `<cache dir>/gemm-tune-<device>-<cuBLASLt version>-ws<workspace MiB>.txt` so that later
/// processes reuse them and their results match. The file is best effort: a missing or
/// unwritable one only means tuning again.
struct Tuned {
    path: Option<std::path::PathBuf>,
    choices: Mutex<HashMap<String, usize>>,
}

impl Tuned {
    fn load(device: &str) -> Self {
        // SAFETY: a plain query of the loaded library's version.
        let version = unsafe { sys::cublasLtGetVersion() };
        let dev: String = device
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        // The workspace and the reduction experiment change the candidate lists, so each
        // keeps its own file.
        let ws = workspace_bytes() >> 20;
        let suffix = if reduction_inplace() { "-inplace" } else { "" };
        let path = super::nvrtc::cache_dir()
            .map(|d| d.join(format!("gemm-tune-{dev}-{version}-ws{ws}{suffix}.txt")));
        let choices = path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|text| parse_choices(&text))
            .unwrap_or_default();
        Tuned {
            path,
            choices: Mutex::new(choices),
        }
    }

    fn get(&self, key: &str) -> Option<usize> {
        self.choices.lock().unwrap().get(key).copied()
    }

    fn record(&self, key: &str, index: usize) {
        self.choices.lock().unwrap().insert(key.to_string(), index);
        if let Some(p) = &self.path {
            use std::io::Write;
            let _ = std::fs::create_dir_all(p.parent().unwrap_or(p));
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
            {
                let _ = writeln!(f, "{index} {key}");
            }
        }
    }
}

/// Lines of `<candidate index> <GEMM key>`, the last line of a key winning; malformed
/// lines are skipped.
fn parse_choices(text: &str) -> HashMap<String, usize> {
    text.lines()
        .filter_map(|l| {
            let (i, key) = l.split_once(' ')?;
            Some((key.to_string(), i.parse().ok()?))
        })
        .collect()
}

/// Whether `stream` is capturing a graph (no synchronizing calls allowed then).
fn capturing(stream: &CudaStream) -> bool {
    use cudarc::driver::sys as dsys;
    let mut status = dsys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // SAFETY: plain out-parameter on a live stream.
    let r = unsafe { dsys::cuStreamIsCapturing(stream.cu_stream(), &mut status) };
    r != dsys::CUresult::CUDA_SUCCESS
        || status != dsys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
}

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
    /// GELU in its tanh form (HF `gelu_new`) of C + bias.
    BiasGeluTanh(u64),
}

impl Epilogue {
    fn kind(self) -> u8 {
        match self {
            Epilogue::None => 0,
            Epilogue::Bias(_) => 1,
            Epilogue::Relu => 2,
            Epilogue::BiasRelu(_) => 3,
            Epilogue::BiasGeluTanh(_) => 4,
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

/// (dtype, f32 output, C read (beta not 0), ta, tb, batch, m, n, k, epilogue kind) and
/// strides of `matmul_general`.
type AlgoKey = (
    (
        DType,
        bool,
        bool,
        bool,
        bool,
        usize,
        usize,
        usize,
        usize,
        u8,
    ),
    GemmStrides,
);

pub(crate) struct BlasLt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    /// LIGHTSEQ_GEMM_TUNE: 1 tunes every large GEMM, 0 none; unset, those enqueued inside a
    /// tuning scope (training passes, whose shapes recur from update to update).
    tune_env: Option<bool>,
    /// Shapes timed by [`BlasLt::fastest`] in this process.
    timed: AtomicUsize,
    /// The GPU's name, which keys the file of tuned choices.
    device: String,
    /// The choices of [`BlasLt::fastest`], read from their file on first use.
    tuned: OnceLock<Tuned>,
    /// The algorithm per shape (the heuristic's first, or the tuned one); None where the
    /// heuristic found none (only kept for the ReLU epilogues, which callers replace by a
    /// separate pass).
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
                Epilogue::BiasGeluTanh(p) => (Some(E::CUBLASLT_EPILOGUE_GELU_BIAS), Some(p)),
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
    /// `device`: the GPU's name, which keys the file of tuned choices.
    pub(crate) fn new(stream: &Arc<CudaStream>, device: &str) -> Result<Self> {
        let handle = lt::create_handle().map_err(|e| cuda_err("cuBLASLt handle", e))?;
        let workspace = stream
            .alloc_zeros::<u8>(workspace_bytes())
            .map_err(|e| cuda_err("cuBLASLt workspace", e))?;
        Ok(BlasLt {
            handle,
            workspace,
            tune_env: tune_env(),
            timed: AtomicUsize::new(0),
            device: device.to_string(),
            tuned: OnceLock::new(),
            algos: Mutex::new(HashMap::new()),
        })
    }

    /// Shapes timed in this process (choices read from the file not counted).
    pub(crate) fn timed_shapes(&self) -> usize {
        self.timed.load(Ordering::SeqCst)
    }

    /// Forgets every algorithm chosen so far, tuned ones and those read from the file
    /// included: each shape is chosen again at its next use, and a tuned one timed again
    /// (its new choice appended to the file, where a shape's last line wins).
    pub(crate) fn retune(&self) {
        self.algos.lock().unwrap().clear();
        self.tuned_choices().choices.lock().unwrap().clear();
    }

    /// The tuned choices, read from their file on first use.
    fn tuned_choices(&self) -> &Tuned {
        self.tuned.get_or_init(|| Tuned::load(&self.device))
    }

    /// Whether GEMMs met for the first time now are tuned (timed on the stream).
    pub(crate) fn tuning_on(&self) -> bool {
        self.tuning().is_some()
    }

    /// The tuned choices when tuning is on now.
    fn tuning(&self) -> Option<&Tuned> {
        let on = self
            .tune_env
            .unwrap_or_else(|| TUNING_SCOPES.with(|s| s.get() > 0));
        on.then(|| self.tuned_choices())
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
            stream,
            dt,
            false,
            0.0,
            false,
            true,
            1,
            m,
            n,
            k,
            x,
            w,
            epi,
            (y, y),
            &st,
        )
    }

    /// Enqueues the batched row-major `c = op(a) @ op(b)` on `stream`: for each of `batch`
    /// batches (at the strides `st`), op(a) is a [m, k] (or a^T of a stored [k, m] when `ta`) and op(b)
    /// is b [k, n] (or b^T of b stored [n, k] when `tb`); c is [m, n]. All of dtype `dt`.
    /// `m`, `n` and `k` must be non-zero. Computes `d = op(a) @ op(b) + beta * c` and the
    /// epilogue `epi`, `(c, d)` being the matrix read (only when beta is not 0) and the one
    /// written, which may be the same; both have the layout of `st`'s c and are f32 when
    /// `c_f32`, else of dtype `dt`. Returns false, having enqueued nothing, when no algorithm
    /// supports a ReLU epilogue for this shape.
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
        (c, d_out): (u64, u64),
        st: &GemmStrides,
    ) -> Result<bool> {
        let d = Descs::general(dt, c_f32, ta, tb, batch, m, n, k, epi, st)?;
        // Whether C is read is part of the key: its epilogue differs, so may the fastest.
        let key = (
            (dt, c_f32, beta != 0.0, ta, tb, batch, m, n, k, epi.kind()),
            *st,
        );
        let algo = {
            let mut algos = self.algos.lock().unwrap();
            match algos.get(&key) {
                Some(a) => *a,
                None => {
                    let flop = 2.0 * (batch * m) as f64 * (n * k) as f64;
                    let found = match self.tuning() {
                        Some(t) if flop >= TUNE_MIN_FLOP && !capturing(stream) => {
                            let c_bytes = GemmStrides::extent(st.ldc, st.batch_c, batch, m, n)
                                * if c_f32 { 4 } else { dt.size() };
                            let name = format!("{key:?}");
                            // Tuning that fails (no memory for a scratch buffer, no
                            // candidate that ran) leaves the heuristic's choice.
                            let io = (a, b, c, d_out, c_bytes);
                            self.fastest(t, &name, stream, &d, io, beta)
                                .or_else(|_| self.heuristic(&d))
                        }
                        _ => self.heuristic(&d),
                    };
                    let a = match found {
                        Ok(a) => Some(a),
                        Err(_)
                            if matches!(
                                epi,
                                Epilogue::Relu | Epilogue::BiasRelu(_) | Epilogue::BiasGeluTanh(_)
                            ) =>
                        {
                            None
                        }
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
        self.launch(stream, &d, &algo, (a, b, c, d_out), beta)
            .map_err(|e| {
                cuda_err(
                    &format!("cuBLASLt matmul {batch} x {m}x{n}x{k} (ta {ta}, tb {tb}) {dt}"),
                    e,
                )
            })?;
        Ok(true)
    }

    /// Up to `count` algorithms for `d`, the heuristic's best first. With
    /// LIGHTSEQ_GEMM_REDUCTION=inplace (an experiment, off by default), split-K algorithms
    /// that reduce in a separate kernel are left out (small GEMMs took a 3.4 us reduction
    /// launch after a 5.9 us GEMM, BERT-base 1 x 8, ncu, H200).
    fn candidates(&self, d: &Descs, count: usize) -> Result<Vec<sys::cublasLtMatmulAlgo_t>> {
        let e = |e| cuda_err("cuBLASLt heuristic", e);
        let pref = lt::create_matmul_pref().map_err(e)?;
        if reduction_inplace() {
            let mask = sys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_INPLACE as u32;
            // SAFETY: the preference is live; the attribute takes a u32. A cuBLASLt that
            // refuses it just keeps every scheme.
            let _ = unsafe {
                lt::set_matmul_pref_attribute(
                    pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                    &mask as *const u32 as *const c_void,
                    std::mem::size_of::<u32>(),
                )
            };
        }
        let size = workspace_bytes();
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> = Vec::with_capacity(count);
        let mut found = 0i32;
        // SAFETY: descriptors are live; `results` has room for `count` entries and only the
        // `found` the call fills are read; the preference is destroyed below.
        let r = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &size as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            )
            .and_then(|_| {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    d.desc,
                    d.layouts[0],
                    d.layouts[1],
                    d.layouts[2],
                    d.layouts[2],
                    pref,
                    count as i32,
                    results.as_mut_ptr(),
                    &mut found,
                )
                .result()
            })
        };
        // SAFETY: created above.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        r.map_err(e)?;
        // SAFETY: the call wrote `found` (at most `count`) entries.
        unsafe { results.set_len((found.max(0) as usize).min(count)) };
        let algos: Vec<_> = results
            .into_iter()
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect();
        if algos.is_empty() {
            return Err(cuda_err(
                "cuBLASLt heuristic",
                sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED,
            ));
        }
        Ok(algos)
    }

    /// The fastest of the heuristic's first candidates for the GEMM `key`: the one chosen
    /// before (in this process or, through the tuning file, an earlier one), else each timed
    /// on the call's own operands (into `d` unless it is also the `c` that beta reads, else
    /// into a scratch buffer so that `c` is only read) and the choice recorded.
    #[allow(clippy::too_many_arguments)]
    fn fastest(
        &self,
        tuned: &Tuned,
        key: &str,
        stream: &Arc<CudaStream>,
        d: &Descs,
        (a, b, c, d_out, c_bytes): (u64, u64, u64, u64, usize),
        beta: f32,
    ) -> Result<sys::cublasLtMatmulAlgo_t> {
        let algos = self.candidates(d, TUNE_CANDIDATES)?;
        if algos.len() == 1 {
            return Ok(algos[0]);
        }
        if let Some(i) = tuned.get(key).filter(|&i| i < algos.len()) {
            return Ok(algos[i]);
        }
        let e = |e| cuda_err("GEMM tuning", e);
        // The candidates may write the call's own output, which the call then writes again,
        // unless beta reads it: then they write a scratch buffer so that c is only read.
        let scratch = if beta == 0.0 || c != d_out {
            None
        } else {
            Some(stream.alloc_zeros::<u8>(c_bytes.max(1)).map_err(e)?)
        };
        let held = scratch.as_ref().map(|s| s.device_ptr(stream));
        let dp = held.as_ref().map_or(d_out, |(p, _sync)| *p);
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let (start, end) = (
            stream.context().new_event(timing).map_err(e)?,
            stream.context().new_event(timing).map_err(e)?,
        );
        let mut best = (f32::INFINITY, 0);
        for (i, algo) in algos.iter().enumerate() {
            // A warm-up run, then three timed ones; an algorithm that fails is skipped.
            if self.launch(stream, d, algo, (a, b, c, dp), beta).is_err() {
                continue;
            }
            start.record(stream).map_err(e)?;
            let mut ok = true;
            for _ in 0..3 {
                ok &= self.launch(stream, d, algo, (a, b, c, dp), beta).is_ok();
            }
            end.record(stream).map_err(e)?;
            let ms = start.elapsed_ms(&end).map_err(e)?;
            if ok && ms < best.0 {
                best = (ms, i);
            }
        }
        if !best.0.is_finite() {
            return Err(cuda_err(
                "GEMM tuning",
                sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED,
            ));
        }
        self.timed.fetch_add(1, Ordering::SeqCst);
        tuned.record(key, best.1);
        Ok(algos[best.1])
    }

    /// Enqueues one matmul `d_out = op(a) op(b) + beta c` with `algo`.
    fn launch(
        &self,
        stream: &Arc<CudaStream>,
        d: &Descs,
        algo: &sys::cublasLtMatmulAlgo_t,
        (a, b, c, d_out): (u64, u64, u64, u64),
        beta: f32,
    ) -> std::result::Result<(), lt::CublasError> {
        let alpha = 1f32;
        let (ws, _sync) = self.workspace.device_ptr(stream);
        // SAFETY: the caller guarantees the buffers' sizes (d_out as large as c); the
        // descriptors live until return.
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
                d_out as *mut c_void,
                d.layouts[2],
                algo,
                ws as *mut c_void,
                workspace_bytes(),
                stream.cu_stream() as *mut _,
            )
        }
    }

    /// The heuristic's first algorithm for `d`.
    fn heuristic(&self, d: &Descs) -> Result<sys::cublasLtMatmulAlgo_t> {
        Ok(self.candidates(d, 1)?[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_file_lines_parse() {
        let text = "2 ((F16, false), GemmStrides { lda: 1 })\nbad\nx key\n0 ((F16, false), GemmStrides { lda: 1 })\n5 other key\n";
        let c = parse_choices(text);
        assert_eq!(c.len(), 2);
        assert_eq!(c["((F16, false), GemmStrides { lda: 1 })"], 0);
        assert_eq!(c["other key"], 5);
    }
}
