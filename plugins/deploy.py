"""Built-in deploy targets: ``hf``, ``onnx``, ``server`` (and ``gguf``, ``plugins/deploy_gguf.py``).

- ``hf``: a Hugging Face-format bundle: safetensors weights, config, tokenizer, a
  generation config and a README model card with the evaluation table;
  ``AutoModelForCausalLM.from_pretrained`` loads it and generates from it. A ``packed``
  variant is written as a standard compressed-tensors checkpoint, which transformers loads
  with the ``compressed-tensors`` package and vLLM serves.
- ``onnx``: an edge bundle: the model exported to ONNX with a KV cache by optimum and
  quantized to dynamic int8 by ONNX Runtime (the compress stage's code path), with the
  tokenizer and a model card; ``optimum.onnxruntime.ORTModelForCausalLM`` loads it. A
  ``packed`` variant (``rtn``, ``gptq``) becomes the int4/int8 edge bundle: its Linear
  layers are ONNX Runtime ``MatMulNBits`` nodes holding the variant's own codes, scales
  and zero points (``plugins/quantization/matmulnbits.py``).
- ``server``: the ``hf`` or ``onnx`` bundle of the variant plus ``serve.json``, what
  ``unbottle serve BUNDLE`` runs (an OpenAI-compatible server). A ``packed`` variant
  (low-bit weights from ``rtn`` or ``gptq``, see ``unbottle.compression``) ships as it
  is, served through unbottle's dequantizing loader (plain transformers refuses that
  directory; its card names no ``library_name``).

Every bundle gets a chat template (unbottle's question/answer one when the tokenizer has
none), and each target checks that its bundle loads and generates before it returns.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from pydantic import Field

from unbottle import ConfigError, DataError, DeployContext, StrategyConfig, hookimpl
from unbottle.export import COMPRESSED_TENSORS
from unbottle.plugins.quantization import ISA, export_onnx
from unbottle.serving import (
    CHAT_TEMPLATE,
    SERVE_CONFIG,
    ServeConfig,
    head_size_is_its_own,
    load_onnx_causal_lm,
)

_MODEL_FILES = (
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def model_card(
    ctx: DeployContext,
    max_new_tokens: int,
    usage: str | None = None,
    library: str | None = None,
) -> str:
    """The README of a bundle; ``usage`` replaces the transformers example.

    ``library``: the card's ``library_name``, only for a bundle that library loads as it
    is (``transformers`` for the ``hf`` bundles); none otherwise, so no card promises a
    load that would fail.
    """
    env = ctx.manifest.get("environment", {}).get("packages", {})
    versions = ", ".join(
        f"{name} {env.get(name, '?')}" for name in ("unbottle", "torch", "transformers")
    )
    library_line = f"library_name: {library}\n" if library else ""
    return f"""---
{library_line}pipeline_tag: text-generation
tags: [unbottle]
---

# unbottle model: `{ctx.variant}`

Built by the unbottle pipeline (pretrain, finetune, compress, evaluate, deploy).
Variant deployed: **{ctx.variant}** (format `{ctx.model_format}`).

## Evaluation

{ctx.report_markdown}

## Use

{usage or _transformers_usage(ctx, max_new_tokens)}

## Provenance

- Built with {versions}.
- The full manifest (config, strategies, input hashes) is in `manifest.json`.
"""


#: The usage examples' question when the evaluation asked none.
FALLBACK_QUESTION = "Where does Alice live?"


def usage_messages(ctx: DeployContext) -> list[dict[str, str]]:
    """A chat request for a question from the user's held-out set, with the system prompt
    the model was finetuned with, if any."""
    from unbottle.evaluation import PromptFormat

    question = ctx.example_question or FALLBACK_QUESTION
    fmt = ctx.prompt_format or PromptFormat()
    return fmt.conversation({"question": question, "answer": ""})[:-1]


def prompt_code(ctx: DeployContext) -> str:
    """Python that sets ``ids`` to that question's prompt, rendered as the model was
    finetuned: through its chat template, or in the completion form."""
    from unbottle.evaluation import PromptFormat

    fmt = ctx.prompt_format or PromptFormat()
    if fmt.kind == "chat":
        return (
            f"messages = {usage_messages(ctx)!r}\n"
            "ids = tokenizer.apply_chat_template(\n"
            '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True\n'
            ")"
        )
    pair = {"question": ctx.example_question or FALLBACK_QUESTION, "answer": ""}
    prompt = fmt.prompt_text(None, pair)
    return f'ids = tokenizer({prompt!r}, return_tensors="pt")'


def _transformers_usage(ctx: DeployContext, max_new_tokens: int) -> str:
    return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/bundle")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/bundle")
{prompt_code(ctx)}
print(tokenizer.decode(model.generate(**ids, max_new_tokens={max_new_tokens})[0]))
```"""


def save_tokenizer(model_dir: Path, out_dir: Path) -> None:
    """The variant's tokenizer, with a chat template for chat clients if it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)


def write_generation_config(model_dir: Path, out_dir: Path) -> None:
    """Greedy decoding with the model's special tokens: what the bundle's users get.

    No length: transformers prefers a ``max_new_tokens`` found here to the ``max_length``
    a caller passes (lm-eval's ``hf`` model does), so a default here would cut or stretch
    their generations. The card's example names its own."""
    from transformers import GenerationConfig

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    GenerationConfig(
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
        do_sample=False,
    ).save_pretrained(out_dir)


def _quantized_usage(ctx: DeployContext, max_new_tokens: int) -> str:
    return f"""A standard compressed-tensors (`pack-quantized`) checkpoint: the variant's own
integer codes, float16 scales, zero points and act-order `g_idx`. transformers loads it
with the compressed-tensors package; each layer decompresses its weights to float on its
first call:

```bash
pip install 'transformers>=4.57,<4.58' '{COMPRESSED_TENSORS}'
```

```python
import torch
from compressed_tensors.quantization.lifecycle.helpers import disable_quantization
from transformers import AutoModelForCausalLM, AutoTokenizer

# float32 on CPU (transformers picks float16 for compressed-tensors checkpoints otherwise)
model = AutoModelForCausalLM.from_pretrained("path/to/this/bundle", dtype=torch.float32)
# compressed-tensors quantizes each weight again at every call (for quantization-aware
# training); for inference, off: the same logits, several times the decode speed on a CPU.
model.apply(disable_quantization)
tokenizer = AutoTokenizer.from_pretrained("path/to/this/bundle")
{prompt_code(ctx)}
print(tokenizer.decode(model.generate(**ids, max_new_tokens={max_new_tokens})[0]))
```

On a GPU, vLLM serves it with its int4/int8 kernels: `vllm serve path/to/this/bundle`."""


class HuggingFaceBundle:
    """A directory that transformers loads: safetensors, config, tokenizer, model card.

    A float variant is copied; a packed one (``rtn``/``gptq``) is rewritten as a
    compressed-tensors checkpoint (``core/models/compressed_checkpoint.py``), which
    transformers loads with the ``compressed-tensors`` package and vLLM serves.
    """

    name = "hf"
    accepts = ("hf", "packed")
    #: A float variant is copied; a packed one becomes a new checkpoint, measured.
    ships_unchanged = ("hf",)

    class Config(StrategyConfig):
        max_new_tokens: int = Field(16, ge=1, le=4096)

    def __init__(self, config: Config) -> None:
        self.config = config

    def deploy(self, model_dir: Path, out_dir: Path, ctx: DeployContext) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quantized = ctx.model_format == "packed"
        facts: dict[str, Any] = {}
        if quantized:
            from unbottle.export import write_compressed_tensors

            facts = write_compressed_tensors(model_dir, out_dir)  # checks the library first
            if (model_dir / "generation_config.json").is_file():
                shutil.copy2(model_dir / "generation_config.json", out_dir)
        else:
            for name in _MODEL_FILES:
                if (model_dir / name).is_file():
                    shutil.copy2(model_dir / name, out_dir / name)
        save_tokenizer(model_dir, out_dir)
        write_generation_config(model_dir, out_dir)
        self.write_card(out_dir, ctx)

        # The bundle is only done if transformers can load it and generate from it.
        model = AutoModelForCausalLM.from_pretrained(
            out_dir, use_safetensors=True, dtype=torch.float32
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(out_dir)
        ids = tokenizer("Question:", return_tensors="pt")
        with torch.inference_mode():
            if quantized:
                facts["max_logit_difference"] = _logit_difference(model, model_dir, ids)
            out = model.generate(**ids, max_new_tokens=2)
        return {
            **facts,
            # The weights, not the whole bundle: the model card's timings vary run to run.
            "weights_bytes": (out_dir / "model.safetensors").stat().st_size,
            "smoke_generated_tokens": int(out.shape[1] - ids["input_ids"].shape[1]),
        }

    def write_card(self, out_dir: Path, ctx: DeployContext) -> None:
        """The README; transformers loads both kinds of bundle this target writes."""
        quantized = ctx.model_format == "packed"
        usage = _quantized_usage(ctx, self.config.max_new_tokens) if quantized else None
        (out_dir / "README.md").write_text(
            model_card(ctx, self.config.max_new_tokens, usage, library="transformers"),
            encoding="utf-8",
        )


def _logit_difference(model: Any, packed_dir: Path, ids: Any) -> float:
    """Largest |logit| difference between transformers' load and unbottle's own loader;
    above float tolerance the checkpoint is wrong and the stage fails."""
    from unbottle import DataError
    from unbottle.compression import load_packed

    reference, _ = load_packed(packed_dir)
    expected = reference(input_ids=ids["input_ids"]).logits
    difference = float((model(input_ids=ids["input_ids"]).logits - expected).abs().max())
    if difference > 1e-4 * max(1.0, float(expected.abs().max())):
        raise DataError(
            f"deploy: the compressed-tensors checkpoint's logits differ from the packed "
            f"variant's by {difference:.3g} (float tolerance 1e-4 of their scale)"
        )
    return difference


def _onnx_usage(ctx: DeployContext, file_name: str, max_new_tokens: int, head_dim: int) -> str:
    # optimum 2.1 takes a Llama head's size as hidden_size / heads (core/models/runtimes.py).
    own_head_size = (
        "# Heads were pruned: optimum would size the KV cache with hidden_size / heads.\n"
        f"model.embed_size_per_head = {head_dim}\n"
        if head_dim
        else ""
    )
    return f"""```python
import os

import onnxruntime as ort
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer

# Name the cores to decode on: ONNX Runtime's default is half the logical CPUs.
options = ort.SessionOptions()
options.intra_op_num_threads = os.cpu_count()
model = ORTModelForCausalLM.from_pretrained(
    "path/to/this/bundle", file_name="{file_name}", session_options=options
)
{own_head_size}tokenizer = AutoTokenizer.from_pretrained("path/to/this/bundle")
{prompt_code(ctx)}
print(tokenizer.decode(model.generate(**ids, max_new_tokens={max_new_tokens})[0]))
```

Or serve it: `unbottle serve path/to/this/bundle`."""


class OnnxBundle:
    """An edge bundle: an ONNX graph with a KV cache, dynamic int8 by default.

    A float (``hf``) variant is exported with optimum and quantized by ONNX Runtime through
    the same helper as the compress stage's ``onnx-dynamic-int8``; an ``onnx`` variant
    (already exported, e.g. the int8 one or a ``runtime: onnx`` GPTQ one) is shipped as it
    is and the options that shape an export do not apply. ``int8: false`` ships the float32
    graph, whose greedy tokens are those of the torch model. A ``packed`` variant is
    exported with ``MatMulNBits`` layers carrying its codes (``accuracy_level`` is their
    compute type); ``int8``, ``per_channel`` and ``isa`` do not apply to it.
    """

    name = "onnx"
    accepts = ("hf", "onnx", "packed", "genai")
    #: An exported variant (optimum's or onnxruntime-genai's) is copied; a float or packed
    #: one is exported or built anew, and measured.
    ships_unchanged = ("onnx", "genai")

    class Config(StrategyConfig):
        int8: bool = True
        per_channel: bool = True
        isa: ISA = "avx2"
        #: For packed variants: MatMulNBits' compute type, 0 (float32) to 4 (int8 activations).
        accuracy_level: int = Field(4, ge=0, le=4)
        max_new_tokens: int = Field(16, ge=1, le=4096)
        #: For packed variants: ``optimum`` (optimum's export, served by unbottle's engine)
        #: or ``genai`` (onnxruntime-genai's graph and generator, the faster decoder).
        runtime: Literal["optimum", "genai"] = "optimum"
        #: With ``runtime: genai``: the output head as int8 (round to nearest) or float,
        #: when the variant left it float (a ``quantize_head`` variant ships its own codes).
        head: Literal["int8", "float"] = "int8"

    def __init__(self, config: Config) -> None:
        self.config = config

    def deploy(self, model_dir: Path, out_dir: Path, ctx: DeployContext) -> dict[str, Any]:
        if self.config.runtime == "genai" or ctx.model_format == "genai":
            return self._deploy_genai(model_dir, out_dir, ctx)
        from transformers import AutoTokenizer

        from unbottle.serving import OnnxBackend

        if ctx.model_format == "packed":
            from unbottle.plugins.quantization.matmulnbits import export_matmulnbits

            facts: dict[str, Any] = export_matmulnbits(
                model_dir, out_dir, accuracy_level=self.config.accuracy_level
            )
        elif ctx.model_format == "hf":
            facts = export_onnx(
                model_dir,
                out_dir,
                int8=self.config.int8,
                per_channel=self.config.per_channel,
                isa=self.config.isa,
            )
        else:
            facts = {}
            for path in model_dir.iterdir():
                if path.suffix == ".onnx" or path.name in ("config.json", "ort_config.json"):
                    shutil.copy2(path, out_dir / path.name)
        save_tokenizer(model_dir, out_dir)
        write_generation_config(model_dir, out_dir)
        (model_file,) = out_dir.glob("*.onnx")
        self.write_card(out_dir, ctx)

        # The bundle is only done if optimum can load it and generate from it.
        model = load_onnx_causal_lm(out_dir, model_file.name)
        tokenizer = AutoTokenizer.from_pretrained(out_dir)
        ids = tokenizer("Question:", return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=2, min_new_tokens=2)
        return {
            **facts,
            "onnx_file": model_file.name,
            "onnx_bytes": model_file.stat().st_size,
            "int8": OnnxBackend(out_dir).couples_rows,
            "smoke_generated_tokens": int(out.shape[1] - ids["input_ids"].shape[1]),
        }

    def write_card(self, out_dir: Path, ctx: DeployContext) -> None:
        """The README, with optimum's or onnxruntime-genai's usage (no ``library_name``:
        transformers itself does not load an ONNX graph)."""
        if (out_dir / "genai_config.json").exists():
            from transformers import AutoTokenizer

            prompt = genai_prompt(AutoTokenizer.from_pretrained(out_dir), ctx)
            usage = _genai_usage(prompt, self.config.max_new_tokens)
        else:
            (model_file,) = out_dir.glob("*.onnx")
            config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
            own = head_size_is_its_own(SimpleNamespace(**config))
            head_dim = config["head_dim"] if own else 0
            usage = _onnx_usage(ctx, model_file.name, self.config.max_new_tokens, head_dim)
        (out_dir / "README.md").write_text(
            model_card(ctx, self.config.max_new_tokens, usage), encoding="utf-8"
        )

    def _deploy_genai(self, model_dir: Path, out_dir: Path, ctx: DeployContext) -> dict[str, Any]:
        """The packed variant's codes in onnxruntime-genai's graph (quantization/genai.py)."""
        from unbottle.plugins.quantization.genai import build_genai_bundle, require_genai

        if ctx.model_format not in ("packed", "genai"):
            raise ConfigError(
                f"deploy.target.runtime: genai takes a packed (rtn, gptq) variant; "
                f"this variant is {ctx.model_format}"
            )
        require_genai("deploy.target.runtime")
        if ctx.model_format == "genai":  # compressed with `runtime: genai`: shipped as it is
            facts: dict[str, Any] = {}
            for path in model_dir.iterdir():
                if path.is_file() and path.name != "manifest.json":
                    shutil.copy2(path, out_dir / path.name)
        else:
            facts = build_genai_bundle(
                model_dir,
                out_dir,
                head=self.config.head,
                accuracy_level=self.config.accuracy_level,
            )
        save_tokenizer(model_dir, out_dir)
        write_generation_config(model_dir, out_dir)
        self.write_card(out_dir, ctx)
        # The bundle is only done if onnxruntime-genai loads it, tokenizes the card's prompt
        # as transformers does, and generates from it.
        import numpy as np
        import onnxruntime_genai as og
        from transformers import AutoTokenizer

        model = og.Model(og.Config(str(out_dir)))
        tokenizer = AutoTokenizer.from_pretrained(out_dir)
        prompt = genai_prompt(tokenizer, ctx)
        ids = [int(i) for i in og.Tokenizer(model).encode(prompt)]
        # Whether a BOS token leads is each reader's own setting (a post-processor in
        # tokenizer.json, add_bos_token in its config): compared are the prompt's tokens.
        got, expected = (
            _without_bos(x, tokenizer.bos_token_id) for x in (ids, tokenizer(prompt)["input_ids"])
        )
        if got != expected:
            pairs = enumerate(zip(got, expected, strict=False))
            at = next((i for i, (a, b) in pairs if a != b), min(len(got), len(expected)))
            raise DataError(
                f"deploy: onnxruntime-genai's tokenizer reads the card's prompt as "
                f"{got[at : at + 4]} from token {at}, where transformers reads "
                f"{expected[at : at + 4]}: it does not read this bundle's tokenizer.json "
                "as transformers does"
            )
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 2, min_length=len(ids) + 2)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([ids], dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        generated = len(generator.get_sequence(0)) - len(ids)
        return {**facts, "smoke_generated_tokens": generated}


def _without_bos(ids: list[int], bos: int | None) -> list[int]:
    return ids[1:] if ids and bos is not None and ids[0] == bos else ids


def genai_prompt(tokenizer: Any, ctx: DeployContext) -> str:
    """The example question's prompt as text, rendered as the model was finetuned (through
    the bundle tokenizer's chat template, or in the completion form): what the genai
    card's code encodes with onnxruntime-genai's tokenizer, and what the deploy check
    encodes with both."""
    from unbottle.evaluation import PromptFormat

    fmt = ctx.prompt_format or PromptFormat()
    pair = {"question": ctx.example_question or FALLBACK_QUESTION, "answer": ""}
    return fmt.prompt_text(tokenizer, pair)


def _genai_usage(prompt: str, max_new_tokens: int) -> str:
    return (
        """```python
import json
import os

import onnxruntime_genai as og  # pip install 'onnxruntime-genai==0.11.4'

config = og.Config("path/to/this/bundle")
# Name the cores to decode on: left to the default, a 2-core machine without SMT
# decoded at one thread's speed (0.73x to 0.82x the tokens/s of two).
threads = {"intra_op_num_threads": os.cpu_count()}
config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
model = og.Model(config)
tokenizer = og.Tokenizer(model)
"""
        f"prompt = {prompt!r}  # rendered as the model was finetuned\n"
        """ids = tokenizer.encode(prompt)
params = og.GeneratorParams(model)
"""
        f"params.set_search_options(max_length=len(ids) + {max_new_tokens})\n"
        """generator = og.Generator(model, params)
generator.append_tokens(ids)
while not generator.is_done():
    generator.generate_next_token()
print(tokenizer.decode(generator.get_sequence(0)))
```"""
    )


def _serve_usage(ctx: DeployContext, config: ServeConfig) -> str:
    return f"""Serve it with an OpenAI-compatible API (continuous batching, streaming, metrics):

```bash
unbottle serve path/to/this/bundle            # http://{config.host}:{config.port}/v1
```

```python
from openai import OpenAI

client = OpenAI(base_url="http://{config.host}:{config.port}/v1", api_key="KEY or anything")
reply = client.chat.completions.create(
    model="{config.model_name}",
    messages={json.dumps(usage_messages(ctx))},
)
print(reply.choices[0].message.content)
```

`serve.json` holds the server's settings (batch size, queue bound, limits); flags of
`unbottle serve` override them. For answers that quote their prompt (edits, extraction,
code), `--speculative-config '{{"method": "ngram"}}'` checks tokens drafted from the
prompt in the same step as the next one: plain decoding's tokens (up to float rounding),
1.04x to 1.9x as fast on SmolLM2."""


def packed_bundle(model_dir: Path, out_dir: Path) -> dict[str, Any]:
    """A packed variant's files, tokenizer and generation config, as they are."""
    from unbottle.compression import QUANT_CONFIG

    for name in (*_MODEL_FILES, QUANT_CONFIG):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    save_tokenizer(model_dir, out_dir)
    write_generation_config(model_dir, out_dir)
    return {"weights_bytes": (out_dir / "model.safetensors").stat().st_size}


class ServerBundle:
    """What ``unbottle serve`` runs: the variant's ``hf``, ``onnx``, ``packed`` or ``genai``
    model plus serve.json.

    The options are the server's (:class:`unbottle.serving.ServeConfig`): they are
    validated here, at deploy time, and written to ``serve.json``.
    """

    name = "server"
    accepts = ("hf", "onnx", "packed", "genai")
    #: Each variant is served as it is (an ``hf`` one copied, not exported).
    ships_unchanged = ("hf", "onnx", "packed", "genai")
    Config = ServeConfig

    def __init__(self, config: ServeConfig) -> None:
        self.config = config

    def deploy(self, model_dir: Path, out_dir: Path, ctx: DeployContext) -> dict[str, Any]:
        from unbottle.serving import SamplingParams, load_bundle

        config = self.config.model_copy(
            update={"model_name": self.config.model_name or f"unbottle-{ctx.variant}"}
        )
        if ctx.model_format == "packed":
            facts = packed_bundle(model_dir, out_dir)
        else:
            # An onnx or genai variant is copied as it is by the onnx target.
            inner = HuggingFaceBundle if ctx.model_format == "hf" else OnnxBundle
            facts = inner(inner.Config(max_new_tokens=config.default_max_tokens)).deploy(
                model_dir, out_dir, ctx
            )
        (out_dir / SERVE_CONFIG).write_text(
            config.model_dump_json(indent=2) + "\n", encoding="utf-8"
        )
        # Only the float variant's bundle is one plain transformers loads.
        library = "transformers" if ctx.model_format == "hf" else None
        (out_dir / "README.md").write_text(
            model_card(ctx, config.default_max_tokens, _serve_usage(ctx, config), library),
            encoding="utf-8",
        )

        # The bundle is only done if the serving engine can load it and generate from it.
        bundle = load_bundle(out_dir)
        engine = bundle.engine()
        engine.start()
        try:
            prompt = bundle.tokenizer("Question:", add_special_tokens=False)["input_ids"]
            seq = engine.generate(prompt, SamplingParams(max_tokens=2, ignore_eos=True))
        finally:
            engine.stop()
        return {
            **facts,
            "model_name": bundle.model_name,
            "backend": bundle.format,
            "serve_smoke_generated_tokens": len(seq.generated),
        }


@hookimpl
def register_deploy_targets(register):
    register(HuggingFaceBundle)
    register(OnnxBundle)
    register(ServerBundle)
    # In a module of its own (its writer is core/models/gguf_writer.py).
    from unbottle.plugins.deploy_gguf import GgufBundle

    register(GgufBundle)
