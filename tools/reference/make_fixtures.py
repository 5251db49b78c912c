"""Writes the reference fixtures under tests/fixtures/.

For every configuration below: NAME.json (the keyword arguments), NAME.pt (the model's
state_dict, saved with torch.save exactly as users save it) and NAME.safetensors (inputs,
outputs, and the gradient of a loss for every parameter). The Rust tests load NAME.pt through
the same code as `lat import` and compare.

    python tools/reference/make_fixtures.py [--out tests/fixtures] [--only NAME ...]

Requires the pinned packages of tools/reference/requirements.txt.
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from linear_attention_transformer import LinearAttentionTransformer, LinearAttentionTransformerLM
from linear_attention_transformer.autopadder import Autopadder

BASE = dict(num_tokens=48, dim=32, depth=2, max_seq_len=64, heads=4, dim_head=8, local_attn_window_size=8)


def lm(**kw):
    return {**BASE, **kw}


# name -> (kwargs, batch, length, mask kind). Lengths that are not a multiple of the padding unit
# go through the reference's Autopadder.
LM_CASES = {
    "causal_global": (lm(causal=True), 2, 32, None),
    "causal_reversible_blindspot": (lm(causal=True, reversible=True, blindspot_size=4, n_local_attn_heads=2), 2, 32, None),
    "causal_masked": (lm(causal=True, blindspot_size=4, n_local_attn_heads=1), 2, 32, "tail"),
    "causal_padded": (lm(causal=True, blindspot_size=4, n_local_attn_heads=2), 2, 27, None),
    "causal_all_local": (lm(causal=True, n_local_attn_heads=4, reversible=True), 1, 24, None),
    "causal_per_layer_local": (lm(causal=True, depth=3, n_local_attn_heads=(0, 2, 4), blindspot_size=2), 2, 16, None),
    "noncausal_global": (lm(), 2, 24, None),
    "noncausal_local_masked": (lm(n_local_attn_heads=2), 2, 24, "holes"),
    "noncausal_padded_reversible": (lm(n_local_attn_heads=2, reversible=True), 2, 21, None),
    "emb_dim": (lm(causal=True, emb_dim=16, n_local_attn_heads=2), 2, 16, None),
    "absolute_pos": (lm(use_axial_pos_emb=False, reversible=True, n_local_attn_heads=1), 2, 16, None),
    "rotary_causal": (lm(causal=True, use_rotary_emb=True, n_local_attn_heads=2, blindspot_size=4), 2, 24, None),
    "rotary_noncausal": (lm(use_rotary_emb=True, reversible=True), 1, 16, None),
    "shift_causal_masked": (lm(causal=True, shift_tokens=True, n_local_attn_heads=2), 2, 24, "tail"),
    "shift_noncausal": (lm(shift_tokens=True, dim=30, n_local_attn_heads=1), 2, 16, None),
    "ff_chunks_dim_head_default": (lm(causal=True, dim_head=None, heads=2, ff_chunks=3, reversible=True), 2, 20, None),
    "ff_glu_reference_layout": (lm(causal=True, ff_glu=True, n_local_attn_heads=2), 1, 16, None),
    "return_embeddings": (lm(return_embeddings=True, n_local_attn_heads=2), 2, 16, None),
    "seed_like": (
        lm(causal=True, reversible=True, blindspot_size=8, n_local_attn_heads=2, ff_chunks=2, depth=3),
        2,
        40,
        None,
    ),
}

# The bare stack, on embeddings.
STACK_CASES = {
    "stack_causal": (dict(dim=32, depth=2, max_seq_len=64, heads=4, causal=True, blindspot_size=4, n_local_attn_heads=2, local_attn_window_size=8), 2, 20),
    "stack_noncausal_reversible": (dict(dim=32, depth=2, max_seq_len=64, heads=4, reversible=True, n_local_attn_heads=1, local_attn_window_size=8), 2, 16),
}


def make_mask(kind, b, n):
    if kind is None:
        return None
    mask = torch.ones(b, n, dtype=torch.bool)
    if kind == "tail":  # right padding of different lengths
        mask[0, n - 3 :] = False
        mask[1, n - 7 :] = False
    elif kind == "holes":  # scattered masked positions
        mask[:, 3::5] = False
    return mask


def perturb(model, gen):
    # Moves every parameter off its initial value, so that norms and biases are tested too.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def kwargs_json(kw):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}


def grads(model):
    return {"grad." + k: p.grad.detach().contiguous() for k, p in model.named_parameters()}


def write(out, name, kw, model, tensors):
    torch.save(model.state_dict(), os.path.join(out, name + ".pt"))
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(kwargs_json(kw), f, indent=1, sort_keys=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, name + ".safetensors"))


def lm_case(out, name, kw, b, n, mask_kind, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = LinearAttentionTransformerLM(**kw)
    perturb(model, gen)
    model.train()
    tokens = torch.randint(0, kw["num_tokens"], (b, n), generator=gen)
    mask = make_mask(mask_kind, b, n)
    net = Autopadder(model)
    out_t = net(tokens, input_mask=mask) if mask is not None else net(tokens)
    keep = (mask if mask is not None else torch.ones(b, n, dtype=torch.bool)).float()
    tensors = {"tokens": tokens, "output": out_t.detach()}
    if kw.get("return_embeddings"):
        probe = torch.randn(out_t.shape, generator=gen)
        loss = (out_t * probe * keep[..., None]).sum()
        tensors["probe"] = probe
    else:
        targets = torch.randint(0, kw["num_tokens"], (b, n), generator=gen)
        ce = F.cross_entropy(out_t.reshape(-1, kw["num_tokens"]), targets.reshape(-1), reduction="none")
        loss = (ce * keep.reshape(-1)).sum() / keep.sum()
        tensors["targets"] = targets
    loss.backward()
    if mask is not None:
        tensors["mask"] = mask.to(torch.uint8)
    tensors["loss"] = loss.detach().reshape(1)
    tensors.update(grads(model))
    write(out, name, kw, model, tensors)


def stack_case(out, name, kw, b, n, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = LinearAttentionTransformer(**kw)
    perturb(model, gen)
    model.train()
    x = torch.randn(b, n, kw["dim"], generator=gen, requires_grad=True)
    y = Autopadder(model)(x)
    probe = torch.randn(y.shape, generator=gen)
    loss = (y * probe).sum()
    loss.backward()
    tensors = {"x": x.detach(), "output": y.detach(), "probe": probe, "grad_x": x.grad, "loss": loss.detach().reshape(1)}
    tensors.update(grads(model))
    write(out, name, kw, model, tensors)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures"))
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    for i, (name, (kw, b, n, mask)) in enumerate(LM_CASES.items()):
        if not args.only or name in args.only:
            lm_case(args.out, name, kw, b, n, mask, seed=100 + i)
            print("wrote", name)
    for i, (name, (kw, b, n)) in enumerate(STACK_CASES.items()):
        if not args.only or name in args.only:
            stack_case(args.out, name, kw, b, n, seed=200 + i)
            print("wrote", name)


if __name__ == "__main__":
    main()
