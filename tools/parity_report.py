#!/usr/bin/env python
"""Measure fp32 parity of anyflow_jax's Flax models and prompt handling against the PyTorch
references on CPU and write the tables to docs/parity.md.

  python tools/parity_report.py [--out docs/parity.md]

Needs the test extras (torch==2.13.0 CPU, diffusers, transformers, ftfy). Four sections, each
measured the way its tests measure it:

1. Wan DiT vs diffusers' ``WanTransformer3DModel`` (``tests/test_wan_parity.py``): each case builds
   a diffusers model with random weights, saves it with save_pretrained, loads it with
   anyflow_jax's loader (blocks scanned and unrolled), and compares outputs on random inputs with
   per-sample, per-frame times.
2. UMT5 text encoder vs transformers' ``UMT5EncoderModel`` (``tests/test_umt5.py``): tiny random
   encoders saved by transformers, read by ``load_text_encoder`` (layers scanned and unrolled),
   batches with padding masks.
3. Wan VAE vs diffusers' ``AutoencoderKLWan`` (``tests/test_vae.py``): a tiny random VAE with
   Wan2.1's compression, posterior mean and decode, scan chunk 1 and all frames at once.
4. Prompt cleaning and tokenisation vs diffusers' Wan ``prompt_clean`` and transformers'
   ``T5TokenizerFast``, and ``PromptEncoder`` vs ``WanPipeline._get_t5_prompt_embeds``
   (``tests/test_text.py``), on a tiny locally trained tokenizer.

Dev tool only: it puts ``tests/`` on ``sys.path`` to import the tests' helpers
(``text_testlib``: tiny tokenizer and UMT5 checkpoints; ``vae_testlib``: tiny VAE checkpoint), so
it runs from a source checkout, not from an installed package. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import types

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")

_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")

CASES = [
    ("2 heads x 16, 2 layers (RoPE quirk head dim)", dict(num_attention_heads=2, attention_head_dim=16, num_layers=2), (2, 3, 6, 8)),
    ("3 heads x 12, 1 layer, odd frames", dict(num_attention_heads=3, attention_head_dim=12, num_layers=1), (3, 5, 4, 10)),
    ("4 heads x 8, 3 layers, no cross-attn norm", dict(num_attention_heads=4, attention_head_dim=8, num_layers=3, cross_attn_norm=False), (1, 1, 8, 6)),
    ("2 heads x 24, patch (2,2,2)", dict(num_attention_heads=2, attention_head_dim=24, num_layers=2, patch_size=(2, 2, 2)), (2, 4, 6, 6)),
    ("Wan2.1-1.3B width (12 x 128, ffn 8960, text 4096), 1 layer",
     dict(num_attention_heads=12, attention_head_dim=128, num_layers=1, ffn_dim=8960, text_dim=4096, freq_dim=256,
          in_channels=16, out_channels=16, rope_max_seq_len=1024), (2, 3, 4, 6)),
]

# UMT5: (name, make_tiny_text_encoder kwargs, sequence lengths); batch of 3 with padding masks
UMT5_VOCAB = 300
UMT5_CASES = [
    ("2 layers, 4 heads x 8, gated-gelu, 8 buckets / max distance 16", dict(), (7, 40)),
    ("3 layers, 2 heads x 12 (inner 24 != d_model 32), ReLU, 32 buckets / distance 128",
     dict(num_layers=3, num_heads=2, d_kv=12, d_ff=40, feed_forward_proj="relu",
          relative_attention_num_buckets=32, relative_attention_max_distance=128), (20,)),
    ("1 layer, 6 heads x 8, d_model 48, gated-gelu, 32 buckets / distance 128 (umt5-xxl's)",
     dict(num_layers=1, d_model=48, num_heads=6, d_kv=8, d_ff=96,
          relative_attention_num_buckets=32, relative_attention_max_distance=128), (160,)),
]

# VAE: (batch, frames, height, width) of the RGB video; frames = 1 + 4k, non-square
VAE_CASES = [(2, 1, 16, 24), (1, 5, 24, 16), (1, 9, 16, 40)]

# Prompt handling: (label, prompt)
LONG_PROMPT = " ".join(["A small red fox runs across a snowy field at sunrise, its breath visible."] * 60)
PROMPTS = [
    ("plain", "A cat and a dog bake a cake."),
    ("HTML entities, double escaped", "Tags &amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt;, &quot;quoted&quot;, "
                                      "&#39;single&#39; &amp; more"),
    ("HTML entity, triple escaped", "Triple &amp;amp;lt; escaped"),
    ("mojibake", "Un cafÃ© au lait, naÃ¯ve rÃ©sumÃ© â€” itâ€™s mojibake"),
    ("whitespace, newlines, tabs", "   leading,\n\n\tnew lines\r\n and   runs of   spaces   "),
    ("empty", ""),
    ("whitespace only", " \n\t "),
    ("Cyrillic, CJK, emoji, ligature, full width, nbsp, zero width",
     "Кошка спит; 一只小猫在花园里 🐱 ﬁne ＦＵＬＬ width\u00a0nbsp zero\u200bwidth"),
    ("special tokens as text", "literal specials </s> <pad> <unk> inside the prompt"),
    ("over 512 tokens", LONG_PROMPT),
]
TEXT_MAX_LENGTHS = (512, 16)  # Wan's max_sequence_length, and a short one that truncates most prompts


def _versions(*names: str) -> str:
    import importlib
    parts = [f"{n} {importlib.import_module(n).__version__}" for n in names]
    return f"Versions: {', '.join(parts)}; {platform.machine()} CPU."


def _rel(out, ref) -> float:
    return float(np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max())


def _cell(text: str, limit: int = 48) -> str:
    """A markdown table cell showing ``repr(text)`` (shortened) as code."""
    s = repr(text)
    if len(s) > limit:
        s = s[:limit - 1] + "…"
    return "`" + s.replace("|", "\\|") + "`"


def _yes(flag) -> str:
    return "yes" if flag else "**no**"


# ----------------------------------------------------------------------------------- DiT
def dit_section() -> tuple[list[str], float]:
    import jax
    import torch

    from anyflow_jax.checkpoints.diffusers import load_transformer
    from anyflow_jax.interop import reference

    rows = []
    for i, (name, cfg, shape) in enumerate(CASES):
        full = dict(patch_size=(1, 2, 2), in_channels=4, out_channels=4, text_dim=24, freq_dim=32, ffn_dim=40,
                    rope_max_seq_len=32)
        full.update(cfg)
        tm = reference.random_diffusers_model(seed=i, scale=0.02 if full["text_dim"] > 1000 else 0.1, **full)
        rng = np.random.RandomState(i)
        b, f, h, w = shape
        x = rng.randn(b, f, h, w, full["in_channels"]).astype(np.float32)
        t = rng.rand(b, f).astype(np.float32)
        ctx = rng.randn(b, 7, full["text_dim"]).astype(np.float32)
        ref = reference.torch_forward(tm, x, t, ctx)
        errs = []
        with tempfile.TemporaryDirectory() as tmp:
            tm.save_pretrained(tmp, safe_serialization=True)
            for scan in (True, False):
                model, params = load_transformer(tmp, model_kwargs=dict(scan_layers=scan))
                out = np.asarray(jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, None, c))(params, x, t, ctx))
                errs.append(float(np.abs(out - ref).max()))
        rows.append((name, shape, float(np.abs(ref).max()), *errs))
        print(f"{name}: |ref|max {rows[-1][2]:.3g}, max abs error scan {errs[0]:.3g}, unrolled {errs[1]:.3g}", file=sys.stderr)

    lines = [
        "## Wan DiT: diffusers `WanTransformer3DModel`",
        "",
        "The same comparison runs in `tests/test_wan_parity.py` with a 1e-4 bound.",
        "",
        f"Versions: torch {torch.__version__}, diffusers {__import__('diffusers').__version__}, "
        f"jax {jax.__version__}; {platform.machine()} CPU.",
        "",
        "| case | latents (B, F, H, W) | max abs output | max abs error, nn.scan | max abs error, unrolled |",
        "|---|---|---|---|---|",
    ]
    for name, shape, mx, e_scan, e_loop in rows:
        lines.append(f"| {name} | {shape} | {mx:.3g} | {e_scan:.2e} | {e_loop:.2e} |")
    lines += ["", "Times are drawn per sample and per frame in [0, 1]; diffusers receives them as per-token "
              "timesteps (tau x 1000 repeated over each frame's tokens), which its Wan forward supports.", ""]
    worst = max(max(e_scan, e_loop) / mx for _, _, mx, e_scan, e_loop in rows)
    return lines, worst


# ----------------------------------------------------------------------------------- UMT5
def _umt5_inputs(length: int, seed: int):
    """Batch of 3 like tests/test_umt5.py: no padding, padded after 60% of the tokens, one token."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, UMT5_VOCAB, size=(3, length)).astype(np.int64)
    mask = np.ones((3, length), np.int64)
    mask[1, int(0.6 * length):] = 0
    mask[2, 1:] = 0
    ids[mask == 0] = 0  # pad id, as the tokenizer writes it
    return ids, mask


def umt5_section(tmp: str) -> tuple[list[str], float]:
    import jax
    import torch
    from text_testlib import load_torch_text_encoder, make_tiny_text_encoder

    from anyflow_jax.checkpoints.text_encoder import load_text_encoder

    rows = []
    for i, (name, kwargs, lengths) in enumerate(UMT5_CASES):
        path = make_tiny_text_encoder(os.path.join(tmp, f"umt5_{i}"), vocab_size=UMT5_VOCAB, seed=1 + i, **kwargs)
        tm = load_torch_text_encoder(path)
        fns = {}
        for scan in (True, False):
            model, params = load_text_encoder(path, model_kwargs=dict(scan_layers=scan))
            fns[scan] = (jax.jit(lambda p, ids, mask, m=model: m.apply({"params": p}, ids, mask)), params)
        for length in lengths:
            ids, mask = _umt5_inputs(length, seed=length)
            with torch.no_grad():
                ref = tm(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.float().numpy()
            errs = [float(np.abs(np.asarray(fn(p, ids, mask)) - ref).max()) for fn, p in (fns[True], fns[False])]
            far = length > tm.config.relative_attention_max_distance
            label = f"{name}; {length} tokens{' (> max distance)' if far else ''}"
            rows.append((label, ids.shape, float(np.abs(ref).max()), *errs))
            print(f"UMT5 {label}: |ref|max {rows[-1][2]:.3g}, max abs error scan {errs[0]:.3g}, "
                  f"unrolled {errs[1]:.3g}", file=sys.stderr)

    lines = [
        "## UMT5 text encoder: transformers `UMT5EncoderModel`",
        "",
        "Tiny random encoders written by transformers' `save_pretrained` (`tests/text_testlib.py` "
        "`make_tiny_text_encoder`: embedding N(0, 1), linears N(0, 1/fan_in), layer-norm scales "
        "1 + N(0, 0.2^2), relative-bias tables N(0, 1)) and read by `load_text_encoder` with the layers "
        "under `nn.scan` and unrolled; output = `last_hidden_state`. Each batch holds 3 sequences: no "
        "padding, padded after 60% of the tokens, a single token (padding masks; padded positions "
        "compared too). The same comparison runs in `tests/test_umt5.py` with a 1e-4 bound on the "
        "relative max error (max |ours - transformers| / max |transformers|).",
        "",
        _versions("torch", "transformers", "jax", "flax"),
        "",
        "| case | input ids (B, L) | max abs output | max abs error, nn.scan | max abs error, unrolled "
        "| relative max error (worst) |",
        "|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for label, shape, mx, e_scan, e_loop in rows:
        rel = max(e_scan, e_loop) / mx
        worst = max(worst, rel)
        lines.append(f"| {label} | {shape} | {mx:.3g} | {e_scan:.2e} | {e_loop:.2e} | {rel:.2e} |")
    lines.append("")
    return lines, worst


# ----------------------------------------------------------------------------------- VAE
def vae_section(tmp: str) -> tuple[list[str], float]:
    import jax
    import torch
    from diffusers import AutoencoderKLWan
    from vae_testlib import make_tiny_vae, tiny_vae_config

    from anyflow_jax.checkpoints.vae import load_vae

    def to_torch(x):
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 4, 1, 2, 3)

    def to_np(t):
        return t.permute(0, 2, 3, 4, 1).detach().numpy()

    path = make_tiny_vae(os.path.join(tmp, "vae"), seed=0)
    tvae = AutoencoderKLWan.from_pretrained(path).eval()
    model, params = load_vae(path)
    chunks = (1, None)
    rows, inside = [], []  # inside: fraction of diffusers' decoded values strictly inside (-1, 1)
    for b, f, h, w in VAE_CASES:
        rng = np.random.RandomState(f)
        x = rng.uniform(-1, 1, (b, f, h, w, 3)).astype(np.float32)
        with torch.no_grad():
            dist = tvae.encode(to_torch(x)).latent_dist
        ref_mean, ref_logvar = to_np(dist.mean), to_np(dist.logvar)
        z = rng.randn(*ref_mean.shape).astype(np.float32)
        with torch.no_grad():
            ref_video = to_np(tvae.decode(to_torch(z)).sample)
        inside.append(float(np.mean(np.abs(ref_video) < 1.0)))
        enc, logvar, dec = [], [], []
        for chunk in chunks:
            mean, lv = jax.jit(lambda p, x, c=chunk: model.apply({"params": p}, x, method="encode_moments", chunk=c))(
                params, x)
            video = jax.jit(lambda p, z, c=chunk: model.apply({"params": p}, z, method="decode", chunk=c))(params, z)
            enc.append(_rel(mean, ref_mean))
            logvar.append(_rel(lv, ref_logvar))
            dec.append(_rel(video, ref_video))
        rows.append(((b, f, h, w, 3), ref_mean.shape, float(np.abs(ref_mean).max()), enc, max(logvar),
                     inside[-1], dec))
        print(f"VAE video {(b, f, h, w, 3)}: encode mean rel err {enc[0]:.3g} / {enc[1]:.3g}, logvar "
              f"{max(logvar):.3g}, decode rel err {dec[0]:.3g} / {dec[1]:.3g} (chunk 1 / None)", file=sys.stderr)

    cfg = tiny_vae_config(0)
    lines = [
        "## Wan VAE: diffusers `AutoencoderKLWan`",
        "",
        "A tiny random VAE with Wan2.1's layout and compression (8x in space, 4x in time; "
        f"`tests/vae_testlib.py` `make_tiny_vae`: base_dim {cfg['base_dim']}, z_dim {cfg['z_dim']}, "
        f"dim_mult {cfg['dim_mult']}, temporal downsampling {cfg['temperal_downsample']}, every parameter "
        "perturbed by 0.1 N(0, 1)) written by diffusers' `save_pretrained` and read by `load_vae`. "
        "Encode = posterior mean (`encode(x).latent_dist.mean`; the log-variance is compared too) of a "
        "video uniform in [-1, 1]; decode = `decode(z).sample` (clamped to [-1, 1] on both sides) of "
        "N(0, 1) latents; \"decoded inside (-1, 1)\" is the share of diffusers' decoded values the clamp "
        "leaves alone (so it does not hide differences). Ours runs with scan chunk 1 (the first frame, "
        "then one latent frame = 4 video frames per scan step) and chunk None (all frames at once). Errors are relative: max |ours - "
        "diffusers| / max |diffusers|. The same comparison runs in `tests/test_vae.py` with a 1e-4 bound.",
        "",
        _versions("torch", "diffusers", "jax", "flax"),
        "",
        "| video (B, F, H, W, C) | latents (B, f, h, w, C) | max abs mean | encode mean, chunk 1 "
        "| encode mean, chunk None | logvar (worst) | decoded inside (-1, 1) | decode, chunk 1 | decode, chunk None |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for vshape, zshape, mx_m, enc, lv, frac, dec in rows:
        worst = max(worst, *enc, lv, *dec)
        lines.append(f"| {vshape} | {tuple(zshape)} | {mx_m:.3g} | {enc[0]:.2e} | {enc[1]:.2e} | {lv:.2e} "
                     f"| {frac:.0%} | {dec[0]:.2e} | {dec[1]:.2e} |")
    lines.append("")
    return lines, worst


# ----------------------------------------------------------------------------------- prompts
def text_section(tmp: str) -> tuple[list[str], float, int]:
    import jax
    import torch
    from diffusers import WanPipeline
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean as reference_clean
    from text_testlib import (
        load_torch_text_encoder,
        make_tiny_text_encoder,
        make_tiny_tokenizer,
        tokenizer_vocab_size,
    )
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from anyflow_jax.text import PromptEncoder, load_tokenizer, prompt_clean, tokenize

    root = os.path.join(tmp, "pipe")
    tok_dir = make_tiny_tokenizer(os.path.join(root, "tokenizer"))
    make_tiny_text_encoder(os.path.join(root, "text_encoder"), vocab_size=tokenizer_vocab_size(tok_dir), seed=3)
    hf = AutoTokenizer.from_pretrained(tok_dir)
    hf_logging.set_verbosity_error()  # the untruncated long prompt would warn about its length
    ours = load_tokenizer(tok_dir)

    def hf_tokenize(prompts, max_length):
        out = hf(prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                 return_attention_mask=True)
        return np.asarray(out["input_ids"]), np.asarray(out["attention_mask"])

    raw = [p for _, p in PROMPTS]
    cleaned = [prompt_clean(p) for p in raw]
    ref_cleaned = [reference_clean(p) for p in raw]
    same_ids, same_mask = [], []
    for max_length in TEXT_MAX_LENGTHS:
        ids, mask = tokenize(ours, ref_cleaned, max_length=max_length)
        ref_ids, ref_mask = hf_tokenize(ref_cleaned, max_length)
        same_ids.append((ids == ref_ids).all(axis=1))
        same_mask.append((mask == ref_mask).all(axis=1))
        if max_length == TEXT_MAX_LENGTHS[0]:
            counts = mask.sum(1)
            eos_last = all(ids[i, n - 1] == 1 for i, n in enumerate(counts))  # </s> (id 1) ends every prompt
    raw_same = all(np.array_equal(tokenize(ours, raw, n)[0], hf_tokenize(raw, n)[0]) for n in TEXT_MAX_LENGTHS)
    untruncated = [len(hf(p)["input_ids"]) for p in ref_cleaned]

    emb_rows = []
    fake = types.SimpleNamespace(text_encoder=load_torch_text_encoder(os.path.join(root, "text_encoder")),
                                 tokenizer=hf, _execution_device=torch.device("cpu"))
    for max_length in TEXT_MAX_LENGTHS:
        encoder = PromptEncoder.from_pipeline(root, max_length=max_length)
        emb, lengths = (np.asarray(a) for a in encoder(raw))
        with torch.no_grad():
            ref = WanPipeline._get_t5_prompt_embeds(fake, prompt=raw, max_sequence_length=max_length,
                                                    device=torch.device("cpu"), dtype=torch.float32).numpy()
        ref_lengths = hf_tokenize(ref_cleaned, max_length)[1].sum(1)
        err = float(np.abs(emb - ref).max())
        emb_rows.append((max_length, ref.shape, float(np.abs(ref).max()), err, err / np.abs(ref).max(),
                         np.array_equal(lengths, ref_lengths)))
        print(f"PromptEncoder max_length={max_length}: max abs error {err:.3g}, relative {emb_rows[-1][4]:.3g}",
              file=sys.stderr)

    lines = [
        "## Prompt cleaning, tokenisation and prompt embeddings: diffusers `WanPipeline`",
        "",
        "Cleaning: `anyflow_jax.text.prompt_clean` vs diffusers' `diffusers.pipelines.wan.pipeline_wan."
        "prompt_clean` (ftfy, HTML unescaped twice, whitespace collapsed). Tokenisation: "
        "`load_tokenizer` + `tokenize` (the `tokenizers` library only) vs transformers' `AutoTokenizer` "
        "(a `T5TokenizerFast`) called as WanPipeline calls it (`padding=\"max_length\"`, "
        "`truncation=True`, `add_special_tokens=True`), both on diffusers' cleaned text, on the tiny "
        "T5-style Unigram tokenizer of `tests/text_testlib.py` `make_tiny_tokenizer` (300 pieces, NFKC, "
        f"Metaspace, `</s>` appended), at max_length {TEXT_MAX_LENGTHS[0]} (Wan's) and "
        f"{TEXT_MAX_LENGTHS[1]} (truncates most prompts). The same checks run in `tests/test_text.py`. The tiny "
        "tokenizer is trained afresh on every run and the `tokenizers` Unigram trainer is not deterministic, "
        "so its pieces, and with them the token counts and embedding errors below, can vary slightly "
        "between runs.",
        "",
        _versions("transformers", "tokenizers", "diffusers", "ftfy"),
        "",
        f"| prompt | input | cleaned (ours) | cleaned identical | ids identical ({' / '.join(map(str, TEXT_MAX_LENGTHS))}) "
        f"| mask identical ({' / '.join(map(str, TEXT_MAX_LENGTHS))}) | tokens at {TEXT_MAX_LENGTHS[0]} (untruncated) |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (label, p) in enumerate(PROMPTS):
        ids_cell = " / ".join(_yes(s[i]) for s in same_ids)
        mask_cell = " / ".join(_yes(s[i]) for s in same_mask)
        lines.append(f"| {label} | {_cell(p)} | {_cell(cleaned[i])} | {_yes(cleaned[i] == ref_cleaned[i])} "
                     f"| {ids_cell} | {mask_cell} | {int(counts[i])} ({untruncated[i]}) |")
    lines += [
        "",
        f"Token counts include the appended `</s>`; `</s>` is the last token of every prompt, the truncated "
        f"one included: {_yes(eos_last)}. "
        f"The raw, uncleaned prompts tokenise identically as well: {_yes(raw_same)}.",
        "",
        "Prompt embeddings: `PromptEncoder.from_pipeline` (our tokenizer + Flax UMT5, fp32) vs "
        "`WanPipeline._get_t5_prompt_embeds` (called on a stand-in pipeline object holding transformers' "
        "tokenizer and `UMT5EncoderModel`, as in `tests/test_text.py`) on all the prompts above in one batch; "
        "tiny random UMT5 encoder (`make_tiny_text_encoder`, d_model 32, 2 layers, seed 3). "
        f"Versions: torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
        f"diffusers {__import__('diffusers').__version__}, jax {jax.__version__}.",
        "",
        "| max_length | embeddings (B, L, D) | max abs output | max abs error | relative max error | "
        "prompt lengths identical |",
        "|---|---|---|---|---|---|",
    ]
    for max_length, shape, mx, err, rel, same_len in emb_rows:
        lines.append(f"| {max_length} | {tuple(shape)} | {mx:.3g} | {err:.2e} | {rel:.2e} | {_yes(same_len)} |")
    lines.append("")
    mismatches = sum(c != r for c, r in zip(cleaned, ref_cleaned)) + sum(int((~s).sum()) for s in same_ids + same_mask)
    return lines, max(r[4] for r in emb_rows), mismatches


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "parity.md"))
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.normpath(_TESTS))  # the tests' helpers build the tiny checkpoints

    dit, dit_worst = dit_section()
    with tempfile.TemporaryDirectory() as tmp:
        umt5, umt5_worst = umt5_section(tmp)
        vae, vae_worst = vae_section(tmp)
        text, text_worst, mismatches = text_section(tmp)

    lines = [
        "# Parity with diffusers and transformers (fp32, CPU)",
        "",
        "Produced by `python tools/parity_report.py`: the Flax Wan DiT, UMT5 text encoder and Wan VAE "
        "against the PyTorch reference models with the same (random) weights, and the prompt pipeline "
        "against diffusers' Wan pipeline. Worst relative max error (max |ours - reference| / "
        f"max |reference|): DiT {dit_worst:.1e}, UMT5 {umt5_worst:.1e}, VAE {vae_worst:.1e}, prompt "
        f"embeddings {text_worst:.1e}; prompt cleaning and tokenisation mismatches: {mismatches}.",
        "",
    ]
    lines += dit + umt5 + vae + text
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))
    print(f"worst relative error: DiT {dit_worst:.3g}, UMT5 {umt5_worst:.3g}, VAE {vae_worst:.3g}, "
          f"prompt embeddings {text_worst:.3g}; text mismatches {mismatches}", file=sys.stderr)
    print(f"wrote {os.path.normpath(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
