"""Generation entry point: ``python -m blendexp.generate [identity=...] [expression=...] [key=value ...]``.

One identity (a face photo, an ArcFace embedding ``.npy`` or shards) × expressions (presets, driving images, FLAME
files, plus per-component ``edits``) × ``samples`` seeds → ``images/``, ``grid.png`` and ``settings.json``; with
``transition.keyframes`` an interpolated sequence from one initial noise → ``frames/``, GIF and MP4. Every input is
checked before any model loads; a user error is one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from blendexp import config as _config  # noqa: F401  (registers the ${blendexp.*} resolvers)
from blendexp.errors import run_entry

if TYPE_CHECKING:  # the commands import torch and diffusers inside, so --help and --cfg job compose without them
    from blendexp.flame import NamedExpression
    from blendexp.pipeline import ExpressionPipeline, FaceIdentity

GRID_COLUMNS = 8  # frames per row of a transition's contact sheet


def _unique(named: list[NamedExpression]) -> list[NamedExpression]:
    """Suffix repeated names (``smile``, ``smile-2``) so no image overwrites another."""
    seen: dict[str, int] = {}
    out = []
    for name, exp in named:
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}-{seen[name]}", exp))
    return out


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    """An (S, S, 3) face at the generated size, for the grid's identity column."""
    return image if image.shape[0] == size else np.asarray(Image.fromarray(image).resize((size, size)))


def _save(image: np.ndarray, path: Path) -> Path:
    """Write one uint8 image as PNG, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def write_gif(frames: np.ndarray, path: Path, fps: float) -> Path:
    """An endlessly looping GIF, the format every viewer and issue tracker plays."""
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def _expression_grid(pipe: ExpressionPipeline, cfg: DictConfig, face: FaceIdentity, reference: np.ndarray | None,
                     out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Images of every (expression, sample) and the grid; returns (files, what settings.json records)."""
    from blendexp.commands import container, sampling
    from blendexp.flame import apply_edits, describe
    from blendexp.images import image_grid

    named = _unique([(n, apply_edits(e, container(cfg.edits))) for n, e in pipe.load_expressions(container(cfg.expression))])
    samples = int(cfg.samples)
    images = pipe(face, np.stack([e for _, e in named]), reference, num_images=samples, **sampling(cfg))
    paths = [_save(images[i * samples + k], out / "images" / f"{name}_{k}.png")
             for i, (name, _) in enumerate(named) for k in range(samples)]
    size = images.shape[1]
    first = [_resized(face.image, size) if face.image is not None else None]
    rows = [first + list(images[i * samples:(i + 1) * samples]) for i in range(len(named))]
    image_grid(rows).save(out / "grid.png")
    np.save(out / "flame.npy", np.stack([e for _, e in named]))  # expression=<run>/flame.npy reproduces the rows
    record = {"expressions": {n: describe(e) for n, e in named}, "seeds": [int(cfg.seed) + k for k in range(samples)]}
    return {"images": paths, "grid": out / "grid.png", "flame": out / "flame.npy"}, record


def _transition(pipe: ExpressionPipeline, cfg: DictConfig, face: FaceIdentity, reference: np.ndarray | None,
                out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """An interpolated sequence through the keyframes, all frames from the same noise; GIF, MP4 and contact sheet."""
    from blendexp.commands import container, sampling
    from blendexp.flame import apply_edits, describe, interpolate
    from blendexp.images import image_grid, write_video

    keys = [(n, apply_edits(e, container(cfg.edits))) for n, e in pipe.load_expressions(container(cfg.transition.keyframes))]
    path = interpolate([e for _, e in keys], int(cfg.transition.frames), str(cfg.transition.ease))
    frames = pipe(face, path, reference, num_images=1, **sampling(cfg))
    paths = [_save(f, out / "frames" / f"frame_{i:03d}.png") for i, f in enumerate(frames)]
    fps = float(cfg.transition.fps)
    np.save(out / "transition_flame.npy", path)
    sheet = [list(frames[i:i + GRID_COLUMNS]) for i in range(0, len(frames), GRID_COLUMNS)]
    image_grid(sheet).save(out / "transition.png")
    files = {"frames": paths, "gif": write_gif(frames, out / "transition.gif", fps),
             "mp4": write_video(out / "transition.mp4", frames, fps), "grid": out / "transition.png",
             "flame": out / "transition_flame.npy"}
    record = {"keyframes": {n: describe(e) for n, e in keys}, "seeds": [int(cfg.seed)]}
    return files, record


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured generation and return the written files by kind (what tests and scripts read)."""
    from blendexp.commands import check_expressions, check_inputs, load_session

    start = time.perf_counter()
    check_inputs(cfg)
    check_expressions(cfg.transition.keyframes if cfg.transition.keyframes is not None else cfg.expression, cfg.edits)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe, face, reference = load_session(cfg)
    run = _transition if cfg.transition.keyframes is not None else _expression_grid
    files, record = run(pipe, cfg, face, reference, out)
    settings = {"identity": face.origin, **record, "pipeline": pipe.sources,
                "config": OmegaConf.to_container(cfg, resolve=True), "seconds": round(time.perf_counter() - start, 2)}
    (out / "settings.json").write_text(json.dumps(settings, indent=2, default=str, allow_nan=False))
    files["settings"] = out / "settings.json"
    print(summary(files, settings))
    return files


def summary(files: dict[str, Any], settings: dict[str, Any]) -> str:
    """What was generated and where."""
    if "gif" in files:
        lines = [f"blendexp: generated a {len(files['frames'])}-frame transition of {settings['identity']} "
                 f"in {settings['seconds']} s",
                 f"  gif:      {files['gif']}", f"  mp4:      {files['mp4']}", f"  frames:   {files['grid']}"]
    else:
        lines = [f"blendexp: generated {len(files['images'])} images ({len(settings['expressions'])} expressions x "
                 f"{len(settings['seeds'])} samples) of {settings['identity']} in {settings['seconds']} s",
                 f"  images:   {files['images'][0].parent}", f"  grid:     {files['grid']}"]
    return "\n".join(lines + [f"  settings: {files['settings']}"])


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    """Hydra entry; user errors become one clear line and exit status 1 instead of a traceback."""
    run_entry(generate, cfg)


if __name__ == "__main__":
    main()
