// Attention with an online softmax: no [len x len] buffer, any sequence length.
// One warp per query row, ATT_WARPS rows per block; grid (ceil(Lq / ATT_WARPS), heads, batch).
// Keys are visited 32 at a time: each lane scores one key, the warp updates the running max
// and sum, then every lane accumulates head_dim / 32 output dimensions from the 32 values.
// Sequence b has lengths[b] valid keys; with `causal`, query i sees keys j <= i.

#define ATT_WARPS 4
#define ATT_MAX_DIM_PER_LANE 8  // head_dim <= 256

template <typename T>
__device__ void attention_body(const T* q, const T* k, const T* v, T* out, const int* lengths,
                               int len_q, int head_dim, long long q_bstride, int q_rstride,
                               long long kv_bstride, int kv_rstride, long long o_bstride,
                               int o_rstride, int causal, float scale) {
  extern __shared__ float q_smem[];  // [ATT_WARPS, head_dim]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int b = blockIdx.z, h = blockIdx.y;
  const int i = blockIdx.x * ATT_WARPS + warp;
  if (i >= len_q) return;
  float* qs = q_smem + warp * head_dim;
  const T* q_row = q + b * q_bstride + (long long)i * q_rstride + h * head_dim;
  for (int d = lane; d < head_dim; d += 32) qs[d] = to_f(q_row[d]) * scale;
  __syncwarp();

  const int n = lengths[b];
  const int n_keys = causal ? min(n, i + 1) : n;
  const T* k_base = k + b * kv_bstride + h * head_dim;
  const T* v_base = v + b * kv_bstride + h * head_dim;
  float acc[ATT_MAX_DIM_PER_LANE];
#pragma unroll
  for (int t = 0; t < ATT_MAX_DIM_PER_LANE; ++t) acc[t] = 0.f;
  float run_max = LS_NEG_INF, run_sum = 0.f;

  for (int j0 = 0; j0 < n_keys; j0 += 32) {
    const int j = j0 + lane;
    float s = LS_NEG_INF;
    if (j < n_keys) {
      const T* k_row = k_base + (long long)j * kv_rstride;
      float dot = 0.f;
      for (int d = 0; d < head_dim; ++d) dot += qs[d] * to_f(k_row[d]);
      s = dot;
    }
    const float new_max = fmaxf(run_max, warp_max(s));
    const float p = j < n_keys ? expf(s - new_max) : 0.f;
    const float correction = expf(run_max - new_max);
    run_sum = run_sum * correction + warp_sum(p);
#pragma unroll
    for (int t = 0; t < ATT_MAX_DIM_PER_LANE; ++t) acc[t] *= correction;
    const int count = min(32, n_keys - j0);
    for (int jj = 0; jj < count; ++jj) {
      const float pj = __shfl_sync(LS_FULL_MASK, p, jj);
      const T* v_row = v_base + (long long)(j0 + jj) * kv_rstride;
#pragma unroll
      for (int t = 0; t < ATT_MAX_DIM_PER_LANE; ++t) {
        const int d = lane + 32 * t;
        if (d < head_dim) acc[t] += pj * to_f(v_row[d]);
      }
    }
    run_max = new_max;
  }

  T* o_row = out + b * o_bstride + (long long)i * o_rstride + h * head_dim;
  const float inv = run_sum > 0.f ? 1.f / run_sum : 0.f;
#pragma unroll
  for (int t = 0; t < ATT_MAX_DIM_PER_LANE; ++t) {
    const int d = lane + 32 * t;
    if (d < head_dim) o_row[d] = from_f<T>(acc[t] * inv);
  }
}

#define LS_ATTENTION(T, S)                                                                    \
  extern "C" __global__ void attention_##S(                                                   \
      const T* q, const T* k, const T* v, T* out, const int* lengths, int len_q, int head_dim, \
      long long q_bstride, int q_rstride, long long kv_bstride, int kv_rstride,               \
      long long o_bstride, int o_rstride, int causal, float scale) {                          \
    attention_body<T>(q, k, v, out, lengths, len_q, head_dim, q_bstride, q_rstride,           \
                      kv_bstride, kv_rstride, o_bstride, o_rstride, causal, scale);           \
  }
LS_FLOAT_TYPES(LS_ATTENTION)
