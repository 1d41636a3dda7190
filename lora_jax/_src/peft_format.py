"""PEFT's LoRA adapter folder: export lora_jax adapters to PyTorch, import PEFT adapters.

A PEFT LoRA adapter folder (as PEFT 0.21's ``PeftModel.save_pretrained`` writes it) holds:

* ``adapter_config.json``: every ``LoraConfig`` field, keys sorted, ``peft_type: "LORA"``;
* ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``), keys without adapter name:

  ===================================================  ==============  ============
  key                                                  shape           lora_jax
  ===================================================  ==============  ============
  ``base_model.model.<module>.lora_A.weight``          ``(r, in)``     ``A.T``
  ``base_model.model.<module>.lora_B.weight``          ``(out, r)``    ``B.T``
  ``base_model.model.<module>.lora_embedding_A``       ``(r, vocab)``  ``A.T``
  ``base_model.model.<module>.lora_embedding_B``       ``(dim, r)``    ``B.T``
  ``base_model.model.<module>.lora_magnitude_vector``  ``(out,)``      DoRA's ``m``
  ``base_model.model.<parameter>``                     as torch's      extra leaf
  ===================================================  ==============  ============

  The last row holds ``modules_to_save`` (e.g. a trained ``classifier``) under transformers'
  own parameter names and layouts.

``<module>`` is the transformers module name of the adapted Flax module. With ``config`` (a
transformers config) names and layouts come from the model family's mapping in
:mod:`lora_jax.models.loading`; without it, the Flax path with ``/`` -> ``.`` (minus the
leading ``params``) and Flax leaf names and layouts, which round-trips but only suits PyTorch
models named like the Flax one.

PEFT has one rank, alpha and rsLoRA flag per adapter; per-module ranks and alphas that differ
from the most common one go to ``rank_pattern`` / ``alpha_pattern``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax._src import paths
from lora_jax._src import stacking
from lora_jax._src import svd_init
from lora_jax._src.adapter_io import check_fits
from lora_jax._src.adapter_io import flatten
from lora_jax._src.adapter_io import insert
from lora_jax._src.adapter_io import module_of
from lora_jax._src.adapter_io import nest
from lora_jax._src.finite import check_finite
from lora_jax._src.partition import compile_patterns
from lora_jax._src.partition import is_trainable
from lora_jax._src.partition import trainable_mask
from lora_jax._src.spec import ADAPTER_LEAVES
from lora_jax._src.spec import LORA_A
from lora_jax._src.spec import LORA_B
from lora_jax._src.spec import LORA_MAGNITUDE
from lora_jax._src.spec import LORA_SPEC
from lora_jax._src.spec import WEIGHT_NAMES
from lora_jax._src.spec import LoraSpec

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TORCH_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"  # the PEFT release whose file format this module writes
TASK_TYPES = (
  None,
  "SEQ_CLS",
  "SEQ_2_SEQ_LM",
  "CAUSAL_LM",
  "TOKEN_CLS",
  "QUESTION_ANS",
  "FEATURE_EXTRACTION",
)

# ``LoraConfig().to_dict()`` of PEFT 0.21.2, as ``save_pretrained`` writes it (inference mode).
_PEFT_DEFAULTS: dict[str, Any] = {
  "alora_invocation_tokens": None,
  "alpha_pattern": {},
  "arrow_config": None,
  "auto_mapping": None,
  "base_model_name_or_path": None,
  "bias": "none",
  "corda_config": None,
  "ensure_weight_tying": False,
  "eva_config": None,
  "exclude_modules": None,
  "fan_in_fan_out": False,
  "inference_mode": True,
  "init_lora_weights": True,
  "kasa_config": None,
  "layer_replication": None,
  "layers_pattern": None,
  "layers_to_transform": None,
  "loftq_config": {},
  "lora_alpha": 8,
  "lora_bias": False,
  "lora_dropout": 0.0,
  "lora_ga_config": None,
  "megatron_config": None,
  "megatron_core": "megatron.core",
  "modules_to_save": None,
  "monteclora_config": None,
  "peft_type": "LORA",
  "peft_version": PEFT_VERSION,
  "qalora_group_size": 16,
  "r": 8,
  "rank_pattern": {},
  "revision": None,
  "target_modules": None,
  "target_parameters": None,
  "task_type": None,
  "trainable_token_indices": None,
  "use_bdlora": None,
  "use_dora": False,
  "use_qalora": False,
  "use_rslora": False,
  "velora_config": None,
}

# Options lora_jax cannot reproduce: key -> (what it is, the values lora_jax accepts).
_UNSUPPORTED: dict[str, tuple[str, tuple]] = {
  "bias": ("trained biases", ("none", None)),
  "lora_bias": ("a bias on lora_B", (False, None)),
  "fan_in_fan_out": ("transposed (Conv1D) base weights", (False, None)),
  "layer_replication": ("layer replication", (None, [])),
  "trainable_token_indices": ("trainable tokens", (None, [], {})),
  "target_parameters": ("adapters on bare nn.Parameters", (None, [])),
  "use_qalora": ("QALoRA", (False, None)),
  "alora_invocation_tokens": ("activated LoRA", (None, [])),
  "use_bdlora": ("block-diagonal LoRA", (None, False, {})),
  "arrow_config": ("Arrow routing", (None, {})),
  "kasa_config": ("KaSA", (None, {})),
  "monteclora_config": ("MonteCLoRA", (None, {})),
  "velora_config": ("VeLoRA", (None, {})),
  "megatron_config": ("Megatron layers", (None, {})),
}
# ``init_lora_weights`` values that leave the base weights as they are; the others (PiSSA,
# CorDA, OLoRA, LoftQ, LoRA-GA) rewrite them, so the adapter only fits the rewritten base.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")

_LORA_KEY = re.compile(
  r"(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
  r"(?:\.(?P<adapter>[^.]+))??(?P<suffix>\.weight)?"
)


# ---------------------------------------------------------------------------------------------
# Files.


def write_safetensors(tensors: Mapping[str, Any], path, metadata: Mapping[str, str]) -> None:
  """Writes numpy-convertible ``tensors`` to ``path`` (bfloat16 included)."""
  from safetensors.numpy import save_file

  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata=dict(metadata))


def read_safetensors(path) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file; a damaged file raises a ``ValueError`` naming it."""
  from lora_jax.models import loading

  try:
    return loading.read_safetensors_file(Path(path))
  except Exception as e:  # safetensors raises SafetensorError, OSError, ValueError, ...
    size = os.path.getsize(path) if os.path.exists(path) else None
    raise ValueError(
      f"{str(path)!r} ({size} bytes) is not a readable safetensors file; it is probably "
      f"truncated or corrupted (re-download or re-export it): {type(e).__name__}: {e}"
    ) from None


def publish(directory, write: Callable[[Path], None]) -> Path:
  """Runs ``write(tmp)`` into a fresh sibling of ``directory``, then moves each file in.

  Every file appears complete or not at all (``os.replace``); a failed ``write`` leaves
  ``directory`` as it was.
  """
  directory = Path(directory).expanduser()
  if directory.exists() and not directory.is_dir():
    raise NotADirectoryError(f"cannot export to {str(directory)!r}: it is a file")
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
  try:
    write(tmp)
    directory.mkdir(exist_ok=True)
    files = [Path(root) / name for root, _, names in os.walk(tmp) for name in names]
    # Configs last: a reader that finds the new config also finds the new weights.
    for src in sorted(files, key=lambda f: (f.name in (CONFIG_NAME, "config.json"), str(f))):
      dst = directory / src.relative_to(tmp)
      dst.parent.mkdir(parents=True, exist_ok=True)
      os.replace(src, dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return directory


# ---------------------------------------------------------------------------------------------
# Names.


class _Names:
  """Flax paths (``params/...``) <-> names in a PyTorch model (see the module docstring)."""

  def __init__(self, config: Any, tree: Mapping):
    self.config = config
    if config is not None:
      from lora_jax.models import loading

      self.loading = loading
      self.prefix = loading.default_prefix(tree, config)

  def module(self, path: str) -> str:
    rel = path.removeprefix(paths.PARAMS + "/")
    if self.config is None:
      return rel.replace("/", ".")
    return self.loading.hf_module_name(rel, self.config, self.prefix)

  def module_path(self, name: str) -> str:
    if self.config is None:
      return paths.join(paths.PARAMS, name.replace(".", "/"))
    return paths.join(paths.PARAMS, self.loading.hf_module_to_path(name, self.config))

  def to_torch(self, leaves: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flat ``{params/...: leaf}`` -> ``{torch name: array}`` (transposing Linear kernels)."""
    if self.config is None:
      return {self.module(p): np.asarray(v) for p, v in leaves.items()}
    return self.loading.flax_to_hf(nest(leaves), self.config, prefix=self.prefix)

  def from_torch(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if self.config is None:
      return {self.module_path(k): v for k, v in tensors.items()}
    return flatten(self.loading.hf_to_flax(tensors, self.config))


def _per_layer(tree: Mapping, config: Any) -> Mapping:
  """``tree`` with scanned layers split per layer (PEFT names each layer's modules)."""
  if config is not None:
    from lora_jax.models import loading

    return loading.per_layer(tree, config)
  stacked = sorted(module_of(p) for p, v in flatten(tree).items() if _stacked_spec(v))
  if stacked:
    raise ValueError(
      f"the adapters at {stacked[:5]} are stacked (scanned layers); PEFT names each layer's "
      "modules, so pass config= (the model's transformers config) or unstack_layers first"
    )
  return tree


def _stacked_spec(value) -> bool:
  return isinstance(value, LoraSpec) and value.stacked > 0


def _dotless(tree_flat: Mapping[str, Any]) -> None:
  dotted = [p for p in tree_flat if "." in p]
  if dotted:
    raise ValueError(
      f"parameter paths {dotted[:5]} contain '.', which PEFT uses as its separator; pass "
      "config= (a transformers config) to name them, or rename the modules"
    )


# ---------------------------------------------------------------------------------------------
# Export.


def _most_common(values) -> Any:
  counts = collections.Counter(values)
  return max(counts, key=lambda v: (counts[v], -float(v)))


def _number(x: float) -> int | float:
  return int(x) if float(x).is_integer() else float(x)


def _patterns(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
  """``rank_pattern``-style overrides: a module's last name where its whole group agrees.

  PEFT matches a key ``k`` against a module name with ``re.match(rf"(.*\\.)?({k})$", name)``.
  """
  groups: dict[str, list[str]] = collections.defaultdict(list)
  for name in values:
    groups[name.rsplit(".", 1)[-1]].append(name)
  out = {}
  for short, names in sorted(groups.items()):
    distinct = {values[n] for n in names}
    if distinct == {default}:
      continue
    if len(distinct) == 1:
      out[re.escape(short)] = _number(values[names[0]])
    else:
      out.update({re.escape(n): _number(values[n]) for n in sorted(names) if values[n] != default})
  return out


def _target_modules(adapted: list[str], candidates: list[str]) -> list[str]:
  """Short module names (``["query", "value"]``) if they pick exactly the adapted modules."""
  short = {n.rsplit(".", 1)[-1] for n in adapted}
  picked = {c for c in candidates if c.rsplit(".", 1)[-1] in short}
  return sorted(short) if picked == set(adapted) else sorted(adapted)


def _named(module: str, what: str) -> str:
  if module == paths.PARAMS:
    raise ValueError(
      f"{what!r} sits at the root of the parameter tree, so it has no module name for PEFT's "
      "files; wrap the model in a named module (or use save_adapter)"
    )
  return module


def _modules_to_save(flat: Mapping[str, Any], extra: list[str], adapted: set[str]) -> list[str]:
  """PEFT ``modules_to_save`` for the ``extra`` leaves: the largest modules all of whose leaves
  are saved (``classifier`` rather than its parts), else the leaf's own module (PEFT copies its
  unsaved leaves from the base model, as lora_jax keeps them frozen)."""

  def within(path: str, module: str) -> bool:
    return path == module or path.startswith(module + "/")

  saved = set(extra)
  chosen = set()
  for leaf in extra:
    parts = module_of(leaf).split("/")
    for n in range(2, len(parts) + 1):  # from the top, skipping the bare "params" root
      module = "/".join(parts[:n])
      inside = [p for p in flat if within(p, module)]
      if all(p in saved for p in inside) and not any(within(m, module) for m in adapted):
        chosen.add(module)
        break
    else:
      chosen.add(_named(module_of(leaf), leaf))
  return sorted(m for m in chosen if not any(m != o and within(m, o) for o in chosen))


def _relative_to_original(flat: dict, specs: dict, initial, config):
  """``flat`` and ``specs`` with every adapter replaced by its rank-2r equivalent on the
  original weights, ``[A, A0]``, ``[B; -B0]`` (see :func:`svd_init.relative_to_original`)."""
  flat0 = flatten(_per_layer(paths.split_params(initial)[0], config))
  specs0 = {module_of(p): v for p, v in flat0.items() if isinstance(v, LoraSpec)}
  problems = []
  if not specs0:
    problems.append("initial= carries no adapters (pass the tree lora_init returned, not the base)")
  missing, unexpected = sorted(specs.keys() - specs0.keys()), sorted(specs0.keys() - specs.keys())
  if specs0 and missing:
    problems.append(f"initial= has no adapter at {missing[:5]}")
  if specs0 and unexpected:
    problems.append(f"initial= has adapters that params lack at {unexpected[:5]}")
  for module in sorted(specs.keys() & specs0.keys()):
    spec, spec0 = specs[module], specs0[module]
    if getattr(spec, "use_dora", False):
      problems.append(f"{module}: a DoRA adapter has no rank-2r plain LoRA equivalent")
      continue
    if spec != spec0:
      fields = [
        f.name for f in dataclasses.fields(spec) if getattr(spec, f.name) != getattr(spec0, f.name)
      ]
      problems.append(f"{module}: its LoraSpec differs in {fields}")
      continue
    for leaf in (LORA_A, LORA_B):
      got, want = np.shape(flat[f"{module}/{leaf}"]), np.shape(flat0[f"{module}/{leaf}"])
      if got != want:
        problems.append(f"{module}/{leaf}: shape {want} in initial=, {got} in params")
    w, w0 = flat.get(f"{module}/{spec.weight}"), flat0.get(f"{module}/{spec.weight}")
    if w is not w0 and (np.shape(w) != np.shape(w0) or not bool(jnp.array_equal(w, w0))):
      problems.append(
        f"{module}/{spec.weight} differs from initial='s: initial= must come from the same "
        "lora_init call as params (the base weight never trains)"
      )
  if problems:
    raise ValueError(
      "initial= does not match params, so A0 and B0 cannot be taken from it: "
      + "; ".join(problems[:5])
    )
  flat, plain = dict(flat), {}
  for module, spec in specs.items():
    a, b = f"{module}/{LORA_A}", f"{module}/{LORA_B}"
    plain[module], flat[a], flat[b] = svd_init.relative_to_original(
      spec, flat[a], flat[b], flat0[a], flat0[b]
    )
    flat[f"{module}/{LORA_SPEC}"] = plain[module]
  return flat, plain


def export_peft(
  directory,
  params,
  *,
  base_model_name_or_path: str,
  config: Any = None,
  task_type: str | None = "SEQ_CLS",
  extra_trainable=(),
  initial: Any = None,
) -> Path:
  """Writes ``params``' adapters as a PEFT LoRA adapter folder that PyTorch can load.

  ``peft.PeftModel.from_pretrained(torch_model, directory)`` then reproduces lora_jax's
  outputs. Linear (2-D ``kernel``, DoRA included) and embedding adapters are supported; leaves
  matching ``extra_trainable`` (e.g. ``["classifier"]``) are saved as PEFT ``modules_to_save``.

  Args:
    directory: the folder to write ``adapter_config.json`` and ``adapter_model.safetensors``
      to (created if needed; other files in it are left alone).
    params: variables dict or bare params tree with adapters from :func:`lora_init`.
    base_model_name_or_path: the base model's Hub id or path, recorded in the config.
    config: the base model's transformers config, for transformers' module names (see the
      module docstring); ``None`` uses the Flax names.
    task_type: PEFT's ``task_type``, one of ``"SEQ_CLS"``, ``"SEQ_2_SEQ_LM"``,
      ``"CAUSAL_LM"``, ``"TOKEN_CLS"``, ``"QUESTION_ANS"``, ``"FEATURE_EXTRACTION"`` or ``None``.
    extra_trainable: regexes of further leaves to save, as in :func:`trainable_mask`.
    initial: the tree :func:`lora_init` returned, before training. Needed for adapters made
      with ``init="pissa"``, ``"pissa_niter_K"`` or ``"olora"``, whose base weight is a
      residual: each adapter is then written as the rank-``2r`` plain LoRA ``[A, A0]``,
      ``[B; -B0]`` (``alpha`` doubled, or times ``sqrt(2)`` with rsLoRA, so the scale stays)
      that gives the trained model on the *original* weights, as PEFT's ``save_pretrained(...,
      path_initial_model_for_weight_conversion=...)`` does.

  Returns:
    ``directory`` as a ``pathlib.Path``.

  Raises:
    ValueError: no adapters; an adapter PEFT cannot express (more than two weight axes, mixed
      rsLoRA); an extra leaf inside an adapted module; an unknown ``task_type``; a PiSSA or
      OLoRA adapter without ``initial``; an ``initial`` whose adapters, shapes or base weights
      differ from ``params``'.
    FloatingPointError: an adapter or extra leaf holds NaN or inf (nothing is written).

  Example:
    >>> import json, tempfile, flax.linen as nn, jax, jax.numpy as jnp
    >>> from lora_jax import LoraRule, export_peft, import_peft, lora_init
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(2, name="head")(nn.Dense(4, name="query")(x))
    >>> base = Net().init(jax.random.key(0), jnp.ones((1, 3)))
    >>> params = lora_init(base, LoraRule(["query"], rank=2), rng=jax.random.key(1))
    >>> folder = export_peft(tempfile.mkdtemp(), params, base_model_name_or_path="net",
    ...                      extra_trainable=["head"])
    >>> cfg = json.load(open(folder / "adapter_config.json"))
    >>> cfg["r"], cfg["target_modules"], cfg["modules_to_save"]
    (2, ['query'], ['head'])
    >>> sorted(import_peft(folder, base)["params"]["query"])
    ['bias', 'kernel', 'lora_a', 'lora_b', 'lora_spec']
  """
  if task_type not in TASK_TYPES:
    raise ValueError(f"export_peft task_type={task_type!r} is not one of {list(TASK_TYPES)}")
  tree = _per_layer(paths.split_params(params)[0], config)
  if isinstance(extra_trainable, str):
    extra_trainable = (extra_trainable,)
  trainable_mask({paths.PARAMS: tree}, extra_trainable)  # every pattern must match a leaf
  extra_re = compile_patterns(extra_trainable)
  flat = flatten(tree)
  if config is None:
    _dotless(flat)
  names = _Names(config, tree)

  specs = {module_of(p): v for p, v in flat.items() if isinstance(v, LoraSpec)}
  if not specs:
    raise ValueError(
      "params carry no LoRA adapters, nothing to export; call lora_init(params, rules, rng=...)"
    )
  if initial is not None:
    flat, specs = _relative_to_original(flat, specs, initial, config)
  rewritten = sorted(m for m, s in specs.items() if svd_init.is_svd_init(s.init))
  if rewritten:
    raise ValueError(
      f"the adapters at {rewritten[:3]} were initialised with init="
      f"{specs[rewritten[0]].init!r}, which replaced their base weights by the residual "
      "W - s*A0@B0, so they fit only that residual, not the original model PEFT loads them on; "
      "pass initial=<the tree lora_init returned, before training> to export them as rank-2r "
      "LoRA relative to the original weights"
    )
  extra = [
    p
    for p, v in flat.items()
    if not isinstance(v, LoraSpec)
    and p.rsplit("/", 1)[-1] not in ADAPTER_LEAVES
    and is_trainable(p, extra_re)
  ]
  for p in extra:
    if module_of(p) in specs:
      raise ValueError(
        f"extra_trainable leaf {p!r} belongs to the adapted module {module_of(p)!r}: PEFT cannot "
        "save a LoRA target's own weights (bias='lora_only' is not supported); leave it out of "
        "extra_trainable or merge the adapter first"
      )

  check_finite(
    {p: v for p, v in flat.items() if p.rsplit("/", 1)[-1] in ADAPTER_LEAVES or p in extra},
    f"export the adapter to {directory}",
  )
  tensors: dict[str, np.ndarray] = {}
  ranks, alphas, dropouts, rslora = {}, {}, {}, set()
  dora = set()
  for module, spec in specs.items():
    if spec.in_axes != (0,) or spec.out_axes != (1,):
      raise ValueError(
        f"the adapter at {module!r} factors a weight with in_axes={spec.in_axes}, "
        f"out_axes={spec.out_axes}; PEFT's format holds 2-D Linear and Embedding adapters "
        "only (in_axes=(0,), out_axes=(1,)): merge it (lora_jax.merge) or use save_adapter"
      )
    name = names.module(_named(module, module))
    a = np.asarray(flat[f"{module}/{LORA_A}"])
    b = np.asarray(flat[f"{module}/{LORA_B}"])
    if spec.weight == "embedding":
      tensors[f"{KEY_PREFIX}{name}.lora_embedding_A"] = a.T
      tensors[f"{KEY_PREFIX}{name}.lora_embedding_B"] = b.T
    else:
      tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = a.T
      tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = b.T
    if spec.use_dora:  # PEFT's key has no ".weight" (its checkpoint format predates DoraLayer)
      magnitude = np.asarray(flat[f"{module}/{LORA_MAGNITUDE}"])
      tensors[f"{KEY_PREFIX}{name}.lora_magnitude_vector"] = magnitude
    dora.add(spec.use_dora)
    ranks[name], alphas[name], dropouts[name] = spec.rank, float(spec.alpha), spec.dropout
    rslora.add(spec.rslora)
  if len(rslora) > 1:
    mixed = sorted(n for n, s in specs.items() if s.rslora)
    raise ValueError(
      f"PEFT has one use_rslora flag per adapter, but only some adapters use rsLoRA ({mixed}); "
      "export them separately or use the same rslora setting for all"
    )
  if len(dora) > 1:
    mixed = sorted(n for n, s in specs.items() if s.use_dora)
    raise ValueError(
      f"PEFT has one use_dora flag per adapter, but only some adapters use DoRA ({mixed}); "
      "export them separately or use the same use_dora setting for all"
    )
  for name, array in names.to_torch({p: flat[p] for p in extra}).items():
    tensors[KEY_PREFIX + name] = array

  rank = _most_common(ranks.values())
  alpha = _most_common(alphas.values())
  dropout = _most_common(dropouts.values())
  if len(set(dropouts.values())) > 1:
    warnings.warn(
      f"PEFT has one lora_dropout per adapter; adapters use {sorted(set(dropouts.values()))}, "
      f"exporting lora_dropout={dropout} (dropout only matters for further training)",
      stacklevel=2,
    )
  weighted = sorted({module_of(p) for p in flat if p.rsplit("/", 1)[-1] in WEIGHT_NAMES})
  candidates = [names.module(m) for m in weighted]
  to_save = _modules_to_save(flat, extra, set(specs))
  peft_config = {
    **_PEFT_DEFAULTS,
    "base_model_name_or_path": base_model_name_or_path,
    "task_type": task_type,
    "r": rank,
    "lora_alpha": _number(alpha),
    "lora_dropout": dropout,
    "use_rslora": rslora.pop(),
    "use_dora": dora.pop(),
    "target_modules": _target_modules(list(ranks), candidates),
    "rank_pattern": _patterns(ranks, rank),
    "alpha_pattern": _patterns(alphas, alpha),
    "modules_to_save": [names.module(m) for m in to_save] or None,
  }

  def write(tmp: Path) -> None:
    write_safetensors(tensors, tmp / WEIGHTS_NAME, {"format": "pt"})
    (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True))

  return publish(directory, write)


# ---------------------------------------------------------------------------------------------
# Import.


def _resolve_folder(directory_or_hub_id, revision: str | None) -> Path:
  if Path(directory_or_hub_id).expanduser().is_dir():
    return Path(directory_or_hub_id).expanduser()
  name = str(directory_or_hub_id)
  if name.startswith(("/", ".", "~")) or Path(name).exists() or name.count("/") > 1:
    raise FileNotFoundError(f"{name!r} is not an adapter folder (and not a Hub repo id)")
  import huggingface_hub

  try:
    folder = huggingface_hub.snapshot_download(
      repo_id=name,
      revision=revision,
      allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, TORCH_WEIGHTS_NAME],
    )
  except Exception as e:  # offline, unknown repo, bad revision, no access, ...
    raise FileNotFoundError(
      f"{name!r} is not a local adapter folder, and downloading it as a Hub repo id failed: "
      f"{type(e).__name__}: {e}"
    ) from e
  return Path(folder)


def _read_config(folder: Path) -> dict:
  path = folder / CONFIG_NAME
  if not path.exists():
    found = sorted(p.name for p in folder.iterdir())
    hint = ""
    if any(_is_step_dir(folder / f) for f in found):
      hint = "; it looks like a lora_jax adapter: load it with lora_jax.load_adapter"
    raise FileNotFoundError(
      f"{str(folder)!r} is not a PEFT adapter folder: no {CONFIG_NAME} (found {found[:10]}){hint}"
    )
  try:
    cfg = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{str(path)!r} is not valid JSON ({e}); the file is damaged") from None
  if not isinstance(cfg, dict):
    raise ValueError(f"{str(path)!r} holds {type(cfg).__name__}, not a JSON object")
  return cfg


def _is_step_dir(path: Path) -> bool:
  return path.is_dir() and path.name.isdigit() and (path / "lora_jax").exists()


def _drop_mismatched(leaves: dict, flat: Mapping[str, Any], source: str) -> dict:
  """``leaves`` without those whose base leaf exists with another shape (logged)."""
  mismatched = {
    p: (np.shape(v), np.shape(flat[p]))
    for p, v in leaves.items()
    if p in flat and not isinstance(flat[p], LoraSpec) and np.shape(v) != np.shape(flat[p])
  }
  if mismatched:
    logger.warning(
      "ignore_mismatched_sizes: not loading %d tensor(s) of %s whose shape differs from the "
      "model's; they keep the model's values: %s",
      len(mismatched),
      source,
      ", ".join(f"{p} (saved {a}, model {b})" for p, (a, b) in sorted(mismatched.items())),
    )
  return {p: v for p, v in leaves.items() if p not in mismatched}


def _check_supported(cfg: Mapping, source: str) -> None:
  peft_type = cfg.get("peft_type", "LORA")
  if peft_type != "LORA":
    raise ValueError(
      f"{source} has peft_type={peft_type!r}; import_peft reads LoRA adapters only "
      "(peft_type='LORA')"
    )
  bad = []
  for key, (what, ok) in _UNSUPPORTED.items():
    value = cfg.get(key)
    if not _accepted(value, ok):
      bad.append(f"{key}={value!r} ({what}; supported: {list(ok)})")
  if not _accepted(cfg.get("use_dora"), (False, True, None)):
    bad.append(f"use_dora={cfg.get('use_dora')!r} (DoRA; supported: [False, True, None])")
  init = cfg.get("init_lora_weights", True)
  if not _accepted(init, _PLAIN_INITS):
    bad.append(
      f"init_lora_weights={init!r} (this initialisation rewrites the base weights, so the "
      f"adapter fits only the rewritten base; supported: {list(_PLAIN_INITS)}; PEFT converts "
      "such adapters to plain LoRA with save_pretrained(path_initial_model_for_weight_conversion"
      "=...))"
    )
  if bad:
    raise ValueError(
      f"{source} uses PEFT options that lora_jax cannot reproduce: " + "; ".join(bad)
    )


def _accepted(value: Any, ok: tuple) -> bool:
  """``value in ok``, except that ``0``/``1`` do not pass for ``False``/``True``."""
  return any(value is o if isinstance(o, bool) or o is None else value == o for o in ok)


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
  """PEFT's ``get_pattern_key``: the first key ``k`` with ``(.*\\.)?(k)$`` matching ``name``."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


def _read_weights(folder: Path) -> dict[str, np.ndarray]:
  if (folder / WEIGHTS_NAME).exists():
    return read_safetensors(folder / WEIGHTS_NAME)
  if (folder / TORCH_WEIGHTS_NAME).exists():
    from lora_jax.models import loading

    try:
      return loading.read_torch_file(folder / TORCH_WEIGHTS_NAME)
    except ImportError:
      raise
    except Exception as e:
      raise ValueError(
        f"{str(folder / TORCH_WEIGHTS_NAME)!r} is not a readable PyTorch file; it is probably "
        f"truncated or corrupted: {type(e).__name__}: {e}"
      ) from None
  raise FileNotFoundError(
    f"{str(folder)!r} has {CONFIG_NAME} but no weights: expected {WEIGHTS_NAME} or "
    f"{TORCH_WEIGHTS_NAME}; found {sorted(p.name for p in folder.iterdir())[:10]}"
  )


def _split_keys(tensors: Mapping[str, np.ndarray], source: str):
  """``({module: {kind: array}}, {name: array})``: adapter factors and modules_to_save leaves."""
  factors: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  others, unknown = {}, []
  for key, array in tensors.items():
    name = key.removeprefix(KEY_PREFIX)
    m = _LORA_KEY.fullmatch(name)
    if m and (m["suffix"] is not None) == (m["kind"] in ("lora_A", "lora_B")):
      factors[m["module"]][m["kind"]] = array
    elif "lora_" in name:
      unknown.append(key)
    else:
      others[re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)] = array
  if unknown:
    raise ValueError(
      f"{source} holds tensors lora_jax cannot place (a LoRA variant?): {sorted(unknown)[:10]}"
    )
  for module, kinds in factors.items():
    linear = {"lora_A", "lora_B"} & kinds.keys()
    embed = {"lora_embedding_A", "lora_embedding_B"} & kinds.keys()
    if not (linear == {"lora_A", "lora_B"} and not embed) and not (
      embed == {"lora_embedding_A", "lora_embedding_B"} and not linear
    ):
      raise ValueError(f"{source}: module {module!r} has an incomplete adapter: {sorted(kinds)}")
    if "lora_magnitude_vector" in kinds and embed:
      raise ValueError(
        f"{source}: module {module!r} is a DoRA embedding adapter; lora_jax supports DoRA on "
        "linear layers only"
      )
  return factors, others


def import_peft(
  directory_or_hub_id,
  params,
  *,
  config: Any = None,
  revision: str | None = None,
  ignore_mismatched_sizes: bool = False,
):
  """Returns ``params`` with the LoRA adapter of a PEFT adapter folder (or Hub repo) inserted.

  The reverse of :func:`export_peft`: each ``lora_A``/``lora_B`` (or embedding) pair becomes
  ``lora_a``/``lora_b`` (float32) with a ``lora_spec`` from the adapter's config (``r``,
  ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``, ``lora_dropout``), and
  ``modules_to_save`` tensors replace the matching leaves (cast to their dtype).

  Args:
    directory_or_hub_id: a folder with ``adapter_config.json`` and
      ``adapter_model.safetensors`` (or ``adapter_model.bin``, which needs torch), or a Hub
      repo id, downloaded with ``huggingface_hub.snapshot_download``.
    params: the base model's variables dict or bare params tree, without adapters (or with the
      same set, whose values are replaced); the result has the same form.
    config: the base model's transformers config, to map transformers' names (needed for
      adapters made with PEFT on transformers models); ``None`` reads Flax names.
    revision: Hub revision.
    ignore_mismatched_sizes: keep ``params``' own value for each ``modules_to_save`` tensor
      whose shape differs from it (logged), as transformers' ``ignore_mismatched_sizes`` does
      for heads: e.g. start an RTE run (2 labels) from an MNLI adapter (3-label classifier).
      Adapter factors must fit either way.

  Raises:
    ValueError: a PEFT option lora_jax cannot reproduce (named: ``use_dora``, a ``peft_type``
      other than ``"LORA"``, ``bias`` other than ``"none"``, ...); a damaged weights file;
      ``params`` that do not fit (one message lists every mismatch).
    FileNotFoundError: no adapter folder or files.

  Example:
    >>> import tempfile, flax.linen as nn, jax, jax.numpy as jnp
    >>> from lora_jax import LoraRule, export_peft, import_peft, lora_init
    >>> base = nn.Dense(4, name="dense").init(jax.random.key(0), jnp.ones((1, 3)))
    >>> base = {"params": {"dense": base["params"]}}
    >>> params = lora_init(base, LoraRule(["dense"], rank=2, alpha=8), rng=jax.random.key(1))
    >>> folder = export_peft(tempfile.mkdtemp(), params, base_model_name_or_path="x")
    >>> import_peft(folder, base)["params"]["dense"]["lora_spec"].scale
    4.0
  """
  folder = _resolve_folder(directory_or_hub_id, revision)
  source = repr(str(directory_or_hub_id))
  cfg = _read_config(folder)
  _check_supported(cfg, source)
  tensors = _read_weights(folder)
  factors, others = _split_keys(tensors, source)

  tree, rebuild = paths.split_params(params)
  container = None
  if config is not None:
    from lora_jax.models import loading

    container = loading.stacked_layers(tree, config)
    tree = loading.per_layer(tree, config)
  flat = flatten(tree)
  if config is None:
    _dotless(flat)
  names = _Names(config, tree)
  r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
  rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
  rule = f"peft target_modules={cfg.get('target_modules')!r}"

  new, specs, records, problems = {}, {}, [], []
  use_dora = bool(cfg.get("use_dora"))
  for name, kinds in sorted(factors.items()):
    module = names.module_path(name)
    if "lora_A" in kinds:
      weight, a, b = "kernel", kinds["lora_A"].T, kinds["lora_B"].T
    else:
      weight, a, b = "embedding", kinds["lora_embedding_A"].T, kinds["lora_embedding_B"].T
    rank = _pattern_value(rank_pattern, name, r0)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or a.shape[1] != rank:
      shapes = {k: v.shape for k, v in sorted(kinds.items())}
      problems.append(f"{name}: factors {shapes} do not form a rank-{rank} adapter")
      continue
    magnitude = kinds.get("lora_magnitude_vector")
    if (magnitude is not None) != use_dora:
      problems.append(
        f"{name}: use_dora={use_dora} but lora_magnitude_vector is "
        + ("present" if magnitude is not None else "missing")
      )
      continue
    if magnitude is not None and magnitude.shape != (b.shape[1],):
      problems.append(
        f"{name}: lora_magnitude_vector has shape {magnitude.shape}, the layer {(b.shape[1],)}"
      )
      continue
    specs[module] = LoraSpec(
      rank=int(rank),
      alpha=float(_pattern_value(alpha_pattern, name, alpha0)),
      rslora=bool(cfg.get("use_rslora", False)),
      dropout=float(cfg.get("lora_dropout", 0.0)),
      weight=weight,
      in_axes=(0,),
      out_axes=(1,),
      rule=rule,
      use_dora=use_dora,
    )
    new[f"{module}/{LORA_A}"] = jnp.asarray(a, jnp.float32)
    new[f"{module}/{LORA_B}"] = jnp.asarray(b, jnp.float32)
    if use_dora:
      new[f"{module}/{LORA_MAGNITUDE}"] = jnp.asarray(magnitude, jnp.float32)
    records.append({"path": module, "weight": weight, "weight_shape": (a.shape[0], b.shape[1])})
  if problems:
    raise ValueError(
      f"{source} does not match its own config (r, rank_pattern, use_dora):\n  "
      + "\n  ".join(problems)
    )

  leaves = names.from_torch(others)
  if ignore_mismatched_sizes:
    leaves = _drop_mismatched(leaves, flat, source)
  try:
    check_fits(
      flat, records, [{"path": p, "shape": np.shape(v)} for p, v in leaves.items()], source
    )
  except ValueError as e:
    if config is not None:
      raise
    raise ValueError(
      f"{e}\n(without config=, names were read as Flax paths; for an adapter made with PEFT on "
      "a transformers model, pass config=the model's transformers config)"
    ) from None
  for p, v in leaves.items():
    new[p] = jnp.asarray(v, dtype=flat[p].dtype)
  tree = insert(tree, new, specs)
  if container is not None:  # back into the scanned model's layout
    try:
      tree = stacking.stack_layers(tree, container)
    except ValueError as e:
      raise ValueError(
        f"{source} cannot be loaded into a model with scanned layers: {e}. PEFT adapters that "
        "differ between layers (layers_to_transform, per-layer rank_pattern) need the unscanned "
        "model"
      ) from None
  return rebuild(tree)
