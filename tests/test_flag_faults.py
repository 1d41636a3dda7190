"""Bad flags and configs end in one line and exit 2, before any long work (issue 14): floats
that are not finite, ``--do_predict`` without a test split; ``--help`` shows every default; a
``--config`` file's relative paths are relative to its folder; a run's log is the project's."""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from train.cli import flags
from train.tasks.clm import args as clm_args
from train.tasks.glue import args as glue_args

CONFIGS = REPO / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"
# each script's parse_args, with the flags it needs to get past its own checks
SCRIPTS = {
  "run_glue.py": (glue_args, []),
  "run_clm.py": (clm_args, ["--model_name_or_path", "m", "--train_file", "t.jsonl"]),
}
FLOAT_TYPES = (flags.positive_float, flags.nonneg_float, flags.unit_float, flags.dropout_float)


def parse_error(capsys, module, argv) -> str:
  """The one line that ``module.parse_args(argv)`` ends with (exit 2)."""
  with pytest.raises(SystemExit) as e:
    module.parse_args(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1, f"expected one line, got {err!r}"
  return err


def options(module) -> list[argparse.Action]:
  return [a for a in module.build_parser()._actions if a.option_strings]


# ---------------------------------------------------------------------------------------------
# Floats: inf and nan are refused by every float flag.


def float_flags() -> list[tuple[str, str]]:
  found = []
  for script, (module, _) in SCRIPTS.items():
    for action in options(module):
      assert action.type is not float, f"{script} {action.option_strings[0]}: use a checked type"
      if action.type in FLOAT_TYPES:
        found.append((script, action.option_strings[0]))
  return found


def test_the_float_flags_are_found():
  found = {flag for _, flag in float_flags()}
  assert {"--learning_rate", "--num_train_epochs", "--lora_alpha", "--lora_dropout"} <= found
  assert ("run_clm.py", "--max_grad_norm") in float_flags()


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity", "NaN"])
@pytest.mark.parametrize(("script", "flag"), float_flags())
def test_every_float_flag_refuses_non_finite_values(capsys, script, flag, value):
  module, needed = SCRIPTS[script]
  err = parse_error(capsys, module, [*needed, f"{flag}={value}"])  # "-inf" would be a flag
  assert err.startswith(f"{script}: error: argument {flag}: invalid ") and f"'{value}'" in err


def test_infinite_epochs_are_refused_before_the_run(capsys):
  err = parse_error(capsys, glue_args, ["--max_steps", "0", "--num_train_epochs", "inf"])
  assert "argument --num_train_epochs: invalid positive float value: 'inf'" in err


@pytest.mark.parametrize(("text", "shown"), [(".inf", "inf"), ("-.inf", "-inf"), (".nan", "nan")])
def test_a_config_file_cannot_sneak_in_non_finite_values(capsys, tmp_path, text, shown):
  config = tmp_path / "c.yaml"
  config.write_text(f"max_steps: 0\nnum_train_epochs: {text}\n")
  assert not math.isfinite(yaml.safe_load(config.read_text())["num_train_epochs"])
  err = parse_error(capsys, glue_args, ["--config", str(config)])
  assert f"argument --num_train_epochs: invalid positive float value: '{shown}'" in err


def test_finite_floats_still_parse():
  args = glue_args.parse_args(
    ["--learning_rate", "1e-3", "--lora_dropout", "0", "--warmup_ratio", "1"]
  )
  assert (args.learning_rate, args.lora_dropout, args.warmup_ratio) == (1e-3, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# --do_predict needs a test split: --test_file, or the Hub's GLUE (which has one).


@pytest.mark.parametrize("given", ["--train_file", "--validation_file"])
def test_do_predict_on_local_files_without_a_test_file_is_refused(capsys, given):
  err = parse_error(capsys, glue_args, [given, "data.tsv", "--do_predict"])
  assert err.startswith("run_glue.py: error: argument --do_predict: ")
  assert "--test_file" in err and "'data.tsv'" in err


def test_do_predict_from_a_config_without_a_test_file_is_refused(capsys):
  argv = ["--config", str(QUICKSTART), "--test_file", ""]
  assert "argument --do_predict: " in parse_error(capsys, glue_args, argv)


def test_do_predict_with_a_test_split_is_accepted():
  assert glue_args.parse_args(["--do_predict"]).do_predict  # the Hub's GLUE has test splits
  args = glue_args.parse_args(["--train_file", "t.tsv", "--test_file", "u.tsv", "--do_predict"])
  assert args.do_predict and args.test_file == "u.tsv"
  assert not glue_args.parse_args(["--train_file", "t.tsv"]).do_predict


# ---------------------------------------------------------------------------------------------
# --help shows every default, once.


def help_entries(parser: argparse.ArgumentParser) -> dict[str, str]:
  """``--help``'s text per option (first option string -> its lines, whitespace collapsed)."""
  entries: dict[str, list[str]] = {}
  current = None
  for line in parser.format_help().splitlines():
    if line.startswith("  -"):
      current = line.split()[0].rstrip(",")
      entries[current] = []
    elif not line.startswith("  "):
      current = None  # a group title, or a blank line
    if current:
      entries[current].append(line)
  return {k: " ".join(" ".join(v).split()) for k, v in entries.items()}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default_once(monkeypatch, script):
  monkeypatch.setenv("COLUMNS", "100")
  module, _ = SCRIPTS[script]
  parser = module.build_parser()
  entries = help_entries(parser)
  shown = 0
  for action in options(module):
    text = entries[action.option_strings[0]]
    assert text.count("(default:") <= 1, text
    if action.default not in (None, argparse.SUPPRESS):
      assert text.count(f"(default: {action.default})") == 1, text
      shown += 1
  assert shown >= 25  # batch sizes, learning rate, LoRA r/alpha/dropout, lengths, ...
  assert "(default: None)" not in parser.format_help()


def test_train_file_help_names_its_default_once(monkeypatch):
  monkeypatch.setenv("COLUMNS", "100")
  text = help_entries(glue_args.build_parser())["--train_file"]
  assert "the Hub's GLUE" in text and text.count("default") == 0, text


# ---------------------------------------------------------------------------------------------
# --config FILE: relative paths in the file are relative to the file's folder.


def test_quickstart_config_runs_from_any_folder(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  args = glue_args.parse_args(["--config", str(QUICKSTART)])
  assert args.train_file == str(CONFIGS / "quickstart" / "train.tsv")
  assert args.validation_file == str(CONFIGS / "quickstart" / "validation.tsv")
  assert args.test_file == str(CONFIGS / "quickstart" / "test.tsv")
  assert args.config_name == args.tokenizer_name == str(CONFIGS / "quickstart")
  assert args.output_dir == str(REPO / "outputs" / "quickstart")
  assert pathlib.Path(args.train_file).is_file()


def test_a_relative_config_path_gives_paths_relative_to_the_working_folder(monkeypatch):
  monkeypatch.chdir(REPO)
  args = glue_args.parse_args(["--config", "configs/quickstart.yaml"])
  assert (args.train_file, args.config_name, args.output_dir) == (
    "configs/quickstart/train.tsv",
    "configs/quickstart",
    "outputs/quickstart",
  )
  monkeypatch.chdir(CONFIGS)
  args = glue_args.parse_args(["--config", "quickstart.yaml"])
  assert (args.train_file, args.output_dir) == ("quickstart/train.tsv", "../outputs/quickstart")


def test_hub_ids_absolute_paths_and_the_command_line_are_left_alone(monkeypatch, tmp_path):
  folder = tmp_path / "cfg"
  (folder / "local_tokenizer").mkdir(parents=True)
  config = folder / "c.yaml"
  config.write_text(
    "model_name_or_path: roberta-base\n"
    "tokenizer_name: local_tokenizer\n"  # exists beside the file: a folder
    "adapter_name_or_path: org/adapter\n"  # does not: a Hub id
    "train_file: data/train.tsv\n"  # a file: beside the YAML, existing or not
    f"validation_file: {tmp_path / 'v.tsv'}\n"
    "test_file: ''\n"
    "output_dir: ../out\n"
  )
  monkeypatch.chdir(tmp_path)
  args = glue_args.parse_args(["--config", str(config)])
  assert (args.model_name_or_path, args.adapter_name_or_path) == ("roberta-base", "org/adapter")
  assert args.tokenizer_name == str(folder / "local_tokenizer")
  assert args.train_file == str(folder / "data" / "train.tsv")
  assert args.validation_file == str(tmp_path / "v.tsv")
  assert args.test_file == ""
  assert args.output_dir == str(tmp_path / "out")
  argv = ["--config", str(config), "--train_file", "mine.tsv", "--model_name_or_path", "./m"]
  args = glue_args.parse_args(argv)
  assert (args.train_file, args.model_name_or_path) == ("mine.tsv", "./m")


def test_dotted_model_values_are_paths_even_when_missing(tmp_path):
  config = tmp_path / "c.yaml"
  config.write_text(
    "model_name_or_path: ../models/m\ntrain_file: t.jsonl\n"
    "generation_prompts_file: p.txt\ndataset_name: org/data\n"
  )
  args = clm_args.parse_args(["--config", str(config)])
  assert args.model_name_or_path == str(tmp_path.parent / "models" / "m")
  assert args.generation_prompts_file == str(tmp_path / "p.txt")
  assert args.dataset_name == "org/data"


def test_every_path_flag_is_marked():
  for module, kinds in ((glue_args, {}), (clm_args, {"dataset_name": flags.HUB_OR_PATH})):
    marked = flags.path_flags(module.build_parser())
    expected = {
      **dict.fromkeys(["output_dir", "train_file", "validation_file"], flags.PATH),
      **dict.fromkeys(
        ["model_name_or_path", "config_name", "tokenizer_name", "adapter_name_or_path"],
        flags.HUB_OR_PATH,
      ),
      **kinds,
    }
    assert expected.items() <= marked.items(), (module.__name__, marked)
  assert flags.path_flags(glue_args.build_parser())["test_file"] == flags.PATH
  assert flags.path_flags(clm_args.build_parser())["generation_prompts_file"] == flags.PATH


@pytest.mark.parametrize(
  "path", sorted(CONFIGS.glob("**/*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS))
)
def test_every_config_in_the_checkout_names_paths_beside_the_checkout(monkeypatch, tmp_path, path):
  monkeypatch.chdir(tmp_path)
  module = glue_args if "task_name" in yaml.safe_load(path.read_text()) else clm_args
  args = module.parse_args(["--config", str(path)])
  assert pathlib.Path(args.output_dir).parent == REPO / "outputs" / path.parent.relative_to(CONFIGS)
  for dest, kind in flags.path_flags(module.build_parser()).items():
    value = getattr(args, dest)
    if not value or (kind == flags.HUB_OR_PATH and value in ("roberta-base", "roberta-large")):
      continue
    assert os.path.isabs(value) and value.startswith(str(REPO.parent)), (dest, value)
    if str(REPO / "configs") in value:  # files of the checkout: they exist
      assert pathlib.Path(value).exists(), (dest, value)


# ---------------------------------------------------------------------------------------------
# The quickstart as a user runs it from another folder: it works, and its log is ours.


# run_glue.py as a user without torch runs it (torch comes with the optional [torch] extra):
# the import system finds no torch, so transformers and datasets see none.
WITHOUT_TORCH = """
import runpy, sys
from importlib.machinery import PathFinder

class NoTorch(PathFinder):
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    return None if name.split(".")[0] == "torch" else super().find_spec(name, path, target)

sys.meta_path = [NoTorch if f is PathFinder else f for f in sys.meta_path]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def quickstart_elsewhere(tmp_path_factory) -> tuple[subprocess.CompletedProcess, pathlib.Path]:
  cwd = tmp_path_factory.mktemp("elsewhere")
  out = cwd / "out"
  script = str(REPO / "train" / "run_glue.py")
  cmd = [sys.executable, "-c", WITHOUT_TORCH, script, "--config", str(QUICKSTART),
         "--max_steps", "2", "--eval_steps", "0", "--logging_steps", "1", "--no-do_predict",
         "--no-progress", "--output_dir", str(out)]  # fmt: skip
  env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}
  proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
  return proc, out


# Both read one whole run_glue.py process (~28 s of the README's suite): CI's slow set runs them.
@pytest.mark.slow
def test_the_quickstart_config_runs_from_another_folder(quickstart_elsewhere):
  proc, out = quickstart_elsewhere
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "eval_accuracy=" in proc.stdout
  assert (out / "eval_results.json").is_file() and (out / "adapter").is_dir()


@pytest.mark.slow
def test_the_log_is_the_projects_not_its_libraries(quickstart_elsewhere):
  proc, _ = quickstart_elsewhere
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert " INFO train." in proc.stderr, proc.stderr[:3000]
  assert "Training new model from scratch" in proc.stderr
  assert "PyTorch was not found" not in proc.stderr
  assert "backend 'tpu'" not in proc.stderr.lower() and "jax._src" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# Parsing flags imports no jax (issue 26): --help is instant, and the lists of names the flags
# offer are copies of the library's, checked here instead of imported at parse time.


@pytest.mark.parametrize("how", ["file", "module"])
@pytest.mark.parametrize("script", ["run_clm", "run_glue"])
def test_help_imports_no_jax(script, how):
  """``python train/run_clm.py --help`` (and ``-m train.run_clm``): every module the process
  imported (``-X importtime``), and none of them jax or lora_jax."""
  target = [f"train/{script}.py"] if how == "file" else ["-m", f"train.{script}"]
  proc = subprocess.run(
    [sys.executable, "-X", "importtime", *target, "--help"],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=120,
  )
  assert proc.returncode == 0 and "--model_name_or_path" in proc.stdout, proc.stderr[-2000:]
  imported = {
    line.rsplit("|", 1)[1].strip()
    for line in proc.stderr.splitlines()
    if line.startswith("import time:") and "|" in line
  }
  assert {"train.cli.flags", f"train.tasks.{script[4:]}.args"} <= imported, sorted(imported)
  heavy = sorted(m for m in imported if m.split(".")[0] in ("jax", "jaxlib", "lora_jax", "flax"))
  assert heavy == [], heavy


def test_help_imports_no_jax_checked_in_sys_modules():
  """The same, read from ``sys.modules`` at exit of a process that parses ``--help``."""
  script = (
    "import sys\n"
    "from train.tasks.clm import args as clm_args\n"
    "from train.tasks.glue import args as glue_args\n"
    "for parse in (clm_args.parse_args, glue_args.parse_args):\n"
    "  try:\n"
    "    parse(['--help'])\n"
    "  except SystemExit as e:\n"
    "    assert e.code == 0, e.code\n"
    "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'lora_jax', 'flax')))\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-2000:]


def _listed(error: Exception) -> list[str]:
  """The list a library error names as valid: ``... is not one of ['a', 'b'] ...``."""
  text = str(error)
  return ast.literal_eval(text[text.index("[") : text.index("]") + 1])


def test_the_quantize_kinds_are_the_librarys():
  import lora_jax

  with pytest.raises(ValueError) as e:
    lora_jax.Quantization("all-linear", kind="int4")
  assert _listed(e.value) == list(flags.QUANTIZE_KINDS)
  for kind in flags.QUANTIZE_KINDS:
    assert lora_jax.Quantization("all-linear", kind=kind).kind == kind


def test_the_lora_inits_are_the_librarys_in_peft_spelling():
  import lora_jax

  with pytest.raises(ValueError) as e:
    lora_jax.LoraRule(".*", rank=4, init="xavier")
  spelled = [x if x == "pissa_niter_K" else flags.lora_init_kind(x) for x in flags.LORA_INITS]
  assert spelled == _listed(e.value)


def test_the_attention_choices_are_the_librarys():
  from lora_jax.models.layers.attention import ATTENTION_IMPLEMENTATIONS

  assert flags.ATTENTION == ("auto", *(a for a in ATTENTION_IMPLEMENTATIONS if a is not None))


def test_the_engines_names_are_what_it_builds():
  """The engine's lists (train.engine.kinds) are the schedules, modes and dtypes it accepts."""
  from train.engine import kinds
  from train.engine import parallel
  from train.engine import state

  for kind in kinds.LR_SCHEDULERS:
    assert float(state.make_schedule(kind, 1.0, 10, 2)(2)) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="valid: linear, cosine, constant"):
    state.make_schedule("step", 1.0, 10, 2)
  assert parallel.MODES == kinds.PARALLEL_MODES
  assert [state.jnp_dtype(d).__name__ for d in kinds.DTYPES] == list(kinds.DTYPES)


# ---------------------------------------------------------------------------------------------
# Issue 27's command-line items: each ends in a correct run or one line (exit 2) naming the bad
# value and what would work.


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("seed", ["99999999999999999999", "-1", "4294967296"])
def test_a_seed_numpy_cannot_take_is_refused_with_the_range(capsys, script, seed):
  module, needed = SCRIPTS[script]
  err = parse_error(capsys, module, [*needed, f"--seed={seed}"])
  assert f"argument --seed: invalid int in [0, 2**32 - 1] value: '{seed}'" in err
  assert module.parse_args([*needed, "--seed", "4294967295"]).seed == 2**32 - 1


@pytest.mark.parametrize(
  ("argv", "shown"),
  [
    (["--max_steps", "3000000000"], "argument --max_steps: invalid int in [0, 2**31 - 1] value"),
    (["--num_train_epochs", "1e30", "--max_steps", "0"], "give a float in (0, 1e+06]"),
    (["--max_steps", "2000000000", "--gradient_accumulation_steps", "2"], "4000000000 batches"),
  ],
)
def test_a_run_too_long_for_the_step_counter_is_refused_with_the_range(capsys, argv, shown):
  assert shown in parse_error(capsys, glue_args, argv)
  args = glue_args.parse_args(["--num_train_epochs", "1e30", "--max_steps", "10"])
  assert args.max_steps == 10  # --max_steps overrides the epochs


def test_an_empty_output_dir_is_refused(capsys, tmp_path):
  err = parse_error(capsys, glue_args, ["--output_dir", ""])
  assert "argument --output_dir: invalid folder: ''" in err and "'.' for the current" in err
  config = tmp_path / "c.yaml"
  config.write_text('output_dir: ""\n')
  assert "argument --output_dir: invalid folder" in parse_error(
    capsys, glue_args, ["--config", str(config)]
  )
  assert glue_args.parse_args(["--output_dir", "."]).output_dir == "."


def test_a_read_only_output_dir_ends_in_one_line_before_any_work(capsys, tmp_path, monkeypatch):
  """As root a chmod'ed folder stays writable: the refusal of the first write is simulated."""
  from train.cli.main import run_script

  out = tmp_path / "ro"
  out.mkdir()
  write_text = pathlib.Path.write_text

  def refuse(self, *a, **k):
    if self.parent == out:
      raise PermissionError(13, "Permission denied", str(self))
    return write_text(self, *a, **k)

  monkeypatch.setattr(pathlib.Path, "write_text", refuse)
  # a task module that does not exist: reaching it would be a traceback
  code = run_script("run_glue.py", glue_args.parse_args, "no_such_task", ["--output_dir", str(out)])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1, err
  assert f"--output_dir {str(out)!r} is not writable (Permission denied)" in err


def test_init_lora_weights_takes_the_apis_kaiming_uniform_and_help_explains_k(capsys):
  for name in ("kaiming_uniform", "kaiming"):
    args = glue_args.parse_args(["--init_lora_weights", name])
    assert args.init_lora_weights == "kaiming_uniform"
  text = help_entries(glue_args.build_parser())["--init_lora_weights"]
  assert "pissa_niter_K" not in text and "pissa_niter_<K>" in text and "alias kaiming" in text
  err = parse_error(capsys, glue_args, ["--init_lora_weights", "xavier"])
  assert "kaiming_uniform (alias kaiming)" in err and "pissa_niter_<K> (K a positive int)" in err


@pytest.mark.parametrize("script", SCRIPTS)
def test_transformers_bf16_is_the_bfloat16_dtype_and_fp16_names_it(capsys, tmp_path, script):
  module, needed = SCRIPTS[script]
  assert module.parse_args([*needed, "--bf16"]).dtype == "bfloat16"
  assert module.parse_args(needed).dtype == "float32"
  config = tmp_path / "c.yaml"
  config.write_text("bf16: true\n")
  assert module.parse_args([*needed, "--config", str(config)]).dtype == "bfloat16"
  err = parse_error(capsys, module, [*needed, "--fp16"])
  assert "argument --fp16: float16 compute is not supported" in err and "use --bf16" in err


def test_a_nan_in_a_config_file_names_the_file_and_key(capsys, tmp_path):
  config = tmp_path / "c.yaml"
  config.write_text("lora_r: 4\nlearning_rate: .nan\n")
  err = parse_error(capsys, glue_args, ["--config", str(config)])
  assert f"(learning_rate in {str(config)!r})" in err
  assert "argument --learning_rate: invalid positive float value: 'nan'" in err


class _FakeTask:
  """A task module for run_script: records the runs that reached it."""

  runs: list = []

  @staticmethod
  def train_and_evaluate(args, on_step=None):
    _FakeTask.runs.append(sorted(p.name for p in pathlib.Path(args.output_dir).iterdir()))
    return {"step": 1}


def test_a_rerun_with_another_setting_needs_overwrite_output_dir(capsys, tmp_path, monkeypatch):
  """Same settings: the run resumes (reaches the task); a changed hyperparameter: one line
  naming it and --overwrite_output_dir; with that flag: the old run is deleted, then it runs."""
  from train.cli.flags import as_dict
  from train.cli.main import run_script

  monkeypatch.setitem(sys.modules, "fake_task", _FakeTask)
  _FakeTask.runs = []
  out = tmp_path / "out"
  base = ["--output_dir", str(out), "--learning_rate", "1e-3"]
  out.mkdir()
  (out / "args.json").write_text(json.dumps(as_dict(glue_args.parse_args(base))))
  (out / "checkpoints").mkdir()

  def run(*extra):
    return run_script("run_glue.py", glue_args.parse_args, "fake_task", [*base, *extra])

  assert run("--logging_steps", "5", "--no-progress") == 0  # how it reports: still the same run
  assert _FakeTask.runs == [["args.json", "checkpoints", "run.lock"]]
  capsys.readouterr()
  assert run("--learning_rate", "5e-4") == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1, err
  assert "learning_rate: 0.001 there, 0.0005 now" in err and "--overwrite_output_dir" in err
  assert len(_FakeTask.runs) == 1 and (out / "checkpoints").exists()
  assert run("--learning_rate", "5e-4", "--overwrite_output_dir") == 0
  assert _FakeTask.runs[-1] == ["run.lock"]  # the old run is gone before the new one starts


def test_the_base_rewriting_starts_are_the_librarys():
  """flags.rewrites_base (jax-free, for the flag checks) says what the library's init parser
  says of every --init_lora_weights kind."""
  from lora_jax._src import inits

  for kind in ("gaussian", "kaiming_uniform", "pissa", "pissa_niter_4", "olora"):
    assert flags.rewrites_base(kind) == inits.parse(kind).rewrites_base, kind
