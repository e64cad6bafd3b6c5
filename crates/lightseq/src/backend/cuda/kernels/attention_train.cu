// Fused attention for training on short sequences (both lengths at most 64): a block per
// (sequence, head) stages the head's q, k, v (and in the backward dO) in shared memory and
// runs every product on tensor cores (mma.sync m16n8k16, f32 accumulation), operands read
// with ldmatrix. Each warp owns 16 query rows: its scores, probabilities and score
// gradients stay in registers (an m16n8 accumulator is laid out as the m16k16 operand it
// feeds next), so no score matrix goes through global memory: the backward computes the
// probabilities again from q and k, by the forward's code.
// Activations are position-major ([len, batch, heads * d]: head h of sequence b starts at
// (b * heads + h) * d, rows batch * heads * d apart; q, k and v may be column blocks of
// wider rows, see AtHeads, and their gradients are written in the same layout). Lengths
// are padded to multiples of 16 inside the block (zero rows, masked columns). Shared rows
// are d + 8 (or lkp + 8) elements apart so that the eight 16-byte rows of an ldmatrix land
// in distinct banks. The block has max(lqp, lkp) / 16 warps; the host sizes the shared
// memory in the same order. Kernels come per bound on head_dim (64, 128) and on both
// lengths (32, 64), which size the register arrays.
// f16 and bf16 only (the mma has no f32 inputs), sm_80 and later.
// Two kernel modules compile this file (nvrtc.rs): attention_train instantiates the
// training kernels, attention_flash (LS_FLASH_MODULE defined) the flash forward alone.
#define AT_MAX_WARPS 4

template <typename T>
__device__ __forceinline__ unsigned int at_bits(T x);
template <>
__device__ __forceinline__ unsigned int at_bits(__half x) {
  return __half_as_ushort(x);
}
template <>
__device__ __forceinline__ unsigned int at_bits(__nv_bfloat16 x) {
  return __bfloat16_as_ushort(x);
}

// The T in the low 16 bits of x.
template <typename T>
__device__ __forceinline__ T at_unpack(unsigned int x);
template <>
__device__ __forceinline__ __half at_unpack(unsigned int x) {
  return __ushort_as_half((unsigned short)(x & 0xffffu));
}
template <>
__device__ __forceinline__ __nv_bfloat16 at_unpack(unsigned int x) {
  return __ushort_as_bfloat16((unsigned short)(x & 0xffffu));
}

// Two floats rounded to T in one register, the first in the low half (the mma order).
template <typename T>
__device__ __forceinline__ unsigned int at_pack2(float lo, float hi) {
  return at_bits(from_f<T>(lo)) | (at_bits(from_f<T>(hi)) << 16);
}

// Four 8 x 8 matrices of 16-bit elements; lanes 8i..8i+7 give the row addresses of matrix
// i (32-bit shared addresses, ls_smem_addr). Plain: lane 4g + t gets (row g, columns 2t,
// 2t + 1) of each; transposed: (rows 2t, 2t + 1, column g).
template <bool TRANS>
__device__ __forceinline__ void at_ldm_at(unsigned int (&r)[4], unsigned int addr) {
  if (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
}

// at_ldm_at from a generic pointer into shared memory.
template <bool TRANS>
__device__ __forceinline__ void at_ldm(unsigned int (&r)[4], const void* p) {
  at_ldm_at<TRANS>(r, ls_smem_addr(p));
}

// The mma's A operand (16 x 16 at row r0, column c0) of x [*, ld] held row-major.
template <typename T>
__device__ __forceinline__ void at_a(unsigned int (&a)[4], const T* x, int ld, int r0, int c0) {
  const int lane = threadIdx.x & 31;
  at_ldm<false>(a, x + (r0 + (lane & 15)) * ld + c0 + (lane >> 4) * 8);
}

// The A operand (16 x 16 at row m0, column k0) of x^T, for x [k, m] held row-major.
template <typename T>
__device__ __forceinline__ void at_a_t(unsigned int (&a)[4], const T* x, int ld, int m0,
                                       int k0) {
  const int lane = threadIdx.x & 31;
  at_ldm<true>(a, x + (k0 + (lane & 7) + (lane >> 4) * 8) * ld + m0 + ((lane >> 3) & 1) * 8);
}

// B operands (k 16 from k0, columns n0..n0 + 15: b[0], b[1] for n0, b[2], b[3] for n0 + 8)
// of y^T, for y [n, k] held row-major (a K-style operand).
template <typename T>
__device__ __forceinline__ void at_b_nk(unsigned int (&b)[4], const T* y, int ld, int n0,
                                        int k0) {
  const int lane = threadIdx.x & 31;
  at_ldm<false>(b, y + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
}

// B operands as at_b_nk of y [k, n] held row-major (a V-style operand).
template <typename T>
__device__ __forceinline__ void at_b_kn(unsigned int (&b)[4], const T* y, int ld, int k0,
                                        int n0) {
  const int lane = threadIdx.x & 31;
  at_ldm<true>(b, y + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8);
}

// dst [rows_pad, ld] (shared) = rows [0, rows) of a head (row r at src + r * stride), zero
// rows past `rows`; d is a multiple of 16, ld of 8. Aligned rows are copied asynchronously
// (all of a block's staging overlaps), so ls_cp_wait_all and a barrier must follow.
template <typename T>
__device__ void at_stage(T* dst, int ld, const T* src, int rows, int rows_pad, int d,
                         long long stride) {
  constexpr int N = 16 / sizeof(T);
  const int packs = d / N;
  const bool aligned = ls_aligned16(src) && stride % N == 0;
#if __CUDA_ARCH__ >= 800
  if (aligned && blockDim.x % packs == 0) {
    // Each thread keeps one column pack and steps its addresses row by row: no division
    // and no address conversion a pack.
    const int step = blockDim.x / packs, c = (threadIdx.x % packs) * N;
    int r = threadIdx.x / packs;
    const T* s = src + r * stride + c;
    unsigned int a = ls_smem_addr(dst + r * ld + c);
    for (; r < rows; r += step, s += step * stride, a += step * ld * sizeof(T))
      ls_cp16_at(a, s);
    for (; r < rows_pad; r += step)
      *reinterpret_cast<uint4*>(dst + r * ld + c) = make_uint4(0, 0, 0, 0);
    return;
  }
#endif
  for (int p = threadIdx.x; p < rows_pad * packs; p += blockDim.x) {
    const int r = p / packs, c = (p - r * packs) * N;
    T* out = dst + r * ld + c;
    if (r < rows && aligned) {
      ls_cp16(out, src + r * stride + c);
    } else {
      LsPack<T> v;
#pragma unroll
      for (int e = 0; e < N; ++e) v.v[e] = r < rows ? src[r * stride + c + e] : from_f<T>(0.f);
      *reinterpret_cast<LsPack<T>*>(out) = v;
    }
  }
}

__device__ __forceinline__ size_t at_round(size_t bytes) { return (bytes + 127) & ~(size_t)127; }

// Carves `rows` x ld elements of T (128-byte aligned) from `sm`.
template <typename T>
__device__ __forceinline__ T* at_carve(unsigned char*& sm, int rows, int ld) {
  T* p = reinterpret_cast<T*>(sm);
  sm += at_round(sizeof(T) * rows * ld);
  return p;
}

// Writes an accumulator row pair (columns c, c + 1 of rows g and g + 8 of a 16-row tile)
// to a head in global memory (row r at dst + r * stride) for rows below `rows`.
template <typename T>
__device__ __forceinline__ void at_put(T* dst, long long stride, int rows, int r, int c,
                                       const float (&acc)[4]) {
  if (r < rows)
    *reinterpret_cast<unsigned int*>(dst + r * stride + c) = at_pack2<T>(acc[0], acc[1]);
  if (r + 8 < rows)
    *reinterpret_cast<unsigned int*>(dst + (r + 8) * stride + c) = at_pack2<T>(acc[2], acc[3]);
}

// acc[n] (n-tile n of a 16-row strip) += a (16 x 16) @ y [k0..k0 + 16, 0..d), for y [k, d]
// held row-major.
template <typename T, int DMAX>
__device__ __forceinline__ void at_mma_kn(float (&acc)[DMAX / 8][4], const unsigned int (&a)[4],
                                          const T* y, int ld, int k0, int d) {
#pragma unroll
  for (int n2 = 0; n2 < DMAX / 16; ++n2) {
    if (n2 * 16 >= d) break;
    unsigned int b[4];
    at_b_kn(b, y, ld, k0, n2 * 16);
    ls_mma<T>(acc[2 * n2], a, b[0], b[1]);
    ls_mma<T>(acc[2 * n2 + 1], a, b[2], b[3]);
  }
}

template <int N>
__device__ __forceinline__ void at_zero(float (&acc)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
}

// s = x [r0..r0 + 16, 0..d) @ y^T for y [lkp, d] held row-major: a warp's 16 rows of scores
// (or of their gradient), key tiles of 8 up to LMAX keys.
template <typename T, int DMAX, int LMAX>
__device__ __forceinline__ void at_row_scores(float (&s)[LMAX / 8][4], const T* x, const T* y,
                                              int ld, int r0, int d, int lkp) {
  at_zero(s);
#pragma unroll
  for (int kk = 0; kk < DMAX / 16; ++kk) {
    if (kk * 16 >= d) break;
    unsigned int a[4];
    at_a(a, x, ld, r0, kk * 16);
#pragma unroll
    for (int n2 = 0; n2 < LMAX / 16; ++n2) {
      if (n2 * 16 >= lkp) break;
      unsigned int b[4];
      at_b_nk(b, y, ld, n2 * 16, kk * 16);
      ls_mma<T>(s[2 * n2], a, b[0], b[1]);
      ls_mma<T>(s[2 * n2 + 1], a, b[2], b[3]);
    }
  }
}

// Score-shaped accumulators rounded to T, two to a register: sp[n][h] holds s[n][2h] and
// s[n][2h + 1].
template <typename T, int NT>
__device__ __forceinline__ void at_pack_rows(unsigned int (&sp)[NT][2], const float (&s)[NT][4]) {
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    sp[n][0] = at_pack2<T>(s[n][0], s[n][1]);
    sp[n][1] = at_pack2<T>(s[n][2], s[n][3]);
  }
}

// acc = s [16, lkp] @ y [lkp, d] (y row-major), s packed by at_pack_rows: the score-shaped
// accumulators are the A operand as they lie in registers.
template <typename T, int DMAX, int LMAX>
__device__ __forceinline__ void at_rows_by(float (&acc)[DMAX / 8][4],
                                           const unsigned int (&sp)[LMAX / 8][2], const T* y,
                                           int ld, int lkp, int d) {
  at_zero(acc);
#pragma unroll
  for (int kk = 0; kk < LMAX / 16; ++kk) {
    if (kk * 16 >= lkp) break;
    const unsigned int a[4] = {sp[2 * kk][0], sp[2 * kk][1], sp[2 * kk + 1][0],
                               sp[2 * kk + 1][1]};
    at_mma_kn<T, DMAX>(acc, a, y, ld, kk * 16, d);
  }
}

// The masked softmax (masked_softmax's) of a warp's 16 rows of scores as at_row_scores
// leaves them, in place: s[n][2h + e] becomes the probability, rounded to T, of row
// r0 + g + 8h at key 8n + 2t + e; zero at masked keys (j >= key_lens[b], or j > i when
// causal), keys past lk and rows past lq. The forward and the backward both call this, so
// the backward sees the forward's probabilities without storing them.
template <typename T, int LMAX>
__device__ __forceinline__ void at_softmax(float (&s)[LMAX / 8][4], int r0, int lq, int limit,
                                           int causal, float scale) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int i = r0 + g + 8 * h;
    int lim = i < lq ? limit : 0;
    if (causal) lim = min(lim, i + 1);
    float m = LS_NEG_INF;
#pragma unroll
    for (int n = 0; n < LMAX / 8; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        if (8 * n + 2 * t + e < lim) m = fmaxf(m, s[n][2 * h + e] * scale);
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < LMAX / 8; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool on = 8 * n + 2 * t + e < lim;
        const float x = on ? expf(s[n][2 * h + e] * scale - m) : 0.f;
        s[n][2 * h + e] = x;
        sum += x;
      }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
    for (int n = 0; n < LMAX / 8; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) s[n][2 * h + e] = to_f(from_f<T>(s[n][2 * h + e] * inv));
  }
}

// The key limit of sequence b: key_lens[b] clamped to [0, lk], or lk without key lengths.
__device__ __forceinline__ int at_key_limit(const int* key_lens, int b, int lk) {
  return key_lens ? min(max(key_lens[b], 0), lk) : lk;
}

// A warp's 16-row strip of accumulators to a head in global memory (at_put per tile).
template <typename T, int DMAX>
__device__ __forceinline__ void at_put_rows(T* dst, long long stride, int rows, int r0, int d,
                                            const float (&acc)[DMAX / 8][4]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int n = 0; n < DMAX / 8; ++n) {
    if (n * 8 >= d) break;
    at_put(dst, stride, rows, r0 + (lane >> 2), 8 * n + 2 * (lane & 3), acc[n]);
  }
}

// at_put_rows through `tile`, the warp's own 16 rows of shared memory (ld elements apart,
// free for it to overwrite): the fragments go there, then whole rows leave as 16-byte
// stores (a quarter of the store instructions, whole sectors). d is a multiple of 16.
template <typename T, int DMAX>
__device__ __forceinline__ void at_put_rows_staged(T* dst, long long stride, int rows, int r0,
                                                   int d, const float (&acc)[DMAX / 8][4],
                                                   T* tile, int ld) {
  constexpr int N = 16 / sizeof(T);
  const int lane = threadIdx.x & 31;
  __syncwarp();  // every lane is done reading the tile
  at_put_rows<T, DMAX>(tile, ld, 16, 0, d, acc);
  __syncwarp();
  // Lane takes packs lane, lane + 32, ... of the tile's 16 rows: (row, pack) stepped
  // without a division a pack.
  const int packs = d / N, dr = 32 / packs, dc = 32 - dr * packs;
  for (int r = lane / packs, c = lane - r * packs; r < 16;) {
    if (r0 + r < rows)
      *reinterpret_cast<LsPack<T>*>(dst + (r0 + r) * stride + c * N) =
          *reinterpret_cast<const LsPack<T>*>(tile + r * ld + c * N);
    r += dr;
    c += dc;
    if (c >= packs) {
      c -= packs;
      ++r;
    }
  }
}

// at_put_rows for a head DMAX wide (a multiple of 64) through `tile`, 16 x DMAX elements of
// shared memory that only this warp touches: the 16-byte chunk c of tile row r sits at
// chunk c ^ (r & 7), so the fragments' 4-byte writes fall in distinct banks; then whole
// rows leave as 16-byte stores (whole sectors, a quarter of the store instructions). dst
// and stride are 16-byte aligned.
template <typename T, int DMAX>
__device__ __forceinline__ void at_put_strip_swizzled(T* dst, long long stride, int rows,
                                                      int r0, const float (&acc)[DMAX / 8][4],
                                                      T* tile) {
  constexpr int N = 16 / sizeof(T), CHUNKS = DMAX / 8, ROW = 2 * DMAX;
  static_assert(N == 8 && DMAX % 64 == 0, "8-column fragment tiles, 8 chunks a swizzle");
  // The lane read by a volatile asm: the addresses below depend on it, so ptxas computes
  // them here rather than hoisting them out of the caller's loop (where they are held
  // throughout, and spilled).
  int lane;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
  const int g = lane >> 2, t = lane & 3;
  // 32-bit shared addresses (through a generic pointer, ptxas holds 64 bits a store).
  const unsigned int base = ls_smem_addr(tile), at = base + g * ROW + 4 * t;
  __syncwarp();  // every lane is done reading the tile
#pragma unroll
  for (int n = 0; n < CHUNKS; ++n) {
    // Rows g and g + 8 share the swizzle (g < 8).
    const unsigned int a = at + ((n ^ g) << 4);
    const unsigned int lo = at_pack2<T>(acc[n][0], acc[n][1]);
    const unsigned int hi = at_pack2<T>(acc[n][2], acc[n][3]);
    asm volatile("st.shared.b32 [%0], %1;" ::"r"(a), "r"(lo) : "memory");
    asm volatile("st.shared.b32 [%0], %1;" ::"r"(a + 8 * ROW), "r"(hi) : "memory");
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < 16 * CHUNKS / 32; ++i) {
    const int p = lane + 32 * i, r = p / CHUNKS, c = p % CHUNKS;
    uint4 v;
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(base + r * ROW + ((c ^ (r & 7)) << 4))
                 : "memory");
    if (r0 + r < rows) *reinterpret_cast<uint4*>(dst + (r0 + r) * stride + c * N) = v;
  }
}

// Column sums of a warp's 16-row strip of accumulators (rows from r0, those below
// `rows`) to dst[0..d): the strip's share of a bias gradient (f32, unrounded).
template <int DMAX>
__device__ __forceinline__ void at_put_colsums(float* dst, int rows, int r0, int d,
                                               const float (&acc)[DMAX / 8][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const bool lo = r0 + g < rows, hi = r0 + g + 8 < rows;
#pragma unroll
  for (int n = 0; n < DMAX / 8; ++n) {
    if (n * 8 >= d) break;
    float s0 = (lo ? acc[n][0] : 0.f) + (hi ? acc[n][2] : 0.f);
    float s1 = (lo ? acc[n][1] : 0.f) + (hi ? acc[n][3] : 0.f);
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
      s0 += __shfl_xor_sync(0xffffffffu, s0, o);
      s1 += __shfl_xor_sync(0xffffffffu, s1, o);
    }
    if (g == 0) *reinterpret_cast<float2*>(dst + 8 * n + 2 * t) = make_float2(s0, s1);
  }
}

// at_put_colsums for a warp with no rows of that gradient.
__device__ __forceinline__ void at_zero_colsums(float* dst, int d) {
  for (int c = threadIdx.x & 31; c < d; c += 32) dst[c] = 0.f;
}

// Bytes of keep flags a warp stages: 16 rows of up to 64 keys, plus the up to three
// elements before the warp's first that share its first Philox group.
#define AT_FLAG_BYTES (16 * 64 + 16)

// Dropout's keep decisions (as dropout_body: element e of the probability tensor is kept
// iff its Philox uniform is >= p) for the rows r0..r0 + 15 of head bh that are below lq, as
// bit masks: km[h] bit j = key j of row r0 + g + 8h kept (0 for rows past lq). The warp's
// elements are contiguous, so its lanes take their Philox groups (four elements each) in
// turn, one call per group, and stage the flags in `flags` (AT_FLAG_BYTES, this warp's).
__device__ void at_keep_bits(unsigned char* flags, int bh, int lq, int lk, int r0, float p,
                             unsigned long long seed, unsigned long long offset,
                             unsigned long long (&km)[2]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int rows = min(16, lq - r0);
  const unsigned long long e0 = ((unsigned long long)bh * lq + r0) * lk, g0 = e0 / 4;
  const int groups = (int)((e0 + (unsigned long long)rows * lk - 1) / 4 - g0 + 1);
  for (int x = lane; x < groups; x += 32) {
    const uint4 o = ls_philox_group(g0 + x, seed, offset);
    const float u[4] = {ls_philox_lane(o, 0), ls_philox_lane(o, 1), ls_philox_lane(o, 2),
                        ls_philox_lane(o, 3)};
    *reinterpret_cast<unsigned int*>(flags + 4 * x) =
        (u[0] >= p) | (u[1] >= p) << 8 | (u[2] >= p) << 16 | (u[3] >= p) << 24;
  }
  __syncwarp();
  // Lane t gathers keys 16t..16t + 15 of its two rows; the row's four lanes combine.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int i = r0 + g + 8 * h;
    unsigned long long m = 0;
    if (i < lq) {
      const unsigned char* f = flags + (e0 - 4 * g0) + (i - r0) * lk;
      for (int j = 16 * t; j < min(lk, 16 * t + 16); ++j)
        m |= (unsigned long long)(f[j] != 0) << j;
    }
    m |= __shfl_xor_sync(0xffffffffu, m, 1);
    m |= __shfl_xor_sync(0xffffffffu, m, 2);
    km[h] = m;
  }
}

// Where head bh = (b, h) of a position-major activation whose (position, sequence) rows are
// `w` elements wide starts, and its row stride: w = heads * d for a tensor of its own, or
// wider when q, k and v are column blocks of one projection's output (the pointer then
// points at the block's first column).
struct AtHeads {
  long long head0, stride;
  __device__ AtHeads(int bh, int heads, int batch, int d, int w) {
    const int b = bh / heads;
    head0 = (long long)b * w + (long long)(bh - b * heads) * d;
    stride = (long long)batch * w;
  }
};

// Shared q [lqp, d + 8], k and v [lkp, d + 8], carved from `sm` in that order.
template <typename T>
struct AtQkv {
  T *q, *k, *v;
  __device__ AtQkv(unsigned char*& sm, int lq, int lk, int d) {
    const int lqp = (lq + 15) & ~15, lkp = (lk + 15) & ~15;
    q = at_carve<T>(sm, lqp, d + 8);
    k = at_carve<T>(sm, lkp, d + 8);
    v = at_carve<T>(sm, lkp, d + 8);
  }

  // Stages the pair's heads of q, k and v (asynchronously: ls_cp_wait_all and a barrier follow).
  __device__ void stage(const T* qg, const T* kg, const T* vg, const AtHeads& qh,
                        const AtHeads& kvh, int lq, int lk, int d) {
    const int lqp = (lq + 15) & ~15, lkp = (lk + 15) & ~15, ld = d + 8;
    at_stage(q, ld, qg + qh.head0, lq, lqp, d, qh.stride);
    at_stage(k, ld, kg + kvh.head0, lk, lkp, d, kvh.stride);
    at_stage(v, ld, vg + kvh.head0, lk, lkp, d, kvh.stride);
  }
};

// Forward: probs = softmax(scale * q k^T) with keys j >= key_lens[b] (and j > i when causal)
// masked, rows with no visible key zero (masked_softmax); ctx = dropout(probs) v. The
// probabilities are not stored: the backward computes them again (at_softmax).
template <typename T, int DMAX, int LMAX>
__device__ void attn_short_fwd_body(const T* q, const T* k, const T* v, const int* key_lens,
                                    T* ctx, int batch, int heads, int lq, int lk, int d,
                                    int q_w, int kv_w, float scale, int causal, float p_drop,
                                    float keep, unsigned long long seed,
                                    unsigned long long offset) {
  extern __shared__ __align__(128) unsigned char at_smem[];
  const int bh = blockIdx.x, bi = bh / heads;
  const int lqp = (lq + 15) & ~15, lkp = (lk + 15) & ~15, ld = d + 8;
  const long long stride = (long long)batch * heads * d, head0 = (long long)bh * d;
  const AtHeads qh(bh, heads, batch, d, q_w), kvh(bh, heads, batch, d, kv_w);
  unsigned char* sm = at_smem;
  AtQkv<T> st(sm, lq, lk, d);
  T *qs = st.q, *ks = st.k, *vs = st.v;
  unsigned char* flags = sm;
  st.stage(q, k, v, qh, kvh, lq, lk, d);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3;
  const int r0 = warp * 16;
  unsigned long long km[2] = {~0ull, ~0ull};
  // Overlaps the staging copies.
  if (r0 < lqp && p_drop > 0.f)
    at_keep_bits(flags + warp * AT_FLAG_BYTES, bh, lq, lk, r0, p_drop, seed, offset, km);
  const int limit = at_key_limit(key_lens, bi, lk);
  ls_cp_wait_all();
  __syncthreads();
  if (r0 >= lqp) return;
  // s[n] holds scores of rows r0 + g, r0 + g + 8 at keys 8n + 2t, 8n + 2t + 1.
  float s[LMAX / 8][4];
  at_row_scores<T, DMAX, LMAX>(s, qs, ks, ld, r0, d, lkp);
  at_softmax<T, LMAX>(s, r0, lq, limit, causal, scale);
  if (p_drop > 0.f) {
    // Dropout of the stored (rounded) probabilities; keys past lk and rows past lq have no
    // keep bits.
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int n = 0; n < LMAX / 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = 8 * n + 2 * t + e;
          float& x = s[n][2 * h + e];
          x = km[h] >> j & 1 ? to_f(from_f<T>(x * keep)) : 0.f;
        }
  }
  // ctx rows = dropout(probs) [16, lkp] @ v [lkp, d]; the probabilities are the A operand.
  unsigned int sp[LMAX / 8][2];
  at_pack_rows<T>(sp, s);
  float o[DMAX / 8][4];
  at_rows_by<T, DMAX, LMAX>(o, sp, vs, ld, lkp, d);
  // The warp's q rows are read by it alone, and no longer.
  at_put_rows_staged<T, DMAX>(ctx + head0, stride, lq, r0, d, o, qs + r0 * ld, ld);
}

// The backward's staging tile of the calling warp (16 x DMAX elements): in k's and v's
// space (from `kv`) past the dropped probabilities and ds, free once every warp is past
// the first phase; null unless the head is DMAX wide (a multiple of 64) and every warp's
// tile fits there.
template <typename T, int DMAX>
__device__ __forceinline__ T* at_bwd_tile(unsigned char* kv, int lqp, int lkp, int d) {
  if (DMAX % 64 != 0 || d != DMAX) return nullptr;
  const size_t used = 2 * at_round(sizeof(T) * lqp * (lkp + 8));
  const size_t room = 2 * at_round(sizeof(T) * lkp * (d + 8));
  if (used + (blockDim.x >> 5) * 16 * DMAX * sizeof(T) > room) return nullptr;
  return reinterpret_cast<T*>(kv + used) + (threadIdx.x >> 5) * 16 * DMAX;
}

// Backward from dctx: dv = dropout(probs)^T dctx; dp = dropout'(dctx v^T); ds = scale *
// probs * (dp - rowsum(probs * dp)) (softmax_backward); dq = ds k; dk = ds^T q. The
// probabilities are computed again from q and k as the forward computed them. Warps take
// 16 query rows for dq (ds in registers), then 16 key rows for dk and dv, reading the
// dropped probabilities and ds that the first phase leaves in shared memory: over k and v,
// which the second phase does not read, where they fit. Where the rest of k's and v's
// space holds a 16-row tile for every warp (at_bwd_tile), dk and dv leave through it.
// With `bsum`, each warp also writes the column sums of its rows of dq, dk and dv (the
// projections' bias gradients, before the sum over warps and sequences) to row
// b * warps + warp of bsum [batch * warps, 3 hd]: columns h d.. of dq's block, then of
// dk's and dv's (zeros for a warp without such rows).
template <typename T, int DMAX, int LMAX>
__device__ void attn_short_bwd_body(const T* q, const T* k, const T* v, const int* key_lens,
                                    const T* dctx, T* dq, T* dk, T* dv, float* bsum,
                                    int batch, int heads, int lq, int lk, int d, int q_w,
                                    int kv_w, float scale, int causal, float p_drop,
                                    float keep, unsigned long long seed,
                                    unsigned long long offset) {
  extern __shared__ __align__(128) unsigned char at_smem[];
  const int bh = blockIdx.x, bi = bh / heads;
  const int lqp = (lq + 15) & ~15, lkp = (lk + 15) & ~15, ld = d + 8, lds = lkp + 8;
  const long long stride = (long long)batch * heads * d, head0 = (long long)bh * d;
  const AtHeads qh(bh, heads, batch, d, q_w), kvh(bh, heads, batch, d, kv_w);
  unsigned char* sm = at_smem;
  AtQkv<T> st(sm, lq, lk, d);
  T *qs = st.q, *ks = st.k, *vs = st.v;
  T* dos = at_carve<T>(sm, lqp, ld);
  // The dropped probabilities and ds [lqp, lds] each: over k and v when both fit there.
  const bool over_kv = at_round(sizeof(T) * lqp * lds) <= at_round(sizeof(T) * lkp * ld);
  unsigned char* const kv0 = reinterpret_cast<unsigned char*>(ks);
  unsigned char* pd_at = kv0;  // advanced by the carving below
  T* pds = at_carve<T>(over_kv ? pd_at : sm, lqp, lds);
  T* dss = at_carve<T>(over_kv ? pd_at : sm, lqp, lds);
  unsigned char* flags = sm;
  st.stage(q, k, v, qh, kvh, lq, lk, d);
  at_stage(dos, ld, dctx + head0, lq, lqp, d, stride);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int r0 = warp * 16;
  const long long hd = (long long)heads * d;
  float* bs = bsum == nullptr ? nullptr
                              : bsum + ((long long)bi * (blockDim.x >> 5) + warp) * 3 * hd +
                                    (long long)(bh - bi * heads) * d;
  // The forward's dropout decisions, drawn again (Philox is counter-based).
  unsigned long long km[2] = {~0ull, ~0ull};
  if (r0 < lqp && p_drop > 0.f)
    at_keep_bits(flags + warp * AT_FLAG_BYTES, bh, lq, lk, r0, p_drop, seed, offset, km);
  const int limit = at_key_limit(key_lens, bi, lk);
  ls_cp_wait_all();
  __syncthreads();
  // The probabilities and ds at rows r0 + g (+ 8h), keys 8n + 2t (+ 1), packed two to a
  // register (at_pack_rows) for the second phase.
  unsigned int pp[LMAX / 8][2], dsp[LMAX / 8][2];
  if (r0 < lqp) {
    // p[n]: the probabilities; dp[n]: dO v^T, then ds.
    float p[LMAX / 8][4], dp[LMAX / 8][4];
    at_row_scores<T, DMAX, LMAX>(p, qs, ks, ld, r0, d, lkp);
    at_softmax<T, LMAX>(p, r0, lq, limit, causal, scale);
    at_row_scores<T, DMAX, LMAX>(dp, dos, vs, ld, r0, d, lkp);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float dot = 0.f;
#pragma unroll
      for (int n = 0; n < LMAX / 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& gv = dp[n][2 * h + e];
          if (p_drop > 0.f) gv = km[h] >> (8 * n + 2 * t + e) & 1 ? gv * keep : 0.f;
          dot += p[n][2 * h + e] * gv;
        }
      dot += __shfl_xor_sync(0xffffffffu, dot, 1);
      dot += __shfl_xor_sync(0xffffffffu, dot, 2);
      // ds rounded to T as the unfused path stores it.
#pragma unroll
      for (int n = 0; n < LMAX / 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& gv = dp[n][2 * h + e];
          gv = to_f(from_f<T>(scale * p[n][2 * h + e] * (gv - dot)));
        }
    }
    at_pack_rows<T>(pp, p);
    at_pack_rows<T>(dsp, dp);
    // dq rows = ds [16, lkp] @ k [lkp, d].
    float acc[DMAX / 8][4];
    at_rows_by<T, DMAX, LMAX>(acc, dsp, ks, ld, lkp, d);
    // dq leaves as 4-byte stores: staging it would wait for the barrier below (k and v
    // are still read) and hold its strip in registers until then, which spilled.
    at_put_rows<T, DMAX>(dq + qh.head0, qh.stride, lq, r0, d, acc);
    if (bs != nullptr) at_put_colsums<DMAX>(bs, lq, r0, d, acc);
  } else if (bs != nullptr) {
    at_zero_colsums(bs, d);
  }
  if (over_kv) __syncthreads();  // every warp is done with k and v
  if (r0 < lqp) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = r0 + g + 8 * h;
#pragma unroll
      for (int n = 0; n < LMAX / 8; ++n) {
        const int j = 8 * n + 2 * t;
        if (j >= lkp) break;
        unsigned int pd = pp[n][h];
        if (p_drop > 0.f) {
          const float p0 = to_f(at_unpack<T>(pd)), p1 = to_f(at_unpack<T>(pd >> 16));
          pd = at_pack2<T>(km[h] >> j & 1 ? p0 * keep : 0.f,
                           km[h] >> (j + 1) & 1 ? p1 * keep : 0.f);
        }
        *reinterpret_cast<unsigned int*>(pds + i * lds + j) = pd;
        *reinterpret_cast<unsigned int*>(dss + i * lds + j) = dsp[n][h];
      }
    }
  }
  __syncthreads();
  if (r0 >= lkp) {
    if (bs != nullptr) {
      at_zero_colsums(bs + hd, d);
      at_zero_colsums(bs + 2 * hd, d);
    }
    return;
  }
  // dv rows = dropout(probs)^T [16, lqp] @ dO [lqp, d]; dk rows = ds^T [16, lqp] @ q.
  // They leave through the warp's staging tile where there is one (16-byte stores).
  T* const tile = over_kv ? at_bwd_tile<T, DMAX>(kv0, lqp, lkp, d) : nullptr;
  const bool stage_kv = tile != nullptr && ls_aligned16(dk + kvh.head0) &&
                        ls_aligned16(dv + kvh.head0) && kvh.stride % 8 == 0;
#pragma unroll 1
  for (int which = 0; which < 2; ++which) {
    const T* x = which == 0 ? pds : dss;
    const T* y = which == 0 ? dos : qs;
    float acc[DMAX / 8][4];
    at_zero(acc);
#pragma unroll
    for (int kk = 0; kk < LMAX / 16; ++kk) {
      if (kk * 16 >= lqp) break;
      unsigned int a[4];
      at_a_t(a, x, lds, r0, kk * 16);
      at_mma_kn<T, DMAX>(acc, a, y, ld, kk * 16, d);
    }
    T* dst = (which == 0 ? dv : dk) + kvh.head0;
    if (stage_kv) {
      at_put_strip_swizzled<T, DMAX>(dst, kvh.stride, lk, r0, acc, tile);
    } else {
      at_put_rows<T, DMAX>(dst, kvh.stride, lk, r0, d, acc);
    }
    if (bs != nullptr) at_put_colsums<DMAX>(bs + (which == 0 ? 2 : 1) * hd, lk, r0, d, acc);
  }
}

// Kernels per storage type, bound on head_dim and bound on both lengths (registers scale
// with both). A block has at most 2 LMAX threads (a warp per 16 rows); BWD_BLOCKS is the
// backward's blocks an SM to leave registers for: at d = 64 and lengths 32, Hopper's
// shared memory holds 12 without dropout (11 with its flags), and without the cap ptxas
// takes registers for fewer.
#define LS_ATTN_SHORT(T, S, DMAX, LMAX, BWD_BLOCKS)                                           \
  extern "C" __global__ void __launch_bounds__(32 * AT_MAX_WARPS)                             \
      attn_short_fwd_d##DMAX##_l##LMAX##_##S(                                                 \
          const T* q, const T* k, const T* v, const int* key_lens, T* ctx, int batch,         \
          int heads, int lq, int lk, int d, int q_w, int kv_w, float scale, int causal,       \
          float p_drop, float keep, unsigned long long seed, unsigned long long offset) {     \
    LS_PDL_WAIT();                                                                            \
    attn_short_fwd_body<T, DMAX, LMAX>(q, k, v, key_lens, ctx, batch, heads, lq, lk, d, q_w,  \
                                       kv_w, scale, causal, p_drop, keep, seed, offset);      \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(2 * LMAX, BWD_BLOCKS)                          \
      attn_short_bwd_d##DMAX##_l##LMAX##_##S(                                                 \
          const T* q, const T* k, const T* v, const int* key_lens, const T* dctx, T* dq,      \
          T* dk, T* dv, float* bsum, int batch, int heads, int lq, int lk, int d, int q_w,    \
          int kv_w, float scale, int causal, float p_drop, float keep,                        \
          unsigned long long seed, unsigned long long offset) {                               \
    LS_PDL_WAIT();                                                                            \
    attn_short_bwd_body<T, DMAX, LMAX>(q, k, v, key_lens, dctx, dq, dk, dv, bsum, batch,      \
                                       heads, lq, lk, d, q_w, kv_w, scale, causal, p_drop,    \
                                       keep, seed, offset);                                   \
  }
#ifndef LS_FLASH_MODULE
LS_ATTN_SHORT(__half, f16, 64, 32, 12)
LS_ATTN_SHORT(__half, f16, 64, 64, 4)
LS_ATTN_SHORT(__half, f16, 128, 32, 6)
LS_ATTN_SHORT(__half, f16, 128, 64, 3)
LS_ATTN_SHORT(__nv_bfloat16, bf16, 64, 32, 12)
LS_ATTN_SHORT(__nv_bfloat16, bf16, 64, 64, 4)
LS_ATTN_SHORT(__nv_bfloat16, bf16, 128, 32, 6)
LS_ATTN_SHORT(__nv_bfloat16, bf16, 128, 64, 3)
#endif

// Flash attention forward for inference (encoders, prefill), any lengths: the layout, masks
// and grouped heads of attention.cu (without its bias table). Query i of sequence b sits at
// position q_offset + i and sees keys j with key_start[b] <= j < key_end[b], j <= q_offset +
// i when causal and j > q_offset + i - window when window > 0; query head h reads key/value
// head h / group. Head h of sequence b, row r, starts at x + b * x_bs + r * x_rs + h * d;
// out is [batch, len_q, heads * d]; scale > 0. A block takes 16 * warps queries of one
// (sequence, head) and walks the keys they see in tiles of BK staged in shared memory, in
// one buffer or (kv_stages = 2) two, the next tile's copies in flight over the current one.
// Each warp keeps its 16 rows' scores, running max and sum and output in registers (online
// softmax), so no score matrix goes through memory. The probabilities (unnormalized,
// relative to the running max) are rounded to T before they multiply the values, the sum
// is taken over the rounded ones (by the same mma), and the output is divided by it at the
// end; rows that see no key are zero. BK is 64 (attn_flash_d*), or 32 (attn_flash_s_d*, for
// keys of at most 32): at short lengths the kernel is one warp's serial walk, whose
// softmax and packing over a 64-key tile were half masked-off work.
#define AF_BK 64
#define AF_FAR (1 << 30)

// 2^x by the special-function unit alone (ex2.approx.ftz); 2^-inf is 0. exp2f wraps the
// same instruction in a fix-up for results below 2^-126, several instructions an element,
// for probabilities that f16 rounds to zero anyway (bf16 would keep them as subnormals,
// 2^-126 of the row's largest at most).
__device__ __forceinline__ float af_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Two ones of T in a register: as the mma's B operand, the product is A's row sums.
template <typename T>
__device__ __forceinline__ unsigned int af_ones();
template <>
__device__ __forceinline__ unsigned int af_ones<__half>() {
  return 0x3c003c00u;
}
template <>
__device__ __forceinline__ unsigned int af_ones<__nv_bfloat16>() {
  return 0x3f803f80u;
}

// One key tile of a warp's 16 rows (attn_flash_body): the scores, the online softmax's
// update of m (the running max of the unscaled scores), the sums `ls` and o, and o += p v.
// qa, ka and va are this lane's ldmatrix addresses in q (its rows), the key tile and the
// value tile (at_a, at_b_nk and at_b_kn's lane offsets), ld2 a shared row's bytes. Key
// column c of the tile is visible to the thread's row x when c_lo[x] <= c < c_hi[x]; FULL:
// every column of a whole tile is visible to every row of the warp, and nothing is masked.
// sl2 = scale * log2(e) > 0. The row sums of the rounded probabilities come from the same
// mma as o, against a column of ones (ls[0], ls[1]: row g; ls[2], ls[3]: row g + 8).
template <typename T, int DMAX, int BK, bool FULL>
__device__ __forceinline__ void af_tile(float (&o)[DMAX / 8][4], float (&ls)[4], float (&m)[2],
                                        unsigned int qa, unsigned int ka, unsigned int va,
                                        int ld2, int d, int nk, const int (&c_lo)[2],
                                        const int (&c_hi)[2], float sl2) {
  const int t = threadIdx.x & 3;
  const int nkp = FULL ? BK : (nk + 15) & ~15;
  float s[BK / 8][4];
  at_zero(s);
#pragma unroll
  for (int kk = 0; kk < DMAX / 16; ++kk) {
    if (kk * 16 >= d) break;
    unsigned int a[4];
    at_ldm_at<false>(a, qa + kk * 32);
#pragma unroll
    for (int n2 = 0; n2 < BK / 16; ++n2) {
      if (n2 * 16 >= nkp) break;
      unsigned int b[4];
      at_ldm_at<false>(b, ka + n2 * 16 * ld2 + kk * 32);
      ls_mma<T>(s[2 * n2], a, b[0], b[1]);
      ls_mma<T>(s[2 * n2 + 1], a, b[2], b[3]);
    }
  }
  // The probabilities (relative to the running max), rounded to T and packed as the A
  // operand of o += p v: sp[n][x] holds row x's keys 8n + 2t and 8n + 2t + 1.
  unsigned int sp[BK / 8][2];
  float corr[2];
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    // The row's max by a tree (depth log2(BK / 4)), not a chain of BK / 4 dependent steps.
    float tm[BK / 8];
#pragma unroll
    for (int n = 0; n < BK / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& y = s[n][2 * x + e];
        if (!FULL) {
          const int c = 8 * n + 2 * t + e;
          if (c < c_lo[x] || c >= c_hi[x]) y = LS_NEG_INF;
        }
      }
      tm[n] = fmaxf(s[n][2 * x], s[n][2 * x + 1]);
    }
#pragma unroll
    for (int w = BK / 16; w >= 1; w /= 2)
#pragma unroll
      for (int n = 0; n < w; ++n) tm[n] = fmaxf(tm[n], tm[n + w]);
    float mx = fmaxf(m[x], tm[0]);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    // Nothing seen yet (mx still -inf): nothing to rescale, every p is 2^-inf = 0.
    const bool any = mx != LS_NEG_INF;
    corr[x] = any ? af_exp2((m[x] - mx) * sl2) : 1.f;
    const float nb = any ? -mx * sl2 : 0.f;
    m[x] = mx;
#pragma unroll
    for (int n = 0; n < BK / 8; ++n)
      sp[n][x] = at_pack2<T>(af_exp2(fmaf(s[n][2 * x], sl2, nb)),
                             af_exp2(fmaf(s[n][2 * x + 1], sl2, nb)));
  }
  // Past the first tiles the running max seldom moves: most tiles skip the rescale.
  if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
    for (int n = 0; n < DMAX / 8; ++n) {
      o[n][0] *= corr[0];
      o[n][1] *= corr[0];
      o[n][2] *= corr[1];
      o[n][3] *= corr[1];
    }
    ls[0] *= corr[0];
    ls[1] *= corr[0];
    ls[2] *= corr[1];
    ls[3] *= corr[1];
  }
  // o += p [16, nkp] @ v [nkp, d], and the row sums; the probabilities are the A operand
  // as they lie.
  const unsigned int one = af_ones<T>();
#pragma unroll
  for (int kk = 0; kk < BK / 16; ++kk) {
    if (kk * 16 >= nkp) break;
    const unsigned int a[4] = {sp[2 * kk][0], sp[2 * kk][1], sp[2 * kk + 1][0],
                               sp[2 * kk + 1][1]};
    ls_mma<T>(ls, a, one, one);
#pragma unroll
    for (int n2 = 0; n2 < DMAX / 16; ++n2) {
      if (n2 * 16 >= d) break;
      unsigned int b[4];
      at_ldm_at<true>(b, va + kk * 16 * ld2 + n2 * 32);
      ls_mma<T>(o[2 * n2], a, b[0], b[1]);
      ls_mma<T>(o[2 * n2 + 1], a, b[2], b[3]);
    }
  }
}

template <typename T, int DMAX, int BK>
__device__ void attn_flash_body(const T* q, const T* k, const T* v, T* out,
                                const int* key_start, const int* key_end, int len_q, int heads,
                                int group, int d, long long q_bs, int q_rs, long long k_bs,
                                int k_rs, long long v_bs, int v_rs, int causal, int q_offset,
                                int window, float scale, int kv_stages) {
  extern __shared__ __align__(128) unsigned char at_smem[];
  const int b = blockIdx.z, h = blockIdx.y, kh = h / group;
  const int rows = (blockDim.x >> 5) * 16, q0 = blockIdx.x * rows;
  const int nq = min(rows, len_q - q0), ld = d + 8;
  unsigned char* sm = at_smem;
  T* qs = at_carve<T>(sm, rows, ld);
  T* const k0s = at_carve<T>(sm, BK, ld);
  T* const v0s = at_carve<T>(sm, BK, ld);
  const bool two = kv_stages == 2;
  T* const k1s = two ? at_carve<T>(sm, BK, ld) : k0s;
  T* const v1s = two ? at_carve<T>(sm, BK, ld) : v0s;
  at_stage(qs, ld, q + b * q_bs + (long long)q0 * q_rs + h * d, nq, rows, d, (long long)q_rs);
  // The keys any of the block's queries sees.
  int j_begin = key_start[b], j_end = key_end[b];
  if (causal) j_end = min(j_end, q_offset + q0 + nq);
  if (window > 0) j_begin = max(j_begin, q_offset + q0 + 1 - window);
  const T* kg = k + b * k_bs + kh * d;
  const T* vg = v + b * v_bs + kh * d;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
  const int r0 = warp * 16;
  // Keys [lo, hi) of this thread's rows r0 + g and r0 + g + 8 (none for rows past len_q).
  int lo[2], hi[2];
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    const int i = q0 + r0 + g + 8 * x, pos = q_offset + i;
    lo[x] = window > 0 ? pos + 1 - window : -AF_FAR;
    hi[x] = i < len_q ? (causal ? pos + 1 : AF_FAR) : -AF_FAR;
  }
  const float sl2 = scale * LS_LOG2E;  // scores in base 2
  float o[DMAX / 8][4];
  at_zero(o);
  float m[2] = {LS_NEG_INF, LS_NEG_INF}, ls[4] = {0.f, 0.f, 0.f, 0.f};
  // This lane's ldmatrix addresses: q's A operand (at_a), the key tiles' B operand
  // (at_b_nk) and the value tiles' (at_b_kn).
  const int ld2 = ld * (int)sizeof(T);
  const unsigned int qa = ls_smem_addr(qs) + (r0 + (lane & 15)) * ld2 + (lane >> 4) * 16;
  const unsigned int k_lane = ((lane & 7) + (lane >> 4) * 8) * ld2 + ((lane >> 3) & 1) * 16;
  const unsigned int v_lane = ((lane & 7) + ((lane >> 3) & 1) * 8) * ld2 + (lane >> 4) * 16;
  const unsigned int ka0 = ls_smem_addr(k0s) + k_lane, ka1 = ls_smem_addr(k1s) + k_lane;
  const unsigned int va0 = ls_smem_addr(v0s) + v_lane, va1 = ls_smem_addr(v1s) + v_lane;
  // Key and value rows [j0, j0 + BK) into (ks, vs), asynchronously where aligned. Aligned
  // rows take at_stage's plan with its per-thread constants worked out once here: thread
  // copies column pack sc of rows sr, sr + sstep, ... of both tiles (at_stage would divide
  // by the packs a row for every tile).
  constexpr int N = 16 / sizeof(T);
  const int packs = d / N;
  const bool fast = blockDim.x % packs == 0 && ls_aligned16(kg) && ls_aligned16(vg) &&
                    k_rs % N == 0 && v_rs % N == 0;
  const int sstep = blockDim.x / packs, sc = (threadIdx.x % packs) * N, sr = threadIdx.x / packs;
  auto stage_tile = [&](int j0, T* ks, T* vs) {
    const int nk = min(BK, j_end - j0), nkp = (nk + 15) & ~15;
#if __CUDA_ARCH__ >= 800
    if (fast) {
      const T* kp = kg + (long long)(j0 + sr) * k_rs + sc;
      const T* vp = vg + (long long)(j0 + sr) * v_rs + sc;
      unsigned int kd = ls_smem_addr(ks + sr * ld + sc), vd = ls_smem_addr(vs + sr * ld + sc);
      int r = sr;
      for (; r < nk; r += sstep) {
        ls_cp16_at(kd, kp);
        ls_cp16_at(vd, vp);
        kp += sstep * k_rs;
        vp += sstep * v_rs;
        kd += sstep * ld2;
        vd += sstep * ld2;
      }
      for (; r < nkp; r += sstep) {
        *reinterpret_cast<uint4*>(ks + r * ld + sc) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(vs + r * ld + sc) = make_uint4(0, 0, 0, 0);
      }
      return;
    }
#endif
    at_stage(ks, ld, kg + (long long)j0 * k_rs, nk, nkp, d, (long long)k_rs);
    at_stage(vs, ld, vg + (long long)j0 * v_rs, nk, nkp, d, (long long)v_rs);
  };
  // With two stages, the next tile's copies fly while the current one is worked on.
  if (two && j_begin < j_end) stage_tile(j_begin, k0s, v0s);
  ls_cp_commit();
  int tile_no = 0;
  for (int j0 = j_begin; j0 < j_end; j0 += BK, ++tile_no) {
    const int nk = min(BK, j_end - j0);
    const bool odd = two && (tile_no & 1);
    const unsigned int ka = odd ? ka1 : ka0, va = odd ? va1 : va0;
    __syncthreads();  // every warp is done with the previous tile (the other buffer)
    if (two) {
      if (j0 + BK < j_end) stage_tile(j0 + BK, odd ? k0s : k1s, odd ? v0s : v1s);
      ls_cp_commit();
      ls_cp_wait<1>();  // all but the newest group: this tile (and q) have landed
    } else {
      stage_tile(j0, k0s, v0s);
      ls_cp_wait_all();
    }
    __syncthreads();
    // The tile's visible columns of each row; a warp whose rows see all of a whole tile
    // (the common case away from the causal diagonal, windows and ragged ends) skips the
    // masks.
    int c_lo[2], c_hi[2];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      c_lo[x] = lo[x] - j0;
      c_hi[x] = min(hi[x] - j0, nk);
    }
    const bool full = __all_sync(0xffffffffu, max(c_lo[0], c_lo[1]) <= 0 &&
                                                  min(c_hi[0], c_hi[1]) >= BK);
    if (full) {
      af_tile<T, DMAX, BK, true>(o, ls, m, qa, ka, va, ld2, d, nk, c_lo, c_hi, sl2);
    } else {
      af_tile<T, DMAX, BK, false>(o, ls, m, qa, ka, va, ld2, d, nk, c_lo, c_hi, sl2);
    }
  }
  // With no key tile at all, q's copies may still be in flight.
  ls_cp_wait_all();
  __syncthreads();
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    const float l = ls[2 * x], inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int n = 0; n < DMAX / 8; ++n) {
      o[n][2 * x] *= inv;
      o[n][2 * x + 1] *= inv;
    }
  }
  // The warp's q rows are read by it alone, and no longer.
  at_put_rows_staged<T, DMAX>(out + ((long long)b * len_q + q0) * heads * d + h * d,
                              (long long)heads * d, nq, r0, d, o, qs + r0 * ld, ld);
}

// P names the variant: attn_flash_d64_f16 (P empty), attn_flash_s_d64_f16 (P = _s); MINB is
// the blocks an SM that registers are left for.
#define LS_ATTN_FLASH_ENTRY(T, S, DMAX, P, BK, MINB)                                         \
  extern "C" __global__ void __launch_bounds__(32 * AT_MAX_WARPS, MINB)                      \
      attn_flash##P##_d##DMAX##_##S(                                                         \
      const T* q, const T* k, const T* v, T* out, const int* key_start, const int* key_end,  \
      int len_q, int heads, int group, int d, long long q_bs, int q_rs, long long k_bs,      \
      int k_rs, long long v_bs, int v_rs, int causal, int q_offset, int window,              \
      float scale, int kv_stages) {                                                          \
    LS_PDL_WAIT();                                                                           \
    attn_flash_body<T, DMAX, BK>(q, k, v, out, key_start, key_end, len_q, heads, group, d,   \
                                 q_bs, q_rs, k_bs, k_rs, v_bs, v_rs, causal, q_offset,       \
                                 window, scale, kv_stages);                                  \
  }
// MINB: 4 blocks an SM at head_dim 64 (128 registers), 3 at 128 (168).
#define LS_ATTN_FLASH(T, S, DMAX, MINB)                                                      \
  LS_ATTN_FLASH_ENTRY(T, S, DMAX, , AF_BK, MINB)                                             \
  LS_ATTN_FLASH_ENTRY(T, S, DMAX, _s, AF_BK / 2, MINB)
#ifdef LS_FLASH_MODULE
LS_ATTN_FLASH(__half, f16, 64, 4)
LS_ATTN_FLASH(__half, f16, 128, 3)
LS_ATTN_FLASH(__nv_bfloat16, bf16, 64, 4)
LS_ATTN_FLASH(__nv_bfloat16, bf16, 128, 3)
#endif
