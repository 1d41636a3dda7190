#!/usr/bin/env bash
# The device check in one command: on a machine with a GPU (or TPU), no network needed, it runs
# the Pallas kernel tests compiled, llama-1.1B's LoRA step beside PEFT (eager, torch.compile) and
# the SmolLM2 recipe once per attention implementation, and writes OUT/device_check.json
# (statuses, tokens/s, MFU, peak memory; see bench/device_check.py) plus OUT/logs/.
#
# Usage (from anywhere; it runs in the repository root):
#   bash bench/device_check.sh OUT                     # all of it: about 6.5 min on one H100
#   bash bench/device_check.sh OUT --stages llama      # a part again (kernels, llama, smollm2)
#   bash bench/device_check.sh OUT --smoke             # the same plumbing on CPU, tiny sizes
# Other flags go to bench/device_check.py (--help): --peak_tflops (or env PEAK_TFLOPS; 790 by
# default on a GPU), --attention pallas,cudnn,xla, --budget SECONDS (default 450: later stages
# are skipped once it is spent), --tokenizer DIR. PYTHON picks the interpreter (default:
# .venv/bin/python if there is one, else python3). DEVICE_CHECK_HARD_S (default 475) stops the
# driver outright; the JSON it has written by then stays, the stage in flight marked "timeout".
# Exit status: 0 every stage passed (or did not apply here), 1 some stage failed, 2 no usable
# device, 3 stopped by the hard limit (JSON written), 137 killed 15 s after that.
set -uo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash bench/device_check.sh OUT [flags of bench/device_check.py]" >&2
  exit 2
fi
out=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "device_check.sh: cannot create $1" >&2; exit 2; }
shift
cd "$(dirname "$0")/.." || exit 2
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
exec timeout --preserve-status --kill-after=15 "${DEVICE_CHECK_HARD_S:-475}" \
  "$py" bench/device_check.py --out "$out" "$@"
