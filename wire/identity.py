"""The AI's identity per model, the same on every node.

The seed made an email-like ``<slug>@llama.local`` per model and hashed it with
SHA-256 to get the person id its messages are signed with; we keep that rule so
a model answers under one identity wherever it runs.
"""

from __future__ import annotations

import hashlib
import re

_NON_SLUG = re.compile(r"[^a-z0-9]+")


def slugify(name: str) -> str:
    slug = _NON_SLUG.sub("-", name.lower()).strip("-")
    return slug[:120] or "model"


def person_email(model_id: str) -> str:
    return f"{slugify(model_id)}@llama.local"


def person_id_for(model_id: str) -> str:
    return hashlib.sha256(person_email(model_id).encode()).hexdigest()
