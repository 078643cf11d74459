"""Peak memory of the response log-prob + entropy + backward pass at a real vocabulary size:
the trainer's chunked way (`rl.engine.forward.response_logprobs_and_entropy`) against the
naive way (float32 logits over every position, then log-softmax).

    python benchmarks/logprob_memory.py            # vocab 151,936, 1,024-token response
    python benchmarks/logprob_memory.py --quick    # vocab 32,000, 256 tokens: a smoke run
                                                   # (at this size fixed costs dominate)

Each way runs in its own process (so one way's freed-but-cached memory cannot hide the
other's peak); the peak is the process's peak resident memory during the pass minus its
resident memory just before it (Linux `VmHWM`, reset through `/proc/self/clear_refs`).
The model is a 1-layer Llama (hidden 64) in float32 with the given vocabulary: the output
layer and its logits are what the test is about. Both processes also save their log-probs
and gradients, which are compared here. Writes `benchmarks/results/logprob_memory.json`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "logprob_memory.json"


def build(vocab: int, prompt: int, response: int) -> tuple[Any, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=prompt + response,
    )
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, vocab, (1, prompt + response))
    batch = argparse.Namespace(
        input_ids=ids, attention_mask=torch.ones_like(ids), prompt_length=prompt
    )
    return model, batch


def run_one(mode: str, vocab: int, prompt: int, response: int, out: Path) -> None:
    """One pass in this process; saves log-probs, gradients and the peak to `out`."""
    import torch

    from rl.algos.losses import token_entropy, token_logprobs
    from rl.engine.forward import response_logprobs_and_entropy
    from rl.engine.memory import peak_rss_mb, reset_peak_rss

    torch.set_num_threads(1)
    model, batch = build(vocab, prompt, response)
    if not reset_peak_rss():
        raise SystemExit("this kernel does not let a process reset its peak RSS")
    before = peak_rss_mb()
    if mode == "naive":
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logits = logits.float()[:, prompt - 1 : -1]  # [1, Tr, V]
        ids = batch.input_ids[:, prompt:]
        logp, ent = token_logprobs(logits, ids), token_entropy(logits)
    else:
        logp, ent = response_logprobs_and_entropy(model, batch, entropy=True)
        assert ent is not None
    (logp.sum() + 0.01 * ent.sum()).backward()
    peak = peak_rss_mb() - before
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"logp": logp.detach(), "grads": grads, "peak_mb": peak}, out)


def measure(vocab: int, prompt: int, response: int) -> dict[str, Any]:
    import torch

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("naive", "chunked"):
            path = Path(tmp) / f"{mode}.pt"
            cmd = [sys.executable, __file__, "--run", mode, "--vocab", str(vocab)]
            cmd += ["--prompt", str(prompt), "--response", str(response), "--out", str(path)]
            subprocess.run(cmd, check=True)
            results[mode] = torch.load(path)
    naive, chunked = results["naive"], results["chunked"]
    grad_diff = max(float((chunked["grads"][n] - g).abs().max()) for n, g in naive["grads"].items())
    return {
        "vocab": vocab,
        "prompt_tokens": prompt,
        "response_tokens": response,
        "naive_peak_mb": round(naive["peak_mb"], 1),
        "chunked_peak_mb": round(chunked["peak_mb"], 1),
        "chunked_over_naive": round(chunked["peak_mb"] / naive["peak_mb"], 4),
        "max_abs_logprob_diff": float((chunked["logp"] - naive["logp"]).abs().max()),
        "max_abs_grad_diff": grad_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small vocabulary and response")
    parser.add_argument("--run", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--response", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.run:
        run_one(args.run, args.vocab, args.prompt, args.response, args.out)
        return
    if args.quick:
        args.vocab, args.response = 32_000, 256
    result = measure(args.vocab, args.prompt, args.response)
    print(json.dumps(result, indent=2))
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        shown = args.out.resolve()
        print(f"wrote {shown.relative_to(REPO) if shown.is_relative_to(REPO) else shown}")


if __name__ == "__main__":
    main()
