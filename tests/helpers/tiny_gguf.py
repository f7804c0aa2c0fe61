"""A real GGUF file, tiny, for the import tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A real GGUF file, small: a 1-layer Llama (hidden 32) with a byte-level BPE vocabulary (the
    256 bytes, one merge, an end token), its matrices quantized to Q8_0 as a downloaded model's
    are (Q4_1 for SmolLM2's). Returns each tensor as the file holds it, dequantized."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    spelled = bytes_to_unicode()
    tokens = [spelled[b] for b in range(256)] + ["\u0120t", "<|endoftext|>"]  # "Ġt": " t"
    vocab, hidden, ffn = len(tokens), 32, 64
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 1) + [3])  # normal, and the end token a control token
    w.add_token_merges(["\u0120 t"])
    w.add_bos_token_id(vocab - 1)
    w.add_eos_token_id(vocab - 1)
    held = {}
    shapes = {"token_embd": (vocab, hidden), "output": (vocab, hidden), "output_norm": (hidden,),
              "blk.0.attn_norm": (hidden,), "blk.0.ffn_norm": (hidden,), "blk.0.attn_q": (hidden, hidden),
              "blk.0.attn_k": (hidden, hidden), "blk.0.attn_v": (hidden, hidden),
              "blk.0.attn_output": (hidden, hidden), "blk.0.ffn_gate": (ffn, hidden),
              "blk.0.ffn_up": (ffn, hidden), "blk.0.ffn_down": (hidden, ffn)}
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, shape in shapes.items():
        if len(shape) == 1:  # norms stay float32, as llama.cpp writes them
            a = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            w.add_tensor(f"{name}.weight", a)
            held[name] = a
        else:
            q = gguf.quants.quantize((0.2 * rng.standard_normal(shape)).astype(np.float32), q8)
            w.add_tensor(f"{name}.weight", q, raw_dtype=q8)
            held[name] = gguf.quants.dequantize(q, q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held
