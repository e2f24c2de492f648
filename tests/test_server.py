"""The server against real clients: the ``webuiapi`` package (a published client of the web UI's API) and raw HTTP.

Every request uses the shipped default model at 64x64 and a few steps (well under a second each on a CPU).
"""
from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from server_fixture import _no_network, make_config, server, shared_generator, start_server  # noqa: F401 (fixtures)
from ldm.inference.metadata import parse_parameters

webuiapi = pytest.importorskip("webuiapi")

SMALL = dict(width=64, height=64, steps=3)
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def client(server):
    """A webuiapi client of the module's server."""
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", steps=3)


def _params(image: Image.Image) -> dict[str, str]:
    return parse_parameters(image.info["parameters"])


def test_txt2img_images_seeds_and_parameters(client):
    result = client.txt2img(prompt=PROMPT, seed=1234, batch_size=2, n_iter=2, cfg_scale=7.5, **SMALL)
    assert len(result.images) == 4
    assert result.info["all_seeds"] == [1234, 1235, 1236, 1237] and result.info["seed"] == 1234
    for image, seed, text in zip(result.images, result.info["all_seeds"], result.info["infotexts"]):
        assert image.size == (64, 64)
        assert image.info["parameters"] == text  # the PNG carries its own parameters
        p = _params(image)
        assert (p["Seed"], p["Steps"], p["Sampler"], p["Size"], p["Model"]) == (str(seed), "3", "Euler", "64x64",
                                                                                 "sd-shapes")
    assert result.parameters["prompt"] == PROMPT  # the request, echoed as the web UI does
    again = client.txt2img(prompt=PROMPT, seed=1235, cfg_scale=7.5, **SMALL)  # image k is seed + k, also alone
    difference = np.abs(np.asarray(again.image, dtype=int) - np.asarray(result.images[1], dtype=int))
    assert difference.max() <= 3  # batch-size rounding only (ldm.inference.pipeline)


def test_txt2img_random_seed_and_sampler_schedule(client):
    result = client.txt2img(prompt=PROMPT, seed=-1, sampler_name="DPM++ 2M", scheduler="karras", **SMALL)
    seed = result.info["seed"]
    assert 0 <= seed < 2 ** 32
    p = _params(result.image)
    assert (p["Seed"], p["Sampler"], p["Schedule type"]) == (str(seed), "DPM++ 2M", "Karras")
    automatic = client.txt2img(prompt=PROMPT, seed=3, sampler_name="DPM++ 2M", scheduler="automatic", **SMALL)
    assert _params(automatic.image)["Schedule type"] == "Karras"  # the sampler's default


def test_img2img_and_inpaint(client):
    source = client.txt2img(prompt=PROMPT, seed=7, **SMALL).image
    result = client.img2img(images=[source], prompt="a green square on a black background", seed=8,
                            denoising_strength=0.6, **SMALL)
    p = _params(result.image)
    assert result.image.size == (64, 64) and p["Denoising strength"] == "0.6" and p["Seed"] == "8"
    assert not np.array_equal(np.asarray(result.image), np.asarray(source))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    painted = client.img2img(images=[source], mask_image=mask, prompt="a green square", seed=9, mask_blur=2,
                             inpaint_full_res=False, denoising_strength=0.9, **SMALL).image
    before, after = np.asarray(source.convert("RGB")), np.asarray(painted.convert("RGB"))
    far = np.ones((64, 64), dtype=bool)
    far[24 - 6:40 + 6, 24 - 6:40 + 6] = False  # the mask grown by its blur's reach
    assert np.array_equal(before[far], after[far]) and not np.array_equal(before[~far], after[~far])
    assert _params(painted)["Mask blur"] == "2"


def test_progress_preview_and_interrupt(client, server):
    answers = []
    worker = threading.Thread(target=lambda: answers.append(
        client.txt2img(prompt=PROMPT, seed=11, width=64, height=64, steps=150)))
    start = time.monotonic()
    worker.start()
    seen = None
    while time.monotonic() - start < 60:
        progress = client.get_progress()
        if progress["progress"] > 0 and progress["current_image"]:
            seen = progress
            break
        time.sleep(0.05)
    assert seen is not None, "no progress reported"
    assert seen["state"]["job_count"] == 1 and 0 < seen["state"]["sampling_step"] <= 150
    assert seen["eta_relative"] >= 0
    preview = Image.open(io.BytesIO(base64.b64decode(seen["current_image"])))
    assert preview.size == (64, 64)
    client.interrupt()
    worker.join(60)
    assert answers and answers[0].info["interrupted"] is True
    assert len(answers[0].images) == 1  # the current estimate, as the web UI answers an interrupted job
    idle = client.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_task_progress_follows_each_request_by_its_task_id(server):
    """The web UI's ``force_task_id`` + ``POST /internal/progress``: a client sees its own job, not the one before it."""
    def task(task_id: str) -> dict:
        return httpx.post(f"{server.url}/internal/progress", json={"id_task": task_id, "id_live_preview": -1}).json()

    def post(task_id: str, steps: int) -> None:
        httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=120,
                   json={"prompt": PROMPT, "seed": 2, "width": 64, "height": 64, "steps": steps,
                         "force_task_id": task_id})

    assert task("never-sent") == {"active": False, "queued": False, "completed": False, "progress": None,
                                  "eta": None, "live_preview": None, "id_live_preview": -1, "textinfo": "Waiting..."}
    first = threading.Thread(target=post, args=("task(first)", 150))
    first.start()
    deadline = time.monotonic() + 60
    while not task("task(first)")["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    second = threading.Thread(target=post, args=("task(second)", 3))
    second.start()
    while not task("task(second)")["queued"] and time.monotonic() < deadline:
        time.sleep(0.05)
    waiting = task("task(second)")
    assert waiting["queued"] and not waiting["active"] and waiting["textinfo"] == "In queue: 1/1"
    running = task("task(first)")
    while running["live_preview"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
        running = task("task(first)")
    assert running["active"] and 0 < running["progress"] < 1 and running["id_live_preview"] >= 1
    assert running["live_preview"].startswith("data:image/png;base64,")
    same = httpx.post(f"{server.url}/internal/progress",
                      json={"id_task": "task(first)", "id_live_preview": running["id_live_preview"]}).json()
    assert same["live_preview"] is None or same["id_live_preview"] > running["id_live_preview"]  # only newer ones
    httpx.post(f"{server.url}/sdapi/v1/interrupt")
    first.join(60)
    second.join(60)
    assert task("task(first)")["completed"] and task("task(second)")["completed"]
    assert not task("task(second)")["active"] and not task("task(second)")["queued"]


def test_samplers_schedulers_models_loras(client, server):
    names = client.util_get_sampler_names()
    assert {"Euler a", "DPM++ 2M", "DDIM", "UniPC"} <= set(names)
    assert {"automatic", "karras", "exponential", "uniform"} <= set(client.util_get_scheduler_names())
    titles = client.util_get_model_names()
    assert any(t.startswith("sd-shapes [") for t in titles) and any(t.startswith("shapes-copy") for t in titles)
    assert isinstance(client.get_loras(), list)
    folder = server.service.cfg.ckpt_dirs[0]
    (folder / "later.safetensors").write_bytes((folder / "shapes-copy.safetensors").read_bytes())
    try:
        client.refresh_checkpoints()
        assert "later.safetensors" in client.util_get_model_names()
    finally:
        (folder / "later.safetensors").unlink()
        client.refresh_checkpoints()
    assert "later.safetensors" not in client.util_get_model_names()


def test_options_switch_checkpoint(client, server):
    assert client.util_get_current_model().startswith("sd-shapes [")
    client.util_set_model("shapes-copy.safetensors")
    assert client.util_get_current_model().startswith("shapes-copy.safetensors [")
    assert _params(client.txt2img(prompt=PROMPT, seed=1, **SMALL).image)["Model"] == "shapes-copy"
    once = client.txt2img(prompt=PROMPT, seed=1, override_settings={"sd_model_checkpoint": "sd-shapes"}, **SMALL)
    assert _params(once.image)["Model"] == "sd-shapes"  # for this request only (restored afterwards)
    assert client.util_get_current_model().startswith("shapes-copy.safetensors [")
    client.set_options({"sd_model_checkpoint": "sd-shapes", "some_unknown_option": 1})
    assert client.get_options()["sd_model_checkpoint"].startswith("sd-shapes [")
    bad = httpx.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "no-such-model"})
    assert bad.status_code == 422 and "not a known checkpoint" in bad.json()["message"]


def test_hires_fix_fields(client, server):
    result = client.txt2img(prompt=PROMPT, seed=6, enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                            hr_second_pass_steps=2, denoising_strength=0.6, **SMALL)
    assert result.image.size == (128, 128)
    p = _params(result.image)
    assert (p["Size"], p["Hires upscale"], p["Hires steps"], p["Hires upscaler"], p["Denoising strength"]) == \
        ("64x64", "2", "2", "Latent", "0.6")
    plain = client.txt2img(prompt=PROMPT, seed=6, denoising_strength=0.6, **SMALL)  # enable_hr off: one pass
    assert plain.image.size == (64, 64) and "Hires upscale" not in _params(plain.image)
    for extra, needle in (({"hr_upscaler": "R-ESRGAN 4x+"}, "unknown hires upscaler"),
                          ({"hr_prompt": "a dog"}, "hr_prompt"), ({"hr_scale": 4, "width": 512, "height": 512},
                                                                  "hires size")):
        body = {"prompt": PROMPT, "enable_hr": True, **SMALL, **extra}
        bad = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body)
        assert bad.status_code in (400, 422) and needle in bad.json()["message"], (extra, bad.json())


def test_clip_skip_option_and_override(client, server):
    assert client.get_options()["CLIP_stop_at_last_layers"] == 1
    plain = client.txt2img(prompt=PROMPT, seed=4, **SMALL).image
    client.set_options({"CLIP_stop_at_last_layers": 2})
    try:
        assert client.get_options()["CLIP_stop_at_last_layers"] == 2
        # the default model's OpenCLIP text encoder has no Clip skip (as the web UI ignores it there): same picture
        asked = client.txt2img(prompt=PROMPT, seed=4, **SMALL).image
        assert "Clip skip" not in _params(asked) and np.array_equal(np.asarray(asked), np.asarray(plain))
        bad = httpx.post(f"{server.url}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 0})
        assert bad.status_code == 422 and "CLIP_stop_at_last_layers" in bad.json()["message"]
        for value in (0, 13, 1.5, "two"):
            body = {"prompt": PROMPT, "override_settings": {"CLIP_stop_at_last_layers": value}, **SMALL}
            bad = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body)
            assert bad.status_code in (400, 422) and "CLIP_stop_at_last_layers" in bad.json()["message"], value
    finally:
        client.set_options({"CLIP_stop_at_last_layers": 1})
    assert client.get_options()["CLIP_stop_at_last_layers"] == 1


def test_png_info_round_trip(client):
    image = client.txt2img(prompt=PROMPT, seed=21, **SMALL).image
    info = client.png_info(image)
    assert info.info == image.info["parameters"]
    assert info.json["parameters"]["Seed"] == "21"


def test_save_images_numbering_and_metadata(server):
    folder = server.service.cfg.outdir / "txt2img-samples" / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "00000.png").write_bytes(b"not mine")  # an existing file is never overwritten
    body = {"prompt": PROMPT, "seed": 5, "batch_size": 2, "save_images": True, "send_images": False, **SMALL}
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=60).json()
    assert answer["images"] == []
    assert (folder / "00000.png").read_bytes() == b"not mine"
    seeds = [parse_parameters(Image.open(folder / f"0000{i}.png").info["parameters"])["Seed"] for i in (1, 2)]
    assert seeds == ["5", "6"] and json.loads(answer["info"])["all_seeds"] == [5, 6]


@pytest.mark.parametrize("body, words", [
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "steps": "many"}, "steps"),
    ({"prompt": "x", "cfg_scale": 1e9}, "cfg_scale"),
    ({"prompt": "x", "seed": -2}, "seed"),
    ({"prompt": "x", "width": 60, "height": 64, "steps": 2}, "multiple of 8"),
    ({"prompt": "x", "steps": 151}, "more than this server allows"),
    ({"prompt": "x", "width": 4096, "height": 4096}, "more than this server allows"),
    ({"prompt": "x", "sampler_name": "Eulr a", "steps": 2, "width": 64, "height": 64}, "Euler a"),
])
def test_bad_requests_are_422_with_a_readable_message(server, body, words):
    before = server.service.queue.completed
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=60)
    assert answer.status_code == 422
    assert words in answer.json()["message"] and "\n" not in answer.json()["message"]
    assert server.service.queue.completed - before <= 1  # checked at once, or failed in the worker


def test_unknown_fields_are_ignored_and_uploads_limited(server):
    ok = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=60,
                    json={"prompt": PROMPT, "seed": 2, "restore_faces": False, "styles": [], "anything": {"a": 1},
                          **SMALL})
    assert ok.status_code == 200 and json.loads(ok.json()["info"])["all_seeds"] == [2]
    bad_image = httpx.post(f"{server.url}/sdapi/v1/img2img", json={"init_images": ["bm90IGFuIGltYWdl"], **SMALL})
    assert bad_image.status_code == 422 and "init_images[0]" in bad_image.json()["message"]
    limit = server.service.cfg.limits.max_upload_bytes
    huge = httpx.post(f"{server.url}/sdapi/v1/img2img", content=b"x" * (limit + 1),
                      headers={"content-type": "application/json"})
    assert huge.status_code == 413


def test_page_and_static_files(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code in (200, 404)  # the page is another part's file; when present it is served
    if page.status_code == 200:
        assert "<html" in page.text.lower()


def test_disconnected_client_withdraws_its_queued_job(client, server):
    import socket as sockets

    queue = server.service.queue
    long_job = threading.Thread(target=lambda: client.txt2img(prompt=PROMPT, seed=1, width=64, height=64, steps=150))
    long_job.start()
    while queue.current is None:
        time.sleep(0.02)
    body = json.dumps({"prompt": PROMPT, "seed": 3, **SMALL}).encode()
    conn = sockets.create_connection(("127.0.0.1", server.port))
    conn.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 10
    while queue.pending() == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert queue.pending() == 1
    conn.close()
    while queue.pending() == 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert queue.pending() == 0 and queue.current is not None  # withdrawn while the long job still runs
    client.interrupt()
    long_job.join(60)


def test_auth_401_and_nothing_queued(tmp_path):
    running = start_server(make_config(tmp_path, auth="user:secret"))
    try:
        url, queue = running.url, running.service.queue
        for auth in (None, ("user", "wrong"), ("usr", "secret"), ("user", "secret:")):
            answer = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": PROMPT, **SMALL}, auth=auth)
            assert answer.status_code == 401 and answer.headers["www-authenticate"].startswith("Basic")
        assert httpx.get(f"{url}/sdapi/v1/progress").status_code == 401
        assert queue.completed == 0 and queue.pending() == 0 and queue.current is None
        authed = webuiapi.WebUIApi(host="127.0.0.1", port=running.port, username="user", password="secret")
        result = authed.txt2img(prompt=PROMPT, seed=4, sampler_name="Euler", **SMALL)
        assert result.info["all_seeds"] == [4] and queue.completed == 1
    finally:
        running.stop()


def test_serve_refuses_an_open_address_without_auth(capsys, tmp_path):
    from ldm.server.cli import build_parser, check_args, main

    for argv in (["--listen"], ["--host", "192.168.1.5"], ["--api-auth", "nopassword"], ["--port", "0"],
                 ["--ckpt", str(tmp_path / "missing.safetensors")], ["--max_steps", "0"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("serve.py: error: ") and "\n" not in err and "Traceback" not in err
    assert main(["--listen"]) == 2 and "--api-auth" in capsys.readouterr().err
    import socket as sockets

    with sockets.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["--port", str(taken.getsockname()[1])]) == 2  # before any model is loaded
        assert "choose another --port" in capsys.readouterr().err
    parse = build_parser().parse_args
    assert check_args(parse([])) == "127.0.0.1" and check_args(parse(["--host", "::1"])) == "::1"
    assert check_args(parse(["--listen", "--api-auth", "u:p"])) == "0.0.0.0"
    assert check_args(parse(["--listen", "--insecure"])) == "0.0.0.0"


def test_queue_order_withdraw_full_and_failures():
    from ldm.server.queue import JobQueue, QueueFull

    queue, gate, order = JobQueue(max_pending=2), threading.Event(), []
    queue.start()
    try:
        first = queue.submit("a", lambda job: (gate.wait(10), order.append("a")))
        while queue.current is None:
            time.sleep(0.01)
        second = queue.submit("b", lambda job: order.append("b"))
        third = queue.submit("c", lambda job: order.append("c"))
        with pytest.raises(QueueFull, match="--max_queue"):
            queue.submit("d", lambda job: order.append("d"))
        queue.withdraw(second)
        gate.set()
        third.future.result(10)
        assert order == ["a", "c"] and second.future.cancelled() and first.future.done()
        failing = queue.submit("e", lambda job: 1 / 0)
        assert isinstance(failing.future.exception(10), ZeroDivisionError)
        assert queue.submit("f", lambda job: 42).future.result(10) == 42  # the worker goes on
    finally:
        queue.stop()


def test_img2img_resize_modes(client, server):
    wide = Image.new("RGB", (128, 64), "red")
    wide.paste((0, 0, 255), (0, 0, 32, 64))
    for mode in (1, 2):
        result = client.img2img(images=[wide], prompt=PROMPT, seed=2, resize_mode=mode, denoising_strength=0.3,
                                **SMALL)
        assert result.image.size == (64, 64)
    buffer = io.BytesIO()
    wide.save(buffer, format="PNG")
    body = {"init_images": [base64.b64encode(buffer.getvalue()).decode()], "prompt": "x", "steps": 2, "width": 64,
            "height": 64, "resize_mode": 3}
    answer = httpx.post(f"{server.url}/sdapi/v1/img2img", json=body, timeout=60)
    assert answer.status_code in (400, 422) and "latent upscale" in answer.json()["message"]


def test_img2img_size_limit_counts_the_picture(server):
    """Without width/height the picture's own size is generated: it must fit the server's limit too."""
    big = Image.new("RGB", (1200, 1000), "red")
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    body = {"init_images": [base64.b64encode(buffer.getvalue()).decode()], "prompt": "x", "steps": 2}
    answer = httpx.post(f"{server.url}/sdapi/v1/img2img", json=body, timeout=60)
    assert answer.status_code == 422 and "send width and height" in answer.json()["message"]


def test_answers_and_saved_files_carry_the_watermark(tmp_path, server):
    from ldm.inference.loading import default_watermark
    from ldm.modules.watermark import put_watermark

    body = {"prompt": PROMPT, "seed": 8, "width": 256, "height": 256, "steps": 2}
    plain = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120).json()  # --no_watermark
    running = start_server(make_config(tmp_path, watermark=True))
    try:
        answer = httpx.post(f"{running.url}/sdapi/v1/txt2img", json={**body, "save_images": True}, timeout=120).json()
        payload = default_watermark(running.service.generator.loaded.geometry)
    finally:
        running.stop()
    unmarked, sent = (Image.open(io.BytesIO(base64.b64decode(a["images"][0]))) for a in (plain, answer))
    saved = Image.open(tmp_path / "outputs" / "txt2img-samples" / "samples" / "00000.png")
    assert not np.array_equal(np.asarray(sent), np.asarray(unmarked))
    np.testing.assert_array_equal(np.asarray(sent), np.asarray(put_watermark(unmarked.convert("RGB"), payload)))
    np.testing.assert_array_equal(np.asarray(saved), np.asarray(sent))  # marked once, saved as sent
    assert _params(saved)["Seed"] == "8" and sent.info["parameters"] == saved.info["parameters"]


def test_safety_and_watermark_flags_reach_the_service(tmp_path, monkeypatch):
    from ldm.inference.errors import UsageError
    from ldm.server import service as svc
    from ldm.server.cli import build_parser, server_config

    parse = build_parser().parse_args
    cfg = server_config(parse([]))
    assert cfg.watermark and cfg.safety_check and cfg.safety_checker is None  # the scripts' defaults
    cfg = server_config(parse(["--no_safety_check", "--no_watermark"]))
    assert not cfg.watermark and not cfg.safety_check
    assert server_config(parse(["--safety_checker", str(tmp_path)])).safety_checker == tmp_path
    with pytest.raises(UsageError, match="contradict"):
        server_config(parse(["--safety_checker", str(tmp_path), "--no_safety_check"]))
    with pytest.raises(UsageError, match="does not exist"):
        server_config(parse(["--safety_checker", str(tmp_path / "missing")]))
    seen = []

    def fake_load(*args, **kwargs):
        seen.append(kwargs)
        return shared_generator()

    monkeypatch.setattr(svc.Generator, "load", fake_load)
    service = svc.Service(make_config(tmp_path, safety_checker=tmp_path))
    service.close()
    assert seen[0]["safety_check"] is True and seen[0]["safety_checker"] == tmp_path


def test_api_auth_from_a_file(tmp_path, caplog):
    from ldm.inference.errors import UsageError
    from ldm.server.cli import build_parser, check_args, server_config

    parse = build_parser().parse_args
    secret = tmp_path / "auth.txt"
    secret.write_text("\nuser:s3cret\n", encoding="utf-8")
    secret.chmod(0o600)
    ns = parse(["--listen", "--api-auth-file", str(secret)])
    assert check_args(ns) == "0.0.0.0" and server_config(ns).auth == "user:s3cret"  # a password: may listen
    assert "other users" not in caplog.text
    secret.chmod(0o644)
    check_args(parse(["--api-auth-file", str(secret)]))
    assert "chmod 600" in caplog.text
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    for argv, words in ((["--api-auth-file", str(tmp_path / "missing")], "cannot read"),
                        (["--api-auth-file", str(tmp_path / "empty.txt")], "is empty"),
                        (["--api-auth-file", str(secret), "--api-auth", "a:b"], "contradict"),
                        (["--api-auth-file", str(tmp_path / "empty.txt"), "--listen"], "is empty")):
        with pytest.raises(UsageError, match=words):
            check_args(parse(argv))
    secret.write_text("nopassword\n", encoding="utf-8")
    with pytest.raises(UsageError, match="USER:PASSWORD"):
        check_args(parse(["--api-auth-file", str(secret)]))
