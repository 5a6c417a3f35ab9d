"""What each ``dockyard`` command runs: one module per command with a ``run(args) -> int``.

``dockyard/cli.py`` builds the parser (torch-free) and imports the chosen command's module only when that
command runs (its ``COMMANDS`` table), so ``dockyard inspect`` and argument errors answer before torch,
the engine or FastAPI are loaded. These modules import what they use at the top.
"""
