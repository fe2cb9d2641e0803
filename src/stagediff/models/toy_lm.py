"""The toy world's "base LLM": a word-level tokenizer and a tiny HF Llama trained on text only.

It stands in for Llama-3.1-8B: same model class (``LlamaForCausalLM``), grouped-query attention
(fewer key/value heads than query heads) and a chat template starting with the BOS token.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from stagediff.io import atomic_dir
from stagediff.models.train import train_loop
from stagediff.seed import seed_everything

log = logging.getLogger(__name__)

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
# Llama-3.1-style: the template itself writes BOS, so prompts are tokenized without special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    base = ["user", "assistant", ":", "true", "false", "or", "statement", "this"]
    tok.train_from_iterator(texts + base, trainers.WordLevelTrainer(special_tokens=SPECIAL, min_frequency=1))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   extra_special_tokens={"image_token": "<image>"})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_lm(cfg: dict, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg["d_model"], intermediate_size=cfg["d_mlp"],
        num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
        num_key_value_heads=cfg["n_kv_heads"], max_position_embeddings=cfg["max_positions"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def corpus_lines(corpus: str | Path, n: int | None = None, rest: bool = False) -> list[str]:
    """The text-only corpus's non-empty lines: all of them, the first ``n`` (``toy.drift_lines``,
    ``toy.base_sae.max_lines``), or with ``rest`` all after the first ``n`` (the toy VLM's
    text-only training lines, kept apart from the drift table's)."""
    lines = [x for x in Path(corpus).read_text().splitlines() if x.strip()]
    return lines[n:] if rest else lines[:n]


def encode_lines(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """Token ids of each line, BOS + line + EOS: the base LM's training text."""
    return [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"]
            + [tokenizer.eos_token_id] for t in texts]


def lm_batch(enc: list[list[int]], idx: list[int], pad_id: int) -> dict:
    """Lines ``idx`` of ``enc`` right-padded, next-token labels on every real token."""
    ids = torch.full((len(idx), max(len(enc[i]) for i in idx)), pad_id)
    for r, i in enumerate(idx):
        ids[r, : len(enc[i])] = torch.tensor(enc[i])
    mask = ids != pad_id
    return {"input_ids": ids, "attention_mask": mask.long(), "labels": ids.masked_fill(~mask, -100)}


def pretrain_lm(tokenizer: PreTrainedTokenizerFast, texts: list[str], cfg: dict, seed: int) -> LlamaForCausalLM:
    """A new LM of ``cfg``'s shape trained on ``texts`` (next-token loss on every token)."""
    seed_everything(seed)
    model = build_lm(cfg, tokenizer)
    enc = encode_lines(tokenizer, texts)
    gen = torch.Generator().manual_seed(seed)

    def batch(step: int) -> dict:
        return lm_batch(enc, torch.randint(len(enc), (cfg["batch_size"],), generator=gen).tolist(),
                        tokenizer.pad_token_id)

    train_loop(model, batch, steps=cfg["steps"], lr=cfg["lr"], name="base_lm")
    return model


def train_base_lm(corpus: str | Path, out: str | Path, cfg: dict, seed: int) -> None:
    """Build the tokenizer on the corpus and train the LM on it (next-token loss, text only)."""
    texts = corpus_lines(corpus)
    tokenizer = build_tokenizer(texts)
    model = pretrain_lm(tokenizer, texts, cfg, seed)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
