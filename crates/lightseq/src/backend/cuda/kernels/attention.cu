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
    attention_body<T>(q, k, v, out, key_start, key_end, len_q, heads, group, head_dim, q_bs,   \
                      q_rs, k_bs, k_rs, v_bs, v_rs, causal, q_offset, window, scale,           \
                      bias_table, buckets);                                                    \
  }
LS_FLOAT_TYPES(LS_ATTENTION)
