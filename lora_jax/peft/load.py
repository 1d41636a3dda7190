"""Importing a PEFT LoRA adapter folder (or Hub repo) into a Flax params tree."""

from __future__ import annotations

import collections
import logging
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax._src import paths
from lora_jax._src import stacking
from lora_jax._src.adapters import check_fits
from lora_jax._src.adapters import insert
from lora_jax._src.files import read_safetensors
from lora_jax._src.files import read_torch_file
from lora_jax._src.paths import flatten
from lora_jax._src.paths import module_of
from lora_jax._src.spec import LORA_A
from lora_jax._src.spec import LORA_B
from lora_jax._src.spec import LORA_MAGNITUDE
from lora_jax._src.spec import LoraSpec
from lora_jax.nnx import tree as nnx_tree
from lora_jax.peft.config import CONFIG_NAME
from lora_jax.peft.config import KEY_PREFIX
from lora_jax.peft.config import TIED_OUTPUT
from lora_jax.peft.config import TORCH_WEIGHTS_NAME
from lora_jax.peft.config import WEIGHTS_NAME
from lora_jax.peft.config import check_supported
from lora_jax.peft.config import pattern_value
from lora_jax.peft.config import read_config
from lora_jax.peft.names import names_for
from lora_jax.peft.names import stacked_layers

logger = logging.getLogger(__name__)

_LORA_KEY = re.compile(
  r"(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
  r"(?:\.(?P<adapter>[^.]+))??(?P<suffix>\.weight)?"
)


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


def _read_weights(folder: Path) -> dict[str, np.ndarray]:
  if (folder / WEIGHTS_NAME).exists():
    return read_safetensors(folder / WEIGHTS_NAME)
  if (folder / TORCH_WEIGHTS_NAME).exists():
    try:
      return read_torch_file(folder / TORCH_WEIGHTS_NAME)
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
    else:  # a module's own weights: modules_to_save, or an embedding's base_layer (PEFT saves
      # the embedding layers it adapts, for a resized vocabulary)
      name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
      others[re.sub(r"\.base_layer\.", ".", name)] = array
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


def _without_tied_output_weight(others: dict, config: Any) -> dict:
  """``others`` without the tied output layer's saved base weight (PEFT saves it beside the
  embedding's when it adapts a tied embedding): the model's output layer is its embedding."""
  if not getattr(config, "tie_word_embeddings", False):
    return others
  return {k: v for k, v in others.items() if k != f"{TIED_OUTPUT}.weight"}


def _without_tied_output(factors: dict, cfg: Mapping, config: Any, source: str) -> dict:
  """``factors`` without a tied output layer's (:data:`TIED_OUTPUT`), which PEFT saves beside
  the embedding's with ``ensure_weight_tying``: lora_jax's tied embedding carries one adapter
  for both uses. Refused in one line when they are not the embedding's factors; a warning when
  PEFT would apply the embedding's adapter to the input only (no ``ensure_weight_tying``)."""
  if not getattr(config, "tie_word_embeddings", False):
    return factors
  if TIED_OUTPUT not in factors:
    if (
      cfg.get("task_type") == "CAUSAL_LM"
      and not cfg.get("ensure_weight_tying")
      and any("lora_embedding_A" in k for k in factors.values())
    ):
      warnings.warn(
        f"{source} adapts the tied embedding without ensure_weight_tying: PEFT applies it to "
        "the input embedding only, lora_jax to the output layer too, so the logits differ "
        "from PEFT's",
        stacklevel=3,
      )
    return factors
  out = factors[TIED_OUTPUT]
  embedded = [k for k in factors.values() if "lora_embedding_A" in k]
  if (
    len(embedded) != 1
    or "lora_A" not in out
    or not np.array_equal(out["lora_A"], embedded[0]["lora_embedding_B"].T)
    or not np.array_equal(out["lora_B"], embedded[0]["lora_embedding_A"].T)
  ):
    raise ValueError(
      f"{source}: the tied output layer {TIED_OUTPUT!r} has an adapter of its own, not the "
      "embedding's; lora_jax's tied embedding carries one adapter for its input and output uses"
    )
  return {k: v for k, v in factors.items() if k != TIED_OUTPUT}


def _stacked_in(flat: Mapping[str, Any], modules: list[str]) -> tuple[str, str] | None:
  """``(module, container)`` where a per-layer module path (``.../layers/3/q_proj``) is missing
  but the tree has it without the layer index (``.../layers/q_proj``): scanned layers."""
  weights = {module_of(p) for p in flat}
  for module in modules:
    parts = module.split("/")
    for i, part in enumerate(parts):
      if part.isdigit() and module not in weights:
        if "/".join(parts[:i] + parts[i + 1 :]) in weights:
          return module, "/".join(parts[:i])
  return None


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
  if nnx_tree.is_model(params):  # NNX: the model itself, updated in place
    kwargs = dict(config=config, revision=revision, ignore_mismatched_sizes=ignore_mismatched_sizes)
    return nnx_tree.sync(
      params, import_peft(directory_or_hub_id, nnx_tree.to_variables(params), **kwargs)
    )
  folder = _resolve_folder(directory_or_hub_id, revision)
  source = repr(str(directory_or_hub_id))
  cfg = read_config(folder)
  check_supported(cfg, source)
  tensors = _read_weights(folder)
  factors, others = _split_keys(tensors, source)
  factors = _without_tied_output(factors, cfg, config, source)
  others = _without_tied_output_weight(others, config)

  tree, rebuild = paths.split_params(params)
  names = names_for(config, tree)
  container = stacked_layers(tree, names)
  if container is not None:
    tree = stacking.unstack_layers(tree, container)
  flat = flatten(tree)
  r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
  rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
  rule = f"peft target_modules={cfg.get('target_modules')!r}"

  new, specs, records, problems = {}, {}, [], []
  use_dora = bool(cfg.get("use_dora"))
  for name, kinds in sorted(factors.items()):
    module = paths.join(paths.PARAMS, names.module_path(name))
    if "lora_A" in kinds:
      weight, a, b = "kernel", kinds["lora_A"].T, kinds["lora_B"].T
    else:
      weight, a, b = "embedding", kinds["lora_embedding_A"].T, kinds["lora_embedding_B"].T
    rank = pattern_value(rank_pattern, name, r0)
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
      alpha=float(pattern_value(alpha_pattern, name, alpha0)),
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

  leaves = flatten(names.from_torch(others))
  if ignore_mismatched_sizes:
    leaves = _drop_mismatched(leaves, flat, source)
  try:
    check_fits(
      flat, records, [{"path": p, "shape": np.shape(v)} for p, v in leaves.items()], source
    )
  except ValueError as e:
    if config is not None:
      raise
    stacked = _stacked_in(flat, [r["path"] for r in records])
    if stacked:
      raise ValueError(
        f"{source} names each layer's modules ({stacked[0]!r}, ...), but params hold scanned "
        f"(stacked) layers at {stacked[1]!r}: pass config=<the model's transformers config> "
        "(lora_jax then splits and restacks the layers), or unstack_layers first"
      ) from None
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
