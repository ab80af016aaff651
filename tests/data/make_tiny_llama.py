"""Tiny random Llama checkpoints with reference activations from transformers, for parity tests.

Usage (in a separate environment with torch and transformers; the tests never import them):

    python tests/data/make_tiny_llama.py

For each of three configs (MHA, GQA, MQA) writes ``tests/data/tiny_llama_{mha,gqa,mqa}/`` with:

- ``config.json`` and ``model.safetensors`` from ``save_pretrained(..., safe_serialization=True)``. Weights are
  stored in **bfloat16**, as real Llama checkpoints are (and so each file stays under 300 KB). The reference
  below was computed in float32 from those same bf16-rounded weights, so upcasting them to float32 reproduces
  it exactly. transformers 5 writes RoPE's base frequency as ``rope_parameters.rope_theta``, not ``rope_theta``.
- ``reference.npz`` with
  - ``input_ids``: int32 [2, 11], fixed seed;
  - ``hidden_states``: float32 [n_layers + 1, 2, 11, hidden], exactly what ``output_hidden_states=True``
    returns: index 0 is the embedding output, index i the output of decoder layer i, and the final RMSNorm
    IS applied to the last entry (see ``final_norm_applied``); ``last_layer_prenorm`` keeps the last layer's
    output before the norm;
  - ``last_layer_prenorm``: float32 [2, 11, hidden];
  - ``final_norm_applied``: bool scalar, whether ``hidden_states[-1]`` equals ``norm(last_layer_prenorm)``;
  - ``logits``: float32 [2, 11, vocab];
  - ``note``: a string restating the above.

Weights are drawn with larger scales than transformers' default init (embeddings N(0, 1), linear weights
N(0, 1/fan_in), norm weights 1 + 0.1 N(0, 1)) so that attention is far from uniform and a wrong RoPE,
norm or head grouping changes the logits visibly.
"""

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=3,
    head_dim=16,
    intermediate_size=96,
    num_attention_heads=4,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
)
CONFIGS = {
    "mha": dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0),
    "gqa": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0),
    "mqa": dict(num_key_value_heads=1, tie_word_embeddings=False, rope_theta=10000.0),
}
BATCH, SEQ = 2, 11


def _make_model(name: str, seed: int) -> LlamaForCausalLM:
    extra = dict(CONFIGS[name])
    theta = extra.pop("rope_theta")
    cfg = LlamaConfig(**BASE, **extra, rope_parameters={"rope_type": "default", "rope_theta": theta})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in pname:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            # Round to what the bf16 checkpoint will hold, so the float32 reference matches it exactly.
            p.copy_(p.to(torch.bfloat16).float())
        if cfg.tie_word_embeddings:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


@torch.no_grad()
def _reference(model: LlamaForCausalLM, input_ids: torch.Tensor) -> dict:
    captured = {}
    last = model.model.layers[-1]
    handle = last.register_forward_hook(
        lambda mod, args, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out)
    )
    out = model(input_ids, output_hidden_states=True)
    handle.remove()
    hidden = torch.stack(out.hidden_states).float().numpy()
    prenorm = captured["h"].float()
    normed = model.model.norm(prenorm).numpy()
    prenorm = prenorm.numpy()
    if np.allclose(hidden[-1], normed, atol=1e-6):
        applied = True
    elif np.allclose(hidden[-1], prenorm, atol=1e-6):
        applied = False
    else:
        raise RuntimeError("hidden_states[-1] is neither the last layer's output nor its normed version")
    n_layers = model.config.num_hidden_layers
    assert hidden.shape == (n_layers + 1, BATCH, SEQ, model.config.hidden_size), hidden.shape
    note = (
        f"transformers {transformers.__version__}, torch {torch.__version__}, float32 compute from bf16-rounded "
        f"weights. hidden_states[0] = embedding output; hidden_states[i] = output of decoder layer i; final norm "
        f"{'IS' if applied else 'is NOT'} applied to hidden_states[-1]; last_layer_prenorm = layer "
        f"{n_layers} output before the final norm. logits = lm_head(norm(last_layer_prenorm))."
    )
    return {
        "input_ids": input_ids.numpy().astype(np.int32),
        "hidden_states": hidden.astype(np.float32),
        "last_layer_prenorm": prenorm.astype(np.float32),
        "final_norm_applied": np.array(applied),
        "logits": out.logits.float().numpy().astype(np.float32),
        "note": np.array(note),
    }


def main() -> None:
    for seed, name in enumerate(CONFIGS):
        model = _make_model(name, seed)
        gen = torch.Generator().manual_seed(1000 + seed)
        input_ids = torch.randint(0, BASE["vocab_size"], (BATCH, SEQ), generator=gen)
        ref = _reference(model, input_ids)
        out_dir = HERE / f"tiny_llama_{name}"
        out_dir.mkdir(exist_ok=True)
        model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
        np.savez(out_dir / "reference.npz", **ref)
        for path in sorted(out_dir.iterdir()):
            size = path.stat().st_size
            assert size < 300_000, f"{path} is {size} bytes"
        cfg = json.loads((out_dir / "config.json").read_text())
        print(
            f"{out_dir.name}: {sorted(p.name for p in out_dir.iterdir())}, rope {cfg.get('rope_parameters')}, "
            f"norm applied to last hidden state: {bool(ref['final_norm_applied'])}"
        )


if __name__ == "__main__":
    main()
