"""Training throughput: unbottle's loop against a bare PyTorch loop and the transformers Trainer.

The same Llama-style model (same initial weights), the same data (windows of one token
stream, drawn by a seeded generator), the same batch, AdamW with decoupled weight decay,
gradient clipping and a warmup-cosine schedule, fp32, in one process. The contestants run
in interleaved rounds (other processes share the machine, so a ratio is only meaningful
within one run) and each one's median tokens/s over the rounds is reported, by wall time
and by this process's CPU time (which other processes' load disturbs far less; with one
thread it is the cleanest measure of a loop's own overhead), with:

- the ratio to the bare loop, the median of the per-round ratios (the target for unbottle
  is >= 0.97);
- MFU: model FLOP/s (6N + 12 L h T per token, PaLM appendix B, N counting the tied
  embedding once, as the output matmul) over the machine's matmul peak, measured here
  as the best fp32 ``torch.mm`` rate on large square matrices.

``--compile`` adds unbottle with ``train.compile: true`` (torch.compile); its compile time
is spent in a warm-up run and reported apart.

``--parallel fsdp,tp,pp,hybrid`` instead trains the model once in one process and once
under each parallelism strategy (torchrun, gloo on CPUs), and records per process the
memory estimate (weights, gradients, optimizer, activations, transient), the measured
growth of the resident set during the loop (peak minus the resident set at its start:
the libraries and the model built before the loop are not in it) and the largest
relative difference of the losses from one process's. No speed-up is claimed on CPUs:
several processes share the same cores.

    .venv/bin/python bench/train_throughput.py                 # the pipeline's model
    .venv/bin/python bench/train_throughput.py --hidden 256 --layers 6 --compile
    .venv/bin/python bench/train_throughput.py --parallel fsdp,tp,pp,hybrid --steps 10
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import torch


def matmul_peak(seconds: float = 3.0) -> float:
    """Best fp32 matmul FLOP/s seen on square matrices, over about ``seconds``."""
    best = 0.0
    deadline = time.perf_counter() + seconds
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm up
        while True:
            start = time.perf_counter()
            for _ in range(3):
                torch.mm(a, b)
            elapsed = time.perf_counter() - start
            best = max(best, 3 * 2 * n**3 / elapsed)
            if time.perf_counter() > deadline or elapsed > seconds / 3:
                break
        deadline += seconds / 3
    return best


def build(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or int(args.hidden * 8 / 3),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def flops_per_token(model: Any, seq_len: int) -> float:
    c = model.config
    params = sum({id(p): p.numel() for p in model.parameters()}.values())
    return 6 * params + 12 * c.num_hidden_layers * c.hidden_size * seq_len


class Data:
    """Windows of a fixed random token stream; the row sampling is seeded per run."""

    def __init__(self, vocab: int, seq_len: int, batch: int) -> None:
        self.stream = torch.randint(
            0, vocab, (200_000,), generator=torch.Generator().manual_seed(1)
        )
        self.seq_len, self.batch = seq_len, batch

    def collate(self, starts: list[int]) -> dict[str, torch.Tensor]:
        ids = torch.stack([self.stream[s : s + self.seq_len] for s in starts])  # (B, T)
        return {"input_ids": ids, "labels": ids}

    @property
    def size(self) -> int:
        return self.stream.numel() - self.seq_len


def train_params(args: argparse.Namespace, steps: int, *, compile_: bool = False) -> Any:
    from unbottle.core.config.schema import TrainParams

    return TrainParams(
        steps=steps,
        batch_size=args.batch,
        seq_len=args.seq_len,
        lr=1e-3,
        warmup_steps=5,
        weight_decay=0.1,
        grad_clip=1.0,
        precision="fp32",
        log_every=10_000,
        checkpoint_every=0,
        compile=compile_,
    )


def run_unbottle(
    model: Any, data: Data, args: argparse.Namespace, steps: int, compile_: bool = False
) -> float:
    from unbottle.core.registry import get_registry
    from unbottle.core.training.loop import Batches, train

    batches = Batches(size=data.size, collate=data.collate, seed=2)
    _, report = train(
        model,
        batches,
        train_params(args, steps, compile_=compile_),
        registry=get_registry(),
        desc="bench",
    )
    return report.session_tokens / report.seconds, report.session_tokens / report.cpu_seconds


def run_bare(model: Any, data: Data, args: argparse.Namespace, steps: int) -> float:
    """What one writes by hand: forward, backward, clip, step, schedule, log the loss."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from unbottle.plugins.optimizers import AdamW

    optimizer = AdamW(AdamW.Config()).build(model.parameters(), lr=1e-3, weight_decay=0.1)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, 5, steps, min_lr_rate=0.1)
    generator = torch.Generator().manual_seed(2)
    model.train()
    losses = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        starts = torch.randint(0, data.size, (args.batch,), generator=generator).tolist()
        batch = data.collate(starts)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = steps * args.batch * args.seq_len
    return tokens / elapsed, tokens / cpu


def run_trainer(model: Any, data: Data, args: argparse.Namespace, steps: int) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.starts = torch.randint(
                0, data.size, (steps * args.batch,), generator=torch.Generator().manual_seed(2)
            ).tolist()

        def __len__(self) -> int:
            return len(self.starts)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = data.stream[self.starts[i] : self.starts[i] + data.seq_len]
            return {"input_ids": ids, "labels": ids}

    class Clock(TrainerCallback):
        wall = cpu = 0.0

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            Clock.wall, Clock.cpu = time.perf_counter(), time.process_time()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            Clock.wall = time.perf_counter() - Clock.wall
            Clock.cpu = time.process_time() - Clock.cpu

    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            max_steps=steps,
            learning_rate=1e-3,
            weight_decay=0.1,
            adam_beta2=0.95,
            warmup_steps=5,
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": 0.1},
            max_grad_norm=1.0,
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(
            model=model, args=training_args, train_dataset=Rows(), callbacks=[Clock()]
        )
        with contextlib.redirect_stdout(io.StringIO()):  # its end-of-training summary
            trainer.train()
    tokens = steps * args.batch * args.seq_len
    return tokens / Clock.wall, tokens / Clock.cpu


# name: (processes, the parallelism option)
PARALLEL = {
    "ddp": (2, {"name": "ddp"}),
    "fsdp": (2, {"name": "fsdp"}),
    "tp": (2, {"name": "tp"}),
    "pp": (2, {"name": "pp", "microbatches": 4}),
    "pp-1f1b": (2, {"name": "pp", "microbatches": 4, "schedule": "1f1b"}),
    "hybrid": (4, {"name": "hybrid", "dp": 2, "tp": 2}),
}


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def parallel_worker(args: argparse.Namespace) -> None:
    """One process of a strategy's run (under torchrun): train, then gather the figures."""
    import torch.distributed as dist

    from unbottle.core.config.schema import TrainParams
    from unbottle.core.registry import get_registry
    from unbottle.core.training.loop import Batches, train

    data = Data(args.vocab, args.seq_len, args.batch)
    model = build(args)
    settings = train_params(args, args.steps).model_dump()
    settings["parallelism"] = json.loads(args.worker)
    before = _rss()
    _, report = train(
        model,
        Batches(size=data.size, collate=data.collate, seed=2),
        TrainParams(**settings),
        registry=get_registry(),
        desc="bench",
    )
    plan = report.memory
    mine = {
        "estimate": plan.total,
        "parts": {
            k: getattr(plan, k)
            for k in ("weights", "gradients", "optimizer", "activations", "transient")
        },
        "peak_growth": report.peak_memory_bytes - before,
    }
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        with open(args.json, "w") as f:
            json.dump({"losses": report.losses, "ranks": every}, f)


def parallel_memory(args: argparse.Namespace) -> None:
    """Each strategy against one process: losses and per-process memory."""
    import subprocess
    import tempfile

    from unbottle.core.training.memory import human

    base = build(args)
    data = Data(args.vocab, args.seq_len, args.batch)
    single = run_unbottle_report(copy.deepcopy(base), data, args)
    rows = {"single": {"processes": 1, **single}}
    model_args = [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("hidden", "intermediate", "layers", "heads", "vocab", "seq_len", "batch", "steps")
    ]
    for name in args.parallel.split(","):
        processes, option = PARALLEL[name]
        with tempfile.TemporaryDirectory() as tmp:
            out = f"{tmp}/result.json"
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={processes}",
                __file__,
                *model_args,
                f"--worker={json.dumps(option)}",
                f"--json={out}",
            ]
            env = {**__import__("os").environ, "OMP_NUM_THREADS": str(args.threads or 1)}
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            with open(out) as f:
                rows[name] = {"processes": processes, **json.load(f)}
        print(f"{name}: done", file=sys.stderr, flush=True)

    reference = rows["single"]["losses"]
    print(
        f"\nmodel: {sum({id(p): p.numel() for p in base.parameters()}.values()):,} "
        f"parameters, batch {args.batch} x {args.seq_len}, {args.steps} steps, fp32"
    )
    print(
        "| strategy | processes | max loss diff vs 1 process | estimate per process "
        "(weights / grads / optimizer / activations / transient) | measured growth per "
        "process |"
    )
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        diff = max(abs(a - b) / abs(b) for a, b in zip(row["losses"], reference, strict=True))
        ranks = row["ranks"]
        worst = max(ranks, key=lambda r: r["estimate"])
        parts = " / ".join(human(v) for v in worst["parts"].values())
        growth = ", ".join(human(r["peak_growth"]) for r in ranks)
        print(
            f"| {name} | {row['processes']} | {diff:.1e} | {human(worst['estimate'])} "
            f"({parts}) | {growth} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"command": " ".join(sys.argv), "cpu": _cpu_name(), "rows": rows}, f, indent=2
            )


def run_unbottle_report(model: Any, data: Data, args: argparse.Namespace) -> dict:
    from unbottle.core.registry import get_registry
    from unbottle.core.training.loop import Batches, train

    before = _rss()
    _, report = train(
        model,
        Batches(size=data.size, collate=data.collate, seed=2),
        train_params(args, args.steps),
        registry=get_registry(),
        desc="bench",
    )
    plan = report.memory
    return {
        "losses": report.losses,
        "ranks": [
            {
                "estimate": plan.total,
                "parts": {
                    k: getattr(plan, k)
                    for k in ("weights", "gradients", "optimizer", "activations", "transient")
                },
                "peak_growth": report.peak_memory_bytes - before,
            }
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=344)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per timed run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also unbottle with torch.compile")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--without-trainer", action="store_true", help="only the bare loop and unbottle"
    )
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument(
        "--parallel", help="strategies to compare with one process, e.g. fsdp,tp,pp,hybrid"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one process of --parallel
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return parallel_worker(args)
    if args.parallel:
        torch.set_num_threads(args.threads or 1)
        return parallel_memory(args)

    import logging

    logging.getLogger("unbottle").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    base = build(args)
    data = Data(args.vocab, args.seq_len, args.batch)
    contestants = {
        "bare": lambda m, s: run_bare(m, data, args, s),
        "unbottle": lambda m, s: run_unbottle(m, data, args, s),
        "trainer": lambda m, s: run_trainer(m, data, args, s),
    }
    if args.without_trainer:
        del contestants["trainer"]
    compile_seconds = None
    if args.compile:
        start = time.perf_counter()
        run_unbottle(copy.deepcopy(base), data, args, 3, compile_=True)  # compiles
        compile_seconds = time.perf_counter() - start
        contestants["unbottle+compile"] = lambda m, s: run_unbottle(m, data, args, s, compile_=True)
    for run in contestants.values():  # warm up allocators and lazy imports
        run(copy.deepcopy(base), 3)

    wall: dict[str, list[float]] = {name: [] for name in contestants}
    cpu: dict[str, list[float]] = {name: [] for name in contestants}
    names = list(contestants)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            by_wall, by_cpu = contestants[name](copy.deepcopy(base), args.steps)
            wall[name].append(by_wall)
            cpu[name].append(by_cpu)
        summary = ", ".join(f"{n} {v[-1]:,.0f}" for n, v in wall.items())
        print(f"round {r + 1}/{args.rounds}: tokens/s {summary}", file=sys.stderr, flush=True)

    peak = matmul_peak()
    per_token = flops_per_token(base, args.seq_len)
    median = {name: statistics.median(values) for name, values in wall.items()}
    median_cpu = {name: statistics.median(values) for name, values in cpu.items()}
    results = {
        "command": " ".join(sys.argv),
        "machine": {
            "cpu": _cpu_name(),
            "capability": str(torch.backends.cpu.get_cpu_capability()),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "matmul_peak_gflops": peak / 1e9,
        },
        "model": {
            "parameters": sum({id(p): p.numel() for p in base.parameters()}.values()),
            "hidden": args.hidden,
            "layers": args.layers,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "flops_per_token": per_token,
        },
        "steps_per_run": args.steps,
        "rounds": args.rounds,
        "compile_seconds": compile_seconds,
        "tokens_per_s": median,
        "tokens_per_cpu_s": median_cpu,
        "all_rounds": {"wall": wall, "cpu": cpu},
        # Medians of the per-round ratios: each round's contestants ran back to back, so
        # pairing them cancels most of the drift in the machine's load.
        "ratio_to_bare": _paired(wall),
        "cpu_ratio_to_bare": _paired(cpu),
        "mfu": {name: value * per_token / peak for name, value in median.items()},
    }
    machine = results["machine"]
    print(f"{machine['cpu']}, {machine['threads']} thread(s), torch {machine['torch']}")
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s, {per_token / 1e6:.2f} MFLOP per token")
    print("| loop | tokens/s (median) | vs bare | tokens per CPU-s | vs bare (CPU) | MFU |")
    print("|---|---|---|---|---|---|")
    for name in contestants:
        print(
            f"| {name} | {median[name]:,.0f} | {results['ratio_to_bare'][name]:.3f} "
            f"| {median_cpu[name]:,.0f} | {results['cpu_ratio_to_bare'][name]:.3f} "
            f"| {results['mfu'][name]:.1%} |"
        )
    if compile_seconds is not None:
        print(f"torch.compile warm-up: {compile_seconds:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def _paired(rates: dict[str, list[float]]) -> dict[str, float]:
    return {
        name: statistics.median(v / b for v, b in zip(values, rates["bare"], strict=True))
        for name, values in rates.items()
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
