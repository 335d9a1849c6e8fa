"""Benchmark drivers (not tests): replay public traces against simulated fleets in virtual time.

They live outside ``switchyard/`` because they are tools for measuring the control plane, not
part of it: they import the real policies and the real simulator, and nothing imports them.
"""
