"""Random-weight verifiers for measuring the search scorer's cost (docs/search.md): a PRM
whose tokenizer differs from the policy's (chat-tiny's BPE plus a `<step>` tag) and a PAV
value model on the policy's backbone with a random value head. Untrained: they choose beams
arbitrarily, but what a cached or a re-reading scorer *reads* does not depend on the weights.

    python benchmarks/search_cache_verifiers.py --policy DIR --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rl.engine.start_model import SHIPPED_ROOT
    from rl.engine.value_model import ValueModel, save_value_model, value_model_from_policy
    from rl.prm.convention import PRMConvention, token_ids
    from rl.prm.model import PRMModel, save_prm

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policy", type=Path, required=True, help="the policy checkpoint")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    (chat_dir,) = sorted(SHIPPED_ROOT.glob("chat-tiny-*"))
    tok = AutoTokenizer.from_pretrained(chat_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<step>"]})
    conv = PRMConvention(step_tag="<step>")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    prm = PRMModel(LlamaForCausalLM(config), conv, token_ids(conv, tok))
    save_prm(prm, tok, args.out / "prm")
    pav: ValueModel = value_model_from_policy(args.policy)
    torch.nn.init.normal_(pav.value_head.weight, std=0.5)
    save_value_model(pav, AutoTokenizer.from_pretrained(args.policy), args.out / "pav")
    print(f"wrote {args.out / 'prm'} and {args.out / 'pav'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
