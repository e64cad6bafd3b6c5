// Kernels of the training path (crate::train::ops; launches in train_ops.rs): transpose,
// masked softmax and its backward, layer-norm / activation / embedding backward, column
// sums, the fused label-smoothed cross entropy, Adam(W), sums of squares, Philox dropout.
// Every kernel is instantiated per float dtype as <name>_<dtype>; for the kernels whose
// buffers are f32 by nature (adam_multi, sum_squares_multi, add_scaled_into) the suffix
// names the dtype of the non-f32 inputs or outputs (adam_multi's copy, and gradients kept
// in that dtype), or is a plain alias. All math is f32 unless noted.
// Row-wise kernels take one block per row (grid-stride over rows) and need blockDim.x to be
// a multiple of 32; column reductions are deterministic (no atomics).

#define LS_GRID_LOOP(i, total)                                                              \
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (total);         \
       i += (long long)gridDim.x * blockDim.x)

// ---------------------------------------------------------------------------------------
// [a, b, c, d] -> [a, c, b, d]. With rows of d elements in whole 16-byte packs, each thread
// moves one pack (so a warp moves several rows at once); otherwise a warp per row.
template <typename T, typename I>
__device__ void transpose_12_body(const T* x, T* y, I a, I b, I c, I d) {
  constexpr int N = 16 / sizeof(T);
  const I rows = a * b * c;
  if (d % N == 0 && ls_aligned16(x) && ls_aligned16(y)) {
    const I per_row = d / N, total = rows * per_row;
    for (I p = blockIdx.x * (I)blockDim.x + threadIdx.x; p < total; p += (I)gridDim.x * blockDim.x) {
      const I r = p / per_row, e = p - r * per_row;
      const I j = r % b;  // output row r is (i, l, j) of [a, c, b]
      const I t = r / b;
      const I l = t % c, i = t / c;
      reinterpret_cast<LsPack<T>*>(y)[p] =
          reinterpret_cast<const LsPack<T>*>(x + ((i * b + j) * c + l) * d)[e];
    }
    return;
  }
  const int lane = threadIdx.x & 31;
  const I warp = (blockIdx.x * (I)blockDim.x + threadIdx.x) >> 5;
  const I warps = ((I)gridDim.x * blockDim.x) >> 5;
  for (I r = warp; r < rows; r += warps) {
    const I j = r % b;
    const I t = r / b;
    const I l = t % c, i = t / c;
    const T* src = x + ((i * b + j) * c + l) * d;
    T* dst = y + r * d;
    for (I e = lane; e < d; e += 32) dst[e] = src[e];
  }
}

// Index arithmetic in 32 bits when every index fits with room for a grid stride: 64-bit
// division costs more than the 16-byte move it addresses.
#define LS_FITS_32(total) ((total) < (1ll << 30))

// Heads out of a [batch, rows, width] projection: y [batch, heads, rows, d] from the columns
// col + h d .. col + (h + 1) d of each row (16-byte packs when rows stay aligned).
template <typename T, typename I>
__device__ void gather_heads_body(const T* x, T* y, I batch, I rows, I width, I col, I heads,
                                  I d) {
  constexpr int N = 16 / sizeof(T);
  const bool packed = d % N == 0 && width % N == 0 && col % N == 0 && ls_aligned16(x) &&
                      ls_aligned16(y);
  const I unit = packed ? N : 1, per_row = d / unit;
  const I total = batch * heads * rows * per_row;
  for (I p = blockIdx.x * (I)blockDim.x + threadIdx.x; p < total; p += (I)gridDim.x * blockDim.x) {
    const I e = p % per_row;
    const I t = p / per_row;  // (b, h, r) of the output
    const I r = t % rows, bh = t / rows;
    const I h = bh % heads, b = bh / heads;
    const I src = (b * rows + r) * width + col + h * d + e * unit;
    if (packed) {
      reinterpret_cast<LsPack<T>*>(y)[p] = *reinterpret_cast<const LsPack<T>*>(x + src);
    } else {
      y[p] = x[src];
    }
  }
}

#define LS_GATHER_HEADS(T, S)                                                                  \
  extern "C" __global__ void gather_heads_##S(const T* x, T* y, long long batch,             \
                                              long long rows, long long width, long long col, \
                                              long long heads, long long d) {                 \
    LS_PDL_WAIT();                                                                            \
    if (LS_FITS_32(batch * rows * width) && LS_FITS_32(batch * heads * rows * d))             \
      gather_heads_body<T, int>(x, y, batch, rows, width, col, heads, d);                      \
    else                                                                                       \
      gather_heads_body<T, long long>(x, y, batch, rows, width, col, heads, d);                \
  }
LS_FLOAT_TYPES(LS_GATHER_HEADS)

// ---------------------------------------------------------------------------------------
// Row-wise kernels run a row per "team": a warp for short rows (many rows per block, no
// block-wide barriers) or a whole block for long ones. The host picks with `per_warp`.
template <bool WARP>
struct Team;

template <>
struct Team<true> {
  __device__ static long long id() { return (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5; }
  __device__ static long long count() { return ((long long)gridDim.x * blockDim.x) >> 5; }
  __device__ static int lane() { return threadIdx.x & 31; }
  __device__ static int size() { return 32; }
  __device__ static float sum(float v) { return warp_sum(v); }
  __device__ static float max(float v) { return warp_max(v); }
};

template <>
struct Team<false> {
  __device__ static long long id() { return blockIdx.x; }
  __device__ static long long count() { return gridDim.x; }
  __device__ static int lane() { return threadIdx.x; }
  __device__ static int size() { return blockDim.x; }
  __device__ static float sum(float v) { return block_sum(v); }
  __device__ static float max(float v) { return block_max(v); }
};

// Softmax over rows of lk of scale * s, s [batch, heads, lq, lk]; keys j >= key_lens[b]
// and, when causal, j > i are masked; rows with no visible key are zeros.
template <typename T, bool WARP>
__device__ void masked_softmax_body(const T* s, const int* key_lens, T* p, long long rows,
                                    int heads, int lq, int lk, float scale, int causal) {
  using G = Team<WARP>;
  for (long long r = G::id(); r < rows; r += G::count()) {
    const long long b = r / ((long long)heads * lq);
    const int i = (int)(r % lq);
    int limit = lk;
    if (key_lens) limit = min(max(key_lens[b], 0), lk);
    if (causal) limit = min(limit, i + 1);
    const T* row = s + r * lk;
    T* out = p + r * lk;
    if (limit == 0) {  // uniform over the team
      for (int j = G::lane(); j < lk; j += G::size()) out[j] = from_f<T>(0.f);
      continue;
    }
    float m = LS_NEG_INF;
    for (int j = G::lane(); j < limit; j += G::size()) m = fmaxf(m, to_f(row[j]) * scale);
    m = G::max(m);
    float sum = 0.f;
    for (int j = G::lane(); j < limit; j += G::size()) sum += expf(to_f(row[j]) * scale - m);
    sum = G::sum(sum);
    for (int j = G::lane(); j < lk; j += G::size()) {
      out[j] = from_f<T>(j < limit ? expf(to_f(row[j]) * scale - m) / sum : 0.f);
    }
  }
}

// ds = scale * p * (dp - sum_j p_j dp_j) per row of cols.
template <typename T, bool WARP>
__device__ void softmax_backward_body(const T* p, const T* dp, T* ds, long long rows, int cols,
                                      float scale) {
  using G = Team<WARP>;
  for (long long r = G::id(); r < rows; r += G::count()) {
    const T* pr = p + r * cols;
    const T* dr = dp + r * cols;
    float dot = 0.f;
    for (int j = G::lane(); j < cols; j += G::size()) dot += to_f(pr[j]) * to_f(dr[j]);
    dot = G::sum(dot);
    for (int j = G::lane(); j < cols; j += G::size()) {
      ds[r * cols + j] = from_f<T>(scale * to_f(pr[j]) * (to_f(dr[j]) - dot));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Layer norm of s = x (+ y) over rows of h for training: writes s (rounded to T, when
// s_out is given) and LN(s) computed from the rounded s, the tensor its backward reads.
template <typename T, bool WARP>
__device__ void add_layer_norm_body(const T* x, const T* y, const T* gamma, const T* beta,
                                    T* s_out, T* out, long long rows, int h, float eps) {
  using G = Team<WARP>;
  for (long long r = G::id(); r < rows; r += G::count()) {
    const T* xr = x + r * h;
    const T* yr = y ? y + r * h : nullptr;
    T* sr = s_out ? s_out + r * h : nullptr;
    float sum = 0.f;
    for (int j = G::lane(); j < h; j += G::size()) {
      float v = to_f(xr[j]);
      if (yr) v = to_f(from_f<T>(v + to_f(yr[j])));
      if (sr) sr[j] = from_f<T>(v);
      sum += v;
    }
    const float mean = G::sum(sum) / h;
    float s2 = 0.f;
    for (int j = G::lane(); j < h; j += G::size()) {
      float v = to_f(xr[j]);
      if (yr) v = to_f(from_f<T>(v + to_f(yr[j])));
      s2 += (v - mean) * (v - mean);
    }
    const float inv = rsqrtf(G::sum(s2) / h + eps);
    for (int j = G::lane(); j < h; j += G::size()) {
      float v = to_f(xr[j]);
      if (yr) v = to_f(from_f<T>(v + to_f(yr[j])));
      out[r * h + j] = from_f<T>((v - mean) * inv * to_f(gamma[j]) + to_f(beta[j]));
    }
  }
}

// Layer-norm backward, per row: recomputes mean and rstd (two passes), writes them to
// stats [rows, 2] for the parameter pass, and dx = rstd * (g - mean(g) - xhat * mean(g xhat))
// with g = dy * gamma.
template <typename T, bool WARP>
__device__ void layer_norm_backward_body(const T* x, const T* gamma, const T* dy, T* dx,
                                         float* stats, long long rows, int h, float eps) {
  using G = Team<WARP>;
  for (long long r = G::id(); r < rows; r += G::count()) {
    const T* xr = x + r * h;
    const T* dyr = dy + r * h;
    float s = 0.f;
    for (int j = G::lane(); j < h; j += G::size()) s += to_f(xr[j]);
    const float mean = G::sum(s) / h;
    float s2 = 0.f;
    for (int j = G::lane(); j < h; j += G::size()) {
      const float d = to_f(xr[j]) - mean;
      s2 += d * d;
    }
    const float rstd = 1.f / sqrtf(G::sum(s2) / h + eps);
    float a = 0.f, c = 0.f;
    for (int j = G::lane(); j < h; j += G::size()) {
      const float g = to_f(dyr[j]) * to_f(gamma[j]);
      a += g;
      c += g * ((to_f(xr[j]) - mean) * rstd);
    }
    const float s1 = G::sum(a) / h;
    const float sx = G::sum(c) / h;
    for (int j = G::lane(); j < h; j += G::size()) {
      const float g = to_f(dyr[j]) * to_f(gamma[j]);
      const float xhat = (to_f(xr[j]) - mean) * rstd;
      dx[r * h + j] = from_f<T>(rstd * (g - s1 - xhat * sx));
    }
    if (G::lane() == 0) {
      stats[2 * r] = mean;
      stats[2 * r + 1] = rstd;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Register-cached rows: a team of `ts` lanes (a power of two up to 32, aligned within the
// warp) per row, lane tl of a team holding packs tl, tl + ts, ... (at most LS_RP 16-byte
// packs), so every row is read from memory once and short rows do not leave lanes idle.
// The host takes these kernels when rows are whole packs of at most 32 * LS_RP and every
// buffer is 16-byte aligned (row_team in train_ops.rs), else the team kernels above.
#define LS_RP 4

__device__ __forceinline__ float team_sum(float v, int ts) {
  for (int o = ts >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(LS_FULL_MASK, v, o);
  return v;
}

__device__ __forceinline__ float team_max(float v, int ts) {
  for (int o = ts >> 1; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(LS_FULL_MASK, v, o));
  return v;
}

// Which rows this thread's team takes. Every lane of a warp runs the loop over `base` the
// same number of times (a team past the last row has ok == false), so the team shuffles
// always see the whole warp.
struct TeamRows {
  int ts, tl;
  long long first, step, sub;
  __device__ explicit TeamRows(int t) : ts(t) {
    tl = threadIdx.x & (t - 1);
    sub = (threadIdx.x & 31) / t;
    first = (blockIdx.x * (long long)blockDim.x + (threadIdx.x & ~31)) / t;
    step = (long long)gridDim.x * blockDim.x / t;
  }
};

template <typename T>
struct RowRegs {
  static constexpr int N = 16 / sizeof(T);
  float v[LS_RP][N];
  // Packs tl + k ts below `packs` of `row` when `ok`; zeros elsewhere.
  __device__ __forceinline__ void load(const T* row, int packs, int tl, int ts, bool ok) {
#pragma unroll
    for (int k = 0; k < LS_RP; ++k) {
      const int q = tl + k * ts;
      if (ok && q < packs) {
        const LsPack<T> p = reinterpret_cast<const LsPack<T>*>(row)[q];
#pragma unroll
        for (int e = 0; e < N; ++e) v[k][e] = to_f(p.v[e]);
      } else {
#pragma unroll
        for (int e = 0; e < N; ++e) v[k][e] = 0.f;
      }
    }
  }
  __device__ __forceinline__ void store(T* row, int packs, int tl, int ts, bool ok) const {
#pragma unroll
    for (int k = 0; k < LS_RP; ++k) {
      const int q = tl + k * ts;
      if (ok && q < packs) {
        LsPack<T> p;
#pragma unroll
        for (int e = 0; e < N; ++e) p.v[e] = from_f<T>(v[k][e]);
        reinterpret_cast<LsPack<T>*>(row)[q] = p;
      }
    }
  }
};

// masked_softmax_body with register-cached rows.
template <typename T>
__device__ void masked_softmax_rows(const T* s, const int* key_lens, T* p, long long rows,
                                    int heads, int lq, int lk, float scale, int causal, int ts) {
  constexpr int N = 16 / sizeof(T);
  const int packs = lk / N;
  const TeamRows t(ts);
  for (long long base = t.first; base < rows; base += t.step) {
    const long long r = base + t.sub;
    const bool ok = r < rows;
    int limit = 0;
    if (ok) {
      limit = lk;
      if (key_lens) limit = min(max(key_lens[r / ((long long)heads * lq)], 0), lk);
      if (causal) limit = min(limit, (int)(r % lq) + 1);
    }
    RowRegs<T> x;
    x.load(s + r * lk, packs, t.tl, ts, ok);
    float m = LS_NEG_INF;
#pragma unroll
    for (int k = 0; k < LS_RP; ++k) {
#pragma unroll
      for (int e = 0; e < N; ++e) {
        if ((t.tl + k * ts) * N + e < limit) m = fmaxf(m, x.v[k][e] * scale);
      }
    }
    m = team_max(m, ts);
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < LS_RP; ++k) {
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const float ev =
            (t.tl + k * ts) * N + e < limit ? expf(x.v[k][e] * scale - m) : 0.f;
        x.v[k][e] = ev;
        sum += ev;
      }
    }
    sum = team_sum(sum, ts);
    if (limit > 0) {
#pragma unroll
      for (int k = 0; k < LS_RP; ++k) {
#pragma unroll
        for (int e = 0; e < N; ++e) x.v[k][e] = x.v[k][e] / sum;
      }
    }
    x.store(p + r * lk, packs, t.tl, ts, ok);
  }
}

// softmax_backward_body with register-cached rows.
template <typename T>
__device__ void softmax_backward_rows(const T* p, const T* dp, T* ds, long long rows, int cols,
                                      float scale, int ts) {
  constexpr int N = 16 / sizeof(T);
  const int packs = cols / N;
  const TeamRows t(ts);
  for (long long base = t.first; base < rows; base += t.step) {
    const long long r = base + t.sub;
    const bool ok = r < rows;
    RowRegs<T> pv, dv;
    pv.load(p + r * cols, packs, t.tl, ts, ok);
    dv.load(dp + r * cols, packs, t.tl, ts, ok);
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < LS_RP; ++k) {
#pragma unroll
      for (int e = 0; e < N; ++e) dot += pv.v[k][e] * dv.v[k][e];
    }
    dot = team_sum(dot, ts);
#pragma unroll
    for (int k = 0; k < LS_RP; ++k) {
#pragma unroll
      for (int e = 0; e < N; ++e) dv.v[k][e] = scale * pv.v[k][e] * (dv.v[k][e] - dot);
    }
    dv.store(ds + r * cols, packs, t.tl, ts, ok);
  }
}

// add_layer_norm_body with register-cached rows; with `stats`, each row's (mean, rstd) as
// float2 [rows], for layer_norm_backward_rows. gamma and beta go to shared memory once a
// block (the block's first 2 * packs threads a pack each), before the wait for the kernel
// before with `early` (the host passes it where no kernel has written them since their
// upload), so that no row waits on their loads after its sums.
template <typename T>
__device__ void add_layer_norm_rows(const T* x, const T* y, const T* gamma, const T* beta,
                                    T* s_out, T* out, float* stats, long long rows, int h,
                                    float eps, int ts, bool early) {
  constexpr int N = 16 / sizeof(T);
  const int packs = h / N;
  __shared__ LsPack<T> params[2][32 * LS_RP];
  auto stage_params = [&] {
    const int i = threadIdx.x % packs, which = threadIdx.x / packs;
    if (which < 2) {
      params[which][i] = reinterpret_cast<const LsPack<T>*>(which ? beta : gamma)[i];
    }
  };
  if (early) stage_params();
  LS_PDL_WAIT();
  if (!early) stage_params();
  __syncthreads();
  const TeamRows t(ts);
  for (long long base = t.first; base < rows; base += t.step) {
    const long long r = base + t.sub;
    const bool ok = r < rows;
    RowRegs<T> v;
    v.load(x + r * h, packs, t.tl, ts, ok);
    if (y) {
      RowRegs<T> w;
      w.load(y + r * h, packs, t.tl, ts, ok);
#pragma unroll
      for (int k = 0; k < LS_RP; ++k) {
#pragma unroll
        for (int e = 0; e < N; ++e) v.v[k][e] = to_f(from_f<T>(v.v[k][e] + w.v[k][e]));
      }
      if (s_out) v.store(s_out + r * h, packs, t.tl, ts, ok);
    }
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < LS_RP; ++k) {
#pragma unroll
      for (int e = 0; e < N; ++e) sum += v.v[k][e];
    }
    const float mean = team_sum(sum, ts) / h;
    float s2 = 0.f;
#pragma unroll
    for (int k = 0; k < LS_RP; ++k) {
      if (t.tl + k * ts < packs) {
#pragma unroll
        for (int e = 0; e < N; ++e) s2 += (v.v[k][e] - mean) * (v.v[k][e] - mean);
      }
    }
    const float inv = rsqrtf(team_sum(s2, ts) / h + eps);
    if (stats && ok && t.tl == 0) reinterpret_cast<float2*>(stats)[r] = make_float2(mean, inv);
#pragma unroll
    for (int k = 0; k < LS_RP; ++k) {
      const int q = t.tl + k * ts;
      if (ok && q < packs) {
        const LsPack<T> g = params[0][q];
        const LsPack<T> b = params[1][q];
#pragma unroll
        for (int e = 0; e < N; ++e) {
          v.v[k][e] = (v.v[k][e] - mean) * inv * to_f(g.v[e]) + to_f(b.v[e]);
        }
      }
    }
    v.store(out + r * h, packs, t.tl, ts, ok);
  }
}

// Rows layer_norm_backward_rows keeps in flight per warp, and the shared bytes a warp stages
// them in: per stage, RP packs of x and of dy for each of its 32 lanes, lane-major (pack k
// of lane l at (k 32 + l) 16, dy's after x's), so every access is conflict-free. The host
// sizes the dynamic shared memory as warps times LS_LNB_WARP_BYTES(RP).
#define LS_LNB_STAGES 3
#define LS_LNB_STAGE_BYTES(RP) (2 * (RP) * 32 * 16)
#define LS_LNB_WARP_BYTES(RP) (LS_LNB_STAGES * LS_LNB_STAGE_BYTES(RP))
// Warps a block of layer_norm_backward_rows may have (its two-warp teams' exchange slots).
#define LS_LNB_MAX_WARPS 16
// Packs a lane of layer_norm_backward_rows holds (LNB_PACKS in train_ops.rs); the host
// launches it in blocks of 512 threads.
#define LS_LNB_RP 2

// The sum of a lane's per-pack partial sums, in pack order.
template <int RP>
__device__ __forceinline__ float pack_total_of(const float (&p)[RP]) {
  float s = p[0];
#pragma unroll
  for (int k = 1; k < RP; ++k) s += p[k];
  return s;
}

// layer_norm_backward_body with register-cached rows, the parameter sums folded in: the
// columns a lane holds are the same for every row its team takes, so the lane keeps running
// sums of dy * xhat and dy for them (and with DSUM of dx as stored: the bias gradient of
// the linear whose output, plus the residual, was normalized). Each lane streams its own
// packs of a team's rows through LS_LNB_STAGES shared stages (cp.async), so a warp has the
// next rows in flight while it works on one; a lane reads only what it copied, so no
// barrier is needed. At the end the block adds its teams' sums (a warp's teams in xor
// order, then the warps, or pairs of warps, in order) and writes them to row blockIdx.x
// of `partial` [gridDim.x, S h]
// (dgamma's h columns, dbeta's, then with DSUM dx's), which sum_chunks adds over blocks.
// With `stats` (the forward's (mean, rstd) per row, add_layer_norm_rows') a row's
// statistics are read instead of computed again.
// A lane holds RP packs of a row. With RP = 2 a team may be two warps (ts = 64): each warp
// of the pair sums its half and the pair trades the halves' sums through shared memory at
// a named barrier, adding them in the same order, so both hold the same totals. The lanes'
// running sums are what limit how many warps an SM holds; halving them lets it hold twice
// as many.
template <typename T, bool DSUM, int RP>
__device__ void layer_norm_backward_rows(const T* x, const T* gamma, const T* dy,
                                         const float* stats, T* dx, float* partial,
                                         long long rows, int h, float eps, int ts) {
  constexpr int N = 16 / sizeof(T);
  constexpr int S = DSUM ? 3 : 2;
  constexpr int KD = DSUM ? RP : 1;
  constexpr int STAGE = LS_LNB_STAGE_BYTES(RP), WARP_BYTES = LS_LNB_WARP_BYTES(RP);
  extern __shared__ __align__(16) unsigned char lnb_smem[];
  // A two-warp team's halves' sums: [parity][warp], a row's exchange alternating parity.
  __shared__ float2 lnb_trade[2][LS_LNB_MAX_WARPS];
  const int packs = h / N;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const TeamRows t(ts);
  const bool pair = ts > 32;
  int parity = 0;
  // Team totals of (a, b): shuffles within the warp, then for a pair one trade.
  auto team_sum2 = [&](float a, float b) {
    for (int o = min(ts, 32) >> 1; o > 0; o >>= 1) {
      a += __shfl_xor_sync(LS_FULL_MASK, a, o);
      b += __shfl_xor_sync(LS_FULL_MASK, b, o);
    }
    if (pair) {
      if (lane == 0) lnb_trade[parity][warp] = make_float2(a, b);
      // Both warps of the pair (named barrier 1 + pair index, 64 threads). A slot is
      // written again two trades later, after the next barrier, which the partner reaches
      // only once it has read it.
      asm volatile("bar.sync %0, 64;" ::"r"(1 + (warp >> 1)) : "memory");
      const float2 lo = lnb_trade[parity][warp & ~1], hi = lnb_trade[parity][warp | 1];
      a = lo.x + hi.x;
      b = lo.y + hi.y;
      parity ^= 1;
    }
    return make_float2(a, b);
  };
  unsigned char* stages = lnb_smem + warp * WARP_BYTES;
  // Copies this lane's packs of the row its team takes at `base` into stage `st`, as one
  // commit group (empty past the last row, so every lane counts the same groups).
  auto issue = [&](long long base, int st) {
    const long long r = base + t.sub;
    if (r < rows) {
      unsigned char* slot = stages + st * STAGE + lane * 16;
#pragma unroll
      for (int k = 0; k < RP; ++k) {
        const int q = t.tl + k * ts;
        if (q < packs) {
          ls_cp16(slot + k * 512, x + r * h + q * N);
          ls_cp16(slot + (RP + k) * 512, dy + r * h + q * N);
        }
      }
    }
    ls_cp_commit();
  };
  float ag[RP][N], ab[RP][N], ad[KD][N];
#pragma unroll
  for (int k = 0; k < RP; ++k) {
#pragma unroll
    for (int e = 0; e < N; ++e) ag[k][e] = ab[k][e] = 0.f;
  }
#pragma unroll
  for (int k = 0; k < KD; ++k) {
#pragma unroll
    for (int e = 0; e < N; ++e) ad[k][e] = 0.f;
  }
#pragma unroll
  for (int st = 0; st < LS_LNB_STAGES - 1; ++st) issue(t.first + st * t.step, st);
  // The forward's (mean, rstd) of a team's row, one row ahead.
  auto row_stats = [&](long long base) {
    const long long r = base + t.sub;
    return stats && r < rows ? reinterpret_cast<const float2*>(stats)[r] : make_float2(0.f, 0.f);
  };
  const float inv_h = 1.f / h;
  float2 next_stats = row_stats(t.first);
  int st = 0;
  for (long long base = t.first; base < rows; base += t.step) {
    const long long r = base + t.sub;
    const bool ok = r < rows;
    const float2 row_st = next_stats;
    next_stats = row_stats(base + t.step);
    ls_cp_wait<LS_LNB_STAGES - 2>();
    float xv[RP][N], gv[RP][N];
    const unsigned char* slot = stages + st * STAGE + lane * 16;
#pragma unroll
    for (int k = 0; k < RP; ++k) {
      const bool in = ok && t.tl + k * ts < packs;
      const LsPack<T> px = *reinterpret_cast<const LsPack<T>*>(slot + k * 512);
      const LsPack<T> pd = *reinterpret_cast<const LsPack<T>*>(slot + (RP + k) * 512);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        xv[k][e] = in ? to_f(px.v[e]) : 0.f;
        gv[k][e] = in ? to_f(pd.v[e]) : 0.f;
      }
    }
    // The row LS_LNB_STAGES - 1 ahead goes to the stage read last iteration.
    issue(base + (LS_LNB_STAGES - 1) * t.step, st == 0 ? LS_LNB_STAGES - 1 : st - 1);
    st = st + 1 == LS_LNB_STAGES ? 0 : st + 1;
    // The row's mean and rstd: the forward's, else computed again. The row sums run one
    // chain per pack, added at the end: with two warps a scheduler, one chain through all
    // of a lane's elements would leave it waiting on each add.
    float mean = row_st.x, rstd = row_st.y;
    if (!stats) {
      float sk[RP];
#pragma unroll
      for (int k = 0; k < RP; ++k) {
        sk[k] = 0.f;
#pragma unroll
        for (int e = 0; e < N; ++e) sk[k] += xv[k][e];
      }
      mean = team_sum2(pack_total_of(sk), 0.f).x / h;
#pragma unroll
      for (int k = 0; k < RP; ++k) {
        sk[k] = 0.f;
        if (t.tl + k * ts < packs) {
#pragma unroll
          for (int e = 0; e < N; ++e) sk[k] += (xv[k][e] - mean) * (xv[k][e] - mean);
        }
      }
      rstd = 1.f / sqrtf(team_sum2(pack_total_of(sk), 0.f).x / h + eps);
    }
    // A team past the last row holds zeros; its rstd of 0 (not 1 / sqrt(eps), infinite at
    // eps = 0) keeps its xhat at 0, so it adds nothing to the parameter sums.
    if (!ok) rstd = 0.f;
    const float shift = -mean * rstd;
    // g = dy * gamma replaces dy in gv; xhat replaces x in xv.
    float ak[RP], ck[RP];
#pragma unroll
    for (int k = 0; k < RP; ++k) {
      const int q = t.tl + k * ts;
      ak[k] = ck[k] = 0.f;
      if (q < packs) {
        const LsPack<T> gm = reinterpret_cast<const LsPack<T>*>(gamma)[q];
#pragma unroll
        for (int e = 0; e < N; ++e) {
          const float d = gv[k][e];
          xv[k][e] = fmaf(xv[k][e], rstd, shift);
          ag[k][e] += d * xv[k][e];
          ab[k][e] += d;
          gv[k][e] = d * to_f(gm.v[e]);
          ak[k] += gv[k][e];
          ck[k] += gv[k][e] * xv[k][e];
        }
      }
    }
    // dx = rstd (g - s1 - xhat sx) = rstd g + (-rstd sx) xhat + (-rstd s1).
    const float2 sums = team_sum2(pack_total_of(ak), pack_total_of(ck));
    const float c0 = -rstd * (sums.x * inv_h);
    const float cx = -rstd * (sums.y * inv_h);
#pragma unroll
    for (int k = 0; k < RP; ++k) {
      LsPack<T> o;
#pragma unroll
      for (int e = 0; e < N; ++e) {
        o.v[e] = from_f<T>(fmaf(gv[k][e], rstd, fmaf(xv[k][e], cx, c0)));
        // dx as stored (zero for a team past the last row: rstd is 0).
        if (DSUM) ad[DSUM ? k : 0][e] += to_f(o.v[e]);
      }
      const int q = t.tl + k * ts;
      if (ok && q < packs) reinterpret_cast<LsPack<T>*>(dx + r * h)[q] = o;
    }
  }
  // Teams of a warp hold the same columns: lanes below ts end with the warp's sums.
#pragma unroll
  for (int k = 0; k < RP; ++k) {
#pragma unroll
    for (int e = 0; e < N; ++e) {
      for (int o = ts; o < 32; o <<= 1) {
        ag[k][e] += __shfl_xor_sync(LS_FULL_MASK, ag[k][e], o);
        ab[k][e] += __shfl_xor_sync(LS_FULL_MASK, ab[k][e], o);
        if (DSUM) ad[DSUM ? k : 0][e] += __shfl_xor_sync(LS_FULL_MASK, ad[DSUM ? k : 0][e], o);
      }
    }
  }
  // The stages are done with once every lane's copies have landed (the last groups were
  // empty) and every warp is past its last row: a team's warps' stages then take its sums,
  // S h floats (at most 3 * 32 * RP * N a warp of the team, the size of its stages). The
  // block then adds its teams' sums in order.
  ls_cp_wait<0>();
  __syncthreads();
  const int team_warps = pair ? 2 : 1;
  float* mine = reinterpret_cast<float*>(lnb_smem + (warp & ~(team_warps - 1)) * WARP_BYTES);
  if (t.sub == 0) {
#pragma unroll
    for (int k = 0; k < RP; ++k) {
      const int q = t.tl + k * ts;
      if (q < packs) {
#pragma unroll
        for (int e = 0; e < N; ++e) {
          const int j = q * N + e;
          mine[j] = ag[k][e];
          mine[h + j] = ab[k][e];
          if (DSUM) mine[2 * h + j] = ad[DSUM ? k : 0][e];
        }
      }
    }
  }
  __syncthreads();
  float* out = partial + blockIdx.x * (long long)S * h;
  for (int j = threadIdx.x; j < S * h; j += blockDim.x) {
    float v = 0.f;
    for (int w = 0; w < warps; w += team_warps) {
      v += reinterpret_cast<const float*>(lnb_smem + w * WARP_BYTES)[j];
    }
    out[j] = v;
  }
}

// Column reductions: block (b, y) covers columns [32 b, 32 b + 32) over the y-th chunk of
// rows; lane = column, warp w sums rows w, w + warps, ... of the chunk; the per-warp
// partials are added in warp order, and the chunks' partials in chunk order, by sum_chunks
// or by the last block of the launch (column_sum_packed): deterministic either way (the
// only atomic counts arrivals).
#define LS_COL_WARPS_MAX 32

// dgamma[j] = sum_r dy[r, j] * xhat[r, j], dbeta[j] = sum_r dy[r, j].
template <typename T>
__device__ void layer_norm_params_body(const T* x, const T* dy, const float* stats,
                                       float* dgamma, float* dbeta, long long rows, int h) {
  __shared__ float sg[LS_COL_WARPS_MAX][33];
  __shared__ float sb[LS_COL_WARPS_MAX][33];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int col = blockIdx.x * 32 + lane;
  // Block row y covers a chunk of rows and writes its partial sums to row y of the outputs.
  const long long per = (rows + gridDim.y - 1) / gridDim.y;
  const long long r0 = blockIdx.y * per, r1 = min(rows, r0 + per);
  dgamma += (long long)blockIdx.y * h;
  dbeta += (long long)blockIdx.y * h;
  float ag = 0.f, ab = 0.f;
  if (col < h) {
    for (long long r = r0 + warp; r < r1; r += warps) {
      const float d = to_f(dy[r * h + col]);
      const float xhat = (to_f(x[r * h + col]) - stats[2 * r]) * stats[2 * r + 1];
      ag += d * xhat;
      ab += d;
    }
  }
  sg[warp][lane] = ag;
  sb[warp][lane] = ab;
  __syncthreads();
  if (warp == 0 && col < h) {
    float tg = 0.f, tb = 0.f;
    for (int w = 0; w < warps; ++w) {
      tg += sg[w][lane];
      tb += sb[w][lane];
    }
    dgamma[col] = tg;
    dbeta[col] = tb;
  }
}

// Single-launch column reductions: every block (x, y) writes its partial sums of block
// column x to row y of `partial` (rows `pld` >= the columns rounded up to N apart), then
// counts its arrival in counter[x]; the last block of column x to arrive adds the rows in
// order (warp w takes rows w, w + warps, ..., then the warps' sums in warp order: the same
// for every launch of a grid) and resets counter[x] to zero for the next launch.
__device__ bool ls_last_arrival(unsigned int* counter) {
  __shared__ int last;
  __threadfence();  // this block's partials, visible before its arrival is
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(counter + blockIdx.x, 1u) == gridDim.y - 1;
    if (last) counter[blockIdx.x] = 0;
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// Where column `col` of a reduction's output goes: out (columns below split), out2 (the
// next split) or out3 (the rest), each at the column's offset in its part.
struct LsOuts {
  float *out, *out2, *out3;
  long long split;
  __device__ float* at(long long col) const {
    if (col < split) return out + col;
    return col < 2 * split ? out2 + (col - split) : out3 + (col - 2 * split);
  }
};

// The last block's sum: outs.at(col) (+)= sum over rows of partial for this block column's
// 32 N columns; `sp` is the block's [warps][32 N + 1] shared scratch.
template <int N>
__device__ void ls_sum_partials(const float* partial, long long pld, LsOuts outs,
                                long long cols, int accumulate, float (*sp)[32 * N + 1],
                                int warps) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long col0 = ((long long)blockIdx.x * 32 + lane) * N;
  float acc[N];
#pragma unroll
  for (int k = 0; k < N; ++k) acc[k] = 0.f;
  if (warp < warps && col0 < cols) {
#pragma unroll 4
    for (int y = warp; y < (int)gridDim.y; y += warps) {
      const float4* p = reinterpret_cast<const float4*>(partial + y * pld + col0);
#pragma unroll
      for (int q = 0; q < N / 4; ++q) {
        const float4 v = __ldcg(p + q);  // written by other blocks: read from L2
        acc[4 * q] += v.x;
        acc[4 * q + 1] += v.y;
        acc[4 * q + 2] += v.z;
        acc[4 * q + 3] += v.w;
      }
    }
  }
  __syncthreads();  // the block's own reduction may still read sp
  if (warp < warps) {
#pragma unroll
    for (int k = 0; k < N; ++k) sp[warp][lane * N + k] = acc[k];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < 32 * N; c += blockDim.x) {
    const long long col = (long long)blockIdx.x * 32 * N + c;
    if (col < cols) {
      float t = 0.f;
      for (int w = 0; w < warps; ++w) t += sp[w][c];
      float* o = outs.at(col);
      *o = accumulate ? __fadd_rn(*o, t) : t;
    }
  }
}

// layer_norm_params with 16-byte loads: lane l of a block covers columns
// [(32 b + l) N, + N); needs h % N == 0 and aligned x and dy (the host checks).
template <typename T>
__device__ void layer_norm_params_packed_body(const T* x, const T* dy, const float* stats,
                                              float* pg, float* pb, long long rows, int h) {
  constexpr int N = 16 / sizeof(T);
  __shared__ float sg[8][32 * N + 1];
  __shared__ float sb[8][32 * N + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = min(blockDim.x >> 5, 8);
  const int col0 = (blockIdx.x * 32 + lane) * N;
  const long long per = (rows + gridDim.y - 1) / gridDim.y;
  const long long r0 = blockIdx.y * per, r1 = min(rows, r0 + per);
  float* part_g = pg + (long long)blockIdx.y * h;
  float* part_b = pb + (long long)blockIdx.y * h;
  float ag[N], ab[N];
#pragma unroll
  for (int k = 0; k < N; ++k) ag[k] = ab[k] = 0.f;
  if (col0 < h && warp < warps) {
    for (long long r = r0 + warp; r < r1; r += warps) {
      const LsPack<T> d = *reinterpret_cast<const LsPack<T>*>(dy + r * h + col0);
      const LsPack<T> xv = *reinterpret_cast<const LsPack<T>*>(x + r * h + col0);
      const float mean = stats[2 * r], rstd = stats[2 * r + 1];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float dv = to_f(d.v[k]);
        ag[k] += dv * ((to_f(xv.v[k]) - mean) * rstd);
        ab[k] += dv;
      }
    }
  }
  if (warp < warps) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      sg[warp][lane * N + k] = ag[k];
      sb[warp][lane * N + k] = ab[k];
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < 32 * N; c += blockDim.x) {
    const int col = blockIdx.x * 32 * N + c;
    if (col < h) {
      float tg = 0.f, tb = 0.f;
      for (int w = 0; w < warps; ++w) {
        tg += sg[w][c];
        tb += sb[w][c];
      }
      part_g[col] = tg;
      part_b[col] = tb;
    }
  }
}

// out[j] = sum_r x[r, j], rows ld apart.
template <typename T>
__device__ void column_sum_body(const T* x, float* out, long long rows, int cols, long long ld) {
  __shared__ float sp[LS_COL_WARPS_MAX][33];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int col = blockIdx.x * 32 + lane;
  const long long per = (rows + gridDim.y - 1) / gridDim.y;
  const long long r0 = blockIdx.y * per, r1 = min(rows, r0 + per);
  out += (long long)blockIdx.y * cols;
  float acc = 0.f;
  if (col < cols) {
    for (long long r = r0 + warp; r < r1; r += warps) acc += to_f(x[r * ld + col]);
  }
  sp[warp][lane] = acc;
  __syncthreads();
  if (warp == 0 && col < cols) {
    float t = 0.f;
    for (int w = 0; w < warps; ++w) t += sp[w][lane];
    out[col] = t;
  }
}

// Derivative of activate(x, act) (codes as ops::Activation::code(); the CPU reference is
// train::grad::activation_grad).
__device__ __forceinline__ float activation_grad(float x, int act) {
  switch (act) {
    case 1: {  // gelu (erf)
      const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
      const float pdf = expf(-0.5f * x * x) * 0.39894228040143268f;  // 1 / sqrt(2 pi)
      return cdf + x * pdf;
    }
    case 2: {  // gelu (tanh)
      const float c = 0.79788456080286536f;  // sqrt(2 / pi)
      const float t = tanhf(c * (x + 0.044715f * x * x * x));
      return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * c * (1.f + 3.f * 0.044715f * x * x);
    }
    case 3: return x > 0.f ? 1.f : 0.f;
    case 4: {  // silu
      const float s = 1.f / (1.f + expf(-x));
      return s + x * s * (1.f - s);
    }
    case 5: {  // quick gelu
      const float s = 1.f / (1.f + expf(-1.702f * x));
      return s + 1.702f * x * s * (1.f - s);
    }
    case 6: {  // tanh
      const float t = tanhf(x);
      return 1.f - t * t;
    }
    default: return 1.f;
  }
}

// dy * activation_grad(x) per element of a pack, rounded to T (activation_backward_body).
// The product is rounded on its own (no contraction into the column sum's add), so the
// sums are of dx exactly as stored, in f32 too.
template <typename T>
__device__ __forceinline__ LsPack<T> ls_act_backward_pack(const LsPack<T>& x, const LsPack<T>& dy,
                                                        int act) {
  LsPack<T> o;
#pragma unroll
  for (int k = 0; k < 16 / (int)sizeof(T); ++k)
    o.v[k] = from_f<T>(__fmul_rn(to_f(dy.v[k]), activation_grad(to_f(x.v[k]), act)));
  return o;
}

// column_sum with 16-byte loads: lane l of a block covers columns [(32 b + l) N, + N); needs
// ld % N == 0, ld >= cols rounded up to N (a last pack may read row padding) and an
// aligned x (the host checks).
// The block's partials go to row blockIdx.y of `partial` (rows pld apart), and the last
// block of each block column writes (or with `accumulate` adds) the sums into `out`.
// With ACT, x is an activation's input (as activation_backward_body reads it) and each
// pack summed is first made dx = dy * activation_grad(x), rounded to T and stored: the
// activation's backward and the following linear's bias gradient in one pass.
template <typename T, bool ACT>
__device__ void column_sum_packed_impl(const T* x, const T* dy, T* dx, int act, float* partial,
                                       LsOuts outs, long long rows, int cols, long long ld,
                                       long long pld, int accumulate, unsigned int* counter) {
  constexpr int N = 16 / sizeof(T);
  __shared__ float sp[16][32 * N + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = min(blockDim.x >> 5, 16);
  const int col0 = (blockIdx.x * 32 + lane) * N;
  const long long per = (rows + gridDim.y - 1) / gridDim.y;
  const long long r0 = blockIdx.y * per, r1 = min(rows, r0 + per);
  float* part = partial + (long long)blockIdx.y * pld;
  float acc[N];
#pragma unroll
  for (int k = 0; k < N; ++k) acc[k] = 0.f;
  if (col0 < cols && warp < warps) {
    long long r = r0 + warp;
    // Four rows' loads in flight per step; added in row order as the one-row loop below.
    for (; r + 3ll * warps < r1; r += 4ll * warps) {
      LsPack<T> p[4];
#pragma unroll
      for (int u = 0; u < 4; ++u)
        p[u] = *reinterpret_cast<const LsPack<T>*>(x + (r + u * warps) * ld + col0);
      if (ACT) {
        LsPack<T> g[4];
#pragma unroll
        for (int u = 0; u < 4; ++u)
          g[u] = *reinterpret_cast<const LsPack<T>*>(dy + (r + u * warps) * ld + col0);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          p[u] = ls_act_backward_pack(p[u], g[u], act);
          *reinterpret_cast<LsPack<T>*>(dx + (r + u * warps) * ld + col0) = p[u];
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int k = 0; k < N; ++k) acc[k] += to_f(p[u].v[k]);
    }
    for (; r < r1; r += warps) {
      LsPack<T> p = *reinterpret_cast<const LsPack<T>*>(x + r * ld + col0);
      if (ACT) {
        p = ls_act_backward_pack(p, *reinterpret_cast<const LsPack<T>*>(dy + r * ld + col0), act);
        *reinterpret_cast<LsPack<T>*>(dx + r * ld + col0) = p;
      }
#pragma unroll
      for (int k = 0; k < N; ++k) acc[k] += to_f(p.v[k]);
    }
  }
  if (warp < warps) {
#pragma unroll
    for (int k = 0; k < N; ++k) sp[warp][lane * N + k] = acc[k];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < 32 * N; c += blockDim.x) {
    const int col = blockIdx.x * 32 * N + c;
    if (col < cols) {
      float t = 0.f;
      for (int w = 0; w < warps; ++w) t += sp[w][c];
      part[col] = t;
    }
  }
  if (ls_last_arrival(counter)) ls_sum_partials<N>(partial, pld, outs, cols, accumulate, sp, warps);
}

// The column sums go to out, out2 and out3 by LsOuts (split = cols for one output).
template <typename T>
__device__ void column_sum_packed_body(const T* x, float* partial, float* out, float* out2,
                                       float* out3, long long split, long long rows, int cols,
                                       long long ld, long long pld, int accumulate,
                                       unsigned int* counter) {
  column_sum_packed_impl<T, false>(x, nullptr, nullptr, 0, partial, LsOuts{out, out2, out3, split},
                                   rows, cols, ld, pld, accumulate, counter);
}

#define LS_COLUMN_PACKED(T, S)                                                                 \
  extern "C" __global__ void column_sum_packed_##S(                                           \
      const T* x, float* partial, float* out, float* out2, float* out3, long long split,      \
      long long rows, int cols, long long ld, long long pld, int accumulate,                  \
      unsigned int* counter) {                                                                \
    LS_PDL_WAIT();                                                                            \
    column_sum_packed_body<T>(x, partial, out, out2, out3, split, rows, cols, ld, pld,        \
                              accumulate, counter);                                           \
  }
LS_FLOAT_TYPES(LS_COLUMN_PACKED)

// dx = dy * activation_grad(pre) and `out` (+)= its column sums, as column_sum_packed (same
// grid, partials and counters; dx has pre's layout).
#define LS_ACT_BACKWARD_COLSUM(T, S)                                                           \
  extern "C" __global__ void activation_backward_colsum_##S(                                  \
      const T* pre, const T* dy, T* dx, int act, float* partial, float* out, float* out2,     \
      float* out3, long long split, long long rows, int cols, long long ld, long long pld,    \
      int accumulate, unsigned int* counter) {                                                \
    LS_PDL_WAIT();                                                                            \
    column_sum_packed_impl<T, true>(pre, dy, dx, act, partial,                                \
                                    LsOuts{out, out2, out3, split}, rows, cols, ld, pld,      \
                                    accumulate, counter);                                     \
  }
LS_FLOAT_TYPES(LS_ACT_BACKWARD_COLSUM)

template <typename T>
__device__ void activate_body(const T* x, T* y, int act, long long total) {
  LS_WITH_ACT(act, (ls_map2(x, (const T*)nullptr, y, total,
                            [](float v, float) { return activate(v, LS_A); })))
}

template <typename T>
__device__ void activation_backward_body(const T* pre, const T* dy, T* dx, int act,
                                         long long total) {
  LS_WITH_ACT(act, (ls_map2(pre, dy, dx, total,
                            [](float p, float d) { return d * activation_grad(p, LS_A); })))
}

// ---------------------------------------------------------------------------------------
// d [vocab, h] (f32: a zeroed table or a gradient accumulator) += scale * dy[i] at row
// ids[i]; other ids skipped.
template <typename T>
__device__ void embedding_backward_body(const int* ids, const T* dy, float* d, long long n, int h,
                                        int vocab, float scale) {
  const long long total = n * h;
  LS_GRID_LOOP(i, total) {
    const int id = ids[i / h];
    if (id >= 0 && id < vocab) atomicAdd(&d[(long long)id * h + i % h], scale * to_f(dy[i]));
  }
}

// d[0..4) (16-byte aligned) += (a, b, c, e): one vector atomic on sm_90, four before.
__device__ __forceinline__ void ls_atomic_add4(float* d, float a, float b, float c, float e) {
#if __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(d), make_float4(a, b, c, e));
#else
  atomicAdd(d, a);
  atomicAdd(d + 1, b);
  atomicAdd(d + 2, c);
  atomicAdd(d + 3, e);
#endif
}

// embedding_backward_body a 16-byte pack of dy a thread, for rows of whole packs (dy and d
// 16-byte aligned; the host checks), with I-bit index arithmetic: one row division a pack
// instead of one an element, and vector atomics.
template <typename T, typename I>
__device__ void embedding_backward_packed(const int* ids, const T* dy, float* d, I rows, int h,
                                          int vocab, float scale) {
  constexpr int N = 16 / sizeof(T);
  const I packs = h / N, total = rows * packs;
  for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < total; i += (I)gridDim.x * blockDim.x) {
    const I r = i / packs;
    const int id = ids[r];
    if (id < 0 || id >= vocab) continue;
    const LsPack<T> p = reinterpret_cast<const LsPack<T>*>(dy)[i];
    float* o = d + (long long)id * h + (i - r * packs) * N;
#pragma unroll
    for (int e = 0; e < N; e += 4) {
      ls_atomic_add4(o + e, scale * to_f(p.v[e]), scale * to_f(p.v[e + 1]),
                     scale * to_f(p.v[e + 2]), scale * to_f(p.v[e + 3]));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Label-smoothed cross entropy, one block per row (cpu::cross_entropy's formula):
//   loss = c_nll * nll + eps_i * sum_v (lse - z_v),  nll = lse - z_t,
//   dz_v = (a * softmax_v - [v == t] c_nll - eps_i) * grad_scale,
// with c_nll = 1 - eps - eps_i and a = c_nll + vocab * eps_i, both from the host. Rows with
// a negative target are zeros; a target >= vocab gives NaN loss and nll and zero gradients.
// The logits are read twice: once for the max, the sum of exponentials and the sum of
// (max - z) together (online, rescaled when the running max grows), once for the gradient.

// f(v, z[v]) for v < n, the aligned middle of the row in 16-byte packs.
template <typename T, typename F>
__device__ __forceinline__ void row_for_each(const T* z, int n, F f) {
  constexpr int N = 16 / sizeof(T);
  const int head = min(n, (int)(((16 - ((unsigned long long)z & 15)) & 15) / sizeof(T)));
  for (int v = threadIdx.x; v < head; v += blockDim.x) f(v, to_f(z[v]));
  const int packs = (n - head) / N;
  const LsPack<T>* zp = reinterpret_cast<const LsPack<T>*>(z + head);
  for (int q = threadIdx.x; q < packs; q += blockDim.x) {
    const LsPack<T> p = zp[q];
#pragma unroll
    for (int e = 0; e < N; ++e) f(head + q * N + e, to_f(p.v[e]));
  }
  for (int v = head + packs * N + threadIdx.x; v < n; v += blockDim.x) f(v, to_f(z[v]));
}

// g[v] = f(v, z[v]) for v < n; in 16-byte packs when z and g share their alignment.
template <typename T, typename F>
__device__ __forceinline__ void row_map(const T* z, T* g, int n, F f) {
  constexpr int N = 16 / sizeof(T);
  if ((((unsigned long long)z ^ (unsigned long long)g) & 15) != 0) {
    for (int v = threadIdx.x; v < n; v += blockDim.x) g[v] = from_f<T>(f(v, to_f(z[v])));
    return;
  }
  const int head = min(n, (int)(((16 - ((unsigned long long)z & 15)) & 15) / sizeof(T)));
  for (int v = threadIdx.x; v < head; v += blockDim.x) g[v] = from_f<T>(f(v, to_f(z[v])));
  const int packs = (n - head) / N;
  const LsPack<T>* zp = reinterpret_cast<const LsPack<T>*>(z + head);
  LsPack<T>* gp = reinterpret_cast<LsPack<T>*>(g + head);
  for (int q = threadIdx.x; q < packs; q += blockDim.x) {
    const LsPack<T> p = zp[q];
    LsPack<T> o;
#pragma unroll
    for (int e = 0; e < N; ++e) o.v[e] = from_f<T>(f(head + q * N + e, to_f(p.v[e])));
    gp[q] = o;
  }
  for (int v = head + packs * N + threadIdx.x; v < n; v += blockDim.x) {
    g[v] = from_f<T>(f(v, to_f(z[v])));
  }
}

// The two cross-entropy kernels' shared pieces. An ignored row (target < 0) has loss and
// nll 0, a target past the vocabulary NaN.
__device__ __forceinline__ void ce_ignored_row(float* loss, float* nll, long long r, int t) {
  const float val = t < 0 ? 0.f : __int_as_float(0x7fc00000);
  loss[r] = val;
  nll[r] = val;
}

// Row r's label-smoothed loss from its nll (lse - z_t) and sm = sum_v (lse - z_v).
__device__ __forceinline__ void ce_row_loss(float* loss, float* nll, long long r, float nl,
                                            float sm, float c_nll, float eps_i) {
  loss[r] = c_nll * nl + eps_i * sm;
  nll[r] = nl;
}

// The logit gradient from the probability p, at the target column or elsewhere.
__device__ __forceinline__ float ce_grad(float p, bool target, float a, float c_nll,
                                         float eps_i, float grad_scale) {
  return (a * p - (target ? c_nll : 0.f) - eps_i) * grad_scale;
}

template <typename T>
__device__ void cross_entropy_body(const T* logits, const int* targets, float* loss, float* nll,
                                   T* d, long long rows, int vocab, int ld, float c_nll,
                                   float eps_i, float a, float grad_scale) {
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* z = logits + r * ld;
    T* g = d + r * ld;
    // Columns past the vocabulary (row padding) get zero gradients.
    for (int v = vocab + threadIdx.x; v < ld; v += blockDim.x) g[v] = from_f<T>(0.f);
    const int t = targets[r];
    if (t < 0 || t >= vocab) {  // uniform over the block
      for (int v = threadIdx.x; v < vocab; v += blockDim.x) g[v] = from_f<T>(0.f);
      if (threadIdx.x == 0) ce_ignored_row(loss, nll, r, t);
      continue;
    }
    // This thread's running max m, sum of exp(z - m), sum of (m - z) (both terms of the
    // latter >= 0, so no cancellation), and count.
    float m = LS_NEG_INF, se = 0.f, sd = 0.f;
    int cnt = 0;
    row_for_each(z, vocab, [&](int, float zv) {
      if (cnt == 0) {
        m = zv;
        se = 1.f;
      } else if (zv > m) {
        se = se * expf(m - zv) + 1.f;
        sd += cnt * (zv - m);
        m = zv;
      } else {
        se += expf(zv - m);
        sd += m - zv;
      }
      ++cnt;
    });
    const float bm = block_max(cnt > 0 ? m : LS_NEG_INF);
    const float log_se = logf(block_sum(cnt > 0 ? se * expf(m - bm) : 0.f));
    const float lse = bm + log_se;
    // sum_v (lse - z_v) = vocab * (lse - bm) + sum_v (bm - z_v).
    const float sm = vocab * log_se + block_sum(cnt > 0 ? sd + cnt * (bm - m) : 0.f);
    if (threadIdx.x == 0) ce_row_loss(loss, nll, r, lse - to_f(z[t]), sm, c_nll, eps_i);
    row_map(z, g, vocab, [&](int v, float zv) {
      return ce_grad(expf(zv - lse), v == t, a, c_nll, eps_i, grad_scale);
    });
  }
}

// cross_entropy_body with the row held in registers, LS_CE_PACKS 16-byte packs a thread
// (pack q of the row in thread q % blockDim.x): the logits are read from memory once, and
// the max is found before the sums, so no running rescale is needed. Needs ld % N == 0,
// 16-byte aligned logits and d, ld <= LS_CE_PACKS * N * blockDim.x, and ld elements of
// shared memory (the host checks). Exponentials take the hardware approximation (a few
// ulp at the arguments that matter, z - max and z - lse near 0).
#define LS_CE_PACKS 8

// fmaxf(m, the largest of a pack's elements), for 16-bit types pairwise in their own
// format (exact) before one conversion.
template <typename T>
__device__ __forceinline__ float ce_pack_max(const LsPack<T>& p, float m) {
  constexpr int N = 16 / sizeof(T);
#pragma unroll
  for (int e = 0; e < N; ++e) m = fmaxf(m, to_f(p.v[e]));
  return m;
}
#if __CUDA_ARCH__ >= 800
template <>
__device__ __forceinline__ float ce_pack_max(const LsPack<__half>& p, float m) {
  const __half2* h = reinterpret_cast<const __half2*>(p.v);
  const __half2 x = __hmax2(__hmax2(h[0], h[1]), __hmax2(h[2], h[3]));
  return fmaxf(m, fmaxf(__low2float(x), __high2float(x)));
}
template <>
__device__ __forceinline__ float ce_pack_max(const LsPack<__nv_bfloat16>& p, float m) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(p.v);
  const __nv_bfloat162 x = __hmax2(__hmax2(h[0], h[1]), __hmax2(h[2], h[3]));
  return fmaxf(m, fmaxf(__low2float(x), __high2float(x)));
}
#endif

// 2^x by the hardware approximation (what __expf uses after its multiply by log2(e)).
__device__ __forceinline__ float ls_ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ce_staged_row's sums and gradient for 16-bit logits, with one exponential an element:
// e_v = 2^LS_CE_SHIFT exp(z_v - bm) is summed in f32 and kept in registers as f16 (the
// shift keeps it normal down to exp(z_v - bm) = 2^-29, and the largest, 2^15, in range),
// and the gradient is a p_v - eps_i with p_v = e_v / sum(e): one multiply-add instead of a
// second exponential. Rounding e_v to f16 costs p_v one f16 rounding (2^-11 relative)
// before the gradient's own; the target's element, where a p - c_nll may cancel, is taken
// from its logit in f32 as before. sum_v (lse - z_v) is vocab lse less the sum of the
// logits: a difference of f32 sums, whose error (~1e-7 of vocab |lse|) is small against
// the sum itself unless the logits share an offset far larger than their spread (an
// offset of 100 spreads costs the smoothing term ~1e-5 of itself). The exponent's offset
// bm log2(e) - 15 is rounded to f32: past |bm| ~ 1.1e7 (bf16 logits only; f16's largest
// is 65504) that can push the largest e_v to f16 infinity.
#define LS_CE_SHIFT 15.f

// ce_staged_row_one_exp's first pass over a thread's packs: the sums of e_v and z_v, e_v
// in place of z_v, and the target's logit zt (in the thread that holds it). With FULL every
// pack lies wholly inside the vocabulary (the row has no padding), so no element is masked.
template <bool FULL, typename T>
__device__ __forceinline__ void ce_exp_pass(LsPack<T> (&z)[LS_CE_PACKS], int packs, int vocab,
                                            int t, float c, float& se, float& sz, float& zt) {
  constexpr int N = 16 / sizeof(T);
#pragma unroll
  for (int k = 0; k < LS_CE_PACKS; ++k) {
    const int q = threadIdx.x + k * blockDim.x;
    if (q < packs) {
      if (q == t / N) {  // one thread of the block
#pragma unroll
        for (int e = 0; e < N; ++e) {
          if (q * N + e == t) zt = to_f(z[k].v[e]);
        }
      }
      const int valid = FULL ? N : min(N, vocab - q * N);
#pragma unroll
      for (int e = 0; e < N; e += 2) {
        float z0 = to_f(z[k].v[e]), z1 = to_f(z[k].v[e + 1]);
        float e0 = ls_ex2(fmaf(z0, LS_LOG2E, -c)), e1 = ls_ex2(fmaf(z1, LS_LOG2E, -c));
        if (!FULL) {  // past the vocabulary counts nothing
          if (e >= valid) e0 = z0 = 0.f;
          if (e + 1 >= valid) e1 = z1 = 0.f;
        }
        se += e0 + e1;
        sz += z0 + z1;
        // e_v replaces z_v in the registers that held it.
        reinterpret_cast<__half2*>(z[k].v)[e / 2] = __floats2half2_rn(e0, e1);
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void ce_staged_row_one_exp(
    LsPack<T> (&z)[LS_CE_PACKS], const T* z_row, LsPack<T>* gp, int packs, int vocab, int t,
    long long r, float* loss, float* nll, float c_nll, float eps_i, float a,
    float grad_scale, float bm) {
  constexpr int N = 16 / sizeof(T);
  static_assert(N == 8, "16-bit logits");
  const float c = fmaf(bm, LS_LOG2E, -LS_CE_SHIFT);
  const bool full = vocab == packs * N;
  float se = 0.f, sz = 0.f, zt = 0.f;
  if (full) {
    ce_exp_pass<true>(z, packs, vocab, t, c, se, sz, zt);
  } else {
    ce_exp_pass<false>(z, packs, vocab, t, c, se, sz, zt);
  }
  const float se_all = block_sum(se);
  const float log_se = logf(se_all) - LS_CE_SHIFT * 0.69314718055994531f;
  const float lse = bm + log_se;
  const float sm = vocab * lse - block_sum(sz);
  if (threadIdx.x == 0) ce_row_loss(loss, nll, r, lse - to_f(z_row[t]), sm, c_nll, eps_i);
  const float as = a * grad_scale, es = eps_i * grad_scale, cs = c_nll * grad_scale;
  const float k1 = as / se_all;
#pragma unroll
  for (int k = 0; k < LS_CE_PACKS; ++k) {
    const int q = threadIdx.x + k * blockDim.x;
    if (q < packs) {
      LsPack<T> o;
#pragma unroll
      for (int e = 0; e < N; e += 2) {
        const float2 pe = __half22float2(reinterpret_cast<const __half2*>(z[k].v)[e / 2]);
        o.v[e] = from_f<T>(fmaf(k1, pe.x, -es));
        o.v[e + 1] = from_f<T>(fmaf(k1, pe.y, -es));
      }
      if (!full) {  // zero past the vocabulary (row padding)
        const int valid = min(N, vocab - q * N);
#pragma unroll
        for (int e = 0; e < N; ++e) {
          if (e >= valid) o.v[e] = from_f<T>(0.f);
        }
      }
      if (q == t / N) {
#pragma unroll
        for (int e = 0; e < N; ++e) {
          if (q * N + e == t) o.v[e] = from_f<T>(fmaf(as, __expf(zt - lse), -es) - cs);
        }
      }
      gp[q] = o;
    }
  }
}

// Row r's loss, nll and gradient `gp` from its packs in z (pack q = threadIdx.x + k
// blockDim.x in z[k]) and its target t (in the vocabulary); z_row is the row in memory.
// Packs wholly inside the vocabulary skip the per-element bound; the gradient is
// a' p - eps' with the constants pre-scaled by grad_scale, and c_nll' taken off the
// target's element alone.
template <typename T>
__device__ __forceinline__ void ce_staged_row(LsPack<T> (&z)[LS_CE_PACKS], const T* z_row,
                                              LsPack<T>* gp, int packs, int vocab, int t,
                                              long long r, float* loss, float* nll, float c_nll,
                                              float eps_i, float a, float grad_scale) {
  constexpr int N = 16 / sizeof(T);
  float m = LS_NEG_INF;
#pragma unroll
  for (int k = 0; k < LS_CE_PACKS; ++k) {
    const int q = threadIdx.x + k * blockDim.x;
    if (q < packs) {
      if ((q + 1) * N <= vocab) {
        m = ce_pack_max(z[k], m);
      } else {
#pragma unroll
        for (int e = 0; e < N; ++e) {
          if (q * N + e < vocab) m = fmaxf(m, to_f(z[k].v[e]));
        }
      }
    }
  }
  const float bm = block_max(m);
  // 16-bit logits: one exponential an element, kept in f16. f32 logits: the exponentials
  // stay f32, computed twice (the f32 path must match the CPU to 1e-4).
  if constexpr (sizeof(T) == 2) {
    ce_staged_row_one_exp(z, z_row, gp, packs, vocab, t, r, loss, nll, c_nll, eps_i, a,
                          grad_scale, bm);
    return;
  }
  // Sums of exp(z - bm) and of (bm - z) >= 0 over the vocabulary.
  float se = 0.f, sd = 0.f;
#pragma unroll
  for (int k = 0; k < LS_CE_PACKS; ++k) {
    const int q = threadIdx.x + k * blockDim.x;
    if (q < packs) {
      const int valid = min(N, vocab - q * N);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        if (e < valid) {
          const float zv = to_f(z[k].v[e]);
          se += __expf(zv - bm);
          sd += bm - zv;
        }
      }
    }
  }
  const float log_se = logf(block_sum(se));
  const float lse = bm + log_se;
  // sum_v (lse - z_v) = vocab * (lse - bm) + sum_v (bm - z_v).
  const float sm = vocab * log_se + block_sum(sd);
  if (threadIdx.x == 0) ce_row_loss(loss, nll, r, lse - to_f(z_row[t]), sm, c_nll, eps_i);
  const float as = a * grad_scale, es = eps_i * grad_scale, cs = c_nll * grad_scale;
  const int tq = t / N;
#pragma unroll
  for (int k = 0; k < LS_CE_PACKS; ++k) {
    const int q = threadIdx.x + k * blockDim.x;
    if (q < packs) {
      const int valid = min(N, vocab - q * N);
      LsPack<T> o;
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const float g = fmaf(as, __expf(to_f(z[k].v[e]) - lse), -es);
        // Zero past the vocabulary (row padding).
        o.v[e] = from_f<T>(e < valid ? g : 0.f);
      }
      if (q == tq) {  // one thread of the block
#pragma unroll
        for (int e = 0; e < N; ++e) {
          if (q * N + e == t)
            o.v[e] = from_f<T>(fmaf(as, __expf(to_f(z[k].v[e]) - lse), -es) - cs);
        }
      }
      gp[q] = o;
    }
  }
}

// An ignored row's (target outside the vocabulary) zero gradient, loss and nll.
template <typename T>
__device__ __forceinline__ void ce_staged_ignored(LsPack<T>* gp, int packs, float* loss,
                                                  float* nll, long long r, int t) {
  constexpr int N = 16 / sizeof(T);
  LsPack<T> zero;
#pragma unroll
  for (int e = 0; e < N; ++e) zero.v[e] = from_f<T>(0.f);
  for (int q = threadIdx.x; q < packs; q += blockDim.x) gp[q] = zero;
  if (threadIdx.x == 0) ce_ignored_row(loss, nll, r, t);
}

// Fewer blocks than rows, each staging its next row in shared memory (ld elements,
// cp.async) while it works on the current one from registers, so the block's loads overlap
// its exponentials and stores. A thread reads back only the packs it copied, so the staging
// needs no barrier.
template <typename T>
__device__ void cross_entropy_staged_body(const T* logits, const int* targets, float* loss,
                                          float* nll, T* d, long long rows, int vocab, int ld,
                                          float c_nll, float eps_i, float a, float grad_scale) {
  constexpr int N = 16 / sizeof(T);
  extern __shared__ __align__(16) unsigned char ce_smem[];
  LsPack<T>* stage = reinterpret_cast<LsPack<T>*>(ce_smem);
  const int packs = ld / N;
  // One commit group per row (empty past the last), so every thread counts the same.
  auto issue = [&](long long r) {
    if (r < rows) {
      const LsPack<T>* zp = reinterpret_cast<const LsPack<T>*>(logits + r * ld);
#pragma unroll
      for (int k = 0; k < LS_CE_PACKS; ++k) {
        const int q = threadIdx.x + k * blockDim.x;
        if (q < packs) ls_cp16(stage + q, zp + q);
      }
    }
    ls_cp_commit();
  };
  issue(blockIdx.x);
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    ls_cp_wait<0>();
    LsPack<T> z[LS_CE_PACKS];
#pragma unroll
    for (int k = 0; k < LS_CE_PACKS; ++k) {
      const int q = threadIdx.x + k * blockDim.x;
      if (q < packs) z[k] = stage[q];
    }
    issue(r + gridDim.x);
    LsPack<T>* gp = reinterpret_cast<LsPack<T>*>(d + r * ld);
    const int t = targets[r];
    if (t < 0 || t >= vocab) {  // uniform over the block
      ce_staged_ignored(gp, packs, loss, nll, r, t);
      continue;
    }
    ce_staged_row(z, logits + r * ld, gp, packs, vocab, t, r, loss, nll, c_nll, eps_i, a,
                  grad_scale);
  }
}

// ---------------------------------------------------------------------------------------
// f64 sums of squares for the gradient norm (the host adds the partials in order).
__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(LS_FULL_MASK, v, o);
  return v;
}

// Multi-tensor forms: one launch over a table of chunks of many tensors, a block per
// chunk (the table layouts match AdamChunk / SquaresChunk in train_ops.rs).
struct AdamChunk {
  float* param;
  const void* grad;  // f32, or T where grad_t
  float* m;
  float* v;
  void* copy;  // T*, or null
  long long n;
  double step_size;  // the tensor's lr / bias correction 1, rounded to f32 as cpu::adam_step's
  double bc2_sqrt;
  long long grad_t;  // nonzero: the gradient is stored in T (as the GEMM that made it wrote it)
};

// Four consecutive T, loaded or stored as one access.
template <typename T>
struct alignas(4 * sizeof(T)) LsQuad {
  T v[4];
};

// One Adam(W) update of one element, in cpu::adam_step's order of operations (the _rn
// intrinsics keep the compiler from fusing into FMAs, so results match bit for bit).
struct AdamConsts {
  float grad_scale, decay_mul, weight_decay, b1, b2, ob1, ob2, step_size;
  double bc2_sqrt, eps;
  int decoupled;
};

__device__ __forceinline__ void adam_update(const AdamConsts& k, float& p, float g, float& m,
                                            float& v) {
  g = __fmul_rn(g, k.grad_scale);
  if (k.decoupled) {
    p = __fmul_rn(p, k.decay_mul);
  } else {
    g = __fadd_rn(g, __fmul_rn(k.weight_decay, p));
  }
  m = __fadd_rn(__fmul_rn(m, k.b1), __fmul_rn(k.ob1, g));
  v = __fadd_rn(__fmul_rn(v, k.b2), __fmul_rn(__fmul_rn(k.ob2, g), g));
  const float denom = (float)(__dadd_rn(__ddiv_rn((double)__fsqrt_rn(v), k.bc2_sqrt), k.eps));
  p = __fsub_rn(p, __fdiv_rn(__fmul_rn(k.step_size, m), denom));
}

// One Adam(W) step per chunk, on f32 buffers in place (the gradient f32, or T where the
// chunk's grad_t says); with a copy, also writes the new values rounded to T there. Four elements per thread and 16-byte loads when the chunk's
// buffers allow (a thread per element keeps too few loads in flight to reach bandwidth),
// then the tail one at a time.
template <typename T>
__device__ void adam_multi_body(const AdamChunk* chunks, float grad_scale, int decoupled,
                                float decay_mul, float weight_decay, float b1, float b2,
                                double eps) {
  const AdamChunk c = chunks[blockIdx.x];
  const AdamConsts k{grad_scale, decay_mul, weight_decay, b1, b2, 1.f - b1, 1.f - b2,
                     (float)c.step_size, c.bc2_sqrt, eps, decoupled};
  T* copy = reinterpret_cast<T*>(c.copy);
  const bool grad_t = c.grad_t != 0;
  const float* g32 = static_cast<const float*>(c.grad);
  const T* gt = static_cast<const T*>(c.grad);
  long long done = 0;
  const unsigned long long quad_t = 4 * sizeof(T) - 1;
  const bool grad_ok =
      grad_t ? ((unsigned long long)gt & quad_t) == 0 : ls_aligned16(c.grad);
  const bool packed = ls_aligned16(c.param) && grad_ok && ls_aligned16(c.m) &&
                      ls_aligned16(c.v) && ((unsigned long long)copy & quad_t) == 0;
  if (packed) {
    const long long quads = c.n / 4;
    for (long long q = threadIdx.x; q < quads; q += blockDim.x) {
      float4 p = reinterpret_cast<const float4*>(c.param)[q];
      float4 g;
      if (grad_t) {
        const LsQuad<T> h = reinterpret_cast<const LsQuad<T>*>(gt)[q];
        g = make_float4(to_f(h.v[0]), to_f(h.v[1]), to_f(h.v[2]), to_f(h.v[3]));
      } else {
        g = reinterpret_cast<const float4*>(g32)[q];
      }
      float4 m = reinterpret_cast<const float4*>(c.m)[q];
      float4 v = reinterpret_cast<const float4*>(c.v)[q];
      adam_update(k, p.x, g.x, m.x, v.x);
      adam_update(k, p.y, g.y, m.y, v.y);
      adam_update(k, p.z, g.z, m.z, v.z);
      adam_update(k, p.w, g.w, m.w, v.w);
      reinterpret_cast<float4*>(c.param)[q] = p;
      reinterpret_cast<float4*>(c.m)[q] = m;
      reinterpret_cast<float4*>(c.v)[q] = v;
      if (copy) {
        LsQuad<T> o;
        o.v[0] = from_f<T>(p.x);
        o.v[1] = from_f<T>(p.y);
        o.v[2] = from_f<T>(p.z);
        o.v[3] = from_f<T>(p.w);
        reinterpret_cast<LsQuad<T>*>(copy)[q] = o;
      }
    }
    done = quads * 4;
  }
  for (long long i = done + threadIdx.x; i < c.n; i += blockDim.x) {
    float p = c.param[i], m = c.m[i], v = c.v[i];
    adam_update(k, p, grad_t ? to_f(gt[i]) : g32[i], m, v);
    c.m[i] = m;
    c.v[i] = v;
    c.param[i] = p;
    if (copy) copy[i] = from_f<T>(p);
  }
}

struct SquaresChunk {
  const void* x;  // T*
  long long n;
};

// partial[chunk] = sum of x^2 over the chunk, in f64 (16-byte loads when x is aligned).
template <typename T>
__device__ void sum_squares_multi_body(const SquaresChunk* chunks, double* partial) {
  constexpr int N = 16 / sizeof(T);
  __shared__ double sp[32];
  const SquaresChunk c = chunks[blockIdx.x];
  const T* x = reinterpret_cast<const T*>(c.x);
  double acc = 0.0;
  long long done = 0;
  if (ls_aligned16(x)) {
    const long long packs = c.n / N;
    for (long long q = threadIdx.x; q < packs; q += blockDim.x) {
      const LsPack<T> p = reinterpret_cast<const LsPack<T>*>(x)[q];
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const double v = (double)to_f(p.v[e]);
        acc += v * v;
      }
    }
    done = packs * N;
  }
  for (long long i = done + threadIdx.x; i < c.n; i += blockDim.x) {
    const double v = (double)to_f(x[i]);
    acc += v * v;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  acc = warp_sum_d(acc);
  if (lane == 0) sp[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    double t = lane < warps ? sp[lane] : 0.0;
    t = warp_sum_d(t);
    if (lane == 0) partial[blockIdx.x] = t;
  }
}

#define LS_MULTI(T, S)                                                                         \
  extern "C" __global__ void adam_multi_##S(const AdamChunk* chunks, float grad_scale,        \
                                            int decoupled, float decay_mul,                   \
                                            float weight_decay, float b1, float b2,           \
                                            double eps) {                                     \
    LS_PDL_WAIT();                                                                            \
    adam_multi_body<T>(chunks, grad_scale, decoupled, decay_mul, weight_decay, b1, b2, eps);  \
  }                                                                                           \
  extern "C" __global__ void sum_squares_multi_##S(const SquaresChunk* chunks,                \
                                                   double* partial) {                         \
    LS_PDL_WAIT();                                                                            \
    sum_squares_multi_body<T>(chunks, partial);                                               \
  }

// ---------------------------------------------------------------------------------------
template <typename T>
__device__ void dropout_body(const T* x, T* y, float p, float keep, unsigned long long seed,
                             unsigned long long offset, long long total) {
  const long long groups = (total + 3) / 4;
  LS_GRID_LOOP(q, groups) {
    const uint4 o = ls_philox_group((unsigned long long)q, seed, offset);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const long long i = 4 * q + l;
      if (i < total) y[i] = from_f<T>(ls_philox_lane(o, l) >= p ? to_f(x[i]) * keep : 0.f);
    }
  }
}

// acc (f32) += alpha * x, in that order (no FMA, as the CPU).
template <typename T>
__device__ void add_scaled_into_body(float* acc, const T* x, float alpha, long long total) {
  LS_GRID_LOOP(i, total) { acc[i] = __fadd_rn(acc[i], __fmul_rn(alpha, to_f(x[i]))); }
}

// ---------------------------------------------------------------------------------------
#define LS_TRAIN(T, S)                                                                        \
  extern "C" __global__ void transpose_12_##S(const T* x, T* y, long long a, long long b,     \
                                              long long c, long long d) {                     \
    LS_PDL_WAIT();                                                                            \
    if (LS_FITS_32(a * b * c * d))                                                            \
      transpose_12_body<T, int>(x, y, a, b, c, d);                                            \
    else                                                                                      \
      transpose_12_body<T, long long>(x, y, a, b, c, d);                                      \
  }                                                                                           \
  extern "C" __global__ void masked_softmax_##S(const T* s, const int* key_lens, T* p,        \
                                                long long rows, int heads, int lq, int lk,    \
                                                float scale, int causal, int per_warp) {      \
    LS_PDL_WAIT();                                                                            \
    if (per_warp)                                                                             \
      masked_softmax_body<T, true>(s, key_lens, p, rows, heads, lq, lk, scale, causal);       \
    else                                                                                      \
      masked_softmax_body<T, false>(s, key_lens, p, rows, heads, lq, lk, scale, causal);      \
  }                                                                                           \
  extern "C" __global__ void softmax_backward_##S(const T* p, const T* dp, T* ds,             \
                                                  long long rows, int cols, float scale,      \
                                                  int per_warp) {                             \
    LS_PDL_WAIT();                                                                            \
    if (per_warp)                                                                             \
      softmax_backward_body<T, true>(p, dp, ds, rows, cols, scale);                           \
    else                                                                                      \
      softmax_backward_body<T, false>(p, dp, ds, rows, cols, scale);                          \
  }                                                                                           \
  extern "C" __global__ void add_layer_norm_##S(const T* x, const T* y, const T* gamma,       \
                                                const T* beta, T* s_out, T* out,              \
                                                long long rows, int h, float eps,             \
                                                int per_warp) {                               \
    LS_PDL_WAIT();                                                                            \
    if (per_warp)                                                                             \
      add_layer_norm_body<T, true>(x, y, gamma, beta, s_out, out, rows, h, eps);              \
    else                                                                                      \
      add_layer_norm_body<T, false>(x, y, gamma, beta, s_out, out, rows, h, eps);             \
  }                                                                                           \
  extern "C" __global__ void layer_norm_backward_##S(const T* x, const T* gamma, const T* dy,  \
                                                     T* dx, float* stats, long long rows,     \
                                                     int h, float eps, int per_warp) {        \
    LS_PDL_WAIT();                                                                            \
    if (per_warp)                                                                             \
      layer_norm_backward_body<T, true>(x, gamma, dy, dx, stats, rows, h, eps);               \
    else                                                                                      \
      layer_norm_backward_body<T, false>(x, gamma, dy, dx, stats, rows, h, eps);              \
  }                                                                                           \
  extern "C" __global__ void layer_norm_params_packed_##S(const T* x, const T* dy,            \
                                                          const float* stats, float* pg,      \
                                                          float* pb, long long rows, int h) { \
    LS_PDL_WAIT();                                                                            \
    layer_norm_params_packed_body<T>(x, dy, stats, pg, pb, rows, h);                          \
  }                                                                                           \
  extern "C" __global__ void layer_norm_params_##S(const T* x, const T* dy,                   \
                                                   const float* stats, float* dgamma,         \
                                                   float* dbeta, long long rows, int h) {     \
    LS_PDL_WAIT();                                                                            \
    layer_norm_params_body<T>(x, dy, stats, dgamma, dbeta, rows, h);                          \
  }                                                                                           \
  extern "C" __global__ void column_sum_##S(const T* x, float* out, long long rows,           \
                                            int cols, long long ld) {                         \
    LS_PDL_WAIT();                                                                            \
    column_sum_body<T>(x, out, rows, cols, ld);                                                \
  }                                                                                           \
  extern "C" __global__ void activate_##S(const T* x, T* y, int act, long long total) {       \
    LS_PDL_WAIT();                                                                            \
    activate_body<T>(x, y, act, total);                                                       \
  }                                                                                           \
  extern "C" __global__ void activation_backward_##S(const T* pre, const T* dy, T* dx,        \
                                                     int act, long long total) {              \
    LS_PDL_WAIT();                                                                            \
    activation_backward_body<T>(pre, dy, dx, act, total);                                     \
  }                                                                                           \
  extern "C" __global__ void embedding_backward_##S(const int* ids, const T* dy, float* d,    \
                                                    long long n, int h, int vocab,            \
                                                    float scale) {                            \
    LS_PDL_WAIT();                                                                            \
    embedding_backward_body<T>(ids, dy, d, n, h, vocab, scale);                               \
  }                                                                                           \
  extern "C" __global__ void embedding_backward_packed_##S(const int* ids, const T* dy,       \
                                                           float* d, long long n, int h,      \
                                                           int vocab, float scale) {          \
    LS_PDL_WAIT();                                                                            \
    if (LS_FITS_32(n * h))                                                                    \
      embedding_backward_packed<T, int>(ids, dy, d, (int)n, h, vocab, scale);                 \
    else                                                                                      \
      embedding_backward_packed<T, long long>(ids, dy, d, n, h, vocab, scale);                \
  }                                                                                           \
  extern "C" __global__ void cross_entropy_##S(const T* logits, const int* targets,           \
                                               float* loss, float* nll, T* d, long long rows, \
                                               int vocab, int ld, float c_nll, float eps_i,   \
                                               float a, float grad_scale) {                   \
    LS_PDL_WAIT();                                                                            \
    cross_entropy_body<T>(logits, targets, loss, nll, d, rows, vocab, ld, c_nll, eps_i, a,    \
                          grad_scale);                                                        \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(1024) cross_entropy_staged_##S(                \
      const T* logits, const int* targets, float* loss, float* nll, T* d, long long rows,     \
      int vocab, int ld, float c_nll, float eps_i, float a, float grad_scale) {               \
    LS_PDL_WAIT();                                                                            \
    cross_entropy_staged_body<T>(logits, targets, loss, nll, d, rows, vocab, ld, c_nll, eps_i, \
                                 a, grad_scale);                                              \
  }                                                                                           \
  extern "C" __global__ void dropout_##S(const T* x, T* y, float p, float keep,               \
                                         unsigned long long seed, unsigned long long offset,  \
                                         long long total) {                                   \
    LS_PDL_WAIT();                                                                            \
    dropout_body<T>(x, y, p, keep, seed, offset, total);                                      \
  }                                                                                           \
  extern "C" __global__ void add_scaled_into_##S(float* acc, const T* x, float alpha,         \
                                                 long long total) {                           \
    LS_PDL_WAIT();                                                                            \
    add_scaled_into_body<T>(acc, x, alpha, total);                                            \
  }
LS_FLOAT_TYPES(LS_TRAIN)

#define LS_TRAIN_ROWS(T, S)                                                                   \
  extern "C" __global__ void masked_softmax_rows_##S(const T* s, const int* key_lens, T* p,   \
                                                     long long rows, int heads, int lq,       \
                                                     int lk, float scale, int causal,         \
                                                     int ts) {                                \
    LS_PDL_WAIT();                                                                            \
    masked_softmax_rows<T>(s, key_lens, p, rows, heads, lq, lk, scale, causal, ts);           \
  }                                                                                           \
  extern "C" __global__ void softmax_backward_rows_##S(const T* p, const T* dp, T* ds,        \
                                                       long long rows, int cols, float scale, \
                                                       int ts) {                              \
    LS_PDL_WAIT();                                                                            \
    softmax_backward_rows<T>(p, dp, ds, rows, cols, scale, ts);                               \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(256, 4) add_layer_norm_rows_##S(               \
      const T* x, const T* y, const T* gamma, const T* beta, T* s_out, T* out, float* stats,  \
      long long rows, int h, float eps, int ts, int early) {                                  \
    add_layer_norm_rows<T>(x, y, gamma, beta, s_out, out, stats, rows, h, eps, ts,            \
                           early != 0);                                                       \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(512) layer_norm_backward_rows_##S(             \
      const T* x, const T* gamma, const T* dy, const float* stats, T* dx, float* partial,     \
      long long rows, int h, float eps, int ts) {                                             \
    LS_PDL_WAIT();                                                                            \
    layer_norm_backward_rows<T, false, LS_LNB_RP>(x, gamma, dy, stats, dx, partial, rows, h,  \
                                                 eps, ts);                                    \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(512) layer_norm_backward_rows_dsum_##S(        \
      const T* x, const T* gamma, const T* dy, const float* stats, T* dx, float* partial,     \
      long long rows, int h, float eps, int ts) {                                             \
    LS_PDL_WAIT();                                                                            \
    layer_norm_backward_rows<T, true, LS_LNB_RP>(x, gamma, dy, stats, dx, partial, rows, h,   \
                                                 eps, ts);                                    \
  }
LS_FLOAT_TYPES(LS_TRAIN_ROWS)
LS_FLOAT_TYPES(LS_MULTI)

// out[j] = sum_c partial[c, j] over c < chunks (with accumulate, out[j] += that sum), the
// columns from `split` on going to out2[j - split] instead and those from 2 split on to
// out3[j - 2 split]: block x covers 32 columns (lane = column), warp w adds chunks w,
// w + warps, ... in order, and warp 0 adds the warps' sums in order (deterministic).
__device__ void sum_chunks_body(const float* partial, float* out, float* out2, float* out3,
                                long long split, int chunks, long long cols, int accumulate) {
  __shared__ float sp[32][33];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const long long col = blockIdx.x * 32ll + lane;
  float t = 0.f;
  if (col < cols) {
    // Eight loads in flight a step, added in chunk order.
    int c = warp;
    for (; c + 7 * warps < chunks; c += 8 * warps) {
      float v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) v[u] = partial[(c + u * warps) * cols + col];
#pragma unroll
      for (int u = 0; u < 8; ++u) t += v[u];
    }
    for (; c < chunks; c += warps) t += partial[c * cols + col];
  }
  sp[warp][lane] = t;
  __syncthreads();
  if (warp == 0 && col < cols) {
    float total = 0.f;
    for (int w = 0; w < warps; ++w) total += sp[w][lane];
    float* o = LsOuts{out, out2, out3, split}.at(col);
    *o = accumulate ? __fadd_rn(*o, total) : total;
  }
}
#define LS_SUM_CHUNKS(T, S)                                                                    \
  extern "C" __global__ void sum_chunks_##S(const float* partial, float* out, float* out2,    \
                                            float* out3, long long split, int chunks,         \
                                            long long cols, int accumulate) {                 \
    LS_PDL_WAIT();                                                                            \
    sum_chunks_body(partial, out, out2, out3, split, chunks, cols, accumulate);               \
  }
LS_FLOAT_TYPES(LS_SUM_CHUNKS)
