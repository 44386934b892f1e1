// pybind11 surface of the engine. Arguments are raw addresses of torch-owned buffers,
// so the module never links libtorch and survives torch upgrades.
#include <pybind11/pybind11.h>

#include <string>

#include "checksum.h"
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

template <typename Bits, int (*bin_of)(Bits)>
void bin_each(uintptr_t bits, int64_t n, uintptr_t bins) {
  const Bits* in = ptr<const Bits>(bits);
  int64_t* out = ptr<int64_t>(bins);
  for (int64_t i = 0; i < n; ++i) out[i] = bin_of(in[i]);
}

template <size_t N>
py::tuple names(const char* const (&of)[N]) {
  py::tuple out(N);
  for (size_t i = 0; i < N; ++i) out[i] = py::str(of[i]);
  return out;
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

  // The histogram binning rule itself, compiled for the host (the CUDA kernel calls the same
  // function): the exhaustive binning test compares it with the CPU kernel and the reference.
  m.def("hist_slots_f32", &bin_each<uint32_t, torchvitals::hist_slot_f32>,
        "slots[i] = the two-row histogram slot of fp32 bit pattern bits[i]: its bin, plus "
        "HIST_BINS when negative (raw addresses, n elements)");
  m.def("hist_slots_f64", &bin_each<uint64_t, torchvitals::hist_slot_f64>,
        "slots[i] = the two-row histogram slot of fp64 bit pattern bits[i]: its bin, plus "
        "HIST_BINS when negative (raw addresses, n elements)");

  m.def(
      "nh64",
      [](uintptr_t data, int64_t n, uintptr_t keys, int64_t block, uint64_t step) {
        return torchvitals::nh64(ptr<const uint8_t>(data), n, ptr<const uint64_t>(keys), block,
                                 step);
      },
      py::call_guard<py::gil_scoped_release>(),
      "nh64 of n bytes at data with the block keys at keys (see checksum.h)");

  // The layout contract of stats.h, by name (python/torchvitals/engine/contract.py reads it).
  m.attr("DTYPES") = names(torchvitals::kDTypeNames);
  m.attr("DESC_COLUMNS") = names(torchvitals::kDescNames);
  m.attr("MOMENT_COLUMNS") = names(torchvitals::kMomentNames);
  m.attr("COUNT_COLUMNS") = names(torchvitals::kCountNames);
  m.attr("HIST_BINS") = torchvitals::kHistBins;
  m.attr("HIST_ROWS") = torchvitals::kHistRows;
  m.attr("HIST_MIN_EXP") = torchvitals::kHistMinExp;
  m.attr("HIST_MAX_EXP") = torchvitals::kHistMaxExp;
  m.attr("CHUNK_ELEMS") = torchvitals::kChunkElems;
}
