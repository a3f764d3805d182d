"""The HTTP routes of ``lastlayer serve`` (a Starlette app).

==========================================  ===============================================
``GET /``                                   the page: drop an image, see its labels
``GET /v2/health/live``, ``/v2/health/ready``  Open Inference Protocol health
``GET /v2``                                 server metadata
``GET /v2/models/NAME``                     model metadata (input, output, labels)
``GET /v2/models/NAME/ready``               model readiness
``GET /v2/models/NAME/stats``               images classified and network calls made
``POST /v2/models/NAME/infer``              KServe v2 inference: ``image`` as ``UINT8 [N, S, S, 3]``
                                            or ``BYTES [N]`` (base64 image files) in,
                                            ``FP32 [N, C]`` probabilities out (and, for a
                                            model with a "none of the above" score, that
                                            ``FP32 [N]`` and ``unknown`` ``BOOL [N]``)
``GET /v1/models``                          the models' names
``POST /v1/models/NAME:classify``           image file bytes in, ``{"labels": [{label, score}],
                                            "answer", "unknown", "ood_score"}`` out
==========================================  ===============================================

Every error is JSON ``{"error": "..."}``: 400 for a bad image or request (never a 500) or a ``Host``
header that names no name of this server, 404 for an unknown model, 408 for a body that does not
arrive within ``--request_timeout``, 413 over ``--max_request_bytes``, 503 when ``--max_queue``
images are held (a request takes its places before decoding), ``--max_decode_pixels`` are being
decoded, or the answer takes longer than ``--request_timeout``. Bounds are named in the messages.
After a burst, the memory decoded images freed is given back to the system.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from lastlayer.errors import DataError
from lastlayer.model import contract
from lastlayer.model.inference import Answer, Prepared, RetrainedModel
from lastlayer.serve import guard, v2
from lastlayer.serve.batcher import Batcher, Busy
from lastlayer.serve.v2 import Problem
from lastlayer.settings.options import ServeOptions
from lastlayer.version import __version__

#: Seconds without requests after which the memory of decoded images is given back.
IDLE_S = 0.5
#: The page's Content-Security-Policy: its own script and style, images from the dropped file only.
PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob:; "
    "connect-src 'self'"
)


@dataclass
class Served:
    """One served model: its name, the loaded model and its batcher."""

    name: str
    model: RetrainedModel
    batcher: Batcher


class Service:
    """The request handlers over the served models."""

    def __init__(self, models: Mapping[str, RetrainedModel], options: ServeOptions) -> None:
        self.options = options
        self.models: dict[str, Served] = {}
        self.in_progress = 0  # inference requests being read or answered (one event loop: no lock)
        self.held = 0  # images of those requests, from before they are decoded to their answer
        self.budget = guard.DecodeBudget(options.max_decode_pixels)
        self.decoded = 0  # images decoded since the memory was last given back
        self._loaded = dict(models)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Start a batcher per model while the server runs."""
        wait = self.options.max_wait_ms / 1000
        for name, model in self._loaded.items():
            batcher = Batcher(model, self.options.max_batch, wait, self.options.max_queue)
            batcher.start()
            self.models[name] = Served(name, model, batcher)
        try:
            yield
        finally:
            await asyncio.gather(*(s.batcher.stop() for s in self.models.values()))

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold one of ``--max_queue`` places for an inference request (so at most that many
        bodies are held at once); 503 when none is free."""
        if self.in_progress >= self.options.max_queue:
            raise Problem(
                503,
                f"the server is busy ({self.in_progress} requests in progress, "
                f"--max_queue={self.options.max_queue}); retry",
            )
        self.in_progress += 1
        try:
            yield
        finally:
            self.in_progress -= 1
            if not self.in_progress and self.decoded:
                asyncio.get_running_loop().call_later(IDLE_S, self._give_back_if_idle)

    def _give_back_if_idle(self) -> None:
        """Give the memory of the images decoded back to the system once no request is in progress."""
        if not self.in_progress and self.decoded:
            self.decoded = 0
            asyncio.get_running_loop().run_in_executor(None, guard.give_back_memory)

    @contextlib.contextmanager
    def places(self, images: int) -> Iterator[None]:
        """Hold ``images`` of the ``--max_queue`` image places from before their decoding to their
        answer; 503 when they are not free (so the images held at once stay within the bound)."""
        if self.held + images > self.options.max_queue:
            raise Problem(
                503,
                f"the server is busy ({self.held} images held, {images} more asked, "
                f"--max_queue={self.options.max_queue}); retry",
            )
        self.held += images
        try:
            yield
        finally:
            self.held -= images

    def served(self, request: Request) -> Served:
        name = request.path_params["name"]
        if name not in self.models:
            known = ", ".join(self.models) or "none"
            raise Problem(404, f"no model named {name!r}; this server has: {known}")
        return self.models[name]

    # -- health and metadata ------------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = bool(self.models) and all(s.batcher.running for s in self.models.values())
        return JSONResponse({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": "lastlayer", "version": __version__, "extensions": []})

    async def model_list(self, request: Request) -> Response:
        return JSONResponse({"models": list(self.models)})

    async def model_metadata(self, request: Request) -> Response:
        served = self.served(request)
        info = served.model.info
        inputs = [
            {"name": name, "datatype": "UINT8", "shape": [-1, prep.size, prep.size, 3]}
            for name, prep in info.inputs
        ]
        return JSONResponse(
            {
                "name": served.name,
                "versions": [],
                "platform": "onnxruntime_onnx",
                "inputs": inputs,
                "outputs": [
                    {
                        "name": served.model.output,
                        "datatype": "FP32",
                        "shape": [-1, len(served.model.labels)],
                    },
                    *v2.unknown_outputs(info.unknown),
                ],
                "parameters": {
                    "labels": list(served.model.labels),
                    "architecture": info.architecture,
                    **({"unknown": dataclasses.asdict(info.unknown)} if info.unknown else {}),
                },
            }
        )

    async def model_ready(self, request: Request) -> Response:
        served = self.served(request)
        return JSONResponse({"name": served.name, "ready": served.batcher.running})

    async def model_stats(self, request: Request) -> Response:
        served = self.served(request)
        stats = served.batcher.stats
        return JSONResponse(
            {
                "model_stats": [
                    {"name": served.name, "inference_count": stats.images, "execution_count": stats.batches}
                ]
            }
        )

    # -- inference ------------------------------------------------------------------------------
    async def classify(self, request: Request) -> Response:
        served = self.served(request)
        top_k = v2.top_k(request.query_params.get("top_k"), self.options.top_k)
        with self.admitted():
            data = await self.body(request)
            if not data:
                raise Problem(400, "the request body is empty: POST the bytes of an image file")
            with self.places(1):
                with served.batcher.announced():
                    image = await self.prepare(served, data)
                (answer,) = await self.answers(served, [image])
        top = served.model.chosen(answer.probabilities, top_k)
        multi = served.model.info.thresholds is not None  # the answer: the labels over their thresholds
        return JSONResponse(
            {
                "model_name": served.name,
                "labels": [{"label": label, "score": score} for label, score in top],
                "answer": [label for label, _ in top] if multi else answer.unknown or top[0][0],
                "unknown": answer.unknown is not None,
                "ood_score": answer.ood_score,
            }
        )

    async def infer(self, request: Request) -> Response:
        served = self.served(request)
        with self.admitted():
            payload = v2.parse_json(await self.body(request))
            with self.places(v2.image_count(payload, self.options.max_queue)):
                images = await self.inputs(served, payload)
                answers = await self.answers(served, images)
        probs = np.stack([a.probabilities for a in answers])
        outputs = [
            {
                "name": served.model.output,
                "datatype": "FP32",
                "shape": list(probs.shape),
                "data": probs.ravel().tolist(),
            }
        ]
        if (unknown := served.model.info.unknown) is not None:
            scores, flags = [a.ood_score for a in answers], [a.unknown is not None for a in answers]
            outputs.append(
                {"name": unknown.output, "datatype": "FP32", "shape": [len(scores)], "data": scores}
            )
            outputs.append(
                {"name": v2.UNKNOWN_OUTPUT, "datatype": "BOOL", "shape": [len(flags)], "data": flags}
            )
        asked = v2.asked_outputs(payload.get("outputs")) or [o["name"] for o in outputs]
        reply: dict[str, Any] = {
            "model_name": served.name,
            "outputs": [o for o in outputs if o["name"] in asked],
        }
        if isinstance(payload.get("id"), str):
            reply["id"] = payload["id"]
        return JSONResponse(reply)

    async def inputs(self, served: Served, payload: Any) -> list[Prepared]:
        """The prepared images of a v2 request: one ``BYTES`` input named ``image`` holding image
        files, or one ``UINT8`` pixel tensor per model input (``image``; ``image_0``, ``image_1``, ...
        for a model of several networks). ``payload`` passed :func:`_image_count`."""
        v2.check_outputs(payload.get("outputs"), v2.output_names(served.model))
        tensors = payload["inputs"]
        names = [name for name, _ in served.model.info.inputs]
        if not tensors or not all(isinstance(t, dict) for t in tensors):
            raise Problem(400, f"send the input(s) {', '.join(names)} as objects")
        for tensor in tensors:
            v2.check_shape(tensor.get("shape"), self.options.max_queue)
        if len(tensors) == 1 and tensors[0].get("datatype") == "BYTES":
            v2.check_name(tensors[0], contract.IMAGE)
            files = v2.encoded_images(tensors[0], tensors[0]["shape"])
            with served.batcher.announced(len(files)):
                return [await self.prepare(served, raw) for raw in files]
        if len(tensors) != len(names):
            raise Problem(400, f"send {len(names)} UINT8 input(s), {', '.join(names)}, or one BYTES input")
        pixels = []
        for tensor, (name, prep) in zip(tensors, served.model.info.inputs, strict=True):
            v2.check_name(tensor, name)
            if tensor.get("datatype") != "UINT8":
                raise Problem(
                    400,
                    f"datatype {tensor.get('datatype')!r}: send UINT8 pixels or BYTES (base64 image files)",
                )
            pixels.append(v2.pixels(tensor, tensor["shape"], prep.size))
        if len({p.shape[0] for p in pixels}) != 1:
            raise Problem(400, "every UINT8 input must hold the same number of images")
        return [tuple(p[i] for p in pixels) for i in range(pixels[0].shape[0])]

    async def prepare(self, served: Served, data: bytes) -> Prepared:
        """The network input of an image file, decoded off the event loop within the decode budget;
        400 when it is no image or too large, 503 when the budget has no room for it."""
        try:
            pixels = _declared_pixels(data, self.options.max_pixels)
            with self.budget.taken(pixels):
                prepared = await run_in_threadpool(served.model.prepare, data)
        except DataError as exc:
            raise Problem(400, f"not an image this server can read: {exc}") from None
        except guard.Exhausted as exc:
            raise Problem(503, f"the server is busy ({exc}); retry") from None
        self.decoded += 1
        return prepared

    async def answers(self, served: Served, images: list[Prepared]) -> list[Answer]:
        """What the model says of each image, through its batcher, within ``--request_timeout``."""
        futures: list[asyncio.Future[Answer]] = []
        try:
            for image in images:
                futures.append(served.batcher.submit(image))
        except Busy as exc:
            for future in futures:  # the batcher skips them
                future.cancel()
            raise Problem(
                503, f"the server is busy ({exc}, --max_queue={self.options.max_queue}); retry"
            ) from None
        timeout = self.options.request_timeout
        try:
            return list(await asyncio.wait_for(asyncio.gather(*futures), timeout))
        except TimeoutError:
            raise Problem(503, f"no answer within --request_timeout={timeout:g} s; retry later") from None

    async def body(self, request: Request) -> bytes:
        """The request body: at most ``--max_request_bytes``, arriving within ``--request_timeout``."""
        limit, timeout = self.options.max_request_bytes, self.options.request_timeout
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise Problem(413, _too_big(int(declared), limit))
        try:
            return await asyncio.wait_for(_read(request, limit), timeout)
        except TimeoutError:
            raise Problem(
                408, f"the request body did not arrive within --request_timeout={timeout:g} s"
            ) from None

    async def page(self, request: Request) -> Response:
        text = files("lastlayer.serve").joinpath("page.html").read_text(encoding="utf-8")
        return HTMLResponse(text, headers={"Content-Security-Policy": PAGE_POLICY})


def _too_big(size: int, limit: int) -> str:
    return f"the request body has at least {size:,} bytes, more than --max_request_bytes={limit:,} allows"


async def _read(request: Request, limit: int) -> bytes:
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise Problem(413, _too_big(total, limit))
        chunks.append(chunk)
    return b"".join(chunks)


def _declared_pixels(data: bytes, max_pixels: int) -> int:
    """The pixels an image file declares (its header alone is read; at least 1).

    Raises:
        DataError: more than ``max_pixels``.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            width, height = img.size
    except Exception:  # not an image, or a bomb PIL refuses itself: prepare says why
        width = height = 0
    if width * height > max_pixels:
        raise DataError(f"{width}x{height} = {width * height:,} px, more than --max_pixels={max_pixels:,}")
    return max(1, width * height)


async def _problem(request: Request, exc: Exception) -> Response:
    if isinstance(exc, Problem):
        return JSONResponse({"error": str(exc)}, exc.status)
    if not isinstance(exc, HTTPException):  # a bug, logged with its traceback by the server
        return JSONResponse({"error": f"the server failed ({exc.__class__.__name__}); see its log"}, 500)
    message = exc.detail
    if exc.status_code == 404:
        path = request.url.path
        message = f"no such path {path}: this server answers /, /v2/... and /v1/models/NAME:classify"
    return JSONResponse({"error": message}, exc.status_code, headers=exc.headers)


def create_app(models: Mapping[str, RetrainedModel], options: ServeOptions) -> guard.HostCheck:
    """The ASGI app serving ``models`` by name (see the module doc for the routes), answering only
    requests whose ``Host`` is ``--host``, a local name or an ``--allowed_host``."""
    service = Service(models, options)
    routes = [
        Route("/", service.page),
        Route("/v2/health/live", service.live),
        Route("/v2/health/ready", service.ready),
        Route("/v2", service.server_metadata),
        Route("/v2/models/{name}", service.model_metadata),
        Route("/v2/models/{name}/ready", service.model_ready),
        Route("/v2/models/{name}/stats", service.model_stats),
        Route("/v2/models/{name}/infer", service.infer, methods=["POST"]),
        Route("/v1/models", service.model_list),
        Route("/v1/models/{name}:classify", service.classify, methods=["POST"]),
    ]
    handlers = {Problem: _problem, HTTPException: _problem, Exception: _problem}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=service.lifespan)
    return guard.HostCheck(app, [*guard.LOCAL_NAMES, options.host, *options.allowed_host])
