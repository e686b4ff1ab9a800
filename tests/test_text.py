"""Wan prompt handling against diffusers' WanPipeline and transformers' T5TokenizerFast.

A tiny tokenizer and a tiny UMT5 encoder are built locally (``text_testlib``); the reference
side reads them with transformers (``AutoTokenizer``, ``UMT5EncoderModel``) and runs diffusers'
own ``prompt_clean`` and ``WanPipeline._get_t5_prompt_embeds``.
"""
import json
import os
import shutil
import types

import numpy as np
import pytest
from text_testlib import (
    load_torch_text_encoder,
    make_tiny_text_encoder,
    make_tiny_tokenizer,
    tokenizer_vocab_size,
)

from anyflow_jax.text import PromptEncoder, load_tokenizer, prompt_clean, tokenize

torch = pytest.importorskip("torch")

LONG = " ".join(["A small red fox runs across a snowy field at sunrise, its breath visible."] * 60)
PROMPTS = [
    "A cat and a dog bake a cake.",
    "Tags &amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt;, &quot;quoted&quot;, &#39;single&#39; &amp; more",
    "Triple &amp;amp;lt; escaped",
    "Un cafÃ© au lait, naÃ¯ve rÃ©sumÃ© â€” itâ€™s mojibake",
    "   leading,\n\n\tnew lines\r\n and   runs of   spaces   ",
    "",
    " \n\t ",
    "Кошка спит; 一只小猫在花园里 🐱 ﬁne ＦＵＬＬ width\u00a0nbsp zero\u200bwidth",
    "literal specials </s> <pad> <unk> inside the prompt",
    LONG,
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Wan pipeline folder: tokenizer/ and text_encoder/."""
    root = tmp_path_factory.mktemp("pipe")
    tok = make_tiny_tokenizer(root / "tokenizer")
    make_tiny_text_encoder(root / "text_encoder", vocab_size=tokenizer_vocab_size(tok), seed=3)
    return str(root)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(tiny, "tokenizer"))
    assert type(tok).__name__ == "T5TokenizerFast"
    return tok


def _hf_tokenize(tok, prompts, max_length):
    out = tok(prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
              return_attention_mask=True)
    return np.asarray(out["input_ids"]), np.asarray(out["attention_mask"])


def test_prompt_clean_matches_diffusers():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean as reference
    for p in PROMPTS:
        assert prompt_clean(p) == reference(p), repr(p)
    # and the values themselves (double unescape, mojibake, whitespace)
    assert prompt_clean(PROMPTS[1]) == "Tags <b>bold</b>, \"quoted\", 'single' & more"
    # ftfy.fix_text unescapes HTML entities once more (text without '<'): three levels undone
    assert prompt_clean(PROMPTS[2]) == "Triple < escaped"
    assert prompt_clean(PROMPTS[3]) == "Un café au lait, naïve résumé — it's mojibake"  # ftfy also uncurls quotes
    assert prompt_clean(PROMPTS[4]) == "leading, new lines and runs of spaces"
    assert prompt_clean(PROMPTS[5]) == prompt_clean(PROMPTS[6]) == ""
    assert "width nbsp zero\u200bwidth" in prompt_clean(PROMPTS[7])


@pytest.mark.parametrize("max_length", [512, 12])
def test_tokenize_matches_transformers(tiny, hf_tokenizer, max_length):
    tok = load_tokenizer(os.path.join(tiny, "tokenizer"))
    cleaned = [prompt_clean(p) for p in PROMPTS]
    ids, mask = tokenize(tok, cleaned, max_length=max_length)
    ref_ids, ref_mask = _hf_tokenize(hf_tokenizer, cleaned, max_length)
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == (len(PROMPTS), max_length)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    # raw (uncleaned) prompts too: newlines, runs of spaces, entities reach the tokenizer
    np.testing.assert_array_equal(tokenize(tok, PROMPTS, max_length)[0], _hf_tokenize(hf_tokenizer, PROMPTS, max_length)[0])
    lengths = mask.sum(1)
    assert lengths[-1] == max_length and ids[-1, -1] == 1  # the long prompt: truncated, </s> kept
    assert lengths[5] == 1 and ids[5, 0] == 1 and not ids[5, 1:].any()  # empty prompt: </s> then <pad>
    if max_length == 512:
        assert len(hf_tokenizer(LONG)["input_ids"]) > 512
        specials = ids[8, :lengths[8]]
        assert {0, 1, 2} <= set(specials.tolist())  # </s> <pad> <unk> in the text are special tokens
    assert tokenize(tok, "one prompt")[0].shape == (1, 512)


def test_tokenizer_folder_variants(tiny, tmp_path):
    """Sentinel tokens declared only in tokenizer_config.json (extra_ids, added at load time like
    transformers does), and the layout transformers' save_pretrained writes (added_tokens_decoder)."""
    from transformers import AutoTokenizer
    extra = make_tiny_tokenizer(tmp_path / "extra", extra_ids=3)
    resaved = str(tmp_path / "resaved")
    AutoTokenizer.from_pretrained(extra).save_pretrained(resaved)
    with open(os.path.join(resaved, "tokenizer_config.json")) as fh:
        assert "<extra_id_2>" in str(json.load(fh)["added_tokens_decoder"])
    prompt = ["a cat <extra_id_1> jumps <extra_id_0><extra_id_2> high", "plain text"]
    for folder in (extra, resaved):
        ours = load_tokenizer(folder)
        hf = AutoTokenizer.from_pretrained(folder)
        assert ours.get_vocab_size() == len(hf) == 303
        ids, mask = tokenize(ours, prompt, max_length=24)
        ref_ids, ref_mask = _hf_tokenize(hf, prompt, 24)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(mask, ref_mask)
        assert {300, 301, 302} <= set(ids[0].tolist())


def test_load_tokenizer_errors(tiny, tmp_path):
    folder = tmp_path / "no_json"
    shutil.copytree(os.path.join(tiny, "tokenizer"), folder)
    os.remove(folder / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(folder)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_tokenizer(tmp_path / "nowhere")


def _diffusers_embeds(tiny, hf_tokenizer, prompts, max_length):
    from diffusers import WanPipeline
    fake = types.SimpleNamespace(text_encoder=load_torch_text_encoder(os.path.join(tiny, "text_encoder")),
                                 tokenizer=hf_tokenizer, _execution_device=torch.device("cpu"))
    with torch.no_grad():
        out = WanPipeline._get_t5_prompt_embeds(fake, prompt=prompts, max_sequence_length=max_length,
                                                device=torch.device("cpu"), dtype=torch.float32)
    return out.numpy()


@pytest.mark.parametrize("max_length", [512, 16])
def test_prompt_encoder_matches_diffusers(tiny, hf_tokenizer, max_length):
    prompts = PROMPTS
    encoder = PromptEncoder.from_pipeline(tiny, max_length=max_length)
    emb, lengths = encoder(prompts)
    ref = _diffusers_embeds(tiny, hf_tokenizer, prompts, max_length)
    emb, lengths = np.asarray(emb), np.asarray(lengths)
    assert emb.dtype == np.float32 and lengths.dtype == np.int32
    assert emb.shape == ref.shape == (len(prompts), max_length, 32)
    err = np.abs(emb - ref).max() / np.abs(ref).max()
    print(f"max_length={max_length}: relative max error {err:.3g}")
    assert err <= 1e-4
    ref_lengths = _hf_tokenize(hf_tokenizer, [prompt_clean(p) for p in prompts], max_length)[1].sum(1)
    np.testing.assert_array_equal(lengths, ref_lengths)
    for e, n in zip(emb, lengths):  # zero exactly from each prompt's length on, non-zero before
        assert not e[n:].any() and np.abs(e[:n]).max(axis=-1).min() > 0
    # one compilation per batch size
    encoder(prompts[::-1])
    assert encoder._embed._cache_size() == 1
    encoder(prompts[:2])
    assert encoder._embed._cache_size() == 2


def test_prompt_encoder_rejects_foreign_tokens(tiny, tmp_path):
    from anyflow_jax.checkpoints.text_encoder import load_text_encoder
    small = make_tiny_text_encoder(tmp_path / "small_vocab", vocab_size=50, seed=0)
    model, params = load_text_encoder(small)
    enc = PromptEncoder(load_tokenizer(os.path.join(tiny, "tokenizer")), model, params, max_length=8)
    with pytest.raises(ValueError, match="vocab_size=50"):
        enc(["Кошка спит на подоконнике, за окном идёт снег."])
