// Search on the device: per row, log-softmax statistics and the k best tokens, so only
// k (value, index) pairs per row cross to the host. One block per row.
//
// Order: larger value first, ties to the lower index (a stable top-k). With `mask_rows`
// set for a row, the listed EOS ids are excluded (their log-probability is -inf), as HF's
// min-length processor does on log-probabilities.
//
// Selection is a radix select: four passes of 8-bit digit histograms over order-preserving
// integer keys find the k-th largest key K; the keys above K are gathered, then the keys
// equal to K in index order until k are held, and the k are ranked. About seven reads of
// the row (which stays in L2) instead of the k full scans of a selection by rounds.

// Larger floats give larger keys (-inf included).
__device__ __forceinline__ unsigned int order_key(float v) {
  const unsigned int u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ bool before(float v, int i, float w, int j) {
  return v > w || (v == w && i < j);
}

// Output: out[row * k + t] log-probabilities, then (from out + rows * k) the ids as int
// bits, then (from out + 2 * rows * k) each row's log-sum-exp: one buffer, one download.
template <typename T>
__device__ void logprob_topk_body(const T* logits, int rows, int vocab, int k,
                                  const int* mask_rows, const int* eos, int n_eos, float* out) {
  extern __shared__ unsigned char topk_smem[];
  float* cand_v = reinterpret_cast<float*>(topk_smem);
  int* cand_i = reinterpret_cast<int*>(cand_v + k);
  __shared__ unsigned int hist[256];
  __shared__ unsigned int s_digit, s_above;
  __shared__ int s_count, s_warp[32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nt = blockDim.x;
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

  // Log-sum-exp over the whole row (masking does not renormalize, as in HF), online.
  float m = LS_NEG_INF, s = 0.f;
  for (int j = tid; j < vocab; j += nt) {
    const float v = to_f(x[j]);
    if (v == LS_NEG_INF) continue;
    if (v > m) {
      s = s * expf(m - v) + 1.f;
      m = v;
    } else {
      s += expf(v - m);
    }
  }
  const float bm = block_max(m);
  const float lse = bm + logf(block_sum(m == LS_NEG_INF ? 0.f : s * expf(m - bm)));

  // Radix select of the k-th largest key: `prefix` holds its digits found so far, `need`
  // how many of the keys matching the prefix are still to be taken.
  unsigned int prefix = 0, known = 0;
  int need = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += nt) hist[i] = 0;
    __syncthreads();
    // Most keys share their high digits, so lanes with the same bin add once together
    // (same-address shared atomics within a warp serialize).
    for (int base = 0; base < vocab; base += nt) {
      const int j = base + tid;
      const unsigned int key = j < vocab ? order_key(value(j)) : 0u;
      const bool in = j < vocab && (key & known) == prefix;
      const unsigned int bin = in ? (key >> shift) & 255u : 256u;
      const unsigned int peers = __match_any_sync(LS_FULL_MASK, bin);
      if (in && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
    }
    __syncthreads();
    if (tid == 0) {
      unsigned int above = 0;
      int d = 255;
      for (; d > 0; --d) {
        if (above + hist[d] >= (unsigned int)need) break;
        above += hist[d];
      }
      s_digit = d;
      s_above = above;
    }
    __syncthreads();
    prefix |= s_digit << shift;
    known |= 255u << shift;
    need -= (int)s_above;
  }
  const unsigned int K = prefix;

  // Keys above K: k - need of them, in any order.
  if (tid == 0) s_count = 0;
  __syncthreads();
  for (int j = tid; j < vocab; j += nt) {
    const float v = value(j);
    if (order_key(v) > K) {
      const int p = atomicAdd(&s_count, 1);
      cand_v[p] = v;
      cand_i[p] = j;
    }
  }
  __syncthreads();
  // Keys equal to K, lowest indices first, until `need` are held.
  const int base_slot = k - need;
  int taken = 0;
  for (int base = 0; base < vocab && taken < need; base += nt) {
    const int j = base + tid;
    const float v = j < vocab ? value(j) : LS_NEG_INF;
    const bool hit = j < vocab && order_key(v) == K;
    const unsigned int ballot = __ballot_sync(LS_FULL_MASK, hit);
    if (lane == 0) s_warp[warp] = __popc(ballot);
    __syncthreads();
    int before_me = __popc(ballot & ((1u << lane) - 1u)), total = 0;
    for (int w = 0; w < (nt >> 5); ++w) {
      if (w < warp) before_me += s_warp[w];
      total += s_warp[w];
    }
    const int pos = taken + before_me;
    if (hit && pos < need) {
      cand_v[base_slot + pos] = v;
      cand_i[base_slot + pos] = j;
    }
    taken += total;
    __syncthreads();
  }
  __syncthreads();

  // Rank the k candidates.
  float* out_v = out;
  int* out_i = reinterpret_cast<int*>(out + (long long)rows * k);
  float* out_lse = out + 2LL * rows * k;
  for (int t = tid; t < k; t += nt) {
    const float v = cand_v[t];
    const int i = cand_i[t];
    int rank = 0;
    for (int u = 0; u < k; ++u) rank += before(cand_v[u], cand_i[u], v, i);
    out_v[row * k + rank] = v - lse;
    out_i[row * k + rank] = i;
  }
  if (tid == 0) out_lse[row] = lse;
}

#define LS_SEARCH(T, S)                                                                        \
  extern "C" __global__ void logprob_topk_##S(const T* logits, int rows, int vocab, int k,     \
                                              const int* mask_rows, const int* eos, int n_eos, \
                                              float* out) {                                    \
    logprob_topk_body<T>(logits, rows, vocab, k, mask_rows, eos, n_eos, out);                  \
  }
LS_FLOAT_TYPES(LS_SEARCH)
