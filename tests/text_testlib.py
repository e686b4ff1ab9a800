"""Tiny, locally built stand-ins for a Wan pipeline's ``tokenizer/`` and ``text_encoder/`` folders.

Nothing is downloaded:

- :func:`make_tiny_tokenizer` trains a small T5-style Unigram tokenizer with the ``tokenizers``
  library on text written here and saves it so that both transformers'
  ``AutoTokenizer.from_pretrained(path)`` (a ``T5TokenizerFast``) and
  :func:`anyflow_jax.text.load_tokenizer` read it.
- :func:`make_tiny_text_encoder` saves a tiny random transformers ``UMT5EncoderModel`` with
  ``save_pretrained`` (safetensors).

Both return the folder they wrote. To build a tiny Wan pipeline folder::

    tok = make_tiny_tokenizer(root / "tokenizer")
    enc = make_tiny_text_encoder(root / "text_encoder", vocab_size=tokenizer_vocab_size(tok), seed=0)
    # the transformer's text_dim must equal the encoder's d_model (default TINY_D_MODEL = 32)

torch and transformers are imported inside the functions (test-only dependencies).
"""
from __future__ import annotations

import json
import os

TINY_D_MODEL = 32

# Training text for the tiny tokenizer: plain sentences, accents, punctuation, digits, a little
# CJK and Cyrillic, so common prompt words get pieces and the rest falls back to characters.
_CORPUS = """\
A small red fox runs across a snowy field at sunrise, its breath visible in the cold air.
Two children fly a kite on a windy beach while waves roll onto the sand.
The camera slowly pans over a busy city street at night, neon signs reflecting in puddles.
An old man plays the violin in a quiet park; pigeons gather around his feet.
A chef in a white hat flips vegetables in a pan, flames leaping up from the stove.
Close-up of a hummingbird drinking nectar from a bright purple flower, wings a blur.
A cat and a dog sit together by the window, watching the rain fall on the garden.
Time-lapse of clouds drifting over green mountains, shadows sliding across the valley.
A robot walks through a futuristic laboratory filled with glowing blue screens.
Slow motion: a drop of milk splashes into a cup of coffee, forming a perfect crown.
The astronaut floats outside the space station, Earth turning slowly below.
A ballerina spins on a dark stage under a single white spotlight.
Fish swim through a colourful coral reef as sunlight ripples through the water.
A vintage car drives along a coastal road at dusk; the sea glows orange and pink.
Bright tones, overexposed, static, blurred details, subtitles, worst quality, low quality.
JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands and faces.
Un café au lait sur une table en bois, la vapeur monte doucement dans la lumière du matin.
Ein Hund läuft über die grüne Wiese; die Sonne scheint, und Vögel singen im Baum.
El niño corre por la playa y la ola moja sus pies; ¡qué alegría!
Кошка спит на подоконнике, за окном идёт снег.
一只小猫在花园里追逐蝴蝶，阳光明媚。
猫和狗在下雨天一起看着窗外。
Numbers like 1, 2, 3, 10, 42, 2025 and 3.14 appear in prompts; so do quotes "like this" and 'that'.
Symbols: & < > # @ % + = / ( ) [ ] { } * ~ - _ : ; ! ? … — – "smart quotes" and naïve résumé façade.
"""


def make_tiny_tokenizer(directory, *, vocab_size: int = 300, extra_ids: int = 0) -> str:
    """Train and save a tiny T5-style tokenizer in ``directory`` (created); returns its path.

    Structure like the tokenizer.json that transformers converts from T5's SentencePiece model:
    Unigram model; normalizer NFKC (standing in for SentencePiece's precompiled NFKC charsmap)
    -> strip right -> runs of 2+ spaces to "▁"; Metaspace pre-tokenizer and decoder ("▁",
    prepend always); post-processor appending ``</s>``. Special tokens ``<pad>`` = 0,
    ``</s>`` = 1, ``<unk>`` = 2.

    Files: ``tokenizer.json``, ``tokenizer_config.json`` (``tokenizer_class`` "T5TokenizerFast",
    ``model_max_length`` 512, ``extra_ids``) and ``special_tokens_map.json``.

    ``extra_ids`` > 0 declares T5 sentinel tokens ``<extra_id_0..n-1>`` in the config files only
    (not in tokenizer.json), so readers must add them as transformers does when loading; they get
    ids from ``vocab_size`` upwards. With the default 0 the vocabulary is exactly ``vocab_size``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKC(), normalizers.Strip(left=False, right=True),
        normalizers.Replace(Regex(" {2,}"), "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines() * 3, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tiny tokenizer trained to {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    for i, name in enumerate(["<pad>", "</s>", "<unk>"]):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tok.save(os.path.join(directory, "tokenizer.json"))

    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    extras = [f"<extra_id_{i}>" for i in range(extra_ids)]
    if extras:
        special["additional_special_tokens"] = extras
    config = dict(special, tokenizer_class="T5TokenizerFast", model_max_length=512, extra_ids=extra_ids,
                  padding_side="right", truncation_side="right", clean_up_tokenization_spaces=False)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as fh:
        json.dump(special, fh, indent=2)
    return directory


def tokenizer_vocab_size(directory) -> int:
    """Token ids a tiny tokenizer can produce (its tokenizer.json vocabulary; extra ids excluded)."""
    from tokenizers import Tokenizer
    return Tokenizer.from_file(os.path.join(os.fspath(directory), "tokenizer.json")).get_vocab_size()


def make_tiny_text_encoder(directory, vocab_size: int = 300, seed: int = 0, *, d_model: int = TINY_D_MODEL,
                           num_layers: int = 2, num_heads: int = 4, d_kv: int = 8, d_ff: int = 48,
                           relative_attention_num_buckets: int = 8, relative_attention_max_distance: int = 16,
                           feed_forward_proj: str = "gated-gelu", max_shard_size=None) -> str:
    """Save a tiny random transformers ``UMT5EncoderModel`` in ``directory``; returns its path.

    Weights (deterministic in ``seed``): embedding N(0, 1), every linear N(0, 1/fan_in), layer
    norm scales 1 + N(0, 0.2^2) and relative-bias tables N(0, 1), so that norms, attention
    content and position buckets all visibly shape the output. The small
    ``relative_attention_max_distance`` (16) lets short test sequences reach the shared far
    bucket. ``max_shard_size`` (e.g. ``"20KB"``) writes ``model-0000x-of-0000y.safetensors`` shards
    with ``model.safetensors.index.json``; by default one ``model.safetensors``.
    """
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    directory = os.fspath(directory)
    cfg = UMT5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
                     num_heads=num_heads, relative_attention_num_buckets=relative_attention_num_buckets,
                     relative_attention_max_distance=relative_attention_max_distance,
                     feed_forward_proj=feed_forward_proj, dropout_rate=0.0, is_encoder_decoder=False,
                     use_cache=False)
    model = UMT5EncoderModel(cfg).eval()
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("relative_attention_bias.weight") or name == "shared.weight":
                p.copy_(noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)
    kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(directory, **kwargs)
    return directory


def load_torch_text_encoder(directory, dtype=None):
    """transformers' ``UMT5EncoderModel`` from ``directory`` in eval mode (float32 by default)."""
    import torch
    from transformers import UMT5EncoderModel
    return UMT5EncoderModel.from_pretrained(os.fspath(directory), dtype=dtype or torch.float32).eval()
