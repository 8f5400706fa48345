"""A byte-level BPE tokenizer trained on the world's corpora and a tiny dense causal LM.

Both are saved as ordinary Hugging Face directories, so every later stage loads them exactly as
it would load Llama or Qwen2 from a hub: ``AutoTokenizer`` / ``AutoModelForCausalLM``, offline.
The model can be of any dense type a family upcycles
(:data:`components.moe.families.DENSE_TYPES`), built through transformers' Auto classes, so a new
family needs no code here.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from pathlib import Path

import jinja2
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

from components.moe.checkpoint import follow_umask
from components.moe.families import DENSE_TYPES

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS, IM_START, IM_END)

# ChatML, the template Qwen2 instruct models use: one familiar shape for every later stage. The
# assistant's words follow a space, as Llama 2's and Mistral's answers follow "[/INST] ": with a
# byte-level BPE, a word copied from the prompt (" Ashford", one token) is then the token the model
# read there, not a line-initial spelling ("A", "shfor", "d") it has hardly seen in any language.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (' ' if message['role'] == 'assistant' else '')"
    " + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@cache
def _template() -> jinja2.Template:
    return jinja2.Environment(autoescape=False).from_string(CHAT_TEMPLATE)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Render messages exactly as the saved tokenizer's ``apply_chat_template`` would, without
    needing the tokenizer (the instruction files are written before it is trained)."""
    return _template().render(messages=messages, add_generation_prompt=add_generation_prompt)


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int,
                    min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (no unknown bytes, any script) and save it with the chat template.

    A merge needs ``min_frequency`` occurrences: a high one keeps tokens that are rare in the
    training text (a low-resource language's) out of the vocabulary, so text that is common
    elsewhere (its CPT corpus) is not written in ids the base hardly saw.

    The trainer sees texts in the given order and breaks ties deterministically, so the same
    texts give the same ``tokenizer.json`` byte for byte.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END], model_max_length=512,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(out_dir)
    return wrapped


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, out_dir: Path, *, arch: str = "llama",
                     seed: int = 0, hidden_size: int = 192, num_layers: int = 4,
                     intermediate_size: int = 512) -> int:
    """Build a randomly initialised tiny dense model of type ``arch`` (one of
    :data:`~components.moe.families.DENSE_TYPES`, a few million parameters) and save it with the
    tokenizer; returns the parameter count. The same seed gives the same bytes."""
    if arch not in DENSE_TYPES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {DENSE_TYPES}")
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    heads = 4
    dims = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=eos_id,
        eos_token_id=eos_id, pad_token_id=eos_id, rms_norm_eps=1e-6,
    )
    if "head_dim" in AutoConfig.for_model(arch).to_dict():
        # a family that declares head_dim gets the usual hidden/heads (Qwen3's default, 128,
        # would dwarf a tiny model); one that does not keeps its config.json without the field
        dims["head_dim"] = hidden_size // heads
    config = AutoConfig.for_model(arch, **dims)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=eos_id, eos_token_id=[eos_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=eos_id, do_sample=False, max_new_tokens=32,
    )
    model.save_pretrained(out_dir)
    for shard in Path(out_dir).glob("*.safetensors"):  # safetensors writes 0600: follow the umask
        follow_umask(shard)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())
