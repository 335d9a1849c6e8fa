"""Pure renderers: parsed CR specs in, child manifests (plain dicts) out. No I/O, no clock.

Why pure: what the operator creates is the part most worth pinning down, and as functions of
the spec it is tested without a cluster (``tests/operator/test_render.py``); the handlers only
apply what these return. Every child carries a controller ownerReference (so a real cluster's
garbage collector removes it with its owner), the standard ``app.kubernetes.io`` labels plus
``switchyard.dev/{service,pool,role}``, images and pull policy from the spec, and restricted
security contexts.

One module per kind: ``service`` (an LLMService: Ray head, router, config), ``pool`` (a
ServingPool's worker StatefulSet), ``kvcache`` (a KVCachePool's cache servers); ``objects``
holds the building blocks they share (names, labels, owner references, pod and Service parts,
model volumes). Model sources: ``pvc`` is mounted read-only at ``/models`` (``path`` is used as
is); an ``hf://`` URI is downloaded by a ``fetch-model`` init container into an emptyDir in
every router and worker pod. Other URI schemes have no fetcher and are reported by the
handler, never rendered.
"""
