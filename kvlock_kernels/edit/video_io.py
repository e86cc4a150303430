"""Read and write videos: a video file (mp4, webm, mkv, mov, avi: through ffmpeg), a GIF, one
image, or a folder of frames.

Video files are decoded with the ffmpeg binary that ``imageio-ffmpeg`` ships (the
``[diffusers]`` extra installs it), or with PyAV when that is installed instead.  Frames
come back as one (F, H, W, 3) uint8 RGB array and the file's frame rate.  A folder of
frames is read in natural order of the file names (``frame_2.png`` before
``frame_10.png``); it has no frame rate of its own, so ``fps`` (default 16, Wan's) is used.

``write_video`` writes H.264 mp4 (yuv420p, constant rate factor 18) at the given frame
rate, with no resizing; odd sizes are padded by one edge pixel (yuv420p needs even sizes).
``.gif`` outputs are written with Pillow.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from .errors import EditInputError

__all__ = ["Video", "read_video", "read_raw_frames", "write_video", "list_frame_files", "DEFAULT_FPS",
           "VIDEO_EXTENSIONS", "IMAGE_EXTENSIONS"]

DEFAULT_FPS = 16.0  # Wan2.1 / Wan2.2 generate 16 frames per second
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class Video:
    """Decoded video: ``frames`` (F, H, W, 3) uint8 RGB, ``fps`` frames per second, ``path``."""

    frames: np.ndarray
    fps: float
    path: Optional[str] = None

    @property
    def shape(self) -> Tuple[int, int, int]:
        """(frames, height, width)."""
        return tuple(self.frames.shape[:3])


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_frame_files(folder: str) -> List[str]:
    """Image files of a folder in natural order of their names."""
    names = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
    if not names:
        raise EditInputError(f"folder {folder!r} has no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def _check_exists(path: str, what: str) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path, got {type(path).__name__}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {os.fspath(path)!r}")


def _read_image(path: str, palette_as_mask: bool = False) -> np.ndarray:
    """One image as an array, channels kept: (H, W) for grayscale and 1-bit images, (H, W, 3 | 4)
    for RGB(A); uint8, uint16, int32 or float32.  Palette images are converted to RGBA, or with
    ``palette_as_mask`` give ``index != 0`` (DAVIS-style annotations: index 0 is background)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P" and palette_as_mask:
                return np.asarray(im, dtype=np.uint8) != 0
            return _pil_to_array(im)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise EditInputError(f"could not read image {path!r}: {e}") from None


def _pil_to_array(im) -> np.ndarray:
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=bool)
    if mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(im, dtype=np.uint16)
    if mode == "I":
        return np.asarray(im, dtype=np.int32)
    if mode == "F":
        return np.asarray(im, dtype=np.float32)
    if mode in ("L", "RGB", "RGBA", "LA"):
        return np.asarray(im)
    return np.asarray(im.convert("RGBA"))


def _read_gif(path: str, max_frames: Optional[int]) -> Tuple[List[np.ndarray], Optional[float]]:
    from PIL import Image, ImageSequence, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            durations, frames = [], []
            for frame in ImageSequence.Iterator(im):
                if max_frames is not None and len(frames) >= max_frames:
                    break
                durations.append(frame.info.get("duration") or im.info.get("duration"))
                # Animated GIF frames are composited by Pillow; RGBA keeps transparency.
                frames.append(np.asarray(frame.convert("RGBA")))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise EditInputError(f"could not read GIF {path!r}: {e}") from None
    known = [d for d in durations if d]
    fps = 1000.0 / (sum(known) / len(known)) if known else None
    return frames, fps


def _read_ffmpeg(path: str, max_frames: Optional[int]) -> Tuple[List[np.ndarray], Optional[float]]:
    try:
        import imageio_ffmpeg
    except ImportError:
        return _read_pyav(path, max_frames)
    frames: List[np.ndarray] = []
    try:
        gen = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
        meta = next(gen)
        w, h = meta["size"]
        fps = meta.get("fps")
        try:
            for buf in gen:
                if max_frames is not None and len(frames) >= max_frames:
                    break
                frames.append(np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3))
        finally:
            gen.close()
    except (OSError, RuntimeError, StopIteration, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EditInputError(f"could not read video {path!r} (ffmpeg: {first})") from None
    return frames, (float(fps) if fps else None)


def _read_pyav(path: str, max_frames: Optional[int]) -> Tuple[List[np.ndarray], Optional[float]]:
    try:
        import av
    except ImportError:
        raise ImportError("reading video files needs imageio-ffmpeg or PyAV: "
                          "pip install 'kvlock-kernels[diffusers]'") from None
    frames: List[np.ndarray] = []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise EditInputError(f"{path!r} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            for frame in container.decode(stream):
                if max_frames is not None and len(frames) >= max_frames:
                    break
                frames.append(frame.to_ndarray(format="rgb24"))
    except EditInputError:
        raise
    except Exception as e:  # PyAV raises its own error hierarchy (av.error.*)
        raise EditInputError(f"could not read video {path!r} (PyAV: {e})") from None
    return frames, (float(rate) if rate else None)


def read_raw_frames(path: str, *, max_frames: Optional[int] = None, what: str = "file",
                    palette_as_mask: bool = False) -> Tuple[List[np.ndarray], Optional[float]]:
    """Frames of a video file, a GIF, one image or a folder of images, channels kept (for masks;
    ``palette_as_mask``: palette images give ``index != 0``).

    Returns:
        (frames, fps): a list of (H, W) or (H, W, C) arrays, all of one size, and the frame
        rate (None for images and folders).
    Raises:
        EditInputError when the frames have different sizes (e.g. a folder of mixed images).
    """
    _check_exists(path, what)
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        files = list_frame_files(path)
        if max_frames is not None:
            files = files[:max_frames]
        frames, fps = [_read_image(f, palette_as_mask) for f in files], None
    elif ext in IMAGE_EXTENSIONS:
        return [_read_image(path, palette_as_mask)], None
    else:
        frames, fps = _read_gif(path, max_frames) if ext == ".gif" else _read_ffmpeg(path, max_frames)
        if not frames:
            raise EditInputError(f"{path!r} has no frames")
    shapes = {f.shape[:2] for f in frames}
    if len(shapes) > 1:
        raise EditInputError(f"the frames of {what} {path!r} have different sizes: {sorted(shapes)}")
    return frames, fps


def _to_rgb_uint8(frame: np.ndarray, path: str) -> np.ndarray:
    if frame.dtype == bool:
        frame = frame.astype(np.uint8) * 255
    elif frame.dtype == np.uint16:
        frame = (frame.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif frame.dtype != np.uint8:
        raise EditInputError(f"{path!r}: frames must be 8- or 16-bit images, got {frame.dtype}")
    if frame.ndim == 2:
        frame = np.repeat(frame[:, :, None], 3, axis=2)
    elif frame.shape[2] == 2:  # grayscale + alpha
        frame = np.repeat(frame[:, :, :1], 3, axis=2)
    elif frame.shape[2] == 4:
        frame = frame[:, :, :3]
    return frame


def read_video(path: str, *, max_frames: Optional[int] = None, fps: Optional[float] = None) -> Video:
    """Read a video file, GIF, single image or folder of frames as RGB uint8.

    Arguments:
        path: an mp4 / webm / mkv / mov / avi / gif file, an image, or a folder of images.
        max_frames: read at most this many frames from the start.
        fps: the frame rate to use when the source has none (folders, images) or to
            override the file's; default: the file's, else ``DEFAULT_FPS`` (16).
    Returns:
        Video with frames (F, H, W, 3) uint8.
    Raises:
        FileNotFoundError for a missing path; EditInputError for an unreadable file, a
        folder without images, or frames of different sizes.
    """
    if fps is not None and not (isinstance(fps, (int, float)) and fps > 0 and np.isfinite(fps)):
        raise EditInputError(f"fps must be a positive number, got {fps!r}")
    frames, file_fps = read_raw_frames(path, max_frames=max_frames, what="video")
    path = os.fspath(path)
    rgb = np.stack([_to_rgb_uint8(f, path) for f in frames])
    return Video(rgb, float(fps or file_fps or DEFAULT_FPS), path)


def write_video(path: str, frames: np.ndarray, fps: float, *, crf: int = 18) -> str:
    """Write (F, H, W, 3) uint8 RGB frames to ``path`` at ``fps`` (mp4/mkv/mov: H.264; gif: Pillow).

    Returns the path written.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.lower().endswith(".gif"):
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000.0 / fps), loop=0)
        return path
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:  # yuv420p subsamples chroma by 2 in each direction
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    h, w = frames.shape[1:3]
    try:
        import imageio_ffmpeg
    except ImportError:
        return _write_pyav(path, frames, fps, crf)
    codec = "libvpx-vp9" if path.lower().endswith(".webm") else "libx264"
    params = ["-crf", str(crf)] + (["-b:v", "0"] if codec == "libvpx-vp9" else [])
    writer = imageio_ffmpeg.write_frames(path, (w, h), fps=float(fps), codec=codec, pix_fmt_in="rgb24",
                                         pix_fmt_out="yuv420p", quality=None, macro_block_size=1,
                                         output_params=params, ffmpeg_log_level="error")
    writer.send(None)
    try:
        for f in frames:
            writer.send(np.ascontiguousarray(f))
    finally:
        writer.close()
    return path


def _write_pyav(path, frames, fps, crf):
    from fractions import Fraction

    import av

    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
