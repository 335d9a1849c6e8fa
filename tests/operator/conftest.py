"""Fixtures of the operator tests: the kmock emulator, a Kopf operator runner, an API handle.

They live in ``harness.py`` (with the fakes and helpers); importing them here makes them
available to every module in this folder without each one importing fixture names.
"""

from tests.operator.harness import api, k8s, operator

__all__ = ["api", "k8s", "operator"]
