"""Raw images and videos → WebDataset shards in the shard contract: ``python -m blendexp.data.build``.

Inputs are listed in sorted order and cut into tasks (``images_per_task`` images, or one video; ``inputs.py``).
Worker processes annotate tasks (detect, align, identity, SMIRK, latents; ``annotate.py``); the parent packs their
samples in task order into shards, resumably and byte-identically (``packing.py``); ``array.size`` > 1 builds one
part of the plan or merges the parts (``array.py``).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from blendexp import config as _config  # noqa: F401  (registers the ${blendexp.*} resolvers)
from blendexp.errors import run_entry

log = logging.getLogger(__name__)


def file_id(kind: str, path: str | Path) -> str:
    """Which model made a vector, as recorded in every sample: kind, file name and content hash."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    return f"{kind}:{Path(path).name}:{digest}"


@contextmanager
def exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock`` (created if need be): array parts starting together prepare shared inputs
    (toy renders, tiny annotators) one at a time."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_models(cfg: dict[str, Any]) -> None:
    """Fill null annotator paths with tiny random ones (when ``tiny_annotators`` is set) and record model ids."""
    from blendexp.faces.annotators import describe_toy, ensure_tiny_annotators  # torch-backed: after composition
    from blendexp.faces.landmarks import check_smirk_crop

    tiny = cfg["identity"]["path"] is None or cfg["expression"]["smirk"] is None
    if tiny:
        if not cfg.get("tiny_annotators"):
            raise ValueError("identity.path and expression.smirk must name model files (or set tiny_annotators="
                             "<folder> to use tiny random ones, for tests and toy data only)")
        tiny = ensure_tiny_annotators(cfg["tiny_annotators"], facenet=False)
        cfg["identity"]["path"] = cfg["identity"]["path"] or str(tiny["arcface"])
        cfg["expression"]["smirk"] = cfg["expression"]["smirk"] or str(tiny["smirk"])
    for what, path in (("identity.path", cfg["identity"]["path"]), ("expression.smirk", cfg["expression"]["smirk"])):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what}: model file {path} does not exist; expected layout: models/antelopev2/"
                                    "arcface.onnx and models/smirk/SMIRK_em1.pt (see README 'Real scale')")
    check_smirk_crop(cfg["expression"]["crop"], "expression.crop")  # here, before any worker process starts
    cfg["model_ids"] = {"id_model": file_id(cfg["identity"]["name"], cfg["identity"]["path"]),
                        "exp_model": file_id("smirk", cfg["expression"]["smirk"])}
    cfg["toy_models"] = describe_toy({"tiny_root": cfg["tiny_annotators"] if tiny else None},
                                     {"arcface": cfg["identity"]["path"], "smirk": cfg["expression"]["smirk"]})
    if cfg["latents"].get("vae"):
        weights = sorted(Path(cfg["latents"]["vae"]).glob("diffusion_pytorch_model.*"))
        if not weights:
            raise FileNotFoundError(f"latents.vae: no diffusion_pytorch_model.* in {cfg['latents']['vae']}; "
                                    "point it at an AutoencoderKL folder such as <sd15>/vae")
        cfg["model_ids"]["latents_model"] = file_id("vae", weights[0])


def real_input_warnings(cfg: Mapping[str, Any]) -> list[str]:
    """A warning (logged now, kept in the manifest and printed at the end) when inputs the toy preset did not render
    are annotated with toy or tiny random ArcFace/SMIRK."""
    from blendexp.faces.annotators import toy_warning

    inputs = ", ".join(f"sources.{name}" for name in cfg["sources"])
    warning = None if cfg.get("toy") else toy_warning(f"inputs {inputs}", cfg["toy_models"])
    if warning:
        log.warning(warning)
    return [warning] if warning else []


def build(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Build (or resume) every configured source's shards and write the reports; returns manifest and stats.
    With ``array.size`` > 1, build one part of the plan or merge the parts (array.py)."""
    from blendexp.data.array import build_array, check_array
    from blendexp.data.inputs import plan_tasks
    from blendexp.data.packing import pack

    c: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    c.pop("hydra", None)
    if int(c["video"]["stride"]) < 1 or int(c["shard"]["maxcount"]) < 1:
        raise ValueError("video.stride and shard.maxcount must be >= 1")
    check_array(c)
    with exclusive(Path(c["work_dir"]) / "prepare.lock"):  # array parts may start at once
        if c.get("toy"):  # inputs to render first, e.g. the toy world's (conf/data/build/toy.yaml names the renderer)
            hydra.utils.call(c["toy"], _convert_="all")
        plan = plan_tasks(c)
        resolve_models(c)
    c["warnings"] = real_input_warnings(c)
    if int(c["array"]["size"]) > 1:
        return build_array(c, plan)
    return pack(c, plan)


@hydra.main(version_base="1.3", config_path="../conf", config_name="build")
def main(cfg: DictConfig) -> None:
    """Hydra entry; user errors become one clear line and exit status 1 instead of a traceback."""
    result = run_entry(build, cfg)
    if "part" in result.get("array", {}):
        part, size = result["array"]["part"], result["array"]["size"]
        print(f"blendexp: part {part} of {size} built in {result['out']}; when every part is done, join them with "
              "the same command and array.index=merge")
        return
    print(f"blendexp: shards in {result['out']} (manifest.json, rejects.jsonl, stats.json)")
    for source, info in result["manifest"]["sources"].items():
        st = result["stats"]["sources"][source]
        print(f"  {source}: {info['samples']} samples from {st['inputs']} inputs in {st['shards']} shards "
              f"{info['brace'] or '(listed in manifest.json)'}; rejected: {st['rejects'] or 'none'}")
    if "partial" in result["manifest"]:
        print(f"warning: partial merge, missing parts: {result['manifest']['partial']['missing']}")
    for warning in result["manifest"]["warnings"]:
        print(f"warning: {warning}")


if __name__ == "__main__":
    main()
