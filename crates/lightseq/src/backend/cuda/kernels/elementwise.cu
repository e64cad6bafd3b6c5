// Element-wise kernels: bias + activation in place, addition.

// Activation A of x for an output of type T: the rational erf GELU for 16-bit outputs.
template <typename T, int A>
__device__ __forceinline__ float bias_act_value(float x) {
  return sizeof(T) == 2 && A == 1 ? ls_gelu_erf16(x) : activate(x, A);
}

template <typename T, int A>
__device__ void bias_act_with(T* y, const T* bias, long long total, int n) {
  constexpr int N = 16 / sizeof(T);
  const long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  const long long step = (long long)gridDim.x * blockDim.x;
  // 16-byte packs where everything is aligned to them.
  if (ls_aligned16(y) && total % N == 0 && (!bias || (ls_aligned16(bias) && n % N == 0))) {
    LsPack<T>* yp = reinterpret_cast<LsPack<T>*>(y);
    const LsPack<T>* bp = reinterpret_cast<const LsPack<T>*>(bias);
    const int row_packs = n / N;
    for (long long p = first; p < total / N; p += step) {
      LsPack<T> v = yp[p], b;
      if (bias) b = bp[p % row_packs];
#pragma unroll
      for (int e = 0; e < N; ++e) {
        float x = to_f(v.v[e]);
        if (bias) x += to_f(b.v[e]);
        v.v[e] = from_f<T>(bias_act_value<T, A>(x));
      }
      yp[p] = v;
    }
    return;
  }
  for (long long i = first; i < total; i += step) {
    float v = to_f(y[i]);
    if (bias) v += to_f(bias[i % n]);
    y[i] = from_f<T>(bias_act_value<T, A>(v));
  }
}

template <typename T>
__device__ void bias_act_body(T* y, const T* bias, int act, long long total, int n) {
  LS_WITH_ACT(act, (bias_act_with<T, LS_A>(y, bias, total, n)))
}

template <typename T>
__device__ void add_body(const T* a, const T* b, T* out, long long total) {
  ls_map2(a, b, out, total, [](float x, float y) { return x + y; });
}

// The parts of one packed upload (a captured graph's inputs, uploaded in one copy) and
// where each goes: part p is words [p ? end[p - 1] : 0, end[p]) of the source, copied to
// dst[p]. LS_SCATTER_PARTS is SCATTER_PARTS in ops.rs.
#define LS_SCATTER_PARTS 8
struct LsScatter {
  unsigned long long dst[LS_SCATTER_PARTS];
  int end[LS_SCATTER_PARTS];
  int parts;
};

__device__ void scatter_words_body(const int* src, const LsScatter& s) {
  const int total = s.end[s.parts - 1];
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    int p = 0;
    while (i >= s.end[p]) ++p;
    reinterpret_cast<int*>(s.dst[p])[i - (p ? s.end[p - 1] : 0)] = src[i];
  }
}

#define LS_ELEMENTWISE(T, S)                                                                  \
  extern "C" __global__ void bias_act_##S(T* y, const T* bias, int act, long long total,      \
                                          int n) {                                            \
    LS_PDL_WAIT();                                                                            \
    bias_act_body<T>(y, bias, act, total, n);                                                 \
  }                                                                                           \
  extern "C" __global__ void add_##S(const T* a, const T* b, T* out, long long total) {       \
    LS_PDL_WAIT();                                                                            \
    add_body<T>(a, b, out, total);                                                            \
  }                                                                                           \
  /* 32-bit words, whatever T: one form suffices; every dtype has it like the rest. */       \
  extern "C" __global__ void scatter_words_##S(const int* src, LsScatter s) {                 \
    LS_PDL_WAIT();                                                                            \
    scatter_words_body(src, s);                                                               \
  }
LS_FLOAT_TYPES(LS_ELEMENTWISE)

// Gated unit: x [rows, 2n] = (gate, up); out [rows, n] = act(gate) * up.
template <typename T, int A>
__device__ void glu_with(const T* x, T* out, long long total, int n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / n, c = i % n;
    const float g = to_f(x[r * 2 * n + c]), u = to_f(x[r * 2 * n + n + c]);
    out[i] = from_f<T>(activate(g, A) * u);
  }
}

template <typename T>
__device__ void glu_body(const T* x, T* out, int act, long long rows, int n) {
  LS_WITH_ACT(act, (glu_with<T, LS_A>(x, out, rows * n, n)))
}

template <typename T>
__device__ void scale_body(const T* x, T* out, float s, long long total) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    out[i] = from_f<T>(to_f(x[i]) * s);
  }
}

#define LS_GATED(T, S)                                                                        \
  extern "C" __global__ void glu_##S(const T* x, T* out, int act, long long rows, int n) {    \
    LS_PDL_WAIT();                                                                            \
    glu_body<T>(x, out, act, rows, n);                                                        \
  }                                                                                           \
  extern "C" __global__ void scale_##S(const T* x, T* out, float s, long long total) {        \
    LS_PDL_WAIT();                                                                            \
    scale_body<T>(x, out, s, total);                                                          \
  }
LS_FLOAT_TYPES(LS_GATED)

// out[i, :] = x[idx[i], :] for rows of `row` elements.
template <typename T>
__device__ void index_select_body(const T* x, const int* idx, T* out, long long n_out, long long row) {
  const long long total = n_out * row;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    out[i] = x[(long long)idx[i / row] * row + i % row];
  }
}

// dst[b, dst_row + t, dst_col + c] = src[b, t, src_col + c] for c < width.
template <typename T>
__device__ void write_rows_body(T* dst, const T* src, int batch, int rows, int width, int src_width,
                                int src_col, int dst_rows, int dst_width, int dst_row, int dst_col) {
  const long long total = (long long)batch * rows * width;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long c = i % width, bt = i / width;
    const long long t = bt % rows, b = bt / rows;
    dst[(b * dst_rows + dst_row + t) * dst_width + dst_col + c] = src[bt * src_width + src_col + c];
  }
}

#define LS_ROWS(T, S)                                                                          \
  extern "C" __global__ void index_select_##S(const T* x, const int* idx, T* out,              \
                                              long long n_out, long long row) {                \
    LS_PDL_WAIT();                                                                             \
    index_select_body<T>(x, idx, out, n_out, row);                                             \
  }                                                                                            \
  /* dst_row_at: when non-null, the destination row is read there (captured steps). */     \
  extern "C" __global__ void write_rows_##S(T* dst, const T* src, const int* dst_row_at,     \
                                            int batch, int rows, int width, int src_width,     \
                                            int src_col, int dst_rows, int dst_width,          \
                                            int dst_row, int dst_col) {                        \
    LS_PDL_WAIT();                                                                             \
    write_rows_body<T>(dst, src, batch, rows, width, src_width, src_col, dst_rows, dst_width,  \
                       dst_row_at ? *dst_row_at : dst_row, dst_col);                           \
  }                                                                                            \
  /* Two write_rows of one source in one launch (a layer's keys and values): blockIdx.y */     \
  /* picks (dst0, src_col0) or (dst1, src_col1). */                                            \
  extern "C" __global__ void write_rows2_##S(T* dst0, T* dst1, const T* src,                  \
                                             const int* dst_row_at, int batch, int rows,       \
                                             int width, int src_width, int src_col0,           \
                                             int src_col1, int dst_rows, int dst_width,        \
                                             int dst_row, int dst_col) {                       \
    LS_PDL_WAIT();                                                                             \
    const bool second = blockIdx.y == 1;                                                       \
    write_rows_body<T>(second ? dst1 : dst0, src, batch, rows, width, src_width,               \
                       second ? src_col1 : src_col0, dst_rows, dst_width,                      \
                       dst_row_at ? *dst_row_at : dst_row, dst_col);                           \
  }
LS_FLOAT_TYPES(LS_ROWS)
// Integer rows (ids) use the same kernel.
LS_ROWS(int, i32)

// dst [rows, width] (contiguous) = the first `width` columns of src [rows, src_width]. A
// thread per 8 consecutive elements of dst (total = rows * width < 2^31 - 8), which it
// writes as 16-byte packs; its loads are scalar, as dst's rows start at any element. With a
// division per thread instead of two 64-bit ones per element, this packs a padded LM
// head's logits.
template <typename T>
__device__ void pack_rows_body(T* __restrict__ dst, const T* __restrict__ src, int total,
                               int width, int src_width) {
  constexpr int V = 8, PACK = 16 / sizeof(T);
  const int e0 = (blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (e0 >= total) return;
  int row = e0 / width, col = e0 - row * width;
  __align__(16) T v[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    if (e0 + i < total) v[i] = src[(long long)row * src_width + col];
    if (++col == width) {
      col = 0;
      ++row;
    }
  }
  if (e0 + V <= total) {
#pragma unroll
    for (int p = 0; p < V / PACK; ++p)
      reinterpret_cast<uint4*>(dst + e0)[p] = reinterpret_cast<const uint4*>(v)[p];
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (e0 + i < total) dst[e0 + i] = v[i];
  }
}

#define LS_PACK_ROWS(T, S)                                                                     \
  extern "C" __global__ void pack_rows_##S(T* dst, const T* src, int total, int width,         \
                                           int src_width) {                                    \
    LS_PDL_WAIT();                                                                             \
    pack_rows_body<T>(dst, src, total, width, src_width);                                      \
  }
LS_FLOAT_TYPES(LS_PACK_ROWS)

// Beam reorders of a tensor in place, through `scratch` [rows, prefix]: pass 0 gathers the
// first `prefix` elements of row idx[i] of x (rows `row_stride` elements apart) to scratch,
// pass 1 writes them back to row i. Grid (packs, rows).
template <typename T>
__device__ void reorder_prefix_body(T* x, const int* idx, T* scratch, long long row_stride,
                                    long long prefix, int pass) {
  constexpr int N = 16 / sizeof(T);
  const int i = blockIdx.y;
  T* row = x + (pass == 0 ? (long long)idx[i] : (long long)i) * row_stride;
  T* s = scratch + (long long)i * prefix;
  const long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  const long long step = (long long)gridDim.x * blockDim.x;
  if (prefix % N == 0 && row_stride % N == 0 && ls_aligned16(x) && ls_aligned16(scratch)) {
    LsPack<T>* rp = reinterpret_cast<LsPack<T>*>(row);
    LsPack<T>* sp = reinterpret_cast<LsPack<T>*>(s);
    for (long long p = first; p < prefix / N; p += step) {
      if (pass == 0)
        sp[p] = rp[p];
      else
        rp[p] = sp[p];
    }
    return;
  }
  for (long long e = first; e < prefix; e += step) {
    if (pass == 0)
      s[e] = row[e];
    else
      row[e] = s[e];
  }
}

#define LS_REORDER(T, S)                                                                       \
  extern "C" __global__ void reorder_prefix_one_##S(T* x, const int* idx, T* scratch,          \
                                                    long long row_stride, long long prefix,    \
                                                    int pass) {                                \
    LS_PDL_WAIT();                                                                             \
    reorder_prefix_body<T>(x, idx, scratch, row_stride, prefix, pass);                         \
  }
LS_FLOAT_TYPES(LS_REORDER)

// Conversions through f32: to_f32_<src> widens, from_f32_<dst> narrows (round to nearest).
#define LS_CAST(T, S)                                                                         \
  extern "C" __global__ void to_f32_##S(const T* x, float* y, long long total) {              \
    LS_PDL_WAIT();                                                                            \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;           \
         i += (long long)gridDim.x * blockDim.x)                                              \
      y[i] = to_f(x[i]);                                                                      \
  }                                                                                           \
  extern "C" __global__ void from_f32_##S(const float* x, T* y, long long total) {            \
    LS_PDL_WAIT();                                                                            \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;           \
         i += (long long)gridDim.x * blockDim.x)                                              \
      y[i] = from_f<T>(x[i]);                                                                 \
  }
LS_FLOAT_TYPES(LS_CAST)
