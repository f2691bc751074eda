"""rayattr: trajectory-aware training-data attribution (Data Value Embedding) at cluster scale.

Pipeline stages, one subpackage each:
capture -> store -> train -> embed -> reduce -> query / report, with the math in `dvemb`.
"""

__version__ = "0.1.0"
