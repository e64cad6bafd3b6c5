//! CUDA backend: cudarc with dynamic loading (nothing of CUDA is needed to build), one
//! stream per device, GEMMs through cuBLASLt, other ops as NVRTC-compiled kernels.

mod blaslt;
pub(crate) mod graph;
mod launch;
mod linear_own;
mod linear_small;
mod linear_tiled;
mod linear_wg;
pub mod nvrtc;
pub(crate) mod ops;
pub(crate) mod train_ops;

use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use half::{bf16, f16};
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Whether the environment variable `var` equals `value`, read once into `cell` (a static
/// of the caller's, one per variable): the switches of experiments and comparisons.
pub(crate) fn env_equals(cell: &'static std::sync::OnceLock<bool>, var: &str, value: &str) -> bool {
    *cell.get_or_init(|| std::env::var(var).is_ok_and(|v| v == value))
}

/// A positive whole number from the environment variable `var`, read once.
pub(crate) fn env_count(
    cell: &'static std::sync::OnceLock<Option<usize>>,
    var: &str,
) -> Option<usize> {
    *cell.get_or_init(|| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|&v| v > 0)
    })
}

/// `LIGHTSEQ_EARLY_READS=0`: kernels read nothing before their programmatic-launch wait
/// (launch.rs) but the few-row GEMMs' L2 prefetch: no weights, biases or layer-norm
/// parameters that no kernel has written since their upload, no caches of a decode step's
/// attention.
pub(crate) fn early_reads_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    env_equals(&OFF, "LIGHTSEQ_EARLY_READS", "0")
}

/// Whether kernels may read `bufs` before their programmatic-launch wait: each present one
/// still holds what a host upload wrote (`CudaStorage::uploaded_unchanged`), so no kernel
/// that may still be running writes it, and LIGHTSEQ_EARLY_READS is not 0.
pub(crate) fn read_early(bufs: &[Option<&CudaStorage>]) -> bool {
    !early_reads_off() && bufs.iter().flatten().all(|b| b.uploaded_unchanged())
}

pub(crate) fn cuda_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{what}: {e:?}"))
}

/// Number of CUDA devices, or why CUDA cannot be used (library missing, driver error).
pub fn usable_device_count() -> Result<usize> {
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::Device(
            "the CUDA driver library (libcuda.so) was not found".into(),
        ));
    }
    cudarc::driver::result::init().map_err(|e| cuda_err("cuInit", e))?;
    let n = CudaContext::device_count().map_err(|e| cuda_err("device count", e))?;
    Ok(n.max(0) as usize)
}

/// An opened GPU: context, stream, cuBLASLt handle and the kernels compiled for it.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    arch: (i32, i32),
    /// Streaming multiprocessors (CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).
    sms: usize,
    /// Shared memory a block may opt in to (MAX_SHARED_MEMORY_PER_BLOCK_OPTIN), bytes.
    smem_optin: usize,
    /// Whether kernels launch with programmatic dependent launch (launch.rs); turned off
    /// when the driver refuses such a launch.
    pdl: AtomicBool,
    // Field order matters for drop: kernels and cuBLASLt state go before the context.
    kernels: nvrtc::KernelCache,
    lt: blaslt::BlasLt,
    stream: Arc<CudaStream>,
    /// Where the thread in `capturing` records a decode step (graph.rs); other threads
    /// keep using `stream` meanwhile.
    capture_stream: Arc<CudaStream>,
    /// The capturing thread's token (see `thread_token`), 0 when none.
    capturing: AtomicU64,
    /// Where that thread's allocations go while it captures.
    capture_arena: std::sync::Mutex<Option<Arc<graph::CaptureArena>>>,
    /// The arena every capture of this device shares while any graph holds it.
    shared_arena: std::sync::Mutex<std::sync::Weak<graph::CaptureArena>>,
    /// Arrival counters of the single-launch column reductions (train.cu's
    /// `ls_last_arrival`), zero between launches; made on first use.
    column_counters: std::sync::OnceLock<CudaSlice<u32>>,
    ctx: Arc<CudaContext>,
}

/// Column blocks a single-launch column reduction may use (see `column_counters`).
pub(crate) const COLUMN_COUNTERS: usize = 1 << 14;

/// Copies `bytes` bytes from device address `src` to `dst`, ordered on `dev`'s stream.
///
/// # Safety
/// Both ranges lie within live allocations of `dev`.
pub(crate) unsafe fn copy_device_bytes(
    dev: &CudaDevice,
    dst: u64,
    src: u64,
    bytes: usize,
) -> Result<()> {
    cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, dev.stream().cu_stream())
        .map_err(|e| cuda_err("device to device copy", e))
}

/// See [`CudaDevice::gemm_tuning_scope`]. Tied to the thread that opened it (not Send).
pub struct GemmTuningScope(std::marker::PhantomData<*const ()>);

impl Drop for GemmTuningScope {
    fn drop(&mut self) {
        blaslt::end_tuning_scope();
    }
}

/// A process-unique, non-zero token of the calling thread.
fn thread_token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local!(static TOKEN: u64 = NEXT.fetch_add(1, Ordering::Relaxed));
    TOKEN.with(|t| *t)
}

thread_local! {
    /// Set while this thread's allocations during a capture bypass the arena (see
    /// `CudaDevice::outside_arena`).
    static OUTSIDE_ARENA: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cuda:{} ({})", self.ordinal, self.name)
    }
}

/// Keeps freed memory in the device's pool across synchronizations (the default threshold
/// of 0 hands it back to the driver at every sync, and the next allocations pay to map it
/// again), as a caching allocator does.
fn keep_pool_memory(ctx: &Arc<CudaContext>) -> Result<()> {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut max = u64::MAX;
    // SAFETY: plain out-parameter and attribute value on this context's device.
    unsafe {
        ctx.bind_to_thread().map_err(|e| cuda_err("bind", e))?;
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(|e| cuda_err("memory pool", e))?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut max as *mut u64 as *mut _,
        )
        .result()
        .map_err(|e| cuda_err("memory pool attribute", e))?;
    }
    Ok(())
}

impl CudaDevice {
    /// Opens device `ordinal`, checking that the driver, cuBLASLt and NVRTC are present.
    pub fn open(ordinal: usize) -> Result<Arc<Self>> {
        let count = usable_device_count()?;
        if ordinal >= count {
            return Err(Error::Device(format!(
                "cuda:{ordinal} requested but {count} CUDA device(s) are present"
            )));
        }
        // SAFETY: only probe whether the shared libraries can be opened.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Err(Error::Device(
                "cuBLASLt (libcublasLt.so) was not found; install the CUDA toolkit or the nvidia-cublas wheel and add its lib folder to LD_LIBRARY_PATH".into(),
            ));
        }
        nvrtc::check_available()?;
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("context", e))?;
        // One stream per device orders all work; cudarc's per-buffer events are not needed.
        // SAFETY: no buffer has been allocated on this context yet.
        unsafe { ctx.disable_event_tracking() };
        // A created stream rather than the legacy default one, which cannot be captured
        // into a CUDA graph (decode steps are replayed as graphs).
        let stream = ctx.new_stream().map_err(|e| cuda_err("stream", e))?;
        let capture_stream = ctx.new_stream().map_err(|e| cuda_err("stream", e))?;
        let name = ctx.name().map_err(|e| cuda_err("device name", e))?;
        let arch = ctx
            .compute_capability()
            .map_err(|e| cuda_err("compute capability", e))?;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| cuda_err("multiprocessor count", e))?
            .max(1) as usize;
        let smem_optin = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(|e| cuda_err("shared memory per block", e))?
            .max(0) as usize;
        let lt = blaslt::BlasLt::new(&stream, &name)?;
        keep_pool_memory(&ctx)?;
        // Where the process turned the prewarm on, the kernel modules missing from the disk
        // cache compile in the background while the model loads.
        nvrtc::prewarm_on_open(arch);
        Ok(Arc::new(CudaDevice {
            ordinal,
            name,
            arch,
            sms,
            smem_optin,
            pdl: AtomicBool::new(launch::pdl_enabled(arch)),
            kernels: nvrtc::KernelCache::new(arch),
            lt,
            stream,
            capture_stream,
            capturing: AtomicU64::new(0),
            capture_arena: std::sync::Mutex::new(None),
            shared_arena: std::sync::Mutex::new(std::sync::Weak::new()),
            column_counters: std::sync::OnceLock::new(),
            ctx,
        }))
    }

    /// Until the scope is dropped, GEMMs this thread enqueues (on any device) tune the shapes
    /// they meet for the first time: each of at least 2^31 FLOPs times cuBLASLt's first 8
    /// candidates once and keeps the fastest, and the choice persists in the kernel cache
    /// folder for later runs. Each new shape costs ~32 runs of that GEMM once. For training
    /// passes, whose shapes recur from update to update; LIGHTSEQ_GEMM_TUNE=0 or 1 turns
    /// tuning off or on everywhere instead.
    pub fn gemm_tuning_scope(&self) -> GemmTuningScope {
        blaslt::begin_tuning_scope();
        GemmTuningScope(std::marker::PhantomData)
    }

    /// GEMM shapes this device timed for tuning in this process (choices read from the
    /// tuning file are not counted).
    pub fn timed_gemm_shapes(&self) -> usize {
        self.lt.timed_shapes()
    }

    /// Forgets the GEMM algorithms chosen so far, tuned ones and the tuning file's included,
    /// so that each shape is chosen (and tuned, inside a scope) again: for instance after
    /// the GPU's clocks or power limit changed.
    pub fn retune_gemms(&self) {
        self.lt.retune();
    }

    /// The device index.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's name as the driver reports it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compute capability (major, minor).
    pub fn arch(&self) -> (i32, i32) {
        self.arch
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> usize {
        self.sms
    }

    /// Bytes of shared memory a block may use after opting in.
    pub(crate) fn smem_per_block(&self) -> usize {
        self.smem_optin
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| cuda_err("memory info", e))
    }

    /// Peak bytes allocated from the device's memory pool since the last reset (the
    /// stream-ordered allocator serves every tensor) plus the peak of CUDA-graph
    /// allocations, and resets both marks when `reset`.
    pub fn peak_memory(&self, reset: bool) -> Result<u64> {
        use cudarc::driver::sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH as GRAPH;
        use cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH as HIGH;
        // Captures allocate from the pool (the capture arena); graph memory proper stays
        // near zero, but is counted should anything allocate it.
        Ok(self.pool_attribute(HIGH, reset)?
            + graph::graph_memory(self.ctx.cu_device(), GRAPH, reset)?)
    }

    /// Bytes of device memory in use now: the stream-ordered pool's allocations plus
    /// what live CUDA graphs hold.
    pub fn memory_in_use(&self) -> Result<u64> {
        use cudarc::driver::sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_CURRENT as GRAPH;
        use cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT as NOW;
        Ok(self.pool_attribute(NOW, false)?
            + graph::graph_memory(self.ctx.cu_device(), GRAPH, false)?)
    }

    /// A byte count of the device's default memory pool; zeroes it after reading when
    /// `reset` (for the high mark).
    fn pool_attribute(
        &self,
        attr: cudarc::driver::sys::CUmemPool_attribute,
        reset: bool,
    ) -> Result<u64> {
        use cudarc::driver::sys;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut value: u64 = 0;
        // SAFETY: plain out-parameters on this context's device; the byte-count attributes
        // take a u64.
        unsafe {
            self.ctx.bind_to_thread().map_err(|e| cuda_err("bind", e))?;
            sys::cuDeviceGetDefaultMemPool(&mut pool, self.ctx.cu_device())
                .result()
                .map_err(|e| cuda_err("memory pool", e))?;
            sys::cuMemPoolGetAttribute(pool, attr, &mut value as *mut u64 as *mut _)
                .result()
                .map_err(|e| cuda_err("memory pool attribute", e))?;
            if reset {
                let mut zero: u64 = 0;
                sys::cuMemPoolSetAttribute(pool, attr, &mut zero as *mut u64 as *mut _)
                    .result()
                    .map_err(|e| cuda_err("memory pool attribute", e))?;
            }
        }
        Ok(value)
    }

    /// The stream this thread's work goes to: the device's one stream, or the capture
    /// stream while this thread records a graph.
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        if self.capturing_here() {
            &self.capture_stream
        } else {
            &self.stream
        }
    }

    fn capturing_here(&self) -> bool {
        let c = self.capturing.load(Ordering::Acquire);
        c != 0 && c == thread_token()
    }

    /// Runs `f` with this thread's allocations taken from the device's pool, not the
    /// capture arena, while it captures: for a graph's output, which is read after a replay
    /// and so must not share memory with another graph's temporaries (another thread may
    /// replay that graph between the two). Only for tensors that live as long as the graph:
    /// one dropped earlier is freed at once while the graph still writes it.
    pub(crate) fn outside_arena<R>(&self, f: impl FnOnce() -> R) -> R {
        /// Restores the flag however `f` ends.
        struct Restore(bool);
        impl Drop for Restore {
            fn drop(&mut self) {
                OUTSIDE_ARENA.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(OUTSIDE_ARENA.with(|c| c.replace(true)));
        f()
    }

    /// Whether GEMM shapes met for the first time now would be tuned (timed on the
    /// stream, which a capture cannot do).
    pub(crate) fn gemm_tuning_on(&self) -> bool {
        self.lt.tuning_on()
    }

    fn arena_slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<graph::CaptureArena>>> {
        self.capture_arena.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Device address of [`COLUMN_COUNTERS`] zeroed u32 arrival counters, shared by the
    /// single-launch column reductions: each leaves its counters at zero, and all of them
    /// run on the device's one stream, so one never sees another's arrivals. (They are
    /// training ops, never recorded into a graph on the capture stream.)
    pub(crate) fn column_counters(&self) -> Result<u64> {
        if let Some(c) = self.column_counters.get() {
            return Ok(c.device_ptr(&self.stream).0);
        }
        let c = self
            .stream
            .alloc_zeros::<u32>(COLUMN_COUNTERS)
            .map_err(|e| cuda_err("allocating column counters", e))?;
        let c = self.column_counters.get_or_init(|| c);
        Ok(c.device_ptr(&self.stream).0)
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("synchronize", e))
    }

    pub(crate) fn kernel(&self, name: &str, dtype: DType) -> Result<cudarc::driver::CudaFunction> {
        self.kernels.function(&self.ctx, name, dtype)
    }

    /// A launch of `f` on this thread's stream ([`Self::stream`]).
    pub(crate) fn launch<'a>(&'a self, f: &'a cudarc::driver::CudaFunction) -> launch::Launch<'a> {
        launch::Launch::new(f, self.stream(), &self.pdl)
    }

    /// Uninitialized device memory for `len` elements of `dtype`.
    pub(crate) fn alloc(self: &Arc<Self>, dtype: DType, len: usize) -> Result<CudaStorage> {
        // Zero-length allocations are not allowed by the driver; keep one element.
        let n = len.max(1);
        let capturing = self.capturing_here();
        let outside = capturing && OUTSIDE_ARENA.with(|c| c.get());
        let arena = if capturing && !outside {
            self.arena_slot().clone()
        } else {
            None
        };
        if let Some(arena) = arena {
            let ptr = arena.alloc(n * dtype.size())?;
            let st = &self.stream;
            // SAFETY: the block holds n elements and stays the arena's until released in
            // CudaStorage's drop, which leaks the slice instead of freeing it.
            let buf = unsafe {
                match dtype {
                    DType::F32 => Buf::F32(st.upgrade_device_ptr(ptr, n)),
                    DType::F16 => Buf::F16(st.upgrade_device_ptr(ptr, n)),
                    DType::BF16 => Buf::BF16(st.upgrade_device_ptr(ptr, n)),
                    DType::I32 => Buf::I32(st.upgrade_device_ptr(ptr, n)),
                }
            };
            return Ok(CudaStorage {
                dev: self.clone(),
                buf: ManuallyDrop::new(buf),
                len,
                arena: Some(arena),
                uploaded_unchanged: AtomicBool::new(false),
            });
        }
        // Outside the arena during a capture: in the device stream's order, before the
        // graph's first replay (on the capture stream it would be graph memory).
        let st = if outside { &self.stream } else { self.stream() };
        // SAFETY: every op writes its whole output before anyone reads it.
        let buf = unsafe {
            match dtype {
                DType::F32 => st.alloc::<f32>(n).map(Buf::F32),
                DType::F16 => st.alloc::<f16>(n).map(Buf::F16),
                DType::BF16 => st.alloc::<bf16>(n).map(Buf::BF16),
                DType::I32 => st.alloc::<i32>(n).map(Buf::I32),
            }
        }
        .map_err(|e| cuda_err(&format!("allocating {len} x {dtype}"), e))?;
        Ok(CudaStorage {
            dev: self.clone(),
            buf: ManuallyDrop::new(buf),
            len,
            arena: None,
            uploaded_unchanged: AtomicBool::new(false),
        })
    }

    /// Zeroed device memory for `len` elements of `dtype`.
    pub(crate) fn zeros(self: &Arc<Self>, dtype: DType, len: usize) -> Result<CudaStorage> {
        let mut s = self.alloc(dtype, len)?;
        s.zero()?;
        Ok(s)
    }

    pub(crate) fn upload_f32(self: &Arc<Self>, data: &[f32], dtype: DType) -> Result<CudaStorage> {
        let mut s = self.alloc(dtype, data.len())?;
        if data.is_empty() {
            return Ok(s);
        }
        let st = self.stream();
        let r = match &mut *s.buf {
            Buf::F32(b) => st.memcpy_htod(data, b),
            Buf::F16(b) => {
                let h: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
                st.memcpy_htod(&h, b)
            }
            Buf::BF16(b) => {
                let h: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                st.memcpy_htod(&h, b)
            }
            Buf::I32(_) => return Err(Error::op("upload", "float data for an i32 buffer")),
        };
        r.map_err(|e| cuda_err("host to device copy", e))?;
        s.uploaded_unchanged.store(true, Ordering::Relaxed);
        Ok(s)
    }

    pub(crate) fn upload_i32(self: &Arc<Self>, data: &[i32]) -> Result<CudaStorage> {
        let mut s = self.alloc(DType::I32, data.len())?;
        s.write_i32(data)?;
        Ok(s)
    }
}

#[derive(Debug)]
pub(crate) enum Buf {
    F32(CudaSlice<f32>),
    F16(CudaSlice<f16>),
    BF16(CudaSlice<bf16>),
    I32(CudaSlice<i32>),
}

/// Page-locked host memory that a download fills without blocking the stream
/// ([`CudaStorage::download_f32_async`]).
pub(crate) struct PinnedF32 {
    host: cudarc::driver::PinnedHostSlice<f32>,
    len: usize,
    /// Recorded after each copy into `host`.
    done: cudarc::driver::CudaEvent,
}

impl std::fmt::Debug for PinnedF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinnedF32({})", self.len)
    }
}

impl PinnedF32 {
    /// Waits for the last copy into this memory, then gives its values.
    pub(crate) fn wait(&self) -> Result<&[f32]> {
        self.done
            .synchronize()
            .map_err(|e| cuda_err("device to host copy", e))?;
        let all = self
            .host
            .as_slice()
            .map_err(|e| cuda_err("device to host copy", e))?;
        Ok(&all[..self.len])
    }
}

/// Device memory of one tensor.
#[derive(Debug)]
pub struct CudaStorage {
    dev: Arc<CudaDevice>,
    buf: ManuallyDrop<Buf>,
    len: usize,
    /// The capture arena holding `buf`, for buffers allocated during a capture.
    arena: Option<Arc<graph::CaptureArena>>,
    /// Whether the buffer holds what a host upload wrote and no kernel has written it since
    /// (weights of a loaded model): no kernel still running can be writing it, so kernels
    /// may read it before their programmatic-launch wait (the few-row GEMMs' weights and
    /// biases, the few-row layer norm's parameters). Every op that can write an existing
    /// float buffer in place calls [`CudaStorage::mark_written`] first (only `upload_f32`
    /// sets the flag, so i32 buffers never carry it).
    uploaded_unchanged: AtomicBool,
}

impl Drop for CudaStorage {
    fn drop(&mut self) {
        // SAFETY: `buf` is not touched again.
        let buf = unsafe { ManuallyDrop::take(&mut self.buf) };
        match self.arena.take() {
            None => drop(buf),
            Some(arena) => arena.release(match buf {
                Buf::F32(b) => b.leak(),
                Buf::F16(b) => b.leak(),
                Buf::BF16(b) => b.leak(),
                Buf::I32(b) => b.leak(),
            }),
        }
    }
}

impl CudaStorage {
    pub(crate) fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    pub(crate) fn dtype(&self) -> DType {
        match *self.buf {
            Buf::F32(_) => DType::F32,
            Buf::F16(_) => DType::F16,
            Buf::BF16(_) => DType::BF16,
            Buf::I32(_) => DType::I32,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer still holds what a host upload wrote (see `uploaded_unchanged`).
    pub(crate) fn uploaded_unchanged(&self) -> bool {
        self.uploaded_unchanged.load(Ordering::Relaxed)
    }

    /// Records that a kernel is about to write this buffer in place.
    pub(crate) fn mark_written(&self) {
        self.uploaded_unchanged.store(false, Ordering::Relaxed);
    }

    /// The raw device address, for kernel arguments and cuBLASLt.
    pub(crate) fn ptr(&self) -> u64 {
        let st = self.dev.stream();
        match &*self.buf {
            Buf::F32(b) => b.device_ptr(st).0,
            Buf::F16(b) => b.device_ptr(st).0,
            Buf::BF16(b) => b.device_ptr(st).0,
            Buf::I32(b) => b.device_ptr(st).0,
        }
    }

    /// Sets every element to zero, on the stream.
    pub(crate) fn zero(&mut self) -> Result<()> {
        self.mark_written();
        let st = self.dev.stream().clone();
        let r = match &mut *self.buf {
            Buf::F32(b) => st.memset_zeros(b),
            Buf::F16(b) => st.memset_zeros(b),
            Buf::BF16(b) => st.memset_zeros(b),
            Buf::I32(b) => st.memset_zeros(b),
        };
        r.map_err(|e| cuda_err("memset", e))
    }

    /// Overwrites this i32 buffer with `data` (same length) from the host.
    pub(crate) fn write_i32(&mut self, data: &[i32]) -> Result<()> {
        match &mut *self.buf {
            Buf::I32(b) if data.len() == self.len => {
                if data.is_empty() {
                    return Ok(());
                }
                self.dev
                    .stream()
                    .memcpy_htod(data, b)
                    .map_err(|e| cuda_err("host to device copy", e))
            }
            _ => Err(crate::error::Error::op(
                "write_i32",
                format!("{} ids into {} x {}", data.len(), self.len, self.dtype()),
            )),
        }
    }

    /// Copies `src` (same dtype and length) into this buffer on the stream.
    pub(crate) fn copy_from(&mut self, src: &CudaStorage) -> Result<()> {
        if src.len != self.len {
            return Err(self.copy_error(src, "into"));
        }
        self.copy_prefix_from(src)
    }

    /// Copies `src` (same dtype, at most this buffer's length) into this buffer's first
    /// `src.len()` elements on the stream.
    pub(crate) fn copy_prefix_from(&self, src: &CudaStorage) -> Result<()> {
        self.mark_written();
        if src.dtype() != self.dtype() || src.len > self.len {
            return Err(self.copy_error(src, "into the start of"));
        }
        if src.len == 0 {
            return Ok(());
        }
        let bytes = src.len * self.dtype().size();
        // SAFETY: src holds `bytes` bytes and this buffer at least as many (checked above).
        unsafe { copy_device_bytes(&self.dev, self.ptr(), src.ptr(), bytes) }
    }

    fn copy_error(&self, src: &CudaStorage, how: &str) -> crate::error::Error {
        let (n, dt) = (self.len, self.dtype());
        crate::error::Error::op(
            "copy",
            format!("{} x {} {how} {n} x {dt}", src.len, src.dtype()),
        )
    }

    pub(crate) fn download_f32(&self) -> Result<Vec<f32>> {
        if self.len == 0 {
            return Ok(Vec::new());
        }
        let st = self.dev.stream();
        let e = |e| cuda_err("device to host copy", e);
        let mut v: Vec<f32> = match &*self.buf {
            Buf::F32(b) => st.clone_dtoh(b).map_err(e)?,
            Buf::F16(b) => st
                .clone_dtoh(b)
                .map_err(e)?
                .iter()
                .map(|x| x.to_f32())
                .collect(),
            Buf::BF16(b) => st
                .clone_dtoh(b)
                .map_err(e)?
                .iter()
                .map(|x| x.to_f32())
                .collect(),
            Buf::I32(b) => st
                .clone_dtoh(b)
                .map_err(e)?
                .iter()
                .map(|&x| x as f32)
                .collect(),
        };
        v.truncate(self.len);
        Ok(v)
    }

    /// Starts copying this f32 buffer into page-locked host memory on the stream and
    /// returns at once: [`PinnedF32::wait`] gives the values once the copy is done, while
    /// work queued after it runs on. `dst` is (re)allocated when it is too small.
    pub(crate) fn download_f32_async(&self, dst: &mut Option<PinnedF32>) -> Result<()> {
        let Buf::F32(b) = &*self.buf else {
            return Err(Error::op("download", "not an f32 buffer"));
        };
        let e = |e| cuda_err("device to host copy", e);
        if dst.as_ref().is_none_or(|d| d.host.len() < self.len.max(1)) {
            // SAFETY: the memory is written by the copy below before `wait` reads it.
            let host = unsafe {
                self.dev
                    .stream()
                    .context()
                    .alloc_pinned_with_flags::<f32>(self.len.max(1), 0)
            }
            .map_err(e)?;
            let done = self
                .dev
                .stream()
                .context()
                .new_event(Some(
                    cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING,
                ))
                .map_err(e)?;
            *dst = Some(PinnedF32 { host, len: 0, done });
        }
        let d = dst.as_mut().expect("allocated above");
        d.len = self.len;
        let stream = self.dev.stream();
        if self.len > 0 {
            stream
                .memcpy_dtoh(&b.slice(0..self.len), &mut d.host)
                .map_err(e)?;
        }
        // The device's contexts track no events (see `CudaDevice::new`), so the copy's
        // completion is recorded here.
        d.done.record(stream).map_err(e)
    }

    pub(crate) fn download_i32(&self) -> Result<Vec<i32>> {
        match &*self.buf {
            Buf::I32(b) if self.len > 0 => {
                let mut v = self
                    .dev
                    .stream()
                    .clone_dtoh(b)
                    .map_err(|e| cuda_err("device to host copy", e))?;
                v.truncate(self.len);
                Ok(v)
            }
            Buf::I32(_) => Ok(Vec::new()),
            _ => Err(Error::op("download_i32", "not an i32 buffer")),
        }
    }
}
