"""CLIP's byte-level BPE tokenizer (openai/clip-vit-large-patch14), with the ids of OpenAI's
`simple_tokenizer.py`: the clean-up (ftfy, HTML unescape, whitespace, lower case) runs in Python, the CLIP
regex pre-tokenisation and the BPE merges in the `tokenizers` library. Its regex engine (Oniguruma), checked
against the reference's `regex` module on every code point, differs in three places (`'ſ`, U+0345, Unicode
17), corrected at `_PATTERN` and `_pre_tokenizer_text`. The BPE data is OpenAI's
`bpe_simple_vocab_16e6.txt.gz` (MIT, license beside it).
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import itertools
import re
from collections.abc import Sequence

import ftfy
import torch
from tokenizers import Regex
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import models, pre_tokenizers

BOS = 49406  # <|startoftext|>
EOS = 49407  # <|endoftext|>
# SD 1.5's tokenizer pads with <|endoftext|>, not 0 (A1111: id_pad = id_end for SD1; SD2's OpenCLIP pads
# with 0). The UNet's cross-attention sees the text encoder's output at the pad positions: it shows in images.
PAD = EOS
CONTEXT_LENGTH = 77  # BOS + 75 tokens + EOS
VOCAB_SIZE = 49408

SPECIAL = {"<|startoftext|>": BOS, "<|endoftext|>": EOS}

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = VOCAB_SIZE - 256 - 256 - 2  # 48,894: merge lines 1 .. 48,894 of the file (line 0 is a header)

# Letters and digits added in Unicode 17.0, unknown to the Oniguruma tables of tokenizers 0.23 (which treat them
# as unassigned, i.e. "other"); the Python regex module classifies them as \p{L} / \p{N}.
_L17 = (
    r"\x{088F}\x{0C5C}\x{0CDC}\x{A7CE}-\x{A7CF}\x{A7D2}\x{A7D4}\x{A7F1}\x{10940}-\x{10959}\x{10EC5}-\x{10EC7}"
    r"\x{11DB0}-\x{11DDB}\x{16EA0}-\x{16EB8}\x{16EBB}-\x{16ED3}\x{16FF2}-\x{16FF3}\x{187F8}-\x{187FF}"
    r"\x{18D09}-\x{18D1E}\x{18D80}-\x{18DF2}\x{1E6C0}-\x{1E6DE}\x{1E6E0}-\x{1E6E2}\x{1E6E4}-\x{1E6E5}"
    r"\x{1E6E7}-\x{1E6ED}\x{1E6F0}-\x{1E6F4}\x{1E6FE}-\x{1E6FF}\x{2B73A}-\x{2B73F}\x{2CEA2}-\x{2CEAD}"
    r"\x{323B0}-\x{33479}"
)
_N17 = r"\x{11DE0}-\x{11DE9}\x{16FF4}-\x{16FF6}"

# The CLIP pre-tokenisation regex (reference: regex module, IGNORECASE):
#   <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
# `(?i)` although the text is lower-case: under IGNORECASE `'ſ` (long s) is the contraction `'s`.
_PATTERN = (
    r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
    rf"|[\p{{L}}{_L17}]+|[\p{{N}}{_N17}]|[^\s\p{{L}}\p{{N}}{_L17}{_N17}]+"
)

# The reference collapses whitespace with the regex module's \s (Unicode White_Space). The re module's \s is
# str.isspace(), which also has U+001C..U+001F; leave those out.
_WHITESPACE = re.compile(r"[^\S\x1c-\x1f]+")


def clean_text(text: str) -> str:
    """The reference clean-up: ftfy, HTML unescape twice, strip, whitespace collapse, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def _pre_tokenizer_text(cleaned: str) -> str:
    # U+0345 matches no alternative of the reference regex (IGNORECASE makes it neither \p{L} nor [^\p{L}...]);
    # like whitespace it only separates pre-tokens. Oniguruma would treat it as a letter.
    return cleaned.replace("\u0345", " ")


@functools.lru_cache(maxsize=1)
def _tables() -> tuple[dict[str, int], _RustTokenizer, pre_tokenizers.Split]:
    """The vocabulary (token -> id, in id order), the Rust tokenizer and its regex pre-tokenizer; built once
    per process (0.15 s)."""
    raw = importlib.resources.files("sd15.clip").joinpath(_BPE_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n", _NUM_MERGES + 1)[1 : _NUM_MERGES + 1]
    merges = [tuple(line.split(" ")) for line in lines]
    # The byte symbols in vocabulary order: printable Latin-1 bytes as themselves, then the other 68 bytes as
    # chr(256 + k), k in byte order (CLIP's bytes_to_unicode).
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = [*map(chr, printable), *(chr(256 + k) for k in range(256 - len(printable)))]
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(a + b for a, b in merges), *SPECIAL]
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=dict(vocab), merges=merges, end_of_word_suffix="</w>", ignore_merges=False)
    rust = _RustTokenizer(bpe)
    split = pre_tokenizers.Split(Regex(_PATTERN), behavior="removed", invert=True)  # keep the matches only
    # No normalizer (the clean-up is done in Python), no post-processor, no added tokens.
    rust.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                   use_regex=False)])
    return vocab, rust, split


class Tokenizer:
    """CLIP BPE tokenizer. ``Tokenizer()`` is free; the BPE tables are built on first use and shared by every
    instance in the process."""

    @property
    def vocab(self) -> dict[str, int]:
        """token -> id, in id order, e.g. vocab[",</w>"] == 267; do not mutate."""
        return _tables()[0]

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text``, without BOS/EOS."""
        _, rust, split = _tables()
        text = _pre_tokenizer_text(clean_text(text))
        if "<|" not in text:  # no special token possible
            return rust.encode(text, add_special_tokens=False).ids
        # Special tokens are the pre-tokens that are exactly one (the reference BPEs the other case variants
        # the regex matched, "<|ſtartoftext|>"). The runs between them are BPE'd piece by piece: splitting a
        # regex match again gives itself.
        ids: list[int] = []
        pieces = (piece for piece, _ in split.pre_tokenize_str(text))
        for special, run in itertools.groupby(pieces, key=lambda piece: piece in SPECIAL):
            if special:
                ids += [SPECIAL[p] for p in run]
            else:
                ids += rust.encode(list(run), is_pretokenized=True, add_special_tokens=False).ids
        return ids

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """LongTensor [B, 77]: BOS, the ids truncated to 75, EOS, then PAD (= EOS). One window per text, as
        diffusers does; A1111's 75-token chunking is in `sd15.a1111.prompt`."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), CONTEXT_LENGTH), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            seq = [BOS, *self.encode(text)[: CONTEXT_LENGTH - 2], EOS]
            out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return out
