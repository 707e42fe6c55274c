"""The ``gguf`` deploy target: one GGUF file for llama.cpp, Ollama and other ggml runtimes.

The file (``core/models/gguf_writer.py``) carries the weights, the tokenizer and the chat
template. ``type``:

- ``F16`` or ``Q8_0`` for a float variant (Q8_0 rounded to nearest by the ``gguf`` package);
- ``Q4_0`` from a packed variant on a symmetric int4 grid in groups of 32 (``rtn`` or
  ``gptq`` with ``bits: 4, group_size: 32, symmetric: true``; for gptq with act_order also
  ``static_groups: true``), ``Q4_1`` from one on an int4 grid with zero points in groups
  of 32 (GPTQ's and RTN's default, asymmetric), and ``Q8_0`` from one on a symmetric int8
  grid in groups of 32: the codes and scales are copied as they are, so GPTQ's choices
  survive;
- ``Q4_K_M``, ``Q5_K_M``, ``Q6_K`` for a float variant: llama.cpp's own quantization (its
  k-quants, as ``llama-quantize`` makes them) of the writer's F16 file; they need
  llama-cpp-python, and a packed variant is refused (it would be rounded twice);
- ``auto`` (the default): Q8_0 for a float variant, the exact type for a packed one (Q4_0
  for a symmetric int4 grid, Q4_1 for one with zero points).

``runtime`` is what loads the file back and what the deploy stage measures it in:
``transformers`` (the default: its GGUF reader dequantizes to float32 and torch runs it)
or ``llama.cpp`` (llama.cpp's own tokenizer, kernels and decoding loop, through
llama-cpp-python: :mod:`unbottle.core.models.llama_cpp`; ``pip install
'unbottle[llama-cpp]'``).

A variant the type cannot hold (Q4_0 from an asymmetric, group-64 or float variant), an
architecture the writer does not know, or a missing ``gguf`` package stops the stage with
one line before anything is written. The bundle is done only when the runtime loads the
file back and generates from it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from unbottle import ConfigError, DeployContext, StrategyConfig
from unbottle.evaluation import TorchRunner
from unbottle.export import (
    LLAMA_CPP_INSTALL,
    LlamaCppRunner,
    require_llama_cpp,
    write_quantized_gguf,
)
from unbottle.plugins.deploy import (
    FALLBACK_QUESTION,
    model_card,
    prompt_code,
    save_tokenizer,
    usage_messages,
    write_generation_config,
)


def _gguf_usage(ctx: DeployContext, file_name: str, max_new_tokens: int) -> str:
    return f"""With llama.cpp:

```bash
llama-cli -m {file_name} -cnv                    # chat, with the file's chat template
llama-server -m {file_name} --port 8080         # an OpenAI-compatible server
unbottle serve path/to/this/bundle --port 8080  # unbottle's, llama.cpp inside (llama-cpp-python)
```

With Ollama: a `Modelfile` holding `FROM ./{file_name}`, then
`ollama create my-model -f Modelfile && ollama run my-model`.

With transformers (it dequantizes to float; needs the `gguf` package):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/bundle", gguf_file="{file_name}")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/bundle", gguf_file="{file_name}")
{prompt_code(ctx)}
print(tokenizer.decode(model.generate(**ids, max_new_tokens={max_new_tokens})[0]))
```

{_llama_cpp_python_usage(ctx, file_name, max_new_tokens)}"""


def _llama_cpp_python_usage(ctx: DeployContext, file_name: str, max_new_tokens: int) -> str:
    """llama.cpp from Python, asking the card's question as the model was finetuned: a
    chat through the file's own template, or the completion prompt."""
    from unbottle.evaluation import PromptFormat

    fmt = ctx.prompt_format or PromptFormat()
    if fmt.kind == "chat":
        call = (
            f"out = llm.create_chat_completion(\n    messages={usage_messages(ctx)!r},\n"
            f"    max_tokens={max_new_tokens},\n    temperature=0,\n)\n"
            'print(out["choices"][0]["message"]["content"])'
        )
    else:
        pair = {"question": ctx.example_question or FALLBACK_QUESTION, "answer": ""}
        prompt = fmt.prompt_text(None, pair)
        call = (
            f"out = llm({prompt!r}, max_tokens={max_new_tokens}, temperature=0)\n"
            'print(out["choices"][0]["text"])'
        )
    return f"""With llama-cpp-python (`pip install llama-cpp-python`, which builds llama.cpp; on a
CPU with AMX, build it without AMX: llama.cpp issue 20824):

```python
from llama_cpp import Llama

llm = Llama(model_path="path/to/this/bundle/{file_name}", n_ctx=2048, verbose=False)
{call}
```"""


#: The types llama.cpp quantizes (``write_quantized_gguf``) from the writer's F16 file; the others
#: the writer writes itself.
K_QUANTS = ("Q4_K_M", "Q5_K_M", "Q6_K")


class GgufBundle:
    """A GGUF file with tokenizer and chat template, plus a model card."""

    name = "gguf"
    accepts = ("hf", "packed")
    #: None: every GGUF file is a new encoding of the variant, measured by the stage.
    ships_unchanged = ()

    class Config(StrategyConfig):
        # F16, Q8_0, Q4_0, Q4_1: written here; Q4_K_M, Q5_K_M, Q6_K: llama.cpp's own.
        type: Literal["auto", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M", "Q5_K_M", "Q6_K"] = "auto"
        max_new_tokens: int = Field(16, ge=1, le=4096)
        # What loads the file back and what the deploy stage measures it in.
        runtime: Literal["transformers", "llama.cpp"] = "transformers"

        @field_validator("runtime", "type")
        @classmethod
        def _installed(cls, value: str) -> str:
            # Known from params alone: refused when params are checked, before any stage.
            needs_it = value in ("llama.cpp", *K_QUANTS)
            if needs_it and importlib.util.find_spec("llama_cpp") is None:
                raise ValueError(f"{value} needs llama-cpp-python; {LLAMA_CPP_INSTALL}")
            return value

    def __init__(self, config: Config) -> None:
        self.config = config

    def gguf_type(self, model_dir: Path, model_format: str) -> str:
        """The type to write: as configured, or for ``auto`` the one that holds the
        variant as it is."""
        if self.config.type != "auto":
            return self.config.type
        if model_format != "packed":
            return "Q8_0"
        from unbottle.compression import read_quantization_config
        from unbottle.export import exact_gguf_type

        meta = read_quantization_config(model_dir)
        # None of them holds it: the nearest, which check_writable refuses with the reason.
        return exact_gguf_type(meta) or ("Q4_0" if meta["bits"] == 4 else "Q8_0")

    def deploy(self, model_dir: Path, out_dir: Path, ctx: DeployContext) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from unbottle.export import check_writable, write_gguf

        if self.config.runtime == "llama.cpp":
            require_llama_cpp("deploy.target.runtime")
        gguf_type = self.gguf_type(model_dir, ctx.model_format)
        by_llama_cpp = gguf_type in K_QUANTS
        if by_llama_cpp and ctx.model_format == "packed":
            raise ConfigError(
                f"deploy.target.type: {gguf_type} is llama.cpp's own quantization of a float "
                f"model, and {ctx.variant!r} is quantized already; deploy a float variant "
                "with it, or this one's own codes with type auto (Q4_0, Q4_1 or Q8_0 where its "
                "grid is theirs)"
            )
        # One line, before any work; llama.cpp quantizes the writer's F16 file.
        check_writable(model_dir, "F16" if by_llama_cpp else gguf_type, "deploy.target")
        save_tokenizer(model_dir, out_dir)  # the tokenizer the file embeds, chat template too
        file_name = f"model-{gguf_type}.gguf"
        if by_llama_cpp:
            facts = write_quantized_gguf(model_dir, out_dir, out_dir / file_name, gguf_type)
        else:
            facts = write_gguf(model_dir, out_dir, out_dir / file_name, gguf_type)
        write_generation_config(model_dir, out_dir)
        self.write_card(out_dir, ctx)

        # The bundle is only done if its runtime loads the file and generates from it.
        if self.config.runtime == "llama.cpp":
            runner = LlamaCppRunner(out_dir)
            ids = runner.tokenizer("Question:", return_tensors="pt", add_special_tokens=False)
            out = runner.generate(ids["input_ids"], ids["attention_mask"], 2, min_new_tokens=2)
            runner.close()
        else:
            model = AutoModelForCausalLM.from_pretrained(
                out_dir, gguf_file=file_name, dtype=torch.float32
            ).eval()
            tokenizer = AutoTokenizer.from_pretrained(out_dir, gguf_file=file_name)
            # (transformers' GGUF tokenizer adds token type ids, which a causal LM rejects)
            ids = tokenizer("Question:", return_tensors="pt", return_token_type_ids=False)
            with torch.inference_mode():
                out = model.generate(**ids, max_new_tokens=2, min_new_tokens=2)
        return {
            **facts,
            "gguf_file": file_name,
            "gguf_runtime": self.config.runtime,
            "smoke_generated_tokens": int(out.shape[1] - ids["input_ids"].shape[1]),
        }

    def write_card(self, out_dir: Path, ctx: DeployContext) -> None:
        """The README, with llama.cpp's, Ollama's and transformers' usage (no
        ``library_name``: plain transformers loads the file only with ``gguf_file=``)."""
        (file,) = out_dir.glob("*.gguf")
        usage = _gguf_usage(ctx, file.name, self.config.max_new_tokens)
        (out_dir / "README.md").write_text(
            model_card(ctx, self.config.max_new_tokens, usage), encoding="utf-8"
        )

    def runner(self, bundle_dir: Path, device: str) -> Any:
        """The file in its runtime, for the deploy stage's measurement: llama.cpp, or the
        weights as transformers' ``gguf_file=`` loader dequantizes them."""
        if self.config.runtime == "llama.cpp":
            return LlamaCppRunner(bundle_dir)
        return GgufRunner(bundle_dir, device)


class GgufRunner(TorchRunner):
    """A GGUF file's model in torch: its Q8_0/Q4_0/F16 weights dequantized to float32,
    so the measured numbers are the file's, not the variant's it was written from.
    llama.cpp's own kernels are not run (the speed figures are torch's)."""

    runtime = (
        "transformers (its GGUF reader dequantizes the file to float32 and torch runs it: "
        "the quality figures are the file's, the speed figures torch's, not llama.cpp's)"
    )

    def __init__(self, bundle_dir: Path, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        (file,) = Path(bundle_dir).glob("*.gguf")
        self.format = "gguf"
        self.model = AutoModelForCausalLM.from_pretrained(
            bundle_dir, gguf_file=file.name, dtype=torch.float32
        )
        self.model.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(bundle_dir)  # the one the file embeds
        self.device = device
        self.context = int(self.model.config.max_position_embeddings)
