"""A contact sheet: one PNG with a row per video and its frames across, for looking at samples at a glance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

GAP = 2  # pixels of dark grey between frames and rows


def sheet_array(videos: list[torch.Tensor], min_frame_px: int = 64) -> np.ndarray:
    """uint8 (rows, cols, 3) image of `videos` (each (3, T, H, W) in [-1, 1]), frames scaled up by an
    integer factor (nearest neighbour, so pixels stay sharp) until a frame is at least `min_frame_px` tall."""
    if not videos:
        raise ValueError("a contact sheet needs at least one video")
    _, T, H, W = videos[0].shape
    scale = max(1, -(-min_frame_px // H))
    fh, fw = H * scale, W * scale
    cols = max(v.shape[1] for v in videos)
    sheet = np.full((len(videos) * (fh + GAP) + GAP, cols * (fw + GAP) + GAP, 3), 48, dtype=np.uint8)
    for r, video in enumerate(videos):
        frames = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, T, H, W)
        frames = frames.permute(1, 2, 3, 0).numpy().repeat(scale, axis=1).repeat(scale, axis=2)  # (T, fh, fw, 3)
        for c, frame in enumerate(frames):
            y, x = GAP + r * (fh + GAP), GAP + c * (fw + GAP)
            sheet[y:y + fh, x:x + fw] = frame
    return sheet


def write_contact_sheet(path, videos: list[torch.Tensor], min_frame_px: int = 64) -> Path:
    """Write `sheet_array(videos)` as a PNG at `path`; returns the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet_array(videos, min_frame_px)).save(path)
    return path
