"""The vLLM engine adapter (``engine.VLLMEngine``) and every module that touches vLLM's internals.

``engine`` (requests in, deltas out), ``sampling`` (our options as vLLM's), ``errors`` (the
one table from vLLM's exceptions and finish reasons to ours), ``load`` (load reports from the
scheduler's stats), ``env`` (process environment of vLLM's CPU build), and live migration's
pieces: ``kv_transfer`` (connector arguments and the per-step operations), ``kv_connector``
(the ``NixlConnector`` subclass that runs inside the engine core) and ``kv_control`` (their
control channel). Importing this package imports nothing from vLLM; its modules do.
"""
