"""The FastAPI app: the web UI's ``/sdapi/v1/*`` endpoints over one :class:`Service`, the page at ``/``."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from ldm import api, samplers
from ldm.checkpoint import CheckpointError
from ldm.inference.errors import UsageError
from ldm.inference.metadata import parse_parameters
from ldm.inference.outputs import PARAMETERS_KEY
from ldm.samplers.schedules import SCHEDULE_LABELS, USER_SCHEDULES
from ldm.server import images as b64
from ldm.server.auth import BasicAuth, UploadLimit
from ldm.server.models import find_loras
from ldm.server.queue import Job, QueueFull
from ldm.server.schemas import MAX_CLIP_SKIP, Img2ImgBody, OptionsBody, PngInfoBody, TaskProgressBody, Txt2ImgBody
from ldm.server.service import Service

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
PREFIX = "/sdapi/v1"
DISCONNECT_POLL_S = 0.2


def _readable(errors: list[dict]) -> str:
    """One line from pydantic's error list: ``field: problem (got value)``."""
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], (dict, list)) else ""
        parts.append(f"{where}: {e.get('msg', 'invalid')}{got}")
    return "; ".join(parts)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors())
        return JSONResponse({"detail": errors, "error": "ValidationError", "message": _readable(errors)}, 422)

    @app.exception_handler(UsageError)
    async def usage(request: Request, exc: UsageError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "error": "UsageError", "message": str(exc)}, 422)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        logger.error("request failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        message = f"{type(exc).__name__}: {exc}"
        return JSONResponse({"detail": message, "error": type(exc).__name__, "message": message}, 500)

    @app.exception_handler(QueueFull)
    async def full(request: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "error": "QueueFull", "message": str(exc)}, 503)

    @app.exception_handler(CheckpointError)
    async def checkpoint(request: Request, exc: CheckpointError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "error": "CheckpointError", "message": str(exc)}, 422)


async def _wait(service: Service, job: Job, request: Request) -> Any:
    """The job's result; a client that goes away withdraws its job (HTTP 499, nobody reads it)."""
    future = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
        if done:
            return future.result()
        if await request.is_disconnected():
            service.queue.withdraw(job)
            logger.info("client of job %d went away: job withdrawn", job.id)
            raise HTTPException(499, "client closed the request")


def _generation_route(service: Service, mode_of: Callable[[Any], str], to_request: Callable[[Any], api.Request]):
    async def route(body: Any, request: Request) -> dict[str, Any]:
        problem = body.check_limits(service.cfg.limits)
        if problem:
            raise UsageError(problem)
        req, mode = await asyncio.to_thread(to_request, body), mode_of(body)  # decoding uploads off the loop
        req = dataclasses.replace(req, clip_skip=_clip_skip(body.override_settings, service.clip_skip))
        override = body.override_settings.get("sd_model_checkpoint")
        entry = service.find(str(override)) if override else None

        def work(job: Job) -> tuple[api.Result, list[str]]:
            result = service.generate_with(job, req, mode, body.save_images, entry,
                                           body.override_settings_restore_afterwards)
            pairs = zip(result.images, result.parameters) if body.send_images else ()
            return result, [b64.encode_png(image, text) for image, text in pairs]

        result, encoded = await _wait(service, service.queue.submit(mode, work, body.force_task_id), request)
        echo = body.model_dump()
        if "init_images" in echo and not getattr(body, "include_init_images", False):  # as the web UI
            echo.update(init_images=None, mask=None)
        return {"images": encoded, "parameters": echo,
                "info": result.info_json()}
    return route


def _clip_skip(override: dict[str, Any], default: int) -> int:
    """The request's Clip skip: ``override_settings.CLIP_stop_at_last_layers``, else the server's option."""
    value = override.get("CLIP_stop_at_last_layers", default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or not 1 <= value <= MAX_CLIP_SKIP:
        raise UsageError(f"override_settings.CLIP_stop_at_last_layers must be a whole number from 1 to "
                         f"{MAX_CLIP_SKIP}, got {value!r}")
    return int(value)


def _img2img_request(service: Service) -> Callable[[Img2ImgBody], api.Request]:
    limit = service.cfg.limits.max_pixels * 4

    def convert(body: Img2ImgBody) -> api.Request:
        image = b64.decode_image(body.init_images[0], "init_images[0]", limit)
        mask = b64.decode_image(body.mask, "mask", limit) if body.mask else None
        size = (body.width or image.width) * (body.height or image.height)
        if size > service.cfg.limits.max_pixels:  # without width/height the picture's own size is generated
            raise UsageError(f"init_images[0] is {image.width}x{image.height}: generating it is more than this "
                             f"server allows ({service.cfg.limits.max_pixels} pixels); send width and height")
        return api.Request(**body.settings(), strength=body.denoising_strength, init_image=image, mask=mask,
                           resize_mode=body.resize_mode,
                           mask_blur=body.mask_blur, invert_mask=bool(body.inpainting_mask_invert),
                           full_res=body.inpaint_full_res, full_res_padding=body.inpaint_full_res_padding)
    return convert


def _add_generation(app: FastAPI, service: Service) -> None:
    txt2img = _generation_route(service, lambda body: "txt2img", lambda body: api.Request(**body.settings()))
    img2img = _generation_route(service, lambda body: "inpaint" if body.mask else "img2img",
                                _img2img_request(service))

    @app.post(f"{PREFIX}/txt2img")
    async def post_txt2img(body: Txt2ImgBody, request: Request) -> dict[str, Any]:
        """Text to image (the web UI's fields)."""
        return await txt2img(body, request)

    @app.post(f"{PREFIX}/img2img")
    async def post_img2img(body: Img2ImgBody, request: Request) -> dict[str, Any]:
        """Image to image; with ``mask``, inpainting."""
        return await img2img(body, request)

    @app.get(f"{PREFIX}/progress")
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        """The running job's progress, the queue, the live preview."""
        return service.progress(skip_current_image)

    @app.post("/internal/progress")
    async def task_progress(body: TaskProgressBody) -> dict[str, Any]:
        """One task's progress (``force_task_id`` of its request) and a newer live preview, as the web UI's page
        asks for it."""
        return service.task_progress(body.id_task, body.id_live_preview, body.live_preview)

    @app.post(f"{PREFIX}/interrupt")
    async def interrupt() -> dict[str, Any]:
        """Stop the running job; it answers with the images it has."""
        return {"interrupted": service.queue.interrupt()}

    @app.post(f"{PREFIX}/skip")
    async def skip() -> dict[str, Any]:
        """As interrupt (one job runs one request)."""
        return {"interrupted": service.queue.interrupt()}


def _samplers() -> list[dict[str, Any]]:
    return [{"name": s.label, "aliases": [s.name, *s.aliases], "options": {"scheduler": s.schedule}}
            for s in samplers.SAMPLERS]


def _schedulers() -> list[dict[str, Any]]:
    names = {"normal": "uniform"}
    entries = [{"name": "automatic", "label": "Automatic", "aliases": None}]
    return entries + [{"name": names.get(k, k), "label": SCHEDULE_LABELS[k], "aliases": [k]} for k in USER_SCHEDULES]


def _add_catalogue(app: FastAPI, service: Service) -> None:
    app.get(f"{PREFIX}/samplers")(_samplers)
    app.get(f"{PREFIX}/schedulers")(_schedulers)

    @app.get(f"{PREFIX}/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        """The checkpoints ``options`` can switch to."""
        return [c.as_json() for c in service.checkpoints]

    @app.post(f"{PREFIX}/refresh-checkpoints")
    async def refresh_checkpoints() -> None:
        """Scan ``--ckpt_dir`` again."""
        await asyncio.to_thread(service.refresh)

    @app.get(f"{PREFIX}/loras")
    async def loras() -> list[dict[str, Any]]:
        """The LoRAs prompts can name with ``<lora:NAME:WEIGHT>``."""
        from ldm.modules.lora.prompt import DEFAULT_LORA_DIR

        return find_loras(DEFAULT_LORA_DIR)

    @app.get(f"{PREFIX}/scripts")
    async def scripts() -> dict[str, list]:
        """No scripts or extensions."""
        return {"txt2img": [], "img2img": []}

    @app.get(f"{PREFIX}/options")
    async def get_options() -> dict[str, Any]:
        """The current checkpoint and the saving settings."""
        return {"sd_model_checkpoint": service.current.title, "sd_checkpoint_hash": service.current.sha256,
                "CLIP_stop_at_last_layers": service.clip_skip, "samples_save": True, "outdir_samples": str(service.cfg.outdir), "samples_format": "png"}

    @app.post(f"{PREFIX}/options")
    async def set_options(body: OptionsBody, request: Request) -> None:
        """Switch ``sd_model_checkpoint`` (through the queue: after the jobs before it) and set
        ``CLIP_stop_at_last_layers`` (Clip skip of the requests that do not override it); other keys are ignored."""
        if body.CLIP_stop_at_last_layers is not None:
            service.clip_skip = body.CLIP_stop_at_last_layers
        if body.sd_model_checkpoint:
            entry = service.find(body.sd_model_checkpoint)
            await _wait(service, service.queue.submit("load model", lambda job: service.switch(entry)), request)

    @app.post(f"{PREFIX}/png-info")
    async def png_info(body: PngInfoBody) -> dict[str, Any]:
        """The ``parameters`` text of a PNG, parsed."""
        image = b64.decode_image(body.image, "image", service.cfg.limits.max_pixels * 4)
        chunks = b64.text_chunks(image)
        text = chunks.get(PARAMETERS_KEY, "")
        return {"info": text, "items": chunks, "parameters": parse_parameters(text) if text else {}}


def _add_page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        """The browser page (``ldm/server/static/index.html``)."""
        index = STATIC_DIR / "index.html"
        if not index.is_file():
            return JSONResponse({"detail": "the page is not installed (ldm/server/static/index.html)"}, 404)
        return FileResponse(index)

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def create_app(service: Service) -> Any:
    """The ASGI app of a service: routes, error handlers, upload limit, and basic auth when configured."""
    app = FastAPI(title="ldm server", description="A subset of the AUTOMATIC1111 web UI's API")
    _add_error_handlers(app)
    _add_generation(app, service)
    _add_catalogue(app, service)
    _add_page(app)
    app.state.service = service
    guarded: Any = UploadLimit(app, service.cfg.limits.max_upload_bytes)
    if service.cfg.auth:
        guarded = BasicAuth(guarded, service.cfg.auth)
    return guarded
