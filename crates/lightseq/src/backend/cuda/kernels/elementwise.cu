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
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    out[i] = from_f<T>(to_f(a[i]) + to_f(b[i]));
  }
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
