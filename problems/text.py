"""The built-in language-modelling problem: a small GPT on the bytes of a UTF-8 text file.

* Tokens are the file's bytes (vocabulary 256, no tokenizer).
* The first nine tenths of the bytes are the train split, the last tenth (``n // 10`` bytes) the
  test split. A sample is a contiguous block of ``block_size`` tokens and its next-token
  targets (the same block shifted by one): block i of a split covers bytes
  ``[i B, (i + 1) B]``, so the blocks do not overlap and an epoch sees every byte once.
* ``forward`` runs the GPT (``models.gpt``) on the input blocks; ``loss`` is the mean
  next-token cross-entropy over every token of the batch. Every sample has exactly B tokens,
  so this is the mean over samples of their own means, and weighting mini-batches by their
  sample counts (the Hessian operators, training's sums) stays exact. ``accuracy`` is the
  next-token accuracy. Losses are in nats per byte; bits per byte = loss / ln 2.
* ``recipe()`` is AdamW with a linear warm-up and a cosine decay (see ``TEXT_RECIPE``).

``generated_text(num_bytes)`` makes a deterministic, learnable English-like text (sentences of
a small probabilistic grammar with number agreement, numbered notes that count up, paragraphs)
for offline tests and demos; ``python -m problems.write_text --write data/generated.txt
--bytes 100000`` writes it to a file.
"""
from __future__ import annotations

import hashlib
import math
import os
import random

import torch
import torch.nn.functional as F

from models.gpt import GPT_DEFAULTS, gpt
from support.errors import DataError, UserError

from .base import Problem, ProblemError

__all__ = ["TEXT_RECIPE", "TextBlocks", "TextProblem", "generated_text", "gpt_arch",
           "text_record", "write_generated_text"]

VOCAB_SIZE = 256
#: training.py defaults of the text problem (flags given on the command line win)
TEXT_RECIPE = {"optimizer": "adamw", "lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.1,
               "lr_schedule": "cosine", "min_lr_factor": 0.1, "warmup_epochs": 1.0,
               "clip_grad_norm": 1.0, "batch_size": 32, "test_batch_size": 64, "epochs": 10}


def gpt_arch(n_layer=None, n_head=None, n_embd=None, block_size=None) -> dict:
    """The ``arch`` record of a GPT; None takes ``GPT_DEFAULTS``."""
    given = {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "block_size": block_size}
    sizes = {k: int(v if v is not None else GPT_DEFAULTS[k]) for k, v in given.items()}
    return {"name": "gpt", **sizes, "vocab_size": VOCAB_SIZE}


class TextBlocks(torch.utils.data.Dataset):
    """Non-overlapping blocks of ``block_size`` byte tokens and their next-token targets:
    sample i = (tokens[iB : iB + B], tokens[iB + 1 : iB + B + 1]), both int64 (B,)."""

    def __init__(self, tokens: torch.Tensor, block_size: int):
        self.tokens, self.block_size = tokens, int(block_size)

    def __len__(self):
        return max(0, (len(self.tokens) - 1) // self.block_size)

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} of {len(self)}")
        start = i * self.block_size
        chunk = self.tokens[start:start + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


def read_text_bytes(path: str, flag: str = "--data-dir") -> bytes:
    """The bytes of a UTF-8 text file; DataError (one sentence) when it is missing, a folder,
    unreadable or not UTF-8."""
    hint = ("--dataset text reads one UTF-8 text file; pass --data-dir FILE (a generated demo "
            "text: python -m problems.write_text --write data/generated.txt --bytes 100000)")
    if os.path.isdir(path):
        raise DataError(f"{flag} {path} is a folder; {hint}")
    if not os.path.isfile(path):
        raise DataError(f"{flag} {path}: no such file; {hint}")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise DataError(f"cannot read text file {path}: {exc.strerror or exc}") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"text file {path} is not UTF-8: byte 0x{data[exc.start]:02x} at offset "
                        f"{exc.start} is not valid UTF-8 ({exc.reason}); convert it, e.g. "
                        f"iconv -f latin1 -t utf-8") from None
    return data


def text_record(arch: dict, block_size: int, path: str, sha256: str, num_bytes: int) -> dict:
    """The problem record a checkpoint stores for the text problem."""
    return {"kind": "text", "arch": dict(arch), "block_size": int(block_size),
            "path": os.path.abspath(path), "sha256": sha256, "num_bytes": int(num_bytes)}


class TextProblem(Problem):
    """A GPT on the bytes of a text file (see the module docstring). ``arch`` gives the
    model's sizes (``gpt_arch``); ``block_size`` the tokens per sample, at most the model's
    context ``arch["block_size"]``. The file is read on first use (once per process)."""

    def __init__(self, path: str, arch: dict, block_size: int | None = None):
        self.path = os.fspath(path)
        self.arch = dict(arch)
        self.block_size = int(block_size or arch["block_size"])
        if self.block_size > self.arch["block_size"]:
            raise UserError(f"--block-size {self.block_size} is larger than the model's context "
                            f"of {self.arch['block_size']} tokens; pass --block-size "
                            f"{self.arch['block_size']} or less")
        self._data = None

    def __getstate__(self):
        return {**self.__dict__, "_data": None}

    # ------------------------------------------------------------------ data
    @property
    def data(self) -> bytes:
        """The file's bytes, checked: UTF-8 and long enough for one block in each split."""
        if self._data is None:
            data = read_text_bytes(self.path)
            need = 10 * (self.block_size + 1)
            if len(data) < need:
                raise DataError(
                    f"text file {self.path} has {len(data)} bytes, too short for one block of "
                    f"--block-size {self.block_size} in its test split (the last tenth needs "
                    f"{self.block_size + 1} bytes: a block and its next token); it needs at "
                    f"least {need} bytes, or pass a smaller --block-size")
            self._data = data
        return self._data

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def _tokens(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(self.data), dtype=torch.uint8)

    def dataset(self, split):
        tokens = self._tokens()
        cut = len(tokens) - len(tokens) // 10
        return TextBlocks(tokens[:cut] if split == "train" else tokens[cut:], self.block_size)

    # ------------------------------------------------------------------ model and loss
    def model(self):
        sizes = {k: v for k, v in self.arch.items() if k != "name"}
        try:
            return gpt(**sizes)
        except (ValueError, TypeError) as exc:
            raise ProblemError(f"cannot build the GPT {sizes}: {exc}") from None

    def forward(self, model, batch):
        return model(batch[0])

    def loss(self, outputs, batch):
        """Mean next-token cross-entropy over every token of the batch (nats)."""
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), batch[1].reshape(-1))

    def accuracy(self, outputs, batch):
        """Fraction of the batch's tokens whose most likely next byte is the true one."""
        return (outputs.argmax(dim=-1) == batch[1]).double().mean().item()

    def loss_text(self, loss: float) -> str:
        return f"{loss:.4f} ({loss / math.log(2):.3f} bits/byte)"

    def recipe(self):
        return dict(TEXT_RECIPE)

    # ------------------------------------------------------------------ descriptions
    loss_description = "mean next-token cross-entropy in nats per byte, over every token"

    @property
    def data_name(self):
        return os.path.basename(self.path)

    @property
    def hessian_split(self):
        return (f"train split (the first nine tenths of the bytes), blocks of {self.block_size} "
                "byte tokens")

    @property
    def label(self):
        return f"{self.describe()} on {self.data_name}"

    def describe(self):
        a = self.arch
        def count(n, what):
            return f"{n} {what}{'s' if n != 1 else ''}"

        return (f"GPT ({count(a['n_layer'], 'layer')}, {count(a['n_head'], 'head')}, width "
                f"{a['n_embd']}, context {a['block_size']}, vocabulary {a['vocab_size']})")

    def record(self):
        return text_record(self.arch, self.block_size, self.path, self.sha256, len(self.data))


# ---------------------------------------------------------------------- generated text
_NOUNS = [("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("teacher", "teachers"),
          ("robot", "robots"), ("farmer", "farmers"), ("child", "children"),
          ("painter", "painters"), ("sailor", "sailors"), ("baker", "bakers")]
_VERBS = [("sees", "see"), ("likes", "like"), ("follows", "follow"), ("paints", "paint"),
          ("finds", "find"), ("helps", "help"), ("watches", "watch"), ("remembers", "remember")]
_ADJECTIVES = ["small", "old", "quiet", "bright", "green", "clever", "tired", "happy"]
_PLACES = ["garden", "market", "harbour", "library", "forest", "station"]
_ENDINGS = ["slowly", "quickly", "today", "again", "at night", "in the morning"]


def _noun_phrase(rng, plural):
    det = rng.choice(["the", "some", "many", "these"] if plural else ["the", "a", "every", "this"])
    adj = f"{rng.choice(_ADJECTIVES)} " if rng.random() < 0.4 else ""
    if det == "a" and adj[:1] in "aeiou" and adj:
        det = "an"
    return f"{det} {adj}{rng.choice(_NOUNS)[1 if plural else 0]}"


def _sentence(rng):
    plural = rng.random() < 0.5
    subject = _noun_phrase(rng, plural)
    verb = rng.choice(_VERBS)
    obj = _noun_phrase(rng, rng.random() < 0.5)
    if rng.random() < 0.2:  # a question: does/do ... ?
        return f"{'do' if plural else 'does'} {subject} {verb[1]} {obj}?"
    place = f" in the {rng.choice(_PLACES)}" if rng.random() < 0.4 else ""
    ending = f" {rng.choice(_ENDINGS)}" if rng.random() < 0.3 else ""
    return f"{subject} {verb[1] if plural else verb[0]} {obj}{place}{ending}."


def generated_text(num_bytes: int, seed: int = 0) -> str:
    """``num_bytes`` bytes (ASCII, so also characters) of deterministic English-like text:
    paragraphs of 3-6 sentences from a small grammar (subject-verb agreement, questions,
    places), each paragraph opened by a numbered note whose number counts up by one."""
    if num_bytes < 0:
        raise ValueError(f"num_bytes must be non-negative, got {num_bytes}")
    rng = random.Random(seed)
    parts, size, note = [], 0, 1
    while size < num_bytes:
        lines = [f"Note {note}: {_noun_phrase(rng, False)} waits in the "
                 f"{rng.choice(_PLACES)}."]
        lines += [_sentence(rng) for _ in range(rng.randint(3, 6))]
        paragraph = " ".join(s[0].upper() + s[1:] for s in lines) + "\n\n"
        parts.append(paragraph)
        size += len(paragraph)
        note += 1
    return "".join(parts)[:num_bytes]


def write_generated_text(path: str, num_bytes: int, seed: int = 0) -> None:
    """Write ``generated_text(num_bytes, seed)`` to ``path`` (folders created)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(generated_text(num_bytes, seed))
