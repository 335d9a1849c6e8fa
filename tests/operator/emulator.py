"""kmock 0.8's KubernetesEmulator plus the API-server behaviour a real Kopf operator needs.

From shared/research/k8s-testing.md (appendix), where each fix was shown to be needed:
uid/resourceVersion/creationTimestamp/namespace on create and a resourceVersion bump per patch
(Kopf's finalizer JSON-patch tests it), 422 for failed JSON-patch ``test`` ops, list
``kind``/resourceVersion, ``?resourceVersion`` on watches, and subscribing a watch to the event
bus before the replay so no event is lost. Added here: ``metadata.generation`` grows when a
patch changes ``spec`` (the operator reports ``observedGeneration``), ``generateName`` on create
(Kopf names its Events that way; without it the second Event is a 409), and a merge patch that
carries ``metadata.resourceVersion`` fails with 409 when the object has changed since (the
optimistic-concurrency precondition the autoscaler's status writes rely on).

Still not emulated (tests must not rely on them): garbage collection of owned objects, label
selectors (every object of the resource is listed), PUT, status-subresource isolation, and
controllers (no pods appear for a StatefulSet, no readiness is ever reported).
"""

from __future__ import annotations

import copy
import datetime
import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import jsonpointer
import kmock
from kmock._internal import dicts as kmock_dicts


@attrs.define(kw_only=True)
class K8sEmulator(kmock.KubernetesEmulator):  # type: ignore[misc]  # kmock is untyped here
    _last_rv: int = attrs.field(default=0, init=False)

    def _next_rv(self) -> str:
        self._last_rv += 1
        return str(self._last_rv)

    async def _handle(self, request: Any) -> Any:
        # No `await` before super()._handle(): check and mutation stay atomic within the loop.
        data = request.data
        if request.resource is not None and request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if request.namespace:
                meta.setdefault("namespace", request.namespace)
            if not meta.get("name") and meta.get("generateName"):  # Kopf's Events use generateName
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:8]}"
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault(
                "creationTimestamp", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            )
            meta.setdefault("generation", 1)
            meta["resourceVersion"] = self._next_rv()
            if request.resource == "apiextensions.k8s.io/v1/customresourcedefinitions":
                self._register_crd(data)
        elif request.resource is not None and request.action == kmock.action.UPDATE and request.name:
            key = (request.resource, request.namespace, request.name)
            if key in self.objects and not self.objects[key].deleted:
                current = self.objects[key].raw
                if isinstance(data, list):  # application/json-patch+json
                    for op in data:
                        if op.get("op") == "test":
                            actual = jsonpointer.resolve_pointer(current, op["path"], None)
                            if actual != op.get("value"):
                                raise kmock.KubernetesError(
                                    status=422, reason="Invalid", message=f"test failed: {op['path']}"
                                )
                    data.append({"op": "add", "path": "/metadata/resourceVersion", "value": self._next_rv()})
                elif isinstance(data, dict):  # merge/strategic-merge patch: both applied as plain merge
                    if not isinstance(data.get("metadata"), dict):
                        data["metadata"] = {}
                    # A resourceVersion in the patch is a precondition, as on a real API server.
                    expected = data["metadata"].get("resourceVersion")
                    actual = current.get("metadata", {}).get("resourceVersion")
                    if expected is not None and expected != actual:
                        raise kmock.KubernetesError(
                            status=409,
                            reason="Conflict",
                            message=f"object modified: resourceVersion {actual}, not {expected}",
                        )
                    data["metadata"]["resourceVersion"] = self._next_rv()
                    if request.subresource is None and "spec" in data:
                        old_spec = current.get("spec", {})
                        new_spec = kmock_dicts.patch_dict(copy.deepcopy(old_spec), data["spec"])
                        if new_spec != old_spec:
                            generation = int(current.get("metadata", {}).get("generation", 1))
                            data["metadata"]["generation"] = generation + 1
        return await super()._handle(request)

    def _register_crd(self, crd: dict[str, Any]) -> None:
        spec = crd.get("spec", {})
        for ver in spec.get("versions", []):
            self.resources[f"{spec['group']}/{ver['name']}/{spec['names']['plural']}"] = kmock.ResourceInfo(
                kind=spec["names"]["kind"],
                singular=spec["names"].get("singular"),
                namespaced=spec.get("scope") == "Namespaced",
                shortnames=spec["names"].get("shortNames", []),
                subresources=set(ver.get("subresources", {})),
                verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            )

    async def _serve_version(self, request: Any) -> Any:
        payload = await super()._serve_version(request)
        payload["groupVersion"] = payload["groupVersion"].lstrip("/")
        return payload

    async def _serve_list(self, request: Any) -> Any:
        payload = await super()._serve_list(request)
        payload["metadata"]["resourceVersion"] = str(self._last_rv)
        res = request.resource
        kind = self.resources[res].kind if res in self.resources else None
        payload["apiVersion"] = f"{res.group}/{res.version}".lstrip("/")
        payload["kind"] = f"{kind or 'Object'}List"
        return payload

    def _serve_watch(self, request: Any) -> Any:
        return kmock.Response(
            headers={"Content-Type": "application/json"}, payload=self._watch_stream(request)
        )

    async def _watch_stream(self, request: Any) -> AsyncIterator[Any]:
        yield b""
        since_param = request.params.get("resourceVersion", "")
        since = int(since_param) if since_param.isdigit() else -1
        bus = self._buses[request.resource]
        async with self._lock:
            marker = await bus.mark()
            objs = self._KubernetesEmulator__get_objs(request, strict=False)
            events = [
                {"type": "ADDED", "object": obj.raw}
                for obj in objs
                if not obj.deleted and int(obj.get("metadata", {}).get("resourceVersion", 0)) > since
            ]
        try:
            for event in events:
                yield event
            async for event in bus.stream(since=marker):
                meta = event.get("object", {}).get("metadata", {})
                if self._KubernetesEmulator__check(
                    request, request.resource, meta.get("namespace"), meta.get("name"), strict=False
                ):
                    yield event
        finally:
            await bus.unmark(marker)
