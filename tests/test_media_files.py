"""chronoedit.media, files and sizing: reading, sizing, output checks and atomic writers (no model, fast)."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import textwrap

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

from chronoedit import files, media, sizing
from chronoedit.errors import UserError


def _png(path, size=(64, 48), color=(10, 200, 30), mode="RGB"):
    Image.new(mode, size, color).save(path)
    return path


def _video_frames(count, height=32, width=32, seed=0):
    return np.random.default_rng(seed).random((count, height, width, 3), dtype=np.float32)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".probe-" in p.name)


# ------------------------------------------------------------------------------------------------------- load_image
def test_load_image_reads_rgb(tmp_path):
    image = media.load_image(_png(tmp_path / "a.png"))
    assert image.mode == "RGB" and image.size == (64, 48) and image.getpixel((0, 0)) == (10, 200, 30)


def test_load_image_missing(tmp_path):
    path = tmp_path / "missing.png"
    with pytest.raises(UserError, match=f"^input image not found: {re.escape(str(path))}$"):
        media.load_image(path)


def test_load_image_directory(tmp_path):
    with pytest.raises(ValueError, match=f"^cannot read image {re.escape(str(tmp_path))}: it is a directory, not a "
                                         "regular file$"):
        media.load_image(tmp_path)


@pytest.mark.parametrize("suffix, keep", [(".png", 0.5), (".png", 0.97), (".jpg", 0.5)])
def test_load_image_truncated(tmp_path, suffix, keep):
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    full = tmp_path / f"full{suffix}"
    Image.fromarray(noise).save(full)
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=f"^cannot read image {re.escape(str(cut))}: .+"):
        media.load_image(cut)


def test_load_image_corrupt_bytes(tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=f"^cannot read image {re.escape(str(path))}: "):
        media.load_image(path)


def test_load_image_text_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ValueError, match=f"^cannot read image {re.escape(str(path))}: not a PNG, JPEG, WEBP, GIF, BMP "
                                         "or TIFF image$"):
        media.load_image(path)


def test_load_image_refuses_formats_outside_the_list(tmp_path):
    """An EPS (Ghostscript), ICO or PPM file is never decoded, whatever its name says."""
    for name, fmt in (("drawing.png", "EPS"), ("icon.png", "ICO"), ("raw.png", "PPM")):
        path = tmp_path / name
        Image.new("RGB", (16, 16), (1, 2, 3)).save(path, format=fmt)
        assert Image.open(path).format == fmt  # Pillow alone would open it
        with pytest.raises(UserError, match=f"^cannot read image {re.escape(str(path))}: not a PNG, JPEG"):
            media.load_image(path)
        with pytest.raises(UserError, match="not a readable image"):
            media.image_size(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_load_image_reads_every_listed_format(tmp_path, fmt):
    path = tmp_path / f"image.{fmt.lower()}"
    Image.new("RGB", (16, 8), (0, 0, 250)).save(path, format=fmt)
    assert media.load_image(path).size == (16, 8) and media.image_size(path) == (16, 8)


def test_named_pipe_input_fails_at_once(tmp_path):
    """A FIFO would block a reader until someone writes to it; it is refused without waiting."""
    fifo = tmp_path / "input.png"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=f"^cannot read image {re.escape(str(fifo))}: it is a named pipe, not a regular "
                                        "file$"):
        media.load_image(fifo)
    with pytest.raises(UserError, match="it is a named pipe"):
        files.check_regular(fifo, "LoRA")
    with pytest.raises(UserError, match="it is a named pipe"):
        files.open_regular(fifo)


def test_devices_are_not_inputs(tmp_path):
    with pytest.raises(UserError, match=r"^cannot read image /dev/null: it is a device, not a regular file$"):
        media.load_image("/dev/null")
    with pytest.raises(UserError, match=r"^cannot read weights /dev/zero: it is a device"):
        files.check_regular("/dev/zero", "weights")
    with files.open_regular(_png(tmp_path / "ok.png")) as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_load_image_alpha_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    rgba.save(tmp_path / "alpha.png")
    image = media.load_image(tmp_path / "alpha.png")
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 1)) == (255, 0, 0)
    assert all(abs(c - 127) <= 1 for c in image.getpixel((2, 2)))


@pytest.mark.parametrize(
    "mode, value, expected", [("L", 77, (77, 77, 77)), ("LA", (0, 0), (255, 255, 255)), ("P", 0, (0, 0, 0))]
)
def test_load_image_grey_and_palette(tmp_path, mode, value, expected):
    Image.new(mode, (4, 4), value).save(tmp_path / "x.png")
    assert media.load_image(tmp_path / "x.png").getpixel((0, 0)) == expected


def test_load_image_16bit_grey_scaled(tmp_path):
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "g16.png")
    assert media.load_image(tmp_path / "g16.png").getpixel((0, 0)) == (255, 255, 255)


def test_load_image_palette_transparency(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.save(tmp_path / "p.png", transparency=1)
    assert media.load_image(tmp_path / "p.png").getpixel((0, 0)) == (255, 255, 255)


# ----------------------------------------------------------------------------------------------------------- sizing
@pytest.mark.parametrize(
    "width, height", [(1024, 1024), (1280, 720), (720, 1280), (640, 480), (3000, 2000), (333, 1777)]
)
def test_auto_size_matches_nvidia_recipe(width, height):
    ar, area = height / width, 720 * 1280
    recipe_h = round((area * ar) ** 0.5) // 16 * 16
    recipe_w = round((area / ar) ** 0.5) // 16 * 16
    assert sizing.auto_size(width, height) == (recipe_w, recipe_h)


@pytest.mark.parametrize("width, height", [(1, 5000), (16_777_216, 1), (10_000, 7), (3, 1), (1, 1)])
def test_auto_size_never_exceeds_the_area(width, height):
    for area in (256 * 256, 720 * 1280):
        w, h = sizing.auto_size(width, height, max_area=area)
        assert w % 16 == 0 and h % 16 == 0 and w * h <= area


def test_auto_size_exact_figures():
    assert sizing.auto_size(1024, 1024) == (960, 960)
    assert sizing.auto_size(1280, 720) == (1280, 720)
    assert sizing.auto_size(720, 1280) == (720, 1280)
    assert sizing.auto_size(640, 480) == (1104, 816)
    assert sizing.auto_size(3000, 2000) == (1168, 784)
    assert sizing.auto_size(512, 384, max_area=256 * 256) == (288, 208)
    assert sizing.auto_size(1, 5000, max_area=256 * 256) == (16, 4096)  # never below the multiple, area kept
    assert sizing.auto_size(16_777_216, 1) == (57600, 16)  # a 1-pixel-high strip stays within 720*1280 pixels
    assert sizing.auto_size(64, 64, max_area=16) == (16, 16)


def test_auto_size_rejects_bad_input():
    with pytest.raises(ValueError):
        sizing.auto_size(0, 10)


def test_check_size():
    sizing.check_size(1280, 720)
    sizing.check_size(16, 16)
    with pytest.raises(
        ValueError,
        match=r"^height and width must be multiples of 16 and at least 16, got 720x1281 "
        r"\(height x width\): bad width 1281$",
    ):
        sizing.check_size(1281, 720)
    with pytest.raises(ValueError, match="bad height 0"):
        sizing.check_size(16, 0)
    with pytest.raises(ValueError, match="bad height 8 and width 24"):
        sizing.check_size(24, 8)


def test_resize_for_edit():
    image = Image.new("RGBA", (100, 50), (0, 0, 255, 255))
    resized = sizing.resize_for_edit(image, 64, 32)
    assert resized.size == (64, 32) and resized.mode == "RGB" and resized.getpixel((5, 5)) == (0, 0, 255)
    same = Image.new("RGB", (64, 32))
    assert sizing.resize_for_edit(same, 64, 32) is not same


# --------------------------------------------------------------------------------------------------- output checks
@pytest.mark.parametrize(
    "name, kind", [("a.png", "image"), ("a.JPG", "image"), ("a.jpeg", "image"), ("a.webp", "image"), ("a.mp4", "video")]
)
def test_output_kind(name, kind):
    assert media.output_kind(name) == kind


def test_output_kind_unknown():
    with pytest.raises(
        ValueError,
        match=r"^unknown output suffix '\.xyz' for out\.xyz: use \.png, \.jpg, \.jpeg, "
        r"\.webp or \.mp4$",
    ):
        media.output_kind("out.xyz")
    with pytest.raises(ValueError, match="unknown output suffix"):
        media.output_kind("out")


def test_check_writable_creates_folder(tmp_path):
    target = tmp_path / "new" / "deeper" / "edit.png"
    files.check_writable(target)
    assert target.parent.is_dir() and not target.exists() and _leftovers(target.parent) == []


def test_check_writable_under_regular_file(tmp_path):
    blocker = _png(tmp_path / "file.png")
    target = blocker / "sub" / "edit.png"
    message = f"cannot write output {target}: {blocker} is not a directory"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        files.check_writable(target)


def test_check_writable_directory_target(tmp_path):
    with pytest.raises(ValueError, match="it is a directory"):
        files.check_writable(tmp_path)


def test_check_finite():
    media.check_finite(np.zeros(3))
    media.check_finite(np.zeros(3, dtype=np.uint8))
    msg = r"^non-finite values \(NaN/Inf\) in the output; nothing was written$"
    with pytest.raises(ValueError, match=msg):
        media.check_finite(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match=msg):
        media.check_finite(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="in the trajectory"):
        media.check_finite(np.array([np.inf]), what="trajectory")


# ------------------------------------------------------------------------------------------------------ conversions
def test_frames_to_pil_accepts_all_layouts():
    floats = _video_frames(3, 8, 12)
    from_np = media.frames_to_pil(floats)
    from_torch = media.frames_to_pil(torch.from_numpy(floats).permute(0, 3, 1, 2))
    from_uint8 = media.frames_to_pil((floats * 255).round().astype(np.uint8))
    from_pil = media.frames_to_pil(from_np)
    for frames in (from_np, from_torch, from_uint8, from_pil):
        assert len(frames) == 3 and frames[0].size == (12, 8) and frames[0].mode == "RGB"
    assert np.array_equal(np.asarray(from_np[1]), np.asarray(from_torch[1]))
    assert np.array_equal(np.asarray(from_np[2]), np.asarray(from_uint8[2]))


def test_frames_to_pil_clips_and_rejects_nan():
    frames = media.frames_to_pil(np.array([[[[-1.0, 0.5, 2.0]]]]))
    assert frames[0].getpixel((0, 0)) == (0, 128, 255)
    with pytest.raises(ValueError, match="non-finite"):
        media.frames_to_pil(np.full((1, 2, 2, 3), np.nan))
    with pytest.raises(ValueError, match="expected frames shaped"):
        media.frames_to_pil(np.zeros((2, 3)))


# ---------------------------------------------------------------------------------------------------------- writing
@pytest.mark.parametrize("name", ["edit.png", "edit.jpg", "edit.jpeg", "edit.webp"])
def test_save_image_formats(tmp_path, name):
    path = media.save_image(Image.new("RGB", (32, 16), (200, 10, 10)), tmp_path / name)
    with Image.open(path) as image:
        assert image.size == (32, 16)
    assert _leftovers(tmp_path) == []


def test_save_image_from_float_array(tmp_path):
    media.save_image(np.ones((8, 4, 3), dtype=np.float32), tmp_path / "white.png")
    assert Image.open(tmp_path / "white.png").getpixel((0, 0)) == (255, 255, 255)


def test_save_image_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as handle:
            handle.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        media.save_image(Image.new("RGB", (8, 8)), tmp_path / "edit.png")
    assert list(tmp_path.iterdir()) == []


def test_save_image_failure_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "edit.png"
    target.write_bytes(b"previous")
    monkeypatch.setattr(Image.Image, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        media.save_image(Image.new("RGB", (8, 8)), target)
    assert target.read_bytes() == b"previous" and _leftovers(tmp_path) == []


def test_atomic_path(tmp_path):
    target = tmp_path / "x.mp4"
    with files.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".mp4" and tmp.name.startswith("x.mp4.tmp-")
        tmp.write_bytes(b"data")
        assert not target.exists()
    assert target.read_bytes() == b"data" and _leftovers(tmp_path) == []
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"data" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("count, height, width", [(5, 32, 32), (29, 48, 64), (5, 33, 47)])
def test_save_video_frame_count(tmp_path, count, height, width):
    path = media.save_video(_video_frames(count, height, width), tmp_path / "video.mp4")
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        assert reader.count_frames() == count
        assert tuple(reader.get_meta_data()["size"]) == (width + width % 2, height + height % 2)
    finally:
        reader.close()
    assert _leftovers(tmp_path) == []


def test_save_video_from_pil_and_torch(tmp_path):
    frames = media.frames_to_pil(_video_frames(5))
    media.save_video(frames, tmp_path / "a.mp4")
    media.save_video(torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)), tmp_path / "b.mp4")
    assert (tmp_path / "a.mp4").stat().st_size > 0 and (tmp_path / "b.mp4").stat().st_size > 0


def test_save_video_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    real_encode = media._encode_mp4

    def encode_then_fail(array, path, fps):
        real_encode(array[:2], path, fps)  # a real partial file exists at the temp path
        assert path.exists()
        raise OSError("encoder died")

    monkeypatch.setattr(media, "_encode_mp4", encode_then_fail)
    with pytest.raises(OSError, match="encoder died"):
        media.save_video(_video_frames(5), tmp_path / "video.mp4")
    assert list(tmp_path.iterdir()) == []


def test_save_video_checks_the_encoder_exit_status(tmp_path, monkeypatch):
    """An encoder that dies (here: reports a full disk and exits 1 after writing some bytes) is an OSError naming the
    cause, and no file is left under either name."""
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\nfor last; do :; done\nprintf 'partial' > \"$last\"\n"
                    "echo 'av_interleaved_write_frame(): No space left on device' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(media, "_ffmpeg", lambda: str(fake))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OSError) as caught:
        media.save_video(_video_frames(5), out / "video.mp4")
    assert caught.value.errno == errno.ENOSPC and files.os_reason(caught.value) == "the disk is full"
    assert list(out.iterdir()) == []


def test_save_video_rereads_what_it_wrote(tmp_path, monkeypatch):
    """An encoder that exits 0 but leaves a file that is not the whole video is caught by reading it back."""
    monkeypatch.setattr(media, "_count_frames", lambda path: 3)
    with pytest.raises(OSError, match="reads back with 3 of its 5 frames"):
        media.save_video(_video_frames(5), tmp_path / "video.mp4")
    assert list(tmp_path.iterdir()) == []


def test_save_video_on_a_disk_that_takes_no_more(tmp_path):
    """A real write failure: the encoder runs under a file-size limit (RLIMIT_FSIZE) smaller than the video, so the
    kernel stops it mid-file. Nothing is kept, and the error names the encoder's death."""
    script = textwrap.dedent(f"""
        import resource, sys
        import numpy as np
        from chronoedit import files, media
        frames = np.random.default_rng(0).random((17, 96, 128, 3), dtype=np.float32)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        try:
            media.save_video(frames, {str(tmp_path / "video.mp4")!r})
        except OSError as exc:
            print("refused:", files.os_reason(exc))
            sys.exit(3)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith("refused: the video encoder ") and list(tmp_path.iterdir()) == []


def test_atomic_path_flushes_before_the_rename(tmp_path, monkeypatch):
    """A disk that reports a full disk only when the data is flushed (fsync) fails the write; the old file stays."""
    target = tmp_path / "notes.txt"
    files.save_text("old", target)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as caught:
        files.save_text("new", target)
    assert caught.value.errno == errno.ENOSPC
    assert target.read_text() == "old" and _leftovers(tmp_path) == []


def test_save_video_rejects_nan_before_writing(tmp_path):
    frames = _video_frames(5)
    frames[2, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        media.save_video(frames, tmp_path / "video.mp4")
    assert list(tmp_path.iterdir()) == []


def test_writers_check_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"use \.mp4"):
        media.save_video(_video_frames(5), tmp_path / "video.png")
    with pytest.raises(ValueError, match=r"use \.png"):
        media.save_image(Image.new("RGB", (8, 8)), tmp_path / "image.mp4")


def test_contact_sheet_29_frames(tmp_path):
    path = media.save_contact_sheet(_video_frames(29, 64, 96), tmp_path / "sheet.png")
    with Image.open(path) as sheet:
        # ceil(sqrt(29)) = 6 columns x 5 rows of 96x64 tiles with 2 px gaps
        assert sheet.size == (6 * 96 + 7 * 2, 5 * 64 + 6 * 2)
    assert _leftovers(tmp_path) == []


def test_contact_sheet_downscales_large_frames(tmp_path):
    frames = [Image.new("RGB", (1280, 720), (i * 8, 0, 0)) for i in range(29)]
    sheet = media.make_contact_sheet(frames)
    assert sheet.width <= media.CONTACT_SHEET_MAX_WIDTH
    tile_w = (media.CONTACT_SHEET_MAX_WIDTH - 2 * 7) // 6
    assert sheet.height == 5 * round(720 * tile_w / 1280) + 6 * 2


def test_contact_sheet_labels_and_columns(tmp_path):
    frames = [Image.new("RGB", (64, 48), (255, 255, 255)) for _ in range(5)]
    labelled = media.make_contact_sheet(frames, columns=5)
    plain = media.make_contact_sheet(frames, columns=5, label=False)
    assert labelled.size == plain.size == (5 * 64 + 6 * 2, 48 + 2 * 2)
    corner = (2 + 3, 2 + 3)  # inside the first tile's label box
    assert plain.getpixel(corner) == (255, 255, 255) and labelled.getpixel(corner) != (255, 255, 255)
    assert labelled.getpixel((2 + 60, 2 + 44)) == (255, 255, 255)  # the rest of the tile is untouched
