"""``switchyard operator``: run Kopf with the Switchyard handlers, cluster-wide or in namespaces.

Kept apart from ``cli.py`` so the command line only parses flags; this module imports Kopf and
the handlers (which registers them) only when the operator actually runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from switchyard.operator.settings import OperatorOptions

__all__ = ["run_operator"]


def run_operator(
    *,
    namespaces: Sequence[str],
    options: OperatorOptions,
    peering: str | None,
    liveness_endpoint: str | None,
) -> int:
    """Block until SIGINT/SIGTERM. No namespaces: cluster-wide."""
    import kopf

    import switchyard.operator.handlers  # noqa: F401  (registers the handlers)

    memo = kopf.Memo(options=options)
    kopf.run(
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        standalone=peering is None,
        peering_name=peering,
        liveness_endpoint=liveness_endpoint,
        memo=memo,
    )
    return 0
