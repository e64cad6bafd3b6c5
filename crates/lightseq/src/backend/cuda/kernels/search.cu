// Search on the device: per row, log-softmax statistics and the k best tokens, so only
// k (value, index) pairs per row cross to the host. Either a block per row (the radix
// select below) or a block per slice of a row and then one per row (further down).
//
// Order: larger value first, ties to the lower index (a stable top-k). With `mask_rows`
// set for a row, the listed EOS ids are excluded (their log-probability is -inf), as HF's
// min-length processor does: on log-probabilities (flag 1, beam search), or on logits
// before the softmax, so that the row's log-sum-exp leaves them out (flag 2, greedy
// search and sampling).
//
// The row-per-block selection is a radix select: four passes of 8-bit digit histograms over order-preserving
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

// Adds w * exp(v) to a running log-sum-exp held as (max m, sum s of exp(x - m)), online;
// v = -inf adds nothing.
__device__ __forceinline__ void lse_add(float& m, float& s, float v, float w) {
  if (v == LS_NEG_INF) return;
  if (v > m) {
    s = s * expf(m - v) + w;
    m = v;
  } else {
    s += w * expf(v - m);
  }
}

// The block's (max, sum of exp(x - max)) from each thread's lse_add pair; every thread of
// the block calls it and gets them.
__device__ __forceinline__ float2 block_lse_pair(float m, float s) {
  const float bm = block_max(m);
  return make_float2(bm, block_sum(m == LS_NEG_INF ? 0.f : s * expf(m - bm)));
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
  // mask_rows: 0 unmasked, 1 masked, 2 masked and renormalized.
  const bool masked = mask_rows && mask_rows[row];
  const bool renorm = masked && mask_rows[row] == 2;
  auto value = [&](int j) -> float {
    if (masked) {
      for (int e = 0; e < n_eos; ++e)
        if (eos[e] == j) return LS_NEG_INF;
    }
    return to_f(x[j]);
  };

  // Log-sum-exp over the whole row, online; over the unmasked tokens when renormalizing
  // (HF's greedy search and sampling mask logits, its beam search log-probabilities).
  float m = LS_NEG_INF, s = 0.f;
  for (int j = tid; j < vocab; j += nt) lse_add(m, s, renorm ? value(j) : to_f(x[j]), 1.f);
  const float2 ms = block_lse_pair(m, s);
  const float lse = ms.x + logf(ms.y);

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
    LS_PDL_WAIT();                                                                             \
    logprob_topk_body<T>(logits, rows, vocab, k, mask_rows, eos, n_eos, out);                  \
  }
LS_FLOAT_TYPES(LS_SEARCH)

// The same results for k <= 64 in two stages that use the whole GPU at any row count:
// logprob_topk_slices gives each (slice of TK_SLICE tokens, row) a block, which keeps the
// slice's k best keys (sorted) and its log-sum-exp statistics; logprob_topk_merge merges a
// row's slices' lists into its k best. A 64-bit key orders (value, index) as the output
// does: the order key of the value above, the complement of the index below (ties to the
// lower index).
#define TK_SLICE 2048
// Threads of a slice block, and the keys each holds (TK_SLICE / TK_SLICE_THREADS).
#define TK_SLICE_THREADS 256
#define TK_LIST 8
#define TK_MAX_K 64

__device__ __forceinline__ unsigned long long tk_key(float v, int j) {
  return ((unsigned long long)order_key(v) << 32) | (0xffffffffu - (unsigned int)j);
}

__device__ __forceinline__ float tk_value(unsigned long long key) {
  const unsigned int u = (unsigned int)(key >> 32);
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

__device__ __forceinline__ int tk_index(unsigned long long key) {
  return (int)(0xffffffffu - (unsigned int)(key & 0xffffffffu));
}

// Max of a 64-bit key over the warp; every lane gets it. On sm_80 and later two integer
// reductions (the high words, then the low words of the lanes that hold the top high word)
// replace five rounds of two shuffles.
__device__ __forceinline__ unsigned long long tk_warp_max(unsigned long long v) {
#if __CUDA_ARCH__ >= 800
  const unsigned int hi = __reduce_max_sync(LS_FULL_MASK, (unsigned int)(v >> 32));
  const unsigned int lo =
      __reduce_max_sync(LS_FULL_MASK, (unsigned int)(v >> 32) == hi ? (unsigned int)v : 0u);
  return ((unsigned long long)hi << 32) | lo;
#else
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long other = __shfl_xor_sync(LS_FULL_MASK, v, o);
    v = other > v ? other : v;
  }
  return v;
#endif
}

// Sorts 8 keys, largest first: Batcher's odd-even merge network.
__device__ __forceinline__ void tk_sort8_desc(unsigned long long (&a)[8]) {
  const auto cx = [&](int i, int j) {
    const unsigned long long hi = a[i] > a[j] ? a[i] : a[j];
    a[j] = a[i] > a[j] ? a[j] : a[i];
    a[i] = hi;
  };
  cx(0, 1), cx(2, 3), cx(4, 5), cx(6, 7);
  cx(0, 2), cx(1, 3), cx(4, 6), cx(5, 7);
  cx(1, 2), cx(5, 6);
  cx(0, 4), cx(1, 5), cx(2, 6), cx(3, 7);
  cx(2, 4), cx(3, 5);
  cx(1, 2), cx(3, 4), cx(5, 6);
}

// k rounds: out[r] = the r-th largest head over the warp's lists (sorted, L keys each, 0
// past their ends), popped from the winning lane's list; 0 once every list is empty.
template <int L>
__device__ __forceinline__ void tk_warp_merge(unsigned long long (&best)[L], int k,
                                              unsigned long long* out) {
  const int lane = threadIdx.x & 31;
  for (int r = 0; r < k; ++r) {
    const unsigned long long top = tk_warp_max(best[0]);
    if (best[0] == top && top != 0ull) {
#pragma unroll
      for (int i = 0; i < L - 1; ++i) best[i] = best[i + 1];
      best[L - 1] = 0ull;
    }
    if (lane == 0) out[r] = top;
  }
}

// Max of a 64-bit key over the whole block; every thread gets it.
__device__ __forceinline__ unsigned long long block_max_key(unsigned long long v) {
  __shared__ unsigned long long partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = tk_warp_max(v);
  __syncthreads();  // a previous call may still be reading `partial`
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  return tk_warp_max(lane < (int)(blockDim.x >> 5) ? partial[lane] : 0ull);
}

// The k best keys of `lists` (shared memory, visible to the whole block: nl lists of k
// keys, each sorted largest first, 0 past its end, every key distinct), by rank, with no
// sort: place(rank, key) for every rank below k. A key's rank is its place in its own list
// plus, for every other list, how many of that list's keys beat it (a binary search). That
// count is exact for the k best (whatever beats one of them is in some list) and at least
// k for every other key. Keys below the largest k-th key of any list cannot rank below k
// and are skipped, and a key stops counting once its rank reaches k. Bitonic sorts of the
// candidates took 23 us a call for GPT2's merge (1250 keys, k = 50; ncu, H200).
template <typename Place>
__device__ __forceinline__ void tk_rank_place(const unsigned long long* lists, int nl, int k,
                                              Place place) {
  unsigned long long floor_key = 0ull;
  for (int s = threadIdx.x; s < nl; s += blockDim.x) {
    const unsigned long long kth = lists[s * k + k - 1];
    floor_key = kth > floor_key ? kth : floor_key;
  }
  floor_key = block_max_key(floor_key);
  for (int i = threadIdx.x; i < nl * k; i += blockDim.x) {
    const unsigned long long key = lists[i];
    if (key == 0ull || key < floor_key) continue;
    const int own = i / k;
    int rank = i - own * k;
    for (int s = 0; s < nl && rank < k; ++s) {
      const unsigned long long* list = lists + s * k;
      if (s == own || list[0] < key) continue;
      int lo = 1, hi = k;  // list[lo - 1] > key: find the first list[j] < key
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (list[mid] > key) lo = mid + 1;
        else hi = mid;
      }
      rank += lo;
    }
    if (rank < k) place(rank, key);
  }
}

// Lists a lane of tk_warp_kway holds.
#define TK_KWAY_LISTS 4

// The first warp's k rounds over nl <= 32 x TK_KWAY_LISTS lists (as tk_rank_place takes
// them): lane l holds the heads of lists l, l + 32, ... in registers; a round takes the
// warp-wide max and the lane that held it reads that list's next key. place(r, key) for
// r < k. With 25 lists of 50 (GPT2) the ranks' binary searches, one dependent shared load
// after another and divergent across a warp, took 42-45 us a call (ncu, H200).
template <typename Place>
__device__ __forceinline__ void tk_warp_kway(const unsigned long long* lists, int nl, int k,
                                             Place place) {
  const int lane = threadIdx.x & 31;
  int pos[TK_KWAY_LISTS];
  unsigned long long head[TK_KWAY_LISTS];
#pragma unroll
  for (int o = 0; o < TK_KWAY_LISTS; ++o) {
    const int s = lane + 32 * o;
    pos[o] = 0;
    head[o] = s < nl ? lists[s * k] : 0ull;
  }
  for (int r = 0; r < k; ++r) {
    unsigned long long mine = head[0];
#pragma unroll
    for (int o = 1; o < TK_KWAY_LISTS; ++o) mine = head[o] > mine ? head[o] : mine;
    const unsigned long long top = tk_warp_max(mine);
    if (lane == 0) place(r, top);
#pragma unroll
    for (int o = 0; o < TK_KWAY_LISTS; ++o)
      if (top != 0ull && head[o] == top) {
        const int s = lane + 32 * o;
        head[o] = ++pos[o] < k ? lists[s * k + pos[o]] : 0ull;
      }
  }
}

// Block (slice s, row r), TK_SLICE_THREADS threads: cand[(r * slices + s) * k + t] = the
// slice's t-th best key (0 past the slice's length), stats[2 (r * slices + s) + 0, 1] = its
// max and sum of exp(x - max) over the raw logits (the masked ones, mask flag 2). Each
// thread loads its TK_LIST elements at once and sorts them in registers (a network); each
// warp takes its k best by k rounds of a warp-wide max (tk_warp_merge), and the block
// ranks the warps' k best (tk_rank_place). Sorting the whole slice instead (bitonic, 2048 keys) took 98 us a
// call at 32 rows of 50257 tokens (ncu, H200), and a block per row with 16-key lists 65 us
// at 4 rows of 32000 (one SM a row, issue-bound).
template <typename T>
__device__ void logprob_topk_slices_body(const T* logits, int vocab, int k, const int* mask_rows,
                                         const int* eos, int n_eos,
                                         unsigned long long* cand, float* stats) {
  constexpr int WARPS = TK_SLICE_THREADS / 32;
  __shared__ unsigned long long warp_keys[WARPS * TK_MAX_K];
  const int s = blockIdx.x, slices = gridDim.x, warp = threadIdx.x >> 5;
  const long long row = blockIdx.y;
  const int j0 = s * TK_SLICE, n = min(TK_SLICE, vocab - j0);
  const T* x = logits + row * vocab + j0;
  const bool masked = mask_rows && mask_rows[row];
  const bool renorm = masked && mask_rows[row] == 2;
  float v[TK_LIST];
#pragma unroll
  for (int u = 0; u < TK_LIST; ++u) {
    const int t = threadIdx.x + u * TK_SLICE_THREADS;
    v[u] = t < n ? to_f(x[t]) : LS_NEG_INF;
  }
  float m = LS_NEG_INF, sum = 0.f;
  // A thread holds exactly TK_LIST keys, so its list is all of them, sorted by a network
  // (19 compare-exchanges) rather than 8 insertions of 8 each; 0 past the slice's end.
  static_assert(TK_SLICE == TK_LIST * TK_SLICE_THREADS, "a thread's keys are its list");
  unsigned long long best[TK_LIST];
#pragma unroll
  for (int u = 0; u < TK_LIST; ++u) {
    const int t = threadIdx.x + u * TK_SLICE_THREADS;
    best[u] = 0ull;
    if (t < n) {
      const int j = j0 + t;
      float w = v[u];
      if (masked)
        for (int e = 0; e < n_eos; ++e)
          if (eos[e] == j) w = LS_NEG_INF;
      lse_add(m, sum, renorm ? w : v[u], 1.f);
      best[u] = tk_key(w, j);
    }
  }
  tk_sort8_desc(best);
  const float2 bms = block_lse_pair(m, sum);
  tk_warp_merge<TK_LIST>(best, k, warp_keys + warp * k);
  __syncthreads();
  const long long at = row * slices + s;
  // Ranks past the slice's length stay empty.
  for (int t = min(k, n) + threadIdx.x; t < k; t += blockDim.x) cand[at * k + t] = 0ull;
  tk_rank_place(warp_keys, WARPS, k,
                [&](int rank, unsigned long long key) { cand[at * k + rank] = key; });
  if (threadIdx.x == 0) {
    stats[2 * at] = bms.x;
    stats[2 * at + 1] = bms.y;
  }
}

// Candidates a filtering slice block holds (logprob_topk_slices_filter); a slice with more
// (ties at the threshold) takes the sorting body above.
#define TK_FILTER_CAP 512
// EOS ids a filtering thread reads before its logits' loads wait.
#define TK_EOS_REGS 4

// Max of a 32-bit key over the warp; every lane gets it.
__device__ __forceinline__ unsigned int tk_warp_max32(unsigned int v) {
#if __CUDA_ARCH__ >= 800
  return __reduce_max_sync(LS_FULL_MASK, v);
#else
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(LS_FULL_MASK, v, o));
  return v;
#endif
}

// logprob_topk_slices_body's results (any k up to TK_MAX_K) by a threshold instead of
// sorts: each thread's largest key bounds the slice's k-th best from below once k threads
// reach it. Two such bounds: a warp's k-th largest thread maximum (k <= 32), whose largest
// over warps leaves k threads' keys at or above it, and a warp's ceil(k / 8)-th largest,
// whose smallest over the 8 warps leaves 8 ceil(k / 8) >= k; theta is the larger. Only the
// keys at or above theta (tens of a slice's 2048 on real logits) are gathered and ranked
// by counting. Returns false, the whole block alike and before writing anything, when
// more than TK_FILTER_CAP keys reach theta (many equal values); the caller then sorts.
// The sorting body spent about 900 instructions a thread on its per-thread sorts, k warp
// rounds over lists and rank searches, and was issue-bound (31 us for 128 rows of 32000
// tokens, ncu, H200).
template <typename T>
__device__ bool logprob_topk_slices_filter(const T* logits, int vocab, int k,
                                           const int* mask_rows, const int* eos, int n_eos,
                                           unsigned long long* cand, float* stats) {
  constexpr int WARPS = TK_SLICE_THREADS / 32;
  // Room for the ranking's reads of 4 at a time past the last key (zeros, ranking nothing).
  __shared__ unsigned long long keys[TK_FILTER_CAP + 4];
  __shared__ unsigned int warp_kth[WARPS], warp_kth8[WARPS];
  __shared__ int count;
  const int s = blockIdx.x, slices = gridDim.x, lane = threadIdx.x & 31,
            warp = threadIdx.x >> 5;
  const long long row = blockIdx.y;
  const int j0 = s * TK_SLICE, n = min(TK_SLICE, vocab - j0);
  const T* x = logits + row * vocab + j0;
  const int flag = mask_rows ? mask_rows[row] : 0;
  const bool renorm = flag == 2;
  // Bit u: the thread's u-th token is an EOS id of a masked row. The first ids load with
  // the logits (a loop over them waited for its loads before the logits' were issued).
  const auto eos_bit = [&](int id) {
    const int t = id - j0 - (int)threadIdx.x;
    return t >= 0 && t % TK_SLICE_THREADS == 0 && t / TK_SLICE_THREADS < TK_LIST
               ? 1u << (t / TK_SLICE_THREADS)
               : 0u;
  };
  int first_ids[TK_EOS_REGS];
#pragma unroll
  for (int e = 0; e < TK_EOS_REGS; ++e) first_ids[e] = e < n_eos ? eos[e] : -1;
  // All of the thread's loads first, so that they wait on memory together (converted
  // as they load, the compiler waited on the first before issuing the rest).
  T raw[TK_LIST];
#pragma unroll
  for (int u = 0; u < TK_LIST; ++u) {
    const int t = threadIdx.x + u * TK_SLICE_THREADS;
    if (t < n) raw[u] = x[t];
  }
  unsigned int eos_bits = 0u;
#pragma unroll
  for (int e = 0; e < TK_EOS_REGS; ++e) eos_bits |= eos_bit(first_ids[e]);
  for (int e = TK_EOS_REGS; e < n_eos; ++e) eos_bits |= eos_bit(eos[e]);
  if (!flag) eos_bits = 0u;
  float v[TK_LIST], w[TK_LIST];
#pragma unroll
  for (int u = 0; u < TK_LIST; ++u)
    v[u] = threadIdx.x + u * TK_SLICE_THREADS < n ? to_f(raw[u]) : LS_NEG_INF;
  // w: the values keys rank (EOS at -inf on masked rows); v: what the log-sum-exp takes,
  // the raw value unless the row renormalizes.
  float m = LS_NEG_INF;
  unsigned int top = 0u;
#pragma unroll
  for (int u = 0; u < TK_LIST; ++u) {
    const int t = threadIdx.x + u * TK_SLICE_THREADS;
    w[u] = (eos_bits >> u) & 1u ? LS_NEG_INF : v[u];
    if (renorm) v[u] = w[u];
    m = fmaxf(m, v[u]);
    if (t < n) top = max(top, order_key(w[u]));
  }
  float sum = 0.f;
  if (m != LS_NEG_INF) {
#pragma unroll
    for (int u = 0; u < TK_LIST; ++u)
      sum += v[u] == m ? 1.f : __expf(v[u] - m);  // a +inf maximum counts, not NaN
  }
  if (threadIdx.x == 0) count = 0;
  const float2 bms = block_lse_pair(m, sum);
  // The warp's k-th (k <= 32) and ceil(k / 8)-th largest thread maxima, tied lanes
  // counted by a ballot a round (coarse 16-bit logits tie often); 0 where fewer threads
  // hold keys, which bounds nothing.
  const int k8 = (k + WARPS - 1) / WARPS, need = k <= 32 ? k : k8;
  unsigned int kth = 0u, kth8 = 0u;
  for (int seen = 0; seen < need;) {
    const unsigned int mx = tk_warp_max32(top);
    if (mx == 0u) break;
    seen += __popc(__ballot_sync(LS_FULL_MASK, top == mx));
    if (top == mx) top = 0u;
    if (kth8 == 0u && seen >= k8) kth8 = mx;
    if (k <= 32 && seen >= k) kth = mx;
  }
  if (lane == 0) {
    warp_kth[warp] = kth;
    warp_kth8[warp] = kth8;
  }
  __syncthreads();  // block_lse_pair's barriers came before count's first use
  unsigned int theta = 0u, theta8 = 0xffffffffu;
#pragma unroll
  for (int i = 0; i < WARPS; ++i) {
    theta = max(theta, warp_kth[i]);
    theta8 = min(theta8, warp_kth8[i]);
  }
  theta = max(theta, theta8);
#pragma unroll
  for (int u = 0; u < TK_LIST; ++u) {
    const int t = threadIdx.x + u * TK_SLICE_THREADS;
    if (t < n && order_key(w[u]) >= theta) {
      const int at = atomicAdd(&count, 1);
      if (at < TK_FILTER_CAP) keys[at] = tk_key(w[u], j0 + t);
    }
  }
  __syncthreads();
  const int nc = count;
  if (nc > TK_FILTER_CAP) return false;
  if (threadIdx.x < 4) keys[nc + threadIdx.x] = 0ull;
  __syncthreads();
  const long long at = row * slices + s;
  for (int t = min(k, nc) + threadIdx.x; t < k; t += blockDim.x) cand[at * k + t] = 0ull;
  // A key's rank: how many keys beat it (all distinct), four independent reads a round.
  for (int i = threadIdx.x; i < nc; i += blockDim.x) {
    const unsigned long long key = keys[i];
    int rank = 0;
    for (int j = 0; j < nc && rank < k; j += 4)
      rank += (keys[j] > key) + (keys[j + 1] > key) + (keys[j + 2] > key) + (keys[j + 3] > key);
    if (rank < k) cand[at * k + rank] = key;
  }
  if (threadIdx.x == 0) {
    stats[2 * at] = bms.x;
    stats[2 * at + 1] = bms.y;
  }
  return true;
}

// Block r: the k best of row r's slices' candidates, as logprob_topk writes them.
__device__ void logprob_topk_merge_body(const unsigned long long* cand, const float* stats,
                                        int rows, int k, int slices, float* out) {
  extern __shared__ unsigned long long merge_keys[];
  const long long row = blockIdx.x;
  const int n = slices * k;
  for (int t = threadIdx.x; t < n; t += blockDim.x) merge_keys[t] = cand[row * n + t];
  float m = LS_NEG_INF, sum = 0.f;
  for (int s = threadIdx.x; s < slices; s += blockDim.x)
    lse_add(m, sum, stats[2 * (row * slices + s)], stats[2 * (row * slices + s) + 1]);
  // block_lse_pair's barriers also make the loaded keys visible to every thread.
  const float2 ms = block_lse_pair(m, sum);
  const float lse = ms.x + logf(ms.y);
  float* out_v = out;
  int* out_i = reinterpret_cast<int*>(out + (long long)rows * k);
  const auto place = [&](int rank, unsigned long long key) {
    out_v[row * k + rank] = tk_value(key) - lse;
    out_i[row * k + rank] = tk_index(key);
  };
  if (slices <= 32 * TK_KWAY_LISTS) {
    if (threadIdx.x < 32) tk_warp_kway(merge_keys, slices, k, place);
  } else {
    tk_rank_place(merge_keys, slices, k, place);
  }
  if (threadIdx.x == 0) out[2LL * rows * k + row] = lse;
}

#define LS_SEARCH_SLICES(T, S)                                                                 \
  extern "C" __global__ void __launch_bounds__(TK_SLICE_THREADS) logprob_topk_slices_##S(     \
      const T* logits, int vocab, int k, const int* mask_rows, const int* eos, int n_eos,      \
      int filter, unsigned long long* cand, float* stats) {                                    \
    LS_PDL_WAIT();                                                                             \
    if (filter &&                                                                              \
        logprob_topk_slices_filter<T>(logits, vocab, k, mask_rows, eos, n_eos, cand, stats))   \
      return;                                                                                  \
    logprob_topk_slices_body<T>(logits, vocab, k, mask_rows, eos, n_eos, cand, stats);         \
  }                                                                                            \
  extern "C" __global__ void logprob_topk_merge_##S(const unsigned long long* cand,            \
                                                    const float* stats, int rows, int k,       \
                                                    int slices, float* out) {                  \
    LS_PDL_WAIT();                                                                             \
    logprob_topk_merge_body(cand, stats, rows, k, slices, out);                                \
  }
LS_FLOAT_TYPES(LS_SEARCH_SLICES)

// Beam search's choice of the next beams (search.rs `beam`, one group of `gs` beams a
// search), on the device so that the next step launches without the host: block g takes
// group g's rows g * gs ... `topk` is logprob_topk's buffer for `rows` rows of `kt` (the
// log-probabilities, then the ids as int bits); `params` holds each row's running score,
// then a flag per group: 0 done, 1 running, 2 running at its last step (every candidate
// stops there). Candidate (beam j, its t-th token) is cand = j * vocab + id with value
// logprob + score_j; the best `kc` by value, ties to the lower cand, go to record[g] (kc
// values, then kc cands as int bits), which the host downloads for its bookkeeping. A
// candidate stops where its token is an EOS id or at the last step; ranked with stopped
// ones at value + BS_NEG (ties to the better rank), the first gs give row base + i its
// token (next_ids) and the row it continues (src_rows). A done group's rows keep their
// rows and take `fill`. The host's own ranking (search.rs) follows the same order.
#define BS_NEG (-1.0e9f)

__device__ __forceinline__ unsigned long long bs_key(float v, unsigned int i) {
  return ((unsigned long long)order_key(v) << 32) | (0xffffffffu - i);
}

__device__ void beam_select_body(const float* topk, int rows, int kt, int kc, int vocab, int gs,
                                 const float* params, const int* eos, int n_eos, int fill,
                                 int* next_ids, int* src_rows, float* record) {
  extern __shared__ unsigned long long bs_keys[];  // gs * kt candidates, then kc ranks
  const int n = gs * kt;
  unsigned long long* pen = bs_keys + n;
  float* rv = reinterpret_cast<float*>(pen + kc);
  int* rc = reinterpret_cast<int*>(rv + kc);
  const int g = blockIdx.x, base = g * gs, tid = threadIdx.x;
  const float flag = params[rows + g];
  if (flag == 0.f) {
    for (int i = tid; i < gs; i += blockDim.x) {
      next_ids[base + i] = fill;
      src_rows[base + i] = base + i;
    }
    return;
  }
  const float* vals = topk;
  const int* ids = reinterpret_cast<const int*>(topk + (long long)rows * kt);
  for (int c = tid; c < n; c += blockDim.x) {
    const int j = c / kt, row = base + j;
    const float v = vals[(long long)row * kt + (c - j * kt)] + params[row];
    const int cand = j * vocab + ids[(long long)row * kt + (c - j * kt)];
    bs_keys[c] = bs_key(v, (unsigned int)cand);
  }
  __syncthreads();
  // Each candidate's rank: how many beat it (the keys are distinct).
  for (int c = tid; c < n; c += blockDim.x) {
    const unsigned long long key = bs_keys[c];
    int rank = 0;
    for (int d = 0; d < n && rank < kc; ++d) rank += bs_keys[d] > key;
    if (rank < kc) {
      rv[rank] = tk_value(key);
      rc[rank] = (int)(0xffffffffu - (unsigned int)(key & 0xffffffffu));
    }
  }
  __syncthreads();
  for (int c = tid; c < kc; c += blockDim.x) {
    const int tok = rc[c] % vocab;
    bool stop = flag == 2.f;
    for (int e = 0; e < n_eos; ++e) stop = stop || eos[e] == tok;
    pen[c] = bs_key(stop ? rv[c] + BS_NEG : rv[c], (unsigned int)c);
    record[(long long)g * 2 * kc + c] = rv[c];
    record[(long long)g * 2 * kc + kc + c] = __int_as_float(rc[c]);
  }
  __syncthreads();
  for (int c = tid; c < kc; c += blockDim.x) {
    int rank = 0;
    for (int d = 0; d < kc; ++d) rank += pen[d] > pen[c];
    if (rank < gs) {
      next_ids[base + rank] = rc[c] % vocab;
      src_rows[base + rank] = base + rc[c] / vocab;
    }
  }
}

#define LS_BEAM_SELECT(T, S)                                                                   \
  extern "C" __global__ void beam_select_##S(                                                  \
      const float* topk, int rows, int kt, int kc, int vocab, int gs, const float* params,     \
      const int* eos, int n_eos, int fill, int* next_ids, int* src_rows, float* record) {      \
    LS_PDL_WAIT();                                                                             \
    beam_select_body(topk, rows, kt, kc, vocab, gs, params, eos, n_eos, fill, next_ids,        \
                     src_rows, record);                                                        \
  }
LS_FLOAT_TYPES(LS_BEAM_SELECT)
