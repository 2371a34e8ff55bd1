"""A model version as an object in the store ``lensbus-models``, on decoded records: no NATS.

The manifest is kept in the object's headers and read back as
:class:`~lensbus.schemas.ModelInfo`, so ``list`` never downloads a package.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from lensbus.schemas import Manifest, ModelInfo
from lensbus.schemas.deploy import object_name

# Object headers holding what `list` reports (Go clients read headers as lists of strings).
H_NAME = "Lensbus-Model-Name"
H_VERSION = "Lensbus-Model-Version"
H_FRAMEWORK = "Lensbus-Framework"
H_TASK = "Lensbus-Task"
H_DECODER = "Lensbus-Decoder"
H_INPUT = "Lensbus-Input"
H_UPLOADED = "Lensbus-Uploaded-Ns"
H_CONTENT = "Lensbus-Content-Sha256"
H_SHA256 = "Lensbus-Sha256"
# The manifest's labels as a JSON list: what a pipeline's classify stage may filter on.
# Packages stored before it was added lack it: their model.json is read instead.
H_LABELS = "Lensbus-Labels"


def content_sha256(manifest: Manifest) -> str:
    """What makes two uploads "the same model": the manifest, which holds every file's
    sha256 and size. (Two archives of the same folder differ in their tar/gzip times.)"""
    return hashlib.sha256(manifest.model_dump_json().encode()).hexdigest()


def object_headers(
    manifest: Manifest, archive_sha256: str, content: str, uploaded_ns: int
) -> dict[str, list[str]]:
    inp = manifest.input
    return {
        H_NAME: [manifest.name],
        H_VERSION: [manifest.version],
        H_FRAMEWORK: [manifest.framework],
        H_TASK: [manifest.task],
        H_DECODER: [manifest.decoder],
        H_INPUT: [f"{inp.width}x{inp.height} {inp.layout} {inp.color}"],
        H_UPLOADED: [str(uploaded_ns)],
        H_CONTENT: [content],
        H_SHA256: [archive_sha256],
        H_LABELS: [json.dumps(manifest.labels)],
    }


def header_labels(headers: Mapping[str, Any] | None) -> list[str] | None:
    """The labels kept in an object's headers, or ``None`` (an older object, or unreadable)."""
    text = header(headers, H_LABELS)
    if text is None:
        return None
    try:
        labels = json.loads(text)
    except ValueError:
        return None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        return None
    return labels


def header(headers: Mapping[str, Any] | None, key: str) -> str | None:
    """One header value, whether stored Go-style (a list) or as a plain string."""
    if not headers:
        return None
    value = headers.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) else None


def digest_hex(digest: str | None) -> str | None:
    """The object store's ``SHA-256=<base64url>`` digest as hex."""
    if not digest or "=" not in digest:
        return None
    try:
        return base64.urlsafe_b64decode(digest.split("=", 1)[1]).hex()
    except (ValueError, TypeError):
        return None


def model_info(
    name: str,
    size: int | None,
    digest: str | None,
    description: str | None,
    headers: Mapping[str, Any] | None,
) -> ModelInfo | None:
    """A stored object as a model version; ``None`` for objects lensbus did not put."""
    model, version = header(headers, H_NAME), header(headers, H_VERSION)
    if model is None or version is None or object_name(model, version) != name:
        return None
    sha = digest_hex(digest) or header(headers, H_SHA256)
    try:
        return ModelInfo(
            name=model,
            version=version,
            framework=header(headers, H_FRAMEWORK),
            task=header(headers, H_TASK),
            size=size or 0,
            sha256=sha or "",
            uploaded_ns=int(header(headers, H_UPLOADED) or 0),
            description=description or "",
        )
    except (ValidationError, ValueError):
        return None


def latest(models: Iterable[ModelInfo], name: str) -> ModelInfo | None:
    """The most recently uploaded version of ``name``."""
    versions = [m for m in models if m.name == name]
    return max(versions, key=lambda m: (m.uploaded_ns, m.version)) if versions else None
