"""Hugging Face checkpoints <-> Flax parameters for the BERT family, and ``from_pretrained``.

The name and layout mapping lives in two functions, :func:`hf_to_flax` and :func:`flax_to_hf`
(and the per-name :func:`hf_name_to_path` / :func:`path_to_hf_name` under them):

* ``bert.`` / ``roberta.`` prefixes (``*ForSequenceClassification`` checkpoints) are dropped;
  heads (``classifier``) never carry one.
* ``...weight`` of a Linear is a Flax ``kernel``, transposed to ``(in, out)``; of an Embedding
  it is ``embedding``; of a LayerNorm it is ``scale`` (old ``gamma`` / ``beta`` names accepted).
* Non-persistent buffers (``embeddings.position_ids``, ``embeddings.token_type_ids``) that old
  checkpoints still carry are skipped silently.

:func:`from_config` builds the same modules with random weights and no checkpoint.

Checkpoint files are read with ``safetensors``' numpy API (``model.safetensors`` or a sharded
``model.safetensors.index.json``); ``pytorch_model.bin`` needs torch.
"""

from __future__ import annotations

import copy
import json
import logging
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_jax.models import bert

logger = logging.getLogger(__name__)

_BASE_PREFIX = {"bert": "bert", "roberta": "roberta"}
_BASE_MODULES = ("embeddings", "encoder", "pooler")
_HEAD_MODULES = ("pooler", "classifier")  # may be absent from a checkpoint: freshly initialised
_EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings")
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_OLD_NAMES = {"gamma": "weight", "beta": "bias"}

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
_WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)


# ---------------------------------------------------------------------------------------------
# Names and layouts.


def _model_type(config: Any) -> str:
  model_type = getattr(config, "model_type", None)
  if model_type not in _BASE_PREFIX:
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(_BASE_PREFIX)}")
  return model_type


def hf_name_to_path(name: str, config: Any) -> str | None:
  """``"bert.encoder.layer.0.attention.self.query.weight"`` -> ``".../query/kernel"``.

  Returns the Flax ``"a/b/c"`` params path (no ``params/`` prefix), or ``None`` for buffers
  that are not parameters. Names of modules the model lacks still map (to paths it lacks).
  """
  prefix = _BASE_PREFIX[_model_type(config)] + "."
  if name.startswith(prefix):
    name = name[len(prefix) :]
  if name in _BUFFERS:
    return None
  *modules, leaf = name.split(".")
  leaf = _OLD_NAMES.get(leaf, leaf)
  if modules and modules[-1] == "LayerNorm":
    leaf = {"weight": "scale"}.get(leaf, leaf)
  elif modules and modules[-1] in _EMBEDDINGS:
    leaf = {"weight": "embedding"}.get(leaf, leaf)
  else:
    leaf = {"weight": "kernel"}.get(leaf, leaf)
  return "/".join([*modules, leaf])


def path_to_hf_name(path: str, config: Any, prefix: str = "") -> str:
  """Inverse of :func:`hf_name_to_path`; ``prefix`` (e.g. ``"bert."``) goes on base modules.

  Raises:
    ValueError: for a leaf that is not a plain weight (e.g. ``lora_a``: merge adapters first).
  """
  _model_type(config)
  *modules, leaf = path.split("/")
  hf_leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
  if leaf not in hf_leaf:
    raise ValueError(
      f"parameter {path!r} has no Hugging Face name: leaf {leaf!r} is not one of "
      f"{sorted(hf_leaf)} (merge LoRA adapters into the weights before exporting)"
    )
  head = prefix if modules and modules[0] in _BASE_MODULES else ""
  return head + ".".join([*modules, hf_leaf[leaf]])


def _to_flax_layout(path: str, array: np.ndarray) -> np.ndarray:
  return array.T if path.endswith("/kernel") and array.ndim == 2 else array


def hf_to_flax(state_dict: Mapping[str, Any], config: Any) -> dict:
  """A transformers state dict (name -> array) as a nested Flax params dict of numpy arrays.

  Every tensor is converted, whether the model uses it or not; see :func:`from_pretrained`
  for checking against a model.

  Example:
    >>> import numpy as np, transformers
    >>> sd = {"bert.pooler.dense.weight": np.zeros((4, 3)), "classifier.bias": np.zeros(2)}
    >>> p = hf_to_flax(sd, transformers.BertConfig())
    >>> p["pooler"]["dense"]["kernel"].shape, sorted(p["classifier"])
    ((3, 4), ['bias'])
  """
  flat = {}
  for name, array in state_dict.items():
    path = hf_name_to_path(name, config)
    if path is not None:
      flat[path] = _to_flax_layout(path, np.asarray(array))
  return traverse_util.unflatten_dict(flat, sep="/")


def flax_to_hf(params: Mapping, config: Any, *, prefix: str | None = None) -> dict:
  """Flax params (or ``{"params": ...}``) as a transformers state dict of numpy arrays.

  Args:
    params: the model's params tree (LoRA adapters merged).
    config: the transformers config of the model.
    prefix: put before base-model names, e.g. ``"roberta."``. By default, the
      ``model_type`` prefix when the tree has a ``classifier`` (as a
      ``*ForSequenceClassification`` checkpoint has), else none (as ``BertModel``).

  Example:
    >>> import numpy as np, transformers
    >>> cfg = transformers.RobertaConfig()
    >>> p = {"classifier": {"out_proj": {"kernel": np.zeros((3, 2))}},
    ...      "encoder": {"layer": {"0": {"output": {"LayerNorm": {"scale": np.ones(3)}}}}}}
    >>> {k: v.shape for k, v in flax_to_hf(p, cfg).items()}
    {'classifier.out_proj.weight': (2, 3), 'roberta.encoder.layer.0.output.LayerNorm.weight': (3,)}
  """
  if "params" in params and isinstance(params["params"], Mapping):
    params = params["params"]
  if prefix is None:
    prefix = _BASE_PREFIX[_model_type(config)] + "." if "classifier" in params else ""
  out = {}
  for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
    out[path_to_hf_name(path, config, prefix)] = _to_flax_layout(path, np.asarray(leaf))
  return out


def default_prefix(params: Mapping, config: Any) -> str:
  """The base-model prefix :func:`flax_to_hf` uses by default for ``params``.

  ``"bert."`` / ``"roberta."`` when the tree has a ``classifier`` (a
  ``*ForSequenceClassification`` model), else ``""``.

  Example:
    >>> import transformers
    >>> default_prefix({"classifier": {}, "encoder": {}}, transformers.BertConfig())
    'bert.'
  """
  if "params" in params and isinstance(params["params"], Mapping):
    params = params["params"]
  return _BASE_PREFIX[_model_type(config)] + "." if "classifier" in params else ""


def hf_module_name(module_path: str, config: Any, prefix: str = "") -> str:
  """A Flax module path (no ``params/``) as the transformers module name, e.g. for PEFT.

  Example:
    >>> import transformers
    >>> hf_module_name("encoder/layer/0/attention/self/query", transformers.BertConfig(), "bert.")
    'bert.encoder.layer.0.attention.self.query'
  """
  # Only leaf names differ between the two namings, so any weight leaf stands in for the module.
  return path_to_hf_name(f"{module_path}/kernel", config, prefix).removesuffix(".weight")


def hf_module_to_path(name: str, config: Any) -> str:
  """Inverse of :func:`hf_module_name`: ``"bert.encoder.layer.0.output.dense"`` -> Flax path.

  Example:
    >>> import transformers
    >>> hf_module_to_path("bert.embeddings.word_embeddings", transformers.BertConfig())
    'embeddings/word_embeddings'
  """
  return hf_name_to_path(f"{name}.weight", config).rsplit("/", 1)[0]


# ---------------------------------------------------------------------------------------------
# Files.


def resolve_folder(
  name_or_path: str | Path, *, revision: str | None = None, cache_dir: str | None = None
) -> Path:
  """A local model folder, or a Hub repo id downloaded (config + weights only) to the HF cache.

  Safetensors weights are fetched when the repo has them, else ``pytorch_model*.bin``.
  """
  if Path(name_or_path).is_dir():
    return Path(name_or_path)
  name = str(name_or_path)
  if name.startswith(("/", ".", "~")) or Path(name).exists():
    raise FileNotFoundError(f"{name!r} is not a model folder (and not a Hub repo id)")
  import huggingface_hub

  kw = dict(repo_id=name, revision=revision, cache_dir=cache_dir)
  folder = Path(
    huggingface_hub.snapshot_download(
      **kw, allow_patterns=["config.json", "model*.safetensors", SAFETENSORS_INDEX]
    )
  )
  if not any((folder / f).exists() for f in (SAFETENSORS, SAFETENSORS_INDEX)):
    folder = Path(
      huggingface_hub.snapshot_download(
        **kw, allow_patterns=["config.json", "pytorch_model*.bin", TORCH_BIN_INDEX]
      )
    )
  return folder


def read_state_dict(folder: str | Path) -> dict[str, np.ndarray]:
  """All tensors of the checkpoint in ``folder``, by Hugging Face name, as numpy arrays.

  Looks for, in order: ``model.safetensors``, ``model.safetensors.index.json`` (shards),
  ``pytorch_model.bin``, ``pytorch_model.bin.index.json`` (the last two need torch).
  """
  folder = Path(folder)
  if (folder / SAFETENSORS).exists():
    return read_safetensors_file(folder / SAFETENSORS)
  if (folder / SAFETENSORS_INDEX).exists():
    return _read_sharded(folder, SAFETENSORS_INDEX, read_safetensors_file)
  if (folder / TORCH_BIN).exists():
    return read_torch_file(folder / TORCH_BIN)
  if (folder / TORCH_BIN_INDEX).exists():
    return _read_sharded(folder, TORCH_BIN_INDEX, read_torch_file)
  present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
  raise FileNotFoundError(
    f"no checkpoint in {str(folder)!r}: expected one of {list(_WEIGHT_FILES)}; found {present}"
  )


def _read_sharded(folder: Path, index_name: str, read) -> dict[str, np.ndarray]:
  weight_map = json.loads((folder / index_name).read_text())["weight_map"]
  out = {}
  for shard in sorted(set(weight_map.values())):
    out.update(read(folder / shard))
  return out


def read_safetensors_file(path: Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  try:
    return load_file(path)
  except TypeError:  # numpy has no bfloat16 / float8: read the raw buffers with ml_dtypes.
    return _read_safetensors_raw(path)


_RAW_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _read_safetensors_raw(path: Path) -> dict[str, np.ndarray]:
  import ml_dtypes

  data = path.read_bytes()
  (header_len,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8 : 8 + header_len])
  header.pop("__metadata__", None)
  out = {}
  for name, info in header.items():
    code = info["dtype"]
    dtype = getattr(ml_dtypes, _RAW_DTYPES[code]) if code in _RAW_DTYPES else _np_dtype(code)
    start, end = (8 + header_len + o for o in info["data_offsets"])
    out[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"])
  return out


def _np_dtype(code: str) -> np.dtype:
  kind = {"F": "f", "I": "i", "U": "u"}[code[0]] if code != "BOOL" else "b"
  return np.dtype(f"<{kind}{int(code[1:]) // 8}") if kind != "b" else np.dtype(bool)


def read_torch_file(path: Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"{str(path)!r} is a PyTorch checkpoint and reading it needs torch, which is not "
      "installed: `pip install torch` (CPU is enough), or convert it to model.safetensors"
    ) from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {
    name: (t.float() if t.dtype == torch.bfloat16 else t).detach().numpy()
    for name, t in state.items()
  }


# ---------------------------------------------------------------------------------------------
# Model + checkpoint.


def _describe_shape(path: str, shape: tuple | None) -> str:
  if shape is None:
    return "missing"
  return str(tuple(reversed(shape)) if path.endswith("/kernel") and len(shape) == 2 else shape)


def _is_head(path: str) -> bool:
  return path.split("/", 1)[0] in _HEAD_MODULES


def load_params(
  module: bert.Bert,
  config: Any,
  state_dict: Mapping[str, Any],
  *,
  rng: jax.Array | int = 0,
  param_dtype: Any = jnp.float32,
  source: str = "checkpoint",
) -> dict:
  """Checks a transformers state dict against ``module`` and returns its params.

  Heads (``pooler``, ``classifier``) absent from the checkpoint are initialised from ``rng``
  and reported in one warning; tensors the model does not use, likewise. Any other missing
  tensor or any shape mismatch raises one error listing all of them.
  """
  dummy = jnp.zeros((1, 1), jnp.int32)
  key = jax.random.key(rng) if isinstance(rng, int) else rng
  expected = jax.eval_shape(module.init, key, dummy)["params"]
  expected = traverse_util.flatten_dict(expected, sep="/")

  loaded, names = {}, {}
  for name, array in state_dict.items():
    path = hf_name_to_path(name, config)
    if path is not None:
      loaded[path] = _to_flax_layout(path, np.asarray(array))
      names[path] = name

  base = _BASE_PREFIX[_model_type(config)] + "."
  prefix = base if any(n.startswith(base) for n in names.values()) else ""
  unused = sorted(names[p] for p in loaded if p not in expected)
  missing = [p for p in expected if p not in loaded]
  problems = [
    f"  {names[p]} ({p}): expected {_describe_shape(p, s.shape)}, "
    f"got {_describe_shape(p, loaded[p].shape)}"
    for p, s in expected.items()
    if p in loaded and loaded[p].shape != s.shape
  ]
  problems += [
    f"  {path_to_hf_name(p, config, prefix)} ({p}): "
    f"expected {_describe_shape(p, expected[p].shape)}, missing"
    for p in missing
    if not _is_head(p)
  ]
  model_name = f"{module.config.model_type} (task={module.task!r})"
  if problems:
    raise ValueError(
      f"{source} does not fit {model_name}; {len(problems)} mismatch(es) "
      "(Hugging Face name (Flax path): expected shape, got shape):\n" + "\n".join(problems)
    )

  params = {p: jnp.asarray(loaded[p], dtype=param_dtype) for p in expected if p in loaded}
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


def _init_subset(module: bert.Bert, key: jax.Array, dummy: jax.Array, paths: list[str]) -> dict:
  def init(key):
    flat = traverse_util.flatten_dict(module.init(key, dummy)["params"], sep="/")
    return {p: flat[p] for p in paths}

  # jit so that XLA drops everything init computes but these few leaves: no full random model
  # is ever allocated beside the loaded one.
  return jax.jit(init)(key)


def from_config(
  config: Any,
  task: str = "base",
  num_labels: int | None = None,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  *,
  rng: jax.Array | int = 0,
  remat: bool = False,
  attention_implementation: str | None = None,
) -> tuple[bert.Bert, dict]:
  """A new Flax BERT/RoBERTa module and randomly initialised variables for a config.

  Transformers' ``AutoModel.from_config``: no checkpoint is read (train it "from scratch").
  Weights are initialised as :func:`from_pretrained` initialises heads a checkpoint lacks.

  Args:
    config: a transformers ``BertConfig`` / ``RobertaConfig`` (e.g.
      ``AutoConfig.from_pretrained("path/to/config.json")``); not modified.
    task: ``"base"`` or ``"sequence-classification"``.
    num_labels: set on a copy of the config (``1`` means regression).
    dtype: compute dtype.
    param_dtype: parameter dtype.
    rng: key or seed of the initialisation.
    remat: rematerialise each layer.
    attention_implementation: ``None``, ``"xla"`` or ``"cudnn"``.

  Returns:
    ``(module, {"params": params})``.

  Raises:
    ValueError: unsupported ``model_type``, ``hidden_act`` or ``task``.

  Example:
    >>> import transformers
    >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
    ...                               num_attention_heads=2, intermediate_size=16)
    >>> module, variables = from_config(cfg, "sequence-classification", num_labels=3, rng=0)
    >>> ids = jnp.ones((2, 4), jnp.int32)
    >>> module.apply(variables, ids).shape, cfg.num_labels  # the caller's config is unchanged
    ((2, 3), 2)
  """
  if num_labels is not None:
    config = copy.deepcopy(config)
    config.num_labels = num_labels
  module = bert.auto_model(
    config,
    task,
    dtype=dtype,
    param_dtype=param_dtype,
    remat=remat,
    attention_implementation=attention_implementation,
  )
  key = jax.random.key(rng) if isinstance(rng, int) else rng
  variables = jax.jit(module.init)(key, jnp.zeros((1, 1), jnp.int32))
  return module, {"params": variables["params"]}


def from_pretrained(
  name_or_path: str | Path,
  task: str = "base",
  num_labels: int | None = None,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  *,
  rng: jax.Array | int = 0,
  remat: bool = False,
  attention_implementation: str | None = None,
  revision: str | None = None,
  cache_dir: str | None = None,
  **config_overrides: Any,
) -> tuple[bert.Bert, dict]:
  """A Flax BERT/RoBERTa module and its variables from a Hugging Face checkpoint.

  Args:
    name_or_path: a local model folder, or a Hub repo id (``"FacebookAI/roberta-base"``),
      downloaded with ``huggingface_hub.snapshot_download``.
    task: ``"base"`` or ``"sequence-classification"``.
    num_labels: set on the config (``1`` means regression).
    dtype: compute dtype.
    param_dtype: parameter dtype the checkpoint is cast to.
    rng: key or seed for heads the checkpoint lacks.
    remat: rematerialise each layer.
    attention_implementation: ``None``, ``"xla"`` or ``"cudnn"``.
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
    >>> from lora_jax.models import auto_model
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
  config = transformers.AutoConfig.from_pretrained(folder, **config_overrides)
  if num_labels is not None:
    config.num_labels = num_labels
  module = bert.auto_model(
    config,
    task,
    dtype=dtype,
    param_dtype=param_dtype,
    remat=remat,
    attention_implementation=attention_implementation,
  )
  params = load_params(
    module,
    config,
    read_state_dict(folder),
    rng=rng,
    param_dtype=param_dtype,
    source=f"the checkpoint at {str(name_or_path)!r}",
  )
  return module, {"params": params}
