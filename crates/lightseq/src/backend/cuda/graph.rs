//! CUDA graphs: a decode step's kernels captured once from the device's stream and
//! replayed with one launch, which removes the per-kernel host cost that bounds small
//! decode steps (about 5 us per kernel, 9 per GEMM, against 2-3 us of GPU work).

use super::{cuda_err, CudaDevice};
use crate::error::Result;
use cudarc::driver::sys;
use cudarc::driver::CudaGraph;

/// An instantiated graph, replayed on the stream it was captured from.
pub(crate) struct Graph {
    graph: Option<CudaGraph>,
    device: sys::CUdevice,
}

impl Graph {
    /// Enqueues one replay.
    pub(crate) fn launch(&self) -> Result<()> {
        match &self.graph {
            Some(g) => g.launch().map_err(|e| cuda_err("graph launch", e)),
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
    /// Starts recording the stream's work instead of running it. Relaxed mode: calls that
    /// are not stream work (loading a module, cuBLASLt's heuristic) stay allowed.
    pub(crate) fn begin_capture(&self) -> Result<()> {
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| cuda_err("begin capture", e))
    }

    /// Ends a capture. Errs (and leaves no pending error behind) when the capture failed,
    /// e.g. because the captured code synchronized or copied from pageable host memory.
    pub(crate) fn end_capture(&self) -> Result<Graph> {
        let flags = sys::CUgraphInstantiate_flags(0);
        let r = self.stream.end_capture(flags);
        // Buffers freed while a capture was invalidated leave their error in the context;
        // the failure is reported here instead.
        let pending = self.ctx.check_err();
        match (r, pending) {
            (Ok(Some(g)), Ok(())) => Ok(Graph {
                graph: Some(g),
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
