#!/usr/bin/env bash
# Creates (or updates) the virtual environment at .venv in the repository root and installs geximpute into it.
#
#   bash scripts/setup.sh            # CPU-only machine: torch 2.13.0+cpu (a local wheel, else PyTorch's CPU
#                                    # index) + xgboost-cpu
#   GEXIMPUTE_GPU=1 bash scripts/setup.sh   # GPU machine: CUDA torch from the default index + xgboost with NCCL
#
# Environment:
#   PYTHON                 interpreter to build the venv from (default: python3.11, then python3)
#   GEXIMPUTE_GPU          1 = GPU install, 0 = CPU install (default: 1 if nvidia-smi is found, else 0)
#   GEXIMPUTE_TORCH_INDEX  extra index URL for the torch 2.13.0 wheel (a mirror); unset = the CPU build as above,
#                          or pip's configured indexes on a GPU install
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

py=${PYTHON:-$(command -v python3.11 || command -v python3)}
if ! "$py" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
    echo "setup: geximpute needs Python 3.11; $py is $("$py" --version 2>&1). Set PYTHON=/path/to/python3.11." >&2
    exit 2
fi

gpu=${GEXIMPUTE_GPU:-$(command -v nvidia-smi >/dev/null 2>&1 && echo 1 || echo 0)}
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first, pinned, so that nothing later resolves an unpinned torch with CUDA packages.
if [ -n "${GEXIMPUTE_TORCH_INDEX:-}" ]; then
    "${pip[@]}" --extra-index-url "$GEXIMPUTE_TORCH_INDEX" "torch==2.13.0"
elif [ "$gpu" = 1 ]; then
    "${pip[@]}" "torch==2.13.0"
else
    # the CPU build (PyPI's torch 2.13.0 is the CUDA one, with several GB of nvidia-* packages): a local +cpu wheel
    # where pip's indexes have one, else PyTorch's CPU index; 2.13.0+cpu satisfies the package's torch==2.13.0
    "${pip[@]}" "torch==2.13.0+cpu" 2>/dev/null \
        || "${pip[@]}" --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu"
fi

if [ "$gpu" = 1 ]; then extra=gpu; else extra=cpu; fi
"${pip[@]}" -e ".[${extra},test]"
echo "setup: .venv ready ($extra install, $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
