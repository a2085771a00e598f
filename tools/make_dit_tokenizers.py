"""Build the small tokenizers of the tiny diffusion-transformer pipelines (docs/design.md §8).

No T5 or Qwen tokenizer ships offline, so the tiny SD3/Flux/Z-Image folders of
``engine/builtin_dit.py`` get tokenizers of the right classes trained with the ``tokenizers`` library
on the toy world's captions (the words every test and demo prompt uses):

* ``engine/assets/t5_tokenizer``: a Unigram model of the captions' words as a ``T5Tokenizer`` (SD3's and
  Flux's T5 side);
* ``engine/assets/qwen_tokenizer``: a byte-level BPE model as a ``Qwen2Tokenizer`` with a Qwen3-style
  chat template (Z-Image's text side).

Both run at ``model_max_length`` :data:`MAX_LENGTH` so the tiny pipelines stay small. To rebuild the
committed files:

    python tools/make_dit_tokenizers.py engine/assets
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer, T5Tokenizer

from cat_engine.cat import toyworld
from cat_engine.cat.eval import DEFAULT_TEMPLATES

MAX_LENGTH = 32  # text tokens of the tiny pipelines' T5/LLM side
QWEN_VOCAB = 400
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# Qwen3's template as ZImagePipeline uses it (one user message, generation prompt, thinking on).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Captions of the toy world, its concepts' captions and the eval prompts with token and class."""
    rng = random.Random(seed)
    texts = [toyworld.caption(toyworld.sample_scene(rng), rng) for _ in range(n)]
    for name in toyworld.CONCEPTS:
        texts += [text for _, text in toyworld.concept_scenes(name)]
    for cls in toyworld.CLASSES:
        texts += [t.replace("{}", f"sks {cls}") for t in DEFAULT_TEMPLATES] + [toyworld.class_prompt(cls)]
    return texts


def t5_tokenizer(texts: list[str]) -> T5Tokenizer:
    """A Unigram model whose pieces are the corpus's words (score: log frequency), with single
    characters as the fallback for any other word. (The ``tokenizers`` Unigram trainer reduces a
    corpus this repetitive to characters, so the pieces are counted directly.)"""
    words = Counter(w for t in texts for w in t.split())
    total = sum(words.values())
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -8.0)]  # T5's ids 0, 1, 2
    pieces += [
        ("▁" + w, math.log(n / total)) for w, n in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    chars = sorted({c for w in words for c in w})
    pieces += [(c, -12.0) for c in chars if ("▁" + c, -12.0) not in pieces]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_LENGTH)


def qwen_tokenizer(texts: list[str]) -> Qwen2Tokenizer:
    specials = [END_OF_TEXT, IM_START, IM_END]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    chats = [f"{IM_START}user\n{t}{IM_END}\n{IM_START}assistant\n" for t in texts]
    tok.train_from_iterator(
        texts + chats,
        trainers.BpeTrainer(
            vocab_size=QWEN_VOCAB,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    qwen = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, model_max_length=MAX_LENGTH)
    qwen.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    qwen.chat_template = CHAT_TEMPLATE
    return qwen


def main(out: str) -> None:
    texts = corpus()
    root = Path(out)
    t5_tokenizer(texts).save_pretrained(root / "t5_tokenizer")
    qwen_tokenizer(texts).save_pretrained(root / "qwen_tokenizer")
    print(f"wrote {root / 't5_tokenizer'} and {root / 'qwen_tokenizer'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "engine/assets")
