"""Load: 24 clients at once; every answer arrives, with its own prompt, seeds and pixels; the queue is reported."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from PIL import Image

from server_fixture import _no_network, server  # noqa: F401 (fixtures)
from ldm.inference.metadata import parse_parameters

CLIENTS = 24
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star")


def _request(i: int) -> dict:
    return {"prompt": f"a {COLOURS[i % 6]} {SHAPES[i % 4]} number {i}", "seed": 1000 + 37 * i,
            "batch_size": 1 + i % 2, "steps": 2, "width": 64, "height": 64, "cfg_scale": 7.5,
            "sampler_name": ("Euler", "DDIM", "DPM++ 2M")[i % 3]}


def _decode(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def test_concurrent_requests_each_get_their_own_answer(server):
    queue = server.service.queue
    before = queue.completed
    most_queued, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            state = httpx.get(f"{server.url}/sdapi/v1/progress", params={"skip_current_image": True}).json()["state"]
            most_queued[0] = max(most_queued[0], state["job_count"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(lambda i: httpx.post(f"{server.url}/sdapi/v1/txt2img", json=_request(i),
                                                     timeout=300), range(CLIENTS)))
    stop.set()
    watcher.join()
    assert [a.status_code for a in answers] == [200] * CLIENTS
    assert queue.completed - before == CLIENTS and queue.pending() == 0
    assert most_queued[0] > 1  # /progress reported the waiting jobs
    for i, answer in enumerate(answers):
        sent, body = _request(i), answer.json()
        info = json.loads(body["info"])
        seeds = [sent["seed"] + k for k in range(sent["batch_size"])]
        assert info["all_seeds"] == seeds and len(body["images"]) == sent["batch_size"]
        for text, seed in zip(body["images"], seeds):
            params = parse_parameters(_decode(text).info["parameters"])
            assert (params["Prompt"], params["Seed"]) == (sent["prompt"], str(seed))
    for i in (0, 2, 4):  # the pixels are the request's own: made again alone, sequentially
        sent = _request(i)
        alone = server.service.generator.txt2img(sent["prompt"], steps=2, seed=sent["seed"], width=64, height=64,
                                                 sampler=sent["sampler_name"], cfg_scale=7.5)
        got = np.asarray(_decode(answers[i].json()["images"][0]), dtype=int)
        assert np.abs(got - np.asarray(alone.images[0], dtype=int)).max() <= 3
