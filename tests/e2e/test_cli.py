"""The `sdxl` command line, run as a real subprocess against a live service with API keys on: generate (progress on
stderr, verified image files, path and seed on stdout, or the resource with --json), download, delete, list, show,
cancel, Ctrl-C, the defaults in --help, and the problem-details errors with their exit codes; image to image and
inpainting from files (multipart), `upload` and `--image upl_...`; `download` through a presigned redirect to S3."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.access import BLOCKER, Key, get, keys_env, post, wait_final, wait_status
from tests.procs import ROOT, RedisServer, Service

ALICE = Key("alice")
TINY_ARGS = ["--width", "128", "--height", "128", "--steps", "4", "--refiner", "none"]
GEN_ID = re.compile(r"\bgen_[A-Za-z0-9_-]+")
# the console script `pip install` made, else the module (a checkout that was not installed)
SCRIPT = Path(sys.executable).with_name("sdxl")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "cli.sdxl"]


@pytest.fixture(scope="module")
def svc(shared_stack: Service) -> Iterator[Service]:
    """An API with keys on, on the shared stack (its worker sends a progress event per step)."""
    s = shared_stack.view(SDXL_API_KEYS=keys_env(ALICE))
    try:
        s.start_api()
        yield s
    finally:
        s.stop()


def cli_env(svc: Service, key: str | None = ALICE.secret) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_")}
    env["SDXL_URL"] = svc.url
    if key is not None:
        env["SDXL_API_KEY"] = key
    return env


def sdxl(svc: Service, *args: str, cwd: Path, key: str | None = ALICE.secret) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], cwd=cwd, env=cli_env(svc, key), capture_output=True, text=True, timeout=240
    )


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def resource(svc: Service, gen_id: str) -> dict[str, Any]:
    res = get(svc.url, f"/v1/generations/{gen_id}", ALICE)
    assert res.status_code == 200, res.text
    return dict(res.json())


def test_generate_writes_the_verified_png_and_reports_progress(svc: Service, tmp_path: Path) -> None:
    r = sdxl(svc, "generate", "a lighthouse at dusk", "-o", "out.png", "--seed", "1234", *TINY_ARGS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = (tmp_path / "out.png").read_bytes()
    assert png_size(data) == (128, 128)
    gen_id = GEN_ID.search(r.stderr)
    assert gen_id, r.stderr
    gen = resource(svc, gen_id.group())
    assert gen["status"] == "succeeded"
    assert hashlib.sha256(data).hexdigest() == gen["images"][0]["sha256"]
    assert gen["params"]["prompt"] == "a lighthouse at dusk" and gen["params"]["seed"] == 1234
    # stdout: where the image went and its seed
    assert "out.png" in r.stdout and "seed 1234" in r.stdout
    # stderr: a drawn progress bar that reached the last step
    assert re.search(r"\[#+-*\]\s+\d+%\s+step \d+/4", r.stderr), r.stderr
    assert "step 4/4" in r.stderr
    assert not list(tmp_path.glob("*.part"))


def test_several_images_get_index_suffixes_and_the_format_follows_the_extension(svc: Service, tmp_path: Path) -> None:
    r = sdxl(svc, "generate", "two boats", "-n", "2", "--seed", "50", "-o", "pics/boat.webp", *TINY_ARGS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    gen = resource(svc, GEN_ID.search(r.stderr).group())  # type: ignore[union-attr]
    assert gen["params"]["output_format"] == "webp"
    for img in gen["images"]:
        path = tmp_path / "pics" / f"boat-{img['index']}.webp"
        data = path.read_bytes()
        assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
        assert hashlib.sha256(data).hexdigest() == img["sha256"]
        assert f"pics/boat-{img['index']}.webp  seed {50 + img['index']}" in r.stdout
    assert len(gen["images"]) == 2


def test_no_wait_then_show_and_list(svc: Service, tmp_path: Path) -> None:
    r = sdxl(svc, "generate", "a quiet harbor", "--no-wait", "--seed", "77", *TINY_ARGS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    gen_id = r.stdout.strip()
    assert GEN_ID.fullmatch(gen_id), r.stdout
    assert not list(tmp_path.iterdir())  # nothing downloaded
    assert wait_final(svc.url, gen_id, ALICE)["status"] == "succeeded"

    shown = sdxl(svc, "show", gen_id, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^status:\s+succeeded$", shown.stdout, re.M), shown.stdout
    assert re.search(r"^prompt:\s+a quiet harbor$", shown.stdout, re.M)
    assert re.search(r"^image 0:\s+seed 77\s+128x128 image/png", shown.stdout, re.M)

    listed = sdxl(svc, "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith(gen_id))
    assert "succeeded" in row and "128x128" in row and "a quiet harbor" in row

    failed_only = sdxl(svc, "list", "--status", "failed", cwd=tmp_path)
    assert failed_only.returncode == 0 and gen_id not in failed_only.stdout

    everything = json.loads(sdxl(svc, "list", "--limit", "100", "--json", cwd=tmp_path).stdout)["data"]
    one = sdxl(svc, "list", "--limit", "1", "--json", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    page = json.loads(one.stdout)
    assert [g["id"] for g in page["data"]] == [everything[0]["id"]]
    assert bool(page["next_cursor"]) == (len(everything) > 1)


def test_cancel_a_running_generation_and_refuse_a_finished_one(svc: Service, tmp_path: Path) -> None:
    res = post(svc.url, BLOCKER, ALICE)
    assert res.status_code == 202, res.text
    gen_id = res.json()["id"]
    wait_status(svc.url, gen_id, ALICE, {"running"})
    r = sdxl(svc, "cancel", gen_id, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(gen_id)
    assert wait_final(svc.url, gen_id, ALICE)["status"] == "canceled"

    done = post(svc.url, {"prompt": "done", "width": 128, "height": 128, "num_inference_steps": 4}, ALICE).json()
    assert wait_final(svc.url, done["id"], ALICE)["status"] == "succeeded"
    again = sdxl(svc, "cancel", done["id"], cwd=tmp_path)
    assert again.returncode == 1
    assert f"generation `{done['id']}` already succeeded; it cannot be canceled" in again.stderr


def test_ctrl_c_during_generate_cancels_it_and_exits_130(svc: Service, tmp_path: Path) -> None:
    args = ["generate", "interrupt me", "--width", "768", "--height", "768", "--steps", "100", "--refiner", "none"]
    # SIGINT back to its default in the child: a runner started in the background may have it ignored
    proc = subprocess.Popen(
        [*COMMAND, *args],
        cwd=tmp_path,
        env=cli_env(svc),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # "<id> queued": printed once the generation exists
        gen_id = GEN_ID.search(first)
        assert gen_id, first
        wait_status(svc.url, gen_id.group(), ALICE, {"running"})
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert f"canceling {gen_id.group()}" in err
    assert wait_final(svc.url, gen_id.group(), ALICE)["status"] == "canceled"
    assert not list(tmp_path.iterdir())


def test_validation_error_exits_2_with_the_detail(svc: Service, tmp_path: Path) -> None:
    r = sdxl(svc, "generate", "x", "--width", "130", "--height", "128", "-o", "bad.png", cwd=tmp_path)
    assert r.returncode == 2
    assert "`width`" in r.stderr and "must be a multiple of 8 but is 130" in r.stderr
    assert r.stdout == "" and not (tmp_path / "bad.png").exists()


def test_key_problems_and_unknown_ids_exit_1_with_the_detail(svc: Service, tmp_path: Path) -> None:
    missing = sdxl(svc, "list", cwd=tmp_path, key=None)
    assert missing.returncode == 1
    assert "this API needs a key" in missing.stderr
    wrong = sdxl(svc, "--key", "sdxl_wrong", "list", cwd=tmp_path, key=None)
    assert wrong.returncode == 1 and "the API key is not valid" in wrong.stderr
    # --key after the subcommand works too, and beats the environment
    after = sdxl(svc, "list", "--key", ALICE.secret, cwd=tmp_path, key="sdxl_wrong")
    assert after.returncode == 0, after.stderr
    unknown = sdxl(svc, "show", "gen_AAAAAAAAAAAAAAAAAAAAAA", cwd=tmp_path)
    assert unknown.returncode == 1 and "gen_AAAAAAAAAAAAAAAAAAAAAA" in unknown.stderr


def test_unreachable_service_exits_1(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_")}
    r = subprocess.run(
        [*COMMAND, "--url", "http://127.0.0.1:9", "list"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "cannot reach http://127.0.0.1:9" in r.stderr


def test_the_console_script_is_declared_and_needs_no_worker_packages() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["sdxl"] == "cli.sdxl:main"
    code = (
        "import sys, cli.sdxl; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'fastapi'}))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"  # the client installs and starts without the API's or the worker's packages


def write_png(
    path: Path, size: tuple[int, int], mode: str = "RGB", box: tuple[int, int, int, int] | None = None
) -> str:
    """A test picture (a gradient; a mask: black with a white `box`) as a PNG file; its sha256."""
    from PIL import Image, ImageDraw

    w, h = size
    if mode == "L":
        img = Image.new("L", size, 0)
        ImageDraw.Draw(img).rectangle(box or (w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=255)
    else:
        img = Image.new("RGB", size)
        img.putdata([(x * 255 // w, y * 255 // h, 128) for y in range(h) for x in range(w)])
    img.save(path, format="PNG")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_image_to_image_from_a_file_follows_the_input_size(svc: Service, tmp_path: Path) -> None:
    digest = write_png(tmp_path / "in.png", (160, 128))
    r = sdxl(
        svc,
        "generate",
        "the same, at night",
        "--image",
        "in.png",
        "--strength",
        "0.5",
        "--steps",
        "4",
        "--refiner",
        "none",
        "--seed",
        "9",
        "-o",
        "out.png",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    data = (tmp_path / "out.png").read_bytes()
    assert png_size(data) == (160, 128)  # no --width/--height: the input's size
    assert "out.png  seed 9  160x128 image/png" in r.stdout
    gen = resource(svc, GEN_ID.search(r.stderr).group())  # type: ignore[union-attr]
    assert gen["manifest"]["mode"] == "img2img"
    assert gen["manifest"]["inputs"]["image"]["sha256"] == digest
    assert "mask_image" not in gen["manifest"]["inputs"]
    assert gen["params"]["strength"] == 0.5
    assert hashlib.sha256(data).hexdigest() == gen["images"][0]["sha256"]

    shown = sdxl(svc, "show", gen["id"], cwd=tmp_path)
    assert re.search(rf"^image:\s+upl_\S+\s+160x128\s+sha256 {digest}$", shown.stdout, re.M), shown.stdout
    assert re.search(r"^strength:\s+0\.5$", shown.stdout, re.M)


def test_inpainting_from_files_with_the_default_strength(svc: Service, tmp_path: Path) -> None:
    image_digest = write_png(tmp_path / "photo.png", (128, 96))
    mask_digest = write_png(tmp_path / "mask.png", (128, 96), mode="L")
    r = sdxl(
        svc,
        "generate",
        "a red door",
        "--image",
        "photo.png",
        "--mask",
        "mask.png",
        "--padding-mask-crop",
        "8",
        "--steps",
        "4",
        "--refiner",
        "none",
        "-o",
        "door.png",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    data = (tmp_path / "door.png").read_bytes()
    assert png_size(data) == (128, 96)
    gen = resource(svc, GEN_ID.search(r.stderr).group())  # type: ignore[union-attr]
    manifest = gen["manifest"]
    assert manifest["mode"] == "inpaint"
    assert manifest["inputs"]["image"]["sha256"] == image_digest
    assert manifest["inputs"]["mask_image"]["sha256"] == mask_digest
    assert gen["params"]["strength"] == 0.9999 and gen["params"]["padding_mask_crop"] == 8


def test_upload_then_generate_from_the_upload_id(svc: Service, tmp_path: Path) -> None:
    digest = write_png(tmp_path / "in.png", (128, 128))
    up = sdxl(svc, "upload", "in.png", cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    upload_id = up.stdout.strip()
    assert re.fullmatch(r"upl_[A-Za-z0-9_-]{22}", upload_id), up.stdout
    assert "128x128 image/png" in up.stderr and f"sha256 {digest}" in up.stderr
    as_json = json.loads(sdxl(svc, "upload", "in.png", "--json", cwd=tmp_path).stdout)
    assert as_json["sha256"] == digest and as_json["id"] != upload_id  # each upload is a new one

    r = sdxl(
        svc,
        "generate",
        "again",
        "--image",
        upload_id,
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "4",
        "--refiner",
        "none",
        "-o",
        "small.png",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert png_size((tmp_path / "small.png").read_bytes()) == (64, 64)  # --width/--height: resized
    gen = resource(svc, GEN_ID.search(r.stderr).group())  # type: ignore[union-attr]
    assert gen["manifest"]["inputs"]["image"] == {"sha256": digest, "width": 128, "height": 128}
    assert gen["params"]["image"]["upload_id"] == upload_id


def test_image_problems_exit_2_with_the_detail(svc: Service, tmp_path: Path) -> None:
    write_png(tmp_path / "odd.png", (100, 100))
    r = sdxl(svc, "generate", "x", "--image", "odd.png", "--steps", "4", "-o", "bad.png", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "`image` is 100x100" in r.stderr and "the nearest valid size is 96x96" in r.stderr
    assert not (tmp_path / "bad.png").exists()

    missing = sdxl(svc, "generate", "x", "--image", "nowhere.png", cwd=tmp_path)
    assert missing.returncode == 2 and "--image nowhere.png: no such file" in missing.stderr

    (tmp_path / "notes.txt").write_text("not an image")
    upload = sdxl(svc, "upload", "notes.txt", cwd=tmp_path)
    assert upload.returncode == 2 and "`file` is not an image" in upload.stderr


def test_generate_json_prints_the_final_resource(svc: Service, tmp_path: Path) -> None:
    r = sdxl(svc, "generate", "a paper boat", "--json", "-q", "--seed", "5", "-o", "boat.png", *TINY_ARGS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    gen = json.loads(r.stdout)  # all of stdout is the one JSON document: no file lines around it
    assert gen["status"] == "succeeded" and gen["params"]["seed"] == 5
    assert gen == resource(svc, gen["id"])
    data = (tmp_path / "boat.png").read_bytes()  # the images are still written
    assert hashlib.sha256(data).hexdigest() == gen["images"][0]["sha256"]

    submitted = sdxl(svc, "generate", "later", "--no-wait", "--json", *TINY_ARGS, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    queued = json.loads(submitted.stdout)
    assert GEN_ID.fullmatch(queued["id"]) and queued["status"] in ("queued", "running", "succeeded")
    assert wait_final(svc.url, queued["id"], ALICE)["status"] == "succeeded"


def test_lora_and_preset_options_and_the_adapters_listing(svc: Service, tmp_path: Path, tiny_adapters: Path
                                                           ) -> None:
    listing = sdxl(svc, "adapters", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert re.search(r"^adapter +tiny-style ", listing.stdout, re.M) and re.search(r"^preset +lcm ", listing.stdout,
                                                                                     re.M)
    r = sdxl(svc, "generate", "a fox", "--json", "-q", "--lora", "tiny-style:0.5", "--lora", "tiny-kohya",
             "--preset", "lcm", "--steps", "3", "--width", "64", "--height", "64", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    params = json.loads(r.stdout)["params"]
    assert [(lora["name"], lora["scale"]) for lora in params["loras"]] == \
        [("tiny-lcm", 1.0), ("tiny-style", 0.5), ("tiny-kohya", 1.0)]
    assert (params["preset"], params["num_inference_steps"]) == ("lcm", 3)
    bad = sdxl(svc, "generate", "a fox", "--lora", "no-such", *TINY_ARGS, cwd=tmp_path)
    assert bad.returncode == 2 and "loras[0].name" in bad.stderr


def test_download_writes_the_verified_image_later(svc: Service, tmp_path: Path) -> None:
    r = sdxl(svc, "generate", "two kites", "--no-wait", "-n", "2", "--seed", "30", *TINY_ARGS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    gen_id = r.stdout.strip()
    gen = wait_final(svc.url, gen_id, ALICE)
    assert gen["status"] == "succeeded"
    sha = {img["index"]: img["sha256"] for img in gen["images"]}

    second = sdxl(svc, "download", gen_id, "--index", "1", "-o", "out/kite.png", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert hashlib.sha256((tmp_path / "out" / "kite.png").read_bytes()).hexdigest() == sha[1]
    assert second.stdout.strip() == "out/kite.png  seed 31  128x128 image/png"

    first = sdxl(svc, "download", gen_id, cwd=tmp_path)  # --index 0, and the name `generate` would give it
    assert first.returncode == 0, first.stderr
    assert hashlib.sha256((tmp_path / f"{gen_id}-0.png").read_bytes()).hexdigest() == sha[0]

    piped = subprocess.run(
        [*COMMAND, "download", gen_id, "-o", "-"], cwd=tmp_path, env=cli_env(svc), capture_output=True, timeout=60
    )
    assert piped.returncode == 0, piped.stderr
    assert hashlib.sha256(piped.stdout).hexdigest() == sha[0]

    missing = sdxl(svc, "download", gen_id, "--index", "2", cwd=tmp_path)
    assert missing.returncode == 1
    assert "has images 0, 1; there is no image 2" in missing.stderr
    assert not list(tmp_path.glob("**/*.part"))


def test_delete_then_show_and_download_are_404(svc: Service, tmp_path: Path) -> None:
    gen = post(svc.url, {"prompt": "gone soon", "width": 128, "height": 128, "num_inference_steps": 4}, ALICE).json()
    assert wait_final(svc.url, gen["id"], ALICE)["status"] == "succeeded"
    r = sdxl(svc, "delete", gen["id"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{gen['id']} deleted"
    assert get(svc.url, f"/v1/generations/{gen['id']}", ALICE).status_code == 404
    for command in ("show", "download", "delete"):  # deleting twice finds nothing either
        after = sdxl(svc, command, gen["id"], cwd=tmp_path)
        assert after.returncode == 1, (command, after.stdout)
        assert gen["id"] in after.stderr
    assert not list(tmp_path.iterdir())


def test_help_shows_the_service_defaults(tmp_path: Path) -> None:
    from app.schemas import GenerationCreate
    from cli.sdxl import SERVICE_DEFAULTS

    fields = GenerationCreate.model_fields
    schema_defaults = {name: getattr(fields[name].default, "value", fields[name].default) for name in SERVICE_DEFAULTS}
    assert schema_defaults == SERVICE_DEFAULTS  # what --help says is what the service does

    r = subprocess.run([*COMMAND, "generate", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # argparse wraps to the terminal's width
    for shown in ("(default: 1024;", "(default: 30)", "(default: 5.0)", "(default: euler)", "(default: 1)",
                  "else png)", "default: random"):
        assert shown in text, (shown, text)
    assert "download" in subprocess.run([*COMMAND, "--help"], capture_output=True, text=True, timeout=60).stdout


# --- download through a presigned redirect: an API in presigned mode on S3 (moto), keys on ----------------------


class RecordingProxy:
    """The object store's public endpoint: forwards GETs to moto and keeps each request's headers, so the test
    sees what the CLI sent to the other host after the redirect."""

    def __init__(self, upstream: str) -> None:
        seen: list[dict[str, str]] = []
        self.seen = seen

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                seen.append({k.lower(): v for k, v in self.headers.items()})
                res = httpx.get(upstream + self.path, timeout=10)
                self.send_response(res.status_code)
                self.send_header("Content-Type", res.headers.get("content-type", "application/octet-stream"))
                self.send_header("Content-Length", str(len(res.content)))
                self.end_headers()
                self.wfile.write(res.content)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def presigned(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, RecordingProxy]]:
    pytest.importorskip("moto")
    from tests.e2e.test_storage_s3 import AWS_ENV, BUCKET, Moto, s3

    with pytest.MonkeyPatch.context() as mp:
        for k, v in AWS_ENV.items():
            mp.setenv(k, v)
        store = Moto()
        store.start()
        proxy = RecordingProxy(store.url)
        server = RedisServer()
        server.start()
        env = {
            **AWS_ENV,
            "SDXL_STORAGE_BACKEND": "s3",
            "SDXL_S3_BUCKET": BUCKET,
            "SDXL_S3_ENDPOINT_URL": store.url,
            "SDXL_S3_PUBLIC_ENDPOINT_URL": proxy.url,  # what presigned URLs name: another host than the API
            "SDXL_S3_ADDRESSING_STYLE": "path",
            "SDXL_IMAGE_URL_MODE": "presigned",
            "SDXL_API_KEYS": keys_env(ALICE),
        }
        svc = Service(server.url, tiny_model, tmp_path_factory.mktemp("cli-presigned"), env)
        try:
            s3(store).create_bucket(Bucket=BUCKET)
            worker = svc.start_worker(wait_ready=False)
            svc.start_api()
            svc.wait_worker_ready(worker.worker_id)  # type: ignore[attr-defined]
            yield svc, proxy
        finally:
            svc.stop()
            server.stop()
            proxy.stop()
            store.stop()


def test_download_follows_the_presigned_redirect_without_the_key(
    presigned: tuple[Service, RecordingProxy], tmp_path: Path
) -> None:
    svc, proxy = presigned
    r = sdxl(svc, "generate", "a red bicycle", "--no-wait", *TINY_ARGS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    gen = wait_final(svc.url, r.stdout.strip(), ALICE)
    assert gen["status"] == "succeeded", gen
    redirect = httpx.get(f"{svc.url}/v1/generations/{gen['id']}/images/0", headers=ALICE.headers)
    assert redirect.status_code == 307 and redirect.headers["location"].startswith(proxy.url)

    proxy.seen.clear()
    dl = sdxl(svc, "download", gen["id"], "-o", "bike.png", cwd=tmp_path)
    assert dl.returncode == 0, dl.stderr
    assert hashlib.sha256((tmp_path / "bike.png").read_bytes()).hexdigest() == gen["images"][0]["sha256"]
    assert len(proxy.seen) == 1  # the bytes came from the object store's host
    assert "authorization" not in proxy.seen[0]  # and the key stayed with the API
