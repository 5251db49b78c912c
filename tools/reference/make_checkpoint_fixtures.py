"""Writes tests/fixtures/checkpoints/: one model saved in every form users keep checkpoints in,
the forms `lat import` must refuse, and the reference's AutoregressiveWrapper on fixed inputs.

    python tools/reference/make_checkpoint_fixtures.py [--out tests/fixtures/checkpoints]

Files:
- model.json, logits.safetensors: the keyword arguments, and `tokens` with the logits of the
  model every checkpoint below holds;
- legacy.pt (`_use_new_zipfile_serialization=False`), dataparallel.pt (`module.` prefix),
  compiled.pt (`torch.compile`: `_orig_mod.`), training.pt ({"model", "optimizer", "step", ...}),
  tutorial.pt ({"model_state_dict", "optimizer_state_dict", "epoch"}), custom_key.pt (under
  "ema_weights": needs --key), legacy_training.pt (legacy and nested and prefixed),
  state_dict.safetensors (`safetensors.torch.save_file`);
- refused: whole_module.pt (`torch.save(module)`), code.pt (a pickle that would run a command),
  no_state_dict.pt (a dictionary without tensors);
- wrapper.pt and wrapper.safetensors: `AutoregressiveWrapper(model)`'s state dict, and its
  loss (with and without an input mask and ignored targets) and greedy generation;
- decoder.json, decoder.pt, decoder.safetensors: a decoder with cross-attention and its greedy
  generation from a context.
"""

import argparse
import copy
import json
import os

import torch
from safetensors.torch import save_file

from linear_attention_transformer import AutoregressiveWrapper, LinearAttentionTransformerLM

KW = dict(num_tokens=48, dim=32, depth=2, max_seq_len=64, heads=4, dim_head=8, local_attn_window_size=8,
          causal=True, n_local_attn_heads=2, blindspot_size=4)
DECODER = dict(KW, receives_context=True, n_local_attn_heads=1)


class RunsACommand:
    """What a malicious checkpoint holds: unpickling it would call os.system."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def model_with(kw, seed):
    torch.manual_seed(seed)
    model = LinearAttentionTransformerLM(**kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def write_json(path, kw):
    with open(path, "w") as f:
        json.dump(kw, f, indent=1, sort_keys=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "checkpoints"))
    out = ap.parse_args().out
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    p = lambda name: os.path.join(out, name)

    model = model_with(KW, 7)
    # A copy: the optimizer step below changes the parameters in place.
    sd = copy.deepcopy(model.state_dict())
    write_json(p("model.json"), KW)
    tokens = torch.randint(0, KW["num_tokens"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        save_file({"tokens": tokens, "logits": model(tokens).contiguous()}, p("logits.safetensors"))

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    model(tokens).sum().backward()
    opt.step()
    opt.zero_grad()
    # The optimizer moved the weights; put the saved ones back so that every file holds `sd`.
    model.load_state_dict(sd)
    model.eval()

    torch.save(sd, p("legacy.pt"), _use_new_zipfile_serialization=False)
    torch.save(torch.nn.DataParallel(model).state_dict(), p("dataparallel.pt"))
    torch.save(torch.compile(model).state_dict(), p("compiled.pt"))
    torch.save({"model": sd, "optimizer": opt.state_dict(), "step": 10, "epoch": 1, "lr": 1e-3, "best_loss": 2.5}, p("training.pt"))
    torch.save({"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": opt.state_dict(), "loss": 1.25}, p("tutorial.pt"))
    torch.save({"ema_weights": sd, "step": 4}, p("custom_key.pt"))
    wrapped = {"module." + k: v for k, v in sd.items()}
    torch.save({"state_dict": wrapped, "optimizer": opt.state_dict(), "step": 10}, p("legacy_training.pt"), _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in sd.items()}, p("state_dict.safetensors"))

    # The model itself does not pickle (it holds lambdas); any pickled module is refused alike.
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()), p("whole_module.pt"))
    torch.save({"model": RunsACommand()}, p("code.pt"))
    torch.save({"step": 10, "lr": 1e-3, "names": ["a", "b"]}, p("no_state_dict.pt"))

    # AutoregressiveWrapper: its state dict (net.net. prefix), loss and greedy generation.
    wrapper = AutoregressiveWrapper(model)
    torch.save(wrapper.state_dict(), p("wrapper.pt"))
    x = torch.randint(0, KW["num_tokens"], (2, 25), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 25, dtype=torch.bool)
    mask[1, 19:] = False
    ignored = x.clone()
    ignored[0, -1] = -100
    ignored[1, -1] = -100
    start = torch.randint(0, KW["num_tokens"], (2, 5), generator=torch.Generator().manual_seed(3))
    greedy = 1 - 1.5 / KW["num_tokens"]  # top_k keeps int(1.5) = 1 token
    with torch.no_grad():
        loss = wrapper(x, return_loss=True)
        loss_masked = wrapper(x, return_loss=True, input_mask=mask)
        loss_ignored = wrapper(ignored, return_loss=True)
        generated = wrapper.generate(start, 30, filter_thres=greedy)
        single = wrapper.generate(start[:1], 40, filter_thres=greedy)
        eos = int(single[0, 6])
        until_eos = wrapper.generate(start[:1], 40, filter_thres=greedy, eos_token=eos)
    save_file(
        {k: v.contiguous() for k, v in {
            "x": x,
            "mask": mask.to(torch.uint8),
            "ignored": ignored,
            "loss": loss.reshape(1),
            "loss_masked": loss_masked.reshape(1),
            "loss_ignored": loss_ignored.reshape(1),
            "start": start,
            "generated": generated,
            "until_eos": until_eos,
            "eos": torch.tensor([eos]),
            "greedy_thres": torch.tensor([greedy], dtype=torch.float64),
        }.items()},
        p("wrapper.safetensors"),
    )

    # A decoder with cross-attention generating from a context.
    decoder = model_with(DECODER, 11)
    write_json(p("decoder.json"), DECODER)
    torch.save(decoder.state_dict(), p("decoder.pt"))
    context = torch.randn(1, 6, DECODER["dim"], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        decoded = AutoregressiveWrapper(decoder).generate(start[:1], 20, filter_thres=greedy, context=context)
    save_file({"context": context, "start": start[:1].contiguous(), "generated": decoded.contiguous()}, p("decoder.safetensors"))
    print("wrote", sorted(os.listdir(out)))


if __name__ == "__main__":
    main()
