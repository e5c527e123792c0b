"""Through real gRPC, an image made with a LoRA equals diffusers' ZImagePipeline after
`load_lora_weights(file)` and `set_adapters([...], [scale])`, for every file layout diffusers can load.

The files come from tests/unit/test_lora_files.py's writers, less the parts diffusers 0.42.1 cannot load
(those only our converter reads, so there is nothing to compare with; test_lora_adapters.py checks them
against the weight change they must make):

- `.alpha` tensors next to `transformer.`-prefixed diffusers keys: diffusers' converter prefixes the keys
  again (`transformer.transformer.`) and loads nothing (NoMatchingPeftModuleError);
- `.alpha` tensors in the dotted layout: diffusers renames `to.q` to `to_q` but looks for the alpha under
  the new name, and refuses the file (ValueError);
- kohya keys with the original Z-Image names of the final layer (`lora_unet_final_layer_linear`): diffusers
  maps them to `final.layer.linear`, which does not exist; alone the file is refused, among other layers
  the layer is dropped without an error;
- the ComfyUI layout (fused `attention.qkv`, `x_embedder`, `final_layer`, `.diff`/`.diff_b`): refused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import start_generator
from tests.unit.test_lora_files import ai_toolkit_lora, diffusers_lora, dotted_lora, kohya_lora
from zimage_split.client import Client


def without(tensors: dict[str, torch.Tensor], unwanted: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in tensors.items() if not unwanted(key)}


def saved_by_diffusers(model: Path, path: Path) -> None:
    """A PEFT adapter on the tiny DiT, written by diffusers' own `save_lora_weights`: `transformer.` keys,
    no `.alpha` tensors, lora_alpha (8, rank 4) in the file's `lora_adapter_metadata`."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = ZImageTransformer2DModel.from_pretrained(str(model), subfolder="transformer")
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        # A regex (PEFT full-matches it): the final layer's adaLN_modulation.0 is a SiLU, not a Linear.
        target_modules=r"(layers|noise_refiner)\.\d+\.(attention\.to_[qv]|feed_forward\.w1|adaLN_modulation\.0)",
        init_lora_weights=False,  # random lora_B too, so the adapter changes the image
    )
    torch.manual_seed(5)
    transformer.add_adapter(config)
    ZImagePipeline.save_lora_weights(
        path.parent,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        weight_name=path.name,
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )


LAYOUTS: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "diffusers-prefixed": lambda: without(diffusers_lora().tensors, lambda key: key.endswith(".alpha")),
    "diffusers-alpha": lambda: {
        key.removeprefix("transformer."): value for key, value in diffusers_lora().tensors.items()
    },
    "ai-toolkit": lambda: ai_toolkit_lora().tensors,
    "kohya": lambda: without(kohya_lora().tensors, lambda key: "final_layer_linear" in key),
    "dotted": lambda: without(dotted_lora().tensors, lambda key: key.endswith(".alpha")),
}
NAMES = [*LAYOUTS, "diffusers-saved"]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("lora-parity")
    for name, tensors in LAYOUTS.items():
        save_file(tensors(), str(folder / f"{name}.safetensors"))
    saved_by_diffusers(tiny_model_dir, folder / "diffusers-saved.safetensors")
    return folder


@pytest.fixture(scope="module")
def lora_client(loop_thread, tiny_model_dir, lora_dir):  # type: ignore[no-untyped-def]
    server = start_generator(loop_thread, tiny_model_dir, None, lora_dir=str(lora_dir), lora_cache=4)
    try:
        with Client(generator=f"127.0.0.1:{server.port}", timeout=60) as client:
            yield client
    finally:
        loop_thread.run(server.stop(grace=0))


@pytest.fixture(scope="module")
def lora_pipeline(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    """diffusers' pipeline of its own, so that its adapters never reach the shared reference pipeline."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(str(tiny_model_dir), text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def prompt(reference_pipeline):  # type: ignore[no-untyped-def]
    positive, negative = reference_pipeline.encode_prompt(
        ["a castle on a hill"], device="cpu", do_classifier_free_guidance=True, negative_prompt=["blurry"]
    )
    return positive[0], negative[0]


def diffusers_image(pipe, lora_dir: Path, loras, prompt, *, seed: int, guidance: float = 0.0):  # type: ignore[no-untyped-def]
    """diffusers' image with `loras` [(file name, scale)] loaded from their files and set as adapters."""
    try:
        for name, _ in loras:
            pipe.load_lora_weights(str(lora_dir / f"{name}.safetensors"), adapter_name=name)
        if loras:
            pipe.set_adapters([name for name, _ in loras], [scale for _, scale in loras])
        return pipe(
            prompt_embeds=[prompt[0]],
            negative_prompt_embeds=[prompt[1]] if guidance > 0 else None,
            height=64,
            width=64,
            num_inference_steps=8,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]
    finally:
        pipe.unload_lora_weights()


def our_image(client: Client, loras, prompt, *, seed: int, guidance: float = 0.0):  # type: ignore[no-untyped-def]
    return client.generate(
        embeddings=prompt[0],
        negative_embeddings=prompt[1] if guidance > 0 else None,
        seed=seed,
        width=64,
        height=64,
        guidance_scale=guidance,
        loras=loras,
    )


@pytest.mark.parametrize("scale", [0.7, -1.5])
@pytest.mark.parametrize("layout", NAMES)
def test_each_layout_gives_diffusers_image_with_that_lora(  # type: ignore[no-untyped-def]
    lora_client, lora_pipeline, lora_dir, prompt, layout, scale
) -> None:
    expected = diffusers_image(lora_pipeline, lora_dir, [(layout, scale)], prompt, seed=3)
    base = diffusers_image(lora_pipeline, lora_dir, [], prompt, seed=3)
    assert not np.array_equal(np.asarray(expected), np.asarray(base)), "the LoRA must change the image"
    image = our_image(lora_client, [(layout, scale)], prompt, seed=3)
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    assert image.info["loras"] == [{"name": layout, "scale": pytest.approx(scale)}]


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")  # diffusers, with two adapters
def test_two_adapters_with_guidance_give_diffusers_image(
    lora_client, lora_pipeline, lora_dir, prompt
) -> None:  # type: ignore[no-untyped-def]
    loras = [("kohya", 0.6), ("diffusers-saved", 1.2)]
    expected = diffusers_image(lora_pipeline, lora_dir, loras, prompt, seed=8, guidance=3.0)
    image = our_image(lora_client, loras, prompt, seed=8, guidance=3.0)
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    # And without LoRA afterwards, diffusers' base image again.
    base = diffusers_image(lora_pipeline, lora_dir, [], prompt, seed=8)
    assert np.array_equal(np.asarray(our_image(lora_client, [], prompt, seed=8)), np.asarray(base))
