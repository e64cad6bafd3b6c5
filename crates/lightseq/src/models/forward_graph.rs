//! Small encoder forwards replayed as CUDA graphs.
//!
//! A BERT-base forward of a few sequences launches about a hundred kernels whose host-side
//! cost (about 5 us each, 9 per GEMM) exceeds their GPU time; so does the encoder of an
//! encoder-decoder (models/seq2seq.rs) before a short generation. A model keeps one
//! [`ForwardGraphs`]; a forward whose inputs all come from device tensors is captured the
//! second time its shape (batch and padded length) is met, and later forwards of that shape
//! copy their inputs into the captured buffers and replay the graph with one launch. Only
//! forwards of at most [`MAX_TOKENS`] tokens (`LIGHTSEQ_FORWARD_GRAPH_TOKENS`) are
//! captured (larger ones keep the GPU busy while the host enqueues), and only the
//! [`MAX_SHAPES`] most recent shapes are kept. A replay uploads its inputs in one copy
//! (`step_graph::InputUpload`). `LIGHTSEQ_CUDA_GRAPHS` switches this off or makes a failed
//! capture an error, as for decode steps (see `step_graph`). A capture that fails (the
//! forward uploaded from the host, e.g. an f32 attention through GEMMs) leaves that shape
//! eager.

use super::decode::upload_step_inputs;
use super::step_graph::{self, InputUpload};
use crate::backend::cuda::graph::Graph;
use crate::error::Result;
use crate::ops;
use crate::tensor::{DType, Device, Tensor};
use std::sync::Mutex;

/// Forwards of more tokens than this run eagerly, by default: a replay keeps its buffers
/// (the capture arena's) while the shape is cached, and the larger the forward, the less
/// of it the launches are. At 4096 tokens the replay still saves 3-5% (H200, BERT-base 32
/// x 128: 1.83 -> 1.74-1.79 ms, 8 x 512: 2.13 -> 2.06; peak 284 -> 296 MiB).
pub(crate) const MAX_TOKENS: usize = 4096;
/// [`MAX_TOKENS`], or LIGHTSEQ_FORWARD_GRAPH_TOKENS.
fn max_tokens() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("LIGHTSEQ_FORWARD_GRAPH_TOKENS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(MAX_TOKENS)
    })
}
/// Captured shapes kept per model.
pub(crate) const MAX_SHAPES: usize = 8;

/// A captured forward.
struct Replay {
    graph: Graph,
    /// The forward's inputs, rewritten before each replay.
    inputs: Vec<Tensor>,
    upload: InputUpload,
    /// The output the graph writes.
    out: Tensor,
}

enum Slot {
    /// Met once (run eagerly, which loaded its kernels and chose its GEMM algorithms).
    Warm,
    Ready(Box<Replay>),
    /// Capture failed for this shape.
    Eager,
}

/// The captured forwards of one model, most recently used last.
#[derive(Default)]
pub(crate) struct ForwardGraphs {
    slots: Mutex<Vec<(Vec<usize>, Slot)>>,
}

/// What the forward needs to know besides its inputs.
pub(crate) struct Shape<'a> {
    /// Identifies the forward's work: equal keys must mean equal kernels and launch shapes,
    /// and nothing but the device inputs may differ between forwards of one key (batch and
    /// padded length, for BERT).
    pub key: Vec<usize>,
    /// Tokens in the batch.
    pub tokens: usize,
    /// The output's shape and dtype.
    pub out: (&'a [usize], DType),
}

impl ForwardGraphs {
    /// `body(inputs)`, with `inputs` the device copies of `host` (i32 vectors), eagerly or
    /// from a captured graph.
    pub(crate) fn run(
        &self,
        device: &Device,
        shape: Shape,
        host: &[Vec<i32>],
        body: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let eager = || body(&upload_step_inputs(host, device)?);
        let Device::Cuda(dev) = device else {
            return eager();
        };
        let (enabled, required) = step_graph::mode();
        if !enabled || shape.tokens > max_tokens() {
            return eager();
        }
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let Some(at) = slots.iter().position(|(k, _)| *k == shape.key) else {
            if slots.len() >= MAX_SHAPES {
                slots.remove(0);
            }
            slots.push((shape.key, Slot::Warm));
            drop(slots);
            return eager();
        };
        let (key, slot) = slots.remove(at);
        match slot {
            Slot::Ready(mut r) => {
                let replayed = (|| {
                    r.upload.write("forward graph", &mut r.inputs, host)?;
                    r.graph.launch()?;
                    step_graph::copied(&r.out)
                })();
                slots.push((key, Slot::Ready(r)));
                replayed
            }
            Slot::Eager => {
                slots.push((key, Slot::Eager));
                drop(slots);
                eager()
            }
            Slot::Warm => {
                let inputs = upload_step_inputs(host, device)?;
                let upload = InputUpload::new(&inputs, host)?;
                let mut out = ops::empty(shape.out.0, shape.out.1, device)?;
                if dev.begin_capture().is_err() {
                    // Another thread is capturing on this device: eager now, capture later.
                    slots.push((key, Slot::Warm));
                    drop(slots);
                    return eager();
                }
                let run = upload
                    .capture(&inputs)
                    .and_then(|()| body(&inputs))
                    .and_then(|y| ops::copy_into(&mut out, &y));
                let graph = dev.end_capture();
                match (run, graph) {
                    (Ok(()), Ok(graph)) => {
                        graph.launch()?;
                        let y = step_graph::copied(&out)?;
                        let r = Replay {
                            graph,
                            inputs,
                            upload,
                            out,
                        };
                        slots.push((key, Slot::Ready(Box::new(r))));
                        Ok(y)
                    }
                    (run, graph) => {
                        slots.push((key, Slot::Eager));
                        drop(slots);
                        if required {
                            run.and(graph.map(|_| ()))?;
                        }
                        eager()
                    }
                }
            }
        }
    }
}
