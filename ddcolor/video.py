"""Colorize videos: PyAV decode -> batched `Colorizer` -> temporal stabilisation -> H.264 encode, resumable.

    source --decode (PyAV)--> frames, in presentation order, with their own timestamps
        -> batches of `Colorizer.batch_size` through the same network (`--precision`, `--device`): ab at S x S
        -> `ddcolor.temporal.TemporalStabilizer` on the S x S grid (``--temporal off``: plain per-frame)
        -> ab upsampled to H x W + the frame's full-resolution L -> sRGB -> YUV; the Y plane is then replaced by
           the input's own Y plane, so the luma written is the input's bit for bit (before lossy coding)
        -> encoder (libx264 at ``--crf``; B-frames off so segments join with exact timestamps)
        -> segment files ``seg-NNNNN.nut`` in a work folder ``.<output name>.ddcolor-parts/`` next to the output
    segments + the source's audio and subtitle packets (copied, not re-encoded) --mux--> hidden temp file
        --os.replace--> the output (appears only when complete)

Each frame keeps its pts in the source stream's time base (variable frame rate included); the rotation (display
matrix), sample aspect ratio, container and stream metadata are copied. A segment is complete once its ``.json``
(written last, with the stabiliser state at its end) exists; a re-run with the same source and settings reuses
the complete segments, seeks to the first missing frame and continues, so the result equals an uninterrupted run.

Memory is bounded: one batch of frames, the stabiliser state (two S x S arrays) and the encoder's look-ahead.

Public API:
    VideoColorizer(colorizer, temporal="flow", strength=0.8, crf=18, ...).colorize_video(src, dst) -> VideoResult
    probe_video(path) -> VideoInfo              (raises VideoError naming the file)
    is_video(path) -> bool                      (extension, else container sniffing)
    colorize_media(colorizer, inputs, out, ...) -> ColorizeReport   (what `ddcolor colorize` runs: images + videos)
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import heapq
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ddcolor import storage
from ddcolor._optional import require
from ddcolor.color import lab_to_rgb, rgb_to_lab
from ddcolor.errors import DDColorError
from ddcolor.temporal import TemporalStabilizer

av = require("av", "video", "video colorization")
cv2 = require("cv2", "video", "video colorization")

__all__ = [
    "TEMPORAL_MODES",
    "VIDEO_EXTENSIONS",
    "VideoColorizer",
    "VideoError",
    "VideoInfo",
    "VideoResult",
    "colorize_media",
    "h264_encoder",
    "is_video",
    "probe_video",
]

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".m2ts", ".wmv", ".flv", ".ogv", ".3gp"}
)
TEMPORAL_MODES = ("flow", "off")
_IMAGE_FORMATS = {"image2", "png_pipe", "jpeg_pipe", "webp_pipe", "tiff_pipe", "bmp_pipe", "gif", "apng"}
_FULL_RANGE = {"yuvj420p", "yuvj422p", "yuvj444p"}
WORK_SUFFIX = ".ddcolor-parts"
# ab predictor: float32 (H, W, 3) sRGB frames in [0, 1] -> float32 (B, 2, S, S) a*, b* in Lab units
Predictor = Callable[[list[np.ndarray]], np.ndarray]


class VideoError(DDColorError):
    """A video that cannot be colorized; ``str()`` names the file and says why (and what to do, where possible)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def h264_encoder() -> str:
    """The encoder used: libx264 when the bundled FFmpeg has it (PyAV's wheels do), else MPEG-4 Part 2."""
    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except av.codec.codec.UnknownCodecError:  # pragma: no cover - PyAV wheels ship libx264
        log.warning("this FFmpeg has no libx264; encoding MPEG-4 Part 2 (mpeg4) instead")
        return "mpeg4"


# --- probing -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoInfo:
    """What `probe_video` found. ``frames`` is the container's count (0 = unknown); ``rotation`` in degrees
    counter-clockwise as FFmpeg reports it (0 = none)."""

    path: str
    format: str
    codec: str
    width: int
    height: int
    pix_fmt: str
    time_base: Fraction
    rate: Fraction | None
    frames: int
    duration_s: float | None
    rotation: int
    other_streams: tuple[str, ...]  # "audio:aac", "subtitle:mov_text", ...
    sample_aspect_ratio: Fraction | None = None  # pixel shape (anamorphic video); None = square / unknown


def _open(path: Path) -> Any:
    if not path.is_file():
        raise VideoError(path, "no such file")
    try:
        return av.open(str(path), "r")
    except av.error.InvalidDataError as err:
        raise VideoError(
            path, f"not a video FFmpeg can read (invalid data: {err.strerror}); truncated or not a video"
        ) from None
    except av.error.FFmpegError as err:
        raise VideoError(path, f"cannot open as a video ({type(err).__name__}: {err})") from None


def _video_stream(container: Any, path: Path) -> Any:
    if not container.streams.video:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
        raise VideoError(path, f"has no video stream (streams: {kinds})")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise VideoError(path, f"unsupported video codec {stream.codec.name if stream.codec else '?'}: no decoder")
    return stream


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Open ``path``, check it holds a decodable video stream, decode its first frame, and describe it.

    Raises:
        VideoError: no such file, not a video, truncated beyond reading, no video stream, no decoder, no frame.
    """
    path = Path(path)
    with _open(path) as container:
        stream = _video_stream(container, path)
        if container.format.name in _IMAGE_FORMATS and (stream.frames or 0) <= 1:
            raise VideoError(path, f"is a still image ({container.format.name}), not a video")
        try:
            first = next(container.decode(stream), None)
        except av.error.FFmpegError as err:
            raise VideoError(path, f"cannot decode its {stream.codec_context.name} video ({err})") from None
        if first is None:
            raise VideoError(path, f"its {stream.codec_context.name} video stream has no decodable frame (truncated?)")
        others = tuple(f"{s.type}:{s.codec_context.name if s.codec_context else '?'}" for s in container.streams)
        return VideoInfo(
            path=str(path),
            format=container.format.name,
            codec=stream.codec_context.name,
            width=first.width,
            height=first.height,
            pix_fmt=first.format.name,
            time_base=stream.time_base,
            rate=stream.average_rate or stream.guessed_rate,
            frames=stream.frames or 0,
            duration_s=float(stream.duration * stream.time_base) if stream.duration else None,
            rotation=round(getattr(first, "rotation", 0) or 0),
            sample_aspect_ratio=stream.sample_aspect_ratio or None,
            other_streams=tuple(o for o in others if not o.startswith("video:"))
            + tuple(f"video:{s.codec_context.name}" for s in container.streams.video[1:]),
        )


def is_video(path: str | os.PathLike[str]) -> bool:
    """True for a video extension; for an unknown extension, True when FFmpeg opens it as a non-image container
    with a video stream (container sniffing). Image extensions are never videos here."""
    from ddcolor.imageio import IMAGE_EXTENSIONS

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return True
    if suffix in IMAGE_EXTENSIONS or not path.is_file():
        return False
    try:
        with av.open(str(path), "r") as container:
            return bool(container.streams.video) and container.format.name not in _IMAGE_FORMATS
    except av.error.FFmpegError:
        return False


# --- results -------------------------------------------------------------------------------------------------
@dataclass
class VideoResult:
    """What `VideoColorizer.colorize_video` did. ``frames`` counts all frames of the output (reused segments
    included); ``colorized`` those colorized in this run; ``seconds`` is this run's wall time."""

    source: str
    output: str
    frames: int = 0
    colorized: int = 0
    segments: int = 0
    reused_segments: int = 0
    cuts: list[int] = field(default_factory=list)  # frame indices where the stabiliser reset (this run)
    copied_streams: list[str] = field(default_factory=list)
    dropped_streams: list[str] = field(default_factory=list)
    encoder: str = ""
    seconds: float = 0.0

    @property
    def fps(self) -> float:
        """Frames colorized per second of this run's wall time."""
        return self.colorized / self.seconds if self.seconds else 0.0


# --- the colorizer -------------------------------------------------------------------------------------------
def _colorizer_predictor(colorizer: Any) -> Predictor:
    """ab at S x S from a `ddcolor.colorize.Colorizer`: its own network input (resize, L, gray RGB) and network."""

    @torch.inference_mode()
    def predict(rgbs: list[np.ndarray]) -> np.ndarray:
        x = [torch.from_numpy(r).permute(2, 0, 1)[None].to(colorizer.device) for r in rgbs]
        ab = colorizer.net(torch.cat([colorizer._network_input(t) for t in x]))
        return ab.float().cpu().numpy()

    return predict


class VideoColorizer:
    """Colorize video files with a `Colorizer` (or any ab predictor), stabilised over time.

    Args:
        colorizer: a `ddcolor.colorize.Colorizer` (network, ``input_size`` S, ``batch_size``, device,
            precision, ``ab_upsample``); or None with ``predictor`` and ``size`` (tests, benchmarks).
        temporal: "flow" (stabilise; `ddcolor.temporal`) or "off" (plain per-frame).
        strength: temporal strength s in [0, 1] (weight of the propagated color where the flow is reliable).
        crf: encoder quality (libx264 CRF: 0 lossless .. 51; 18 is visually near-lossless).
        preset: libx264 speed preset.
        segment_frames: frames per resumable segment.
        progress: show a tqdm bar (frames, fps).
        predictor, size, batch_size: the ab predictor (float32 (H, W, 3) frames -> (B, 2, S, S)) used when
            ``colorizer`` is None.
        cut_threshold, min_confidence: when the stabiliser resets (a scene cut; see `TemporalStabilizer`).
    """

    def __init__(
        self,
        colorizer: Any = None,
        *,
        temporal: str = "flow",
        strength: float = 0.8,
        crf: int = 18,
        preset: str = "medium",
        segment_frames: int = 300,
        progress: bool = False,
        predictor: Predictor | None = None,
        size: int | None = None,
        batch_size: int = 1,
        cut_threshold: float = 0.5,
        min_confidence: float = 0.1,
    ) -> None:
        if temporal not in TEMPORAL_MODES:
            raise ValueError(f"temporal must be one of {TEMPORAL_MODES}, got {temporal!r}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"temporal strength must be in [0, 1], got {strength}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in 0..51, got {crf}")
        if segment_frames < 1:
            raise ValueError(f"segment_frames must be >= 1, got {segment_frames}")
        if colorizer is not None:
            self.predict = _colorizer_predictor(colorizer)
            self.size, self.batch_size = colorizer.input_size, colorizer.batch_size
            self.ab_upsample = colorizer.ab_upsample
            self.model_key = f"{type(colorizer.net).__name__}:{colorizer.precision}:{_model_digest(colorizer)}"
        elif predictor is not None and size:
            self.predict, self.size, self.batch_size = predictor, size, batch_size
            self.ab_upsample = "bilinear"
            self.model_key = getattr(predictor, "__qualname__", "predictor")
        else:
            raise ValueError("give a Colorizer, or a predictor and its size")
        self.temporal, self.strength, self.crf, self.preset = temporal, strength, crf, preset
        self.segment_frames, self.progress, self.cut_threshold = segment_frames, progress, cut_threshold
        self.min_confidence = min_confidence
        self.encoder = h264_encoder()

    # --- settings that make segments reusable ---
    def _settings(self, src: Path) -> dict[str, Any]:
        stat = src.stat()
        return {
            "version": 1,
            "source": str(src.resolve()),
            "source_size": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns,
            "model": self.model_key,
            "size": self.size,
            "ab_upsample": self.ab_upsample,
            "temporal": self.temporal,
            "strength": self.strength if self.temporal == "flow" else 0.0,
            "cut_threshold": self.cut_threshold,
            "min_confidence": self.min_confidence,
            "crf": self.crf,
            "preset": self.preset,
            "encoder": self.encoder,
            "segment_frames": self.segment_frames,
        }

    def colorize_video(
        self, src: str | os.PathLike[str], dst: str | os.PathLike[str], *, overwrite: bool = False, keep_work=False
    ) -> VideoResult:
        """Colorize ``src`` into ``dst`` (its extension chooses the container: .mp4, .mkv, .mov, ...).

        Args:
            src: the video file.
            dst: the output file; written under a hidden temporary name and renamed when complete.
            overwrite: replace an existing ``dst``.
            keep_work: keep the segment folder after success (default: removed).

        Raises:
            VideoError: a bad or unsupported input, or an output that cannot be written (names the file).
            FileExistsError: ``dst`` exists and not ``overwrite``.
        """
        src, dst = Path(src), Path(dst)
        start = time.perf_counter()
        info = probe_video(src)
        if dst.resolve() == src.resolve():
            raise VideoError(src, "the output would replace the input; choose another -o")
        if dst.exists() and not overwrite:
            raise FileExistsError(f"output {dst} exists (pass --overwrite to replace it)")
        if info.width % 2 or info.height % 2:
            raise VideoError(src, f"odd frame size {info.width}x{info.height}: H.264 4:2:0 needs even sizes")
        fmt = _output_format(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        work = dst.parent / f".{dst.name}{WORK_SUFFIX}"
        segments = self._reusable_segments(work, src)
        result = VideoResult(str(src), str(dst), encoder=self.encoder, reused_segments=len(segments))
        try:
            self._encode_segments(src, info, work, segments, result)
        except VideoError:  # a bad input (truncated, corrupt): its segments are of no use to a re-run
            shutil.rmtree(work, ignore_errors=True)
            raise
        self._mux(src, info, work, segments, dst, fmt, result)
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
        result.segments = len(segments)
        result.frames = sum(s["frames"] for s in segments)
        result.seconds = time.perf_counter() - start
        return result

    def _reusable_segments(self, work: Path, src: Path) -> list[dict[str, Any]]:
        settings = self._settings(src)
        manifest = work / "manifest.json"
        if work.is_dir():
            try:
                same = json.loads(manifest.read_text()) == settings
            except (OSError, ValueError):
                same = False
            if not same:
                log.info("%s: settings or source changed; discarding its old segments", work)
                shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        _write_atomic(manifest, json.dumps(settings, indent=1))
        segments = []
        while (meta := work / f"seg-{len(segments):05d}.json").is_file():
            record = json.loads(meta.read_text())
            if not (work / record["file"]).is_file():
                break
            segments.append(record)
        for stale in work.glob("seg-*"):  # anything after the last complete segment (a killed run's leftovers)
            if int(stale.name[4:9]) >= len(segments):
                stale.unlink()
        if segments:
            log.info("%s: reusing %d finished segment(s)", work, len(segments))
        return segments

    # --- decode -> colorize -> stabilise -> encode -----------------------------------------------------------
    def _frames(self, src: Path, after_pts: int | None) -> Iterator[Any]:
        """Decoded frames of the first video stream in presentation order, those with pts > ``after_pts`` only
        (seeking to the keyframe before it; falls back to decoding from the start if the seek overshoots)."""
        container = _open(src)
        try:
            stream = _video_stream(container, src)
            stream.thread_type = "AUTO"
            first = True
            if after_pts is not None:
                try:
                    container.seek(after_pts, stream=stream, backward=True, any_frame=False)
                except av.error.FFmpegError:
                    log.info("%s: cannot seek; decoding from the start to resume", src)
            previous = None
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.FFmpegError as err:
                    raise VideoError(src, f"decoding failed at {packet.pts} ({err}); truncated or corrupt") from None
                for frame in frames:
                    frame.pts = _frame_pts(frame, previous, stream)
                    previous = frame.pts
                    if first and after_pts is not None and frame.pts > after_pts:
                        # the seek overshot (a bad index): start again from the beginning
                        container.close()
                        yield from self._frames_from_start(src, after_pts)
                        return
                    first = False
                    if after_pts is None or frame.pts > after_pts:
                        yield frame
        finally:
            container.close()

    def _frames_from_start(self, src: Path, after_pts: int) -> Iterator[Any]:
        with _open(src) as container:
            stream = _video_stream(container, src)
            previous = None
            for frame in container.decode(stream):
                frame.pts = _frame_pts(frame, previous, stream)
                previous = frame.pts
                if frame.pts > after_pts:
                    yield frame

    def _encode_segments(
        self, src: Path, info: VideoInfo, work: Path, segments: list[dict[str, Any]], result: VideoResult
    ) -> None:
        done_frames = sum(s["frames"] for s in segments)
        if segments and segments[-1].get("last"):
            return  # everything was encoded; only the mux remains
        stabilizer = self._stabilizer()
        if segments:
            with np.load(work / segments[-1]["state"]) as state:
                stabilizer.load_state(dict(state))
        after_pts = segments[-1]["last_pts"] if segments else None
        bar = tqdm(
            total=info.frames or None,
            initial=done_frames,
            unit="frame",
            desc=f"colorize {src.name}",
            disable=None if self.progress else True,
        )
        writer: _SegmentWriter | None = None
        index = done_frames
        batch: list[Any] = []

        def flush() -> None:
            nonlocal writer, index
            rgbs = [f.to_ndarray(format="rgb24") for f in batch]
            grays = [f.to_ndarray(format="gray") for f in batch]
            for frame, rgb, ab_i in zip(batch, rgbs, self._stabilised_ab(rgbs, grays, stabilizer), strict=True):
                if stabilizer.stats.cut and index > 0:
                    result.cuts.append(index)
                if writer is None:
                    writer = _SegmentWriter(work, len(segments), info, self)
                writer.add(self._compose(frame, rgb, ab_i))
                index += 1
                result.colorized += 1
                if writer.frames >= self.segment_frames:
                    segments.append(writer.close(stabilizer.state(), last=False))
                    writer = None
            bar.update(len(batch))
            batch.clear()

        try:
            for frame in self._frames(src, after_pts):
                batch.append(frame)
                if len(batch) >= self.batch_size:
                    flush()
            if batch:
                flush()
            missing = info.frames - index if info.frames else 0
            if missing > 2:  # a couple of frames may legitimately fall outside an edit list
                raise VideoError(src, f"truncated: decoded {index} of the {info.frames} frames the container announces")
            if writer is not None:
                segments.append(writer.close(stabilizer.state(), last=True))
            elif segments:  # the stream ended exactly at a segment boundary
                segments[-1]["last"] = True
                _write_atomic(work / f"seg-{len(segments) - 1:05d}.json", json.dumps(segments[-1]))
        finally:
            bar.close()
            if writer is not None and not writer.closed:
                writer.abort()
        if not segments:
            raise VideoError(src, "no frame could be decoded")

    def _stabilizer(self) -> TemporalStabilizer:
        strength = self.strength if self.temporal == "flow" else 0.0
        return TemporalStabilizer(strength, self.cut_threshold, self.min_confidence)

    def _stabilised_ab(
        self, rgbs: list[np.ndarray], grays: list[np.ndarray], stabilizer: TemporalStabilizer
    ) -> Iterator[np.ndarray]:
        """Predict ab (S x S) for a batch of uint8 (H, W, 3) frames and stabilise them in order (a generator: the
        caller reads ``stabilizer.stats`` of each frame as it comes)."""
        ab = self.predict([r.astype(np.float32) / 255.0 for r in rgbs])
        for gray, ab_i in zip(grays, ab, strict=True):
            small = cv2.resize(gray, (self.size, self.size), interpolation=cv2.INTER_AREA)
            yield stabilizer(small, ab_i)

    def _lab_to_rgb(self, rgb: np.ndarray, ab: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3): the L of uint8 ``rgb`` (H, W, 3) + ``ab`` (2, S, S) upsampled to H x W."""
        h, w = rgb.shape[:2]
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
        options = {"align_corners": False} if self.ab_upsample == "bilinear" else {}
        ab_full = F.interpolate(torch.from_numpy(ab)[None], size=(h, w), mode=self.ab_upsample, **options)
        lab = torch.cat([rgb_to_lab(x)[:, :1], ab_full.clamp(-128.0, 127.0)], dim=1)
        return (lab_to_rgb(lab, clamp=True)[0].permute(1, 2, 0) * 255.0).round().to(torch.uint8).numpy()

    def colorize_frames(self, frames: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, bool]]:
        """In-memory frames (no files): uint8 (H, W, 3) RGB in order -> (uint8 (H, W, 3) colorized, cut flag).

        The same prediction and stabilisation as `colorize_video` (the gray for the flow is the Rec.601 luma
        here), without YUV conversion or encoding; used by benchmarks and the playground.
        """
        stabilizer = self._stabilizer()
        batch: list[np.ndarray] = []

        def flush() -> Iterator[tuple[np.ndarray, bool]]:
            grays = [cv2.cvtColor(r, cv2.COLOR_RGB2GRAY) for r in batch]
            for rgb, ab in zip(batch, self._stabilised_ab(batch, grays, stabilizer), strict=True):
                yield self._lab_to_rgb(rgb, ab), stabilizer.stats.cut
            batch.clear()

        for frame in frames:
            batch.append(np.ascontiguousarray(frame, dtype=np.uint8))
            if len(batch) >= self.batch_size:
                yield from flush()
        if batch:
            yield from flush()

    def _compose(self, frame: Any, rgb: np.ndarray, ab: np.ndarray) -> Any:
        """Full-resolution output frame: the frame's L + upsampled ``ab`` -> sRGB -> YUV with the input's Y plane."""
        h = rgb.shape[0]
        out = self._lab_to_rgb(rgb, ab)
        pix_fmt = "yuvj420p" if frame.format.name in _FULL_RANGE else "yuv420p"
        colorspace = frame.colorspace if frame.colorspace in (1, 5, 6) else None  # BT.709 / BT.601; else default
        yuv = av.VideoFrame.from_ndarray(out, format="rgb24").reformat(format=pix_fmt, dst_colorspace=colorspace)
        planes = yuv.to_ndarray()
        planes[:h] = frame.reformat(format=pix_fmt).to_ndarray()[:h]  # the input's luma, bit for bit
        result = av.VideoFrame.from_ndarray(planes, format=pix_fmt)
        result.pts, result.time_base = frame.pts, frame.time_base
        for attr in ("colorspace", "color_range", "color_primaries", "color_trc"):
            with contextlib.suppress(AttributeError, TypeError, ValueError):
                setattr(result, attr, getattr(frame, attr))
        return result

    # --- final mux -------------------------------------------------------------------------------------------
    def _mux(
        self,
        src: Path,
        info: VideoInfo,
        work: Path,
        segments: list[dict[str, Any]],
        dst: Path,
        fmt: str,
        result: VideoResult,
    ) -> None:
        opened: list[Any] = []

        def write(tmp: str) -> None:  # the container format is `fmt`, whatever the temp file is called
            with _open(src) as source, av.open(tmp, "w", format=fmt) as out:
                first_seg = av.open(str(work / segments[0]["file"]))
                opened.append(first_seg)
                video_in = first_seg.streams.video[0]
                video_out = out.add_stream_from_template(video_in)
                video_out.time_base = info.time_base
                src_video = source.streams.video[0]
                for key, value in src_video.metadata.items():
                    video_out.metadata[key] = value
                if info.rotation:
                    video_out.set_display_rotation(info.rotation)
                out.metadata.update(source.metadata)
                copies: dict[int, Any] = {}
                for stream in source.streams:
                    if stream.type not in ("audio", "subtitle"):
                        continue
                    name = f"{stream.type}:{stream.codec_context.name if stream.codec_context else '?'}#{stream.index}"
                    codec = stream.codec_context.name if stream.codec_context else None
                    if codec is None or codec not in out.supported_codecs:
                        result.dropped_streams.append(name)
                        log.warning("%s: %s cannot go into a %s container; dropped (choose .mkv)", src, name, fmt)
                        continue
                    copies[stream.index] = out.add_stream_from_template(stream)
                    for key, value in stream.metadata.items():
                        copies[stream.index].metadata[key] = value
                    result.copied_streams.append(name)
                video_packets = _segment_packets(work, segments, opened)
                other = source.demux([source.streams[i] for i in copies]) if copies else iter(())
                for is_video_packet, packet in _interleave(video_packets, other):
                    packet.stream = video_out if is_video_packet else copies[packet.stream.index]
                    out.mux(packet)

        try:
            storage.write_local_atomic(dst, write)
        except (av.error.FFmpegError, OSError, ValueError) as err:
            raise VideoError(
                dst, f"cannot write the output ({type(err).__name__}: {err}); segments kept in {work}"
            ) from None
        finally:
            for container in opened:
                container.close()


class _SegmentWriter:
    """One segment: frames encoded into ``seg-NNNNN.nut`` (NUT keeps any time base exactly)."""

    def __init__(self, work: Path, number: int, info: VideoInfo, owner: VideoColorizer) -> None:
        self.work, self.number, self.frames, self.closed = work, number, 0, False
        self.name = f"seg-{number:05d}.nut"
        self.tmp = work / f"seg-{number:05d}.nut.tmp"
        self.container = av.open(str(self.tmp), "w", format="nut")
        stream = self.container.add_stream(owner.encoder, rate=info.rate or 25)
        stream.width, stream.height = info.width, info.height
        stream.pix_fmt = "yuvj420p" if info.pix_fmt in _FULL_RANGE else "yuv420p"
        stream.time_base = info.time_base
        stream.codec_context.time_base = info.time_base
        if info.sample_aspect_ratio:
            stream.codec_context.sample_aspect_ratio = info.sample_aspect_ratio
        if owner.encoder == "libx264":
            # bf=0: no B-frames, so dts = pts and independently encoded segments concatenate with exact timestamps
            stream.options = {"crf": str(owner.crf), "preset": owner.preset, "bf": "0"}
        else:
            stream.options = {"qscale": str(max(2, min(31, owner.crf // 2 + 1)))}
        self.stream = stream
        self.first_pts: int | None = None
        self.last_pts: int | None = None

    def add(self, frame: Any) -> None:
        if self.first_pts is None:
            self.first_pts = frame.pts
        self.last_pts = frame.pts
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self, state: dict[str, np.ndarray], last: bool) -> dict[str, Any]:
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()
        self.closed = True
        os.replace(self.tmp, self.work / self.name)
        state_name = f"seg-{self.number:05d}.state.npz"

        def write_state(tmp: str) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a name
                np.savez(fh, **state)

        storage.write_local_atomic(self.work / state_name, write_state)
        record = {
            "file": self.name,
            "frames": self.frames,
            "first_pts": self.first_pts,
            "last_pts": self.last_pts,
            "state": state_name,
            "last": last,
        }
        _write_atomic(self.work / f"seg-{self.number:05d}.json", json.dumps(record))  # marks the segment complete
        return record

    def abort(self) -> None:
        with contextlib.suppress(av.error.FFmpegError):
            self.container.close()
        self.closed = True
        self.tmp.unlink(missing_ok=True)


def _segment_packets(work: Path, segments: list[dict[str, Any]], opened: list[Any]) -> Iterator[Any]:
    """Video packets of all segments in order."""
    for number, record in enumerate(segments):
        container = opened[0] if number == 0 else av.open(str(work / record["file"]))
        if number:
            opened.append(container)
        for packet in container.demux(container.streams.video[0]):
            if packet.size:
                yield packet
        if number:
            container.close()


def _interleave(video: Iterator[Any], other: Iterator[Any]) -> Iterator[tuple[bool, Any]]:
    """Merge two packet streams by decode time (seconds), so the muxer's buffers stay small; yields
    (is_video, packet)."""

    def keyed(packets: Iterator[Any], tag: int) -> Iterator[tuple[Fraction, int, int, Any]]:
        for n, packet in enumerate(packets):
            if packet.size == 0 and packet.pts is None:
                continue
            stamp = packet.dts if packet.dts is not None else packet.pts
            seconds = Fraction(stamp * packet.time_base) if stamp is not None else Fraction(0)
            yield seconds, tag, n, packet

    for _, tag, _, packet in heapq.merge(keyed(video, 0), keyed(other, 1), key=lambda item: item[:3]):
        yield tag == 0, packet


def _frame_pts(frame: Any, previous: int | None, stream: Any) -> int:
    """The frame's pts, or (streams without timestamps) the previous pts plus one frame at the stream's rate."""
    if frame.pts is not None:
        return frame.pts
    if previous is None:
        return 0
    rate = stream.average_rate or stream.guessed_rate or 25
    return previous + max(1, round(1 / (rate * stream.time_base)))


_WRITABLE = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".avi", ".ts", ".m2ts", ".nut"})


def _output_format(dst: Path) -> str:
    """The FFmpeg muxer for the output extension (the extension chooses the container)."""
    formats = {
        ".mp4": "mp4",
        ".m4v": "mp4",
        ".mov": "mov",
        ".mkv": "matroska",
        ".webm": "webm",
        ".avi": "avi",
        ".ts": "mpegts",
        ".m2ts": "mpegts",
        ".nut": "nut",
    }
    fmt = formats.get(dst.suffix.lower())
    if fmt is None:
        raise VideoError(dst, f"cannot write a {dst.suffix or 'suffix-less'} video; use .mp4, .mkv or .mov")
    if fmt == "webm":
        raise VideoError(dst, "WebM cannot hold H.264; use .mkv or .mp4")
    return fmt


def _model_digest(colorizer: Any) -> str:
    """A short digest of the network's parameters (segments made by another model are not reused)."""
    net = colorizer.net
    if not hasattr(net, "state_dict"):
        return "onnx"
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes()[:4096])
    return digest.hexdigest()[:16]


def _write_atomic(path: Path, text: str) -> None:
    storage.write_local_atomic(path, lambda tmp: Path(tmp).write_text(text))


# --- files: images and videos together --------------------------------------------------------------------
def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _split_inputs(
    inputs: Sequence[str | os.PathLike[str]], exclude: Path | None
) -> tuple[list[tuple[Path, Path]], list[str], list[str]]:
    """(video jobs as (source, relative output path), arguments left for the image runner, arguments matching
    nothing at all). Folders and patterns contribute videos by extension; named files are sniffed."""
    from ddcolor.imageio import IMAGE_EXTENSIONS

    videos: list[tuple[Path, Path]] = []
    image_args: list[str] = []
    empty: list[str] = []

    def walk(folder: Path, root: Path) -> tuple[list[tuple[Path, Path]], bool]:
        found, has_images = [], False
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if _is_hidden(relative) or not path.is_file():
                continue
            if exclude is not None and exclude != folder.resolve() and exclude in path.resolve().parents:
                continue
            suffix = path.suffix.lower()
            if suffix in VIDEO_EXTENSIONS:
                found.append((path, path.relative_to(root)))
            has_images |= suffix in IMAGE_EXTENSIONS
        return found, has_images

    for arg in map(str, inputs):
        path = Path(arg)
        if path.is_file():
            if is_video(path):
                videos.append((path, Path(path.name)))
            else:
                image_args.append(arg)
        elif path.is_dir():
            found, has_images = walk(path, path)
            videos += found
            if has_images or not found:
                image_args.append(arg)  # the image runner reports a folder with neither
        elif glob.has_magic(arg):
            parts = path.parts
            root = Path(*parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))] or ["."])
            found, has_images = [], False
            for match in map(Path, sorted(glob.glob(arg, recursive=True))):
                if match.is_dir():
                    sub, sub_images = walk(match, root)
                    found += sub
                    has_images |= sub_images
                elif match.suffix.lower() in VIDEO_EXTENSIONS:
                    found.append((match, match.relative_to(root)))
                else:
                    has_images |= match.suffix.lower() in IMAGE_EXTENSIONS
            videos += found
            if has_images or not found:
                image_args.append(arg)
        else:
            empty.append(arg)
            image_args.append(arg)  # reported as "no such file or folder" by the image runner
    unique, seen = [], set()
    for job in videos:
        if job[0].resolve() not in seen:
            seen.add(job[0].resolve())
            unique.append(job)
    return unique, image_args, empty


def colorize_media(
    colorizer: Any,
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    video: VideoColorizer | None = None,
    format: str | None = None,
    overwrite: bool = False,
    max_pixels: int | None = None,
    progress: bool = False,
) -> Any:
    """`ddcolor.colorize.colorize_files` for images plus `VideoColorizer` for videos, in one `ColorizeReport`.

    Videos keep their container (same extension below ``out``), or take the one of ``out`` when ``out`` names a
    single video file. A bad video is a failed `Skipped` entry; the rest still run.

    Raises:
        ValueError: ``out`` names a video file but the inputs hold other files, or several videos.
    """
    from ddcolor.colorize import ColorizeReport, Skipped, colorize_files

    out = Path(out)
    out_is_video = out.suffix.lower() in VIDEO_EXTENSIONS and not out.is_dir()
    videos, image_args, _ = _split_inputs(inputs, None if out_is_video else out.resolve())
    if out_is_video and (len(videos) != 1 or image_args):
        raise ValueError(f"-o {out} names a single video file but the inputs are not exactly one video")
    if image_args:
        report = colorize_files(
            colorizer, image_args, out, format=format, overwrite=overwrite, max_pixels=max_pixels, progress=progress
        )
    else:
        report = ColorizeReport()
    if not videos:
        return report
    video = video or VideoColorizer(colorizer, progress=progress)
    start = time.perf_counter()
    report.inputs += len(videos)
    sources = {src.resolve() for src, _ in videos}
    for src, relative in videos:
        if out_is_video:
            target = out
        else:  # keep the container where it can hold H.264 and its timestamps, else Matroska
            target = out / (relative if relative.suffix.lower() in _WRITABLE else relative.with_suffix(".mkv"))
        if target.resolve() in sources:
            report.skipped.append(Skipped(str(src), f"output {target} is an input file (choose another -o)"))
            continue
        if target.exists() and not overwrite:
            report.skipped.append(Skipped(str(src), f"output {target} exists (pass --overwrite to replace it)", False))
            continue
        try:
            result = video.colorize_video(src, target, overwrite=overwrite)
        except (VideoError, FileExistsError) as err:
            reason = err.reason if isinstance(err, VideoError) and err.path == str(src) else str(err)
            report.skipped.append(Skipped(str(src), reason))
            log.warning("skipped %s: %s", src, reason)
            continue
        except (RuntimeError, ValueError) as err:  # e.g. out of device memory: report, keep going
            report.skipped.append(Skipped(str(src), f"colorization failed ({type(err).__name__}: {err})"))
            continue
        report.processed.append((src, target))
        log.info("%s -> %s: %d frames, %.1f fps, cuts at %s", src, target, result.frames, result.fps, result.cuts)
        if result.dropped_streams:
            log.warning("%s: streams not copied: %s", target, ", ".join(result.dropped_streams))
    report.seconds += time.perf_counter() - start
    return report


def video_result_dict(result: VideoResult) -> dict[str, Any]:
    """`VideoResult` as a JSON-ready dict (with ``fps``)."""
    return {**asdict(result), "fps": result.fps}
