"""rayattr: trajectory-aware training-data attribution (Data Value Embedding) at cluster scale.

Layers, bottom to top, one subpackage per concept (README.md, Layout): math and capture ->
store and data -> model and optim -> record -> train / embed / reduce -> validate / query /
report -> pipeline and plan -> cli.
"""

__version__ = "0.1.0"


# public names, imported on first use: `import rayattr` stays free of torch and Ray
_PUBLIC = {"open_run": "rayattr.query.finished", "Recorder": "rayattr.record.recorder", "attribute": "rayattr.pipeline.attribution",
           "new_run": "rayattr.pipeline.stages:start_run", "RayattrError": "rayattr.errors"}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        module, _, attr = _PUBLIC[name].partition(":")  # "module[:its name for it]"
        return getattr(importlib.import_module(module), attr or name)
    raise AttributeError(f"module 'rayattr' has no attribute {name!r}")
