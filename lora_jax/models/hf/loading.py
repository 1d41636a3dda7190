"""``from_pretrained`` and ``from_config``: a model family's Flax module and its parameters.

A config's ``model_type`` picks the family (:mod:`.family`); checkpoints are read tensor by
tensor from memory-mapped files (:mod:`.checkpoint`), named by the family's mapping
(:mod:`.convert`), straight into device arrays of the requested dtype and sharding, so that a
checkpoint never sits in host memory twice.

:func:`from_config` builds the same modules with random weights and no checkpoint.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_jax._src.layouts import KernelLayout
from lora_jax._src.layouts import trace_layouts as kernel_layouts
from lora_jax.models.hf.checkpoint import open_checkpoint
from lora_jax.models.hf.checkpoint import resolve_folder
from lora_jax.models.hf.convert import flax_shape
from lora_jax.models.hf.convert import path_to_hf_name
from lora_jax.models.hf.convert import to_flax_layout
from lora_jax.models.hf.family import family_of
from lora_jax.quant import tree as quantization
from lora_jax.quant.array import stack as stack_quantized
from lora_jax.quant.tree import Quantization

logger = logging.getLogger(__name__)

Sharding = jax.sharding.Sharding | Callable[[str, tuple[int, ...]], jax.sharding.Sharding]


def auto_model(
  config: Any,
  task: str | None = None,
  *,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  remat: bool = False,
  scan_layers: bool = False,
  attention_implementation: str | None = None,
):
  """The Flax module (only) for a transformers config; ``config.model_type`` picks the family.

  Args:
    config: a transformers config: ``bert``/``roberta`` (:class:`lora_jax.models.Bert`) or
      ``llama``/``mistral``/``qwen2``/``qwen3`` (:class:`lora_jax.models.Decoder`).
    task: encoders ``"base"`` (default) or ``"sequence-classification"``; decoders
      ``"causal-lm"`` (default) or ``"base"``.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    remat: rematerialise each layer in the backward pass.
    scan_layers: decoders only: run the layers under ``nn.scan`` with stacked parameters (one
      layer compiled, whatever the depth).
    attention_implementation: ``None``, ``"xla"``, ``"xla_chunked"`` or ``"cudnn"``; decoders
      also ``"pallas"`` and ``"pallas_interpret"`` (see ``lora_jax.models.layers.attention``).

  Raises:
    ValueError: unsupported ``model_type``, task or setting (named, with the valid ones).

  Example:
    ``jax.eval_shape`` sizes a model without allocating it:

    >>> import transformers
    >>> from lora_jax.models import auto_model
    >>> cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096,
    ...   intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    >>> module = auto_model(cfg, "causal-lm", scan_layers=True)
    >>> shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))
    >>> sum(x.size for x in jax.tree.leaves(shapes))
    6738415616
  """
  return family_of(config).build(
    config,
    task,
    dtype=dtype,
    param_dtype=param_dtype,
    remat=remat,
    scan_layers=scan_layers,
    attention_implementation=attention_implementation,
  )


# ---------------------------------------------------------------------------------------------
# Model + checkpoint.


def _sources(path: str, shape: tuple[int, ...], container: str | None) -> list[str]:
  """The unscanned paths a leaf is read from: itself, or one per layer of a stacked leaf."""
  if container is None or not path.startswith(container + "/"):
    return [path]
  rest = path[len(container) + 1 :]
  return [f"{container}/{i}/{rest}" for i in range(shape[0])]


def _sharding_for(sharding: Sharding | None, path: str, shape) -> jax.sharding.Sharding:
  if sharding is None:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(sharding, jax.sharding.Sharding):
    return sharding
  return sharding(f"params/{path}", tuple(shape))


def _device_array(path: str, tensors: list, stacked: bool, shape, dtype, sharding) -> jax.Array:
  """One parameter, read slice by slice from (memory-mapped) checkpoint tensors.

  Each device's slice is copied from disk once, in ``dtype``; a ``stacked`` leaf (one tensor
  per layer) reads only the layers in that slice.
  """
  dtype = np.dtype(dtype)

  def view(tensor, index) -> np.ndarray:
    return to_flax_layout(path, np.asarray(tensor))[index]

  def host(index):
    if not stacked:
      return np.array(view(tensors[0], index), dtype=dtype)
    layers = range(len(tensors))[index[0]]
    first = view(tensors[layers[0]], index[1:])
    out = np.empty((len(layers), *first.shape), dtype)  # filled layer by layer: no 2nd copy
    for j, i in enumerate(layers):
      out[j] = view(tensors[i], index[1:])
    return out

  return jax.make_array_from_callback(tuple(shape), sharding, host)


def _check_quantization(quantize) -> None:
  if not isinstance(quantize, Quantization):
    raise ValueError(
      f"quantize={quantize!r} must be None or a lora_jax.Quantization, e.g. "
      'Quantization("all-linear", kind="nf4")'
    )


def _quantized_kernels(module, expected: dict, quantize, sharding) -> set[str]:
  """The kernel paths (no ``params/``) that ``quantize`` selects; checks the setting."""
  if quantize is None:
    return set()
  _check_quantization(quantize)
  if sharding is not None:
    raise ValueError(
      "from_pretrained(quantize=..., sharding=...) is not supported: quantized kernels are "
      "placed on the default device"
    )
  layouts = kernel_layouts(module, jnp.zeros((1, 1), jnp.int32))
  tree = traverse_util.unflatten_dict(expected, sep="/")
  chosen = quantization.plan(tree, quantize, layouts)
  return {f"{p.removeprefix('params/')}/kernel" for p in chosen}


def _quantized_array(path: str, tensors: list, stacked: bool, shape, dtype, quantize):
  """One kernel, quantized layer by layer as each layer's tensor is read."""
  layer_shape = shape[1:] if stacked else shape
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  layout = KernelLayout((0,), (1,), "dense")
  parts = [
    quantization.quantize_array(
      _device_array(path, [t], False, layer_shape, dtype, device),
      layout,
      quantize,
    )
    for t in tensors
  ]
  return stack_quantized(parts) if stacked else parts[0]


def load_params(
  module,
  config: Any,
  state_dict: Mapping[str, Any],
  *,
  rng: jax.Array | int = 0,
  param_dtype: Any = jnp.float32,
  source: str = "checkpoint",
  sharding: Sharding | None = None,
  quantize: Quantization | None = None,
) -> dict:
  """Checks a transformers state dict against ``module`` and returns its params.

  ``state_dict`` maps transformers names to arrays or lazy tensors
  (:func:`.checkpoint.open_checkpoint`); each parameter is read into a device array of
  ``param_dtype`` on ``sharding`` (a ``jax.sharding.Sharding``, or a function of the
  ``"params/a/b/c"`` path and shape returning one; default: this process's first device),
  stacked from per-layer tensors when ``module`` scans its layers; with ``quantize``, the
  kernels it selects are quantized one layer at a time as they are read
  (:func:`lora_jax.quantize`). Encoder heads (``pooler``, ``classifier``) absent from the
  checkpoint are initialised from ``rng`` and reported in one warning; tensors the model does
  not use, likewise. Any other missing tensor or any shape mismatch raises one error listing
  all of them.
  """
  fam = family_of(config)
  dummy = jnp.zeros((1, 1), jnp.int32)
  key = jax.random.key(rng) if isinstance(rng, int) else rng
  expected = traverse_util.flatten_dict(jax.eval_shape(module.init, key, dummy)["params"], sep="/")

  found, names = {}, {}
  for name, tensor in state_dict.items():
    path = fam.hf_name_to_path(name, config)
    if path is not None:
      found[path], names[path] = tensor, name
  base = fam.base_prefix.get(config.model_type)
  prefix = f"{base}." if base and any(n.startswith(f"{base}.") for n in names.values()) else ""
  container = fam.layers if getattr(module, "scan_layers", False) else None
  sources = {p: _sources(p, s.shape, container) for p, s in expected.items()}

  stacked = {p: len(sources[p]) > 1 or sources[p] != [p] for p in expected}
  problems, missing = [], []
  for p, s in expected.items():
    layer_shape = s.shape[1:] if stacked[p] else s.shape
    for src in sources[p]:
      if src not in found:
        if fam.is_head(p):
          missing.append(p)
        else:
          problems.append(
            f"  {path_to_hf_name(src, config, prefix)} ({src}): expected "
            f"{flax_shape(src, layer_shape)}, missing"
          )
      elif flax_shape(src, found[src].shape) != tuple(layer_shape):
        problems.append(
          f"  {names[src]} ({src}): expected {flax_shape(src, layer_shape)}, "
          f"got {tuple(found[src].shape)}"
        )
  model_name = f"{config.model_type} (task={module.task!r})"
  if problems:
    raise ValueError(
      f"{source} does not fit {model_name}; {len(problems)} mismatch(es) "
      "(Hugging Face name (Flax path): expected shape, got shape):\n" + "\n".join(problems)
    )
  used = {src for p in expected for src in sources[p]}
  unused = sorted(names[p] for p in found if p not in used)

  chosen = _quantized_kernels(module, expected, quantize, sharding)
  params = {
    p: _device_array(
      p,
      [found[src] for src in sources[p]],
      stacked[p],
      s.shape,
      param_dtype,
      _sharding_for(sharding, p, s.shape),
    )
    if p not in chosen
    else _quantized_array(
      p, [found[src] for src in sources[p]], stacked[p], s.shape, param_dtype, quantize
    )
    for p, s in expected.items()
    if p not in missing
  }
  if missing:
    params.update(_init_subset(module, key, dummy, missing))
    logger.warning(
      "Some weights of %s were not in %s and are newly initialized: %s. "
      "Train them before using the model for predictions.",
      model_name,
      source,
      [path_to_hf_name(p, config, prefix) for p in missing],
    )
  if unused:
    logger.warning("Some weights of %s were not used by %s: %s", source, model_name, unused)
  return traverse_util.unflatten_dict(params, sep="/")


def _init_subset(module, key: jax.Array, dummy: jax.Array, paths: list[str]) -> dict:
  def init(key):
    flat = traverse_util.flatten_dict(module.init(key, dummy)["params"], sep="/")
    return {p: flat[p] for p in paths}

  # jit so that XLA drops everything init computes but these few leaves: no full random model
  # is ever allocated beside the loaded one.
  return jax.jit(init)(key)


def _with_labels(config: Any, num_labels: int | None, copy_config: bool) -> Any:
  if num_labels is None:
    return config
  if not family_of(config).classifies:
    raise ValueError(
      f"num_labels={num_labels} is for sequence-classification encoders; a "
      f"{config.model_type!r} decoder has no classification head here"
    )
  config = copy.deepcopy(config) if copy_config else config
  config.num_labels = num_labels
  return config


def from_config(
  config: Any,
  task: str | None = None,
  num_labels: int | None = None,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  *,
  quantize: Quantization | None = None,
  rng: jax.Array | int = 0,
  remat: bool = False,
  scan_layers: bool = False,
  attention_implementation: str | None = None,
) -> tuple[Any, dict]:
  """A new Flax module and randomly initialised variables for a transformers config.

  Transformers' ``AutoModel.from_config``: no checkpoint is read (train it "from scratch").

  Args:
    config: a transformers config (e.g. ``AutoConfig.from_pretrained("path/to/config.json")``);
      not modified.
    task: see :func:`auto_model` (default: ``"base"`` for encoders, ``"causal-lm"`` for
      decoders).
    num_labels: encoders' sequence classification: set on a copy of the config.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    rng: key or seed of the initialisation.
    remat: rematerialise each layer.
    scan_layers: decoders: stacked layers under ``nn.scan``.
    attention_implementation: ``None``, ``"xla"``, ``"xla_chunked"`` or ``"cudnn"``; decoders
      also ``"pallas"`` and ``"pallas_interpret"`` (see ``lora_jax.models.layers.attention``).
    quantize: a :class:`lora_jax.Quantization`: the kernels it selects are quantized after
      initialisation, as :func:`from_pretrained` does while reading.

  Returns:
    ``(module, {"params": params})``.

  Raises:
    ValueError: unsupported ``model_type``, ``hidden_act``, task or setting.

  Example:
    >>> import transformers
    >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
    ...                               num_attention_heads=2, intermediate_size=16)
    >>> module, variables = from_config(cfg, "sequence-classification", num_labels=3, rng=0)
    >>> ids = jnp.ones((2, 4), jnp.int32)
    >>> module.apply(variables, ids).shape, cfg.num_labels  # the caller's config is unchanged
    ((2, 3), 2)
  """
  config = _with_labels(config, num_labels, copy_config=True)
  options = dict(
    remat=remat, scan_layers=scan_layers, attention_implementation=attention_implementation
  )
  module = auto_model(config, task, dtype=dtype, param_dtype=param_dtype, **options)
  key = jax.random.key(rng) if isinstance(rng, int) else rng
  variables = {"params": jax.jit(module.init)(key, jnp.zeros((1, 1), jnp.int32))["params"]}
  if quantize is not None:
    _check_quantization(quantize)
    layouts = kernel_layouts(module, jnp.zeros((1, 1), jnp.int32))
    variables = quantization.apply_quantization(variables, quantize, layouts)
  return module, variables


def from_pretrained(
  name_or_path: str | Path,
  task: str | None = None,
  num_labels: int | None = None,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  *,
  rng: jax.Array | int = 0,
  remat: bool = False,
  scan_layers: bool = False,
  attention_implementation: str | None = None,
  sharding: Sharding | None = None,
  quantize: Quantization | None = None,
  revision: str | None = None,
  cache_dir: str | None = None,
  **config_overrides: Any,
) -> tuple[Any, dict]:
  """A Flax module and its variables from a Hugging Face checkpoint.

  BERT/RoBERTa encoders and Llama-family decoders (``llama``, ``mistral``, ``qwen2``,
  ``qwen3``), by the checkpoint's ``model_type``. Tensors are streamed from the
  (memory-mapped) files one at a time into device arrays of ``param_dtype``: bf16 and sharded
  checkpoints included, no second host copy of the model.

  Args:
    name_or_path: a local model folder, or a Hub repo id (``"FacebookAI/roberta-base"``,
      ``"HuggingFaceTB/SmolLM2-135M-Instruct"``), downloaded with
      ``huggingface_hub.snapshot_download``.
    task: see :func:`auto_model` (default: ``"base"`` for encoders, ``"causal-lm"`` for
      decoders).
    num_labels: encoders' sequence classification: set on the config (``1``: regression).
    dtype: compute dtype.
    param_dtype: parameter dtype the checkpoint is cast to.
    rng: key or seed for encoder heads the checkpoint lacks.
    remat: rematerialise each layer.
    scan_layers: decoders: stacked layers under ``nn.scan`` (read from per-layer tensors).
    attention_implementation: ``None``, ``"xla"``, ``"xla_chunked"`` or ``"cudnn"``; decoders
      also ``"pallas"`` and ``"pallas_interpret"`` (see ``lora_jax.models.layers.attention``).
    sharding: where parameters go: a ``jax.sharding.Sharding`` for all, or a function of the
      ``"params/a/b/c"`` path and shape; each device reads only its slice from disk. Default:
      this process's first device (in a multi-process job, each process loads its own copy).
    quantize: a :class:`lora_jax.Quantization` (QLoRA's frozen base, e.g.
      ``Quantization("all-linear")`` for NF4 with double quantization): each kernel it selects
      is quantized as it is read, one layer at a time, so the unquantized checkpoint is never
      held whole; run the model through :func:`lora_jax.lora_apply`. Not combined with
      ``sharding`` (quantized kernels go to the default device).
    revision: Hub revision.
    cache_dir: Hub cache folder.
    **config_overrides: passed to ``transformers.AutoConfig.from_pretrained`` (e.g.
      ``hidden_dropout_prob=0.0``).

  Returns:
    ``(module, {"params": params})``.

  Raises:
    ValueError: unsupported ``model_type``, or a checkpoint that does not fit (every mismatch
      listed).
    FileNotFoundError: no weights file in the folder.
    ImportError: a ``.bin``-only checkpoint without torch installed.

  Example:
    A tiny random BERT written to a folder (``from_pretrained("bert-base-uncased")`` reads a
    Hub checkpoint the same way):

    >>> import tempfile, transformers
    >>> from safetensors.numpy import save_file
    >>> from lora_jax.models import auto_model, flax_to_hf
    >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
    ...                               num_attention_heads=2, intermediate_size=16)
    >>> folder = tempfile.mkdtemp()
    >>> cfg.save_pretrained(folder)
    >>> ids = jnp.ones((1, 4), jnp.int32)
    >>> save_file(flax_to_hf(auto_model(cfg).init(jax.random.key(0), ids), cfg),
    ...           f"{folder}/model.safetensors")
    >>> module, variables = from_pretrained(folder)
    >>> module.apply(variables, ids).shape
    (1, 4, 8)
  """
  import transformers

  folder = resolve_folder(name_or_path, revision=revision, cache_dir=cache_dir)
  # No code from the checkpoint runs (and transformers never asks on a terminal): the families
  # here are lora_jax's own.
  config = transformers.AutoConfig.from_pretrained(
    folder, **{"trust_remote_code": False, **config_overrides}
  )
  config = _with_labels(config, num_labels, copy_config=False)
  options = dict(
    remat=remat, scan_layers=scan_layers, attention_implementation=attention_implementation
  )
  module = auto_model(config, task, dtype=dtype, param_dtype=param_dtype, **options)
  params = load_params(
    module,
    config,
    open_checkpoint(folder),
    rng=rng,
    param_dtype=param_dtype,
    source=f"the checkpoint at {str(name_or_path)!r}",
    sharding=sharding,
    quantize=quantize,
  )
  return module, {"params": params}
