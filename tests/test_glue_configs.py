"""configs/roberta-{base,large}/*.yaml: the LoRA paper's GLUE recipe (Hu et al. 2021, Table 9)."""

from __future__ import annotations

import pathlib

import pytest

from train.tasks.glue import args as glue_args

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
FAMILIES = ("roberta-base", "roberta-large")
TASKS = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb")

# From the paper's Table 9: task -> (batch size, epochs, learning rate, max sequence length).
PAPER = {
  "roberta-base": {
    "mnli": (16, 30, 5e-4, 512),
    "sst2": (16, 60, 5e-4, 512),
    "mrpc": (16, 30, 4e-4, 512),
    "cola": (32, 80, 4e-4, 512),
    "qnli": (32, 25, 4e-4, 512),
    "qqp": (16, 25, 5e-4, 512),
    "rte": (32, 80, 5e-4, 512),
    "stsb": (16, 40, 4e-4, 512),
  },
  "roberta-large": {
    "mnli": (4, 10, 3e-4, 128),
    "sst2": (4, 10, 4e-4, 128),
    "mrpc": (4, 20, 3e-4, 512),
    "cola": (4, 20, 2e-4, 128),
    "qnli": (4, 10, 2e-4, 512),
    "qqp": (4, 20, 3e-4, 512),
    "rte": (8, 20, 4e-4, 512),
    "stsb": (8, 30, 2e-4, 512),
  },
}
PAPER_ALPHA = {"roberta-base": 8, "roberta-large": 16}  # r = 8 on query and value for both
# Not in the paper: from the authors' scripts, microsoft/LoRA examples/NLU/roberta_*_*.sh.
SCRIPTS = {"weight_decay": 0.1, "seed": 0, "lora_dropout": 0.0, "logging_steps": 10}


def parse(family: str, task: str):
  return glue_args.parse_args(["--config", str(CONFIGS / family / f"{task}.yaml")])


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_has_the_eight_glue_tasks(family):
  assert sorted(p.name for p in (CONFIGS / family).iterdir()) == sorted(f"{t}.yaml" for t in TASKS)


@pytest.mark.parametrize(
  "path", sorted(CONFIGS.glob("roberta-*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}"
)
def test_every_config_parses(path):
  args = glue_args.parse_args(["--config", str(path)])
  assert args.model_name_or_path == path.parent.name
  assert args.task_name == path.stem
  assert args.adapter_name_or_path is None  # the MNLI start is a comment, not an active key


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", TASKS)
def test_config_is_the_papers_recipe(family, task):
  args = parse(family, task)
  batch, epochs, lr, length = PAPER[family][task]
  assert (args.model_name_or_path, args.task_name) == (family, task)
  assert args.per_device_train_batch_size == batch
  assert args.num_train_epochs == epochs
  assert args.learning_rate == pytest.approx(lr, rel=1e-12)
  assert args.max_seq_length == length
  assert (args.lora_r, args.lora_alpha) == (8, PAPER_ALPHA[family])
  assert args.lora_target_modules == ["query", "value"]
  assert args.warmup_ratio == 0.06
  assert args.gradient_accumulation_steps == 1 and args.max_steps == 0
  assert not args.lora_rslora
  assert {k: getattr(args, k) for k in SCRIPTS} == SCRIPTS
  assert args.output_dir == str(CONFIGS.parent / "outputs" / family / task)  # beside configs/
  assert args.do_predict is True


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", ("mrpc", "rte", "stsb"))
def test_mnli_start_is_documented(family, task):
  text = (CONFIGS / family / f"{task}.yaml").read_text()
  documented = f"--adapter_name_or_path outputs/{family}/mnli/adapter --ignore_mismatched_sizes"
  assert f"#   {documented}\n" in text
  path = str(CONFIGS / family / f"{task}.yaml")
  args = glue_args.parse_args(["--config", path, *documented.split()])
  assert args.ignore_mismatched_sizes  # and the command line's path is the user's, untouched
  assert args.adapter_name_or_path == f"outputs/{family}/mnli/adapter"
