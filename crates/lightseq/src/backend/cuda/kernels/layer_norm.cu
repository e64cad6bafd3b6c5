// Layer normalization of (x + residual) over rows of length h, a block a row, two passes
// (mean, then variance about the mean) with f32 sums: layer_norm_packed for rows of whole
// 16-byte packs (a thread a pack, at any row count), layer_norm for other widths below
// 1024 rows (from there they go through train.cu's register-cached add_layer_norm). With
// `early`, gamma and beta (a thread's first LN_EARLY elements, or its pack) are read
// before the wait for the kernel before (the host passes it where no kernel has written
// them since their upload).

#define LN_EARLY 4

template <typename T>
__device__ void layer_norm_body(const T* x, const T* res, const T* gamma, const T* beta, T* out,
                                int h, float eps, bool early) {
  float ge[LN_EARLY], be[LN_EARLY];
  auto load_params = [&] {
#pragma unroll
    for (int i = 0; i < LN_EARLY; ++i) {
      const int j = threadIdx.x + i * blockDim.x;
      ge[i] = j < h ? to_f(gamma[j]) : 0.f;
      be[i] = j < h ? to_f(beta[j]) : 0.f;
    }
  };
  if (early) load_params();
  LS_PDL_WAIT();
  if (!early) load_params();
  const long long base = (long long)blockIdx.x * h;
  x += base;
  out += base;
  if (res) res += base;
  float s = 0.f;
  for (int j = threadIdx.x; j < h; j += blockDim.x) s += to_f(x[j]) + (res ? to_f(res[j]) : 0.f);
  const float mean = block_sum(s) / h;
  float s2 = 0.f;
  for (int j = threadIdx.x; j < h; j += blockDim.x) {
    const float d = to_f(x[j]) + (res ? to_f(res[j]) : 0.f) - mean;
    s2 += d * d;
  }
  const float inv = rsqrtf(block_sum(s2) / h + eps);
#pragma unroll
  for (int i = 0; i < LN_EARLY; ++i) {
    const int j = threadIdx.x + i * blockDim.x;
    if (j < h) {
      const float v = to_f(x[j]) + (res ? to_f(res[j]) : 0.f);
      out[j] = from_f<T>((v - mean) * inv * ge[i] + be[i]);
    }
  }
  for (int j = threadIdx.x + LN_EARLY * blockDim.x; j < h; j += blockDim.x) {
    const float v = to_f(x[j]) + (res ? to_f(res[j]) : 0.f);
    out[j] = from_f<T>((v - mean) * inv * to_f(gamma[j]) + to_f(beta[j]));
  }
}

// The arguments of both kernels (the host picks one).
#define LS_LAYER_NORM_ARGS(T) \
  const T *x, const T *res, const T *gamma, const T *beta, T *out, int h, float eps, int early

// layer_norm_body for rows of whole 16-byte packs, a pack a thread (blockDim.x >= h / N,
// N elements a pack): each thread loads its pack of x (and of the residual) once, holds
// it in registers through both sums, and stores its pack of the output, so a row costs
// one round of 16-byte loads instead of a scalar load per element and pass.
template <typename T>
__device__ void layer_norm_packed_body(const T* x, const T* res, const T* gamma,
                                       const T* beta, T* out, int h, float eps, bool early) {
  constexpr int N = 16 / sizeof(T);
  const int packs = h / N, p = threadIdx.x;
  const bool on = p < packs;
  LsPack<T> g, b;
  auto load_params = [&] {
    if (on) {
      g = reinterpret_cast<const LsPack<T>*>(gamma)[p];
      b = reinterpret_cast<const LsPack<T>*>(beta)[p];
    }
  };
  if (early) load_params();
  LS_PDL_WAIT();
  if (!early) load_params();
  const long long base = (long long)blockIdx.x * packs;
  float v[N];
  float s = 0.f;
  if (on) {
    const LsPack<T> xv = reinterpret_cast<const LsPack<T>*>(x)[base + p];
    LsPack<T> rv;
    if (res) rv = reinterpret_cast<const LsPack<T>*>(res)[base + p];
#pragma unroll
    for (int e = 0; e < N; ++e) {
      v[e] = to_f(xv.v[e]) + (res ? to_f(rv.v[e]) : 0.f);
      s += v[e];
    }
  }
  const float mean = block_sum(s) / h;
  float s2 = 0.f;
  if (on) {
#pragma unroll
    for (int e = 0; e < N; ++e) s2 += (v[e] - mean) * (v[e] - mean);
  }
  const float inv = rsqrtf(block_sum(s2) / h + eps);
  if (on) {
    LsPack<T> o;
#pragma unroll
    for (int e = 0; e < N; ++e) o.v[e] = from_f<T>((v[e] - mean) * inv * to_f(g.v[e]) + to_f(b.v[e]));
    reinterpret_cast<LsPack<T>*>(out)[base + p] = o;
  }
}

// Packs a lane of layer_norm_warp holds: rows of up to 32 LN_WARP_PACKS packs.
#define LN_WARP_PACKS 4

// layer_norm_packed_body with a warp a row (blockDim.x / 32 rows a block, `rows` in all):
// lane l holds packs l, l + 32, ... of its row, all loads issued before any sum, and the
// sums are warp shuffles, with no barrier. For many rows, where a block a row leaves most
// of a row's threads waiting on barriers. gamma and beta are read after the sums, so that
// the row's values and the parameters are not all held at once (`early` is unused).
template <typename T>
__device__ void layer_norm_warp_body(const T* x, const T* res, const T* gamma, const T* beta,
                                     T* out, int h, float eps, int rows) {
  constexpr int N = 16 / sizeof(T);
  constexpr int P = LN_WARP_PACKS;
  const int packs = h / N, lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  LS_PDL_WAIT();
  if (row >= rows) return;
  const long long base = (long long)row * packs;
  LsPack<T> xv[P], rv[P];
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int p = lane + 32 * i;
    if (p < packs) {
      xv[i] = reinterpret_cast<const LsPack<T>*>(x)[base + p];
      if (res) rv[i] = reinterpret_cast<const LsPack<T>*>(res)[base + p];
    }
  }
  float v[P][N];
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const bool on = lane + 32 * i < packs;
#pragma unroll
    for (int e = 0; e < N; ++e) {
      v[i][e] = on ? to_f(xv[i].v[e]) + (res ? to_f(rv[i].v[e]) : 0.f) : 0.f;
      s += v[i][e];
    }
  }
  const float mean = warp_sum(s) / h;
  float s2 = 0.f;
#pragma unroll
  for (int i = 0; i < P; ++i) {
    if (lane + 32 * i < packs) {
#pragma unroll
      for (int e = 0; e < N; ++e) s2 += (v[i][e] - mean) * (v[i][e] - mean);
    }
  }
  const float inv = rsqrtf(warp_sum(s2) / h + eps);
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int p = lane + 32 * i;
    if (p < packs) {
      const LsPack<T> g = reinterpret_cast<const LsPack<T>*>(gamma)[p];
      const LsPack<T> b = reinterpret_cast<const LsPack<T>*>(beta)[p];
      LsPack<T> o;
#pragma unroll
      for (int e = 0; e < N; ++e)
        o.v[e] = from_f<T>((v[i][e] - mean) * inv * to_f(g.v[e]) + to_f(b.v[e]));
      reinterpret_cast<LsPack<T>*>(out)[base + p] = o;
    }
  }
}

// layer_norm_packed has a thread a pack: at most 1024 packs (the host checks);
// layer_norm_warp blocks of LN_WARP_THREADS (a row a warp) and rows of at most 32
// LN_WARP_PACKS packs.
#define LN_WARP_THREADS 128
#define LS_LAYER_NORMS(T, S)                                                                  \
  extern "C" __global__ void layer_norm_##S(LS_LAYER_NORM_ARGS(T)) {                          \
    layer_norm_body<T>(x, res, gamma, beta, out, h, eps, early != 0);                         \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(1024)                                          \
      layer_norm_packed_##S(LS_LAYER_NORM_ARGS(T)) {                                          \
    layer_norm_packed_body<T>(x, res, gamma, beta, out, h, eps, early != 0);                  \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(LN_WARP_THREADS, 6)                            \
      layer_norm_warp_##S(LS_LAYER_NORM_ARGS(T), int rows) {                                  \
    layer_norm_warp_body<T>(x, res, gamma, beta, out, h, eps, rows);                          \
  }
LS_FLOAT_TYPES(LS_LAYER_NORMS)

// RMS normalization of (x + residual): v / sqrt(mean(v^2) + eps) * gamma.
template <typename T>
__device__ void rms_norm_body(const T* x, const T* res, const T* gamma, T* out, int h, float eps) {
  const long long base = (long long)blockIdx.x * h;
  x += base;
  out += base;
  if (res) res += base;
  float s2 = 0.f;
  for (int j = threadIdx.x; j < h; j += blockDim.x) {
    const float v = to_f(x[j]) + (res ? to_f(res[j]) : 0.f);
    s2 += v * v;
  }
  const float inv = rsqrtf(block_sum(s2) / h + eps);
  for (int j = threadIdx.x; j < h; j += blockDim.x) {
    const float v = to_f(x[j]) + (res ? to_f(res[j]) : 0.f);
    out[j] = from_f<T>(v * inv * to_f(gamma[j]));
  }
}

#define LS_RMS_NORM(T, S)                                                                     \
  extern "C" __global__ void rms_norm_##S(const T* x, const T* res, const T* gamma, T* out,   \
                                          int h, float eps) {                                 \
    LS_PDL_WAIT();                                                                            \
    rms_norm_body<T>(x, res, gamma, out, h, eps);                                             \
  }
LS_FLOAT_TYPES(LS_RMS_NORM)
