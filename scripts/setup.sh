#!/usr/bin/env bash
# Set up avatar-pipeline in ./.venv (idempotent: a second run only verifies the install).
# Usage: bash scripts/setup.sh [--test]     (--test also installs the test tools and, when run as
#                                            root with apt-get, Debian's ffmpeg, slurm-wlm and chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_TEST=0
[[ "${1:-}" == "--test" ]] && WITH_TEST=1

pick_python() {
  for candidate in "${PYTHON:-}" python3.11 python3.12 python3.10 python3; do
    [[ -n "$candidate" ]] || continue
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] <= (3, 12)))'; then
      echo "$candidate"; return 0
    fi
  done
  echo "error: avatar-pipeline needs Python 3.10-3.12 (mediapipe 0.10.21 has no wheel for newer); set PYTHON=/path/to/python3.11" >&2
  return 1
}

if [[ ! -x .venv/bin/python ]]; then
  PY=$(pick_python)
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi

extras="."
[[ $WITH_TEST == 1 ]] && extras=".[test]"
stamp=.venv/.avatar-pipeline-setup
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
if [[ -f $stamp && "$(cat $stamp)" == "$want" ]]; then
  echo "setup: dependencies already installed (pyproject.toml unchanged); verifying"
else
  echo "setup: installing dependencies (pinned in pyproject.toml)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch first and alone: the pinned CPU/CUDA wheel, never a surprise upgrade through another package
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -e "$extras"
  echo "$want" > $stamp
fi

# tests also cover Debian's ffmpeg (besides the bundled one), a one-node SLURM cluster on localhost and
# the HTML report in headless Chromium
if [[ $WITH_TEST == 1 ]]; then
  wanted=()
  command -v ffmpeg >/dev/null 2>&1 || wanted+=(ffmpeg)
  command -v slurmctld >/dev/null 2>&1 || [[ -x /usr/sbin/slurmctld ]] || wanted+=(slurm-wlm)
  command -v munged >/dev/null 2>&1 || [[ -x /usr/sbin/munged ]] || wanted+=(munge)
  command -v chromium >/dev/null 2>&1 || wanted+=(chromium)  # the report is opened in a real browser
  if [[ ${#wanted[@]} -gt 0 ]]; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
      echo "setup: installing Debian packages for the tests: ${wanted[*]}"
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${wanted[@]}" >/dev/null) \
        || echo "setup: warning: apt-get could not install ${wanted[*]}; the tests that need them will be skipped"
    else
      echo "setup: not root: ${wanted[*]} not installed; the tests that need them will be skipped"
    fi
  fi
fi

.venv/bin/python - <<'PY'
import importlib, sys
for mod in ("torch", "mediapipe", "cv2", "snakemake", "ffmpeg", "imageio_ffmpeg", "avatar_pipeline"):
    importlib.import_module(mod)
import numpy, torch
from avatar_pipeline.video import ffmpeg_tools
from avatar_pipeline.workflow_runner import builtin_demo_video
tools = ffmpeg_tools()
print(f"setup: ok (python {sys.version.split()[0]}, numpy {numpy.__version__}, torch {torch.__version__}, "
      f"device {'cuda' if torch.cuda.is_available() else 'cpu'}, ffmpeg {tools.source}; demo clip {builtin_demo_video().name})")
PY
