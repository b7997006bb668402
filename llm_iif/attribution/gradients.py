"""Exact per-sample gradients from one batched backward pass, for any model's Linear, Conv2d or LoRA layers.

For a linear layer y = W x + b applied at every token t of sample i, the gradient of a sum-reduced loss
L = Σ_i L_i splits exactly into per-sample parts, because sample i's activations only reach L_i:

    ∇W L_i = Σ_t g_{i,t} x_{i,t}ᵀ        ∇b L_i = Σ_t g_{i,t}        (g = ∂L/∂y, x = the layer's input)

A Conv2d layer is the same linear map applied at every output position t to the unfolded input patch x_{i,t}
(``F.unfold``), with W viewed as [C_out, C_in·kh·kw], so the same rule covers the CNNs of image policies.

A forward hook keeps x; a tensor hook on y receives g during backward, and the per-sample gradient (or its
dot product with a target) is formed right there, one layer at a time. A peft LoRA update s·B(A x) is two
such layers, ``lora_A`` and ``lora_B``, so the same rule gives ∇A_i and ∇B_i; the LoRA scaling s is already
inside g. Results are stored per layer by overwrite, never appended, so hooks that fire twice (gradient
checkpointing recomputes the forward) cannot double count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from llm_iif.core.errors import UserError


class LayerGradientCapture:
    """Capture per-sample gradients of the weights (and biases) of chosen ``nn.Linear`` / ``nn.Conv2d`` layers.

    Use as a context manager around one forward pass and one backward pass (``loss.backward()`` or `backward`)
    of a loss that sums per-sample losses over the leading (batch) dimension of every captured layer's input.
    Linear inputs may be [B, d] or [B, T, d]; positions whose output gradient is zero (padding, masked tokens)
    contribute nothing. Conv2d layers must have groups = 1 and numeric padding.

    ``layers`` maps a layer's weight name (as in ``model.named_parameters()``) to the layer. With ``target``
    (a dict of the same parameter names to tensors of the parameters' shapes) the capture runs in streaming
    mode: it keeps only the [B] dot products ⟨∇L_i, target⟩, never the per-sample gradients. Targets stacked
    along a new leading dimension K (tensors [K, *param.shape]) give [B, K] dot products, one per target.
    `sum_by_group` and `score_against` switch the mode for the next backward, so that two backward passes
    through one forward can give per-group gradient sums and then scores against them.
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], target: dict[str, torch.Tensor] | None = None):
        if not layers:
            raise ValueError("no trainable layers to capture gradients for")
        names = {id(p): n for n, p in model.named_parameters()}
        self._params: dict[str, tuple[str, str | None]] = {}  # layer key -> (weight name, bias name or None)
        self._layers = {}
        for key, layer in layers.items():
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                raise TypeError(f"{key}: per-sample gradients are implemented for nn.Linear and nn.Conv2d, got "
                                f"{type(layer).__name__}")
            if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or isinstance(layer.padding, str)
                                                 or layer.padding_mode != "zeros"):
                raise TypeError(f"{key}: Conv2d per-sample gradients need groups=1 and numeric zero padding")
            bias = layer.bias if layer.bias is not None and layer.bias.requires_grad else None
            self._params[key] = (names[id(layer.weight)], names[id(bias)] if bias is not None else None)
            self._layers[key] = layer
        self.parameter_names = [n for pair in self._params.values() for n in pair if n is not None]
        self._model_params = dict(model.named_parameters())
        self.target, self._groups, self._group_sums = None, None, {}
        if target is not None:
            self.score_against(target)
        self._inputs: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
        self._layer_scores: dict[str, torch.Tensor] = {}
        self._awaiting_gradient: set[str] = set()  # layers whose last call's output gradient has not arrived
        self._reached: set[str] = set()  # layers that the current `backward` has reached
        self._handles: list = []

    def __enter__(self) -> "LayerGradientCapture":
        self._inputs.clear(), self._outputs.clear(), self._grads.clear(), self._layer_scores.clear()
        self._awaiting_gradient.clear()
        for key, layer in self._layers.items():
            self._handles.append(layer.register_forward_hook(partial(self._on_forward, key)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear(), self._outputs.clear()

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, allow_unused: bool = False) -> None:
        """The backward pass of ``loss`` (a scalar) as far as the captured layers' outputs of the last forward,
        which is all the hooks need. No parameter gradient is formed: under FSDP2 the parameters are shards that
        the graph never sees (each forward uses whole copies), and this works the same sharded or not. With
        ``allow_unused``, layers that ``loss`` does not reach (a value head, for a policy term) get zero
        gradients; otherwise such a layer is an error when the results are read."""
        outputs = dict(self._outputs)
        self._reached.clear()
        torch.autograd.grad(loss, list(outputs.values()), retain_graph=retain_graph, allow_unused=allow_unused)
        self._outputs = outputs  # not the outputs of a forward that gradient checkpointing reran in the backward
        if allow_unused:
            for key in outputs.keys() - self._reached:
                self._on_output_grad(key, torch.zeros_like(outputs[key]))

    # ---------------------------------------------------------------- modes (for the next backward)

    def score_against(self, target: dict[str, torch.Tensor]) -> None:
        """Streaming mode from the next backward on: keep only the dot products with ``target`` (see
        `scores`)."""
        self.target = _checked_target(target, self._model_params, self.parameter_names)
        self._groups = None

    def per_sample(self) -> None:
        """Per-sample mode from the next backward on (the mode without a target): read `per_sample_grads`."""
        self.target, self._groups = None, None

    def sum_by_group(self, groups: torch.Tensor, n_groups: int) -> None:
        """From the next backward on, sum the per-sample gradients within each group instead: ``groups``
        [B] gives each sample's group in [0, n_groups), or -1 to leave the sample out (its gradient may be NaN
        and still adds nothing); read the sums with `group_sums`."""
        groups = groups.long()
        self._groups = torch.nn.functional.one_hot(groups.clamp(min=0), n_groups).float()   # [B, K]
        self._groups[groups < 0] = 0.0
        self._group_sums.clear()

    # ---------------------------------------------------------------- results

    def group_sums(self) -> dict[str, torch.Tensor]:
        """Group mode: parameter name -> [K, *param.shape], the gradient summed over each group's samples."""
        self._check_complete(self._group_sums)
        return {name: self._group_sums[name] for name in self.parameter_names}

    def per_sample_grads(self) -> dict[str, torch.Tensor]:
        """Per-sample gradients: parameter name -> [B, *param.shape] (fp32)."""
        if self.target is not None:
            raise RuntimeError("a streaming capture (constructed with target=) keeps scores, not gradients; "
                               "call .scores()")
        self._check_complete(self._grads)
        return {name: self._grads[name] for name in self.parameter_names}

    def dot(self, target: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B] inner products Σ_params ⟨∇L_i, target⟩ of every sample's gradient with ``target``."""
        grads = self.per_sample_grads()
        return sum(_batched_dot(grads[name], target[name]) for name in self.parameter_names)

    def scores(self) -> torch.Tensor:
        """Streaming mode: the [B] inner products with the target given at construction ([B, K] for K
        stacked targets)."""
        if self.target is None:
            raise RuntimeError("scores() needs a streaming capture: pass target= to the constructor")
        self._check_complete(self._layer_scores, by_layer=True)
        return sum(self._layer_scores.values())

    # ---------------------------------------------------------------- hooks

    def _on_forward(self, key: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # A second call before the first one's gradient arrived would overwrite its input, and the layer's
        # per-sample gradient would miss that call's share. Recomputation under gradient checkpointing happens
        # inside the backward and repeats the same call, so it is no second call.
        if key in self._awaiting_gradient and torch._C._current_graph_task_id() == -1:
            raise UserError(f"attribution: the layer '{self._params[key][0]}' ran twice in one forward pass (a "
                            "weight-shared or looped block); its per-sample gradients would miss the first call, so "
                            "influence scoring does not support such a model")
        self._inputs[key] = inputs[0]
        if output.requires_grad:
            self._outputs[key] = output  # under a no-grad forward (e.g. reentrant checkpointing) there is no backward
            self._awaiting_gradient.add(key)
            output.register_hook(partial(self._on_output_grad, key))

    def _on_output_grad(self, key: str, grad_output: torch.Tensor) -> None:
        self._awaiting_gradient.discard(key)
        self._reached.add(key)
        layer = self._layers[key]
        x, g = _positions(layer, self._inputs[key].detach(), grad_output)  # [B, T, d_in], [B, T, d_out]
        weight_name, bias_name = self._params[key]
        if self._groups is not None:
            groups = self._groups.to(g.device)
            counted = groups.sum(dim=1).bool()[:, None, None]  # where, not a product: 0 · NaN would be NaN
            x, g = torch.where(counted, x, 0.0), torch.where(counted, g, 0.0)
            self._group_sums[weight_name] = torch.einsum("bk,bto,bti->koi", groups, g, x).reshape(
                -1, *whole_shape(layer.weight))
            if bias_name is not None:
                self._group_sums[bias_name] = groups.T @ g.sum(dim=1)
            return
        if self.target is None:
            self._grads[weight_name] = torch.einsum("bto,bti->boi", g, x).reshape(-1, *whole_shape(layer.weight))
            if bias_name is not None:
                self._grads[bias_name] = g.sum(dim=1)
            return
        # ⟨Σ_t g_t x_tᵀ, V_k⟩ = Σ_t g_tᵀ V_k x_t, contracted without forming the [B, d_out, d_in] gradient.
        target = self.target[weight_name].to(device=x.device, dtype=torch.float32)
        stacked = target.dim() > len(whole_shape(layer.weight))
        d_out, d_in = g.shape[-1], x.shape[-1]
        weight_target = target.reshape(-1, d_out, d_in)                                        # [K, d_out, d_in]
        n_targets = weight_target.shape[0]
        if d_out <= d_in:
            projected = x @ weight_target.reshape(-1, d_in).T                                  # [B, T, K·d_out]
            score = torch.einsum("bto,btko->bk", g, projected.unflatten(-1, (n_targets, d_out)))
        else:
            projected = g @ weight_target.transpose(0, 1).reshape(d_out, -1)                   # [B, T, K·d_in]
            score = torch.einsum("btki,bti->bk", projected.unflatten(-1, (n_targets, d_in)), x)
        if bias_name is not None:
            bias_target = self.target[bias_name].to(device=x.device, dtype=torch.float32).reshape(n_targets, d_out)
            score = score + g.sum(dim=1) @ bias_target.T
        self._layer_scores[key] = score if stacked else score[:, 0]

    def _check_complete(self, results: dict, by_layer: bool = False) -> None:
        expected = len(self._layers) if by_layer else len(self.parameter_names)
        if len(results) != expected:
            raise RuntimeError(f"gradients reached {len(results)} of {expected} captured "
                               f"{'layers' if by_layer else 'parameters'}; run a forward pass and "
                               "loss.backward() inside the capture, with the loss depending on every layer")


class LoraGradientCapture(LayerGradientCapture):
    """Per-sample gradients of every trainable peft LoRA parameter of ``model``.

    ``model`` is a peft model, or any module containing one (e.g. a policy with a value head); the keys of
    the results are exactly the LoRA parameter names in ``model.named_parameters()``, e.g.
    ``...c_attn.lora_A.default.weight``. Works for any architecture whose LoRA layers are peft's linear
    ``lora_A``/``lora_B`` pairs (GPT-2 Conv1D with fan_in_fan_out, Llama, GPT-NeoX, ...).

        with LoraGradientCapture(model) as capture:
            loss = per_sample_losses(model, batch).sum()   # [B] -> scalar, sum-reduced
            loss.backward()
        grads = capture.per_sample_grads()                  # {name: [B, *param.shape]}
        scores = capture.dot(target)                        # [B]

    Pass ``target=`` to run in streaming mode and read ``capture.scores()`` instead.
    """

    def __init__(self, model: nn.Module, target: dict[str, torch.Tensor] | None = None):
        super().__init__(model, lora_layers(model), target)


def lora_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The trainable ``lora_A``/``lora_B`` linear layers of ``model``, keyed by module name."""
    layers = {}
    for name, module in model.named_modules():
        for factor in ("lora_A", "lora_B"):
            adapters = getattr(module, factor, None)
            if not isinstance(adapters, nn.ModuleDict):
                continue
            for adapter, layer in adapters.items():
                if layer.weight.requires_grad:
                    layers[f"{name}.{factor}.{adapter}"] = layer
    if not layers:
        raise ValueError("the model has no trainable peft LoRA layers (lora_A/lora_B)")
    return layers


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable LoRA parameters of ``model`` by name, in ``named_parameters()`` order."""
    return _parameters_of(model, lora_layers(model))


def scored_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The layers influence scores cover: the trainable LoRA layers when ``model`` has any, else every
    ``nn.Linear`` whose weight is trainable (a model trained without LoRA). Other trainable parameters
    (embeddings, norms, GPT-2's Conv1D) are not scored, nor is the output head: trl computes log-probs from its
    weight without calling the module (``fused_lm_head``), so no hook would see it. Raises ValueError when
    there is nothing to score."""
    try:
        return lora_layers(model)
    except ValueError:
        pass
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and m.weight.requires_grad and m is not head}
    if not layers:
        raise ValueError("the model has no trainable peft LoRA layers and no trainable nn.Linear layers")
    return layers


def scored_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters of `scored_layers` by name, in ``named_parameters()`` order."""
    return _parameters_of(model, scored_layers(model))


def trainable_outside(model: nn.Module, covered) -> list[str]:
    """Names of ``model``'s trainable parameters that are not among the parameters ``covered``."""
    ids = {id(p) for p in covered}
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids]


def _parameters_of(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    wanted = {id(p) for layer in layers.values() for p in layer.parameters() if p.requires_grad}
    return {n: p for n, p in model.named_parameters() if id(p) in wanted}


def whole_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's whole shape, however it is sharded: an FSDP2 DTensor reports it as its shape, while
    DeepSpeed ZeRO-3 leaves an empty tensor outside a layer's passes and keeps the shape in ``ds_shape``.
    Attribution reads no weight values, only these shapes, so it needs nothing gathered."""
    return torch.Size(getattr(param, "ds_shape", param.shape))


def grad_dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ over parameters of ⟨a[name], b[name]⟩ for two gradients with the same keys (a scalar)."""
    return sum((a[n].float() * b[n].float()).sum() for n in a)


def grad_cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Cosine similarity of two gradients flattened over all parameters (0.0 when either is zero)."""
    norms = math.sqrt(grad_dot(a, a).item() * grad_dot(b, b).item())
    return grad_dot(a, b).item() / norms if norms > 0 else 0.0


def _positions(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's input and output gradient as [B, T, d_in] and [B, T, d_out] (fp32) over its T positions:
    tokens for a Linear, output pixels (with unfolded input patches) for a Conv2d."""
    if isinstance(layer, nn.Conv2d):
        patches = F.unfold(x.float(), layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                           stride=layer.stride)                                   # [B, C_in·kh·kw, T]
        return patches.transpose(1, 2), g.float().flatten(2).transpose(1, 2)      # [B, T, ·], [B, T, C_out]
    return x.reshape(x.shape[0], -1, x.shape[-1]).float(), g.reshape(g.shape[0], -1, g.shape[-1]).float()


def _batched_dot(per_sample: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B] dot products of per-sample tensors [B, *shape] with one tensor of ``shape``."""
    return per_sample.flatten(1) @ target.to(per_sample).flatten()


def _checked_target(target: dict, params: dict, names: list[str]) -> dict[str, torch.Tensor]:
    missing = [n for n in names if n not in target]
    if missing:
        raise KeyError(f"target has no tensor for {len(missing)} captured parameter(s), e.g. '{missing[0]}'")
    shapes = {n: tuple(whole_shape(params[n])) for n in names}
    stacked = {tuple(target[n].shape[:-len(shapes[n])]) for n in names}
    for n in names:
        if tuple(target[n].shape[-len(shapes[n]):]) != shapes[n] or target[n].dim() > len(shapes[n]) + 1:
            raise ValueError(f"target['{n}'] has shape {tuple(target[n].shape)}; the parameter has "
                             f"{shapes[n]} (stack K targets as [K, *shape])")
    if len(stacked) > 1:
        raise ValueError(f"target tensors stack different numbers of targets: {sorted(stacked)}")
    return {n: target[n] for n in names}



@dataclass
class RowGradients:
    """Per-row gradients over some parameters as one matrix [R, D], the parameters' flattened gradients side by
    side in ``names`` order."""
    names: list[str]
    shapes: list[torch.Size]
    matrix: torch.Tensor

    @classmethod
    def of(cls, per_sample: dict[str, torch.Tensor], names: list[str]) -> "RowGradients":
        """From per-sample gradients {name: [R, *shape]} (`LayerGradientCapture.per_sample_grads`), over ``names``."""
        return cls(list(names), [per_sample[name].shape[1:] for name in names],
                   torch.cat([per_sample[name].flatten(1) for name in names], dim=1))

    def flatten(self, gradient: dict[str, torch.Tensor]) -> torch.Tensor:
        """[D] one gradient {name: tensor} in the matrix's layout."""
        return torch.cat([gradient[name].to(self.matrix).flatten() for name in self.names])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: tensor of the parameter's shape} from a [D] vector."""
        parts = torch.split(vector, [shape.numel() for shape in self.shapes])
        return {name: part.reshape(shape) for name, part, shape in zip(self.names, parts, self.shapes)}
