"""``anim-jax serve``'s request handler (``anim_jax.serve.Animator``) end to end with tiny random
weights, its error paths, and the command's argument checks. The page in a real browser is
tests/test_serve_browser.py."""

import pathlib
import time

import av
import jax
import numpy as np
import pytest
from PIL import Image

from anim_jax import cli, media
from anim_jax.serve import MOTION_DEMO, MOTION_DRIVING_VIDEO, MOTION_POSE_VIDEO, Animator, RequestError, Settings

SIZE = 32


def _video_info(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(s))
        return s.width, s.height, n, float(s.average_rate)


@pytest.fixture(scope="module")
def animator(tiny_weights, tmp_path_factory):
    return Animator(tiny_weights, workdir=tmp_path_factory.mktemp("serve_work"), max_frames=6, max_upload_mb=1)


@pytest.fixture(scope="module")
def uploads(animator):
    """A reference image and a 5-frame pose video at 10 fps, placed where Gradio puts uploads (a
    folder of their own under the work directory)."""
    rng = np.random.default_rng(0)
    folder = animator.workdir / "upload_1"
    folder.mkdir()
    ref = folder / "ref.png"
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(ref)
    pose = folder / "pose.mp4"
    media.write_mp4(pose, rng.integers(0, 256, (5, 36, 28, 3), dtype=np.uint8), fps=10)
    return ref, pose


def test_settings_come_from_the_weights(animator, tmp_path):
    assert animator.settings == Settings(width=32, height=32, frames=4, steps=2, guidance_scale=2.0, seed=42, fps=8.0)
    assert Settings.from_weights(tmp_path) == Settings()  # nothing recorded: Moore's defaults


def test_image_and_pose_video_in_mp4_and_grid_out_one_compile(animator, uploads):
    ref_path, pose_path = uploads
    width, height, frames, steps = animator.check_size(SIZE, SIZE, 3, 2)
    reference = animator.reference(str(ref_path), None, width, height)
    assert reference.shape == (40, 30, 3)
    poses, fps = animator.poses(reference, MOTION_POSE_VIDEO, str(pose_path), None, frames=frames, width=width,
                                height=height)
    assert poses.shape == (3, 36, 28, 3) and fps == 10.0
    seen = []
    result = animator.animate(reference, poses, fps, width=width, height=height, steps=steps, guidance_scale=2.0,
                              seed=1, on_step=seen.append)
    assert seen == [0, 1]  # one progress tick per denoising step, in order
    assert _video_info(result.video) == (SIZE, SIZE, 3, 10.0)
    assert _video_info(result.grid) == (3 * SIZE + 4, SIZE, 3, 10.0)
    assert result.frames == 3
    first = media.read_video_frames(result.video)[0]

    # The same shape again (other seed and guidance): nothing is compiled, nor fetched from the
    # persistent compilation cache (tests/conftest.py), the output changes.
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _secs, **kw: compiles.append(event)
        if event.endswith(("backend_compile_duration", "cache_retrieval_time_sec")) else None)
    seen.clear()
    again = animator.animate(reference, poses, fps, width=width, height=height, steps=steps, guidance_scale=3.0,
                             seed=2, on_step=seen.append)
    assert compiles == [] and seen == [0, 1]
    second = media.read_video_frames(again.video)[0]
    assert not np.array_equal(np.asarray(first[0]), np.asarray(second[0]))
    assert pathlib_parent(again.video) != pathlib_parent(result.video)  # each request its own folder

    preview = animator.preview(reference, poses, fps)
    assert _video_info(preview) == (2 * 28 + 2, 36, 3, 10.0)


def test_shipped_demo_weights_image_and_pose_video_to_mp4(tmp_path):
    """What `anim-jax serve` without --weights serves: the shipped demo model, its native settings as
    the page's defaults, an uploaded image and pose video in, an mp4 with the frames asked for out."""
    from anim_jax.weights_dir import packaged_demo_weights
    from data_pipelines import synthetic

    animator = Animator(packaged_demo_weights(), workdir=tmp_path / "work")
    s = animator.settings
    assert (s.width, s.height, s.steps, s.guidance_scale) == (64, 64, 8, 1.0)
    char = synthetic.make_character(synthetic._rng(7, 0), palette="heldout")
    video = synthetic.performance(char, char, num_frames=4, height=64, width=64)
    folder = animator.workdir / "upload_1"
    folder.mkdir(parents=True)
    Image.fromarray(video["frames"][0]).save(folder / "ref.png")
    media.write_mp4(folder / "pose.mp4", np.asarray(video["poses"]), fps=8)
    reference = animator.reference(str(folder / "ref.png"), None, s.width, s.height)
    poses, fps = animator.poses(reference, MOTION_POSE_VIDEO, str(folder / "pose.mp4"), None, frames=4,
                                width=s.width, height=s.height)
    result = animator.animate(reference, poses, fps, width=s.width, height=s.height, steps=s.steps,
                              guidance_scale=s.guidance_scale, seed=0, on_step=lambda i: None)
    assert _video_info(result.video) == (64, 64, 4, 8.0)
    frames = np.asarray(media.read_video_frames(result.video)[0], np.float64)
    assert frames.std() > 10  # a picture, not a flat frame


def pathlib_parent(path):
    return pathlib.Path(path).parent


def test_demo_character_and_demo_motion(animator):
    reference = animator.reference(None, 2, SIZE, SIZE)
    assert reference.shape == (SIZE, SIZE, 3) and reference.dtype == np.uint8
    poses, fps = animator.poses(reference, MOTION_DEMO, None, 1, frames=4, width=SIZE, height=SIZE)
    assert poses.shape == (4, SIZE, SIZE, 3) and fps is None
    assert poses.max() > 0 and not np.array_equal(poses[0], poses[-1])  # a visible, moving skeleton
    other, _ = animator.poses(reference, MOTION_DEMO, None, 2, frames=4, width=SIZE, height=SIZE)
    assert not np.array_equal(poses, other)


def test_driving_video_poses_are_extracted_and_aligned_to_the_reference(tiny_weights, tmp_path):
    from pose_helpers import tiny_dwpose

    from anim_jax.pose.extract import PoseExtractor

    # Small detection sizes keep the tiny DWPose networks fast (DWPose's own are 512 and 640).
    extractor = PoseExtractor.from_pretrained(tiny_dwpose(tmp_path / "dwpose", confident_keypoints=True), batch_size=8,
                                              detect_resolution=64, detector_input=(128, 128))
    animator = Animator(tiny_weights, workdir=tmp_path / "work", pose_extractor=extractor)
    rng = np.random.default_rng(4)
    driving = tmp_path / "dance.mp4"
    media.write_mp4(driving, rng.integers(0, 256, (4, 48, 64, 3), dtype=np.uint8), fps=12)
    reference = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    poses, fps = animator.poses(reference, MOTION_DRIVING_VIDEO, str(driving), None, frames=3, width=SIZE,
                                height=SIZE)
    # Rendered on the reference's canvas (its pixels), one picture per requested frame.
    assert poses.shape == (3, 40, 30, 3) and poses.dtype == np.uint8 and fps == 12.0
    assert poses.max() > 0  # the tiny detector finds people, so skeletons are drawn


def test_request_errors_are_one_clear_line(animator, tmp_path):
    folder = animator.workdir / "upload_bad"
    folder.mkdir()
    garbage = folder / "broken.mp4"
    garbage.write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    not_image = folder / "notes.png"
    not_image.write_text("not an image")
    big = folder / "big.mp4"
    big.write_bytes(b"\0" * (2 * 1024 * 1024))
    short = folder / "short.mp4"
    media.write_mp4(short, np.zeros((2, 16, 16, 3), np.uint8), fps=8)
    ref = np.zeros((SIZE, SIZE, 3), np.uint8)

    def poses(kind, upload, frames=3, demo=None):
        return animator.poses(ref, kind, upload, demo, frames=frames, width=SIZE, height=SIZE)

    cases = [
        (lambda: poses(MOTION_POSE_VIDEO, str(garbage)), "pose video could not be read"),
        (lambda: poses(MOTION_POSE_VIDEO, str(big)), "at most 1 MB"),
        (lambda: poses(MOTION_POSE_VIDEO, str(short)), "only 2"),
        (lambda: poses(MOTION_POSE_VIDEO, None), "no pose video was given"),
        (lambda: poses(MOTION_DRIVING_VIDEO, str(short)), "--pose-weights"),
        (lambda: poses(MOTION_DEMO, None, demo=None), "pick a demo motion"),
        (lambda: animator.reference(str(not_image), None, SIZE, SIZE), "reference image could not be read"),
        (lambda: animator.reference(None, None, SIZE, SIZE), "no reference image"),
        (lambda: animator.check_size(SIZE, SIZE, 7, 2), "frames must be between 1 and 6"),
        (lambda: animator.check_size(33, SIZE, 3, 2), "width must be a multiple of 2"),
        (lambda: animator.check_size(SIZE, SIZE, None, 2), "frames must be a number, got None"),
        (lambda: animator.check_size(SIZE, SIZE, 3, 2.5), "steps must be a whole number"),
        (lambda: animator.check_size(SIZE, 4096, 3, 2), "height must be a multiple of 2 between 2 and 1024"),
    ]
    for call, match in cases:
        with pytest.raises(RequestError, match=match) as info:
            call()
        assert "\n" not in str(info.value)
    # The handler still serves after all of them.
    result = animator.animate(ref, np.zeros((3, SIZE, SIZE, 3), np.uint8), None, width=SIZE, height=SIZE, steps=2,
                              guidance_scale=1.0, seed=0, on_step=lambda i: None)
    assert _video_info(result.video)[2] == 3  # (the shape compiled above)


def test_serve_command_checks_its_arguments(tmp_path, capsys, monkeypatch):
    import anim_jax.serve as serve

    monkeypatch.setattr(serve, "packaged_demo_weights", lambda: tmp_path / "not_shipped")
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --weights" in err and "anim-jax demo" in err
    assert cli.main(["serve", "--weights", str(tmp_path)]) == 2
    assert "anim_jax.json is missing" in capsys.readouterr().err


def test_serve_cpu_devices_refused_once_the_backends_are_up(tiny_weights, capsys):
    # (a fresh `anim-jax serve` has none up: tests/test_driving.py runs `animate --cpu-devices` so)
    jax.devices()  # up for sure: were they not, the command would change this process's devices
    assert cli.main(["serve", "--weights", str(tiny_weights), "--cpu-devices", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--cpu-devices: CPU devices can only be set before JAX initialises" in err
    assert cli.main(["serve", "--weights", str(tiny_weights), "--cpu-devices", "0"]) == 2
    assert "--cpu-devices: CPU device count must be >= 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The page in a real browser (Chromium + chromedriver from the distribution, see .ci/run). The
# server runs in this process on the module's Animator, so the shapes compiled above are reused.

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--no-first-run")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def page(animator, tmp_path, monkeypatch):
    """(driver, url): the served page open in headless Chromium; server and browser are stopped after."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from anim_jax.serve import launch

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(animator.workdir))
    port = _free_port()
    app = launch(animator, port=port, block=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    service = Service(CHROMEDRIVER)
    driver = None
    try:
        driver = webdriver.Chrome(options=options, service=service)
        driver.set_window_size(1300, 1700)
        yield driver, f"http://127.0.0.1:{port}/"
    finally:
        if driver is not None:
            driver.quit()
        app.close()
    assert service.process is None or service.process.poll() is not None  # chromedriver has exited
    assert not _port_open(port)  # the server is gone


def test_page_in_a_real_browser(page, uploads_for_browser, animator, tmp_path):
    from urllib.parse import urljoin
    from urllib.request import urlopen

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver, url = page
    ref, pose, garbage = uploads_for_browser
    wait = WebDriverWait(driver, 120)
    driver.get(url)
    wait.until(ec.element_to_be_clickable((By.ID, "generate")))

    def css(selector):
        return driver.find_element(By.CSS_SELECTOR, selector)

    def upload_motion(path):
        clear = driver.find_elements(By.CSS_SELECTOR, "#motion button[aria-label='Clear']")
        if clear:
            clear[0].click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#motion input[type=file]"))
        css("#motion input[type=file]").send_keys(str(path))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#motion td.filename[aria-label='{path.name}']"))

    def generate():
        driver.find_element(By.ID, "generate").click()

    css("#reference input[type=file]").send_keys(str(ref))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#reference img"))
    css("#motion-kind input[value='pose video']").click()
    upload_motion(pose)
    frames = css("#frames input")
    frames.send_keys(Keys.CONTROL, "a")
    frames.send_keys("3", Keys.TAB)

    driver.find_element(By.ID, "preview").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pose-preview video[src]"))

    # Slow steps (the tiny model takes milliseconds) so the page can be seen following them.
    animate = animator.animate

    def slow_animate(*args, on_step, **kwargs):
        def slow_step(i):
            time.sleep(1.5)
            on_step(i)

        return animate(*args, on_step=slow_step, **kwargs)

    animator.animate = slow_animate
    try:
        generate()
        wait.until(lambda d: "denoising" in d.find_element(By.ID, "result").text)
        wait.until(lambda d: "3 frames" in d.find_element(By.ID, "status").text)
    finally:
        del animator.animate
    first_src = css("#result video").get_attribute("src")
    href = css("#download a[href]").get_attribute("href")
    downloaded = tmp_path / "downloaded.mp4"
    with urlopen(urljoin(url, href), timeout=30) as response:
        downloaded.write_bytes(response.read())
    assert _video_info(downloaded) == (SIZE, SIZE, 3, 10.0)

    # A broken upload: the page says what is wrong; the server keeps serving.
    upload_motion(garbage)
    generate()
    wait.until(lambda d: "could not be read" in d.find_element(By.TAG_NAME, "body").text)
    for close in driver.find_elements(By.CSS_SELECTOR, "button.toast-close"):
        close.click()
    upload_motion(pose)
    css("#seed input").send_keys(Keys.CONTROL, "a")
    css("#seed input").send_keys("5", Keys.TAB)
    generate()
    wait.until(lambda d: "seed 5" in d.find_element(By.ID, "status").text)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#result video").get_attribute("src") not in (None, first_src))
    with urlopen(urljoin(url, css("#download a[href]").get_attribute("href")), timeout=30) as response:
        downloaded.write_bytes(response.read())
    assert _video_info(downloaded) == (SIZE, SIZE, 3, 10.0)
    screenshot = tmp_path / "serve.png"
    driver.save_screenshot(str(screenshot))
    print(f"screenshot of the finished page: {screenshot}")
    assert Image.open(screenshot).size[0] > 0


@pytest.fixture
def uploads_for_browser(tmp_path):
    """Files the browser uploads (from outside the server's work directory, as a user's would be)."""
    rng = np.random.default_rng(3)
    ref = tmp_path / "reference.png"
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(ref)
    pose = tmp_path / "poses.mp4"
    media.write_mp4(pose, rng.integers(0, 256, (5, 36, 28, 3), dtype=np.uint8), fps=10)
    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    return ref, pose, garbage


def test_serve_command_starts_serves_and_cleans_up_on_sigterm(tiny_weights, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from urllib.request import urlopen

    port = _free_port()
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the server's temporary directory goes here
    proc = subprocess.Popen([sys.executable, "-m", "anim_jax.cli", "serve", "--weights", str(tiny_weights),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not _port_open(port):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not start listening"
            time.sleep(0.5)
        with urlopen(f"http://127.0.0.1:{port}/config", timeout=30) as response:
            assert response.status == 200 and b"Generate" in response.read()
        assert [p.name.startswith("anim-jax-serve-") for p in tmp_path.iterdir()] == [True]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert f"http://127.0.0.1:{port}" in proc.stdout.read()
    assert list(tmp_path.iterdir()) == []  # uploads/results directory removed on the way out
    assert not _port_open(port)
