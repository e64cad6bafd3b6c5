// Sum of up to three row lookups (token, position, token type), the first scaled by scale0:
// one block per output row.
// Unused tables are null. Ids were validated on the host.

template <typename T>
__device__ void embed_body(const T* t0, const int* i0, const T* t1, const int* i1, const T* t2,
                           const int* i2, T* out, int h, float scale0) {
  const long long row = blockIdx.x;
  const T* r0 = t0 + (long long)i0[row] * h;
  const T* r1 = t1 ? t1 + (long long)i1[row] * h : nullptr;
  const T* r2 = t2 ? t2 + (long long)i2[row] * h : nullptr;
  for (int j = threadIdx.x; j < h; j += blockDim.x) {
    float v = scale0 * to_f(r0[j]);
    if (r1) v += to_f(r1[j]);
    if (r2) v += to_f(r2[j]);
    out[row * h + j] = from_f<T>(v);
  }
}

#define LS_EMBED(T, S)                                                                        \
  extern "C" __global__ void embed_##S(const T* t0, const int* i0, const T* t1, const int* i1, \
                                       const T* t2, const int* i2, T* out, int h,             \
                                       float scale0) {                                        \
    LS_PDL_WAIT();                                                                            \
    embed_body<T>(t0, i0, t1, i1, t2, i2, out, h, scale0);                                    \
  }
LS_FLOAT_TYPES(LS_EMBED)
