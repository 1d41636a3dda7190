"""``--config FILE``: a YAML mapping of flag values, read as flags placed before the command line.

``--config FILE`` names a YAML mapping whose keys are flag names (without ``--``). Its values
become flags placed *before* the command line, so the command line overrides the file and every
value goes through the same parsing and checks (``choices``, positive numbers, ...). A bad value,
from the file or the command line, ends the program with one line naming the flag, the value and
the valid choices, and exit status 2.

A relative path in the YAML file is relative to the file's folder, so a config runs from any
working directory: path flags (:data:`train.cli.flags.PATH`; marked with
:func:`train.cli.flags.mark_path`) take ``yaml_folder/value``, and flags naming a model,
tokenizer, adapter or dataset (:data:`train.cli.flags.HUB_OR_PATH`) do so when the value starts
with ``./`` or ``../`` or ``yaml_folder/value`` exists, and otherwise stay Hugging Face Hub ids
(``roberta-base``). Absolute paths, and paths on the command line, are left as they are.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
from collections.abc import Callable
from collections.abc import Sequence

import yaml

from train.cli.flags import PATH
from train.cli.flags import OneLineParser
from train.cli.flags import path_flags


def _resolve(value: str, kind: str, folder: str) -> str:
  """A path flag's ``value`` from a YAML file in ``folder``, made relative to that folder.

  Example:
    >>> from train.cli.flags import HUB_OR_PATH
    >>> _resolve("data/train.tsv", PATH, "cfg"), _resolve("../out", PATH, "cfg")
    ('cfg/data/train.tsv', 'out')
    >>> _resolve("roberta-base", HUB_OR_PATH, "cfg"), _resolve("./m", HUB_OR_PATH, "cfg")
    ('roberta-base', 'cfg/m')
    >>> _resolve("/data/t.tsv", PATH, "cfg"), _resolve("", PATH, "cfg")
    ('/data/t.tsv', '')
  """
  if not value or os.path.isabs(value):
    return value
  joined = os.path.normpath(os.path.join(folder, value))
  if kind == PATH or value.startswith(("./", "../")) or os.path.exists(joined):
    return joined
  return value  # a Hub id


def _kind(action: argparse.Action) -> str:
  """What a flag takes, as its type names it (``positive float``), for errors."""
  return getattr(action.type, "__name__", "finite float")


def _config_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
  """YAML as flags: ``{lora_r: 8, do_predict: true}`` -> ``--lora_r 8 --do_predict``; path
  flags relative to the YAML file's folder (:func:`_resolve`)."""
  try:
    data = yaml.safe_load(pathlib.Path(path).read_text()) or {}
  except OSError as e:
    parser.error(f"argument --config: cannot read {path!r}: {e.strerror}")
  except yaml.YAMLError as e:
    parser.error(f"argument --config: {path!r} is not valid YAML: {str(e).splitlines()[0]}")
  if not isinstance(data, dict):
    parser.error(f"argument --config: {path!r} must hold a mapping of flag names to values")
  actions = {a.dest: a for a in parser._actions if a.option_strings}
  unknown = sorted(set(map(str, data)) - set(actions) - {"config"})
  if unknown:
    parser.error(
      f"argument --config: {path!r} has unknown keys {unknown}; valid keys: {sorted(actions)}"
    )
  paths = path_flags(parser)
  folder = os.path.dirname(path)
  argv: list[str] = []
  for key, value in data.items():
    flag = f"--{key}"
    if key in paths and isinstance(value, (str, int, float)) and not isinstance(value, bool):
      value = _resolve(str(value), paths[key], folder)
    if isinstance(actions[key], argparse.BooleanOptionalAction):
      if not isinstance(value, bool):
        parser.error(f"argument --config: {key}={value!r} in {path!r} must be true or false")
      argv.append(flag if value else f"--no-{key}")
    elif value is None:
      continue
    elif isinstance(value, float) and not math.isfinite(value):  # .nan, .inf: name the file
      parser.error(
        f"argument {flag}: invalid {_kind(actions[key])} value: '{value}' ({key} in {path!r})"
      )
    elif isinstance(value, list):
      argv += [flag, *map(str, value)]
    else:
      argv.append(f"{flag}={value}")  # "--x=-inf": a value, not a flag
  return argv


def parse(
  parser: OneLineParser,
  argv: Sequence[str] | None,
  check: Callable[[argparse.Namespace, OneLineParser], argparse.Namespace] = lambda a, p: a,
) -> argparse.Namespace:
  """Flags from ``--config`` (if any), then from ``argv`` (default ``sys.argv[1:]``), then
  ``check(args, parser)`` (which may fill defaults, or end the program with ``parser.error``)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--config")
  known, _ = pre.parse_known_args(argv)
  if known.config:
    argv = _config_argv(known.config, parser) + argv
  return check(parser.parse_args(argv), parser)
