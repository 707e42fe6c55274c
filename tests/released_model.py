"""A tiny model in a released model's format: a Llama with grouped-query attention, a
byte-level BPE tokenizer with ChatML special tokens and SmolLM2's kind of chat template,
and, like many released tokenizers, no padding token. Tests start the pipeline from it as
a user starts from SmolLM2 (``pretrain.source``)."""

from __future__ import annotations

from pathlib import Path

BOS, EOS, UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

#: ChatML, as SmolLM2-Instruct's template renders it (a default system turn when none given).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_released_model(train_text: Path):
    """(model, tokenizer), the tokenizer trained on ``train_text``; seeded, so the same
    every time."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from unbottle.core.models.loading import documents

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    text = train_text.read_text(encoding="utf-8")
    backend.train_from_iterator(
        documents(text),
        trainer=trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=[UNK, BOS, EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in SmolLM2
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


def save_released_model(model, tokenizer, out: Path) -> Path:
    """Write the model as a Hugging Face directory, as a release ships it."""
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
