"""The web playground: a static page at `/` that calls this same API from the browser.

It needs no key to load (the page holds no data); every API call it makes carries the key the person enters.
The files are served by name from a fixed list, so no request path ever reaches the filesystem.
`/playground/config` tells the page what it cannot learn from the API: whether the deployment's base model is the
project's tiny test model (tools/models.py `build_tiny`), whose random weights draw noise, so the page can say so,
and whether the service is open (no keys), so the page lists the adapters before any key is typed.
"""

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from app.deps import SettingsDep
from app.errors import Problem
from app.tokens import locate

log = logging.getLogger("app.routes.playground")

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}

# Same-origin script and style only (no inline code, no CDN); images are blob: URLs the page makes itself.
# connect-src allows https: because in presigned mode an image download is redirected to the object store,
# and blob: so the page's own images can be read back (the test checks their sha256 that way).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self' blob: https:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a deploy's new page and script arrive together
}


# SDXL's UNet has block_out_channels [320, 640, 1280] (the refiner's start at 384); the tiny test model's are
# [16, 32, 96]. A UNet whose widest block is narrower than SDXL's narrowest is a test model, not a real one.
SDXL_SMALLEST_BLOCK = 320


@lru_cache(maxsize=8)
def is_tiny_model(base_model: str) -> bool:
    """True when `<base_model>/unet/config.json` (a local folder, or the hub cache; never a download) describes a
    UNet narrower than any SDXL. False when the config is not on this machine or cannot be read: no note then."""
    folder = locate(base_model, "unet", None)
    if folder is None or not (folder / "config.json").is_file():
        return False
    try:
        channels = json.loads((folder / "config.json").read_text()).get("block_out_channels") or []
        return bool(channels) and max(int(c) for c in channels) < SDXL_SMALLEST_BLOCK
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("could not read %s/config.json: %s", folder, exc)
        return False


@router.get("/playground/config")
def config(settings: SettingsDep, request: Request) -> JSONResponse:  # a plain def: the first look may read files
    body: dict[str, Any] = {"tiny_model": is_tiny_model(settings.base_model)}
    # open (no keys): the page may list the adapters before a key is typed, without a 401 in the console
    body["open"] = bool(request.app.state.keyring.open)
    return JSONResponse(body, headers=HEADERS)


@router.get("/")
async def playground() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/static/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise Problem(404, f"no static file named {name!r}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)
