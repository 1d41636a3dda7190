"""Faults around a training run (issue 14): what the scripts guarantee.

* a non-finite loss stops the run at that step with one line, and nothing from that step on is
  saved, exported or reported;
* a damaged checkpoint is named and skipped for the newest intact one; none intact is one line;
* a SIGKILL in the middle of a metrics write resumes cleanly;
* one writer per output directory; a stale lock does not block;
* a finished run is left alone; a resume with other training settings is refused before any
  file is written; adapters with NaN are never written.

On the tiny random BERT of ``test_glue_train.py`` (in process: a few seconds a run).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types

import numpy as np
import pytest
from conftest import REPO
from test_glue_train import run_args
from test_glue_train import write_tiny_bert

import lora_jax
from train.engine import checkpoints
from train.engine import loop
from train.engine import outputs
from train.engine import rundir
from train.tasks.glue import pipeline as glue_train


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, sst2_dir):
  return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), sst2_dir, dropout=0.0)


def steps_logged(out: pathlib.Path) -> list[int]:
  return [r["step"] for r in outputs.read_jsonl(out / outputs.METRICS) if "loss" in r]


def checkpoint_steps(out: pathlib.Path) -> list[str]:
  return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit())


# ---------------------------------------------------------------------------------------------
# Principle 1: never a non-finite result.


class FakeParallel:
  """``fit``'s view of a parallel mode: a step whose loss is NaN from ``bad_step`` on."""

  def __init__(self, bad_step: int):
    self.bad_step = bad_step

  def host(self, x):
    return x

  def put_batch(self, batch):
    return batch

  def train(self, state, frozen, batch):
    step = state.step + 1
    loss = float("nan") if step >= self.bad_step else 1.0 / step
    return types.SimpleNamespace(step=step), {"loss": np.float32(loss), "grad_norm": 1.0}


class Record(loop.Hook):
  """A hook that keeps the logged rows and the saved steps."""

  def __init__(self):
    self.logged, self.saved = [], []

  def on_log(self, row):
    self.logged.append(row)

  def on_save(self, step, state):
    self.saved.append(step)


@pytest.mark.parametrize("logging_steps", [1, 5])
def test_fit_stops_at_the_first_non_finite_step_and_saves_nothing_from_it(logging_steps):
  record = Record()
  config = loop.LoopConfig(10, 1, logging_steps, 0, 2, progress=False)
  with pytest.raises(loop.Diverged, match=r"^the training loss is nan at step 5 \(learning rate"):
    loop.fit(
      FakeParallel(bad_step=5),
      types.SimpleNamespace(step=0),
      None,
      iter(lambda: {}, None),
      config,
      [record],
      schedule=lambda i: 0.1,
      counts=lambda b: (1, 1),
    )
  assert record.saved == [2, 4]
  assert [r["step"] for r in record.logged] == ([1, 2, 3, 4] if logging_steps == 1 else [])


@pytest.mark.parametrize("logging_steps", [1, 2])
def test_fit_leaves_the_on_step_hook_out_of_the_logged_step_times(logging_steps):
  # bench/clm_recipe.py's lockstep waits for its turn in on_step: not training time
  record = Record()
  loop.fit(
    FakeParallel(bad_step=100),
    types.SimpleNamespace(step=0),
    None,
    iter(lambda: {}, None),
    loop.LoopConfig(4, 1, logging_steps, 0, 0, progress=False),
    [record, loop.StepCallback(lambda step: time.sleep(0.25))],
    schedule=lambda i: 0.1,
    counts=lambda b: (1, 1),
  )
  logged = record.logged
  assert [r["step"] for r in logged] == [1, 2, 3, 4][logging_steps - 1 :: logging_steps]
  assert all(r["s_per_step"] < 0.05 for r in logged), logged


def test_a_diverging_run_ends_with_one_line_and_keeps_the_checkpoints_before(
  tiny_bert, sst2_dir, tmp_path, capsys
):
  from train import run_glue

  out = tmp_path / "out"
  argv = vars_argv(run_args(tiny_bert, sst2_dir, out, "--learning_rate", "1e30"))
  argv += ["--max_steps", "8", "--save_steps", "1", "--save_total_limit", "0", "--export_merged"]
  code = run_glue.main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1, err
  assert "the training loss is nan at step" in err[0] and "lower --learning_rate" in err[0]
  bad = int(err[0].split(" at step ")[1].split()[0])
  assert 1 < bad <= 8 and checkpoint_steps(out) == [str(s) for s in range(1, bad)]
  for name in ("eval_results.json", "adapter", "merged"):
    assert not (out / name).exists(), name


def test_adapters_with_nan_are_never_written(tmp_path):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  base = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 8)))
  params = lora_jax.lora_init(base, lora_jax.LoraRule(".*", rank=2), rng=jax.random.key(1))
  bad = jax.tree.map(lambda x: x, params)
  bad["params"]["lora_b"] = bad["params"]["lora_b"].at[0, 1].set(jnp.inf)
  with pytest.raises(FloatingPointError, match="params/lora_b holds 1 non-finite"):
    lora_jax.save_adapter(tmp_path / "ours", bad)
  with pytest.raises(FloatingPointError, match="params/lora_b holds 1 non-finite"):
    lora_jax.export_peft(tmp_path / "peft", bad, base_model_name_or_path="x", task_type=None)
  assert not (tmp_path / "ours").exists() and not (tmp_path / "peft").exists()
  lora_jax.save_adapter(tmp_path / "ours", params)  # finite: written


# ---------------------------------------------------------------------------------------------
# Principles 2 and 3: checked checkpoints; a crash at any moment resumes.


def vars_argv(args) -> list[str]:
  """``run_glue.py`` flags that reproduce ``args`` (the parts ``run_args`` sets)."""
  keep = ("model_name_or_path", "train_file", "validation_file", "max_train_samples",
          "max_eval_samples", "max_seq_length", "per_device_train_batch_size",
          "per_device_eval_batch_size", "lora_r", "logging_steps", "output_dir",
          "learning_rate")  # fmt: skip
  argv = ["--no-progress"]
  for key in keep:
    argv += [f"--{key}", str(getattr(args, key))]
  return argv


def corrupt_arrays(step_dir: pathlib.Path) -> None:
  """Flips a byte range in the middle of every array data file of a checkpoint."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size > 64]
  files = [p for p in files if "d" in p.parts or p.parent.name == "d"] or files
  assert files, list((step_dir / "state").rglob("*"))
  for p in files:
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(255 - b for b in data[mid : mid + 16])
    p.write_bytes(bytes(data))


SIX_STEPS = ("--max_steps", "6", "--save_steps", "2")


@pytest.fixture(scope="module")
def crashed_at_5(tiny_bert, sst2_dir, tmp_path_factory):
  """``(whole run's eval results, a run's folder after a crash at step 5)``: checkpoints 2, 4."""
  tmp = tmp_path_factory.mktemp("crashed")
  whole = glue_train.train_and_evaluate(run_args(tiny_bert, sst2_dir, tmp / "whole", *SIX_STEPS))

  def crash(step):
    if step == 5:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    glue_train.train_and_evaluate(
      run_args(tiny_bert, sst2_dir, tmp / "parts", *SIX_STEPS), on_step=crash
    )
  assert checkpoint_steps(tmp / "parts") == ["2", "4"]
  return whole, tmp / "parts"


@pytest.mark.parametrize("damage", ["array bytes", "meta json", "arrays of another step"])
def test_a_damaged_newest_checkpoint_is_named_and_the_newest_intact_one_used(
  tiny_bert, sst2_dir, tmp_path, caplog, damage, crashed_at_5
):
  caplog.set_level(logging.INFO)
  whole, crashed = crashed_at_5
  parts_out = tmp_path / "parts"
  shutil.copytree(crashed, parts_out)
  if damage == "array bytes":  # caught by tensorstore's own checksums
    corrupt_arrays(parts_out / "checkpoints" / "4")
  elif damage == "arrays of another step":  # readable, but not what step 4 saved: our CRC-32s
    shutil.rmtree(parts_out / "checkpoints" / "4" / "state")
    shutil.copytree(
      parts_out / "checkpoints" / "2" / "state", parts_out / "checkpoints" / "4" / "state"
    )
  else:
    (parts_out / "checkpoints" / "4" / "meta" / "metadata").write_text("{'not': json")
  caplog.clear()
  resumed = glue_train.train_and_evaluate(run_args(tiny_bert, sst2_dir, parts_out, *SIX_STEPS))
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any(f"{parts_out / 'checkpoints' / '4'} is damaged" in w for w in warnings), warnings
  if damage == "arrays of another step":  # the arrays named, not cut at "CRC-32 check:)"
    assert any(re.search(r"array\(s\) fail their CRC-32 check: \w+/\S+", w) for w in warnings), (
      warnings
    )
  assert any("resuming from" in r.getMessage() and "step 2 of 6" in r.getMessage()
             for r in caplog.records)  # fmt: skip
  assert (parts_out / "checkpoints" / checkpoints.DAMAGED / "4").is_dir()
  assert checkpoint_steps(parts_out) == ["4", "6"]  # rewritten from the intact step 2
  assert resumed["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-5)
  assert steps_logged(parts_out) == list(range(1, 7))


def test_no_intact_checkpoint_is_one_line_naming_the_folder(tiny_bert, sst2_dir, tmp_path, capsys):
  from train import run_glue

  out = tmp_path / "out"
  argv = vars_argv(run_args(tiny_bert, sst2_dir, out, "--learning_rate", "1e-3"))
  assert run_glue.main([*argv, "--max_steps", "2", "--save_steps", "1"]) == 0
  for step in ("1", "2"):
    (out / "checkpoints" / step / "meta" / "metadata").write_text("")
  (out / "eval_results.json").unlink()
  capsys.readouterr()
  assert run_glue.main([*argv, "--max_steps", "2", "--save_steps", "1"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"delete {out / 'checkpoints'} to start the run over" in err[0], err


KILL_IN_METRICS_WRITE = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from train import run_glue
from train.engine import outputs

write = outputs.MetricsLog.write

def torn(self, row):
  if row.get("step") == {step} and "loss" in row:  # half a line, then SIGKILL
    with self.path.open("a") as f:
      f.write(outputs.json.dumps(row)[:12])
    os.kill(os.getpid(), signal.SIGKILL)
  write(self, row)

outputs.MetricsLog.write = torn
sys.exit(run_glue.main({argv!r}))
"""


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_metrics_write_resumes(tiny_bert, sst2_dir, tmp_path):
  from train import run_glue

  out = tmp_path / "out"
  argv = vars_argv(run_args(tiny_bert, sst2_dir, out, "--learning_rate", "1e-3"))
  argv += ["--max_steps", "5", "--save_steps", "2"]
  script = KILL_IN_METRICS_WRITE.format(repo=str(REPO), step=4, argv=argv)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert not (out / outputs.METRICS).read_text().endswith("\n")  # torn
  assert (out / rundir.LOCK).exists()  # the killed run's lock is left behind
  assert run_glue.main(argv) == 0  # stale lock taken over; resumes from step 2
  assert steps_logged(out) == [1, 2, 3, 4, 5]
  assert not (out / rundir.LOCK).exists()


# ---------------------------------------------------------------------------------------------
# Principle 4: one writer per output directory.

HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from train.engine import rundir
with rundir.claim({out!r}):
  print("held", flush=True)
  time.sleep(120)
"""


def test_a_second_run_on_a_directory_in_use_fails_at_once_and_touches_nothing(
  tiny_bert, sst2_dir, tmp_path, capsys
):
  from train import run_glue

  out = tmp_path / "out"
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLD.format(repo=str(REPO), out=str(out))], stdout=subprocess.PIPE,
    text=True,
  )  # fmt: skip
  try:
    assert holder.stdout.readline().strip() == "held"
    before = sorted(p.name for p in out.iterdir())
    code = run_glue.main(vars_argv(run_args(tiny_bert, sst2_dir, out, "--learning_rate", "1e-3")))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"is in use by another run (pid {holder.pid} on host" in err[0]
    assert sorted(p.name for p in out.iterdir()) == before == [rundir.LOCK]
  finally:
    holder.kill()
    holder.wait()


def test_a_stale_lock_is_taken_over_and_a_reused_pid_is_not_mistaken_for_its_run(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True)  # fmt: skip
  lock = tmp_path / rundir.LOCK
  lock.write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename, "time": 0}))
  with rundir.claim(tmp_path):
    assert json.loads(lock.read_text())["pid"] == os.getpid()
  assert not lock.exists()
  # a live pid that started after the lock was written (pid reuse) is not the lock's run
  ticks = rundir._start_ticks(os.getpid())
  lock.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                              "start_ticks": ticks - 1, "time": 0}))  # fmt: skip
  with rundir.claim(tmp_path):
    pass
  # another host's lock cannot be checked from here: it blocks, naming the host
  lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "time": 0}))
  with pytest.raises(rundir.DirectoryInUse, match="pid 1 on host 'elsewhere'"):
    with rundir.claim(tmp_path):
      pass


def test_an_output_dir_that_is_a_file_is_one_line(tiny_bert, sst2_dir, tmp_path, capsys):
  from train import run_glue

  out = tmp_path / "a_file"
  out.write_text("x")
  assert run_glue.main(vars_argv(run_args(tiny_bert, sst2_dir, out))) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"run_glue.py: error: --output_dir {str(out)!r} is a file, not a folder: name "
                 "a folder"]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Finished runs and resumes with other settings.


def test_rerunning_a_finished_run_changes_nothing(tiny_bert, sst2_dir, tmp_path, caplog):
  caplog.set_level(logging.INFO)
  out = tmp_path / "out"
  args = run_args(tiny_bert, sst2_dir, out, "--max_steps", "3")
  first = glue_train.train_and_evaluate(args)
  files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  again = glue_train.train_and_evaluate(args)
  assert again == first
  assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
  assert any("already finished (step 3 of 3" in r.getMessage() for r in caplog.records)


FOUR_STEPS = ("--max_steps", "4", "--save_steps", "1")


@pytest.fixture(scope="module")
def crashed_at_2(tiny_bert, sst2_dir, tmp_path_factory):
  """A run's folder after a crash at step 2 of 4 (checkpoints 1 and 2)."""
  out = tmp_path_factory.mktemp("crashed_at_2") / "out"

  def crash(step):
    if step == 2:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    glue_train.train_and_evaluate(run_args(tiny_bert, sst2_dir, out, *FOUR_STEPS), on_step=crash)
  return out


def edited_train_file(sst2_dir: pathlib.Path, folder: pathlib.Path) -> str:
  """SST-2's training file with one sentence of the first 64 rows edited (the same row count)."""
  lines = (sst2_dir / "train.tsv").read_text().splitlines(keepends=True)
  sentence, label = lines[5].rstrip("\n").split("\t")
  lines[5] = f"the {sentence}\t{label}\n"  # at the start: rows are cut to 16 tokens
  path = folder / "train.tsv"
  path.write_text("".join(lines))
  return str(path)


# Every input that shapes the updates or the batches a step sees, with the name and both values
# the refusal must give (Principle 1: a resume with another one would silently mix two runs).
RESUME_CHANGES = [
  (("--max_steps", "8"), "total_steps: checkpoint 4, this run 8"),
  (("--max_steps", "0", "--num_train_epochs", "1"), "total_steps: checkpoint 4, this run 8"),
  (("--learning_rate", "0.5"), "learning_rate: checkpoint 0.0005, this run 0.5"),
  (("--warmup_ratio", "0.5"), "warmup_ratio: checkpoint 0.06, this run 0.5"),
  (("--weight_decay", "0.1"), "weight_decay: checkpoint 0.01, this run 0.1"),
  (("--gradient_accumulation_steps", "2"), "gradient_accumulation_steps: checkpoint 1, this run 2"),
  (("--seed", "7"), "seed: checkpoint 42, this run 7"),
  (("--dtype", "bfloat16"), "dtype: checkpoint 'float32', this run 'bfloat16'"),
  (("--loraplus_lr_ratio", "4"), "loraplus_lr_ratio: checkpoint None, this run 4.0"),
  (("--per_device_train_batch_size", "4"), "train_batch_size: checkpoint 8, this run 4"),
  (("--max_train_samples", "48"), "train_rows: checkpoint 64, this run 48"),
  (("--train_file", "EDITED"), "train_data: checkpoint 'CRC-32 "),
  (("--max_seq_length", "32"), "max_seq_length: checkpoint 16, this run 32"),
  (("--no-pack_sequences",), "pack_sequences: checkpoint True, this run False"),
  (("--lora_dropout", "0.2"), "dropout=0.2"),
  (("--lora_alpha", "32"), "alpha=32"),
]


@pytest.mark.parametrize(
  ("change", "named"), RESUME_CHANGES, ids=lambda x: " ".join(x) if isinstance(x, tuple) else None
)
def test_a_resume_with_any_changed_training_input_is_refused_naming_it(
  tiny_bert, sst2_dir, tmp_path, crashed_at_2, change, named
):
  out = tmp_path / "out"
  shutil.copytree(crashed_at_2, out)
  before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  change = [edited_train_file(sst2_dir, tmp_path) if v == "EDITED" else v for v in change]
  with pytest.raises(checkpoints.CheckpointMismatch) as refused:
    glue_train.train_and_evaluate(run_args(tiny_bert, sst2_dir, out, *FOUR_STEPS, *change))
  message = str(refused.value)
  assert "\n" not in message and named in message, message
  assert message.count(": checkpoint ") <= 3, message  # the input changed, not everything
  assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_resume_with_the_same_inputs_is_not_refused(tiny_bert, sst2_dir, tmp_path, crashed_at_2):
  out = tmp_path / "out"
  shutil.copytree(crashed_at_2, out)
  results = glue_train.train_and_evaluate(run_args(tiny_bert, sst2_dir, out, *FOUR_STEPS))
  assert results["step"] == 4 and results["train_steps"] == 2


def test_read_jsonl_drops_a_torn_last_line_and_refuses_a_damaged_middle(tmp_path, caplog):
  path = tmp_path / "m.jsonl"
  path.write_text('{"step": 1}\n{"step": 2}\n{"st')
  assert outputs.read_jsonl(path) == [{"step": 1}, {"step": 2}]
  assert "torn last line" in caplog.text
  path.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
  with pytest.raises(ValueError, match="line 2 is not JSON"):
    outputs.read_jsonl(path)


def test_whole_file_writes_leave_the_old_file_when_interrupted(tmp_path, monkeypatch):
  path = tmp_path / "eval_results.json"
  outputs.write_json(path, {"old": 1})

  def fail(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError):
    outputs.write_json(path, {"new": 2})
  assert json.loads(path.read_text()) == {"old": 1}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_results.json"]


def test_the_module_docs_hold(tmp_path):
  # the claim is released when its block ends, even by an exception
  with pytest.raises(RuntimeError), rundir.claim(tmp_path):
    raise RuntimeError
  assert not (tmp_path / rundir.LOCK).exists()
  assert textwrap.dedent(rundir.__doc__)


# ---------------------------------------------------------------------------------------------
# Bad input found while setting up: one line, exit 2, nothing written.


def test_a_missing_model_folder_or_an_unreachable_hub_id_is_one_line(
  tiny_bert, sst2_dir, tmp_path, capsys
):
  from train import run_glue

  out = tmp_path / "out"
  argv = vars_argv(run_args(tiny_bert, sst2_dir, out))
  argv[argv.index("--model_name_or_path") + 1] = "./no/such/dir"
  assert run_glue.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["run_glue.py: error: --model_name_or_path './no/such/dir' does not exist (no such "
                 "folder)"]  # fmt: skip
  # a Hub id, offline (as with no network, without the wait): says so, and leaves no args.json
  argv[argv.index("--model_name_or_path") + 1] = "no-such-org/no-such-model"
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  proc = subprocess.run([sys.executable, str(REPO / "train" / "run_glue.py"), *argv],
                        capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
  lines = [x for x in proc.stderr.strip().splitlines() if "error" in x.lower()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith(
    "run_glue.py: error: --model_name_or_path 'no-such-org/no-such-model' is not a local folder, "
    "and the Hugging Face Hub could not provide it"
  ), lines
  assert not out.exists() or not (out / "args.json").exists()


def test_the_head_as_a_lora_target_says_it_is_trained_whole(tiny_bert, sst2_dir, tmp_path, capsys):
  from train import run_glue

  argv = vars_argv(run_args(tiny_bert, sst2_dir, tmp_path / "out"))
  assert run_glue.main([*argv, "--lora_target_modules", "query", "classifier"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert (
    len(err) == 1
    and "'classifier' names the classification head, which is trained whole" in (err[0])
  ), err


DAMAGED_RESTORE = """
import sys
sys.path.insert(0, {repo!r})
import jax, numpy as np, optax
from test_run_faults import corrupt_arrays
from train.engine import checkpoints, state as state_lib
state = jax.tree.map(np.asarray, state_lib.init_state({{"a": np.ones((4, 3), np.float32)}},
                                                       optax.adam(1e-3), 0))
ckpt = checkpoints.Checkpointer({folder!r}, {{"run": 1}})
ckpt.save(1, state)
ckpt.save(2, state)
ckpt.wait()
corrupt_arrays(ckpt.directory / "2")
print(checkpoints.Checkpointer({folder!r}, {{"run": 1}}).restore_latest(state)[0])
"""


def test_a_failed_orbax_read_leaves_no_stray_event_loop_traceback(tmp_path):
  script = DAMAGED_RESTORE.format(repo=str(REPO), folder=str(tmp_path / "ckpt"))
  env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
  assert proc.returncode == 0 and proc.stdout.strip() == "1", proc.stderr[-2000:]
  assert "is damaged" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


FULL_DISK_SAVE = """
import logging, resource, signal, sys
sys.path.insert(0, {repo!r})
import jax, numpy as np, optax
from train.engine import checkpoints, state as state_lib
logging.basicConfig(level=logging.WARNING)
weights = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)  # 256 kB
state = jax.tree.map(np.asarray, state_lib.init_state({{"a": weights}}, optax.adam(1e-3), 0))
ckpt = checkpoints.Checkpointer({folder!r}, {{"run": 1}}, max_to_keep=1)
ckpt.save(1, state)
ckpt.wait()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:  # as train.cli.main and train.engine.run hold a run
  with checkpoints.quiet_closed_event_loops(), checkpoints.orbax_errors_held():
    ckpt.save(2, state)
    ckpt.wait()
except checkpoints.CheckpointWriteFailed as e:
  print(e, file=sys.stderr)
step, restored, _ = checkpoints.Checkpointer({folder!r}, {{"run": 1}}).restore_latest(state)
print(step, np.array_equal(restored.trainable["a"], weights))
"""


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_one_before(tmp_path):
  """A write past RLIMIT_FSIZE fails with EFBIG, as on a full disk: Orbax's background threads
  logged it with tracebacks (about 300 lines in a run); now :class:`CheckpointWriteFailed` says
  it in one line, the partial folder is gone and the checkpoint before it (which the failed save
  was to replace: max_to_keep=1) is restored as it was saved."""
  folder = tmp_path / "ckpt"
  script = FULL_DISK_SAVE.format(repo=str(REPO), folder=str(folder))
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  assert proc.returncode == 0 and proc.stdout.split() == ["1", "True"], proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines() == [
    f"could not write checkpoint 2 in {folder} (File too large): is the disk full? checkpoint 1 "
    "is intact: free space, then rerun the same command to resume"
  ], proc.stderr[-3000:]
  assert sorted(p.name for p in folder.iterdir()) == ["1"]  # no partial 2


def test_a_failed_save_removes_files_its_other_writes_add_after_the_error(tmp_path):
  """Orbax raises the first failed write while TensorStore's threads finish the others, which
  add files to the partial folder after it was first removed (CI once kept
  ``4.orbax-checkpoint-tmp`` beside checkpoint 2): the removal waits until none comes back."""
  ckpt = checkpoints.Checkpointer(tmp_path, {"run": 1})

  def late_writes():  # as the writes that were still going when the failure was raised
    for i in range(4):
      part = tmp_path / f"2{checkpoints.TMP}" / "state" / f"d{i}"
      part.mkdir(parents=True, exist_ok=True)
      (part / "chunk").write_bytes(b"x")
      time.sleep(0.1)

  writer = threading.Thread(target=late_writes)
  writer.start()
  time.sleep(0.05)  # the folder exists when the failure arrives
  ckpt._remove_partials()
  writer.join()
  assert list(tmp_path.iterdir()) == []


def test_orbax_error_records_are_dropped_for_a_failed_write_only(caplog):
  """Held while the block runs; logged when it ends, unless it ends in the one-line
  CheckpointWriteFailed that says what they say. Other loggers' errors pass at once."""
  absl = logging.getLogger("absl")

  def orbax_error(message):  # as Orbax's threads log through absl
    path = os.path.join(os.sep, "site-packages", "orbax", "future.py")
    absl.handle(logging.LogRecord("absl", logging.ERROR, path, 1, message, None, None))

  with checkpoints.orbax_errors_held():
    orbax_error("a failure nobody raised")
    logging.getLogger("train").error("not Orbax's")
    assert "a failure nobody raised" not in caplog.text and "not Orbax's" in caplog.text
  assert "a failure nobody raised" in caplog.text
  with pytest.raises(checkpoints.CheckpointWriteFailed):
    with checkpoints.orbax_errors_held():
      orbax_error("said by the one line")
      raise checkpoints.CheckpointWriteFailed("could not write checkpoint 2")
  assert "said by the one line" not in caplog.text


@pytest.mark.slow  # a whole run_clm.py run to its divergence (~15 s); run_glue.py's: above
def test_run_clm_shares_the_guarantees(tmp_path, capsys):
  """The same machinery under ``run_clm.py``: a diverging run is one line and writes no adapter
  nor results; a directory in use is refused before anything else."""
  from train import run_clm

  out = tmp_path / "out"
  argv = ["--config", str(REPO / "configs" / "clm_quickstart.yaml"), "--output_dir", str(out),
          "--no-progress", "--max_steps", "4", "--learning_rate", "1e30",
          "--generation_prompts_file", "", "--no-eval_on_start"]  # fmt: skip
  assert run_clm.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "the training diverged; lower --learning_rate" in err[0], err
  assert not (out / "adapter").exists() and not (out / "eval_results.json").exists()
  with rundir.claim(out):  # held (by this process, standing in for another run)
    assert run_clm.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"is in use by another run (pid {os.getpid()}" in err[0], err


# ---------------------------------------------------------------------------------------------
# Principle 2: out-of-range input is refused (or fitted) where it enters.


def test_max_seq_length_past_the_models_positions_is_lowered_with_a_warning(
  tiny_bert, sst2_dir, tmp_path, caplog
):
  """``--max_seq_length 128`` on the tiny BERT's 64 positions: rows longer than the position
  table looked positions up out of range and stopped at step 1 with a false NaN diagnosis."""
  caplog.set_level(logging.WARNING)
  out = tmp_path / "out"
  lines = (sst2_dir / "train.tsv").read_text().splitlines(keepends=True)[:65]
  lines[1:1] = [" ".join(["a fine film"] * 30) + "\t1\n"] * 8  # 90 words: a whole first batch
  (tmp_path / "train.tsv").write_text("".join(lines))
  flags = (
    "--max_seq_length",
    "128",
    "--max_steps",
    "2",
    "--train_file",
    str(tmp_path / "train.tsv"),
  )
  results = glue_train.train_and_evaluate(run_args(tiny_bert, sst2_dir, out, *flags))
  assert results["step"] == 2 and np.isfinite(results["eval_loss"])
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert (
    "--max_seq_length 128 is longer than the model's 64 positions (max_position_embeddings): "
    "using 64" in warnings
  ), warnings
  assert json.loads((out / "args.json").read_text())["max_seq_length"] == 64


def test_a_tokenizer_past_the_models_vocabulary_is_one_line(tiny_bert, sst2_dir, tmp_path, capsys):
  """The tiny BERT's ~400-token tokenizer on a model of 100 embedding rows: ids past the table
  gave NaN at step 1; now refused at setup naming both sizes, before any data is read."""
  import jax
  import transformers
  from safetensors.numpy import save_file

  from lora_jax import models
  from train import run_glue

  small = tmp_path / "small_vocab"
  shutil.copytree(tiny_bert, small)
  config = transformers.AutoConfig.from_pretrained(small)
  config.vocab_size = 100
  config.save_pretrained(small)
  variables = models.auto_model(config).init(jax.random.key(0), np.ones((1, 4), np.int32))
  save_file(models.flax_to_hf(variables, config), str(small / "model.safetensors"))
  tokens = len(transformers.AutoTokenizer.from_pretrained(small))
  args = run_args(small, sst2_dir, tmp_path / "out", "--max_steps", "1")
  argv = vars_argv(args)
  assert run_glue.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert (
    f"the tokenizer (--tokenizer_name) has {tokens} tokens, more than the model's vocabulary of "
    f"100 (vocab_size): ids 100 to {tokens - 1} would index past its embedding table" in err[0]
  ), err
  assert not (tmp_path / "out" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# run_clm.py on small datasets and odd rows.

QUICKSTART = REPO / "configs" / "clm_quickstart"


def clm_defaults(out: pathlib.Path, train_file: pathlib.Path, *extra) -> list[str]:
  """run_clm.py with its defaults on the quickstart's model and tokenizer (offline)."""
  return ["--config_name", str(QUICKSTART), "--tokenizer_name", str(QUICKSTART),
          "--train_file", str(train_file), "--output_dir", str(out), "--no-progress",
          *extra]  # fmt: skip


def quickstart_rows(tmp_path: pathlib.Path, n: int, name="train.jsonl") -> pathlib.Path:
  path = tmp_path / name
  path.write_text("".join((QUICKSTART / "train.jsonl").read_text().splitlines(True)[:n]))
  return path


@pytest.mark.slow  # a whole run_clm.py run of 3 epochs on 512-token rows (~15 s)
def test_run_clm_with_its_defaults_trains_on_40_rows(tmp_path, caplog):
  """Its defaults (512-token packed rows, 8 a batch) make 2 rows of 40 short conversations:
  "fewer than one global batch" before; now the batch is lowered to fit, with a warning."""
  from train import run_clm

  out = tmp_path / "out"
  caplog.set_level(logging.WARNING)
  assert run_clm.main(clm_defaults(out, quickstart_rows(tmp_path, 40))) == 0
  err = "\n".join(r.getMessage() for r in caplog.records)
  assert re.search(
    r"the training set makes (\d+) packed rows, fewer than one optimizer step of "
    r"--per_device_train_batch_size 8 x 1 device\(s\) x 1 \(--gradient_accumulation_steps\): "
    r"using --per_device_train_batch_size \1",
    err,
  ), err
  rows = json.loads((out / "args.json").read_text())["per_device_train_batch_size"]
  assert 1 <= rows < 8
  assert json.loads((out / "eval_results.json").read_text())["step"] == 3  # 3 epochs


def test_run_clm_says_which_accumulation_fits_a_tiny_dataset(tmp_path, capsys):
  from train import run_clm

  argv = clm_defaults(tmp_path / "out", quickstart_rows(tmp_path, 40))
  assert run_clm.main([*argv, "--gradient_accumulation_steps", "64"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert re.search(
    r"the training set makes (\d+) packed rows, fewer than one optimizer step of 1 device\(s\) "
    r"x 1 row x 64 \(--gradient_accumulation_steps\) takes: use --gradient_accumulation_steps "
    r"\1 or less, or add data",
    err[0],
  ), err


@pytest.mark.slow  # two whole run_clm.py runs (~14 s)
def test_conversations_opening_with_an_assistant_turn_are_skipped_and_counted(
  tmp_path, caplog, capsys
):
  """An opening assistant turn refused the whole dataset with transformers' "Cannot apply chat
  template to an empty conversation", naming neither file nor row. Chosen: such rows are skipped
  (completion-only loss has no turn for the reply to answer), counted in a warning naming the
  file and the rows; all of them skipped is one line."""
  from train import run_clm

  train = quickstart_rows(tmp_path, 40)
  lines = train.read_text().splitlines(True)
  for i in (2, 7):
    row = json.loads(lines[i])
    row["messages"] = [{"role": "assistant", "content": "hello"}, *row["messages"]]
    lines[i] = json.dumps(row) + "\n"
  train.write_text("".join(lines))
  caplog.set_level(logging.WARNING)
  argv = clm_defaults(tmp_path / "out", train, "--max_seq_length", "64", "--max_steps", "1",
                      "--validation_file", str(QUICKSTART / "validation.jsonl"))  # fmt: skip
  assert run_clm.main(argv) == 0
  assert (
    f"{str(train)!r} (the train split): skipped 2 of 40 conversations that open with an "
    "assistant turn (rows 2, 7, from 0)" in caplog.text
  ), caplog.text

  only = tmp_path / "only.jsonl"
  only.write_text(lines[2] * 3)
  argv = clm_defaults(tmp_path / "out2", only, "--validation_split_percentage", "0")
  capsys.readouterr()
  assert run_clm.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert (
    len(err) == 1 and f"{str(only)!r} (the train split): all of its 3 conversations open " in err[0]
  ), err


@pytest.mark.parametrize(
  ("text", "named"),
  [
    ('{"prompt": "a"}\n{"prompt": "b",\n', "line 2 is not JSON"),
    ('{"prompt": "a"}\n\n["b"]\n', "line 3 has no string 'prompt' field"),
  ],
)
def test_a_broken_prompts_line_is_named_with_its_file_and_line(tmp_path, text, named):
  """A broken second line said "line 1" (json's own, within the line) and named no file."""
  from train.tasks.clm import sampler

  path = tmp_path / "prompts.jsonl"
  path.write_text(text)
  with pytest.raises(ValueError) as e:
    sampler.read_prompts(str(path))
  assert str(e.value).startswith(f"--generation_prompts_file {str(path)!r}: {named}"), e.value


# ---------------------------------------------------------------------------------------------
# run_clm.py's own inputs in a resumed run's signature (issue 27).

CLM_FOUR_STEPS = ("--max_steps", "4", "--save_steps", "1", "--per_device_train_batch_size", "4")


def clm_quick(out: pathlib.Path, train_file: pathlib.Path, *extra) -> list[str]:
  """The quickstart's config (cosine schedule, 64-token packed conversations, scanned layers) on
  ``train_file``, 4 steps, a checkpoint each; no evaluation data nor samples."""
  return ["--config", str(REPO / "configs" / "clm_quickstart.yaml"), "--train_file",
          str(train_file), "--validation_file", "", "--validation_split_percentage", "0",
          "--generation_prompts_file", "", "--output_dir", str(out), "--no-progress",
          *CLM_FOUR_STEPS, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def clm_crashed_at_2(tmp_path_factory):
  """A run_clm.py folder after a Ctrl-C at step 2 of 4 (checkpoint 2), and its data."""
  from train.cli.main import run_script
  from train.tasks.clm import args as clm_args

  folder = tmp_path_factory.mktemp("clm_crashed_at_2")
  train = quickstart_rows(folder, 64)

  def ctrl_c(step):
    if step == 2:
      raise KeyboardInterrupt

  argv = clm_quick(folder / "out", train)
  assert (
    run_script("run_clm.py", clm_args.parse_args, "train.tasks.clm.pipeline", argv, ctrl_c) == 130
  )
  assert checkpoint_steps(folder / "out") == ["2"]  # save_total_limit: 1
  return folder / "out", train


def edited_chat_template(folder: pathlib.Path) -> str:
  """The quickstart's tokenizer with ``role : content`` turned into ``role : : content`` (one
  more token a turn; ``role: content`` would give the same tokens)."""
  copy = folder / "tokenizer"
  shutil.copytree(QUICKSTART, copy)
  config = json.loads((copy / "tokenizer_config.json").read_text())
  config["chat_template"] = config["chat_template"].replace("}} : {{", "}} : : {{")
  (copy / "tokenizer_config.json").write_text(json.dumps(config))
  return str(copy)


def edited_conversation(train: pathlib.Path, folder: pathlib.Path) -> str:
  """``train`` with one reply of the first rows edited (the same row count)."""
  lines = train.read_text().splitlines(keepends=True)
  lines[5] = lines[5].replace('"assistant", "content": "', '"assistant", "content": "0 ')
  path = folder / "edited.jsonl"
  path.write_text("".join(lines))
  return str(path)


# run_clm.py's own inputs that shape the updates or the batches (the shared ones: above, on
# run_glue.py), with the name and both values its refusal must give.
CLM_RESUME_CHANGES = [
  (("--lr_scheduler_type", "linear"), "lr_scheduler_type: checkpoint 'cosine', this run 'linear'"),
  (("--max_grad_norm", "0.5"), "max_grad_norm: checkpoint 1.0, this run 0.5"),
  (("--max_grad_norm", "0"), "max_grad_norm: checkpoint 1.0, this run None"),
  (("--max_seq_length", "48"), "max_seq_length: checkpoint 64, this run 48"),
  (("--no-packing",), "packing: checkpoint True, this run False"),
  (("--no-scan_layers",), "scan_layers: checkpoint True, this run False"),
  (("--per_device_train_batch_size", "2"), "train_batch_size: checkpoint 4, this run 2"),
  (("--max_train_samples", "48"), "train_rows: checkpoint 64, this run 48"),
  (("--no-completion_only_loss",), "train_data: checkpoint 'CRC-32 "),
  (("--tokenizer_name", "TEMPLATE"), "train_data: checkpoint 'CRC-32 "),
  (("--train_file", "EDITED"), "train_data: checkpoint 'CRC-32 "),
]


@pytest.mark.parametrize(
  ("change", "named"),
  CLM_RESUME_CHANGES,
  ids=lambda x: " ".join(x) if isinstance(x, tuple) else None,
)
def test_a_run_clm_resume_with_a_changed_input_is_one_line_naming_it(
  tmp_path, clm_crashed_at_2, capsys, change, named
):
  """Refused by the checkpoints' signature, before a step is compiled: exit 2, one line, the
  folder untouched. The run's args.json is removed first, so the flags' own check (which names
  a changed flag before the checkpoints are read; :func:`rundir.check_rerun`) does not answer
  instead; for an edited file or chat template the signature is the only guard."""
  from train import run_clm

  crashed, train = clm_crashed_at_2
  out = tmp_path / "out"
  shutil.copytree(crashed, out)
  (out / rundir.RECORD).unlink()
  before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  swap = {"TEMPLATE": lambda: edited_chat_template(tmp_path),
          "EDITED": lambda: edited_conversation(train, tmp_path)}  # fmt: skip
  change = [swap[v]() if v in swap else v for v in change]
  capsys.readouterr()
  assert run_clm.main(clm_quick(out, train, *change)) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "refusing to resume" in err[0] and named in err[0], err
  if change != ["--no-scan_layers"]:  # scanning also stacks every layer's leaves: all named
    assert err[0].count(": checkpoint ") <= 3, err  # the input changed, not everything
  assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_run_clm_resume_with_the_same_inputs_is_not_refused(tmp_path, clm_crashed_at_2):
  from train import run_clm

  crashed, train = clm_crashed_at_2
  out = tmp_path / "out"
  shutil.copytree(crashed, out)
  assert run_clm.main(clm_quick(out, train)) == 0
  assert json.loads((out / "eval_results.json").read_text())["train_steps"] == 2


# ---------------------------------------------------------------------------------------------
# Every stop is one line: Ctrl-C, blocked malicious input.


def test_ctrl_c_is_one_line_and_exit_130_and_the_run_resumes(tiny_bert, sst2_dir, tmp_path, capsys):
  from train.cli.main import run_script
  from train.tasks.glue import args as glue_args

  out = tmp_path / "out"
  argv = vars_argv(run_args(tiny_bert, sst2_dir, out)) + ["--max_steps", "4", "--save_steps", "2"]

  def ctrl_c(step):
    if step == 3:
      raise KeyboardInterrupt

  assert run_script("run_glue.py", glue_args.parse_args, glue_train.__name__, argv, ctrl_c) == 130
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["run_glue.py: interrupted; rerun the same command to resume"], err
  assert checkpoint_steps(out) == ["2"]
  assert run_script("run_glue.py", glue_args.parse_args, glue_train.__name__, argv) == 0


class _Payload:
  def __reduce__(self):
    return (print, ("UNPICKLED CODE RAN",))


# A write past this many bytes fails with EFBIG, as on a full disk (no root needed); SIGXFSZ
# would kill the process instead: ignored, as the disk-full case has no signal.
FULL_DISK = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.argv = ["run_glue.py", *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


# 16 to 34 s on 2 shared CPU cores (three runs, one in a subprocess): slow; the Checkpointer's
# part is held by test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_one_before
@pytest.mark.slow
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(
  tiny_bert, sst2_dir, tmp_path, caplog
):
  """Orbax's background threads logged each failed write with its traceback (about 300 lines
  before the one-line error, which quoted TensorStore's spec); now one line naming the
  checkpoint, the folder and the OS's reason. The half-written checkpoint is removed, the one
  before it (with --save_total_limit 1) is kept as it was, and the same command resumes from it
  once there is room."""
  from train import run_glue
  from train.cli.main import run_script
  from train.tasks.glue import args as glue_args

  out = tmp_path / "out"
  argv = vars_argv(run_args(tiny_bert, sst2_dir, out)) + [
    "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "1"
  ]  # fmt: skip

  def ctrl_c(step):
    if step == 3:
      raise KeyboardInterrupt

  assert run_script("run_glue.py", glue_args.parse_args, glue_train.__name__, argv, ctrl_c) == 130
  kept = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
  biggest = max(len(b) for b in kept.values())
  limit = biggest // 2  # checkpoint 4's biggest file fails; args.json and metrics.jsonl fit
  assert max(p.stat().st_size for p in out.glob("*") if p.is_file()) < limit

  script = FULL_DISK.format(limit=limit, script=str(REPO / "train" / "run_glue.py"))
  proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True,
                        timeout=300)  # fmt: skip
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and len(err) <= 6, proc.stderr[-3000:]
  assert err[-1] == (
    f"run_glue.py: error: could not write checkpoint 4 in {out / 'checkpoints'} (File too "
    "large): is the disk full? checkpoint 2 is intact: free space, then rerun the same command "
    "to resume"
  ), err
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"]  # no partial 4
  assert {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()} == kept

  caplog.set_level(logging.INFO)
  assert run_glue.main(argv) == 0  # room again: the same command resumes from checkpoint 2
  assert f"resuming from {out / 'checkpoints' / '2'} (step 2 of 4)" in caplog.text


def test_a_pickled_pytorch_model_bin_is_refused_in_one_line(tiny_bert, sst2_dir, tmp_path, capsys):
  """A pytorch_model.bin whose pickle calls a function: torch.load(weights_only=True) refuses
  it; the refusal is one line (exit 2), not a traceback, and nothing runs."""
  import pickle

  from train import run_glue

  pytest.importorskip("torch")
  model = tmp_path / "model"
  shutil.copytree(tiny_bert, model)
  (model / "model.safetensors").unlink()
  (model / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload()}))
  assert run_glue.main(vars_argv(run_args(model, sst2_dir, tmp_path / "out"))) == 2
  captured = capsys.readouterr()
  err = captured.err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("run_glue.py: error: "), err
  assert "UNPICKLED CODE RAN" not in captured.out + captured.err


def test_a_dataset_script_is_refused_in_one_line_and_never_run(tmp_path, capsys):
  from train import run_clm

  script = tmp_path / "evil"
  script.mkdir()
  (script / "evil.py").write_text('raise SystemExit("DATASET SCRIPT RAN")\n')
  argv = clm_defaults(tmp_path / "out", tmp_path / "unused.jsonl")
  argv[argv.index("--train_file") : argv.index("--train_file") + 2] = [
    "--dataset_name",
    str(script),
  ]
  assert run_clm.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"--dataset_name {str(script)!r} is a dataset script" in err[0], err


# ---------------------------------------------------------------------------------------------
# What a run shows: curves and console.


def test_curves_plot_perplexity_and_exact_match_not_the_token_count():
  rows = [
    {"step": 1, "loss": 2.0, "learning_rate": 0.1},
    {"step": 1, "eval_loss": 1.0, "perplexity": 2.7, "eval_tokens": 640, "eval_runtime_s": 0.2,
     "samples_exact_match": 0.25},
    {"step": 1, "eval_accuracy": 0.5, "eval_samples": 32, "eval_f1_mm": 0.4},
  ]  # fmt: skip
  assert outputs.curve_keys(rows) == (
    ["eval_accuracy", "eval_f1_mm", "samples_exact_match"],
    ["perplexity"],
  )


@pytest.mark.slow  # a whole run_clm.py run with evaluations and samples each step (~18 s)
def test_run_clm_shows_mid_run_evaluations_and_samples_and_plots_them(tmp_path, caplog):
  """Mid-run evaluations and samples reached only metrics.jsonl and samples.jsonl, and
  curves.png plotted eval_tokens (a constant) instead of perplexity."""
  from train import run_clm

  caplog.set_level(logging.INFO)
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"prompt": "write january 1 , 2024 as a date", "completion": "x"}\n')
  argv = clm_defaults(tmp_path / "out", quickstart_rows(tmp_path, 40), "--max_seq_length", "64",
                      "--max_steps", "2", "--eval_steps", "1", "--generation_prompts_file",
                      str(prompts), "--generation_max_new_tokens", "3")  # fmt: skip
  assert run_clm.main(argv) == 0
  messages = [r.getMessage() for r in caplog.records]
  for step in (1, 2):
    assert any(m.startswith(f"evaluation at step {step}: eval_loss=") and "perplexity=" in m
               and "samples_exact_match=" in m for m in messages), messages  # fmt: skip
    assert any(m.startswith(f"sample at step {step}: 'write january 1 , 2024 as a date' -> ")
               for m in messages), messages  # fmt: skip
  evals = outputs.read_jsonl(tmp_path / "out" / outputs.METRICS)
  assert outputs.curve_keys(evals) == (["samples_exact_match"], ["perplexity"])
