/* A training step's forward and backward passes in C++: iwae.backprop's _forward and _backward, for models with
 * Bernoulli observations and tanh layers (Burda's), one or more stochastic layers, every estimator.
 *
 * iwae/backprop.py is the reference and says the algebra; this file does the same operations in the same order,
 * through ATen from C++, so that a minibatch-20 step no longer pays the Python interpreter and PyTorch's Python
 * bindings for its ~80 operator calls. Small linear layers are PyTorch's addmm followed by kernels.c's tanh in
 * place; large ones are oneDNN's fused linear layer, as in iwae.fast.native.fused_linear. Loaded by iwae/fast/step.py
 * as the operators torch.ops.iwae_step.forward (the log-weights, and the tape that the backward pass needs) and
 * torch.ops.iwae_step.backward (every parameter's gradient, given the loss's gradients in the log-weights, which
 * Python computes for any bound, as iwae.estimators.log_weight_gradients does).
 *
 * Shape convention: samples first. x is [batch, x_dim]; the noise and latents of stochastic layer j are
 * [k, batch, d_j]; the log-weights and their gradients are [k, batch].
 *
 * params holds every linear layer's weight and bias, for the encoder's networks q(h_1 | x), q(h_2 | h_1), ...
 * and then the decoder's p(x | h_1), p(h_1 | h_2), ..., each network's hidden layers before its head;
 * layers_per_network gives each network's number of linear layers. backward returns the loss's gradient for each
 * entry of params, in the same order.
 */
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

extern "C" {
#include "kernels.c"
}

namespace {

using at::Tensor;

constexpr double kHalfLogTwoPi = 0.918938533204672741780329736406;

struct Settings {
    int64_t parallel_min_elements;  // kernels.c's kernels use PyTorch's threads from this many elements
    int64_t forward_onednn_min_macs;  // a layer with this many multiply-adds goes through oneDNN
    int64_t input_grad_onednn_min_macs;  // likewise for an input gradient
    bool onednn;  // whether oneDNN's fused linear layer is available
};

struct Layer {
    Tensor weight;  // [out, in]
    Tensor bias;  // [out]
    size_t index;  // of weight in params (the bias follows it)
};

using Network = std::vector<Layer>;  // hidden layers, then the linear head

struct Model {
    std::vector<Network> encoder;  // q(h_1 | x), q(h_2 | h_1), ...
    std::vector<Network> decoder;  // p(x | h_1), p(h_1 | h_2), ...
};

struct Tape {  // what the forward pass keeps for the backward pass, as iwae.backprop._Tape
    std::vector<std::vector<Tensor>> encoder_outputs;
    std::vector<Tensor> stds;
    std::vector<Tensor> latents;
    std::vector<std::vector<Tensor>> prior_outputs;
    std::vector<std::pair<Tensor, Tensor>> prior_params;
    std::vector<Tensor> observation_outputs;
    Tensor observation_pre;
};

Tensor rows_of(const Tensor& tensor) { return tensor.reshape({-1, tensor.size(-1)}); }

std::vector<int64_t> with_last(const Tensor& tensor, int64_t last) {
    auto shape = tensor.sizes().vec();
    shape.back() = last;
    return shape;
}

Tensor onednn_linear(const Tensor& inputs, const Tensor& weight, const Tensor& bias, const char* activation) {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    std::vector<c10::IValue> stack{inputs,
                                   weight,
                                   bias.defined() ? std::optional<Tensor>(bias) : std::nullopt,
                                   std::string(activation),
                                   c10::List<std::optional<at::Scalar>>(),
                                   std::optional<std::string>()};
    op.callBoxed(&stack);
    return stack[0].toTensor();
}

void tanh_in_place(Tensor& tensor, const Settings& settings) {
    iwae_tanh_(tensor.data_ptr<float>(), tensor.numel(), settings.parallel_min_elements);
}

// activation(inputs @ weight.T + bias) for [..., in] -> [..., out]; no bias where bias is undefined
Tensor linear(const Tensor& inputs, const Tensor& weight, const Tensor& bias, bool tanh, const Settings& settings) {
    const Tensor rows = rows_of(inputs);
    Tensor outputs;
    if (settings.onednn && rows.size(0) * weight.size(0) * weight.size(1) >= settings.forward_onednn_min_macs) {
        outputs = onednn_linear(rows, weight, bias, tanh ? "tanh" : "none");
    } else {
        outputs = bias.defined() ? at::addmm(bias, rows, weight.t()) : at::mm(rows, weight.t());
        if (tanh) tanh_in_place(outputs, settings);
    }
    return outputs.view(with_last(inputs, weight.size(0)));
}

// grad @ weight, a linear layer's gradient with respect to its inputs ([..., out] -> [..., in])
Tensor input_grad(const Tensor& grad, const Tensor& weight, const Settings& settings) {
    const Tensor rows = rows_of(grad);
    const bool large = rows.size(0) * weight.size(0) * weight.size(1) >= settings.input_grad_onednn_min_macs;
    const Tensor product = settings.onednn && large ? onednn_linear(rows, weight.t(), Tensor(), "none")
                                                    : at::mm(rows, weight);
    return product.view(with_last(grad, weight.size(1)));
}

void accumulate(Tensor& slot, const Tensor& grad) {
    if (slot.defined()) {
        slot.add_(grad);
    } else {
        slot = grad;
    }
}

// [inputs, hidden_1, ..., hidden_n]: each hidden layer's tanh activations
std::vector<Tensor> hidden_outputs(const Network& network, const Tensor& inputs, const Settings& settings) {
    std::vector<Tensor> outputs{inputs};
    for (size_t i = 0; i + 1 < network.size(); ++i) {
        outputs.push_back(linear(outputs.back(), network[i].weight, network[i].bias, true, settings));
    }
    return outputs;
}

// a Gaussian head's (mean, log_std)
std::pair<Tensor, Tensor> gaussian_head(const Network& network, const std::vector<Tensor>& outputs,
                                        const Settings& settings) {
    const Layer& head = network.back();
    const auto parts = linear(outputs.back(), head.weight, head.bias, false, settings).chunk(2, -1);
    return {parts[0], parts[1]};
}

// log N(value; mean, exp(log_std)) summed over the last dimension
Tensor gaussian_log_prob(const Tensor& value, const Tensor& mean, const Tensor& log_std) {
    const Tensor z = (value - mean) * at::exp(-log_std);
    return (z * z * -0.5 - log_std - kHalfLogTwoPi).sum(-1);
}

Tensor bernoulli_log_prob_rows(const Tensor& pre, const Tensor& bias, const Tensor& x, const Settings& settings) {
    const int64_t cols = pre.size(-1);
    Tensor out = at::empty(pre.sizes().slice(0, pre.dim() - 1), pre.options());
    iwae_bernoulli_log_prob_rows(pre.data_ptr<float>(), bias.data_ptr<float>(), x.data_ptr<float>(),
                                 out.data_ptr<float>(), out.numel(), cols, x.numel() / cols,
                                 settings.parallel_min_elements);
    return out;
}

Tensor bernoulli_log_prob_rows_grad(const Tensor& pre, const Tensor& bias, const Tensor& x, const Tensor& grad,
                                    const Settings& settings) {
    const int64_t cols = pre.size(-1);
    const Tensor grad_rows = grad.contiguous();
    Tensor grad_pre = at::empty_like(pre);
    iwae_bernoulli_log_prob_rows_backward(pre.data_ptr<float>(), bias.data_ptr<float>(), x.data_ptr<float>(),
                                          grad_rows.data_ptr<float>(), grad_pre.data_ptr<float>(), grad_rows.numel(),
                                          cols, x.numel() / cols, settings.parallel_min_elements);
    return grad_pre;
}

// the log-weights [k, batch]; fills tape
Tensor forward(const Model& model, const Tensor& x, at::TensorList noise, Tape& tape, const Settings& settings) {
    Tensor inputs = x;
    Tensor log_q;
    for (size_t j = 0; j < model.encoder.size(); ++j) {
        auto outputs = hidden_outputs(model.encoder[j], inputs, settings);
        const auto [mean, log_std] = gaussian_head(model.encoder[j], outputs, settings);
        const Tensor std = at::exp(log_std);
        inputs = mean + std * noise[j];
        // log q of mean + std * eps, written with eps
        const Tensor term = (noise[j] * noise[j] * -0.5 - log_std - kHalfLogTwoPi).sum(-1);
        log_q = log_q.defined() ? log_q + term : term;
        tape.encoder_outputs.push_back(std::move(outputs));
        tape.stds.push_back(std);
        tape.latents.push_back(inputs);
    }
    const auto& latents = tape.latents;
    Tensor log_prior = (latents.back() * latents.back() * -0.5 - kHalfLogTwoPi).sum(-1);
    for (size_t j = 0; j + 1 < latents.size(); ++j) {
        auto outputs = hidden_outputs(model.decoder[j + 1], latents[j + 1], settings);
        auto params = gaussian_head(model.decoder[j + 1], outputs, settings);
        log_prior = log_prior + gaussian_log_prob(latents[j], params.first, params.second);
        tape.prior_outputs.push_back(std::move(outputs));
        tape.prior_params.push_back(std::move(params));
    }
    const Network& observation = model.decoder[0];
    tape.observation_outputs = hidden_outputs(observation, latents[0], settings);
    tape.observation_pre = linear(tape.observation_outputs.back(), observation.back().weight, Tensor(), false, settings);
    const Tensor log_px = bernoulli_log_prob_rows(tape.observation_pre, observation.back().bias, x, settings);
    return log_px + log_prior - log_q;
}

// Backpropagate grad, the loss's gradient with respect to the network's head outputs: accumulate every layer's
// weight and bias gradients (if params); return the gradient with respect to the network's inputs (if wanted).
Tensor network_backward(const Network& network, const std::vector<Tensor>& outputs, Tensor grad, bool params,
                        bool wants_input_grad, std::vector<Tensor>& grads, const Settings& settings) {
    for (size_t i = network.size(); i-- > 0;) {
        const Layer& layer = network[i];
        if (i + 1 < network.size()) grad = at::tanh_backward(grad, outputs[i + 1]);
        if (params) {
            const Tensor grad_rows = rows_of(grad);
            accumulate(grads[layer.index], at::mm(grad_rows.t(), rows_of(outputs[i])));
            accumulate(grads[layer.index + 1], grad_rows.sum(0));
        }
        if (i > 0 || wants_input_grad) grad = input_grad(grad, layer.weight, settings);
    }
    return wants_input_grad ? grad : Tensor();
}

struct LogWeightGradients {
    Tensor decoder;  // [k, batch]: the decoder's parameters take this one
    Tensor encoder;  // [k, batch]: the latents, and through them the encoder, take this one
    bool shared() const { return decoder.is_same(encoder); }
};

// Backpropagate a term of log w through one of the decoder's networks: its parameters take the decoder's gradient,
// its input the encoder's (one pass when they are the same tensor). head_grad_of maps a log-weights' gradient to the
// head's. Returns the gradient with respect to the network's input.
template <typename HeadGrad>
Tensor decoder_backward(const Network& network, const std::vector<Tensor>& outputs, const HeadGrad& head_grad_of,
                        const LogWeightGradients& gradients, std::vector<Tensor>& grads, const Settings& settings) {
    if (gradients.shared()) {
        return network_backward(network, outputs, head_grad_of(gradients.decoder), true, true, grads, settings);
    }
    network_backward(network, outputs, head_grad_of(gradients.decoder), true, false, grads, settings);
    return network_backward(network, outputs, head_grad_of(gradients.encoder), false, true, grads, settings);
}

// the gradient of a term log N(value; mean, exp(log_std)) of log w with respect to the head's (mean, log_std)
Tensor gaussian_head_grad(const Tensor& log_w_grad, const Tensor& standardised, const Tensor& inv_std) {
    const Tensor unit_grad = log_w_grad.unsqueeze(-1);
    // unit_grad * standardised first: a sample of weight 0 gives 0, even where standardised^2 overflows
    const Tensor scaled = unit_grad * standardised;
    return at::cat({scaled * inv_std, scaled * standardised - unit_grad}, -1);
}

// every parameter's loss gradient, given the loss's gradients in the log-weights; stop_q_params: log q with q's
// parameters stopped (STL, DReG)
void backward(const Model& model, const Tensor& x, at::TensorList noise, const Tape& tape,
              const LogWeightGradients& gradients, bool stop_q_params, std::vector<Tensor>& grads,
              const Settings& settings) {
    const Tensor grad = gradients.encoder.unsqueeze(-1);  // [k, batch, 1], broadcast over each layer's units
    const auto& latents = tape.latents;
    const size_t layers = latents.size();
    const Network& observation = model.decoder[0];
    const auto observation_head_grad = [&](const Tensor& log_w_grad) {
        return bernoulli_log_prob_rows_grad(tape.observation_pre, observation.back().bias, x, log_w_grad, settings);
    };
    std::vector<Tensor> latent_grads(layers);
    latent_grads[0] = decoder_backward(observation, tape.observation_outputs, observation_head_grad, gradients, grads,
                                       settings);
    for (size_t j = 1; j < layers; ++j) latent_grads[j] = at::zeros_like(latents[j]);
    for (size_t j = 0; j + 1 < layers; ++j) {  // log N(h_j; mean, exp(log_std)), (mean, log_std) of h_j+1
        const auto& [mean, log_std] = tape.prior_params[j];
        const Tensor inv_std = at::exp(-log_std);
        const Tensor standardised = (latents[j] - mean) * inv_std;
        const auto prior_head_grad = [&](const Tensor& log_w_grad) {
            return gaussian_head_grad(log_w_grad, standardised, inv_std);
        };
        latent_grads[j].sub_(grad * standardised * inv_std);
        latent_grads[j + 1].add_(decoder_backward(model.decoder[j + 1], tape.prior_outputs[j], prior_head_grad,
                                                  gradients, grads, settings));
    }
    latent_grads[layers - 1].sub_(grad * latents[layers - 1]);  // log N(h_L; 0, I)
    for (size_t j = layers; j-- > 0;) {  // h_j = mean + std * eps
        const Tensor& eps = noise[j];
        const Tensor& std = tape.stds[j];
        Tensor stopped_score, grad_log_std;
        if (stop_q_params) {  // -log q(h_j) with q's parameters stopped, through h_j: (h_j - mean) / std^2 = eps / std
            stopped_score = grad * eps / std;
            latent_grads[j].add_(stopped_score);
            grad_log_std = latent_grads[j] * eps * std;
        } else {  // -log q = sum(log_std) + a function of eps
            grad_log_std = latent_grads[j] * eps * std + grad;
        }
        const Network& network = model.encoder[j];
        const auto& outputs = tape.encoder_outputs[j];
        if (j == 0) {  // the first layer's q (of x alone) is shared by the k samples, and x is data
            const Tensor head_grad = at::cat({latent_grads[0].sum(0), grad_log_std.sum(0)}, -1);
            network_backward(network, outputs, head_grad, true, false, grads, settings);
            continue;
        }
        Tensor head_grad = at::cat({latent_grads[j], grad_log_std}, -1);
        if (stop_q_params) {  // the stopped parameters of q(h_j | h_j-1) still depend on h_j-1, through q's network
            network_backward(network, outputs, head_grad, true, false, grads, settings);
            head_grad = head_grad + at::cat({-stopped_score, grad * (1.0 - eps * eps)}, -1);
            latent_grads[j - 1].add_(network_backward(network, outputs, head_grad, false, true, grads, settings));
        } else {
            latent_grads[j - 1].add_(network_backward(network, outputs, head_grad, true, true, grads, settings));
        }
    }
}

Model model_of(at::TensorList params, at::IntArrayRef layers_per_network, size_t stochastic_layers) {
    TORCH_CHECK(layers_per_network.size() == 2 * stochastic_layers,
                "iwae_step: layers_per_network needs one entry per network (encoder's, then decoder's)");
    for (const Tensor& param : params) {
        TORCH_CHECK(param.is_contiguous() && param.scalar_type() == at::kFloat && param.device().is_cpu(),
                    "iwae_step: every parameter must be a contiguous float32 CPU tensor");
    }
    Model model;
    size_t index = 0;
    for (size_t n = 0; n < layers_per_network.size(); ++n) {
        Network network;
        for (int64_t i = 0; i < layers_per_network[n]; ++i, index += 2) {
            TORCH_CHECK(index + 1 < params.size(), "iwae_step: fewer params than layers_per_network says");
            network.push_back({params[index], params[index + 1], index});
        }
        (n < stochastic_layers ? model.encoder : model.decoder).push_back(std::move(network));
    }
    TORCH_CHECK(index == params.size(), "iwae_step: more params than layers_per_network says");
    return model;
}

Settings settings_of(at::IntArrayRef values) {
    TORCH_CHECK(values.size() == 4, "iwae_step: settings are [parallel_min_elements, forward_onednn_min_macs, "
                                    "input_grad_onednn_min_macs, onednn]");
    return {values[0], values[1], values[2], values[3] != 0};
}

// The tape as a flat list (what Python holds between the two operators): per encoder network, its hidden outputs
// (inputs first), std and latent; per prior network, its hidden outputs, mean and log_std; the observation
// network's hidden outputs and its output layer's pre-activations. Each network's hidden outputs are as many as its
// linear layers.
std::vector<Tensor> flatten(Tape& tape) {
    std::vector<Tensor> flat;
    for (size_t j = 0; j < tape.latents.size(); ++j) {
        flat.insert(flat.end(), tape.encoder_outputs[j].begin(), tape.encoder_outputs[j].end());
        flat.push_back(tape.stds[j]);
        flat.push_back(tape.latents[j]);
    }
    for (size_t j = 0; j < tape.prior_params.size(); ++j) {
        flat.insert(flat.end(), tape.prior_outputs[j].begin(), tape.prior_outputs[j].end());
        flat.push_back(tape.prior_params[j].first);
        flat.push_back(tape.prior_params[j].second);
    }
    flat.insert(flat.end(), tape.observation_outputs.begin(), tape.observation_outputs.end());
    flat.push_back(tape.observation_pre);
    return flat;
}

Tape unflatten(at::TensorList flat, const Model& model) {
    Tape tape;
    size_t next = 0;
    const auto take = [&](size_t count) {
        TORCH_CHECK(next + count <= flat.size(), "iwae_step: the tape is shorter than the model needs");
        std::vector<Tensor> taken(flat.begin() + next, flat.begin() + next + count);
        next += count;
        return taken;
    };
    for (const Network& network : model.encoder) {
        tape.encoder_outputs.push_back(take(network.size()));
        auto std_and_latent = take(2);
        tape.stds.push_back(std_and_latent[0]);
        tape.latents.push_back(std_and_latent[1]);
    }
    for (size_t j = 1; j < model.decoder.size(); ++j) {
        tape.prior_outputs.push_back(take(model.decoder[j].size()));
        auto params = take(2);
        tape.prior_params.emplace_back(params[0], params[1]);
    }
    tape.observation_outputs = take(model.decoder[0].size());
    tape.observation_pre = take(1)[0];
    TORCH_CHECK(next == flat.size(), "iwae_step: the tape is longer than the model needs");
    return tape;
}

void check_data(const Tensor& x) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.device().is_cpu(),
                "iwae_step: x must be a contiguous float32 CPU tensor [batch, x_dim]");
}

// [log_w, *tape]
std::vector<Tensor> forward_op(const Tensor& x, at::TensorList noise, at::TensorList params,
                               at::IntArrayRef layers_per_network, at::IntArrayRef settings) {
    at::NoGradGuard no_grad;
    check_data(x);
    const Model model = model_of(params, layers_per_network, noise.size());
    Tape tape;
    std::vector<Tensor> result{forward(model, x, noise, tape, settings_of(settings))};
    const auto flat = flatten(tape);
    result.insert(result.end(), flat.begin(), flat.end());
    return result;
}

// every entry of params' loss gradient (undefined for none)
std::vector<Tensor> backward_op(const Tensor& x, at::TensorList noise, at::TensorList params,
                                at::IntArrayRef layers_per_network, at::IntArrayRef settings, at::TensorList tape,
                                const Tensor& decoder_grad, const Tensor& encoder_grad, bool stop_q_params) {
    at::NoGradGuard no_grad;
    check_data(x);
    const Model model = model_of(params, layers_per_network, noise.size());
    std::vector<Tensor> grads(params.size());
    backward(model, x, noise, unflatten(tape, model), {decoder_grad, encoder_grad}, stop_q_params, grads,
             settings_of(settings));
    return grads;
}

}  // namespace

TORCH_LIBRARY(iwae_step, library) {
    library.def("forward(Tensor x, Tensor[] noise, Tensor[] params, int[] layers_per_network, int[] settings) "
                "-> Tensor[]",
                &forward_op);
    library.def("backward(Tensor x, Tensor[] noise, Tensor[] params, int[] layers_per_network, int[] settings, "
                "Tensor[] tape, Tensor decoder_grad, Tensor encoder_grad, bool stop_q_params) -> Tensor[]",
                &backward_op);
}
