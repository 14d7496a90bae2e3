"""The web playground: a static page at `/` that calls this same API from the browser.

It needs no key to load (the page holds no data); every API call it makes carries the key the person enters.
The files are served by name from a fixed list, so no request path ever reaches the filesystem.
"""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.errors import Problem

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


@router.get("/")
async def playground() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/static/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise Problem(404, f"no static file named {name!r}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)
