"""Fails at import time, for the error tests."""
raise ImportError("broken_module cannot be imported on purpose (missing dependency 'nonexistent_lib')")
