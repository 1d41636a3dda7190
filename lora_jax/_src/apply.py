"""``lora_apply``: run a model whose parameters carry adapters.

Two strategies, both returning a function with the signature of the one wrapped:

``"low_rank"`` (default, Flax linen modules)
  Wraps ``apply`` in :func:`flax.linen.intercept_methods`. Each adapted ``nn.Dense``,
  ``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Conv`` or ``nn.Embed`` runs unchanged with its frozen
  weight, and the interceptor adds ``scale * (dropout(x) @ A) @ B``. The frozen weight enters
  the graph only as a constant, so differentiating with respect to the adapters never forms a
  weight-sized gradient: a LoRA step costs about forward + input-gradient FLOPs.

``"merge"`` (any JAX function of a parameter tree)
  Calls the function on :func:`merge` of its first argument. This works for code lora_jax knows
  nothing about, but autodiff then forms the full ``dL/dW'`` to reach ``A`` and ``B``: a step
  costs as much as full fine-tuning. LoRA dropout does not exist on this path.

LoRA dropout (low-rank path only) is active when the call passes an rng for the
``"lora_dropout"`` stream in ``rngs=`` and does not pass ``deterministic=True``. Its masks take
16 random bits an entry (the rate rounded to a multiple of ``2**-16``; see
:mod:`lora_jax._src.dropout`).

DoRA adapters (``use_dora``, ``nn.Dense``/``nn.DenseGeneral`` only) rescale the module's output
per output unit by ``m / ||W + s A B||`` (the norm detached), as PEFT's ``DoraLinearLayer``; see
:mod:`lora_jax._src.dora`.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from collections.abc import Mapping

import flax.linen as nn

from lora_jax._src import bank as bank_lib
from lora_jax._src import bank_linen
from lora_jax._src import dora
from lora_jax._src import dropout
from lora_jax._src import layouts
from lora_jax._src import low_rank
from lora_jax._src import paths
from lora_jax._src.merge import merge
from lora_jax._src.spec import LORA_A
from lora_jax._src.spec import LORA_B
from lora_jax._src.spec import LORA_MAGNITUDE
from lora_jax._src.spec import LORA_SPEC
from lora_jax._src.spec import LoraSpec
from lora_jax.nnx import tree as nnx_tree
from lora_jax.quant import kernel as quant_kernel
from lora_jax.quant import linen as quant_linen

STRATEGIES = ("low_rank", "merge")
DROPOUT_RNG = "lora_dropout"
# The adapter_ids of the lora_apply call being traced, for banked modules (None outside one).
_ADAPTER_IDS = contextvars.ContextVar("lora_jax_adapter_ids", default=None)


def _dropout(x, rate: float, module: nn.Module):
  # On when the call has a "lora_dropout" rng stream (the wrapper withholds it from
  # deterministic calls).
  if rate == 0.0 or not module.has_rng(DROPOUT_RNG):
    return x
  return dropout.apply(module.make_rng(DROPOUT_RNG), rate, x)


def _input(args, kwargs, name: str):
  return args[0] if args else kwargs[name]


def _call_einsum_str(args, kwargs) -> str | None:
  """The equation an ``nn.Einsum`` call passes in place of its attribute, if any."""
  return kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None)


def _dense_low_rank(module, x, a, b, spec: LoraSpec, dtype):
  x_axes = (-1,) if isinstance(module, nn.Dense) else layouts.as_tuple(module.axis)
  return low_rank.dense(x, a, b, spec, dtype, x_axes)


def _conv_low_rank(module: nn.Conv, x, a, b, spec: LoraSpec, dtype):
  if module.mask is not None:
    raise ValueError(f"LoRA on a masked nn.Conv ({module.name}) is not supported")
  # A is a convolution with the module's own window, strides, padding and dilation, producing
  # `rank` channels; B is the 1x1 convolution back to the output channels.
  conv_a = module.clone(parent=None, name=None, features=spec.rank, use_bias=False)
  t = conv_a.apply({"params": {"kernel": a}}, x)
  return low_rank.matmul(t.astype(dtype) * spec.scale, b.astype(dtype))


def _low_rank(module, method: str, args, kwargs, base, spec: LoraSpec, a, b):
  """The adapter's contribution to ``module.method(*args)``, in the dtype of ``base``."""
  dtype = base.dtype
  if isinstance(module, nn.Embed):
    if method == "attend":
      return low_rank.embed_attend(_input(args, kwargs, "query"), a, b, spec, dtype)
    return low_rank.embed_lookup(_input(args, kwargs, "inputs"), a, b, spec, dtype)
  x = _dropout(_input(args, kwargs, "inputs"), spec.dropout, module)
  if isinstance(module, nn.Dense | nn.DenseGeneral):
    return _dense_low_rank(module, x, a, b, spec, dtype)
  if isinstance(module, nn.Einsum):
    eq = _call_einsum_str(args, kwargs) or module.einsum_str
    return low_rank.einsum(eq, x, a, b, spec, dtype)
  return _conv_low_rank(module, x, a, b, spec, dtype)


def _dora(module, args, kwargs, base, spec: LoraSpec, a, b, path: str):
  """A DoRA module's output, as PEFT's ``DoraLinearLayer`` (see :mod:`lora_jax._src.dora`):
  ``base + (m/n - 1) * W x + (m/n) * scale * B A x`` with ``n = ||W + s A B||`` detached. With
  LoRA dropout active, ``W x`` and ``B A x`` are taken on the dropped-out input (``W x`` by a
  bias-free copy of the module), as PEFT does."""
  if not isinstance(module, nn.Dense | nn.DenseGeneral):
    raise ValueError(
      f"module {path!r} ({type(module).__name__}) carries a DoRA adapter, but DoRA supports "
      "nn.Dense and nn.DenseGeneral only"
    )
  w = quant_kernel.materialize(module.get_variable("params", spec.weight))  # QLoRA: dequantized
  r = dora.ratio(spec, w, a, b, module.get_variable("params", LORA_MAGNITUDE))
  x = _input(args, kwargs, "inputs")
  if spec.dropout > 0.0 and module.has_rng(DROPOUT_RNG):
    x = _dropout(x, spec.dropout, module)
    # the module itself, without its bias, on the dropped-out input
    plain = module.clone(parent=None, name=None, use_bias=False)
    w_x = plain.apply({"params": {spec.weight: w}}, x)
  elif module.use_bias:
    w_x = base - module.get_variable("params", "bias").astype(base.dtype)
  else:
    w_x = base
  lora = _dense_low_rank(module, x, a, b, spec, base.dtype)
  return dora.output(base, w_x, lora, r)


def _check_layout(module: nn.Module, spec: LoraSpec, path: str, args, kwargs):
  ndim = module.get_variable("params", spec.weight).ndim
  if isinstance(module, nn.Einsum):
    eq = _call_einsum_str(args, kwargs)
    if eq is not None:
      module = module.clone(parent=None, einsum_str=eq)
  try:
    layout = layouts.module_layout(module, ndim)
  except layouts.UnsupportedLayout as e:
    raise ValueError(f"adapter at {path!r}: {e}; use lora_apply(..., strategy='merge')") from None
  if (layout.in_axes, layout.out_axes) != (spec.in_axes, spec.out_axes):
    raise ValueError(
      f"adapter at {path!r} splits its weight as inputs={spec.in_axes} outputs={spec.out_axes}, "
      f"but the module contracts inputs={layout.in_axes} outputs={layout.out_axes}; create it "
      "with lora_init(..., layouts=lora_jax.kernel_layouts(model, *example_inputs))"
    )


def _bank_call(next_fun, module, method, args, kwargs):
  """A banked module: its own output plus each row's adapter (see ``bank_linen``)."""
  bank = module.get_variable("params", bank_lib.LORA_BANK)
  path = paths.join(paths.PARAMS, *module.scope.path)
  ids = _ADAPTER_IDS.get()
  if ids is None:
    raise ValueError(
      f"module {path!r} holds an adapter bank of {list(bank.names)}: call lora_apply(...)(bank, "
      "..., adapter_ids=ids), one id per row (-1 for the base alone)"
    )
  base = next_fun(*args, **kwargs)
  x = _input(args, kwargs, "query" if method == "attend" else "inputs")
  eq = _call_einsum_str(args, kwargs) if isinstance(module, nn.Einsum) else None
  lora = bank_linen.contribution(module, method, x, ids, bank, base.dtype, path, eq)
  return base + lora.astype(base.dtype)


def _interceptor(next_fun, args, kwargs, context):
  module, method = context.module, context.method_name
  if method in ("__call__", "attend") and quant_linen.holds_quantized(module):
    # QLoRA: the module runs on its dequantized weight, formed here, inside the step.
    next_fun = functools.partial(quant_linen.run_dequantized, module, method)
  if method in ("__call__", "attend") and module.has_variable("params", bank_lib.LORA_BANK):
    return _bank_call(next_fun, module, method, args, kwargs)
  if method not in ("__call__", "attend") or not module.has_variable("params", LORA_SPEC):
    return next_fun(*args, **kwargs)
  path = paths.join(paths.PARAMS, *module.scope.path)
  if not isinstance(module, layouts.SUPPORTED) or (
    method == "attend" and not isinstance(module, nn.Embed)
  ):
    raise ValueError(
      f"module {path!r} ({type(module).__name__}) carries an adapter but the low-rank path "
      f"supports only {layouts.SUPPORTED_NAMES}; use lora_apply(..., strategy='merge')"
    )
  spec = module.get_variable("params", LORA_SPEC)
  _check_layout(module, spec, path, args, kwargs)
  base = next_fun(*args, **kwargs)
  a = module.get_variable("params", LORA_A)
  b = module.get_variable("params", LORA_B)
  if spec.use_dora:
    return _dora(module, args, kwargs, base, spec, a, b, path)
  return base + _low_rank(module, method, args, kwargs, base, spec, a, b).astype(base.dtype)


def _without_dropout_rng(kwargs: Mapping) -> Mapping:
  """``kwargs`` of a ``deterministic=True`` call minus the ``"lora_dropout"`` stream: no
  dropout in evaluation, whatever rngs the caller passes."""
  rngs = kwargs.get("rngs")
  if kwargs.get("deterministic") is not True or not isinstance(rngs, Mapping):
    return kwargs
  if DROPOUT_RNG not in rngs:
    return kwargs
  rest = {k: v for k, v in rngs.items() if k != DROPOUT_RNG}
  return {**kwargs, "rngs": rest or None}


def lora_apply(apply_fn: Callable, *, strategy: str = "low_rank") -> Callable:
  """Wraps ``apply_fn(variables, *args, **kwargs)`` so that adapters in ``variables`` take effect.

  Args:
    apply_fn: ``model.apply`` of a Flax linen module (``"low_rank"``), or any function whose
      first argument is a parameter tree (``"merge"``).
    strategy: ``"low_rank"`` (no weight-sized gradients; LoRA dropout) or ``"merge"``
      (merge-on-the-fly; costs a full weight gradient). See the module docstring.

  Returns:
    A function with ``apply_fn``'s signature.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from lora_jax import LoraRule, lora_apply, lora_init
    >>> model = nn.Dense(4)
    >>> x = jnp.ones((2, 8))
    >>> variables = model.init(jax.random.key(0), x)
    >>> adapted = lora_init(variables, LoraRule(".*", rank=2), rng=jax.random.key(1))
    >>> bool((lora_apply(model.apply)(adapted, x) == model.apply(variables, x)).all())
    True
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"lora_apply strategy={strategy!r} is not one of {list(STRATEGIES)}")

  if strategy == "merge":

    @functools.wraps(apply_fn)
    def merged_apply(variables, *args, **kwargs):
      return apply_fn(merge(variables, check_finite=False), *args, **kwargs)

    return merged_apply

  @functools.wraps(apply_fn)
  def low_rank_apply(variables, *args, adapter_ids=None, **kwargs):
    nnx_tree.refuse_nnx(
      variables, "lora_apply", "lora_jax.nnx.lora_init: an adapted NNX model runs as it is called"
    )
    if adapter_ids is not None and not bank_lib.is_bank(variables):
      raise ValueError(
        "adapter_ids were given but the parameters hold no adapter bank (lora_jax.adapter_bank)"
      )
    token = _ADAPTER_IDS.set(adapter_ids)
    try:
      with nn.intercept_methods(_interceptor):
        return apply_fn(variables, *args, **_without_dropout_rng(kwargs))
    finally:
      _ADAPTER_IDS.reset(token)

  return low_rank_apply
