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
:mod:`lora_jax.peft.names`; without it, the Flax path with ``/`` -> ``.`` (minus the
leading ``params``) and Flax leaf names and layouts, which round-trips but only suits PyTorch
models named like the Flax one.

PEFT has one rank, alpha and rsLoRA flag per adapter; per-module ranks and alphas that differ
from the most common one go to ``rank_pattern`` / ``alpha_pattern``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax._src import paths
from lora_jax._src import svd_init
from lora_jax._src.files import publish
from lora_jax._src.files import write_safetensors
from lora_jax._src.finite import check_finite
from lora_jax._src.partition import compile_patterns
from lora_jax._src.partition import is_trainable
from lora_jax._src.partition import trainable_mask
from lora_jax._src.paths import flatten
from lora_jax._src.paths import module_of
from lora_jax._src.paths import nest
from lora_jax._src.spec import ADAPTER_LEAVES
from lora_jax._src.spec import LORA_A
from lora_jax._src.spec import LORA_B
from lora_jax._src.spec import LORA_MAGNITUDE
from lora_jax._src.spec import LORA_SPEC
from lora_jax._src.spec import WEIGHT_NAMES
from lora_jax._src.spec import LoraSpec
from lora_jax.nnx import tree as nnx_tree
from lora_jax.peft.config import CONFIG_NAME
from lora_jax.peft.config import KEY_PREFIX
from lora_jax.peft.config import PEFT_DEFAULTS
from lora_jax.peft.config import TASK_TYPES
from lora_jax.peft.config import TIED_OUTPUT
from lora_jax.peft.config import WEIGHTS_NAME
from lora_jax.peft.config import most_common
from lora_jax.peft.config import number
from lora_jax.peft.config import patterns
from lora_jax.peft.config import target_modules
from lora_jax.peft.names import NameMapping
from lora_jax.peft.names import names_for
from lora_jax.peft.names import per_layer

logger = logging.getLogger(__name__)


def _module_name(names: NameMapping, module: str) -> str:
  return names.module_name(module.removeprefix(paths.PARAMS + "/"))


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


def _relative_to_original(flat: dict, specs: dict, initial, names: NameMapping):
  """``flat`` and ``specs`` with every adapter replaced by its rank-2r equivalent on the
  original weights, ``[A, A0]``, ``[B; -B0]`` (see :func:`svd_init.relative_to_original`)."""
  flat0 = flatten(per_layer(paths.split_params(initial)[0], names))
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
  tree = paths.split_params(nnx_tree.as_variables(params))[0]
  if initial is not None:
    initial = nnx_tree.as_variables(initial)
  names = names_for(config, tree)
  tree = per_layer(tree, names)
  if isinstance(extra_trainable, str):
    extra_trainable = (extra_trainable,)
  trainable_mask({paths.PARAMS: tree}, extra_trainable)  # every pattern must match a leaf
  extra_re = compile_patterns(extra_trainable)
  flat = flatten(tree)

  specs = {module_of(p): v for p, v in flat.items() if isinstance(v, LoraSpec)}
  if not specs:
    raise ValueError(
      "params carry no LoRA adapters, nothing to export; call lora_init(params, rules, rng=...)"
    )
  if initial is not None:
    flat, specs = _relative_to_original(flat, specs, initial, names)
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
    name = _module_name(names, _named(module, module))
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
  # A causal LM's tied embedding is its output layer too, adapter included (the decoder's
  # attend): PEFT adapts transformers' output layer alike when asked to tie the adapters, and
  # saves that layer's factors (the embedding's, transposed) as it does.
  tied_output = None
  embedded = [n for n, s in specs.items() if s.weight == "embedding"]
  if task_type == "CAUSAL_LM" and getattr(config, "tie_word_embeddings", False) and embedded:
    tied_output = TIED_OUTPUT
    name = _module_name(names, _named(embedded[0], embedded[0]))
    tensors[f"{KEY_PREFIX}{tied_output}.lora_A.weight"] = tensors[
      f"{KEY_PREFIX}{name}.lora_embedding_B"
    ].T
    tensors[f"{KEY_PREFIX}{tied_output}.lora_B.weight"] = tensors[
      f"{KEY_PREFIX}{name}.lora_embedding_A"
    ].T
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
  for name, array in names.to_torch(nest({p: flat[p] for p in extra})).items():
    tensors[KEY_PREFIX + name] = array

  rank = most_common(ranks.values())
  alpha = most_common(alphas.values())
  dropout = most_common(dropouts.values())
  if len(set(dropouts.values())) > 1:
    warnings.warn(
      f"PEFT has one lora_dropout per adapter; adapters use {sorted(set(dropouts.values()))}, "
      f"exporting lora_dropout={dropout} (dropout only matters for further training)",
      stacklevel=2,
    )
  weighted = sorted({module_of(p) for p in flat if p.rsplit("/", 1)[-1] in WEIGHT_NAMES})
  candidates = [_module_name(names, m) for m in weighted]
  to_save = _modules_to_save(flat, extra, set(specs))
  peft_config = {
    **PEFT_DEFAULTS,
    "base_model_name_or_path": base_model_name_or_path,
    "task_type": task_type,
    "r": rank,
    "lora_alpha": number(alpha),
    "lora_dropout": dropout,
    "use_rslora": rslora.pop(),
    "use_dora": dora.pop(),
    "target_modules": target_modules(list(ranks), candidates),
    "rank_pattern": patterns(ranks, rank),
    "alpha_pattern": patterns(alphas, alpha),
    "modules_to_save": [_module_name(names, m) for m in to_save] or None,
    "ensure_weight_tying": tied_output is not None,
  }

  def write(tmp: Path) -> None:
    write_safetensors(tensors, tmp / WEIGHTS_NAME, {"format": "pt"})
    (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True))

  return publish(directory, write, last=(CONFIG_NAME,))
