"""rayattr: trajectory-aware training-data attribution (Data Value Embedding) at cluster scale.

Pipeline stages, one subpackage each:
capture -> store -> train -> embed -> reduce -> query / report, with the math in `dvemb`.
"""

__version__ = "0.1.0"


def __getattr__(name):  # `rayattr.open_run` without importing torch and Ray at `import rayattr`
    if name == "open_run":
        from rayattr.api import open_run

        return open_run
    raise AttributeError(f"module 'rayattr' has no attribute {name!r}")
