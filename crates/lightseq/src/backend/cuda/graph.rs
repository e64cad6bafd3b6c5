//! CUDA graphs: a decode step's kernels captured once from the device's stream and
//! replayed with one launch, which removes the per-kernel host cost that bounds small
//! decode steps (about 5 us per kernel, 9 per GEMM, against 2-3 us of GPU work).

use super::{cuda_err, CudaDevice};
use crate::error::Result;
use cudarc::driver::sys;
use cudarc::driver::{CudaGraph, CudaStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// An instantiated graph, replayed on the device's stream.
pub(crate) struct Graph {
    graph: Option<CudaGraph>,
    /// The device's stream (the graph was captured from the capture stream).
    stream: Arc<CudaStream>,
    device: sys::CUdevice,
}

// SAFETY: the graph's handles may be used from any thread, one thread at a time; `&mut`
// or a lock gives that (a Graph is not Sync).
unsafe impl Send for Graph {}

impl Graph {
    /// Enqueues one replay on the device's stream.
    pub(crate) fn launch(&self) -> Result<()> {
        match &self.graph {
            // SAFETY: a live executable graph and the device's stream.
            Some(g) => unsafe { sys::cuGraphLaunch(g.cu_graph_exec(), self.stream.cu_stream()) }
                .result()
                .map_err(|e| cuda_err("graph launch", e)),
            None => Ok(()),
        }
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // Destroy the graph first, then hand the memory its allocations reserved back.
        self.graph.take();
        // SAFETY: plain call on a valid device handle.
        let _ = unsafe { sys::cuDeviceGraphMemTrim(self.device) };
    }
}

impl CudaDevice {
    /// Starts recording this thread's work into a graph: until `end_capture`, its ops go
    /// to the capture stream (see `CudaDevice::stream`) and are recorded, not run, while
    /// other threads' work runs on the device's stream as usual. Relaxed mode: calls that
    /// are not stream work (loading a module, cuBLASLt's heuristic) stay allowed.
    pub(crate) fn begin_capture(&self) -> Result<()> {
        let me = super::thread_token();
        if self
            .capturing
            .compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(cuda_err("begin capture", "another thread is capturing"));
        }
        let r = self
            .capture_stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED);
        if r.is_err() {
            self.capturing.store(0, Ordering::Release);
        }
        r.map_err(|e| cuda_err("begin capture", e))
    }

    /// Ends a capture. Errs (and leaves no pending error behind) when the capture failed,
    /// e.g. because the captured code synchronized or copied from pageable host memory.
    pub(crate) fn end_capture(&self) -> Result<Graph> {
        let flags = sys::CUgraphInstantiate_flags(0);
        let r = self.capture_stream.end_capture(flags);
        self.capturing.store(0, Ordering::Release);
        // Buffers freed while a capture was invalidated leave their error in the context;
        // the failure is reported here instead.
        let pending = self.ctx.check_err();
        match (r, pending) {
            (Ok(Some(g)), Ok(())) => Ok(Graph {
                graph: Some(g),
                stream: self.stream.clone(),
                device: self.ctx.cu_device(),
            }),
            (Ok(None), _) => Err(cuda_err("end capture", "empty graph")),
            (Err(e), _) | (_, Err(e)) => Err(cuda_err("end capture", e)),
        }
    }
}

/// Peak bytes of CUDA-graph allocations on `device` since the last reset; resets the mark
/// when `reset`.
pub(crate) fn peak_graph_memory(device: sys::CUdevice, reset: bool) -> Result<u64> {
    let attr = sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH;
    let mut value: u64 = 0;
    // SAFETY: plain out-parameter / attribute value of the size the attribute takes.
    unsafe {
        sys::cuDeviceGetGraphMemAttribute(device, attr, &mut value as *mut u64 as *mut _)
            .result()
            .map_err(|e| cuda_err("graph memory attribute", e))?;
        if reset {
            let mut zero: u64 = 0;
            sys::cuDeviceSetGraphMemAttribute(device, attr, &mut zero as *mut u64 as *mut _)
                .result()
                .map_err(|e| cuda_err("graph memory attribute", e))?;
        }
    }
    Ok(value)
}
