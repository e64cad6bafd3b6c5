//! Kernel launches, with programmatic dependent launch (PDL) where the GPU has it.
//!
//! On sm_90 and later a kernel launched with the programmatic-stream-serialization
//! attribute may start while the kernel before it in the stream is still finishing: its
//! blocks are scheduled as the previous kernel's blocks exit, instead of after the whole
//! grid has completed and the launch has gone through. Every kernel of kernels/*.cu opens
//! with `LS_PDL_WAIT()` (griddepcontrol.wait), which holds it until the previous kernel's
//! writes are visible, and then lets the next kernel start (griddepcontrol.launch_dependents).
//! The overlap is the launch's latency, the block scheduling and what a kernel does before
//! its wait (the few-row GEMMs read their weights), never a read of unfinished
//! results. A decode step is ~90 kernels of 3-7 us each, where that latency is a visible
//! share. Captured into a CUDA graph, the launch becomes a programmatic edge.
//! `LIGHTSEQ_PDL=0` launches plainly, and so does a device whose driver refused a PDL
//! launch once (the launch is retried plainly).

use cudarc::driver::{
    sys, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError, LaunchConfig,
};
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether kernels on a GPU of compute capability `arch` are launched with PDL.
pub(crate) fn pdl_enabled(arch: (i32, i32)) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    arch.0 >= 9 && !super::env_equals(&OFF, "LIGHTSEQ_PDL", "0")
}

/// The device address of `s`, to pass as a kernel argument (its memory is freed in stream
/// order, so after the kernels enqueued before its drop).
pub(crate) fn slice_ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

/// A kernel launch being assembled: [`Launch::arg`] in the kernel's parameter order, then
/// [`Launch::launch`]. The arguments are borrowed until the launch.
pub(crate) struct Launch<'a> {
    func: &'a CudaFunction,
    stream: &'a CudaStream,
    /// The device's switch, turned off for good when a PDL launch fails.
    pdl: &'a AtomicBool,
    args: Vec<*mut c_void>,
    _args: PhantomData<&'a ()>,
}

impl<'a> Launch<'a> {
    pub(crate) fn new(func: &'a CudaFunction, stream: &'a CudaStream, pdl: &'a AtomicBool) -> Self {
        Launch {
            func,
            stream,
            pdl,
            args: Vec::with_capacity(24),
            _args: PhantomData,
        }
    }

    /// Appends a kernel argument (a device pointer as u64, or a scalar).
    pub(crate) fn arg<T: DeviceRepr>(&mut self, value: &'a T) -> &mut Self {
        self.args.push(value as *const T as *mut c_void);
        self
    }

    /// Enqueues the kernel on the stream.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in number, order and type, and the
    /// memory they point to must hold what the kernel reads and writes under `cfg`.
    pub(crate) unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        self.launch_with(cfg, None)
    }

    /// Enqueues the kernel in thread-block clusters of `cluster` blocks (sm_90 and later;
    /// the grid a whole number of clusters in each dimension), with PDL where it is on.
    ///
    /// # Safety
    /// As for [`Launch::launch`].
    pub(crate) unsafe fn launch_cluster(
        &mut self,
        cfg: LaunchConfig,
        cluster: (u32, u32, u32),
    ) -> Result<(), DriverError> {
        self.launch_with(cfg, Some(cluster))
    }

    /// The launch with PDL where it is on; where the driver refuses a PDL launch and the
    /// plain one goes through, PDL is what failed, and it is turned off for the device.
    ///
    /// # Safety
    /// As for [`Launch::launch`].
    unsafe fn launch_with(
        &mut self,
        cfg: LaunchConfig,
        cluster: Option<(u32, u32, u32)>,
    ) -> Result<(), DriverError> {
        self.stream.context().bind_to_thread()?;
        let pdl_error = if self.pdl.load(Ordering::Relaxed) {
            match self.launch_ex(cfg, cluster, true) {
                Ok(()) => return Ok(()),
                Err(e) => Some(e),
            }
        } else {
            None
        };
        match cluster {
            Some(_) => self.launch_ex(cfg, cluster, false)?,
            None => cudarc::driver::result::launch_kernel(
                self.func.cu_function(),
                cfg.grid_dim,
                cfg.block_dim,
                cfg.shared_mem_bytes,
                self.stream.cu_stream(),
                &mut self.args,
            )?,
        }
        if let Some(e) = pdl_error {
            if self.pdl.swap(false, Ordering::Relaxed) {
                eprintln!(
                    "lightseq: the driver refused a programmatic dependent launch ({e:?}); \
                     kernels on this device launch plainly from now on"
                );
            }
        }
        Ok(())
    }

    /// `cuLaunchKernelEx` with a cluster shape and the programmatic-stream-serialization
    /// attribute, each where asked.
    ///
    /// # Safety
    /// As for [`Launch::launch`].
    unsafe fn launch_ex(
        &mut self,
        cfg: LaunchConfig,
        cluster: Option<(u32, u32, u32)>,
        pdl: bool,
    ) -> Result<(), DriverError> {
        let (g, b) = (cfg.grid_dim, cfg.block_dim);
        // SAFETY (of the zeroed values): plain C structs of integers and a union of them.
        let mut attrs: [sys::CUlaunchAttribute; 2] = std::mem::zeroed();
        let mut count = 0;
        if pdl {
            let a = &mut attrs[count];
            a.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            a.value.programmaticStreamSerializationAllowed = 1;
            count += 1;
        }
        if let Some((x, y, z)) = cluster {
            let a = &mut attrs[count];
            a.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            a.value.clusterDim.x = x;
            a.value.clusterDim.y = y;
            a.value.clusterDim.z = z;
            count += 1;
        }
        let config = sys::CUlaunchConfig {
            gridDimX: g.0,
            gridDimY: g.1,
            gridDimZ: g.2,
            blockDimX: b.0,
            blockDimY: b.1,
            blockDimZ: b.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: count as u32,
        };
        sys::cuLaunchKernelEx(
            &config,
            self.func.cu_function(),
            self.args.as_mut_ptr(),
            std::ptr::null_mut(),
        )
        .result()
    }
}
