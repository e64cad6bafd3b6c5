// Rotary position embedding, "rotate half" form, in place. One block per row; threads over
// (head, pair). Pair (p, p + half) of each head turns by positions[row] * inv_freq[p].

template <typename T>
__device__ void rotary_body(T* x, const int* positions, const float* inv_freq, int width,
                            int col, int heads, int head_dim, int half, float scaling) {
  const long long row = blockIdx.x;
  const float pos = (float)positions[row];
  T* r = x + row * width + col;
  for (int t = threadIdx.x; t < heads * half; t += blockDim.x) {
    const int h = t / half, p = t % half;
    float s, c;
    sincosf(pos * inv_freq[p], &s, &c);
    s *= scaling;
    c *= scaling;
    T* e = r + h * head_dim;
    const float a = to_f(e[p]), b = to_f(e[p + half]);
    e[p] = from_f<T>(a * c - b * s);
    e[p + half] = from_f<T>(b * c + a * s);
  }
}

#define LS_ROTARY(T, S)                                                                       \
  extern "C" __global__ void rotary_##S(T* x, const int* positions, const float* inv_freq,    \
                                        int width, int col, int heads, int head_dim, int half, \
                                        float scaling) {                                      \
    LS_PDL_WAIT();                                                                            \
    rotary_body<T>(x, positions, inv_freq, width, col, heads, head_dim, half, scaling);       \
  }
LS_FLOAT_TYPES(LS_ROTARY)
