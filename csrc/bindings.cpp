// pybind11 surface of the engine. Arguments are raw addresses of torch-owned buffers,
// so the module never links libtorch and survives torch upgrades.
#include <pybind11/pybind11.h>

#include "kernels.h"
#include "stats.h"

namespace py = pybind11;
using torchvitals::StatsBuffers;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

StatsBuffers make_buffers(uintptr_t desc, uintptr_t saturation, int64_t num_tensors,
                          int64_t num_chunks, uintptr_t unit_positive, uintptr_t unit_unsaturated,
                          uintptr_t moments, uintptr_t counts, uintptr_t hist, uintptr_t partials) {
  return StatsBuffers{ptr<const int64_t>(desc),
                      ptr<const double>(saturation),
                      num_tensors,
                      num_chunks,
                      ptr<uint8_t>(unit_positive),
                      ptr<uint8_t>(unit_unsaturated),
                      ptr<double>(moments),
                      ptr<int64_t>(counts),
                      ptr<int64_t>(hist),
                      ptr<double>(partials)};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "torchvitals engine: fused multi-tensor statistics (see csrc/stats.h)";

  m.def(
      "tensor_stats_cpu",
      [](uintptr_t desc, uintptr_t saturation, int64_t num_tensors, int64_t num_chunks,
         uintptr_t unit_positive, uintptr_t unit_unsaturated, uintptr_t moments, uintptr_t counts,
         uintptr_t hist, int num_threads) {
        torchvitals::tensor_stats_cpu(
            make_buffers(desc, saturation, num_tensors, num_chunks, unit_positive, unit_unsaturated,
                         moments, counts, hist, 0),
            num_threads);
      },
      py::call_guard<py::gil_scoped_release>());

  m.def("cpu_isa", &torchvitals::cpu_isa,
        "The CPU kernel in use: 'avx2', or 'baseline' (forced by TORCHVITALS_CPU_ISA=baseline)");

#ifdef TORCHVITALS_WITH_CUDA
  m.def(
      "tensor_stats_cuda",
      [](uintptr_t desc, uintptr_t saturation, int64_t num_tensors, int64_t num_chunks,
         uintptr_t unit_positive, uintptr_t unit_unsaturated, uintptr_t moments, uintptr_t counts,
         uintptr_t hist, uintptr_t partials, intptr_t stream) {
        torchvitals::tensor_stats_cuda(
            make_buffers(desc, saturation, num_tensors, num_chunks, unit_positive, unit_unsaturated,
                         moments, counts, hist, partials),
            stream);
      },
      py::call_guard<py::gil_scoped_release>());
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif

  m.attr("DESC_COLS") = static_cast<int>(torchvitals::kDescCols);
  m.attr("MOMENT_COLS") = static_cast<int>(torchvitals::kMomentCols);
  m.attr("COUNT_COLS") = static_cast<int>(torchvitals::kCountCols);
  m.attr("HIST_BINS") = torchvitals::kHistBins;
  m.attr("HIST_MIN_EXP") = torchvitals::kHistMinExp;
  m.attr("HIST_MAX_EXP") = torchvitals::kHistMaxExp;
  m.attr("CHUNK_ELEMS") = torchvitals::kChunkElems;
}
