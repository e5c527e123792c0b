"""A remote zimage-split encoder feeding diffusers' own ZImagePipeline: the text encoder runs elsewhere, and
this machine loads only the DiT and the VAE. docs/sdk.md shows it; tests/integration/test_diffusers_interop.py
runs it and checks the image equals the zimage-split generator's, byte for byte.

    python examples/diffusers_interop.py --encoder encoder.internal:50051 --model Tongyi-MAI/Z-Image-Turbo \
        --device cuda "a red fox in deep snow" -o fox.png
"""

from __future__ import annotations

import argparse

# --8<-- [start:example]
import torch
from diffusers import ZImagePipeline

from zimage_split.client import Client


def diffusers_image(encoder, model, prompt, *, seed, width=1024, height=1024, steps=8, device="cpu"):
    with Client(generator=None, encoder=encoder) as client:
        embeddings = client.encode([prompt])  # one [tokens, 2560] tensor per prompt, from the remote encoder
    # No text encoder or tokenizer on this machine: the prompt arrives encoded.
    pipe = ZImagePipeline.from_pretrained(model, text_encoder=None, tokenizer=None).to(device)
    return pipe(
        prompt_embeds=embeddings.to_diffusers(device, pipe.transformer.dtype),
        guidance_scale=0.0,  # Turbo's setting; with guidance, pass negative_prompt_embeds the same way
        num_inference_steps=steps,
        width=width,
        height=height,
        generator=torch.Generator(device).manual_seed(seed),
    ).images[0]


# --8<-- [end:example]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("--encoder", required=True, help="the zimage-split encoder, HOST:PORT")
    parser.add_argument("--model", required=True, help="a diffusers Z-Image folder or hub id")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-o", "--output", default="diffusers.png")
    args = parser.parse_args()
    image = diffusers_image(
        args.encoder,
        args.model,
        args.prompt,
        seed=args.seed,
        width=args.width,
        height=args.height,
        steps=args.steps,
        device=args.device,
    )
    image.save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
