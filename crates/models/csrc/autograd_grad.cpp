// torch.autograd.grad with the output's gradient given (`grad_outputs`), which tch does not wrap:
// its `run_backward` seeds every root with ones, so a step that already holds ∂out had to
// backpropagate `Σ out · ∂out` — a product and a reduction forward and another product backward,
// each over the whole output, per recorded call. Used by crates/models/src/tch_op.rs; built by
// build.rs with `--features tch`. The tensors are `at::Tensor*`, tch's handles.
#include <torch/csrc/autograd/autograd.h>

#include <cstring>
#include <exception>
#include <vector>

extern "C" {

// The gradients of `output`, seeded with `grad_output`, with respect to the `n` leaves `inputs`,
// into `grads` (new handles the caller owns). The graph is freed afterwards. Returns nullptr, or
// an error message the caller frees with `free`.
char* alignment_autograd_grad(at::Tensor* output, at::Tensor* grad_output, at::Tensor** inputs, size_t n, at::Tensor** grads) {
    try {
        std::vector<at::Tensor> leaves;
        leaves.reserve(n);
        for (size_t i = 0; i < n; ++i) leaves.push_back(*inputs[i]);
        std::vector<at::Tensor> computed =
            torch::autograd::grad({*output}, leaves, {*grad_output}, /*retain_graph=*/false, /*create_graph=*/false);
        for (size_t i = 0; i < n; ++i) grads[i] = new at::Tensor(computed[i]);
        return nullptr;
    } catch (const std::exception& e) {
        return strdup(e.what());
    }
}

}  // extern "C"
