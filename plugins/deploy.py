"""Built-in deploy target: ``hf``, a Hugging Face-format bundle.

The bundle holds safetensors weights, config, tokenizer, a generation config and a
README model card with the evaluation table; ``AutoModelForCausalLM.from_pretrained``
loads it and generates from it, which the target checks before it returns.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pydantic import Field

from unbottle import DeployContext, StrategyConfig, hookimpl

_MODEL_FILES = (
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def model_card(ctx: DeployContext, max_new_tokens: int) -> str:
    env = ctx.manifest.get("environment", {}).get("packages", {})
    versions = ", ".join(
        f"{name} {env.get(name, '?')}" for name in ("unbottle", "torch", "transformers")
    )
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [unbottle]
---

# unbottle model: `{ctx.variant}`

Built by the unbottle pipeline (pretrain, finetune, compress, evaluate, deploy).
Variant deployed: **{ctx.variant}** (format `{ctx.model_format}`).

## Evaluation

{ctx.report_markdown}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/bundle")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/bundle")
prompt = "Question: Where does Alice live?\\nAnswer:"
ids = tokenizer(prompt, return_tensors="pt")
print(tokenizer.decode(model.generate(**ids, max_new_tokens={max_new_tokens})[0]))
```

## Provenance

- Built with {versions}.
- The full manifest (config, strategies, input hashes) is in `manifest.json`.
"""


class HuggingFaceBundle:
    """A directory that transformers loads: safetensors, config, tokenizer, model card."""

    name = "hf"
    accepts = ("hf",)

    class Config(StrategyConfig):
        max_new_tokens: int = Field(16, ge=1, le=4096)

    def __init__(self, config: Config) -> None:
        self.config = config

    def deploy(self, model_dir: Path, out_dir: Path, ctx: DeployContext) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        for name in _MODEL_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, out_dir / name)
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        GenerationConfig(
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
            pad_token_id=config.get("pad_token_id"),
            max_new_tokens=self.config.max_new_tokens,
            do_sample=False,
        ).save_pretrained(out_dir)
        (out_dir / "README.md").write_text(
            model_card(ctx, self.config.max_new_tokens), encoding="utf-8"
        )

        # The bundle is only done if transformers can load it and generate from it.
        model = AutoModelForCausalLM.from_pretrained(out_dir, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(out_dir)
        ids = tokenizer("Question:", return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=2)
        return {
            "bundle_bytes": sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file()),
            "smoke_generated_tokens": int(out.shape[1] - ids["input_ids"].shape[1]),
        }


@hookimpl
def register_deploy_targets(register):
    register(HuggingFaceBundle)
