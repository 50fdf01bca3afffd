// CUDA half of block_copy.cpp: the batched block copy kernel and CUDA IPC.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

namespace py = pybind11;
using Run = std::tuple<int64_t, int64_t, int64_t>;

struct BlockView {
  int64_t outer, blocks, inner_bytes;
};

#define EPD_CUDA_CHECK(expr)                                                          \
  do {                                                                                \
    cudaError_t err__ = (expr);                                                       \
    TORCH_CHECK(err__ == cudaSuccess, #expr " failed: ", cudaGetErrorString(err__)); \
  } while (0)

// CTA (x, y, z) copies chunk z of run x in outer slice y: contiguous bytes, 16 B per load when both
// ends are 16-byte aligned (always, for bf16 caches with head_dim a multiple of 8). A peer's memory
// is microseconds away over NVLink, so bandwidth needs many loads in flight: each thread issues
// kUnroll loads before its stores, and chunks are sized so that a launch has several CTAs per SM
// even when there are few runs and one outer slice (an MM cache).
constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int64_t kMinChunk = 16 * 1024;
constexpr int64_t kMaxChunk = 1024 * 1024;
constexpr int kCtasPerSm = 8;

__global__ void __launch_bounds__(kThreads) copy_runs_kernel(const char* __restrict__ src, char* __restrict__ dst,
                                                             const int64_t* __restrict__ runs, int64_t src_blocks,
                                                             int64_t dst_blocks, int64_t inner_bytes, int64_t chunk) {
  const int64_t r = blockIdx.x, o = blockIdx.y;
  const int64_t sb = runs[3 * r], db = runs[3 * r + 1], n = runs[3 * r + 2];
  const int64_t bytes = n * inner_bytes;
  const int64_t begin = blockIdx.z * chunk;
  if (begin >= bytes) return;
  const int64_t len = min(chunk, bytes - begin);
  const char* s = src + (o * src_blocks + sb) * inner_bytes + begin;
  char* d = dst + (o * dst_blocks + db) * inner_bytes + begin;
  if ((reinterpret_cast<uintptr_t>(s) | reinterpret_cast<uintptr_t>(d) | len) % 16 == 0) {
    const int4* s4 = reinterpret_cast<const int4*>(s);
    int4* d4 = reinterpret_cast<int4*>(d);
    const int64_t n4 = len / 16;
    int64_t i = threadIdx.x;
    for (; i + (kUnroll - 1) * kThreads < n4; i += kUnroll * kThreads) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = s4[i + u * kThreads];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) d4[i + u * kThreads] = v[u];
    }
    for (; i < n4; i += kThreads) d4[i] = s4[i];
  } else {
    for (int64_t i = threadIdx.x; i < len; i += kThreads) d[i] = s[i];
  }
}

// Chunk bytes for a launch moving `total` bytes: about kCtasPerSm CTAs per SM in all, 16 KiB to 1 MiB
// each (the caller raises it where a run would need more than 65535 chunks).
int64_t chunk_bytes(int64_t total, int sms) {
  const int64_t chunk = total / std::max<int64_t>(1, (int64_t)sms * kCtasPerSm);
  return (std::min(kMaxChunk, std::max(kMinChunk, chunk)) + 15) / 16 * 16;
}

int sm_count(int device) {
  static int counts[64] = {0};  // per device; read once
  if (device < 0 || device >= 64) return 132;
  if (counts[device] == 0) EPD_CUDA_CHECK(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device));
  return counts[device];
}

void copy_blocks_cuda_launch(int64_t src_ptr, torch::Tensor dst, int64_t src_blocks, const std::vector<Run>& runs, const BlockView& dv,
                             int64_t chunk) {
  const c10::cuda::CUDAGuard guard(dst.device());
  std::vector<int64_t> flat;
  flat.reserve(runs.size() * 3);
  int64_t longest = 0, total = 0;
  for (const auto& [s, d, n] : runs) {
    flat.push_back(s);
    flat.push_back(d);
    flat.push_back(n);
    longest = std::max(longest, n);
    total += n;
  }
  const int64_t max_bytes = longest * dv.inner_bytes;
  if (chunk <= 0) chunk = chunk_bytes(total * dv.inner_bytes * dv.outer, sm_count(dst.device().index()));
  chunk = std::max(chunk, ((max_bytes + 65534) / 65535 + 15) / 16 * 16);  // at most 65535 chunks per run
  const int64_t chunks = (max_bytes + chunk - 1) / chunk;
  TORCH_CHECK(runs.size() <= 2147483647 && dv.outer <= 65535, "copy_blocks_cuda: too many runs or layers for one launch");
  // Pinned staging: the copy of the run list is asynchronous (the caching host allocator keeps the
  // buffer alive until the stream has used it), so a pull does not stall the host.
  auto host = torch::empty({(int64_t)flat.size()}, torch::dtype(torch::kInt64).pinned_memory(true));
  std::memcpy(host.data_ptr<int64_t>(), flat.data(), flat.size() * sizeof(int64_t));
  auto runs_dev = host.to(dst.device(), /*non_blocking=*/true);
  dim3 grid((unsigned)runs.size(), (unsigned)dv.outer, (unsigned)chunks);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  copy_runs_kernel<<<grid, kThreads, 0, stream>>>(reinterpret_cast<const char*>(src_ptr), static_cast<char*>(dst.data_ptr()),
                                                  runs_dev.data_ptr<int64_t>(), src_blocks, dv.blocks, dv.inner_bytes, chunk);
  EPD_CUDA_CHECK(cudaGetLastError());
}

std::tuple<py::bytes, int64_t, int64_t> ipc_export(torch::Tensor t) {
  TORCH_CHECK(t.is_cuda(), "ipc_export: tensor must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(t.device());
  size_t size = 0;
  void* base = c10::cuda::CUDACachingAllocator::getBaseAllocation(t.data_ptr(), &size);
  cudaIpcMemHandle_t handle;
  EPD_CUDA_CHECK(cudaIpcGetMemHandle(&handle, base));
  const int64_t offset = static_cast<char*>(t.data_ptr()) - static_cast<char*>(base);
  return {py::bytes(reinterpret_cast<const char*>(&handle), sizeof(handle)), offset, (int64_t)t.device().index()};
}

int64_t ipc_open(py::bytes handle, int64_t device) {
  std::string raw = handle;
  TORCH_CHECK(raw.size() == sizeof(cudaIpcMemHandle_t), "ipc_open: handle has ", raw.size(), " bytes, expected ", sizeof(cudaIpcMemHandle_t));
  cudaIpcMemHandle_t h;
  std::memcpy(&h, raw.data(), sizeof(h));
  const c10::cuda::CUDAGuard guard((c10::DeviceIndex)device);
  void* ptr = nullptr;
  EPD_CUDA_CHECK(cudaIpcOpenMemHandle(&ptr, h, cudaIpcMemLazyEnablePeerAccess));
  return reinterpret_cast<int64_t>(ptr);
}

void ipc_close(int64_t ptr, int64_t device) {
  const c10::cuda::CUDAGuard guard((c10::DeviceIndex)device);
  EPD_CUDA_CHECK(cudaIpcCloseMemHandle(reinterpret_cast<void*>(ptr)));
}

// Lets kernels on `device` read `peer`'s memory in this process (IPC mappings enable it themselves).
void enable_peer_access(int64_t device, int64_t peer) {
  const c10::cuda::CUDAGuard guard((c10::DeviceIndex)device);
  cudaError_t err = cudaDeviceEnablePeerAccess((int)peer, 0);
  if (err == cudaErrorPeerAccessAlreadyEnabled) {
    (void)cudaGetLastError();
    return;
  }
  EPD_CUDA_CHECK(err);
}
