//! CUDA bodies of the ops: argument packing and launch shapes. Shapes were checked by the
//! front end in `crate::ops`.

use super::{cuda_err, CudaStorage};
use crate::error::{Error, Result};
use crate::ops::{Activation, AttentionGeometry};
use crate::tensor::DType;
use cudarc::driver::{LaunchConfig, PushKernelArg};

fn grid_1d(total: usize, threads: u32) -> LaunchConfig {
    let blocks = total.div_ceil(threads as usize).clamp(1, 65535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads per block for row-wise kernels: a multiple of 32, at most 1024.
fn row_threads(cols: usize) -> u32 {
    (cols.div_ceil(32) * 32).clamp(32, 1024) as u32
}

fn launched(
    name: &str,
    r: std::result::Result<
        Option<(cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>,
        cudarc::driver::DriverError,
    >,
) -> Result<()> {
    r.map(|_| ())
        .map_err(|e| cuda_err(&format!("launching {name}"), e))
}

pub(crate) fn linear(
    x: &CudaStorage,
    w: &CudaStorage,
    b: Option<&CudaStorage>,
    act: Activation,
    m: usize,
    n: usize,
    k: usize,
) -> Result<CudaStorage> {
    let dev = x.device();
    let dt = x.dtype();
    let y = dev.alloc(dt, m * n)?;
    if m == 0 || n == 0 {
        return Ok(y);
    }
    // Bias rides in the GEMM's epilogue; activations run as a separate pass so every
    // activation has exactly the CPU's definition.
    dev.lt.matmul_nt(
        dev.stream(),
        dt,
        m,
        n,
        k,
        x.ptr(),
        w.ptr(),
        b.map(|b| b.ptr()),
        y.ptr(),
    )?;
    if act != Activation::None {
        bias_act(&y, None, act, n)?;
    }
    Ok(y)
}

pub(crate) fn bias_act(
    y: &CudaStorage,
    b: Option<&CudaStorage>,
    act: Activation,
    n: usize,
) -> Result<()> {
    let dev = y.device();
    let f = dev.kernel("bias_act", y.dtype())?;
    let (yp, bp) = (y.ptr(), b.map(|b| b.ptr()).unwrap_or(0));
    let (code, total, n) = (act.code(), y.len() as i64, n as i32);
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&yp).arg(&bp).arg(&code).arg(&total).arg(&n);
    // SAFETY: argument types match the kernel's signature in elementwise.cu.
    launched("bias_act", unsafe { l.launch(grid_1d(y.len(), 256)) })
}

pub(crate) fn add(a: &CudaStorage, b: &CudaStorage) -> Result<CudaStorage> {
    let dev = a.device();
    let out = dev.alloc(a.dtype(), a.len())?;
    if a.len() == 0 {
        return Ok(out);
    }
    let f = dev.kernel("add", a.dtype())?;
    let (ap, bp, op, total) = (a.ptr(), b.ptr(), out.ptr(), a.len() as i64);
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&ap).arg(&bp).arg(&op).arg(&total);
    // SAFETY: argument types match the kernel's signature in elementwise.cu.
    launched("add", unsafe { l.launch(grid_1d(a.len(), 256)) })?;
    Ok(out)
}

pub(crate) fn layer_norm(
    x: &CudaStorage,
    residual: Option<&CudaStorage>,
    gamma: &CudaStorage,
    beta: &CudaStorage,
    eps: f32,
    rows: usize,
    h: usize,
) -> Result<CudaStorage> {
    let dev = x.device();
    let out = dev.alloc(x.dtype(), rows * h)?;
    if rows == 0 {
        return Ok(out);
    }
    let f = dev.kernel("layer_norm", x.dtype())?;
    let (xp, rp, gp, bp, op) = (
        x.ptr(),
        residual.map(|r| r.ptr()).unwrap_or(0),
        gamma.ptr(),
        beta.ptr(),
        out.ptr(),
    );
    let hh = h as i32;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&xp)
        .arg(&rp)
        .arg(&gp)
        .arg(&bp)
        .arg(&op)
        .arg(&hh)
        .arg(&eps);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (row_threads(h).min(512), 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument types match the kernel's signature in layer_norm.cu.
    launched("layer_norm", unsafe { l.launch(cfg) })?;
    Ok(out)
}

pub(crate) fn embed(
    parts: &[(&CudaStorage, &CudaStorage)],
    n: usize,
    h: usize,
) -> Result<CudaStorage> {
    let dev = parts[0].0.device();
    let dt = parts[0].0.dtype();
    let out = dev.alloc(dt, n * h)?;
    if n == 0 {
        return Ok(out);
    }
    let f = dev.kernel("embed", dt)?;
    let mut ptrs = [0u64; 6];
    for (i, (t, ids)) in parts.iter().enumerate() {
        ptrs[2 * i] = t.ptr();
        ptrs[2 * i + 1] = ids.ptr();
    }
    let (op, hh) = (out.ptr(), h as i32);
    let mut l = dev.stream().launch_builder(&f);
    for p in &ptrs {
        l.arg(p);
    }
    l.arg(&op).arg(&hh);
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (row_threads(h).min(256), 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument types match the kernel's signature in embedding.cu.
    launched("embed", unsafe { l.launch(cfg) })?;
    Ok(out)
}

const ATT_WARPS: usize = 4;
const ATT_MAX_HEAD_DIM: usize = 256;

pub(crate) fn self_attention(
    qkv: &CudaStorage,
    lengths: &[usize],
    g: &AttentionGeometry,
) -> Result<CudaStorage> {
    let dev = qkv.device();
    let hidden = g.heads * g.head_dim;
    let out = dev.alloc(qkv.dtype(), g.batch * g.len * hidden)?;
    if g.batch == 0 || g.len == 0 {
        return Ok(out);
    }
    if g.head_dim > ATT_MAX_HEAD_DIM {
        return Err(Error::op(
            "self_attention",
            format!(
                "head_dim {} exceeds the CUDA kernel's {ATT_MAX_HEAD_DIM}",
                g.head_dim
            ),
        ));
    }
    let lens: Vec<i32> = lengths.iter().map(|&n| n as i32).collect();
    let lens = dev.upload_i32(&lens)?;
    let f = dev.kernel("attention", qkv.dtype())?;
    let elem = qkv.dtype().size() as u64;
    let base = qkv.ptr();
    let (q, k, v) = (
        base,
        base + hidden as u64 * elem,
        base + 2 * hidden as u64 * elem,
    );
    let (op, lp) = (out.ptr(), lens.ptr());
    let (len_q, hd) = (g.len as i32, g.head_dim as i32);
    let (in_b, in_r) = ((g.len * 3 * hidden) as i64, (3 * hidden) as i32);
    let (out_b, out_r) = ((g.len * hidden) as i64, hidden as i32);
    let (causal, scale) = (g.causal as i32, g.scale);
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&q)
        .arg(&k)
        .arg(&v)
        .arg(&op)
        .arg(&lp)
        .arg(&len_q)
        .arg(&hd);
    l.arg(&in_b)
        .arg(&in_r)
        .arg(&in_b)
        .arg(&in_r)
        .arg(&out_b)
        .arg(&out_r);
    l.arg(&causal).arg(&scale);
    let cfg = LaunchConfig {
        grid_dim: (
            g.len.div_ceil(ATT_WARPS) as u32,
            g.heads as u32,
            g.batch as u32,
        ),
        block_dim: (32 * ATT_WARPS as u32, 1, 1),
        shared_mem_bytes: (ATT_WARPS * g.head_dim * 4) as u32,
    };
    // SAFETY: argument types match the kernel's signature in attention.cu.
    launched("attention", unsafe { l.launch(cfg) })?;
    Ok(out)
}

/// Conversion between float dtypes (through the host; used off the hot path).
pub(crate) fn cast(x: &CudaStorage, dtype: DType) -> Result<CudaStorage> {
    let v = x.download_f32()?;
    x.device().upload_f32(&v, dtype)
}
