// Eager autograd nodes of the losses' one-block paths (docs/ops/index.md, "Small CPU calls").
//
// A small call's time is host time, and most of it is autograd: a Python autograd.Function costs about
// 10 us a pass, and every op recorded inside a Python backward costs more than the same op outside. Here
// the one-block math of the chunked backend (gdrd_fast/ops/feature_regression.py, gdrd_fast/ops/infonce.py)
// runs as one C++ autograd node with the reduction folded in: its forward records nothing, and its backward
// is a few ATen calls. Each node is a torch::autograd::Node of its own: a torch::autograd::Function's
// bookkeeping cost a small feature-regression step about 25 us (measured), more than its ATen calls.
// torch.compile keeps tracing the Python custom ops; these nodes serve eager calls.
//
// Registered for the Autograd key (the node) and for CompositeExplicitAutograd (the forward alone, what
// inference mode and no-grad calls reach), on every device. Sums accumulate in float32, float64 for
// float64 inputs, as in the Python paths.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <type_traits>

namespace {

using at::Tensor;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// dims of an error [B, Ct, P], named: a braced list is ambiguous between sum's overloads in older torch
constexpr int64_t kChannelsAndPixels[] = {1, 2};
constexpr int64_t kSamplesAndPixels[] = {0, 2};

at::ScalarType accumulation(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// t in dtype dt, without a call when it already is (each ATen call is host time here).
Tensor as_dtype(const Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

void check_reduction(int64_t reduction) {
  TORCH_CHECK(reduction == kNone || reduction == kMean || reduction == kSum,
              "reduction code must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// A node's backward runs once (the engine frees its buffers unless retain_graph) and gives first derivatives
// only: with create_graph, a graph through it would miss every term of the forward's saved results, so a
// second derivative would be silently wrong.
void check_backward_can_run(const char* op, bool buffers_kept) {
  TORCH_CHECK(buffers_kept, op, ": the backward already ran and freed its buffers; pass retain_graph=True to "
              "run it twice");
  TORCH_CHECK(!at::GradMode::is_enabled(), op, ": a second derivative (create_graph=True) is not supported "
              "by this eager node; backend='torch' computes one");
}

// The loss from per-row losses [B] in the accumulation dtype: 'none' in the input dtype, 'sum' scaled by
// row_size (a row that is a mean over row_size elements sums back to the total), as reduce_rows does.
Tensor reduce_rows(const Tensor& rows, int64_t reduction, at::ScalarType input_dtype, double row_size) {
  if (reduction == kNone) return as_dtype(rows, input_dtype);
  if (reduction == kMean) return rows.mean();
  Tensor total = rows.sum();
  return row_size != 1.0 ? total.mul_(row_size) : total;
}

// d loss / d row as a factor of each row's gradient, times scale: a 0-dim tensor for 'mean' and 'sum', [B]
// for 'none'.
Tensor row_factor(const Tensor& grad, int64_t reduction, int64_t rows, at::ScalarType dt, double row_size,
                  double scale) {
  if (reduction == kMean) scale /= static_cast<double>(rows);
  if (reduction == kSum) scale *= row_size;
  return as_dtype(grad, dt) * scale;
}

// --- feature regression: mean((weight @ x + bias - teacher)^2) per sample ------------------------------
// student [B, Cs, ...], teacher [B, Ct, ...] (no gradient), weight [Ct, Cs], bias [Ct] or none; the
// pixels are flattened here (views), so x is [B, Cs, P]. One batched product with the weight broadcast over
// the batch (a view): at::matmul would copy both operands to fold them.
Tensor columns(const Tensor& t) { return t.reshape({t.size(0), t.size(1), -1}); }

// A 1x1 convolution's weight [Ct, Cs, 1, 1] as the matrix [Ct, Cs] (a view): Modules pass their own.
Tensor matrix(const Tensor& weight) { return weight.dim() == 2 ? weight : weight.reshape({weight.size(0), -1}); }

Tensor regression_error(const Tensor& student, const Tensor& teacher, const Tensor& weight,
                        const std::optional<Tensor>& bias) {
  const auto dt = accumulation(student);
  const Tensor x = as_dtype(columns(student), dt);
  const Tensor w = as_dtype(matrix(weight), dt).expand({x.size(0), weight.size(0), x.size(1)});
  Tensor err = bias.has_value() && bias->defined()
                   ? at::baddbmm(as_dtype(*bias, dt).view({1, -1, 1}), w, x)
                   : at::bmm(w, x);
  return err.sub_(as_dtype(columns(teacher), dt));
}

Tensor regression_loss(const Tensor& err, int64_t reduction, at::ScalarType input_dtype) {
  const double row_size = static_cast<double>(err.size(1) * err.size(2));
  if (reduction == kNone) {
    return as_dtype(err.square().sum(at::IntArrayRef(kChannelsAndPixels)).div_(row_size), input_dtype);
  }
  const Tensor flat = err.view({-1});
  Tensor total = at::dot(flat, flat);  // every sample has row_size elements: the mean of rows is the mean
  return reduction == kMean ? total.div_(static_cast<double>(flat.numel())) : total;
}

// The node is written out rather than a torch::autograd::Function: the Function wrapper's bookkeeping (its
// context's saved_data map, output wrapping and gradient validation) cost a 1x1 conv step's host time more than
// ATen's own convolution node. Its backward reads x, weight and the forward's error.
struct FeatureRegressionNode : public torch::autograd::Node {
  SavedVariable x, weight;  // version-checked: an in-place change before the backward is an error
  Tensor err;
  int64_t reduction = kMean;
  at::ScalarType bias_dtype = at::ScalarType::Undefined;

  std::string name() const override { return "FeatureRegressionNode"; }
  void release_variables() override {
    x.reset_data();
    weight.reset_data();
    err.reset();
  }

  variable_list apply(variable_list&& grads) override {
    check_backward_can_run("feature_regression_one_block", err.defined());
    const Tensor student = x.unpack(), w_saved = weight.unpack();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto dt = err.scalar_type();
    const int64_t b = err.size(0), row = err.size(1) * err.size(2);
    // d loss / d err = 2 err / row per sample, times the row's gradient. A scalar loss's gradient on CPU is
    // read on the host (no sync there): one scalar product instead of two ops.
    const Tensor& grad = grads[0];
    Tensor grad_err;
    if (grad.dim() == 0 && grad.is_cpu()) {
      grad_err = err * (grad.item<double>() * 2.0 / row * (reduction == kMean ? 1.0 / b : static_cast<double>(row)));
    } else {
      Tensor factor = row_factor(grad, reduction, b, dt, static_cast<double>(row), 2.0 / row);
      grad_err = err * (factor.dim() ? factor.view({b, 1, 1}) : factor);
    }
    variable_list out(3);  // student, weight, bias: the node's next edges
    if (should_compute_output(0)) {
      const Tensor w = as_dtype(matrix(w_saved), dt);
      const Tensor w_t = w.t().expand({b, w.size(1), w.size(0)});
      out[0] = as_dtype(at::bmm(w_t, grad_err), student.scalar_type()).view(student.sizes());
    }
    if (should_compute_output(1)) {  // at::addbmm would loop over the batch on CPU
      const Tensor x_t = as_dtype(columns(student), dt).transpose(1, 2);
      out[1] = as_dtype(at::bmm(grad_err, x_t).sum(0), w_saved.scalar_type()).view(w_saved.sizes());
    }
    if (bias_dtype != at::ScalarType::Undefined && should_compute_output(2)) {
      out[2] = as_dtype(grad_err.sum(at::IntArrayRef(kSamplesAndPixels)), bias_dtype);
    }
    return out;
  }
};

// A node owned as this torch's autograd expects: an intrusive pointer from torch 2.13 on, a shared pointer
// with its iterative deleter before (torch 2.11).
template <class N>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, N>) {
    return c10::intrusive_ptr<torch::autograd::Node>(c10::make_intrusive<N>());
  } else {
    return std::shared_ptr<torch::autograd::Node>(new N(), [](N* node) { deleteNode(node); });
  }
}

Tensor feature_regression_one_block(const Tensor& x, const Tensor& teacher, const Tensor& weight,
                                    const std::optional<Tensor>& bias, int64_t reduction) {
  check_reduction(reduction);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (x.requires_grad() || weight.requires_grad() || (has_bias && bias->requires_grad()));
  Tensor err, loss;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // the math records no graph: this node is its graph
    err = regression_error(x, teacher, weight, bias);
    loss = regression_loss(err, reduction, x.scalar_type());
  }
  if (!needs_grad) return loss;
  auto node = make_node<FeatureRegressionNode>();
  auto* regression = static_cast<FeatureRegressionNode*>(node.get());
  regression->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias));
  regression->x = SavedVariable(x, false);
  regression->weight = SavedVariable(weight, false);
  regression->err = std::move(err);
  regression->reduction = reduction;
  if (has_bias) regression->bias_dtype = bias->scalar_type();
  torch::autograd::set_history(loss, node);
  return loss;
}

Tensor feature_regression_one_block_forward(const Tensor& x, const Tensor& teacher, const Tensor& weight,
                                            const std::optional<Tensor>& bias, int64_t reduction) {
  check_reduction(reduction);
  return regression_loss(regression_error(x, teacher, weight, bias), reduction, x.scalar_type());
}

// --- InfoNCE against a bank of one block: -log_softmax([<q,p>, <q,bank_k>...] / T)[0] per query ---------
// Returns (rows [B], d row / d query, d row / d positive); the gradients are empty without need_grad.
std::tuple<Tensor, Tensor, Tensor> infonce_rows(const Tensor& query, const Tensor& positive, const Tensor& bank,
                                                double inv_t, bool need_grad) {
  const auto dt = accumulation(query);
  const Tensor p = as_dtype(positive, dt), keys = as_dtype(bank, dt);
  const Tensor q_t = as_dtype(query, dt) * inv_t;  // q / T: every logit and d row / d positive in one pass
  const int64_t b = q_t.size(0), d = q_t.size(1);
  const Tensor pos = at::bmm(q_t.view({b, 1, d}), p.view({b, d, 1})).view({b, 1});
  Tensor log_weight = at::log_softmax(at::cat({pos, at::mm(q_t, keys.t())}, 1), 1);
  Tensor rows = log_weight.select(1, 0).neg();
  if (!need_grad) return {rows, Tensor(), Tensor()};
  Tensor weight = log_weight.exp_();
  Tensor pos_weight_minus_one = weight.narrow(1, 0, 1) - 1.0;
  Tensor grad_query = at::addmm(pos_weight_minus_one * p, weight.narrow(1, 1, keys.size(0)), keys, inv_t, inv_t);
  return {rows, grad_query, pos_weight_minus_one * q_t};
}

// Written out as FeatureRegressionNode is; its gradients come from the forward (d row / d query and
// d row / d positive), so the backward only scales them by the rows' gradient.
struct InfoNCENode : public torch::autograd::Node {
  Tensor grad_query, grad_positive;  // the forward's own results: no one else can change them
  int64_t reduction = kMean;
  at::ScalarType query_dtype = at::kFloat, positive_dtype = at::kFloat;

  std::string name() const override { return "InfoNCENode"; }
  void release_variables() override {
    grad_query.reset();
    grad_positive.reset();
  }

  variable_list apply(variable_list&& grads) override {
    check_backward_can_run("infonce_bank_one_block", grad_query.defined());
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t b = grad_query.size(0);
    Tensor factor = row_factor(grads[0], reduction, b, grad_query.scalar_type(), 1.0, 1.0);
    if (factor.dim()) factor = factor.unsqueeze(1);
    variable_list out(2);  // query, positive
    if (should_compute_output(0)) out[0] = as_dtype(grad_query * factor, query_dtype);
    if (should_compute_output(1)) out[1] = as_dtype(grad_positive * factor, positive_dtype);
    return out;
  }
};

Tensor infonce_bank_one_block(const Tensor& query, const Tensor& positive, const Tensor& bank, double inv_t,
                              int64_t reduction) {
  check_reduction(reduction);
  const bool needs_grad = at::GradMode::is_enabled() && (query.requires_grad() || positive.requires_grad());
  Tensor rows, grad_query, grad_positive, loss;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(rows, grad_query, grad_positive) = infonce_rows(query, positive, bank, inv_t, needs_grad);
    loss = reduce_rows(rows, reduction, query.scalar_type(), 1.0);
  }
  if (!needs_grad) return loss;
  auto node = make_node<InfoNCENode>();
  auto* infonce = static_cast<InfoNCENode*>(node.get());
  infonce->set_next_edges(torch::autograd::collect_next_edges(query, positive));
  infonce->grad_query = std::move(grad_query);
  infonce->grad_positive = std::move(grad_positive);
  infonce->reduction = reduction;
  infonce->query_dtype = query.scalar_type();
  infonce->positive_dtype = positive.scalar_type();
  torch::autograd::set_history(loss, node);
  return loss;
}

Tensor infonce_bank_one_block_forward(const Tensor& query, const Tensor& positive, const Tensor& bank,
                                      double inv_t, int64_t reduction) {
  check_reduction(reduction);
  return reduce_rows(std::get<0>(infonce_rows(query, positive, bank, inv_t, false)), reduction,
                     query.scalar_type(), 1.0);
}

}  // namespace

TORCH_LIBRARY_IMPL(gdrd_fast_C, Autograd, m) {
  m.impl("feature_regression_one_block", &feature_regression_one_block);
  m.impl("infonce_bank_one_block", &infonce_bank_one_block);
}

TORCH_LIBRARY_IMPL(gdrd_fast_C, CompositeExplicitAutograd, m) {
  m.impl("feature_regression_one_block", &feature_regression_one_block_forward);
  m.impl("infonce_bank_one_block", &infonce_bank_one_block_forward);
}
