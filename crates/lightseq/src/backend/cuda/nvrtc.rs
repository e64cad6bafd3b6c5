//! Run-time kernel compilation: each `kernels/*.cu` file (with `common.cuh` in front) is
//! compiled by NVRTC to a CUBIN for the GPU's own architecture the first time one of its
//! kernels is needed, and the CUBIN is cached on disk so a second run compiles nothing.

use super::cuda_err;
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{result as nv, sys as nvsys};
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

const COMMON: &str = include_str!("kernels/common.cuh");

/// A kernel source file and the kernels it defines. Every kernel is instantiated for each
/// of the module's dtypes as `<name>_<dtype>` (`layer_norm_f16`).
pub struct KernelModule {
    /// File stem under `kernels/`.
    pub name: &'static str,
    /// The file's text.
    pub source: &'static str,
    /// Kernel base names defined in it.
    pub kernels: &'static [&'static str],
    /// The dtypes each kernel is instantiated for.
    pub dtypes: &'static [DType],
    /// Macros defined when the file is compiled for this module (one file may serve two
    /// modules, each instantiating some of its kernels).
    pub defines: &'static [&'static str],
    /// Further kernels, instantiated for f16 and bf16 only (tensor-core forms in a module
    /// of every dtype).
    pub half_kernels: &'static [&'static str],
}

impl KernelModule {
    /// Whether the module has kernel `name` (for some dtype).
    pub fn has_kernel(&self, name: &str) -> bool {
        self.kernels.contains(&name) || self.half_kernels.contains(&name)
    }

    /// The dtypes kernel `name` of this module is instantiated for.
    pub fn dtypes_of(&self, name: &str) -> &'static [DType] {
        if self.half_kernels.contains(&name) {
            &[DType::F16, DType::BF16]
        } else {
            self.dtypes
        }
    }
}

/// Every kernel module of the backend.
pub const MODULES: &[KernelModule] = &[
    KernelModule {
        name: "elementwise",
        source: include_str!("kernels/elementwise.cu"),
        kernels: &[
            "bias_act",
            "add",
            "scatter_words",
            "glu",
            "scale",
            "index_select",
            "reorder_prefix_one",
            "write_rows",
            "write_rows2",
            "pack_rows",
            "to_f32",
            "from_f32",
        ],
        dtypes: &KERNEL_DTYPES,
        defines: &[],
        half_kernels: &[],
    },
    KernelModule {
        name: "layer_norm",
        source: include_str!("kernels/layer_norm.cu"),
        kernels: &[
            "layer_norm",
            "layer_norm_packed",
            "layer_norm_warp",
            "rms_norm",
        ],
        dtypes: &KERNEL_DTYPES,
        defines: &[],
        half_kernels: &[],
    },
    KernelModule {
        name: "embedding",
        source: include_str!("kernels/embedding.cu"),
        kernels: &["embed"],
        dtypes: &KERNEL_DTYPES,
        defines: &[],
        half_kernels: &[],
    },
    KernelModule {
        name: "rotary",
        source: include_str!("kernels/rotary.cu"),
        kernels: &["rotary"],
        dtypes: &KERNEL_DTYPES,
        defines: &[],
        half_kernels: &[],
    },
    KernelModule {
        name: "search",
        source: include_str!("kernels/search.cu"),
        kernels: &[
            "logprob_topk",
            "logprob_topk_slices",
            "logprob_topk_merge",
            "beam_select",
        ],
        dtypes: &KERNEL_DTYPES,
        defines: &[],
        half_kernels: &[],
    },
    KernelModule {
        name: "attention",
        source: include_str!("kernels/attention.cu"),
        kernels: &[
            "attention",
            "attention_tiled",
            "attention_decode",
            "attention_decode_p4",
            "attention_decode_p8",
            "attention_decode_p16",
        ],
        dtypes: &KERNEL_DTYPES,
        defines: &[],
        half_kernels: &[
            "attention_decode_g4",
            "attention_decode_g8",
            "attention_decode_g16",
        ],
    },
    KernelModule {
        name: "train",
        source: include_str!("kernels/train.cu"),
        kernels: &[
            "transpose_12",
            "masked_softmax",
            "softmax_backward",
            "layer_norm_backward",
            "layer_norm_params",
            "column_sum",
            "activate",
            "activation_backward",
            "embedding_backward",
            "embedding_backward_packed",
            "cross_entropy",
            "cross_entropy_staged",
            "dropout",
            "add_scaled_into",
            "sum_chunks",
            "add_layer_norm",
            "column_sum_packed",
            "activation_backward_colsum",
            "gather_heads",
            "masked_softmax_rows",
            "softmax_backward_rows",
            "add_layer_norm_rows",
            "layer_norm_backward_rows",
            "layer_norm_backward_rows_dsum",
            "adam_multi",
            "layer_norm_params_packed",
            "sum_squares_multi",
        ],
        dtypes: &KERNEL_DTYPES,
        defines: &[],
        half_kernels: &[],
    },
    KernelModule {
        name: "attention_train",
        source: include_str!("kernels/attention_train.cu"),
        kernels: &[
            "attn_short_fwd_d64_l32",
            "attn_short_fwd_d64_l64",
            "attn_short_fwd_d128_l32",
            "attn_short_fwd_d128_l64",
            "attn_short_bwd_d64_l32",
            "attn_short_bwd_d64_l64",
            "attn_short_bwd_d128_l32",
            "attn_short_bwd_d128_l64",
        ],
        // The tensor-core mma takes f16 and bf16 inputs only.
        dtypes: &[DType::F16, DType::BF16],
        defines: &[],
        half_kernels: &[],
    },
    // The same file's flash forward alone: inference needs it and not the training kernels
    // (this machine, 2 cores, sm_89: ~35 s for the whole file).
    KernelModule {
        name: "attention_flash",
        source: include_str!("kernels/attention_train.cu"),
        kernels: &[
            "attn_flash_d64",
            "attn_flash_d128",
            "attn_flash_s_d64",
            "attn_flash_s_d128",
        ],
        dtypes: &[DType::F16, DType::BF16],
        defines: &["LS_FLASH_MODULE"],
        half_kernels: &[],
    },
    KernelModule {
        name: "linear_small",
        source: include_str!("kernels/linear_small.cu"),
        kernels: &[
            "linear_small_n2",
            "linear_small_n4",
            "linear_small_m2_n2",
            "linear_small_m2_n4",
        ],
        dtypes: &[DType::F16, DType::BF16],
        defines: &[],
        half_kernels: &[],
    },
    KernelModule {
        name: "linear_wg",
        source: include_str!("kernels/linear_wg.cu"),
        kernels: &[
            "linear_wg_n8",
            "linear_wg_n16",
            "linear_wg_n32",
            "linear_wg_n64",
            "linear_wgt_m1_n128",
            "linear_wgt_m1_n192",
            "linear_wgt_m1_n256",
            "linear_wgt_m2_n128",
            "linear_wgt_m2_n192",
            "linear_wgt_m2_n256",
            "linear_wgt_ln_n64",
            "linear_wgt_ln_n96",
            "linear_wgt_ln_n128",
        ],
        dtypes: &[DType::F16, DType::BF16],
        defines: &[],
        half_kernels: &[],
    },
];

/// Modules of sm_90a's own instructions (the warpgroup MMA): compiled for `sm_90a`, and
/// only for GPUs of compute capability 9.0, since later architectures lack them.
const SM90A_ONLY: &[&str] = &["linear_wg"];

/// Whether `module` can be built for a GPU of compute capability `arch`.
pub fn module_supports(module: &KernelModule, arch: (i32, i32)) -> bool {
    !SM90A_ONLY.contains(&module.name) || arch == (9, 0)
}

/// NVRTC's target for `module` on `arch`: `sm_XY`, or `sm_90a` for the modules of its own
/// instructions.
fn target(module: &KernelModule, arch: (i32, i32)) -> String {
    let suffix = if SM90A_ONLY.contains(&module.name) {
        "a"
    } else {
        ""
    };
    format!("sm_{}{}{suffix}", arch.0, arch.1)
}

/// Float dtypes kernels are instantiated for, unless their module says otherwise.
pub const KERNEL_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Checks that libnvrtc can be loaded.
pub fn check_available() -> Result<()> {
    // SAFETY: only probes whether the shared library can be opened.
    if unsafe { nvsys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::Device(
            "NVRTC (libnvrtc.so) was not found; install the CUDA toolkit or the nvidia-cuda-nvrtc wheel and add its lib folder to LD_LIBRARY_PATH".into(),
        ))
    }
}

/// NVRTC's version (major, minor).
pub fn version() -> Result<(i32, i32)> {
    check_available()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    unsafe { nvsys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| cuda_err("nvrtcVersion", e))?;
    Ok((major, minor))
}

/// Folders searched for cuda_fp16.h, in order.
fn include_candidates() -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(p) = std::env::var_os("LIGHTSEQ_CUDA_INCLUDE") {
        c.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(p) = std::env::var_os(var) {
            c.push(PathBuf::from(p).join("include"));
        }
    }
    c.push(PathBuf::from("/usr/local/cuda/include"));
    // pip wheels (nvidia-cuda-runtime) put the headers in site-packages/nvidia/cu13/include.
    let mut site_roots: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        site_roots.push(PathBuf::from(v).join("lib"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        site_roots.push(PathBuf::from(&h).join(".local/lib"));
        site_roots.push(PathBuf::from(&h).join(".pyenv/versions"));
    }
    for r in ["/usr/local/lib", "/usr/lib", "/opt/conda/lib"] {
        site_roots.push(PathBuf::from(r));
    }
    for root in site_roots {
        for site in python_site_dirs(&root) {
            for cu in ["cu13", "cuda_runtime"] {
                c.push(site.join("nvidia").join(cu).join("include"));
            }
        }
    }
    c
}

/// site-packages / dist-packages folders under `root` (root/python3.X/..., or a pyenv
/// versions folder root/3.X.Y/lib/python3.X/...).
fn python_site_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("python3") {
            out.push(p.join("site-packages"));
            out.push(p.join("dist-packages"));
        } else if name.starts_with('3') {
            out.extend(python_site_dirs(&p.join("lib")));
        }
    }
    out
}

/// The folder holding the CUDA headers NVRTC needs, or an error naming what was searched.
pub fn find_cuda_include() -> Result<PathBuf> {
    let cands = include_candidates();
    for c in &cands {
        if c.join("cuda_fp16.h").is_file() && c.join("cuda_bf16.h").is_file() {
            return Ok(c.clone());
        }
    }
    Err(Error::Device(format!(
        "cuda_fp16.h and cuda_bf16.h, which NVRTC needs, were not found. Set CUDA_HOME to the CUDA toolkit, or LIGHTSEQ_CUDA_INCLUDE to a folder holding them (pip install nvidia-cuda-runtime provides site-packages/nvidia/cu13/include). Searched: {}",
        cands
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

pub(crate) fn cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LIGHTSEQ_CACHE_DIR") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(p).join("lightseq/kernels"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lightseq/kernels"))
}

/// Macros from `LIGHTSEQ_NVRTC_DEFINES` (`NAME` or `NAME=VALUE`, separated by commas or
/// spaces), defined in every kernel module: the kernels' compile-time experiments, timed
/// against the default build in one process. Tokens that are not a C identifier with an
/// optional value are left out, with one line on stderr.
fn extra_defines() -> &'static [String] {
    static DEFINES: OnceLock<Vec<String>> = OnceLock::new();
    DEFINES.get_or_init(|| {
        let Ok(v) = std::env::var("LIGHTSEQ_NVRTC_DEFINES") else {
            return Vec::new();
        };
        v.split([',', ' '])
            .filter(|t| !t.is_empty())
            .filter(|t| {
                let name = t.split('=').next().unwrap_or("");
                let ok = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !ok {
                    eprintln!("lightseq: LIGHTSEQ_NVRTC_DEFINES: leaving out {t:?} (not NAME or NAME=VALUE)");
                }
                ok
            })
            .map(str::to_string)
            .collect()
    })
}

/// FNV-1a, stable across Rust versions (unlike std's hasher), for cache keys.
fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for &b in p.iter().chain(&[0xffu8]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// Compiles one module for `sm_XY` and returns its CUBIN.
pub fn compile_module(module: &KernelModule, arch: (i32, i32)) -> Result<Vec<u8>> {
    if !module_supports(module, arch) {
        return Err(Error::Cuda(format!(
            "{}.cu uses sm_90a's own instructions and is not built for sm_{}{}",
            module.name, arch.0, arch.1
        )));
    }
    check_available()?;
    let include = find_cuda_include()?;
    let src = format!(
        "{COMMON}\n#line 1 \"{}.cu\"\n{}",
        module.name, module.source
    );
    let mut opts = vec![
        format!("--gpu-architecture={}", target(module, arch)),
        "--std=c++17".to_string(),
        format!("-I{}", include.display()),
    ];
    opts.extend(module.defines.iter().map(|d| format!("-D{d}")));
    opts.extend(extra_defines().iter().map(|d| format!("-D{d}")));
    let csrc = CString::new(src).map_err(|_| Error::Cuda("kernel source has a NUL byte".into()))?;
    let cname = CString::new(format!("{}.cu", module.name)).unwrap_or_default();
    let prog = nv::create_program(&csrc, Some(&cname)).map_err(|e| cuda_err("nvrtc", e))?;
    // SAFETY: `prog` is live until destroy_program below; buffers are sized by NVRTC.
    let result = unsafe {
        match nv::compile_program(prog, &opts) {
            Ok(()) => {
                let mut size = 0usize;
                nvsys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .and_then(|_| {
                        let mut buf = vec![0u8; size];
                        nvsys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut _)
                            .result()
                            .map(|_| buf)
                    })
                    .map_err(|e| cuda_err("nvrtcGetCUBIN", e))
            }
            Err(e) => {
                let log = nv::get_program_log(prog)
                    .map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned())
                    .unwrap_or_default();
                Err(Error::Cuda(format!(
                    "NVRTC failed on {}.cu for {} ({e}):\n{log}",
                    module.name,
                    target(module, arch)
                )))
            }
        }
    };
    // SAFETY: created above, destroyed once.
    let _ = unsafe { nv::destroy_program(prog) };
    result
}

/// Where `module`'s CUBIN for `arch` is cached on disk: keyed by its source and defines,
/// NVRTC's version, the arch and LIGHTSEQ_NVRTC_DEFINES. None without a cache folder.
fn cubin_file(module: &KernelModule, arch: (i32, i32)) -> Result<Option<PathBuf>> {
    let (ma, mi) = version()?;
    let key = fnv64(&[
        COMMON.as_bytes(),
        module.source.as_bytes(),
        module.defines.join(" ").as_bytes(),
        format!("nvrtc {ma}.{mi} {}", target(module, arch)).as_bytes(),
        extra_defines().join(" ").as_bytes(),
    ]);
    Ok(cache_dir().map(|d| {
        d.join(format!(
            "{}-sm{}{}-{key:016x}.cubin",
            module.name, arch.0, arch.1
        ))
    }))
}

/// Whether a cache file of `len` bytes holds a CUBIN: an empty one (a write cut short) is
/// compiled again. The prewarm's check of the folder and the read share this rule.
fn usable_cubin_len(len: u64) -> bool {
    len > 0
}

/// A module's CUBIN for one arch once this process has it. The slot's lock is held while
/// the CUBIN is read or compiled, so a second request (a kernel wanted while the prewarm
/// compiles its module) waits for the first instead of compiling again.
type CubinSlot = Arc<Mutex<Option<Arc<Vec<u8>>>>>;

fn cubin_slot(module: &'static str, arch: (i32, i32)) -> CubinSlot {
    type Slots = Mutex<HashMap<(&'static str, (i32, i32)), CubinSlot>>;
    static SLOTS: OnceLock<Slots> = OnceLock::new();
    let mut slots = SLOTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    slots.entry((module, arch)).or_default().clone()
}

/// CUBIN for `module`: built once a process, from the disk cache when the same source,
/// NVRTC and arch built it, else compiled (and written there).
fn cubin_cached(module: &'static KernelModule, arch: (i32, i32)) -> Result<Arc<Vec<u8>>> {
    let slot = cubin_slot(module.name, arch);
    let mut held = slot.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = held.as_ref() {
        return Ok(c.clone());
    }
    let cubin = Arc::new(cubin_from_disk_or_compile(module, arch)?);
    *held = Some(cubin.clone());
    Ok(cubin)
}

fn cubin_from_disk_or_compile(module: &KernelModule, arch: (i32, i32)) -> Result<Vec<u8>> {
    let file = cubin_file(module, arch)?;
    if let Some(f) = &file {
        if let Ok(bytes) = std::fs::read(f) {
            if usable_cubin_len(bytes.len() as u64) {
                return Ok(bytes);
            }
        }
    }
    announce_compiling(arch);
    let cubin = compile_module(module, arch)?;
    if let Some(f) = &file {
        // A cache that cannot be written only costs a recompile next time.
        if let Some(dir) = f.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = f.with_extension(format!(
            "tmp{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        if std::fs::write(&tmp, &cubin).is_err() || std::fs::rename(&tmp, f).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(cubin)
}

/// One line on stderr the first time this process compiles a kernel module: a first run
/// spends tens of seconds there (H200 machine: ~45 s serially before the prewarm).
fn announce_compiling(arch: (i32, i32)) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let dir = cache_dir().map_or("nowhere: no cache folder".into(), |d| {
            d.display().to_string()
        });
        eprintln!(
            "lightseq: compiling CUDA kernels for sm_{}{} once (cached in {dir})",
            arch.0, arch.1
        );
    });
}

/// Modules only training uses; the prewarm leaves them out unless asked for training.
const TRAINING_ONLY: &[&str] = &["attention_train"];

/// The process's prewarm: off for the devices it opens until [`enable_prewarm`], the
/// threads started for them (for [`finish_prewarm`]), and the arches already prewarmed.
struct PrewarmState {
    training: Option<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    started: Vec<(i32, i32)>,
}

fn prewarm_state() -> std::sync::MutexGuard<'static, PrewarmState> {
    static STATE: Mutex<PrewarmState> = Mutex::new(PrewarmState {
        training: None,
        threads: Vec::new(),
        started: Vec::new(),
    });
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Turns the prewarm on for the devices this process opens from now on (with the
/// training-only modules when `training`). A process that does this calls
/// [`finish_prewarm`] before it exits, so that no thread is inside NVRTC while the
/// process tears down; the command-line tool does both.
pub fn enable_prewarm(training: bool) {
    prewarm_state().training = Some(training);
}

/// Waits for the compiles the prewarm started.
pub fn finish_prewarm() {
    let threads = std::mem::take(&mut prewarm_state().threads);
    for t in threads {
        let _ = t.join();
    }
}

/// On opening a device of `arch`: the prewarm, where [`enable_prewarm`] turned it on.
pub(crate) fn prewarm_on_open(arch: (i32, i32)) {
    let Some(training) = prewarm_state().training else {
        return;
    };
    let threads = prewarm(arch, training);
    prewarm_state().threads.extend(threads);
}

/// Starts compiling, on background threads (as many as the machine has cores, the
/// largest modules first), every module whose CUBIN for `arch` is not in the disk cache,
/// once a process, the training-only ones only with `training`: a first run then waits
/// about as long as the largest module it needs takes instead of for each module in turn
/// as its kernels are first launched. Returns the threads (none when nothing is missing,
/// there is no cache folder, NVRTC or the CUDA headers are absent, or LIGHTSEQ_PREWARM=0);
/// the caller joins them before the process exits.
pub fn prewarm(arch: (i32, i32), training: bool) -> Vec<std::thread::JoinHandle<()>> {
    if std::env::var("LIGHTSEQ_PREWARM").as_deref() == Ok("0")
        || cache_dir().is_none()
        || check_available().is_err()
        || find_cuda_include().is_err()
    {
        return Vec::new();
    }
    {
        let started = &mut prewarm_state().started;
        if started.contains(&arch) {
            return Vec::new();
        }
        started.push(arch);
    }
    let on_disk = |m: &KernelModule| {
        matches!(cubin_file(m, arch), Ok(Some(f))
            if std::fs::metadata(&f).is_ok_and(|md| usable_cubin_len(md.len())))
    };
    let mut missing: Vec<&'static KernelModule> = MODULES
        .iter()
        .filter(|m| training || !TRAINING_ONLY.contains(&m.name))
        .filter(|m| module_supports(m, arch) && !on_disk(m))
        .collect();
    if missing.is_empty() {
        return Vec::new();
    }
    missing.sort_by_key(|m| std::cmp::Reverse(m.source.len()));
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(missing.len());
    let missing = Arc::new(missing);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    (0..threads)
        .filter_map(|i| {
            let (missing, next) = (missing.clone(), next.clone());
            std::thread::Builder::new()
                .name(format!("lightseq-nvrtc-{i}"))
                .spawn(move || {
                    while let Some(m) =
                        missing.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                    {
                        // A module that fails reports its error when its kernel is wanted.
                        let _ = cubin_cached(m, arch);
                    }
                })
                .ok()
        })
        .collect()
}

/// Modules loaded into one context, and the functions taken from them.
pub(crate) struct KernelCache {
    arch: (i32, i32),
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(String, DType), CudaFunction>>,
}

impl KernelCache {
    pub(crate) fn new(arch: (i32, i32)) -> Self {
        KernelCache {
            arch,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn function(
        &self,
        ctx: &Arc<CudaContext>,
        name: &str,
        dtype: DType,
    ) -> Result<CudaFunction> {
        let key = (name.to_string(), dtype);
        if let Some(f) = self.functions.lock().unwrap().get(&key) {
            return Ok(f.clone());
        }
        let module = MODULES
            .iter()
            .find(|m| m.has_kernel(name))
            .ok_or_else(|| Error::Cuda(format!("no kernel module defines `{name}`")))?;
        if !module.dtypes_of(name).contains(&dtype) {
            return Err(Error::Cuda(format!("kernel `{name}` has no {dtype} form")));
        }
        let loaded = {
            let mut mods = self.modules.lock().unwrap();
            match mods.get(module.name) {
                Some(m) => m.clone(),
                None => {
                    let cubin = cubin_cached(module, self.arch)?;
                    let m = ctx
                        .load_module(cudarc::nvrtc::Ptx::from_binary(cubin.to_vec()))
                        .map_err(|e| cuda_err(&format!("loading {}.cu", module.name), e))?;
                    mods.insert(module.name, m.clone());
                    m
                }
            }
        };
        let symbol = format!("{name}_{}", dtype.name());
        let f = loaded
            .load_function(&symbol)
            .map_err(|e| cuda_err(&format!("kernel {symbol}"), e))?;
        self.functions.lock().unwrap().insert(key, f.clone());
        Ok(f)
    }
}
