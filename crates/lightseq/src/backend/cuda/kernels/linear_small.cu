// Linear layers over few rows (decode steps): y [m, n] = act(x [m, k] w [n, k]^T + bias)
// (+ r), for m <= 16 MT (MT row tiles of 16) and k a multiple of 32. Such a GEMM is a read of w; what costs is
// latency, so every load is 16 bytes and goes straight to registers, without staging.
//
// A block takes 8 NT output columns and its warps split k: warp i takes the 32-wide chunks
// i, i + warps, ... Within a chunk, lane 4 g + q loads elements 8 q .. 8 q + 7 of w's row
// g (of each 8-column tile) and of x's rows g and g + 8 (of each 16-row tile). The mma
// m16n8k16 sums over its k in any order as long as A and B agree, so the chunk's 32 k are
// fed as two mma steps in a permuted order: step s takes, at the fragment places of k 2q,
// 2q + 1 and 2q + 8, 2q + 9, the loaded elements 8 q + 4 s + {0, 1} and {2, 3}. Each lane's
// two 16-byte loads of a row thus become the A and B registers of both steps as loaded.
// The warps' partial tiles meet in shared memory, where the epilogue (bias, activation,
// residual) runs in f32 and y is rounded once. What a decode step's GEMM waits for is x:
// the first round of w and the bias can be in registers before the wait for the kernel
// before (where the host says no running kernel writes them), and the residual is read
// right after it, so that the loop and the reduction hide its latency.
// f16 and bf16 only (the mma has no f32 inputs), sm_80 and later.

// Chunks a warp loads before its mma steps.
#define LSM_CH 2
// Warps a block has at most; the host sizes the shared memory as warps * MT * NT * 512 bytes.
#define LSM_MAX_WARPS 16

// Loads a warp's w of one round (chunks c0, c0 + warps, ..., LSM_CH of them) into wv.
template <typename T, int NT>
__device__ __forceinline__ void linear_small_load_w(uint4 (&wv)[LSM_CH][NT],
                                                    const T* const (&wr)[NT], int c0, int warps,
                                                    int chunks) {
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int i = 0; i < LSM_CH; ++i) {
    const int c = c0 + i * warps;
    const bool ok = c < chunks;
#pragma unroll
    for (int b = 0; b < NT; ++b) {
      wv[i][b] = ok && wr[b] ? __ldg(reinterpret_cast<const uint4*>(wr[b] + c * 32)) : zero;
    }
  }
}

// early_w: the warp's first round of w and the bias are read before LS_PDL_WAIT (the host
// passes it only where no kernel that may still be running writes them); the residual is
// read right after the wait, so that its latency passes behind the main loop.
template <typename T, int MT, int NT>
__device__ void linear_small_body(const T* x, const T* w, const T* bias, const T* r, T* y,
                                  int m, int n, int k, int act, bool early_w) {
  // [warp][tile value][lane]: the warps' partial accumulators (the host sizes it).
  extern __shared__ float red[];
  constexpr int VALS = MT * NT * 4;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int n0 = blockIdx.x * 8 * NT;
  const int chunks = k >> 5;
  float acc[MT][NT][4];
#pragma unroll
  for (int a = 0; a < MT; ++a) {
#pragma unroll
    for (int b = 0; b < NT; ++b) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[a][b][e] = 0.f;
    }
  }
  // Row pointers at this lane's 8 elements of chunk 0; null where the row is past m or n.
  const T* wr[NT];
#pragma unroll
  for (int b = 0; b < NT; ++b) {
    const int col = n0 + 8 * b + g;
    wr[b] = col < n ? w + (long long)col * k + 8 * q : nullptr;
  }
  const T* xr[MT][2];
#pragma unroll
  for (int a = 0; a < MT; ++a) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = 16 * a + 8 * h + g;
      xr[a][h] = row < m ? x + (long long)row * k + 8 * q : nullptr;
    }
  }
  // The epilogue's first value of this thread (value v = threadIdx.x, see below): its bias
  // and residual are read ahead of the loop.
  const int v0 = threadIdx.x;
  const int e0 = (v0 >> 5) & 3, tile0 = v0 >> 7;
  const int row0 = 16 * (tile0 / NT) + ((v0 & 31) >> 2) + 8 * (e0 >> 1);
  const int col0 = n0 + 8 * (tile0 % NT) + 2 * (v0 & 3) + (e0 & 1);
  const bool has0 = v0 < VALS * 32 && row0 < m && col0 < n;
  uint4 wv[LSM_CH][NT];
  float bias0 = 0.f;
  // The first round of w and the first bias value: before the wait with early_w.
  auto read_ahead = [&] {
    linear_small_load_w<T, NT>(wv, wr, warp, warps, chunks);
    if (bias && has0) bias0 = to_f(bias[col0]);
  };
  if (early_w) read_ahead();
  LS_PDL_WAIT();
  if (!early_w) read_ahead();
  const float r0 = r && has0 ? to_f(r[(long long)row0 * n + col0]) : 0.f;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  for (int c0 = warp; c0 < chunks; c0 += warps * LSM_CH) {
    uint4 xv[LSM_CH][MT][2];
#pragma unroll
    for (int i = 0; i < LSM_CH; ++i) {
      const int c = c0 + i * warps;
      const bool ok = c < chunks;
      const int off = c * 32;
#pragma unroll
      for (int a = 0; a < MT; ++a) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          xv[i][a][h] =
              ok && xr[a][h] ? __ldg(reinterpret_cast<const uint4*>(xr[a][h] + off)) : zero;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < LSM_CH; ++i) {
#pragma unroll
      for (int a = 0; a < MT; ++a) {
        const uint4 lo = xv[i][a][0], hi = xv[i][a][1];
        const unsigned int a0[4] = {lo.x, hi.x, lo.y, hi.y};
        const unsigned int a1[4] = {lo.z, hi.z, lo.w, hi.w};
#pragma unroll
        for (int b = 0; b < NT; ++b) {
          ls_mma<T>(acc[a][b], a0, wv[i][b].x, wv[i][b].y);
          ls_mma<T>(acc[a][b], a1, wv[i][b].z, wv[i][b].w);
        }
      }
    }
    const int next = c0 + warps * LSM_CH;
    if (next < chunks) linear_small_load_w<T, NT>(wv, wr, next, warps, chunks);
  }
#pragma unroll
  for (int a = 0; a < MT; ++a) {
#pragma unroll
    for (int b = 0; b < NT; ++b) {
#pragma unroll
      for (int e = 0; e < 4; ++e) red[(warp * VALS + (a * NT + b) * 4 + e) * 32 + lane] = acc[a][b][e];
    }
  }
  __syncthreads();
  // Value v of the tiles: lane l's accumulator e of tile (a, b); the m16n8 accumulator
  // holds (row g, columns 2 q, 2 q + 1) in e = 0, 1 and row g + 8 in e = 2, 3.
  for (int v = threadIdx.x; v < VALS * 32; v += blockDim.x) {
    const int l = v & 31, e = (v >> 5) & 3, tile = v >> 7;
    const int a = tile / NT, b = tile - a * NT;
    const int row = 16 * a + (l >> 2) + 8 * (e >> 1);
    const int col = n0 + 8 * b + 2 * (l & 3) + (e & 1);
    if (row >= m || col >= n) continue;
    float s = 0.f;
    for (int i = 0; i < warps; ++i) s += red[(i * VALS + (tile << 2) + e) * 32 + l];
    const bool first = v == v0;
    if (bias) s += first ? bias0 : to_f(bias[col]);
    s = activate(s, act);
    const long long at = (long long)row * n + col;
    if (r) s += first ? r0 : to_f(r[at]);
    y[at] = from_f<T>(s);
  }
}

// Warms L2 with the block's rows of w (8 NT of them, contiguous in w [n, k]) before
// LS_PDL_WAIT, so that the weight's DRAM latency passes behind the kernel before. A prefetch
// only fills L2, the point of coherence: the loads after the wait read current values even
// where the kernel before writes w (an optimizer step). Where the host knows that no kernel
// still running writes w (mode 2), the first round of w goes to registers before the wait.
template <typename T, int NT>
__device__ __forceinline__ void linear_small_prefetch(const T* w, int n, int k) {
  const int n0 = blockIdx.x * 8 * NT;
  const int cols = min(8 * NT, n - n0);
  if (cols <= 0) return;
  const char* base = reinterpret_cast<const char*>(w + (long long)n0 * k);
  const long long bytes = (long long)cols * k * sizeof(T);
  for (long long off = threadIdx.x * 128LL; off < bytes; off += blockDim.x * 128LL) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(base + off));
  }
}

// One row tile (m <= 16), or two (m <= 32: linear_small_m2_*; linear_small.rs says where
// the host takes them). prefetch: 0 nothing before the wait, 1 the L2 prefetch of w, 2 that
// and the first round of w and the bias in registers.
#define LS_LINEAR_SMALL(T, S, MT, NAME, NT)                                                   \
  extern "C" __global__ void __launch_bounds__(LSM_MAX_WARPS * 32)                            \
      NAME##_n##NT##_##S(const T* x, const T* w, const T* bias, const T* r, T* y, int m, int n, \
                         int k, int act, int prefetch) {                                      \
    if (prefetch) linear_small_prefetch<T, NT>(w, n, k);                                      \
    linear_small_body<T, MT, NT>(x, w, bias, r, y, m, n, k, act, prefetch == 2);              \
  }
#define LS_LINEAR_SMALL_ALL(T, S)                  \
  LS_LINEAR_SMALL(T, S, 1, linear_small, 2)        \
  LS_LINEAR_SMALL(T, S, 1, linear_small, 4)        \
  LS_LINEAR_SMALL(T, S, 2, linear_small_m2, 2)     \
  LS_LINEAR_SMALL(T, S, 2, linear_small_m2, 4)
LS_LINEAR_SMALL_ALL(__half, f16)
LS_LINEAR_SMALL_ALL(__nv_bfloat16, bf16)
