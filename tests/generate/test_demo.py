"""The Gradio demo as users reach it: a real server on localhost, called through gradio_client."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blendexp.flame import component_index, main_components, preset
from tests.conftest import REPO
from tests.generate.conftest import overrides

import gradio_client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, server: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Poll the page until it answers; fail with the server's log if it exits or never comes up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"demo exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"demo not ready after {timeout} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def serve_demo(folder: Path, tiny_base, tiny_annotators: Path) -> Iterator[str]:
    """A demo server on the embedded default (tiny, 2 steps), stopped however the caller ends."""
    port, log = free_port(), folder / "demo.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONWARNINGS": "ignore"}
    with log.open("w") as sink:
        server = subprocess.Popen([sys.executable, "-m", "blendexp.demo", f"server.port={port}",
                                   f"paths.outputs={folder}", *overrides(tiny_base, tiny_annotators)],
                                  cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_ready(url, server, log)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def demo_url(tmp_path: Path, tiny_base, tiny_annotators: Path) -> Iterator[str]:
    """A fresh demo server for one test."""
    with serve_demo(tmp_path, tiny_base, tiny_annotators) as url:
        yield url


@pytest.fixture(scope="module")
def shared_demo(tmp_path_factory: pytest.TempPathFactory, tiny_base, tiny_annotators: Path) -> Iterator[str]:
    """One demo server for the bad-request tests: each must leave it serving for the next."""
    with serve_demo(tmp_path_factory.mktemp("demo"), tiny_base, tiny_annotators) as url:
        yield url


@pytest.mark.slow
def test_demo_generates_through_gradio_client(demo_url: str, real_photos: dict[str, Path]) -> None:
    client = gradio_client.Client(demo_url, verbose=False)
    smile = preset("smile")
    sliders = [float(smile[component_index(c)]) for c in main_components()]
    sliders[main_components().index("jaw.0")] = 0.3  # the jaw_open slider moved on top of the preset
    # A real photo, not square and never seen: detected and aligned by default, then the Reference Adapter's input.
    gallery, used = client.predict(gradio_client.handle_file(str(real_photos["person"])), None, True, 1.0, 0.8, 0, 2,
                                   2, 3.0, "smile", *sliders, api_name="/generate")
    assert len(gallery) == 2
    images = [np.asarray(Image.open(item["image"])) for item in gallery]
    assert all(im.shape == (64, 64, 3) for im in images) and not np.array_equal(images[0], images[1])
    assert used == {"exp.0": 2.5, "exp.1": 2.5, "exp.7": 1.0, "jaw.0": 0.3}
    # A driving image replaces the sliders by its SMIRK vector.
    _, driven = client.predict(None, gradio_client.handle_file(str(real_photos["astronaut"])), False, 1.0, 0.8, 1, 1,
                               2, 3.0, "neutral", *[0.0] * len(sliders), api_name="/generate")
    assert len(driven) > 10


def request(client: gradio_client.Client, identity: object = None, scale: float = 1.0, seed: float = 0) -> tuple:
    """One ``/generate`` call with the neutral preset and one sample of 2 steps."""
    sliders = [0.0] * len(main_components())
    return client.predict(identity, None, False, scale, 0.8, seed, 1, 2, 3.0, "neutral", *sliders, api_name="/generate")


@pytest.mark.parametrize("bad, message", [
    ("upload", "identity photo: notes.txt is not an image"),
    ("cat", "identity photo cat.png: no face found"),
    ("seed", "seed=1e+30 is out of range"),
    ("scale", "expression scale='nan' is out of range"),  # JSON has no NaN: a raw request sends it as text
])
def test_demo_answers_bad_requests_readably_and_keeps_serving(shared_demo: str, tmp_path: Path, bad: str,
                                                              message: str, real_photos: dict[str, Path]) -> None:
    client = gradio_client.Client(shared_demo, verbose=False)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    kwargs = {"upload": {"identity": gradio_client.handle_file(str(notes))}, "seed": {"seed": 1e30},
              "cat": {"identity": gradio_client.handle_file(str(real_photos["cat"]))},
              "scale": {"scale": "nan"}}[bad]
    with pytest.raises(AppError) as err:
        request(client, **kwargs)
    assert message in str(err.value) and "Could not preprocess" not in str(err.value)
    gallery, _ = request(client)  # the server still answers
    assert len(gallery) == 1
