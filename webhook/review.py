"""AdmissionReview v1 on the wire: a strict envelope parser and the response builders.

The kube-apiserver counts a missing response, a wrong apiVersion/kind or a different uid as a webhook
failure, and a webhook failure under `failurePolicy: Fail` blocks the request with an unhelpful
"failed calling webhook" error. So everything that reaches `/validate` is answered here with a
well-formed review: a bad envelope becomes :class:`MalformedReview` (HTTP 400 JSON when there is no uid
to echo, a 400 deny otherwise) and a bad object becomes :class:`InvalidObject` (a 400 deny naming the
field). Wire payloads are TypedDicts with the exact Kubernetes field names; the rest of the package
works with the snake_case :class:`AdmissionRequest` and :class:`Verdict` values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
OPERATIONS = frozenset({"CREATE", "UPDATE", "DELETE", "CONNECT"})
WARNING_MAX_CHARS = 119  # kubectl and the apiserver expect each warning under 120 characters

# HTTP status code -> the `reason` kubectl prints in "Error from server (<reason>)".
STATUS_REASONS = {
    400: "BadRequest",
    403: "Forbidden",
    409: "Conflict",
    422: "Invalid",
    429: "TooManyRequests",
    503: "ServiceUnavailable",
}


class ReviewError(Exception):
    """Base of the errors that stop a review before any decision; `code` is the HTTP-style status."""

    code = 400

    def __init__(self, message: str, *, uid: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.uid = uid


class MalformedReview(ReviewError):
    """The body is not an AdmissionReview v1 request we can read (bad JSON, missing or mistyped fields)."""


class InvalidObject(ReviewError):
    """The object under review is malformed (e.g. a bad memory quantity): denied with code 400."""


class StatusDetailsWire(TypedDict, total=False):
    retryAfterSeconds: int


class StatusWire(TypedDict, total=False):
    code: int
    reason: str
    message: str
    details: StatusDetailsWire


class ResponseWire(TypedDict, total=False):
    uid: str
    allowed: bool
    status: StatusWire
    warnings: list[str]


class ReviewWire(TypedDict):
    apiVersion: str
    kind: str
    response: ResponseWire


@dataclass(frozen=True)
class AdmissionRequest:
    """The fields of `request` the webhook uses, checked for type; objects stay plain dicts."""

    uid: str
    operation: str
    group: str  # resource.group: "" (core), "apps", "inference.eh-ops.io"
    resource: str  # resource.resource: "deployments", "inferencemodels"
    sub_resource: str  # "" or "scale" (or "status" if a configuration lists it)
    kind: str  # kind.kind: "Deployment", "InferenceModel", "Scale"
    namespace: str
    name: str
    obj: Mapping[str, Any] | None
    old_obj: Mapping[str, Any] | None
    dry_run: bool
    username: str = ""

    @property
    def target(self) -> str:
        """`resource[/subresource] namespace/name` for logs and messages."""
        sub = f"/{self.sub_resource}" if self.sub_resource else ""
        return f"{self.resource}{sub} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class Verdict:
    """The answer to one review, before serialization: allowed, or denied with an HTTP-style code."""

    allowed: bool
    code: int = 200
    message: str = ""
    warnings: tuple[str, ...] = ()
    reason: str = ""  # a machine word for logs and metrics: fits, decrease, insufficient_memory, busy, ...
    retry_after_seconds: int = 0  # > 0: the apiserver answers the client with this Retry-After header

    @property
    def status_reason(self) -> str:
        """The Kubernetes `status.reason` for a denial (Forbidden, TooManyRequests, ...)."""
        return STATUS_REASONS.get(self.code, "Forbidden" if self.code < 500 else "InternalError")


def allowed(reason: str, message: str = "", warnings: tuple[str, ...] = ()) -> Verdict:
    """An allowing verdict; `reason` names why, for logs and metrics."""
    return Verdict(True, 200, message, _clip_warnings(warnings), reason)


def denied(
    code: int, reason: str, message: str, warnings: tuple[str, ...] = (), *, retry_after_seconds: int = 0
) -> Verdict:
    """A denying verdict; the apiserver passes `code` through as the client's HTTP status, and
    `retry_after_seconds` (status.details.retryAfterSeconds) as its Retry-After header."""
    if code < 400 or code > 599:
        raise ValueError(f"a denial needs an HTTP error code (400..599), got {code}")
    if retry_after_seconds < 0:
        raise ValueError(f"retry_after_seconds must be >= 0, got {retry_after_seconds}")
    return Verdict(False, code, message, _clip_warnings(warnings), reason, retry_after_seconds)


def _clip_warnings(warnings: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for w in warnings:
        w = " ".join(w.split())  # no newlines or control whitespace in a header value
        out.append(w if len(w) <= WARNING_MAX_CHARS else w[: WARNING_MAX_CHARS - 3] + "...")
    return tuple(out)


def review_response(uid: str, verdict: Verdict) -> ReviewWire:
    """The AdmissionReview the apiserver expects back: same uid, v1 apiVersion/kind, status on denial."""
    response: ResponseWire = {"uid": uid, "allowed": verdict.allowed}
    if not verdict.allowed:
        response["status"] = {"code": verdict.code, "reason": verdict.status_reason, "message": verdict.message}
        if verdict.retry_after_seconds:
            response["status"]["details"] = {"retryAfterSeconds": verdict.retry_after_seconds}
    if verdict.warnings:
        response["warnings"] = list(verdict.warnings)
    return {"apiVersion": API_VERSION, "kind": KIND, "response": response}


def _field(mapping: Mapping[str, Any], name: str, kind: type | tuple[type, ...], *, where: str, uid: str,
           required: bool = True) -> Any:
    value = mapping.get(name)
    if value is None:
        if required:
            raise MalformedReview(f"{where}.{name} is required", uid=uid)
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise MalformedReview(f"{where}.{name} must be {_article(expected)}, got {type(value).__name__}", uid=uid)
    return value


def _article(name: str) -> str:
    names = {"str": "a string", "dict": "an object", "bool": "a boolean", "Mapping": "an object"}
    return names.get(name, name)


def parse_review(body: bytes | str) -> AdmissionRequest:
    """Parse and type-check an AdmissionReview v1 request body; raise MalformedReview with a clear message."""
    try:
        review = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedReview(f"body is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise MalformedReview("body is nested too deeply to be an AdmissionReview") from exc
    if not isinstance(review, dict):
        raise MalformedReview(f"body must be a JSON object (an AdmissionReview), got {type(review).__name__}")
    request = review.get("request")
    uid = ""
    if isinstance(request, dict) and isinstance(request.get("uid"), str):
        uid = request["uid"]
    if review.get("apiVersion") != API_VERSION or review.get("kind") != KIND:
        raise MalformedReview(
            f"expected apiVersion {API_VERSION} kind {KIND}, got apiVersion {review.get('apiVersion')!r} "
            f"kind {review.get('kind')!r} (set admissionReviewVersions: [v1])",
            uid=uid,
        )
    if request is None:
        raise MalformedReview("AdmissionReview without request")
    if not isinstance(request, dict):
        raise MalformedReview(f"request must be an object, got {type(request).__name__}")
    uid = _field(request, "uid", str, where="request", uid="")
    if not uid:
        raise MalformedReview("request.uid is empty")
    operation = _field(request, "operation", str, where="request", uid=uid)
    if operation not in OPERATIONS:
        raise MalformedReview(f"request.operation {operation!r} is not one of {sorted(OPERATIONS)}", uid=uid)
    resource = _field(request, "resource", dict, where="request", uid=uid)
    kind = _field(request, "kind", dict, where="request", uid=uid)
    for where, part, key in (("request.resource", resource, "resource"), ("request.kind", kind, "kind")):
        _field(part, key, str, where=where, uid=uid)
        _field(part, "group", str, where=where, uid=uid, required=False)
    obj = _field(request, "object", dict, where="request", uid=uid, required=False)
    old = _field(request, "oldObject", dict, where="request", uid=uid, required=False)
    dry_run = _field(request, "dryRun", bool, where="request", uid=uid, required=False)
    user = _field(request, "userInfo", dict, where="request", uid=uid, required=False) or {}
    username = user.get("username")
    return AdmissionRequest(
        uid=uid,
        operation=operation,
        group=resource.get("group") or "",
        resource=resource["resource"],
        sub_resource=_field(request, "subResource", str, where="request", uid=uid, required=False) or "",
        kind=kind["kind"],
        namespace=_field(request, "namespace", str, where="request", uid=uid, required=False) or "",
        name=_field(request, "name", str, where="request", uid=uid, required=False) or "",
        obj=obj,
        old_obj=old,
        dry_run=bool(dry_run),
        username=username if isinstance(username, str) else "",
    )
