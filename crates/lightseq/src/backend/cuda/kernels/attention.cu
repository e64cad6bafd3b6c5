// Attention with an online softmax: no [len_q x len_k] buffer, any sequence length.
// One warp per query row, ATT_WARPS rows per block; grid (ceil(len_q / ATT_WARPS), heads, batch).
// Keys are visited 32 at a time: each lane scores one key, the warp updates the running max
// and sum, then every lane accumulates head_dim / 32 output dimensions from the 32 values.
//
// Query i of sequence b sits at position q_offset + i and sees keys j with
//   key_start[b] <= j < key_end[b], and j <= q_offset + i when causal,
//   and j > q_offset + i - window when window > 0.
// Query head h reads key/value head h / group (grouped-query attention).
// With a bias table ([buckets, heads], f32), scores get table[buckets[j - i + len_q - 1]][h].

#define ATT_WARPS 4
#define ATT_MAX_DIM_PER_LANE 8  // head_dim <= 256

template <typename T>
__device__ void attention_body(const T* q, const T* k, const T* v, T* out, const int* key_start,
                               const int* key_end, int len_q, int heads, int group, int head_dim,
                               long long q_bs, int q_rs, long long k_bs, int k_rs, long long v_bs,
                               int v_rs, int causal, int q_offset, int window, float scale,
                               const float* bias_table, const int* buckets) {
  extern __shared__ float q_smem[];  // [ATT_WARPS, head_dim]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int b = blockIdx.z, h = blockIdx.y;
  const int i = blockIdx.x * ATT_WARPS + warp;
  if (i >= len_q) return;
  float* qs = q_smem + warp * head_dim;
  const T* q_row = q + b * q_bs + (long long)i * q_rs + h * head_dim;
  for (int d = lane; d < head_dim; d += 32) qs[d] = to_f(q_row[d]) * scale;
  __syncwarp();

  const int pos = q_offset + i;
  int j_begin = key_start[b], j_end = key_end[b];
  if (causal) j_end = min(j_end, pos + 1);
  if (window > 0) j_begin = max(j_begin, pos + 1 - window);
  const int kh = h / group;
  const T* k_base = k + b * k_bs + kh * head_dim;
  const T* v_base = v + b * v_bs + kh * head_dim;
  float acc[ATT_MAX_DIM_PER_LANE];
#pragma unroll
  for (int t = 0; t < ATT_MAX_DIM_PER_LANE; ++t) acc[t] = 0.f;
  float run_max = LS_NEG_INF, run_sum = 0.f;

  for (int j0 = j_begin; j0 < j_end; j0 += 32) {
    const int j = j0 + lane;
    float s = LS_NEG_INF;
    if (j < j_end) {
      const T* k_row = k_base + (long long)j * k_rs;
      float dot = 0.f;
      for (int d = 0; d < head_dim; ++d) dot += qs[d] * to_f(k_row[d]);
      if (bias_table) dot += bias_table[buckets[j - i + len_q - 1] * heads + h];
      s = dot;
    }
    const float new_max = fmaxf(run_max, warp_max(s));
    const float p = j < j_end ? expf(s - new_max) : 0.f;
    const float correction = expf(run_max - new_max);
    run_sum = run_sum * correction + warp_sum(p);
#pragma unroll
    for (int t = 0; t < ATT_MAX_DIM_PER_LANE; ++t) acc[t] *= correction;
    const int count = min(32, j_end - j0);
    for (int jj = 0; jj < count; ++jj) {
      const float pj = __shfl_sync(LS_FULL_MASK, p, jj);
      const T* v_row = v_base + (long long)(j0 + jj) * v_rs;
#pragma unroll
      for (int t = 0; t < ATT_MAX_DIM_PER_LANE; ++t) {
        const int d = lane + 32 * t;
        if (d < head_dim) acc[t] += pj * to_f(v_row[d]);
      }
    }
    run_max = new_max;
  }

  T* o_row = out + ((long long)b * len_q + i) * heads * head_dim + h * head_dim;
  const float inv = run_sum > 0.f ? 1.f / run_sum : 0.f;
#pragma unroll
  for (int t = 0; t < ATT_MAX_DIM_PER_LANE; ++t) {
    const int d = lane + 32 * t;
    if (d < head_dim) o_row[d] = from_f<T>(acc[t] * inv);
  }
}

#define LS_ATTENTION(T, S)                                                                     \
  extern "C" __global__ void attention_##S(                                                    \
      const T* q, const T* k, const T* v, T* out, const int* key_start, const int* key_end,    \
      int len_q, int heads, int group, int head_dim, long long q_bs, int q_rs, long long k_bs, \
      int k_rs, long long v_bs, int v_rs, int causal, int q_offset, int window, float scale,   \
      const float* bias_table, const int* buckets) {                                           \
    LS_PDL_WAIT();                                                                             \
    attention_body<T>(q, k, v, out, key_start, key_end, len_q, heads, group, head_dim, q_bs,   \
                      q_rs, k_bs, k_rs, v_bs, v_rs, causal, q_offset, window, scale,           \
                      bias_table, buckets);                                                    \
  }
LS_FLOAT_TYPES(LS_ATTENTION)

// The same attention for many queries (encoders, prefill): a block takes TQ queries of one
// (batch, head) and walks the keys in tiles of 32 staged in shared memory (rows padded by
// one float against bank conflicts), so each key and value is read from global memory once
// per block instead of once per query. Each of the 4 warps owns TQ / 4 queries.
#define TILE_Q 32
#define TILE_K 32
#define TILE_WARPS 4
#define TILE_MAX_DIM 128

template <typename T>
__device__ void attention_tiled_body(const T* q, const T* k, const T* v, T* out,
                                     const int* key_start, const int* key_end, int len_q,
                                     int heads, int group, int head_dim, long long q_bs, int q_rs,
                                     long long k_bs, int k_rs, long long v_bs, int v_rs,
                                     int causal, int q_offset, int window, float scale,
                                     const float* bias_table, const int* buckets) {
  extern __shared__ float smem[];
  const int stride = head_dim + 1;
  float* ks = smem;                          // [TILE_K, head_dim + 1]
  float* vs = ks + TILE_K * stride;          // [TILE_K, head_dim + 1]
  float* qs = vs + TILE_K * stride;          // [TILE_Q, head_dim]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int b = blockIdx.z, h = blockIdx.y, kh = h / group;
  const int q0 = blockIdx.x * TILE_Q;
  const int nq = min(TILE_Q, len_q - q0);
  for (int e = threadIdx.x; e < nq * head_dim; e += blockDim.x) {
    const int i = e / head_dim, d = e % head_dim;
    qs[e] = to_f(q[b * q_bs + (long long)(q0 + i) * q_rs + h * head_dim + d]) * scale;
  }
  // Keys any query of the block may see.
  int lo = key_start[b], hi = key_end[b];
  if (causal) hi = min(hi, q_offset + q0 + nq);
  if (window > 0) lo = max(lo, q_offset + q0 + 1 - window);
  constexpr int PER_WARP = TILE_Q / TILE_WARPS;
  float acc[PER_WARP][TILE_MAX_DIM / 32];
  float run_max[PER_WARP], run_sum[PER_WARP];
#pragma unroll
  for (int qi = 0; qi < PER_WARP; ++qi) {
    run_max[qi] = LS_NEG_INF;
    run_sum[qi] = 0.f;
#pragma unroll
    for (int t = 0; t < TILE_MAX_DIM / 32; ++t) acc[qi][t] = 0.f;
  }
  const T* k_base = k + b * k_bs + kh * head_dim;
  const T* v_base = v + b * v_bs + kh * head_dim;
  for (int j0 = lo; j0 < hi; j0 += TILE_K) {
    const int nk = min(TILE_K, hi - j0);
    __syncthreads();  // previous tile fully used (and q staged on the first pass)
    for (int e = threadIdx.x; e < nk * head_dim; e += blockDim.x) {
      const int j = e / head_dim, d = e % head_dim;
      ks[j * stride + d] = to_f(k_base[(long long)(j0 + j) * k_rs + d]);
      vs[j * stride + d] = to_f(v_base[(long long)(j0 + j) * v_rs + d]);
    }
    __syncthreads();
#pragma unroll
    for (int qi = 0; qi < PER_WARP; ++qi) {
      const int i = warp * PER_WARP + qi;  // query within the block
      if (i >= nq) break;
      const int pos = q_offset + q0 + i;
      int jb = key_start[b], je = key_end[b];
      if (causal) je = min(je, pos + 1);
      if (window > 0) jb = max(jb, pos + 1 - window);
      const int j = j0 + lane;
      float s = LS_NEG_INF;
      if (lane < nk && j >= jb && j < je) {
        const float* kr = ks + lane * stride;
        const float* qr = qs + i * head_dim;
        float dot = 0.f;
        for (int d = 0; d < head_dim; ++d) dot += qr[d] * kr[d];
        if (bias_table) dot += bias_table[buckets[j - (q0 + i) + len_q - 1] * heads + h];
        s = dot;
      }
      const float tile_max = warp_max(s);
      if (tile_max == LS_NEG_INF) continue;  // no visible key in this tile
      const float new_max = fmaxf(run_max[qi], tile_max);
      const float p = s == LS_NEG_INF ? 0.f : expf(s - new_max);
      const float corr = expf(run_max[qi] - new_max);
      run_sum[qi] = run_sum[qi] * corr + warp_sum(p);
#pragma unroll
      for (int t = 0; t < TILE_MAX_DIM / 32; ++t) acc[qi][t] *= corr;
      for (int jj = 0; jj < nk; ++jj) {
        const float pj = __shfl_sync(LS_FULL_MASK, p, jj);
        const float* vr = vs + jj * stride;
#pragma unroll
        for (int t = 0; t < TILE_MAX_DIM / 32; ++t) {
          const int d = lane + 32 * t;
          if (d < head_dim) acc[qi][t] += pj * vr[d];
        }
      }
      run_max[qi] = new_max;
    }
  }
#pragma unroll
  for (int qi = 0; qi < PER_WARP; ++qi) {
    const int i = warp * PER_WARP + qi;
    if (i >= nq) break;
    T* o_row = out + ((long long)b * len_q + q0 + i) * heads * head_dim + h * head_dim;
    const float inv = run_sum[qi] > 0.f ? 1.f / run_sum[qi] : 0.f;
#pragma unroll
    for (int t = 0; t < TILE_MAX_DIM / 32; ++t) {
      const int d = lane + 32 * t;
      if (d < head_dim) o_row[d] = from_f<T>(acc[qi][t] * inv);
    }
  }
}

#define LS_ATTENTION_TILED(T, S)                                                               \
  extern "C" __global__ void __launch_bounds__(TILE_WARPS * 32) attention_tiled_##S(          \
      const T* q, const T* k, const T* v, T* out, const int* key_start, const int* key_end,    \
      int len_q, int heads, int group, int head_dim, long long q_bs, int q_rs, long long k_bs, \
      int k_rs, long long v_bs, int v_rs, int causal, int q_offset, int window, float scale,   \
      const float* bias_table, const int* buckets) {                                           \
    LS_PDL_WAIT();                                                                             \
    attention_tiled_body<T>(q, k, v, out, key_start, key_end, len_q, heads, group, head_dim,   \
                            q_bs, q_rs, k_bs, k_rs, v_bs, v_rs, causal, q_offset, window,      \
                            scale, bias_table, buckets);                                       \
  }
LS_FLOAT_TYPES(LS_ATTENTION_TILED)

// Single-query attention (decode steps): one block of DEC_THREADS per (head, row). Keys go
// in tiles of DEC_THREADS, a key per thread: each thread takes its key's dot product with
// q (kept in shared memory), the block updates the online softmax with the tile's max and
// sum, and the tile's probability-weighted value rows are added: where rows are whole
// 16-byte packs, each thread takes a pack of dimensions for every (DEC_THREADS / packs)-th
// key and the key groups' sums meet in shared memory; otherwise the threads owning output
// dimensions walk all the tile's keys. The loads of a tile are independent, so a step over
// a short cache costs a few memory latencies rather than one per key.
// With `kn` (the step's own key rows, its value rows `vn_off` elements further on, as the
// projection wrote them), the kernel also appends them to the caches at row `at` (read from
// `at_dev` when given): every block takes key `at` from `kn` instead of the cache, so no
// block waits on another's write, and the first head of each key/value group copies them
// into the caches at its end.
// With `key_rows` (beam search: [batch, k_len] i32, k_len = k_bs / k_rs), key j of row b is
// read from cache row key_rows[b * k_len + j]: reorders of the beams compose that table
// instead of moving the caches. The appended key stays in row b.
// With kv_div > 1 (no `kn`, no `key_rows`), query row b reads key/value row b / kv_div:
// the beams of one source share its cross keys and values.
#define DEC_THREADS 128
// Tiles of fewer keys walk them per output dimension: the groups' reduction costs more
// than it saves there (H200, Transformer-base steps over 8-9 keys).
#define DEC_PACKED_MIN_KEYS 32
#define DEC_DIMS_PER_THREAD ((ATT_MAX_DIM_PER_LANE * 32 + DEC_THREADS - 1) / DEC_THREADS)

// Packs of a key row one thread reads for the scores (LIGHTSEQ_NVRTC_DEFINES may set it:
// 2 halves a tile and its registers, 8 doubles them).
#ifndef LS_DECODE_KEY_PACKS
#define LS_DECODE_KEY_PACKS 4
#endif

// Whole 16-byte-pack rows of KP packs (KP = 4, 8, 16: head_dim 32, 64, 128 in f16/bf16):
// every load of a tile is issued before any of its arithmetic. A tile holds TILE keys;
// TPK threads share a key's row for the scores (lanes of a pair read adjacent packs), and
// for the values thread (g, c) takes pack c of keys g, g + GROUPS, ... (VPT of them): the
// key and the value loads of a tile are in flight together, behind one memory latency. The
// softmax statistics go through one barrier a tile (each warp's max and sum, the
// probabilities relative to their warp's max), and each thread keeps its pack's weighted
// sum across tiles; the key groups' sums meet in shared memory once, at the end.
template <typename T, int KP>
__device__ void attention_decode_tiles(const T* q_row, T* o_row, int jb, int je, int h, int b,
                                       int heads, int head_dim, long long k_bs, int k_rs,
                                       long long v_bs, int v_rs, const T* k_head,
                                       const T* v_head, float scale, const float* bias_table,
                                       const int* buckets,
                                       const T* kn_row, const T* vn_row, int wr,
                                       const int* rows_b, float* qs, float* ps, float* vsum,
                                       bool early) {
  constexpr int E = 16 / sizeof(T);
  constexpr int TPK = KP >= LS_DECODE_KEY_PACKS ? KP / LS_DECODE_KEY_PACKS : 1;
  constexpr int KPT = KP / TPK;
  constexpr int TILE = DEC_THREADS / TPK;
  constexpr int GROUPS = DEC_THREADS / KP;
  constexpr int VPT = TILE / GROUPS;
  constexpr int WARPS = DEC_THREADS / 32;
  // A score thread's share of q, padded so that the TPK shares sit in different banks.
  constexpr int QSEG = KPT * E + 4;
  static_assert(KP * E <= DEC_THREADS, "a thread loads one element of q");
  static_assert(TPK * QSEG <= ATT_MAX_DIM_PER_LANE * 32 && TILE <= DEC_THREADS &&
                    GROUPS * KP * E <= DEC_THREADS * 16 / sizeof(T),
                "the shared buffers are the caller's");
  __shared__ float2 wstat[WARPS];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int kk = tid / TPK, part = tid - kk * TPK;
  const int g = tid / KP, c = tid - g * KP;
  // Pack `pack` of key (value) j: in the cache row of its beam, or the appended row.
  auto key_pack = [&](int j, int pack) -> uint4 {
    const T* r = j == wr ? kn_row
                         : k_head + (rows_b ? (long long)rows_b[j] - b : 0LL) * k_bs +
                               (long long)j * k_rs;
    return reinterpret_cast<const uint4*>(r)[pack];
  };
  auto value_pack = [&](int j, int pack) -> uint4 {
    const T* r = j == wr ? vn_row
                         : v_head + (rows_b ? (long long)rows_b[j] - b : 0LL) * v_bs +
                               (long long)j * v_rs;
    return reinterpret_cast<const uint4*>(r)[pack];
  };
  float a[E];
#pragma unroll
  for (int u = 0; u < E; ++u) a[u] = 0.f;
  float run_max = LS_NEG_INF, run_sum = 0.f;
  uint4 kr[KPT], vr[VPT];
  // A tile's key and value packs; with `cached_only`, the appended row's stay zero.
  auto load_tile = [&](int tile, bool cached_only) {
    const int j = tile + kk;
#pragma unroll
    for (int i = 0; i < KPT; ++i) {
      kr[i] = j < je && !(cached_only && j == wr) ? key_pack(j, i * TPK + part)
                                                  : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int m = 0; m < VPT; ++m) {
      const int jv = tile + g + m * GROUPS;
      vr[m] = jv < je && !(cached_only && jv == wr) ? value_pack(jv, c) : make_uint4(0, 0, 0, 0);
    }
  };
  // early: the first tile's cached keys and values are read before the wait (the caller
  // vouches that no kernel still running writes them), q and the appended row after it
  // (where the appended row lies past je its packs are never used: scores and weights of
  // keys at or past je are masked below).
  if (early) {
    if (jb < je) load_tile(jb, true);
    LS_PDL_WAIT();
    if (jb < je) {
      const int j = jb + kk;
      if (j == wr) {
#pragma unroll
        for (int i = 0; i < KPT; ++i) kr[i] = key_pack(j, i * TPK + part);
      }
#pragma unroll
      for (int m = 0; m < VPT; ++m) {
        const int jv = jb + g + m * GROUPS;
        if (jv == wr) vr[m] = value_pack(jv, c);
      }
    }
  }
  const float qv = tid < head_dim ? to_f(q_row[tid]) * scale : 0.f;
  for (int tile = jb; tile < je; tile += TILE) {
    const int j = tile + kk;
    if (tile != jb || !early) load_tile(tile, false);
    if (tile == jb) {
      if (tid < head_dim) {
        const int pk = tid / E, i = pk / TPK;
        qs[(pk - i * TPK) * QSEG + i * E + (tid - pk * E)] = qv;
      }
      __syncthreads();
    }
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < KPT; ++i) {
      const T* e = reinterpret_cast<const T*>(&kr[i]);
      const float* qq = qs + part * QSEG + i * E;
#pragma unroll
      for (int u = 0; u < E; ++u) dot += qq[u] * to_f(e[u]);
    }
#pragma unroll
    for (int o = TPK / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(LS_FULL_MASK, dot, o);
    float s = LS_NEG_INF;
    if (j < je) {
      s = dot;
      if (bias_table) s += bias_table[buckets[j] * heads + h];
    }
    const float wm = warp_max(s);
    const float p = s == LS_NEG_INF ? 0.f : expf(s - wm);
    const float wsum = warp_sum(part == 0 ? p : 0.f);
    if (part == 0) ps[kk] = p;
    if (lane == 0) wstat[warp] = make_float2(wm, wsum);
    __syncthreads();
    float tmax = LS_NEG_INF;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) tmax = fmaxf(tmax, wstat[w].x);
    const float new_max = fmaxf(run_max, tmax);
    float tsum = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float2 st = wstat[w];
      if (st.x != LS_NEG_INF) tsum += st.y * expf(st.x - new_max);
    }
    const float corr = run_max == LS_NEG_INF ? 0.f : expf(run_max - new_max);
    run_sum = run_sum * corr + tsum;
    run_max = new_max;
#pragma unroll
    for (int u = 0; u < E; ++u) a[u] *= corr;
#pragma unroll
    for (int m = 0; m < VPT; ++m) {
      const int i = g + m * GROUPS;
      if (tile + i < je) {
        const float wmi = wstat[(i * TPK) >> 5].x;
        const float pi = ps[i] * expf(wmi - new_max);
        const T* e = reinterpret_cast<const T*>(&vr[m]);
#pragma unroll
        for (int u = 0; u < E; ++u) a[u] += pi * to_f(e[u]);
      }
    }
    if (tile + TILE < je) __syncthreads();  // ps and wstat are rewritten by the next tile
  }
  float4* vs4 = reinterpret_cast<float4*>(vsum + g * head_dim + c * E);
#pragma unroll
  for (int u = 0; u < E; u += 4) vs4[u / 4] = make_float4(a[u], a[u + 1], a[u + 2], a[u + 3]);
  __syncthreads();
  if (tid < head_dim) {
    float x = 0.f;
#pragma unroll
    for (int gg = 0; gg < GROUPS; ++gg) x += vsum[gg * head_dim + tid];
    o_row[tid] = from_f<T>(run_sum > 0.f ? x / run_sum : 0.f);
  }
}

// Tensor-core spans of the grouped single-query kernel below, for rows of KP whole 16-byte
// packs of f16/bf16 (head_dim 8 KP = 32, 64, 128; sm_80+; the host launches it only there).
// A warp takes spans of 16 keys with its own online softmax. The products run transposed,
// so that a span's 16 keys fill the m16n8k16 tile's rows and the query rows are q^T's
// columns: s^T = K q^T is one product per 16 dimensions, lane (g, c) = (lane / 4, lane % 4)
// giving the A operand keys g and g + 8's quarter c of the dimensions, which stands for the
// tile's k indices 2c, 2c + 1, 2c + 8, 2c + 9 of every k-step (a dot product does not
// depend on the order of its terms, so each lane loads whole 16-byte packs and q is read in
// the same order). The probabilities reach the B operand of o^T = V^T p^T by shuffles,
// split into a 16-bit part and its 16-bit remainder (about 22 significant bits in f16, 16
// in bf16, against one part's 11 or 8). V^T's A operand is built from lane (g, c)'s
// dimensions [g HD / 8, (g + 1) HD / 8) of keys 2c, 2c + 1, 2c + 8, 2c + 9, paired across
// keys by byte permutes: m-tile t's rows g and g + 8 are dimensions g HD / 8 + 2t and + 1.
// The same products for one query row a block (q as column 0 of 8) were measured and not
// kept: 12.06 / 10.98 us a launch against the scalar tiles' 12.5 / 11.0 at
// Transformer-base 32 x 128 (ncu, H200), slower end to end.
#if __CUDA_ARCH__ >= 800
template <int W, typename T>
__device__ __forceinline__ void dec_load_words(unsigned int (&w)[W], const T* p) {
  if constexpr (W == 2) {
    const uint2 x = *reinterpret_cast<const uint2*>(p);
    w[0] = x.x;
    w[1] = x.y;
  } else {
#pragma unroll
    for (int i = 0; i < W / 4; ++i) {
      const uint4 x = reinterpret_cast<const uint4*>(p)[i];
      w[4 * i] = x.x;
      w[4 * i + 1] = x.y;
      w[4 * i + 2] = x.z;
      w[4 * i + 3] = x.w;
    }
  }
}

// Two floats rounded to T in one register, the first in the low half (the mma order).
template <typename T>
__device__ __forceinline__ unsigned int dec_pack2(float lo, float hi, float& rlo, float& rhi) {
  const T a = from_f<T>(lo), b = from_f<T>(hi);
  rlo = lo - to_f(a);
  rhi = hi - to_f(b);
  return (unsigned int)(*reinterpret_cast<const unsigned short*>(&a)) |
         ((unsigned int)(*reinterpret_cast<const unsigned short*>(&b)) << 16);
}

// Lane quarter c of q's row `row` as q^T's column (zeros where `row` is null: the columns
// no query row fills).
template <int HD, typename T>
__device__ __forceinline__ void dec_q_words(unsigned int (&qw)[HD / 8], const T* row, int c) {
  if (row) {
    dec_load_words<HD / 8>(qw, row + c * (HD / 4));
  } else {
#pragma unroll
    for (int i = 0; i < HD / 8; ++i) qw[i] = 0u;
  }
}

// A 16-key span's operands for lane (g, c): the quarter c of keys base + g and base + 8 + g
// (zeros past je), and dimensions [g HD / 8, (g + 1) HD / 8) of keys base + 2c, + 2c + 1,
// + 2c + 8, + 2c + 9; key_row(j) and value_row(j) give key j's rows.
template <int HD, typename KR, typename VR>
__device__ __forceinline__ void dec_span_load(unsigned int (&kw)[2][HD / 8],
                                              unsigned int (&vw)[4][HD / 16], int base, int je,
                                              int g, int c, KR key_row, VR value_row) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = base + 8 * r + g;
    if (j < je) {
      dec_load_words<HD / 8>(kw[r], key_row(j) + c * (HD / 4));
    } else {
#pragma unroll
      for (int i = 0; i < HD / 8; ++i) kw[r][i] = 0u;
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int j = base + 8 * (i >> 1) + 2 * c + (i & 1);
    if (j < je) {
      dec_load_words<HD / 16>(vw[i], value_row(j) + g * (HD / 8));
    } else {
#pragma unroll
      for (int x = 0; x < HD / 16; ++x) vw[i][x] = 0u;
    }
  }
}

// s^T = K q^T over a span: sc in C's layout (keys g and g + 8, columns 2c and 2c + 1).
template <typename T, int HD>
__device__ __forceinline__ void dec_span_scores(float (&sc)[4], const unsigned int (&kw)[2][HD / 8],
                                                const unsigned int (&qw)[HD / 8]) {
  sc[0] = sc[1] = sc[2] = sc[3] = 0.f;
#pragma unroll
  for (int s = 0; s < HD / 16; ++s) {
    const unsigned int a[4] = {kw[0][2 * s], kw[1][2 * s], kw[0][2 * s + 1], kw[1][2 * s + 1]};
    ls_mma<T>(sc, a, qw[2 * s], qw[2 * s + 1]);
  }
}

// o^T += V^T p^T over a span: p^T's column of lane (g, c) holds keys 2c, 2c + 1 (x0, x1) and
// 2c + 8, 2c + 9 (x2, x3), each as a 16-bit part and its 16-bit remainder.
template <typename T, int HD>
__device__ __forceinline__ void dec_span_values(float (&acc)[HD / 16][4],
                                                const unsigned int (&vw)[4][HD / 16], float x0,
                                                float x1, float x2, float x3) {
  float r0, r1, r2, r3, u0, u1;
  const unsigned int bh0 = dec_pack2<T>(x0, x1, r0, r1);
  const unsigned int bh1 = dec_pack2<T>(x2, x3, r2, r3);
  const unsigned int bl0 = dec_pack2<T>(r0, r1, u0, u1);
  const unsigned int bl1 = dec_pack2<T>(r2, r3, u0, u1);
#pragma unroll
  for (int t = 0; t < HD / 16; ++t) {
    const unsigned int a[4] = {__byte_perm(vw[0][t], vw[1][t], 0x5410u),
                               __byte_perm(vw[0][t], vw[1][t], 0x7632u),
                               __byte_perm(vw[2][t], vw[3][t], 0x5410u),
                               __byte_perm(vw[2][t], vw[3][t], 0x7632u)};
    ls_mma<T>(acc[t], a, bh0, bh1);
    ls_mma<T>(acc[t], a, bl0, bl1);
  }
}

#endif

// Query rows that share their keys and values (kv_div = R > 1, at most 8: a source's beams
// over its cross keys) in one block of GROUP_WARPS warps: the span products above with
// the R rows as q^T's columns 0..R-1, so that the block reads each key and value once
// for all of them. Lane (g, c) holds the scores of columns 2c and 2c + 1 (C's layout), and
// p^T's column g reaches it from lanes (2c, g / 2) and (2c + 1, g / 2). Each column keeps
// its own row's key range; the block walks their union.
#define GROUP_WARPS 8
#if __CUDA_ARCH__ >= 800
template <typename T, int KP>
__device__ void attention_decode_group(const T* q, const T* k, const T* v, T* out,
                                       const int* key_start, const int* key_end, int heads,
                                       int group, long long q_bs, long long k_bs, int k_rs,
                                       long long v_bs, int v_rs, int causal, int q_offset,
                                       int window, float scale, const float* bias_table,
                                       const int* buckets, int R) {
  constexpr int HD = KP * 8, KW = HD / 8, MT = HD / 16;
  __shared__ float2 wstat[GROUP_WARPS][8];
  __shared__ __align__(16) float wacc[GROUP_WARPS][8][HD];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int h = blockIdx.x, kh = h / group, b0 = blockIdx.y * R;
  auto range = [&](int r, int& lo, int& hi) {
    lo = key_start[b0 + r];
    hi = key_end[b0 + r];
    if (causal) hi = min(hi, q_offset + 1);
    if (window > 0) lo = max(lo, q_offset + 1 - window);
  };
  int jb = 0x7fffffff, je = -0x7fffffff;
  for (int r = 0; r < R; ++r) {
    int lo, hi;
    range(r, lo, hi);
    if (lo < hi) {
      jb = min(jb, lo);
      je = max(je, hi);
    }
  }
  // Lane c's columns 2c and 2c + 1 (an empty range past R).
  int lo[2] = {0, 0}, hi[2] = {0, 0};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (2 * c + i < R) range(2 * c + i, lo[i], hi[i]);
  }
  const T* k_head = k + (long long)blockIdx.y * k_bs + kh * HD;
  const T* v_head = v + (long long)blockIdx.y * v_bs + kh * HD;
  unsigned int qw[KW];
  dec_q_words<HD>(qw, g < R ? q + (long long)(b0 + g) * q_bs + h * HD : nullptr, c);
  float acc[MT][4];
#pragma unroll
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
  float run_m[2] = {LS_NEG_INF, LS_NEG_INF}, run_l[2] = {0.f, 0.f};
  const int spans = je > jb ? (je - jb + 15) >> 4 : 0;
  for (int span = warp; span < spans; span += GROUP_WARPS) {
    const int base = jb + 16 * span;
    unsigned int kw[2][KW], vw[4][MT];
    dec_span_load<HD>(
        kw, vw, base, je, g, c, [&](int j) { return k_head + (long long)j * k_rs; },
        [&](int j) { return v_head + (long long)j * v_rs; });
    float sc[4];
    dec_span_scores<T, HD>(sc, kw, qw);
    // Column 2c + i: keys base + g (sc[i]) and base + 8 + g (sc[2 + i]).
    float pa[2], pb[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int ja = base + g, jb8 = base + 8 + g;
      float sa = LS_NEG_INF, sb = LS_NEG_INF;
      if (ja >= lo[i] && ja < hi[i]) {
        sa = sc[i] * scale;
        if (bias_table) sa += bias_table[buckets[ja] * heads + h];
      }
      if (jb8 >= lo[i] && jb8 < hi[i]) {
        sb = sc[2 + i] * scale;
        if (bias_table) sb += bias_table[buckets[jb8] * heads + h];
      }
      float mx = fmaxf(sa, sb);
      mx = fmaxf(mx, __shfl_xor_sync(LS_FULL_MASK, mx, 4));
      mx = fmaxf(mx, __shfl_xor_sync(LS_FULL_MASK, mx, 8));
      mx = fmaxf(mx, __shfl_xor_sync(LS_FULL_MASK, mx, 16));
      const float new_m = fmaxf(run_m[i], mx);
      const float corr = run_m[i] == LS_NEG_INF ? 0.f : expf(run_m[i] - new_m);
      pa[i] = sa == LS_NEG_INF ? 0.f : expf(sa - new_m);
      pb[i] = sb == LS_NEG_INF ? 0.f : expf(sb - new_m);
      run_l[i] = run_l[i] * corr + pa[i] + pb[i];
      run_m[i] = new_m;
#pragma unroll
      for (int t = 0; t < MT; ++t) {
        acc[t][i] *= corr;
        acc[t][2 + i] *= corr;
      }
    }
    // p^T's column g: keys 2c and 2c + 8 from lane (2c, g / 2), 2c + 1 and 2c + 9 from lane
    // (2c + 1, g / 2), each from that lane's column 2 (g / 2) + g % 2.
    const int src0 = 8 * c + (g >> 1), src1 = src0 + 4;
    const bool odd = g & 1;
    const float a00 = __shfl_sync(LS_FULL_MASK, pa[0], src0);
    const float a01 = __shfl_sync(LS_FULL_MASK, pa[1], src0);
    const float a10 = __shfl_sync(LS_FULL_MASK, pa[0], src1);
    const float a11 = __shfl_sync(LS_FULL_MASK, pa[1], src1);
    const float b00 = __shfl_sync(LS_FULL_MASK, pb[0], src0);
    const float b01 = __shfl_sync(LS_FULL_MASK, pb[1], src0);
    const float b10 = __shfl_sync(LS_FULL_MASK, pb[0], src1);
    const float b11 = __shfl_sync(LS_FULL_MASK, pb[1], src1);
    const float x0 = odd ? a01 : a00, x1 = odd ? a11 : a10;
    const float x2 = odd ? b01 : b00, x3 = odd ? b11 : b10;
    dec_span_values<T, HD>(acc, vw, x0, x1, x2, x3);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    run_l[i] += __shfl_xor_sync(LS_FULL_MASK, run_l[i], 4);
    run_l[i] += __shfl_xor_sync(LS_FULL_MASK, run_l[i], 8);
    run_l[i] += __shfl_xor_sync(LS_FULL_MASK, run_l[i], 16);
    const int col = 2 * c + i;
    if (col < R) {
#pragma unroll
      for (int t = 0; t < MT; ++t) {
        wacc[warp][col][g * (HD / 8) + 2 * t] = acc[t][i];
        wacc[warp][col][g * (HD / 8) + 2 * t + 1] = acc[t][2 + i];
      }
      if (g == 0) wstat[warp][col] = make_float2(run_m[i], run_l[i]);
    }
  }
  __syncthreads();
  for (int x = tid; x < R * HD; x += GROUP_WARPS * 32) {
    const int r = x / HD, d = x - r * HD;
    float m = LS_NEG_INF;
#pragma unroll
    for (int w = 0; w < GROUP_WARPS; ++w) m = fmaxf(m, wstat[w][r].x);
    float den = 0.f, num = 0.f;
#pragma unroll
    for (int w = 0; w < GROUP_WARPS; ++w) {
      const float2 st = wstat[w][r];
      const float f = st.x == LS_NEG_INF ? 0.f : expf(st.x - m);
      den += st.y * f;
      num += wacc[w][r][d] * f;
    }
    out[((long long)(b0 + r) * heads + h) * HD + d] = from_f<T>(den > 0.f ? num / den : 0.f);
  }
}
#endif

template <typename T, int KP>
__device__ void attention_decode_body(const T* q, T* k, T* v, T* out, const int* key_start,
                                      const int* key_end, int heads, int group, int head_dim,
                                      long long q_bs, long long k_bs, int k_rs, long long v_bs,
                                      int v_rs, int causal, int q_offset, int window,
                                      float scale, const float* bias_table, const int* buckets,
                                      const T* kn, long long kn_bs, int vn_off,
                                      const int* at_dev, int at, const int* key_rows,
                                      int kv_div, bool early) {
  // early: the key ranges, the write position, the row table and (the packed kernels) the
  // first tile of the caches are read before the wait for the kernel before, which the
  // caller vouches writes none of them (it wrote q and the appended row).
  if (!early) LS_PDL_WAIT();
  __shared__ __align__(16) float qs[ATT_MAX_DIM_PER_LANE * 32];
  __shared__ float ps[DEC_THREADS];
  // Per key group, its share of the output row (packed value path): at most
  // DEC_THREADS / packs groups of head_dim, i.e. DEC_THREADS * 16 / sizeof(T) floats.
  __shared__ __align__(16) float vsum[DEC_THREADS * 16 / sizeof(T)];
  const int tid = threadIdx.x;
  const int h = blockIdx.x, b = blockIdx.y;
  const int kh = h / group;
  const T* q_row = q + b * q_bs + h * head_dim;
  T* o_row = out + (long long)b * heads * head_dim + h * head_dim;
  int jb = key_start[b], je = key_end[b];
  if (causal) je = min(je, q_offset + 1);
  if (window > 0) jb = max(jb, q_offset + 1 - window);
  // Rows b of the queries read key/value row b / kv_div (beams sharing their source's).
  const int bk = b / kv_div;
  const T* k_base = k + bk * k_bs + kh * head_dim;
  const T* v_base = v + bk * v_bs + kh * head_dim;
  const int* rows_b = key_rows ? key_rows + b * (k_bs / k_rs) : nullptr;
  // The appended row (-1: none) and its key and value.
  const int wr = kn ? (at_dev ? *at_dev : at) : -1;
  const T* kn_row = kn ? kn + b * kn_bs + kh * head_dim : k_base;
  const T* vn_row = kn ? kn_row + vn_off : v_base;
  // Key j's key and value rows (the cache row of its beam, or the appended row).
  auto key_row = [&](int j) -> const T* {
    if (j == wr) return kn_row;
    const long long r = rows_b ? rows_b[j] : bk;
    return k + r * k_bs + kh * head_dim + (long long)j * k_rs;
  };
  auto value_row = [&](int j) -> const T* {
    if (j == wr) return vn_row;
    const long long r = rows_b ? rows_b[j] : bk;
    return v + r * v_bs + kh * head_dim + (long long)j * v_rs;
  };
  const bool rows_even =
      !rows_b || ((k_bs * sizeof(T)) % 16 == 0 && (v_bs * sizeof(T)) % 16 == 0);
  const bool packed = (head_dim * sizeof(T)) % 16 == 0 && (k_rs * sizeof(T)) % 16 == 0 &&
                      ls_aligned16(k_base) && ls_aligned16(kn_row) && rows_even;
  const bool packed_v = (head_dim * sizeof(T)) % 16 == 0 && (v_rs * sizeof(T)) % 16 == 0 &&
                        ls_aligned16(v_base) && ls_aligned16(vn_row) && rows_even;
  if constexpr (KP > 0) {
    // The host launches this only for rows of KP whole packs, aligned (ops.rs).
    attention_decode_tiles<T, KP>(q_row, o_row, jb, je, h, b, heads, head_dim, k_bs, k_rs, v_bs,
                                  v_rs, k_base, v_base, scale, bias_table, buckets, kn_row,
                                  vn_row, wr, rows_b, qs, ps, vsum, early);
  } else {
    if (early) LS_PDL_WAIT();
    for (int d = tid; d < head_dim; d += DEC_THREADS) qs[d] = to_f(q_row[d]) * scale;
    float acc[DEC_DIMS_PER_THREAD];
#pragma unroll
    for (int t = 0; t < DEC_DIMS_PER_THREAD; ++t) acc[t] = 0.f;
    __syncthreads();
    float run_max = LS_NEG_INF, run_sum = 0.f;
    for (int tile = jb; tile < je; tile += DEC_THREADS) {
      const int j = tile + tid;
      float s = LS_NEG_INF;
      if (j < je) {
        const T* kr = key_row(j);
        float dot = 0.f;
        if (packed) {
          // 16-byte loads: head_dim / per_pack independent loads per key row.
          constexpr int per_pack = 16 / sizeof(T);
          for (int d = 0; d < head_dim; d += per_pack) {
            const uint4 raw = *reinterpret_cast<const uint4*>(kr + d);
            const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
            for (int u = 0; u < per_pack; ++u) dot += qs[d + u] * to_f(e[u]);
          }
        } else {
#pragma unroll 8
          for (int d = 0; d < head_dim; ++d) dot += qs[d] * to_f(kr[d]);
        }
        s = dot;
        if (bias_table) s += bias_table[buckets[j] * heads + h];
      }
      const float new_max = fmaxf(run_max, block_max(s));
      const float p = j < je ? expf(s - new_max) : 0.f;
      ps[tid] = p;
      const float corr = expf(run_max - new_max);
      run_sum = run_sum * corr + block_sum(p);
      run_max = new_max;
      // block_sum synchronized the block after every ps write.
      const int n = min(DEC_THREADS, je - tile);
      if (packed_v && n >= DEC_PACKED_MIN_KEYS) {
        // Threads take 16-byte packs of a value row, DEC_THREADS / packs keys at a time, and
        // the key groups' sums meet in shared memory.
        constexpr int P = 16 / sizeof(T);
        const int packs = head_dim / P, groups = DEC_THREADS / packs;
        const int g = tid / packs, c = (tid - g * packs) * P;
        float a[P];
#pragma unroll
        for (int u = 0; u < P; ++u) a[u] = 0.f;
        if (g < groups) {
#pragma unroll 2
          for (int i = g; i < n; i += groups) {
            const int j = tile + i;
            const T* vr = value_row(j);
            const uint4 raw = *reinterpret_cast<const uint4*>(vr + c);
            const T* e = reinterpret_cast<const T*>(&raw);
            const float pi = ps[i];
#pragma unroll
            for (int u = 0; u < P; ++u) a[u] += pi * to_f(e[u]);
          }
#pragma unroll
          for (int u = 0; u < P; ++u) vsum[g * head_dim + c + u] = a[u];
        }
        __syncthreads();
#pragma unroll
        for (int t = 0; t < DEC_DIMS_PER_THREAD; ++t) {
          const int d = tid + t * DEC_THREADS;
          if (d < head_dim) {
            float x = 0.f;
            for (int gg = 0; gg < groups; ++gg) x += vsum[gg * head_dim + d];
            acc[t] = acc[t] * corr + x;
          }
        }
      } else {
#pragma unroll
        for (int t = 0; t < DEC_DIMS_PER_THREAD; ++t) {
          const int d = tid + t * DEC_THREADS;
          if (d < head_dim) {
            float a = 0.f;
#pragma unroll 4
            for (int i = 0; i < n; ++i) {
              const int j = tile + i;
              const T* vr = value_row(j);
              a += ps[i] * to_f(vr[d]);
            }
            acc[t] = acc[t] * corr + a;
          }
        }
      }
      __syncthreads();  // ps and vsum are rewritten by the next tile
    }
    const float inv = run_sum > 0.f ? 1.f / run_sum : 0.f;
#pragma unroll
    for (int t = 0; t < DEC_DIMS_PER_THREAD; ++t) {
      const int d = tid + t * DEC_THREADS;
      if (d < head_dim) o_row[d] = from_f<T>(acc[t] * inv);
    }
  }
  // No block reads row `wr` from the caches, so the append goes last, off the path above.
  if (kn && h % group == 0) {
    T* kd = k + b * k_bs + (long long)wr * k_rs + kh * head_dim;
    T* vd = v + b * v_bs + (long long)wr * v_rs + kh * head_dim;
    for (int d = tid; d < head_dim; d += DEC_THREADS) {
      kd[d] = kn_row[d];
      vd[d] = vn_row[d];
    }
  }
}

// attention_decode walks the keys in two phases (any row); attention_decode_p4, _p8 and
// _p16 take rows of that many whole 16-byte packs, which the host checks, each its own
// kernel so that its 64 registers hold 8 blocks an SM (one wave of a 128-row step's 1024
// (head, row) blocks).
// The single-query kernels' parameters (attention() in ops.rs passes them in this order).
#define LS_DECODE_PARAMS(T)                                                                    \
  const T* q, T* k, T* v, T* out, const int* key_start, const int* key_end, int len_q,         \
      int heads, int group, int head_dim, long long q_bs, int q_rs, long long k_bs, int k_rs,  \
      long long v_bs, int v_rs, int causal, int q_offset, int window, float scale,             \
      const float* bias_table, const int* buckets, const T* kn, long long kn_bs, int vn_off,   \
      const int* at_dev, int at, const int* key_rows, int kv_div, int early
#define LS_DECODE_ARGS                                                                         \
  q, k, v, out, key_start, key_end, heads, group, head_dim, q_bs, k_bs, k_rs, v_bs, v_rs,      \
      causal, q_offset, window, scale, bias_table, buckets, kn, kn_bs, vn_off, at_dev, at,     \
      key_rows, kv_div, early != 0
// attention_decode_body waits for the kernel before (LS_PDL_WAIT), early or not.
#define LS_DECODE_PACKED(T, S, KP)                                                             \
  extern "C" __global__ void __launch_bounds__(DEC_THREADS, 8) attention_decode_p##KP##_##S(   \
      LS_DECODE_PARAMS(T)) {                                                                   \
    attention_decode_body<T, KP>(LS_DECODE_ARGS);                                              \
  }
#define LS_ATTENTION_DECODE(T, S)                                                              \
  extern "C" __global__ void attention_decode_##S(LS_DECODE_PARAMS(T)) {                        \
    attention_decode_body<T, 0>(LS_DECODE_ARGS);                                               \
  }                                                                                            \
  LS_DECODE_PACKED(T, S, 4)                                                                    \
  LS_DECODE_PACKED(T, S, 8)                                                                    \
  LS_DECODE_PACKED(T, S, 16)
LS_FLOAT_TYPES(LS_ATTENTION_DECODE)

// attention_decode_g4, _g8 and _g16: query rows b of a block kv_div (2..8) at a time over
// their shared key/value row b / kv_div (attention_decode_group), grid (heads, batch /
// kv_div), GROUP_WARPS warps; no appended keys, no key-row table.
#define LS_DECODE_GROUP(T, S, KP)                                                              \
  extern "C" __global__ void __launch_bounds__(GROUP_WARPS * 32)                               \
      attention_decode_g##KP##_##S(                                                            \
      LS_DECODE_PARAMS(T)) {                                                                   \
    LS_PDL_WAIT();                                                                             \
    LS_DECODE_GROUP_CALL(T, KP)                                                                \
  }
#if __CUDA_ARCH__ >= 800
#define LS_DECODE_GROUP_CALL(T, KP)                                                            \
  attention_decode_group<T, KP>(q, k, v, out, key_start, key_end, heads, group, q_bs, k_bs,     \
                                k_rs, v_bs, v_rs, causal, q_offset, window, scale, bias_table, \
                                buckets, kv_div);
#else
#define LS_DECODE_GROUP_CALL(T, KP)
#endif
#define LS_DECODE_GROUPS(T, S)                                                                 \
  LS_DECODE_GROUP(T, S, 4) LS_DECODE_GROUP(T, S, 8) LS_DECODE_GROUP(T, S, 16)
LS_DECODE_GROUPS(__half, f16)
LS_DECODE_GROUPS(__nv_bfloat16, bf16)
