//! The prewarm (kernel modules compiled on background threads when a device opens, for the
//! processes that turn it on) leaves every module's CUBIN in the disk cache. Its own test
//! binary: it sets the cache folder for the whole process and needs the module slots and
//! prewarmed arches of a fresh one. Needs libnvrtc and the CUDA headers, not a GPU.

use lightseq::backend::cuda::nvrtc::{self, MODULES};

mod common;
use common::nvrtc_present;

/// With an empty cache folder the prewarm compiles every module on background threads and
/// leaves each one's CUBIN there; a second prewarm of the same arch starts nothing.
#[test]
fn prewarm_fills_the_kernel_cache() {
    if !nvrtc_present() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("lightseq-prewarm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // The only test of this binary: no other thread reads the environment.
    std::env::set_var("LIGHTSEQ_CACHE_DIR", &dir);
    std::env::remove_var("LIGHTSEQ_PREWARM");
    let arch = (8, 9);
    let start = std::time::Instant::now();
    let threads = nvrtc::prewarm(arch, true);
    assert!(
        !threads.is_empty(),
        "an empty cache folder started no compiles"
    );
    for t in threads {
        t.join().unwrap();
    }
    // Modules of sm_90a's own instructions are not built for sm_89.
    let built: Vec<_> = MODULES
        .iter()
        .filter(|m| nvrtc::module_supports(m, arch))
        .collect();
    eprintln!(
        "prewarm of {} modules for sm_89: {:.1} s",
        built.len(),
        start.elapsed().as_secs_f64()
    );
    let files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for m in MODULES.iter().filter(|m| !nvrtc::module_supports(m, arch)) {
        let prefix = format!("{}-sm89-", m.name);
        assert!(
            !files.iter().any(|f| f.starts_with(&prefix)),
            "the prewarm built {}, which sm_89 cannot run",
            m.name
        );
    }
    for m in built {
        let prefix = format!("{}-sm89-", m.name);
        let name = files
            .iter()
            .find(|f| f.starts_with(&prefix) && f.ends_with(".cubin"))
            .unwrap_or_else(|| panic!("no cached CUBIN of module {} in {files:?}", m.name));
        let bytes = std::fs::read(dir.join(name)).unwrap();
        assert!(bytes.starts_with(b"\x7fELF"), "{name}: not an ELF cubin");
    }
    assert!(
        files.iter().all(|f| f.ends_with(".cubin")),
        "files other than CUBINs left in the cache folder: {files:?}"
    );
    assert!(
        nvrtc::prewarm(arch, true).is_empty(),
        "a second prewarm of the same arch started compiles"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
