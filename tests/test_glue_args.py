"""train/tasks/glue/args.py: flags, YAML configs, one-line errors for bad values."""

from __future__ import annotations

import pathlib

import pytest

from train.tasks import setup
from train.tasks.glue import args as glue_args


def parse_error(capsys, argv) -> str:
  with pytest.raises(SystemExit) as e:
    glue_args.parse_args(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1, f"expected one line, got {err!r}"
  return err


def test_defaults_are_hugging_face_like():
  args = glue_args.parse_args([])
  assert args.model_name_or_path == "roberta-base"  # the Hub, for real users
  assert (args.task_name, args.train_file, args.parallel, args.dtype) == (
    "sst2",
    None,
    "none",
    "float32",
  )
  assert args.lora_target_modules == ["query", "value"]
  assert (args.do_predict, args.export_merged, args.lora_rslora) == (False, False, False)


def test_config_file_then_command_line(tmp_path):
  config = tmp_path / "c.yaml"
  config.write_text(
    "task_name: mrpc\nlora_r: 4\nlora_target_modules: [query, key, value]\n"
    "do_predict: true\nlearning_rate: 1.0e-3\nmax_train_samples: null\n"
  )
  args = glue_args.parse_args(["--config", str(config), "--lora_r", "16"])
  assert (args.task_name, args.lora_r, args.learning_rate) == ("mrpc", 16, 1e-3)
  assert args.lora_target_modules == ["query", "key", "value"]
  assert args.do_predict is True
  args = glue_args.parse_args(["--config", str(config), "--no-do_predict"])
  assert args.do_predict is False


def test_embedded_configs_parse():
  configs = pathlib.Path(__file__).resolve().parent.parent / "configs"
  for name in ("sst2_minilm", "roberta-base/sst2", "roberta-large/sst2"):
    args = glue_args.parse_args(["--config", str(configs / f"{name}.yaml")])
    assert args.task_name == "sst2" and args.lora_r == 8


@pytest.mark.parametrize(
  "argv, expected",
  [
    (["--task_name", "sst3"], "argument --task_name: invalid choice: 'sst3' (choose from 'cola'"),
    (["--parallel", "dp"], "invalid choice: 'dp' (choose from 'none', 'pmap', 'mesh')"),
    (["--dtype", "float16"], "invalid choice: 'float16' (choose from 'float32', 'bfloat16')"),
    (["--lora_r", "0"], "argument --lora_r: invalid positive int value: '0'"),
    (["--lora_dropout", "1"], "argument --lora_dropout: invalid float in [0, 1) value: '1'"),
    (["--learning_rate", "-1"], "invalid positive float value: '-1'"),
    (["--warmup_ratio", "x"], "argument --warmup_ratio: invalid float in [0, 1] value: 'x'"),
    (["--max_stepz", "3"], "unrecognized arguments: --max_stepz 3"),
  ],
)
def test_bad_values_are_one_line_errors(capsys, argv, expected):
  err = parse_error(capsys, argv)
  assert err.startswith("run_glue.py: error: ") and expected in err


def test_bad_config_files_are_one_line_errors(capsys, tmp_path):
  bad_key = tmp_path / "k.yaml"
  bad_key.write_text("lora_rank: 8\n")
  err = parse_error(capsys, ["--config", str(bad_key)])
  assert "unknown keys ['lora_rank']" in err and "'lora_r'" in err
  bad_value = tmp_path / "v.yaml"
  bad_value.write_text("task_name: imdb\n")
  assert "invalid choice: 'imdb'" in parse_error(capsys, ["--config", str(bad_value)])
  bad_bool = tmp_path / "b.yaml"
  bad_bool.write_text("do_predict: maybe\n")
  assert "do_predict='maybe'" in parse_error(capsys, ["--config", str(bad_bool)])
  err = parse_error(capsys, ["--config", str(tmp_path / "missing.yaml")])
  assert "cannot read" in err and "missing.yaml" in err


def test_lora_targets_names_regex_or_all_linear():
  assert setup.lora_targets(["query", "value"]) == ("query", "value")
  assert setup.lora_targets(["output.dense"]) == ("output.dense",)
  assert setup.lora_targets(["all-linear"]) == "all-linear"
  assert setup.lora_targets([".*/self/(query|value)"]) == ".*/self/(query|value)"
