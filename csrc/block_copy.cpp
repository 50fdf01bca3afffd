// Cache block copies and CUDA IPC helpers for moving MM/KV blocks between workers.
//
// A cache tensor is viewed as [outer, blocks, inner]: for the KV cache
// [layers, 2, blocks, block_size, heads, head_dim] outer = layers * 2, so one call moves a list
// of blocks across every layer. Consecutive block ids are merged into runs first, so a
// sequence whose blocks were allocated together moves in a few large copies.
#include <torch/extension.h>

#include <cstring>
#include <tuple>
#include <vector>

using Run = std::tuple<int64_t, int64_t, int64_t>;  // (src block, dst block, count)

std::vector<Run> coalesce_runs(const std::vector<int64_t>& src, const std::vector<int64_t>& dst) {
  TORCH_CHECK(src.size() == dst.size(), "copy_blocks: ", src.size(), " source blocks but ", dst.size(), " destination blocks");
  std::vector<Run> runs;
  for (size_t i = 0; i < src.size(); ++i) {
    if (!runs.empty()) {
      auto& [s, d, n] = runs.back();
      if (src[i] == s + n && dst[i] == d + n) {
        ++n;
        continue;
      }
    }
    runs.emplace_back(src[i], dst[i], 1);
  }
  return runs;
}

struct BlockView {
  int64_t outer, blocks, inner_bytes;
};

BlockView block_view(const torch::Tensor& t, int64_t block_dim, const char* what) {
  TORCH_CHECK(t.is_contiguous(), "copy_blocks: ", what, " cache must be contiguous");
  TORCH_CHECK(block_dim >= 0 && block_dim < t.dim(), "copy_blocks: block_dim ", block_dim, " out of range for a ", t.dim(), "-d ", what);
  int64_t outer = 1, inner = t.element_size();
  for (int64_t d = 0; d < block_dim; ++d) outer *= t.size(d);
  for (int64_t d = block_dim + 1; d < t.dim(); ++d) inner *= t.size(d);
  return {outer, t.size(block_dim), inner};
}

void check_runs(const std::vector<Run>& runs, int64_t src_blocks, int64_t dst_blocks) {
  for (const auto& [s, d, n] : runs) {
    TORCH_CHECK(s >= 0 && s + n <= src_blocks, "copy_blocks: source block ", s, "..", s + n - 1, " outside 0..", src_blocks - 1);
    TORCH_CHECK(d >= 0 && d + n <= dst_blocks, "copy_blocks: destination block ", d, "..", d + n - 1, " outside 0..", dst_blocks - 1);
  }
}

void check_pair(const torch::Tensor& src, const torch::Tensor& dst, int64_t block_dim) {
  TORCH_CHECK(src.scalar_type() == dst.scalar_type(), "copy_blocks: dtypes differ (", src.scalar_type(), " vs ", dst.scalar_type(), ")");
  TORCH_CHECK(src.dim() == dst.dim(), "copy_blocks: source is ", src.dim(), "-d, destination ", dst.dim(), "-d");
  for (int64_t d = 0; d < src.dim(); ++d)
    TORCH_CHECK(d == block_dim || src.size(d) == dst.size(d), "copy_blocks: shapes differ in dim ", d, ": ", src.sizes(), " vs ", dst.sizes());
}

// Host memory: one memcpy per (outer index, run).
void copy_blocks_cpu(torch::Tensor src, torch::Tensor dst, std::vector<int64_t> src_blocks, std::vector<int64_t> dst_blocks,
                     int64_t block_dim) {
  TORCH_CHECK(src.device().is_cpu() && dst.device().is_cpu(), "copy_blocks_cpu: tensors must be on the CPU");
  check_pair(src, dst, block_dim);
  auto sv = block_view(src, block_dim, "source");
  auto dv = block_view(dst, block_dim, "destination");
  auto runs = coalesce_runs(src_blocks, dst_blocks);
  check_runs(runs, sv.blocks, dv.blocks);
  auto* s = static_cast<const char*>(src.data_ptr());
  auto* d = static_cast<char*>(dst.data_ptr());
  const int64_t bytes = sv.inner_bytes;
  at::parallel_for(0, sv.outer, 1, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o)
      for (const auto& [sb, db, n] : runs)
        std::memcpy(d + (o * dv.blocks + db) * bytes, s + (o * sv.blocks + sb) * bytes, n * bytes);
  });
}

#ifdef EPD_WITH_CUDA
void copy_blocks_cuda_launch(int64_t src_ptr, torch::Tensor dst, int64_t src_blocks, const std::vector<Run>& runs, const BlockView& dv,
                             int64_t chunk);
std::tuple<py::bytes, int64_t, int64_t> ipc_export(torch::Tensor t);
int64_t ipc_open(py::bytes handle, int64_t device);
void ipc_close(int64_t ptr, int64_t device);
void enable_peer_access(int64_t device, int64_t peer);

// Device memory: every (outer index, run) in one kernel launch. `src_ptr` is a pointer valid in
// this process: a local tensor's, or a peer GPU's cache opened with ipc_open. `chunk_bytes` 0: sized for
// the device (several CTAs per SM); the benchmarks pass others to compare.
void copy_blocks_cuda(int64_t src_ptr, int64_t src_num_blocks, torch::Tensor dst, std::vector<int64_t> src_blocks,
                      std::vector<int64_t> dst_blocks, int64_t block_dim, int64_t chunk_bytes) {
  TORCH_CHECK(dst.is_cuda(), "copy_blocks_cuda: destination must be a CUDA tensor");
  auto dv = block_view(dst, block_dim, "destination");
  auto runs = coalesce_runs(src_blocks, dst_blocks);
  check_runs(runs, src_num_blocks, dv.blocks);
  if (!runs.empty()) copy_blocks_cuda_launch(src_ptr, dst, src_num_blocks, runs, dv, chunk_bytes);
}
#endif

bool has_cuda() {
#ifdef EPD_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "EPD cache block copies (CPU always; CUDA batched peer copy and IPC when built with CUDA)";
  m.def("coalesce_runs", &coalesce_runs, "merge consecutive (src, dst) block pairs into (src, dst, count) runs");
  m.def("copy_blocks_cpu", &copy_blocks_cpu, "copy blocks between two host cache tensors");
  m.def("has_cuda", &has_cuda, "whether the CUDA part was built");
#ifdef EPD_WITH_CUDA
  m.def("copy_blocks_cuda", &copy_blocks_cuda, "copy blocks from a (peer) device pointer into a CUDA cache tensor in one launch",
        py::arg("src_ptr"), py::arg("src_num_blocks"), py::arg("dst"), py::arg("src_blocks"), py::arg("dst_blocks"), py::arg("block_dim"),
        py::arg("chunk_bytes") = 0);
  m.def("ipc_export", &ipc_export, "CUDA IPC handle of a tensor's allocation: (handle, offset, device)");
  m.def("ipc_open", &ipc_open, "open a peer's IPC handle on this device; returns the base pointer");
  m.def("ipc_close", &ipc_close, "close a pointer returned by ipc_open");
  m.def("enable_peer_access", &enable_peer_access, "let kernels on `device` read `peer`'s memory (same process)");
#endif
}
