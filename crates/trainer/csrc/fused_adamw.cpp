// The optimizer step on libtorch as PyTorch runs it with `clip_grad_norm_` and
// `torch.optim.AdamW(fused=True)`: the global gradient norm from `torch._foreach_norm` (one
// multi-tensor pass over every gradient), then `torch._fused_adamw_` over every parameter of a
// weight-decay group at once, the clipping factor folded in as its `grad_scale`. tch wraps
// neither, so these are the C++ entries the trainer crate adds (crates/trainer/src/tch_adamw.rs;
// built by build.rs with `--features tch`). The tensors are `at::Tensor*`, tch's handles.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/stack.h>

#include <cstring>
#include <exception>
#include <vector>

namespace {

std::vector<at::Tensor> list(at::Tensor** tensors, size_t n) {
    std::vector<at::Tensor> out;
    out.reserve(n);
    for (size_t i = 0; i < n; ++i) out.push_back(*tensors[i]);
    return out;
}

}  // namespace

extern "C" {

// The L2 norm of all `n` tensors together, as `clip_grad_norm_` computes it (the norm of the
// per-tensor norms), into `*norm`: a new `[1]` f32 tensor handle the caller owns. The per-tensor
// norms are f32 whatever the tensors' type (bf16 gradients of bf16 adapters among them). Returns
// nullptr, or an error message the caller frees with `free`.
char* alignment_global_norm(at::Tensor** tensors, size_t n, at::Tensor** norm) {
    try {
        std::vector<at::Tensor> norms = at::_foreach_norm(list(tensors, n), 2, at::kFloat);
        *norm = new at::Tensor(at::linalg_vector_norm(at::stack(norms), 2).reshape({1}));
        return nullptr;
    } catch (const std::exception& e) {
        return strdup(e.what());
    }
}

// One AdamW update of `n` parameters with one weight decay: `params`, `exp_avgs` and
// `exp_avg_sqs` are updated in place (the moments may be flat: they are viewed with each
// parameter's sizes; each parameter's moments are of its type). Parameters of different types
// (f32, and bf16 adapters) are updated by one kernel call per type, as `torch.optim.AdamW` groups
// them: the kernel computes in f32 and stores each tensor in its own type. Each gradient is
// divided by `grad_scale` (a `[1]` f32 tensor; nullptr for none) first, and the kernel writes the
// divided gradient back, so the gradients must belong to nobody else. The step count `step` (this
// update's, counted from 1) and the learning rate `lr` are f32 tensors on the parameters' device,
// read by the kernel there, as `torch.optim.AdamW(fused=True, capturable=True)` passes them: a
// step replayed as a CUDA graph then reads each step's values, where numbers would be baked into
// the graph at capture. Returns nullptr, or an error message the caller frees with `free`.
char* alignment_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs, at::Tensor** exp_avg_sqs,
                            size_t n, at::Tensor* grad_scale, at::Tensor* step, at::Tensor* lr, double beta1,
                            double beta2, double weight_decay, double eps) {
    try {
        if (n == 0) return nullptr;
        // The kernel only reads the step count: every parameter shares one.
        at::Tensor step_count = step->reshape({});
        std::optional<at::Tensor> scale;
        if (grad_scale != nullptr) scale = *grad_scale;
        std::vector<bool> done(n, false);
        for (size_t first = 0; first < n; ++first) {
            if (done[first]) continue;
            const auto type = params[first]->scalar_type();
            std::vector<at::Tensor> p, g, m, v, steps;
            for (size_t i = first; i < n; ++i) {
                if (done[i] || params[i]->scalar_type() != type) continue;
                done[i] = true;
                auto sizes = params[i]->sizes();
                p.push_back(*params[i]);
                g.push_back(grads[i]->view(sizes));
                m.push_back(exp_avgs[i]->view(sizes));
                v.push_back(exp_avg_sqs[i]->view(sizes));
                steps.push_back(step_count);
            }
            at::_fused_adamw_(p, g, m, v, {}, steps, lr->reshape({}), beta1, beta2, weight_decay, eps,
                              /*amsgrad=*/false, /*maximize=*/false, scale, std::nullopt);
        }
        return nullptr;
    } catch (const std::exception& e) {
        return strdup(e.what());
    }
}

}  // extern "C"
