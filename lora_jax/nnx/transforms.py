"""``lora_init``, ``merge``, ``unload`` and ``unmerge`` for Flax NNX models.

Each reads the model into the core's parameter tree (:mod:`lora_jax.nnx.tree`), runs the same
function the linen path runs, and writes the result back: the rules, the initialisations
(PiSSA/OLoRA, DoRA's magnitude), the merge arithmetic and every check are the core's.
"""

from __future__ import annotations

from collections.abc import Mapping

from flax import nnx

from lora_jax._src import init as core_init
from lora_jax._src import merge as core_merge
from lora_jax._src import paths
from lora_jax._src.layouts import KernelLayout
from lora_jax._src.layouts import Layouts
from lora_jax._src.spec import LORA_SPEC
from lora_jax.nnx import tree


def layouts(model: nnx.Module) -> Layouts:
  """``{module path: KernelLayout}`` of every supported module of ``model``, read off its own
  attributes (no tracing: the NNX counterpart of :func:`lora_jax.kernel_layouts`, which
  :func:`lora_init` calls itself); ``refused`` says why the other weight-holding modules
  cannot carry an adapter.

  Example:
    >>> from flax import nnx
    >>> import lora_jax
    >>> heads = nnx.LinearGeneral(32, (4, 8), rngs=nnx.Rngs(0))
    >>> lora_jax.nnx.layouts(heads)
    {'': KernelLayout(in_axes=(0,), out_axes=(1, 2), kind='dense', stacked=0)}
  """
  return tree.read_layouts(model)


def _check_supported(chosen, known: Layouts) -> None:
  for path in chosen:
    if path in known.refused:
      raise ValueError(f"module {path!r} cannot carry an adapter: {known.refused[path]}")


def lora_init(
  model: nnx.Module,
  rules,
  *,
  rngs: nnx.Rngs,
  layouts: Mapping[str, KernelLayout] | None = None,
) -> nnx.Module:
  """Adds LoRA adapters to every module of ``model`` that the rules select, in place.

  Each matched ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv`` or
  ``nnx.Embed`` gains ``lora_a`` and ``lora_b`` (``nnx.LoRAParam``, float32), DoRA's
  ``lora_magnitude``, a static ``lora_spec`` and, with dropout, an ``nnx.Dropout`` called
  ``lora_dropout``; its forward pass then adds ``scale * (dropout(x) @ A) @ B`` on the
  low-rank path (see :mod:`lora_jax.nnx.modules`). The base variables stay the same objects
  (PiSSA/OLoRA set the weight's value to the residual). ``B`` starts at zero, so outputs do
  not change.

  Args:
    model: an NNX module.
    rules: a :class:`lora_jax.LoraRule` or a list of them, matched against attribute paths
      (``"layers/0/attn/query"``; no ``params/`` prefix); name lists and ``"all-linear"``
      work as for linen.
    rngs: the ``params`` stream draws the random factors; LoRA dropout draws from the
      ``lora_dropout`` stream if ``rngs`` has one, else ``dropout``, else ``default``.
    layouts: not needed: NNX modules know their own axes (multi-axis ``nnx.LinearGeneral``
      and ``nnx.Einsum`` kernels, layers stacked by ``nnx.vmap``). Entries given here
      override the layouts read off the modules.

  Returns:
    ``model`` itself, adapted.

  Raises:
    ValueError: as :func:`lora_jax.lora_init`; also a matched module that the low-rank path
      cannot run (another layer class, ``batch_axis``, a masked or grouped convolution).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import lora_jax
    >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    >>> model = lora_jax.nnx.lora_init(model, lora_jax.LoraRule(".*", rank=2), rngs=nnx.Rngs(1))
    >>> model.lora_a.shape, model.lora_b.shape, type(model.lora_a).__name__
    ((8, 2), (2, 4), 'LoRAParam')
    >>> bool(jnp.all(model(jnp.ones((1, 8))) == lora_jax.nnx.unload(model)(jnp.ones((1, 8)))))
    True
  """
  known = _layouts_with(model, layouts)
  variables = tree.to_variables(model)
  new = core_init.init_tree(
    variables[paths.PARAMS], rules, rng=rngs.params(), layouts=known, prefix=""
  )
  flat = paths.flatten(new)
  fresh = {
    paths.module_of(p).removeprefix(paths.PARAMS).lstrip("/"): spec
    for p, spec in flat.items()
    if p.endswith("/" + LORA_SPEC)
  }
  mods = tree.modules(model)
  _check_supported(fresh, known)
  for path in fresh:
    tree.attach(mods[path], tree.module_leaves({paths.PARAMS: new}, path), rngs)
  tree.write_values(model, {paths.PARAMS: new})
  return model


def _layouts_with(model: nnx.Module, given: Mapping[str, KernelLayout] | None) -> Layouts:
  known = tree.read_layouts(model)
  if given:
    refused = {p: why for p, why in known.refused.items() if p not in given}
    known = Layouts({**known, **given}, refused)
  return known


def merge(model: nnx.Module) -> nnx.Module:
  """A new model of the same classes without adapters: each ``W`` becomes ``W + s * A @ B``.

  The sum is formed in float32 and cast back to ``W``'s dtype (DoRA: ``m * (W + s*A@B) /
  ||W + s*A@B||``), quantized weights are dequantized, as :func:`lora_jax.merge` does. The
  input model is left as it is.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import lora_jax
    >>> model = lora_jax.nnx.lora_init(nnx.Linear(8, 4, rngs=nnx.Rngs(0)),
    ...                                lora_jax.LoraRule(".*", rank=2), rngs=nnx.Rngs(1))
    >>> model.lora_b[...] = jnp.ones((2, 4))  # as if trained
    >>> merged = lora_jax.nnx.merge(model)
    >>> type(merged).__name__, hasattr(merged, "lora_a")
    ('Linear', False)
    >>> x = jnp.ones((3, 8))
    >>> bool(jnp.allclose(merged(x), model(x), atol=1e-5))
    True
  """
  out = nnx.clone(model)
  merged = core_merge.merge(tree.to_variables(out))
  for module in tree.modules(out).values():
    tree.detach(module)
  return tree.sync(out, merged)


def unload(model: nnx.Module) -> nnx.Module:
  """A new model of the same classes without adapters, with the base weights as they are
  (PEFT's ``unload``); the input model is left as it is."""
  out = nnx.clone(model)
  for module in tree.adapted(out).values():
    tree.detach(module)
  return out


def unmerge(merged: nnx.Module, adapted: nnx.Module, *, check: bool = True) -> nnx.Module:
  """A copy of ``merged`` with ``adapted``'s adapters subtracted from its weights, as
  :func:`lora_jax.unmerge` (``check`` refuses weights that did not hold this adapter)."""
  restored = core_merge.unmerge(tree.to_variables(merged), tree.to_variables(adapted), check=check)
  return tree.sync(nnx.clone(merged), restored)
