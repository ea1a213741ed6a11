// Python bindings of the CPU kernels (one extension module, several sources).
#include <torch/extension.h>

torch::Tensor sampled_grad(torch::Tensor g, torch::Tensor x, torch::Tensor used_rows,
                           torch::Tensor used_cols, torch::Tensor rows, torch::Tensor cols);
void segment_sparse_add(torch::Tensor x, torch::Tensor y, torch::Tensor segment_rows, torch::Tensor segment_used, torch::Tensor used_rows,
                        torch::Tensor row_ptr, torch::Tensor cols, torch::Tensor values);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("sampled_grad", &sampled_grad, "out[j] = sum_t g[t, used_rows[rows[j]]] * x[t, used_cols[cols[j]]]");
    m.def("segment_sparse_add", &segment_sparse_add,
          "per segment of batch rows: y[t, row] += sum of x[t, col] * value over its entries");
}
