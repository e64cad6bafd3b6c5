// Fused attention for training on short sequences: a block per (sequence, head) keeps the
// head's q, k, v (and in the backward dO and the probabilities) in shared memory and runs
// every product on tensor cores (mma.sync m16n8k16, f32 accumulation), so no score
// matrix goes through global memory except the probabilities the backward reads.
// Activations are position-major ([len, batch, heads * d]: head h of sequence b starts at
// (b * heads + h) * d, rows batch * heads * d apart); the probabilities are [batch, heads,
// lq, lk] as masked_softmax writes them. Lengths are padded to multiples of 16 inside the
// block (zero rows, masked columns); the host checks that the shared memory fits.
// f16 and bf16 only (the mma has no f32 inputs), sm_80 and later.
#define AT_WARPS 4

template <typename T>
__device__ __forceinline__ unsigned short at_bits(T x);
template <>
__device__ __forceinline__ unsigned short at_bits(__half x) {
  return __half_as_ushort(x);
}
template <>
__device__ __forceinline__ unsigned short at_bits(__nv_bfloat16 x) {
  return __bfloat16_as_ushort(x);
}

// Element (r, c) of a matrix held row-major (`TRANS` false: p[r * ld + c]) or as its
// transpose held row-major (`TRANS` true: p[c * ld + r]), as raw bits.
template <bool TRANS, typename T>
__device__ __forceinline__ unsigned int at_el(const T* p, int r, int c, int ld) {
  return at_bits(TRANS ? p[c * ld + r] : p[r * ld + c]);
}

// Two elements in one register, the first in the low half (the mma operand order).
__device__ __forceinline__ unsigned int at_pack(unsigned int lo, unsigned int hi) {
  return lo | (hi << 16);
}

// c += a b for one m16n8k16 tile: PTX mma.sync, f32 accumulation (sm_80 and later).
template <typename T>
__device__ __forceinline__ void at_mma(float (&c)[4], const unsigned int (&a)[4],
                                       const unsigned int (&b)[2]);
template <>
__device__ __forceinline__ void at_mma<__half>(float (&c)[4], const unsigned int (&a)[4],
                                               const unsigned int (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void at_mma<__nv_bfloat16>(float (&c)[4],
                                                      const unsigned int (&a)[4],
                                                      const unsigned int (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// c [m, n] (f32, row-major, ldc) = A [m, k] @ B [k, n] from shared memory, A and B held
// row-major or transposed (TA, TB; see at_el); m and k multiples of 16, n of 8. The
// block's warps take the 16 x 8 output tiles in turn. Fragments follow the PTX layout of
// mma.m16n8k16: lane = 4 g + t holds A rows g and g + 8 at columns 2t, 2t + 1 (+ 8), B
// column g at rows 2t, 2t + 1 (+ 8), and C rows g and g + 8 at columns 2t, 2t + 1.
template <typename T, bool TA, bool TB>
__device__ void at_gemm(const T* a, int lda, const T* b, int ldb, float* c, int ldc, int m,
                        int n, int k) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int tn = n / 8;
  for (int tile = warp; tile < (m / 16) * tn; tile += AT_WARPS) {
    const int i0 = (tile / tn) * 16, j0 = (tile % tn) * 8;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int kk = 0; kk < k; kk += 16) {
      const int r0 = i0 + g, r1 = r0 + 8, c0 = kk + 2 * t, c1 = c0 + 8, col = j0 + g;
      const unsigned int fa[4] = {
          at_pack(at_el<TA>(a, r0, c0, lda), at_el<TA>(a, r0, c0 + 1, lda)),
          at_pack(at_el<TA>(a, r1, c0, lda), at_el<TA>(a, r1, c0 + 1, lda)),
          at_pack(at_el<TA>(a, r0, c1, lda), at_el<TA>(a, r0, c1 + 1, lda)),
          at_pack(at_el<TA>(a, r1, c1, lda), at_el<TA>(a, r1, c1 + 1, lda))};
      const unsigned int fb[2] = {
          at_pack(at_el<TB>(b, c0, col, ldb), at_el<TB>(b, c0 + 1, col, ldb)),
          at_pack(at_el<TB>(b, c1, col, ldb), at_el<TB>(b, c1 + 1, col, ldb))};
      at_mma<T>(acc, fa, fb);
    }
    float* c0p = c + (i0 + g) * ldc + j0 + 2 * t;
    float* c1p = c0p + 8 * ldc;
    c0p[0] = acc[0];
    c0p[1] = acc[1];
    c1p[0] = acc[2];
    c1p[1] = acc[3];
  }
}

// dst [rows_pad, d] (shared) = rows [0, rows) of a head (row r at src + r * stride), zero
// rows past `rows`; d is a multiple of 16.
template <typename T>
__device__ void at_load_head(T* dst, const T* src, int rows, int rows_pad, int d,
                             long long stride) {
  constexpr int N = 16 / sizeof(T);
  const int packs = d / N;
  const bool aligned = ls_aligned16(src) && stride % N == 0;
  for (int p = threadIdx.x; p < rows_pad * packs; p += blockDim.x) {
    const int r = p / packs, c = (p - r * packs) * N;
    LsPack<T> v;
    if (r < rows && aligned) {
      v = *reinterpret_cast<const LsPack<T>*>(src + r * stride + c);
    } else {
#pragma unroll
      for (int e = 0; e < N; ++e) v.v[e] = r < rows ? src[r * stride + c + e] : from_f<T>(0.f);
    }
    *reinterpret_cast<LsPack<T>*>(dst + r * d + c) = v;
  }
}

// Rows [0, rows) of f [*, ld] (f32, shared) to a head in global memory (row r at dst + r *
// stride), rounded to T.
template <typename T>
__device__ void at_store_head(T* dst, const float* f, int ld, int rows, int d, long long stride) {
  for (int p = threadIdx.x; p < rows * d; p += blockDim.x) {
    const int r = p / d, c = p - r * d;
    dst[r * stride + c] = from_f<T>(f[r * ld + c]);
  }
}

__device__ __forceinline__ size_t at_round(size_t bytes) { return (bytes + 127) & ~(size_t)127; }

// Dropout of probability value `pv` (already rounded to T) at element `idx` of the
// probability tensor, as dropout_body: kept values times `keep`, rounded to T.
template <typename T>
__device__ __forceinline__ T at_drop(T pv, unsigned long long idx, float p, float keep,
                                     unsigned long long seed, unsigned long long offset) {
  if (p <= 0.f) return pv;
  return from_f<T>(ls_philox_uniform(idx, seed, offset) >= p ? to_f(pv) * keep : 0.f);
}

// Carves q [lqp, d] and k, v [lkp, d] (in that order, 128-byte aligned) from shared
// memory at `sm` and loads this block's head into them; returns the next free byte.
template <typename T>
__device__ unsigned char* at_load_qkv(unsigned char* sm, const T* q, const T* k, const T* v,
                                      T*& qs, T*& ks, T*& vs, int lq, int lk, int d,
                                      long long head0, long long stride) {
  const int lqp = (lq + 15) & ~15, lkp = (lk + 15) & ~15;
  qs = reinterpret_cast<T*>(sm);
  sm += at_round(sizeof(T) * lqp * d);
  ks = reinterpret_cast<T*>(sm);
  sm += at_round(sizeof(T) * lkp * d);
  vs = reinterpret_cast<T*>(sm);
  sm += at_round(sizeof(T) * lkp * d);
  at_load_head(qs, q + head0, lq, lqp, d, stride);
  at_load_head(ks, k + head0, lk, lkp, d, stride);
  at_load_head(vs, v + head0, lk, lkp, d, stride);
  return sm;
}

// The gradient through dropout of d(dropped probability) at element `idx` (in f32).
__device__ __forceinline__ float at_drop_grad(float g, unsigned long long idx, float p,
                                              float keep, unsigned long long seed,
                                              unsigned long long offset) {
  if (p <= 0.f) return g;
  return ls_philox_uniform(idx, seed, offset) >= p ? g * keep : 0.f;
}

// Forward: probs = softmax(scale * q k^T) with keys j >= key_lens[b] (and j > i when causal)
// masked, rows with no visible key zero (masked_softmax); ctx = dropout(probs) v.
template <typename T>
__device__ void attn_short_fwd_body(const T* q, const T* k, const T* v, const int* key_lens,
                                    T* ctx, T* probs, int batch, int heads, int lq, int lk,
                                    int d, float scale, int causal, float p_drop, float keep,
                                    unsigned long long seed, unsigned long long offset) {
  extern __shared__ __align__(128) unsigned char at_smem[];
  const int bh = blockIdx.x, bi = bh / heads;
  const int lqp = (lq + 15) & ~15, lkp = (lk + 15) & ~15, wf = max(lkp, d);
  const long long stride = (long long)batch * heads * d, head0 = (long long)bh * d;
  T *qs, *ks, *vs;
  unsigned char* sm = at_load_qkv(at_smem, q, k, v, qs, ks, vs, lq, lk, d, head0, stride);
  float* f = reinterpret_cast<float*>(sm);
  sm += at_round(sizeof(float) * lqp * wf);
  T* ps = reinterpret_cast<T*>(sm);
  __syncthreads();
  at_gemm<T, false, true>(qs, d, ks, d, f, wf, lqp, lkp, d);
  __syncthreads();
  int limit = lk;
  if (key_lens) limit = min(max(key_lens[bi], 0), lk);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = warp; i < lqp; i += AT_WARPS) {
    int lim = i < lq ? limit : 0;
    if (causal) lim = min(lim, i + 1);
    const float* row = f + i * wf;
    float m = LS_NEG_INF;
    for (int j = lane; j < lim; j += 32) m = fmaxf(m, row[j] * scale);
    m = warp_max(m);
    float sum = 0.f;
    for (int j = lane; j < lim; j += 32) sum += expf(row[j] * scale - m);
    sum = warp_sum(sum);
    for (int j = lane; j < lkp; j += 32) {
      const T pv = from_f<T>(j < lim ? expf(row[j] * scale - m) / sum : 0.f);
      T pd = pv;
      if (i < lq && j < lk) {
        const unsigned long long idx = ((unsigned long long)bh * lq + i) * lk + j;
        probs[idx] = pv;
        pd = at_drop(pv, idx, p_drop, keep, seed, offset);
      }
      ps[i * lkp + j] = pd;
    }
  }
  __syncthreads();
  at_gemm<T, false, false>(ps, lkp, vs, d, f, wf, lqp, d, lkp);
  __syncthreads();
  at_store_head(ctx + head0, f, wf, lq, d, stride);
}

// Backward from dctx: dv = dropout(probs)^T dctx; dp = dropout'(dctx v^T); ds = scale *
// probs * (dp - rowsum(probs * dp)) (softmax_backward); dq = ds k; dk = ds^T q.
template <typename T>
__device__ void attn_short_bwd_body(const T* q, const T* k, const T* v, const T* probs,
                                    const T* dctx, T* dq, T* dk, T* dv, int batch, int heads,
                                    int lq, int lk, int d, float scale, float p_drop,
                                    float keep, unsigned long long seed,
                                    unsigned long long offset) {
  extern __shared__ __align__(128) unsigned char at_smem[];
  const int bh = blockIdx.x;
  const int lqp = (lq + 15) & ~15, lkp = (lk + 15) & ~15;
  const int wf = max(lkp, d);  // f holds up to max(lqp, lkp) rows of wf
  const long long stride = (long long)batch * heads * d, head0 = (long long)bh * d;
  T *qs, *ks, *vs;
  unsigned char* sm = at_load_qkv(at_smem, q, k, v, qs, ks, vs, lq, lk, d, head0, stride);
  T* dos = reinterpret_cast<T*>(sm);
  sm += at_round(sizeof(T) * lqp * d);
  T* ps = reinterpret_cast<T*>(sm);
  sm += at_round(sizeof(T) * lqp * lkp);
  T* pds = reinterpret_cast<T*>(sm);
  sm += at_round(sizeof(T) * lqp * lkp);
  T* dss = reinterpret_cast<T*>(sm);
  sm += at_round(sizeof(T) * lqp * lkp);
  float* f = reinterpret_cast<float*>(sm);
  at_load_head(dos, dctx + head0, lq, lqp, d, stride);
  for (int p = threadIdx.x; p < lqp * lkp; p += blockDim.x) {
    const int i = p / lkp, j = p - i * lkp;
    T pv = from_f<T>(0.f), pd = pv;
    if (i < lq && j < lk) {
      const unsigned long long idx = ((unsigned long long)bh * lq + i) * lk + j;
      pv = probs[idx];
      pd = at_drop(pv, idx, p_drop, keep, seed, offset);
    }
    ps[p] = pv;
    pds[p] = pd;
  }
  __syncthreads();
  // dv [lkp, d] = pds^T [lkp, lqp] @ dO [lqp, d].
  at_gemm<T, true, false>(pds, lkp, dos, d, f, wf, lkp, d, lqp);
  __syncthreads();
  at_store_head(dv + head0, f, wf, lk, d, stride);
  __syncthreads();
  // d(dropped probs) [lqp, lkp] = dO [lqp, d] @ v^T [d, lkp].
  at_gemm<T, false, true>(dos, d, vs, d, f, wf, lqp, lkp, d);
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = warp; i < lqp; i += AT_WARPS) {
    const float* row = f + i * wf;
    // The probabilities are zero past lq and lk, so those entries add nothing.
    const unsigned long long idx0 = ((unsigned long long)bh * lq + i) * lk;
    float dot = 0.f;
    for (int j = lane; j < lkp; j += 32) {
      const float dp = at_drop_grad(row[j], idx0 + j, p_drop, keep, seed, offset);
      dot += to_f(ps[i * lkp + j]) * dp;
    }
    dot = warp_sum(dot);
    for (int j = lane; j < lkp; j += 32) {
      const float dp = at_drop_grad(row[j], idx0 + j, p_drop, keep, seed, offset);
      dss[i * lkp + j] = from_f<T>(scale * to_f(ps[i * lkp + j]) * (dp - dot));
    }
  }
  __syncthreads();
  // dq [lqp, d] = ds [lqp, lkp] @ k [lkp, d].
  at_gemm<T, false, false>(dss, lkp, ks, d, f, wf, lqp, d, lkp);
  __syncthreads();
  at_store_head(dq + head0, f, wf, lq, d, stride);
  __syncthreads();
  // dk [lkp, d] = ds^T [lkp, lqp] @ q [lqp, d].
  at_gemm<T, true, false>(dss, lkp, qs, d, f, wf, lkp, d, lqp);
  __syncthreads();
  at_store_head(dk + head0, f, wf, lk, d, stride);
}

#define LS_ATTN_SHORT(T, S)                                                                    \
  extern "C" __global__ void __launch_bounds__(32 * AT_WARPS) attn_short_fwd_##S(             \
      const T* q, const T* k, const T* v, const int* key_lens, T* ctx, T* probs, int batch,   \
      int heads, int lq, int lk, int d, float scale, int causal, float p_drop, float keep,    \
      unsigned long long seed, unsigned long long offset) {                                   \
    attn_short_fwd_body<T>(q, k, v, key_lens, ctx, probs, batch, heads, lq, lk, d, scale,     \
                           causal, p_drop, keep, seed, offset);                               \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(32 * AT_WARPS) attn_short_bwd_##S(             \
      const T* q, const T* k, const T* v, const T* probs, const T* dctx, T* dq, T* dk, T* dv, \
      int batch, int heads, int lq, int lk, int d, float scale, float p_drop, float keep,     \
      unsigned long long seed, unsigned long long offset) {                                   \
    attn_short_bwd_body<T>(q, k, v, probs, dctx, dq, dk, dv, batch, heads, lq, lk, d, scale,  \
                           p_drop, keep, seed, offset);                                       \
  }
LS_ATTN_SHORT(__half, f16)
LS_ATTN_SHORT(__nv_bfloat16, bf16)
