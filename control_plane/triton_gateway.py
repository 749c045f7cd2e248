"""The control plane's one way to Triton: every call it makes goes through :class:`TritonGateway`.

One gateway per :class:`~sfumato.control_plane.services.Services` (one per process), owning one
``tritonclient.grpc.aio`` client, shared by the workers' inference calls, readiness (``/readyz``
and the workers' "may I claim" check), the ``pipeline`` model's configuration (its instance count
is a worker's capacity) and the admin routes' repository index and load / unload.

* Every call has a deadline (``client_timeout``).
* Every failure is raised as the project's one mapping of gRPC statuses,
  :func:`sfumato.clients.triton_grpc.triton_error` (``TritonUnavailableError`` and friends).
* The model-repository and model-config protocols are restricted in Triton (configured with the
  header key ``sfumato-admin-key``): those calls carry ``settings.triton_restricted_key()`` in the
  gRPC metadata key Triton expects for it, ``triton-grpc-protocol-sfumato-admin-key``.
* Readiness is cached for :data:`READY_TTL_S`, so that many workers asking "may I claim?" cost one
  call; a call that finds Triton unavailable marks it not ready at once.
* The channel reconnects with a short backoff (at most :data:`RECONNECT_BACKOFF_MAX_MS`), so that a
  restarted Triton is used again within a couple of seconds, not gRPC's default two minutes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sfumato.clients.triton_grpc import (
    Progress,
    TritonCallError,
    TritonUnavailableError,
    pipeline_inputs,
    triton_error,
)
from sfumato.control_plane.metrics import Metrics
from sfumato.control_plane.settings import Settings
from sfumato.errors import NotFoundError
from sfumato.serving.contract import ModelContract, model_limits
from sfumato.triton_server import ADMIN_KEY_GRPC_METADATA

READY_TTL_S = 1.0  # how long a readiness answer is reused
HEALTH_TIMEOUT_S = 2.0  # deadline of health and readiness calls
CONFIG_TIMEOUT_S = 10.0  # deadline of model configuration and repository index calls
CONTROL_TIMEOUT_S = 300.0  # deadline of a model load or unload (8 pipeline instances take ~10 s)
SETTLE_TIMEOUT_S = 60.0  # how long load / unload wait for the model to leave LOADING / UNLOADING
RECONNECT_BACKOFF_MAX_MS = 2000


@dataclass(frozen=True, slots=True)
class ModelState:
    name: str
    version: str
    state: str
    reason: str


@dataclass(frozen=True, slots=True)
class Generated:
    """What one ``pipeline`` call returned."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    seeds: np.ndarray  # int64 [N]
    model_version: str
    elapsed_s: float


class TritonGateway:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.url = settings.triton_url
        self._client: Any = None
        self._admin_headers: dict[str, str] | None = None
        self._ready_lock: asyncio.Lock | None = None
        self._ready: tuple[float, str | None] | None = None  # (monotonic time checked, problem)
        self._capacity: int | None = None
        self._contracts: dict[str, ModelContract] = {}  # a pipeline's limits and defaults, by name

    # ----------------------------------------------------------------------- plumbing

    def _grpc(self) -> Any:
        """The one ``tritonclient.grpc.aio`` client (made on first use, inside the running loop)."""
        if self._client is None:
            import tritonclient.grpc.aio as aio

            keepalive = aio.KeepAliveOptions()
            self._client = aio.InferenceServerClient(
                self.url,
                channel_args=[
                    # tritonclient's own defaults (passing channel_args replaces them) ...
                    ("grpc.max_send_message_length", aio.MAX_GRPC_MESSAGE_SIZE),
                    ("grpc.max_receive_message_length", aio.MAX_GRPC_MESSAGE_SIZE),
                    ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
                    ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
                    ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
                    ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
                    # ... and a short reconnect backoff: Triton restarts are expected.
                    ("grpc.initial_reconnect_backoff_ms", 250),
                    ("grpc.min_reconnect_backoff_ms", 250),
                    ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
                ],
            )
        return self._client

    def _admin(self) -> dict[str, str]:
        """The header Triton's restricted protocols (model repository, model config) demand."""
        if self._admin_headers is None:
            self._admin_headers = {ADMIN_KEY_GRPC_METADATA: self.settings.triton_restricted_key()}
        return self._admin_headers

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``client.<method>(...)`` with Triton's errors raised as :class:`TritonCallError`."""
        from tritonclient.utils import InferenceServerException

        try:
            return await getattr(self._grpc(), method)(*args, **kwargs)
        except InferenceServerException as exc:
            error = triton_error(exc, url=self.url)
        if isinstance(error, TritonUnavailableError):
            self.mark_unavailable(str(error))
        raise error

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    # ----------------------------------------------------------------------- readiness

    async def readiness(self) -> str | None:
        """``None`` when Triton and the served model are ready, else what is wrong (cached for
        :data:`READY_TTL_S`; concurrent askers share one check)."""
        if self._ready is not None and time.monotonic() - self._ready[0] < READY_TTL_S:
            return self._ready[1]
        if self._ready_lock is None:
            self._ready_lock = asyncio.Lock()
        async with self._ready_lock:
            if self._ready is not None and time.monotonic() - self._ready[0] < READY_TTL_S:
                return self._ready[1]
            problem = await self._check_ready()
            if problem is None and (self._ready is None or self._ready[1] is not None):
                self._capacity = None  # (re)connected: the model's configuration may have changed
            self._ready = (time.monotonic(), problem)
            return problem

    async def _check_ready(self) -> str | None:
        model = self.settings.model_name
        try:
            if not await self._call("is_server_ready", client_timeout=HEALTH_TIMEOUT_S):
                return f"Triton at {self.url} is not ready"
            if not await self._call("is_model_ready", model, client_timeout=HEALTH_TIMEOUT_S) and not any(
                # Without a version Triton asks the highest one, which is LOADING while a new
                # version of the model is published: any version ready will do.
                m.name == model and m.state == "READY"
                for m in await self.models()
            ):
                return f"Triton at {self.url}: model {model!r} is not ready"
        except TritonCallError as error:
            return f"unreachable: {error}"
        return None

    def mark_unavailable(self, problem: str) -> None:
        """A call found Triton unavailable: say "not ready" until the next check."""
        self._ready = (time.monotonic(), problem)

    # ----------------------------------------------------------------------- configuration

    async def pipeline_capacity(self) -> int:
        """How many requests the served model runs at once: the sum of its instance groups'
        counts, read from Triton's model configuration (cached until Triton reconnects or the
        model is loaded again)."""
        if self._capacity is None:
            config = await self._call(
                "get_model_config",
                self.settings.model_name,
                headers=self._admin(),
                as_json=True,
                client_timeout=CONFIG_TIMEOUT_S,
            )
            groups = config.get("config", {}).get("instance_group", [])
            self._capacity = max(1, sum(int(group.get("count", 1)) for group in groups) or 1)
        return self._capacity

    async def model_contract(self, name: str) -> ModelContract:
        """The limits and defaults a pipeline model publishes in its configuration (cached until
        the model is loaded or unloaded again, or :meth:`forget` is called)."""
        contract = self._contracts.get(name)
        if contract is None:
            config = await self._call(
                "get_model_config", name, headers=self._admin(), as_json=True, client_timeout=CONFIG_TIMEOUT_S
            )
            try:
                contract = model_limits(config)
            except ValueError as exc:
                raise NotFoundError(f"model {name!r} publishes no usable limits: {exc}") from None
            self._contracts[name] = contract
        return contract

    def forget(self, name: str | None = None) -> None:
        """Drop what is cached about ``name`` (every model when ``None``)."""
        if name is None:
            self._contracts.clear()
            self._capacity = None
        else:
            self._contracts.pop(name, None)
            if name == self.settings.model_name:
                self._capacity = None

    async def version_ready(self, name: str, version: int | str) -> bool:
        """Whether version ``version`` of ``name`` is loaded and ready."""
        return bool(await self._call("is_model_ready", name, str(version), client_timeout=HEALTH_TIMEOUT_S))

    async def models(self) -> list[ModelState]:
        """Triton's repository index: every model and its state."""
        index = await self._call(
            "get_model_repository_index", headers=self._admin(), as_json=True, client_timeout=CONFIG_TIMEOUT_S
        )
        return [
            ModelState(
                name=m["name"],
                version=m.get("version", ""),
                state=m.get("state", ""),
                reason=m.get("reason", ""),
            )
            for m in index.get("models", [])
        ]

    async def _require(self, name: str) -> None:
        if name not in {m.name for m in await self.models()}:
            raise NotFoundError(f"no model {name!r} in Triton's repository")

    async def load(self, name: str) -> list[ModelState]:
        """Load (or reload) ``name``, a model of the repository; its settled state. (No config
        or file overrides: the repository is the only source of models.)"""
        await self._require(name)
        await self._call("load_model", name, headers=self._admin(), client_timeout=CONTROL_TIMEOUT_S)
        return await self._settled(name)

    async def unload(self, name: str) -> list[ModelState]:
        """Unload ``name``; its settled state (Triton unloads once in-flight requests finish)."""
        await self._require(name)
        await self._call("unload_model", name, headers=self._admin(), client_timeout=CONTROL_TIMEOUT_S)
        return await self._settled(name)

    async def _settled(self, name: str) -> list[ModelState]:
        self._ready = None
        self.forget(name)
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            state = [m for m in await self.models() if m.name == name]
            if not state or state[0].state not in {"UNLOADING", "LOADING"} or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.2)

    # ----------------------------------------------------------------------- inference

    async def generate(
        self,
        *,
        request_id: str,
        prompt: str,
        image: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        model: str | None = None,
        model_version: int | str | None = None,
        **fields: Any,
    ) -> Generated:
        """One call of a pipeline model (``model``, a registered model's Triton pipeline, at
        ``model_version``; default: ``SFUMATO_MODEL_NAME`` at Triton's choice of version), under
        ``SFUMATO_TRITON_TIMEOUT_S``. Cancelling the awaiting task cancels the gRPC call, which
        Triton passes on to the model."""
        import tritonclient.grpc.aio as aio

        inputs = pipeline_inputs(aio, prompt=prompt, image=image, mask=mask, **fields)
        started = time.perf_counter()
        try:
            result = await self._call(
                "infer",
                model or self.settings.model_name,
                inputs,
                model_version="" if model_version is None else str(model_version),
                outputs=[aio.InferRequestedOutput("images"), aio.InferRequestedOutput("seeds")],
                client_timeout=self.settings.triton_timeout_s,
                request_id=request_id,
            )
        except TritonCallError as error:
            self.metrics.pipeline_failures.labels(code=error.code).inc()
            raise
        elapsed = time.perf_counter() - started
        self.metrics.triton_duration.observe(elapsed)
        return Generated(
            images=result.as_numpy("images"),
            seeds=result.as_numpy("seeds"),
            model_version=str(result.get_response().model_version),
            elapsed_s=elapsed,
        )

    async def generate_stream(
        self,
        *,
        request_id: str,
        prompt: str,
        on_progress: Callable[[Progress], Awaitable[None]],
        image: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        preview_every: int | None = None,
        model: str | None = None,
        model_version: int | str | None = None,
        **fields: Any,
    ) -> Generated:
        """:meth:`generate` through the model's streaming twin (``<pipeline>_stream``, e.g.
        ``pipeline_stream``; same version):
        ``on_progress`` is awaited with each step (and a preview every ``preview_every`` steps)
        as Triton sends it; the images come last. Cancelling the awaiting task cancels the gRPC
        stream, and Triton stops the model's loop."""
        from sfumato.clients.triton_grpc import Generation, astream_generate

        started = time.perf_counter()
        final: Generation | None = None
        try:
            async for event in astream_generate(
                self._grpc(),
                prompt,
                timeout_s=self.settings.triton_timeout_s,
                preview_every=preview_every or None,
                request_id=request_id,
                model=f"{model or self.settings.model_name}_stream",
                model_version="" if model_version is None else str(model_version),
                image=image,
                mask=mask,
                **fields,
            ):
                if isinstance(event, Generation):
                    final = event
                else:
                    await on_progress(event)
        except TritonCallError as error:
            self.metrics.pipeline_failures.labels(code=error.code).inc()
            if isinstance(error, TritonUnavailableError):
                self.mark_unavailable(str(error))
            raise
        if final is None:  # (astream_generate ends with the images or raises)
            raise TritonUnavailableError(f"Triton at {self.url}: the stream ended without images")
        elapsed = time.perf_counter() - started
        self.metrics.triton_duration.observe(elapsed)
        return Generated(
            images=final.images, seeds=final.seeds, model_version=final.model_version, elapsed_s=elapsed
        )

    # ----------------------------------------------------------------------- embeddings

    EMBED_BATCH = 32  # the exported text encoder's max_batch_size

    def _tokenizer(self) -> Any:
        if getattr(self, "_prompt_tokenizer", None) is None:
            from sfumato.serving.tokenizer import PromptTokenizer

            path = self.settings.text_tokenizer
            if not path.is_file():
                raise TritonCallError(
                    f"no tokenizer at {path} (SFUMATO_TEXT_TOKENIZER): cannot embed prompts",
                    code="FAILED_PRECONDITION",
                )
            self._prompt_tokenizer = PromptTokenizer(path)
        return self._prompt_tokenizer

    async def embed_prompts(self, prompts: list[str]) -> np.ndarray:
        """The served text encoder's pooled output (``pooler_output``: the final hidden state at the
        end-of-text token, after the last layer norm, as CLIP defines it) for each prompt:
        ``float32 [len(prompts), D]``. Tokenized here with the pipeline's own tokenizer, sent in
        batches of up to :data:`EMBED_BATCH` rows."""
        import tritonclient.grpc.aio as aio

        if not prompts:
            return np.zeros((0, 0), dtype=np.float32)
        ids = self._tokenizer()(list(prompts))
        parts = []
        for start in range(0, len(ids), self.EMBED_BATCH):
            chunk = ids[start : start + self.EMBED_BATCH]
            tensor = aio.InferInput("input_ids", list(chunk.shape), "INT64")
            tensor.set_data_from_numpy(chunk)
            result = await self._call(
                "infer",
                self.settings.text_encoder_model,
                [tensor],
                outputs=[aio.InferRequestedOutput("pooler_output")],
                client_timeout=CONFIG_TIMEOUT_S,
            )
            parts.append(result.as_numpy("pooler_output").astype(np.float32))
        return np.concatenate(parts)
