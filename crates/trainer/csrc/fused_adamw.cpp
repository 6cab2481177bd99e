// One AdamW update of one parameter with libtorch's fused kernel (`torch._fused_adamw_`, what
// `torch.optim.AdamW(fused=True)` calls): parameter, exp_avg and exp_avg_sq updated in place in
// one pass on the CPU or the GPU. tch does not wrap `_fused_adam*`, so this is the one C++ entry
// the trainer crate adds (crates/trainer/src/tch_adamw.rs; built by build.rs with `--features tch`).
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/full.h>

#include <cstring>
#include <exception>

extern "C" {

// `param`, `exp_avg` and `exp_avg_sq` are updated in place (the moments may be flat: they are
// viewed with the parameter's sizes); `grad` is read. Returns nullptr, or an error message the
// caller frees with `free`.
char* alignment_fused_adamw(at::Tensor* param, at::Tensor* grad, at::Tensor* exp_avg, at::Tensor* exp_avg_sq,
                            double step, double lr, double beta1, double beta2, double weight_decay, double eps) {
    try {
        auto sizes = param->sizes();
        at::Tensor m = exp_avg->view(sizes);
        at::Tensor v = exp_avg_sq->view(sizes);
        at::Tensor g = grad->view(sizes);
        at::Tensor steps = at::full({}, step, param->options().dtype(at::kFloat));
        at::_fused_adamw_({*param}, {g}, {m}, {v}, {}, {steps}, lr, beta1, beta2, weight_decay, eps,
                          /*amsgrad=*/false, /*maximize=*/false, std::nullopt, std::nullopt);
        return nullptr;
    } catch (const std::exception& e) {
        return strdup(e.what());
    }
}

}  // extern "C"
