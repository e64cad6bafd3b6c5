//! Single-token decode steps replayed as CUDA graphs.
//!
//! A decode step launches a hundred or more small kernels whose host-side cost (about 5 us
//! each, 9 per GEMM) exceeds their GPU time. Models whose steps read every step-dependent
//! value from device inputs ([`Decoder::step_inputs`] / [`Decoder::decode_inputs`]) get
//! their first single-token step captured (kernels load and GEMM algorithms are chosen
//! during the capture; while GEMM tuning is on, which times algorithms on the stream, the
//! first step runs eagerly and the second is captured, as is the next step after a first
//! capture that fails); later steps copy their inputs into the captured buffers and replay
//! the graph with one launch. Beam search's key-row table (see `DecodeState::reorder`) is
//! made before the capture. The graph is captured again whenever the state's device
//! buffers change (a reorder that moved cross-attention states), and the run falls back to
//! launching kernels one by one if capture fails.
//! `LIGHTSEQ_CUDA_GRAPHS=0` turns replay off; `LIGHTSEQ_CUDA_GRAPHS=require` makes a failed
//! capture an error instead of a fallback (for tests).
//!
//! The capturing thread's work goes to a capture stream of its own (other threads keep
//! running on the device's stream); one thread captures at a time, and a step that finds
//! another capture in progress runs eagerly and tries again at the next step.

use super::decode::{upload_step_inputs, DecodeState, Decoder};
use crate::backend::cuda::graph::Graph;
use crate::error::Result;
use crate::ops;
use crate::tensor::{Device, Storage, Tensor};

/// Where a run's graph stands.
#[derive(Default)]
pub(crate) enum StepGraph {
    /// No single-token step has run yet.
    #[default]
    Cold,
    /// One ran eagerly (its kernels are loaded).
    Warm,
    Ready(Box<Captured>),
    /// Not captured for this run (CPU, unsupported model, capture failed, switched off).
    Off,
}

pub(crate) struct Captured {
    graph: Graph,
    /// The step's inputs, in [`Decoder::step_inputs`] order, rewritten before each replay.
    inputs: Vec<Tensor>,
    upload: InputUpload,
    /// The logits the graph writes (from the device's pool, not the capture arena).
    out: Tensor,
    /// Device buffers the graph reads and writes besides `inputs` and `out`.
    fingerprint: Vec<u64>,
}

impl StepGraph {
    /// Notes an eagerly run single-token step.
    pub(crate) fn saw_eager_step(&mut self, logits: &Tensor) {
        if matches!(self, StepGraph::Cold) && logits.device().is_cuda() {
            *self = StepGraph::Warm;
        }
    }
}

/// `LIGHTSEQ_CUDA_GRAPHS`: (enabled, required).
pub(crate) fn mode() -> (bool, bool) {
    match std::env::var("LIGHTSEQ_CUDA_GRAPHS").as_deref() {
        Ok("0") => (false, false),
        Ok("require") => (true, true),
        _ => (true, false),
    }
}

fn device_ptr(t: &Tensor) -> u64 {
    match &t.storage {
        Storage::Cuda(s) => s.ptr(),
        _ => 0,
    }
}

/// The device buffers a step reads and writes besides its inputs.
fn fingerprint(st: &DecodeState) -> Vec<u64> {
    let mut v = vec![st.rows as u64, st.capacity as u64];
    for c in &st.caches {
        v.push(device_ptr(&c.k));
        v.push(device_ptr(&c.v));
    }
    v.extend(st.cross.iter().map(device_ptr));
    v.extend(st.src_ranges_dev.iter().map(device_ptr));
    v.extend(st.key_rows.iter().map(|t| device_ptr(t)));
    v
}

/// Writes `values` into `t`, an i32 CUDA tensor of that length (`what` names the caller).
fn write_i32(what: &'static str, t: &mut Tensor, values: &[i32]) -> Result<()> {
    match &mut t.storage {
        Storage::Cuda(s) => s.write_i32(values),
        _ => Err(crate::error::Error::op(what, "expected a CUDA input")),
    }
}

/// `LIGHTSEQ_PACKED_UPLOAD=0`: replays write each input with a copy of its own.
fn packed_upload_on() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !crate::backend::cuda::env_equals(&OFF, "LIGHTSEQ_PACKED_UPLOAD", "0")
}

/// A captured graph's i32 inputs written with one host-to-device copy a replay: the host
/// vectors go, packed, into one device buffer, and the graph's first kernel copies them to
/// the input tensors (four copies a replay cost ~11 us of host time at BERT-base 8 x 128 on
/// an H200, and as many copies in the stream). With more inputs than the copy kernel takes,
/// each input is written on its own.
pub(crate) struct InputUpload {
    staging: Option<Tensor>,
    packed: Vec<i32>,
}

impl InputUpload {
    /// The staging buffer, holding `host` (call before the capture begins: it must not come
    /// from the capture's arena).
    pub(crate) fn new(inputs: &[Tensor], host: &[Vec<i32>]) -> Result<Self> {
        let mut up = InputUpload {
            staging: None,
            packed: Vec::new(),
        };
        let on_cuda = inputs.first().is_some_and(|t| t.device().is_cuda());
        if packed_upload_on()
            && on_cuda
            && (1..=crate::backend::cuda::ops::SCATTER_PARTS).contains(&host.len())
        {
            pack(&mut up.packed, host);
            let device = inputs[0].device();
            up.staging = Some(Tensor::from_i32(&up.packed, &[up.packed.len()], &device)?);
        }
        Ok(up)
    }

    /// Records the copy from the staging buffer to the inputs (call first in the capture).
    pub(crate) fn capture(&self, inputs: &[Tensor]) -> Result<()> {
        let Some(staging) = &self.staging else {
            return Ok(());
        };
        const OP: &str = "input upload";
        let dsts = inputs
            .iter()
            .map(|t| t.cuda(OP))
            .collect::<Result<Vec<_>>>()?;
        crate::backend::cuda::ops::scatter_i32(staging.cuda(OP)?, &dsts)
    }

    /// Writes `host` for the next replay: into the staging buffer in one copy, or into each
    /// input. The inputs must have the same count and lengths as at the capture (`what`
    /// names the caller in errors).
    pub(crate) fn write(
        &mut self,
        what: &'static str,
        inputs: &mut [Tensor],
        host: &[Vec<i32>],
    ) -> Result<()> {
        let same = inputs.len() == host.len()
            && inputs.iter().zip(host).all(|(t, h)| t.shape() == [h.len()]);
        if !same {
            return Err(crate::error::Error::op(
                what,
                "inputs changed shape between calls",
            ));
        }
        match &mut self.staging {
            Some(staging) => {
                pack(&mut self.packed, host);
                write_i32(what, staging, &self.packed)
            }
            None => inputs
                .iter_mut()
                .zip(host)
                .try_for_each(|(t, h)| write_i32(what, t, h)),
        }
    }

    /// Replaces input 0 of the next replay with `src` (a device tensor of its length),
    /// after [`InputUpload::write`]: in the staging buffer, where the graph copies it from,
    /// or in the input itself.
    pub(crate) fn set_first(&self, inputs: &mut [Tensor], src: &Tensor) -> Result<()> {
        const OP: &str = "input upload";
        let first = super::decode::ids_input(inputs, src)?;
        match &self.staging {
            Some(staging) => staging.cuda(OP)?.copy_prefix_from(src.cuda(OP)?),
            None => ops::copy_into(first, src),
        }
    }
}

/// `host`'s vectors one after another in `packed`.
fn pack(packed: &mut Vec<i32>, host: &[Vec<i32>]) {
    packed.clear();
    for h in host {
        packed.extend_from_slice(h);
    }
}

/// A fresh tensor holding `src`'s values.
pub(crate) fn copied(src: &Tensor) -> Result<Tensor> {
    let mut out = ops::empty(src.shape(), src.dtype(), &src.device())?;
    ops::copy_into(&mut out, src)?;
    Ok(out)
}

/// Runs one single-token step from a graph when the model and state allow it: Some(logits)
/// when it did, None when the caller must run the step eagerly.
pub(crate) fn step<D: Decoder + ?Sized>(
    m: &D,
    st: &mut DecodeState,
    tokens: &[Vec<i64>],
) -> Result<Option<Tensor>> {
    let dev = match m.decoder_device() {
        Device::Cuda(d) => d.clone(),
        Device::Cpu => return Ok(None),
    };
    if matches!(st.graph, StepGraph::Off) {
        return Ok(None);
    }
    let (enabled, required) = mode();
    if !enabled || !m.graph_steps() {
        st.graph = StepGraph::Off;
        return Ok(None);
    }
    let Some(host) = m.step_inputs(st, tokens)? else {
        st.graph = StepGraph::Off;
        return Ok(None);
    };
    if st.reorders {
        st.ensure_key_rows()?;
    }
    let fp = fingerprint(st);
    let carried = std::mem::take(&mut st.graph_carried);
    let first_try = match std::mem::take(&mut st.graph) {
        StepGraph::Ready(mut c) if c.fingerprint == fp => {
            c.upload.write("decode step", &mut c.inputs, &host)?;
            if let Some(ids) = st.select_ids()? {
                c.upload.set_first(&mut c.inputs, ids)?;
            }
            c.graph.launch()?;
            st.len += 1;
            let logits = copied(&c.out)?;
            st.graph = StepGraph::Ready(c);
            return Ok(Some(logits));
        }
        StepGraph::Ready(_) => carried,
        StepGraph::Warm => false,
        StepGraph::Cold => true,
        StepGraph::Off => unreachable!("returned above"),
    };
    if first_try && dev.gemm_tuning_on() {
        // Tuning times new GEMM shapes on the stream, which a capture cannot: this step
        // runs eagerly and tunes them, the next is captured with their choices.
        st.graph = StepGraph::Warm;
        return Ok(None);
    }
    let mut inputs = upload_step_inputs(&host, m.decoder_device())?;
    let upload = InputUpload::new(&inputs, &host)?;
    if let Some(ids) = st.select_ids()? {
        upload.set_first(&mut inputs, ids)?;
    }
    let len = st.len;
    if dev.begin_capture().is_err() {
        // Another thread is capturing on this device: run this step eagerly, try later.
        st.graph = StepGraph::Warm;
        return Ok(None);
    }
    let run = (|| -> Result<Tensor> {
        upload.capture(&inputs)?;
        let h = m.decode_inputs(st, &inputs, 1)?;
        let logits = m.logits(&h)?;
        let mut out =
            dev.outside_arena(|| ops::empty(logits.shape(), logits.dtype(), m.decoder_device()))?;
        ops::copy_into(&mut out, &logits)?;
        Ok(out)
    })();
    let graph = dev.end_capture();
    match (run, graph) {
        (Ok(out), Ok(graph)) => {
            graph.launch()?;
            let logits = copied(&out)?;
            st.graph = StepGraph::Ready(Box::new(Captured {
                graph,
                inputs,
                upload,
                out,
                fingerprint: fp,
            }));
            Ok(Some(logits))
        }
        (run, graph) => {
            // Nothing ran; the caller runs this step eagerly. A first capture may fail
            // where the next succeeds (something on first use the capture cannot
            // record): that one is tried; after any other failure, later steps run
            // eagerly too.
            st.len = len;
            if first_try {
                st.graph = StepGraph::Warm;
                return Ok(None);
            }
            st.graph = StepGraph::Off;
            match (required, run.and(graph.map(|_| ()))) {
                (true, Err(e)) => Err(e),
                _ => Ok(None),
            }
        }
    }
}
