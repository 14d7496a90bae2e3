"""`sdxl`: the service from a terminal. Submit and watch a generation (from a prompt, or from an image and a mask),
download its images (then, or later with `download`), list, show, cancel, delete; store an input image.

Only the standard library and httpx, so it installs without torch. Progress comes from the generation's
server-sent events; errors print the problem details' `detail`. Exit codes: 0 done, 1 failed (or any error the
request itself did not cause), 2 invalid request (the server's 400/413/415/422, or bad command-line usage),
130 interrupted (a running generation is canceled first).
"""

import argparse
import base64
import hashlib
import json
import mimetypes
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn, TextIO

import httpx

from common.contract.status import TERMINAL_STATUSES

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = tuple(s.value for s in TERMINAL_STATUSES)
INVALID_REQUEST = (400, 413, 415, 422)  # the request was refused as written: a usage error, exit 2
FORMATS = {".png": "png", ".webp": "webp", ".jpg": "jpeg", ".jpeg": "jpeg"}
EXTENSIONS = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}
CONTENT_EXTENSIONS = {"image/png": ".png", "image/webp": ".webp", "image/jpeg": ".jpg"}
STREAM_RETRIES = 5  # reconnects (with Last-Event-ID) before falling back to long-polling
# what `--image`/`--mask` may name instead of a file: sent as is, in JSON (the API resolves it)
REFERENCE_PREFIXES = ("upl_", "https://", "http://", "data:")
# What the service uses for an option left out (the API's GenerationCreate defaults: the CLI sends nothing then,
# so `--help` can only say what the service will do; tests/e2e/test_cli.py checks these against the schema).
SERVICE_DEFAULTS: dict[str, Any] = {
    "width": 1024,
    "height": 1024,
    "num_inference_steps": 30,
    "guidance_scale": 5.0,
    "scheduler": "euler",
    "num_images_per_prompt": 1,
    "output_format": "png",
}


class CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def problem_message(res: httpx.Response) -> str:
    """`detail` of a problem-details answer; something readable for anything else (a proxy's HTML page)."""
    try:
        body = res.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("detail"):
        return str(body["detail"])
    text = res.text.strip().splitlines()[0][:200] if res.text.strip() else res.reason_phrase
    return f"HTTP {res.status_code}: {text}"


def check(res: httpx.Response) -> httpx.Response:
    if res.status_code >= 400:
        raise CliError(problem_message(res), 2 if res.status_code in INVALID_REQUEST else 1)
    return res


class Client:
    def __init__(self, url: str, key: str | None, timeout: float = 30.0) -> None:
        headers = {"User-Agent": "sdxl-cli/1.0", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        # trust_env=False: no proxy from the environment gets to see the key
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, trust_env=False)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return check(self.http.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach {self.http.base_url}: {exc}") from exc

    def json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return dict(self.request(method, path, **kwargs).json())

    def events(self, gen_id: str, last_id: str | None) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """(event id, event name, resource) from the SSE stream until the server closes it."""
        headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last_id} if last_id else {})}
        timeout = httpx.Timeout(30.0, read=60.0)  # the server sends a keep-alive comment every 15 s
        with self.http.stream("GET", f"/v1/generations/{gen_id}/events", headers=headers, timeout=timeout) as res:
            if res.status_code == 204:
                return  # nothing follows the terminal event we already have
            if res.status_code >= 400:
                res.read()
                check(res)
            yield from parse_sse(res.iter_lines())

    def fetch(self, url: str) -> bytes:
        """A URL an event named: the API's own (with the key), or another host's (a presigned one: no key)."""
        if url.startswith("/") or url.startswith(str(self.http.base_url).rstrip("/") + "/"):
            return self.request("GET", url, headers={"Accept": "*/*"}).content
        try:
            return check(httpx.get(url, timeout=self.http.timeout, trust_env=False)).content
        except httpx.TransportError as exc:
            raise CliError(f"cannot fetch {url}: {exc}") from exc

    def download(self, gen_id: str, index: int) -> bytes:
        # a 307 points at the object store (presigned); httpx drops Authorization when the host changes
        return self.request(
            "GET", f"/v1/generations/{gen_id}/images/{index}", follow_redirects=True, headers={"Accept": "*/*"}
        ).content


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    fields: dict[str, str] = {}
    data: list[str] = []
    for line in lines:
        if line == "":
            if data and fields.get("event"):
                try:
                    yield fields.get("id", ""), fields["event"], json.loads("\n".join(data))
                except ValueError:
                    pass  # not ours to crash on; the final GET tells the truth anyway
            fields, data = {}, []
            continue
        if line.startswith(":"):
            continue  # keep-alive comment
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        else:
            fields[name] = value


def waiting(gen: dict[str, Any]) -> str:
    pos = gen.get("queue_position")  # 0 = next to start
    if not isinstance(pos, int):
        return ""
    return " (next)" if pos == 0 else f" ({pos} ahead)"


class ProgressBar:
    """One redrawn line on a terminal; one line per change when stderr is a file or a pipe."""

    WIDTH = 30

    def __init__(self, out: TextIO, quiet: bool = False) -> None:
        self.out = out
        self.quiet = quiet
        self.tty = out.isatty()
        self.last = ""

    def line(self, gen: dict[str, Any]) -> str:
        status = gen.get("status", "")
        if status == "queued":
            return "queued" + waiting(gen)
        p = gen.get("progress") or {}
        step, total = int(p.get("step") or 0), int(p.get("total_steps") or 0)
        if not total and status == "running":
            return f"starting ({p.get('stage') or 'loading'})"
        frac = min(step / total, 1.0) if total else 0.0
        filled = int(frac * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        text = f"[{bar}] {frac * 100:3.0f}%  step {step}/{total}  {p.get('stage') or status}"
        eta = p.get("eta_seconds")
        if isinstance(eta, (int, float)) and status == "running" and eta > 0:
            text += f"  eta {eta:.1f}s"
        return text

    def update(self, gen: dict[str, Any]) -> None:
        text = self.line(gen)
        # a file or pipe gets a line per stage and per tenth of the steps, not one per step (logs stay short)
        key = text if self.tty else self.coarse(gen)
        if self.quiet or key == self.last:
            return
        self.last = key
        if self.tty:
            self.out.write("\r\x1b[2K" + text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    @staticmethod
    def coarse(gen: dict[str, Any]) -> str:
        p = gen.get("progress") or {}
        total = int(p.get("total_steps") or 0)
        tenth = int(10 * int(p.get("step") or 0) / total) if total else -1
        return f"{gen.get('status')}|{p.get('stage')}|{tenth}|{gen.get('queue_position')}"

    def done(self) -> None:
        if self.tty and self.last and not self.quiet:
            self.out.write("\n")
            self.out.flush()
        self.last = ""


PREVIEW_EVENT = "generation.preview"
PREVIEW_EXTENSIONS = {"image/webp": "webp", "image/jpeg": "jpeg"}


def save_preview(client: Client, preview: dict[str, Any], directory: Path) -> None:
    """A `generation.preview` event's image as DIR/<image index>-<step, 4 digits>.<ext>; one that cannot be
    fetched is skipped (previews are best-effort)."""
    try:
        data = base64.b64decode(preview["b64"]) if preview.get("b64") else client.fetch(preview["url"])
    except (CliError, KeyError, TypeError, ValueError) as exc:
        print(f"preview at step {preview.get('step')} skipped: {exc}", file=sys.stderr)
        return
    ext = PREVIEW_EXTENSIONS.get(preview.get("content_type", ""), "webp")
    write_file(directory / f"{int(preview['index'])}-{int(preview['step']):04d}.{ext}", data)


def follow(client: Client, gen: dict[str, Any], bar: ProgressBar, previews: Path | None = None) -> dict[str, Any]:
    """Watch until the generation is final; reconnects resume after the last event seen. `previews`: write the
    live previews there as they arrive."""
    gen_id = gen["id"]
    bar.update(gen)
    last_id: str | None = None
    for _attempt in range(STREAM_RETRIES):
        try:
            for event_id, name, resource in client.events(gen_id, last_id):
                last_id = event_id or last_id
                if name == PREVIEW_EVENT:  # its data is a preview, not the resource
                    if previews is not None:
                        save_preview(client, resource, previews)
                    continue
                gen = resource
                bar.update(gen)
                if gen.get("status") in TERMINAL:
                    return gen
        except httpx.TransportError:
            pass  # dropped: check where it stands, then resume the stream
        gen = client.json("GET", f"/v1/generations/{gen_id}")
        bar.update(gen)
        if gen["status"] in TERMINAL:
            return gen
    while gen["status"] not in TERMINAL:  # the stream keeps failing (a buffering proxy?): long-poll instead
        gen = client.json(
            "GET", f"/v1/generations/{gen_id}", headers={"Prefer": "wait=30"}, timeout=httpx.Timeout(30.0, read=45.0)
        )
        bar.update(gen)
    return gen


def output_paths(output: str | None, gen: dict[str, Any]) -> list[Path]:
    images = gen.get("images") or []
    fmt = (gen.get("params") or {}).get("output_format", "png")
    base = Path(output) if output else Path(gen["id"] + EXTENSIONS.get(fmt, ".png"))
    if len(images) == 1:
        return [base]
    # several images: out.png -> out-0.png, out-1.png ... (N is the image index, as in the API and `seed + N`)
    return [base.with_name(f"{base.stem}-{img['index']}{base.suffix}") for img in images]


def verified(client: Client, gen_id: str, img: dict[str, Any], where: str) -> bytes:
    """The image's bytes, checked against the sha256 the service reported for it."""
    data = client.download(gen_id, img["index"])
    digest = hashlib.sha256(data).hexdigest()
    if img.get("sha256") and digest != img["sha256"]:
        raise CliError(
            f"image {img['index']} arrived damaged: sha256 {digest} but the service says "
            f"{img['sha256']}; nothing was written to {where}"
        )
    return data


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)  # never leave a half-written image under the final name


def save_images(client: Client, gen: dict[str, Any], output: str | None) -> list[tuple[Path, dict[str, Any]]]:
    saved = []
    for path, img in zip(output_paths(output, gen), gen.get("images") or [], strict=True):
        write_file(path, verified(client, gen["id"], img, str(path)))
        saved.append((path, img))
    return saved


def image_line(path: Path | str, img: dict[str, Any]) -> str:
    return f"{path}  seed {img['seed']}  {img['width']}x{img['height']} {img['content_type']}"


def generation_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": args.prompt}
    fmt = args.format
    if fmt is None and args.output:
        fmt = FORMATS.get(Path(args.output).suffix.lower())  # `-o x.webp` asks for WebP
    optional = {
        "negative_prompt": args.negative,
        "width": args.width,
        "height": args.height,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "seed": args.seed,
        "scheduler": args.scheduler,
        "num_images_per_prompt": args.n,
        "output_format": fmt,
        "strength": args.strength,
        "padding_mask_crop": args.padding_mask_crop,
        "previews": True if getattr(args, "previews", None) else None,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if getattr(args, "lora", None):  # LoRA adapters and presets (docs/adapters.md)
        body["loras"] = args.lora
    if getattr(args, "preset", None):
        body["preset"] = args.preset
    if args.refiner is not None:
        body["refiner"] = {"mode": args.refiner}
    return body


FilePart = tuple[str, bytes, str]  # (file name, bytes, content type), as httpx takes a file part


def read_image(value: str, option: str) -> FilePart | str:
    """A file given to `option` as a multipart part; an upload id or URL as the string the JSON carries."""
    path = Path(value)
    if path.is_file():
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CliError(f"{option} {value}: cannot read it: {exc.strerror or exc}", 2) from exc
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"  # the API reads the bytes anyway
        return path.name, data, ctype
    if value.startswith(REFERENCE_PREFIXES):
        return value
    raise CliError(f"{option} {value}: no such file (nor an upload id upl_... or an https URL)", 2)


def submit(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    """POST /v1/generations: JSON, or multipart/form-data when an image or mask is a local file (the file parts
    `image` and `mask_image`, the other fields as one JSON part named `request`)."""
    body = generation_body(args)
    files: dict[str, FilePart] = {}
    for field, value, option in (("image", args.image, "--image"), ("mask_image", args.mask, "--mask")):
        if value is None:
            continue
        source = read_image(value, option)
        if isinstance(source, str):
            body[field] = source
        else:
            files[field] = source
    if not files:
        return client.json("POST", "/v1/generations", json=body)
    return client.json("POST", "/v1/generations", files=files, data={"request": json.dumps(body)})


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def cmd_generate(client: Client, args: argparse.Namespace) -> int:
    gen = submit(client, args)
    if args.no_wait:
        if args.json:
            print_json(gen)
        else:
            print(gen["id"])
        return 0
    bar = ProgressBar(sys.stderr, quiet=args.quiet)
    if not args.quiet:
        print(f"{gen['id']} {gen['status']}", file=sys.stderr, flush=True)
    try:
        gen = follow(client, gen, bar, Path(args.previews) if args.previews else None)
    except KeyboardInterrupt:
        bar.done()
        interrupt(client, gen["id"])
    bar.done()
    if args.json and gen["status"] != "succeeded":
        print_json(gen)  # the failed or canceled resource (its `error`) for a script; the exit code says it too
    if gen["status"] == "failed":
        err = gen.get("error") or {}
        raise CliError(f"generation {gen['id']} failed: {err.get('message') or err.get('type') or 'unknown error'}")
    if gen["status"] == "canceled":
        raise CliError(f"generation {gen['id']} was canceled")
    saved = save_images(client, gen, args.output)
    if args.json:
        print_json(gen)
    else:
        for path, img in saved:
            print(image_line(path, img))
    total = (gen.get("timings") or {}).get("total")
    if total is not None and not args.quiet:
        print(f"{gen['id']} done in {total:.1f}s", file=sys.stderr)
    return 0


def interrupt(client: Client, gen_id: str) -> NoReturn:
    print(f"interrupted: canceling {gen_id}", file=sys.stderr, flush=True)
    try:
        client.http.post(f"/v1/generations/{gen_id}/cancel", timeout=10)
    except httpx.HTTPError as exc:
        print(f"could not cancel {gen_id}: {exc}", file=sys.stderr)
    raise SystemExit(130)


def summary_row(gen: dict[str, Any]) -> str:
    params = gen.get("params") or {}
    p = gen.get("progress") or {}
    size = f"{params.get('width', '?')}x{params.get('height', '?')}" if params else "-"
    steps = f"{p.get('step', 0)}/{p.get('total_steps', 0)}"
    prompt = str(params.get("prompt", "")).replace("\n", " ")
    prompt = prompt if len(prompt) <= 48 else prompt[:47] + "…"
    return f"{gen['id']:<28} {gen['status']:<10} {gen.get('created_at') or '-':<24} {size:<10} {steps:<7} {prompt}"


def cmd_list(client: Client, args: argparse.Namespace) -> int:
    params = {k: v for k, v in {"limit": args.limit, "status": args.status, "cursor": args.cursor}.items() if v}
    page = client.json("GET", "/v1/generations", params=params)
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    rows = page.get("data") or []
    if not rows:
        print("no generations", file=sys.stderr)
    else:
        print(f"{'ID':<28} {'STATUS':<10} {'CREATED':<24} {'SIZE':<10} {'STEPS':<7} PROMPT")
        for gen in rows:
            print(summary_row(gen))
    if page.get("next_cursor"):
        print(f"more: sdxl list --cursor {page['next_cursor']}", file=sys.stderr)
    return 0


def cmd_show(client: Client, args: argparse.Namespace) -> int:
    gen = client.json("GET", f"/v1/generations/{args.id}")
    if args.json:
        print(json.dumps(gen, indent=2))
        return 0
    params = gen.get("params") or {}
    p = gen.get("progress") or {}
    lines = [
        ("id", gen["id"]),
        ("status", gen["status"] + waiting(gen)),
        ("progress", f"step {p.get('step', 0)}/{p.get('total_steps', 0)} {p.get('stage', '')}".rstrip()),
        ("prompt", params.get("prompt")),
        ("negative", params.get("negative_prompt")),
        ("size", f"{params.get('width')}x{params.get('height')}" if params else None),
        ("steps", params.get("num_inference_steps")),
        ("guidance", params.get("guidance_scale")),
        ("scheduler", params.get("scheduler")),
        ("refiner", (params.get("refiner") or {}).get("mode")),
        ("seed", params.get("seed")),
        ("strength", params.get("strength")),
        ("created", gen.get("created_at")),
        ("started", gen.get("started_at")),
        ("finished", gen.get("finished_at")),
        ("expires", gen.get("expires_at")),
    ]
    if gen.get("error"):
        lines.append(("error", f"{gen['error'].get('type')}: {gen['error'].get('message')}"))
    for name, value in lines:
        if value is not None:
            print(f"{name + ':':<10} {value}")
    for field in ("image", "mask_image"):
        ref = params.get(field)
        if isinstance(ref, dict):
            print(
                f"{field + ':':<10} {ref.get('upload_id')}  {ref.get('width')}x{ref.get('height')}  "
                f"sha256 {ref.get('sha256')}"
            )
    for img in gen.get("images") or []:
        print(
            f"image {img['index']}:  seed {img['seed']}  {img['width']}x{img['height']} {img['content_type']}  "
            f"{img['bytes']} bytes  sha256 {img['sha256']}"
        )
    timings = {
        k: v for k, v in (gen.get("timings") or {}).items() if k != "batch_images" and isinstance(v, (int, float))
    }
    if timings:
        print("timings:   " + "  ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return 0


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    gen = client.json("POST", f"/v1/generations/{args.id}/cancel")
    print(f"{gen['id']} {gen['status']}")
    return 0


def cmd_download(client: Client, args: argparse.Namespace) -> int:
    gen = client.json("GET", f"/v1/generations/{args.id}")
    images = {img["index"]: img for img in gen.get("images") or []}
    if args.index not in images:
        have = f"images {', '.join(str(i) for i in sorted(images))}" if images else "no images"
        raise CliError(f"generation {gen['id']} is {gen['status']} and has {have}; there is no image {args.index}")
    img = images[args.index]
    if args.output == "-":
        sys.stdout.buffer.write(verified(client, gen["id"], img, "stdout"))
        sys.stdout.buffer.flush()
        return 0
    if args.output:
        path = Path(args.output)
    else:  # the name `generate` would have given it
        ext = CONTENT_EXTENSIONS.get(img.get("content_type", ""), ".png")
        path = Path(gen["id"] + ext) if len(images) == 1 else Path(f"{gen['id']}-{args.index}{ext}")
    write_file(path, verified(client, gen["id"], img, str(path)))
    print(image_line(path, img))
    return 0


def cmd_delete(client: Client, args: argparse.Namespace) -> int:
    client.request("DELETE", f"/v1/generations/{args.id}")
    print(f"{args.id} deleted")
    return 0


def cmd_upload(client: Client, args: argparse.Namespace) -> int:
    if not Path(args.path).is_file():
        raise CliError(f"upload {args.path}: no such file", 2)
    source = read_image(args.path, "upload")
    assert not isinstance(source, str)  # a file: always a part
    upload = client.json("POST", "/v1/image-uploads", files={"file": source})
    if args.json:
        print(json.dumps(upload, indent=2))
        return 0
    print(upload["id"])
    if not args.quiet:
        print(
            f"{upload['width']}x{upload['height']} {upload['content_type']}  {upload['bytes']} bytes  "
            f"sha256 {upload['sha256']}  expires {upload['expires_at']}",
            file=sys.stderr,
        )
    return 0


def lora_spec(text: str) -> dict[str, Any]:
    """`--lora NAME[:SCALE]` -> {"name": NAME, "scale": SCALE}; `--lora URL[:SCALE]` (https://...) ->
    {"url": URL, "scale": SCALE}, where the deployment allows adapters by URL. The scale defaults to 1."""
    is_url = text.lower().startswith(("https://", "http://"))
    head, sep, tail = text.rpartition(":")
    if is_url and (not sep or "/" in tail or head.lower() in ("https", "http")):
        head, sep, tail = text, "", ""  # the last colon is the URL's own (scheme or port): no scale given
    elif not sep:
        head = text
    if not head:
        raise argparse.ArgumentTypeError(f"must be NAME, NAME:SCALE, URL or URL:SCALE, not {text!r}")
    try:
        scale = float(tail) if sep else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"the scale in {text!r} must be a number") from None
    return {"url" if is_url else "name": head, "scale": scale}


def cmd_adapters(client: Client, args: argparse.Namespace) -> int:
    body = client.json("GET", "/v1/adapters")
    if args.json:
        print_json(body)
        return 0
    for a in body["data"]:
        if a["kind"] == "preset":
            print(f"preset   {a['name']:<20} {a.get('scheduler')}, {a.get('steps')} steps ({a.get('steps_min')}-"
                  f"{a.get('steps_max')}), guidance {a.get('guidance_scale')}, adapter {a.get('adapter')}")
        else:
            print(f"adapter  {a['name']:<20} {a.get('base')}, scale {a.get('scale_min')}..{a.get('scale_max')}, "
                  f"{a.get('bytes')} bytes, sha256 {str(a.get('sha256'))[:12]}")
    return 0


def cmd_usage(client: Client, args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("from", args.from_), ("to", args.to)) if v}
    body = client.json("GET", "/v1/usage", params=params)
    if args.json:
        print_json(body)
        return 0
    print(f"key {body['key']}, {body['from']} to {body['to']} (UTC days)")
    print(f"{'date':<12}{'images':>8}{'gpu seconds':>14}{'generations':>13}{'submitted':>11}")
    for d in body["days"]:
        if d["images"] or d["images_submitted"] or args.all_days:
            print(f"{d['date']:<12}{d['images']:>8}{d['gpu_seconds']:>14.3f}{d['generations']:>13}"
                  f"{d['images_submitted']:>11}")
    t = body["totals"]
    print(f"{'total':<12}{t['images']:>8}{t['gpu_seconds']:>14.3f}{t['generations']:>13}{t['images_submitted']:>11}")
    q = body.get("quota")
    if q:
        print(f"daily quota {q['daily_images']} images: {q['submitted_today']} submitted today, "
              f"{q['remaining_today']} left until {q['resets_at']}")
    return 0


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # --url/--key work before or after the subcommand; SUPPRESS keeps a subcommand from resetting them
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--url", default=argparse.SUPPRESS, help=f"API base URL (env SDXL_URL; default: {DEFAULT_URL})")
    conn.add_argument(
        "--key", default=argparse.SUPPRESS, help="API key, sent as a Bearer token (env SDXL_API_KEY; default: none)"
    )

    parser = argparse.ArgumentParser(prog="sdxl", description="Generate images with the SDXL service.", parents=[conn])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        parents=[conn],
        help="generate images from a prompt and download them",
        description="Submit a generation, show its progress, then download its images. With --image: image to "
        "image; with --image and --mask: inpainting. The output then takes the image's size unless --width or "
        "--height is given (then the image is resized to it; one of them alone keeps its aspect ratio). A local "
        "file is sent as multipart/form-data; an upload id (see `sdxl upload`) or an https URL is sent as is.",
    )
    gen.add_argument("prompt", help="what to draw")
    gen.add_argument(
        "-o",
        "--output",
        help="image file; several images: NAME-0.EXT, NAME-1.EXT, ... (default: <id>.<format> in the current "
        "directory)",
    )
    d = SERVICE_DEFAULTS
    gen.add_argument(
        "--width", type=int, help=f"pixels, a multiple of 8 (default: {d['width']}; with --image: the image's)"
    )
    gen.add_argument(
        "--height", type=int, help=f"pixels, a multiple of 8 (default: {d['height']}; with --image: the image's)"
    )
    gen.add_argument("--steps", type=int, help=f"denoising steps (default: {d['num_inference_steps']})")
    gen.add_argument(
        "--guidance", type=float, help=f"classifier-free guidance scale (default: {d['guidance_scale']})"
    )
    gen.add_argument("--seed", type=int, help="default: random; image N uses seed + N")
    gen.add_argument("--negative", help="negative prompt (default: none)")
    gen.add_argument(
        "--scheduler",
        help=f"euler, euler_a, dpmpp_2m, dpmpp_2m_karras, ddim, unipc, heun (default: {d['scheduler']})",
    )
    gen.add_argument(
        "--refiner",
        choices=["none", "ensemble", "img2img"],
        help="refiner mode (default: the deployment's; ensemble when it has a refiner)",
    )
    gen.add_argument(
        "--format",
        choices=["png", "webp", "jpeg"],
        help=f"image format (default: from the -o extension, else {d['output_format']})",
    )
    gen.add_argument("-n", "--n", type=positive, help=f"number of images (default: {d['num_images_per_prompt']})")
    img = gen.add_argument_group("image inputs (docs/images.md)")
    img.add_argument(
        "--image",
        metavar="PATH",
        help="image to start from: PNG, JPEG or WebP file, upload id "
        "(upl_...) or https URL; the output takes its size unless --width/--height are given",
    )
    img.add_argument(
        "--mask",
        metavar="PATH",
        help="inpainting mask, same forms as --image: grayscale, the image's size, white is repainted and black kept",
    )
    img.add_argument(
        "--strength",
        type=float,
        help="how much of the image is re-noised, 0 < s <= 1 (default: 0.3 image to image, 0.9999 inpainting)",
    )
    img.add_argument(
        "--padding-mask-crop",
        type=int,
        metavar="N",
        help="inpainting: repaint only the mask's bounding box grown by N pixels, at full resolution",
    )
    gen.add_argument(
        "--previews",
        metavar="DIR",
        help="ask for live previews (every 5 steps) and write each as DIR/<image>-<step>.webp as it arrives",
    )
    gen.add_argument("--no-wait", action="store_true", help="print the generation id and return at once")
    gen.add_argument(
        "--json",
        action="store_true",
        help="print the final generation resource as JSON on stdout instead of the file lines (with --no-wait: "
        "the submitted resource); images are still written",
    )
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    ada = gen.add_argument_group("adapters and presets (`sdxl adapters` lists them; docs/adapters.md)")
    ada.add_argument("--lora", action="append", type=lora_spec, metavar="NAME[:SCALE]",
                     help="apply a LoRA adapter at SCALE (default 1); repeat for several, applied in order. "
                     "An https URL of a safetensors LoRA in place of NAME where the deployment allows it")
    ada.add_argument("--preset", metavar="NAME", help="a few-step preset (its adapter, scheduler, steps and "
                     "guidance; --steps may change the steps within its range)")
    gen.set_defaults(func=cmd_generate)

    dl = sub.add_parser(
        "download",
        parents=[conn],
        help="download an image of a finished generation",
        description="Write one image of a succeeded generation to a file, checked against its sha256. A 307 "
        "redirect (presigned object-store URLs) is followed; the key is not sent to the other host.",
    )
    dl.add_argument("id", metavar="GEN_ID")
    dl.add_argument("--index", type=int, default=0, metavar="N", help="which image of the batch (default: 0)")
    dl.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="file to write, or - for stdout (default: <id>.<ext> as `generate` names it; <id>-N.<ext> when the "
        "generation has several images)",
    )
    dl.set_defaults(func=cmd_download)

    delete = sub.add_parser(
        "delete",
        parents=[conn],
        help="delete a generation and its images",
        description="DELETE /v1/generations/{id}: its record and stored images are removed (a queued or running "
        "one is canceled first). Afterwards `show` and `download` answer 404.",
    )
    delete.add_argument("id", metavar="GEN_ID")
    delete.set_defaults(func=cmd_delete)

    lst = sub.add_parser("list", parents=[conn], help="list your generations, newest first")
    lst.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "canceled"])
    lst.add_argument("--limit", type=positive, default=20, help="rows, at most 100 (default: 20)")
    lst.add_argument("--cursor", help="continue after a previous page")
    lst.add_argument("--json", action="store_true", help="print the raw page")
    lst.set_defaults(func=cmd_list)

    show = sub.add_parser("show", parents=[conn], help="show one generation")
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="print the raw resource")
    show.set_defaults(func=cmd_show)

    cancel = sub.add_parser("cancel", parents=[conn], help="cancel a queued or running generation")
    cancel.add_argument("id")
    cancel.set_defaults(func=cmd_cancel)

    upl = sub.add_parser(
        "upload",
        parents=[conn],
        help="store an input image; prints its upload id",
        description="Store an image once (POST /v1/image-uploads) and print its id, for `generate --image "
        "upl_...` or `--mask upl_...`. It belongs to your key and expires on the service's clock.",
    )
    upl.add_argument("path", metavar="PATH", help="PNG, JPEG or WebP file")
    upl.add_argument("--json", action="store_true", help="print the upload's JSON instead of its id")
    upl.add_argument("-q", "--quiet", action="store_true", help="no details on stderr")
    upl.set_defaults(func=cmd_upload)

    ada_list = sub.add_parser("adapters", parents=[conn], help="list the LoRA adapters and presets served",
                              description="GET /v1/adapters: what `generate --lora` and `--preset` may name.")
    ada_list.add_argument("--json", action="store_true", help="print the raw listing")
    ada_list.set_defaults(func=cmd_adapters)
    use = sub.add_parser("usage", parents=[conn], help="your key's images and GPU seconds per UTC day",
                         description="GET /v1/usage: images and GPU seconds of your succeeded generations per UTC "
                         "day, the images you submitted (what a daily quota counts) and the quota, if any.")
    use.add_argument("--from", dest="from_", metavar="YYYY-MM-DD", help="first UTC day (default: 30 days back)")
    use.add_argument("--to", metavar="YYYY-MM-DD", help="last UTC day (default: today)")
    use.add_argument("--all-days", action="store_true", help="print days without activity too")
    use.add_argument("--json", action="store_true", help="print the raw report")
    use.set_defaults(func=cmd_usage)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = getattr(args, "url", None) or os.environ.get("SDXL_URL") or DEFAULT_URL
    key = getattr(args, "key", None) or os.environ.get("SDXL_API_KEY") or None
    client = Client(url, key)
    try:
        return int(args.func(client, args))
    except CliError as exc:
        print(f"sdxl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        client.http.close()


if __name__ == "__main__":
    sys.exit(main())
