"""The simulator: a performance model of a vLLM engine, for scale tests and benchmarks.

It does no inference. ``cost`` prices one engine step from a GPU ``profiles/*.json`` (each
cites its sources), ``instance`` models continuous batching, paged KV and the prefix cache
(``kv_pool``) over ``request`` state, ``fleet`` drives many instances in virtual time,
``migration`` prices the coordinator's protocol, and ``engine.SimEngine`` serves one instance
behind the same ``Engine`` contract as vLLM, in real or virtual time.
"""
