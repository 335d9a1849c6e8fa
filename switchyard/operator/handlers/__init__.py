"""Kopf handlers of the Switchyard operator; importing this package registers all of them.

One module per kind (``llmservice``, ``servingpool``, ``kvcachepool``), the autoscaler's loop
(``autoscaling``), the shared parse/apply/report steps and the pools index (``common``), and the
startup handler with the operator's settings (``switchyard.operator.settings``).
"""

from __future__ import annotations

from switchyard.operator import settings
from switchyard.operator.handlers import autoscaling, common, kvcachepool, llmservice, servingpool

__all__ = ["autoscaling", "common", "kvcachepool", "llmservice", "servingpool", "settings"]
