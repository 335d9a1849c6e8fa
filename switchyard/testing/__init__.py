"""Smoke-test tools shipped with the package: the tiny random-weight model that ``switchyard
serve`` falls back to when no model is given, and that the tests build. Its output is
gibberish by design; nothing here is for production traffic.
"""
