// Search on the device: per row, log-softmax statistics and the k best tokens, so only
// k (value, index) pairs per row cross to the host. One block per row.
//
// Order: larger value first, ties to the lower index (a stable top-k). With `mask_rows`
// set for a row, the listed EOS ids are excluded (their log-probability is -inf), as HF's
// min-length processor does on log-probabilities.

struct ValIdx {
  float v;
  int i;
};

__device__ __forceinline__ bool before(float v, int i, float w, int j) {
  return v > w || (v == w && i < j);
}

__device__ ValIdx block_best(ValIdx x) {
  __shared__ float sv[32];
  __shared__ int si[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(LS_FULL_MASK, x.v, o);
    const int j = __shfl_xor_sync(LS_FULL_MASK, x.i, o);
    if (before(w, j, x.v, x.i)) {
      x.v = w;
      x.i = j;
    }
  }
  __syncthreads();
  if (lane == 0) {
    sv[warp] = x.v;
    si[warp] = x.i;
  }
  __syncthreads();
  const int warps = blockDim.x >> 5;
  x.v = lane < warps ? sv[lane] : LS_NEG_INF;
  x.i = lane < warps ? si[lane] : 0x7fffffff;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(LS_FULL_MASK, x.v, o);
    const int j = __shfl_xor_sync(LS_FULL_MASK, x.i, o);
    if (before(w, j, x.v, x.i)) {
      x.v = w;
      x.i = j;
    }
  }
  return x;
}

__device__ __forceinline__ float block_max(float v) {
  ValIdx x = {v, 0};
  return block_best(x).v;
}

template <typename T>
__device__ void logprob_topk_body(const T* logits, int vocab, int k, const int* mask_rows,
                                  const int* eos, int n_eos, float* out_v, int* out_i,
                                  float* out_lse) {
  const long long row = blockIdx.x;
  const T* x = logits + row * vocab;
  const bool masked = mask_rows && mask_rows[row];
  auto value = [&](int j) -> float {
    if (masked) {
      for (int e = 0; e < n_eos; ++e)
        if (eos[e] == j) return LS_NEG_INF;
    }
    return to_f(x[j]);
  };
  // log-sum-exp over the whole row (masking does not renormalize, as in HF).
  float m = LS_NEG_INF;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, to_f(x[j]));
  m = block_max(m);
  float s = 0.f;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(to_f(x[j]) - m);
  const float lse = m + logf(block_sum(s));
  // k rounds of a block-wide best, each after the previous in (value desc, index asc) order.
  float pv = LS_POS_INF;
  int pi = -1;
  for (int t = 0; t < k; ++t) {
    ValIdx best = {LS_NEG_INF, 0x7fffffff};
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
      const float v = value(j);
      if (before(pv, pi, v, j) && before(v, j, best.v, best.i)) {
        best.v = v;
        best.i = j;
      }
    }
    best = block_best(best);
    if (threadIdx.x == 0) {
      out_v[row * k + t] = best.v - lse;
      out_i[row * k + t] = best.i;
    }
    pv = best.v;
    pi = best.i;
  }
  if (threadIdx.x == 0) out_lse[row] = lse;
}

#define LS_SEARCH(T, S)                                                                        \
  extern "C" __global__ void logprob_topk_##S(const T* logits, int vocab, int k,               \
                                              const int* mask_rows, const int* eos, int n_eos, \
                                              float* out_v, int* out_i, float* out_lse) {      \
    logprob_topk_body<T>(logits, vocab, k, mask_rows, eos, n_eos, out_v, out_i, out_lse);      \
  }
LS_FLOAT_TYPES(LS_SEARCH)
