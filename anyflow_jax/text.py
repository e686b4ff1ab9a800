"""Wan prompt handling: cleaning, UMT5 tokenisation and the prompt encoder, as diffusers does it.

Equal to diffusers' ``WanPipeline`` (v0.35):

- :func:`prompt_clean` is ``pipeline_wan.prompt_clean``: ``ftfy.fix_text`` (mojibake), HTML
  unescaped twice (so ``&amp;lt;`` becomes ``<``), stripped, every whitespace run collapsed to
  one space.
- :func:`load_tokenizer` reads a pipeline's ``tokenizer/`` folder with the ``tokenizers`` library
  (``tokenizer.json``; no transformers import, no hub access) and registers the special tokens
  the folder's ``tokenizer_config.json`` / ``special_tokens_map.json`` declare, as transformers'
  ``T5TokenizerFast`` does when it loads the folder (T5 ``extra_ids`` sentinels included).
- :func:`tokenize` is ``tokenizer(prompts, padding="max_length", max_length=512,
  truncation=True, add_special_tokens=True, return_attention_mask=True)``.
- :class:`PromptEncoder` is ``WanPipeline._get_t5_prompt_embeds``: cleaned prompts, tokenised,
  UMT5 ``last_hidden_state``, every position at or past a prompt's token count set to zero.
"""
from __future__ import annotations

import html
import json
import os
import re
from typing import Any, Sequence

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
MAX_LENGTH = 512  # WanPipeline's max_sequence_length

# transformers' SPECIAL_TOKENS_ATTRIBUTES order (the order tokens are registered in)
_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' T5TokenizerFast defaults
_T5_DEFAULTS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


# ----------------------------------------------------------------------------------- cleaning
def prompt_clean(text: str) -> str:
    """diffusers' Wan ``prompt_clean``: fix mojibake, unescape HTML twice, strip, collapse spaces."""
    import ftfy
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


# ----------------------------------------------------------------------------------- tokenizer
def _content(token) -> str:
    return token["content"] if isinstance(token, dict) else str(token)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def _tokenizer_settings(path: str) -> dict:
    """The init settings transformers builds from ``tokenizer_config.json`` and (when the config
    has no ``added_tokens_decoder``) the legacy ``special_tokens_map.json``."""
    cfg_path, map_path = os.path.join(path, TOKENIZER_CONFIG), os.path.join(path, SPECIAL_TOKENS_MAP)
    init = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    if "added_tokens_decoder" not in init and os.path.isfile(map_path):
        for key, value in _read_json(map_path).items():
            if key == "additional_special_tokens" and isinstance(value, list):
                extra = list(init.pop("additional_special_tokens", None) or [])
                have = {_content(t) for t in extra}
                extra += [t for t in value if _content(t) not in have]
                value = extra
            init[key] = value
    cls = str(init.get("tokenizer_class") or "")
    if init.get("from_slow") or (cls.startswith("T5") and init.get("add_prefix_space") is not None):
        raise ValueError(f"{cfg_path}: asks transformers to rebuild the tokenizer from the SentencePiece model "
                         "(from_slow / add_prefix_space); only tokenizer.json is supported here")
    if cls.startswith("T5"):
        for key, value in _T5_DEFAULTS.items():
            init.setdefault(key, value)
        # T5TokenizerFast.__init__: sentinel tokens <extra_id_i> join the additional special tokens
        extra_ids = int(init.get("extra_ids", 100))
        additional = init.get("additional_special_tokens")
        if additional is not None:
            additional = list(additional)
            sentinels = [t for t in additional if "<extra_id_" in _content(t)]
            if not sentinels:
                additional += [f"<extra_id_{i}>" for i in range(extra_ids)]
            elif extra_ids > 0 and extra_ids != len(sentinels):
                raise ValueError(f"{cfg_path}: extra_ids={extra_ids} but additional_special_tokens holds "
                                 f"{len(sentinels)} <extra_id_*> tokens")
        else:
            additional = [f"<extra_id_{i}>" for i in range(extra_ids)]
        init["additional_special_tokens"] = additional
    return init


def load_tokenizer(path):
    """The ``tokenizers.Tokenizer`` of a Wan pipeline's ``tokenizer/`` folder.

    Reads ``tokenizer.json`` and registers, in transformers' order, every special token the
    folder's configs declare that ``tokenizer.json`` does not already hold as an added token
    (so ids agree with ``AutoTokenizer.from_pretrained(path)``). Padding and truncation are set
    up with the folder's pad token and sides; :func:`tokenize` sets the lengths.
    """
    from tokenizers import AddedToken, Tokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected a pipeline's tokenizer/ folder)")
    file = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(file):
        present = sorted(os.listdir(path))
        raise FileNotFoundError(
            f"{path}: no {TOKENIZER_FILE} (found {present or 'nothing'}); the fast-tokenizer serialization "
            "is required (a SentencePiece-only folder can be converted once with transformers: "
            "AutoTokenizer.from_pretrained(path).save_pretrained(path))")
    tok = Tokenizer.from_file(file)
    init = _tokenizer_settings(path)

    existing = {t.content for t in tok.get_added_tokens_decoder().values()}
    to_add: list = []
    queued: set[str] = set()
    decoder = init.get("added_tokens_decoder") or {}
    for _, spec in sorted(((int(k), v) for k, v in decoder.items()), key=lambda kv: kv[0]):
        if isinstance(spec, dict) and spec.get("content") not in existing:
            spec = {k: v for k, v in spec.items() if k in ("content", "single_word", "lstrip", "rstrip",
                                                           "normalized", "special")}
            to_add.append(AddedToken(**spec))
            queued.add(spec["content"])
    specials = [init[a] for a in _SPECIAL_ATTRS if init.get(a) is not None]
    specials += list(init.get("additional_special_tokens") or [])
    for token in specials:
        content = _content(token)
        if content in existing or content in queued:
            continue
        if isinstance(token, dict):
            opts = {k: token[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in token}
            to_add.append(AddedToken(content, special=True, **opts))
        else:
            to_add.append(AddedToken(content, special=True))
        queued.add(content)
    if to_add:
        tok.add_tokens(to_add)
    tok.encode_special_tokens = bool(init.get("split_special_tokens", False))

    pad = init.get("pad_token")
    pad = _content(pad) if pad is not None else "<pad>"
    pad_id = tok.token_to_id(pad)
    if pad_id is None:
        raise ValueError(f"{path}: pad token {pad!r} is not in the vocabulary")
    tok.enable_padding(direction=init.get("padding_side", "right"), pad_id=pad_id, pad_token=pad)
    tok.enable_truncation(MAX_LENGTH, direction=init.get("truncation_side", "right"))
    return tok


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int = MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)``, int32 ``(B, max_length)`` each: padded to ``max_length``,
    truncated to it (the appended ``</s>`` kept), as transformers'
    ``tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
    add_special_tokens=True, return_attention_mask=True)``. Prompts are used as given (clean
    them first with :func:`prompt_clean`, as :class:`PromptEncoder` does)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts to tokenize")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings; got {bad}")
    if int(max_length) < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    padding = tokenizer.padding or {}
    pad_token = padding.get("pad_token", "<pad>")
    pad_id = padding.get("pad_id", tokenizer.token_to_id(pad_token))
    if pad_id is None:
        raise ValueError(f"the tokenizer has no pad token {pad_token!r}; load it with load_tokenizer")
    trunc = tokenizer.truncation or {}
    tokenizer.enable_truncation(int(max_length), stride=0, strategy="longest_first",
                                direction=trunc.get("direction", "right"))
    tokenizer.enable_padding(length=int(max_length), direction=padding.get("direction", "right"),
                             pad_id=pad_id, pad_type_id=0, pad_token=pad_token, pad_to_multiple_of=None)
    encodings = tokenizer.encode_batch(prompts, add_special_tokens=True)
    ids = np.asarray([e.ids for e in encodings], dtype=np.int32)
    mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int32)
    return ids, mask


# ----------------------------------------------------------------------------------- encoder
class PromptEncoder:
    """Prompts -> Wan text embeddings, equal to diffusers' ``WanPipeline._get_t5_prompt_embeds``.

    ``encoder(prompts) -> (embeddings, lengths)``: embeddings float32 ``(B, max_length, d_model)``
    (UMT5 ``last_hidden_state`` of the cleaned, tokenised prompts, zero at positions ``>=`` each
    prompt's token count), lengths int32 ``(B,)`` (tokens incl. ``</s>``). The encoder apply is
    jitted once; JAX compiles it once per batch size. The parameters are a jit argument.
    """

    def __init__(self, tokenizer, encoder, params, *, max_length: int = MAX_LENGTH):
        import jax
        import jax.numpy as jnp

        self.tokenizer = tokenizer
        self.encoder = encoder
        self.params = params
        self.max_length = int(max_length)

        def embed(params, ids, mask):
            hidden = encoder.apply({"params": params}, ids, mask).astype(jnp.float32)
            lengths = jnp.sum(mask > 0, axis=1).astype(jnp.int32)
            # diffusers keeps u[:seq_len] and pads with zeros
            keep = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
            return jnp.where(keep[..., None], hidden, 0.0), lengths

        self._embed = jax.jit(embed)

    @classmethod
    def from_pipeline(cls, folder, *, dtype: Any = None, max_length: int = MAX_LENGTH,
                      model_kwargs=None, progress: bool = False) -> "PromptEncoder":
        """From a diffusers Wan pipeline folder (its ``tokenizer/`` and ``text_encoder/``).
        ``dtype`` is the parameter and compute dtype (float32 by default)."""
        import jax.numpy as jnp

        from anyflow_jax.checkpoints.text_encoder import load_text_encoder
        folder = os.fspath(folder)
        tokenizer = load_tokenizer(os.path.join(folder, "tokenizer"))
        encoder, params = load_text_encoder(os.path.join(folder, "text_encoder"),
                                            dtype=jnp.float32 if dtype is None else dtype,
                                            model_kwargs=model_kwargs, progress=progress)
        return cls(tokenizer, encoder, params, max_length=max_length)

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Cleaned and tokenised prompts: ``(input_ids, attention_mask)`` int32 ``(B, max_length)``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return tokenize(self.tokenizer, [prompt_clean(p) for p in prompts], self.max_length)

    def __call__(self, prompts: str | Sequence[str]):
        ids, mask = self.tokenize(prompts)
        vocab = int(self.encoder.vocab_size)
        if ids.size and int(ids.max()) >= vocab:
            raise ValueError(f"token id {int(ids.max())} is outside the text encoder's vocabulary "
                             f"(vocab_size={vocab}); the tokenizer and text encoder do not belong together")
        return self._embed(self.params, ids, mask)
