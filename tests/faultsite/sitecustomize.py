"""Loaded at start-up by every Python process of a fault test's job (tests/faults.env() puts
this directory first on PYTHONPATH; Ray workers inherit it): installs the fault named by
RAYATTR_TEST_FAULT into rayattr's test seams. Never on a user's path."""

import importlib.util
import os

if os.environ.get("RAYATTR_TEST_FAULT"):
    _path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "faults.py")
    _spec = importlib.util.spec_from_file_location("rayattr_test_faults", _path)
    _faults = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_faults)
    _faults.install(os.environ["RAYATTR_TEST_FAULT"], os.environ.get("RAYATTR_TEST_FAULT_DIR", "."))
