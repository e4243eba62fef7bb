"""The commands around the method, each run from the repository root as `python -m tools.NAME`.

They import the top-level files (configurator, data, model, protocol, evaluate, export); the top level imports
them only lazily, for an optional feature (the demo's data, a folder of scans).
"""
