"""The endpoints of the ``lamabus`` micro service (``<prefix>.api.*``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bus.service import Empty, Endpoint

if TYPE_CHECKING:
    from bus.app import LamabusService


def build_endpoints(svc: "LamabusService") -> list[Endpoint]:
    async def diagnostics(_: Empty) -> dict[str, Any]:
        assert svc.registry is not None
        registry = await svc.registry.diagnostics(svc.models.loaded_ids() if svc.models else None)
        return {"service": svc.diagnostics(), "registry": registry}

    return [
        Endpoint("", "diagnostics", Empty, diagnostics),
    ]
