"""Writes the reference fixtures under tests/fixtures/.

For every configuration below: NAME.json (the keyword arguments), NAME.pt (the model's
state_dict, saved with torch.save exactly as users save it) and NAME.safetensors (inputs,
outputs, and the gradient of a loss for every parameter). The Rust tests load NAME.pt through
the same code as `lat import` and compare.

    python tools/reference/make_fixtures.py [--out tests/fixtures] [--only NAME ...]

Three environments write three groups of fixtures (the script picks the group from what is
installed):
- requirements.txt: linear-attention-transformer 0.19.1 with today's dependencies (most cases);
- requirements-0.16.txt: 0.16.1, the last release with `one_kv_head` (its non-causal cases;
  0.17 changed the causal normalisation);
- requirements-2021.txt: product-key-memory 0.1.10, the 2021 product-key memory (BatchNorm).
"""

import argparse
import importlib.metadata
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from linear_attention_transformer import LinearAttentionTransformer, LinearAttentionTransformerLM
from linear_attention_transformer.autopadder import Autopadder

VERSION = importlib.metadata.version("linear-attention-transformer")
PKM_VERSION = importlib.metadata.version("product-key-memory")
GROUP = "v016" if VERSION == "0.16.1" else "pkm2021" if PKM_VERSION == "0.1.10" else "main"
if GROUP == "main":
    from linear_attention_transformer import ImageLinearAttention, LinformerContextSettings, LinformerSettings

BASE = dict(num_tokens=48, dim=32, depth=2, max_seq_len=64, heads=4, dim_head=8, local_attn_window_size=8)


def lm(**kw):
    return {**BASE, **kw}


PKM_SIZE = dict(dim=8, heads=2, dim_head=4)

# name -> (kwargs, batch, length, mask kind[, context length, context mask?]). Lengths that are
# not a multiple of the padding unit go through the reference's Autopadder.
MAIN_CASES = lambda: {
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
    # Cross-attention (the decoder of an encoder-decoder), with and without a context mask.
    "context_decoder": (lm(causal=True, receives_context=True, n_local_attn_heads=2, blindspot_size=4, ff_glu=True), 2, 16, "tail", 6, True),
    "context_reversible": (lm(receives_context=True, reversible=True, attn_layer_dropout=0.0), 2, 16, None, 5, False),
    # Axial (strided) attention.
    "axial_causal": (lm(causal=True, attend_axially=True), 2, 32, None),
    "axial_local_masked_reversible": (lm(attend_axially=True, n_local_attn_heads=2, reversible=True, ff_glu=True), 2, 24, "holes"),
    "axial_padded": (lm(causal=True, attend_axially=True, n_local_attn_heads=1, blindspot_size=4), 2, 27, None),
    # Product-key memory (today's: LayerNorm on the queries).
    # (narrow models: the memory always has 128² rows)
    "pkm_causal": (lm(causal=True, pkm_layers=(1,), n_local_attn_heads=1, **PKM_SIZE), 2, 16, None),
    "pkm_reversible_shift": (lm(pkm_layers=(2,), reversible=True, shift_tokens=True, **PKM_SIZE), 2, 16, None),
    # Linformer self-attention and cross-attention.
    "linformer": (lm(linformer_settings=LinformerSettings(k=16)), 2, 40, None),
    "linformer_shift_emb_dim": (lm(linformer_settings=LinformerSettings(k=8), shift_tokens=True, emb_dim=16, reversible=True), 2, 24, None),
    "context_linformer": (lm(causal=True, receives_context=True, context_linformer_settings=LinformerContextSettings(seq_len=8, k=4)), 2, 16, None, 6, False),
}

V016_CASES = lambda: {
    # one_kv_head: one key/value head for the local heads and one for the global heads.
    "one_kv_head_mixed": (lm(one_kv_head=True, n_local_attn_heads=2), 2, 24, "holes"),
    "one_kv_head_global_reversible": (lm(one_kv_head=True, reversible=True), 2, 16, None),
    "one_kv_head_all_local": (lm(one_kv_head=True, n_local_attn_heads=4), 2, 16, None),
    "one_kv_head_context": (lm(one_kv_head=True, receives_context=True, n_local_attn_heads=1), 2, 16, None, 6, True),
}

PKM2021_CASES = lambda: {
    # product-key-memory 0.1.10: BatchNorm1d on the whole query.
    # (evaluation mode: the reference's reversible backward cannot run there)
    "pkm2021_eval": (lm(pkm_layers=(1,), causal=True, n_local_attn_heads=1, **PKM_SIZE), 2, 16, None),
    "pkm2021_shift": (lm(pkm_layers=(1, 2), shift_tokens=True, **PKM_SIZE), 2, 16, None),
}

IMAGE_CASES = lambda: {
    "image_basic": (dict(chan=8, heads=2, key_dim=16, value_dim=16), (2, 8, 5, 6), None),
    "image_context": (dict(chan=8, heads=2, key_dim=16, value_dim=16), (2, 8, 4, 4), 7),
    "image_kernel3_unnormed": (dict(chan=8, chan_out=6, heads=2, key_dim=8, value_dim=12, kernel_size=3, padding=1, norm_queries=False), (1, 8, 6, 5), None),
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


def lm_case(out, name, kw, b, n, mask_kind, seed, context_len=None, context_masked=False):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = LinearAttentionTransformerLM(**kw)
    perturb(model, gen)
    # The 2021 product-key memory's BatchNorm is compared in evaluation (running statistics).
    model.train(GROUP != "pkm2021")
    if GROUP == "pkm2021":
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm1d):
                    m.running_mean.normal_(0, 0.3, generator=gen)
                    m.running_var.uniform_(0.5, 2.0, generator=gen)
    tokens = torch.randint(0, kw["num_tokens"], (b, n), generator=gen)
    mask = make_mask(mask_kind, b, n)
    net = Autopadder(model)
    extra = {}
    tensors = {}
    if context_len:
        context = torch.randn(b, context_len, kw["dim"], generator=gen, requires_grad=True)
        extra["context"] = context
        if context_masked:
            cmask = torch.ones(b, context_len, dtype=torch.bool)
            cmask[0, -2:] = False
            extra["context_mask"] = cmask
            tensors["context_mask"] = cmask.to(torch.uint8)
    if mask is not None:
        extra["input_mask"] = mask
    out_t = net(tokens, **extra)
    keep = (mask if mask is not None else torch.ones(b, n, dtype=torch.bool)).float()
    tensors.update({"tokens": tokens, "output": out_t.detach()})
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
    if context_len:
        tensors["context"] = extra["context"].detach()
        tensors["grad_context"] = extra["context"].grad
    tensors["loss"] = loss.detach().reshape(1)
    tensors.update(grads(model))
    write(out, name, kw, model, tensors)


def image_case(out, name, kw, shape, context_len, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ImageLinearAttention(**kw)
    perturb(model, gen)
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    context = torch.randn(shape[0], kw["chan"], context_len, generator=gen, requires_grad=True) if context_len else None
    y = model(x, context=context)
    probe = torch.randn(y.shape, generator=gen)
    (y * probe).sum().backward()
    tensors = {"x": x.detach(), "output": y.detach(), "probe": probe, "grad_x": x.grad}
    if context is not None:
        tensors["context"] = context.detach()
        tensors["grad_context"] = context.grad
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
    wanted = lambda name: not args.only or name in args.only
    lm_cases = {"main": MAIN_CASES, "v016": V016_CASES, "pkm2021": PKM2021_CASES}[GROUP]()
    offset = {"main": 100, "v016": 300, "pkm2021": 400}[GROUP]
    for i, (name, case) in enumerate(lm_cases.items()):
        if wanted(name):
            lm_case(args.out, name, *case, seed=offset + i) if len(case) == 4 else lm_case(args.out, name, *case[:4], offset + i, *case[4:])
            print("wrote", name)
    if GROUP == "main":
        for i, (name, (kw, b, n)) in enumerate(STACK_CASES.items()):
            if wanted(name):
                stack_case(args.out, name, kw, b, n, seed=200 + i)
                print("wrote", name)
        for i, (name, (kw, shape, ctx)) in enumerate(IMAGE_CASES().items()):
            if wanted(name):
                image_case(args.out, name, kw, shape, ctx, seed=500 + i)
                print("wrote", name)


if __name__ == "__main__":
    main()
