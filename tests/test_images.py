import io

import pytest
from PIL import Image

from vlmux.images import ImageError, check_input, load_image


def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=options.pop("format", "PNG"), **options)
    return buffer.getvalue()


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))  # a red top-left corner: a turn the wrong way puts it elsewhere
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    loaded = load_image(png_bytes(image, format="JPEG", exif=exif))
    assert loaded.size == (20, 40)
    red = {corner for corner in [(0, 0), (19, 0), (0, 39), (19, 39)] if loaded.getpixel(corner)[0] > 128}
    assert red == {(19, 0)}  # turned clockwise, the top-left corner is the top-right one


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "LA", "L", "1"])
def test_unusual_modes_become_rgb(mode):
    image = Image.new(mode, (16, 16))
    data = png_bytes(image, format="JPEG" if mode == "CMYK" else "PNG")
    assert load_image(data).mode == "RGB"


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([10, 20, 30] + [0] * 765)
    loaded = load_image(png_bytes(image, transparency=0))
    assert loaded.getpixel((0, 0)) == (255, 255, 255)


def test_animation_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert load_image(buffer.getvalue()).getpixel((0, 0))[0] > 200


def test_large_jpegs_are_decoded_at_reduced_size():
    big = png_bytes(Image.new("RGB", (4000, 3000), (0, 128, 0)), format="JPEG")
    assert max(load_image(big).size) <= 2000


@pytest.mark.parametrize("data, reason", [
    (b"", "not an image"),
    (b"hello, I am text", "not an image"),
])
def test_non_images_are_image_errors(data, reason):
    with pytest.raises(ImageError, match=reason):
        load_image(data)


def test_truncated_file_is_an_image_error():
    data = png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"), format="JPEG")
    with pytest.raises(ImageError, match="decode"):
        load_image(data[: len(data) // 2])


def test_decompression_bomb_is_reported_not_raised_as_a_crash():
    bomb = png_bytes(Image.new("1", (20000, 20000)))  # 400 MP, twice the default limit
    with pytest.raises(ImageError, match="decompression bomb") as raised:
        load_image(bomb)
    assert "--max-pixels" in str(raised.value)  # says how to raise the limit


def test_a_102_megapixel_photo_is_decoded_at_its_draft_size():
    photo = png_bytes(Image.new("RGB", (11648, 8736), (40, 90, 160)), format="JPEG", quality=50)
    assert load_image(photo).size == (1456, 1092)  # the README's promise: decoded at 1/8 of each side


def test_a_144_megapixel_png_is_under_the_default_limit_and_a_lower_limit_refuses_it():
    big = png_bytes(Image.new("L", (12000, 12000), 128))
    assert load_image(big).size == (12000, 12000)
    with pytest.raises(ImageError, match="12000x12000.*--max-pixels"):
        load_image(big, max_pixels=100_000_000)


def test_max_pixels_raises_the_limit_and_none_lifts_it():
    bomb = png_bytes(Image.new("1", (20000, 12000)))  # 240 MP
    assert load_image(bomb, max_pixels=250_000_000).size == (20000, 12000)
    assert load_image(bomb, max_pixels=None).size == (20000, 12000)


def test_a_jpeg_counts_at_the_size_it_decodes_to():
    photo = png_bytes(Image.new("RGB", (4000, 3000)), format="JPEG")
    assert load_image(photo, max_pixels=3_000_000).size == (2000, 1500)  # drafted to 3 MP, under the limit
    with pytest.raises(ImageError, match="too large"):
        load_image(photo, draft=None, max_pixels=3_000_000)


def test_preparing_processes_apply_the_request_limit(monkeypatch):
    from vlmux.worker import prep

    monkeypatch.setattr(prep, "_source", prep.Source("unused", False, "float32"))
    part = prep._prepare_part([png_bytes(Image.new("L", (100, 100)))], ["Describe."], max_pixels=5000)
    assert part.inputs is None and "--max-pixels" in part.bad[0]


def test_missing_file_names_itself(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "nope.png")


@pytest.mark.parametrize("item, named", [
    (None, "NoneType"),
    (7, "int"),
    ((b for b in [b"x"]), "generator"),
    ([b"x"], "list"),
])
def test_what_is_not_a_path_bytes_or_a_picture_is_named(item, named):
    reason = check_input(item)
    assert reason == f"not an image: {named}; give a path, bytes or a PIL image"
    with pytest.raises(ImageError) as raised:
        load_image(item)
    assert str(raised.value) == reason


@pytest.mark.parametrize("size", [(0, 0), (0, 10), (10, 0)])
def test_a_picture_without_pixels_is_an_image_error(size):
    reason = check_input(Image.new("RGB", size))
    assert reason is not None and f"{size[0]}x{size[1]}" in reason
    with pytest.raises(ImageError, match="empty image"):
        load_image(Image.new("RGB", size))


def test_possible_images_pass_the_check_without_being_read(tmp_path):
    for item in (tmp_path / "not yet written.png", "any/path.jpg", b"", b"not decoded here", Image.new("L", (1, 1))):
        assert check_input(item) is None


def test_a_32_bit_image_holding_8_bit_values_keeps_them_and_16_bit_values_are_scaled():
    eight = Image.new("I", (4, 4), 200)
    sixteen = Image.new("I", (4, 4), 50_000)
    assert load_image(eight).getpixel((0, 0)) == (200, 200, 200)
    assert load_image(sixteen).getpixel((0, 0)) == (195, 195, 195)


def test_a_url_is_named_as_one_and_left_as_it_is_by_the_callers_folder(tmp_path, monkeypatch):
    from vlmux.images import from_caller

    with pytest.raises(ImageError, match="a URL .*download it"):
        load_image("https://example.com/cat.png")
    monkeypatch.chdir(tmp_path)
    assert from_caller("https://example.com/cat.png") == "https://example.com/cat.png"
    assert from_caller("cat.png") == str(tmp_path / "cat.png")
    assert from_caller(b"bytes") == b"bytes"
