"""Generate the tiny CLIP-style BPE tokenizer shipped in ``dora_network/data``.

The output is a byte-level BPE vocabulary in the exact layout of OpenAI CLIP's
tokenizer (256 byte symbols, the same symbols with ``</w>``, learned merges,
then ``<|startoftext|>`` / ``<|endoftext|>``), trained on a small built-in word
list so that simple English captions ("a red circle on a blue background")
encode to one token per word. Any other text still tokenizes through the
byte-level fallback.

Deterministic: re-running produces byte-identical ``vocab.json`` / ``merges.txt``.

Usage::

    python scripts/make_tiny_tokenizer.py [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "dora_network" / "data" / "tiny_clip_tokenizer"

# Caption vocabulary; the weight of a word only affects merge order.
WORDS = """
a an the and or of on in at to with without by for from over under above below
behind between near next top bottom left right center middle corner side front
back inside outside is are it this that its there one two three four five six
seven eight nine ten many some few several single pair group small large big
tiny huge little tall short long wide thin thick round square flat bright dark
light pale deep vivid soft hard smooth rough shiny matte glossy solid striped
dotted checkered plain simple detailed abstract pattern gradient texture
red green blue yellow orange purple violet pink brown black white gray grey
cyan magenta teal gold silver beige navy maroon turquoise
circle circles square squares triangle triangles rectangle rectangles star stars
heart hearts line lines dot dots ring rings cross shape shapes oval hexagon
diamond sphere cube cone cylinder pyramid arrow spiral wave waves grid border
background foreground scene image picture photo photograph painting drawing
sketch illustration render rendering art artwork style digital pixel icon logo
cat cats dog dogs bird birds fish horse cow tree trees flower flowers grass
sky sun moon cloud clouds mountain mountains river lake sea ocean beach forest
field road street city house building car boat ship train plane table chair
cup bottle apple ball box book lamp window door wall floor water fire snow rain
man woman person people girl boy child face hand eyes hair portrait
standing sitting lying flying walking running floating centered placed
drawn painted filled outlined colored colorful monochrome
high quality best masterpiece lowres blurry sharp
sks ohwx token concept
""".split()

HEAVY = {"a", "the", "on", "of", "in", "and", "with", "background", "circle", "square", "red", "blue", "green"}


def bytes_to_unicode() -> dict[int, str]:
    """Return CLIP/GPT-2's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Learn BPE merges until every word is a single symbol (ties broken lexicographically)."""
    freq: collections.Counter[tuple[str, ...]] = collections.Counter()
    for w in words:
        syms = tuple(w[:-1]) + (w[-1] + "</w>",)
        freq[syms] += 10 if w in HEAVY else 1
    merges: list[tuple[str, str]] = []
    while True:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for syms, f in freq.items():
            for p in zip(syms, syms[1:]):
                pairs[p] += f
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new: collections.Counter[tuple[str, ...]] = collections.Counter()
        for syms, f in freq.items():
            out: list[str] = []
            i = 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            new[tuple(out)] += f
        freq = new


def main() -> None:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` to ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    words = sorted(set(w.lower() for w in WORDS))
    for w in words:
        assert w.isascii() and w.isalpha(), w
    base = list(bytes_to_unicode().values())
    vocab_list = base + [b + "</w>" for b in base]
    merges = learn_merges(words)
    vocab_list += ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab_list) == len(set(vocab_list)), "duplicate tokens"
    vocab = {tok: i for i, tok in enumerate(vocab_list)}

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (args.out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok_cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (args.out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
    print(f"{len(words)} words, {len(merges)} merges, vocab size {len(vocab)} -> {args.out}")


if __name__ == "__main__":
    main()
