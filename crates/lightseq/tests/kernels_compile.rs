//! Every kernel module compiles with NVRTC for sm_80 and sm_90 (those of sm_90a's own
//! instructions for sm_90a only) and defines every (kernel, dtype) symbol the backend looks
//! up. Needs libnvrtc and the CUDA headers, not a
//! GPU. Skips with a message when NVRTC is absent, unless LIGHTSEQ_REQUIRE_NVRTC=1 (CI).

use lightseq::backend::cuda::nvrtc::{self, MODULES};

mod common;
use common::nvrtc_present;

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_present() {
        return;
    }
    let (major, minor) = nvrtc::version().unwrap();
    eprintln!(
        "NVRTC {major}.{minor}, headers in {}",
        nvrtc::find_cuda_include().unwrap().display()
    );
    for arch in [(8, 0), (9, 0)] {
        for m in MODULES {
            if !nvrtc::module_supports(m, arch) {
                assert!(
                    nvrtc::compile_module(m, arch).is_err(),
                    "{}.cu built for sm_{}{}, which lacks its instructions",
                    m.name,
                    arch.0,
                    arch.1
                );
                continue;
            }
            let cubin = nvrtc::compile_module(m, arch)
                .unwrap_or_else(|e| panic!("{}.cu for sm_{}{}: {e}", m.name, arch.0, arch.1));
            assert!(
                cubin.starts_with(b"\x7fELF"),
                "{}.cu: not an ELF cubin",
                m.name
            );
            for &k in m.kernels.iter().chain(m.half_kernels) {
                for &dt in m.dtypes_of(k) {
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

/// Every kernel a module's source defines is in its list (the backend looks kernels up by
/// the list, so one missing there fails only when first launched). Needs no NVRTC.
#[test]
fn every_defined_kernel_is_listed() {
    let mut checked = 0;
    for m in MODULES {
        // Every `__global__` must be one this parser reads, so that a declaration written
        // another way fails here instead of going unchecked.
        assert_eq!(
            m.source.matches("__global__").count(),
            m.source.matches("__global__ void").count(),
            "{}.cu: a __global__ not followed by `void`",
            m.name
        );
        let mut rest = m.source;
        while let Some(at) = rest.find("__global__ void") {
            rest = &rest[at + "__global__ void".len()..];
            // The name follows, possibly after __launch_bounds__(...) and a line break in
            // the macro.
            let skip =
                |t: &'static str| t.trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
            let mut tail = skip(rest);
            if let Some(after) = tail.strip_prefix("__launch_bounds__") {
                tail = skip(&after[after.find(')').unwrap() + 1..]);
            }
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            // Names are written NAME_##S inside the instantiating macros; names built from
            // more macro parameters (attn_flash_d##DMAX##_##S) are not checked.
            let name = tail[..end].trim_end_matches('_');
            assert!(
                tail[end..].starts_with("##"),
                "{}.cu: kernel {name} is not named NAME_##S in a macro",
                m.name
            );
            if tail[end..].starts_with("##S") {
                assert!(
                    m.has_kernel(name),
                    "{}.cu defines kernel {name}, which its module's list lacks",
                    m.name
                );
                checked += 1;
            }
        }
    }
    // The modules define several dozen such kernels; none read means the parser is wrong.
    assert!(checked >= 40, "only {checked} kernel names checked");
}
