"""Trains the shipped tiny Griffin (preset `tiny`) on calibration/corpus/train.txt.

Reproducible on a 2-core CPU: fixed seed, fixed step count, single-threaded data sampling. Writes a
Hugging Face RecurrentGemma folder (config.json, model.safetensors, tokenizer.model) plus
training.json with the hyperparameters, the loss curve and the held-out perplexity.

    python scripts/train_tiny.py            # ~30 min on 2 cores; rewrites rgexport/assets/tiny
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import sentencepiece as spm
import torch

from rgexport.checkpoint import save_huggingface
from rgexport.config import get_preset
from rgexport.model import Griffin

ROOT = Path(__file__).resolve().parent.parent


def load_stream(path: Path, sp: spm.SentencePieceProcessor) -> torch.Tensor:
    """The corpus as one token stream: each document's tokens followed by </s>."""
    docs = [d for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    ids: list[int] = []
    for doc in docs:
        ids.extend(sp.encode(doc))
        ids.append(sp.eos_id())
    return torch.tensor(ids, dtype=torch.long)


def sample_batch(stream: torch.Tensor, batch: int, seq: int, bos: int, g: torch.Generator) -> tuple:
    starts = torch.randint(0, len(stream) - seq, (batch,), generator=g)
    window = torch.stack([stream[s : s + seq] for s in starts.tolist()])
    inputs = torch.cat([torch.full((batch, 1), bos), window[:, :-1]], dim=1)
    return inputs, window


def chunked_loss(model: Griffin, inputs: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Runs the sequence in window-sized chunks carrying the state, like inference does."""
    state = model.init_state(inputs.shape[0])
    losses = []
    for s in range(0, inputs.shape[1], chunk):
        position = torch.full((inputs.shape[0],), s, dtype=torch.long)
        logits, state = model(inputs[:, s : s + chunk], position, state)
        losses.append(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets[:, s : s + chunk].reshape(-1), reduction="sum"))
    return torch.stack(losses).sum() / targets.numel()


@torch.no_grad()
def heldout_perplexity(model: Griffin, stream: torch.Tensor, bos: int, max_tokens: int) -> float:
    tokens = torch.cat([torch.tensor([bos]), stream[: max_tokens - 1]])[None]
    logits = model.score(tokens)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])
    return math.exp(nll.item())


def _relative(p: Path) -> str:
    try:
        return p.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=ROOT / "calibration/corpus/train.txt")
    ap.add_argument("--heldout", type=Path, default=ROOT / "calibration/corpus/heldout.txt")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "rgexport/assets/tiny/tokenizer.model")
    ap.add_argument("--out", type=Path, default=ROOT / "rgexport/assets/tiny")
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256, help="2x the window, so training sees the window wrap")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    # RG-LRU decay products and their gradients underflow into subnormal floats as training goes on;
    # x86 handles those ~100x slower (measured: 3000 -> under 200 tokens/s after ~150 steps).
    torch.set_flush_denormal(True)
    sp = spm.SentencePieceProcessor(model_file=str(args.tokenizer))
    config = get_preset("tiny")
    if sp.vocab_size() != config.vocab_size:
        raise SystemExit(f"tokenizer has {sp.vocab_size()} pieces, preset tiny expects {config.vocab_size}")
    train = load_stream(args.corpus, sp)
    heldout = load_stream(args.heldout, sp)
    print(f"train {len(train)} tokens, heldout {len(heldout)} tokens, {config.num_parameters()} parameters")

    g = torch.Generator().manual_seed(args.seed)
    model = Griffin(config).reset_parameters_(g)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    curve = []
    t0 = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        inputs, targets = sample_batch(train, args.batch, args.seq, sp.bos_id(), g)
        loss = chunked_loss(model, inputs, targets, config.attention_window_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            elapsed = time.time() - t0
            tokens = (step + 1) * args.batch * args.seq
            curve.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(elapsed, 1)})
            print(f"step {step:5d} loss {loss.item():.3f} lr {lr_at(step):.2e} {tokens / elapsed:.0f} tok/s",
                  flush=True)

    model.eval()
    ppl = heldout_perplexity(model, heldout, sp.bos_id(), args.eval_tokens)
    print(f"held-out perplexity over {args.eval_tokens} tokens: {ppl:.2f}")
    save_huggingface(model, args.out)  # tokenizer.model already lives there
    (args.out / "training.json").write_text(json.dumps({
        "preset": "tiny",
        "parameters": config.num_parameters(),
        "corpus": _relative(args.corpus),
        "train_tokens": len(train),
        "args": {k: _relative(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__,
        "seconds": round(time.time() - t0, 1),
        "heldout_perplexity": round(ppl, 3),
        "heldout_tokens": args.eval_tokens,
        "loss_curve": curve,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
