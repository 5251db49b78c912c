"""Drives `lat serve` with the official `openai` Python package, unchanged: the models list, a
completion, the same completion streamed (`stream=True`, with usage), several prompts at once,
and a bad request as the client's own exception. Every completion must equal `lat generate`'s.

    pip install openai
    python tools/serve/openai_client.py [--lat target/release/lat] [--model MODEL.safetensors]

Without --model it trains a tiny model (the built-in run's BPE, narrower) for a few steps first.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile

import openai

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def lat_generate(lat, model, prompt, max_new):
    # The text `lat generate` prints: the prompt, the new text, and a closing newline.
    out = subprocess.run([lat, "generate", "--model", model, "--prompt", prompt, "--max-new", str(max_new), "--top-k", "1"], check=True, capture_output=True, text=True)
    assert out.stdout.startswith(prompt) and out.stdout.endswith("\n"), out.stdout
    return out.stdout[len(prompt):-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lat", default=os.path.join(ROOT, "target", "release", "lat"))
    ap.add_argument("--model")
    args = ap.parse_args()
    work = tempfile.mkdtemp()
    model = args.model
    if model is None:
        run = os.path.join(work, "run")
        subprocess.run([args.lat, "train", "--out", run, "--max-steps", "20", "--quiet", "--set", "model.dim=64", "--set", "model.depth=2",
                        "--set", "train.batch_size=4", "--set", "train.eval_every=0", "--set", "train.sample_every=0"], check=True, stdout=subprocess.DEVNULL)
        model = os.path.join(run, "model.safetensors")
    server = subprocess.Popen([args.lat, "serve", "--model", model, "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        base = line.split("http://")[1].split()[0]
        client = openai.OpenAI(base_url=f"http://{base}/v1", api_key="not-needed")

        name = client.models.list().data[0].id
        print("models:", name)

        prompt = "ROMEO:\n"
        whole = client.completions.create(model=name, prompt=prompt, max_tokens=40, temperature=0)
        expected = lat_generate(args.lat, model, prompt, 40)
        assert whole.choices[0].text == expected, (whole.choices[0].text, expected)
        assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 40
        print("completion equals lat generate:", repr(whole.choices[0].text[:60]))

        chunks = client.completions.create(model=name, prompt=prompt, max_tokens=40, temperature=0, stream=True, stream_options={"include_usage": True})
        text, usage, reason = "", None, None
        for chunk in chunks:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                text += c.text
                reason = c.finish_reason or reason
        assert text == expected and reason == "length" and usage.total_tokens == whole.usage.prompt_tokens + 40, (text, reason, usage)
        print("streamed completion equals it, usage", usage.prompt_tokens, "+", usage.completion_tokens)

        several = client.completions.create(model=name, prompt=["To be", "Now is"], max_tokens=10, temperature=0.8, seed=3)
        assert [c.index for c in several.choices] == [0, 1]
        print("two prompts:", [c.text for c in several.choices])

        try:
            client.completions.create(model=name, prompt="", max_tokens=5)
            sys.exit("an empty prompt was accepted")
        except openai.BadRequestError as e:
            assert e.status_code == 400 and e.body["param"] == "prompt", e.body
            print("bad request:", e.status_code, e.body["message"] if isinstance(e.body, dict) else e)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
    assert code == 0, f"lat serve exited with {code}"
    print("openai client: every check passed; the server stopped cleanly")


if __name__ == "__main__":
    main()
