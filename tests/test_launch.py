"""train/launch.py's pieces without JAX: flags, environments, statuses, prefixed output, stopping
the other processes when one fails, and signals passed on. Each test runs in well under 2 s
(children are `python -c` one-liners)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO

from train import launch


def _run(nproc, code, grace=5.0):
  args = launch.parse_args(["--nproc", str(nproc), "--grace", str(grace), "--", "-c", code])
  out, err = io.BytesIO(), io.BytesIO()
  start = time.monotonic()
  status = launch.run(args, stdout=out, stderr=err)
  return status, out.getvalue().decode(), err.getvalue().decode(), time.monotonic() - start


def test_flags_and_command():
  a = launch.parse_args(["--nproc", "2", "--devices_per_proc", "4", "--", "x.py", "--", "-y"])
  assert (a.nproc, a.devices_per_proc, a.grace) == (2, 4, 5.0)
  assert a.command == ["x.py", "--", "-y"]  # everything after the first '--' is the command
  assert launch.command_line(a.command) == [sys.executable, "x.py", "--", "-y"]
  assert launch.command_line(["-m", "train.run_clm"])[0] == sys.executable
  assert launch.command_line(["bash", "-c", "true"]) == ["bash", "-c", "true"]


@pytest.mark.parametrize(
  ("argv", "why"),
  [
    (["--nproc", "2", "x.py"], "the command to run goes after '--'"),
    (["--nproc", "2", "--"], "no command after '--'"),
    (["--nproc", "0", "--", "x.py"], "argument --nproc: invalid positive int value: '0'"),
    (["--", "x.py"], "the following arguments are required: --nproc"),
    (["--nproc", "2", "--devices_per_proc", "-1", "--", "x.py"], "--devices_per_proc"),
    (["--nproc", "2", "--grace", "-1", "--", "x.py"], "--grace: must be >= 0"),
    (["--nproc", "2", "--bogus", "--", "x.py"], "unrecognized arguments: --bogus"),
  ],
)
def test_bad_flags_are_one_line_and_exit_2(capsys, argv, why):
  with pytest.raises(SystemExit) as e:
    launch.parse_args(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("launch: error: ") and why in err, err


def test_each_process_gets_the_jobs_environment():
  environ = {"XLA_FLAGS": "--xla_a=1 --xla_force_host_platform_device_count=8 --xla_b=2", "K": "v"}
  env = launch.child_env(environ, "127.0.0.1:1234", 3, 2, devices=4)
  assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
  assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("3", "2")
  assert (env["JAX_PLATFORMS"], env["JAX_NUM_CPU_DEVICES"]) == ("cpu", "4")
  assert env["XLA_FLAGS"] == "--xla_a=1 --xla_b=2" and env["K"] == "v"
  plain = launch.child_env(environ, "127.0.0.1:1234", 3, 0, devices=None)
  assert "JAX_PLATFORMS" not in plain and "JAX_NUM_CPU_DEVICES" not in plain
  assert plain["XLA_FLAGS"] == environ["XLA_FLAGS"]


def test_the_port_is_free():
  port = launch.free_port()
  with socket.socket() as s:
    s.bind(("127.0.0.1", port))  # nobody holds it
    assert launch.free_port() != port  # and the next one is another


def test_worst_exit_code():
  assert launch.worst_exit_code([0, 0, 0]) == 0
  assert launch.worst_exit_code([0, 2, 1]) == 2
  assert launch.worst_exit_code([0, -signal.SIGKILL]) == 137  # a signal N counts as 128 + N
  assert launch.worst_exit_code([2, -signal.SIGTERM]) == 143
  assert launch.describe(1, -signal.SIGKILL) == "process 1 was killed by SIGKILL"
  assert launch.describe(0, 2) == "process 0 exited with status 2"


def test_output_lines_are_prefixed_with_the_process():
  code = (
    "import os, sys; i = os.environ['JAX_PROCESS_ID']; print('out', i, 'a'); print('out', i, 'b');"
    " print('err', i, file=sys.stderr); sys.stdout.write('tail ' + i)"
  )
  status, out, err, _ = _run(2, code)
  assert status == 0
  for i in range(2):
    for line in (f"out {i} a", f"out {i} b", f"tail {i}"):
      assert f"[p{i}] {line}\n" in out, out
    assert f"[p{i}] err {i}\n" in err, err
  assert all(line.startswith(("[p0] ", "[p1] ")) for line in out.splitlines())
  assert "launch:" not in err


def test_a_failed_process_stops_the_others_and_gives_its_status():
  # process 1 fails at once; process 0 would sleep a minute
  code = (
    "import os, sys, time; i = int(os.environ['JAX_PROCESS_ID']); i and sys.exit(3); time.sleep(60)"
  )
  status, _, err, took = _run(2, code)
  assert status == 3, err
  assert took < 10
  assert "launch: process 1 exited with status 3; stopping the others\n" in err


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period():
  code = (
    "import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
    " i = int(os.environ['JAX_PROCESS_ID']); i and (time.sleep(0.3), os.kill(os.getpid(), 9));"
    " time.sleep(60)"
  )
  status, _, err, took = _run(2, code, grace=0.5)
  assert status == 128 + signal.SIGKILL
  assert took < 10
  assert "launch: process 1 was killed by SIGKILL; stopping the others\n" in err


def test_ctrl_c_reaches_every_process():
  code = (
    "import os, sys, time\n"
    "try:\n  print('ready', flush=True)\n  time.sleep(60)\n"
    "except KeyboardInterrupt:\n  print('interrupted', os.environ['JAX_PROCESS_ID'], flush=True)\n"
    "  sys.exit(130)\n"
  )
  proc = subprocess.Popen(
    [sys.executable, "-m", "train.launch", "--nproc", "2", "--", "-c", code],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  ready = 0
  while ready < 2:
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    ready += line.endswith("ready\n")
  proc.send_signal(signal.SIGINT)
  proc.wait(timeout=10)  # not communicate(): it would miss what readline() buffered already
  out, err = proc.stdout.read(), proc.stderr.read()
  assert proc.returncode == 130, err
  assert "[p0] interrupted 0" in out and "[p1] interrupted 1" in out, out + err


def test_the_command_line_entry_point(tmp_path):
  script = tmp_path / "hello.py"
  script.write_text("import os\nprint('hello', os.environ['JAX_NUM_PROCESSES'])\n")
  done = subprocess.run(
    [sys.executable, "-m", "train.launch", "--nproc", "1", "--", str(script)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=30,
    env={**os.environ, "PYTHONPATH": str(REPO)},
  )
  assert (done.returncode, done.stdout) == (0, "[p0] hello 1\n"), done.stderr


def test_an_unreachable_coordinator_is_named_within_the_timeout():
  from train.engine import parallel

  with socket.socket() as s:  # a listening coordinator: no wait
    s.bind(("127.0.0.1", 0))
    s.listen()
    parallel.wait_for_coordinator(f"127.0.0.1:{s.getsockname()[1]}", timeout=1)
  address = f"127.0.0.1:{launch.free_port()}"  # nobody listens there
  start = time.monotonic()
  with pytest.raises(ConnectionError, match=rf"cannot reach the coordinator at {address} .*1 s"):
    parallel.wait_for_coordinator(address, timeout=1, poll_s=0.1)
  assert 1 <= time.monotonic() - start < 3
