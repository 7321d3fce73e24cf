"""The tests' tiny models of real architectures (random weights): the one zoo, benchmarks/tiny_models.py."""

from benchmarks.tiny_models import TINY, build  # noqa: F401
