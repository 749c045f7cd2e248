"""``/internal/edge/*``: the gRPC edge's questions (not part of the public API or its schema).

Only the edge proxy holds the shared secret (``X-Sfumato-Edge-Key``); to anyone else these routes
answer 404. ``authorize`` answers 200 to let a call through (``X-Sfumato-Grpc-Timeout``: the
deadline to pass on), else 403 with the gRPC status and message the proxy sends back to the
caller. ``calls/end`` takes the ids of finished calls from the proxy's access log.
"""

from __future__ import annotations

import urllib.parse
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from pydantic import BaseModel, Field

from sfumato.control_plane import edge
from sfumato.control_plane.deps import ServicesDep, SessionDep

router = APIRouter(prefix="/internal/edge", include_in_schema=False)
EdgeKey = Annotated[str | None, Header(alias="X-Sfumato-Edge-Key")]
# gRPC's Percent-Encoded: printable ASCII but '%' stays as it is.
_GRPC_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


class EndedCalls(BaseModel):
    calls: list[Annotated[str, Field(max_length=64)]] = Field(max_length=10_000)


@router.post("/authorize")
async def authorize(
    request: Request,
    services: ServicesDep,
    session: SessionDep,
    edge_key: EdgeKey = None,
    rpc: Annotated[str, Header(alias="X-Sfumato-Rpc")] = "",
    call_id: Annotated[str, Header(alias="X-Sfumato-Call", max_length=64)] = "",
    # Set by the edge from the TCP peer (a caller's own header of that name is overwritten).
    client_address: Annotated[str, Header(alias="X-Sfumato-Client-Address", max_length=64)] = "",
    authorization: Annotated[str | None, Header()] = None,
    grpc_timeout: Annotated[str | None, Header(alias="grpc-timeout")] = None,
) -> Response:
    edge.check_edge_key(services, edge_key)
    decision = await edge.authorize(
        session=session,
        services=services,
        rpc=rpc,
        authorization=authorization,
        grpc_timeout=grpc_timeout,
        call_id=call_id,
        address=client_address or "edge",
        body=await request.body(),
    )
    if decision.allowed:
        assert decision.deadline_s is not None
        return Response(
            status_code=200, headers={"X-Sfumato-Grpc-Timeout": edge.format_grpc_timeout(decision.deadline_s)}
        )
    message = urllib.parse.quote(decision.message, safe=_GRPC_MESSAGE_SAFE)
    return Response(
        status_code=403, headers={"X-Grpc-Status": str(decision.grpc_status), "X-Grpc-Message": message}
    )


@router.post("/calls/end", status_code=204)
async def end_calls(body: EndedCalls, services: ServicesDep, edge_key: EdgeKey = None) -> Response:
    edge.check_edge_key(services, edge_key)
    services.edge_calls.end(body.calls)
    return Response(status_code=204)
