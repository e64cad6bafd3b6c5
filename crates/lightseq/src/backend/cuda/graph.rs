//! CUDA graphs: a decode step's kernels captured once from the device's stream and
//! replayed with one launch, which removes the per-kernel host cost that bounds small
//! decode steps (about 5 us per kernel, 9 per GEMM, against 2-3 us of GPU work).

use super::{cuda_err, CudaDevice};
use crate::error::Result;
use cudarc::driver::sys;
use cudarc::driver::{CudaGraph, CudaStream};
use cudarc::driver::{CudaSlice, DevicePtr};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// Device memory for the buffers captures allocate. Allocating them inside a capture
/// would make them graph memory, which the driver backs in large pieces (32 MiB for a
/// decode step whose buffers need under one) for each graph; the arena takes them from the
/// device's pool instead, in chunks, and a block freed during a capture serves later
/// requests. That is safe because all work, eager or replayed, runs in the order of the
/// device's one stream: a capture records a block's users in that order, so a block is
/// free once its last user was recorded, and two graphs never run at once, so every graph
/// of a device shares one arena (its size is the largest capture's, not the sum). Blocks
/// of tensors that outlive their capture stay taken until those tensors go, but they may
/// be another graph's temporaries, which that graph's replays overwrite: a tensor read
/// after a replay (a graph's output) comes from the pool instead
/// (`CudaDevice::outside_arena`). The graphs and the tensors made in captures hold the
/// arena, which returns its chunks to the pool when the last of them goes.
pub(crate) struct CaptureArena {
    stream: Arc<CudaStream>,
    inner: Mutex<(Vec<CudaSlice<u8>>, Blocks)>,
}

impl std::fmt::Debug for CaptureArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CaptureArena")
    }
}

/// Alignment of arena blocks (the pool's own is at least this).
const ARENA_ALIGN: usize = 256;
/// Smallest chunk the arena takes from the pool.
const ARENA_CHUNK: usize = 1 << 20;

impl CaptureArena {
    /// An empty arena whose chunks come from the pool in `stream`'s order (the stream the
    /// graph will be replayed on).
    pub(crate) fn new(stream: Arc<CudaStream>) -> Arc<Self> {
        Arc::new(CaptureArena {
            stream,
            inner: Mutex::new((Vec::new(), Blocks::default())),
        })
    }

    /// The address of a free block of at least `bytes`.
    pub(crate) fn alloc(&self, bytes: usize) -> Result<u64> {
        let want = bytes.max(1).next_multiple_of(ARENA_ALIGN);
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (chunks, blocks) = &mut *g;
        if let Some(p) = blocks.take(want) {
            return Ok(p);
        }
        let size = want.max(ARENA_CHUNK);
        // SAFETY: the captured work writes every block before reading it.
        let chunk =
            unsafe { self.stream.alloc::<u8>(size) }.map_err(|e| cuda_err("capture arena", e))?;
        blocks.add_chunk(chunk.device_ptr(&self.stream).0, size);
        chunks.push(chunk);
        blocks
            .take(want)
            .ok_or_else(|| cuda_err("capture arena", "a new chunk did not fit its request"))
    }

    /// Returns the block at `ptr` (from [`CaptureArena::alloc`]).
    pub(crate) fn release(&self, ptr: u64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.1.give(ptr);
    }
}

/// The arena's bookkeeping: first-fit blocks over chunks, merged when adjacent.
#[derive(Default)]
struct Blocks {
    /// Each chunk's address range.
    chunks: Vec<std::ops::Range<u64>>,
    /// Free blocks: address -> bytes.
    free: BTreeMap<u64, usize>,
    /// Blocks handed out: address -> bytes.
    used: HashMap<u64, usize>,
}

impl Blocks {
    fn add_chunk(&mut self, ptr: u64, bytes: usize) {
        self.chunks.push(ptr..ptr + bytes as u64);
        self.free.insert(ptr, bytes);
    }

    /// The lowest free block of at least `bytes`, split off; None when none is.
    fn take(&mut self, bytes: usize) -> Option<u64> {
        let (ptr, size) = self
            .free
            .iter()
            .find(|(_, &n)| n >= bytes)
            .map(|(&p, &n)| (p, n))?;
        self.free.remove(&ptr);
        if size > bytes {
            self.free.insert(ptr + bytes as u64, size - bytes);
        }
        self.used.insert(ptr, bytes);
        Some(ptr)
    }

    /// Frees the block at `ptr`, merged with free neighbours of its chunk.
    fn give(&mut self, ptr: u64) {
        let Some(mut size) = self.used.remove(&ptr) else {
            return;
        };
        let mut start = ptr;
        if let Some((&p, &n)) = self.free.range(..ptr).next_back() {
            if p + n as u64 == ptr && self.same_chunk(p, ptr) {
                self.free.remove(&p);
                start = p;
                size += n;
            }
        }
        let end = start + size as u64;
        if let Some(&n) = self.free.get(&end) {
            if self.same_chunk(start, end) {
                self.free.remove(&end);
                size += n;
            }
        }
        self.free.insert(start, size);
    }

    /// True when addresses `a` and `b` lie in one chunk (chunks may be adjacent in the
    /// address space; blocks of different chunks are never merged).
    fn same_chunk(&self, a: u64, b: u64) -> bool {
        self.chunks.iter().any(|r| r.contains(&a) && r.contains(&b))
    }
}

/// An instantiated graph, replayed on the device's stream.
pub(crate) struct Graph {
    graph: Option<CudaGraph>,
    /// The device's stream (the graph was captured from the capture stream).
    stream: Arc<CudaStream>,
    device: sys::CUdevice,
    /// The memory of the buffers the capture allocated; dropped after the graph.
    _arena: Option<Arc<CaptureArena>>,
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
        // Destroy the graph first (then its arena share goes, after this), and hand back any
        // graph memory the driver still reserves.
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
        let arena = {
            let mut shared = self.shared_arena.lock().unwrap_or_else(|e| e.into_inner());
            shared.upgrade().unwrap_or_else(|| {
                let a = CaptureArena::new(self.stream.clone());
                *shared = Arc::downgrade(&a);
                a
            })
        };
        *self.arena_slot() = Some(arena);
        let r = self
            .capture_stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED);
        if r.is_err() {
            self.arena_slot().take();
            self.capturing.store(0, Ordering::Release);
        }
        r.map_err(|e| cuda_err("begin capture", e))
    }

    /// Ends a capture. Errs (and leaves no pending error behind) when the capture failed,
    /// e.g. because the captured code synchronized or copied from pageable host memory.
    pub(crate) fn end_capture(&self) -> Result<Graph> {
        let flags = sys::CUgraphInstantiate_flags(0);
        let r = self.capture_stream.end_capture(flags);
        let arena = self.arena_slot().take();
        self.capturing.store(0, Ordering::Release);
        // Buffers freed while a capture was invalidated leave their error in the context;
        // the failure is reported here instead.
        let pending = self.ctx.check_err();
        match (r, pending) {
            (Ok(Some(g)), Ok(())) => Ok(Graph {
                graph: Some(g),
                stream: self.stream.clone(),
                device: self.ctx.cu_device(),
                _arena: arena,
            }),
            (Ok(None), _) => Err(cuda_err("end capture", "empty graph")),
            (Err(e), _) | (_, Err(e)) => Err(cuda_err("end capture", e)),
        }
    }
}

/// A byte count of CUDA-graph allocations on `device` (the current or the high mark);
/// zeroes it after reading when `reset` (the high mark only can be).
pub(crate) fn graph_memory(
    device: sys::CUdevice,
    attr: sys::CUgraphMem_attribute,
    reset: bool,
) -> Result<u64> {
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

#[cfg(test)]
mod tests {
    use super::Blocks;

    #[test]
    fn arena_blocks_are_reused_and_merged_within_a_chunk() {
        let mut b = Blocks::default();
        assert_eq!(b.take(256), None);
        // Two chunks that happen to be adjacent in the address space.
        b.add_chunk(4096, 1024);
        b.add_chunk(5120, 512);
        let x = b.take(256).unwrap();
        let y = b.take(512).unwrap();
        let z = b.take(256).unwrap();
        assert_eq!((x, y, z), (4096, 4352, 4864));
        // The first chunk is full: the next request goes to the second.
        assert_eq!(b.take(512), Some(5120));
        assert_eq!(b.take(256), None);
        // Freed blocks serve later requests; neighbours merge into one block.
        b.give(x);
        b.give(y);
        assert_eq!(b.take(768), Some(4096));
        b.give(4096);
        b.give(z);
        assert_eq!(b.free.get(&4096), Some(&1024));
        // The last block of the first chunk never merges with the second chunk's first.
        b.give(5120);
        assert_eq!(b.free.len(), 2);
        assert_eq!(b.take(1536), None);
        // Freeing an unknown address changes nothing.
        b.give(7);
        assert_eq!(b.free.len(), 2);
    }
}
