"""Logging for the training scripts: the project's loggers at INFO, everyone else's at WARNING."""

from __future__ import annotations

import logging
import os
import sys

PROJECT_LOGGERS = ("train", "lora_jax")


def configure_logging() -> None:
  """The project's loggers (:data:`PROJECT_LOGGERS`) at INFO, everyone else's at WARNING.

  transformers is imported here without its import-time advice ("PyTorch was not found...":
  this project needs no torch), and kept at WARNING unless ``TRANSFORMERS_VERBOSITY`` says
  otherwise; jax's backend probing (``Unable to initialize backend 'tpu'``) is INFO, so hidden.
  """
  logging.basicConfig(
    level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
  )
  for name in PROJECT_LOGGERS:
    logging.getLogger(name).setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save chatter
  if "transformers" not in sys.modules:
    previous = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    try:
      import transformers  # noqa: F401
    finally:
      if previous is None:
        del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
      else:
        os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = previous
  if not os.environ.get("TRANSFORMERS_VERBOSITY"):
    import transformers.utils.logging

    transformers.utils.logging.set_verbosity_warning()
