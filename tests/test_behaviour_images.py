"""Image conversion (pipeline/images.py) pixel by pixel: inputs whose right answer is exact (an alpha of 0 or 255,
16-bit values on the rounding boundary, a crop that needs no resampling), so a wrong formula gives another number,
not just another shape."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.images import SkipImage, conform, decode_image, decode_png, encode_png, fit, to_mode


def test_16_bit_grey_keeps_the_nearest_8_bit_value():
    values = np.array([[0, 128, 129, 257 * 100 + 128, 257 * 100 + 129, 65535]], dtype=np.uint16)
    im, note = to_mode(Image.fromarray(values), 1, 0)  # uint16: mode I;16
    assert note == "converted I;16 to 8-bit" and im.mode == "L"
    assert np.asarray(im).tolist() == [[0, 0, 1, 100, 101, 255]]  # (v + 128) // 257


def test_float_grey_is_clipped_rounded_and_nan_is_black():
    values = np.array([[-5.0, 3.4, 3.6, 300.0, np.nan]], dtype=np.float32)
    im, note = to_mode(Image.fromarray(values, "F"), 1, 0)
    assert note == "converted float image" and np.asarray(im).tolist() == [[0, 3, 4, 255, 0]]


@pytest.mark.parametrize("background", [0, 255])
def test_alpha_is_composited_on_the_background(background):
    rgba = np.array([[[200, 100, 50, 0], [200, 100, 50, 255]]], dtype=np.uint8)  # transparent, opaque
    im, note = to_mode(Image.fromarray(rgba, "RGBA"), 3, background)
    assert note == f"composited RGBA alpha on background {background}"
    assert np.asarray(im).tolist() == [[[background] * 3, [200, 100, 50]]]
    la = np.array([[[90, 0], [90, 255]]], dtype=np.uint8)
    im, note = to_mode(Image.fromarray(la, "LA"), 1, background)
    assert note == f"composited LA alpha on background {background}" and np.asarray(im).tolist() == [[background, 90]]


@pytest.mark.parametrize("mode,fill", [("PA", (3, 0)), ("RGBa", (9, 9, 9, 0))])
def test_the_rarer_alpha_modes_are_composited_too(mode, fill):
    im, note = to_mode(Image.new(mode, (2, 1), fill), 3, 200)
    assert note == f"composited {mode} alpha on background 200" and np.asarray(im).tolist() == [[[200] * 3] * 2]


def test_a_mode_pillow_cannot_convert_is_skipped_with_its_reason():
    with pytest.raises(SkipImage, match=r"^cannot convert image mode La \(conversion from La to"):
        conform(Image.new("La", (16, 16)), resolution=16, channels=3, resize="pad", background=0, min_side=8)


def test_palette_images_with_and_without_transparency():
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    pal.putdata([0, 1])
    im, note = to_mode(pal, 3, 255)
    assert note == "converted palette image" and np.asarray(im).tolist() == [[[10, 20, 30], [40, 50, 60]]]
    pal.info["transparency"] = 0  # colour 0 is transparent: it becomes the background
    im, note = to_mode(pal, 3, 255)
    assert note == "converted palette image" and np.asarray(im).tolist() == [[[255, 255, 255], [40, 50, 60]]]


def test_channel_conversion_uses_the_itu_luma_and_replicates_grey():
    rgb = Image.fromarray(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8), "RGB")
    im, note = to_mode(rgb, 1, 0)
    assert note is None and np.asarray(im).tolist() == [[76, 150, 29]]  # 0.299 R + 0.587 G + 0.114 B
    grey = Image.fromarray(np.array([[7, 200]], dtype=np.uint8), "L")
    im, note = to_mode(grey, 3, 0)
    assert note is None and np.asarray(im).tolist() == [[[7, 7, 7], [200, 200, 200]]]
    cmyk, note = to_mode(Image.new("CMYK", (1, 1), (0, 0, 0, 0)), 3, 0)
    assert note == "converted CMYK" and np.asarray(cmyk).tolist() == [[[255, 255, 255]]]


def test_exif_orientation_is_applied():
    im = Image.fromarray(np.arange(6, dtype=np.uint8).reshape(2, 3), "L")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    im.save(buf, format="PNG", exif=exif)
    out, _ = to_mode(decode_image(buf.getvalue(), max_pixels=100), 1, 0)
    assert np.asarray(out).tolist() == np.rot90(np.arange(6).reshape(2, 3), -1).tolist()


def _ramp(w: int, h: int) -> Image.Image:
    return Image.fromarray((np.arange(w * h) % 251).reshape(h, w).astype(np.uint8), "L")


def test_center_crop_without_resampling_takes_the_middle():
    im = _ramp(32, 16)
    out = np.asarray(fit(im, 16, "center_crop", 0))
    assert out.tolist() == np.asarray(im)[:, 8:24].tolist()
    tall = _ramp(16, 40)
    assert np.asarray(fit(tall, 16, "center_crop", 0)).tolist() == np.asarray(tall)[12:28].tolist()
    # larger: scaled so the short side is the resolution, then the middle
    assert fit(_ramp(64, 32), 16, "center_crop", 0).size == (16, 16)


@pytest.mark.parametrize("background", [0, 200])
def test_pad_centres_small_images_and_shrinks_large_ones_keeping_the_aspect(background):
    small = _ramp(8, 4)
    out = np.asarray(fit(small, 16, "pad", background))
    want = np.full((16, 16), background, dtype=np.uint8)
    want[6:10, 4:12] = np.asarray(small)
    assert out.tolist() == want.tolist()
    large = np.asarray(fit(_ramp(32, 16), 16, "pad", background))  # 16 x 8 after shrinking, rows 4..11
    assert (large[:4] == background).all() and (large[12:] == background).all()
    assert not (large[4:12] == background).all()
    rgb = np.asarray(fit(Image.new("RGB", (4, 4), (1, 2, 3)), 8, "pad", background))
    assert rgb[0, 0].tolist() == [background] * 3 and rgb[4, 4].tolist() == [1, 2, 3]
    same = _ramp(16, 16)
    assert fit(same, 16, "pad", background) is same and fit(same, 16, "resize", background) is same


def test_resize_squashes_to_the_square():
    assert fit(_ramp(40, 10), 16, "resize", 0).size == (16, 16)
    flat = Image.new("L", (40, 10), 77)
    assert (np.asarray(fit(flat, 16, "resize", 0)) == 77).all()


def test_conform_refuses_small_images_and_returns_hwc():
    with pytest.raises(SkipImage, match=r"^too small \(7x20 < min_side=8\)$"):
        conform(_ramp(7, 20), resolution=16, channels=1, resize="pad", background=0, min_side=8)
    arr, note = conform(_ramp(16, 16), resolution=16, channels=1, resize="pad", background=0, min_side=8)
    assert arr.shape == (16, 16, 1) and arr.dtype == np.uint8 and note is None
    arr, _ = conform(_ramp(16, 16), resolution=16, channels=3, resize="pad", background=0, min_side=16)
    assert arr.shape == (16, 16, 3)


@pytest.mark.parametrize("channels", [1, 3])
def test_png_round_trip_is_exact_and_deterministic(channels):
    arr = (np.arange(16 * 16 * channels) % 256).astype(np.uint8).reshape(16, 16, channels)
    data = encode_png(arr)
    assert decode_png(data).tolist() == arr.tolist() and encode_png(arr) == data
    assert Image.open(io.BytesIO(data)).mode == ("L" if channels == 1 else "RGB")


def test_decode_refuses_empty_unknown_truncated_and_oversized():
    with pytest.raises(SkipImage, match=r"^empty file \(0 bytes\)$"):
        decode_image(b"", max_pixels=100)
    with pytest.raises(SkipImage, match=r"^not a readable image \(unknown format\)$"):
        decode_image(b"hello", max_pixels=100)
    noise = np.random.default_rng(0).integers(0, 256, (10, 10, 1), dtype=np.uint8)  # incompressible: a long body
    png = encode_png(noise)
    with pytest.raises(SkipImage, match=r"^corrupt or truncated image"):
        decode_image(png[: len(png) // 2], max_pixels=1000)
    with pytest.raises(SkipImage, match=r"^too many pixels \(10x10 > max_pixels=99; decompression bomb guard\)$"):
        decode_image(png, max_pixels=99)
    assert decode_image(png, max_pixels=100).size == (10, 10)  # at the limit: decoded


def test_32_bit_integer_grey_is_read_as_16_bit_range():
    values = np.array([[-1000, -7, 0, 257 * 100 + 128, 65535, 100000]], dtype=np.int32)
    im, note = to_mode(Image.fromarray(values), 1, 0)  # int32: mode I; out of the 16-bit range: clipped
    assert note == "converted I to 8-bit, values outside 0..65535 clipped (-1000..100000)"
    assert np.asarray(im).tolist() == [[0, 0, 0, 100, 255, 255]]


def test_a_32_bit_tiff_holding_8_bit_values_is_read_as_8_bit():
    buf = io.BytesIO()
    Image.fromarray(np.array([[0, 7, 100, 255]] * 8, dtype=np.int32)).save(buf, format="TIFF")
    im = decode_image(buf.getvalue(), max_pixels=1000)
    assert im.mode == "I"
    arr, note = conform(im, resolution=4, channels=1, resize="resize", background=0, min_side=4)
    assert note == "converted I with values in 0..255 (read as 8-bit)"
    assert arr[0, :, 0].tolist() == [0, 7, 100, 255]  # the 16-bit reading would be [0, 0, 0, 1]: black


def test_a_16_bit_pgm_stays_a_16_bit_reading_even_when_dark():
    # Pillow opens a 16-bit PGM as mode I scaled to 0..65535; one whose maxval is 65535 but whose values stay
    # low is a dark 16-bit image, not 8-bit data: it keeps the 16-bit reading and is counted as dark.
    pgm = b"P5 4 1 65535\n" + np.array([0, 257, 1000, 4095], dtype=">u2").tobytes()
    im = decode_image(pgm, max_pixels=1000)
    assert im.mode == "I"
    out, note = to_mode(im, 1, 0)
    assert note == "converted I to 8-bit, dark: every value under 4096 of 65535 (max 4095)"
    assert np.asarray(out).tolist() == [[0, 1, 4, 16]]
    out, note = to_mode(Image.fromarray(np.array([[0, 4096]], dtype=np.uint16)), 1, 0)
    assert note == "converted I;16 to 8-bit" and np.asarray(out).tolist() == [[0, 16]]  # 4096: not counted dark


def test_the_resampling_filters_are_the_documented_ones():
    """resize and center_crop resample with bicubic, pad shrinks with Lanczos (and keeps the aspect)."""
    src = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 40), dtype=np.uint8), "L")
    want = src.resize((16, 16), Image.Resampling.BICUBIC)
    assert np.asarray(fit(src, 16, "resize", 0)).tolist() == np.asarray(want).tolist()
    want = src.resize((32, 16), Image.Resampling.BICUBIC).crop((8, 0, 24, 16))
    assert np.asarray(fit(src, 16, "center_crop", 0)).tolist() == np.asarray(want).tolist()
    shrunk = np.asarray(src.resize((16, 8), Image.Resampling.LANCZOS))
    assert np.asarray(fit(src, 16, "pad", 0))[4:12].tolist() == shrunk.tolist()


def _tiff_f(values) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.array(values, dtype=np.float32), "F").save(buf, format="TIFF")
    return buf.getvalue()


def test_a_float_tiff_in_0_to_1_is_scaled_by_255():
    im = decode_image(_tiff_f([[0.0, 0.2, 0.6, 1.0]] * 8), max_pixels=1000)  # a real mode-F TIFF, as Pillow writes it
    assert im.mode == "F"
    arr, note = conform(im, resolution=4, channels=1, resize="resize", background=0, min_side=4)
    assert note == "converted float image in 0..1 (scaled to 0..255)"
    assert arr[0, :, 0].tolist() == [0, 51, 153, 255]  # unscaled it would be [0, 0, 1, 1]: a black image


def test_a_float_tiff_in_minus_1_to_1_is_mapped_to_0_to_255():
    im = decode_image(_tiff_f([[-1.0, -0.2, 0.0, 1.0]] * 8), max_pixels=1000)
    arr, note = conform(im, resolution=4, channels=1, resize="resize", background=0, min_side=4)
    assert note == "converted float image in -1..1 (mapped to 0..255)"
    assert arr[0, :, 0].tolist() == [0, 102, 128, 255]  # read as 0..255 it would be [0, 0, 0, 1]


def test_a_float_tiff_beyond_1_keeps_the_0_to_255_reading():
    im = decode_image(_tiff_f([[0.0, 0.2, 0.6, 1.5]] * 8), max_pixels=1000)
    arr, note = conform(im, resolution=4, channels=1, resize="resize", background=0, min_side=4)
    assert note == "converted float image" and arr[0, :, 0].tolist() == [0, 0, 1, 2]


def _gif(colours) -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in colours]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def test_an_animated_gif_keeps_its_first_frame_and_says_so():
    im = decode_image(_gif([(255, 0, 0), (0, 255, 0), (0, 0, 255)]), max_pixels=1000)
    arr, note = conform(im, resolution=16, channels=3, resize="pad", background=0, min_side=8)
    assert note == "first frame of a multi-frame image (3 frames; the others are not used)"
    assert (arr == [255, 0, 0]).all()
    im = decode_image(_gif([(0, 0, 255)]), max_pixels=1000)  # one frame: a palette image like any other
    arr, note = conform(im, resolution=16, channels=3, resize="pad", background=0, min_side=8)
    assert note == "converted palette image" and (arr == [0, 0, 255]).all()


def test_is_colour_asks_whether_any_pixel_s_red_green_and_blue_differ():
    """prepare's report of colour images made grey and `pipeline tokenize`'s refusal read this one rule (its mutants
    all lived: no test of the selection called it)."""
    from pipeline.images import is_colour

    grey_rgb = np.array([[[7, 7, 7], [200, 200, 200]]], dtype=np.uint8)
    tinted = np.array([[[7, 7, 7], [10, 11, 10]]], dtype=np.uint8)  # one pixel, green off by one
    assert not is_colour(Image.fromarray(grey_rgb, "RGB")) and is_colour(Image.fromarray(tinted, "RGB"))
    assert not is_colour(Image.new("L", (2, 2), 9)) and not is_colour(Image.new("I;16", (2, 2), 300))
    palette = Image.new("P", (2, 1))
    palette.putpalette([5, 5, 5, 90, 90, 90] + [0, 0, 0] * 254)
    palette.putpixel((1, 0), 1)
    assert not is_colour(palette)  # a palette of greys: its indices (0, 1) are not its colours
    palette.putpalette([5, 5, 5, 90, 0, 90] + [0, 0, 0] * 254)
    assert is_colour(palette)

    class Unconvertible:  # a mode Pillow cannot convert: conform skips the image, so it counts as not colour
        mode = "XYZ"

        def convert(self, mode: str) -> Image.Image:
            raise ValueError(f"conversion from XYZ to {mode} not supported")

    assert is_colour(Unconvertible()) is False


@pytest.mark.parametrize("values, dtype, note, pixels", [
    # mode I with values in 0..255 is 8-bit data, down to a top value of 1 (a 16-bit reading would be black)
    ([0, 1], np.int32, "converted I with values in 0..255 (read as 8-bit)", [0, 1]),
    # all zero: no 8-bit evidence and nothing dark to report
    ([0, 0], np.int32, "converted I to 8-bit", [0, 0]),
    # 256 is past 8 bits: the 16-bit reading, counted dark (as 8-bit data it would wrap to 0)
    ([0, 256], np.int32, "converted I to 8-bit, dark: every value under 4096 of 65535 (max 256)", [0, 1]),
    # negatives alone are clipped (not called dark), and so is 65536 alone
    ([-5, 100], np.int32, "converted I to 8-bit, values outside 0..65535 clipped (-5..100)", [0, 0]),
    ([0, 65536], np.int32, "converted I to 8-bit, values outside 0..65535 clipped (0..65536)", [0, 255]),
    # a 16-bit image whose top value is 1 is dark
    ([0, 1], np.uint16, "converted I;16 to 8-bit, dark: every value under 4096 of 65535 (max 1)", [0, 0]),
])
def test_integer_grey_boundaries(values, dtype, note, pixels):
    out, said = to_mode(Image.fromarray(np.array([values], dtype=dtype)), 1, 0)
    assert (said, np.asarray(out).tolist()) == (note, [pixels])


def test_a_float_image_reaching_below_minus_1_keeps_the_0_to_255_reading():
    out, note = to_mode(Image.fromarray(np.array([[-1.5, 1.0]], dtype=np.float32), "F"), 1, 0)
    assert note == "converted float image" and np.asarray(out).tolist() == [[0, 1]]


def test_a_decompression_bomb_warning_is_a_skip_that_says_so(monkeypatch):
    """Pillow warns (DecompressionBombWarning) above its own pixel limit and raises above twice it; both are a
    skip with Pillow's words, whatever max_pixels lets through."""
    png = encode_png(np.zeros((10, 10, 1), dtype=np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60)  # 100 pixels: above 60, under 120
    with pytest.raises(SkipImage, match=r"^decompression bomb refused \(Image size \(100 pixels\) exceeds limit"):
        decode_image(png, max_pixels=1000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # above twice the limit: Pillow's error
    with pytest.raises(SkipImage, match=r"^decompression bomb refused \(Image size \(100 pixels\) exceeds limit"):
        decode_image(png, max_pixels=1000)
