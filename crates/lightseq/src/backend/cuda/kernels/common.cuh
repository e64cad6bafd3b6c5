// Shared by every kernel file: half types, conversions, reductions, activations.
// Each .cu file is compiled with this text in front of it (see nvrtc.rs).
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define LS_FULL_MASK 0xffffffffu
#define LS_NEG_INF (__int_as_float(0xff800000))
#define LS_POS_INF (__int_as_float(0x7f800000))
#define LS_LOG2E 1.4426950408889634f  // log2(e): exp(x) = 2^(x log2(e))

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(LS_FULL_MASK, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(LS_FULL_MASK, v, o));
  return v;
}

// Sum over the whole block; every thread gets the total. blockDim.x must be a multiple of 32.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // a previous call may still be reading `partial`
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  return warp_sum(lane < warps ? partial[lane] : 0.f);
}

// Max over the whole block; every thread gets it. blockDim.x must be a multiple of 32.
__device__ __forceinline__ float block_max(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max(v);
  __syncthreads();  // a previous call may still be reading `partial`
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  return warp_max(lane < warps ? partial[lane] : LS_NEG_INF);
}

// Programmatic dependent launch (sm_90+, launch.rs): a kernel may be scheduled while the
// one before it in the stream is still finishing. Every kernel calls this before it reads
// anything an earlier kernel writes: it waits until the previous kernel has completed and
// its writes are visible (at once when the launch had no such dependency, and on older
// GPUs, where it is nothing). It then lets the next kernel be scheduled: the next one's
// blocks start as this one's free their slots, and whatever they do before their own wait
// (the few-row GEMMs read their weights) overlaps this kernel's work. Before
// its wait a kernel may only prefetch, or read what no kernel still running may write.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define LS_PDL_WAIT() \
  asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory")
#else
#define LS_PDL_WAIT() \
  do {                \
  } while (0)
#endif

// Activation codes match ops::Activation::code().
__device__ __forceinline__ float activate(float x, int act) {
  switch (act) {
    case 1: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    case 2: {
      const float c = 0.79788456080286536f;  // sqrt(2 / pi)
      return 0.5f * x * (1.f + tanhf(c * (x + 0.044715f * x * x * x)));
    }
    case 3: return fmaxf(x, 0.f);
    case 4: return x / (1.f + expf(-x));
    case 5: return x / (1.f + expf(-1.702f * x));
    case 6: return tanhf(x);
    default: return x;
  }
}

// The erf GELU for 16-bit outputs: 1 - erf(|z|) by Abramowitz and Stegun's 7.1.26
// (absolute error below 1.5e-7, far under a 16-bit output's rounding) in about half the
// instructions of erff, which made the element-wise pass compute-bound (H200, BERT-base's
// 4096 x 3072 activations). Negative inputs take 1 - erf(|z|) directly, without
// cancellation.
__device__ __forceinline__ float ls_gelu_erf16(float x) {
  const float z = fabsf(x) * 0.70710678118654752f;
  // The approximate reciprocal and exponential without their subnormal guards: the divisor
  // is at least 1, and an exponential below 2^-126 (|x| > 13) is as good as 0 here.
  float t, e;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(t) : "f"(fmaf(0.3275911f, z, 1.f)));
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(-z * z * LS_LOG2E));
  float p = fmaf(1.061405429f, t, -1.453152027f);
  p = fmaf(p, t, 1.421413741f);
  p = fmaf(p, t, -0.284496736f);
  p = fmaf(p, t, 0.254829592f);
  const float q = p * t * e;  // 1 - erf(z)
  return 0.5f * x * (x < 0.f ? q : 2.f - q);
}

// Runs the statement S with the activation code as the compile-time constant LS_A, so a
// loop over elements inside S has no per-element dispatch (a switch in an unrolled loop
// compiles to an indirect jump per element).
#define LS_WITH_ACT(act, S)                             \
  switch (act) {                                        \
    case 1: { constexpr int LS_A = 1; S; } break;       \
    case 2: { constexpr int LS_A = 2; S; } break;       \
    case 3: { constexpr int LS_A = 3; S; } break;       \
    case 4: { constexpr int LS_A = 4; S; } break;       \
    case 5: { constexpr int LS_A = 5; S; } break;       \
    case 6: { constexpr int LS_A = 6; S; } break;       \
    default: { constexpr int LS_A = 0; S; } break;      \
  }

// Instantiates macro M once per float storage type, with the suffix used in symbol names.
#define LS_FLOAT_TYPES(M) M(float, f32) M(__half, f16) M(__nv_bfloat16, bf16)

// 16-byte packs for vectorized element-wise kernels: 4 f32 or 8 f16/bf16 per load.
template <typename T>
struct alignas(16) LsPack {
  T v[16 / sizeof(T)];
};

__device__ __forceinline__ bool ls_aligned16(const void* p) {
  return ((unsigned long long)p & 15ull) == 0;
}

// The 32-bit shared-memory address of a generic pointer into shared memory (for ldmatrix
// and cp.async operands).
__device__ __forceinline__ unsigned int ls_smem_addr(const void* p) {
  unsigned int a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

// c += a b for one m16n8k16 tile: PTX mma.sync, f32 accumulation (sm_80 and later; the
// kernels that call it are launched on sm_80+ only; an uncalled inline function is not
// emitted, so modules that do not call it compile as before).
template <typename T>
__device__ __forceinline__ void ls_mma(float (&c)[4], const unsigned int (&a)[4],
                                       unsigned int b0, unsigned int b1);
// The f16 and bf16 forms differ only in the PTX type of a and b.
#define LS_MMA(T, PTX)                                                                      \
  template <>                                                                               \
  __device__ __forceinline__ void ls_mma<T>(float (&c)[4], const unsigned int (&a)[4],     \
                                            unsigned int b0, unsigned int b1) {             \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX "." PTX                       \
                 ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"             \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                           \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));           \
  }
LS_MMA(__half, "f16")
LS_MMA(__nv_bfloat16, "bf16")
#undef LS_MMA

#if __CUDA_ARCH__ >= 800
// 16 bytes global -> the 32-bit shared address `dst` (ls_smem_addr), asynchronously: for
// loops that step the address themselves.
__device__ __forceinline__ void ls_cp16_at(unsigned int dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
#endif

// 16 bytes global -> shared; asynchronous (cp.async, not through registers) on sm_80 and
// later, where a thread's copies complete at ls_cp_wait or ls_cp_wait_all, a plain copy
// before.
__device__ __forceinline__ void ls_cp16(void* dst, const void* src) {
#if __CUDA_ARCH__ >= 800
  ls_cp16_at(ls_smem_addr(dst), src);
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}
// Closes this thread's copies issued since the last commit into a group.
__device__ __forceinline__ void ls_cp_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
// Waits until at most `N` of this thread's most recent commit groups are pending.
template <int N>
__device__ __forceinline__ void ls_cp_wait() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}
// Waits for all of this thread's copies, committed or not.
__device__ __forceinline__ void ls_cp_wait_all() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

// out[i] = f(a[i], b[i]) (b may be null for a unary f), in 16-byte packs when every
// pointer is aligned, then the tail one element at a time. Grid-stride over packs.
template <typename T, typename F>
__device__ __forceinline__ void ls_map2(const T* a, const T* b, T* out, long long total, F f) {
  constexpr int N = 16 / sizeof(T);
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  long long done = 0;
  if (ls_aligned16(a) && ls_aligned16(out) && (b == nullptr || ls_aligned16(b))) {
    const long long packs = total / N;
    for (long long p = tid; p < packs; p += stride) {
      const LsPack<T> x = reinterpret_cast<const LsPack<T>*>(a)[p];
      LsPack<T> y;
      if (b) y = reinterpret_cast<const LsPack<T>*>(b)[p];
      LsPack<T> z;
#pragma unroll
      for (int k = 0; k < N; ++k) z.v[k] = from_f<T>(f(to_f(x.v[k]), b ? to_f(y.v[k]) : 0.f));
      reinterpret_cast<LsPack<T>*>(out)[p] = z;
    }
    done = packs * N;
  }
  for (long long i = done + tid; i < total; i += stride) {
    out[i] = from_f<T>(f(to_f(a[i]), b ? to_f(b[i]) : 0.f));
  }
}

// Philox-4x32-10 as train::philox: counter (i / 4 as two words, offset as two words), key
// (seed as two words), lane i % 4, u = (out >> 8) * 2^-24; dropout keeps i iff u >= p.
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k.x += 0x9E3779B9u;
      k.y += 0xBB67AE85u;
    }
    const unsigned int hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
    const unsigned int hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
  }
  return c;
}

// The Philox output of group q = i / 4 (elements 4q..4q + 3), and the uniform draw of
// element i from it.
__device__ __forceinline__ uint4 ls_philox_group(unsigned long long q, unsigned long long seed,
                                                 unsigned long long offset) {
  return philox4x32_10(make_uint4((unsigned int)q, (unsigned int)(q >> 32), (unsigned int)offset,
                                  (unsigned int)(offset >> 32)),
                       make_uint2((unsigned int)seed, (unsigned int)(seed >> 32)));
}
__device__ __forceinline__ float ls_philox_lane(uint4 o, unsigned long long i) {
  const unsigned int r = i % 4 == 0 ? o.x : i % 4 == 1 ? o.y : i % 4 == 2 ? o.z : o.w;
  return (float)(r >> 8) * 5.9604644775390625e-8f;  // 2^-24
}
