"""Accuracy evaluation: lm-eval-harness on the dockyard engine, with offline task data.

- ``tasks`` — the task registry; the shipped task YAMLs (``task_yamls/``: lm-eval's own task files,
  data swapped for local copies) are rendered with real paths for lm-eval's ``TaskManager``.
- ``lm`` — ``DockyardLM``, registered with lm-eval as ``dockyard`` (imports lm-eval).
- ``runner`` — ``run_eval`` / ``run_check`` and accuracy.yaml.
- ``cli`` — ``dockyard eval``.

Importing this package imports neither lm-eval nor torch.
"""

from __future__ import annotations
