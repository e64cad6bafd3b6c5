// GEMMs of a few dozen to a hundred-odd rows on Hopper's warpgroup MMA (sm_90a only):
// y [m, n] = act(x [m, k] w [n, k]^T + bias) (+ r). These are the GEMMs of batched decode
// steps (beams x batch rows) and of short forwards, where what costs is latency: each
// block's loads are all in flight at once, its weight's before the wait for the kernel
// before (PDL), and k may be split over a thread-block cluster.
//
// Grid (n / BN, m / 64, S), clusters of (1, 1, S): the S blocks of a cluster take one
// 64-row by BN-column output tile and split its k in runs of whole 64-wide chunks. A block
// (one warpgroup, 128 threads) copies its chunks of w and x into shared memory with
// cp.async (w first, and before the wait where the host says no running kernel writes
// it), in the 128-byte swizzled layout the MMA reads: row r's 16-byte piece c at
// r * 128 + ((c ^ (r & 7)) * 16), each chunk's tile 1024-byte aligned. Each chunk's MMAs
// start as soon as its copies land. The partial tile goes to shared memory; block q of
// the cluster owns rows [q, q + 1) 64 / S of the tile, and every block sends each other
// block its slice of those rows through the copy engine (distributed shared memory,
// completing on the owner's mbarrier). Pushed, the slices cost no round trip of loads: a
// form that read the other blocks' tiles spent half its time waiting on those loads
// (ncu). The owner sums the slices and runs the epilogue (bias, activation, residual) in
// f32, rounding y once.

// Rows of a block's tile (the MMA's m).
#define LWG_ROWS 64

// The warpgroup MMA m64nBNk16 with f32 accumulators (BN / 2 a thread), A and B K-major
// in shared memory: LWG_D_BN lists the accumulator operands, LWG_AB_BN the descriptors'.
template <typename T, int BN>
struct LwgMma;
#define LWG_D_8 "{%0, %1, %2, %3}"
#define LWG_AB_8 "%4, %5"
#define LWG_OUT_8 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
#define LWG_D_16 "{%0, %1, %2, %3, %4, %5, %6, %7}"
#define LWG_AB_16 "%8, %9"
#define LWG_OUT_16 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), \
    "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
#define LWG_D_32 "{%0, %1, %2, %3, %4, %5, %6, %7, " \
    "%8, %9, %10, %11, %12, %13, %14, %15}"
#define LWG_AB_32 "%16, %17"
#define LWG_OUT_32 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), \
    "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), \
    "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
#define LWG_D_64 "{%0, %1, %2, %3, %4, %5, %6, %7, " \
    "%8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, " \
    "%24, %25, %26, %27, %28, %29, %30, %31}"
#define LWG_AB_64 "%32, %33"
#define LWG_OUT_64 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), \
    "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), \
    "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), \
    "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
    "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
// The operand lists of the wider MMAs (n96, n128, n192, n256: 48, 64, 96 and 128
// accumulators).
#define LWG_O4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define LWG_O16(i) LWG_O4(i), LWG_O4(i + 4), LWG_O4(i + 8), LWG_O4(i + 12)
#define LWG_O64(i) LWG_O16(i), LWG_O16(i + 16), LWG_O16(i + 32), LWG_O16(i + 48)
#define LWG_D_96 "{" "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47" "}"
#define LWG_AB_96 "%48, %49"
#define LWG_D_128 "{" "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" "}"
#define LWG_AB_128 "%64, %65"
#define LWG_D_192 "{" "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95" "}"
#define LWG_AB_192 "%96, %97"
#define LWG_D_256 "{" "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127" "}"
#define LWG_AB_256 "%128, %129"
#define LWG_OUT_96 LWG_O16(0), LWG_O16(16), LWG_O16(32)
#define LWG_OUT_128 LWG_O64(0)
#define LWG_OUT_192 LWG_O64(0), LWG_O16(64), LWG_O16(80)
#define LWG_OUT_256 LWG_O64(0), LWG_O64(64)
#define LWG_MMA(T, S, BN)                                                                  \
  template <>                                                                               \
  struct LwgMma<T, BN> {                                                                    \
    static __device__ __forceinline__ void run(float (&d)[BN / 2], unsigned long long a,   \
                                               unsigned long long b) {                     \
      asm volatile("wgmma.mma_async.sync.aligned.m64n" #BN "k16.f32." #S "." #S " " LWG_D_##BN \
                   ", " LWG_AB_##BN ", 1, 1, 1, 0, 0;"                                      \
                   : LWG_OUT_##BN                                                           \
                   : "l"(a), "l"(b));                                                       \
    }                                                                                       \
  };
#define LWG_MMA_ALL(BN) LWG_MMA(__half, f16, BN) LWG_MMA(__nv_bfloat16, bf16, BN)
LWG_MMA_ALL(8)
LWG_MMA_ALL(16)
LWG_MMA_ALL(32)
LWG_MMA_ALL(64)
LWG_MMA_ALL(96)
LWG_MMA_ALL(128)
LWG_MMA_ALL(192)
LWG_MMA_ALL(256)

// The MMA's shared-memory descriptor of a K-major tile in the 128-byte swizzle: start
// address, 16 bytes between the core matrices along k (unused within one swizzle row),
// 1024 bytes between groups of 8 rows.
__device__ __forceinline__ unsigned long long lwg_desc(unsigned addr) {
  return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) |
         (1ull << 62);
}

// Copies rows [r0, r0 + rows) by k [k0, k0 + 64) of p [prows, k] into the swizzled tile at
// shared address dst; pieces past prows or k are zero-filled.
template <typename T>
__device__ __forceinline__ void lwg_load_tile(unsigned dst, const T* p, int prows, int k, int r0,
                                              int rows, int k0) {
  for (int i = threadIdx.x; i < rows * 8; i += blockDim.x) {
    const int row = i >> 3, c = i & 7;
    const int gr = r0 + row, gk = k0 + 8 * c;
    const bool ok = gr < prows && gk < k;
    const T* src = ok ? p + (long long)gr * k + gk : p;
    const unsigned at = dst + row * 128 + ((c ^ (row & 7)) << 4);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(at), "l"(src),
                 "r"(ok ? 16 : 0)
                 : "memory");
  }
}

__device__ __forceinline__ void lwg_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}

// Waits until at most `pending` of this thread's copy groups are in flight (0-8).
__device__ __forceinline__ void lwg_wait_copies(int pending) {
  switch (pending) {
    case 0: asm volatile("cp.async.wait_group 0;" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;" ::: "memory"); break;
    case 3: asm volatile("cp.async.wait_group 3;" ::: "memory"); break;
    case 4: asm volatile("cp.async.wait_group 4;" ::: "memory"); break;
    case 5: asm volatile("cp.async.wait_group 5;" ::: "memory"); break;
    case 6: asm volatile("cp.async.wait_group 6;" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 7;" ::: "memory"); break;
  }
}

// Waits until the phase of parity `parity` of the mbarrier at shared address `bar` completes.
__device__ __forceinline__ void lwg_wait_phase(unsigned bar, unsigned parity) {
  unsigned done = 0;
  while (!done) {
    asm volatile(
        "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  }
}

// Keeps the compiler from moving accesses of an accumulator across the asynchronous MMAs.
__device__ __forceinline__ void lwg_pin(float& v) { asm volatile("" : "+f"(v)::"memory"); }

// Eight values of a 16-byte pack of T, as floats.
template <typename T>
__device__ __forceinline__ void lwg_unpack(uint4 p, float (&f)[8]) {
  const T* t = reinterpret_cast<const T*>(&p);
#pragma unroll
  for (int e = 0; e < 8; ++e) f[e] = to_f(t[e]);
}

// Values at..at + 7 of v as floats, where columns col..col + 7 of `cols` exist: one
// 16-byte load where all eight do and rows are whole packs, else one by one; zeros past
// the last column or where v is null.
template <typename T>
__device__ __forceinline__ void lwg_load8(const T* v, long long at, int col, int cols,
                                          bool packed, float (&f)[8]) {
  if (v && packed && col + 8 <= cols) {
    lwg_unpack<T>(*reinterpret_cast<const uint4*>(v + at), f);
    return;
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) f[e] = v && col + e < cols ? to_f(v[at + e]) : 0.f;
}

// Eight f32 values at p (16-byte aligned, shared memory here) into f, and back.
__device__ __forceinline__ void lwg_get8(const float* p, float (&f)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
  f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
__device__ __forceinline__ void lwg_put8(float* p, const float (&f)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}

// The activation of eight 16-bit outputs: the erf GELU by ls_gelu_erf16, as the bias_act
// pass computes it (about half of erff's instructions).
template <typename T, int A>
__device__ __forceinline__ void lwg_activate(float (&v)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    v[e] = sizeof(T) == 2 && A == 1 ? ls_gelu_erf16(v[e]) : activate(v[e], A);
  }
}

// The epilogue of eight outputs: y[at..at + 7] = act(v + bias) + residual, in f32, rounded
// once; one 16-byte store where all eight columns exist and rows are whole packs.
template <typename T>
__device__ __forceinline__ void lwg_finish8(float (&v)[8], const float (&bv)[8],
                                            const float (&rv)[8], int act, T* y, long long at,
                                            int col, int n, bool packed) {
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] += bv[e];
  LS_WITH_ACT(act, (lwg_activate<T, LS_A>(v)));
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] += rv[e];
  if (packed && col + 8 <= n) {
    uint4 out;
    T* ot = reinterpret_cast<T*>(&out);
#pragma unroll
    for (int e = 0; e < 8; ++e) ot[e] = from_f<T>(v[e]);
    *reinterpret_cast<uint4*>(y + at) = out;
  } else {
    for (int e = 0; e < 8 && col + e < n; ++e) y[at + e] = from_f<T>(v[e]);
  }
}

// Writes the accumulators of the block's warpgroups into the f32 tile `red` (rows `stride`
// floats apart, warpgroup g's from row 64 g on). Warp v, lane l of a warpgroup: n8 block i
// holds (row 16 v + l / 4, columns 8 i + 2 (l % 4) + {0, 1}) in values 4 i + {0, 1}, and
// the row 8 below in 4 i + {2, 3}.
template <int BN>
__device__ __forceinline__ void lwg_stage_acc(const float (&acc)[BN / 2], float* red,
                                              int stride) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row = 16 * warp + (lane >> 2);
#pragma unroll
  for (int i = 0; i < BN / 8; ++i) {
    const int col = 8 * i + 2 * (lane & 3);
    *reinterpret_cast<float2*>(red + row * stride + col) = make_float2(acc[4 * i], acc[4 * i + 1]);
    *reinterpret_cast<float2*>(red + (row + 8) * stride + col) =
        make_float2(acc[4 * i + 2], acc[4 * i + 3]);
  }
}

template <typename T, int BN>
__device__ void linear_wg_body(const T* x, const T* w, const T* bias, const T* r, T* y, int m,
                               int n, int k, int act, bool early_w) {
  extern __shared__ unsigned char lwg_raw[];
  constexpr int ROWS = LWG_ROWS, STRIDE = BN + 4, ITEMS = BN / 8;
  const unsigned raw = ls_smem_addr(lwg_raw);
  const unsigned base = (raw + 1023u) & ~1023u;
  float* red = reinterpret_cast<float*>(lwg_raw + (base - raw));
  const int s = gridDim.z, z = blockIdx.z;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * ROWS;
  const int chunks = (k + 63) >> 6;
  const int per = (chunks + s - 1) / s;
  const int c0 = z * per;
  const int nc = max(0, min(per, chunks - c0));
  // Chunk j's tile of x at a_at + j * 8192, of w at b_at + j * BN * 128; the partial tile
  // (red, rows STRIDE floats apart) reuses them once the MMAs are done. Past both: the
  // slices the cluster's other blocks send (recv, 64 / s rows from each block by rank),
  // then the barrier they complete on.
  const unsigned a_at = base, b_at = base + per * ROWS * 128;
  const unsigned tiles = max(per * (ROWS + BN) * 128, ROWS * STRIDE * 4);
  const unsigned recv = base + tiles, bar = recv + ROWS * STRIDE * 4;
  const int share = ROWS / s;
  const unsigned slice = share * STRIDE * 4;
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar) : "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar),
                 "r"((s - 1) * slice)
                 : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  // The cluster's barriers are set up before any block sends to them (waited for below).
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  // The epilogue's items: this block's share of the tile's rows, eight columns an item.
  // The first item of each thread has its bias read with w and its residual right after
  // the wait, so that their latency passes behind the copies and the MMAs.
  const bool packed = (n & 7) == 0;
  const int i0 = threadIdx.x;
  const int row0 = m0 + z * share + i0 / ITEMS, col0 = n0 + (i0 % ITEMS) * 8;
  const bool has0 = i0 < share * ITEMS && row0 < m && col0 < n;
  float bias0[8], res0[8];
  auto load_w = [&] {
    for (int j = 0; j < nc; ++j) {
      lwg_load_tile<T>(b_at + j * BN * 128, w, n, k, n0, BN, (c0 + j) * 64);
    }
    lwg_commit();
  };
  auto load_bias0 = [&] { lwg_load8<T>(has0 ? bias : nullptr, col0, col0, n, packed, bias0); };
  if (early_w) {
    load_w();
    load_bias0();
  }
  LS_PDL_WAIT();
  if (!early_w) {
    load_w();
    load_bias0();
  }
  for (int j = 0; j < nc; ++j) {
    lwg_load_tile<T>(a_at + j * ROWS * 128, x, m, k, m0, ROWS, (c0 + j) * 64);
    lwg_commit();
  }
  lwg_load8<T>(has0 ? r : nullptr, (long long)row0 * n + col0, col0, n, packed, res0);
  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
  for (int j = 0; j < nc; ++j) {
    // w's group and x's chunks up to j have landed: the MMAs read them through the async
    // proxy, which the fence orders after this thread's copies.
    lwg_wait_copies(nc - 1 - j);
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      LwgMma<T, BN>::run(acc, lwg_desc(a_at + j * ROWS * 128 + kk * 32),
                         lwg_desc(b_at + j * BN * 128 + kk * 32));
    }
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  }
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) lwg_pin(acc[i]);
  // Every warp's MMAs are done with the tiles before the partial tile overwrites them.
  __syncthreads();
  lwg_stage_acc<BN>(acc, red, STRIDE);
  // The partial tile is whole in shared memory; thread q sends rows [q share, (q + 1)
  // share) to block q (q != z) through the copy engine, into block q's slot z.
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
  const int q = threadIdx.x;
  if (q < s && q != z) {
    unsigned dst, rbar;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
                 : "=r"(dst)
                 : "r"(recv + z * slice), "r"(q));
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(rbar) : "r"(bar), "r"(q));
    asm volatile(
        "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, "
        "[%3];" ::"r"(dst),
        "r"(base + q * slice), "r"(slice), "r"(rbar)
        : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
  }
  // The other blocks' slices have landed once the barrier's phase 0 completes.
  lwg_wait_phase(bar, 0);
  // Each item sums its values over its own partial tile and the received slices.
  for (int i = threadIdx.x; i < share * ITEMS; i += blockDim.x) {
    const int sr = i / ITEMS, lc = (i % ITEMS) * 8;
    const int lr = z * share + sr;
    const int row = m0 + lr, col = n0 + lc;
    float v[8];
    lwg_get8(red + lr * STRIDE + lc, v);
    const float* got = red + (recv - base) / 4 + sr * STRIDE + lc;
    for (int p = 0; p < s; ++p) {
      if (p == z) continue;
      float in[8];
      lwg_get8(got + p * (slice / 4), in);
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] += in[e];
    }
    if (row >= m || col >= n) continue;
    const long long at_y = (long long)row * n + col;
    float bv[8], rv[8];
    if (i == i0) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        bv[e] = bias0[e];
        rv[e] = res0[e];
      }
    } else {
      lwg_load8<T>(bias, col, col, n, packed, bv);
      lwg_load8<T>(r, at_y, col, n, packed, rv);
    }
    lwg_finish8<T>(v, bv, rv, act, y, at_y, col, n, packed);
  }
  // No block leaves while the copy engine may still read its partial tile.
  if (q < s && q != z) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
}

// BN output columns a block. early: w is read before the wait (the host passes 1 only
// where no kernel that may still be running writes it).
#define LS_LINEAR_WG(T, S, BN)                                                              \
  extern "C" __global__ void __launch_bounds__(128, 1)                                      \
      linear_wg_n##BN##_##S(const T* x, const T* w, const T* bias, const T* r, T* y, int m, \
                            int n, int k, int act, int early) {                             \
    linear_wg_body<T, BN>(x, w, bias, r, y, m, n, k, act, early != 0);                      \
  }
#define LS_LINEAR_WG_ALL(T, S) \
  LS_LINEAR_WG(T, S, 8)        \
  LS_LINEAR_WG(T, S, 16)       \
  LS_LINEAR_WG(T, S, 32)       \
  LS_LINEAR_WG(T, S, 64)
LS_LINEAR_WG_ALL(__half, f16)
LS_LINEAR_WG_ALL(__nv_bfloat16, bf16)

// GEMMs of more rows (long forwards, prefill): y = act(x w^T + bias) (+ r) in output tiles
// of 64 WGS rows by BN columns, one warpgroup per 64 rows, k walked in 64-wide chunks
// through a ring of as many shared-memory stages as fit LWT_RING_BYTES (at most 8). The
// tensor memory accelerator (TMA) fills the stages: one thread asks for a chunk's two
// tiles (the swizzled layout the MMA reads, zeros past the operands' edges) and their
// bytes complete on the stage's mbarrier, so the block's warps issue only the MMAs. The
// MMAs of one chunk run while the next chunks land, one group in flight behind them; the
// epilogue (bias, activation, residual; the exact GELU included, which cuBLASLt's
// epilogues lack) runs on the f32 tile staged in shared memory and writes whole 16-byte
// packs. Grid (n / BN, m / (64 WGS)), any number of waves.
// Measured on an H200 (docs/performance.md, run 26): copies by every thread (cp.async, 16
// bytes each) issued ~380 instructions a warp a chunk and were the bottleneck; with four
// stages the 64 x 128 blocks of a k = 3072 GEMM still waited on every chunk (0.37 us a
// chunk against ~0.14 of MMAs), hence the deep ring. The kernel alone still reaches about
// half of cuBLASLt's rate at 4096 rows. L2 is not what limits it (run 27: its SMs take in
// as many bytes as cuBLASLt's, at a quarter of L2's peak); a block's time outside its MMAs
// is (the first copies, the epilogue), which a persistent, warp-specialized form did not
// shorten. Its epilogue reads the tile's bias from shared memory, staged once a block.
#define LWT_RING_BYTES (225 * 1024)
#define LWT_MAX_STAGES 8

// A tensor map (CUtensorMap) as the host encoded it, passed by value as a grid constant.
struct __align__(64) LwtMap {
  unsigned long long v[16];
};

// Rows [row, row + box) by k [k0, k0 + 64) of the map's matrix into shared `dst`, completing
// on `bar`.
__device__ __forceinline__ void lwt_tma(unsigned dst, const LwtMap& map, int k0, int row,
                                        unsigned bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
      "l"(reinterpret_cast<unsigned long long>(&map)), "r"(k0), "r"(row), "r"(bar)
      : "memory");
}

// Stages of a ring of `ring` bytes for blocks of bm rows by bn columns: as many as fit, at
// most `most`.
__host__ __device__ constexpr int lwt_stages(int bm, int bn, int ring, int most) {
  return ring / ((bm + bn) * 128) < most ? ring / ((bm + bn) * 128) : most;
}

// The pipelined main loop of the linear_wgt kernels: chunk j of k goes to stage j % S of a
// ring at shared address `base` (x's 64 WGS rows, then w's BN), completing on the stage's
// mbarrier at full + 8 (j % S).
template <typename T, int BN, int WGS, int S>
struct LwtRing {
  static constexpr int BM = LWG_ROWS * WGS;
  static constexpr unsigned A_BYTES = BM * 128, STAGE = (BM + BN) * 128;
  const LwtMap& mx;
  const LwtMap& mw;
  unsigned base, full;
  int m0, n0, chunks;

  // Thread 0, before the block's first sync.
  __device__ __forceinline__ void init_barriers() const {
    for (int s = 0; s < S; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(full + 8 * s) : "memory");
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __device__ __forceinline__ void expect(int j) const {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(full + 8 * (j % S)),
                 "r"(STAGE)
                 : "memory");
  }
  __device__ __forceinline__ void load_x(int j) const {
    lwt_tma(base + (j % S) * STAGE, mx, j * 64, m0, full + 8 * (j % S));
  }
  __device__ __forceinline__ void load_w(int j) const {
    lwt_tma(base + (j % S) * STAGE + A_BYTES, mw, j * 64, n0, full + 8 * (j % S));
  }
  // Bytes of the ring where the epilogue reuses it for a tile of `tile` bytes.
  __host__ __device__ static constexpr unsigned bytes(unsigned tile) {
    return S * STAGE > tile ? S * STAGE : tile;
  }
  // Chunks the ring takes before the loop.
  __device__ __forceinline__ int ahead() const { return min(S - 1, chunks); }
  // Thread 0: the first chunks' weight tiles (and the stages' expected bytes), which may go
  // before the wait for the kernel before where nothing running writes w.
  __device__ __forceinline__ void first_weights() const {
    for (int j = 0; j < ahead(); ++j) {
      expect(j);
      load_w(j);
    }
  }
  // Thread 0, after the wait: the first chunks' tiles of x.
  __device__ __forceinline__ void first_inputs() const {
    for (int j = 0; j < ahead(); ++j) load_x(j);
  }
  // acc += this warpgroup's rows of x w^T over every chunk; returns with every warpgroup's
  // MMAs done and every copy landed, so the ring may be reused.
  __device__ __forceinline__ void run(float (&acc)[BN / 2]) const {
    const int wg = threadIdx.x >> 7;
    const bool leader = threadIdx.x == 0;
    for (int j = 0; j < chunks; ++j) {
      lwg_wait_phase(full + 8 * (j % S), (j / S) & 1);
      asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
      const unsigned a = base + (j % S) * STAGE + wg * LWG_ROWS * 128;
      const unsigned b = base + (j % S) * STAGE + A_BYTES;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        LwgMma<T, BN>::run(acc, lwg_desc(a + kk * 32), lwg_desc(b + kk * 32));
      }
      asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
      // This warpgroup's MMAs of chunk j - 1 are done; once every warpgroup's are, the
      // stage they read takes chunk j + S - 1.
      asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
      __syncthreads();
      if (leader && j + S - 1 < chunks) {
        expect(j + S - 1);
        load_w(j + S - 1);
        load_x(j + S - 1);
      }
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) lwg_pin(acc[i]);
    __syncthreads();
  }
};

template <typename T, int BN, int WGS>
__device__ void linear_wgt_body(const LwtMap& mx, const LwtMap& mw, const T* bias, const T* r,
                                T* y, int m, int n, int k, int act, bool early_w) {
  extern __shared__ unsigned char lwg_raw[];
  constexpr int BM = LWG_ROWS * WGS, STRIDE = BN + 4, ITEMS = BN / 8;
  constexpr int S = lwt_stages(BM, BN, LWT_RING_BYTES, LWT_MAX_STAGES);
  using Ring = LwtRing<T, BN, WGS, S>;
  constexpr unsigned TILE = BM * STRIDE * 4;
  constexpr unsigned RING = Ring::bytes(TILE);
  const unsigned raw = ls_smem_addr(lwg_raw);
  const unsigned base = (raw + 1023u) & ~1023u;
  float* red = reinterpret_cast<float*>(lwg_raw + (base - raw));
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
  const Ring ring{mx, mw, base, base + RING, m0, n0, (k + 63) >> 6};
  const bool leader = threadIdx.x == 0;
  if (leader) ring.init_barriers();
  __syncthreads();
  // The first stages' weight tiles go before the wait where nothing running writes w.
  if (leader && early_w) ring.first_weights();
  LS_PDL_WAIT();
  if (leader) {
    if (!early_w) ring.first_weights();
    ring.first_inputs();
  }
  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
  ring.run(acc);
  // The tile's bias goes to shared memory once, as f32 after the tile (sbias), its loads in
  // flight while the accumulators are staged: loaded for each item of the epilogue, its
  // latency was paid a dozen times a thread.
  static_assert(TILE + BN * 4 <= RING, "the bias fits after the f32 tile");
  float* sbias = red + BM * STRIDE;
  const bool packed = (n & 7) == 0;
  float bias8[8];
  if (threadIdx.x < ITEMS) {
    const int col = n0 + 8 * threadIdx.x;
    lwg_load8<T>(bias, col, col, n, packed, bias8);
  }
  lwg_stage_acc<BN>(acc, red, STRIDE);
  if (threadIdx.x < ITEMS) lwg_put8(sbias + 8 * threadIdx.x, bias8);
  __syncthreads();
  for (int i = threadIdx.x; i < BM * ITEMS; i += blockDim.x) {
    const int lr = i / ITEMS, lc = (i % ITEMS) * 8;
    const int row = m0 + lr, col = n0 + lc;
    if (row >= m || col >= n) continue;
    float v[8], bv[8], rv[8];
    lwg_get8(red + lr * STRIDE + lc, v);
    lwg_get8(sbias + lc, bv);
    const long long at_y = (long long)row * n + col;
    lwg_load8<T>(r, at_y, col, n, packed, rv);
    lwg_finish8<T>(v, bv, rv, act, y, at_y, col, n, packed);
  }
}

// 64 WGS rows by BN columns a block; mx and mw map x [m, k] and w [n, k] in boxes of
// 64 k by 64 WGS and BN rows; early as for linear_wg_n*.
#define LS_LINEAR_WGT(T, S, BN, WGS)                                                       \
  extern "C" __global__ void __launch_bounds__(128 * WGS, 1)                               \
      linear_wgt_m##WGS##_n##BN##_##S(const __grid_constant__ LwtMap mx,                   \
                                      const __grid_constant__ LwtMap mw, const T* bias,    \
                                      const T* r, T* y, int m, int n, int k, int act,      \
                                      int early) {                                         \
    linear_wgt_body<T, BN, WGS>(mx, mw, bias, r, y, m, n, k, act, early != 0);             \
  }
#define LS_LINEAR_WGT_ALL(T, S) \
  LS_LINEAR_WGT(T, S, 128, 1)   \
  LS_LINEAR_WGT(T, S, 192, 1)   \
  LS_LINEAR_WGT(T, S, 256, 1)   \
  LS_LINEAR_WGT(T, S, 128, 2)   \
  LS_LINEAR_WGT(T, S, 192, 2)   \
  LS_LINEAR_WGT(T, S, 256, 2)
LS_LINEAR_WGT_ALL(__half, f16)
LS_LINEAR_WGT_ALL(__nv_bfloat16, bf16)

// The GEMM of a post-norm residual block with the block's layer norm in its epilogue:
// y = LN(round(round(x w^T + bias) + r)) over rows of n, where round is to T, as the
// separate GEMM and add_layer_norm_rows compute it. A block takes 64 rows by BN columns
// (one warpgroup, the main loop of linear_wgt); the n / BN blocks of a row band form a
// thread-block cluster along x (block rank q takes columns [q BN, (q + 1) BN)), so that the
// cluster owns whole rows. Each block sums its part of every row and stores the sum into
// every block's shared memory (distributed shared memory), once for the mean and once for
// the squared deviations from it; a cluster barrier after each exchange makes the sums
// visible. Thread t of a block takes row t / 2's half t % 2 of the block's columns through
// the whole epilogue, in registers.
// Measured on an H200 (docs/performance.md, run 28) it is slower than cuBLASLt's GEMM and
// the separate layer norm, so the host runs it only when asked (LIGHTSEQ_FUSED_LN=1): at
// BERT-base's 1024 rows its 128 blocks of 64 x 96 took 13.0 and 22.3 us for the output and
// second FFN GEMMs against 6.6 + 6.0 and 11.1 + 6.3, latency-bound (a fifth or more of the
// warps' samples wait on the ring's copies; the cluster barriers' arrives are GPU-wide
// memory barriers). The ring is sized for two blocks an SM (the GPU then holds 30 clusters
// of eight); a ring for one (11 stages) was slower still (18.6 and 34.9 us).
#define LWL_RING_BYTES (100 * 1024)
#define LWL_MAX_STAGES 8
// Blocks a cluster has at most (the portable cluster size).
#define LWL_MAX_CLUSTER 8

// Stores `v` at shared address `at` of every block of the cluster (ranks [0, ranks)).
__device__ __forceinline__ void lwl_broadcast(unsigned at, float v, int ranks) {
  for (int q = 0; q < ranks; ++q) {
    unsigned dst;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(dst) : "r"(at), "r"(q));
    asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(dst), "f"(v) : "memory");
  }
}

// Every block of the cluster has arrived; what each stored before is visible after.
__device__ __forceinline__ void lwl_cluster_sync() {
  asm volatile("barrier.cluster.arrive.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
}

template <typename T, int BN>
__device__ void linear_wgt_ln_body(const LwtMap& mx, const LwtMap& mw, const T* bias, const T* r,
                                   const T* gamma, const T* beta, T* y, int m, int n, int k,
                                   float eps, bool early_w) {
  extern __shared__ unsigned char lwg_raw[];
  constexpr int BM = LWG_ROWS, STRIDE = BN + 4, HALF = BN / 2, PACKS = HALF / 8;
  constexpr int S = lwt_stages(BM, BN, LWL_RING_BYTES, LWL_MAX_STAGES);
  using Ring = LwtRing<T, BN, 1, S>;
  constexpr unsigned TILE = BM * STRIDE * 4;
  constexpr unsigned RING = Ring::bytes(TILE);
  // After the ring (which the f32 tile reuses): its barriers, then the tile's bias, gamma
  // and beta as f32, then the sums the cluster's blocks store, [2][LWL_MAX_CLUSTER][64]
  // (the rows' sums, then their squared deviations, by the sending block's rank).
  constexpr unsigned PARAMS = (RING + 8 * S + 15) / 16 * 16;
  constexpr unsigned SUMS = PARAMS + 3 * BN * 4;
  static_assert(HALF % 8 == 0, "a thread's half row is whole 16-byte packs");
  const unsigned raw = ls_smem_addr(lwg_raw);
  const unsigned base = (raw + 1023u) & ~1023u;
  unsigned char* aligned = lwg_raw + (base - raw);
  float* red = reinterpret_cast<float*>(aligned);
  float* params = reinterpret_cast<float*>(aligned + PARAMS);
  const float* sums = reinterpret_cast<const float*>(aligned + SUMS);
  const int rank = blockIdx.x, ranks = gridDim.x;
  const int n0 = rank * BN, m0 = blockIdx.y * BM;
  const Ring ring{mx, mw, base, base + RING, m0, n0, (k + 63) >> 6};
  const bool leader = threadIdx.x == 0;
  if (leader) ring.init_barriers();
  // Bias, gamma and beta of the block's columns, as f32 (threads [0, BN / 8): eight each).
  auto load_params = [&] {
    if (threadIdx.x < BN / 8) {
      const int col = n0 + 8 * threadIdx.x;
      const T* src[3] = {bias, gamma, beta};
#pragma unroll
      for (int p = 0; p < 3; ++p) {
        float f[8];
        lwg_load8<T>(src[p], col, col, n, true, f);
        lwg_put8(params + p * BN + 8 * threadIdx.x, f);
      }
    }
  };
  __syncthreads();
  // Every block of the cluster has started before any stores to its shared memory (waited
  // for before the first exchange).
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  if (early_w) {
    if (leader) ring.first_weights();
    load_params();
  }
  LS_PDL_WAIT();
  if (!early_w) {
    if (leader) ring.first_weights();
    load_params();
  }
  if (leader) ring.first_inputs();
  // The residual's half row, in flight over the main loop.
  const int lr = threadIdx.x >> 1, c0 = (threadIdx.x & 1) * HALF, row = m0 + lr;
  const bool live = row < m;
  uint4 res[PACKS];
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {
    res[p] = live ? *reinterpret_cast<const uint4*>(r + (long long)row * n + n0 + c0 + 8 * p)
                  : make_uint4(0, 0, 0, 0);
  }
  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
  ring.run(acc);
  lwg_stage_acc<BN>(acc, red, STRIDE);
  __syncthreads();
  // v = round(round(acc + bias) + residual), the half row's sum.
  float v[HALF];
  float s = 0.f;
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {
    float rv[8];
    lwg_unpack<T>(res[p], rv);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int c = c0 + 8 * p + e;
      const float a = to_f(from_f<T>(red[lr * STRIDE + c] + params[c]));
      v[8 * p + e] = to_f(from_f<T>(a + rv[e]));
      s += v[8 * p + e];
    }
  }
  s += __shfl_xor_sync(0xffffffffu, s, 1);
  const unsigned sums_at = base + SUMS;
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
  if ((threadIdx.x & 1) == 0) lwl_broadcast(sums_at + (rank * BM + lr) * 4, s, ranks);
  lwl_cluster_sync();
  float total = 0.f;
  for (int q = 0; q < ranks; ++q) total += sums[q * BM + lr];
  const float mean = total / n;
  float s2 = 0.f;
#pragma unroll
  for (int i = 0; i < HALF; ++i) s2 += (v[i] - mean) * (v[i] - mean);
  s2 += __shfl_xor_sync(0xffffffffu, s2, 1);
  constexpr int SECOND = LWL_MAX_CLUSTER * BM;
  if ((threadIdx.x & 1) == 0) {
    lwl_broadcast(sums_at + (SECOND + rank * BM + lr) * 4, s2, ranks);
  }
  lwl_cluster_sync();
  float dev = 0.f;
  for (int q = 0; q < ranks; ++q) dev += sums[SECOND + q * BM + lr];
  const float inv = rsqrtf(dev / n + eps);
  if (!live) return;
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {
    uint4 out;
    T* ot = reinterpret_cast<T*>(&out);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int c = c0 + 8 * p + e;
      ot[e] = from_f<T>((v[8 * p + e] - mean) * inv * params[BN + c] + params[2 * BN + c]);
    }
    *reinterpret_cast<uint4*>(y + (long long)row * n + n0 + c0 + 8 * p) = out;
  }
}

// 64 rows by BN columns a block, clusters of n / BN blocks along x; mx and mw map x [m, k]
// and w [n, k] in boxes of 64 k by 64 and BN rows; early: w, the bias, gamma and beta are
// read before the wait (the host passes 1 only where no kernel that may still be running
// writes them).
#define LS_LINEAR_WGT_LN(T, S, BN)                                                           \
  extern "C" __global__ void __launch_bounds__(128, 1)                                       \
      linear_wgt_ln_n##BN##_##S(const __grid_constant__ LwtMap mx,                           \
                                const __grid_constant__ LwtMap mw, const T* bias, const T* r, \
                                const T* gamma, const T* beta, T* y, int m, int n, int k,    \
                                float eps, int early) {                                      \
    linear_wgt_ln_body<T, BN>(mx, mw, bias, r, gamma, beta, y, m, n, k, eps, early != 0);    \
  }
#define LS_LINEAR_WGT_LN_ALL(T, S) \
  LS_LINEAR_WGT_LN(T, S, 64)       \
  LS_LINEAR_WGT_LN(T, S, 96)       \
  LS_LINEAR_WGT_LN(T, S, 128)
LS_LINEAR_WGT_LN_ALL(__half, f16)
LS_LINEAR_WGT_LN_ALL(__nv_bfloat16, bf16)
