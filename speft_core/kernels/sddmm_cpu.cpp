// Sampled dense-dense product for the sparse delta's gradient, on the CPU.
//
//   out[j] = sum_t g[t, rows[j]] * x[t, cols[j]]      for the k masked entries j
//
// g is (T, n_out) and x is (T, n_in), both row-major as autograd hands them over. A dot over t
// needs t-minor data, but transposing g and x whole costs more than the dots themselves, so
// the T axis is cut into tiles of TILE rows: each thread transposes one tile of g and x into
// small buffers that stay in its L2 cache, then runs k contiguous dots of length TILE over them
// and adds into its own accumulator. Only the rows of g and columns of x that the mask uses are
// transposed (`used_rows`, `used_cols`; each entry addresses them by its compacted position),
// so the copy shrinks with the mask. Accumulators are summed in a fixed order: deterministic
// for a given thread count. Entries sorted by row keep a row of the g tile hot in L1.
// bf16 / fp16 inputs are widened to fp32 as the tiles are transposed (acc_t, the opmath type),
// so the dots and the result are fp32 without a widened copy of g or x.
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <vector>

namespace {

constexpr int64_t TILE = 64;

template <typename scalar_t, typename acc_t, typename index_t>
void gather_transpose_tile(const scalar_t* src, int64_t ld, int64_t rows, const index_t* used,
                           int64_t n_used, acc_t* dst) {
    // dst[u * TILE + r] = src[r * ld + used[u]] for r < rows: the used columns of a row tile
    constexpr int64_t B = 16;
    for (int64_t u0 = 0; u0 < n_used; u0 += B) {
        const int64_t u1 = std::min(u0 + B, n_used);
        for (int64_t r = 0; r < rows; ++r) {
            const scalar_t* s = src + r * ld;
            for (int64_t u = u0; u < u1; ++u) dst[u * TILE + r] = static_cast<acc_t>(s[used[u]]);
        }
    }
}

template <typename scalar_t, typename acc_t, typename index_t>
void sddmm_kernel(const scalar_t* g, const scalar_t* x, const index_t* used_rows, int64_t n_rows,
                  const index_t* used_cols, int64_t n_cols, const index_t* rows,
                  const index_t* cols, int64_t T, int64_t n_out, int64_t n_in, int64_t k,
                  acc_t* out) {
    const int64_t n_tiles = (T + TILE - 1) / TILE;
    const int n_threads = std::max<int>(1, std::min<int64_t>(at::get_num_threads(), n_tiles));
    std::vector<std::vector<acc_t>> partial(n_threads, std::vector<acc_t>(k, acc_t(0)));
    at::parallel_for(0, n_threads, 1, [&](int64_t w0, int64_t w1) {
        std::vector<acc_t> gt(n_rows * TILE), xt(n_cols * TILE);
        for (int64_t w = w0; w < w1; ++w) {
            acc_t* acc = partial[w].data();
            // worker w takes a contiguous, fixed range of tiles (deterministic split)
            const int64_t tile_lo = n_tiles * w / n_threads, tile_hi = n_tiles * (w + 1) / n_threads;
            for (int64_t tile = tile_lo; tile < tile_hi; ++tile) {
                const int64_t t0 = tile * TILE, len = std::min(TILE, T - t0);
                if (len < TILE) {  // zero the tail so every dot can run the full TILE
                    std::fill(gt.begin(), gt.end(), acc_t(0));
                    std::fill(xt.begin(), xt.end(), acc_t(0));
                }
                gather_transpose_tile(g + t0 * n_out, n_out, len, used_rows, n_rows, gt.data());
                gather_transpose_tile(x + t0 * n_in, n_in, len, used_cols, n_cols, xt.data());
                for (int64_t j = 0; j < k; ++j) {
                    const acc_t* a = gt.data() + static_cast<int64_t>(rows[j]) * TILE;
                    const acc_t* b = xt.data() + static_cast<int64_t>(cols[j]) * TILE;
                    acc_t s = 0;
#pragma omp simd reduction(+ : s)
                    for (int64_t t = 0; t < TILE; ++t) s += a[t] * b[t];
                    acc[j] += s;
                }
            }
        }
    });
    for (int64_t j = 0; j < k; ++j) {
        acc_t s = 0;
        for (int w = 0; w < n_threads; ++w) s += partial[w][j];
        out[j] = s;
    }
}

}  // namespace

torch::Tensor sampled_grad(torch::Tensor g, torch::Tensor x, torch::Tensor used_rows,
                           torch::Tensor used_cols, torch::Tensor rows, torch::Tensor cols) {
    // rows[j] / cols[j]: positions of entry j's row in used_rows and column in used_cols
    TORCH_CHECK(g.dim() == 2 && x.dim() == 2 && g.size(0) == x.size(0), "g (T,out) and x (T,in) expected");
    TORCH_CHECK(g.scalar_type() == x.scalar_type(), "g and x must share a dtype");
    const auto itype = rows.scalar_type();
    TORCH_CHECK(cols.scalar_type() == itype && used_rows.scalar_type() == itype &&
                used_cols.scalar_type() == itype && rows.numel() == cols.numel(), "index mismatch");
    g = g.contiguous();
    x = x.contiguous();
    const int64_t k = rows.numel();
    torch::Tensor out;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "sampled_grad", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        out = torch::empty({k}, g.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        AT_DISPATCH_INDEX_TYPES(itype, "sampled_grad_index", [&] {
            sddmm_kernel<scalar_t, acc_t, index_t>(
                g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                used_rows.data_ptr<index_t>(), used_rows.numel(),
                used_cols.data_ptr<index_t>(), used_cols.numel(),
                rows.data_ptr<index_t>(), cols.data_ptr<index_t>(),
                g.size(0), g.size(1), x.size(1), k, out.data_ptr<acc_t>());
        });
    });
    return out;
}
