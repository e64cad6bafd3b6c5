// Element-wise kernels: bias + activation in place, addition.

template <typename T>
__device__ void bias_act_body(T* y, const T* bias, int act, long long total, int n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    float v = to_f(y[i]);
    if (bias) v += to_f(bias[i % n]);
    y[i] = from_f<T>(activate(v, act));
  }
}

template <typename T>
__device__ void add_body(const T* a, const T* b, T* out, long long total) {
  ls_map2(a, b, out, total, [](float x, float y) { return x + y; });
}

#define LS_ELEMENTWISE(T, S)                                                                  \
  extern "C" __global__ void bias_act_##S(T* y, const T* bias, int act, long long total,      \
                                          int n) {                                            \
    bias_act_body<T>(y, bias, act, total, n);                                                 \
  }                                                                                           \
  extern "C" __global__ void add_##S(const T* a, const T* b, T* out, long long total) {       \
    add_body<T>(a, b, out, total);                                                            \
  }
LS_FLOAT_TYPES(LS_ELEMENTWISE)

// Gated unit: x [rows, 2n] = (gate, up); out [rows, n] = act(gate) * up.
template <typename T>
__device__ void glu_body(const T* x, T* out, int act, long long rows, int n) {
  const long long total = rows * n;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / n, c = i % n;
    const float g = to_f(x[r * 2 * n + c]), u = to_f(x[r * 2 * n + n + c]);
    out[i] = from_f<T>(activate(g, act) * u);
  }
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
    glu_body<T>(x, out, act, rows, n);                                                        \
  }                                                                                           \
  extern "C" __global__ void scale_##S(const T* x, T* out, float s, long long total) {        \
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
    index_select_body<T>(x, idx, out, n_out, row);                                             \
  }                                                                                            \
  /* dst_row_at: when non-null, the destination row is read there (captured steps). */     \
  extern "C" __global__ void write_rows_##S(T* dst, const T* src, const int* dst_row_at,     \
                                            int batch, int rows, int width, int src_width,     \
                                            int src_col, int dst_rows, int dst_width,          \
                                            int dst_row, int dst_col) {                        \
    write_rows_body<T>(dst, src, batch, rows, width, src_width, src_col, dst_rows, dst_width,  \
                       dst_row_at ? *dst_row_at : dst_row, dst_col);                           \
  }
LS_FLOAT_TYPES(LS_ROWS)
// Integer rows (ids) use the same kernel.
LS_ROWS(int, i32)

// Conversions through f32: to_f32_<src> widens, from_f32_<dst> narrows (round to nearest).
#define LS_CAST(T, S)                                                                         \
  extern "C" __global__ void to_f32_##S(const T* x, float* y, long long total) {              \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;           \
         i += (long long)gridDim.x * blockDim.x)                                              \
      y[i] = to_f(x[i]);                                                                      \
  }                                                                                           \
  extern "C" __global__ void from_f32_##S(const float* x, T* y, long long total) {            \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;           \
         i += (long long)gridDim.x * blockDim.x)                                              \
      y[i] = from_f<T>(x[i]);                                                                 \
  }
LS_FLOAT_TYPES(LS_CAST)
