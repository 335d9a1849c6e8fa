"""The operator's one door to the Kubernetes API: a small synchronous client plus idempotent apply.

Why not the generated typed APIs: the operator renders children as plain dicts (``render.py``)
and compares them with what the API server holds, so one generic get/list/create/patch/delete
over ``kubernetes.client.ApiClient`` (which still does the auth, TLS and in-cluster token
refresh) is shorter and keeps dicts end to end. Every call is blocking and is made from sync
Kopf handlers only, which Kopf runs in its thread pool.

``apply`` is what makes reconciliation idempotent: it creates a missing child, patches one
whose live state does not contain the desired fields, and does nothing otherwise. "Contains"
(a recursive subset test) rather than "equals", because the API server adds defaults and
status that the renderer never writes. The patch is a JSON merge patch of the desired object:
lists are replaced whole, so a removed env var or port disappears; a removed map key (a label)
is left behind, which is harmless for the fields the renderers own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "KINDS",
    "ApiError",
    "ApplyConflictError",
    "Kind",
    "KubeApi",
    "apply",
    "contains",
    "controller_uid",
]

_MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True, slots=True)
class Kind:
    """Where a kind lives in the REST API."""

    api_version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/api/{self.api_version}" if "/" not in self.api_version else f"/apis/{self.api_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if subresource:
            base += f"/{subresource}"
        return base


KINDS: dict[str, Kind] = {
    "ConfigMap": Kind("v1", "configmaps"),
    "Service": Kind("v1", "services"),
    "Pod": Kind("v1", "pods"),
    "PersistentVolumeClaim": Kind("v1", "persistentvolumeclaims"),
    "Deployment": Kind("apps/v1", "deployments"),
    "StatefulSet": Kind("apps/v1", "statefulsets"),
    "LLMService": Kind("switchyard.dev/v1alpha1", "llmservices"),
    "ServingPool": Kind("switchyard.dev/v1alpha1", "servingpools"),
    "KVCachePool": Kind("switchyard.dev/v1alpha1", "kvcachepools"),
}
"""The kinds the operator reads or writes; anything else is a programming error."""


class ApiError(Exception):
    """A non-2xx answer from the API server (status and the server's message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class ApplyConflictError(Exception):
    """A child with the desired name exists but another controller owns it; never overwritten."""


class KubeApi:
    """Generic, blocking access to namespaced objects as dicts.

    ``api_client`` is a configured ``kubernetes.client.ApiClient`` (in-cluster, kubeconfig, or a
    test emulator's URL); ``timeout_s`` bounds every request so a hung API server cannot wedge
    Kopf's executor threads.
    """

    def __init__(self, api_client: Any, *, timeout_s: float = 15.0) -> None:
        self._client = api_client
        self._timeout_s = timeout_s

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        serialized = self._client.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self._client.call_api(*serialized, _request_timeout=self._timeout_s)
        resp.read()
        text = resp.data.decode() if resp.data else ""
        if not 200 <= resp.status < 300:
            try:
                message = json.loads(text).get("message", text)
            except ValueError:
                message = text
            raise ApiError(resp.status, str(message)[:500])
        return json.loads(text) if text else {}

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            obj: dict[str, Any] = self._call("GET", KINDS[kind].path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    def list(self, kind: str, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        """Objects of ``kind`` in ``namespace`` carrying all ``labels``.

        The selector is also applied here: the API server filters, but a test emulator may not.
        """
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        payload = self._call("GET", KINDS[kind].path(namespace), query=[("labelSelector", selector)])
        items: list[dict[str, Any]] = payload.get("items", [])
        return [
            item
            for item in items
            if item.get("metadata", {}).get("namespace", namespace) == namespace
            and contains(item.get("metadata", {}).get("labels") or {}, labels)
        ]

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        created: dict[str, Any] = self._call("POST", KINDS[obj["kind"]].path(meta["namespace"]), body=obj)
        return created

    def patch(
        self, kind: str, namespace: str, name: str, body: Mapping[str, Any], *, subresource: str | None = None
    ) -> dict[str, Any]:
        """JSON merge patch (``subresource="status"`` for a CR's status)."""
        path = KINDS[kind].path(namespace, name, subresource)
        patched: dict[str, Any] = self._call("PATCH", path, body=dict(body), content_type=_MERGE_PATCH)
        return patched

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete with background propagation; False when it was already gone."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        try:
            self._call("DELETE", KINDS[kind].path(namespace, name), body=body)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True


def contains(live: Any, desired: Any) -> bool:
    """Whether ``live`` already holds everything ``desired`` says (dicts: subset; lists: same length)."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(
            k in live and contains(live[k], v) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(live) == len(desired)
            and all(contains(a, b) for a, b in zip(live, desired, strict=True))
        )
    if isinstance(desired, bool) or isinstance(live, bool):
        return live is desired
    if isinstance(desired, int | float) and isinstance(live, int | float):
        return float(live) == float(desired)
    return bool(live == desired)


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the object's controlling owner, if it has one."""
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def apply(
    api: KubeApi, desired: Mapping[str, Any]
) -> tuple[Literal["created", "patched", "unchanged"], dict[str, Any]]:
    """Make the live child contain ``desired``; write only when it does not already.

    Returns what was done and the object as the API server now holds it (status included).

    Raises ``ApplyConflictError`` when a same-named object is controlled by someone else.
    """
    meta = desired["metadata"]
    live = api.get(desired["kind"], meta["namespace"], meta["name"])
    if live is None:
        try:
            return "created", api.create(desired)
        except ApiError as exc:
            if exc.status != 409:
                raise
        # Created concurrently (another handler applying the same child): compare with that one.
        live = api.get(desired["kind"], meta["namespace"], meta["name"])
        if live is None:
            raise ApiError(409, f"{desired['kind']} {meta['name']} exists but cannot be read")
    owner = controller_uid(live)
    if owner is not None and owner != controller_uid(desired):
        raise ApplyConflictError(
            f"{desired['kind']} {meta['namespace']}/{meta['name']} exists and is controlled by {owner}"
        )
    if contains(live, desired):
        return "unchanged", live
    return "patched", api.patch(desired["kind"], meta["namespace"], meta["name"], desired)
