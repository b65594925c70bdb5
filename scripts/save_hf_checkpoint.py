"""Writes a RecurrentGemma checkpoint folder the way Hugging Face publishes one, with `transformers` itself:
a preset's shapes (optionally fewer layers), transformers' own random initialisation, bf16 safetensors shards
with `model.safetensors.index.json`, `config.json`, `generation_config.json`, and the shipped tokenizer.

No real weights can be downloaded here, so this is how the README's "from a checkpoint folder" figures are
made: the folder has the layout, key names and dtypes of google/recurrentgemma-2b(-it) and -9b(-it).

    python scripts/save_hf_checkpoint.py --preset recurrentgemma-2b --out /tmp/rg2b
    python scripts/save_hf_checkpoint.py --preset recurrentgemma-2b --layers 3 --out /tmp/rg2b-3

Memory: the model is built directly in bf16 (5.4 GB at 2B, 17 GB at 9B).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="recurrentgemma-2b")
    parser.add_argument("--layers", type=int, default=None, help="fewer blocks than the preset (same pattern)")
    parser.add_argument("--vocab", type=int, default=None, help="another vocabulary size than the preset's")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shard", default="2GB", help="max_shard_size for save_pretrained")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import GenerationConfig, RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    from rgexport.assets import shipped_model_dir
    from rgexport.config import get_preset

    config = get_preset(args.preset)
    if args.layers is not None:
        config = config.replace(block_types=config.block_types[: args.layers])
    if args.vocab is not None:
        config = config.replace(vocab_size=args.vocab)
    hf = RecurrentGemmaConfig(**{k: v for k, v in config.to_hf_config().items() if k not in ("architectures",
                                                                                         "model_type")})
    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.bfloat16)
    model = RecurrentGemmaForCausalLM(hf).eval()
    torch.set_default_dtype(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=1, pad_token_id=0)
    model.save_pretrained(args.out, max_shard_size=args.shard, safe_serialization=True)
    shutil.copyfile(shipped_model_dir() / "tokenizer.model", args.out / "tokenizer.model")
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {params / 1e9:.3f} B parameters, "
          f"{sum(f.stat().st_size for f in args.out.glob('*.safetensors')) / 1e9:.2f} GB of shards")


if __name__ == "__main__":
    main()
