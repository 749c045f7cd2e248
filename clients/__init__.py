"""Clients of Sfumato: the REST API's Python SDK (:class:`Client`, :class:`AsyncClient`, in
:mod:`sfumato.clients.rest`) and the direct Triton gRPC client (:mod:`sfumato.clients.triton_grpc`).

``from sfumato.clients import Client`` loads the SDK on first use (PEP 562), so that importing
another module of this package (the gRPC client, the PNG helpers: the control plane's workers
use them) needs neither httpx nor tenacity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sfumato.clients.rest import AsyncClient as AsyncClient
    from sfumato.clients.rest import Client as Client
    from sfumato.clients.rest import Generation as Generation
    from sfumato.clients.rest import GenerationError as GenerationError
    from sfumato.clients.rest import GenerationTimeout as GenerationTimeout
    from sfumato.clients.rest import Progress as Progress
    from sfumato.clients.rest import RetryPolicy as RetryPolicy

_SDK = (
    "AsyncClient",
    "Client",
    "Generation",
    "GenerationError",
    "GenerationTimeout",
    "Progress",
    "RetryPolicy",
)


def __getattr__(name: str) -> Any:
    if name in _SDK:
        from sfumato.clients import rest

        return getattr(rest, name)
    raise AttributeError(f"module 'sfumato.clients' has no attribute {name!r}")
