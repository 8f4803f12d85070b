// LabelPooling CPU kernel: sparse RoIAlign over top-k ReLabel label maps.
//
// ReLabel (Yun et al., "Re-labeling ImageNet", CVPR 2021) pools a label map with RoIAlign at
// each random crop: the output is roi_align(D, [b, x1*W-0.5, y1*H-0.5, x2*W-0.5, y2*H-0.5],
// (S, S), spatial_scale=1, sampling_ratio=-1, aligned=False) on the densified map D (a class
// listed twice in a cell counts twice), then the mode's epilogue over all C classes.
// RoIAlign is linear in the map and its sampling weights are separable, so for every box and
// output bin we compute the weights a_y[h] and a_x[w] once and sum the (class, weight * value)
// pairs under the bin's footprint per class: the dense [C, H, W] map is never built. The
// weights follow torchvision's roi_align (aligned=False) rule for rule: adaptive sampling grid
// ceil(roi/S), roi size floored at one cell, samples beyond [-1, L] count zero, clamping at the
// border, averaging by the sample count.
//
// Softmax and argmax sum into per-thread scratch, then write the row in one pass without
// reading it back: every unlisted class pools to 0, so the softmax is closed-form over the u
// listed classes (m = max(0, max z), Z = (C - u) e^-m + sum e^(z - m)); the row is filled with
// the unlisted classes' value and the u listed ones are patched in while it is still in cache.
// A logits row needs no statistics: it is zeroed and summed into in place, which is faster than
// tracking the listed classes when a row lists hundreds. One thread owns a row and sums in a
// fixed order, so results are bit-identical across runs and thread counts.
//
// Why a C++ extension (and not numba or TorchScript): it is compiled once at install time
// against the torch that runs it, reads float16/bfloat16 maps natively through c10 types,
// shares torch's OpenMP pool through at::parallel_for, and costs no JIT warm-up in each of the
// many processes (ranks, workers) a training job starts.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

enum Mode : int64_t { kSoftmax = 0, kLogits = 1, kArgmax = 2 };

// RoIAlign weights along one axis for all `bins` output bins.
// weights[bin * length + i] is the weight of cell i, already divided by the bin's sample count
// along this axis; [lo[bin], hi[bin]] is the range of cells with a non-zero weight (lo > hi when
// the bin lies wholly outside the map). Floating-point steps mirror torchvision's CPU kernel.
void axis_weights(float start, float end, int length, int bins, float* weights, int* lo, int* hi) {
  const float roi = std::max(end - start, 1.0f);
  const float bin_size = roi / static_cast<float>(bins);
  const int grid = static_cast<int>(std::ceil(roi / static_cast<float>(bins)));
  std::fill(weights, weights + static_cast<int64_t>(bins) * length, 0.0f);
  for (int bin = 0; bin < bins; ++bin) {
    float* w = weights + static_cast<int64_t>(bin) * length;
    for (int i = 0; i < grid; ++i) {
      float y = start + bin * bin_size +
          static_cast<float>(i + .5f) * bin_size / static_cast<float>(grid);
      if (y < -1.0f || y > static_cast<float>(length)) {
        continue;
      }
      if (y <= 0) {
        y = 0;
      }
      int low = static_cast<int>(y);
      int high;
      if (low >= length - 1) {
        high = low = length - 1;
        y = static_cast<float>(low);
      } else {
        high = low + 1;
      }
      const float l = y - low;
      w[low] += 1.0f - l;
      w[high] += l;
    }
    lo[bin] = length;
    hi[bin] = -1;
    const float inv_grid = 1.0f / static_cast<float>(grid);
    for (int i = 0; i < length; ++i) {
      w[i] *= inv_grid;
      if (w[i] != 0.0f) {
        lo[bin] = std::min(lo[bin], i);
        hi[bin] = i;
      }
    }
  }
}

// Per-thread scratch: the weights of one box, and the classes one output row touched with
// their pooled values.
struct Scratch {
  Scratch(int S, int H, int W, int64_t C, int64_t touched_capacity)
      : ay(static_cast<size_t>(S) * H), ax(static_cast<size_t>(S) * W), ylo(S), yhi(S),
        xlo(S), xhi(S), stamp(C, -1), pooled(C) {
    touched.reserve(touched_capacity);
    touched_values.reserve(touched_capacity);
  }
  std::vector<float> ay, ax;
  std::vector<int> ylo, yhi, xlo, xhi;
  std::vector<int64_t> stamp;  // stamp[c] == current row id <=> class c touched in this row
  std::vector<float> pooled;   // pooled[c]: the row's logit of class c, valid where stamped
  std::vector<int64_t> touched;
  std::vector<float> touched_values;
};

// exp(x) for the softmax's x - max <= 0, within 2 ulp of expf (Cephes' polynomial with a
// Cody-Waite reduction). Unlike glibc's expf, a loop of it vectorizes with the baseline
// x86-64/aarch64 flags this extension is built with; images whose maps touch hundreds of
// classes spend most of the epilogue here.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // e^-87 ~ 1.6e-38: the smallest normal float, 2^n stays in range
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e_r * scale;
}

// Softmax over all C classes of a row whose untouched classes are 0 (as after densifying):
// those share one value, so only the touched ones need an exp.
void softmax_epilogue(float* row, int64_t C, Scratch& s) {
  const int64_t n = static_cast<int64_t>(s.touched.size());
  float m = n < C ? 0.0f : -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    s.touched_values[i] = s.pooled[s.touched[i]];
    m = std::max(m, s.touched_values[i]);
  }
  float* e = s.touched_values.data();
  for (int64_t i = 0; i < n; ++i) {
    e[i] = exp_nonpositive(e[i] - m);
  }
  // The C - n unlisted classes, of logit 0, make m >= 0. Without them m can be far below 0
  // and e^-m infinite, so it is only taken when they exist.
  double z = n < C ? static_cast<double>(C - n) * std::exp(static_cast<double>(-m)) : 0.0;
  for (int64_t i = 0; i < n; ++i) {
    z += e[i];
  }
  const float inv_z = static_cast<float>(1.0 / z);
  std::fill(row, row + C, n < C ? std::exp(-m) * inv_z : 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    row[s.touched[i]] = e[i] * inv_z;
  }
}

// One-hot of the first maximal class of the dense row (torch.argmax's tie rule).
void argmax_epilogue(float* row, int64_t C, int64_t stamp_id, Scratch& s) {
  const int64_t n = static_cast<int64_t>(s.touched.size());
  float best = -std::numeric_limits<float>::infinity();
  int64_t winner = C;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = s.touched[i];
    const float v = s.pooled[c];
    if (v > best || (v == best && c < winner)) {
      best = v;
      winner = c;
    }
  }
  if (n < C && best <= 0.0f) {
    int64_t first_untouched = 0;
    while (s.stamp[first_untouched] == stamp_id) {
      ++first_untouched;
    }
    if (best < 0.0f || first_untouched < winner) {
      winner = first_untouched;
    }
  }
  std::fill(row, row + C, 0.0f);
  row[winner] = 1.0f;
}

// Output bins (boxes x S x S) per thread before at::parallel_for splits the batch.
constexpr int64_t kMinBinsPerThread = 128;

template <typename value_t, typename index_t>
void label_pooling_impl(
    const value_t* values, const index_t* indices, const float* boxes,
    const int64_t* sample_index, const bool* flip, float* out,
    int64_t B, int64_t N, int K, int H, int W, int64_t C, int S, int64_t mode) {
  const int64_t map_size = static_cast<int64_t>(H) * W;
  // Only enough output bins are worth a thread team: a loader's batch of 64 S = 1 targets
  // takes 0.2 ms on one core, while waking a team whose other thread waits for a core busy
  // decoding can stall it for milliseconds.
  const int64_t grain = std::max<int64_t>(1, kMinBinsPerThread / (static_cast<int64_t>(S) * S));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    Scratch s(S, H, W, C, static_cast<int64_t>(K) * map_size);
    int64_t stamp_id = 0;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = sample_index != nullptr ? sample_index[b] : b;
      const float* box = boxes + 4 * b;
      // The box in label-map cells, as the roi_align call above: x * W - 0.5.
      axis_weights(box[0] * W - 0.5f, box[2] * W - 0.5f, W, S, s.ax.data(), s.xlo.data(),
                   s.xhi.data());
      axis_weights(box[1] * H - 0.5f, box[3] * H - 0.5f, H, S, s.ay.data(), s.ylo.data(),
                   s.yhi.data());
      const bool mirrored = flip != nullptr && flip[b];
      const bool row_ok = row >= 0 && row < N;  // the wrapper checks; never read outside
      const value_t* v_map = values + (row_ok ? row : 0) * K * map_size;
      const index_t* i_map = indices + (row_ok ? row : 0) * K * map_size;
      for (int ph = 0; ph < S; ++ph) {
        for (int pw = 0; pw < S; ++pw) {
          const int pw_out = mirrored ? S - 1 - pw : pw;
          float* out_row = out + ((b * S + ph) * S + pw_out) * C;
          ++stamp_id;
          s.touched.clear();
          if (mode == kLogits) {
            std::fill(out_row, out_row + C, 0.0f);
          }
          const float* ay = s.ay.data() + static_cast<int64_t>(ph) * H;
          const float* ax = s.ax.data() + static_cast<int64_t>(pw) * W;
          for (int k = 0; k < K && row_ok; ++k) {
            for (int h = s.ylo[ph]; h <= s.yhi[ph]; ++h) {
              const int64_t offset = k * map_size + static_cast<int64_t>(h) * W;
              for (int w = s.xlo[pw]; w <= s.xhi[pw]; ++w) {
                const int64_t c = static_cast<int64_t>(i_map[offset + w]);
                if (c < 0 || c >= C) {
                  continue;  // the wrapper checks; never write outside the row
                }
                const float contribution =
                    ay[h] * ax[w] * static_cast<float>(v_map[offset + w]);
                if (mode == kLogits) {
                  out_row[c] += contribution;
                } else if (s.stamp[c] != stamp_id) {
                  s.stamp[c] = stamp_id;
                  s.touched.push_back(c);
                  s.pooled[c] = contribution;
                } else {
                  s.pooled[c] += contribution;
                }
              }
            }
          }
          if (mode == kSoftmax) {
            s.touched_values.resize(s.touched.size());
            softmax_epilogue(out_row, C, s);
          } else if (mode == kArgmax) {
            argmax_epilogue(out_row, C, stamp_id, s);
          }
        }
      }
    }
  });
}

template <typename value_t>
void dispatch_index(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& boxes,
                    const int64_t* sample_index, const bool* flip, at::Tensor& out,
                    int64_t C, int S, int64_t mode) {
  const int64_t B = boxes.size(0);
  const int64_t N = values.size(0);
  const int K = static_cast<int>(values.size(1));
  const int H = static_cast<int>(values.size(2));
  const int W = static_cast<int>(values.size(3));
  const auto* v = values.data_ptr<value_t>();
  const float* bx = boxes.data_ptr<float>();
  float* o = out.data_ptr<float>();
  switch (indices.scalar_type()) {
    case at::kShort:
      label_pooling_impl(v, indices.data_ptr<int16_t>(), bx, sample_index, flip, o, B, N, K, H,
                         W, C, S, mode);
      break;
    case at::kInt:
      label_pooling_impl(v, indices.data_ptr<int32_t>(), bx, sample_index, flip, o, B, N, K, H,
                         W, C, S, mode);
      break;
    case at::kLong:
      label_pooling_impl(v, indices.data_ptr<int64_t>(), bx, sample_index, flip, o, B, N, K, H,
                         W, C, S, mode);
      break;
    default:
      TORCH_CHECK(false, "label_pooling: indices must be int16, int32 or int64, got ",
                  indices.scalar_type());
  }
}

// values [N, K, H, W], indices [N, K, H, W], boxes [B, 4] float32 (x1, y1, x2, y2) normalized,
// sample_index [B] int64 (optional: row b pooled when absent, then N == B), flip [B] bool
// (optional). Returns float32 [B, S*S, C]. Inputs are contiguous CPU tensors already checked
// by the Python wrapper.
at::Tensor label_pooling_forward(const at::Tensor& values, const at::Tensor& indices,
                                 const at::Tensor& boxes,
                                 const c10::optional<at::Tensor>& sample_index,
                                 const c10::optional<at::Tensor>& flip, int64_t num_classes,
                                 int64_t output_size, int64_t mode) {
  TORCH_CHECK(values.is_contiguous() && indices.is_contiguous() && boxes.is_contiguous(),
              "label_pooling: inputs must be contiguous");
  TORCH_CHECK(boxes.scalar_type() == at::kFloat, "label_pooling: boxes must be float32");
  TORCH_CHECK(mode >= kSoftmax && mode <= kArgmax, "label_pooling: unknown mode ", mode);
  // An empty axis would put the border cell at index -1.
  TORCH_CHECK(values.dim() == 4 && indices.sizes() == values.sizes() && values.size(1) >= 1 &&
                  values.size(2) >= 1 && values.size(3) >= 1,
              "label_pooling: values and indices must be [N, K, H, W] alike with K, H, W >= 1");
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "label_pooling: boxes must be [B, 4]");
  const int S = static_cast<int>(output_size);
  auto out = at::empty({boxes.size(0), output_size * output_size, num_classes},
                       values.options().dtype(at::kFloat));
  const int64_t* si = nullptr;
  if (sample_index.has_value()) {
    TORCH_CHECK(sample_index->scalar_type() == at::kLong && sample_index->is_contiguous(),
                "label_pooling: sample_index must be contiguous int64");
    si = sample_index->data_ptr<int64_t>();
  }
  const bool* fl = nullptr;
  if (flip.has_value()) {
    TORCH_CHECK(flip->scalar_type() == at::kBool && flip->is_contiguous(),
                "label_pooling: flip must be contiguous bool");
    fl = flip->data_ptr<bool>();
  }
  switch (values.scalar_type()) {
    case at::kHalf:
      dispatch_index<at::Half>(values, indices, boxes, si, fl, out, num_classes, S, mode);
      break;
    case at::kBFloat16:
      dispatch_index<at::BFloat16>(values, indices, boxes, si, fl, out, num_classes, S, mode);
      break;
    case at::kFloat:
      dispatch_index<float>(values, indices, boxes, si, fl, out, num_classes, S, mode);
      break;
    default:
      TORCH_CHECK(false, "label_pooling: values must be float16, bfloat16 or float32, got ",
                  values.scalar_type());
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Sparse LabelPooling (ReLabel) CPU kernel";
  m.def("label_pooling_forward", &label_pooling_forward,
        "LabelPooling over top-k label maps; returns float32 [B, S*S, C]");
}
