// Mixed-batch sparse deltas on the CPU: each segment of tokens gets its own adapter's x·Δᵀ.
//
//   y[t, r] += sum_{e in row r of segment g} x[t, cols[e]] * values[e]    for t in segment g
//
// The batch's plan holds every segment's entries in CSR form over the rows each uses (built once
// per batch, reused by every decoding step), so a row's sum is accumulated in registers and
// written once. Tokens are taken in tiles of TILE:
// the tile's x is transposed into a small (n_in, TILE) buffer, so the inner loop over the
// tile's tokens is contiguous and vectorises, and row sums land in a transposed (rows, TILE)
// buffer added back to y row block by row block; a tile of one or two tokens (decoding) skips
// the transposes and runs scalar dots. Work items are (segment, tile) pairs, each writing its own
// rows of y, run in parallel only when there is enough work to pay for the threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <array>
#include <vector>

namespace {

constexpr int64_t TILE = 16;

template <typename scalar_t>
void add_tile(const scalar_t* x, scalar_t* y, int64_t n_in, int64_t n_out, int64_t t0, int64_t t1,
              const int64_t* used_rows, int64_t n_used, const int64_t* row_ptr,
              const int64_t* cols, const scalar_t* values, std::vector<scalar_t>& buffer) {
    const int64_t tokens = t1 - t0;
    if (tokens <= 2) {
        for (int64_t t = t0; t < t1; ++t) {
            const scalar_t* xr = x + t * n_in;
            scalar_t* yr = y + t * n_out;
            for (int64_t u = 0; u < n_used; ++u) {
                scalar_t acc = 0;
                for (int64_t e = row_ptr[u]; e < row_ptr[u + 1]; ++e) acc += xr[cols[e]] * values[e];
                yr[used_rows[u]] += acc;
            }
        }
        return;
    }
    buffer.assign((n_in + n_used) * TILE, scalar_t(0));
    scalar_t* xt = buffer.data();  // xt[c * TILE + i] = x[t0 + i, c]
    scalar_t* yt = xt + n_in * TILE;  // yt[u * TILE + i]: row used_rows[u] of token t0 + i
    for (int64_t i = 0; i < tokens; ++i) {
        const scalar_t* xr = x + (t0 + i) * n_in;
        for (int64_t c = 0; c < n_in; ++c) xt[c * TILE + i] = xr[c];
    }
    for (int64_t u = 0; u < n_used; ++u) {
        scalar_t acc[TILE] = {0};
        for (int64_t e = row_ptr[u]; e < row_ptr[u + 1]; ++e) {
            const scalar_t v = values[e];
            const scalar_t* xc = xt + cols[e] * TILE;
            for (int64_t i = 0; i < TILE; ++i) acc[i] += v * xc[i];
        }
        for (int64_t i = 0; i < TILE; ++i) yt[u * TILE + i] = acc[i];
    }
    // Add back token by token in blocks of rows: y's rows are written near-contiguously and the
    // block of yt read across tokens stays in L1.
    constexpr int64_t BLOCK = 32;
    for (int64_t u0 = 0; u0 < n_used; u0 += BLOCK) {
        const int64_t u1 = std::min(u0 + BLOCK, n_used);
        for (int64_t i = 0; i < tokens; ++i) {
            scalar_t* yr = y + (t0 + i) * n_out;
            for (int64_t u = u0; u < u1; ++u) yr[used_rows[u]] += yt[u * TILE + i];
        }
    }
}

}  // namespace

void segment_sparse_add(torch::Tensor x, torch::Tensor y, torch::Tensor segment_rows, torch::Tensor segment_used, torch::Tensor used_rows,
                        torch::Tensor row_ptr, torch::Tensor cols, torch::Tensor values) {
    // segment g: batch rows [segment_rows[g], segment_rows[g+1]), used rows
    // [segment_used[g], segment_used[g+1]) of used_rows / row_ptr (row_ptr holds global entry
    // offsets into cols / values, one more than used_rows).
    // x (batch, ..., n_in) and y (batch, ..., n_out), contiguous and batch-first.
    TORCH_CHECK(x.dim() >= 1 && x.dim() == y.dim() && x.size(0) == y.size(0), "x and y: same batch");
    TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "x and y must be contiguous");
    TORCH_CHECK(x.scalar_type() == y.scalar_type() && values.scalar_type() == x.scalar_type(),
                "x, y and values must share a dtype");
    for (auto* t : {&segment_rows, &segment_used, &used_rows, &row_ptr, &cols})
        TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous() && t->device().is_cpu(),
                    "int64 contiguous CPU indices expected");
    TORCH_CHECK(values.is_contiguous(), "values must be contiguous");
    const int64_t segments = segment_rows.numel() - 1;
    TORCH_CHECK(segments >= 0 && segment_used.numel() == segments + 1 &&
                row_ptr.numel() == used_rows.numel() + segments, "inconsistent plan");
    const int64_t n_in = x.size(-1), n_out = y.size(-1);
    const int64_t n = n_in ? x.numel() / n_in : 0;
    TORCH_CHECK(n_out && y.numel() / n_out == n, "x and y must hold the same tokens");
    const int64_t tokens_per_row = x.size(0) ? n / x.size(0) : 0;
    const int64_t* seg_rows = segment_rows.data_ptr<int64_t>();
    const int64_t* seg_used = segment_used.data_ptr<int64_t>();
    const int64_t* rptr = row_ptr.data_ptr<int64_t>();
    std::vector<std::array<int64_t, 3>> items;  // (segment, first token, last token + 1)
    int64_t work = 0;
    for (int64_t g = 0; g < segments; ++g) {
        const int64_t t_start = seg_rows[g] * tokens_per_row, t_stop = seg_rows[g + 1] * tokens_per_row;
        TORCH_CHECK(0 <= t_start && t_start <= t_stop && t_stop <= n, "segment out of bounds");
        for (int64_t t = t_start; t < t_stop; t += TILE)
            items.push_back({g, t, std::min(t + TILE, t_stop)});
        const int64_t first = seg_used[g] + g, last = seg_used[g + 1] + g;  // into row_ptr
        work += (t_stop - t_start) * (rptr[last] - rptr[first]);
    }
    const int64_t n_items = static_cast<int64_t>(items.size());
    const int64_t grain = work < 200000 ? std::max<int64_t>(n_items, 1) : 1;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "segment_sparse_add", [&] {
        const scalar_t* xp = x.data_ptr<scalar_t>();
        scalar_t* yp = y.data_ptr<scalar_t>();
        at::parallel_for(0, n_items, grain, [&](int64_t begin, int64_t end) {
            std::vector<scalar_t> buffer;
            for (int64_t item = begin; item < end; ++item) {
                const auto [g, t0, t1] = items[item];
                add_tile<scalar_t>(xp, yp, n_in, n_out, t0, t1,
                                   used_rows.data_ptr<int64_t>() + seg_used[g],
                                   seg_used[g + 1] - seg_used[g], rptr + seg_used[g] + g,
                                   cols.data_ptr<int64_t>(), values.data_ptr<scalar_t>(), buffer);
            }
        });
    });
}
