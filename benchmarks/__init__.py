"""Measurements and calibration scripts (run as `python benchmarks/NAME.py`; the tests import them as a package).

Not shipped in the wheel: nothing here is needed to plan or run a job.
"""
