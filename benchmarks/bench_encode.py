"""Seconds per prompt: our unpadded, truncated-layer TextEncoder against diffusers' padded `encode_prompt`.

diffusers pads every prompt to 512 tokens and runs all decoder layers; ours runs only the real tokens and
only the layers up to hidden_states[-2]. Both sides include the chat template and the tokenizer, run under
torch.inference_mode() in this process, and are checked to give the same values.

    python -m benchmarks.bench_encode --rounds 20
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.report import (
    Settings,
    clock,
    headline_row,
    machine_info,
    model_folder,
    model_info,
    options,
    since,
    standalone,
    summary,
    write_json,
)

TARGET_SPEEDUP = 3.0  # diffusers median / ours median
MAX_ABS_DIFF_FP32 = 1e-5
MIN_COSINE_BF16 = 0.9999
# 30 words of plain English.
PROMPT = (
    "A red fox sits in fresh snow at the edge of a pine forest at dawn, soft golden light, "
    "thin mist between the trees, detailed fur, shallow depth of field."
)
TOKENIZER_NOTE = (
    "The bench model's tokenizer is byte-level with no merges: every UTF-8 byte is one token, so this "
    "prompt is several times more tokens than Qwen3's real BPE would make of it (roughly 40 to 50 with the "
    "chat template). Fewer real tokens means less work for us and the same 512 for diffusers, so on the real "
    "tokenizer the speedup would be larger than measured here."
)


def time_call(call) -> tuple[dict, torch.Tensor]:  # type: ignore[no-untyped-def]
    start = clock()
    with torch.inference_mode():
        result = call()
    return since(start), result


def compare(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    if ours.shape != theirs.shape:
        return {"same_shape": False, "max_abs_diff": None, "cosine": None, "min_token_cosine": None}
    ours64, theirs64 = ours.double(), theirs.double()
    per_token = torch.nn.functional.cosine_similarity(ours64, theirs64, dim=-1)
    return {
        "same_shape": list(ours.shape) == list(theirs.shape),
        "max_abs_diff": (ours64 - theirs64).abs().max().item(),
        "cosine": torch.nn.functional.cosine_similarity(ours64.flatten(), theirs64.flatten(), dim=0).item(),
        "min_token_cosine": per_token.min().item(),
    }


def side_summary(rounds: list[dict], side: str) -> dict:
    result = summary([r[side]["wall_s"] for r in rounds])
    result["cpu_median_s"] = summary([r[side]["cpu_s"] for r in rounds])["median_s"]
    result["others_cpu_share_median"] = summary([r[side]["others_cpu_share"] or 0.0 for r in rounds])[
        "median_s"
    ]
    return result


def bench_dtype(folder: str, dtype: torch.dtype, prompt: str, count: int, warmup: int, device: str) -> dict:
    from diffusers import ZImagePipeline

    from zimage_split.encoder_service.engine import TextEncoder
    from zimage_split.model_source import ModelSource

    encoder = TextEncoder(
        ModelSource(location=folder, model_id=folder),
        device=torch.device(device),
        dtype=dtype,
        hidden_layer=-2,
    )
    # The reference needs only its tokenizer and text encoder.
    pipe = ZImagePipeline.from_pretrained(folder, transformer=None, vae=None, dtype=dtype).to(device)

    def ours() -> torch.Tensor:
        tokens = encoder.tokenize(prompt, hidden_layer=-2, max_sequence_length=512)
        return encoder.encode([tokens])[0]

    def theirs() -> torch.Tensor:
        embeds, _ = pipe.encode_prompt([prompt], device=device, do_classifier_free_guidance=False)
        return embeds[0]

    name = str(dtype).removeprefix("torch.")
    rounds = []
    for index in range(-warmup, count):  # negative indices are warm-up; the order flips every round
        order = ("ours", "diffusers") if index % 2 == 0 else ("diffusers", "ours")
        timings, results = {}, {}
        for side in order:
            timings[side], results[side] = time_call(ours if side == "ours" else theirs)
        if index < 0:
            continue
        rounds.append(timings | {"ours_first": index % 2 == 0})
        print(
            f"{name:>9} round {index + 1:>2}/{count}: ours {timings['ours']['wall_s'] * 1000:7.1f} ms  "
            f"diffusers {timings['diffusers']['wall_s'] * 1000:7.1f} ms  (other processes: "
            f"{timings['ours']['others_cpu_share'] or 0:.0%} / {timings['diffusers']['others_cpu_share'] or 0:.0%} "
            "of the CPUs)",
            flush=True,
        )

    check = compare(results["ours"].cpu(), results["diffusers"].cpu())
    ours_summary, their_summary = side_summary(rounds, "ours"), side_summary(rounds, "diffusers")
    speedup = their_summary["median_s"] / ours_summary["median_s"]
    if dtype == torch.float32:
        tolerance = f"max_abs_diff <= {MAX_ABS_DIFF_FP32}"
        within = check["same_shape"] and check["max_abs_diff"] <= MAX_ABS_DIFF_FP32  # type: ignore[operator]
    else:
        tolerance = f"cosine >= {MIN_COSINE_BF16}"
        within = check["same_shape"] and check["cosine"] >= MIN_COSINE_BF16  # type: ignore[operator]
    return {
        "dtype": name,
        "tokens": {
            "ours_processed": int(results["ours"].shape[0]),  # only the prompt's own tokens
            "diffusers_processed": 512,  # encode_prompt's max_sequence_length, padded to
            "valid_in_output": int(results["diffusers"].shape[0]),
        },
        "layers": {"ours_run": encoder.layers_loaded, "diffusers_run": encoder.total_layers},
        "rounds": rounds,
        "ours": ours_summary,
        "diffusers": their_summary,
        "speedup_median": speedup,
        "speedup_mean": their_summary["mean_s"] / ours_summary["mean_s"],
        "values": check,
        "tolerance": tolerance,
        "within_tolerance": within,
        "target": f"speedup_median >= {TARGET_SPEEDUP} and {tolerance}",
        "target_met": within and speedup >= TARGET_SPEEDUP,
    }


def print_table(result: dict) -> None:
    print()
    print(
        f"encode one {result['prompt_words']}-word prompt on {result['machine']['cpu_count']} CPUs "
        f"({result['machine']['torch_threads']} torch threads), {result['settings']['rounds']} rounds per dtype"
    )
    print(
        f"{'dtype':<10}{'tokens ours/diff.':>18}{'layers':>8}{'ours ms':>10}{'diff. ms':>10}"
        f"{'speedup':>9}  values"
    )
    for row in result["dtypes"]:
        tokens, layers, values = row["tokens"], row["layers"], row["values"]
        if not values["same_shape"]:
            shown = "the two embeddings have different shapes"
        elif row["dtype"] == "float32":
            shown = f"max|diff| {values['max_abs_diff']:.2e}"
        else:
            shown = f"cosine {values['cosine']:.7f} (worst token {values['min_token_cosine']:.6f})"
        verdict = "met" if row["target_met"] else "NOT met"
        print(
            f"{row['dtype']:<10}{tokens['ours_processed']:>9}/{tokens['diffusers_processed']:<8}"
            f"{layers['ours_run']:>4}/{layers['diffusers_run']:<3}"
            f"{row['ours']['median_s'] * 1000:>10.1f}{row['diffusers']['median_s'] * 1000:>10.1f}"
            f"{row['speedup_median']:>8.2f}x  {shown} (target {row['target']}: {verdict})"
        )
    shares = " and ".join(f"{row['ours']['others_cpu_share_median']:.0%}" for row in result["dtypes"])
    print(f"other processes used a median {shares} of the CPUs meanwhile")
    print(f"note: {TOKENIZER_NOTE}")


DEFAULTS = {"rounds": 20, "warmup": 2, "prompt": PROMPT}
QUICK = {"warmup": 0}


def measure(settings: Settings, **overrides: object) -> dict:
    args = options(settings, DEFAULTS, QUICK, overrides)
    folder = model_folder(settings.model)
    machine = machine_info()
    rows = [
        bench_dtype(folder, dtype, args.prompt, args.rounds, args.warmup, settings.device)
        for dtype in (torch.float32, torch.bfloat16)
    ]
    result = {
        "benchmark": "encode",
        "description": "seconds per prompt, text to embedding: TextEncoder (unpadded, layers after "
        "hidden_states[-2] dropped) against ZImagePipeline.encode_prompt (padded to 512, all layers)",
        "machine": machine | {"load_average_at_end": list(os.getloadavg())},
        "model": model_info(folder, settings.model),
        "settings": {
            "rounds": args.rounds,
            "warmup_rounds": args.warmup,
            "device": settings.device,
            "quick": settings.quick,
        },
        "prompt": args.prompt,
        "prompt_words": len(args.prompt.split()),
        "tokenizer_note": TOKENIZER_NOTE,
        "dtypes": rows,
        "target": f"speedup >= {TARGET_SPEEDUP} in each dtype, with the same values",
        "target_met": all(row["target_met"] for row in rows),
    }
    result["headline"] = headline(result)
    return result


def headline(result: dict) -> list[dict]:
    return [
        headline_row(
            "encode",
            f"encode a {result['prompt_words']}-word prompt, {row['dtype']}",
            unit="ms",
            ours=row["ours"]["median_s"] * 1000,
            baseline=row["diffusers"]["median_s"] * 1000,
            baseline_name="diffusers encode_prompt",
            ratio=row["speedup_median"],
            ratio_meaning="diffusers / ours (speedup)",
            target=f">= {TARGET_SPEEDUP}",
            target_met=row["target_met"],
            note=f"{row['tokens']['ours_processed']} tokens against 512 padded; "
            f"{row['layers']['ours_run']} of {row['layers']['diffusers_run']} layers",
        )
        for row in result["dtypes"]
    ]


def main() -> None:
    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (2)")
        parser.add_argument("--prompt", default=None, help="prompt to encode (a 30-word English sentence)")

    settings, overrides, out = standalone(__doc__, "encode", flags)
    result = measure(settings, **overrides)
    print_table(result)
    print(f"wrote {write_json(result, out, 'encode')}")


if __name__ == "__main__":
    main()
