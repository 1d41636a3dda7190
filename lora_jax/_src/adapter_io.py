"""Saving and loading adapters with Orbax: only what trains, and what rebuilds it.

An adapter directory is an Orbax ``CheckpointManager`` directory holding one step::

  <directory>/lora_jax_adapter.json   marks the directory: save_adapter writes only into
                                      marked or empty directories
  <directory>/<n>/adapter/            lora_a, lora_b, lora_magnitude (DoRA) and
                                      extra_trainable leaves (Orbax PyTree, OCDBT), nested
                                      like the params tree they came from
  <directory>/<n>/lora_jax/           JSON: every adapter's LoraSpec (path, rank, alpha,
                                      rslora, dropout, weight, in_axes, out_axes, rule,
                                      stacked, init, use_dora) and
                                      weight shape, each saved leaf's path, shape and dtype,
                                      a CRC-32 of each saved array, the lora_jax version,
                                      extra_trainable and metadata

The frozen base is never written. Each :func:`save_adapter` writes step ``n + 1`` into a
temporary directory that Orbax renames into place once complete, and only then deletes step
``n`` (``max_to_keep=1``): a crash at any moment leaves a complete adapter behind, and
overwriting an adapter is as safe as writing the first one. The next save removes stale
temporaries.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from lora_jax._src import inits
from lora_jax._src import paths
from lora_jax._src.adapters import check_fits
from lora_jax._src.adapters import insert
from lora_jax._src.files import crc32
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
from lora_jax._src.spec import LoraSpec
from lora_jax._src.version import __version__
from lora_jax.nnx import tree as nnx_tree

FORMAT = "lora_jax.adapter"
FORMAT_VERSION = 1
ADAPTER_ITEM = "adapter"
INFO_ITEM = "lora_jax"
MARKER = "lora_jax_adapter.json"
_SPEC_FIELDS = (
  "rank",
  "alpha",
  "rslora",
  "dropout",
  "weight",
  "in_axes",
  "out_axes",
  "rule",
  "stacked",
  "init",
  "use_dora",
)
# fields that adapters saved before they existed lack
_SPEC_DEFAULTS = {"stacked": 0, "init": "gaussian", "use_dora": False}


def _weight_shape(spec: LoraSpec, a_shape, b_shape) -> tuple[int, ...]:
  """The adapted weight's shape, rebuilt from its factors' shapes and axes."""
  n = spec.stacked
  shape = [0] * (len(spec.in_axes) + len(spec.out_axes))
  for axis, size in zip(spec.in_axes, a_shape[n:-1], strict=True):
    shape[axis] = size
  for axis, size in zip(spec.out_axes, b_shape[n + 1 :], strict=True):
    shape[axis] = size
  return (*a_shape[:n], *shape)


def _spec_record(module: str, spec: LoraSpec, a, b) -> dict:
  record = {"path": module, **{f: getattr(spec, f) for f in _SPEC_FIELDS}}
  record["in_axes"], record["out_axes"] = list(spec.in_axes), list(spec.out_axes)
  record["weight_shape"] = list(_weight_shape(spec, a.shape, b.shape))
  return record


def _spec_from_record(record: Mapping) -> LoraSpec:
  kw = {f: record[f] if f in record else _SPEC_DEFAULTS[f] for f in _SPEC_FIELDS}
  kw["in_axes"], kw["out_axes"] = tuple(kw["in_axes"]), tuple(kw["out_axes"])
  return LoraSpec(**kw)


def _dtype_name(x) -> str:
  return np.dtype(x.dtype).name


# ---------------------------------------------------------------------------------------------
# Directories.


def _resolve(directory):
  """A ``pathlib.Path`` for local directories, an ``epath.Path`` for ``gs://`` and the like."""
  if "://" in str(directory):
    from etils import epath

    return epath.Path(directory)
  return pathlib.Path(directory).expanduser().resolve()


def _check_writable(path) -> None:
  """Refuses to write into a directory that is neither empty nor a lora_jax adapter directory.

  Orbax keeps one step (``max_to_keep=1``) and deletes the others: a directory of training
  checkpoints must never be mistaken for an adapter directory. Adapter directories carry a
  marker file from their first save on.
  """
  if not path.exists():
    return
  if not path.is_dir():
    raise NotADirectoryError(f"cannot save an adapter to {str(path)!r}: it is a file")
  entries = sorted(e.name for e in path.iterdir())
  if entries and MARKER not in entries:
    raise ValueError(
      f"refusing to save an adapter into {str(path)!r}: it is not empty and was not written by "
      f"save_adapter (no {MARKER}); it holds {entries[:10]}; choose an empty or new directory"
    )


def _mark(path) -> None:
  marker = path / MARKER
  if jax.process_index() == 0 and not marker.exists():
    path.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION}))


def _not_an_adapter(path, why: str) -> ValueError:
  entries = sorted(e.name for e in path.iterdir()) if path.is_dir() else []
  hint = ""
  if "adapter_config.json" in entries:
    hint = "; it looks like a PEFT adapter: load it with lora_jax.import_peft"
  return ValueError(
    f"{str(path)!r} is not a lora_jax adapter directory ({why}); it holds {entries[:10]}{hint}"
  )


def _open(directory):
  path = _resolve(directory)
  if not path.exists():
    raise FileNotFoundError(f"no adapter directory at {str(path)!r}")
  if not path.is_dir():
    raise _not_an_adapter(path, "it is a file")
  return path


class _QuietReadOnly(logging.Filter):
  """Drops Orbax's warnings that a read-only manager is read-only (it says so on every load)."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("read_only=True" in message or message.startswith("Given directory is read only"))


def _manager(path, *, read_only: bool):
  import orbax.checkpoint as ocp

  quiet = _QuietReadOnly()
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(quiet)
  try:
    options = ocp.CheckpointManagerOptions(
      max_to_keep=1,
      create=not read_only,
      read_only=read_only,
      cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(path, options=options)
  finally:
    absl_logger.removeFilter(quiet)


def _read_info(mngr, path) -> tuple[int, dict]:
  import orbax.checkpoint as ocp

  step = mngr.latest_step()
  if step is None:
    raise _not_an_adapter(path, "no complete checkpoint in it")
  if not (path / str(step) / INFO_ITEM).exists():
    raise _not_an_adapter(path, f"its checkpoint {step} has no {INFO_ITEM!r} item")
  try:
    info = mngr.restore(step, args=ocp.args.Composite(**{INFO_ITEM: ocp.args.JsonRestore()}))
    info = info[INFO_ITEM]
  except Exception as e:  # Orbax raises many types for an unreadable item.
    raise ValueError(
      f"the adapter description in {str(path / str(step) / INFO_ITEM)!r} cannot be read; the "
      f"checkpoint is damaged: {type(e).__name__}: {e}"
    ) from e
  if not isinstance(info, Mapping) or info.get("format") != FORMAT:
    raise _not_an_adapter(path, f"step {step} is not marked format={FORMAT!r}")
  if info.get("format_version", 0) > FORMAT_VERSION:
    raise ValueError(
      f"the adapter at {str(path)!r} has format_version {info['format_version']}; this "
      f"lora_jax reads up to {FORMAT_VERSION}: upgrade lora_jax"
    )
  return step, info


# ---------------------------------------------------------------------------------------------
# Public API.


def save_adapter(directory, params, *, extra_trainable=(), metadata: Mapping | None = None):
  """Writes the adapters of ``params`` (and ``extra_trainable`` leaves) to ``directory``.

  Only adapter leaves (``lora_a``, ``lora_b``, DoRA's ``lora_magnitude``), leaves matching
  ``extra_trainable`` and a JSON description of every adapter are written, never the frozen
  base. The write is atomic: an existing adapter in ``directory`` stays readable until the new
  one is complete (see the module docstring).

  Args:
    directory: a new or empty directory, or one written by ``save_adapter`` before (the new
      adapter replaces the old one). Local path or any path Orbax writes (``gs://...``).
    params: a variables dict or bare params tree carrying adapters from :func:`lora_init`
      (the trainable half from :func:`partition` works too).
    extra_trainable: regexes of further leaves to save, as in :func:`trainable_mask` (e.g.
      ``["classifier"]`` for a head trained beside the adapters).
    metadata: JSON-serialisable facts to keep with the adapter, e.g.
      ``{"base_model_name_or_path": "FacebookAI/roberta-base"}``.

  Returns:
    ``directory`` as a path.

  Raises:
    ValueError: ``params`` carry no adapter, an ``extra_trainable`` pattern matches nothing, or
      ``directory`` holds something other than lora_jax adapters.
    FloatingPointError: an adapter or saved leaf holds NaN or inf (nothing is written).
    TypeError: ``metadata`` is not JSON-serialisable.

  Example:
    >>> import tempfile, flax.linen as nn, jax, jax.numpy as jnp
    >>> from lora_jax import LoraRule, lora_init, load_adapter, save_adapter
    >>> base = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 8)))
    >>> params = lora_init(base, LoraRule(".*", rank=2), rng=jax.random.key(1))
    >>> folder = save_adapter(tempfile.mkdtemp() + "/adapter", params,
    ...                       metadata={"base_model_name_or_path": "my-dense"})
    >>> sorted(load_adapter(folder, base)["params"])
    ['bias', 'kernel', 'lora_a', 'lora_b', 'lora_spec']
  """
  import orbax.checkpoint as ocp

  params = nnx_tree.as_variables(params)
  tree, _ = paths.split_params(params)
  if isinstance(extra_trainable, str):
    extra_trainable = (extra_trainable,)
  extra_trainable = tuple(extra_trainable)
  trainable_mask({paths.PARAMS: tree}, extra_trainable)  # every pattern must match a leaf
  extra = compile_patterns(extra_trainable)
  flat = flatten(tree)

  adapters, leaves = [], {}
  for path, value in flat.items():
    if isinstance(value, LoraSpec):
      module = module_of(path)
      a, b = flat.get(f"{module}/{LORA_A}"), flat.get(f"{module}/{LORA_B}")
      if a is None or b is None:
        raise ValueError(f"the adapter at {module!r} lacks {LORA_A!r} or {LORA_B!r}")
      if value.use_dora and f"{module}/{LORA_MAGNITUDE}" not in flat:
        raise ValueError(f"the DoRA adapter at {module!r} lacks {LORA_MAGNITUDE!r}")
      adapters.append(_spec_record(module, value, a, b))
    elif is_trainable(path, extra):
      leaves[path] = value
  if not adapters:
    raise ValueError(
      "params carry no LoRA adapters, nothing to save; call lora_init(params, rules, rng=...) "
      "first (or merge and export the whole model instead)"
    )
  check_finite(
    {p: v for p, v in flat.items() if p.rsplit("/", 1)[-1] in ADAPTER_LEAVES or p in leaves},
    f"save the adapter to {directory}",
  )

  info = {
    "format": FORMAT,
    "crc32": _checksums(leaves),
    "format_version": FORMAT_VERSION,
    "lora_jax_version": __version__,
    "extra_trainable": list(extra_trainable),
    "adapters": adapters,
    "leaves": [
      {"path": p, "shape": list(np.shape(v)), "dtype": _dtype_name(v)} for p, v in leaves.items()
    ],
    "metadata": dict(metadata or {}),
  }
  try:
    json.dumps(info, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise TypeError(f"save_adapter metadata={metadata!r} is not JSON-serialisable: {e}") from None

  path = _resolve(directory)
  _check_writable(path)
  _mark(path)
  with _manager(path, read_only=False) as mngr:
    latest = mngr.latest_step()
    step = 0 if latest is None else latest + 1
    mngr.save(
      step,
      args=ocp.args.Composite(
        **{
          ADAPTER_ITEM: ocp.args.StandardSave(nest(leaves)),
          INFO_ITEM: ocp.args.JsonSave(info),
        }
      ),
      force=True,
    )
    mngr.wait_until_finished()
  return path


def adapter_info(directory) -> dict:
  """The JSON description saved with the adapter in ``directory``.

  Keys: ``adapters`` (one record per adapter: path, rank, alpha, rslora, dropout, weight,
  in_axes, out_axes, rule, stacked, weight_shape), ``leaves`` (path, shape, dtype of each saved
  leaf), ``crc32`` (of each saved array, by path), ``extra_trainable``, ``metadata``,
  ``lora_jax_version``, ``format``, ``format_version``.

  Raises:
    FileNotFoundError: ``directory`` does not exist.
    ValueError: ``directory`` is not an adapter written by :func:`save_adapter`.
  """
  path = _open(directory)
  with _manager(path, read_only=True) as mngr:
    return _read_info(mngr, path)[1]


def _checksums(leaves: Mapping[str, Any]) -> dict[str, int]:
  """CRC-32 of each saved leaf's bytes (arrays this process holds whole), by path."""
  return {p: crc32(v) for p, v in leaves.items() if getattr(v, "is_fully_addressable", True)}


def _check_checksums(info: Mapping, restored: Mapping[str, Any], where) -> None:
  """Refuses restored leaves whose bytes differ from the CRC-32 saved with them (adapters
  written before checksums were kept have none to compare)."""
  bad = sorted(
    p for p, crc in _checksums(restored).items() if info.get("crc32", {}).get(p, crc) != crc
  )
  if bad:
    raise ValueError(
      f"the adapter arrays in {str(where)!r} fail their CRC-32 check at {bad[:5]}: the files "
      "are damaged (bit rot, an interrupted copy); save or copy the adapter again"
    )


def _abstract(info: Mapping, flat: Mapping[str, Any]) -> dict:
  """Shapes, dtypes and placements to restore into: a base leaf's sharding where one exists."""
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  out = {}
  for record in info["leaves"]:
    shape = tuple(record["shape"])
    have = flat.get(record["path"])
    sharding = default
    if isinstance(have, jax.Array) and have.shape == shape:
      sharding = have.sharding
    out[record["path"]] = jax.ShapeDtypeStruct(shape, np.dtype(record["dtype"]), sharding=sharding)
  return nest(out)


def load_adapter(directory, params):
  """Returns ``params`` with the adapter saved in ``directory`` inserted.

  ``params`` is the base model's tree, without adapters or with the same set of adapters
  (whose values are replaced). The saved adapter leaves (``lora_a``, ``lora_b``,
  ``lora_magnitude``), their ``lora_spec`` and every saved ``extra_trainable`` leaf are put in
  place, with the dtypes they were saved in. The input tree is not modified.

  Args:
    directory: a directory written by :func:`save_adapter`.
    params: a variables dict or bare params tree (the result has the same form).

  Raises:
    FileNotFoundError: ``directory`` does not exist.
    ValueError: ``directory`` is not a lora_jax adapter, its files cannot be read (corrupted or
      truncated) or hold arrays that fail their saved CRC-32 (a flipped bit), or ``params``
      does not fit it: one message lists every missing leaf and shape mismatch.

  Example:
    >>> import tempfile, flax.linen as nn, jax, jax.numpy as jnp
    >>> from lora_jax import LoraRule, lora_init, load_adapter, save_adapter
    >>> model = nn.Dense(4)
    >>> base = model.init(jax.random.key(0), jnp.ones((1, 8)))
    >>> params = lora_init(base, LoraRule(".*", rank=2, alpha=4), rng=jax.random.key(1))
    >>> folder = save_adapter(tempfile.mkdtemp(), params)
    >>> load_adapter(folder, base)["params"]["lora_spec"].scale
    2.0
    >>> load_adapter(folder, nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 8))))
    Traceback (most recent call last):
    ...
    ValueError: params do not fit the adapter in ...; 1 mismatch(es):
      params/kernel: the adapter needs a weight of shape (8, 4), base has (8, 3)
  """
  import orbax.checkpoint as ocp

  if nnx_tree.is_model(params):  # NNX: the model itself, updated in place
    return nnx_tree.sync(params, load_adapter(directory, nnx_tree.to_variables(params)))
  path = _open(directory)
  tree, rebuild = paths.split_params(params)
  flat = flatten(tree)
  with _manager(path, read_only=True) as mngr:
    step, info = _read_info(mngr, path)
    check_fits(flat, info["adapters"], info["leaves"], repr(str(path)))
    target = _abstract(info, flat)
    try:
      restored = mngr.restore(
        step, args=ocp.args.Composite(**{ADAPTER_ITEM: ocp.args.StandardRestore(target)})
      )[ADAPTER_ITEM]
    except Exception as e:  # Orbax/TensorStore raise many types for damaged files.
      detail = " ".join(f"{type(e).__name__}: {e}".split())  # one line: TensorStore's are many
      raise ValueError(
        f"could not read the adapter arrays in {str(path / str(step))!r}; the checkpoint is "
        f"damaged (corrupted or truncated files): {detail[:400]}"
      ) from e

  restored = flatten(restored)
  _check_checksums(info, restored, path / str(step) / ADAPTER_ITEM)
  specs = {r["path"]: _spec_from_record(r) for r in info["adapters"]}
  _check_residual_base(flat, specs, path)
  return rebuild(insert(tree, restored, specs))


def _check_residual_base(flat: dict, specs: dict, path) -> None:
  """A PiSSA or OLoRA adapter only fits the residual weights its ``lora_init`` wrote: loading
  it into the original base would silently give another model, so that is refused."""
  for module, spec in sorted(specs.items()):
    if not inits.parse(spec.init).rewrites_base:
      continue
    have = flat.get(f"{module}/{LORA_SPEC}")
    if not isinstance(have, LoraSpec) or have.init != spec.init:
      raise ValueError(
        f"the adapter in {str(path)!r} at {module!r} started from init={spec.init!r}, so it "
        "applies to the residual weights that lora_init wrote, not to this base: load it into "
        "lora_init(base, <the same rule>, rng=<the same key>), or export it for the original "
        "base with export_peft(..., initial=<that tree>)"
      )
