"""Autoscaling as a pure decision plus what it observes.

``observation`` turns two scrapes of a router's ``/metrics`` into what a pool is doing (SLO
attainment, KV usage, replicas); ``decision`` decides replicas from that (within bounds, the
prefill/decode band, cool-downs), with no I/O. The Kopf loop that runs them on a timer and
writes status and Events is ``operator/handlers/autoscaling.py``.
"""
