// Latency of grid-wide barriers, of a flag handed between blocks, and of graph-launched
// kernels (plain and with programmatic dependent launch) on the GPU at hand: what a decode
// step's dependent stages cost before any work (docs/performance.md, session 33, item 4).
// On the GPU machine: nvcc -O3 -arch=sm_90 -o sync_latency scripts/bench/sync_latency.cu
// && ./sync_latency
#include <cooperative_groups.h>
#include <cstdio>
#include <cuda_runtime.h>
namespace cg = cooperative_groups;

__global__ void coop_sync(int iters, int* sink) {
  cg::grid_group g = cg::this_grid();
  for (int i = 0; i < iters; ++i) g.sync();
  if (threadIdx.x == 0 && blockIdx.x == 0) *sink = iters;
}

// Sense-reversing barrier on a global counter: thread 0 of each block arrives, the last
// flips the generation; others spin on it.
__device__ void my_barrier(unsigned int* count, volatile unsigned int* gen, unsigned int nblocks) {
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned int g0 = *gen;
    __threadfence();
    if (atomicAdd(count, 1u) == nblocks - 1) {
      *count = 0;
      __threadfence();
      *gen = g0 + 1;
    } else {
      while (*gen == g0) {}
    }
    __threadfence();
  }
  __syncthreads();
}
__global__ void flag_sync(int iters, unsigned int* count, unsigned int* gen) {
  for (int i = 0; i < iters; ++i) my_barrier(count, gen, gridDim.x);
}

// One block hands a flag to the next block in a chain (a producer/consumer dependency).
__global__ void chain(int iters, volatile unsigned int* flags) {
  const unsigned int b = blockIdx.x, n = gridDim.x;
  for (int i = 0; i < iters; ++i) {
    if (threadIdx.x == 0) {
      const unsigned int want = i * n + b;
      while (flags[0] != want) {}
      __threadfence();
      flags[0] = want + 1;
    }
    __syncthreads();
  }
}

__global__ void empty_kernel() {}
__global__ void empty_pdl() {
  asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory");
}

// Microseconds a kernel when a graph of `nodes` empty kernels of `blocks` blocks replays
// (20 replays after a warm one); with `pdl`, each launch allows programmatic dependent
// launch and the kernel waits for its predecessor as ours do.
float graph_us_per_kernel(int nodes, int blocks, bool pdl) {
  cudaStream_t s;
  cudaStreamCreate(&s);
  cudaGraph_t g;
  cudaGraphExec_t ge;
  cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
  for (int i = 0; i < nodes; ++i) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(128);
    cfg.stream = s;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = pdl ? 1 : 0;
    if (pdl) {
      cudaLaunchKernelEx(&cfg, empty_pdl);
    } else {
      cudaLaunchKernelEx(&cfg, empty_kernel);
    }
  }
  cudaStreamEndCapture(s, &g);
  cudaGraphInstantiate(&ge, g, 0);
  cudaGraphLaunch(ge, s);
  cudaStreamSynchronize(s);
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  cudaEventRecord(a, s);
  for (int r = 0; r < 20; ++r) cudaGraphLaunch(ge, s);
  cudaEventRecord(b, s);
  cudaEventSynchronize(b);
  float ms = 0.f;
  cudaEventElapsedTime(&ms, a, b);
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
  cudaStreamDestroy(s);
  return ms * 1e3f / (20 * nodes);
}

// Microseconds of one cooperative launch of `kernel` over `blocks` blocks, timed after a
// warm one; `zero`, when set, is cleared before each launch.
float coop_us(const void* kernel, void** args, int blocks, int threads, unsigned int* zero) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  float ms = 0.f;
  for (int round = 0; round < 2; ++round) {
    if (zero) cudaMemset(zero, 0, 4);
    cudaEventRecord(a);
    cudaLaunchCooperativeKernel(kernel, blocks, threads, args, 0, 0);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    cudaEventElapsedTime(&ms, a, b);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ms * 1e3f;
}

int main() {
  int dev = 0, sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceProp p;
  cudaGetDeviceProperties(&p, dev);
  printf("%s, %d SMs\n", p.name, sms);
  int* sink;
  unsigned int *count, *gen, *flags;
  cudaMalloc(&sink, 4);
  cudaMalloc(&count, 4);
  cudaMalloc(&gen, 4);
  cudaMalloc(&flags, 4);
  cudaMemset(gen, 0, 4);
  for (int threads : {128, 256, 512}) {
    int iters = 2000;
    void* args[] = {&iters, &sink};
    float us = coop_us((void*)coop_sync, args, sms, threads, nullptr);
    printf("cg grid.sync, %d blocks x %d threads: %.3f us a barrier (%s)\n", sms, threads,
           us / iters, cudaGetErrorString(cudaGetLastError()));
    void* args2[] = {&iters, &count, &gen};
    us = coop_us((void*)flag_sync, args2, sms, threads, count);
    printf("atomic barrier, %d blocks x %d threads: %.3f us a barrier (%s)\n", sms, threads,
           us / iters, cudaGetErrorString(cudaGetLastError()));
  }
  {
    int iters = 200;
    void* args[] = {&iters, &flags};
    float us = coop_us((void*)chain, args, sms, 128, flags);
    printf("flag hand-off between blocks (SM to SM): %.3f us a hop (%s)\n", us / (iters * sms),
           cudaGetErrorString(cudaGetLastError()));
  }
  for (bool pdl : {false, true}) {
    for (int nodes : {73, 200}) {
      printf("graph of %d empty %d-block kernels%s: %.3f us a kernel (%s)\n", nodes, sms,
             pdl ? " with programmatic dependent launch" : "", graph_us_per_kernel(nodes, sms, pdl),
             cudaGetErrorString(cudaGetLastError()));
    }
  }
  return 0;
}
