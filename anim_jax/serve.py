"""``anim-jax serve``: a local web page (Gradio) to animate a reference image with a motion.

The page takes a reference image (an upload, or one of the demo's held-out synthetic characters)
and a motion: a pose video (skeleton frames, as ``anim-jax animate --pose`` takes), a driving video
of a person (its poses are extracted with DWPose and retargeted to the reference's body; needs
``--pose-weights``) or a synthetic demo motion. It previews the poses, then animates with the
settings on the page and returns the video (playable, downloadable) and the labelled grid
(reference | pose | result).

Serving rules:

* one ``AnimatePipeline`` (and one ``PoseExtractor``) loaded at start for the server's life; the
  sampler compiles once per shape (size, frames, steps) and is reused by later requests;
* requests run one at a time (the queue's concurrency is 1), so the model never runs twice at once;
* a failing request raises ``gr.Error`` with one line saying what was wrong; the server keeps going;
* uploads are capped (``--max-upload-mb``) and land in the server's own temporary directory
  (``GRADIO_TEMP_DIR``); uploads and results older than an hour are deleted while serving (a page
  may reuse its uploads for several requests until then), and the whole directory is removed when
  the server stops. Results are written there too; nothing else is read or written
  because of a request.

``Animator`` is the request handler without any Gradio in it (the unit tests drive it directly);
``build_app`` wraps it in the page.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import sys
import tempfile
import time
import uuid
from typing import Callable

from anim_jax import native, storage, weights_dir
from anim_jax.weights_dir import packaged_demo_weights

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 50
DEFAULT_MAX_FRAMES = 64
DEFAULT_MAX_SIDE = 1024
# Uploads and results older than this are deleted while serving (all of them when the server stops).
RESULT_MAX_AGE_S = 3600
DEMO_CHARACTERS = 4  # the demo's held-out characters (anim_jax.demo.DemoSettings.heldout_videos)

MOTION_POSE_VIDEO = "pose video"
MOTION_DRIVING_VIDEO = "driving video (extract poses)"
MOTION_DEMO = "demo motion"
REFERENCE_UPLOAD = "upload"


class RequestError(ValueError):
    """A request the server cannot do; the message (one line) is shown on the page."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """The page's starting values: the weights' native settings (``anim_jax.native``, recorded by
    ``anim-jax convert`` and training exports; Moore-AnimateAnyone's where none are recorded)."""

    width: int = native.MOORE.width
    height: int = native.MOORE.height
    frames: int = native.MOORE.context_frames
    steps: int = native.MOORE.steps
    guidance_scale: float = native.MOORE.guidance_scale
    seed: int = 42
    fps: float = 8.0

    @classmethod
    def from_weights(cls, directory) -> "Settings":
        try:
            recorded = native.from_config(weights_dir.read_config(directory))
        except (OSError, ValueError):
            recorded = native.MOORE
        return cls(width=recorded.width, height=recorded.height, frames=recorded.context_frames,
                   steps=recorded.steps, guidance_scale=recorded.guidance_scale)


@dataclasses.dataclass
class Result:
    video: str  # mp4 of the generated frames
    grid: str  # mp4: reference | pose | result
    frames: int
    seconds: float


class Animator:
    """The request handler: loads the models once; ``poses`` / ``animate`` serve one request each.

    ``workdir``: the only directory requests write to (results go to a fresh subfolder per request).
    ``pose_weights`` (a converted DWPose directory) or a ready ``pose_extractor`` enables driving videos.
    """

    def __init__(self, weights, *, pose_weights=None, workdir, max_frames: int = DEFAULT_MAX_FRAMES,
                 max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_side: int = DEFAULT_MAX_SIDE, mesh=None,
                 pose_extractor=None):
        from anim_jax.pipeline import AnimatePipeline

        self.workdir = pathlib.Path(workdir)
        self.max_frames = max_frames
        self.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
        self.max_side = max_side
        self.settings = Settings.from_weights(weights)
        self.pipe = AnimatePipeline.from_pretrained(weights, mesh=mesh)
        self.extractor = pose_extractor
        if pose_extractor is None and pose_weights is not None:
            from anim_jax.pose.extract import PoseExtractor

            self.extractor = PoseExtractor.from_pretrained(pose_weights, mesh=mesh)

    # -- inputs ------------------------------------------------------------------------------

    def _checked_upload(self, path, what: str) -> pathlib.Path:
        if not path:
            raise RequestError(f"no {what} was given: upload one or pick a demo one")
        path = pathlib.Path(path)
        if not path.is_file():
            raise RequestError(f"the {what} upload is missing; upload it again")
        size = path.stat().st_size
        if size > self.max_upload_bytes:
            raise RequestError(f"the {what} is {size / 2**20:.1f} MB; this server takes at most "
                               f"{self.max_upload_bytes / 2**20:g} MB")
        return path

    def check_size(self, width: int, height: int, frames: int, steps: int) -> tuple[int, int, int, int]:
        factor = self.pipe.vae_downscale
        width, height, frames, steps = (_number(v, n, int) for v, n in
                                        ((width, "width"), (height, "height"), (frames, "frames"), (steps, "steps")))
        for name, value in (("width", width), ("height", height)):
            if value <= 0 or value % factor or value > self.max_side:
                raise RequestError(f"{name} must be a multiple of {factor} between {factor} and {self.max_side}, "
                                   f"got {value}")
        if not 1 <= frames <= self.max_frames:
            raise RequestError(f"frames must be between 1 and {self.max_frames} (this server's --max-frames), "
                               f"got {frames}")
        if not 1 <= steps <= 1000:
            raise RequestError(f"steps must be between 1 and 1000, got {steps}")
        return width, height, frames, steps

    def reference(self, upload, demo_character: int | None, width: int, height: int):
        """The reference image as an (H, W, 3) uint8 array."""
        import numpy as np

        from anim_jax import media

        if upload:
            path = self._checked_upload(upload, "reference image")
            try:
                return np.asarray(media.to_rgb_image(path, name="reference image"))
            except (OSError, ValueError) as e:
                raise RequestError(f"the reference image could not be read: {_one_line(e)}") from None
        if demo_character is None:
            raise RequestError("no reference image was given: upload one or pick a demo character")
        return self._demo_video(int(demo_character), 1, width, height)[0]

    def _demo_video(self, index: int, frames: int, width: int, height: int):
        """Held-out demo video ``index`` (its first frame is the character; poses follow)."""
        from anim_jax.demo import DemoSettings, heldout_videos

        if not 0 <= index < DEMO_CHARACTERS:
            raise RequestError(f"demo character/motion must be 0..{DEMO_CHARACTERS - 1}, got {index}")
        settings = dataclasses.replace(DemoSettings(), heldout_videos=index + 1, heldout_frames=frames)
        video = heldout_videos(settings, height, width)[index]
        return video["reference"], video["poses"]

    def poses(self, reference, motion_kind: str, upload, demo_motion: int | None, *, frames: int, width: int,
              height: int):
        """The pose frames ((F, H, W, 3) uint8) the model will follow, and the motion's fps (or None)."""
        import numpy as np

        from anim_jax import media

        if motion_kind == MOTION_DEMO:
            if demo_motion is None:
                raise RequestError("pick a demo motion")
            return np.asarray(self._demo_video(int(demo_motion), frames, width, height)[1]), None
        if motion_kind not in (MOTION_POSE_VIDEO, MOTION_DRIVING_VIDEO):
            raise RequestError(f"unknown motion kind {motion_kind!r}")
        path = self._checked_upload(upload, motion_kind)
        if motion_kind == MOTION_DRIVING_VIDEO and self.extractor is None:
            raise RequestError("driving videos need pose extraction: start the server with --pose-weights DIR "
                               "(anim-jax convert-pose), or upload a pose video")
        try:
            video, fps = media.read_video_frames(path, max_frames=frames)
        except (OSError, ValueError) as e:
            raise RequestError(f"the {motion_kind} could not be read: {_one_line(e)}") from None
        except Exception as e:  # PyAV raises its own errors (InvalidDataError, ...) for broken files
            raise RequestError(f"the {motion_kind} could not be read as a video ({type(e).__name__})") from None
        if len(video) < frames:
            raise RequestError(f"{frames} frames were requested but the {motion_kind} has only {len(video)}; "
                               f"lower frames")
        frames_array = np.stack([np.asarray(f) for f in video])
        if motion_kind == MOTION_POSE_VIDEO:
            return frames_array, fps
        return self._extract_aligned(reference, frames_array, fps), fps

    def _extract_aligned(self, reference, driving, fps):
        import numpy as np

        from anim_jax.pose.align import align_poses

        try:
            ref_poses = self.extractor(reference)
            drv_poses = self.extractor(driving)
            drv_poses.fps = fps
            aligned = align_poses(drv_poses, ref_poses)
        except ValueError as e:
            raise RequestError(_one_line(e)) from None
        return np.stack(list(aligned.render(size="source")))

    # -- the request -------------------------------------------------------------------------

    def new_folder(self) -> pathlib.Path:
        """A fresh folder for one request's files; folders older than ``RESULT_MAX_AGE_S`` go (Gradio
        has served its own copies of them by then)."""
        results = self.workdir / "results"
        now = time.time()
        for old in results.glob("*") if results.is_dir() else ():
            if now - old.stat().st_mtime > RESULT_MAX_AGE_S:
                shutil.rmtree(old, ignore_errors=True)
        folder = results / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return folder

    def preview(self, reference, poses, fps) -> str:
        """An mp4 of the poses beside the reference (what the model will be given)."""
        from anim_jax import media

        width, height = poses.shape[2], poses.shape[1]
        ref = media.resize_lanczos(media.to_rgb_image(reference), width, height)
        path = self.new_folder() / "poses.mp4"
        media.write_mp4(path, media.side_by_side([ref, poses]), fps=fps or self.settings.fps)
        return str(path)

    def animate(self, reference, poses, fps, *, width: int, height: int, steps: int, guidance_scale: float, seed: int,
                on_step: Callable[[int], None] | None = None) -> Result:
        from anim_jax import media

        t0 = time.perf_counter()
        frames = len(poses)
        # Moore's 24-frame windows overlapping by 4, shortened for short clips and short motion modules.
        window = min(24, frames, self.pipe.max_window or frames)
        try:
            out = self.pipe(reference, poses, width=width, height=height, num_frames=frames, steps=steps,
                            guidance_scale=float(guidance_scale), seed=int(seed), context_frames=window,
                            context_overlap=min(4, window // 2), on_step=on_step)
        except ValueError as e:
            raise RequestError(_one_line(e)) from None
        folder = self.new_folder()
        fps = fps or self.settings.fps
        video, grid = folder / "animation.mp4", folder / "animation_grid.mp4"
        media.write_mp4(video, out.frames, fps=fps)
        media.write_mp4(grid, media.side_by_side([out.reference, out.poses, out.frames]), fps=fps)
        return Result(str(video), str(grid), frames, time.perf_counter() - t0)


def _number(value, name: str, kind=float):
    """A page field as ``kind``; an empty or non-numeric field is the user's error, said in one line."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a number, got {value!r}") from None
    if kind is int and number != int(number):
        raise RequestError(f"{name} must be a whole number, got {value!r}")
    return kind(number)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ----------------------------------------------------------------------------------------------
# The page


def build_app(animator: Animator, *, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB):
    import contextvars

    import gradio as gr

    s = animator.settings
    factor = animator.pipe.vae_downscale
    demo_choices = [(f"demo character {i}", i) for i in range(DEMO_CHARACTERS)]
    motion_kinds = [MOTION_POSE_VIDEO, MOTION_DEMO] + ([MOTION_DRIVING_VIDEO] if animator.extractor else [])

    def inputs(ref_upload, ref_demo, motion_kind, motion_upload, motion_demo, width, height, frames, steps):
        width, height, frames, steps = animator.check_size(width, height, frames, steps)
        reference = animator.reference(ref_upload, ref_demo if not ref_upload else None, width, height)
        poses, fps = animator.poses(reference, motion_kind, motion_upload, motion_demo, frames=frames, width=width,
                                    height=height)
        return reference, poses, fps, (width, height, steps)

    def preview(ref_upload, ref_demo, motion_kind, motion_upload, motion_demo, width, height, frames, steps):
        try:
            reference, poses, fps, _ = inputs(ref_upload, ref_demo, motion_kind, motion_upload, motion_demo, width,
                                              height, frames, steps)
            return animator.preview(reference, poses, fps)
        except RequestError as e:
            raise gr.Error(str(e), duration=None) from None

    def generate(ref_upload, ref_demo, motion_kind, motion_upload, motion_demo, width, height, frames, steps,
                 guidance, seed, progress=gr.Progress()):
        try:
            progress(0, desc="preparing poses")
            guidance, seed = _number(guidance, "guidance"), _number(seed, "seed", int)
            reference, poses, fps, (width, height, steps) = inputs(
                ref_upload, ref_demo, motion_kind, motion_upload, motion_demo, width, height, frames, steps)
            # The sampler calls back from a JAX runtime thread; Gradio finds the request's progress
            # bar through context variables, so each step runs in a copy of this request's context.
            context = contextvars.copy_context()

            def on_step(i):
                context.run(progress, (i + 1, steps), desc="denoising", unit="steps")

            result = animator.animate(reference, poses, fps, width=width, height=height, steps=steps,
                                      guidance_scale=guidance, seed=seed, on_step=on_step)
        except RequestError as e:
            raise gr.Error(str(e), duration=None) from None
        status = (f"{result.frames} frames, {width}x{height}, {steps} steps, guidance {float(guidance):g}, "
                  f"seed {int(seed)}: {result.seconds:.1f} s")
        return result.video, result.video, result.grid, status

    with gr.Blocks(title="anim-jax", analytics_enabled=False, delete_cache=(600, RESULT_MAX_AGE_S)) as app:
        gr.Markdown("# anim-jax: animate a character\nA reference image + a motion -> a video "
                    f"(uploads up to {max_upload_mb:g} MB, up to {animator.max_frames} frames).")
        with gr.Row():
            with gr.Column():
                ref_upload = gr.Image(label="reference image", type="filepath", sources=["upload"], height=240,
                                      elem_id="reference")
                ref_demo = gr.Dropdown(demo_choices, value=0, label="or a demo character (used when no image is uploaded)",
                                       elem_id="demo-character")
            with gr.Column():
                motion_kind = gr.Radio(motion_kinds, value=MOTION_DEMO, label="motion", elem_id="motion-kind")
                motion_upload = gr.File(label="pose video / driving video", file_types=["video"], type="filepath",
                                        elem_id="motion")
                motion_demo = gr.Dropdown([(f"demo motion {i}", i) for i in range(DEMO_CHARACTERS)],
                                          value=1, label="demo motion", elem_id="demo-motion")
        with gr.Row():
            width = gr.Number(s.width, label="width", precision=0, step=factor, elem_id="width")
            height = gr.Number(s.height, label="height", precision=0, step=factor, elem_id="height")
            frames = gr.Number(min(s.frames, animator.max_frames), label="frames", precision=0, minimum=1,
                               maximum=animator.max_frames, elem_id="frames")
            steps = gr.Number(s.steps, label="steps", precision=0, minimum=1, elem_id="steps")
            guidance = gr.Number(s.guidance_scale, label="guidance", elem_id="guidance")
            seed = gr.Number(s.seed, label="seed", precision=0, elem_id="seed")
        with gr.Row():
            preview_button = gr.Button("Preview poses", elem_id="preview")
            generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            pose_preview = gr.Video(label="poses (reference | pose)", elem_id="pose-preview", interactive=False, height=300)
            result_video = gr.Video(label="result", elem_id="result", interactive=False, height=300)
        with gr.Row():
            grid = gr.Video(label="reference | pose | result", elem_id="grid", interactive=False, height=300)
            download = gr.File(label="download", elem_id="download", interactive=False)
        status = gr.Markdown(elem_id="status")

        common = [ref_upload, ref_demo, motion_kind, motion_upload, motion_demo, width, height, frames, steps]
        preview_button.click(preview, common, pose_preview, concurrency_limit=1, concurrency_id="model")
        generate_button.click(generate, common + [guidance, seed], [result_video, download, grid, status],
                              concurrency_limit=1, concurrency_id="model")
    app.queue(default_concurrency_limit=1)
    return app


def launch(animator: Animator, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
           max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, block: bool = True):
    """Serves the page; with ``block=False`` returns the running app at once (``app.close()`` stops it).
    Gradio's uploads and served files go to ``animator.workdir``."""
    os.environ["GRADIO_TEMP_DIR"] = str(animator.workdir)  # read by Gradio when the app is built
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(animator, max_upload_mb=max_upload_mb)
    app.launch(server_name=host, server_port=port, max_file_size=f"{int(max_upload_mb * 1024)}kb", share=False,
               inbrowser=False, show_error=True, quiet=True, allowed_paths=[str(animator.workdir)],
               prevent_thread_lock=not block)
    return app


# ----------------------------------------------------------------------------------------------
# The command


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="a local web page to animate a reference image with a pose or driving video",
        description="Start a web page (Gradio) on this machine: upload a reference image and a motion, preview the "
        "poses, animate, download the video. Listens on localhost only unless --host says otherwise.",
    )
    p.add_argument("--weights", default=None, metavar="DIR",
                   help="converted-weights directory (default: the demo model shipped with the package)")
    p.add_argument("--pose-weights", default=None, metavar="DIR",
                   help="converted DWPose directory (anim-jax convert-pose); enables driving videos")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                   help=f"largest accepted upload in MB (default: {DEFAULT_MAX_UPLOAD_MB})")
    p.add_argument("--max-frames", type=int, default=DEFAULT_MAX_FRAMES,
                   help=f"most frames one request may generate (default: {DEFAULT_MAX_FRAMES})")
    p.add_argument("--devices", type=int, default=None,
                   help="shard context windows over this many devices (default: all local devices)")
    p.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                   help="on a CPU: run as N devices of one thread each, the frames split over them, N at most "
                        "your cores (as `anim-jax animate --cpu-devices`)")
    p.set_defaults(func=run_serve)
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _check_bucket(path, flag: str) -> None:
    if path is not None and storage.is_url(path):
        storage.check_bucket(path, flag)


def run_serve(args: argparse.Namespace) -> int:
    if args.weights is None:
        weights = packaged_demo_weights()
        if not (weights / "anim_jax.json").is_file():
            return _fail("no demo weights are installed with this package: pass --weights DIR (a converted-weights "
                         "directory), or train the demo model with `anim-jax demo --train` and pass --weights demo_out/weights")
    else:
        weights = storage.as_path(args.weights)  # local or gs://: the pipeline reads either
        try:
            _check_bucket(args.weights, "--weights")
            _check_bucket(args.pose_weights, "--pose-weights")
        except FileNotFoundError as e:
            return _fail(str(e))
        if not (weights / "anim_jax.json").is_file():
            return _fail(f"--weights {str(weights)!r} is not a converted-weights directory (anim_jax.json is missing; "
                         "create one with `anim-jax convert` or `anim-jax demo`)")
    if args.pose_weights is not None and not storage.as_path(args.pose_weights).is_dir():
        return _fail(f"--pose-weights {args.pose_weights!r} is not a directory (convert DWPose with anim-jax convert-pose)")
    if not 0 < args.port < 65536:
        return _fail(f"--port must be 1..65535, got {args.port}")
    if args.max_upload_mb <= 0 or args.max_frames < 1:
        return _fail("--max-upload-mb must be > 0 and --max-frames >= 1")
    if args.cpu_devices is not None:
        from anim_jax import parallel

        try:
            parallel.use_cpu_devices(args.cpu_devices)
        except (RuntimeError, ValueError) as e:
            return _fail(f"--cpu-devices: {e}")

    import signal

    # A stop by SIGTERM (a service manager, `kill`) unwinds like Ctrl-C, so the temp directory goes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="anim-jax-serve-"))
    try:
        import jax

        from anim_jax import parallel

        devices = jax.devices()[: args.devices] if args.devices else jax.devices()
        mesh = parallel.make_mesh((len(devices),), ("data",), devices=devices) if len(devices) > 1 else None
        try:
            animator = Animator(weights, pose_weights=args.pose_weights, workdir=workdir, max_frames=args.max_frames,
                                max_upload_mb=args.max_upload_mb, mesh=mesh)
        except (OSError, ValueError) as e:
            return _fail(f"could not load the weights: {_one_line(e)}")
        print(f"anim-jax serve: {weights} on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
        try:
            launch(animator, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb)
        except OSError as e:  # the port is taken, the address is not this machine's, ...
            return _fail(f"cannot listen on {args.host}:{args.port}: {_one_line(e)}")
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
