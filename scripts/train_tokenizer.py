"""Train the SentencePiece tokenizer of the tiny model on ``calibration/corpus/train.txt``.

A unigram model with a 4096-piece vocabulary, byte fallback and full character coverage
is trained on the training split built by ``scripts/build_corpus.py`` and written to
``rgexport/assets/tiny/tokenizer.model``.  Special ids follow Gemma's convention:
``<pad>`` = 0, ``<eos>`` = 1, ``<bos>`` = 2, ``<unk>`` = 3.  As in Gemma's tokenizer, text
is not normalised (``identity`` rule, whitespace kept, no dummy prefix, digits split), so
``decode(encode(text)) == text`` for any text.

Training is deterministic: every line of the training file is used in file order
(no sampling, no shuffling), the random generator is seeded and the corpus is passed as
an iterator, so no local path ends up in the model file.

After training the script reloads the model from disk, prints the vocabulary size, the
training time and the average tokens per UTF-8 byte on ``calibration/corpus/heldout.txt``,
and checks that every held-out line round-trips exactly.

Rebuild with the defaults (from the repository root)::

    .venv/bin/python scripts/train_tokenizer.py
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TRAIN = REPO_ROOT / "calibration" / "corpus" / "train.txt"
DEFAULT_HELDOUT = REPO_ROOT / "calibration" / "corpus" / "heldout.txt"
DEFAULT_OUTPUT = REPO_ROOT / "rgexport" / "assets" / "tiny" / "tokenizer.model"


def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a corpus file (blank lines only separate documents)."""
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line]


def iter_lines(lines: list[str]) -> Iterator[str]:
    yield from lines


def train(train_lines: list[str], vocab_size: int, seed: int, num_threads: int) -> bytes:
    """Train a unigram model on ``train_lines`` and return the serialized model proto."""
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter_lines(train_lines),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        # Gemma's id convention.
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        # Lossless, like Gemma's tokenizer: no normalisation, keep every space, split digits.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        # Deterministic: all sentences, in file order.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=16384,
        num_threads=num_threads,
        minloglevel=2,
    )
    return model.getvalue()


def tokens_per_byte(sp: spm.SentencePieceProcessor, lines: list[str]) -> tuple[int, int]:
    """(tokens, UTF-8 bytes) over ``lines``, each encoded on its own without bos/eos."""
    n_tokens = sum(len(ids) for ids in sp.encode(lines))
    n_bytes = sum(len(line.encode("utf-8")) for line in lines)
    return n_tokens, n_bytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=Path, default=DEFAULT_TRAIN, help="training text, one sentence a line")
    ap.add_argument("--heldout", type=Path, default=DEFAULT_HELDOUT, help="evaluation text")
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where tokenizer.model goes")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0, help="SentencePiece random generator seed")
    ap.add_argument("--num-threads", type=int, default=2)
    args = ap.parse_args(argv)

    train_lines = read_lines(args.train)
    start = time.perf_counter()
    model = train(train_lines, args.vocab_size, args.seed, args.num_threads)
    elapsed = time.perf_counter() - start

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(model)

    sp = spm.SentencePieceProcessor(model_file=str(args.output))
    specials = {name: getattr(sp, f"{name}_id")() for name in ("pad", "eos", "bos", "unk")}
    expected = {"pad": 0, "eos": 1, "bos": 2, "unk": 3}
    if specials != expected or sp.get_piece_size() != args.vocab_size:
        print(f"unexpected model: vocab {sp.get_piece_size()}, special ids {specials}", file=sys.stderr)
        return 1

    heldout_lines = read_lines(args.heldout)
    n_tokens, n_bytes = tokens_per_byte(sp, heldout_lines)
    bad = [line for line in heldout_lines if sp.decode(sp.encode(line)) != line]
    whole = args.heldout.read_text(encoding="utf-8")
    whole_ok = sp.decode(sp.encode(whole)) == whole

    print(f"model: {args.output} ({len(model)} bytes, sha256 {hashlib.sha256(model).hexdigest()})")
    print(f"vocab size: {sp.get_piece_size()} (special ids {specials})")
    print(f"training: {len(train_lines)} lines in {elapsed:.1f} s ({args.num_threads} threads)")
    print(
        f"heldout: {n_tokens} tokens / {n_bytes} bytes = {n_tokens / n_bytes:.4f} tokens per byte "
        f"({n_bytes / n_tokens:.2f} bytes per token, {len(heldout_lines)} lines)"
    )
    print(f"round trip: {len(heldout_lines) - len(bad)}/{len(heldout_lines)} lines, whole file {whole_ok}")
    if bad or not whole_ok:
        for line in bad[:5]:
            print(f"  mismatch: {line!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
