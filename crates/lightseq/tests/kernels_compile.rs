//! Every kernel module compiles with NVRTC for sm_80 and sm_90 and defines every
//! (kernel, dtype) symbol the backend looks up. Needs libnvrtc and the CUDA headers, not a
//! GPU. Skips with a message when NVRTC is absent, unless LIGHTSEQ_REQUIRE_NVRTC=1 (CI).

use lightseq::backend::cuda::nvrtc::{self, MODULES};

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if let Err(e) = nvrtc::check_available().and_then(|_| nvrtc::find_cuda_include().map(|_| ())) {
        if std::env::var("LIGHTSEQ_REQUIRE_NVRTC").as_deref() == Ok("1") {
            panic!("NVRTC required but unavailable: {e}");
        }
        eprintln!("skipped: {e}");
        return;
    }
    let (major, minor) = nvrtc::version().unwrap();
    eprintln!(
        "NVRTC {major}.{minor}, headers in {}",
        nvrtc::find_cuda_include().unwrap().display()
    );
    for arch in [(8, 0), (9, 0)] {
        for m in MODULES {
            let cubin = nvrtc::compile_module(m, arch)
                .unwrap_or_else(|e| panic!("{}.cu for sm_{}{}: {e}", m.name, arch.0, arch.1));
            assert!(
                cubin.starts_with(b"\x7fELF"),
                "{}.cu: not an ELF cubin",
                m.name
            );
            for k in m.kernels {
                for &dt in m.dtypes {
                    let sym = format!("{k}_{}", dt.name());
                    assert!(
                        cubin
                            .windows(sym.len() + 1)
                            .any(|w| &w[..sym.len()] == sym.as_bytes() && w[sym.len()] == 0),
                        "{}.cu for sm_{}{} lacks kernel {sym}",
                        m.name,
                        arch.0,
                        arch.1
                    );
                }
            }
        }
    }
}
