"""Video colorization: timestamps, audio, subtitles and rotation survive; luma is the input's; bad inputs; cut
reset; flicker reduction; resume after a crash and after a kill. Small frames, a stub ab predictor (or a random-init
atto where the real network path matters)."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
cv2 = pytest.importorskip("cv2")

from ddcolor.metrics import color_distribution_consistency, video_psnr_colorfulness, video_warp_error  # noqa: E402
from ddcolor.temporal import TemporalStabilizer  # noqa: E402
from ddcolor.video import VideoColorizer, VideoError, colorize_media, is_video, probe_video  # noqa: E402
from ddcolor.video_synth import ab_of, cut_clip, render_clip  # noqa: E402

TB = Fraction(1, 90000)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The color math on tiny frames is faster on one thread (and this machine's 2 cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_clip(
    path: Path,
    frames: int = 12,
    size: tuple[int, int] = (48, 64),
    vfr: bool = True,
    rotation: int = 0,
    audio: bool = True,
    subtitles: bool = False,
    content: np.ndarray | None = None,
    sar: Fraction | None = None,
) -> Path:
    """A gray H.264 clip (time base 1/90000, VFR by default) with optional AAC audio, SRT subtitles and rotation."""
    h, w = size
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt, video.time_base = w, h, "yuv420p", TB
        video.codec_context.time_base = TB
        video.options = {"preset": "ultrafast"}
        if rotation:
            video.set_display_rotation(rotation)
        if sar:
            video.codec_context.sample_aspect_ratio = sar
        sound = container.add_stream("aac", rate=8000) if audio else None
        if sound is not None:
            sound.layout = "mono"
        subs = container.add_mux_stream("subrip") if subtitles else None
        if subs is not None:
            subs.metadata["language"] = "fra"
        pts = 0
        for i in range(frames):
            if content is not None:
                gray = content[i]
            else:
                gray = np.full((h, w), 60 + 2 * i, np.uint8)
                gray[:, (3 * i) % w :] = 170  # a moving edge
            frame = av.VideoFrame.from_ndarray(np.repeat(gray[..., None], 3, axis=2), format="rgb24")
            frame.pts, frame.time_base = pts, TB
            for packet in video.encode(frame):
                container.mux(packet)
            pts += 3600 * (1 + (i % 3 if vfr else 0))  # 40, 80, 120 ms steps: variable frame rate
        for packet in video.encode(None):
            container.mux(packet)
        if sound is not None:
            for start in range(0, int(8000 * pts * TB), 1024):
                data = (0.1 * rng.standard_normal((1, 1024))).astype(np.float32)
                frame = av.AudioFrame.from_ndarray(data, format="fltp", layout="mono")
                frame.sample_rate, frame.pts = 8000, start
                for packet in sound.encode(frame):
                    container.mux(packet)
            for packet in sound.encode(None):
                container.mux(packet)
        if subs is not None:
            for k, text in enumerate([b"first line", b"second line"]):
                packet = av.Packet(text)
                packet.stream, packet.time_base = subs, Fraction(1, 1000)
                packet.pts = packet.dts = 100 + 300 * k
                packet.duration = 250
                container.mux(packet)
    return path


def stub_predictor(size: int):
    """ab that depends on the frame only (deterministic, so reruns match): a* from the mean gray, b* constant."""

    def predict(rgbs: list[np.ndarray]) -> np.ndarray:
        return np.stack(
            [np.stack([np.full((size, size), 80.0 * (r.mean() - 0.4)), np.full((size, size), -20.0)]) for r in rgbs]
        ).astype(np.float32)

    return predict


def decoded(path: Path) -> list[tuple[Fraction, np.ndarray]]:
    """(presentation time in seconds, yuv420p planes) of every video frame."""
    with av.open(str(path)) as container:
        return [(f.pts * f.time_base, f.to_ndarray(format="yuv420p")) for f in container.decode(video=0)]


def packets(path: Path, kind: str) -> list[tuple[Fraction | None, bytes]]:
    with av.open(str(path)) as container:
        stream = next(s for s in container.streams if s.type == kind)
        return [
            (p.pts * p.time_base if p.pts is not None else None, bytes(p)) for p in container.demux(stream) if p.size
        ]


def test_timestamps_audio_rotation_and_luma_round_trip(tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=14, rotation=90, sar=Fraction(4, 3))
    dst = tmp_path / "out" / "color.mp4"
    video = VideoColorizer(predictor=stub_predictor(32), size=32, batch_size=3, segment_frames=5, crf=0)
    result = video.colorize_video(src, dst)
    assert (result.frames, result.segments, result.reused_segments) == (14, 3, 0)
    assert result.copied_streams == ["audio:aac#1"]
    before, after = decoded(src), decoded(dst)
    assert [t for t, _ in after] == [t for t, _ in before]  # exact times, variable frame rate
    assert len({b - a for (a, _), (b, _) in itertools.pairwise(before)}) > 1
    h = 48
    for (_, yuv_in), (_, yuv_out) in zip(before, after, strict=True):
        assert np.array_equal(yuv_out[:h], yuv_in[:h])  # luma = the input's, bit for bit (crf 0 is lossless)
    assert np.abs(after[5][1][h:].astype(int) - 128).max() > 3  # and there is color
    assert packets(dst, "audio") == packets(src, "audio")  # audio copied untouched
    info = probe_video(dst)
    assert (info.rotation, info.width, info.height, info.time_base) == (90, 64, 48, TB)
    assert info.sample_aspect_ratio == Fraction(4, 3)
    assert not any(p.name.startswith(".") for p in dst.parent.iterdir())  # work folder and temp file gone


def test_subtitles_copied_and_container_from_output_name(tmp_path):
    src = make_clip(tmp_path / "in.mkv", frames=6, vfr=False, subtitles=True)
    dst = tmp_path / "out.mkv"
    result = VideoColorizer(predictor=stub_predictor(32), size=32).colorize_video(src, dst)
    assert sorted(result.copied_streams) == ["audio:aac#1", "subtitle:srt#2"]
    assert (
        packets(dst, "subtitle")
        == packets(src, "subtitle")
        == [
            (Fraction(1, 10), b"first line"),
            (Fraction(2, 5), b"second line"),
        ]
    )
    assert probe_video(dst).format.startswith("matroska")
    with av.open(str(dst)) as container:
        assert container.streams.subtitles[0].metadata.get("language") == "fra"
    # mp4 cannot hold SRT: the subtitle stream is dropped and reported, audio still copied
    result = VideoColorizer(predictor=stub_predictor(32), size=32).colorize_video(src, tmp_path / "out.mp4")
    assert result.dropped_streams == ["subtitle:srt#2"] and result.copied_streams == ["audio:aac#1"]


def test_temporal_off_is_plain_per_frame_and_flow_changes_it(tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=8, audio=False)
    outs = {}
    for mode in ("off", "flow"):
        video = VideoColorizer(predictor=stub_predictor(32), size=32, temporal=mode, crf=0)
        video.colorize_video(src, tmp_path / f"{mode}.mp4")
        outs[mode] = decoded(tmp_path / f"{mode}.mp4")
    per_frame = VideoColorizer(predictor=stub_predictor(32), size=32, temporal="off")
    with av.open(str(src)) as container:
        rgbs = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    expected = [rgb for rgb, _ in per_frame.colorize_frames(rgbs)]
    got = [av.VideoFrame.from_ndarray(y, format="yuv420p").to_ndarray(format="rgb24") for _, y in outs["off"]]
    assert max(np.abs(g.astype(int) - e.astype(int)).max() for g, e in zip(got, expected, strict=True)) <= 6
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(outs["off"], outs["flow"], strict=True))


@pytest.mark.slow
def test_real_network_path_keeps_luma(tmp_path):
    from ddcolor.colorize import Colorizer, random_init_model

    src = make_clip(tmp_path / "in.mp4", frames=4, audio=False)
    colorizer = Colorizer(random_init_model("atto", warn=False), input_size=32, device="cpu", precision="fp32")
    result = VideoColorizer(colorizer, crf=0).colorize_video(src, tmp_path / "out.mp4")
    assert result.frames == 4
    for (_, a), (_, b) in zip(decoded(src), decoded(tmp_path / "out.mp4"), strict=True):
        assert np.array_equal(a[:48], b[:48])


def test_bad_inputs_name_the_file_and_leave_no_output(tmp_path):
    good = make_clip(tmp_path / "good.mp4", frames=4)
    (tmp_path / "text.mp4").write_text("not a video at all")
    (tmp_path / "truncated.mp4").write_bytes(good.read_bytes()[:600])
    audio_only = tmp_path / "audio.m4a"
    with av.open(str(audio_only), "w", format="mp4") as container:
        sound = container.add_stream("aac", rate=8000)
        sound.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 8000, 0
        for packet in [*sound.encode(frame), *sound.encode(None)]:
            container.mux(packet)
    # moov first (faststart): the header survives, the frames it announces do not
    long = make_clip(tmp_path / "long.mkv", frames=30, audio=False)
    with av.open(str(long)) as source, av.open(str(tmp_path / "fs.mp4"), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.size:
                packet.stream = stream
                out.mux(packet)
    long.unlink()
    data = (tmp_path / "fs.mp4").read_bytes()
    (tmp_path / "fs.mp4").unlink()
    (tmp_path / "cut_short.mp4").write_bytes(data[: len(data) * 6 // 10])
    cases = {
        "text.mp4": "not a video",
        "truncated.mp4": "truncated",
        "cut_short.mp4": r"truncated: decoded \d+ of the 30 frames",
        "audio.m4a": "no video stream",
    }
    video = VideoColorizer(predictor=stub_predictor(32), size=32)
    for name, words in cases.items():
        with pytest.raises(VideoError, match=words) as info:
            video.colorize_video(tmp_path / name, tmp_path / "out" / f"{name}.mkv")
        assert str(tmp_path / name) in str(info.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(VideoError, match=r"\.webm"):
        video.colorize_video(good, tmp_path / "x.webm")

    # a mixed folder: the rest is processed, the failures are counted (the CLI exits 1 on report.failed)
    from PIL import Image

    class Identity:  # what colorize_files needs of a Colorizer
        batch_size = 1

        def colorize_float(self, rgbs):
            return rgbs

    Image.fromarray(np.full((20, 30), 99, np.uint8)).save(tmp_path / "photo.png")
    colorizer = Identity()
    report = colorize_media(colorizer, [tmp_path / "audio.m4a", tmp_path], tmp_path / "res", video=video)
    failed = {Path(s.path).name: s.reason for s in report.failed}
    assert set(failed) == {"text.mp4", "truncated.mp4", "cut_short.mp4", "audio.m4a"}, failed
    assert sorted(Path(src).name for src, _ in report.processed) == ["good.mp4", "photo.png"]
    assert report.inputs == 6 and (tmp_path / "res" / "good.mp4").is_file()


def test_is_video_sniffs_containers(tmp_path):
    clip = make_clip(tmp_path / "a.mp4", frames=3, audio=False)
    odd = tmp_path / "clip.bin"
    odd.write_bytes(clip.read_bytes())
    (tmp_path / "p.png").write_bytes(b"\x89PNG")
    (tmp_path / "x.dat").write_text("hello")
    assert is_video(clip) and is_video(odd)
    assert not is_video(tmp_path / "p.png") and not is_video(tmp_path / "x.dat")


# --- temporal consistency ------------------------------------------------------------------------------------
def _flicker(gt_frames: np.ndarray, size: int, sigma: float = 6.0, seed: int = 0):
    """A per-frame "model": the true ab plus per-frame tint, saturation and smooth-field jitter (flicker)."""
    rng = np.random.default_rng(seed)
    gt = ab_of(np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in gt_frames]))
    count = iter(range(len(gt)))

    def predict(rgbs):
        out = []
        for _ in rgbs:
            i = next(count)
            field = cv2.resize(rng.normal(0, sigma, (3, 3, 2)).astype(np.float32), (size, size)).transpose(2, 0, 1)
            out.append(gt[i] * (1 + rng.normal(0, 0.15)) + rng.normal(0, sigma, (2, 1, 1)) + field)
        return np.stack(out).astype(np.float32)

    return predict


def _photo(seed: int, shape=(160, 200)) -> np.ndarray:
    """A smooth random color picture (structure for the flow, color for the metric)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
    return cv2.GaussianBlur(cv2.resize(small, shape[::-1], interpolation=cv2.INTER_CUBIC), (0, 0), 3)


def test_stabiliser_halves_warp_error_of_a_flickering_model():
    clip = render_clip(_photo(1), "pan", frames=10, size=(64, 64))
    results = {}
    for mode in ("off", "flow"):
        video = VideoColorizer(predictor=_flicker(clip.frames, 64), size=64, temporal=mode, batch_size=4)
        out = np.stack([rgb for rgb, _ in video.colorize_frames(clip.frames)])
        results[mode] = (
            video_warp_error(list(ab_of(out)), clip.flows, clip.masks),
            video_psnr_colorfulness(list(out), list(clip.frames))["psnr"],
            color_distribution_consistency(list(ab_of(out))),
        )
    (we_off, psnr_off, cdc_off), (we_flow, psnr_flow, cdc_flow) = results["off"], results["flow"]
    assert we_flow <= 0.5 * we_off, results
    assert psnr_flow >= psnr_off and cdc_flow < cdc_off, results


def test_cut_resets_the_stabiliser_no_color_bleeding():
    first = render_clip(_photo(2), "pan", frames=6, size=(64, 64))
    second = render_clip(_photo(3)[:, ::-1] // 2, "zoom", frames=5, size=(64, 64))
    clip = cut_clip(first, second)

    def shot_colored(rgbs):  # a different tint per shot: red-ish for bright frames, blue-ish for dark ones
        return np.stack(
            [np.stack([np.full((32, 32), 40.0 if r.mean() > 0.3 else -40.0), np.zeros((32, 32))]) for r in rgbs]
        ).astype(np.float32)

    outs = {}
    for name in ("reset", "never"):
        video = VideoColorizer(predictor=shot_colored, size=32, strength=0.9)
        if name == "never":  # no cut detection and no photometric check: what the reset prevents
            video._stabilizer = lambda: TemporalStabilizer(0.9, cut_threshold=2.0, min_confidence=0.0, sigma=1e9)
        video_frames = list(video.colorize_frames(clip.frames))
        outs[name] = (np.stack([f for f, _ in video_frames]), [i for i, (_, cut) in enumerate(video_frames) if cut])
    per_frame = np.stack(
        [f for f, _ in VideoColorizer(predictor=shot_colored, size=32, temporal="off").colorize_frames(clip.frames)]
    )
    after = slice(clip.cut_at, clip.cut_at + 1)
    assert outs["reset"][1] == [0, clip.cut_at]
    diff_reset = np.abs(ab_of(outs["reset"][0][after]) - ab_of(per_frame[after])).max()
    diff_never = np.abs(ab_of(outs["never"][0][after]) - ab_of(per_frame[after])).max()
    assert diff_reset < 1.0 < 20.0 < diff_never  # without the reset the first shot's color bleeds in


def test_warp_error_and_cdc_metrics():
    clip = render_clip(_photo(4), "rotate", frames=4, size=(64, 64))
    ab = list(ab_of(clip.frames))
    truth = video_warp_error(ab, clip.flows, clip.masks)
    shuffled = video_warp_error(ab[::-1], clip.flows, clip.masks)
    assert truth < 2.0 < shuffled  # the true colors move with the true motion
    assert color_distribution_consistency([ab[0], ab[0]]) == 0.0
    assert color_distribution_consistency([ab[0], ab[0] + 20.0]) > 0.3


# --- resume --------------------------------------------------------------------------------------------------
def test_resume_after_a_crash_reuses_segments_and_matches(tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=13)
    clean = tmp_path / "clean.mp4"
    VideoColorizer(predictor=stub_predictor(32), size=32, segment_frames=4, crf=0).colorize_video(src, clean)

    calls = {"n": 0}
    good = stub_predictor(32)

    def crashing(rgbs):
        calls["n"] += len(rgbs)
        if calls["n"] > 9:
            raise RuntimeError("simulated crash")
        return good(rgbs)

    crashing.__qualname__ = good.__qualname__  # same "model" for the segment manifest
    dst = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="simulated"):
        VideoColorizer(predictor=crashing, size=32, segment_frames=4, crf=0).colorize_video(src, dst)
    work = tmp_path / f".{dst.name}.ddcolor-parts"
    assert sorted(p.name for p in work.glob("seg-*.json")) == ["seg-00000.json", "seg-00001.json"]
    assert not dst.exists() and not list(tmp_path.glob(".out.mp4.*.tmp"))  # no temp file of the final mux
    result = VideoColorizer(predictor=good, size=32, segment_frames=4, crf=0).colorize_video(src, dst)
    assert (result.reused_segments, result.colorized, result.frames) == (2, 5, 13)
    assert all(ta == tb and np.array_equal(a, b) for (ta, a), (tb, b) in zip(decoded(clean), decoded(dst), strict=True))
    # other settings: the old segments are not reused
    result = VideoColorizer(predictor=good, size=32, segment_frames=4, crf=0, strength=0.5).colorize_video(
        src, dst, overwrite=True
    )
    assert result.reused_segments == 0


@pytest.mark.slow
def test_resume_after_kill_of_the_cli(tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=20, size=(48, 64), audio=True)
    cmd = [str(Path(sys.executable).parent / "ddcolor"), "colorize", str(src), "--random-init", "--input-size", "32",
           "--segment-frames", "4", "--crf", "0", "--precision", "fp32", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    clean = tmp_path / "clean.mp4"
    subprocess.run([*cmd, "-o", str(clean)], check=True, env=env, capture_output=True, timeout=600)
    dst = tmp_path / "out.mp4"
    work = tmp_path / f".{dst.name}.ddcolor-parts"
    proc = subprocess.Popen([*cmd, "-o", str(dst)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (work / "seg-00002.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(work.glob("seg-*.json")))
    assert 3 <= done < 5 and not dst.exists(), done
    subprocess.run([*cmd, "-o", str(dst)], check=True, env=env, capture_output=True, timeout=600)
    assert not work.exists()
    assert all(ta == tb and np.array_equal(a, b) for (ta, a), (tb, b) in zip(decoded(clean), decoded(dst), strict=True))
    assert packets(dst, "audio") == packets(src, "audio")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no work folder, no temp file


# --- playground ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_playground_video_endpoint_side_by_side(tmp_path, monkeypatch):
    import base64

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ddcolor.config import load_config
    from ddcolor.ui import UiSettings, create_app

    monkeypatch.setenv("DDCOLOR_WEIGHTS_DIR", str(tmp_path / "weights"))
    settings = UiSettings(max_upload_bytes=200_000, input_sizes=(32,), default_input_size=32, max_video_seconds=1.0)
    app = create_app(
        load_config(None), tracking_uri=f"sqlite:///{tmp_path / 'none.db'}", device="cpu", settings=settings
    )
    client = TestClient(app)

    def post(path: Path):
        files = {"file": (path.name, path.read_bytes(), "application/octet-stream")}
        return client.post("/api/colorize-video", files=files, data={"model": "random-init:atto:0", "input_size": "32"})

    res = post(make_clip(tmp_path / "short.mp4", frames=8, vfr=False))
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["frames"] == 8 and body["model"]["random_init"]
    for key in ("per_frame", "stabilised"):
        (tmp_path / f"{key}.mp4").write_bytes(base64.b64decode(body[key].split(",", 1)[1]))
        assert len(decoded(tmp_path / f"{key}.mp4")) == 8
    res = post(make_clip(tmp_path / "long.mp4", frames=40, vfr=False))  # 1.6 s > 1 s
    assert res.status_code == 422 and "up to 1 s" in res.json()["error"]
    (tmp_path / "junk.mp4").write_text("junk")
    res = post(tmp_path / "junk.mp4")
    assert res.status_code == 422 and res.json()["error"].startswith("junk.mp4: not a video")
