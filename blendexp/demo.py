"""Gradio demo: ``python -m blendexp.demo [server.port=7860] [overrides]`` (needs the ``demo`` extra, i.e. gradio).

One page over ``ExpressionPipeline``: an identity photo, an expression from a driving image or from a preset and
sliders for the main blendshapes, the Reference Adapter toggle, the adapter scales and the sampling settings. The
endpoint ``/generate`` is also what ``gradio_client`` scripts (and the tests) call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
from omegaconf import DictConfig

from blendexp import config as _config  # noqa: F401  (registers the ${blendexp.*} resolvers)
from blendexp.errors import run_entry, user_message
from blendexp.ranges import check_sampling

if TYPE_CHECKING:  # loaded in serve(): --help and --cfg job compose without torch and diffusers
    from blendexp.pipeline import ExpressionPipeline, FaceIdentity

log = logging.getLogger(__name__)
SLIDER_STEPS = 100  # slider resolution: a hundredth of each component's range
UI_NAMES = {"num_images": "samples", "expression_scale": "expression scale", "reference_scale": "reference scale"}


def uploaded_image(payload: Mapping[str, Any] | None, label: str) -> np.ndarray | None:
    """An upload (gradio's file payload; the event skips gradio's own decoding, whose error is "Could not preprocess
    input component at index 0") as RGB, or None; a file that is not an image is an error naming the field and file."""
    from blendexp.images import load_image

    if payload is None:
        return None
    try:
        return load_image(payload["path"], label)
    except (ValueError, FileNotFoundError):
        name = payload.get("orig_name") or "the upload"
        raise ValueError(f"{label}: {name} is not an image; upload a JPEG or PNG photo") from None


def read_upload(read: Callable[[np.ndarray], Any], payload: Mapping[str, Any] | None, label: str) -> Any:
    """``read`` (face detection and ArcFace or SMIRK) applied to an upload; its error names the field and the file."""
    image = uploaded_image(payload, label)
    if image is None:
        return None
    try:
        return read(image)
    except ValueError as err:
        raise ValueError(f"{label} {payload.get('orig_name') or 'upload'}: {err}") from None  # type: ignore[union-attr]


class DemoApp:
    """The callbacks behind the page, holding the pipeline and the fallback identity."""

    def __init__(self, pipe: ExpressionPipeline, face: FaceIdentity, cfg: DictConfig) -> None:
        """Keep the loaded pipeline, the configured identity (used when no photo is given) and the defaults."""
        from blendexp.flame import main_components

        self.pipe, self.face, self.cfg = pipe, face, cfg
        self.components = main_components()

    def slider_values(self, name: str) -> list[float]:
        """A preset's values of the slider components (choosing a preset moves the sliders)."""
        from blendexp.flame import component_index, preset

        exp = preset(name)
        return [float(exp[component_index(c)]) for c in self.components]

    def expression(self, driving: Mapping[str, Any] | None, preset_name: str, values: tuple[float, ...]) -> np.ndarray:
        """The driving image's SMIRK vector if one is given, else the preset with the sliders' values."""
        from blendexp.flame import component_index, preset

        if driving is not None:
            return read_upload(self.pipe.expression_from_image, driving, "driving image")
        exp = preset(preset_name)
        exp[[component_index(c) for c in self.components]] = values
        return exp

    def generate(self, identity: Mapping[str, Any] | None, driving: Mapping[str, Any] | None, use_reference: bool,
                 expression_scale: float, reference_scale: float, seed: float, samples: float, steps: float,
                 guidance: float, preset_name: str, *values: float) -> tuple[list[np.ndarray], dict[str, float]]:
        """Images for the page's settings and the non-zero components of the FLAME vector used; a bad upload or value
        is a readable error in the page (``gr.Error``) and the server goes on serving."""
        import gradio as gr

        from blendexp.flame import describe

        try:
            settings = check_sampling(UI_NAMES, num_images=samples, seed=seed, steps=steps, guidance=guidance,
                                      expression_scale=expression_scale, reference_scale=reference_scale)
            read = self.pipe.reference_from_image if use_reference else self.pipe.identity_from_image  # official paths
            face = read_upload(read, identity, "identity photo") or self.face
            exp = self.expression(driving, preset_name, values)
            if use_reference and face.image is None:
                raise ValueError("the Reference Adapter needs an identity photo")
            images = self.pipe(face, exp, face.image if use_reference else None, size=self.cfg.size,
                               batch_size=int(self.cfg.batch_size), **settings)
        except Exception as err:
            message = user_message(err)
            if message is None:
                raise
            raise gr.Error(message, print_exception=False) from err
        return list(images), describe(exp)

    def build(self) -> Any:
        """The Blocks page; ``/generate`` takes the inputs in the order listed under "Use via API"."""
        import gradio as gr

        from blendexp.flame import component_label, component_range, load_presets

        cfg = self.cfg
        with gr.Blocks(title="blendexp: blendshape-guided faces", analytics_enabled=False) as page:
            gr.Markdown("## blendexp — identity × FLAME expression\nGive an identity photo (empty: the configured "
                        f"identity, {self.face.origin}) and an expression: a driving image (read with SMIRK; it "
                        "overrides the sliders) or a preset fine-tuned with the sliders.")
            with gr.Row():
                with gr.Column():
                    identity = gr.Image(label="identity photo", type="numpy")
                    driving = gr.Image(label="driving image (optional)", type="numpy")
                    presets = gr.Dropdown(choices=list(load_presets()), value="neutral", label="preset")
                    sliders = [gr.Slider(*component_range(c), value=0.0, label=component_label(c),
                                         step=(component_range(c)[1] - component_range(c)[0]) / SLIDER_STEPS)
                               for c in self.components]
                with gr.Column():
                    reference = gr.Checkbox(value=False, label="Reference Adapter (the identity photo as reference)",
                                            interactive=self.pipe.ref_unet is not None)
                    expression_scale = gr.Slider(0.0, 2.0, value=float(cfg.expression_scale), label="expression scale")
                    reference_scale = gr.Slider(0.0, 1.5, value=float(cfg.reference_scale), label="reference scale")
                    seed = gr.Number(value=int(cfg.seed), precision=0, label="seed")
                    samples = gr.Slider(1, 8, value=int(cfg.samples), step=1, label="samples")
                    steps = gr.Slider(1, 100, value=int(cfg.steps), step=1, label="steps")
                    guidance = gr.Slider(1.0, 10.0, value=float(cfg.guidance), step=0.1, label="guidance")
                    button = gr.Button("Generate", variant="primary")
                    gallery = gr.Gallery(label="generated", columns=4, format="png")
                    used = gr.JSON(label="FLAME vector used (non-zero components)")
            presets.change(self.slider_values, presets, sliders, api_name=False)
            button.click(self.generate, [identity, driving, reference, expression_scale, reference_scale, seed,
                                         samples, steps, guidance, presets, *sliders], [gallery, used],
                         api_name="generate", preprocess=False)  # raw values: checked here, with readable errors
        return page


def serve(cfg: DictConfig) -> None:
    """Load the pipeline, build the page and serve it until interrupted."""
    try:
        import gradio  # noqa: F401
    except ImportError as err:
        raise ValueError("the demo needs gradio: install the demo extra (uv run --extra demo ...)") from err
    from blendexp.commands import check_inputs, load_session

    check_inputs(cfg)
    pipe, face, _ = load_session(cfg)
    page = DemoApp(pipe, face, cfg).build()
    log.info("serving the demo on http://%s:%d", cfg.server.host, cfg.server.port)
    page.queue().launch(server_name=str(cfg.server.host), server_port=int(cfg.server.port),
                        share=bool(cfg.server.share), show_error=True, ssr_mode=False)


@hydra.main(version_base="1.3", config_path="conf", config_name="demo")
def main(cfg: DictConfig) -> None:
    """Hydra entry; user errors become one clear line and exit status 1 instead of a traceback."""
    run_entry(serve, cfg)


if __name__ == "__main__":
    main()
